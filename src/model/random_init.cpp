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
  for (const auto& [name, shape] : cfg.parameter_shapes()) {
    Tensor t = Tensor::empty(shape);
    float* p = t.data_as<float>();
    const int64_t n = t.numel();
    // fan-in of a weight: every dim but the first ([out, in] or [out, in, kh, kw]); transposed convs
    // ([in, out, k, k]) use their first dim.
    int64_t fan_in = 1;
    for (size_t i = 1; i < shape.size(); ++i) fan_in *= shape[i];
    if (name.find("output_upscaling") != std::string::npos && shape.size() == 4) fan_in = shape[0];
    const bool norm = name.find("norm") != std::string::npos || name.find("neck.1") != std::string::npos ||
                      name.find("neck.3") != std::string::npos || name.find("upscaling.1") != std::string::npos ||
                      name.find("downscaling.1") != std::string::npos || name.find("downscaling.4") != std::string::npos;
    float mean = 0.0f, std = 0.0f;
    if (norm && ends_with(name, ".weight")) {
      mean = 1.0f, std = 0.1f;  // LayerNorm scale near one
    } else if (ends_with(name, ".bias")) {
      std = 0.02f;
    } else if (name.find("rel_pos") != std::string::npos || ends_with(name, "pos_embed")) {
      std = 0.02f;
    } else if (name.find("gaussian_matrix") != std::string::npos || ends_with(name, "embed.weight") ||
               name.find("point_embeddings") != std::string::npos || name.find("_token") != std::string::npos) {
      std = 1.0f;  // as torch initialises embeddings and SAM's random Fourier matrix
    } else {
      std = 1.0f / std::sqrt(static_cast<float>(fan_in));  // keeps activations at unit scale
    }
    for (int64_t i = 0; i < n; ++i) p[i] = mean + std * rng.normal();
    map.insert(name, std::move(t));
  }
  return map;
}

}  // namespace segany
