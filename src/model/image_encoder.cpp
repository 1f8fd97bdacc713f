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
    if (!blk.global) {
      // SAM pads the normalised input with zeros, so a padding token's q, k, v are the qkv bias.
      const Tensor bias = w.at(b + "attn.qkv.bias").to_f32();
      blk.pad_qkv = be.alloc({bias.numel()});
      be.copy_from_host(bias, blk.pad_qkv);
    }
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
  const int64_t tokens = B * G * G;
  // Buffers whose lifetimes do not overlap share memory: the input lives in the qkv buffer (read
  // once, before the first block), the patches and the neck's im2col in the MLP's hidden buffer.
  // The residual stream in the backend's residual_dtype() (float32 but for low-precision
  // encoders), the output embedding in float32.
  Workspace ws;
  ws.x = be_.alloc({B, G, G, C}, be_.residual_dtype());
  ws.xn = be_.alloc({tokens, C});
  const int64_t input_numel = B * cfg_.img_size * cfg_.img_size * 3;
  ws.qkv = be_.alloc({std::max(tokens * 3 * C, input_numel), 1});
  ws.attn = be_.alloc({B, G, G, C});
  ws.hidden = be_.alloc({std::max({tokens * C * cfg_.mlp_ratio, B * G * G * 9 * O, B * G * G * P * P * 3}), 1});
  ws.neck_a = be_.alloc({B, G, G, O});
  ws.out = be_.alloc({B, G, G, O}, DType::F32);
  ws.input = ws.qkv.view_prefix({B, cfg_.img_size, cfg_.img_size, 3});
  ws.patches = ws.hidden.view_prefix({B, G, G, P * P * 3});
  ws.neck_cols = ws.hidden.view_prefix({B, G, G, 9 * O});
  ws.qkv = ws.qkv.view_prefix({B, G, G, 3 * C});
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
  const int64_t G = cfg_.grid();
  const int win = cfg_.window_size;

  // Patch embedding: a stride-16 16x16 convolution is space-to-depth + linear.
  be_.patchify(ws.input, cfg_.patch_size, ws.patches);
  be_.linear(ws.patches, *patch_embed_, ws.x);
  be_.add(ws.x, pos_embed_, ws.x);

  // Every block works on the [B, 64, 64, C] grid; windowed attention reads its windows from the
  // grid (padding tokens from pad_qkv) and writes back to it, so the padding costs no GEMM work.
  for (const Block& blk : blocks_) {
    blk.norm1.then(be_, ws.x, ws.xn, *blk.qkv, ws.qkv);
    if (blk.global)
      be_.attention_relpos(ws.qkv, blk.rel_pos_h, blk.rel_pos_w, cfg_.num_heads, G, G, ws.attn);
    else
      be_.window_attention_relpos(ws.qkv, blk.pad_qkv, blk.rel_pos_h, blk.rel_pos_w, cfg_.num_heads, win, ws.attn);
    be_.linear(ws.attn, *blk.proj, ws.x, Activation::None, &ws.x);
    blk.norm2.then(be_, ws.x, ws.xn, *blk.lin1, ws.hidden, Activation::GELU);
    be_.linear(ws.hidden, *blk.lin2, ws.x, Activation::None, &ws.x);
  }

  // Neck: 1x1 conv, LayerNorm2d, 3x3 conv (padding 1), LayerNorm2d; channels-last throughout.
  // The stream is first copied into the activation dtype, which is what linear layers read.
  const int64_t C = cfg_.embed_dim;
  Tensor x_act = ws.xn.view_prefix({B, G * G, C});
  be_.copy_tokens(ws.x.view({B, G * G, C}), 0, x_act, 0, static_cast<int>(G * G));
  be_.linear(x_act, *neck_conv1_, ws.neck_a);
  neck_norm1_(be_, ws.neck_a, ws.neck_a);
  be_.im2col3x3(ws.neck_a, ws.neck_cols);
  be_.linear(ws.neck_cols, *neck_conv3_, ws.out);
  neck_norm3_(be_, ws.out, ws.out);
}

}  // namespace segany
