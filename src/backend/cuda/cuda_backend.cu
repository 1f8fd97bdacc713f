// The CUDA backend: bf16 activations, fp32 accumulation and statistics, one stream, cuBLASLt
// GEMMs with fused epilogues, flash attention with the rel-pos bias fused (attention_relpos.h),
// and CUDA graphs for fixed sequences of ops (the image encoder).
//
// What a call costs on the hot path: ops only enqueue work on the backend's stream. They never
// allocate (activations come from alloc(), made once per batch size by the model), never wait for
// the device, and never convert weights (prepare_linear did, once). Copies to and from the host go
// through one pinned staging buffer: download() waits for the device, copy_from_host only for the
// previous copy through the buffer to have left it.
//
// Every byte of device memory the backend allocates (alloc(), the GEMM workspace, the preprocessing
// buffer) is counted for memory_stats(); pinned host memory (staging, alloc_host) is counted apart.
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstring>
#include <map>
#include <vector>

#include "backend/backend.h"
#include "backend/cuda/attention_relpos.h"
#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_utils.h"
#include "backend/cuda/gemm.h"
#include "backend/cuda/image_ops.h"
#include "backend/cuda/kernels.h"
#include "backend/cuda/amg_ops.h"
#include "backend/cuda/mask_ops.h"
#include "backend/image_ops.h"
#include "backend/quantize.h"

namespace segany {
namespace {

using cuda::make_event;
using cuda::UniqueEvent;

// RAII owners for the runtime's handles (no new/delete, nothing leaks when a constructor throws).
struct StreamDeleter {
  void operator()(cudaStream_t s) const { cudaStreamDestroy(s); }
};
struct GraphExecDeleter {
  void operator()(cudaGraphExec_t g) const { cudaGraphExecDestroy(g); }
};
struct GraphDeleter {
  void operator()(cudaGraph_t g) const { cudaGraphDestroy(g); }
};
struct PinnedDeleter {
  void operator()(void* p) const { cudaFreeHost(p); }
};
using UniqueStream = std::unique_ptr<std::remove_pointer_t<cudaStream_t>, StreamDeleter>;
using UniqueGraphExec = std::unique_ptr<std::remove_pointer_t<cudaGraphExec_t>, GraphExecDeleter>;
using UniqueGraph = std::unique_ptr<std::remove_pointer_t<cudaGraph_t>, GraphDeleter>;
using UniquePinned = std::unique_ptr<void, PinnedDeleter>;
struct DeviceDeleter {
  void operator()(void* p) const { cudaFree(p); }
};
using UniqueDevice = std::unique_ptr<void, DeviceDeleter>;

// Op classes for profile().
enum OpClass { kGemm, kAttention, kNorm, kOther, kOpClasses };
constexpr std::array<const char*, kOpClasses> kOpClassNames{"gemm", "attention", "norm", "other"};

// Bytes allocated now and at most, shared with the deleters of the tensors alloc() hands out (which
// may outlive the backend, and run on any thread).
struct MemoryCounters {
  std::atomic<size_t> current{0}, peak{0}, pinned{0};
  void add(size_t bytes) {
    const size_t now = current.fetch_add(bytes) + bytes;
    size_t p = peak.load();
    while (now > p && !peak.compare_exchange_weak(p, now)) {
    }
  }
  void sub(size_t bytes) { current.fetch_sub(bytes); }
};

// A fence is an event: record() puts it in the stream, wait() waits for it (at once when never recorded).
class CudaFence final : public Backend::Fence {
 public:
  CudaFence() : event_(make_event(cudaEventDisableTiming)) {}
  void wait() override { CUDA_CHECK(cudaEventSynchronize(event_.get())); }
  cudaEvent_t event() const { return event_.get(); }

 private:
  UniqueEvent event_;
};

void require_cuda(const Tensor& t, const char* what) {
  check(t.defined() && t.device() == Device::CUDA, std::string("cuda backend: ") + what + " must be a GPU tensor");
}

class CudaBackend final : public Backend {
 public:
  CudaBackend(int device, const CudaOptions& options) : options_(options) {
    int count = 0;
    CUDA_CHECK(cudaGetDeviceCount(&count));
    check(device >= 0 && device < count,
          "cuda backend: device " + std::to_string(device) + " requested, " + std::to_string(count) + " present");
    CUDA_CHECK(cudaSetDevice(device));
    if (options_.linear_format == cuda::LinearFormat::FP8_E4M3) {
      int major = 0, minor = 0;
      CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
      CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
      check(major * 10 + minor >= 89, "cuda backend: fp8 linear layers need compute capability 8.9 or newer (Ada, "
                                      "Hopper); device " + std::to_string(device) + " has " + std::to_string(major) +
                                          "." + std::to_string(minor));
    }
    cudaStream_t s = nullptr;
    CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    stream_.reset(s);
    CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    upload_stream_.reset(s);
    staging_done_ = make_event(cudaEventDisableTiming);
    for (Upload& u : uploads_) {
      u.copied = make_event(cudaEventDisableTiming);
      u.read = make_event(cudaEventDisableTiming);
    }
    gemm_ = std::make_unique<cuda::GemmEngine>(
        stream_.get(), options_.gemm_workspace_bytes, options_.tune_gemm, [memory = memory_](std::ptrdiff_t delta) {
          if (delta > 0) memory->add(static_cast<size_t>(delta));
          else memory->sub(static_cast<size_t>(-delta));
        });
    memory_->add(options_.gemm_workspace_bytes);  // the engine's one cudaMalloc
    // Fixed for the backend's life: CUDA graphs captured with it keep its address.
    void* p = nullptr;
    CUDA_CHECK(cudaMalloc(&p, kAttentionScratchBytes));
    attention_scratch_.reset(p);
    memory_->add(kAttentionScratchBytes);
  }

