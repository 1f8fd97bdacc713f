// cuBLASLt products and the bf16 linear layer (see gemm.h for the row-/column-major mapping).
//
// Epilogues: bias, ReLU + bias, GELU + bias, fused by cuBLASLt into the product. Its GELU is the
// tanh approximation 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3))), while SAM (and the CPU twin) use
// the exact erf form; the two differ by at most ~5e-4 in absolute value (near |x| ~ 2), under a
// tenth of bf16's rounding step at those magnitudes, so the fused epilogue is kept. The residual
// is cuBLASLt's C operand with beta = 1 (C may be D: the in-place residual of the transformer).
#include <algorithm>
#include <array>
#include <string>

#include "backend/cuda/cuda_utils.h"
#include "backend/cuda/gemm.h"
#include "backend/cuda/kernels.h"

namespace segany::cuda {

const char* linear_format_name(LinearFormat f) {
  switch (f) {
    case LinearFormat::BF16: return "bf16";
    case LinearFormat::FP16: return "fp16";
    case LinearFormat::FP8_E4M3: return "fp8_e4m3";
    case LinearFormat::Sparse24: return "sparse24";
  }
  return "?";
}

// Descriptors and the chosen algorithm of one shape, destroyed with the engine.
struct GemmEngine::Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo{};                   // the one products launch
  // The heuristic's candidates, best guess first (a fixed array: nvcc's front end fails on
  // std::vector of cuBLASLt's unnamed algorithm struct).
  static constexpr int kMaxCandidates = 8;
  std::array<cublasLtMatmulAlgo_t, kMaxCandidates> candidates{};
  int candidate_count = 0;
  bool untuned = true;                           // tune() has not looked at this plan yet
  cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  bool fallback = false;  // cuBLASLt has no algorithm: gemm_reference (kernels.h) runs it
  Plan() = default;
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;
  ~Plan() {
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (c) cublasLtMatrixLayoutDestroy(c);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (desc) cublasLtMatmulDescDestroy(desc);
  }
};

GemmEngine::GemmEngine(cudaStream_t stream, size_t workspace_bytes, bool tune, MemoryHook memory)
    : stream_(stream), tune_(tune), memory_(std::move(memory)), workspace_bytes_(workspace_bytes) {
  CUBLAS_CHECK(cublasLtCreate(&handle_));
  if (workspace_bytes_ > 0) {
    const cudaError_t err = cudaMalloc(&workspace_, workspace_bytes_);
    if (err != cudaSuccess) {
      cublasLtDestroy(handle_);
      throw_cuda_error(err, "cudaMalloc(gemm workspace)", __FILE__, __LINE__);
    }
  }
}

GemmEngine::~GemmEngine() {
  plans_.clear();
  if (scratch_) {
    cudaStreamSynchronize(stream_);
    cudaFree(scratch_);
    if (memory_) memory_(-static_cast<std::ptrdiff_t>(scratch_bytes_));
  }
  if (workspace_) cudaFree(workspace_);
  if (handle_) cublasLtDestroy(handle_);
}

