// Prompt embedding, the decoder's masks from its hypernetworks, and mask postprocessing (mask_ops.h).
//
// postprocess: a block per tile of 32 x 128 output pixels of a mask computes the first-stage values
// (the img_size^2 image, cut to the input size) that its pixels read once into shared memory; each
// pixel then reads 4 of them. Bits leave through warp ballots, the box, the area and the stability
// counts are reduced per warp and added with atomics; no intermediate image is ever written. For
// images upscaled so much that a tile's window does not fit, a direct kernel evaluates both
// bilinear stages per pixel (one thread per 32-pixel word) from the logits through L1.
#include "backend/cuda/mask_ops.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <string>

#include "backend/cuda/cuda_utils.h"
#include "backend/cuda/elements.cuh"
#include "backend/mask_ops.h"

namespace segany::cuda {
namespace {

// ---- embed_points ----------------------------------------------------------------------------

template <class TO>
__global__ void embed_points_kernel(const float* __restrict__ coords, const int32_t* __restrict__ labels,
                                    const float* __restrict__ gaussian, const float* __restrict__ table, float inv,
                                    int half, int64_t tokens, TO* __restrict__ out) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= tokens * half) return;
  const int64_t t = i / half;
  const int k = static_cast<int>(i - t * half), C = 2 * half;
  const int label = min(max(labels[t], -1), 3);  // the host validated them; never read outside the table
  const float* e = table + (label + 1) * C;
  float s = e[k], c = e[half + k];
  if (label >= 0) {
    const float x = __fmul_rn(__fadd_rn(coords[2 * t], 0.5f), inv);
    const float y = __fmul_rn(__fadd_rn(coords[2 * t + 1], 0.5f), inv);
    const float cx = __fsub_rn(__fmul_rn(2.0f, x), 1.0f), cy = __fsub_rn(__fmul_rn(2.0f, y), 1.0f);
    const float v = __fmul_rn(__fmul_rn(2.0f, static_cast<float>(M_PI)),
                              __fadd_rn(__fmul_rn(cx, gaussian[k]), __fmul_rn(cy, gaussian[half + k])));
    s = __fadd_rn(sinf(v), s);
    c = __fadd_rn(cosf(v), c);
  }
  out[t * C + k] = from_float<TO>(s);
  out[t * C + half + k] = from_float<TO>(c);
}

// ---- hypernetwork_masks ------------------------------------------------------------------------

constexpr int kMaxHyperMasks = 8, kHyperThreads = 256;

__device__ __forceinline__ float gelu_exact(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752440f)); }

// Block (pixel tile, p): kHyperThreads consecutive pixels of prompt p's masks; hyper[p] in shared
// memory as float. Rows of D % 8 == 0 elements, 16-byte aligned, are read 8 elements at a time
// (kVec = 8), else one element at a time (kVec = 1).
template <class TI, int kVec>
__global__ void __launch_bounds__(kHyperThreads) hypernetwork_masks_kernel(const TI* __restrict__ up,
                                                                           const TI* __restrict__ hyper,
                                                                           float* __restrict__ low_res, int T, int D,
                                                                           int G) {
  extern __shared__ float h_s[];  // [T][D]
  const int p = blockIdx.y, side = 4 * G;
  const int64_t plane = int64_t(side) * side;
  for (int i = threadIdx.x; i < T * D; i += blockDim.x) h_s[i] = to_float(hyper[int64_t(p) * T * D + i]);
  __syncthreads();
  const int64_t pixel = blockIdx.x * int64_t(kHyperThreads) + threadIdx.x;
  if (pixel >= plane) return;
  const int y = static_cast<int>(pixel / side), x = static_cast<int>(pixel % side);
  const int64_t row = (((y >> 2) * int64_t(G) + (x >> 2)) * 4 + ((y >> 1) & 1) * 2 + ((x >> 1) & 1)) * 4 + (y & 1) * 2 +
                      (x & 1);
  const TI* u = up + (int64_t(p) * plane + row) * D;
  float acc[kMaxHyperMasks];
#pragma unroll
  for (int t = 0; t < kMaxHyperMasks; ++t) acc[t] = 0.0f;
  for (int k = 0; k < D; k += kVec) {
    float g[kVec];
    load_vec<kVec>(u + k, g);
#pragma unroll
    for (int j = 0; j < kVec; ++j) g[j] = gelu_exact(g[j]);
#pragma unroll
    for (int t = 0; t < kMaxHyperMasks; ++t)
      if (t < T)
#pragma unroll
        for (int j = 0; j < kVec; ++j) acc[t] = fmaf(h_s[t * D + k + j], g[j], acc[t]);
  }
#pragma unroll
  for (int t = 0; t < kMaxHyperMasks; ++t)
    if (t < T) low_res[(int64_t(p) * T + t) * plane + pixel] = acc[t];
}

