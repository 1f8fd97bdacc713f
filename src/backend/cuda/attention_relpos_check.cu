// Standalone check of the fused rel-pos flash attention (attention_relpos.cu) against a plain CPU
// reference, plus its speed on SAM's shapes.
//
// Build and run (on the GPU machine, from the repo root):
//   nvcc -std=c++20 -O3 -gencode=arch=compute_90a,code=sm_90a -gencode=arch=compute_80,code=sm_80
//        -lpthread -o attention_relpos_check src/backend/cuda/attention_relpos_check.cu
//        src/backend/cuda/attention_relpos.cu
//   ./attention_relpos_check            # all cases;  --quick: the small correctness cases only
// On compute capability 9.0 every global case, and every window case up to 14 x 14, runs twice: on
// the sm_90a (wgmma) kernel and, with the suffix " sm80", on the mma.sync kernel; each line names
// the kernel that ran.
//
// Window cases run either on sequences of grid_h x grid_w tokens or, as SAM's encoder runs them, on
// an image grid (image_h x image_w, e.g. 64 x 64 cut into 14 x 14 windows with padding tokens whose
// q, k, v are pad_qkv): the reference gathers each window from the grid the same way.
//
// For every case: random bf16 qkv (std 1) and rel_pos tables, output poisoned (NaN) and followed by
// a guard region; after the kernel every output must be finite, the guard untouched, and the
// outputs of sampled (sequence, head, query) rows must match a double-precision CPU reference of
// SAM's Attention (use_rel_pos) computed from the same bf16 values: per element
// |gpu - ref| <= 1e-2 + 2e-2 |ref|, and ||gpu - ref|| / ||ref|| <= 1e-2 over the sampled rows.
// SAM-sized cases are then timed with CUDA events; TFLOP/s counts 4 * B * heads * T^2 * D.
// Exit status 0 only when every case passes; the last line reads "N passed, M failed".
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "attention_relpos.h"

namespace {

using segany::cuda::RelPosAttentionParams;

#define CUDA_CHECK(expr)                                                                                               \
  do {                                                                                                                 \
    const cudaError_t err_ = (expr);                                                                                   \
    if (err_ != cudaSuccess)                                                                                           \
      throw std::runtime_error(std::string(#expr) + " failed at " + __FILE__ + ":" + std::to_string(__LINE__) + ": " + \
                               cudaGetErrorString(err_));                                                              \
  } while (0)

// Destructors cannot throw: a failed release is reported and counted as a failure at exit.
int g_release_failures = 0;
void check_release(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::printf("error: %s failed: %s\n", what, cudaGetErrorString(e));
    ++g_release_failures;
  }
}

// RAII device buffer.
template <class T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(size_t n) : n_(n) {
    if (n_) CUDA_CHECK(cudaMalloc(&ptr_, n_ * sizeof(T)));
  }
  ~DeviceBuffer() {
    if (ptr_) check_release(cudaFree(ptr_), "cudaFree");
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  T* get() const { return ptr_; }
  size_t size() const { return n_; }

 private:
  T* ptr_ = nullptr;
  size_t n_ = 0;
};

class Event {
 public:
  Event() { CUDA_CHECK(cudaEventCreate(&e_)); }
  ~Event() { check_release(cudaEventDestroy(e_), "cudaEventDestroy"); }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  cudaEvent_t get() const { return e_; }

 private:
  cudaEvent_t e_ = nullptr;
};

class Stream {
 public:
  Stream() { CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking)); }
  ~Stream() { check_release(cudaStreamDestroy(s_), "cudaStreamDestroy"); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const { return s_; }

 private:
  cudaStream_t s_ = nullptr;
};

float bf16_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
// Round-to-nearest-even float -> bf16 on the host (inputs are finite).
__nv_bfloat16 float_to_bf16(float x) { return __float2bfloat16_rn(x); }

template <class F>
void parallel_for(int n, F&& f) {
  const int workers = std::max(1, std::min<int>(n, static_cast<int>(std::thread::hardware_concurrency())));
  std::vector<std::thread> pool;
  for (int w = 0; w < workers; ++w)
    pool.emplace_back([&, w] {
      for (int i = w; i < n; i += workers) f(i);
    });
  for (auto& th : pool) th.join();
}