namespace {

cublasLtEpilogue_t epilogue_for(Activation act, bool bias) {
  switch (act) {
    case Activation::None: return bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
    case Activation::ReLU: return bias ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_RELU;
    case Activation::GELU: return bias ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_GELU;
  }
  return CUBLASLT_EPILOGUE_DEFAULT;
}

std::string describe(const GemmArgs& g) {
  return "M=" + std::to_string(g.M) + " N=" + std::to_string(g.N) + " K=" + std::to_string(g.K) +
         " batch=" + std::to_string(g.batch) + " A " + dtype_name(g.a_type) + " B " + dtype_name(g.b_type) + " D " +
         dtype_name(g.d_type) + (g.bias ? " +bias" : "") + (g.c ? " +residual" : "") +
         (g.act == Activation::GELU ? " gelu" : g.act == Activation::ReLU ? " relu" : "");
}

// Owners for tune()'s temporaries.
struct LayoutOwner {
  cublasLtMatrixLayout_t layout = nullptr;
  LayoutOwner() = default;
  LayoutOwner(const LayoutOwner&) = delete;
  LayoutOwner& operator=(const LayoutOwner&) = delete;
  ~LayoutOwner() {
    if (layout) cublasLtMatrixLayoutDestroy(layout);
  }
};
struct TuneScratch {
  const GemmEngine::MemoryHook& memory;
  cudaStream_t stream;
  void* data = nullptr;
  size_t bytes = 0;
  TuneScratch(const GemmEngine::MemoryHook& m, cudaStream_t s) : memory(m), stream(s) {}
  TuneScratch(const TuneScratch&) = delete;
  TuneScratch& operator=(const TuneScratch&) = delete;
  // Zeroed device memory, or false (and nothing held) when there is none.
  bool allocate(size_t n) {
    if (cudaMalloc(&data, n) != cudaSuccess) {
      cudaGetLastError();
      data = nullptr;
      return false;
    }
    bytes = n;
    if (memory) memory(static_cast<std::ptrdiff_t>(n));
    CUDA_CHECK(cudaMemsetAsync(data, 0, n, stream));
    return true;
  }
  ~TuneScratch() {
    if (!data) return;
    cudaStreamSynchronize(stream);  // the timed products may still be writing it
    cudaFree(data);
    if (memory) memory(-static_cast<std::ptrdiff_t>(bytes));
  }
};

void set_layout_batch(cublasLtMatrixLayout_t l, int64_t batch, int64_t stride) {
  if (batch <= 1) return;
  const int32_t count = static_cast<int32_t>(batch);
  CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &count, sizeof(count)));
  CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof(stride)));
}

}  // namespace

GemmEngine::Plan& GemmEngine::plan(const Key& key, const GemmArgs& g) {
  auto it = plans_.find(key);
  if (it != plans_.end()) return *it->second;

  auto p = std::make_unique<Plan>();
  const cudaDataType_t ta = cuda_dtype(g.a_type), tb = cuda_dtype(g.b_type), td = cuda_dtype(g.d_type);
  // bf16 or fp16 operands, fp32 accumulation and scale.
  const cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
  CUBLAS_CHECK(cublasLtMatmulDescCreate(&p->desc, compute, CUDA_R_32F));
  // cuBLASLt's A is our weight B [N, K] row-major = [K, N] column-major, transposed; its B is our
  // activation A [M, K] row-major = [K, M] column-major, as is; its D is [N, M] column-major.
  const cublasOperation_t trans_w = CUBLAS_OP_T, trans_x = CUBLAS_OP_N;
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &trans_w, sizeof(trans_w)));
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &trans_x, sizeof(trans_x)));
  p->epilogue = epilogue_for(g.act, g.bias != nullptr);
  CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &p->epilogue, sizeof(p->epilogue)));
  const bool fp8 = g.a_type == DType::F8E4M3;
  if (fp8) {
    // Outer-vector scales: cuBLASLt's A is our weight (a scale per output channel, b_scale), its B
    // our activations (a scale per row, a_scale). The pointers are set again by every launch.
    const int32_t mode = CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &mode, sizeof(mode)));
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mode, sizeof(mode)));
    CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &g.b_scale, sizeof(g.b_scale)));
    CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &g.a_scale, sizeof(g.a_scale)));
    // The tensor cores' own accumulation, without the periodic promotion to fp32 registers: the
    // products here are short (K = 768 to 1280) and their operands carry 3 mantissa bits. Measured
    // on the encoders: 6% faster for vit_h, the embedding's error unchanged (README, Performance).
    const int8_t fast_accum = 1;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_FAST_ACCUM, &fast_accum, sizeof(fast_accum)));
  }
  if (g.bias) {
    // fp8 products take a bf16 bias whatever D is (cuBLASLt's exception for fp8 kernels).
    const int32_t bias_type = fp8 ? CUDA_R_16BF : td;
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type,
                                                sizeof(bias_type)));
    // The heuristic reads the bias pointer's alignment; run() sets the pointer of each call.
    CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias, sizeof(g.bias)));
  }
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->a, tb, g.K, g.N, g.K));
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->b, ta, g.K, g.M, g.K));
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->c, td, g.N, g.M, g.N));
  CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&p->d, td, g.N, g.M, g.N));
  set_layout_batch(p->a, g.batch, g.stride_b);
  set_layout_batch(p->b, g.batch, g.stride_a);
  set_layout_batch(p->c, g.batch, g.stride_d);
  set_layout_batch(p->d, g.batch, g.stride_d);

  cublasLtMatmulPreference_t pref = nullptr;
  CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  cublasLtMatmulHeuristicResult_t results[Plan::kMaxCandidates] = {};
  int found = 0;
  const cublasStatus_t st = [&] {
    const uint64_t ws = workspace_bytes_;
    const uint32_t align_w = static_cast<uint32_t>(pointer_alignment(g.b)),
                   align_x = static_cast<uint32_t>(pointer_alignment(g.a)),
                   align_c = static_cast<uint32_t>(pointer_alignment(g.c ? g.c : g.d)),
                   align_d = static_cast<uint32_t>(pointer_alignment(g.d));
    cublasStatus_t s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws));
    if (s == CUBLAS_STATUS_SUCCESS)
      s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_w, sizeof(align_w));
    if (s == CUBLAS_STATUS_SUCCESS)
      s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_x, sizeof(align_x));
    if (s == CUBLAS_STATUS_SUCCESS)
      s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_c, sizeof(align_c));
    if (s == CUBLAS_STATUS_SUCCESS)
      s = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_d, sizeof(align_d));
    if (s == CUBLAS_STATUS_SUCCESS)
      s = cublasLtMatmulAlgoGetHeuristic(handle_, p->desc, p->a, p->b, p->c, p->d, pref, tune_ ? Plan::kMaxCandidates : 1,
                                         results, &found);
    return s;
  }();
  cublasLtMatmulPreferenceDestroy(pref);
  if (st == CUBLAS_STATUS_SUCCESS && found > 0) {
    p->algo = results[0].algo;
    for (int i = 0; i < found; ++i)
      if (results[i].state == CUBLAS_STATUS_SUCCESS) p->candidates[p->candidate_count++] = results[i].algo;
  } else if (st == CUBLAS_STATUS_SUCCESS || st == CUBLAS_STATUS_NOT_SUPPORTED || fp8)
    p->fallback = true;  // no kernel for this shape and alignment (or fp8 combination): see run()
  else
    throw_cublas_error(st, ("cublasLtMatmulAlgoGetHeuristic for " + describe(g)).c_str(), __FILE__, __LINE__);
  return *plans_.emplace(key, std::move(p)).first->second;
}

