// Memory-bound kernels of the CUDA backend (norms, elementwise, layout changes) and a plain, exact attention kernel for the mask decoder. Each is the twin of the CPU
// backend's op of the same name (src/backend/cpu/cpu_backend.cpp); tests/test_cuda.cpp holds them
// to it.
//
// Elements are fp32, bf16 or fp16 on both sides (templates over the input and output types); all
// arithmetic is fp32. Where the sizes and pointers allow, a thread moves 8 elements with 16-byte
// accesses (elements.cuh); otherwise one element at a time.
#include <cuda_bf16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <string>

#include "backend/cuda/cuda_utils.h"
#include "backend/cuda/elements.cuh"
#include "backend/cuda/gemm.h"
#include "backend/cuda/kernels.h"
#include "backend/quantize.h"

namespace segany::cuda {
namespace {

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float gelu_erf(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752440f)); }

// ---- host-side dispatch ------------------------------------------------------------------------

void require_device(const Tensor& t, const char* op, const char* what) {
  check(t.defined() && t.device() == Device::CUDA && is_float_dtype(t.dtype()),
        std::string("cuda ") + op + ": " + what + " must be a float32, bf16 or fp16 tensor on the GPU, found " +
            (t.defined() ? std::string(dtype_name(t.dtype())) + (t.device() == Device::CUDA ? " on the GPU" : " on the host")
                         : std::string("nothing")));
}

void require_f32_param(const Tensor& t, int64_t n, const char* op, const char* what) {
  check(t.defined() && t.device() == Device::CUDA && t.dtype() == DType::F32 && t.numel() == n,
        std::string("cuda ") + op + ": " + what + " must be float32 [" + std::to_string(n) + "] on the GPU, found " +
            (t.defined() ? std::string(dtype_name(t.dtype())) + " " + shape_str(t.shape()) : std::string("nothing")));
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// A grid-stride launch shape for `work` independent items of `threads` threads each.
unsigned blocks_for(int64_t work, int threads) {
  const int64_t b = (work + threads - 1) / threads;
  return static_cast<unsigned>(std::clamp<int64_t>(b, 1, 1 << 20));
}

constexpr int kThreads = 256;

// ---- runs: copy contiguous runs of elements from one layout to another -----------------
//
// patchify, im2col and copy_tokens all move runs of `len`
// contiguous elements; a map says where run r comes from (-1: zeros) and where it goes.

template <class Map, class TS, class TD, int V>
__global__ void run_copy_kernel(const TS* src, TD* dst, Map map, int64_t runs, int64_t len) {
  const int64_t chunks = len / V, total = runs * chunks;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t run = i / chunks, e = (i - run * chunks) * V;
    int64_t s, d;
    map(run, s, d);
    float v[V];
    if (s >= 0) {
      load_vec<V>(src + s + e, v);
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) v[k] = 0.0f;
    }
    store_vec<V>(dst + d + e, v);
  }
}

// `vec_ok`: every run offset the map produces is a multiple of 8 elements (and len too).
template <class Map>
void launch_runs(const Tensor& src, Tensor& dst, const Map& map, int64_t runs, int64_t len, bool vec_ok,
                 cudaStream_t stream, const char* what) {
  if (runs * len == 0) return;
  const bool v8 = vec_ok && len % 8 == 0 && aligned16(src.data()) && aligned16(dst.data());
  with_type(src.dtype(), [&](auto ts) {
    with_type(dst.dtype(), [&](auto td) {
      using TS = decltype(ts);
      using TD = decltype(td);
      const auto* s = static_cast<const TS*>(src.data());
      auto* d = static_cast<TD*>(dst.data());
      if (v8)
        run_copy_kernel<Map, TS, TD, 8><<<blocks_for(runs * len / 8, kThreads), kThreads, 0, stream>>>(s, d, map, runs, len);
      else
        run_copy_kernel<Map, TS, TD, 1><<<blocks_for(runs * len, kThreads), kThreads, 0, stream>>>(s, d, map, runs, len);
    });
  });
  CUDA_CHECK_LAUNCH(what);
}

// run = ((b*Ho + i)*Wo + j)*p + ky over y, len p*C.
struct PatchifyMap {
  int64_t H, W, C, Ho, Wo, p;
  __device__ void operator()(int64_t run, int64_t& s, int64_t& d) const {
    int64_t t = run;
    const int64_t ky = t % p; t /= p;
    const int64_t j = t % Wo; t /= Wo;
    const int64_t i = t % Ho;
    const int64_t b = t / Ho;
    s = ((b * H + i * p + ky) * W + j * p) * C;
    d = run * p * C;
  }
};


// run = ((b*H + i)*W + j)*9 + ky*3 + kx over y, len C.
struct Im2colMap {
  int64_t H, W, C;
  __device__ void operator()(int64_t run, int64_t& s, int64_t& d) const {
    int64_t t = run;
    const int k = static_cast<int>(t % 9); t /= 9;
    const int64_t j = t % W; t /= W;
    const int64_t i = t % H;
    const int64_t b = t / H;
    const int64_t r = i + k / 3 - 1, c = j + k % 3 - 1;
    s = (r < 0 || r >= H || c < 0 || c >= W) ? -1 : ((b * H + r) * W + c) * C;
    d = run * C;
  }
};

// run = b, len count*C.
struct TokensMap {
  int64_t Ts, Td, sb, db, C;
  bool shared;  // a source of batch 1, copied into every sequence
  __device__ void operator()(int64_t run, int64_t& s, int64_t& d) const {
    s = ((shared ? 0 : run) * Ts + sb) * C;
    d = (run * Td + db) * C;
  }
};

// ---- elementwise ------------------------------------------------------------------------------

template <class TA, class TB, class TY, int V>
__global__ void add_kernel(const TA* a, const TB* b, TY* y, int64_t n, int64_t nb) {
  for (int64_t i = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) * V; i < n; i += int64_t(gridDim.x) * blockDim.x * V) {
    float va[V], vb[V];
    load_vec<V>(a + i, va);
    load_vec<V>(b + i % nb, vb);
#pragma unroll
    for (int k = 0; k < V; ++k) va[k] += vb[k];
    store_vec<V>(y + i, va);
  }
}

template <class T, int V>
__global__ void activation_kernel(T* x, int64_t n, bool gelu) {
  for (int64_t i = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) * V; i < n; i += int64_t(gridDim.x) * blockDim.x * V) {
    float v[V];
    load_vec<V>(x + i, v);
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] = gelu ? gelu_erf(v[k]) : fmaxf(v[k], 0.0f);
    store_vec<V>(x + i, v);
  }
}

// ---- LayerNorm: one warp, or a group of 8 or 16 of its lanes, per output row --------------------

// Eight floats times `inv` to eight e4m3 bytes (round to nearest even, saturating), the first in
// the low byte: one 8-byte store.
__device__ __forceinline__ uint64_t e4m3x8(const float (&v)[8], float inv) {
  uint64_t packed = 0;
#pragma unroll
  for (int j = 0; j < 8; j += 2)
    packed |= uint64_t{static_cast<uint16_t>(
                  __nv_cvt_float2_to_fp8x2(make_float2(v[j] * inv, v[j + 1] * inv), __NV_SATFINITE, __NV_E4M3))}
              << (8 * j);
  return packed;
}

// f(std::integral_constant<int, V>{}) with V = vpt, 1 to 8 (the vectors of 8 a lane holds).
template <class F>
void with_vpt(int vpt, F&& f) {
  switch (vpt) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

// What a norm reads and writes: y = act(LayerNorm(x + r)) and y_pe = y + pe, where r and pe (each
// optional) repeat every r_rows / pe_rows rows (one image's rows added to every prompt's).
struct NormArgs {
  const void* x;
  const void* r;  // null: no residual
  int64_t r_rows;
  const float* gamma;
  const float* beta;
  void* y;
  const void* pe;  // null: no y_pe
  int64_t pe_rows;
  void* y_pe;
  int64_t rows;
  int C;
  float eps;
  bool gelu;
};

// Sum over each group of kLanes lanes (a butterfly; every lane of the warp takes part).
template <int kLanes>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int o = kLanes / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// C % 8 == 0 and C <= kLanes * 8 * VPT: each lane holds VPT vectors of 8 in registers, statistics by
// two passes over the registers (mean, then the centred sum of squares), all fp32. Narrow rows
// (C <= 64, 128) share a warp: kLanes lanes per row, 32 / kLanes rows per warp.
// Row `row` of x (+ r) into registers v, and its mean and 1 / std: the statistics of both vector
// norms below. Lanes past the last row (live false) read row 0 and still take part in the shuffles.
template <int VPT, int kLanes, class TX>
__device__ __forceinline__ void norm_row_stats(const NormArgs& a, int64_t row, bool live, int lane, float (&v)[VPT][8],
                                               float& mean_out, float& rstd_out) {
  const int C = a.C, nvec = C / 8;
  const TX* xr = static_cast<const TX*>(a.x) + (live ? row : 0) * C;
  const TX* rr = a.r ? static_cast<const TX*>(a.r) + (live ? row % a.r_rows : 0) * C : nullptr;
  float sum = 0.0f;
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int vi = lane + kLanes * k;
    if (vi < nvec) {
      load_vec<8>(xr + vi * 8, v[k]);
      if (rr) {
        float w[8];
        load_vec<8>(rr + vi * 8, w);
#pragma unroll
        for (int j = 0; j < 8; ++j) v[k][j] += w[j];
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) sum += v[k][j];
    }
  }
  const float mean = group_sum<kLanes>(sum) / C;
  float sq = 0.0f;
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    if (lane + kLanes * k < nvec) {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const float d = v[k][j] - mean;
        sq += d * d;
      }
    }
  }
  mean_out = mean;
  rstd_out = rsqrtf(group_sum<kLanes>(sq) / C + a.eps);
}