// ---- postprocess ------------------------------------------------------------------------------

struct PostArgs {
  const float* low_res;
  int T, first, count, h, w;
  int input_h, input_w, height, width;
  float sy1, sx1, sy2, sx2;  // in / out of each axis, computed on the host as the CPU computes them
  float threshold, hi, lo;
  bool column_major;
  uint32_t* bits;  // null: stats only
  int64_t words;
  int32_t* stats;
  const int32_t* select;  // null: every mask
};

// The low-res logits of output mask m.
__device__ __forceinline__ const float* mask_logits(const PostArgs& a, int m) {
  const int src = a.select ? a.select[m] : m;
  const int p = src / a.count, j = src - p * a.count;
  return a.low_res + (static_cast<int64_t>(p) * a.T + a.first + j) * a.h * a.w;
}

// One output index of torch's bilinear axis: source indices and weights (make_axis in mask_ops.cpp).
__device__ __forceinline__ void axis_at(int in, float scale, int o, int& i0, int& i1, float& l0, float& l1) {
  float src = __fsub_rn(__fmul_rn(scale, __fadd_rn(static_cast<float>(o), 0.5f)), 0.5f);
  if (src < 0.0f) src = 0.0f;
  i0 = static_cast<int>(src);
  i1 = i0 + (i0 < in - 1 ? 1 : 0);
  l1 = __fsub_rn(src, static_cast<float>(i0));
  l0 = __fsub_rn(1.0f, l1);
}

__device__ __forceinline__ float lerp2(float l0, float a, float l1, float b) {
  return __fadd_rn(__fmul_rn(l0, a), __fmul_rn(l1, b));
}

__global__ void init_stats_kernel(int32_t* stats, int64_t masks) {
  const int64_t m = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (m >= masks) return;
  int32_t* s = stats + m * 7;
  s[0] = 0, s[1] = INT_MAX, s[2] = INT_MAX, s[3] = -1, s[4] = -1, s[5] = 0, s[6] = 0;
}

__global__ void finish_stats_kernel(int32_t* stats, int64_t masks) {
  const int64_t m = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (m >= masks) return;
  int32_t* s = stats + m * 7;
  if (s[0] == 0) s[1] = s[2] = s[3] = s[4] = 0;
}

// A warp's counts and box, reduced and added into one mask's stats.
__device__ __forceinline__ void add_stats(int32_t* s, int area, int hi, int lo, int x0, int y0, int x1, int y1) {
  const unsigned all = 0xffffffffu;
  area = __reduce_add_sync(all, area);
  hi = __reduce_add_sync(all, hi);
  lo = __reduce_add_sync(all, lo);
  x0 = __reduce_min_sync(all, x0);
  y0 = __reduce_min_sync(all, y0);
  x1 = __reduce_max_sync(all, x1);
  y1 = __reduce_max_sync(all, y1);
  if ((threadIdx.x & 31) == 0 && lo > 0) {  // lo counts every pixel any other count does
    if (area > 0) {
      atomicAdd(s, area);
      atomicMin(s + 1, x0), atomicMin(s + 2, y0), atomicMax(s + 3, x1), atomicMax(s + 4, y1);
    }
    if (hi > 0) atomicAdd(s + 5, hi);
    atomicAdd(s + 6, lo);
  }
}

