#include "model/random_init.h"

#include <cmath>
#include <string>

namespace segany {
namespace {

// splitmix64 + Box-Muller: portable, unlike std::normal_distribution.
class Rng {
 public:
  explicit Rng(uint64_t seed) : s_(seed) {}
  uint64_t next() {
    uint64_t z = (s_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  double uniform() { return (next() >> 11) * (1.0 / 9007199254740992.0); }  // [0, 1)
  float normal() {
    const double u1 = 1.0 - uniform(), u2 = uniform();
    return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2));
  }

 private:
  uint64_t s_;
};

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

io::TensorMap random_sam_weights(const SamConfig& cfg, uint64_t seed) {
  io::TensorMap map;
  map.source = "random " + cfg.arch + " (seed " + std::to_string(seed) + ")";
  Rng rng(seed * 0x2545f4914f6cdd1dull + 1);
  // The distribution of the reference models in ../shared/golden, which is PyTorch's default
  // initialisation with the norms and tables randomised too: weights uniform in +-1/sqrt(fan_in);
  // biases, position tables and LayerNorm offsets N(0, 0.1); LayerNorm scales 1 + N(0, 0.1),
  // LayerNorm2d scales 1; embeddings and the Fourier matrix N(0, 1).
  for (const auto& [name, shape] : cfg.parameter_shapes()) {
    Tensor t = Tensor::empty(shape);
    float* p = t.data_as<float>();
    const int64_t n = t.numel();
    const bool layer_norm_2d = name.find("neck.1.") != std::string::npos || name.find("neck.3.") != std::string::npos ||
                               name.find("upscaling.1.") != std::string::npos ||
                               name.find("downscaling.1.") != std::string::npos ||
                               name.find("downscaling.4.") != std::string::npos;
    const bool embedding = name.find("gaussian_matrix") != std::string::npos || ends_with(name, "embed.weight") ||
                           name.find("point_embeddings") != std::string::npos ||
                           name.find("_token") != std::string::npos;
    if (shape.size() >= 2 && ends_with(name, ".weight") && !embedding) {
      // fan_in as torch computes it: dim 1 times the kernel area ([out, in, k, k], and for a
      // transposed convolution's [in, out, k, k] that is its output channels).
      int64_t fan_in = 1;
      for (size_t i = 1; i < shape.size(); ++i) fan_in *= shape[i];
      const double bound = 1.0 / std::sqrt(static_cast<double>(fan_in));
      for (int64_t i = 0; i < n; ++i) p[i] = static_cast<float>((2.0 * rng.uniform() - 1.0) * bound);
    } else if (embedding) {
      for (int64_t i = 0; i < n; ++i) p[i] = rng.normal();
    } else if (ends_with(name, ".weight")) {  // a norm's scale
      for (int64_t i = 0; i < n; ++i) p[i] = layer_norm_2d ? 1.0f : 1.0f + 0.1f * rng.normal();
    } else {  // biases, pos_embed, rel_pos tables
      for (int64_t i = 0; i < n; ++i) p[i] = 0.1f * rng.normal();
    }
    map.insert(name, std::move(t));
  }
  return map;
}

}  // namespace segany