GemmEngine::Key GemmEngine::key_of(const GemmArgs& g) {
  return Key{g.M,
                g.N,
                g.K,
                g.batch,
                g.stride_a,
                g.stride_b,
                g.stride_d,
                static_cast<int>(g.a_type),
                static_cast<int>(g.b_type),
                static_cast<int>(g.d_type),
                static_cast<int>(g.act),
                g.bias != nullptr,
                g.c != nullptr,
                pointer_alignment(g.a),
                pointer_alignment(g.b),
                pointer_alignment(g.c ? g.c : g.d),
                pointer_alignment(g.d)};
}

namespace {

void check_args(const GemmArgs& g) {
  check(g.K > 0, "gemm: K must be positive (" + describe(g) + ")");
  check(g.M <= INT32_MAX && g.N <= INT32_MAX && g.K <= INT32_MAX, "gemm: dimensions beyond 32 bits: " + describe(g));
  const bool fp8 = g.a_type == DType::F8E4M3 || g.b_type == DType::F8E4M3;
  if (fp8)
    check(g.a_type == g.b_type && g.a_scale && g.b_scale && g.batch == 1,
          "gemm: e4m3 products take e4m3 A and B, both scale vectors and no batch (" + describe(g) + ")");
  else
    check(!g.a_scale && !g.b_scale, "gemm: scale vectors are for e4m3 products only (" + describe(g) + ")");
}

}  // namespace

bool GemmEngine::supports(const GemmArgs& g) {
  if (g.M == 0 || g.N == 0 || g.batch == 0) return true;
  check_args(g);
  return !plan(key_of(g), g).fallback;
}

void* GemmEngine::scratch(size_t bytes) {
  if (bytes <= scratch_bytes_) return scratch_;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  CUDA_CHECK(cudaStreamIsCapturing(stream_, &capture));
  check(capture == cudaStreamCaptureStatusNone,
        "gemm scratch: " + std::to_string(bytes) + " bytes wanted during a graph capture, " +
            std::to_string(scratch_bytes_) + " held (the eager run before a capture sizes it)");
  if (scratch_) {
    CUDA_CHECK(cudaStreamSynchronize(stream_));  // work already queued may still read it
    CUDA_CHECK(cudaFree(scratch_));
    if (memory_) memory_(-static_cast<std::ptrdiff_t>(scratch_bytes_));
    scratch_ = nullptr, scratch_bytes_ = 0;
  }
  CUDA_CHECK(cudaMalloc(&scratch_, bytes));
  scratch_bytes_ = bytes;
  if (memory_) memory_(static_cast<std::ptrdiff_t>(bytes));
  return scratch_;
}