template <int VPT, int kLanes, class TX, class TY>
__global__ void layer_norm_vec_kernel(NormArgs a) {
  constexpr int kRowsPerWarp = 32 / kLanes;
  const int lane = threadIdx.x % kLanes;
  const int64_t row = (blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32) * kRowsPerWarp +
                      (threadIdx.x % 32) / kLanes;
  const bool live = row < a.rows;
  const int C = a.C, nvec = C / 8;
  float v[VPT][8], mean, rstd;
  norm_row_stats<VPT, kLanes, TX>(a, row, live, lane, v, mean, rstd);
  if (!live) return;
  TY* yr = static_cast<TY*>(a.y) + row * C;
  const TY* per = a.pe ? static_cast<const TY*>(a.pe) + (row % a.pe_rows) * C : nullptr;
  TY* ype = a.pe ? static_cast<TY*>(a.y_pe) + row * C : nullptr;
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int vi = lane + kLanes * k;
    if (vi < nvec) {
      float g[8], b[8], o[8];
      load_vec<8>(a.gamma + vi * 8, g);
      load_vec<8>(a.beta + vi * 8, b);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        o[j] = (v[k][j] - mean) * rstd * g[j] + b[j];
        if (a.gelu) o[j] = gelu_erf(o[j]);
      }
      store_vec<8>(yr + vi * 8, o);
      if (per) {
        float e[8];
        load_vec<8>(per + vi * 8, e);
#pragma unroll
        for (int j = 0; j < 8; ++j) e[j] += to_float(from_float<TY>(o[j]));
        store_vec<8>(ype + vi * 8, e);
      }
    }
  }
}

// LayerNorm straight into e4m3 rows with a scale each (the fp8 layers' input, quantize.h's
// layout): the normalised row stays in registers, its largest magnitude is a warp maximum, and the
// bf16 output and the separate quantization pass are skipped. A warp per row, C % 8 == 0.
template <int VPT, class TX>
__global__ void layer_norm_e4m3_kernel(NormArgs a, uint8_t* q, float* scale) {
  const int lane = threadIdx.x % 32;
  const int64_t row = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32;
  const bool live = row < a.rows;
  const int C = a.C, nvec = C / 8;
  float v[VPT][8], mean, rstd;
  norm_row_stats<VPT, 32, TX>(a, row, live, lane, v, mean, rstd);
  float amax = 0.0f;
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int vi = lane + 32 * k;
    if (vi < nvec) {
      float g[8], b[8];
      load_vec<8>(a.gamma + vi * 8, g);
      load_vec<8>(a.beta + vi * 8, b);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        v[k][j] = (v[k][j] - mean) * rstd * g[j] + b[j];
        amax = fmaxf(amax, fabsf(v[k][j]));
      }
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  if (!live) return;
  const float inv = e4m3_row_inverse(amax);
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int vi = lane + 32 * k;
    if (vi < nvec) *reinterpret_cast<uint64_t*>(q + row * C + vi * 8) = e4m3x8(v[k], inv);
  }
  if (lane == 0) scale[row] = e4m3_row_scale(amax);
}

// Any C and alignment: three passes over the row in memory (it stays in L1).
template <class TX, class TY>
__global__ void layer_norm_any_kernel(NormArgs a) {
  const int lane = threadIdx.x % 32, C = a.C;
  const int64_t row = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32;
  if (row >= a.rows) return;
  const TX* xr = static_cast<const TX*>(a.x) + row * C;
  const TX* rr = a.r ? static_cast<const TX*>(a.r) + (row % a.r_rows) * C : nullptr;
  auto in = [&](int k) { return rr ? to_float(xr[k]) + to_float(rr[k]) : to_float(xr[k]); };
  float sum = 0.0f;
  for (int k = lane; k < C; k += 32) sum += in(k);
  const float mean = warp_sum(sum) / C;
  float sq = 0.0f;
  for (int k = lane; k < C; k += 32) {
    const float d = in(k) - mean;
    sq += d * d;
  }
  const float rstd = rsqrtf(warp_sum(sq) / C + a.eps);
  TY* yr = static_cast<TY*>(a.y) + row * C;
  const TY* per = a.pe ? static_cast<const TY*>(a.pe) + (row % a.pe_rows) * C : nullptr;
  TY* ype = a.pe ? static_cast<TY*>(a.y_pe) + row * C : nullptr;
  for (int k = lane; k < C; k += 32) {
    const float o = (in(k) - mean) * rstd * a.gamma[k] + a.beta[k];
    const TY out = from_float<TY>(a.gelu ? gelu_erf(o) : o);
    yr[k] = out;  // y may alias x or r: element k is read above by this lane only
    if (per) ype[k] = from_float<TY>(to_float(per[k]) + to_float(out));
  }
}

template <int VPT, int kLanes, class TX, class TY>
void launch_layer_norm_vec(const NormArgs& a, cudaStream_t stream) {
  constexpr int kRowsPerBlock = kThreads / 32 * (32 / kLanes);
  const unsigned blocks = static_cast<unsigned>((a.rows + kRowsPerBlock - 1) / kRowsPerBlock);
  layer_norm_vec_kernel<VPT, kLanes, TX, TY><<<blocks, kThreads, 0, stream>>>(a);
}

// y = act(LayerNorm(x + r)), y_pe = y + pe (r and pe optional, with x's dtype and y's).
void launch_layer_norm(const Tensor& x, const Tensor* r, const Tensor& gamma, const Tensor& beta, float eps, Tensor& y,
                       const Tensor* pe, Tensor* y_pe, Activation act, cudaStream_t stream) {
  check(act == Activation::None || act == Activation::GELU, "cuda layer_norm: only GELU may follow the norm");
  const int64_t C = x.dim(-1), rows = x.numel() / C;
  if (rows == 0 || C == 0) return;
  NormArgs a{};
  a.x = x.data(), a.gamma = gamma.data_as<const float>(), a.beta = beta.data_as<const float>(), a.y = y.data();
  a.rows = rows, a.C = static_cast<int>(C), a.eps = eps, a.gelu = act == Activation::GELU;
  if (r) a.r = r->data(), a.r_rows = r->numel() / C;
  if (pe) a.pe = pe->data(), a.pe_rows = pe->numel() / C, a.y_pe = y_pe->data();
  const int vpt = (C / 8 + 31) / 32;
  const bool vec = C % 8 == 0 && vpt <= 8 && aligned16(x.data()) && aligned16(y.data()) && aligned16(gamma.data()) &&
                   aligned16(beta.data()) && (!r || aligned16(r->data())) &&
                   (!pe || (aligned16(pe->data()) && aligned16(y_pe->data())));
  with_type(x.dtype(), [&](auto tx) {
    with_type(y.dtype(), [&](auto ty) {
      using TX = decltype(tx);
      using TY = decltype(ty);
      if (!vec) {
        const unsigned blocks = static_cast<unsigned>((rows + kThreads / 32 - 1) / (kThreads / 32));
        layer_norm_any_kernel<TX, TY><<<blocks, kThreads, 0, stream>>>(a);
        return;
      }
      if (C <= 64) return launch_layer_norm_vec<1, 8, TX, TY>(a, stream);
      if (C <= 128) return launch_layer_norm_vec<1, 16, TX, TY>(a, stream);
      with_vpt(vpt, [&](auto V) { launch_layer_norm_vec<decltype(V)::value, 32, TX, TY>(a, stream); });
    });
  });
  CUDA_CHECK_LAUNCH("layer_norm kernel");
}

}  // namespace

bool layer_norm_e4m3_fits(const Tensor& x, const Tensor& gamma, const Tensor& beta) {
  const int64_t C = x.ndim() > 0 ? x.dim(-1) : 0;
  return (x.dtype() == DType::F32 || x.dtype() == DType::BF16) && C > 0 && C % 8 == 0 && C / 8 <= 32 * 8 &&
         aligned16(x.data()) && aligned16(gamma.data()) && aligned16(beta.data()) &&
         gamma.dtype() == DType::F32 && beta.dtype() == DType::F32 && gamma.numel() == C && beta.numel() == C;
}