  ~CudaBackend() override {
    // Nothing queued may outlive the buffers and handles released below.
    if (upload_stream_) cudaStreamSynchronize(upload_stream_.get());
    if (stream_) cudaStreamSynchronize(stream_.get());
    memory_->sub(options_.gemm_workspace_bytes);
    memory_->sub(kAttentionScratchBytes);
    for (const Upload& u : uploads_) memory_->sub(u.bytes);
    memory_->pinned.fetch_sub(staging_bytes_);
  }

  cudaStream_t stream() const { return stream_.get(); }

  Device device() const override { return Device::CUDA; }
  std::string name() const override { return "cuda"; }

  // ---- memory ----------------------------------------------------------------------------------

  DType activation_dtype() const override { return DType::BF16; }
  DType prompt_dtype() const override { return DType::F16; }
  // The fp8 encoder keeps its residual stream in bf16: half the bytes that the attention
  // projection, lin2 and both norms of every block move through it.
  DType residual_dtype() const override {
    return options_.linear_format == cuda::LinearFormat::FP8_E4M3 ? DType::BF16 : DType::F32;
  }

  Tensor alloc(const Shape& shape, DType dtype) override {
    const size_t bytes = static_cast<size_t>(shape_numel(shape)) * dtype_size(dtype);
    void* p = nullptr;
    if (bytes > 0) CUDA_CHECK(cudaMalloc(&p, bytes));
    if (p) memory_->add(bytes);
    std::shared_ptr<const void> owner(p, [memory = memory_, bytes](const void* q) {
      if (!q) return;
      cudaFree(const_cast<void*>(q));
      memory->sub(bytes);
    });
    return Tensor::wrap(p, shape, dtype, std::move(owner), Device::CUDA);
  }

  Tensor alloc_host(const Shape& shape, DType dtype) override {
    const size_t bytes = static_cast<size_t>(shape_numel(shape)) * dtype_size(dtype);
    void* p = nullptr;
    if (bytes > 0) {
      CUDA_CHECK(cudaHostAlloc(&p, bytes, cudaHostAllocDefault));
      std::memset(p, 0, bytes);
      memory_->pinned.fetch_add(bytes);
    }
    std::shared_ptr<const void> owner(p, [memory = memory_, bytes](const void* q) {
      if (!q) return;
      cudaFreeHost(const_cast<void*>(q));
      memory->pinned.fetch_sub(bytes);
    });
    return Tensor::wrap(p, shape, dtype, std::move(owner), Device::CPU);
  }

  void download_async(const Tensor& src, Tensor& host) override {
    require_cuda(src, "download_async source");
    check(host.defined() && host.device() == Device::CPU, "cuda download_async: the destination must be host memory");
    check(src.dtype() == host.dtype() && src.numel() == host.numel(),
          std::string("cuda download_async: ") + dtype_name(src.dtype()) + " " + shape_str(src.shape()) + " into " +
              dtype_name(host.dtype()) + " " + shape_str(host.shape()));
    if (src.nbytes() > 0)
      CUDA_CHECK(cudaMemcpyAsync(host.data(), src.data(), src.nbytes(), cudaMemcpyDeviceToHost, stream_.get()));
  }

  void upload_async(const Tensor& host, Tensor& dst) override {
    require_cuda(dst, "upload_async destination");
    check(host.defined() && host.device() == Device::CPU, "cuda upload_async: the source must be host memory");
    check(host.dtype() == dst.dtype() && host.numel() == dst.numel(),
          std::string("cuda upload_async: ") + dtype_name(host.dtype()) + " " + shape_str(host.shape()) + " into " +
              dtype_name(dst.dtype()) + " " + shape_str(dst.shape()));
    if (host.nbytes() > 0)
      CUDA_CHECK(cudaMemcpyAsync(dst.data(), host.data(), host.nbytes(), cudaMemcpyHostToDevice, stream_.get()));
  }

  std::unique_ptr<Fence> make_fence() override { return std::make_unique<CudaFence>(); }

  void record(Fence& fence) override {
    auto* f = dynamic_cast<CudaFence*>(&fence);
    check(f != nullptr, "cuda record: the fence was not made by a CUDA backend");
    CUDA_CHECK(cudaEventRecord(f->event(), stream_.get()));
  }

  MemoryStats memory_stats() const override {
    MemoryStats m;
    m.current = memory_->current.load();
    m.peak = memory_->peak.load();
    m.pinned_host = memory_->pinned.load();
    return m;
  }

  void reset_peak_memory() override { memory_->peak.store(memory_->current.load()); }

  Tensor upload(const Tensor& host) override {
    const Tensor h = host.to_f32();
    Tensor d = alloc(h.shape(), DType::F32);
    copy_from_host(h, d);
    return d;
  }

