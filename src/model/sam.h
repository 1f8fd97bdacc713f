// The whole SAM model on one backend: configuration, the three parts, and loading.
#pragma once

#include <memory>
#include <string>

#include "model/image_encoder.h"
#include "model/mask_decoder.h"
#include "model/prompt_encoder.h"

namespace segany {

class Sam {
 public:
  // Prepares every weight on `be`; `weights` may be dropped afterwards.
  Sam(const SamConfig& cfg, const io::TensorMap& weights, Backend& be);

  // Loads a .pth or .safetensors checkpoint; the architecture comes from `config_path` when given
  // (config.json format), else it is inferred from the tensor shapes.
  static std::unique_ptr<Sam> load(const std::string& checkpoint, const std::string& config_path, Backend& be);

  const SamConfig& config() const { return cfg_; }
  int64_t parameter_count() const { return parameter_count_; }
  Backend& backend() { return be_; }
  ImageEncoder& image_encoder() { return image_encoder_; }
  PromptEncoder& prompt_encoder() { return prompt_encoder_; }
  MaskDecoder& mask_decoder() { return mask_decoder_; }

 private:
  SamConfig cfg_;
  Backend& be_;
  int64_t parameter_count_ = 0;
  ImageEncoder image_encoder_;
  PromptEncoder prompt_encoder_;
  MaskDecoder mask_decoder_;
};

// The random Fourier matrix of the prompt encoder: in the checkpoint, but a buffer, not a
// parameter, of the original model.
inline constexpr const char* kPositionalEncodingBuffer = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix";

// Counts the model's parameters as the original's model.parameters() does (its buffers and
// anything else in the checkpoint excluded): 93,735,472 for vit_b.
int64_t count_parameters(const SamConfig& cfg, const io::TensorMap& weights);

}  // namespace segany
