#include "model/mask_decoder.h"

#include <algorithm>
#include <cstring>

namespace segany {
namespace {

// `shape` in the first elements of `buffer` when it is large enough (buffers whose lifetimes do
// not overlap share memory), else a buffer of its own.
Tensor within(Backend& be, const Tensor& buffer, const Shape& shape, DType dtype) {
  if (buffer.defined() && buffer.dtype() == dtype && buffer.numel() >= shape_numel(shape))
    return buffer.view_prefix(shape);
  return be.alloc(shape, dtype);
}

}  // namespace

Attention::Attention(Backend& be, const io::TensorMap& w, const std::string& name, int heads)
    : heads_(heads),
      q_proj_(load_linear(be, w, name + ".q_proj")),
      k_proj_(load_linear(be, w, name + ".k_proj")),
      v_proj_(load_linear(be, w, name + ".v_proj")),
      out_proj_(load_linear(be, w, name + ".out_proj")) {}

void Attention::forward(Backend& be, const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, Tensor& out,
                        Scratch& s, const Tensor* residual) const {
  const int64_t Di = q_proj_->out_features;
  Tensor q = s.q.view_prefix({q_in.dim(0), q_in.dim(1), Di});
  Tensor k = s.k.view_prefix({k_in.dim(0), k_in.dim(1), Di});
  Tensor v = s.v.view_prefix({v_in.dim(0), v_in.dim(1), Di});
  be.linear(q_in, *q_proj_, q);
  be.linear(k_in, *k_proj_, k);
  be.linear(v_in, *v_proj_, v);
  const int64_t B = std::max({q.dim(0), k.dim(0), v.dim(0)});
  Tensor o = s.o.view_prefix({B, q.dim(1), Di});
  be.attention(q, k, v, heads_, o);
  be.linear(o, *out_proj_, out, Activation::None, residual);
}

TwoWayTransformer::TwoWayTransformer(const MaskDecoderConfig& cfg, const io::TensorMap& w, Backend& be)
    : dim_(cfg.transformer_dim), mlp_dim_(cfg.mlp_dim) {
  check(cfg.depth >= 1, "mask decoder: the two-way transformer needs at least one layer");
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
    cross_dim_ = std::max({cross_dim_, layer.cross_token_to_image->internal_dim(),
                           layer.cross_image_to_token->internal_dim()});
    mlp_dim_ = std::max(mlp_dim_, layer.mlp_lin1->out_features);
    dim_ = std::max(dim_, layer.self_attn->internal_dim());
    layers_.push_back(std::move(layer));
  }
  final_attn_ = std::make_unique<Attention>(be, w, p + "final_attn_token_to_image", cfg.num_heads);
  cross_dim_ = std::max(cross_dim_, final_attn_->internal_dim());
  norm_final_ = Norm::load(be, w, p + "norm_final_attn", 1e-5f);
}

TwoWayTransformer::Buffers TwoWayTransformer::buffers(Backend& be, int64_t P, int64_t Tt, int64_t HW) const {
  const DType dt = be.prompt_dtype();
  Buffers b;
  b.qpe = be.alloc({P, Tt, dim_}, dt);
  b.q = be.alloc({P, Tt, dim_}, dt);
  b.attn = be.alloc({P, Tt, dim_}, dt);
  b.hidden = be.alloc({P, Tt, mlp_dim_}, dt);
  b.k = be.alloc({P, HW, dim_}, dt);
  b.image_attn = be.alloc({P, HW, dim_}, dt);
  b.keys = be.alloc({P, HW, dim_}, dt);
  // q, k, v and the output of every attention: image-sized for the cross attentions, token-sized
  // (at the full width) for the self-attention. One allocation in four parts.
  const int64_t part = std::max(P * HW * cross_dim_, P * Tt * dim_);
  const Tensor all = be.alloc({4 * part}, dt);
  b.scratch.q = all.slice0(0, part);
  b.scratch.k = all.slice0(part, 2 * part);
  b.scratch.v = all.slice0(2 * part, 3 * part);
  b.scratch.o = all.slice0(3 * part, 4 * part);
  return b;
}