__global__ void __launch_bounds__(256) postprocess_kernel(PostArgs a) {
  const int m = blockIdx.y;
  const float* __restrict__ L = mask_logits(a, m);
  const int64_t pixels = static_cast<int64_t>(a.height) * a.width;
  // Which word this thread computes. Row-major: consecutive threads take consecutive words, so a
  // warp reads neighbouring logits. Column-major: consecutive words run down a column, so a warp
  // instead takes 32 neighbouring columns: word r of column x is the r-th word whose first pixel
  // lies in that column.
  int64_t word;
  bool active;
  if (!a.column_major) {
    word = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
    active = word < a.words;
  } else {
    const int64_t warp = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32;
    const int64_t groups = (a.width + 31) / 32, r = warp / groups;
    const int64_t x = (warp % groups) * 32 + threadIdx.x % 32;
    word = (x * a.height + 31) / 32 + r;
    active = x < a.width && word * 32 < (x + 1) * a.height;
  }
  int area = 0, hi = 0, lo = 0, x0 = INT_MAX, y0 = INT_MAX, x1 = -1, y1 = -1;
  if (active) {
    const int64_t begin = word * 32;
    const int n = pixels - begin < 32 ? static_cast<int>(pixels - begin) : 32;
    // (y, x) of the word's first pixel, then stepped along the pixel order.
    const int lines = a.column_major ? a.height : a.width;
    int outer = static_cast<int>(begin / lines), inner = static_cast<int>(begin - int64_t(outer) * lines);
    uint32_t bits = 0;
    for (int k = 0; k < n; ++k) {
      const int y = a.column_major ? inner : outer, x = a.column_major ? outer : inner;
      int r0, r1, c0, c1;
      float wy0, wy1, wx0, wx1;
      axis_at(a.input_h, a.sy2, y, r0, r1, wy0, wy1);
      axis_at(a.input_w, a.sx2, x, c0, c1, wx0, wx1);
      // First stage at rows r0, r1 and columns c0, c1 of the img_size^2 image.
      int ra[2], rb[2], ca[2], cb[2];
      float rl0[2], rl1[2], cl0[2], cl1[2];
      axis_at(a.h, a.sy1, r0, ra[0], rb[0], rl0[0], rl1[0]);
      axis_at(a.h, a.sy1, r1, ra[1], rb[1], rl0[1], rl1[1]);
      axis_at(a.w, a.sx1, c0, ca[0], cb[0], cl0[0], cl1[0]);
      axis_at(a.w, a.sx1, c1, ca[1], cb[1], cl0[1], cl1[1]);
      float mid[2][2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float* la = L + ra[r] * a.w;
        const float* lb = L + rb[r] * a.w;
#pragma unroll
        for (int c = 0; c < 2; ++c)
          mid[r][c] = lerp2(rl0[r], lerp2(cl0[c], __ldg(la + ca[c]), cl1[c], __ldg(la + cb[c])), rl1[r],
                            lerp2(cl0[c], __ldg(lb + ca[c]), cl1[c], __ldg(lb + cb[c])));
      }
      const float v = lerp2(wy0, lerp2(wx0, mid[0][0], wx1, mid[0][1]), wy1, lerp2(wx0, mid[1][0], wx1, mid[1][1]));
      hi += v > a.hi;
      lo += v > a.lo;
      if (v > a.threshold) {
        bits |= 1u << k;
        ++area;
        x0 = min(x0, x), x1 = max(x1, x), y0 = min(y0, y), y1 = max(y1, y);
      }
      if (++inner == lines) inner = 0, ++outer;
    }
    if (a.bits) a.bits[m * a.words + word] = bits;
  }
  add_stats(a.stats + static_cast<int64_t>(m) * 7, area, hi, lo, x0, y0, x1, y1);
}

// The tiled kernel: block (tile x, tile y, m) covers kTileRows x kTileCols output pixels of mask
// m. The first-stage values its pixels read (a window of the img_size^2 image, at most max_rows x
// max_cols, which the host made sure of) go to shared memory first; each pixel then reads 4 of
// them: the same values, so the same bits, as the direct kernel, at a fraction of the work. Bits
// leave by warp ballots: a warp takes 32 pixels that are consecutive in the bits' order (a row
// segment, or 32 rows of one column: the tile is 32 rows high) and ORs them into the two words
// they straddle, which the caller zeroed.
constexpr int kTileRows = 32, kTileCols = 128;

// The source indices [lo, hi] that output indices [begin, end) of an axis read (axis_at is monotonic).
__device__ __forceinline__ void axis_span(int in, float scale, int begin, int end, int& lo, int& hi) {
  int unused_i;
  float unused_a, unused_b;
  axis_at(in, scale, begin, lo, unused_i, unused_a, unused_b);
  axis_at(in, scale, end - 1, unused_i, hi, unused_a, unused_b);
}