void layer_norm_e4m3(const Tensor& x, const Tensor& gamma, const Tensor& beta, float eps, uint8_t* q, float* scale,
                     cudaStream_t stream) {
  require_device(x, "layer_norm_e4m3", "input");
  check(layer_norm_e4m3_fits(x, gamma, beta) && reinterpret_cast<uintptr_t>(q) % 8 == 0,
        "cuda layer_norm_e4m3: input " + shape_str(x.shape()) + " " + dtype_name(x.dtype()) +
            " needs C % 8 == 0, C <= 2048, float32 weights of C values and aligned buffers");
  NormArgs a{};
  a.x = x.data(), a.gamma = gamma.data_as<const float>(), a.beta = beta.data_as<const float>();
  a.C = static_cast<int>(x.dim(-1)), a.rows = x.numel() / x.dim(-1), a.eps = eps;
  if (a.rows == 0) return;
  const unsigned blocks = static_cast<unsigned>((a.rows + kThreads / 32 - 1) / (kThreads / 32));
  const int vpt = (a.C / 8 + 31) / 32;
  auto go = [&](auto tag) {
    using TX = decltype(tag);
    with_vpt(vpt, [&](auto V) {
      layer_norm_e4m3_kernel<decltype(V)::value, TX><<<blocks, kThreads, 0, stream>>>(a, q, scale);
    });
  };
  if (x.dtype() == DType::F32)
    go(float{});
  else
    go(__nv_bfloat16{});
  CUDA_CHECK_LAUNCH("layer_norm_e4m3 kernel");
}

namespace {

// ---- attention: exact, simple ------------------------------------------------------------------
//
// Block: 4 warps x 4 queries = 16 queries of one (batch, head). Keys and values pass through
// shared memory in tiles of 32, one key per lane for the scores; each lane then owns head dims
// lane, lane+32, ... of the output. Softmax online in fp32 (running max and sum per query).
// With rel-pos, the prologue forms q . rel_pos_h[row(q) - kr + gh - 1] for every key row kr and
// likewise for columns (gh + gw dot products per query), so the T x T bias is never stored.

constexpr int kAttnWarps = 4, kAttnQueriesPerWarp = 4, kAttnQueries = kAttnWarps * kAttnQueriesPerWarp, kAttnKeys = 32;

struct AttnParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  int64_t q_batch, k_batch, v_batch, o_batch;  // element strides between sequences (0: shared)
  int64_t q_row, k_row, v_row, o_row;          // between tokens
  int Tq, Tk, head_dim;                        // head h starts at h * head_dim in each row
  float scale;
  const float* rel_h;  // [2*grid_h-1, head_dim], null without rel-pos
  const float* rel_w;  // [2*grid_w-1, head_dim]
  int grid_h, grid_w;
  // Windows cut from an image grid (img_h > 0; q_batch, k_batch, v_batch, o_batch 0): sequence b is
  // window b % (n_wy * n_wx) of image b / (n_wy * n_wx), token t its grid token (wy*grid_h + t/grid_w,
  // wx*grid_w + t%grid_w); rows are grid tokens, padding tokens read pad_q/k/v and are not written.
  int img_h, img_w, n_wy, n_wx;
  const void* pad_q;
  const void* pad_k;
  const void* pad_v;

  // Row of token t of sequence b (times the row strides above), or -1 for a padding token.
  __device__ int64_t row(int64_t b, int t) const {
    if (img_h == 0) return t;
    const int64_t img = b / (int64_t(n_wy) * n_wx), w = b % (int64_t(n_wy) * n_wx);
    const int y = int(w / n_wx) * grid_h + t / grid_w, x = int(w % n_wx) * grid_w + t % grid_w;
    return (y < img_h && x < img_w) ? (img * img_h + y) * img_w + x : -1;
  }
};

size_t attention_smem_bytes(int hd, int gh, int gw, bool relpos) {
  size_t floats = size_t(kAttnQueries) * hd + size_t(kAttnKeys) * (hd + 1) + size_t(kAttnKeys) * hd +
                  size_t(kAttnWarps) * kAttnQueriesPerWarp * kAttnKeys;
  if (relpos) floats += size_t(kAttnQueries) * (gh + gw);
  return floats * sizeof(float);
}

template <class TI, class TO, int kChunks>  // kChunks = ceil(head_dim / 32)
__global__ void __launch_bounds__(kAttnWarps * 32) attention_kernel(AttnParams p) {
  extern __shared__ float smem[];
  const int hd = p.head_dim;
  float* q_s = smem;                                     // [16][hd]
  float* k_s = q_s + kAttnQueries * hd;                  // [32][hd + 1]
  float* v_s = k_s + kAttnKeys * (hd + 1);               // [32][hd]
  float* p_s = v_s + kAttnKeys * hd;                     // [4 warps][4][32]
  float* bias_s = p_s + kAttnWarps * kAttnQueriesPerWarp * kAttnKeys;  // [16][gh + gw]
  const bool relpos = p.rel_h != nullptr;
  const int nb = p.grid_h + p.grid_w;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int q0 = blockIdx.x * kAttnQueries, h = blockIdx.y;
  const int64_t b = blockIdx.z;
  const TI* qg = static_cast<const TI*>(p.q) + b * p.q_batch + int64_t(h) * hd;
  const TI* kg = static_cast<const TI*>(p.k) + b * p.k_batch + int64_t(h) * hd;
  const TI* vg = static_cast<const TI*>(p.v) + b * p.v_batch + int64_t(h) * hd;
  const TI* qpad = p.pad_q ? static_cast<const TI*>(p.pad_q) + int64_t(h) * hd : nullptr;
  const TI* kpad = p.pad_k ? static_cast<const TI*>(p.pad_k) + int64_t(h) * hd : nullptr;
  const TI* vpad = p.pad_v ? static_cast<const TI*>(p.pad_v) + int64_t(h) * hd : nullptr;

  for (int i = tid; i < kAttnQueries * hd; i += blockDim.x) {
    const int qi = i / hd, d = i % hd, t = q0 + qi;
    const int64_t r = t < p.Tq ? p.row(b, t) : 0;
    q_s[i] = t < p.Tq ? to_float(r >= 0 ? qg[r * p.q_row + d] : qpad[d]) : 0.0f;
  }
  __syncthreads();
  if (relpos) {
    for (int i = tid; i < kAttnQueries * nb; i += blockDim.x) {
      const int qi = i / nb, r = i % nb, t = min(q0 + qi, p.Tq - 1);
      const int qr = t / p.grid_w, qc = t % p.grid_w;
      const float* table = r < p.grid_h ? p.rel_h + int64_t(qr - r + p.grid_h - 1) * hd
                                        : p.rel_w + int64_t(qc - (r - p.grid_h) + p.grid_w - 1) * hd;
      float dot = 0.0f;
      for (int d = 0; d < hd; ++d) dot += q_s[qi * hd + d] * table[d];
      bias_s[i] = dot;
    }
  }

  float m[kAttnQueriesPerWarp], l[kAttnQueriesPerWarp], o[kAttnQueriesPerWarp][kChunks];
#pragma unroll
  for (int n = 0; n < kAttnQueriesPerWarp; ++n) {
    m[n] = -INFINITY;
    l[n] = 0.0f;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) o[n][c] = 0.0f;
  }
  float* pw = p_s + warp * kAttnQueriesPerWarp * kAttnKeys;

  for (int j0 = 0; j0 < p.Tk; j0 += kAttnKeys) {
    __syncthreads();  // the previous tile is consumed (and the prologue done)
    for (int i = tid; i < kAttnKeys * hd; i += blockDim.x) {
      const int j = i / hd, d = i % hd, key = j0 + j;
      const bool ok = key < p.Tk;
      const int64_t r = ok ? p.row(b, key) : 0;
      k_s[j * (hd + 1) + d] = ok ? to_float(r >= 0 ? kg[r * p.k_row + d] : kpad[d]) : 0.0f;
      v_s[j * hd + d] = ok ? to_float(r >= 0 ? vg[r * p.v_row + d] : vpad[d]) : 0.0f;
    }
    __syncthreads();
    const int key = j0 + lane;
    const bool valid = key < p.Tk;
#pragma unroll
    for (int n = 0; n < kAttnQueriesPerWarp; ++n) {
      const int qi = warp * kAttnQueriesPerWarp + n;
      float s = 0.0f;
      for (int d = 0; d < hd; ++d) s += q_s[qi * hd + d] * k_s[lane * (hd + 1) + d];
      s *= p.scale;
      if (relpos && valid) s += bias_s[qi * nb + key / p.grid_w] + bias_s[qi * nb + p.grid_h + key % p.grid_w];
      if (!valid) s = -INFINITY;
      const float m_new = fmaxf(m[n], warp_max(s));
      const float corr = expf(m[n] - m_new);
      const float pj = valid ? expf(s - m_new) : 0.0f;
      l[n] = l[n] * corr + warp_sum(pj);
#pragma unroll
      for (int c = 0; c < kChunks; ++c) o[n][c] *= corr;
      m[n] = m_new;
      pw[n * kAttnKeys + lane] = pj;
    }
    __syncwarp();
    const int nk = min(kAttnKeys, p.Tk - j0);
    for (int j = 0; j < nk; ++j) {
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        const int d = lane + 32 * c;
        const float vv = d < hd ? v_s[j * hd + d] : 0.0f;
#pragma unroll
        for (int n = 0; n < kAttnQueriesPerWarp; ++n) o[n][c] += pw[n * kAttnKeys + j] * vv;
      }
    }
    __syncwarp();
  }

  TO* og = static_cast<TO*>(p.out) + b * p.o_batch + int64_t(h) * hd;
