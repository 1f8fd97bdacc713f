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
  gaussian_device_ = be.upload(gaussian_);
  Tensor table = Tensor::empty({5, dim_});
  for (int i = 0; i < 5; ++i) {
    const std::string name = i == 0 ? p + "not_a_point_embed.weight"
                                    : p + "point_embeddings." + std::to_string(i - 1) + ".weight";
    std::memcpy(table.data_as<float>() + int64_t(i) * dim_, w.at(name, {1, dim_}).to_f32().data(),
                dim_ * sizeof(float));
  }
  label_table_ = be.upload(table);
  no_mask_embed_ = be.upload(w.at(p + "no_mask_embed.weight", {1, dim_}).to_f32().view({dim_}));

  // get_dense_pe(): cell (i, j) sits at ((j + 0.5) / grid, (i + 0.5) / grid).
  Tensor pe = Tensor::empty({1, int64_t(grid_) * grid_, dim_});
  for (int i = 0; i < grid_; ++i)
    for (int j = 0; j < grid_; ++j)
      encode((j + 0.5f) / grid_, (i + 0.5f) / grid_, pe.data_as<float>() + (int64_t(i) * grid_ + j) * dim_);
  // In the prompt path's dtype: the decoder adds it to its image-sized tensors.
  image_pe_ = be.alloc(pe.shape(), be.prompt_dtype());
  be.copy_from_host(pe, image_pe_);

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

void PromptEncoder::pack(const PromptSet& ps, float* coords, int32_t* labels) {
  check(ps.points.size() == 2 * ps.labels.size(), "prompt encoder: points and labels disagree");
  int n = 0;
  auto put = [&](float x, float y, int label) {
    coords[2 * n] = x;
    coords[2 * n + 1] = y;
    labels[n++] = label;
  };
  for (size_t i = 0; i < ps.labels.size(); ++i) put(ps.points[2 * i], ps.points[2 * i + 1], ps.labels[i] == 1 ? 1 : 0);
  if (!ps.labels.empty() && !ps.has_box) put(0.0f, 0.0f, -1);  // the padding point: its embedding only
  if (ps.has_box) {
    put(ps.box[0], ps.box[1], 2);
    put(ps.box[2], ps.box[3], 3);
  }
}

void PromptEncoder::embed_sparse(const Tensor& coords, const Tensor& labels, Tensor& out) {
  be_.embed_points(coords, labels, gaussian_device_, label_table_, img_size_, out);
}

Shape PromptEncoder::mask_buffer_shape(int64_t P, int i) const {
  const int64_t c4 = mask_chans_ / 4, half = 2 * grid_;
  switch (i) {
    case 0: return {P, half, half, 4};
    case 1: return {P, half, half, c4};
    case 2: return {P, grid_, grid_, 4 * c4};
    default: return {P, grid_, grid_, mask_chans_};
  }
}

void PromptEncoder::embed_masks(const Tensor& masks, Tensor& p1, Tensor& a, Tensor& p2, Tensor& b, Tensor& dense) {
  const int64_t P = masks.dim(0), S = 4 * grid_;
  check(masks.numel() == P * S * S, "mask input must be [P, " + std::to_string(S) + ", " + std::to_string(S) +
                                        "], found " + shape_str(masks.shape()));
  // [P, 256, 256, 1] -2x2 conv-> [P, 128, 128, C/4] -LN, GELU, 2x2 conv-> [P, 64, 64, C] -LN, GELU, 1x1 conv-> dense
  be_.patchify(masks.view({P, S, S, 1}), 2, p1);
  be_.linear(p1, *mask_conv0_, a);
  mask_norm1_(be_, a, a);
  be_.activation(a, Activation::GELU);
  be_.patchify(a, 2, p2);
  be_.linear(p2, *mask_conv3_, b);
  mask_norm4_(be_, b, b);
  be_.activation(b, Activation::GELU);
  be_.linear(b, *mask_conv6_, dense);
}

}  // namespace segany
