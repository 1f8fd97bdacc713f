#include "model/sam.h"

#include "io/checkpoint.h"

namespace segany {

int64_t count_parameters(const SamConfig& cfg, const io::TensorMap& weights) {
  int64_t n = 0;
  for (const auto& [name, shape] : cfg.parameter_shapes())
    if (name != kPositionalEncodingBuffer) n += weights.at(name).numel();
  return n;
}

namespace {
const SamConfig& validated(const SamConfig& cfg, const io::TensorMap& w) {
  cfg.validate(w);
  return cfg;
}
}  // namespace

Sam::Sam(const SamConfig& cfg, const io::TensorMap& w, Backend& be)
    : cfg_(validated(cfg, w)),
      be_(be),
      parameter_count_(count_parameters(cfg, w)),
      image_encoder_(cfg.image_encoder, w, be),
      prompt_encoder_(cfg, w, be),
      mask_decoder_(cfg, w, be, prompt_encoder_) {}

std::unique_ptr<Sam> Sam::load(const std::string& checkpoint, const std::string& config_path, Backend& be) {
  io::TensorMap w = io::load_checkpoint(checkpoint);
  SamConfig cfg = config_path.empty() ? SamConfig::infer(w) : SamConfig::from_json_file(config_path);
  return std::make_unique<Sam>(cfg, w, be);
}

}  // namespace segany