  Tensor download(const Tensor& t) override {
    if (t.device() == Device::CPU) return t.to_f32();
    check(cuda::is_float_dtype(t.dtype()),
          std::string("cuda download: cannot convert ") + dtype_name(t.dtype()) + " to float32");
    Tensor out = Tensor::empty(t.shape(), DType::F32);
    if (t.numel() == 0) return out;
    void* s = staging(t.nbytes());
    CUDA_CHECK(cudaMemcpyAsync(s, t.data(), t.nbytes(), cudaMemcpyDeviceToHost, stream_.get()));
    CUDA_CHECK(cudaEventRecord(staging_done_.get(), stream_.get()));
    CUDA_CHECK(cudaStreamSynchronize(stream_.get()));
    float* o = out.data_as<float>();
    const int64_t n = t.numel();
    const auto* bits = static_cast<const uint16_t*>(s);
    if (t.dtype() == DType::F32)
      std::memcpy(o, s, t.nbytes());
    else if (t.dtype() == DType::BF16)
      for (int64_t i = 0; i < n; ++i) o[i] = bf16_to_f32(bits[i]);
    else
      for (int64_t i = 0; i < n; ++i) o[i] = f16_to_f32(bits[i]);
    return out;
  }

  // Not capturable (it fills the staging buffer on the host): uploads happen outside graphs.
  void copy_from_host(const Tensor& host, Tensor& dst) override {
    require_cuda(dst, "copy_from_host destination");
    check(cuda::is_float_dtype(dst.dtype()),
          std::string("cuda copy_from_host: destination must be float32, bf16 or fp16, found ") + dtype_name(dst.dtype()));
    check(host.numel() == dst.numel(),
          "copy_from_host: " + shape_str(host.shape()) + " into " + shape_str(dst.shape()));
    const Tensor h = (host.device() == Device::CPU && host.dtype() == DType::F32) ? host : host.to_f32();
    if (dst.numel() == 0) return;
    void* s = staging(dst.nbytes());
    const float* src = h.data_as<const float>();
    auto* bits = static_cast<uint16_t*>(s);
    const int64_t n = dst.numel();
    if (dst.dtype() == DType::F32)
      std::memcpy(s, src, dst.nbytes());
    else if (dst.dtype() == DType::BF16)
      for (int64_t i = 0; i < n; ++i) bits[i] = f32_to_bf16(src[i]);
    else
      for (int64_t i = 0; i < n; ++i) bits[i] = f32_to_f16(src[i]);
    CUDA_CHECK(cudaMemcpyAsync(dst.data(), s, dst.nbytes(), cudaMemcpyHostToDevice, stream_.get()));
    CUDA_CHECK(cudaEventRecord(staging_done_.get(), stream_.get()));
  }

  // ---- weights ---------------------------------------------------------------------------------

  // The image encoder's layers take the backend's format; the mask decoder's and the prompt
  // encoder's are fp16, as the prompt path's activations (prompt_dtype). FP8_E4M3 applies to the
  // transformer blocks' layers fed by a LayerNorm, qkv and lin1 (58% of the encoder's
  // multiply-adds), where their sizes are multiples of 16 (cuBLASLt's fp8 kernels); the others stay
  // bf16. Measured on the H100 (README): with all four of a block's layers in fp8 the golden micro
  // model's masks fell to IoU 0.945 against the CPU and a random vit_b's embedding error to 5.6e-2,
  // and the per-row quantization of the attention output and of the MLP's 4x-wide hidden layer
  // cost about what their fp8 products saved; qkv and lin1 alone keep IoU >= 0.96 and 3.9e-2 (with the
  // bf16 residual stream), and are the fastest set.
  std::unique_ptr<LinearWeights> prepare_linear(const std::string& name, const Tensor& weight,
                                                const Tensor* bias) override {
    check(weight.ndim() == 2, "linear '" + name + "': weight must be 2-d, found " + shape_str(weight.shape()));
    const int64_t N = weight.dim(0), K = weight.dim(1);
    const bool prompt_path = name.starts_with("mask_decoder.") || name.starts_with("prompt_encoder.");
    cuda::LinearFormat format = prompt_path ? cuda::LinearFormat::FP16 : options_.linear_format;
    const bool fp8_layer = name.starts_with("image_encoder.blocks.") &&
                           (name.ends_with(".attn.qkv") || name.ends_with(".mlp.lin1")) && N % 16 == 0 && K % 16 == 0;
    if (format == cuda::LinearFormat::FP8_E4M3 && !fp8_layer) format = cuda::LinearFormat::BF16;
    if (format != cuda::LinearFormat::BF16 && format != cuda::LinearFormat::FP16 && format != cuda::LinearFormat::FP8_E4M3)
      throw Error(std::string("cuda backend: linear format ") + cuda::linear_format_name(format) +
                  " is not implemented yet (layer '" + name + "')");
    Tensor b, b32;
    if (bias) {
      check(bias->numel() == N, "linear '" + name + "': bias has " + std::to_string(bias->numel()) + " values for " +
                                    std::to_string(N) + " outputs");
      const Tensor hb = bias->to_f32().view({N});
      b32 = alloc({N}, DType::F32);
      copy_from_host(hb, b32);
      const DType bt = format == cuda::LinearFormat::FP16 ? DType::F16 : DType::BF16;
      b = alloc({N}, bt);
      copy_from_host(hb, b);
    }
    if (format == cuda::LinearFormat::FP8_E4M3) {
      // Quantized once, here, per output channel (backend/quantize.h).
      const Tensor hw = weight.to_f32();
      Tensor q = Tensor::uninitialized({N, K}, DType::F8E4M3), sc = Tensor::empty({N});
      try {
        quantize_rows_e4m3(hw.data_as<float>(), N, K, q.data_as<uint8_t>(), sc.data_as<float>());
      } catch (const Error& e) {
        throw Error("linear '" + name + "': " + e.what());
      }
      Tensor w = alloc({N, K}, DType::F8E4M3), s = alloc({N}, DType::F32);
      CUDA_CHECK(cudaMemcpy(w.data(), q.data(), q.nbytes(), cudaMemcpyHostToDevice));
      copy_from_host(sc, s);
      return std::make_unique<cuda::Fp8Linear>(std::move(w), std::move(s), std::move(b), std::move(b32));
    }
    const DType wt = format == cuda::LinearFormat::FP16 ? DType::F16 : DType::BF16;
    Tensor w = alloc({N, K}, wt);
    copy_from_host(weight.to_f32(), w);
    return std::make_unique<cuda::DenseLinear>(std::move(w), std::move(b), std::move(b32));
  }

