// The exponentials of attention's softmax, vectorised: the one part of the CPU encoder that is
// neither a matrix product nor memory-bound.
#pragma once

#include <cstdint>

namespace segany::cpu {

// row[j] = exp(row[j] - max(row)); returns 1 / sum_j row[j]. The caller scales P V by it.
float exp_row(float* row, int64_t cols);

}  // namespace segany::cpu
