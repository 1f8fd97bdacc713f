// segany convert: any checkpoint we read (.pth or .safetensors) -> safetensors, floating-point
// tensors in f32, bf16 or f16. safetensors loads without a pickle and maps straight into memory;
// bf16 halves the file. The result is read back and compared before we say it is done.
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "commands.h"
#include "io/checkpoint.h"
#include "segany/error.h"

namespace segany::cli {
namespace {

struct ConvertOptions {
  std::string in, out, dtype = "f32";
};

bool is_floating(DType t) { return t == DType::F32 || t == DType::F16 || t == DType::BF16 || t == DType::F64; }

Tensor convert_tensor(const Tensor& t, DType to) {
  if (!is_floating(t.dtype()) || t.dtype() == to) return t;  // integers stay as they are
  Tensor f = t.to_f32();
  if (to == DType::F32) return f;
  Tensor out = Tensor::empty(t.shape(), to);
  const float* src = f.data_as<const float>();
  uint16_t* dst = out.data_as<uint16_t>();
  for (int64_t i = 0; i < f.numel(); ++i) dst[i] = to == DType::BF16 ? f32_to_bf16(src[i]) : f32_to_f16(src[i]);
  return out;
}

void run_convert(const ConvertOptions& o) {
  const DType to = o.dtype == "bf16" ? DType::BF16 : o.dtype == "f16" ? DType::F16 : DType::F32;
  const io::TensorMap in = io::load_checkpoint(o.in);
  std::vector<std::pair<std::string, Tensor>> tensors;
  tensors.reserve(in.size());
  for (const auto& [name, t] : in.items()) tensors.emplace_back(name, convert_tensor(t, to));
  io::save_safetensors(o.out, tensors,
                       {{"format", "pt"}, {"converted_from", std::filesystem::path(o.in).filename().string()}});

  // Read it back: same names, shapes and dtypes, in the same order.
  const io::TensorMap back = io::load_safetensors(o.out);
  check(back.size() == tensors.size(), "convert: " + o.out + " holds " + std::to_string(back.size()) +
                                           " tensors after writing " + std::to_string(tensors.size()));
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto& [name, t] = tensors[i];
    const Tensor& b = back.at(name);
    check(b.shape() == t.shape() && b.dtype() == t.dtype(),
          "convert: tensor '" + name + "' reads back from " + o.out + " as " + dtype_name(b.dtype()) + " " +
              shape_str(b.shape()) + ", written as " + dtype_name(t.dtype()) + " " + shape_str(t.shape()));
  }
  std::printf("wrote %s: %zu tensors, floating point as %s, %s (from %s, %s)\n", o.out.c_str(), tensors.size(),
              o.dtype.c_str(), human_bytes(std::filesystem::file_size(o.out)).c_str(), o.in.c_str(),
              human_bytes(std::filesystem::file_size(o.in)).c_str());
}

}  // namespace

Command add_convert(CLI::App& parent) {
  auto o = std::make_shared<ConvertOptions>();
  CLI::App* app = parent.add_subcommand(
      "convert", "Rewrite a checkpoint (.pth or .safetensors) as safetensors, floating-point tensors in f32, bf16 "
                 "or f16; the output is read back and checked.");
  app->add_option("in", o->in, "input checkpoint (.pth or .safetensors)")->required()->check(CLI::ExistingFile);
  app->add_option("out", o->out, "output .safetensors file")->required();
  app->add_option("--dtype", o->dtype, "dtype of the floating-point tensors")
      ->check(CLI::IsMember({"f32", "bf16", "f16"}))
      ->capture_default_str();
  return {app, [o] { run_convert(*o); }};
}

}  // namespace segany::cli