  // ---- ops -------------------------------------------------------------------------------------

  void linear(const Tensor& x, const LinearWeights& lw, Tensor& y, Activation act, const Tensor* residual) override {
    const auto* w = dynamic_cast<const cuda::CudaLinear*>(&lw);
    check(w != nullptr, "cuda linear: the weights were not prepared by a CUDA backend");
    timed(kGemm, [&] { w->run(*gemm_, x, y, act, residual); });
  }

  void layer_norm(const Tensor& x, const Tensor& gamma, const Tensor& beta, float eps, Tensor& y,
                  Activation act) override {
    timed(kNorm, [&] { cuda::layer_norm(x, gamma, beta, eps, y, act, stream()); });
  }

  // An fp8 layer takes the norm's rows in e4m3 from the norm kernel itself: no bf16 xn is written
  // and no quantization pass runs. Anything else: norm, then linear.
  void norm_linear(const Tensor& x, const Tensor& gamma, const Tensor& beta, float eps, Tensor& xn,
                   const LinearWeights& lw, Tensor& y, Activation act) override {
    const auto* f8 = dynamic_cast<const cuda::Fp8Linear*>(&lw);
    if (!f8 || x.device() != Device::CUDA || x.dim(-1) != f8->in_features ||
        !cuda::layer_norm_e4m3_fits(x, gamma, beta)) {
      Backend::norm_linear(x, gamma, beta, eps, xn, lw, y, act);
      return;
    }
    const int64_t M = x.numel() / x.dim(-1);
    const cuda::Fp8Linear::Input in = f8->input_buffer(*gemm_, M);
    timed(kNorm, [&] { cuda::layer_norm_e4m3(x, gamma, beta, eps, in.q, in.scale, stream()); });
    timed(kGemm, [&] { f8->run_quantized(*gemm_, in, M, y, act, nullptr); });
  }

  void add_layer_norm(const Tensor& x, const Tensor& r, const Tensor& gamma, const Tensor& beta, float eps, Tensor& y,
                      const Tensor* pe, Tensor* y_pe) override {
    timed(kNorm, [&] { cuda::add_layer_norm(x, &r, gamma, beta, eps, y, pe, y_pe, Activation::None, stream()); });
  }

  // The fused rel-pos kernels (attention_relpos.h) take bf16 qkv and out, 16-byte aligned, and
  // tables of one dtype, float32 or bf16; anything else runs the reference kernels.
  static bool aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data()) % 16 == 0; }
  bool flash_attention_takes(const Tensor& qkv, const Tensor& rel_pos_h, const Tensor& rel_pos_w, const Tensor& out,
                             int64_t batch) const {
    const bool tables_ok = rel_pos_h.dtype() == rel_pos_w.dtype() &&
                           (rel_pos_h.dtype() == DType::F32 || rel_pos_h.dtype() == DType::BF16);
    return !options_.reference_attention && qkv.dtype() == DType::BF16 && out.dtype() == DType::BF16 && tables_ok &&
           aligned16(qkv) && aligned16(out) && batch <= INT32_MAX;
  }
  static cuda::RelPosAttentionParams flash_params(const Tensor& qkv, const Tensor& rel_pos_h, const Tensor& rel_pos_w,
                                                  Tensor& out, int64_t batch, int heads, int64_t head_dim) {
    cuda::RelPosAttentionParams p;
    p.qkv = static_cast<const __nv_bfloat16*>(qkv.data());
    p.rel_pos_h = rel_pos_h.data();
    p.rel_pos_w = rel_pos_w.data();
    p.rel_pos_fp32 = rel_pos_h.dtype() == DType::F32;
    p.out = static_cast<__nv_bfloat16*>(out.data());
    p.batch = static_cast<int>(batch);
    p.heads = heads;
    p.head_dim = static_cast<int>(head_dim);
    return p;
  }
  void run_flash(const char* op, const cuda::RelPosAttentionParams& p) {
    try {
      cuda::attention_relpos(p, stream());
    } catch (const Error&) {
      throw;
    } catch (const std::exception& e) {
      throw Error(std::string("cuda ") + op + ": " + e.what());
    }
  }

