// SAM's prompt encoder: random-Fourier positional encoding of points and box corners plus learned
// label embeddings (sparse), and a small conv net over a low-res mask input or a learned
// "no mask" embedding (dense). Mirrors segment_anything/modeling/prompt_encoder.py.
#pragma once

#include <memory>
#include <vector>

#include "model/config.h"
#include "model/layers.h"

namespace segany {

// One prompt set in the model's input frame (the resized image, longest side img_size).
struct PromptSet {
  std::vector<float> points;  // [N, 2] x, y
  std::vector<int> labels;    // [N]: 1 foreground, 0 background
  bool has_box = false;
  float box[4] = {0, 0, 0, 0};  // x0, y0, x1, y1
  // Number of sparse tokens this set becomes (a padding point is added when there is no box).
  int sparse_tokens() const { return static_cast<int>(labels.size()) + (has_box ? 2 : (labels.empty() ? 0 : 1)); }
};

class PromptEncoder {
 public:
  PromptEncoder(const SamConfig& cfg, const io::TensorMap& w, Backend& be);

  // Positional encoding of every image-embedding cell: [1, grid*grid, C] on the device.
  const Tensor& image_pe() const { return image_pe_; }
  // The "no mask" dense embedding [C] on the device; added to every cell when no mask is given.
  const Tensor& no_mask_embed() const { return no_mask_embed_; }

  // A prompt set as embed_sparse reads it: coords [N, 2] and labels [N] for N = set.sparse_tokens()
  // (host memory; the points, the padding point or the box corners).
  static void pack(const PromptSet& set, float* coords, int32_t* labels);
  // Sparse embeddings: coords float32 [P, N, 2] and labels int32 [P, N] (device) -> [P, N, C].
  void embed_sparse(const Tensor& coords, const Tensor& labels, Tensor& out);

  // Dense embeddings of mask inputs [P, 4*grid, 4*grid] (device) -> [P, grid, grid, C] (device),
  // through the buffers p1, a, p2 and b of the shapes mask_buffer_shape(P, 0..3) gives.
  Shape mask_buffer_shape(int64_t P, int i) const;
  void embed_masks(const Tensor& masks, Tensor& p1, Tensor& a, Tensor& p2, Tensor& b, Tensor& dense);

 private:
  // Random-Fourier features of a point in [0, 1]^2: [sin(2 pi (2p - 1) G), cos(...)].
  void encode(float x, float y, float* out) const;

  int dim_, grid_, img_size_, mask_chans_;
  Tensor gaussian_;         // host [2, C/2]
  Tensor gaussian_device_;  // the same on the device
  Tensor label_table_;      // [5, C] on the device: not_a_point, point_embeddings 0..3
  Tensor image_pe_, no_mask_embed_;
  Backend& be_;
  std::unique_ptr<LinearWeights> mask_conv0_, mask_conv3_, mask_conv6_;
  Norm mask_norm1_, mask_norm4_;
};

}  // namespace segany