// 32 bits of pixels from bit position `at` of a mask's words on; zero words are left alone.
__device__ __forceinline__ void or_bits(uint32_t* words, int64_t at, uint32_t b) {
  if (b == 0) return;
  const int s = static_cast<int>(at & 31);
  atomicOr(words + (at >> 5), b << s);
  if (s != 0 && (b >> (32 - s)) != 0) atomicOr(words + (at >> 5) + 1, b >> (32 - s));
}

// A thread's share of one mask's stats: pixel count, box, the two stability counts.
struct PixelStats {
  int area = 0, hi = 0, lo = 0, x0 = INT_MAX, y0 = INT_MAX, x1 = -1, y1 = -1;
  // Pixel (y, x) of logit v; true if inside the mask.
  __device__ __forceinline__ bool add(const PostArgs& a, float v, int y, int x) {
    hi += v > a.hi;
    lo += v > a.lo;
    if (!(v > a.threshold)) return false;
    ++area;
    x0 = min(x0, x), x1 = max(x1, x), y0 = min(y0, y), y1 = max(y1, y);
    return true;
  }
};

// The second stage at one output pixel: rows m0, m1 of the first-stage window, columns c0, c1.
__device__ __forceinline__ float second_stage(const float* m0, const float* m1, float wy0, float wy1, int c0, int c1,
                                              float wx0, float wx1) {
  return lerp2(wy0, lerp2(wx0, m0[c0], wx1, m0[c1]), wy1, lerp2(wx0, m1[c0], wx1, m1[c1]));
}