void GemmEngine::run(const GemmArgs& g) {
  if (g.M == 0 || g.N == 0 || g.batch == 0) return;
  check_args(g);
  Plan& p = plan(key_of(g), g);
  if (p.fallback) {
    check(g.a_type != DType::F8E4M3, "gemm: cuBLASLt has no e4m3 kernel for " + describe(g) +
                                         " on this device (fp8 needs compute capability 8.9 or newer)");
    gemm_reference(g, stream_);
    return;
  }
  if (p.untuned) tune(p, g);
  CUBLAS_CHECK(launch(p, p.algo, g, p.b, p.c, p.d));
}

cublasStatus_t GemmEngine::launch(const Plan& p, const cublasLtMatmulAlgo_t& algo, const GemmArgs& g,
                                  cublasLtMatrixLayout_t layout_x, cublasLtMatrixLayout_t layout_c,
                                  cublasLtMatrixLayout_t layout_d) const {
  if (g.bias) {
    const cublasStatus_t s =
        cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias, sizeof(g.bias));
    if (s != CUBLAS_STATUS_SUCCESS) return s;
  }
  if (g.a_scale) {
    cublasStatus_t s =
        cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &g.b_scale, sizeof(g.b_scale));
    if (s == CUBLAS_STATUS_SUCCESS)
      s = cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &g.a_scale, sizeof(g.a_scale));
    if (s != CUBLAS_STATUS_SUCCESS) return s;
  }
  const float alpha = 1.0f, beta = g.c ? 1.0f : 0.0f;
  return cublasLtMatmul(handle_, p.desc, &alpha, g.b, p.a, g.a, layout_x, &beta, g.c ? g.c : g.d, layout_c, g.d,
                        layout_d, &algo, workspace_, workspace_bytes_, stream_);
}

void GemmEngine::tune(Plan& p, const GemmArgs& g) {
  p.untuned = false;
  if (!tune_ || p.candidate_count < 2) return;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  CUDA_CHECK(cudaStreamIsCapturing(stream_, &capture));
  if (capture != cudaStreamCaptureStatusNone) return;  // no timing inside a capture: the first guess stays

  // An in-place residual runs into scratch, on as many leading rows as kTuneScratchBytes holds.
  GemmArgs t = g;
  const bool in_place = g.c != nullptr && g.c == g.d;
  cublasLtMatrixLayout_t layout_x = p.b, layout_c = p.c, layout_d = p.d;
  LayoutOwner own_x, own_cd;
  TuneScratch scratch(memory_, stream_);
  if (in_place) {
    if (g.batch > 1) return;  // no batched product accumulates in place; not worth the layouts
    const size_t row_bytes = static_cast<size_t>(g.N) * dtype_size(g.d_type);
    int64_t rows = std::min<int64_t>(g.M, static_cast<int64_t>(kTuneScratchBytes / row_bytes));
    if (rows < g.M) rows = rows / 128 * 128;  // whole tiles, as the full product has
    if (rows <= 0) return;
    if (!scratch.allocate(static_cast<size_t>(rows) * row_bytes)) return;  // no room: the first guess stays
    t.c = t.d = scratch.data;
    if (rows < g.M) {
      t.M = rows;
      CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&own_x.layout, cuda_dtype(g.a_type), g.K, rows, g.K));
      CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&own_cd.layout, cuda_dtype(g.d_type), g.N, rows, g.N));
      layout_x = own_x.layout;
      layout_c = layout_d = own_cd.layout;
    }
  }

  UniqueEvent start = make_event(0), stop = make_event(0);
  float best_ms = 0.0f;
  const cublasLtMatmulAlgo_t* best = nullptr;
  for (int i = 0; i < p.candidate_count; ++i) {
    const cublasLtMatmulAlgo_t& algo = p.candidates[i];
    if (t.M != g.M) {  // the candidate was proposed for the full product
      cublasLtMatmulHeuristicResult_t check_result{};
      if (cublasLtMatmulAlgoCheck(handle_, p.desc, p.a, layout_x, layout_c, layout_d, &algo, &check_result) !=
          CUBLAS_STATUS_SUCCESS)
        continue;
    }
    if (launch(p, algo, t, layout_x, layout_c, layout_d) != CUBLAS_STATUS_SUCCESS) continue;  // warm-up
    constexpr int kRuns = 3;
    CUDA_CHECK(cudaEventRecord(start.get(), stream_));
    for (int r = 0; r < kRuns; ++r) CUBLAS_CHECK(launch(p, algo, t, layout_x, layout_c, layout_d));
    CUDA_CHECK(cudaEventRecord(stop.get(), stream_));
    CUDA_CHECK(cudaEventSynchronize(stop.get()));
    float ms = 0.0f;
    CUDA_CHECK(cudaEventElapsedTime(&ms, start.get(), stop.get()));
    if (!best || ms < best_ms) best = &algo, best_ms = ms;
  }
  if (best) p.algo = *best;
}