void TwoWayTransformer::forward(Backend& be, Tensor& queries, const Tensor& src, const Tensor& key_pe,
                                Buffers& b) const {
  const int64_t Tt = queries.dim(1), C = queries.dim(2), HW = src.dim(1);
  const int tokens = static_cast<int>(Tt);
  // The prompt tokens as they came in serve as the queries' positional encoding throughout.
  be.copy_tokens(queries, 0, b.qpe, 0, tokens);
  // keys [1 or P, HW, C] until the first image-to-token attention, then b.keys [P, HW, C]; k = keys +
  // key_pe, what the attentions compare against, made with each new keys by their norm.
  Tensor keys = src;
  Tensor k = b.k.view_prefix({keys.dim(0), HW, C});
  be.add(keys, key_pe, k);
  for (size_t i = 0; i < layers_.size(); ++i) {
    const Layer& L = layers_[i];
    // Self-attention of the tokens; the first layer sees no positional encoding and no residual
    // (the projections read the queries before the output overwrites them).
    if (i == 0) {
      L.self_attn->forward(be, queries, queries, queries, queries, b.scratch);
    } else {
      be.add(queries, b.qpe, b.q);
      L.self_attn->forward(be, b.q, b.q, queries, queries, b.scratch, &queries);
    }
    L.norm1(be, queries, queries);
    // Tokens attend to the image.
    be.add(queries, b.qpe, b.q);
    L.cross_token_to_image->forward(be, b.q, k, keys, queries, b.scratch, &queries);
    L.norm2(be, queries, queries);
    // MLP on the tokens.
    be.linear(queries, *L.mlp_lin1, b.hidden, Activation::ReLU);
    be.linear(b.hidden, *L.mlp_lin2, queries, Activation::None, &queries);
    L.norm3(be, queries, queries);
    // The image attends to the tokens: from here on every prompt has its own keys. The residual
    // (the old keys, [1 or P]), the norm and the next k in one pass.
    be.add(queries, b.qpe, b.q);
    L.cross_image_to_token->forward(be, k, b.q, queries, b.image_attn, b.scratch);
    k = b.k;
    be.add_layer_norm(b.image_attn, keys, L.norm4.gamma, L.norm4.beta, L.norm4.eps, b.keys, &key_pe, &k);
    keys = b.keys;
  }
  // Final attention from the tokens to the image.
  be.add(queries, b.qpe, b.q);
  final_attn_->forward(be, b.q, k, keys, queries, b.scratch, &queries);
  norm_final_(be, queries, queries);
}

MaskDecoder::MaskDecoder(const SamConfig& cfg, const io::TensorMap& w, Backend& be, PromptEncoder& prompts)
    : cfg_(cfg),
      be_(be),
      prompts_(prompts),
      num_mask_tokens_(cfg.mask_decoder.num_multimask_outputs + 1),
      transformer_(cfg.mask_decoder, w, be),
      iou_head_(be, w, "mask_decoder.iou_prediction_head", cfg.mask_decoder.iou_head_depth) {
  const int64_t C = cfg.mask_decoder.transformer_dim;
  const std::string p = "mask_decoder.";
  Tensor tokens = Tensor::empty({1, 1 + num_mask_tokens_, C});
  std::memcpy(tokens.data(), w.at(p + "iou_token.weight", {1, C}).to_f32().data(), C * sizeof(float));
  std::memcpy(tokens.data_as<float>() + C, w.at(p + "mask_tokens.weight", {num_mask_tokens_, C}).to_f32().data(),
              num_mask_tokens_ * C * sizeof(float));
  output_tokens_ = be.alloc(tokens.shape(), be.prompt_dtype());
  be.copy_from_host(tokens, output_tokens_);
  Tensor lw, lb;
  conv_transpose_as_linear(w.at(p + "output_upscaling.0.weight"), w.at(p + "output_upscaling.0.bias"), lw, lb);
  upscale1_ = be.prepare_linear(p + "output_upscaling.0", lw, &lb);
  upscale_norm_ = Norm::load(be, w, p + "output_upscaling.1", 1e-6f);
  conv_transpose_as_linear(w.at(p + "output_upscaling.3.weight"), w.at(p + "output_upscaling.3.bias"), lw, lb);
  upscale2_ = be.prepare_linear(p + "output_upscaling.3", lw, &lb);
  for (int t = 0; t < num_mask_tokens_; ++t)
    hypernetworks_.emplace_back(be, w, p + "output_hypernetworks_mlps." + std::to_string(t), 3);
}

MaskDecoder::Batch& MaskDecoder::batch(int64_t P, int64_t Ns, bool mask_inputs, bool own_images) {
  check(P > 0 && Ns >= 0, "mask decoder: a batch of " + std::to_string(P) + " prompts of " + std::to_string(Ns) +
                              " sparse tokens");
  const auto key = std::make_tuple(P, Ns, mask_inputs, own_images);
  auto it = batches_.find(key);
  if (it != batches_.end()) return it->second;
  Backend& be = be_;
  const DType dt = be.prompt_dtype();
  const int64_t C = cfg_.mask_decoder.transformer_dim, G = cfg_.image_encoder.grid(), HW = G * G;
  const int64_t T = num_mask_tokens_, Tt = 1 + T + Ns, S = 4 * G;
  Batch b;
  b.P = P, b.Ns = Ns, b.mask_inputs = mask_inputs, b.own_images = own_images;
  const int64_t E = own_images ? P : 1;  // image embeddings
  b.embedding = be.alloc({E, HW, C}, dt);
  b.coords = be.alloc({P, Ns, 2}, DType::F32);
  b.labels = be.alloc({P, Ns}, DType::I32);
  b.low_res = be.alloc({P, T, S, S}, DType::F32);
  b.iou = be.alloc({P, T}, DType::F32);
  b.sparse = be.alloc({P, Ns, C}, dt);
  b.tokens = be.alloc({P, Tt, C}, dt);
  b.t = transformer_.buffers(be, P, Tt, HW);
  if (mask_inputs) {
    b.masks = be.alloc({P, S, S}, DType::F32);
    b.dense = be.alloc({P, HW, C}, dt);
    b.src = b.dense;  // src = dense + image embedding, in place
    b.dense_p1 = within(be, b.t.image_attn, prompts_.mask_buffer_shape(P, 0), dt);
    b.dense_a = within(be, b.t.k, prompts_.mask_buffer_shape(P, 1), dt);
    b.dense_p2 = within(be, b.t.keys, prompts_.mask_buffer_shape(P, 2), dt);
    b.dense_b = within(be, b.t.scratch.q, prompts_.mask_buffer_shape(P, 3), dt);
  } else {
    // src = embedding + no-mask embedding: in place when the embeddings are the prompts' own
    // (copied in for every run), else a buffer of its own (the one embedding is shared).
    b.src = own_images ? b.embedding : be.alloc({1, HW, C}, dt);
  }
  // The upscaling runs after the transformer: its buffers take the transformer's place where they fit.
  b.u1 = within(be, b.t.image_attn, {P, HW, C}, dt);
  b.u2 = be.alloc({P, HW * 4, C / 2}, dt);
  b.mask_tokens = be.alloc({P, T, C}, dt);
  b.hyper_in = be.alloc({P, T, C / 8}, dt);
  b.one = be.alloc({P, 1, C}, dt);
  b.one_out = be.alloc({P, 1, C / 8}, dt);
  b.iou_token = be.alloc({P, 1, C}, dt);
  int64_t mlp = iou_head_.scratch_numel(P);
  for (const Mlp& m : hypernetworks_) mlp = std::max(mlp, m.scratch_numel(P));
  b.mlp_scratch = be.alloc({std::max<int64_t>(mlp, 1)}, dt);
  return batches_.emplace(key, std::move(b)).first->second;
}

