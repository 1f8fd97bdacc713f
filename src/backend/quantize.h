// fp8 (e4m3) quantization with a scale per row, shared by the CUDA backend's fp8 linear layers
// (weights at load, and the CPU twin of the activations' kernel in kernels.h).
//
// Row r of x [rows, K] becomes q[r, k] = e4m3(x[r, k] * (448 / amax_r)) and scale[r] = amax_r / 448,
// amax_r = max_k |x[r, k]|, so that x[r, k] ~ e4m3_to_f32(q[r, k]) * scale[r] and the largest value
// of the row lands on e4m3's largest, 448. A row of zeros gets scale 1 (and zeros). Both factors are
// computed in fp32 exactly as written here, on the host and in the kernel, so that the two agree
// bit for bit.
#pragma once

#include <cstdint>

namespace segany {

#if defined(__CUDACC__)
#define SEGANY_HOST_DEVICE __host__ __device__
#else
#define SEGANY_HOST_DEVICE
#endif

SEGANY_HOST_DEVICE inline float e4m3_row_inverse(float amax) { return amax > 0.0f ? 448.0f / amax : 1.0f; }
SEGANY_HOST_DEVICE inline float e4m3_row_scale(float amax) { return amax > 0.0f ? amax / 448.0f : 1.0f; }

// x [rows, K] fp32 -> q [rows, K] e4m3 bytes, scale [rows]. Non-finite inputs throw.
void quantize_rows_e4m3(const float* x, int64_t rows, int64_t K, uint8_t* q, float* scale);

}  // namespace segany
