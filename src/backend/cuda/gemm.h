// Matrix products for the CUDA backend: one cuBLASLt engine per backend (handle, 32 MiB workspace,
// a cache of plans), and the linear layers built on it.
//
// Every product here is written in row-major terms, as the model sees it:
//   D[b] = act(A[b] B[b]^T + bias) + C[b],   A [M, K] activations, B [N, K] weights ([out, in]
//   exactly as checkpoints store them), C, D [M, N].
// cuBLASLt is column-major, and a row-major [N, K] matrix is a column-major [K, N] one, so the
// engine asks for D^T[N, M] = op(B) op(A) with B transposed and A not: no runtime transpose, and
// the bias (one value per output feature) runs along D^T's rows, as cuBLASLt's epilogue wants.
//
// A linear layer's weights live in a CudaLinear chosen by prepare_linear from the backend's
// LinearFormat (and FP16 for the mask decoder and prompt encoder). BF16 and FP16 exist yet; FP8
// (e4m3 weights with per-output-channel scales, cuBLASLt's scale pointers) and 2:4 sparse
// (cuSPARSELt compressed weights) are further subclasses with their own run(); the model never
// sees the difference.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <tuple>

#include "backend/backend.h"

namespace segany::cuda {

// How linear weights are stored and multiplied on the GPU.
enum class LinearFormat {
  BF16,      // bf16 weights, bf16 activations, fp32 accumulation (implemented)
  FP16,      // fp16 weights, fp16 activations, fp32 accumulation (implemented; the prompt path's)
  FP8_E4M3,  // e4m3 weights with per-output-channel scales (planned)
  Sparse24,  // 2:4 structured-sparse bf16 weights through cuSPARSELt (planned)
};
const char* linear_format_name(LinearFormat f);

// One (batched) product D = act(A B^T + bias) + beta * C in the row-major terms above.
struct GemmArgs {
  int64_t M = 0, N = 0, K = 0;
  int64_t batch = 1;
  const void* a = nullptr;  // [batch, M, K], rows contiguous
  DType a_type = DType::BF16;
  int64_t stride_a = 0;     // elements between batches
  const void* b = nullptr;  // [batch, N, K]
  DType b_type = DType::BF16;
  int64_t stride_b = 0;
  void* d = nullptr;        // [batch, M, N]
  DType d_type = DType::BF16;
  int64_t stride_d = 0;
  const void* c = nullptr;  // the residual added with beta = 1: D's type and layout, may equal d
  const void* bias = nullptr;  // [N] in D's type (cuBLASLt's bias type follows D for bf16 and fp32)
  Activation act = Activation::None;  // GELU is cuBLASLt's tanh approximation (see gemm.cu)
};

// The cuBLASLt handle, workspace and plan cache of one backend; all products go to its stream.
// A plan (descriptors, layouts and an algorithm) is made on the first product of a shape; later
// products of that shape only set pointers and launch, which graph capture records.
//
// Tuning: the heuristic's first choice is up to 15% slower than its best candidate at the
// encoder's shapes (H100: the attention projection with an fp32 residual, the MLP's GELU layer),
// so a plan made outside stream capture times the heuristic's candidates on the call's own
// operands and keeps the fastest. A product that does not accumulate into its output in place is
// idempotent, so its candidates run on the real buffers and the call's result is unchanged; an
// in-place residual (C == D) is timed into a scratch buffer of at most kTuneScratchBytes (the
// first rows of the product when it is larger), allocated for the tuning only and reported
// through `memory` so that peak-memory figures include it.
class GemmEngine {
 public:
  static constexpr size_t kTuneScratchBytes = size_t(32) << 20;
  // Called with +bytes / -bytes around the tuning scratch's allocation (may be empty).
  using MemoryHook = std::function<void(std::ptrdiff_t)>;
  GemmEngine(cudaStream_t stream, size_t workspace_bytes, bool tune = true, MemoryHook memory = {});
  ~GemmEngine();
  GemmEngine(const GemmEngine&) = delete;
  GemmEngine& operator=(const GemmEngine&) = delete;

  void run(const GemmArgs& args);
  cudaStream_t stream() const { return stream_; }
  size_t plan_count() const { return plans_.size(); }

 private:
  struct Plan;
  // Everything a plan depends on: sizes, strides, types, epilogue, and the pointers' alignment
  // (the heuristic picks kernels that assume it).
  using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int, int, int, int, bool, bool,
                         int, int, int, int>;
  Plan& plan(const Key& key, const GemmArgs& args);
  void tune(Plan& p, const GemmArgs& args);
  // One product with `algo` and the given layouts of the activation, C and D (the plan's own, or
  // tune()'s for fewer rows); the status is returned, not thrown, so that tuning can skip a candidate.
  cublasStatus_t launch(const Plan& p, const cublasLtMatmulAlgo_t& algo, const GemmArgs& args,
                        cublasLtMatrixLayout_t layout_x, cublasLtMatrixLayout_t layout_c,
                        cublasLtMatrixLayout_t layout_d) const;

  cudaStream_t stream_;
  bool tune_ = true;
  MemoryHook memory_;
  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  std::map<Key, std::unique_ptr<Plan>> plans_;
};

// A linear layer prepared for the CUDA backend.
class CudaLinear : public LinearWeights {
 public:
  virtual LinearFormat format() const = 0;
  // y[.., N] = act(x[.., K] W^T + b) (+ residual), on the engine's stream; no allocation, no sync.
  // x has the weights' dtype; y and the residual that dtype or fp32 (the same); the residual may be y.
  virtual void run(GemmEngine& gemm, const Tensor& x, Tensor& y, Activation act, const Tensor* residual) const = 0;
};

// Dense weights [out, in] on the device, in bf16 (format BF16, bf16 inputs) or fp16 (format FP16,
// fp16 inputs); the bias kept in the weights' dtype and in fp32 (the epilogue's bias has the
// output's dtype).
class DenseLinear final : public CudaLinear {
 public:
  DenseLinear(Tensor weight, Tensor bias, Tensor bias_f32);
  LinearFormat format() const override {
    return weight_.dtype() == DType::F16 ? LinearFormat::FP16 : LinearFormat::BF16;
  }
  void run(GemmEngine& gemm, const Tensor& x, Tensor& y, Activation act, const Tensor* residual) const override;

 private:
  Tensor weight_;    // [out, in] bf16 or fp16
  Tensor bias_;      // [out] in the weight's dtype, or undefined
  Tensor bias_f32_;  // [out] or undefined
};

}  // namespace segany::cuda
