#include "model/image_encoder.h"

#include <algorithm>
#include <cmath>

namespace segany {

Tensor resize_rel_pos(const Tensor& table, int64_t size) {
  Tensor t = table.to_f32();
  const int64_t L = t.dim(0), D = t.dim(1);
  if (L == size) return t;
  // F.interpolate(mode="linear", align_corners=False) along the length.
  Tensor out = Tensor::empty({size, D});
  const float scale = static_cast<float>(L) / static_cast<float>(size);
  for (int64_t i = 0; i < size; ++i) {
    float src = std::max(0.0f, scale * (i + 0.5f) - 0.5f);
    int64_t i0 = std::min<int64_t>(static_cast<int64_t>(src), L - 1);
    int64_t i1 = std::min<int64_t>(i0 + 1, L - 1);
    float l1 = src - i0, l0 = 1.0f - l1;
    for (int64_t d = 0; d < D; ++d)
      out.data_as<float>()[i * D + d] = l0 * t.data_as<const float>()[i0 * D + d] + l1 * t.data_as<const float>()[i1 * D + d];
  }
  return out;
}

ImageEncoder::ImageEncoder(const ImageEncoderConfig& cfg, const io::TensorMap& w, Backend& be) : cfg_(cfg), be_(be) {
  const std::string p = "image_encoder.";
  patch_embed_ = be.prepare_linear(p + "patch_embed.proj", conv_weight_as_linear(w.at(p + "patch_embed.proj.weight")),
                                   &w.at(p + "patch_embed.proj.bias"));
  pos_embed_ = be.upload(w.at(p + "pos_embed"));
  for (int i = 0; i < cfg.depth; ++i) {
    const std::string b = p + "blocks." + std::to_string(i) + ".";
    Block blk;
    blk.global = cfg.is_global(i);
    const int64_t size = blk.global ? cfg.grid() : cfg.window_size;
    blk.norm1 = Norm::load(be, w, b + "norm1", 1e-6f);
    blk.norm2 = Norm::load(be, w, b + "norm2", 1e-6f);
    blk.qkv = load_linear(be, w, b + "attn.qkv");
    blk.proj = load_linear(be, w, b + "attn.proj");
    blk.lin1 = load_linear(be, w, b + "mlp.lin1");
    blk.lin2 = load_linear(be, w, b + "mlp.lin2");
    blk.rel_pos_h = be.upload(resize_rel_pos(w.at(b + "attn.rel_pos_h"), 2 * size - 1));
    blk.rel_pos_w = be.upload(resize_rel_pos(w.at(b + "attn.rel_pos_w"), 2 * size - 1));
    blocks_.push_back(std::move(blk));
  }
  neck_conv1_ = be.prepare_linear(p + "neck.0", conv_weight_as_linear(w.at(p + "neck.0.weight")), nullptr);
  neck_norm1_ = Norm::load(be, w, p + "neck.1", 1e-6f);
  neck_conv3_ = be.prepare_linear(p + "neck.2", conv_weight_as_linear(w.at(p + "neck.2.weight")), nullptr);
  neck_norm3_ = Norm::load(be, w, p + "neck.3", 1e-6f);
}

ImageEncoder::Workspace& ImageEncoder::workspace(int64_t B) {
  auto it = workspaces_.find(B);
  if (it != workspaces_.end()) return it->second;
  const int64_t G = cfg_.grid(), C = cfg_.embed_dim, P = cfg_.patch_size, O = cfg_.out_chans;
  const int64_t nw = (G + cfg_.window_size - 1) / cfg_.window_size;
  const int64_t tokens = B * G * G;
  const int64_t window_tokens = B * nw * nw * cfg_.window_size * cfg_.window_size;  // padded grid
  const int64_t rows = std::max(tokens, window_tokens);
  // Buffers whose lifetimes do not overlap share memory: the input lives in the qkv buffer (read
  // once, before the first block), the patches and the neck's im2col in the MLP's hidden buffer,
  // a windowed block's projection in the normalised-input buffer.
  // The residual stream and the output embedding stay in float32 whatever the backend computes
  // in: every block adds into the stream, and rounding it to bf16 after each of 2 x depth adds
  // is the largest error a bf16 encoder would otherwise make.
  Workspace ws;
  ws.x = be_.alloc({B, G, G, C}, DType::F32);
  ws.xn = be_.alloc({rows, C});
  const int64_t input_numel = B * cfg_.img_size * cfg_.img_size * 3;
  ws.qkv = be_.alloc({std::max(rows * 3 * C, input_numel), 1});
  ws.attn = be_.alloc({rows, C});
  ws.hidden = be_.alloc({std::max({tokens * C * cfg_.mlp_ratio, B * G * G * 9 * O, B * G * G * P * P * 3}), 1});
  ws.neck_a = be_.alloc({B, G, G, O});
  ws.out = be_.alloc({B, G, G, O}, DType::F32);
  ws.input = ws.qkv.view_prefix({B, cfg_.img_size, cfg_.img_size, 3});
  ws.patches = ws.hidden.view_prefix({B, G, G, P * P * 3});
  ws.proj = ws.xn.view_prefix({rows, C});
  ws.neck_cols = ws.hidden.view_prefix({B, G, G, 9 * O});
  ws.qkv = ws.qkv.view_prefix({rows, 3 * C});
  ws.hidden = ws.hidden.view_prefix({tokens, C * cfg_.mlp_ratio});
  return workspaces_.emplace(B, std::move(ws)).first->second;
}

const Tensor& ImageEncoder::forward(int64_t B) {
  check(B > 0, "image encoder: batch must be positive");
  Workspace& ws = workspace(B);
  be_.run_graph("image_encoder/batch=" + std::to_string(B), [&] { run(ws, B); });
  return ws.out;
}

void ImageEncoder::run(Workspace& ws, int64_t B) {
  const int64_t G = cfg_.grid(), C = cfg_.embed_dim;
  const int win = cfg_.window_size;
  const int64_t nw = (G + win - 1) / win;
  const int64_t wrows = B * nw * nw * win * win, grows = B * G * G;
  // [B, windows, win*win, C] views of the shared buffers for windowed blocks, [B, G*G, C] for global ones.
  Tensor xn_w = ws.xn.slice0(0, wrows), qkv_w = ws.qkv.slice0(0, wrows), attn_w = ws.attn.slice0(0, wrows);
  Tensor proj_w = ws.proj.slice0(0, wrows);
  Tensor xn_g = ws.xn.slice0(0, grows), qkv_g = ws.qkv.slice0(0, grows), attn_g = ws.attn.slice0(0, grows);

  // Patch embedding: a stride-16 16x16 convolution is space-to-depth + linear.
  be_.patchify(ws.input, cfg_.patch_size, ws.patches);
  be_.linear(ws.patches, *patch_embed_, ws.x);
  be_.add(ws.x, pos_embed_, ws.x);

  for (const Block& blk : blocks_) {
    if (blk.global) {
      blk.norm1(be_, ws.x, xn_g);
      be_.linear(xn_g, *blk.qkv, qkv_g);
      be_.attention_relpos(qkv_g, blk.rel_pos_h, blk.rel_pos_w, cfg_.num_heads, G, G, attn_g);
      be_.linear(attn_g, *blk.proj, ws.x, Activation::None, &ws.x);
    } else {
      // [B, 64, 64, C] -> [B*25, 196, C] (the grid zero-padded to 70x70)
      be_.layer_norm_window_partition(ws.x, blk.norm1.gamma, blk.norm1.beta, blk.norm1.eps, win, xn_w);
      be_.linear(xn_w, *blk.qkv, qkv_w);
      be_.attention_relpos(qkv_w, blk.rel_pos_h, blk.rel_pos_w, cfg_.num_heads, win, win, attn_w);
      be_.linear(attn_w, *blk.proj, proj_w);
      be_.window_unpartition_add(proj_w, win, ws.x);
    }
    blk.norm2(be_, ws.x, xn_g);
    be_.linear(xn_g, *blk.lin1, ws.hidden, Activation::GELU);
    be_.linear(ws.hidden, *blk.lin2, ws.x, Activation::None, &ws.x);
  }

  // Neck: 1x1 conv, LayerNorm2d, 3x3 conv (padding 1), LayerNorm2d; channels-last throughout.
  // The stream is first copied into the activation dtype, which is what linear layers read.
  Tensor x_act = ws.xn.view_prefix({B, G * G, C});
  be_.copy_tokens(ws.x.view({B, G * G, C}), 0, x_act, 0, static_cast<int>(G * G));
  be_.linear(x_act, *neck_conv1_, ws.neck_a);
  neck_norm1_(be_, ws.neck_a, ws.neck_a);
  be_.im2col3x3(ws.neck_a, ws.neck_cols);
  be_.linear(ws.neck_cols, *neck_conv3_, ws.out);
  neck_norm3_(be_, ws.out, ws.out);
}

}  // namespace segany