#pragma unroll
  for (int n = 0; n < kAttnQueriesPerWarp; ++n) {
    const int t = q0 + warp * kAttnQueriesPerWarp + n;
    if (t >= p.Tq) continue;
    const int64_t r = p.row(b, t);
    if (r < 0) continue;
    const float inv = 1.0f / l[n];
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const int d = lane + 32 * c;
      if (d < hd) og[r * p.o_row + d] = from_float<TO>(o[n][c] * inv);
    }
  }
}

template <class TI, class TO, int kChunks>
void launch_attention_typed(const AttnParams& p, int heads, int64_t batch, size_t smem, cudaStream_t stream) {
  auto kernel = attention_kernel<TI, TO, kChunks>;
  // Above 48 KiB a kernel must opt in to more dynamic shared memory; once per instantiation.
  static const cudaError_t opt_in =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, 96 * 1024);
  CUDA_CHECK(opt_in);
  const dim3 grid(static_cast<unsigned>((p.Tq + kAttnQueries - 1) / kAttnQueries), static_cast<unsigned>(heads),
                  static_cast<unsigned>(batch));
  kernel<<<grid, kAttnWarps * 32, smem, stream>>>(p);
}

void launch_attention(const AttnParams& p, DType in, DType out, int heads, int64_t batch, cudaStream_t stream) {
  check(p.head_dim > 0 && p.head_dim <= 128, "cuda attention: head dim " + std::to_string(p.head_dim) +
                                                  " is outside what the kernel takes (1..128)");
  check(batch <= 65535 && heads <= 65535, "cuda attention: batch " + std::to_string(batch) + " or heads " +
                                              std::to_string(heads) + " exceeds the grid's limit of 65535");
  if (p.Tq == 0 || batch == 0) return;
  check(p.Tk > 0, "cuda attention: no keys");
  const size_t smem = attention_smem_bytes(p.head_dim, p.grid_h, p.grid_w, p.rel_h != nullptr);
  check(smem <= 96 * 1024, "cuda attention: a " + std::to_string(p.grid_h) + "x" + std::to_string(p.grid_w) +
                               " rel-pos grid needs more shared memory than the kernel has");
  const int chunks = (p.head_dim + 31) / 32;
  with_type(in, [&](auto ti) {
    with_type(out, [&](auto to) {
      using TI = decltype(ti);
      using TO = decltype(to);
      switch (chunks) {
        case 1: launch_attention_typed<TI, TO, 1>(p, heads, batch, smem, stream); break;
        case 2: launch_attention_typed<TI, TO, 2>(p, heads, batch, smem, stream); break;
        case 3: launch_attention_typed<TI, TO, 3>(p, heads, batch, smem, stream); break;
        default: launch_attention_typed<TI, TO, 4>(p, heads, batch, smem, stream); break;
      }
    });
  });
  CUDA_CHECK_LAUNCH("attention kernel");
}


// ---- attention with few keys or few queries: the mask decoder's shapes -------------------------
//
// The decoder's attentions are lopsided: 4096 image cells against ~7 prompt tokens, ~7 tokens
// against 4096 cells, and ~7 tokens among themselves, with head dims 16 and 32. The tiled kernel
// above spends its tiles on padding there, and gives the tokens-to-image case one block per head.

constexpr int kFewKeys = 32, kFewKeysThreads = 128;

// Row r[0, kHd) of one head from global memory, zero past hd: 16-byte loads where the row allows.
template <class TI, int kHd>
__device__ __forceinline__ void load_head_row(const TI* src, int hd, float* r) {
  if (hd == kHd && reinterpret_cast<uintptr_t>(src) % 16 == 0) {
#pragma unroll
    for (int d = 0; d < kHd; d += 8) {
      float v[8];
      load_vec<8>(src + d, v);
#pragma unroll
      for (int j = 0; j < 8; ++j) r[d + j] = v[j];
    }
    return;
  }
#pragma unroll
  for (int d = 0; d < kHd; ++d) r[d] = d < hd ? to_float(src[d]) : 0.0f;
}

// a . b over kHd floats in shared memory (16-byte aligned) and registers.
template <int kHd>
__device__ __forceinline__ float dot_shared(const float* a_s, const float* b) {
  float acc = 0.0f;
#pragma unroll
  for (int d = 0; d < kHd; d += 4) {
    const float4 v = *reinterpret_cast<const float4*>(a_s + d);
    acc += v.x * b[d] + v.y * b[d + 1] + v.z * b[d + 2] + v.w * b[d + 3];
  }
  return acc;
}

// Tk <= kKeys <= 32: one thread per (query, head), a block's threads taking every head of
// kFewKeysThreads / heads consecutive queries, so that a warp reads and writes whole rows. Every
// head's keys and values sit in shared memory (each head's block padded by 4 floats: the heads a
// warp reads at once fall in different banks); the scores stay in registers (an exact softmax, no
// online rescaling).
template <class TI, class TO, int kHd, int kKeys>
__global__ void __launch_bounds__(kFewKeysThreads) few_keys_attention_kernel(AttnParams p, int heads) {
  constexpr int kHeadFloats = kKeys * kHd + 4;
  extern __shared__ __align__(16) float kv_s[];  // k: [heads][kHeadFloats], then v likewise
  float* k_s = kv_s;
  float* v_s = kv_s + heads * kHeadFloats;
  const int hd = p.head_dim;
  const int64_t b = blockIdx.z;
  const TI* kg = static_cast<const TI*>(p.k) + b * p.k_batch;
  const TI* vg = static_cast<const TI*>(p.v) + b * p.v_batch;
  for (int i = threadIdx.x; i < heads * kKeys * kHd; i += blockDim.x) {
    const int h = i / (kKeys * kHd), j = (i / kHd) % kKeys, d = i % kHd;
    const bool ok = j < p.Tk && d < hd;
    const int64_t at = int64_t(j) * p.k_row + int64_t(h) * hd + d;
    k_s[h * kHeadFloats + j * kHd + d] = ok ? to_float(kg[at]) : 0.0f;
    v_s[h * kHeadFloats + j * kHd + d] = ok ? to_float(vg[int64_t(j) * p.v_row + int64_t(h) * hd + d]) : 0.0f;
  }
  __syncthreads();
  const int h = threadIdx.x % heads;
  const int t = blockIdx.x * (kFewKeysThreads / heads) + threadIdx.x / heads;
  if (t >= p.Tq || threadIdx.x >= kFewKeysThreads / heads * heads) return;
  float q[kHd];
  load_head_row<TI, kHd>(static_cast<const TI*>(p.q) + b * p.q_batch + int64_t(t) * p.q_row + int64_t(h) * hd, hd, q);
  const float* kh = k_s + h * kHeadFloats;
  const float* vh = v_s + h * kHeadFloats;
  float s[kKeys], mx = -INFINITY;
#pragma unroll
  for (int j = 0; j < kKeys; ++j) {
    s[j] = j < p.Tk ? dot_shared<kHd>(kh + j * kHd, q) * p.scale : -INFINITY;
    mx = fmaxf(mx, s[j]);
  }
  float l = 0.0f, o[kHd];
#pragma unroll
  for (int d = 0; d < kHd; ++d) o[d] = 0.0f;
#pragma unroll
  for (int j = 0; j < kKeys; ++j) {
    const float e = j < p.Tk ? expf(s[j] - mx) : 0.0f;
    l += e;
#pragma unroll
    for (int d = 0; d < kHd; d += 4) {
      const float4 v = *reinterpret_cast<const float4*>(vh + j * kHd + d);
      o[d] += e * v.x, o[d + 1] += e * v.y, o[d + 2] += e * v.z, o[d + 3] += e * v.w;
    }
  }
  const float inv = 1.0f / l;
  TO* og = static_cast<TO*>(p.out) + b * p.o_batch + int64_t(t) * p.o_row + int64_t(h) * hd;
  if (hd == kHd && reinterpret_cast<uintptr_t>(og) % 16 == 0) {
#pragma unroll
    for (int d = 0; d < kHd; d += 8) {
      float v[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] = o[d + j] * inv;
      store_vec<8>(og + d, v);
    }
    return;
  }
#pragma unroll
  for (int d = 0; d < kHd; ++d)
    if (d < hd) og[d] = from_float<TO>(o[d] * inv);
}

