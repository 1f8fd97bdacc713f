// Small building blocks shared by the three parts of SAM: a prepared linear layer, a norm's
// parameters, an MLP, and the weight re-layouts that turn convolutions into linear layers.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "io/tensor_map.h"

namespace segany {

// A linear layer from "<name>.weight" [out, in] (+ "<name>.bias").
std::unique_ptr<LinearWeights> load_linear(Backend& be, const io::TensorMap& w, const std::string& name,
                                           bool bias = true);

// "<name>.weight" and "<name>.bias" of a LayerNorm / LayerNorm2d, on the device.
struct Norm {
  Tensor gamma, beta;
  float eps = 1e-5f;
  static Norm load(Backend& be, const io::TensorMap& w, const std::string& name, float eps);
  void operator()(Backend& be, const Tensor& x, Tensor& y, Activation act = Activation::None) const {
    be.layer_norm(x, gamma, beta, eps, y, act);
  }
  // y = act(linear(LayerNorm(x))), the norm through xn (Backend::norm_linear).
  void then(Backend& be, const Tensor& x, Tensor& xn, const LinearWeights& w, Tensor& y,
            Activation act = Activation::None) const {
    be.norm_linear(x, gamma, beta, eps, xn, w, y, act);
  }
};

// SAM's MLP (ReLU between layers, none after the last), as in the mask decoder's heads.
class Mlp {
 public:
  Mlp(Backend& be, const io::TensorMap& w, const std::string& name, int layers);
  // x [B, T, in] -> y [B, T, out]. `scratch` holds the hidden activations: at least
  // scratch_numel(B * T) elements of the activation dtype, reused (nothing is allocated).
  void forward(Backend& be, const Tensor& x, Tensor& y, Tensor& scratch) const;
  int64_t scratch_numel(int64_t rows) const;
  int64_t out_features() const { return layers_.back()->out_features; }

 private:
  std::vector<std::unique_ptr<LinearWeights>> layers_;
};

// Conv2d weight [Cout, Cin, kh, kw] -> [Cout, kh*kw*Cin] in (ky, kx, c) order, matching
// Backend::patchify / im2col3x3.
Tensor conv_weight_as_linear(const Tensor& weight);
// ConvTranspose2d (kernel = stride = p) weight [Cin, Cout, p, p] and bias [Cout] -> a linear layer
// weight [(ky, kx, Cout), Cin] and bias [p*p*Cout], the output holding a p x p patch per input pixel.
void conv_transpose_as_linear(const Tensor& weight, const Tensor& bias, Tensor& lin_weight, Tensor& lin_bias);

}  // namespace segany
