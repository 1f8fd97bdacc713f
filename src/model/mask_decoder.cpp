#include "model/mask_decoder.h"

#include <algorithm>
#include <cstring>

namespace segany {

Attention::Attention(Backend& be, const io::TensorMap& w, const std::string& name, int heads)
    : heads_(heads),
      q_proj_(load_linear(be, w, name + ".q_proj")),
      k_proj_(load_linear(be, w, name + ".k_proj")),
      v_proj_(load_linear(be, w, name + ".v_proj")),
      out_proj_(load_linear(be, w, name + ".out_proj")) {}

void Attention::forward(Backend& be, const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, Tensor& out,
                        const Tensor* residual) const {
  const int64_t Di = q_proj_->out_features;
  Tensor q = be.alloc({q_in.dim(0), q_in.dim(1), Di});
  Tensor k = be.alloc({k_in.dim(0), k_in.dim(1), Di});
  Tensor v = be.alloc({v_in.dim(0), v_in.dim(1), Di});
  be.linear(q_in, *q_proj_, q);
  be.linear(k_in, *k_proj_, k);
  be.linear(v_in, *v_proj_, v);
  const int64_t B = std::max({q.dim(0), k.dim(0), v.dim(0)});
  Tensor o = be.alloc({B, q.dim(1), Di});
  be.attention(q, k, v, heads_, o);
  be.linear(o, *out_proj_, out, Activation::None, residual);
}

TwoWayTransformer::TwoWayTransformer(const MaskDecoderConfig& cfg, const io::TensorMap& w, Backend& be) {
  const std::string p = "mask_decoder.transformer.";
  for (int i = 0; i < cfg.depth; ++i) {
    const std::string l = p + "layers." + std::to_string(i) + ".";
    Layer layer;
    layer.self_attn = std::make_unique<Attention>(be, w, l + "self_attn", cfg.num_heads);
    layer.cross_token_to_image = std::make_unique<Attention>(be, w, l + "cross_attn_token_to_image", cfg.num_heads);
    layer.cross_image_to_token = std::make_unique<Attention>(be, w, l + "cross_attn_image_to_token", cfg.num_heads);
    layer.mlp_lin1 = load_linear(be, w, l + "mlp.lin1");
    layer.mlp_lin2 = load_linear(be, w, l + "mlp.lin2");
    layer.norm1 = Norm::load(be, w, l + "norm1", 1e-5f);
    layer.norm2 = Norm::load(be, w, l + "norm2", 1e-5f);
    layer.norm3 = Norm::load(be, w, l + "norm3", 1e-5f);
    layer.norm4 = Norm::load(be, w, l + "norm4", 1e-5f);
    layers_.push_back(std::move(layer));
  }
  final_attn_ = std::make_unique<Attention>(be, w, p + "final_attn_token_to_image", cfg.num_heads);
  norm_final_ = Norm::load(be, w, p + "norm_final_attn", 1e-5f);
}

Tensor TwoWayTransformer::forward(Backend& be, Tensor& queries, const Tensor& keys_in, const Tensor& key_pe) const {
  const int64_t P = queries.dim(0), Tt = queries.dim(1), C = queries.dim(2), HW = keys_in.dim(1);
  // The prompt tokens as they came in serve as the queries' positional encoding throughout.
  Tensor qpe = be.alloc(queries.shape());
  be.copy_tokens(queries, 0, qpe, 0, static_cast<int>(Tt));

  Tensor keys = keys_in;
  Tensor q = be.alloc({P, Tt, C});
  Tensor k = be.alloc({keys.dim(0), HW, C});
  Tensor attn = be.alloc({P, Tt, C});
  Tensor hidden = be.alloc({P, Tt, layers_.empty() ? 1 : layers_[0].mlp_lin1->out_features});
  for (size_t i = 0; i < layers_.size(); ++i) {
    const Layer& L = layers_[i];
    // Self-attention of the tokens; the first layer sees no positional encoding and no residual.
    if (i == 0) {
      L.self_attn->forward(be, queries, queries, queries, attn);
      be.copy_tokens(attn, 0, queries, 0, static_cast<int>(Tt));
    } else {
      be.add(queries, qpe, q);
      L.self_attn->forward(be, q, q, queries, queries, &queries);
    }
    L.norm1(be, queries, queries);
    // Tokens attend to the image.
    be.add(queries, qpe, q);
    if (k.dim(0) != keys.dim(0)) k = be.alloc({keys.dim(0), HW, C});
    be.add(keys, key_pe, k);
    L.cross_token_to_image->forward(be, q, k, keys, queries, &queries);
    L.norm2(be, queries, queries);
    // MLP on the tokens.
    be.linear(queries, *L.mlp_lin1, hidden, Activation::ReLU);
    be.linear(hidden, *L.mlp_lin2, queries, Activation::None, &queries);
    L.norm3(be, queries, queries);
    // The image attends to the tokens: from here on every prompt has its own keys.
    be.add(queries, qpe, q);
    Tensor new_keys = keys.dim(0) == P ? keys : be.alloc({P, HW, C});
    Tensor image_attn = be.alloc({P, HW, C});
    L.cross_image_to_token->forward(be, k, q, queries, image_attn);
    be.add(image_attn, keys, new_keys);  // keys [1 or P] broadcast
    L.norm4(be, new_keys, new_keys);
    keys = new_keys;
  }
  // Final attention from the tokens to the image.
  be.add(queries, qpe, q);
  if (k.dim(0) != keys.dim(0)) k = be.alloc({keys.dim(0), HW, C});
  be.add(keys, key_pe, k);
  final_attn_->forward(be, q, k, keys, queries, &queries);
  norm_final_(be, queries, queries);
  return keys;
}

MaskDecoder::MaskDecoder(const SamConfig& cfg, const io::TensorMap& w, Backend& be)
    : cfg_(cfg),
      be_(be),
      num_mask_tokens_(cfg.mask_decoder.num_multimask_outputs + 1),
      transformer_(cfg.mask_decoder, w, be),
      iou_head_(be, w, "mask_decoder.iou_prediction_head", cfg.mask_decoder.iou_head_depth) {
  const int64_t C = cfg.mask_decoder.transformer_dim;
  const std::string p = "mask_decoder.";
  output_tokens_ = Tensor::empty({1 + num_mask_tokens_, C});
  std::memcpy(output_tokens_.data(), w.at(p + "iou_token.weight", {1, C}).to_f32().data(), C * sizeof(float));
  std::memcpy(output_tokens_.data_as<float>() + C, w.at(p + "mask_tokens.weight", {num_mask_tokens_, C}).to_f32().data(),
              num_mask_tokens_ * C * sizeof(float));
  Tensor lw, lb;
  conv_transpose_as_linear(w.at(p + "output_upscaling.0.weight"), w.at(p + "output_upscaling.0.bias"), lw, lb);
  upscale1_ = be.prepare_linear(p + "output_upscaling.0", lw, &lb);
  upscale_norm_ = Norm::load(be, w, p + "output_upscaling.1", 1e-6f);
  conv_transpose_as_linear(w.at(p + "output_upscaling.3.weight"), w.at(p + "output_upscaling.3.bias"), lw, lb);
  upscale2_ = be.prepare_linear(p + "output_upscaling.3", lw, &lb);
  for (int t = 0; t < num_mask_tokens_; ++t)
    hypernetworks_.emplace_back(be, w, p + "output_hypernetworks_mlps." + std::to_string(t), 3);
}

MaskDecoder::Output MaskDecoder::forward(const Tensor& image_embedding, const Tensor& image_pe, const Tensor& sparse,
                                         const Tensor& dense) {
  Backend& be = be_;
  const int64_t P = sparse.dim(0), Ns = sparse.dim(1), C = cfg_.mask_decoder.transformer_dim;
  const int64_t G = cfg_.image_encoder.grid(), HW = G * G, T = num_mask_tokens_;
  check(image_embedding.numel() == HW * C, "mask decoder: image embedding " + shape_str(image_embedding.shape()) +
                                               " is not one " + std::to_string(G) + "x" + std::to_string(G) + "x" +
                                               std::to_string(C) + " grid");
  // tokens [P, 1 + T + Ns, C] = [iou token, mask tokens, sparse prompt embeddings]
  const int64_t Tt = 1 + T + Ns;
  Tensor tokens = be.alloc({P, Tt, C});
  {
    Tensor out_tok = be.upload(output_tokens_.view({1, 1 + T, C}));
    for (int64_t i = 0; i < P; ++i) {
      Tensor row = tokens.slice0(i, i + 1);
      be.copy_tokens(out_tok, 0, row, 0, static_cast<int>(1 + T));
    }
    if (Ns > 0) be.copy_tokens(sparse, 0, tokens, static_cast<int>(1 + T), static_cast<int>(Ns));
  }
  // src = image embedding + dense prompt embedding, one image shared by every prompt when possible.
  const Tensor emb = image_embedding.view({1, HW, C});
  Tensor src;
  if (dense.numel() == C) {  // the no-mask embedding, the same in every cell
    src = be.alloc({1, HW, C});
    be.add(emb, dense, src);
  } else {
    check(dense.numel() % (HW * C) == 0, "mask decoder: dense embedding " + shape_str(dense.shape()));
    src = be.alloc({dense.numel() / (HW * C), HW, C});
    be.add(dense.view(src.shape()), emb, src);
  }
  Tensor keys = transformer_.forward(be, tokens, src, image_pe.view({1, HW, C}));

  // Upscale the image cells: [P, 64, 64, C] -> [P, 128, 128, C/4] -> [P, 256, 256, C/8]
  Tensor u1 = be.alloc({P, G, G, C});
  be.linear(keys.view({P, G, G, C}), *upscale1_, u1);
  Tensor u1s = be.alloc({P, 2 * G, 2 * G, C / 4});
  be.unpatchify(u1, 2, u1s);
  upscale_norm_(be, u1s, u1s);
  be.activation(u1s, Activation::GELU);
  Tensor u2 = be.alloc({P, 2 * G, 2 * G, C / 2});
  be.linear(u1s, *upscale2_, u2);
  Tensor up = be.alloc({P, 4 * G, 4 * G, C / 8});
  be.unpatchify(u2, 2, up);
  be.activation(up, Activation::GELU);

  // One hypernetwork MLP per mask token, each applied to its own token.
  Tensor mask_tokens = be.alloc({P, T, C});
  be.copy_tokens(tokens, 1, mask_tokens, 0, static_cast<int>(T));
  Tensor hyper_in = be.alloc({P, T, C / 8});
  Tensor one = be.alloc({P, 1, C});
  Tensor one_out = be.alloc({P, 1, C / 8});
  for (int64_t t = 0; t < T; ++t) {
    be.copy_tokens(mask_tokens, static_cast<int>(t), one, 0, 1);
    hypernetworks_[t].forward(be, one, one_out);
    be.copy_tokens(one_out, 0, hyper_in, static_cast<int>(t), 1);
  }
  Output out;
  out.low_res_logits = be.alloc({P, T, 4 * G, 4 * G});
  be.matmul_nt(hyper_in, up.view({P, 16 * HW, C / 8}), out.low_res_logits);

  Tensor iou_token = be.alloc({P, 1, C});
  be.copy_tokens(tokens, 0, iou_token, 0, 1);
  out.iou = be.alloc({P, 1, T});
  iou_head_.forward(be, iou_token, out.iou);
  return out;
}

}  // namespace segany
