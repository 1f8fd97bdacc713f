// segany init: a checkpoint of random weights, for tests, benchmarks and trying the tools where
// the official weights cannot be downloaded. Its masks mean nothing, and it says so.
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "commands.h"
#include "io/checkpoint.h"
#include "model/config.h"
#include "model/random_init.h"
#include "model/sam.h"

namespace segany::cli {
namespace {

struct InitOptions {
  std::string arch, config, out;
  uint64_t seed = 0;
};

void run_init(const InitOptions& o) {
  const SamConfig cfg = o.config.empty() ? SamConfig::from_arch(o.arch) : SamConfig::from_json_file(o.config);
  const io::TensorMap weights = random_sam_weights(cfg, o.seed);
  io::save_safetensors(o.out, weights.items(),
                       {{"format", "pt"}, {"segany_random_init", "arch " + cfg.arch + ", seed " + std::to_string(o.seed)}});
  std::printf("wrote %s: %s with random weights (seed %llu), %s parameters, %s\n", o.out.c_str(), cfg.arch.c_str(),
              static_cast<unsigned long long>(o.seed), group_thousands(count_parameters(cfg, weights)).c_str(),
              human_bytes(std::filesystem::file_size(o.out)).c_str());
  std::fprintf(stderr, "%s\n", kRandomWeightsWarning);
}

}  // namespace

Command add_init(CLI::App& parent) {
  auto o = std::make_shared<InitOptions>();
  CLI::App* app = parent.add_subcommand(
      "init", "Write a SAM checkpoint of RANDOM weights (safetensors). Its masks are meaningless: it is for tests "
              "and benchmarks.");
  CLI::Option* arch = app->add_option("--arch", o->arch, "architecture")->check(CLI::IsMember({"vit_b", "vit_l", "vit_h"}));
  CLI::Option* config = app->add_option("--config", o->config, "config.json with the architecture, instead of --arch")
                            ->check(CLI::ExistingFile);
  arch->excludes(config);
  app->add_option("out", o->out, "output .safetensors file")->required();
  app->add_option("--seed", o->seed, "random seed; the same seed gives the same weights everywhere")
      ->capture_default_str();
  // Exactly one of --arch and --config.
  app->callback([arch, config] {
    if (arch->count() == 0 && config->count() == 0) throw CLI::RequiredError("--arch or --config");
  });
  return {app, [o] { run_init(*o); }};
}

}  // namespace segany::cli