  void attention_relpos(const Tensor& qkv, const Tensor& rel_pos_h, const Tensor& rel_pos_w, int heads, int gh, int gw,
                        Tensor& out) override {
    require_cuda(qkv, "attention_relpos qkv");
    require_cuda(out, "attention_relpos output");
    require_cuda(rel_pos_h, "attention_relpos rel_pos_h");
    require_cuda(rel_pos_w, "attention_relpos rel_pos_w");
    const int64_t T = int64_t(gh) * gw;
    check(heads > 0 && T > 0 && qkv.dim(-1) % (3 * heads) == 0,
          "attention_relpos: qkv " + shape_str(qkv.shape()) + " for " + std::to_string(heads) + " heads");
    const int64_t D = qkv.dim(-1) / (3 * heads);
    const int64_t B = qkv.numel() / (T * qkv.dim(-1));
    check(qkv.numel() == B * T * 3 * heads * D,
          "attention_relpos: qkv " + shape_str(qkv.shape()) + " does not hold " + std::to_string(T) + " tokens of 3 x " +
              std::to_string(heads) + " heads");
    check(rel_pos_h.numel() == (2 * gh - 1) * D && rel_pos_w.numel() == (2 * gw - 1) * D,
          "attention_relpos: rel_pos tables " + shape_str(rel_pos_h.shape()) + ", " + shape_str(rel_pos_w.shape()) +
              " for a " + std::to_string(gh) + "x" + std::to_string(gw) + " grid of head dim " + std::to_string(D));
    check(out.numel() == B * T * heads * D, "attention_relpos: output " + shape_str(out.shape()));
    const bool flash = flash_attention_takes(qkv, rel_pos_h, rel_pos_w, out, B) &&
                       cuda::attention_relpos_supported(static_cast<int>(D), gh, gw);
    timed(kAttention, [&] {
      if (!flash) {
        cuda::attention_relpos_reference(qkv, rel_pos_h, rel_pos_w, heads, gh, gw, out, stream());
        return;
      }
      cuda::RelPosAttentionParams p = flash_params(qkv, rel_pos_h, rel_pos_w, out, B, heads, D);
      p.grid_h = gh;
      p.grid_w = gw;
      run_flash("attention_relpos", p);
    });
  }

  void window_attention_relpos(const Tensor& qkv, const Tensor& pad_qkv, const Tensor& rel_pos_h,
                               const Tensor& rel_pos_w, int heads, int window, Tensor& out) override {
    require_cuda(qkv, "window_attention_relpos qkv");
    require_cuda(pad_qkv, "window_attention_relpos pad_qkv");
    require_cuda(out, "window_attention_relpos output");
    require_cuda(rel_pos_h, "window_attention_relpos rel_pos_h");
    require_cuda(rel_pos_w, "window_attention_relpos rel_pos_w");
    check(qkv.ndim() == 4 && heads > 0 && window > 0 && qkv.dim(3) % (3 * heads) == 0,
          "window_attention_relpos: qkv " + shape_str(qkv.shape()) + " must be [B, H, W, 3 x " +
              std::to_string(heads) + " heads x head_dim]");
    const int64_t B = qkv.dim(0), H = qkv.dim(1), W = qkv.dim(2), C = qkv.dim(3) / 3, D = C / heads;
    check(pad_qkv.numel() == 3 * C && pad_qkv.dtype() == qkv.dtype(),
          "window_attention_relpos: pad_qkv " + std::string(dtype_name(pad_qkv.dtype())) + " " +
              shape_str(pad_qkv.shape()) + " for qkv " + dtype_name(qkv.dtype()) + " " + shape_str(qkv.shape()));
    check(rel_pos_h.numel() == (2 * window - 1) * D && rel_pos_w.numel() == (2 * window - 1) * D,
          "window_attention_relpos: rel_pos tables " + shape_str(rel_pos_h.shape()) + ", " +
              shape_str(rel_pos_w.shape()) + " for windows of " + std::to_string(window) + " and head dim " +
              std::to_string(D));
    check(out.numel() == B * H * W * C, "window_attention_relpos: output " + shape_str(out.shape()) + " for qkv " +
                                            shape_str(qkv.shape()));
    const bool flash = flash_attention_takes(qkv, rel_pos_h, rel_pos_w, out, B) && aligned16(pad_qkv) &&
                       H <= 4096 && W <= 4096 && window <= 16 &&
                       cuda::attention_relpos_supported(static_cast<int>(D), window, window);
    timed(kAttention, [&] {
      if (!flash) {
        cuda::window_attention_relpos_reference(qkv, pad_qkv, rel_pos_h, rel_pos_w, heads, window, out, stream());
        return;
      }
      cuda::RelPosAttentionParams p = flash_params(qkv, rel_pos_h, rel_pos_w, out, B, heads, D);
      p.pad_qkv = static_cast<const __nv_bfloat16*>(pad_qkv.data());
      p.grid_h = p.grid_w = window;
      p.image_h = static_cast<int>(H);
      p.image_w = static_cast<int>(W);
      run_flash("window_attention_relpos", p);
    });
  }

