#include "backend/backend.h"

namespace segany {

void Backend::add_layer_norm(const Tensor& x, const Tensor& r, const Tensor& gamma, const Tensor& beta, float eps,
                             Tensor& y, const Tensor* pe, Tensor* y_pe) {
  check(pe == nullptr || y_pe != nullptr, "add_layer_norm: a positional encoding needs an output for y + pe");
  add(x, r, y);
  layer_norm(y, gamma, beta, eps, y);
  if (pe) add(y, *pe, *y_pe);
}

std::unique_ptr<Backend> make_backend(const std::string& device, int threads, const std::string& dtype) {
  check(dtype == "bf16" || dtype == "fp8", "unknown dtype '" + dtype + "' (expected bf16 or fp8)");
  if (device == "cpu") {
    check(dtype == "bf16", "dtype '" + dtype + "' is for device cuda (the cpu computes in float32)");
    return make_cpu_backend(threads);
  }
  if (device == "cuda") return make_cuda_backend(0, dtype == "fp8" ? EncoderPrecision::FP8 : EncoderPrecision::BF16);
  throw Error("unknown device '" + device + "' (expected cpu or cuda)");
}

}  // namespace segany
