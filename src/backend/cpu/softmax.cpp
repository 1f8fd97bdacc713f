// Compiled with -ffast-math (see src/CMakeLists.txt) so that GCC calls glibc's vector expf
// (libmvec) and vectorises the max and the sum; one clone per instruction set, picked at load
// time. The inputs are finite logits, so fast-math's finite-math assumption holds; libmvec's
// expf is accurate to a few ulp.
#include "backend/cpu/softmax.h"

#include <cmath>

namespace segany::cpu {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
float exp_row(float* row, int64_t cols) {
  float mx = row[0];
  for (int64_t j = 1; j < cols; ++j) mx = row[j] > mx ? row[j] : mx;
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < cols; ++j) {
    row[j] = std::exp(row[j] - mx);
    sum += row[j];
  }
  return 1.0f / sum;
}

}  // namespace segany::cpu
