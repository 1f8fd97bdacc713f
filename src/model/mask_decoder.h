// SAM's mask decoder: a two-way transformer between prompt tokens and image cells, transposed-conv
// upscaling, one hypernetwork MLP per mask token, and the IoU head. Mirrors
// segment_anything/modeling/{mask_decoder,transformer}.py.
//
// The decoder runs on a Batch: every buffer of one decoding shape (P prompt sets of Ns sparse
// tokens, with or without mask inputs), made once and kept, so that forward() only enqueues work
// and the whole pass, prompt encoding included, is one backend graph per shape.
#pragma once

#include <map>
#include <memory>
#include <tuple>
#include <vector>

#include "model/config.h"
#include "model/layers.h"
#include "model/prompt_encoder.h"

namespace segany {

// q/k/v/out projections around Backend::attention, with the internal dim downsampled.
class Attention {
 public:
  Attention(Backend& be, const io::TensorMap& w, const std::string& name, int heads);
  // Buffers for the projections: each at least as large as the largest q, k, v or output.
  struct Scratch {
    Tensor q, k, v, o;
  };
  // out = out_proj(attention(q_proj(q), k_proj(k), v_proj(v))) (+ residual, which may be out).
  void forward(Backend& be, const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out, Scratch& s,
               const Tensor* residual = nullptr) const;
  int64_t internal_dim() const { return q_proj_->out_features; }

 private:
  int heads_;
  std::unique_ptr<LinearWeights> q_proj_, k_proj_, v_proj_, out_proj_;
};

class TwoWayTransformer {
 public:
  TwoWayTransformer(const MaskDecoderConfig& cfg, const io::TensorMap& w, Backend& be);

  // Every activation of one pass over P prompts of Tt tokens against HW image cells.
  struct Buffers {
    Tensor qpe, q, attn, hidden;  // token-sized [P, Tt, *]
    Tensor k;                     // [P, HW, C]: keys + positional encoding
    Tensor image_attn;            // [P, HW, C]
    Tensor keys;                  // [P, HW, C]: the output
    Attention::Scratch scratch;  // four parts of one buffer
  };
  Buffers buffers(Backend& be, int64_t P, int64_t Tt, int64_t HW) const;

  // queries [P, Tt, C] (in: the prompt tokens, out: the updated tokens); src [Pk, HW, C] with Pk 1
  // (one image embedding shared by every prompt) or P; key_pe [1, HW, C]. Leaves the updated
  // image cells in b.keys [P, HW, C].
  void forward(Backend& be, Tensor& queries, const Tensor& src, const Tensor& key_pe, Buffers& b) const;

 private:
  struct Layer {
    std::unique_ptr<Attention> self_attn, cross_token_to_image, cross_image_to_token;
    std::unique_ptr<LinearWeights> mlp_lin1, mlp_lin2;
    Norm norm1, norm2, norm3, norm4;
  };
  std::vector<Layer> layers_;
  std::unique_ptr<Attention> final_attn_;
  Norm norm_final_;
  int64_t dim_ = 0, mlp_dim_ = 0, cross_dim_ = 0;
};

class MaskDecoder {
 public:
  MaskDecoder(const SamConfig& cfg, const io::TensorMap& w, Backend& be, PromptEncoder& prompts);

  struct Batch {
    int64_t P = 0, Ns = 0;
    bool mask_inputs = false, own_images = false;
    // Inputs, written by the caller before forward() (Backend::upload_async, copy_tokens):
    Tensor embedding;  // [1 or P, grid*grid, C]: the image embedding, or each prompt's own
    Tensor coords;     // float32 [P, Ns, 2]: points and box corners in the model's input frame
    Tensor labels;     // int32 [P, Ns]: as Backend::embed_points reads them
    Tensor masks;      // float32 [P, 4*grid, 4*grid]: the mask inputs (mask_inputs only)
    // Outputs, valid until the next forward() on this batch:
    Tensor low_res;  // float32 [P, num_mask_tokens, 4*grid, 4*grid]: every mask token's logits
    Tensor iou;      // float32 [P, num_mask_tokens]

    // Everything in between.
    Tensor sparse, tokens, src, dense, dense_a, dense_p1, dense_p2, dense_b;
    TwoWayTransformer::Buffers t;
    Tensor u1, u2, mask_tokens, hyper_in, one, one_out, iou_token, mlp_scratch;
  };
  // The buffers of a shape, made on first use and kept. own_images: each prompt has an image
  // embedding of its own (prompts of different images decoded together), else one is shared.
  Batch& batch(int64_t P, int64_t Ns, bool mask_inputs, bool own_images = false);
  // Enqueues the prompt encoder and the decoder on b's inputs (one backend graph per shape).
  void forward(Batch& b);

  int num_mask_tokens() const { return num_mask_tokens_; }

 private:
  void run(Batch& b);

  const SamConfig cfg_;
  Backend& be_;
  PromptEncoder& prompts_;
  int num_mask_tokens_;
  Tensor output_tokens_;  // [1, 1 + num_mask_tokens, C] on the device: the IoU token, then the mask tokens
  TwoWayTransformer transformer_;
  std::unique_ptr<LinearWeights> upscale1_, upscale2_;
  Norm upscale_norm_;
  std::vector<Mlp> hypernetworks_;
  Mlp iou_head_;
  std::map<std::tuple<int64_t, int64_t, bool, bool>, Batch> batches_;
};

}  // namespace segany