  void attention(const Tensor& q, const Tensor& k, const Tensor& v, int heads, Tensor& out) override {
    const cuda::AttentionScratch scratch{static_cast<float*>(attention_scratch_.get()),
                                         kAttentionScratchBytes / sizeof(float)};
    timed(kAttention, [&] { cuda::attention(q, k, v, heads, out, stream(), scratch); });
  }

  void add(const Tensor& a, const Tensor& b, Tensor& y) override {
    timed(kOther, [&] { cuda::add(a, b, y, stream()); });
  }

  void copy_tokens(const Tensor& src, int src_begin, Tensor& dst, int dst_begin, int count) override {
    timed(kOther, [&] { cuda::copy_tokens(src, src_begin, dst, dst_begin, count, stream()); });
  }

  void embed_points(const Tensor& coords, const Tensor& labels, const Tensor& gaussian, const Tensor& table, int img_size,
                    Tensor& out) override {
    timed(kOther, [&] { cuda::embed_points(coords, labels, gaussian, table, img_size, out, stream()); });
  }

  void postprocess_masks(const Tensor& low_res, int first, int count, const MaskFrame& frame, float threshold,
                         float offset, bool column_major, Tensor* bits, Tensor& stats, const Tensor* select) override {
    timed(kOther, [&] {
      cuda::postprocess_masks(low_res, first, count, frame, threshold, offset, column_major, bits, stats, select,
                              stream());
    });
  }

  void select_masks(const Tensor& iou, const Tensor& stats, const MaskSelection& selection, Tensor& keep) override {
    timed(kOther, [&] {
      cuda::select_masks(iou, stats, selection, keep, select_scratch_,
                         [this](int64_t n) { return alloc({n}, DType::I32); }, stream());
    });
  }

  void uncrop_bits(const Tensor& bits, const int crop[4], int image_h, int image_w, Tensor& out) override {
    timed(kOther, [&] { cuda::uncrop_bits(bits, crop, image_h, image_w, out, stream()); });
  }

  void encode_runs(const Tensor& bits, int64_t pixels, Tensor& offsets, Tensor& runs) override {
    timed(kOther, [&] {
      cuda::encode_runs(bits, pixels, offsets, runs, run_scratch_, [this](int64_t n) { return alloc({n}, DType::I64); },
                        stream());
    });
  }

  void activation(Tensor& x, Activation act) override {
    timed(kOther, [&] { cuda::activation(x, act, stream()); });
  }

  void patchify(const Tensor& x, int p, Tensor& y) override {
    timed(kOther, [&] { cuda::patchify(x, p, y, stream()); });
  }

  void im2col3x3(const Tensor& x, Tensor& y) override {
    timed(kOther, [&] { cuda::im2col3x3(x, y, stream()); });
  }

  void hypernetwork_masks(const Tensor& up, const Tensor& hyper, Tensor& low_res) override {
    timed(kOther, [&] { cuda::hypernetwork_masks(up, hyper, low_res, stream()); });
  }

