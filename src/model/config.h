// SamConfig: the architecture of a SAM model. Inferred from a checkpoint's tensor shapes for the
// official vit_b/l/h models, or read from a config.json (format of the golden models').
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "io/tensor_map.h"

namespace segany {

struct ImageEncoderConfig {
  int embed_dim = 768;
  int depth = 12;
  int num_heads = 12;
  std::vector<int> global_attn_indexes{2, 5, 8, 11};
  int window_size = 14;
  int patch_size = 16;
  int img_size = 1024;
  int mlp_ratio = 4;
  int out_chans = 256;
  int head_dim() const { return embed_dim / num_heads; }
  int grid() const { return img_size / patch_size; }  // 64
  bool is_global(int block) const;
};

struct PromptEncoderConfig {
  int embed_dim = 256;
  int mask_in_chans = 16;
};

struct MaskDecoderConfig {
  int transformer_dim = 256;
  int depth = 2;
  int mlp_dim = 2048;
  int num_heads = 8;
  int num_multimask_outputs = 3;
  int iou_head_depth = 3;
  int iou_head_hidden_dim = 256;
  int attention_downsample_rate = 2;  // cross-attention internal dim = transformer_dim / 2
};

struct SamConfig {
  std::string arch = "vit_b";  // vit_b, vit_l, vit_h, or "custom"
  ImageEncoderConfig image_encoder;
  PromptEncoderConfig prompt_encoder;
  MaskDecoderConfig mask_decoder;

  static SamConfig vit_b();
  static SamConfig vit_l();
  static SamConfig vit_h();
  static SamConfig from_arch(const std::string& arch);  // throws on an unknown name
  // Reads the golden models' config.json format. Throws with the file and key on error.
  static SamConfig from_json_file(const std::string& path);
  // Infers the architecture from tensor shapes; throws naming the tensor that does not fit.
  static SamConfig infer(const io::TensorMap& weights);

  // Every parameter the model has, with its checkpoint name and shape, in checkpoint order.
  std::vector<std::pair<std::string, Shape>> parameter_shapes() const;
  // Throws naming the first missing tensor or wrong shape.
  void validate(const io::TensorMap& weights) const;
  std::string describe() const;  // one human-readable paragraph
};

}  // namespace segany
