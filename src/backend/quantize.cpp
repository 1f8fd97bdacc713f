#include "backend/quantize.h"

#include <cmath>
#include <string>

#include "segany/error.h"
#include "segany/tensor.h"

namespace segany {

void quantize_rows_e4m3(const float* x, int64_t rows, int64_t K, uint8_t* q, float* scale) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * K;
    float amax = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
      if (!std::isfinite(xr[k]))
        throw Error("fp8 quantization: row " + std::to_string(r) + " holds a non-finite value at column " +
                    std::to_string(k));
      amax = std::fmax(amax, std::fabs(xr[k]));
    }
    const float inv = e4m3_row_inverse(amax);
    for (int64_t k = 0; k < K; ++k) q[r * K + k] = f32_to_e4m3(xr[k] * inv);
    scale[r] = e4m3_row_scale(amax);
  }
}

}  // namespace segany