__global__ void __launch_bounds__(256) postprocess_tile_kernel(PostArgs a, int max_rows, int max_cols) {
  extern __shared__ float mid[];  // [max_rows][max_cols + 1]
  __shared__ int block_stats[8][7];
  const int m = blockIdx.z;
  const float* __restrict__ L = mask_logits(a, m);
  const int y_begin = blockIdx.y * kTileRows, x_begin = blockIdx.x * kTileCols;
  const int y_end = min(y_begin + kTileRows, a.height), x_end = min(x_begin + kTileCols, a.width);
  int r_lo, r_hi, c_lo, c_hi;
  axis_span(a.input_h, a.sy2, y_begin, y_end, r_lo, r_hi);
  axis_span(a.input_w, a.sx2, x_begin, x_end, c_lo, c_hi);
  const int rows = min(r_hi - r_lo + 1, max_rows), cols = min(c_hi - c_lo + 1, max_cols), stride = max_cols + 1;
  // The window, a row of it per warp: the row's taps are the warp's, the columns' its lanes'.
  const int warp = threadIdx.x / 32, warps = blockDim.x / 32, lane = threadIdx.x % 32;
  for (int ri = warp; ri < rows; ri += warps) {
    int ra, rb;
    float rl0, rl1;
    axis_at(a.h, a.sy1, r_lo + ri, ra, rb, rl0, rl1);
    const float* la = L + ra * a.w;
    const float* lb = L + rb * a.w;
#pragma unroll 4
    for (int ci = lane; ci < cols; ci += 32) {
      int ca, cb;
      float cl0, cl1;
      axis_at(a.w, a.sx1, c_lo + ci, ca, cb, cl0, cl1);
      mid[ri * stride + ci] = lerp2(rl0, lerp2(cl0, __ldg(la + ca), cl1, __ldg(la + cb)), rl1,
                                    lerp2(cl0, __ldg(lb + ca), cl1, __ldg(lb + cb)));
    }
  }
  __syncthreads();
  PixelStats st;
  uint32_t* words = a.bits ? a.bits + static_cast<int64_t>(m) * a.words : nullptr;
  if (!a.column_major) {
    // A warp per output row, its lanes along the row.
    constexpr int kSteps = kTileCols / 32;
    int c0[kSteps], c1[kSteps];
    float wx0[kSteps], wx1[kSteps];
#pragma unroll
    for (int k = 0; k < kSteps; ++k) {
      axis_at(a.input_w, a.sx2, min(x_begin + lane + 32 * k, x_end - 1), c0[k], c1[k], wx0[k], wx1[k]);
      c0[k] = min(c0[k] - c_lo, cols - 1), c1[k] = min(c1[k] - c_lo, cols - 1);
    }
    for (int y = y_begin + warp; y < y_end; y += warps) {
      int r0, r1;
      float wy0, wy1;
      axis_at(a.input_h, a.sy2, y, r0, r1, wy0, wy1);
      const float* m0 = mid + min(r0 - r_lo, rows - 1) * stride;
      const float* m1 = mid + min(r1 - r_lo, rows - 1) * stride;
#pragma unroll
      for (int k = 0; k < kSteps; ++k) {
        const int x = x_begin + lane + 32 * k;
        const bool on = x < x_end && st.add(a, second_stage(m0, m1, wy0, wy1, c0[k], c1[k], wx0[k], wx1[k]), y, x);
        if (words) {
          const uint32_t b = __ballot_sync(0xffffffffu, on);
          if (lane == 0) or_bits(words, int64_t(y) * a.width + x_begin + 32 * k, b);
        }
      }
    }
  } else {
    // A warp per output column, its lanes down the tile's 32 rows.
    const int y = y_begin + lane;
    int r0, r1;
    float wy0, wy1;
    axis_at(a.input_h, a.sy2, min(y, y_end - 1), r0, r1, wy0, wy1);
    const float* m0 = mid + min(r0 - r_lo, rows - 1) * stride;
    const float* m1 = mid + min(r1 - r_lo, rows - 1) * stride;
    for (int x = x_begin + warp; x < x_end; x += warps) {
      int c0, c1;
      float wx0, wx1;
      axis_at(a.input_w, a.sx2, x, c0, c1, wx0, wx1);
      c0 = min(c0 - c_lo, cols - 1), c1 = min(c1 - c_lo, cols - 1);
      const bool on = y < y_end && st.add(a, second_stage(m0, m1, wy0, wy1, c0, c1, wx0, wx1), y, x);
      if (words) {
        const uint32_t b = __ballot_sync(0xffffffffu, on);
        if (lane == 0) or_bits(words, int64_t(x) * a.height + y_begin, b);
      }
    }
  }
  // The block's stats, reduced (warps, then the block) before one set of atomics per block.
  const unsigned all = 0xffffffffu;
  const int v[7] = {__reduce_add_sync(all, st.area), __reduce_min_sync(all, st.x0), __reduce_min_sync(all, st.y0),
                    __reduce_max_sync(all, st.x1),   __reduce_max_sync(all, st.y1), __reduce_add_sync(all, st.hi),
                    __reduce_add_sync(all, st.lo)};
  if (lane == 0)
#pragma unroll
    for (int i = 0; i < 7; ++i) block_stats[warp][i] = v[i];
  __syncthreads();
  if (threadIdx.x < 7) {
    const int i = threadIdx.x;
    int r = block_stats[0][i];
    for (int w = 1; w < warps; ++w) {
      const int u = block_stats[w][i];
      r = (i == 1 || i == 2) ? min(r, u) : (i == 3 || i == 4) ? max(r, u) : r + u;
    }
    int32_t* s = a.stats + static_cast<int64_t>(m) * 7;
    if (i == 0 || i == 5 || i == 6) {
      if (r > 0) atomicAdd(s + i, r);
    } else if (r != INT_MAX && r != -1) {
      if (i <= 2) atomicMin(s + i, r);
      else atomicMax(s + i, r);
    }
  }
}

}  // namespace

void embed_points(const Tensor& coords, const Tensor& labels, const Tensor& gaussian, const Tensor& table, int img_size,
                  Tensor& out, cudaStream_t stream) {
  const char* op = "embed_points";
  require_gpu(coords, DType::F32, op, "coords");
  require_gpu(labels, DType::I32, op, "labels");
  require_gpu(gaussian, DType::F32, op, "gaussian");
  require_gpu(table, DType::F32, op, "table");
  check(out.defined() && out.device() == Device::CUDA && is_float_dtype(out.dtype()),
        "cuda embed_points: the output must be a float32, bf16 or fp16 GPU tensor");
  const int64_t C = table.dim(-1), half = C / 2, N = labels.numel();
  check(table.numel() == 5 * C && C % 2 == 0 && gaussian.numel() == 2 * half && coords.numel() == 2 * N &&
            out.numel() == N * C && img_size > 0,
        "cuda embed_points: coords " + shape_str(coords.shape()) + ", labels " + shape_str(labels.shape()) +
            ", gaussian " + shape_str(gaussian.shape()) + ", table " + shape_str(table.shape()) + " -> " +
            shape_str(out.shape()));
  const int64_t n = N * half;
  if (n == 0) return;
  const float inv = 1.0f / static_cast<float>(img_size);
  const int threads = 256;
  const auto blocks = static_cast<unsigned>((n + threads - 1) / threads);
  with_type(out.dtype(), [&](auto to) {
    embed_points_kernel<<<blocks, threads, 0, stream>>>(coords.data_as<const float>(), labels.data_as<const int32_t>(),
                                                        gaussian.data_as<const float>(), table.data_as<const float>(),
                                                        inv, static_cast<int>(half), N,
                                                        static_cast<decltype(to)*>(out.data()));
  });
  CUDA_CHECK_LAUNCH("embed_points kernel");
}