constexpr int kFewQueries = 32, kFewQueriesTile = 256, kFewQueriesWarps = kFewQueriesTile / 32;
// Blocks the few-queries kernel aims for by splitting the keys: four for each SM (of the current
// device when first asked).
int64_t split_target_blocks() {
  static const int64_t blocks = [] {
    int device = 0, sms = 0;
    CUDA_CHECK(cudaGetDevice(&device));
    CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    return 4 * int64_t{sms};
  }();
  return blocks;
}

// Tq <= kQ <= 32 and many keys: one block per (batch, head) walks the keys in tiles of 256. The
// queries past Tq up to kQ are zero rows, computed like the others and never written (no
// predicated loops). Scores: one key per thread. Softmax: warp w takes queries w, w + 8, ...: the
// tile's max, the rescaling of what came before (published in corr_s), the probabilities in place
// of the scores and their sum. Values: thread (d, part) adds, for all kQ queries at once, head dim
// d of the tile's keys part, part + parts, ... (parts = 256 / kHd): each value read once for every
// query. The parts are summed at the end.
// Split across blocks (blockIdx.x of gridDim.x, split.splits > 1: few sequences and heads would
// leave SMs idle), a block walks keys [x * split.keys, (x + 1) * split.keys) and leaves its
// unnormalised output, running max and sum in split.partial for combine_splits_kernel.
struct KeySplit {
  int splits = 1, keys = 0;  // splits > 1: keys per split, a multiple of kFewQueriesTile
  float* partial = nullptr;  // [splits][batch][heads][kQ] x (head dim + 2): output, then max and sum
};

template <class TI, class TO, int kHd, int kQ>
__global__ void __launch_bounds__(kFewQueriesTile) few_queries_attention_kernel(AttnParams p, KeySplit split) {
  constexpr int kParts = kFewQueriesTile / kHd;  // threads per head dim, each a share of the keys
  constexpr int kPerWarp = (kQ + kFewQueriesWarps - 1) / kFewQueriesWarps;
  extern __shared__ float smem[];
  float* q_s = smem;                         // [kQ][kHd], scaled
  float* s_s = q_s + kQ * kHd;               // [kQ][256]: scores, then probabilities
  float* v_s = s_s + kQ * kFewQueriesTile;   // [256][kHd]
  float* corr_s = v_s + kFewQueriesTile * kHd;  // [kQ]: this tile's rescaling of the sums so far
  float* l_s = corr_s + kQ;                  // [kQ]: the softmax denominators, at the end
  float* m_s = l_s + kQ;                     // [kQ]: the running maxima, at the end (split)
  const int hd = p.head_dim, h = blockIdx.y, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int64_t b = blockIdx.z;
  const TI* qg = static_cast<const TI*>(p.q) + b * p.q_batch + int64_t(h) * hd;
  const TI* kg = static_cast<const TI*>(p.k) + b * p.k_batch + int64_t(h) * hd;
  const TI* vg = static_cast<const TI*>(p.v) + b * p.v_batch + int64_t(h) * hd;
  for (int i = tid; i < kQ * kHd; i += blockDim.x) {
    const int t = i / kHd, d = i % kHd;
    q_s[i] = t < p.Tq && d < hd ? to_float(qg[int64_t(t) * p.q_row + d]) * p.scale : 0.0f;
  }
  const int dim = tid % kHd, part = tid / kHd;
  float m[kPerWarp], l[kPerWarp], acc[kQ];
#pragma unroll
  for (int n = 0; n < kPerWarp; ++n) m[n] = -INFINITY, l[n] = 0.0f;
#pragma unroll
  for (int t = 0; t < kQ; ++t) acc[t] = 0.0f;
  const int key_begin = split.splits > 1 ? blockIdx.x * split.keys : 0;
  const int key_end = split.splits > 1 ? min(p.Tk, key_begin + split.keys) : p.Tk;
  for (int j0 = key_begin; j0 < key_end; j0 += kFewQueriesTile) {
    __syncthreads();  // the previous tile is consumed (and the queries loaded)
    const int j = j0 + tid;
    const bool valid = j < key_end;
    float kr[kHd], vr[kHd];
    if (valid) {
      load_head_row<TI, kHd>(kg + int64_t(j) * p.k_row, hd, kr);
      load_head_row<TI, kHd>(vg + int64_t(j) * p.v_row, hd, vr);
    } else {
#pragma unroll
      for (int d = 0; d < kHd; ++d) kr[d] = vr[d] = 0.0f;
    }
#pragma unroll
    for (int d = 0; d < kHd; d += 4)
      *reinterpret_cast<float4*>(v_s + tid * kHd + d) = make_float4(vr[d], vr[d + 1], vr[d + 2], vr[d + 3]);
#pragma unroll
    for (int t = 0; t < kQ; ++t) s_s[t * kFewQueriesTile + tid] = valid ? dot_shared<kHd>(q_s + t * kHd, kr) : -INFINITY;
    __syncthreads();
#pragma unroll
    for (int n = 0; n < kPerWarp; ++n) {
      const int t = warp + n * kFewQueriesWarps;
      if (t >= kQ) break;
      float* row = s_s + t * kFewQueriesTile;
      float tmax = -INFINITY;
#pragma unroll
      for (int i = 0; i < kFewQueriesTile / 32; ++i) tmax = fmaxf(tmax, row[lane + 32 * i]);
      const float m_new = fmaxf(m[n], warp_max(tmax));  // finite: every tile holds a key
      float sum = 0.0f;
#pragma unroll
      for (int i = 0; i < kFewQueriesTile / 32; ++i) {
        const float e = expf(row[lane + 32 * i] - m_new);  // exp(-inf) = 0 past the last key
        row[lane + 32 * i] = e;
        sum += e;
      }
      const float corr = expf(m[n] - m_new);
      l[n] = l[n] * corr + warp_sum(sum);
      m[n] = m_new;
      if (lane == 0) corr_s[t] = corr;
    }
    __syncthreads();
#pragma unroll
    for (int t = 0; t < kQ; ++t) acc[t] *= corr_s[t];
#pragma unroll 4
    for (int k = part; k < kFewQueriesTile; k += kParts) {
      const float v = v_s[k * kHd + dim];
#pragma unroll
      for (int t = 0; t < kQ; ++t) acc[t] = fmaf(s_s[t * kFewQueriesTile + k], v, acc[t]);
    }
  }
  // Sum the parts: partial sums [kParts][kQ][kHd] where the scores were.
  __syncthreads();
#pragma unroll
  for (int t = 0; t < kQ; ++t) s_s[(part * kQ + t) * kHd + dim] = acc[t];
#pragma unroll
  for (int n = 0; n < kPerWarp; ++n) {
    const int t = warp + n * kFewQueriesWarps;
    if (t < kQ && lane == 0) l_s[t] = l[n], m_s[t] = m[n];
  }
  __syncthreads();
  if (split.splits > 1) {
    // Row (split, b, h, t): the output summed over the parts, unnormalised, then max and sum.
    const int64_t rows = ((int64_t(blockIdx.x) * gridDim.z + b) * gridDim.y + h) * kQ;
    for (int i = tid; i < p.Tq * (kHd + 2); i += blockDim.x) {
      const int t = i / (kHd + 2), d = i % (kHd + 2);
      float o;
      if (d < kHd) {
        o = 0.0f;
#pragma unroll 4
        for (int q = 0; q < kParts; ++q) o += s_s[(q * kQ + t) * kHd + d];
      } else {
        o = d == kHd ? m_s[t] : l_s[t];
      }
      split.partial[(rows + t) * (kHd + 2) + d] = o;
    }
    return;
  }
  for (int i = tid; i < p.Tq * kHd; i += blockDim.x) {
    const int t = i / kHd, d = i % kHd;
    if (d >= hd) continue;
    float o = 0.0f;
#pragma unroll 4
    for (int q = 0; q < kParts; ++q) o += s_s[(q * kQ + t) * kHd + d];
    static_cast<TO*>(p.out)[b * p.o_batch + int64_t(t) * p.o_row + int64_t(h) * hd + d] = from_float<TO>(o / l_s[t]);
  }
}

size_t few_queries_smem_bytes(int hd, int q) {
  return (size_t(q) * hd + size_t(q) * kFewQueriesTile + size_t(kFewQueriesTile) * hd + 3 * size_t(q)) * sizeof(float);
}

// The splits' partial outputs of few_queries_attention_kernel combined: a thread per output value
// (b, t, h, d), the splits' maxima and sums rescaled to the largest maximum.
template <class TO, int kHd, int kQ>
__global__ void combine_splits_kernel(AttnParams p, KeySplit split, int heads, int64_t batch) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int hd = p.head_dim;
  if (i >= batch * p.Tq * heads * hd) return;
  const int d = static_cast<int>(i % hd), h = static_cast<int>(i / hd % heads);
  const int t = static_cast<int>(i / (int64_t(hd) * heads) % p.Tq);
  const int64_t b = i / (int64_t(hd) * heads * p.Tq);
  auto row = [&](int s) { return split.partial + (((int64_t(s) * batch + b) * heads + h) * kQ + t) * (kHd + 2); };
  float m = -INFINITY;
  for (int s = 0; s < split.splits; ++s) m = fmaxf(m, row(s)[kHd]);
  float o = 0.0f, l = 0.0f;
  for (int s = 0; s < split.splits; ++s) {
    const float* r = row(s);
    const float c = expf(r[kHd] - m);
    o += r[d] * c;
    l += r[kHd + 1] * c;
  }
  static_cast<TO*>(p.out)[b * p.o_batch + int64_t(t) * p.o_row + int64_t(h) * hd + d] = from_float<TO>(o / l);
}

