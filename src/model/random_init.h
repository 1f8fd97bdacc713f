// A full-size SAM with random weights, for benchmarks and tests where real weights are missing.
// Its masks are meaningless. Its weights follow the distribution of the reference models in
// ../shared/golden (PyTorch's default initialisation), so it exercises every path as they do.
#pragma once

#include <cstdint>

#include "io/tensor_map.h"
#include "model/config.h"

namespace segany {

// Deterministic for a given (config, seed) on every platform.
io::TensorMap random_sam_weights(const SamConfig& cfg, uint64_t seed = 0);

}  // namespace segany
