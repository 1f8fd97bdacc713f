// safetensors: an 8-byte little-endian header length N, N bytes of JSON
// {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}},
// then the data, offsets relative to its start. Read in place from an mmap; written whole to a
// temporary file that is renamed over the target.
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <nlohmann/json.hpp>
#include <set>

#include "io/checkpoint.h"
#include "io/mmap_file.h"

namespace segany::io {

namespace {

using Json = nlohmann::ordered_json;  // ordered: tensors come back in the file's order

// Far above any real header (vit_h: ~60 KB) and small enough to parse without worry.
constexpr uint64_t kMaxHeader = 100u << 20;

// The data section starts at a multiple of this, so that every dtype can be viewed in place when
// tensor offsets are aligned too.
constexpr uint64_t kDataAlign = 8;

}  // namespace

TensorMap load_safetensors(const std::string& path) {
  const std::string source = "safetensors " + path;
  std::shared_ptr<const MmapFile> file = MmapFile::open(path);
  const uint64_t size = file->size();
  if (size < 8)
    throw Error(source + ": " + std::to_string(size) + " bytes, too short for a header; the file is truncated");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = n << 8 | file->data()[i];
  if (n > kMaxHeader || n > size - 8)
    throw Error(source + ": the header claims " + std::to_string(n) + " bytes but the file has " +
                std::to_string(size) + (n > kMaxHeader ? " (and the limit is 100 MB)" : "") +
                "; the file is truncated or not safetensors");

  const char* text = reinterpret_cast<const char*>(file->data() + 8);
  Json header = Json::parse(text, text + n, nullptr, /*allow_exceptions=*/false);
  if (header.is_discarded() || !header.is_object())
    throw Error(source + ": the header is not a JSON object; the file is damaged or not safetensors");

  const uint8_t* data = file->data() + 8 + n;
  const uint64_t data_size = size - 8 - n;
  TensorMap out;
  out.source = path;
  for (const auto& item : header.items()) {
    const std::string& name = item.key();
    const Json& info = item.value();
    if (name == "__metadata__") continue;  // free-form strings; nothing here needs them
    auto bad = [&](const std::string& what) {
      return Error(source + ": tensor '" + name + "': " + what);
    };
    if (!info.is_object()) throw bad("header entry is not an object");
    const Json& jd = info.contains("dtype") ? info["dtype"] : Json();
    const Json& js = info.contains("shape") ? info["shape"] : Json();
    const Json& jo = info.contains("data_offsets") ? info["data_offsets"] : Json();
    if (!jd.is_string()) throw bad("no \"dtype\" string");
    if (!js.is_array()) throw bad("no \"shape\" array");
    if (!jo.is_array() || jo.size() != 2 || !jo[0].is_number_unsigned() || !jo[1].is_number_unsigned())
      throw bad("\"data_offsets\" is not [begin, end]");

    DType dtype;
    try {
      dtype = dtype_from_name(jd.get<std::string>());
    } catch (const Error&) {
      throw bad("unknown dtype '" + jd.get<std::string>() + "'");
    }
    Shape shape;
    for (const Json& d : js) {
      if (!d.is_number_unsigned() || d.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX))
        throw bad("shape " + js.dump() + " has a dimension that is not a non-negative integer");
      shape.push_back(d.get<int64_t>());
    }
    const uint64_t begin = jo[0].get<uint64_t>(), end = jo[1].get<uint64_t>();
    if (begin > end || end > data_size)
      throw bad("data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) + "] lie outside the " +
                std::to_string(data_size) + " bytes of data; the file is truncated or damaged");
    uint64_t need = dtype_size(dtype);
    for (int64_t d : shape)
      if (__builtin_mul_overflow(need, static_cast<uint64_t>(d), &need))
        throw bad("shape " + shape_str(shape) + " overflows");
    if (end - begin != need)
      throw bad("data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) + "] hold " +
                std::to_string(end - begin) + " bytes, but " + dtype_name(dtype) + " " + shape_str(shape) +
                " needs " + std::to_string(need));

    const uint8_t* p = data + begin;
    if (reinterpret_cast<uintptr_t>(p) % dtype_size(dtype) == 0) {
      out.insert(name, Tensor::wrap(const_cast<uint8_t*>(p), std::move(shape), dtype, file));
    } else {  // misaligned (a writer that packs mixed dtypes tightly): copy, never a misaligned view
      Tensor copy = Tensor::empty(std::move(shape), dtype);
      if (need) std::memcpy(copy.data(), p, need);
      out.insert(name, std::move(copy));
    }
  }
  return out;
}

void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  Json header = Json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::set<std::string> seen;
  uint64_t offset = 0;
  for (const auto& entry : tensors) {
    const std::string& name = entry.first;
    const Tensor& t = entry.second;
    auto bad = [&](const std::string& what) { return Error("saving " + path + ": tensor '" + name + "' " + what); };
    if (name == "__metadata__") throw bad("has a reserved name");
    if (!seen.insert(name).second) throw bad("appears twice");
    if (!t.defined()) throw bad("is undefined");
    if (t.device() != Device::CPU) throw bad("is on the GPU; copy it to the host first");
    header[name] = {{"dtype", dtype_name(t.dtype())}, {"shape", t.shape()}, {"data_offsets", {offset, offset + t.nbytes()}}};
    offset += t.nbytes();
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const nlohmann::json::exception& e) {  // e.g. a name that is not valid UTF-8
    throw Error("saving " + path + ": cannot write the header: " + e.what());
  }
  // Spaces after the JSON are allowed by the format and put the data on an aligned offset.
  text.append((kDataAlign - (8 + text.size()) % kDataAlign) % kDataAlign, ' ');

  // Written beside the target and renamed over it: a crash or a full disk leaves the old file.
  const std::string tmp = path + ".tmp";
  auto sys_fail = [&](const std::string& what, const std::string& file) {
    const std::string reason = std::strerror(errno);
    std::remove(tmp.c_str());
    return Error("saving " + path + ": cannot " + what + " " + file + ": " + reason);
  };
  {
    std::unique_ptr<std::FILE, int (*)(std::FILE*)> f(std::fopen(tmp.c_str(), "wb"), &std::fclose);
    if (!f) throw sys_fail("create", tmp);
    auto write = [&](const void* p, size_t n) {
      if (n && std::fwrite(p, 1, n, f.get()) != n) throw sys_fail("write", tmp);
    };
    uint8_t len[8];
    for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(static_cast<uint64_t>(text.size()) >> (8 * i));
    write(len, 8);
    write(text.data(), text.size());
    for (const auto& entry : tensors) write(entry.second.data(), entry.second.nbytes());
    // fclose flushes; its failure (e.g. ENOSPC on the last buffer) is a failed write too.
    if (std::fclose(f.release()) != 0) throw sys_fail("write", tmp);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) throw sys_fail("rename " + tmp + " to", path);
}

}  // namespace segany::io