namespace {

// The most first-stage indices that a tile of `tile` output indices reads along an axis of `out`
// indices resized from `in` (the kernel's axis_at, on the host).
int tile_span(int in, int out, float scale, int tile) {
  auto source = [&](int o, bool upper) {
    float src = scale * (static_cast<float>(o) + 0.5f) - 0.5f;
    if (src < 0.0f) src = 0.0f;
    const int i0 = static_cast<int>(src);
    return upper ? i0 + (i0 < in - 1 ? 1 : 0) : i0;
  };
  int most = 0;
  for (int o = 0; o < out; o += tile) most = std::max(most, source(std::min(o + tile, out) - 1, true) - source(o, false) + 1);
  return most;
}

}  // namespace

void hypernetwork_masks(const Tensor& up, const Tensor& hyper, Tensor& low_res, cudaStream_t stream) {
  check(up.device() == Device::CUDA && hyper.device() == Device::CUDA,
        "cuda hypernetwork_masks: the upscaled image and the hypernetwork outputs must be on the GPU");
  require_gpu(low_res, DType::F32, "hypernetwork_masks", "output");
  const HypernetworkShape s = hypernetwork_shape(up, hyper, low_res);
  check(s.T <= kMaxHyperMasks && s.T * s.D * sizeof(float) <= 48 * 1024 && s.P <= 65535,
        "cuda hypernetwork_masks: " + std::to_string(s.P) + " prompts of " + std::to_string(s.T) + " masks of " +
            std::to_string(s.D) + " features exceed what the kernel takes (8 masks, 12288 weights, 65535 prompts)");
  const int64_t plane = 16 * s.G * s.G;
  if (s.P == 0 || s.T == 0) return;
  const dim3 grid(static_cast<unsigned>((plane + kHyperThreads - 1) / kHyperThreads), static_cast<unsigned>(s.P));
  const size_t smem = size_t(s.T * s.D) * sizeof(float);
  auto launch = [&](auto tag) {
    using TI = decltype(tag);
    const bool vec = s.D % 8 == 0 && reinterpret_cast<uintptr_t>(up.data()) % 16 == 0;
    auto kernel = vec ? hypernetwork_masks_kernel<TI, 8> : hypernetwork_masks_kernel<TI, 1>;
    kernel<<<grid, kHyperThreads, smem, stream>>>(static_cast<const TI*>(up.data()), static_cast<const TI*>(hyper.data()),
                                                   low_res.data_as<float>(), static_cast<int>(s.T),
                                                   static_cast<int>(s.D), static_cast<int>(s.G));
  };
  with_type(up.dtype(), launch);
  CUDA_CHECK_LAUNCH("hypernetwork_masks kernel");
}

