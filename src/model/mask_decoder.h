// SAM's mask decoder: a two-way transformer between prompt tokens and image cells, transposed-conv
// upscaling, one hypernetwork MLP per mask token, and the IoU head. Mirrors
// segment_anything/modeling/{mask_decoder,transformer}.py.
#pragma once

#include <memory>
#include <vector>

#include "model/config.h"
#include "model/layers.h"

namespace segany {

// q/k/v/out projections around Backend::attention, with the internal dim downsampled.
class Attention {
 public:
  Attention(Backend& be, const io::TensorMap& w, const std::string& name, int heads);
  // out = out_proj(attention(q_proj(q), k_proj(k), v_proj(v))) (+ residual, which may be out).
  void forward(Backend& be, const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out,
               const Tensor* residual = nullptr) const;

 private:
  int heads_;
  std::unique_ptr<LinearWeights> q_proj_, k_proj_, v_proj_, out_proj_;
};

class TwoWayTransformer {
 public:
  TwoWayTransformer(const MaskDecoderConfig& cfg, const io::TensorMap& w, Backend& be);
  // queries [P, Tt, C] (in: the prompt tokens, out: the updated tokens); keys [Pk, HW, C] with
  // Pk 1 (one image embedding shared by every prompt) or P; key_pe [1, HW, C]. Returns keys [P, HW, C].
  Tensor forward(Backend& be, Tensor& queries, const Tensor& keys, const Tensor& key_pe) const;

 private:
  struct Layer {
    std::unique_ptr<Attention> self_attn, cross_token_to_image, cross_image_to_token;
    std::unique_ptr<LinearWeights> mlp_lin1, mlp_lin2;
    Norm norm1, norm2, norm3, norm4;
  };
  std::vector<Layer> layers_;
  std::unique_ptr<Attention> final_attn_;
  Norm norm_final_;
};

class MaskDecoder {
 public:
  MaskDecoder(const SamConfig& cfg, const io::TensorMap& w, Backend& be);

  struct Output {
    Tensor low_res_logits;  // [P, num_mask_tokens, 4*grid, 4*grid] on the device, every mask token
    Tensor iou;             // [P, 1, num_mask_tokens] on the device
  };
  // image_embedding [1, grid*grid, C]; image_pe [1, grid*grid, C]; sparse [P, Ns, C] (device);
  // dense [P, grid, grid, C] from mask inputs, or the no-mask embedding [C] added to every cell.
  Output forward(const Tensor& image_embedding, const Tensor& image_pe, const Tensor& sparse, const Tensor& dense);

  int num_mask_tokens() const { return num_mask_tokens_; }

 private:
  const SamConfig cfg_;
  Backend& be_;
  int num_mask_tokens_;
  Tensor output_tokens_;  // [1 + num_mask_tokens, C] host: the IoU token, then the mask tokens
  TwoWayTransformer transformer_;
  std::unique_ptr<LinearWeights> upscale1_, upscale2_;
  Norm upscale_norm_;
  std::vector<Mlp> hypernetworks_;
  Mlp iou_head_;
};

}  // namespace segany