// The instance for head dim kHd and the fewest query slots (8, 16 or 32) that hold Tq; opts in to
// the shared memory it needs once per instance. Where batch x heads blocks would leave the SMs
// short of work (one prompt: 8 blocks for 132 SMs), the keys are split across blocks as far as
// `scratch` holds their partial outputs, and a second kernel combines them.
template <class TI, class TO, int kHd>
void launch_few_queries(const AttnParams& p, int heads, int64_t batch, const AttentionScratch& scratch,
                        cudaStream_t stream) {
  auto go = [&](auto q_tag) {
    constexpr int kQ = decltype(q_tag)::value;
    auto kernel = few_queries_attention_kernel<TI, TO, kHd, kQ>;
    const size_t smem = few_queries_smem_bytes(kHd, kQ);  // up to 106 KiB (head dim 64, 32 queries)
    static const cudaError_t opt_in =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    CUDA_CHECK(opt_in);
    KeySplit split;
    const int64_t blocks = batch * heads, tiles = (p.Tk + kFewQueriesTile - 1) / kFewQueriesTile;
    const int64_t row_floats = batch * heads * kQ * (kHd + 2);
    const int64_t want = std::min<int64_t>(tiles, (split_target_blocks() + blocks - 1) / blocks);
    const int64_t fit = row_floats > 0 ? static_cast<int64_t>(scratch.floats) / row_floats : 0;
    if (std::min(want, fit) > 1) {
      const int64_t per = (tiles + std::min(want, fit) - 1) / std::min(want, fit);  // tiles per split
      split.keys = static_cast<int>(per * kFewQueriesTile);
      split.splits = static_cast<int>((tiles + per - 1) / per);  // every split holds a key
      split.partial = scratch.data;
    }
    kernel<<<dim3(static_cast<unsigned>(split.splits), static_cast<unsigned>(heads), static_cast<unsigned>(batch)),
             kFewQueriesTile, smem, stream>>>(p, split);
    if (split.splits > 1) {
      CUDA_CHECK_LAUNCH("attention kernel (few queries, keys split)");
      const int64_t n = batch * p.Tq * heads * p.head_dim;
      combine_splits_kernel<TO, kHd, kQ><<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(p, split, heads,
                                                                                                    batch);
    }
  };
  if (p.Tq <= 8)
    go(std::integral_constant<int, 8>{});
  else if (p.Tq <= 16)
    go(std::integral_constant<int, 16>{});
  else
    go(std::integral_constant<int, 32>{});
}

// The kernel for the shape: few keys, few queries, or the tiled one. True if one was launched.
bool launch_lopsided_attention(const AttnParams& p, DType in, DType out, int heads, int64_t batch,
                               const AttentionScratch& scratch, cudaStream_t stream) {
  if (p.head_dim > 64 || p.rel_h != nullptr || p.img_h != 0) return false;
  const int kHd = p.head_dim <= 16 ? 16 : p.head_dim <= 32 ? 32 : 64;
  bool launched = false;
  with_type(in, [&](auto ti) {
    with_type(out, [&](auto to) {
      using TI = decltype(ti);
      using TO = decltype(to);
      if (p.Tk <= kFewKeys) {
        // The fewest key slots that hold Tk: the scores of every slot are computed.
        const int slots = p.Tk <= 8 ? 8 : p.Tk <= 16 ? 16 : 32;
        const size_t smem = 2 * size_t(heads) * (size_t(slots) * kHd + 4) * sizeof(float);
        if (heads > kFewKeysThreads || smem > 48 * 1024) return;  // the tiled kernel takes it
        const int queries = kFewKeysThreads / heads;
        const dim3 grid(static_cast<unsigned>((p.Tq + queries - 1) / queries), 1, static_cast<unsigned>(batch));
        auto pick = [&](auto hd_tag) {
          constexpr int H = decltype(hd_tag)::value;
          return slots == 8    ? few_keys_attention_kernel<TI, TO, H, 8>
                 : slots == 16 ? few_keys_attention_kernel<TI, TO, H, 16>
                               : few_keys_attention_kernel<TI, TO, H, 32>;
        };
        auto kernel = kHd == 16   ? pick(std::integral_constant<int, 16>{})
                      : kHd == 32 ? pick(std::integral_constant<int, 32>{})
                                  : pick(std::integral_constant<int, 64>{});
        kernel<<<grid, kFewKeysThreads, smem, stream>>>(p, heads);
        launched = true;
      } else if (p.Tq <= kFewQueries) {
        if (kHd == 16)
          launch_few_queries<TI, TO, 16>(p, heads, batch, scratch, stream);
        else if (kHd == 32)
          launch_few_queries<TI, TO, 32>(p, heads, batch, scratch, stream);
        else
          launch_few_queries<TI, TO, 64>(p, heads, batch, scratch, stream);
        launched = true;
      }
    });
  });
  return launched;
}

// ---- GEMM fallback: 16 x 16 output tiles, K in steps of 16 through shared memory ----------------

constexpr int kGemmTile = 16;

template <class TI, class TD>
__global__ void gemm_reference_kernel(GemmArgs g) {
  __shared__ float a_s[kGemmTile][kGemmTile + 1], b_s[kGemmTile][kGemmTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t m = blockIdx.y * int64_t(kGemmTile) + ty, n = blockIdx.x * int64_t(kGemmTile) + tx;
  const int64_t bz = blockIdx.z;
  const TI* A = static_cast<const TI*>(g.a) + bz * g.stride_a;
  const TI* B = static_cast<const TI*>(g.b) + bz * g.stride_b;
  float acc = 0.0f;
  for (int64_t k0 = 0; k0 < g.K; k0 += kGemmTile) {
    const int64_t ma = blockIdx.y * int64_t(kGemmTile) + ty, nb = blockIdx.x * int64_t(kGemmTile) + ty;
    a_s[ty][tx] = (ma < g.M && k0 + tx < g.K) ? to_float(A[ma * g.K + k0 + tx]) : 0.0f;
    b_s[ty][tx] = (nb < g.N && k0 + tx < g.K) ? to_float(B[nb * g.K + k0 + tx]) : 0.0f;
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kGemmTile; ++k) acc += a_s[ty][k] * b_s[tx][k];
    __syncthreads();
  }
  if (m >= g.M || n >= g.N) return;
  if (g.bias) acc += to_float(static_cast<const TD*>(g.bias)[n]);
  if (g.act == Activation::ReLU) acc = fmaxf(acc, 0.0f);
  if (g.act == Activation::GELU) acc = gelu_erf(acc);
  const int64_t i = bz * g.stride_d + m * g.N + n;
  if (g.c) acc += to_float(static_cast<const TD*>(g.c)[i]);
  static_cast<TD*>(g.d)[i] = from_float<TD>(acc);
}

}  // namespace

// ---- the ops ------------------------------------------------------------------------------------

void layer_norm(const Tensor& x, const Tensor& gamma, const Tensor& beta, float eps, Tensor& y, Activation act,
                cudaStream_t stream) {
  add_layer_norm(x, nullptr, gamma, beta, eps, y, nullptr, nullptr, act, stream);
}

void add_layer_norm(const Tensor& x, const Tensor* r, const Tensor& gamma, const Tensor& beta, float eps, Tensor& y,
                    const Tensor* pe, Tensor* y_pe, Activation act, cudaStream_t stream) {
  require_device(x, "layer_norm", "input");
  require_device(y, "layer_norm", "output");
  const int64_t C = x.dim(-1), n = x.numel();
  check(y.numel() == n && C > 0, "cuda layer_norm: input " + shape_str(x.shape()) + ", output " + shape_str(y.shape()));
  require_f32_param(gamma, C, "layer_norm", "weight");
  require_f32_param(beta, C, "layer_norm", "bias");
  // r and pe repeat over x as add() repeats its b: whole rows, the same last dim.
  auto repeated = [&](const Tensor& t, DType dtype, const char* what) {
    require_device(t, "layer_norm", what);
    check(t.dtype() == dtype && t.dim(-1) == C && t.numel() > 0 && n % t.numel() == 0,
          std::string("cuda layer_norm: ") + what + " " + dtype_name(t.dtype()) + " " + shape_str(t.shape()) +
              " does not repeat over " + dtype_name(dtype) + " " + shape_str(x.shape()));
  };
  if (r) repeated(*r, x.dtype(), "residual");
  if (pe) {
    check(y_pe != nullptr, "cuda layer_norm: a positional encoding needs an output for y + pe");
    repeated(*pe, y.dtype(), "positional encoding");
    require_device(*y_pe, "layer_norm", "y + pe output");
    check(y_pe->dtype() == y.dtype() && y_pe->numel() == n,
          "cuda layer_norm: y + pe output " + shape_str(y_pe->shape()) + " for " + shape_str(y.shape()));
  }
  launch_layer_norm(x, r, gamma, beta, eps, y, pe, y_pe, act, stream);
}

