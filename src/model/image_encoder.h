// SAM's image encoder: a ViT with windowed and global attention (decomposed relative position
// bias) followed by a convolutional neck. Mirrors segment_anything/modeling/image_encoder.py.
#pragma once

#include <map>
#include <memory>
#include <vector>

#include "model/config.h"
#include "model/layers.h"

namespace segany {

class ImageEncoder {
 public:
  ImageEncoder(const ImageEncoderConfig& cfg, const io::TensorMap& w, Backend& be);

  // The input buffer for a batch of B images: [B, img, img, 3] normalised and padded, channels-last,
  // on the backend's device. Fill it, then call forward(B).
  Tensor& input(int64_t batch) { return workspace(batch).input; }
  // -> image embeddings [B, grid, grid, out_chans] (channels-last), valid until the next call
  // with the same batch size. The whole pass is one backend graph per batch size.
  const Tensor& forward(int64_t batch);

  const ImageEncoderConfig& config() const { return cfg_; }

 private:
  struct Block {
    bool global = false;
    Norm norm1, norm2;
    std::unique_ptr<LinearWeights> qkv, proj, lin1, lin2;
    Tensor rel_pos_h, rel_pos_w;  // [2*size-1, head_dim]
    Tensor pad_qkv;               // windowed: q, k, v of the window padding (the qkv bias) [3*C]
  };
  // Every activation of one forward pass, allocated once per batch size and reused by each block.
  struct Workspace {
    Tensor input, patches, x, xn, qkv, attn, hidden, neck_a, neck_cols, out;
  };
  Workspace& workspace(int64_t batch);
  void run(Workspace& ws, int64_t batch);

  ImageEncoderConfig cfg_;
  Backend& be_;
  std::unique_ptr<LinearWeights> patch_embed_;
  Tensor pos_embed_;  // [1, grid, grid, C]
  std::vector<Block> blocks_;
  std::unique_ptr<LinearWeights> neck_conv1_, neck_conv3_;
  Norm neck_norm1_, neck_norm3_;
  std::map<int64_t, Workspace> workspaces_;
};

// Resizes a relative position table [L, D] to [size, D] by linear interpolation, as the original's
// get_rel_pos does when a checkpoint's table does not match the attention grid.
Tensor resize_rel_pos(const Tensor& table, int64_t size);

}  // namespace segany