void MaskDecoder::forward(Batch& b) {
  be_.run_graph("mask_decoder/P=" + std::to_string(b.P) + ",Ns=" + std::to_string(b.Ns) +
                    (b.mask_inputs ? ",masks" : "") + (b.own_images ? ",own" : ""),
                [&] { run(b); });
}

void MaskDecoder::run(Batch& b) {
  Backend& be = be_;
  const int64_t P = b.P, C = cfg_.mask_decoder.transformer_dim;
  const int64_t G = cfg_.image_encoder.grid(), HW = G * G, T = num_mask_tokens_;

  // tokens [P, 1 + T + Ns, C] = [iou token, mask tokens, sparse prompt embeddings]
  prompts_.embed_sparse(b.coords, b.labels, b.sparse);
  be.copy_tokens(output_tokens_, 0, b.tokens, 0, static_cast<int>(1 + T));
  be.copy_tokens(b.sparse, 0, b.tokens, static_cast<int>(1 + T), static_cast<int>(b.Ns));
  // src = image embedding + dense prompt embedding: one image shared by every prompt unless
  // there are mask inputs or each prompt has an image of its own.
  if (b.mask_inputs) {
    prompts_.embed_masks(b.masks, b.dense_p1, b.dense_a, b.dense_p2, b.dense_b, b.dense);
    be.add(b.dense, b.embedding, b.src);
  } else {
    be.add(b.embedding, prompts_.no_mask_embed(), b.src);
  }
  transformer_.forward(be, b.tokens, b.src, prompts_.image_pe(), b.t);
  const Tensor& keys = b.t.keys;

  // Upscale the image cells: [P, 64, 64, C] -> [P, 128, 128, C/4] -> [P, 256, 256, C/8], two
  // transposed convolutions, each a linear layer whose output holds a 2x2 patch per input pixel.
  // The pixels stay in patch order throughout (LayerNorm, GELU and the next linear layer are per
  // pixel): pixel (4y + 2a + c, 4x + 2b + d) is row ((y G + x) 4 + 2a + b) 4 + 2c + d of up
  // [P, 16 HW, C/8]; only the low-res masks are written in pixel order (hypernetwork_masks).
  be.linear(keys.view({P, HW, C}), *upscale1_, b.u1);  // [P, HW, 4 * C/4]
  Tensor u1 = b.u1.view({P, HW * 4, C / 4});
  upscale_norm_(be, u1, u1, Activation::GELU);
  be.linear(u1, *upscale2_, b.u2);  // [P, 4 HW, 4 * C/8], GELU applied as the masks read it

  // One hypernetwork MLP per mask token, each applied to its own token.
  be.copy_tokens(b.tokens, 1, b.mask_tokens, 0, static_cast<int>(T));
  for (int64_t t = 0; t < T; ++t) {
    be.copy_tokens(b.mask_tokens, static_cast<int>(t), b.one, 0, 1);
    hypernetworks_[t].forward(be, b.one, b.one_out, b.mlp_scratch);
    be.copy_tokens(b.one_out, 0, b.hyper_in, static_cast<int>(t), 1);
  }
  be.hypernetwork_masks(b.u2.view({P, 16 * HW, C / 8}), b.hyper_in, b.low_res);

  be.copy_tokens(b.tokens, 0, b.iou_token, 0, 1);
  Tensor iou = b.iou.view({P, 1, T});
  iou_head_.forward(be, b.iou_token, iou, b.mlp_scratch);
}

}  // namespace segany
