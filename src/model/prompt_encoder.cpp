#include "model/prompt_encoder.h"

#include <cmath>
#include <cstring>

namespace segany {

PromptEncoder::PromptEncoder(const SamConfig& cfg, const io::TensorMap& w, Backend& be)
    : dim_(cfg.prompt_encoder.embed_dim),
      grid_(cfg.image_encoder.grid()),
      img_size_(cfg.image_encoder.img_size),
      mask_chans_(cfg.prompt_encoder.mask_in_chans),
      be_(be) {
  const std::string p = "prompt_encoder.";
  gaussian_ = w.at(p + "pe_layer.positional_encoding_gaussian_matrix", {2, dim_ / 2}).to_f32();
  for (int i = 0; i < 4; ++i)
    point_.push_back(w.at(p + "point_embeddings." + std::to_string(i) + ".weight", {1, dim_}).to_f32().view({dim_}));
  not_a_point_ = w.at(p + "not_a_point_embed.weight", {1, dim_}).to_f32().view({dim_});
  no_mask_embed_ = be.upload(w.at(p + "no_mask_embed.weight", {1, dim_}).to_f32().view({dim_}));

  // get_dense_pe(): cell (i, j) sits at ((j + 0.5) / grid, (i + 0.5) / grid).
  Tensor pe = Tensor::empty({1, int64_t(grid_) * grid_, dim_});
  for (int i = 0; i < grid_; ++i)
    for (int j = 0; j < grid_; ++j)
      encode((j + 0.5f) / grid_, (i + 0.5f) / grid_, pe.data_as<float>() + (int64_t(i) * grid_ + j) * dim_);
  image_pe_ = be.upload(pe);

  mask_conv0_ = be.prepare_linear(p + "mask_downscaling.0", conv_weight_as_linear(w.at(p + "mask_downscaling.0.weight")),
                                  &w.at(p + "mask_downscaling.0.bias"));
  mask_norm1_ = Norm::load(be, w, p + "mask_downscaling.1", 1e-6f);
  mask_conv3_ = be.prepare_linear(p + "mask_downscaling.3", conv_weight_as_linear(w.at(p + "mask_downscaling.3.weight")),
                                  &w.at(p + "mask_downscaling.3.bias"));
  mask_norm4_ = Norm::load(be, w, p + "mask_downscaling.4", 1e-6f);
  mask_conv6_ = be.prepare_linear(p + "mask_downscaling.6", conv_weight_as_linear(w.at(p + "mask_downscaling.6.weight")),
                                  &w.at(p + "mask_downscaling.6.bias"));
}

void PromptEncoder::encode(float x, float y, float* out) const {
  const int half = dim_ / 2;
  const float cx = 2.0f * x - 1.0f, cy = 2.0f * y - 1.0f;
  const float* g = gaussian_.data_as<const float>();
  for (int k = 0; k < half; ++k) {
    const float v = 2.0f * static_cast<float>(M_PI) * (cx * g[k] + cy * g[half + k]);
    out[k] = std::sin(v);
    out[half + k] = std::cos(v);
  }
}

Tensor PromptEncoder::embed_sparse(const std::vector<const PromptSet*>& sets) const {
  check(!sets.empty(), "embed_sparse: no prompt sets");
  const int ns = sets[0]->sparse_tokens();
  Tensor out = Tensor::empty({static_cast<int64_t>(sets.size()), ns, dim_});
  const float inv = 1.0f / static_cast<float>(img_size_);
  for (size_t s = 0; s < sets.size(); ++s) {
    const PromptSet& ps = *sets[s];
    check(ps.sparse_tokens() == ns, "embed_sparse: prompt sets of different lengths in one batch");
    check(ps.points.size() == 2 * ps.labels.size(), "embed_sparse: points and labels disagree");
    float* row = out.data_as<float>() + s * ns * dim_;
    auto add_to = [&](float* r, const Tensor& e) {
      for (int k = 0; k < dim_; ++k) r[k] += e.data_as<const float>()[k];
    };
    // Points are shifted to pixel centres (+0.5) before the encoding, as the original does.
    for (size_t i = 0; i < ps.labels.size(); ++i, row += dim_) {
      encode((ps.points[2 * i] + 0.5f) * inv, (ps.points[2 * i + 1] + 0.5f) * inv, row);
      add_to(row, point_[ps.labels[i] == 1 ? 1 : 0]);
    }
    if (!ps.labels.empty() && !ps.has_box) {  // the padding point: no encoding, only its embedding
      std::memcpy(row, not_a_point_.data(), dim_ * sizeof(float));
      row += dim_;
    }
    if (ps.has_box) {
      encode((ps.box[0] + 0.5f) * inv, (ps.box[1] + 0.5f) * inv, row);
      add_to(row, point_[2]);
      row += dim_;
      encode((ps.box[2] + 0.5f) * inv, (ps.box[3] + 0.5f) * inv, row);
      add_to(row, point_[3]);
    }
  }
  return out;
}

void PromptEncoder::embed_masks(const Tensor& masks, Tensor& dense) {
  const int64_t P = masks.dim(0), S = 4 * grid_;
  check(masks.numel() == P * S * S, "mask input must be [P, " + std::to_string(S) + ", " + std::to_string(S) +
                                        "], found " + shape_str(masks.shape()));
  const int64_t c4 = mask_chans_ / 4, half = 2 * grid_;
  // [P, 256, 256, 1] -2x2 conv-> [P, 128, 128, C/4] -LN, GELU, 2x2 conv-> [P, 64, 64, C] -LN, GELU, 1x1 conv-> dense
  Tensor p1 = be_.alloc({P, half, half, 4});
  be_.patchify(masks.view({P, S, S, 1}), 2, p1);
  Tensor a = be_.alloc({P, half, half, c4});
  be_.linear(p1, *mask_conv0_, a);
  mask_norm1_(be_, a, a);
  be_.activation(a, Activation::GELU);
  Tensor p2 = be_.alloc({P, grid_, grid_, 4 * c4});
  be_.patchify(a, 2, p2);
  Tensor b = be_.alloc({P, grid_, grid_, mask_chans_});
  be_.linear(p2, *mask_conv3_, b);
  mask_norm4_(be_, b, b);
  be_.activation(b, Activation::GELU);
  be_.linear(b, *mask_conv6_, dense);
}

}  // namespace segany