void add(const Tensor& a, const Tensor& b, Tensor& y, cudaStream_t stream) {
  require_device(a, "add", "a");
  require_device(b, "add", "b");
  require_device(y, "add", "output");
  const int64_t n = a.numel(), nb = b.numel();
  check(y.numel() == n && nb > 0 && n % nb == 0 && b.dim(-1) == a.dim(-1),
        "cuda add: " + shape_str(a.shape()) + " + " + shape_str(b.shape()) + " -> " + shape_str(y.shape()));
  if (n == 0) return;
  const bool v8 = nb % 8 == 0 && aligned16(a.data()) && aligned16(b.data()) && aligned16(y.data());
  with_type(a.dtype(), [&](auto ta) {
    with_type(b.dtype(), [&](auto tb) {
      with_type(y.dtype(), [&](auto ty) {
        using TA = decltype(ta);
        using TB = decltype(tb);
        using TY = decltype(ty);
        const auto* as = static_cast<const TA*>(a.data());
        const auto* bs = static_cast<const TB*>(b.data());
        auto* ys = static_cast<TY*>(y.data());
        if (v8)
          add_kernel<TA, TB, TY, 8><<<blocks_for(n / 8, kThreads), kThreads, 0, stream>>>(as, bs, ys, n, nb);
        else
          add_kernel<TA, TB, TY, 1><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(as, bs, ys, n, nb);
      });
    });
  });
  CUDA_CHECK_LAUNCH("add kernel");
}

void copy_tokens(const Tensor& src, int src_begin, Tensor& dst, int dst_begin, int count, cudaStream_t stream) {
  require_device(src, "copy_tokens", "source");
  require_device(dst, "copy_tokens", "destination");
  check(src.ndim() == 3 && dst.ndim() == 3, "cuda copy_tokens: " + shape_str(src.shape()) + " into " +
                                                shape_str(dst.shape()) + ": both must be [B, T, C]");
  const int64_t B = dst.dim(0), Ts = src.dim(1), Td = dst.dim(1), C = src.dim(2);
  const bool shared = src.dim(0) == 1 && B != 1;
  check((src.dim(0) == B || shared) && dst.dim(2) == C && src_begin >= 0 && dst_begin >= 0 && count >= 0 &&
            src_begin + count <= Ts && dst_begin + count <= Td,
        "cuda copy_tokens: " + shape_str(src.shape()) + "[" + std::to_string(src_begin) + "+" + std::to_string(count) +
            "] into " + shape_str(dst.shape()) + "[" + std::to_string(dst_begin) + "]");
  if (B == 0 || count == 0 || C == 0) return;
  if (src.dtype() == dst.dtype() && !shared) {  // a strided copy: one row of count*C elements per sequence
    const size_t es = dtype_size(src.dtype());
    CUDA_CHECK(cudaMemcpy2DAsync(static_cast<char*>(dst.data()) + dst_begin * C * es, Td * C * es,
                                 static_cast<const char*>(src.data()) + src_begin * C * es, Ts * C * es, count * C * es,
                                 B, cudaMemcpyDeviceToDevice, stream));
    return;
  }
  launch_runs(src, dst, TokensMap{Ts, Td, src_begin, dst_begin, C, shared}, B, count * C, C % 8 == 0, stream,
                     "copy_tokens kernel");
}

void activation(Tensor& x, Activation act, cudaStream_t stream) {
  require_device(x, "activation", "tensor");
  if (act == Activation::None || x.numel() == 0) return;
  const int64_t n = x.numel();
  const bool gelu = act == Activation::GELU;
  const bool v8 = n % 8 == 0 && aligned16(x.data());
  with_type(x.dtype(), [&](auto tx) {
    using T = decltype(tx);
    auto* p = static_cast<T*>(x.data());
    if (v8)
      activation_kernel<T, 8><<<blocks_for(n / 8, kThreads), kThreads, 0, stream>>>(p, n, gelu);
    else
      activation_kernel<T, 1><<<blocks_for(n, kThreads), kThreads, 0, stream>>>(p, n, gelu);
  });
  CUDA_CHECK_LAUNCH("activation kernel");
}

// ---- fp8 quantization: one warp per row ---------------------------------------------------------

