// Built when segany is configured without CUDA: the CUDA backend reports that it is missing.
#include "backend/backend.h"

namespace segany {

bool cuda_available() { return false; }

std::unique_ptr<Backend> make_cuda_backend(int, EncoderPrecision) {
  throw Error("this segany was built without CUDA (configure with -DSEGANY_CUDA=ON on a machine with the CUDA toolkit)");
}

}  // namespace segany