// ---- linear layers ------------------------------------------------------------------------------

namespace {

// The output and residual of a layer of `K` inputs and `N` outputs: shapes, dtypes, and no
// activated output accumulating in place. Returns M, the rows of x.
int64_t check_linear_io(const char* format, int64_t K, int64_t N, const Tensor& x, const Tensor& y, Activation act,
                        const Tensor* residual) {
  const int64_t M = x.dim(-1) == 0 ? 0 : x.numel() / x.dim(-1);
  check(x.dim(-1) == K && y.dim(-1) == N && y.numel() == M * N,
        std::string("cuda linear (") + format + "): input " + shape_str(x.shape()) + ", output " + shape_str(y.shape()) +
            " for weight [" + std::to_string(N) + ", " + std::to_string(K) + "]");
  check(!(residual && act != Activation::None && residual->data() == y.data()),
        "cuda linear: an activated output cannot accumulate into its residual in place");
  if (residual)
    check(residual->device() == Device::CUDA && residual->dtype() == y.dtype() && residual->numel() == y.numel(),
          "cuda linear: residual " + shape_str(residual->shape()) + " " + dtype_name(residual->dtype()) +
              " does not match the output " + shape_str(y.shape()) + " " + dtype_name(y.dtype()));
  return M;
}

}  // namespace

DenseLinear::DenseLinear(Tensor weight, Tensor bias, Tensor bias_f32)
    : weight_(std::move(weight)), bias_(std::move(bias)), bias_f32_(std::move(bias_f32)) {
  out_features = weight_.dim(0);
  in_features = weight_.dim(1);
  has_bias = bias_f32_.defined();
}

void DenseLinear::run(GemmEngine& gemm, const Tensor& x, Tensor& y, Activation act, const Tensor* residual) const {
  const int64_t K = in_features, N = out_features;
  const DType wt = weight_.dtype();
  check(x.device() == Device::CUDA && x.dtype() == wt,
        std::string("cuda linear (") + linear_format_name(format()) + "): input must be " + dtype_name(wt) +
            " on the GPU, found " + dtype_name(x.dtype()) + (x.device() == Device::CUDA ? "" : " on the host"));
  check(y.device() == Device::CUDA && (y.dtype() == DType::F32 || y.dtype() == wt),
        std::string("cuda linear: output must be ") + dtype_name(wt) + " or float32 on the GPU, found " +
            dtype_name(y.dtype()));
  const int64_t M = check_linear_io(linear_format_name(format()), K, N, x, y, act, residual);

  GemmArgs g;
  g.M = M, g.N = N, g.K = K;
  g.a = x.data(), g.a_type = wt;
  g.b = weight_.data(), g.b_type = wt;
  g.d = y.data(), g.d_type = y.dtype();
  g.bias = has_bias ? (y.dtype() == DType::F32 ? bias_f32_.data() : bias_.data()) : nullptr;
  g.act = act;
  // act(xW + b) + r: cuBLASLt would add C before the activation, so an activated layer with a
  // residual (the model has none) takes a second pass.
  if (residual && act == Activation::None) g.c = residual->data();
  gemm.run(g);
  if (residual && act != Activation::None) cuda::add(y, *residual, y, gemm.stream());
}

