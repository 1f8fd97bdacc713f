#include "backend/backend.h"

namespace segany {

std::unique_ptr<Backend> make_backend(const std::string& device, int threads) {
  if (device == "cpu") return make_cpu_backend(threads);
  if (device == "cuda") return make_cuda_backend(0);
  throw Error("unknown device '" + device + "' (expected cpu or cuda)");
}

}  // namespace segany