  // ---- preprocessing ---------------------------------------------------------------------------
  //
  // The taps of every image (computed here, on the host, by the CPU's own code) and a parameter
  // block go through the pinned staging buffer, the pixels straight from the caller's (pinned)
  // memory; both land in one device buffer, grown when a batch needs more, then one kernel writes
  // the whole batch. The copies run on a stream of their own, into one of two buffers in turn, so
  // that a batch's upload overlaps the previous batch's encoder: the upload waits only for the
  // kernel that last read its buffer (two batches back), the kernel for the upload. Nothing waits
  // for the device on the host but a growth of a buffer.
  void preprocess_images(const std::vector<Tensor>& images, Tensor& input) override {
    require_cuda(input, "preprocess_images input");
    check(input.ndim() == 4 && input.dim(0) == static_cast<int64_t>(images.size()) && input.dim(1) == input.dim(2) &&
              input.dim(3) == 3,
          "cuda preprocess_images: input " + shape_str(input.shape()) + " for " + std::to_string(images.size()) +
              " images (expected [B, S, S, 3])");
    const int S = static_cast<int>(input.dim(1));
    const int B = static_cast<int>(images.size());
    std::vector<cuda::PreprocessImageParams> params(B);
    std::vector<int32_t> taps;
    auto append = [&taps](const std::vector<int32_t>& v) {
      const int at = static_cast<int>(taps.size());
      taps.insert(taps.end(), v.begin(), v.end());
      return at;
    };
    size_t pixel_bytes = 0;
    for (int i = 0; i < B; ++i) {
      const Tensor& im = images[i];
      check(im.defined() && im.dtype() == DType::U8 && im.ndim() == 3 && im.dim(2) == 3,
            "cuda preprocess_images: image " + std::to_string(i) + " must be u8 [h, w, 3], found " +
                dtype_name(im.dtype()) + " " + shape_str(im.shape()));
      cuda::PreprocessImageParams& p = params[i];
      p.in_h = static_cast<int>(im.dim(0));
      p.in_w = static_cast<int>(im.dim(1));
      resized_shape(p.in_h, p.in_w, S, p.out_h, p.out_w);
      check(p.out_h > 0 && p.out_w > 0, "image of " + std::to_string(p.in_w) + "x" + std::to_string(p.in_h) +
                                            " pixels is too thin to resize to " + std::to_string(S));
      const ResizeTaps h = pil_bilinear_taps(p.in_w, p.out_w), v = pil_bilinear_taps(p.in_h, p.out_h);
      p.hk = h.ksize, p.vk = v.ksize;
      p.hfirst = append(h.first), p.hcount = append(h.count), p.hweights = append(h.weights);
      p.vfirst = append(v.first), p.vcount = append(v.count), p.vweights = append(v.weights);
      p.pixels = static_cast<int64_t>(pixel_bytes);
      pixel_bytes += (im.nbytes() + 255) / 256 * 256;
    }
    check(taps.size() < size_t(INT32_MAX), "cuda preprocess_images: too many images in one batch");
    if (B == 0) return;
    // Device buffer: [params | taps | pixels], each part 256-byte aligned.
    const size_t params_bytes = (B * sizeof(cuda::PreprocessImageParams) + 255) / 256 * 256;
    const size_t taps_bytes = (taps.size() * sizeof(int32_t) + 255) / 256 * 256;
    upload_turn_ ^= 1;
    Upload& u = uploads_[upload_turn_];
    char* dev = upload_buffer(u, params_bytes + taps_bytes + pixel_bytes);
    cudaStream_t up = upload_stream_.get();
    CUDA_CHECK(cudaStreamWaitEvent(up, u.read.get(), 0));  // the kernel that last read this buffer
    // Images already on the device may still be being written by work queued on the stream.
    if (std::any_of(images.begin(), images.end(), [](const Tensor& t) { return t.device() == Device::CUDA; })) {
      CUDA_CHECK(cudaEventRecord(u.copied.get(), stream_.get()));
      CUDA_CHECK(cudaStreamWaitEvent(up, u.copied.get(), 0));
    }
    char* s = static_cast<char*>(staging(params_bytes + taps_bytes));
    std::memcpy(s, params.data(), B * sizeof(cuda::PreprocessImageParams));
    std::memcpy(s + params_bytes, taps.data(), taps.size() * sizeof(int32_t));
    CUDA_CHECK(cudaMemcpyAsync(dev, s, params_bytes + taps_bytes, cudaMemcpyHostToDevice, up));
    CUDA_CHECK(cudaEventRecord(staging_done_.get(), up));
    char* pixels = dev + params_bytes + taps_bytes;
    for (int i = 0; i < B; ++i)  // pinned (or device) sources copy asynchronously, pageable ones at once
      if (images[i].nbytes() > 0)
        CUDA_CHECK(cudaMemcpyAsync(pixels + params[i].pixels, images[i].data(), images[i].nbytes(), cudaMemcpyDefault,
                                   up));
    CUDA_CHECK(cudaEventRecord(u.copied.get(), up));
    CUDA_CHECK(cudaStreamWaitEvent(stream_.get(), u.copied.get(), 0));
    timed(kOther, [&] {
      cuda::preprocess_images(reinterpret_cast<const cuda::PreprocessImageParams*>(dev),
                              reinterpret_cast<const int32_t*>(dev + params_bytes),
                              reinterpret_cast<const uint8_t*>(pixels), B, input, stream_.get());
    });
    CUDA_CHECK(cudaEventRecord(u.read.get(), stream_.get()));
  }

  void synchronize() override { CUDA_CHECK(cudaStreamSynchronize(stream_.get())); }

  // ---- graphs ----------------------------------------------------------------------------------
  //
  // Call 1 runs the body eagerly: cuBLASLt plans are made (the heuristic runs on the host) and
  // kernels load. Call 2 captures the body (thread-local mode: a stray cudaMalloc or sync in an
  // op fails the capture with an error instead of hiding in it) and launches the graph; later
  // calls launch it. Profiling runs the body eagerly so that each op can be timed.
  void run_graph(const std::string& key, const std::function<void()>& body) override {
    if (profiling_) {
      body();
      return;
    }
    GraphState& g = graphs_[key];
    if (g.exec) {
      CUDA_CHECK(cudaGraphLaunch(g.exec.get(), stream_.get()));
      return;
    }
    if (g.calls++ == 0) {
      body();
      return;
    }
    CUDA_CHECK(cudaStreamBeginCapture(stream_.get(), cudaStreamCaptureModeThreadLocal));
    try {
      body();
    } catch (const std::exception& e) {
      cudaGraph_t broken = nullptr;
      cudaStreamEndCapture(stream_.get(), &broken);
      if (broken) cudaGraphDestroy(broken);
      cudaGetLastError();  // the capture's failure is reported here, not at the next launch
      throw Error("cuda run_graph('" + key + "'): capture failed: " + e.what());
    }
    cudaGraph_t graph = nullptr;
    CUDA_CHECK(cudaStreamEndCapture(stream_.get(), &graph));
    UniqueGraph owned(graph);
    cudaGraphExec_t exec = nullptr;
    CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
    g.exec.reset(exec);
    CUDA_CHECK(cudaGraphLaunch(exec, stream_.get()));
  }

  // ---- profiling -------------------------------------------------------------------------------

  void set_profiling(bool on) override {
    if (on && !profiling_) {
      pending_.clear();
      events_used_ = 0;
      totals_.fill(0.0);
    }
    profiling_ = on;
  }