Fp8Linear::Fp8Linear(Tensor weight, Tensor scale, Tensor bias, Tensor bias_f32)
    : weight_(std::move(weight)), scale_(std::move(scale)), bias_(std::move(bias)), bias_f32_(std::move(bias_f32)) {
  out_features = weight_.dim(0);
  in_features = weight_.dim(1);
  has_bias = bias_f32_.defined();
}

namespace {
size_t round_up256(size_t n) { return (n + 255) / 256 * 256; }
}  // namespace

// Scratch layout: the quantized rows, their scales, the spare bytes.
Fp8Linear::Input Fp8Linear::input_buffer(GemmEngine& gemm, int64_t M, size_t spare_bytes) const {
  const size_t q_bytes = round_up256(static_cast<size_t>(M * in_features));
  const size_t s_bytes = round_up256(static_cast<size_t>(M) * 4);
  char* base = static_cast<char*>(gemm.scratch(q_bytes + s_bytes + spare_bytes));
  return {reinterpret_cast<uint8_t*>(base), reinterpret_cast<float*>(base + q_bytes),
          spare_bytes > 0 ? base + q_bytes + s_bytes : nullptr};
}

void Fp8Linear::run(GemmEngine& gemm, const Tensor& x, Tensor& y, Activation act, const Tensor* residual) const {
  check(x.device() == Device::CUDA && (x.dtype() == DType::BF16 || x.dtype() == DType::F32),
        std::string("cuda linear (fp8_e4m3): input must be bf16 or float32 on the GPU, found ") + dtype_name(x.dtype()) +
            (x.device() == Device::CUDA ? "" : " on the host"));
  const int64_t M = check_linear_io("fp8_e4m3", in_features, out_features, x, y, act, residual);
  if (M == 0) return;
  const bool residual_in_y = residual && residual->data() == y.data();
  const Input in = input_buffer(gemm, M, residual_in_y ? y.nbytes() : 0);
  quantize_rows_e4m3(x, in.q, in.scale, gemm.stream());
  run_quantized(gemm, in, M, y, act, residual);
}

void Fp8Linear::run_quantized(GemmEngine& gemm, const Input& in, int64_t M, Tensor& y, Activation act,
                              const Tensor* residual) const {
  const int64_t K = in_features, N = out_features;
  check(y.device() == Device::CUDA && (y.dtype() == DType::F32 || y.dtype() == DType::BF16),
        std::string("cuda linear (fp8_e4m3): output must be bf16 or float32 on the GPU, found ") + dtype_name(y.dtype()));
  check(y.numel() == M * N && y.dim(-1) == N, "cuda linear (fp8_e4m3): output " + shape_str(y.shape()) + " for " +
                                                  std::to_string(M) + " rows of weight [" + std::to_string(N) + ", " +
                                                  std::to_string(K) + "]");
  const bool residual_in_y = residual && residual->data() == y.data();
  GemmArgs g;
  g.M = M, g.N = N, g.K = K;
  g.a_type = g.b_type = DType::F8E4M3;
  g.a = in.q, g.a_scale = in.scale;
  g.b = weight_.data(), g.b_scale = scale_.data_as<const float>();
  g.d = y.data(), g.d_type = y.dtype();
  g.bias = has_bias ? bias_.data() : nullptr;
  g.act = act;
  if (residual && act == Activation::None) g.c = residual->data();
  if (gemm.supports(g)) {
    gemm.run(g);
    if (residual && act != Activation::None) cuda::add(y, *residual, y, gemm.stream());
    return;
  }
  // No fused kernel: the scaled product alone, then bias, activation and residual as passes (an
  // in-place residual: the product goes to the input's spare bytes first).
  Tensor d = y;
  if (residual_in_y) {
    check(in.spare != nullptr, "cuda linear (fp8_e4m3): an in-place residual needs the input's spare bytes");
    d = Tensor::wrap(in.spare, y.shape(), y.dtype(), nullptr, Device::CUDA);
  }
  GemmArgs plain = g;
  plain.bias = nullptr, plain.act = Activation::None, plain.c = nullptr, plain.d = d.data();
  gemm.run(plain);  // throws if there is no e4m3 kernel at all
  if (has_bias) cuda::add(d, bias_f32_, d, gemm.stream());
  cuda::activation(d, act, gemm.stream());
  if (residual) cuda::add(d, *residual, y, gemm.stream());
}

}  // namespace segany::cuda