void postprocess_masks(const Tensor& low_res, int first, int count, const Backend::MaskFrame& f, float threshold,
                       float offset, bool column_major, Tensor* bits, Tensor& stats, const Tensor* select,
                       cudaStream_t stream) {
  const char* op = "postprocess_masks";
  require_gpu(low_res, DType::F32, op, "low-res logits");
  require_gpu(stats, DType::I32, op, "stats");
  check(low_res.ndim() == 4 && first >= 0 && count >= 0 && first + count <= low_res.dim(1),
        "cuda postprocess_masks: masks " + std::to_string(first) + "+" + std::to_string(count) +
            " of low-res logits " + shape_str(low_res.shape()) + " (expected [P, T, h, w])");
  check(f.img_size > 0 && f.input_h > 0 && f.input_w > 0 && f.input_h <= f.img_size && f.input_w <= f.img_size &&
            f.height > 0 && f.width > 0,
        "cuda postprocess_masks: inconsistent frame");
  const int64_t P = low_res.dim(0), words = mask_bit_words(f.height, f.width);
  if (select) require_gpu(*select, DType::I32, op, "select");
  const int64_t M = select ? select->numel() : P * count;
  check(stats.numel() == M * 7, "cuda postprocess_masks: stats " + shape_str(stats.shape()) + " for " +
                                    std::to_string(M) + " masks (expected [M, 7])");
  if (bits) {
    require_gpu(*bits, DType::I32, op, "bits");
    check(bits->numel() == M * words, "cuda postprocess_masks: bits " + shape_str(bits->shape()) + " for " +
                                          std::to_string(M) + " masks of " + std::to_string(words) + " words");
  }
  check(M <= 65535 && int64_t(f.height) * f.width < (int64_t(1) << 31),
        "cuda postprocess_masks: at most 65535 masks of at most 2^31 pixels a call");
  if (M == 0) return;
  PostArgs a{};
  a.low_res = low_res.data_as<const float>();
  a.T = static_cast<int>(low_res.dim(1)), a.first = first, a.count = count;
  a.h = static_cast<int>(low_res.dim(2)), a.w = static_cast<int>(low_res.dim(3));
  a.input_h = f.input_h, a.input_w = f.input_w, a.height = f.height, a.width = f.width;
  a.sy1 = static_cast<float>(a.h) / static_cast<float>(f.img_size);
  a.sx1 = static_cast<float>(a.w) / static_cast<float>(f.img_size);
  a.sy2 = static_cast<float>(f.input_h) / static_cast<float>(f.height);
  a.sx2 = static_cast<float>(f.input_w) / static_cast<float>(f.width);
  a.threshold = threshold, a.hi = threshold + offset, a.lo = threshold - offset;
  a.column_major = column_major;
  a.bits = bits ? reinterpret_cast<uint32_t*>(bits->data()) : nullptr;
  a.words = words;
  a.stats = stats.data_as<int32_t>();
  a.select = select ? select->data_as<const int32_t>() : nullptr;
  const unsigned small = static_cast<unsigned>((M + 255) / 256);
  init_stats_kernel<<<small, 256, 0, stream>>>(a.stats, M);
  CUDA_CHECK_LAUNCH("postprocess_masks init kernel");
  if (bits) CUDA_CHECK(cudaMemsetAsync(bits->data(), 0, size_t(M) * words * 4, stream));
  // Tiles whose first-stage window fits in shared memory (always, but for images upscaled many
  // times over); else the direct kernel.
  constexpr int kMaxShared = 96 * 1024;
  const int rows = tile_span(f.input_h, f.height, a.sy2, kTileRows), cols = tile_span(f.input_w, f.width, a.sx2, kTileCols);
  const int64_t smem = int64_t(rows) * (cols + 1) * 4;
  if (smem <= kMaxShared) {
    // Per call (a microsecond): the attribute belongs to the current device.
    CUDA_CHECK(cudaFuncSetAttribute(postprocess_tile_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kMaxShared));
    const dim3 grid(static_cast<unsigned>((f.width + kTileCols - 1) / kTileCols),
                    static_cast<unsigned>((f.height + kTileRows - 1) / kTileRows), static_cast<unsigned>(M));
    postprocess_tile_kernel<<<grid, 256, static_cast<size_t>(smem), stream>>>(a, rows, cols);
    CUDA_CHECK_LAUNCH("postprocess_masks tile kernel");
  } else {
    // Threads per mask: one per word (row-major), or 32 columns x (words per column + 1) (column-major).
    const int64_t threads =
        column_major ? (int64_t(f.width) + 31) / 32 * 32 * ((int64_t(f.height) + 31) / 32 + 1) : words;
    const dim3 grid(static_cast<unsigned>((threads + 255) / 256), static_cast<unsigned>(M));
    postprocess_kernel<<<grid, 256, 0, stream>>>(a);
    CUDA_CHECK_LAUNCH("postprocess_masks kernel");
  }
  finish_stats_kernel<<<small, 256, 0, stream>>>(a.stats, M);
  CUDA_CHECK_LAUNCH("postprocess_masks finish kernel");
}

}  // namespace segany::cuda