// N(0, std^2) values rounded to bf16, kept both as bf16 and as the floats they are; filled in
// parallel chunks with their own seeds (SAM-sized qkv holds ~10^8 values).
void fill_normal(std::vector<__nv_bfloat16>& h, std::vector<float>& f, float std_dev, uint64_t seed) {
  constexpr size_t kChunk = size_t(1) << 20;
  const int chunks = int((h.size() + kChunk - 1) / kChunk);
  parallel_for(chunks, [&](int ci) {
    std::mt19937_64 rng(seed * 1000003u + uint64_t(ci));
    std::normal_distribution<float> normal(0.f, std_dev);
    for (size_t i = size_t(ci) * kChunk; i < std::min(h.size(), size_t(ci + 1) * kChunk); ++i)
      f[i] = bf16_to_float(h[i] = float_to_bf16(normal(rng)));
  });
}

struct Case {
  std::string name;
  int batch, heads, head_dim, grid_h, grid_w;
  float rel_std;
  bool rel_fp32;     // hand the kernel float32 tables (values bf16-representable, see below)
  bool timed;        // SAM-sized: time it
  int ref_pairs;     // (sequence, head) pairs checked against the CPU; 0 = all
  int ref_row_step;  // check every n-th query row of those (plus the last)
  int image_h = 0;   // > 0: windows cut from a batch x image_h x image_w grid (batch = images)
  int image_w = 0;
  int windows_y() const { return image_h > 0 ? (image_h + grid_h - 1) / grid_h : 1; }
  int windows_x() const { return image_h > 0 ? (image_w + grid_w - 1) / grid_w : 1; }
  int sequences() const { return batch * windows_y() * windows_x(); }
  size_t tokens() const { return image_h > 0 ? size_t(batch) * image_h * image_w : size_t(batch) * grid_h * grid_w; }
  // Token tok of sequence (window) s: its index among all tokens, or -1 for a padding token.
  long long token(int s, int tok) const {
    if (image_h == 0) return static_cast<long long>(s) * grid_h * grid_w + tok;
    const int per_image = windows_y() * windows_x(), b = s / per_image, w = s % per_image;
    const int y = (w / windows_x()) * grid_h + tok / grid_w, x = (w % windows_x()) * grid_w + tok % grid_w;
    return y < image_h && x < image_w ? (static_cast<long long>(b) * image_h + y) * image_w + x : -1;
  }
};

struct RowSample {
  int b, h, i;
};

// Double-precision reference of SAM's Attention with use_rel_pos, for one query row.
// b: the sequence (window); padding tokens read pad [3, heads, D].
void reference_row(const std::vector<float>& qkv, const std::vector<float>& pad, const std::vector<float>& rh,
                   const std::vector<float>& rw, const Case& c, int b, int h, int i, double* out_row) {
  const int D = c.head_dim, gh = c.grid_h, gw = c.grid_w, T = gh * gw, H = c.heads;
  const size_t tok_stride = size_t(3) * H * D;
  auto at = [&](int tok, int which) {
    const long long g = c.token(b, tok);
    const size_t off = size_t(which) * H * D + size_t(h) * D;
    return g >= 0 ? &qkv[size_t(g) * tok_stride + off] : &pad[off];
  };
  const float* q = at(i, 0);
  const int qr = i / gw, qc = i % gw;
  std::vector<double> relh(gh), relw(gw), logit(T);
  for (int kr = 0; kr < gh; ++kr) {
    const float* r = &rh[size_t(qr - kr + gh - 1) * D];
    double s = 0;
    for (int d = 0; d < D; ++d) s += double(q[d]) * r[d];
    relh[kr] = s;
  }
  for (int kc = 0; kc < gw; ++kc) {
    const float* r = &rw[size_t(qc - kc + gw - 1) * D];
    double s = 0;
    for (int d = 0; d < D; ++d) s += double(q[d]) * r[d];
    relw[kc] = s;
  }
  const double scale = 1.0 / std::sqrt(double(D));
  double mx = -INFINITY;
  for (int j = 0; j < T; ++j) {
    const float* k = at(j, 1);
    double s = 0;
    for (int d = 0; d < D; ++d) s += double(q[d]) * k[d];
    logit[j] = scale * s + relh[j / gw] + relw[j % gw];
    mx = std::max(mx, logit[j]);
  }
  double sum = 0;
  for (int j = 0; j < T; ++j) sum += (logit[j] = std::exp(logit[j] - mx));
  for (int d = 0; d < D; ++d) out_row[d] = 0;
  for (int j = 0; j < T; ++j) {
    const float* v = at(j, 2);
    const double p = logit[j] / sum;
    for (int d = 0; d < D; ++d) out_row[d] += p * v[d];
  }
}

