// segany info: what a checkpoint holds, read from its tensor shapes without building the model
// (the file is mapped, not read), so it answers in a moment even for vit_h.
#include <filesystem>
#include <iostream>
#include <map>
#include <memory>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "io/checkpoint.h"
#include "model/config.h"
#include "model/sam.h"

namespace segany::cli {
namespace {

struct InfoOptions {
  std::string checkpoint, config;
  bool json = false;
};

void run_info(const InfoOptions& o) {
  const io::TensorMap weights = io::load_checkpoint(o.checkpoint);
  const SamConfig cfg = o.config.empty() ? SamConfig::infer(weights) : SamConfig::from_json_file(o.config);
  cfg.validate(weights);
  const int64_t params = count_parameters(cfg, weights);
  std::map<std::string, int> dtypes;  // name -> number of tensors
  for (const auto& [name, t] : weights.items()) ++dtypes[dtype_name(t.dtype())];
  const uint64_t file_size = std::filesystem::file_size(o.checkpoint);

  if (o.json) {
    nlohmann::ordered_json j;
    j["checkpoint"] = o.checkpoint;
    j["arch"] = cfg.arch;
    j["parameters"] = params;
    j["tensors"] = weights.size();
    j["dtypes"] = dtypes;
    j["file_size"] = file_size;
    j["architecture"] = cfg.describe();
    std::cout << j.dump() << "\n";
    return;
  }
  std::string dtype_list;
  for (const auto& [name, n] : dtypes) dtype_list += (dtype_list.empty() ? "" : ", ") + name + " (" + std::to_string(n) + ")";
  std::cout << "checkpoint:   " << o.checkpoint << " (" << human_bytes(file_size) << ")\n"
            << "arch:         " << cfg.arch << "\n"
            << "parameters:   " << group_thousands(params) << "\n"
            << "tensors:      " << weights.size() << "\n"
            << "dtypes:       " << dtype_list << "\n"
            << "architecture: " << cfg.describe() << "\n";
}

}  // namespace

Command add_info(CLI::App& parent) {
  auto o = std::make_shared<InfoOptions>();
  CLI::App* app = parent.add_subcommand(
      "info", "Architecture, parameter count, tensors and dtypes of a checkpoint, without building the model.");
  app->add_option("checkpoint", o->checkpoint, "SAM checkpoint: .pth or .safetensors")
      ->required()
      ->check(CLI::ExistingFile);
  app->add_option("--config", o->config, "config.json with the architecture (else it is inferred from the shapes)")
      ->check(CLI::ExistingFile);
  app->add_flag("--json", o->json, "print one JSON object instead of text");
  return {app, [o] { run_info(*o); }};
}

}  // namespace segany::cli