  std::map<std::string, double> profile() override {
    if (!pending_.empty()) {
      CUDA_CHECK(cudaEventSynchronize(pending_.back().end));
      for (const Timed& t : pending_) {
        float ms = 0.0f;
        CUDA_CHECK(cudaEventElapsedTime(&ms, t.start, t.end));
        totals_[t.cls] += ms;
      }
      pending_.clear();
      events_used_ = 0;  // every event has completed: the pool can be reused
    }
    std::map<std::string, double> out;
    for (int c = 0; c < kOpClasses; ++c) out[kOpClassNames[c]] = totals_[c];
    return out;
  }

 private:
  struct GraphState {
    int calls = 0;
    UniqueGraphExec exec;
  };
  struct Timed {
    OpClass cls;
    cudaEvent_t start, end;
  };

  // Runs one op; with profiling on, between two events of the pool.
  template <class F>
  void timed(OpClass cls, F&& op) {
    if (!profiling_) {
      op();
      return;
    }
    cudaEvent_t start = pooled_event();
    CUDA_CHECK(cudaEventRecord(start, stream_.get()));
    op();
    cudaEvent_t end = pooled_event();
    CUDA_CHECK(cudaEventRecord(end, stream_.get()));
    pending_.push_back({cls, start, end});
  }

  cudaEvent_t pooled_event() {
    if (events_used_ == event_pool_.size()) event_pool_.push_back(make_event(cudaEventDefault));
    return event_pool_[events_used_++].get();
  }

  // The pinned staging buffer, at least `bytes` large, once the previous copy through it is done.
  void* staging(size_t bytes) {
    CUDA_CHECK(cudaEventSynchronize(staging_done_.get()));
    if (bytes > staging_bytes_) {
      staging_.reset();
      memory_->pinned.fetch_sub(staging_bytes_);
      staging_bytes_ = 0;
      void* p = nullptr;
      CUDA_CHECK(cudaHostAlloc(&p, bytes, cudaHostAllocDefault));
      staging_.reset(p);
      staging_bytes_ = bytes;
      memory_->pinned.fetch_add(bytes);
    }
    return staging_.get();
  }

  // One of the preprocessing's two upload buffers, and when its copies are done and its last
  // reader has run.
  struct Upload {
    UniqueDevice buffer;
    size_t bytes = 0;
    UniqueEvent copied, read;
  };

  // `u`'s device buffer, at least `bytes` large. Growing it waits for the work that may still
  // use the old one; it grows by half again so that a few larger images do not each cost a
  // reallocation.
  char* upload_buffer(Upload& u, size_t bytes) {
    if (bytes > u.bytes) {
      const size_t grown = std::max(bytes, u.bytes / 2 * 3);
      CUDA_CHECK(cudaEventSynchronize(u.read.get()));  // after its copies: the kernel waited for them
      u.buffer.reset();
      memory_->sub(u.bytes);
      u.bytes = 0;
      void* p = nullptr;
      CUDA_CHECK(cudaMalloc(&p, grown));
      u.buffer.reset(p);
      u.bytes = grown;
      memory_->add(grown);
    }
    return static_cast<char*>(u.buffer.get());
  }

  // Declaration order is destruction order reversed: the stream outlives everything using it.
  CudaOptions options_;
  std::shared_ptr<MemoryCounters> memory_ = std::make_shared<MemoryCounters>();
  UniqueStream stream_;
  UniqueStream upload_stream_;  // the preprocessing's uploads
  UniqueEvent staging_done_;
  UniquePinned staging_;
  size_t staging_bytes_ = 0;
  std::array<Upload, 2> uploads_;
  int upload_turn_ = 0;
  std::unique_ptr<cuda::GemmEngine> gemm_;
  cuda::SelectScratch select_scratch_;
  // The partial outputs of attention with few queries split over the keys (the decoder's tokens
  // against the image: 8 blocks for one prompt without it).
  static constexpr size_t kAttentionScratchBytes = size_t{1} << 20;
  UniqueDevice attention_scratch_;
  cuda::RunScratch run_scratch_;
  std::map<std::string, GraphState> graphs_;
  bool profiling_ = false;
  std::vector<UniqueEvent> event_pool_;
  size_t events_used_ = 0;
  std::vector<Timed> pending_;
  std::array<double, kOpClasses> totals_{};
};

}  // namespace

bool cuda_available() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so that later calls start clean
    return false;
  }
  return count > 0;
}

std::unique_ptr<Backend> make_cuda_backend(int device, const CudaOptions& options) {
  check(cuda_available(), "no CUDA device is available (cudaGetDeviceCount found none or failed)");
  return std::make_unique<CudaBackend>(device, options);
}

std::unique_ptr<Backend> make_cuda_backend(int device, EncoderPrecision precision) {
  CudaOptions o;
  o.linear_format = precision == EncoderPrecision::FP8 ? cuda::LinearFormat::FP8_E4M3 : cuda::LinearFormat::BF16;
  return make_cuda_backend(device, o);
}

cudaStream_t cuda_stream(Backend& backend) {
  auto* cuda = dynamic_cast<CudaBackend*>(&backend);
  check(cuda != nullptr, "cuda_stream: backend '" + backend.name() + "' is not a CUDA backend");
  return cuda->stream();
}

}  // namespace segany
