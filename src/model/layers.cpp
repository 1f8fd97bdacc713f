#include "model/layers.h"

#include <algorithm>

namespace segany {

std::unique_ptr<LinearWeights> load_linear(Backend& be, const io::TensorMap& w, const std::string& name, bool bias) {
  const Tensor& weight = w.at(name + ".weight");
  if (!bias) return be.prepare_linear(name, weight, nullptr);
  const Tensor& b = w.at(name + ".bias");
  return be.prepare_linear(name, weight, &b);
}

Norm Norm::load(Backend& be, const io::TensorMap& w, const std::string& name, float eps) {
  Norm n;
  n.gamma = be.upload(w.at(name + ".weight"));
  n.beta = be.upload(w.at(name + ".bias"));
  n.eps = eps;
  return n;
}

Mlp::Mlp(Backend& be, const io::TensorMap& w, const std::string& name, int layers) {
  for (int i = 0; i < layers; ++i) layers_.push_back(load_linear(be, w, name + ".layers." + std::to_string(i)));
}

int64_t Mlp::scratch_numel(int64_t rows) const {
  int64_t widest = 0;
  for (size_t i = 0; i + 1 < layers_.size(); ++i) widest = std::max(widest, layers_[i]->out_features);
  return 2 * rows * widest;  // two hidden activations alternate
}

void Mlp::forward(Backend& be, const Tensor& x, Tensor& y, Tensor& scratch) const {
  const int64_t rows = x.numel() / x.dim(-1);
  check(scratch.numel() >= scratch_numel(rows), "mlp: scratch of " + std::to_string(scratch.numel()) +
                                                    " elements for " + std::to_string(scratch_numel(rows)));
  Tensor h = x;
  const int64_t half = scratch.numel() / 2;
  for (size_t i = 0; i + 1 < layers_.size(); ++i) {
    Tensor part = scratch.view({scratch.numel()}).slice0(int64_t(i % 2) * half, int64_t(i % 2 + 1) * half);
    Tensor next = part.view_prefix({rows, layers_[i]->out_features});
    be.linear(h, *layers_[i], next, Activation::ReLU);
    h = next;
  }
  be.linear(h, *layers_.back(), y);
}

Tensor conv_weight_as_linear(const Tensor& weight) {
  check(weight.ndim() == 4, "convolution weight must be 4-d, found " + shape_str(weight.shape()));
  const Tensor w = weight.to_f32();
  const int64_t co = w.dim(0), ci = w.dim(1), kh = w.dim(2), kw = w.dim(3);
  Tensor out = Tensor::empty({co, kh * kw * ci});
  const float* s = w.data_as<const float>();
  float* d = out.data_as<float>();
  for (int64_t o = 0; o < co; ++o)
    for (int64_t c = 0; c < ci; ++c)
      for (int64_t y = 0; y < kh; ++y)
        for (int64_t x = 0; x < kw; ++x) d[o * kh * kw * ci + (y * kw + x) * ci + c] = s[((o * ci + c) * kh + y) * kw + x];
  return out;
}

void conv_transpose_as_linear(const Tensor& weight, const Tensor& bias, Tensor& lin_weight, Tensor& lin_bias) {
  check(weight.ndim() == 4 && weight.dim(2) == weight.dim(3),
        "transposed convolution weight must be [Cin, Cout, p, p], found " + shape_str(weight.shape()));
  const Tensor w = weight.to_f32(), b = bias.to_f32();
  const int64_t ci = w.dim(0), co = w.dim(1), p = w.dim(2);
  check(b.numel() == co, "transposed convolution bias has " + std::to_string(b.numel()) + " values for " +
                             std::to_string(co) + " channels");
  lin_weight = Tensor::empty({p * p * co, ci});
  lin_bias = Tensor::empty({p * p * co});
  const float* s = w.data_as<const float>();
  float* d = lin_weight.data_as<float>();
  for (int64_t y = 0; y < p; ++y)
    for (int64_t x = 0; x < p; ++x)
      for (int64_t o = 0; o < co; ++o) {
        const int64_t row = (y * p + x) * co + o;
        lin_bias.data_as<float>()[row] = b.data_as<const float>()[o];
        for (int64_t c = 0; c < ci; ++c) d[row * ci + c] = s[((c * co + o) * p + y) * p + x];
      }
}

}  // namespace segany