// kVec = 8: K % 8 == 0 and x 16-byte, q 8-byte aligned (8 values a load, one 8-byte store); 1: any.
// The row is read twice (its maximum, then the values), the second time from L1/L2.
template <class T, int kVec>
__global__ void quantize_rows_e4m3_kernel(const T* x, int64_t rows, int K, uint8_t* q, float* scale) {
  const int64_t row = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const T* xr = x + row * K;
  uint8_t* qr = q + row * K;
  float amax = 0.0f;
  for (int k = lane * kVec; k < K; k += 32 * kVec) {
    float v[kVec];
    if constexpr (kVec == 8) load_vec<8>(xr + k, v); else v[0] = to_float(xr[k]);
#pragma unroll
    for (int j = 0; j < kVec; ++j) amax = fmaxf(amax, fabsf(v[j]));
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  const float inv = e4m3_row_inverse(amax);
  for (int k = lane * kVec; k < K; k += 32 * kVec) {
    if constexpr (kVec == 8) {
      float v[8];
      load_vec<8>(xr + k, v);
      *reinterpret_cast<uint64_t*>(qr + k) = e4m3x8(v, inv);
    } else {
      qr[k] = static_cast<uint8_t>(__nv_cvt_float_to_fp8(to_float(xr[k]) * inv, __NV_SATFINITE, __NV_E4M3));
    }
  }
  if (lane == 0) scale[row] = e4m3_row_scale(amax);
}

void quantize_rows_e4m3(const Tensor& x, uint8_t* q, float* scale, cudaStream_t stream) {
  require_device(x, "quantize_rows_e4m3", "input");
  check(x.ndim() >= 1 && x.dim(-1) > 0 && x.dim(-1) <= INT32_MAX,
        "cuda quantize_rows_e4m3: input " + shape_str(x.shape()) + " has no rows to quantize");
  const int K = static_cast<int>(x.dim(-1));
  const int64_t rows = x.numel() / K;
  if (rows == 0) return;
  const bool v8 = K % 8 == 0 && aligned16(x.data()) && reinterpret_cast<uintptr_t>(q) % 8 == 0;
  const unsigned blocks = static_cast<unsigned>((rows + kThreads / 32 - 1) / (kThreads / 32));
  auto go = [&](auto tag) {
    using T = decltype(tag);
    const auto* xs = static_cast<const T*>(x.data());
    if (v8)
      quantize_rows_e4m3_kernel<T, 8><<<blocks, kThreads, 0, stream>>>(xs, rows, K, q, scale);
    else
      quantize_rows_e4m3_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(xs, rows, K, q, scale);
  };
  if (x.dtype() == DType::BF16)
    go(__nv_bfloat16{});
  else if (x.dtype() == DType::F32)
    go(float{});
  else
    throw Error(std::string("cuda quantize_rows_e4m3: input must be bf16 or float32, found ") + dtype_name(x.dtype()));
  CUDA_CHECK_LAUNCH("quantize_rows_e4m3 kernel");
}

void patchify(const Tensor& x, int p, Tensor& y, cudaStream_t stream) {
  require_device(x, "patchify", "input");
  require_device(y, "patchify", "output");
  check(x.ndim() == 4 && p > 0, "cuda patchify: input must be [B, H, W, C], found " + shape_str(x.shape()));
  const int64_t B = x.dim(0), H = x.dim(1), W = x.dim(2), C = x.dim(3), Ho = H / p, Wo = W / p;
  check(H % p == 0 && W % p == 0 && y.numel() == x.numel(),
        "cuda patchify: " + shape_str(x.shape()) + " by " + std::to_string(p) + " into " + shape_str(y.shape()));
  launch_runs(x, y, PatchifyMap{H, W, C, Ho, Wo, p}, B * Ho * Wo * p, p * C, (p * C) % 8 == 0, stream,
                     "patchify kernel");
}


void im2col3x3(const Tensor& x, Tensor& y, cudaStream_t stream) {
  require_device(x, "im2col3x3", "input");
  require_device(y, "im2col3x3", "output");
  check(x.ndim() == 4 && y.numel() == 9 * x.numel(),
        "cuda im2col3x3: " + shape_str(x.shape()) + " into " + shape_str(y.shape()));
  const int64_t B = x.dim(0), H = x.dim(1), W = x.dim(2), C = x.dim(3);
  launch_runs(x, y, Im2colMap{H, W, C}, B * H * W * 9, C, C % 8 == 0, stream, "im2col3x3 kernel");
}

void attention(const Tensor& q, const Tensor& k, const Tensor& v, int heads, Tensor& out, cudaStream_t stream,
               const AttentionScratch& scratch) {
  require_device(q, "attention", "q");
  require_device(k, "attention", "k");
  require_device(v, "attention", "v");
  require_device(out, "attention", "output");
  check(q.ndim() == 3 && k.ndim() == 3 && v.ndim() == 3 && heads > 0,
        "cuda attention: q, k, v must be [B, T, D], found " + shape_str(q.shape()) + ", " + shape_str(k.shape()) + ", " +
            shape_str(v.shape()));
  const int64_t Bq = q.dim(0), Bk = k.dim(0), Bv = v.dim(0), B = std::max({Bq, Bk, Bv});
  const int64_t Tq = q.dim(1), D = q.dim(2), Tk = k.dim(1);
  auto ok_batch = [B](int64_t b) { return b == B || b == 1; };
  check(D % heads == 0 && k.dim(2) == D && v.dim(2) == D && v.dim(1) == Tk && ok_batch(Bq) && ok_batch(Bk) &&
            ok_batch(Bv) && out.numel() == B * Tq * D,
        "cuda attention: q " + shape_str(q.shape()) + ", k " + shape_str(k.shape()) + ", v " + shape_str(v.shape()) +
            " -> " + shape_str(out.shape()));
  check(k.dtype() == q.dtype() && v.dtype() == q.dtype(), "cuda attention: q, k and v must share a dtype");
  const int64_t hd = D / heads;
  AttnParams p{};
  p.q = q.data(), p.k = k.data(), p.v = v.data(), p.out = out.data();
  p.q_batch = Bq == 1 ? 0 : Tq * D, p.k_batch = Bk == 1 ? 0 : Tk * D, p.v_batch = Bv == 1 ? 0 : Tk * D;
  p.o_batch = Tq * D;
  p.q_row = p.k_row = p.v_row = p.o_row = D;
  p.Tq = static_cast<int>(Tq), p.Tk = static_cast<int>(Tk), p.head_dim = static_cast<int>(hd);
  p.scale = 1.0f / std::sqrt(static_cast<float>(hd));
  check(B <= 65535 && heads <= 65535, "cuda attention: batch " + std::to_string(B) + " or heads " +
                                          std::to_string(heads) + " exceeds the grid's limit of 65535");
  if (Tq > 0 && Tk > 0 && B > 0 && launch_lopsided_attention(p, q.dtype(), out.dtype(), heads, B, scratch, stream)) {
    CUDA_CHECK_LAUNCH("attention kernel (few keys or queries)");
    return;
  }
  launch_attention(p, q.dtype(), out.dtype(), heads, B, stream);
}

void attention_relpos_reference(const Tensor& qkv, const Tensor& rel_pos_h, const Tensor& rel_pos_w, int heads, int gh,
                                int gw, Tensor& out, cudaStream_t stream) {
  require_device(qkv, "attention_relpos", "qkv");
  require_device(out, "attention_relpos", "output");
  const int64_t T = int64_t(gh) * gw;
  check(heads > 0 && T > 0 && qkv.dim(-1) % (3 * heads) == 0,
        "cuda attention_relpos: qkv " + shape_str(qkv.shape()) + " for " + std::to_string(heads) + " heads");
  const int64_t D = qkv.dim(-1) / (3 * heads);
  const int64_t B = qkv.numel() / (T * qkv.dim(-1));
  check(qkv.numel() == B * T * 3 * heads * D,
        "cuda attention_relpos: qkv " + shape_str(qkv.shape()) + " does not hold " + std::to_string(T) + " tokens of 3 x " +
            std::to_string(heads) + " heads");
  require_f32_param(rel_pos_h, (2 * gh - 1) * D, "attention_relpos", "rel_pos_h");
  require_f32_param(rel_pos_w, (2 * gw - 1) * D, "attention_relpos", "rel_pos_w");
  check(out.numel() == B * T * heads * D, "cuda attention_relpos: output " + shape_str(out.shape()));
  const size_t es = dtype_size(qkv.dtype());
  const int64_t HD = heads * D;
  AttnParams p{};
  p.q = qkv.data();
  p.k = static_cast<const char*>(qkv.data()) + HD * es;
  p.v = static_cast<const char*>(qkv.data()) + 2 * HD * es;
  p.out = out.data();
  p.q_batch = p.k_batch = p.v_batch = T * 3 * HD;
  p.o_batch = T * HD;
  p.q_row = p.k_row = p.v_row = 3 * HD;
  p.o_row = HD;
  p.Tq = p.Tk = static_cast<int>(T), p.head_dim = static_cast<int>(D);
  p.scale = 1.0f / std::sqrt(static_cast<float>(D));
  p.rel_h = rel_pos_h.data_as<const float>(), p.rel_w = rel_pos_w.data_as<const float>();
  p.grid_h = gh, p.grid_w = gw;
  launch_attention(p, qkv.dtype(), out.dtype(), heads, B, stream);
}

void window_attention_relpos_reference(const Tensor& qkv, const Tensor& pad_qkv, const Tensor& rel_pos_h,
                                       const Tensor& rel_pos_w, int heads, int ws, Tensor& out, cudaStream_t stream) {
  require_device(qkv, "window_attention_relpos", "qkv");
  require_device(pad_qkv, "window_attention_relpos", "pad_qkv");
  require_device(out, "window_attention_relpos", "output");
  check(qkv.ndim() == 4 && heads > 0 && ws > 0 && qkv.dim(3) % (3 * heads) == 0,
        "cuda window_attention_relpos: qkv " + shape_str(qkv.shape()) + " must be [B, H, W, 3 x " +
            std::to_string(heads) + " heads x head_dim]");
  const int64_t B = qkv.dim(0), H = qkv.dim(1), W = qkv.dim(2), HD = qkv.dim(3) / 3, D = HD / heads;
  check(pad_qkv.numel() == 3 * HD && pad_qkv.dtype() == qkv.dtype(),
        "cuda window_attention_relpos: pad_qkv " + std::string(dtype_name(pad_qkv.dtype())) + " " +
            shape_str(pad_qkv.shape()) + " for qkv " + dtype_name(qkv.dtype()) + " " + shape_str(qkv.shape()));
  require_f32_param(rel_pos_h, (2 * ws - 1) * D, "window_attention_relpos", "rel_pos_h");
  require_f32_param(rel_pos_w, (2 * ws - 1) * D, "window_attention_relpos", "rel_pos_w");
  check(out.numel() == B * H * W * HD, "cuda window_attention_relpos: output " + shape_str(out.shape()));
  const size_t es = dtype_size(qkv.dtype());
  const int64_t n_wy = (H + ws - 1) / ws, n_wx = (W + ws - 1) / ws;
  AttnParams p{};
  p.q = qkv.data();
  p.k = static_cast<const char*>(qkv.data()) + HD * es;
  p.v = static_cast<const char*>(qkv.data()) + 2 * HD * es;
  p.out = out.data();
  p.q_batch = p.k_batch = p.v_batch = p.o_batch = 0;
  p.q_row = p.k_row = p.v_row = 3 * HD;
  p.o_row = HD;
  p.Tq = p.Tk = ws * ws, p.head_dim = static_cast<int>(D);
  p.scale = 1.0f / std::sqrt(static_cast<float>(D));
  p.rel_h = rel_pos_h.data_as<const float>(), p.rel_w = rel_pos_w.data_as<const float>();
  p.grid_h = p.grid_w = ws;
  p.img_h = static_cast<int>(H), p.img_w = static_cast<int>(W);
  p.n_wy = static_cast<int>(n_wy), p.n_wx = static_cast<int>(n_wx);
  p.pad_q = pad_qkv.data();
  p.pad_k = static_cast<const char*>(pad_qkv.data()) + HD * es;
  p.pad_v = static_cast<const char*>(pad_qkv.data()) + 2 * HD * es;
  launch_attention(p, qkv.dtype(), out.dtype(), heads, B * n_wy * n_wx, stream);
}

void gemm_reference(const GemmArgs& g, cudaStream_t stream) {
  check(g.a_type == g.b_type, "gemm_reference: A and B must share a dtype");
  check(g.batch <= 65535 && (g.M + kGemmTile - 1) / kGemmTile <= 65535,
        "gemm_reference: batch or M beyond the grid's limits");
  if (g.M == 0 || g.N == 0 || g.batch == 0) return;
  const dim3 block(kGemmTile, kGemmTile);
  const dim3 grid(static_cast<unsigned>((g.N + kGemmTile - 1) / kGemmTile),
                  static_cast<unsigned>((g.M + kGemmTile - 1) / kGemmTile), static_cast<unsigned>(g.batch));
  with_type(g.a_type, [&](auto ti) {
    with_type(g.d_type, [&](auto td) {
      gemm_reference_kernel<decltype(ti), decltype(td)><<<grid, block, 0, stream>>>(g);
    });
  });
  CUDA_CHECK_LAUNCH("gemm_reference kernel");
}

}  // namespace segany::cuda
