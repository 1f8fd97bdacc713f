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
// LinearFormat (and FP16 for the mask decoder and prompt encoder): DenseLinear (BF16, FP16) and
// Fp8Linear (FP8_E4M3: e4m3 weights with a scale per output channel, activations quantized per
// row on the fly, cuBLASLt's outer-vector scales). 2:4 sparse (cuSPARSELt compressed weights)
// would be one more subclass with its own run(); the model never sees the difference.
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
  FP8_E4M3,  // e4m3 weights with per-output-channel scales, e4m3 activations with per-row scales (implemented)
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
  const void* bias = nullptr;  // [N] in D's type (cuBLASLt's bias type follows D for bf16 and fp32);
                               // bf16 whatever D is when A and B are e4m3
  Activation act = Activation::None;  // GELU is cuBLASLt's tanh approximation (see gemm.cu)
  // e4m3 A and B only (and then both required): D = (a_scale[m] b_scale[n] sum_k A[m,k] B[n,k]) + ...
  // (cuBLASLt's outer-vector scaling, Hopper and newer); batch 1.
  const float* a_scale = nullptr;  // [M]
  const float* b_scale = nullptr;  // [N]
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
  // Whether cuBLASLt has a kernel for the product (its plan is made, and kept, to find out).
  // Products of bf16/fp16 without one still run (gemm_reference); fp8 ones throw.
  bool supports(const GemmArgs& args);
  // Device memory of at least `bytes` for the caller's temporaries (fp8 layers' quantized
  // activations), 256-byte aligned, valid until the next call. It grows outside stream capture
  // only (a graph keeps the address it recorded): growing during a capture throws.
  void* scratch(size_t bytes);
  cudaStream_t stream() const { return stream_; }
  size_t plan_count() const { return plans_.size(); }

 private:
  struct Plan;
  // Everything a plan depends on: sizes, strides, types, epilogue, and the pointers' alignment
  // (the heuristic picks kernels that assume it).
  using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int, int, int, int, bool, bool,
                         int, int, int, int>;
  static Key key_of(const GemmArgs& args);
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
  void* scratch_ = nullptr;
  size_t scratch_bytes_ = 0;
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

// e4m3 weights [out, in] with a float32 scale per output channel (quantized once at load from the
// checkpoint's values, backend/quantize.h); a bf16 bias (the fp8 epilogue's bias type) and an fp32
// one. run() quantizes the bf16 input per row into the engine's scratch (kernels.h), then one
// product with both scale vectors, the bias, GELU and the residual fused by cuBLASLt where it has
// a kernel for that; where it has none, the plain scaled product and separate passes for the rest.
class Fp8Linear final : public CudaLinear {
 public:
  Fp8Linear(Tensor weight, Tensor scale, Tensor bias, Tensor bias_f32);
  LinearFormat format() const override { return LinearFormat::FP8_E4M3; }
  void run(GemmEngine& gemm, const Tensor& x, Tensor& y, Activation act, const Tensor* residual) const override;

  // The input's M rows already in e4m3 with a scale each (quantize_rows_e4m3's layout), in the
  // engine's scratch as input_buffer() hands it out: run() in two steps, for producers that write
  // the quantized rows themselves (the fp8 LayerNorm, kernels.h). `spare_bytes` more are set
  // aside for run_quantized's temporary where the residual is the output itself.
  struct Input {
    uint8_t* q;    // [M, in_features]
    float* scale;  // [M]
    void* spare;   // spare_bytes, or null
  };
  Input input_buffer(GemmEngine& gemm, int64_t M, size_t spare_bytes = 0) const;
  void run_quantized(GemmEngine& gemm, const Input& in, int64_t M, Tensor& y, Activation act,
                     const Tensor* residual) const;

 private:
  Tensor weight_;    // [out, in] e4m3
  Tensor scale_;     // [out] float32
  Tensor bias_;      // [out] bf16, or undefined
  Tensor bias_f32_;  // [out] float32, or undefined
};

}  // namespace segany::cuda