struct Result {
  bool ok = true;
  std::string why;
  double max_abs = 0, rel_l2 = 0;
  size_t checked = 0;
};

constexpr size_t kGuard = 4096;              // bf16 elements after the output
constexpr uint16_t kGuardBits = 0x5A5A;      // a finite bf16 pattern
constexpr unsigned char kPoisonByte = 0xFF;  // 0xFFFF is a bf16 NaN

bool run_case(const Case& c, bool do_time, int seed) {
  const int B = c.sequences(), H = c.heads, D = c.head_dim, gh = c.grid_h, gw = c.grid_w, T = gh * gw;
  const size_t n_qkv = c.tokens() * 3 * H * D, n_out = c.tokens() * H * D, n_pad = size_t(3) * H * D;
  const size_t n_rh = size_t(2 * gh - 1) * D, n_rw = size_t(2 * gw - 1) * D;

  // Inputs: bf16 values, kept as floats for the reference. fp32 tables hold bf16-representable
  // values, so that the check isolates the kernel's math from the documented bf16 rounding of rel_pos.
  std::vector<__nv_bfloat16> qkv_h(n_qkv), rh_h(n_rh), rw_h(n_rw), pad_h(n_pad);
  std::vector<float> qkv_f(n_qkv), rh_f(n_rh), rw_f(n_rw), pad_f(n_pad);
  fill_normal(qkv_h, qkv_f, 1.f, seed * 3);
  fill_normal(rh_h, rh_f, c.rel_std, seed * 3 + 1);
  fill_normal(rw_h, rw_f, c.rel_std, seed * 3 + 2);
  fill_normal(pad_h, pad_f, 1.f, seed * 3 + 7);
  std::mt19937_64 rng(seed);

  // "unaligned out" cases: the output 4-byte aligned only (the API's minimum), 2 elements in.
  const size_t out_off = c.name.find("unaligned out") != std::string::npos ? 2 : 0;
  DeviceBuffer<__nv_bfloat16> qkv_d(n_qkv), out_buf(n_out + kGuard + out_off), rh_d(n_rh), rw_d(n_rw);
  struct {
    __nv_bfloat16* p;
    __nv_bfloat16* get() const { return p; }
  } out_d{out_buf.get() + out_off};
  DeviceBuffer<float> rh32_d(n_rh), rw32_d(n_rw);
  DeviceBuffer<__nv_bfloat16> pad_d(n_pad);
  CUDA_CHECK(cudaMemcpy(pad_d.get(), pad_h.data(), n_pad * sizeof(__nv_bfloat16), cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(qkv_d.get(), qkv_h.data(), n_qkv * sizeof(__nv_bfloat16), cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(rh_d.get(), rh_h.data(), n_rh * sizeof(__nv_bfloat16), cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(rw_d.get(), rw_h.data(), n_rw * sizeof(__nv_bfloat16), cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(rh32_d.get(), rh_f.data(), n_rh * sizeof(float), cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(rw32_d.get(), rw_f.data(), n_rw * sizeof(float), cudaMemcpyHostToDevice));

  Stream stream;
  RelPosAttentionParams p;
  p.qkv = qkv_d.get();
  p.rel_pos_fp32 = c.rel_fp32;
  p.rel_pos_h = c.rel_fp32 ? static_cast<const void*>(rh32_d.get()) : static_cast<const void*>(rh_d.get());
  p.rel_pos_w = c.rel_fp32 ? static_cast<const void*>(rw32_d.get()) : static_cast<const void*>(rw_d.get());
  p.out = out_d.get();
  p.batch = c.batch;
  p.heads = H;
  p.head_dim = D;
  p.grid_h = gh;
  p.grid_w = gw;
  p.image_h = c.image_h;
  p.image_w = c.image_w;
  p.pad_qkv = c.image_h > 0 ? pad_d.get() : nullptr;

  // Poison the output, mark the guard, run once.
  std::vector<uint16_t> guard(kGuard, kGuardBits);
  CUDA_CHECK(cudaMemset(out_d.get(), kPoisonByte, n_out * sizeof(__nv_bfloat16)));
  CUDA_CHECK(cudaMemcpy(out_d.get() + n_out, guard.data(), kGuard * sizeof(uint16_t), cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaDeviceSynchronize());  // the copies and memsets ran on the legacy stream; ours does not wait on it
  segany::cuda::attention_relpos(p, stream.get());
  CUDA_CHECK(cudaStreamSynchronize(stream.get()));
  CUDA_CHECK(cudaGetLastError());
  std::vector<__nv_bfloat16> out_h(n_out + kGuard);
  CUDA_CHECK(cudaMemcpy(out_h.data(), out_d.get(), (n_out + kGuard) * sizeof(__nv_bfloat16), cudaMemcpyDeviceToHost));

  Result r;
  size_t non_finite = 0;
  for (size_t i = 0; i < n_out; ++i)
    if (!std::isfinite(bf16_to_float(out_h[i]))) ++non_finite;
  if (non_finite) {
    r.ok = false;
    r.why += std::to_string(non_finite) + " outputs not finite (unwritten or NaN); ";
  }
  if (std::memcmp(out_h.data() + n_out, guard.data(), kGuard * sizeof(uint16_t)) != 0) {
    r.ok = false;
    r.why += "wrote past the output; ";
  }

  // Sampled reference rows.
  std::vector<std::pair<int, int>> pairs;
  if (c.ref_pairs == 0 || c.ref_pairs >= B * H) {  // B: sequences (windows)
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < H; ++h) pairs.push_back({b, h});
  } else {
    pairs.push_back({0, 0});
    pairs.push_back({B - 1, H - 1});
    std::uniform_int_distribution<int> pick_b(0, B - 1), pick_h(0, H - 1);
    while (int(pairs.size()) < c.ref_pairs) pairs.push_back({pick_b(rng), pick_h(rng)});
  }
  std::vector<RowSample> rows;
  for (auto [b, h] : pairs) {  // real tokens only: padding tokens have no output
    for (int i = 0; i < T; i += c.ref_row_step)
      if (c.token(b, i) >= 0) rows.push_back({b, h, i});
    if ((T - 1) % c.ref_row_step != 0 && c.token(b, T - 1) >= 0) rows.push_back({b, h, T - 1});
  }
  std::vector<double> ref(rows.size() * D);
  parallel_for(int(rows.size()), [&](int n) {
    reference_row(qkv_f, pad_f, rh_f, rw_f, c, rows[n].b, rows[n].h, rows[n].i, &ref[size_t(n) * D]);
  });
  double diff2 = 0, ref2 = 0;
  size_t bad = 0;
  std::string first_bad;
  for (size_t n = 0; n < rows.size(); ++n)
    for (int d = 0; d < D; ++d) {
      const auto& s = rows[n];
      const double want = ref[n * D + d];
      const double got = bf16_to_float(out_h[size_t(c.token(s.b, s.i)) * H * D + size_t(s.h) * D + d]);
      const double e = std::fabs(got - want);
      diff2 += (got - want) * (got - want);
      ref2 += want * want;
      r.max_abs = std::max(r.max_abs, std::isfinite(e) ? e : INFINITY);
      if (!(e <= 1e-2 + 2e-2 * std::fabs(want))) {
        if (!bad++) {
          char buf[160];
          std::snprintf(buf, sizeof buf, "first mismatch b=%d h=%d token=%d d=%d: gpu %.5f ref %.5f; ", s.b, s.h, s.i,
                        d, got, want);
          first_bad = buf;
        }
      }
      ++r.checked;
    }
  r.rel_l2 = std::sqrt(diff2 / std::max(ref2, 1e-30));
  if (bad) {
    r.ok = false;
    r.why += std::to_string(bad) + " of " + std::to_string(r.checked) + " elements off; " + first_bad;
  }
  if (!(r.rel_l2 <= 1e-2)) {
    r.ok = false;
    r.why += "relative L2 error too large; ";
  }

  char image[32] = "";
  if (c.image_h > 0) std::snprintf(image, sizeof image, " on %dx%d", c.image_h, c.image_w);
  std::printf(
      "%-30s B=%-4d H=%-3d D=%-3d grid=%2dx%-2d%s rel_pos %s std %.2f | max_abs %.2e rel_l2 %.2e (%zu checked) %s",
      c.name.c_str(), B, H, D, gh, gw, image, c.rel_fp32 ? "f32 " : "bf16", c.rel_std, r.max_abs, r.rel_l2, r.checked,
      r.ok ? "ok" : "FAIL");
  if (!r.ok) std::printf(": %s", r.why.c_str());
  if (!do_time) std::printf(" [%s]", segany::cuda::attention_relpos_launch_info(p).kernel);

  if (do_time && r.ok) {
    // Warm up, then time back-to-back launches.
    const int warmup = 3, iters = 20;
    for (int it = 0; it < warmup; ++it) segany::cuda::attention_relpos(p, stream.get());
    Event start, stop;
    CUDA_CHECK(cudaEventRecord(start.get(), stream.get()));
    for (int it = 0; it < iters; ++it) segany::cuda::attention_relpos(p, stream.get());
    CUDA_CHECK(cudaEventRecord(stop.get(), stream.get()));
    CUDA_CHECK(cudaEventSynchronize(stop.get()));
    CUDA_CHECK(cudaGetLastError());
    float ms = 0;
    CUDA_CHECK(cudaEventElapsedTime(&ms, start.get(), stop.get()));
    const double sec = ms / 1e3 / iters;
    const double tflops = segany::cuda::attention_relpos_flops(p) / sec / 1e12;
    const double gbs = double(n_qkv + n_out) * sizeof(__nv_bfloat16) / sec / 1e9;  // real tokens only
    std::printf(" | %9.1f us  %6.1f TFLOP/s  %6.0f GB/s", sec * 1e6, tflops, gbs);
    const auto info = segany::cuda::attention_relpos_launch_info(p);
    std::printf(" | %s: %lld blocks x %d threads, %d regs, %zu B local, %zu B smem, %d blocks/SM", info.kernel,
                info.grid_blocks, info.threads_per_block, info.attributes.numRegs, info.attributes.localSizeBytes,
                info.smem_bytes, info.blocks_per_sm);
  }
  std::printf("\n");
  std::fflush(stdout);
  return r.ok;
}

// The launch is graph-capturable, also as a kernel's very first launch (which sets its shared
// memory limit): capture it, replay, and expect the bits of a direct launch. Runs first.
bool check_graph_capture(const char* name, int B, int H, int D, int gh, int gw, int image_h, int image_w) {
  const size_t tokens = image_h > 0 ? size_t(B) * image_h * image_w : size_t(B) * gh * gw;
  const size_t n_qkv = tokens * 3 * H * D, n_out = tokens * H * D;
  const size_t n_rh = size_t(2 * gh - 1) * D, n_rw = size_t(2 * gw - 1) * D;
  std::vector<__nv_bfloat16> qkv_h(n_qkv), rh_h(n_rh), rw_h(n_rw);
  std::vector<float> qkv_f(n_qkv), rh_f(n_rh), rw_f(n_rw);
  fill_normal(qkv_h, qkv_f, 1.f, 101);
  fill_normal(rh_h, rh_f, 0.5f, 102);
  fill_normal(rw_h, rw_f, 0.5f, 103);
  DeviceBuffer<__nv_bfloat16> qkv_d(n_qkv), rh_d(n_rh), rw_d(n_rw), out1(n_out), out2(n_out), pad_d(size_t(3) * H * D);
  CUDA_CHECK(cudaMemcpy(qkv_d.get(), qkv_h.data(), n_qkv * 2, cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(pad_d.get(), qkv_h.data(), size_t(3) * H * D * 2, cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(rh_d.get(), rh_h.data(), n_rh * 2, cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemcpy(rw_d.get(), rw_h.data(), n_rw * 2, cudaMemcpyHostToDevice));
  CUDA_CHECK(cudaMemset(out1.get(), kPoisonByte, n_out * 2));
  CUDA_CHECK(cudaMemset(out2.get(), kPoisonByte, n_out * 2));
  CUDA_CHECK(cudaDeviceSynchronize());  // as in run_case: our stream does not wait on the legacy one
  Stream stream;
  RelPosAttentionParams p;
  p.qkv = qkv_d.get();
  p.rel_pos_h = rh_d.get();
  p.rel_pos_w = rw_d.get();
  p.batch = B;
  p.heads = H;
  p.head_dim = D;
  p.grid_h = gh;
  p.grid_w = gw;
  p.image_h = image_h;
  p.image_w = image_w;
  p.pad_qkv = image_h > 0 ? pad_d.get() : nullptr;
  p.out = out1.get();
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  CUDA_CHECK(cudaStreamBeginCapture(stream.get(), cudaStreamCaptureModeGlobal));
  try {
    segany::cuda::attention_relpos(p, stream.get());
  } catch (...) {
    check_release(cudaStreamEndCapture(stream.get(), &graph), "cudaStreamEndCapture");
    if (graph) check_release(cudaGraphDestroy(graph), "cudaGraphDestroy");
    throw;
  }
  CUDA_CHECK(cudaStreamEndCapture(stream.get(), &graph));
  CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  CUDA_CHECK(cudaGraphLaunch(exec, stream.get()));
  p.out = out2.get();
  segany::cuda::attention_relpos(p, stream.get());
  CUDA_CHECK(cudaStreamSynchronize(stream.get()));
  CUDA_CHECK(cudaGraphExecDestroy(exec));
  CUDA_CHECK(cudaGraphDestroy(graph));
  std::vector<uint16_t> a(n_out), b(n_out);
  CUDA_CHECK(cudaMemcpy(a.data(), out1.get(), n_out * 2, cudaMemcpyDeviceToHost));
  CUDA_CHECK(cudaMemcpy(b.data(), out2.get(), n_out * 2, cudaMemcpyDeviceToHost));
  size_t finite = 0;
  for (uint16_t x : a) finite += (x & 0x7F80u) != 0x7F80u;
  const bool ok = a == b && finite == n_out;
  std::printf("%-28s first launch captured in a graph, replay == direct launch bit for bit: %s [%s]\n", name,
              ok ? "ok" : "FAIL", segany::cuda::attention_relpos_launch_info(p).kernel);
  return ok;
}

// Unsupported shapes are refused with std::invalid_argument, before any launch.
bool check_refusals() {
  RelPosAttentionParams p;
  p.qkv = reinterpret_cast<const __nv_bfloat16*>(uintptr_t(256));
  p.rel_pos_h = p.rel_pos_w = p.qkv;
  p.out = reinterpret_cast<__nv_bfloat16*>(uintptr_t(256));
  p.batch = 1;
  p.heads = 1;
  struct Bad {
    int head_dim, gh, gw;
  };
  bool ok = true;
  for (const Bad& bad : {Bad{96, 14, 14}, Bad{64, 17, 14}, Bad{80, 32, 32}, Bad{64, 65, 64}, Bad{48, 64, 64}}) {
    p.head_dim = bad.head_dim;
    p.grid_h = bad.gh;
    p.grid_w = bad.gw;
    bool threw = false;
    try {
      segany::cuda::attention_relpos(p, nullptr);
    } catch (const std::invalid_argument&) {
      threw = true;
    }
    ok &= threw && !segany::cuda::attention_relpos_supported(bad.head_dim, bad.gh, bad.gw);
  }
  // Windows on an image grid: at most 16 x 16, and pad_qkv required.
  p.head_dim = 64;
  p.image_h = p.image_w = 64;
  for (int window : {64, 14}) {
    p.grid_h = p.grid_w = window;
    bool threw = false;
    try {
      segany::cuda::attention_relpos(p, nullptr);  // pad_qkv is null
    } catch (const std::invalid_argument&) {
      threw = true;
    }
    ok &= threw;
  }
  std::printf("%-28s unsupported shapes throw std::invalid_argument: %s\n", "refusals", ok ? "ok" : "FAIL");
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  // --quick: the small correctness cases only; --only NAME: that case alone (for profilers).
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  const std::string only = argc > 2 && std::string(argv[1]) == "--only" ? argv[2] : "";
  int passed = 0, failed = 0;
  auto tally = [&](bool ok) { ok ? ++passed : ++failed; };
  try {
    int device = 0;
    cudaDeviceProp prop{};
    CUDA_CHECK(cudaGetDevice(&device));
    CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    std::printf("device %d: %s, sm_%d%d, %d SMs, %zu KiB shared memory per block (opt-in)\n", device, prop.name,
                prop.major, prop.minor, prop.multiProcessorCount, prop.sharedMemPerBlockOptin / 1024);

    // name, batch, heads, head_dim, grid_h, grid_w, rel_std, rel_fp32, timed, ref_pairs, ref_row_step
    const std::vector<Case> cases = {
        // Small cases, every row checked: windows (padded queries and keys), odd grids, fp32 tables,
        // a global grid with a partial query block.
        {"windows 14x14 d64", 6, 3, 64, 14, 14, 0.5f, false, false, 0, 1},
        {"windows 14x14 d80 f32", 5, 2, 80, 14, 14, 1.0f, true, false, 0, 1},
        {"windows 14x14 d80 small rel", 4, 3, 80, 14, 14, 0.02f, false, false, 0, 1},
        {"windows 5x7 d64", 3, 2, 64, 5, 7, 0.5f, false, false, 0, 1},
        {"windows 14x14 d64 unaligned out", 20, 3, 64, 14, 14, 0.5f, false, false, 0, 2},
        {"windows 16x16 d80", 2, 2, 80, 16, 16, 0.5f, true, false, 0, 1},
        {"windows 3x1 d64", 2, 5, 64, 3, 1, 0.5f, false, false, 0, 1},
        {"windows 1x9 d80", 2, 5, 80, 1, 9, 0.5f, false, false, 0, 1},
        // Many more (window, head) items than SMs: each persistent CTA runs several items through its
        // two shared-memory stages (single-stage at 16 x 16, head dim 80), every item checked.
        {"windows 14x14 d64 many", 150, 4, 64, 14, 14, 0.5f, false, false, 0, 3},
        {"windows 14x14 d80 f32 many", 100, 5, 80, 14, 14, 1.0f, true, false, 0, 3},
        {"windows 5x7 d80 many", 300, 2, 80, 5, 7, 0.5f, false, false, 0, 2},
        {"windows 16x16 d80 many", 90, 3, 80, 16, 16, 0.5f, false, false, 0, 5},
        {"windows 16x16 d64 many", 90, 3, 64, 16, 16, 0.5f, false, false, 0, 5},
        {"global 5x64 d64", 2, 2, 64, 5, 64, 0.5f, false, false, 0, 1},
        {"global 1x64 d64", 3, 2, 64, 1, 64, 0.5f, false, false, 0, 1},
        {"global 2x64 d80", 2, 2, 80, 2, 64, 0.5f, false, false, 0, 1},
        {"global 7x64 d64 f32", 2, 3, 64, 7, 64, 1.0f, true, false, 0, 1},
        {"global 64x64 d64", 2, 2, 64, 64, 64, 0.5f, false, false, 0, 7},
        {"global 33x64 d80 big rel", 1, 3, 80, 33, 64, 2.0f, false, false, 0, 3},
        {"global 3x64 d80 f32", 2, 3, 80, 3, 64, 1.0f, true, false, 0, 1},
        {"global 64x64 d80", 1, 2, 80, 64, 64, 0.3f, false, false, 0, 7},
        // Windows cut from an image grid (padding tokens = pad_qkv), every window checked: SAM's
        // 64 x 64 by 14 (25 windows, 6 padding rows and columns), odd grids, exact tiling, many items.
        {"image windows 64x64 d64", 1, 3, 64, 14, 14, 0.5f, false, false, 0, 2, 64, 64},
        {"image windows 64x64 d80 f32", 2, 2, 80, 14, 14, 1.0f, true, false, 0, 3, 64, 64},
        {"image windows 9x23 d64", 3, 2, 64, 7, 7, 0.5f, false, false, 0, 1, 9, 23},
        {"image windows 13x5 d80", 2, 3, 80, 4, 6, 0.5f, false, false, 0, 1, 13, 5},
        {"image windows 28x28 d80", 2, 2, 80, 14, 14, 0.5f, false, false, 0, 1, 28, 28},
        {"image windows 30x17 d64 16", 3, 2, 64, 16, 16, 0.5f, false, false, 0, 1, 30, 17},
        {"image windows 64x64 d80 many", 6, 5, 80, 14, 14, 0.5f, false, false, 0, 5, 64, 64},
        // SAM at batch 8 (windows: 8 images of 64 x 64, 25 windows each), sampled and timed.
        {"vit_b windows", 8, 12, 64, 14, 14, 0.5f, false, true, 4, 1, 64, 64},
        {"vit_l windows", 8, 16, 64, 14, 14, 0.5f, false, true, 4, 1, 64, 64},
        {"vit_h windows", 8, 16, 80, 14, 14, 0.5f, false, true, 4, 1, 64, 64},
        {"vit_b global", 8, 12, 64, 64, 64, 0.5f, false, true, 3, 29},
        {"vit_l global", 8, 16, 64, 64, 64, 0.5f, false, true, 3, 29},
        {"vit_h global", 8, 16, 80, 64, 64, 0.5f, false, true, 3, 29},
        {"vit_h global f32 rel", 8, 16, 80, 64, 64, 0.1f, true, true, 3, 29},
    };
    // Global grids and windows up to 14 x 14 run sm_90a kernels on compute capability 9.0 (when
    // built for sm_90a); there every such case runs a second time on the mma.sync kernel (name
    // suffix " sm80").
    const bool two_paths = prop.major == 9 && prop.minor == 0;
    if (only.empty()) {
      struct Capture {
        const char* name;
        int B, H, D, gh, gw, image_h, image_w;
      };
      for (const Capture& g : {Capture{"graph capture windows", 3, 2, 64, 14, 14, 0, 0},
                               Capture{"graph capture image windows", 2, 2, 80, 14, 14, 64, 64},
                               Capture{"graph capture global d80", 2, 3, 80, 3, 64, 0, 0},
                               Capture{"graph capture global d64", 2, 2, 64, 2, 64, 0, 0}}) {
        try {
          tally(check_graph_capture(g.name, g.B, g.H, g.D, g.gh, g.gw, g.image_h, g.image_w));
        } catch (const std::exception& e) {
          std::printf("%-28s FAIL: %s\n", g.name, e.what());
          tally(false);
        }
      }
    }
    int seed = 1;
    for (const Case& c0 : cases) {
      const bool global = c0.grid_w == 64 && c0.image_h == 0;
      const bool sm90_window = !global && c0.grid_h <= 14 && c0.grid_w <= 14;
      for (int path = 0; path < ((global || sm90_window) && two_paths ? 2 : 1); ++path) {
        Case c = c0;
        if (path == 1) c.name += " sm80";
        if ((quick && c.timed) || (!only.empty() && c.name != only)) continue;
        segany::cuda::attention_relpos_enable_sm90(path == 0);
        try {
          tally(run_case(c, c.timed, seed++));
        } catch (const std::exception& e) {
          std::printf("%-28s FAIL: %s\n", c.name.c_str(), e.what());
          tally(false);
        }
        segany::cuda::attention_relpos_enable_sm90(true);
      }
    }
    if (only.empty()) tally(check_refusals());
  } catch (const std::exception& e) {
    std::printf("error: %s\n", e.what());
    ++failed;
  }
  if (g_release_failures) ++failed;
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
