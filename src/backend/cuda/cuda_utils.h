// Error checking and small RAII helpers shared by the CUDA backend's files. Every CUDA and
// cuBLAS(Lt) call goes through CUDA_CHECK / CUBLAS_CHECK, which throw segany::Error naming the
// call, where it was made and what the library said.
#pragma once

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <type_traits>
#include <string>

#include "segany/error.h"
#include "segany/tensor.h"

namespace segany::cuda {

[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* call, const char* file, int line) {
  throw Error(std::string("CUDA error: ") + call + " failed at " + file + ":" + std::to_string(line) + ": " +
              cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
}

[[noreturn]] inline void throw_cublas_error(cublasStatus_t st, const char* call, const char* file, int line) {
  throw Error(std::string("cuBLAS error: ") + call + " failed at " + file + ":" + std::to_string(line) + ": " +
              cublasLtGetStatusName(st) + " (" + cublasLtGetStatusString(st) + ")");
}

#define CUDA_CHECK(call)                                                                      \
  do {                                                                                        \
    const cudaError_t segany_err_ = (call);                                                   \
    if (segany_err_ != cudaSuccess) ::segany::cuda::throw_cuda_error(segany_err_, #call, __FILE__, __LINE__); \
  } while (0)

#define CUBLAS_CHECK(call)                                                                    \
  do {                                                                                        \
    const cublasStatus_t segany_st_ = (call);                                                 \
    if (segany_st_ != CUBLAS_STATUS_SUCCESS)                                                  \
      ::segany::cuda::throw_cublas_error(segany_st_, #call, __FILE__, __LINE__);              \
  } while (0)

// After every kernel launch: a bad configuration or an earlier asynchronous fault shows here,
// at the launch that saw it. cudaGetLastError costs a few hundred nanoseconds, so it is always on.
#define CUDA_CHECK_LAUNCH(what)                                                               \
  do {                                                                                        \
    const cudaError_t segany_err_ = cudaGetLastError();                                       \
    if (segany_err_ != cudaSuccess) ::segany::cuda::throw_cuda_error(segany_err_, what, __FILE__, __LINE__); \
  } while (0)

// cuBLASLt / kernel element types for the activation dtypes the backend handles.
inline bool is_float_dtype(DType t) { return t == DType::F32 || t == DType::BF16 || t == DType::F16; }

inline cudaDataType_t cuda_dtype(DType t) {
  switch (t) {
    case DType::F32: return CUDA_R_32F;
    case DType::BF16: return CUDA_R_16BF;
    case DType::F16: return CUDA_R_16F;
    case DType::F8E4M3: return CUDA_R_8F_E4M3;
    default: throw Error(std::string("cuda backend: no CUDA data type for ") + dtype_name(t));
  }
}

// Throws unless `t` is a GPU tensor of `dtype`: "cuda <op>: <what> must be a <dtype> GPU tensor".
inline void require_gpu(const Tensor& t, DType dtype, const char* op, const char* what) {
  check(t.defined() && t.device() == Device::CUDA && t.dtype() == dtype,
        std::string("cuda ") + op + ": " + what + " must be a " + dtype_name(dtype) + " GPU tensor" +
            (t.defined() ? std::string(", found ") + dtype_name(t.dtype()) + " " + shape_str(t.shape()) : ""));
}

// The largest power of two (<= 256) that divides a pointer's address: cuBLASLt picks kernels by it.
inline int pointer_alignment(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  int align = 256;
  while (align > 1 && (a % align) != 0) align /= 2;
  return align;
}

// An owned CUDA event (destroyed with the owner), created with cudaEventCreateWithFlags.
struct EventDeleter {
  void operator()(cudaEvent_t e) const { cudaEventDestroy(e); }
};
using UniqueEvent = std::unique_ptr<std::remove_pointer_t<cudaEvent_t>, EventDeleter>;
inline UniqueEvent make_event(unsigned flags) {
  cudaEvent_t e = nullptr;
  CUDA_CHECK(cudaEventCreateWithFlags(&e, flags));
  return UniqueEvent(e);
}

}  // namespace segany::cuda
