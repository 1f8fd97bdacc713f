// Flash attention with SAM's decomposed relative position bias fused inside.
//
// What it computes is in attention_relpos.h. How:
//
// * Tensor cores through mma.sync.m16n8k16 (bf16 in, fp32 accumulate), fragments fed by ldmatrix
//   (.trans for V), online softmax in fp32 in the log2 domain (scale * log2(e) folded into one FMA,
//   exp2 on the MUFU), P rounded to bf16 for P V, O normalised once at the end. Runs on sm_80+.
//
// * The bias never exists as a T x T tensor. Each warp, before its key loop, multiplies its own
//   query rows (already in registers as mma A fragments) by the whole rel_pos_h / rel_pos_w tables
//   (B fragments from global memory in the global kernel, from a per-CTA shared-memory copy in the
//   window kernel; 2*grid-1 rows): qRh[i, p] = q_i . rel_pos_h[p].
//   rel_h[i, kr] = qRh[i, row(i) + grid_h - 1 - kr] is then a gather, done as a scatter from the mma
//   accumulators into shared memory (pre-multiplied by log2 e). That prologue costs ~3% of the
//   mma work on global attention and ~14% on 14 x 14 windows.
//
// * Key tiles follow the grid rows, so that inside a tile row(j) is fixed and col(j) is the column
//   of the tile: bias = rel_h[i, kr] (one scalar per query row and tile) + rel_w[i, col] (the same
//   for every tile). The row max is taken over s*scale + rel_w and rel_h added per row, so the bias
//   costs one FMA per logit over plain flash attention.
//     global (grid_w == 64): a key tile is one grid row of 64 keys; 128 queries per CTA, 4 warps of
//       2 x m16 (each K/V fragment read from shared memory serves 32 queries); K/V double-buffered
//       with cp.async; rel_h [128 x 64] and rel_w [128 x 64] fp32 in shared memory (padded rows);
//       113 KB of shared memory and <= 255 registers, so 2 CTAs per SM on an H100. Head dim 80
//       takes each tile in two softmax steps of 32 keys (S in 32 registers instead of 64), which
//       is what keeps it out of local memory.
//     windows (grid <= 16, SAM 14 x 14): persistent CTAs (one per SM, 13 warps = 416 threads), each
//       taking (window, head) items blockIdx.x, +gridDim.x, ...; Q, K and V of an item sit in shared
//       memory (dense, T rows each) in one of two stages, and the next item's copy (cp.async) flies
//       while this one is computed. The copy gathers the window's rows straight from the image grid
//       (SAM's 64 x 64, padded to 70 x 70 by 14 x 14 windows): a padding token's row is pad_qkv (q, k, v
//       of a zero input, i.e. the qkv bias), so neither the qkv GEMM nor a partition pass ever sees
//       the padding; the output rows of real tokens go straight back to the grid. Warp w owns query m16 tile w (13 tiles at 14 x 14: one round). Key
//       tiles are SEGANY_WINDOW_ROWS_PER_TILE (2) grid rows, each padded to 16 slots in the ldmatrix
//       addresses only: slots past grid_w read the row's last key and get rel_w = -inf, the whole key
//       mask. The rel_pos tables are staged once per CTA (bf16, 32 zero-padded rows) and the prologue
//       takes its B fragments from there; a warp's 16 Q rows, once in registers, are its scratch for
//       rel_h / rel_w (fp32, x log2 e) and then for the bf16 output tile (16-byte stores). 416 threads
//       put 4 warps on one SM sub-partition, which caps registers at 128. ATTENTION_NOTES.md has the
//       measurements.
//   Padded queries read Q = 0 (global) or the last token's Q (windows) and are never written; padded
//   keys see -inf (windows) or do not exist (global: T is a whole number of grid rows).
//
// * Kernel traits and a launch template per head dim (64: vit_b/l, 80: vit_h; 80 = 5 k16 steps of
//   Q K^T and 10 n8 tiles of P V), in the style of flash-attention.
//
// * On Hopper (compute capability 9.0, binary built for sm_90a) two more kernels, chosen at run
//   time: relpos_attention_global_sm90 (wgmma + TMA + a producer warpgroup, flash-attention-3
//   style) and, for windows up to 14 x 14, relpos_attention_window_sm90 (wgmma over a whole window
//   at once); their own comments are below. The mma.sync kernels stay the sm_80 path and the
//   fallback (attention_relpos_enable_sm90(false) forces them).
//
// Measured on an H100 (ATTENTION_NOTES.md; FLOPs counted as 4*B*heads*T^2*D, bias included in the
// time): windows ~119-134 TFLOP/s with the sm_90a kernel (~109-121 with mma.sync); global ~330-334
// (head dim 64) and ~385 (head dim 80) TFLOP/s with the sm_90a kernel, ~200-225 with mma.sync.
#include <cuda.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>

#include "attention_relpos.h"

namespace segany::cuda {
namespace {

using bf16 = __nv_bfloat16;

constexpr float kLog2e = 1.4426950408889634f;

// ---------------------------------------------------------------------------------------------
// Warp-level primitives
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(smem)), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, and register i gets
// matrix i's fragment: lane l holds row l/4, columns 2(l%4), 2(l%4)+1 (.trans: the transpose's).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const bf16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const bf16* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

// d += a b, m16n8k16, bf16 in, fp32 accumulate. With g = lane/4, t = lane%4:
//   a (16x16 row-major): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   b (16x8, k x n):     b0 = (k 2t..2t+1, n g), b1 = (k 2t+8..2t+9, n g)
//   d (16x8):            d0,d1 = (g, 2t..2t+1), d2,d3 = (g+8, 2t..2t+1)
// The lower half of a 32-bit register holds the lower column (or k) index.
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// {lo, hi} -> bf16x2 with lo in the lower half (cvt puts its first source in the upper half).
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  uint32_t r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

__device__ __forceinline__ float exp2_approx(float x) {  // ex2(-inf) = +0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ uint32_t ldg_u32(const bf16* p) { return __ldg(reinterpret_cast<const unsigned int*>(p)); }

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// ---------------------------------------------------------------------------------------------
// Pieces shared by both kernels
// ---------------------------------------------------------------------------------------------

// A fragments of the 16 query tokens [tok0, tok0 + 16) of one head, straight from global memory
// (read once per warp, so no staging). Tokens >= T read as zero.
template <int kChunks>
__device__ __forceinline__ void load_q_frags(uint32_t (&qf)[kChunks][4], const bf16* q_head, size_t tok_stride,
                                             int tok0, int T, int lane) {
  const int g = lane >> 2, t = lane & 3;
  const int r0 = tok0 + g, r1 = tok0 + g + 8;
  const bool v0 = r0 < T, v1 = r1 < T;
  const bf16* p0 = q_head + static_cast<size_t>(v0 ? r0 : 0) * tok_stride + 2 * t;
  const bf16* p1 = q_head + static_cast<size_t>(v1 ? r1 : 0) * tok_stride + 2 * t;
#pragma unroll
  for (int kc = 0; kc < kChunks; ++kc) {
    qf[kc][0] = v0 ? ldg_u32(p0 + 16 * kc) : 0u;
    qf[kc][1] = v1 ? ldg_u32(p1 + 16 * kc) : 0u;
    qf[kc][2] = v0 ? ldg_u32(p0 + 16 * kc + 8) : 0u;
    qf[kc][3] = v1 ? ldg_u32(p1 + 16 * kc + 8) : 0u;
  }
}

// B fragments of rel_pos rows [n0, n0 + 8) (as the n dim) for every k16 chunk of the head dim.
// Rows >= rows read as zero; fp32 tables are rounded to bf16 here.
template <int kChunks>
__device__ __forceinline__ void load_relpos_frags(uint32_t (&bf)[kChunks][2], const void* table, bool fp32, int rows,
                                                  int n0, int lane) {
  constexpr int D = kChunks * 16;
  const int g = lane >> 2, t = lane & 3;
  const int row = n0 + g;
  if (row >= rows) {
#pragma unroll
    for (int kc = 0; kc < kChunks; ++kc) bf[kc][0] = bf[kc][1] = 0u;
    return;
  }
  if (fp32) {
    const float* r = static_cast<const float*>(table) + static_cast<size_t>(row) * D + 2 * t;
#pragma unroll
    for (int kc = 0; kc < kChunks; ++kc) {
      const float2 x = __ldg(reinterpret_cast<const float2*>(r + 16 * kc));
      const float2 y = __ldg(reinterpret_cast<const float2*>(r + 16 * kc + 8));
      bf[kc][0] = pack_bf16x2(x.x, x.y);
      bf[kc][1] = pack_bf16x2(y.x, y.y);
    }
  } else {
    const bf16* r = static_cast<const bf16*>(table) + static_cast<size_t>(row) * D + 2 * t;
#pragma unroll
    for (int kc = 0; kc < kChunks; ++kc) {
      bf[kc][0] = ldg_u32(r + 16 * kc);
      bf[kc][1] = ldg_u32(r + 16 * kc + 8);
    }
  }
}

// The bias prologue: for each of the warp's m16 query tiles, q . table[p] for every table row p,
// handed to sink(mt, hr, p, value) where the query is row g + 8*hr of tile mt (g = lane/4).
// kUnroll n8 tiles of the table are loaded at once: the prologue is latency-bound (the tables,
// a few KB, come from L2 or L1), but the global kernel has few registers to spare.
template <int kChunks, int kMTiles, int kUnroll, class Sink>
__device__ __forceinline__ void rel_logits(const uint32_t (&qf)[kMTiles][kChunks][4], const void* table, bool fp32,
                                           int rows, int lane, Sink&& sink) {
  const int t = lane & 3;
  const int n8_tiles = (rows + 7) / 8;
#pragma unroll kUnroll
  for (int nt = 0; nt < n8_tiles; ++nt) {
    uint32_t bf[kChunks][2];
    load_relpos_frags<kChunks>(bf, table, fp32, rows, nt * 8, lane);
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int kc = 0; kc < kChunks; ++kc) mma_16816(acc, qf[mt][kc], bf[kc][0], bf[kc][1]);
      const int p = nt * 8 + 2 * t;
      sink(mt, 0, p, acc[0]);
      sink(mt, 0, p + 1, acc[1]);
      sink(mt, 1, p, acc[2]);
      sink(mt, 1, p + 1, acc[3]);
    }
  }
}

// Rescales the running output and sum of rows whose max grew; skipped when no row of the warp
// grew (exact: the factor would be 1), which after the first few tiles is the common case.
template <int kMTiles, int kDTiles>
__device__ __forceinline__ void rescale_rows(float (&o)[kMTiles][kDTiles][4], float (&m_run)[kMTiles][2],
                                             float (&l_run)[kMTiles][2], const float (&m_new)[kMTiles][2]) {
  bool grow = false;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) grow |= (m_new[mt][0] > m_run[mt][0]) | (m_new[mt][1] > m_run[mt][1]);
  if (!__any_sync(0xffffffffu, grow)) return;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const float corr = m_run[mt][hr] == -INFINITY ? 0.f : exp2_approx(m_run[mt][hr] - m_new[mt][hr]);
      m_run[mt][hr] = m_new[mt][hr];
      l_run[mt][hr] *= corr;
#pragma unroll
      for (int dn = 0; dn < kDTiles; ++dn) {
        o[mt][dn][2 * hr] *= corr;
        o[mt][dn][2 * hr + 1] *= corr;
      }
    }
}

// O += P V for one 16-key chunk: P from the logit accumulators s0 (keys 0..7) and s1 (keys 8..15)
// of each m16 tile, V rows [16] at v (with this lane's ldmatrix offset applied).
template <int kMTiles, int kDTiles>
__device__ __forceinline__ void pv_chunk(float (&o)[kMTiles][kDTiles][4], const float (&s0)[kMTiles][4],
                                         const float (&s1)[kMTiles][4], const bf16* v) {
  uint32_t pa[kMTiles][4];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
    pa[mt][0] = pack_bf16x2(s0[mt][0], s0[mt][1]);
    pa[mt][1] = pack_bf16x2(s0[mt][2], s0[mt][3]);
    pa[mt][2] = pack_bf16x2(s1[mt][0], s1[mt][1]);
    pa[mt][3] = pack_bf16x2(s1[mt][2], s1[mt][3]);
  }
#pragma unroll
  for (int dp = 0; dp < kDTiles / 2; ++dp) {
    uint32_t vb[4];  // b0, b1 of dim tile 2dp, then of 2dp+1
    ldmatrix_x4_trans(vb, v + dp * 16);
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
      mma_16816(o[mt][2 * dp], pa[mt], vb[0], vb[1]);
      mma_16816(o[mt][2 * dp + 1], pa[mt], vb[2], vb[3]);
    }
  }
}

// out[token, :] = o / l for rows g and g+8 of an m16 tile (tokens >= T skipped).
template <int kDTiles>
__device__ __forceinline__ void store_rows(const float (&o)[kDTiles][4], const float (&l_run)[2], bf16* out_head,
                                           size_t out_stride, int tok0, int T, int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const float inv = 1.f / quad_sum(l_run[hr]);
    const int tok = tok0 + g + 8 * hr;
    if (tok < T) {
      bf16* dst = out_head + static_cast<size_t>(tok) * out_stride + 2 * t;
#pragma unroll
      for (int dn = 0; dn < kDTiles; ++dn)
        *reinterpret_cast<uint32_t*>(dst + 8 * dn) = pack_bf16x2(o[dn][2 * hr] * inv, o[dn][2 * hr + 1] * inv);
    }
  }
}

// ldmatrix lane offsets (elements) into a [keys][stride] tile.
// K, non-transposed: matrices (keys 0-7, dims 0-7), (keys 0-7, dims 8-15), (keys 8-15, dims 0-7),
// (keys 8-15, dims 8-15) -> b0, b1 of key n8 tile 0, then of key tile 1, for one k16 chunk.
__device__ __forceinline__ int k_lane_offset(int lane, int stride) {
  return ((lane >> 4) * 8 + (lane & 7)) * stride + ((lane >> 3) & 1) * 8;
}
// V, transposed: matrices (keys 0-7, dims 0-7), (keys 8-15, dims 0-7), (keys 0-7, dims 8-15),
// (keys 8-15, dims 8-15) -> b0, b1 of dim n8 tile 0, then of dim tile 1, for one 16-key chunk.
__device__ __forceinline__ int v_lane_offset(int lane, int stride) {
  return (((lane >> 3) & 1) * 8 + (lane & 7)) * stride + (lane >> 4) * 8;
}

// ---------------------------------------------------------------------------------------------
// Global attention: grid_w == 64, one key tile per grid row
// ---------------------------------------------------------------------------------------------

template <int kHeadDim>
struct GlobalTraits {
  static constexpr int kD = kHeadDim;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kMTiles = 2;                      // m16 tiles per warp
  static constexpr int kBlockM = kWarps * kMTiles * 16;  // 128 queries per CTA
  static constexpr int kBlockN = 64;                     // keys per tile: one grid row
  static constexpr int kGridW = kBlockN;
  static constexpr int kMaxGridH = 64;
  static constexpr int kStages = 2;
  static constexpr int kKeySplit = kD > 64 ? 2 : 1;  // softmax steps per key tile (registers)
  static constexpr int kChunks = kD / 16;            // k16 steps of Q K^T
  static constexpr int kDTiles = kD / 8;             // n8 tiles of O
  // bf16 row stride of K/V in shared memory: an odd number of 16 B units, so the 8 rows an
  // ldmatrix reads fall in distinct bank groups.
  static constexpr int kStride = kD + 8;
  static constexpr int kRelHStride = kMaxGridH + 1;  // floats; odd: the 8 rows read per tile hit 8 banks
  // floats; 72 = 8 mod 32: a float2 read of rows g = 0..7, columns 2t (+8 nt) is conflict-free.
  static constexpr int kRelWStride = kGridW + 8;
  static constexpr int kCopiesPerRow = kD * 2 / 16;  // 16 B cp.async per K/V row
  static constexpr size_t kTileElems = static_cast<size_t>(kBlockN) * kStride;
  static constexpr size_t kSmemK = 0;
  static constexpr size_t kSmemV = kSmemK + kStages * kTileElems * sizeof(bf16);
  static constexpr size_t kSmemRelH = kSmemV + kStages * kTileElems * sizeof(bf16);
  static constexpr size_t kSmemRelW = kSmemRelH + static_cast<size_t>(kBlockM) * kRelHStride * sizeof(float);
  static constexpr size_t kSmemBytes = kSmemRelW + static_cast<size_t>(kBlockM) * kRelWStride * sizeof(float);
  static_assert(kD % 16 == 0 && kDTiles % 2 == 0, "head dim must be a multiple of 16");
  static_assert(kThreads == 2 * kBlockN && kCopiesPerRow % 2 == 0, "two threads copy each K/V row");
  static_assert(kBlockN % (16 * kKeySplit) == 0, "softmax steps of whole k16 chunks");
  static_assert(kSmemRelW % 16 == 0, "rel_w rows read as float2");
};

// This thread's share of one K/V tile into one pipeline stage: thread i copies half of key row
// i / 2 (k_dst, v_dst and k_src already point there; V is v_minus_k elements after K in qkv), so
// that every address is a base plus an immediate (registers are the global kernel's tight spot).
template <class Tr>
__device__ __forceinline__ void load_kv_tile_global(bf16* k_dst, bf16* v_dst, const bf16* k_src, int v_minus_k) {
#pragma unroll
  for (int i = 0; i < Tr::kCopiesPerRow / 2; ++i) {
    cp_async_16(k_dst + 8 * i, k_src + 8 * i);
    cp_async_16(v_dst + 8 * i, k_src + v_minus_k + 8 * i);
  }
}

// grid (ceil(T / 128), heads, batch), 128 threads. Warp w owns queries [32w, 32w + 32) of the
// CTA's 128 (two m16 tiles, both inside one 64-token grid row).
template <int kHeadDim>
__global__ void __launch_bounds__(GlobalTraits<kHeadDim>::kThreads, 2)
    relpos_attention_global_kernel(const RelPosAttentionParams p, const float scale_log2, int /*unused*/) {
  using Tr = GlobalTraits<kHeadDim>;
  constexpr int D = Tr::kD, KC = Tr::kChunks, DT = Tr::kDTiles, MT = Tr::kMTiles, GW = Tr::kGridW;
  constexpr int kStride = Tr::kStride;
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* k_smem = reinterpret_cast<bf16*>(smem + Tr::kSmemK);
  bf16* v_smem = reinterpret_cast<bf16*>(smem + Tr::kSmemV);
  float* relh_smem = reinterpret_cast<float*>(smem + Tr::kSmemRelH);  // [128][65]: rel_h[i][kr] * log2 e
  float* relw_smem = reinterpret_cast<float*>(smem + Tr::kSmemRelW);  // [128][72]: rel_w[i][kc] * log2 e

  const int gh = p.grid_h, T = gh * GW;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const int h = blockIdx.y, b = blockIdx.z;
  const size_t hd = static_cast<size_t>(p.heads) * D, tok_stride = 3 * hd;
  const bf16* q_head = p.qkv + static_cast<size_t>(b) * T * tok_stride + static_cast<size_t>(h) * D;
  const bf16* k_head = q_head + hd;
  const int n_tiles = gh;

  // Key tile 0 flies while the prologue runs.
  const int copy_row = tid >> 1, copy_col = (tid & 1) * (Tr::kCopiesPerRow / 2) * 8;
  bf16* const k_dst = k_smem + copy_row * kStride + copy_col;
  bf16* const v_dst = v_smem + copy_row * kStride + copy_col;
  const bf16* kv_src = k_head + copy_row * tok_stride + copy_col;
  const size_t kv_src_step = Tr::kBlockN * tok_stride;  // one key tile further
  load_kv_tile_global<Tr>(k_dst, v_dst, kv_src, static_cast<int>(hd));
  cp_async_commit();

  const int row0 = warp * MT * 16;               // warp's first query within the CTA
  const int tok_cta = blockIdx.x * Tr::kBlockM;  // CTA's first query token
  uint32_t qf[MT][KC][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) load_q_frags<KC>(qf[mt], q_head, tok_stride, tok_cta + row0 + 16 * mt, T, lane);

  // Bias prologue: scatter q . rel_pos[p] to rel_h[i][row(i) + gh - 1 - p] and
  // rel_w[i][col(i) + 63 - p], keeping the entries that land inside the grid.
  rel_logits<KC, MT, 2>(qf, p.rel_pos_h, p.rel_pos_fp32, 2 * gh - 1, lane, [&](int mt, int hr, int pi, float val) {
    const int il = row0 + 16 * mt + g + 8 * hr;
    const int tok = min(tok_cta + il, T - 1);
    const int kr = tok / GW + gh - 1 - pi;
    if (kr >= 0 && kr < gh) relh_smem[il * Tr::kRelHStride + kr] = val * kLog2e;
  });
  rel_logits<KC, MT, 2>(qf, p.rel_pos_w, p.rel_pos_fp32, 2 * GW - 1, lane, [&](int mt, int hr, int pi, float val) {
    const int il = row0 + 16 * mt + g + 8 * hr;
    const int tok = min(tok_cta + il, T - 1);
    const int kc = tok % GW + GW - 1 - pi;
    if (kc >= 0 && kc < GW) relw_smem[il * Tr::kRelWStride + kc] = val * kLog2e;
  });
  __syncwarp();  // a warp reads back only its own rows

  // This thread's rows are il = row0 + g + 16 mt + 8 hr: one base each, the rest immediates.
  const float* relh_base = relh_smem + (row0 + g) * Tr::kRelHStride;
  const float* relw_base = relw_smem + (row0 + g) * Tr::kRelWStride + 2 * t;

  const int k_off = k_lane_offset(lane, kStride), v_off = v_lane_offset(lane, kStride);

  float o[MT][DT][4];
  float m_run[MT][2], l_run[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int dn = 0; dn < DT; ++dn) o[mt][dn][0] = o[mt][dn][1] = o[mt][dn][2] = o[mt][dn][3] = 0.f;
    m_run[mt][0] = m_run[mt][1] = -INFINITY;
    l_run[mt][0] = l_run[mt][1] = 0.f;
  }

#pragma unroll 1
  for (int kt = 0; kt < n_tiles; ++kt) {
    if (kt + 1 < n_tiles) {
      kv_src += kv_src_step;
      const int stage = ((kt + 1) & 1) * static_cast<int>(Tr::kTileElems);
      load_kv_tile_global<Tr>(k_dst + stage, v_dst + stage, kv_src, static_cast<int>(hd));
    }
    cp_async_commit();
    cp_async_wait<1>();  // tile kt has landed (for this thread) ...
    __syncthreads();     // ... and for every thread
    const bf16* kt_smem = k_smem + (kt & 1) * Tr::kTileElems + k_off;
    const bf16* vt_smem = v_smem + (kt & 1) * Tr::kTileElems + v_off;

    // The tile's keys in kSplit steps of kSubN (one online-softmax update each): for head dim 80 two
    // steps of 32 keys, which keeps S at 32 registers and the kernel out of local memory.
#pragma unroll
    for (int sub = 0; sub < Tr::kKeySplit; ++sub) {
      constexpr int kSubN = Tr::kBlockN / Tr::kKeySplit, kSubTiles = kSubN / 8;
      const int key0 = sub * kSubN;  // first key of this step within the tile (= its first column)

      // S = Q K^T: kSubTiles n8 tiles of keys per m16 tile.
      float s[MT][kSubTiles][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < kSubTiles; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
#pragma unroll
      for (int kc = 0; kc < KC; ++kc)
#pragma unroll
        for (int np = 0; np < kSubTiles / 2; ++np) {
          uint32_t kb[4];
          ldmatrix_x4(kb, kt_smem + (key0 + np * 16) * kStride + kc * 16);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma_16816(s[mt][2 * np], qf[mt][kc], kb[0], kb[1]);
            mma_16816(s[mt][2 * np + 1], qf[mt][kc], kb[2], kb[3]);
          }
        }

      // x = s * scale * log2e + rel_w (log2 domain); the row's logit max adds rel_h of this grid
      // row. p = exp2(x + rel_h - m_new) = exp2(x - c) with c = m_new - rel_h. (After rescale_rows,
      // m_run is m_new for every row: it grew, or m_new == m_run.)
      float m_new[MT][2], c_row[MT][2];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          const float relh_now = relh_base[(16 * mt + 8 * hr) * Tr::kRelHStride + kt];
          const float* relw_now = relw_base + (16 * mt + 8 * hr) * Tr::kRelWStride + key0;
          float mx = -INFINITY;
#pragma unroll
          for (int nt = 0; nt < kSubTiles; ++nt) {
            const float2 w = *reinterpret_cast<const float2*>(relw_now + 8 * nt);
            const float x0 = fmaf(s[mt][nt][2 * hr], scale_log2, w.x);
            const float x1 = fmaf(s[mt][nt][2 * hr + 1], scale_log2, w.y);
            s[mt][nt][2 * hr] = x0;
            s[mt][nt][2 * hr + 1] = x1;
            mx = fmaxf(mx, fmaxf(x0, x1));
          }
          m_new[mt][hr] = fmaxf(m_run[mt][hr], quad_max(mx) + relh_now);
          c_row[mt][hr] = m_new[mt][hr] - relh_now;
        }
      rescale_rows<MT, DT>(o, m_run, l_run, m_new);

      // P = exp2(x - c), row sums kept per thread (reduced across the quad at the end).
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          const float c = c_row[mt][hr];
          float rs = 0.f;
#pragma unroll
          for (int nt = 0; nt < kSubTiles; ++nt) {
            const float p0 = exp2_approx(s[mt][nt][2 * hr] - c);
            const float p1 = exp2_approx(s[mt][nt][2 * hr + 1] - c);
            s[mt][nt][2 * hr] = p0;
            s[mt][nt][2 * hr + 1] = p1;
            rs += p0 + p1;
          }
          l_run[mt][hr] += rs;
        }
      }

      // O += P V, 16 keys at a time.
#pragma unroll
      for (int kk = 0; kk < kSubTiles / 2; ++kk) {
        float s0[MT][4], s1[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            s0[mt][e] = s[mt][2 * kk][e];
            s1[mt][e] = s[mt][2 * kk + 1][e];
          }
        pv_chunk<MT, DT>(o, s0, s1, vt_smem + (key0 + kk * 16) * kStride);
      }
    }
    __syncthreads();  // stage kt & 1 is refilled by the next iteration's copies
  }

  bf16* out_head = p.out + static_cast<size_t>(b) * T * hd + static_cast<size_t>(h) * D;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) store_rows<DT>(o[mt], l_run[mt], out_head, hd, tok_cta + row0 + 16 * mt, T, lane);
}

// ---------------------------------------------------------------------------------------------
// Windowed attention: grid_h, grid_w <= 16; persistent CTAs, one (window, head) item at a time
// ---------------------------------------------------------------------------------------------

template <int kHeadDim>
struct WindowTraits {
  static constexpr int kD = kHeadDim;
  // One warp per m16 query tile: 14 x 14 = 196 tokens are 13 tiles, so 13 warps take a whole
  // item in one round (larger grids, up to 16 tiles, give some warps a second tile).
  static constexpr int kWarps = 13;
  static constexpr int kThreads = kWarps * 32;
#ifndef SEGANY_WINDOW_ROWS_PER_TILE
#define SEGANY_WINDOW_ROWS_PER_TILE 2
#endif
  static constexpr int kRowsPerTile = SEGANY_WINDOW_ROWS_PER_TILE;  // key tile: grid rows, 16 slots each
#ifndef SEGANY_WINDOW_TILE_UNROLL
#define SEGANY_WINDOW_TILE_UNROLL 1
#endif
  static constexpr int kTileUnroll = SEGANY_WINDOW_TILE_UNROLL;  // key tiles unrolled (interleaving)
  static constexpr int kChunks = kD / 16;
  static constexpr int kDTiles = kD / 8;
  static constexpr int kStride = kD + 8;  // as in GlobalTraits
  static constexpr int kRelStride = 17;   // floats: per-warp scratch rows of rel_h / rel_w
  static constexpr int kCopiesPerRow = kD * 2 / 16;
  static constexpr int kTableRows = 32;  // 2 * grid - 1 <= 31 rows, zero-padded to 32
  static constexpr size_t kTableBytes = 2ull * kTableRows * kStride * sizeof(bf16);
  __host__ __device__ static int q_rows(int T) { return (T + 15) / 16 * 16; }
  // One stage: Q (q_rows(T) rows: the rows of each query tile double as its warp's scratch), K, V.
  __host__ __device__ static size_t stage_elems(int T) { return static_cast<size_t>(q_rows(T) + 2 * T) * kStride; }
  static size_t smem_bytes(int T, int stages) { return kTableBytes + stages * stage_elems(T) * sizeof(bf16); }
  static_assert(kD % 16 == 0 && kDTiles % 2 == 0, "head dim must be a multiple of 16");
  static_assert(2 * 16 * kRelStride * 4 <= 16 * kStride * 2, "rel scratch fits in a query tile's Q rows");
};

// The window kernels' softmax over one query row, keys in NR grid rows of 16 slots: at(r, j, e) is
// the logit accumulator of key column 8j + 2t + e of grid row r (this lane's t), rw[j][e] its
// rel_w * log2e (-inf past grid_w), rh[r] the row's rel_h * log2e.
// x = s * scale + rel_w in place; returns this lane's max of x + rel_h.
template <int NR, class At>
__device__ __forceinline__ float window_row_max(At at, const float (&rw)[2][2], const float (&rh)[NR], float scale_log2) {
  float mx = -INFINITY;
#pragma unroll
  for (int r = 0; r < NR; ++r) {
    float mr = -INFINITY;
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& x = at(r, j, e);
        x = fmaf(x, scale_log2, rw[j][e]);
        mr = fmaxf(mr, x);
      }
    mx = fmaxf(mx, mr + rh[r]);
  }
  return mx;
}
// p = exp2(x + rel_h - m) in place; returns this lane's sum of p.
template <int NR, class At>
__device__ __forceinline__ float window_row_exp(At at, float m, const float (&rh)[NR]) {
  float sum = 0.f;
#pragma unroll
  for (int r = 0; r < NR; ++r) {
    const float c = m - rh[r];
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& x = at(r, j, e);
        x = exp2_approx(x - c);
        sum += x;
      }
  }
  return sum;
}

// One key tile of NR grid rows (16 slots each, row_step elements apart in shared memory) against
// one m16 query tile. relh0/relh1: rel_h * log2e of rows g and g+8 at this tile's first grid row.
// relw[hr][j][e]: rel_w * log2e of row g + 8 hr at column 8j + 2t + e (-inf past grid_w).
template <int NR, int KC, int DT>
__device__ __forceinline__ void window_tile(const bf16* kt_smem, const bf16* vt_smem, int row_step,
                                            const uint32_t (&qf)[1][KC][4], float (&o)[1][DT][4], float (&m_run)[1][2],
                                            float (&l_run)[1][2], const float (&relw)[2][2][2], const float* relh0,
                                            const float* relh1, float scale_log2) {
  float s[2 * NR][4];
#pragma unroll
  for (int nt = 0; nt < 2 * NR; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
  for (int kc = 0; kc < KC; ++kc)
#pragma unroll
    for (int rr = 0; rr < NR; ++rr) {
      uint32_t kb[4];
      ldmatrix_x4(kb, kt_smem + rr * row_step + kc * 16);
      mma_16816(s[2 * rr], qf[0][kc], kb[0], kb[1]);
      mma_16816(s[2 * rr + 1], qf[0][kc], kb[2], kb[3]);
    }

  float relh[2][NR];
#pragma unroll
  for (int rr = 0; rr < NR; ++rr) {
    relh[0][rr] = relh0[rr];
    relh[1][rr] = relh1[rr];
  }
  float m_new[1][2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    auto at = [&](int rr, int j, int e) -> float& { return s[2 * rr + j][2 * hr + e]; };
    m_new[0][hr] = fmaxf(m_run[0][hr], quad_max(window_row_max<NR>(at, relw[hr], relh[hr], scale_log2)));
  }
  rescale_rows<1, DT>(o, m_run, l_run, m_new);
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    auto at = [&](int rr, int j, int e) -> float& { return s[2 * rr + j][2 * hr + e]; };
    l_run[0][hr] += window_row_exp<NR>(at, m_run[0][hr], relh[hr]);
  }

#pragma unroll
  for (int rr = 0; rr < NR; ++rr) {
    float s0[1][4] = {{s[2 * rr][0], s[2 * rr][1], s[2 * rr][2], s[2 * rr][3]}};
    float s1[1][4] = {{s[2 * rr + 1][0], s[2 * rr + 1][1], s[2 * rr + 1][2], s[2 * rr + 1][3]}};
    pv_chunk<1, DT>(o, s0, s1, vt_smem + rr * row_step);
  }
}

// window_tile<nr> for a run-time nr in [1, NR] (the last key tile of a grid may be shorter).
template <int NR, int KC, int DT>
__device__ __forceinline__ void window_tile_rows(int nr, const bf16* kt_smem, const bf16* vt_smem, int row_step,
                                                 const uint32_t (&qf)[1][KC][4], float (&o)[1][DT][4],
                                                 float (&m_run)[1][2], float (&l_run)[1][2],
                                                 const float (&relw)[2][2][2], const float* relh0, const float* relh1,
                                                 float scale_log2) {
  if constexpr (NR > 1) {
    if (nr < NR) {
      window_tile_rows<NR - 1, KC, DT>(nr, kt_smem, vt_smem, row_step, qf, o, m_run, l_run, relw, relh0, relh1,
                                       scale_log2);
      return;
    }
  }
  window_tile<NR, KC, DT>(kt_smem, vt_smem, row_step, qf, o, m_run, l_run, relw, relh0, relh1, scale_log2);
}

// q . table[p] for the 32 (zero-padded) rows of a rel_pos table in shared memory, for the warp's
// m16 query tile: acc[nt][2 hr + e] is table row 8 nt + 2t + e against query row g + 8 hr.
template <int KC, int kStride>
__device__ __forceinline__ void window_rel_logits(float (&acc)[4][4], const uint32_t (&qf)[1][KC][4],
                                                  const bf16* table, int k_off) {
#pragma unroll
  for (int nt = 0; nt < 4; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;
#pragma unroll
  for (int kc = 0; kc < KC; ++kc)
#pragma unroll
    for (int gi = 0; gi < 2; ++gi) {
      uint32_t kb[4];
      ldmatrix_x4(kb, table + gi * 16 * kStride + k_off + kc * 16);
      mma_16816(acc[2 * gi], qf[0][kc], kb[0], kb[1]);
      mma_16816(acc[2 * gi + 1], qf[0][kc], kb[2], kb[3]);
    }
}

// Scatters window_rel_logits' acc, whose columns are table rows base + 8 nt + 2t + e, into the
// bias rows of the warp's queries (row g + 8 hr of dst): the query at position pos[hr] along an
// axis of n keys gets table row j at key k = pos + n - 1 - j, times log2 e; rows that fall outside
// [0, n) are not stored.
__device__ __forceinline__ void scatter_rel_logits(const float (&acc)[4][4], const int (&pos)[2], int n, int base,
                                                   float* dst, int stride, int g, int t) {
#pragma unroll
  for (int nt = 0; nt < 4; ++nt)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int k = pos[hr] + n - 1 - (base + nt * 8 + 2 * t + e);
        if (k >= 0 && k < n) dst[(g + 8 * hr) * stride + k] = acc[nt][2 * hr + e] * kLog2e;
      }
}

// Where a window kernel's items come from: item = ((b * n_wy + wy) * n_wx + wx) * heads + h, one
// (window, head) pair. Token tok of the item's window is grid token (y0 + tok / gw, x0 + tok % gw)
// of image b; token() gives its index in the image batch, or -1 for a padding token (what it
// needs of the item is computed once, in item()).
struct WindowGeometry {
  int gh, gw, T, img_h, img_w, n_wy, n_wx, heads, n_items;
  int inv_gw;  // tok / gw == (tok * inv_gw) >> 16 for tok < 4096
  struct Item {
    int b, y0, x0, h;
    long long base;        // image-batch index of the window's first token
    int rows_in, cols_in;  // the window's rows and columns inside the image (the rest: padding)
  };
  __device__ explicit WindowGeometry(const RelPosAttentionParams& p) {
    gh = p.grid_h, gw = p.grid_w, T = gh * gw;
    // The image grid the windows are cut from (sequences: one window per image, no padding).
    img_h = p.image_h > 0 ? p.image_h : gh, img_w = p.image_h > 0 ? p.image_w : gw;
    n_wy = (img_h + gh - 1) / gh, n_wx = (img_w + gw - 1) / gw;
    heads = p.heads;
    n_items = p.batch * n_wy * n_wx * p.heads;
    inv_gw = (65536 + gw - 1) / gw;
  }
  __device__ int row_of(int tok) const { return (tok * inv_gw) >> 16; }
  __device__ Item item(int item) const {
    Item it;
    const int win = item / heads;
    it.h = item - win * heads;
    const int b_wy = win / n_wx, wx = win - b_wy * n_wx;
    it.b = b_wy / n_wy;
    it.y0 = (b_wy - it.b * n_wy) * gh;
    it.x0 = wx * gw;
    it.base = (static_cast<long long>(it.b) * img_h + it.y0) * img_w + it.x0;
    it.rows_in = min(gh, img_h - it.y0);
    it.cols_in = min(gw, img_w - it.x0);
    return it;
  }
  __device__ long long token(const Item& it, int tok) const {
    const int ty = row_of(tok), tx = tok - ty * gw;
    return (ty < it.rows_in && tx < it.cols_in) ? it.base + ty * img_w + tx : -1;
  }
  // Where token tok's q of head it.h starts (k and v follow at +heads*D and +2*heads*D).
  __device__ const bf16* q_src(const RelPosAttentionParams& p, const Item& it, int tok, int D) const {
    const long long gt = token(it, tok);
    return (gt >= 0 ? p.qkv + static_cast<size_t>(gt) * 3 * heads * D : p.pad_qkv) + static_cast<size_t>(it.h) * D;
  }
};

// The rel_pos tables into shared memory ([kTableRows][kStride] each), rounded to bf16, rows past
// 2 * grid - 1 zero. Visible after the caller's next barrier.
template <int D, int kStride, int kTableRows>
__device__ void stage_rel_tables(const RelPosAttentionParams& p, bf16* tab_h, bf16* tab_w, int tid, int threads) {
  for (int i = tid; i < 2 * kTableRows * (D / 2); i += threads) {
    const int which = i / (kTableRows * (D / 2)), rest = i - which * (kTableRows * (D / 2));
    const int row = rest / (D / 2), col = 2 * (rest - row * (D / 2));
    const int rows = 2 * (which ? p.grid_w : p.grid_h) - 1;
    const void* table = which ? p.rel_pos_w : p.rel_pos_h;
    uint32_t v = 0u;
    if (row < rows) {
      if (p.rel_pos_fp32) {
        const float2 x = __ldg(reinterpret_cast<const float2*>(static_cast<const float*>(table) + row * D + col));
        v = pack_bf16x2(x.x, x.y);
      } else {
        v = ldg_u32(static_cast<const bf16*>(table) + row * D + col);
      }
    }
    *reinterpret_cast<uint32_t*>((which ? tab_w : tab_h) + row * kStride + col) = v;
  }
}

// The bias of one warp's 16 query rows [tok0, tok0 + 16) of a window, into the warp's scratch:
// relh_s[r * kRS + kr] = rel_h * log2e of row r against key grid row kr, relw_s likewise for key
// columns (rows r of the tile; padded rows take the last token's). qf: the rows' Q fragments.
template <int KC, int kStride, int kRS>
__device__ __forceinline__ void window_bias(const uint32_t (&qf)[1][KC][4], const bf16* tab_h, const bf16* tab_w,
                                            int tab_off, const WindowGeometry& geo, int tok0, int lane, float* relh_s,
                                            float* relw_s) {
  const int g = lane >> 2, t = lane & 3;
  int qrow[2], qcol[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int tok = min(tok0 + g + 8 * hr, geo.T - 1);
    qrow[hr] = geo.row_of(tok);
    qcol[hr] = tok - qrow[hr] * geo.gw;
  }
#pragma unroll
  for (int which = 0; which < 2; ++which) {  // rel_h, then rel_w
    const int n = which ? geo.gw : geo.gh;
    float* const dst = which ? relw_s : relh_s;
    float acc[4][4];
    window_rel_logits<KC, kStride>(acc, qf, which ? tab_w : tab_h, tab_off);
    const int pos[2] = {which ? qcol[0] : qrow[0], which ? qcol[1] : qrow[1]};
    scatter_rel_logits(acc, pos, n, 0, dst, kRS, g, t);
  }
}

// A warp's prologue for its 16 query rows [tok0, tok0 + 16) of a window, whose Q rows (row-major,
// kStride) start at `region`: their A fragments into qf (padded rows read the last token), then
// the region becomes the scratch of window_bias (returned: rel_h rows, rel_w rows after 16 * kRS),
// and rw gets rel_w * log2e at this lane's key columns 8j + 2t + e (-inf past grid_w).
template <int KC, int kStride, int kRS>
__device__ __forceinline__ float* window_prologue(uint32_t (&qf)[1][KC][4], float (&rw)[2][2][2], bf16* region,
                                                  const bf16* tab_h, const bf16* tab_w, int tab_off,
                                                  const WindowGeometry& geo, int tok0, int lane) {
  const int r = min(tok0 + (lane & 7) + ((lane >> 3) & 1) * 8, geo.T - 1) - tok0;
#pragma unroll
  for (int kc = 0; kc < KC; ++kc) ldmatrix_x4(qf[0][kc], region + r * kStride + (lane >> 4) * 8 + kc * 16);
  __syncwarp();  // every lane has its Q before the rows become scratch
  float* const relh_s = reinterpret_cast<float*>(region);  // [16][kRS] rel_h * log2e
  float* const relw_s = relh_s + 16 * kRS;                   // [16][kRS] rel_w * log2e
  window_bias<KC, kStride, kRS>(qf, tab_h, tab_w, tab_off, geo, tok0, lane, relh_s, relw_s);
  __syncwarp();
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int hr = 0; hr < 2; ++hr)
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = 8 * j + 2 * t + e;
        rw[hr][j][e] = c < geo.gw ? relw_s[(g + 8 * hr) * kRS + c] : -INFINITY;
      }
  return relh_s;
}

// A warp's 16 output rows (bf16, [16][kStride] in shared memory) to the image grid: 16-byte
// stores when out is 16-byte aligned, else 4-byte ones; only real tokens are written (padding
// tokens and padded query rows are dropped).
template <int D, int kStride>
__device__ __forceinline__ void store_window_rows(const bf16* region, bf16* out_head, size_t hd,
                                                  const WindowGeometry& geo, const WindowGeometry::Item& it, int tok0,
                                                  int lane, bool out_16b) {
  constexpr int kCopies = D / 8;
  if (out_16b) {
#pragma unroll
    for (int i = lane; i < 16 * kCopies; i += 32) {
      const int r = i / kCopies, ch = i - r * kCopies;
      const long long gt = tok0 + r < geo.T ? geo.token(it, tok0 + r) : -1;
      if (gt >= 0)
        *reinterpret_cast<uint4*>(out_head + static_cast<size_t>(gt) * hd + ch * 8) =
            *reinterpret_cast<const uint4*>(region + r * kStride + ch * 8);
    }
  } else {  // out only 4-byte aligned (the API's minimum)
    for (int i = lane; i < 16 * (D / 2); i += 32) {
      const int r = i / (D / 2), c = 2 * (i - r * (D / 2));
      const long long gt = tok0 + r < geo.T ? geo.token(it, tok0 + r) : -1;
      if (gt >= 0)
        *reinterpret_cast<uint32_t*>(out_head + static_cast<size_t>(gt) * hd + c) =
            *reinterpret_cast<const uint32_t*>(region + r * kStride + c);
    }
  }
}

// Persistent: grid = min(items, SMs), item = b * heads + h, items blockIdx.x, + gridDim.x, ...
// With two stages, item n + 1's Q, K and V are copied (cp.async) while item n is computed.
template <int kHeadDim>
__global__ void __launch_bounds__(WindowTraits<kHeadDim>::kThreads, 1)
    relpos_attention_window_kernel(const RelPosAttentionParams p, const float scale_log2, const int stages) {
  using Tr = WindowTraits<kHeadDim>;
  constexpr int D = Tr::kD, KC = Tr::kChunks, DT = Tr::kDTiles, kStride = Tr::kStride;
  constexpr int kCopies = Tr::kCopiesPerRow, kRS = Tr::kRelStride;
  extern __shared__ __align__(128) unsigned char smem[];
  const WindowGeometry geo(p);
  const int gh = geo.gh, gw = geo.gw, T = geo.T, n_items = geo.n_items;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
  bf16* const tab_h = reinterpret_cast<bf16*>(smem);
  bf16* const tab_w = tab_h + Tr::kTableRows * kStride;
  bf16* const stage0 = tab_w + Tr::kTableRows * kStride;
  const size_t stage_elems = Tr::stage_elems(T);
  const int q_rows = Tr::q_rows(T);
  const size_t hd = static_cast<size_t>(p.heads) * D;

  // Q, K, V of one item into one stage: token-major, kCopies 16 B pieces per row; padding tokens
  // copy pad_qkv.
  auto issue = [&](int item, bf16* st) {
    const WindowGeometry::Item it = geo.item(item);
    bf16* const qd = st;
    bf16* const kd = st + static_cast<size_t>(q_rows) * kStride;
    bf16* const vd = kd + static_cast<size_t>(T) * kStride;
    for (int i = tid; i < T * kCopies; i += Tr::kThreads) {
      const int tok = i / kCopies, ch = i - tok * kCopies;
      const bf16* src = geo.q_src(p, it, tok, D) + ch * 8;
      const int dst = tok * kStride + ch * 8;
      cp_async_16(qd + dst, src);
      cp_async_16(kd + dst, src + hd);
      cp_async_16(vd + dst, src + 2 * hd);
    }
  };

  int item = blockIdx.x;
  if (item < n_items) issue(item, stage0);
  cp_async_commit();
  stage_rel_tables<D, kStride, Tr::kTableRows>(p, tab_h, tab_w, tid, Tr::kThreads);

  // Lane offsets. Key ldmatrix rows are the slots of a grid row, 16 per row; slots past grid_w
  // read the row's last key (finite; rel_w = -inf gives them probability 0 exactly).
  const int kslot = (lane >> 4) * 8 + (lane & 7), vslot = ((lane >> 3) & 1) * 8 + (lane & 7);
  const int k_off = min(kslot, gw - 1) * kStride + ((lane >> 3) & 1) * 8;
  const int v_off = min(vslot, gw - 1) * kStride + (lane >> 4) * 8;
  const int tab_off = k_lane_offset(lane, kStride);
  const int row_step = gw * kStride;  // one grid row of keys
  const int n_units = q_rows / 16;
  const int n_tiles = (gh + Tr::kRowsPerTile - 1) / Tr::kRowsPerTile;
  const bool out_16b = (reinterpret_cast<uintptr_t>(p.out) & 15) == 0;

  bf16* stage_cur = stage0;
  for (; item < n_items; item += gridDim.x) {
    const int next = item + gridDim.x;
    bf16* const stage_nxt = stages == 2 ? (stage_cur == stage0 ? stage0 + stage_elems : stage0) : stage0;
    if (stages == 2) {
      if (next < n_items) issue(next, stage_nxt);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // this item's Q, K, V (and the tables) are in shared memory for every thread

    const WindowGeometry::Item it = geo.item(item);
    bf16* const q_s = stage_cur;
    const bf16* const k_s = stage_cur + static_cast<size_t>(q_rows) * kStride;
    const bf16* const v_s = k_s + static_cast<size_t>(T) * kStride;
    bf16* const out_head = p.out + static_cast<size_t>(it.h) * D;

    for (int u = warp; u < n_units; u += Tr::kWarps) {
      const int tok0 = u * 16;
      bf16* const region = q_s + static_cast<size_t>(tok0) * kStride;  // this tile's Q rows: scratch after
      uint32_t qf[1][KC][4];
      float relw[2][2][2];
      const float* const relh_s =
          window_prologue<KC, kStride, kRS>(qf, relw, region, tab_h, tab_w, tab_off, geo, tok0, lane);

      float o[1][DT][4];
      float m_run[1][2] = {{-INFINITY, -INFINITY}}, l_run[1][2] = {{0.f, 0.f}};
#pragma unroll
      for (int dn = 0; dn < DT; ++dn) o[0][dn][0] = o[0][dn][1] = o[0][dn][2] = o[0][dn][3] = 0.f;

#pragma unroll Tr::kTileUnroll
      for (int tt = 0; tt < n_tiles; ++tt) {
        const int kr0 = tt * Tr::kRowsPerTile;
        const bf16* kt_smem = k_s + kr0 * row_step + k_off;
        const bf16* vt_smem = v_s + kr0 * row_step + v_off;
        const float* relh0 = relh_s + g * kRS + kr0;
        const float* relh1 = relh0 + 8 * kRS;
        window_tile_rows<Tr::kRowsPerTile, KC, DT>(min(Tr::kRowsPerTile, gh - kr0), kt_smem, vt_smem, row_step, qf, o,
                                                   m_run, l_run, relw, relh0, relh1, scale_log2);
      }

      // O / l -> bf16 rows in the scratch, then coalesced stores of the tile's valid rows.
      __syncwarp();  // rel_h reads done
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const float inv = 1.f / quad_sum(l_run[0][hr]);
        bf16* dst = region + (g + 8 * hr) * kStride + 2 * t;
#pragma unroll
        for (int dn = 0; dn < DT; ++dn)
          *reinterpret_cast<uint32_t*>(dst + 8 * dn) = pack_bf16x2(o[0][dn][2 * hr] * inv, o[0][dn][2 * hr + 1] * inv);
      }
      __syncwarp();
      store_window_rows<D, kStride>(region, out_head, hd, geo, it, tok0, lane, out_16b);
    }
    __syncthreads();  // the stage is free: the next iteration (or the single-stage copy) refills it
    if (stages == 1 && next < n_items) {
      issue(next, stage0);
      cp_async_commit();
    }
    stage_cur = stage_nxt;
  }
  cp_async_wait<0>();
}

// ---------------------------------------------------------------------------------------------
// Global attention on sm_90a (Hopper): warpgroup MMA, TMA, warp specialisation (FA3 style)
// ---------------------------------------------------------------------------------------------
//
// grid (ceil(T / kBlockM), heads, batch), 128 threads per warpgroup. Warpgroup 0 is the producer
// (one thread issues every TMA copy; the others leave; setmaxnreg gives their registers to the
// consumers), warpgroups 1 .. kConsumerWGs are consumers owning 64 queries each (3 at head dim 64,
// 2 at 80: kBlockM = 192 or 128).
// * Shared memory tiles are TMA boxes of 64 tokens x 64 head-dim columns (128 bytes a row), 128-byte
//   swizzled, so each is 8 KB and 1024-byte aligned; head dim 80 takes two column blocks, the second
//   zero-filled past column 80 (TMA out-of-bounds fill) and only its first 16 columns ever read.
//   K and V stages: [column block][64 keys].
// * S = Q K^T: wgmma m64n64k16, A = Q from registers (the prologue's mma.sync fragments, read from
//   global memory), B = K from shared memory, K-major (head dim contiguous): k-step kc reads column
//   block kc / 4 at byte offset 32 (kc % 4) inside the swizzle atom. O += P V: wgmma
//   m64n{64,80}k16, A = P from registers (the S accumulator layout is the A fragment layout once
//   packed to bf16), B = V N-major (transposed: head dim contiguous), leading byte offset = one
//   column block (8 KB), stride byte offset = 8 keys (1024 B).
// * K/V ring of kStages stages; full barriers (TMA transaction bytes) and empty barriers (one
//   arrival per consumer warp once its P V wgmma has completed).
// * The bias as in the mma.sync kernel, with the tables staged first: the consumer threads copy
//   both rel_pos tables into shared memory (bf16, padded rows; each thread's loads all in flight
//   at once), then each consumer warp's prologue (mma.sync, B fragments by ldmatrix) scatters
//   rel_h into shared memory (one scalar per row and key tile) and rel_w into a scratch from which
//   each thread gathers the 32 values of its own S accumulator positions: rel_w then lives in
//   registers for the whole key loop. (With B fragments read from global memory, as the mma.sync
//   kernel does, the prologue waited on ~30 L2 round trips: 20% of the kernel's time, Nsight
//   Compute's warp samples.)
// * Pipelining inside a warpgroup: step kt issues S(kt) and P(kt-1) V(kt-1) together, waits for S
//   alone, runs the softmax of tile kt under P V, then waits for P V (FA3's intra-warpgroup overlap).
//   The two consumer warpgroups take turns issuing (named barriers, "pingpong"). Caveat seen in the
//   SASS: ptxas sinks the exponentials below the P V wait anyway (into the next S GEMM's issue);
//   pinning them with a branch was slower (SEGANY_SM90_PIN_SOFTMAX).

template <int kHeadDim>
struct Sm90Traits {
  static constexpr int kD = kHeadDim;
  static constexpr int kColBlocks = (kD + 63) / 64;  // 64-column (128 B) swizzle blocks
  static constexpr int kChunks = kD / 16;            // k16 steps of Q K^T
  static constexpr int kDTiles = kD / 8;             // n8 tiles of O
  // Consumer warpgroups of 64 queries each: 3 at head dim 64 (three warps per scheduler to hide
  // the softmax's latency; 160 registers each), 2 at 80 (three would leave room for only 2 K/V
  // stages, measured 50% slower on vit_h global).
#ifndef SEGANY_SM90_CONSUMERS_D64
#define SEGANY_SM90_CONSUMERS_D64 3
#endif
  static constexpr int kConsumerWGs = kD == 64 ? SEGANY_SM90_CONSUMERS_D64 : 2;
  static constexpr int kBlockM = 64 * kConsumerWGs, kBlockN = 64;
  static constexpr int kThreads = 128 * (1 + kConsumerWGs);
  // setmaxnreg: the producer keeps 24 registers, the consumers share the rest of the 64 K.
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = ((65536 / 128 - kProducerRegs) / kConsumerWGs) / 8 * 8 > 240
                                           ? 240
                                           : ((65536 / 128 - kProducerRegs) / kConsumerWGs) / 8 * 8;
  static_assert(128 * (kProducerRegs + kConsumerWGs * kConsumerRegs) <= 65536,
                "setmaxnreg: the warpgroups fit the register file");
  // K/V ring depth: what the shared memory holds (227 KB). The loads are L2 hits mostly, but their
  // latency (~1 us) spans more than a key tile's compute, so depth is what keeps the consumers fed.
#ifndef SEGANY_SM90_STAGES_D64
#define SEGANY_SM90_STAGES_D64 3
#endif
#ifndef SEGANY_SM90_STAGES_D80
#define SEGANY_SM90_STAGES_D80 3
#endif
  static constexpr int kStages = kD == 64 ? SEGANY_SM90_STAGES_D64 : SEGANY_SM90_STAGES_D80;
  static constexpr int kBoxBytes = 64 * 128;  // one TMA box: 64 tokens x 64 bf16
  static constexpr int kTileBytes = kColBlocks * kBoxBytes;  // one K or V tile
  static constexpr int kRelHStride = 65;
  static constexpr int kRelWStride = 64;  // prologue-only scratch: dense (bank conflicts cost little there)
  // The rel_pos tables in shared memory for the prologue: 128 rows (2 * 64 - 1 used) of bf16, rows
  // padded by 16 B so that ldmatrix row addresses fall in different banks.
  static constexpr int kTabRows = 128, kTabStride = kD + 8;
  static constexpr int kTabChunks = kD / 8;  // 16-byte chunks per row
  static constexpr size_t kSmemK = 0;
  static constexpr size_t kSmemV = kSmemK + static_cast<size_t>(kStages) * kTileBytes;
  static constexpr size_t kSmemRelH = kSmemV + static_cast<size_t>(kStages) * kTileBytes;
  static constexpr size_t kSmemRelW = kSmemRelH + static_cast<size_t>(kBlockM) * kRelHStride * sizeof(float);
  static constexpr size_t kSmemTab = kSmemRelW + static_cast<size_t>(kBlockM) * kRelWStride * sizeof(float);
  static constexpr size_t kSmemBar = kSmemTab + 2 * static_cast<size_t>(kTabRows) * kTabStride * sizeof(bf16);
  static constexpr size_t kSmemUsed = kSmemBar + 2 * kStages * 8;
  static constexpr size_t kSmemBytes = kSmemUsed + 1024;  // the base is rounded up to 1024 B
  static_assert(kSmemBytes <= 227 * 1024, "more shared memory than an H100 block may have");
  static_assert(kChunks * 16 == kD && kDTiles * 8 == kD && kBlockN == 64, "head dim a multiple of 16, key tile 64");
  static_assert(kTabRows >= 2 * 64 - 1 && kTabChunks * 8 == kD, "the tables' rows fit, whole 16-byte chunks");
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SEGANY_SM90A_DEVICE 1
#endif

#ifdef SEGANY_SM90A_DEVICE
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}
// One 3-D TMA box (columns, (q|k|v, head), tokens) into shared memory, completing on bar.
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1,
                                            int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
      "[%5];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
      : "memory");
}
// The dynamic shared memory from its first 1024-byte boundary (TMA boxes and swizzle atoms need
// it), indexed from the __shared__ array itself: the compiler then keeps every access through it a
// shared-memory one (rounded through an integer, the pointer made them generic loads and stores
// with 64-bit address arithmetic).
__device__ __forceinline__ unsigned char* smem_aligned_1024(unsigned char* raw) {
  return raw + ((1024u - (smem_u32(raw) & 1023u)) & 1023u);
}
// Named barriers 1 .. consumer warpgroups order the consumers' GEMM issues (pingpong).
__device__ __forceinline__ void named_bar_sync(int id) {
  asm volatile("bar.sync %0, 256;\n" ::"r"(id) : "memory");
}
// Named barrier `id` for n threads (a multiple of 32; the ones that reach it).
__device__ __forceinline__ void named_bar_sync_n(int id, int n) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(n) : "memory");
}
__device__ __forceinline__ void named_bar_arrive(int id) {
  asm volatile("bar.arrive %0, 256;\n" ::"r"(id) : "memory");
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accesses of accumulator registers across wgmma issue / wait.
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
// The same for register A fragments: keeps them live (unchanged) until the wgmma reading them is done.
template <int N, int M>
__device__ __forceinline__ void fence_regs(uint32_t (&r)[N][M]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int j = 0; j < M; ++j) asm volatile("" : "+r"(r[i][j])::"memory");
}
// Shared memory matrix descriptor, 128-byte swizzle (layout type 1). Byte offsets in 16 B units.
__device__ __forceinline__ uint64_t sw128_desc(uint32_t addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  return static_cast<uint64_t>((addr & 0x3FFFFu) >> 4) | (static_cast<uint64_t>((lbo_bytes >> 4) & 0x3FFFu) << 16) |
         (static_cast<uint64_t>((sbo_bytes >> 4) & 0x3FFFu) << 32) | (1ull << 62);
}
// The same with the 32-byte swizzle (layout type 3): rows of 32 B, the 16 B half of row r at
// (half ^ (r >> 2) & 1); atoms of 8 rows (256 B), 256-byte aligned.
__device__ __forceinline__ uint64_t sw32_desc(uint32_t addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  return static_cast<uint64_t>((addr & 0x3FFFFu) >> 4) | (static_cast<uint64_t>((lbo_bytes >> 4) & 0x3FFFu) << 16) |
         (static_cast<uint64_t>((sbo_bytes >> 4) & 0x3FFFu) << 32) | (3ull << 62);
}

// d += A B, m64n64k16, A from registers, B from shared memory N-major (transposed), fp32 accumulate.
__device__ __forceinline__ void wgmma_m64n64k16_rs_tb(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
}

// d += A B, m64n80k16, A from registers, B from shared memory N-major (transposed), fp32 accumulate.
__device__ __forceinline__ void wgmma_m64n80k16_rs_tb(float (&d)[40], const uint32_t (&a)[4], uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %45, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n80k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39}, {%40,%41,%42,%43}, %44, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
}


// d (+)= A B, m64n64k16, A from registers, B from shared memory K-major, fp32 accumulate.
__device__ __forceinline__ void wgmma_m64n64k16_rs(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, %36, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate));
}

template <int D>
__device__ __forceinline__ void wgmma_pv(float (&o)[D / 2], const uint32_t (&a)[4], uint64_t desc_b) {
  if constexpr (D == 64)
    wgmma_m64n64k16_rs_tb(o, a, desc_b);
  else
    wgmma_m64n80k16_rs_tb(o, a, desc_b);
}

// d (+)= A B, m64n224k16, A from registers, B from shared memory K-major, fp32 accumulate.
__device__ __forceinline__ void wgmma_m64n224k16_rs(float (&d)[112], const uint32_t (&a)[4], uint64_t desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %117, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n224k16.f32.bf16.bf16 "
      "{"
      "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
      "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,"
      "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,"
      "%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63,"
      "%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,"
      "%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95,"
      "%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111"
      "}, {%112,%113,%114,%115}, %116, p, 1, 1, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
        "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
        "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
        "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
        "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
        "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(accumulate));
}

// d += A B, m64n16k16, A from registers, B from shared memory N-major (transposed), fp32 accumulate.
__device__ __forceinline__ void wgmma_m64n16k16_rs_tb(float (&d)[8], const uint32_t (&a)[4], uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 "
      "{"
      "%0,%1,%2,%3,%4,%5,%6,%7"
      "}, {%8,%9,%10,%11}, %12, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
}
#endif  // SEGANY_SM90A_DEVICE

#ifdef SEGANY_SM90A_DEVICE
// 8 elements (16 bytes of bf16) of a rel_pos table row from global memory: fp32 tables rounded to
// bf16; 16-byte loads when the table allows them (the API promises 4 / 8 bytes).
__device__ __forceinline__ uint4 load_table_chunk(const void* table, bool fp32, bool wide, int offset) {
  if (fp32) {
    const float* src = static_cast<const float*>(table) + offset;
    float2 x[4];
    if (wide) {
      const float4 a = __ldg(reinterpret_cast<const float4*>(src)), b = __ldg(reinterpret_cast<const float4*>(src) + 1);
      x[0] = make_float2(a.x, a.y), x[1] = make_float2(a.z, a.w), x[2] = make_float2(b.x, b.y), x[3] = make_float2(b.z, b.w);
    } else {
#pragma unroll
      for (int i = 0; i < 4; ++i) x[i] = __ldg(reinterpret_cast<const float2*>(src) + i);
    }
    return make_uint4(pack_bf16x2(x[0].x, x[0].y), pack_bf16x2(x[1].x, x[1].y), pack_bf16x2(x[2].x, x[2].y),
                      pack_bf16x2(x[3].x, x[3].y));
  }
  const bf16* src = static_cast<const bf16*>(table) + offset;
  if (wide) return __ldg(reinterpret_cast<const uint4*>(src));
  return make_uint4(ldg_u32(src), ldg_u32(src + 2), ldg_u32(src + 4), ldg_u32(src + 6));
}

// The global kernel's rel_pos tables into shared memory ([kTabRows][kTabStride] bf16 each, rows
// past 2 * grid - 1 zero), by the consumer threads (ctid in [0, 128 * kConsumerWGs)): every load
// of a thread is issued before its first store, so the copy costs one round trip to L2.
template <class Tr>
__device__ __forceinline__ void stage_global_tables(const RelPosAttentionParams& p, int gh, bf16* tab_h, bf16* tab_w,
                                                    int ctid) {
  constexpr int kThreads = 128 * Tr::kConsumerWGs, kPerTable = Tr::kTabRows * Tr::kTabChunks;
  constexpr int kPer = (2 * kPerTable + kThreads - 1) / kThreads;
  const size_t align = p.rel_pos_fp32 ? 32 : 16;
  const bool wide = (reinterpret_cast<uintptr_t>(p.rel_pos_h) % align) == 0 &&
                    (reinterpret_cast<uintptr_t>(p.rel_pos_w) % align) == 0;
  uint4 v[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int c = ctid + i * kThreads;
    const int which = c >= kPerTable, rest = c - which * kPerTable;
    const int row = rest / Tr::kTabChunks, ch = rest - row * Tr::kTabChunks;
    const int rows = which ? 2 * 64 - 1 : 2 * gh - 1;
    v[i] = make_uint4(0u, 0u, 0u, 0u);
    if (c < 2 * kPerTable && row < rows)
      v[i] = load_table_chunk(which ? p.rel_pos_w : p.rel_pos_h, p.rel_pos_fp32, wide, row * Tr::kD + ch * 8);
  }
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int c = ctid + i * kThreads;
    const int which = c >= kPerTable, rest = c - which * kPerTable;
    const int row = rest / Tr::kTabChunks, ch = rest - row * Tr::kTabChunks;
    if (c < 2 * kPerTable) *reinterpret_cast<uint4*>((which ? tab_w : tab_h) + row * Tr::kTabStride + ch * 8) = v[i];
  }
}
#endif  // SEGANY_SM90A_DEVICE

template <int kHeadDim>
__global__ void __launch_bounds__(Sm90Traits<kHeadDim>::kThreads, 1)
    relpos_attention_global_sm90_kernel(const __grid_constant__ CUtensorMap tmap, const RelPosAttentionParams p,
                                        const float scale_log2) {
#ifdef SEGANY_SM90A_DEVICE
  using Tr = Sm90Traits<kHeadDim>;
  constexpr int D = Tr::kD, KC = Tr::kChunks, DT = Tr::kDTiles, S = Tr::kStages, GW = 64;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = smem_aligned_1024(smem_raw);
  const uint32_t smem_base = smem_u32(smem);
  const uint32_t k_s = smem_base + Tr::kSmemK, v_s = smem_base + Tr::kSmemV;
  float* relh_smem = reinterpret_cast<float*>(smem + Tr::kSmemRelH);
  float* relw_smem = reinterpret_cast<float*>(smem + Tr::kSmemRelW);
  bf16* const tab_h = reinterpret_cast<bf16*>(smem + Tr::kSmemTab);
  bf16* const tab_w = tab_h + Tr::kTabRows * Tr::kTabStride;
  const uint32_t bar_full = smem_base + Tr::kSmemBar, bar_empty = bar_full + 8 * S;

  const int gh = p.grid_h, T = gh * GW;
  const int tid = threadIdx.x, wg = tid >> 7, lane = tid & 31;
  const int h = blockIdx.y, b = blockIdx.z;
  const int tok_cta = blockIdx.x * Tr::kBlockM;
  const int n_tiles = gh;

  if (tid == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(bar_full + 8 * s, 1);
      mbar_init(bar_empty + 8 * s, 4 * Tr::kConsumerWGs);  // one arrival per consumer warp
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  }
  __syncthreads();

  if (wg == 0) {
    // ---------------- producer ----------------
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(Tr::kProducerRegs) : "memory");
    if (tid == 0) {
      const int tok_img = b * T;  // first token of this image in the (B*T) token dimension
      for (int kt = 0; kt < n_tiles; ++kt) {
        const int s = kt % S;
        if (kt >= S) mbar_wait(bar_empty + 8 * s, ((kt / S) - 1) & 1);
        const uint32_t full = bar_full + 8 * s;
        mbar_expect_tx(full, 2 * Tr::kTileBytes);
#pragma unroll
        for (int cb = 0; cb < Tr::kColBlocks; ++cb) {
          tma_load_3d(k_s + s * Tr::kTileBytes + cb * Tr::kBoxBytes, &tmap, full, cb * 64, p.heads + h,
                      tok_img + kt * 64);
          tma_load_3d(v_s + s * Tr::kTileBytes + cb * Tr::kBoxBytes, &tmap, full, cb * 64, 2 * p.heads + h,
                      tok_img + kt * 64);
        }
      }
    }
    return;
  }

  // ---------------- consumers ----------------
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(Tr::kConsumerRegs) : "memory");
  const int cw = wg - 1;                  // consumer warpgroup: queries [64 cw, 64 cw + 64) of the CTA
  const int warp = (tid >> 5) & 3;        // warp inside the warpgroup: rows [16 warp, 16 warp + 16)
  const int g = lane >> 2, t = lane & 3;
  const int row0 = 64 * cw + 16 * warp;  // this warp's first query within the CTA
  const size_t hd = static_cast<size_t>(p.heads) * D, tok_stride = 3 * hd;
  const bf16* q_head = p.qkv + static_cast<size_t>(b) * T * tok_stride + static_cast<size_t>(h) * D;

  // Bias prologue: the rel_pos tables into shared memory (every load of a thread in flight at
  // once: one L2 round trip, where B fragments read from global memory cost ~30 of them), then
  // per warp q . table for its 16 query rows (mma.sync, B fragments by ldmatrix), scattered into
  // rel_h (per row and key grid row) and rel_w (per row and key column).
  float rw[32];  // rel_w * log2 e at this thread's S accumulator positions
  uint32_t qf[1][KC][4];  // the warp's 16 query rows as A fragments (also the S = Q K^T A operand)
  {
    load_q_frags<KC>(qf[0], q_head, tok_stride, tok_cta + row0, T, lane);
    stage_global_tables<Tr>(p, gh, tab_h, tab_w, tid - 128);
    named_bar_sync_n(8, 128 * Tr::kConsumerWGs);  // (1 .. kConsumerWGs: the pingpong's)
    const int tab_off = k_lane_offset(lane, Tr::kTabStride);
    int qrow[2], qcol[2];
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int tok = min(tok_cta + row0 + g + 8 * hr, T - 1);
      qrow[hr] = tok / GW;
      qcol[hr] = tok % GW;
    }
#pragma unroll 1
    for (int which = 0; which < 2; ++which) {  // rel_h (2 gh - 1 table rows), then rel_w (2 * 64 - 1)
      const int n = which ? GW : gh, stride = which ? Tr::kRelWStride : Tr::kRelHStride;
      const bf16* const tab = which ? tab_w : tab_h;
      float* const dst = which ? relw_smem : relh_smem;
      const int pos[2] = {which ? qcol[0] : qrow[0], which ? qcol[1] : qrow[1]};
#pragma unroll 1
      for (int grp = 0; grp < (2 * n - 1 + 31) / 32; ++grp) {  // 32 table rows a group
        float acc[4][4];
        window_rel_logits<KC, Tr::kTabStride>(acc, qf, tab + grp * 32 * Tr::kTabStride, tab_off);
        scatter_rel_logits(acc, pos, n, grp * 32, dst + row0 * stride, stride, g, t);
      }
    }
    __syncwarp();
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const float2 w =
            *reinterpret_cast<const float2*>(relw_smem + (row0 + g + 8 * hr) * Tr::kRelWStride + 8 * j + 2 * t);
        rw[4 * j + 2 * hr] = w.x;
        rw[4 * j + 2 * hr + 1] = w.y;
      }
  }
  const float* relh_row0 = relh_smem + (row0 + g) * Tr::kRelHStride;
  const float* relh_row1 = relh_row0 + 8 * Tr::kRelHStride;

  float o[DT * 4];
#pragma unroll
  for (int i = 0; i < DT * 4; ++i) o[i] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};

  // Q is the S GEMM's A operand from registers (the prologue's fragments; K alone is read from
  // shared memory).
  auto issue_s = [&](float (&s)[32], int kt) {
    const uint32_t k_tile = k_s + (kt % S) * Tr::kTileBytes;
    wgmma_fence();
#pragma unroll
    for (int kc = 0; kc < KC; ++kc) {
      const uint64_t db = sw128_desc(k_tile + (kc / 4) * Tr::kBoxBytes + (kc % 4) * 32, 16, 1024);
      wgmma_m64n64k16_rs(s, qf[0][kc], db, kc > 0);
    }
    wgmma_commit();
  };

  // Softmax of one tile's S (log2 domain): x = s * scale + rel_w, the row max adds rel_h of the
  // tile's grid row; p = exp2(x + rel_h - m_new) = exp2(x - c) with c = m_new - rel_h, packed into
  // bf16 A fragments (k16 chunk kk = keys 16 kk ..). Returns the factors the running O must take.
  auto softmax = [&](float (&s)[32], uint32_t (&pa)[4][4], int kt, float (&corr)[2]) {
    const float relh_now[2] = {relh_row0[kt], relh_row1[kt]};
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      // Max and sum as 4-way trees: short dependency chains (only 2 warps per scheduler here).
      float mx4[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int i = 4 * j + 2 * hr + e;
          s[i] = fmaf(s[i], scale_log2, rw[i]);
          mx4[(2 * j + e) & 3] = fmaxf(mx4[(2 * j + e) & 3], s[i]);
        }
      const float mx = fmaxf(fmaxf(mx4[0], mx4[1]), fmaxf(mx4[2], mx4[3]));
      const float m_new = fmaxf(m_run[hr], quad_max(mx) + relh_now[hr]);
      corr[hr] = m_run[hr] == -INFINITY ? 0.f : exp2_approx(m_run[hr] - m_new);
      m_run[hr] = m_new;
      const float c = m_new - relh_now[hr];
      float rs4[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int i = 4 * j + 2 * hr + e;
          s[i] = exp2_approx(s[i] - c);
          rs4[(2 * j + e) & 3] += s[i];
        }
      l_run[hr] = l_run[hr] * corr[hr] + ((rs4[0] + rs4[1]) + (rs4[2] + rs4[3]));
    }
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      pa[kk][0] = pack_bf16x2(s[8 * kk + 0], s[8 * kk + 1]);
      pa[kk][1] = pack_bf16x2(s[8 * kk + 2], s[8 * kk + 3]);
      pa[kk][2] = pack_bf16x2(s[8 * kk + 4], s[8 * kk + 5]);
      pa[kk][3] = pack_bf16x2(s[8 * kk + 6], s[8 * kk + 7]);
    }
  };
  auto issue_pv = [&](const uint32_t (&pa)[4][4], int kt) {
    const uint32_t v_tile = v_s + (kt % S) * Tr::kTileBytes;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) wgmma_pv<D>(o, pa[kk], sw128_desc(v_tile + kk * 2048, Tr::kBoxBytes, 1024));
    wgmma_commit();
  };

  // Pingpong: the warpgroups take turns issuing their GEMMs in a ring (named barrier 1 + cw is this
  // warpgroup's turn), so that one's softmax runs under the others' GEMMs instead of all in step.
  // The last warpgroup hands warpgroup 0 the first turn and skips its very last hand-over, which
  // balances the barriers.
#ifndef SEGANY_SM90_PINGPONG
#define SEGANY_SM90_PINGPONG 1
#endif
  constexpr bool kPingpong = SEGANY_SM90_PINGPONG != 0;
  auto my_turn = [&] {
    if constexpr (kPingpong) named_bar_sync(1 + cw);
  };
  auto their_turn = [&](bool last) {
    if constexpr (kPingpong) {
      if (!(last && cw == Tr::kConsumerWGs - 1)) named_bar_arrive(1 + (cw + 1) % Tr::kConsumerWGs);
    }
  };
  if (kPingpong && cw == Tr::kConsumerWGs - 1) named_bar_arrive(1);
  // Off: measured 271 vs 291 TFLOP/s (vit_b) with it on, i.e. the sunk exponentials overlap the
  // next S GEMM well enough and the extra branch costs more (ATTENTION_NOTES.md).
#ifndef SEGANY_SM90_PIN_SOFTMAX
#define SEGANY_SM90_PIN_SOFTMAX 0
#endif
  // (Head dim 80 spills under the 168-register cap when the exponentials are pinned: not there.)
  constexpr bool kPinSoftmax = SEGANY_SM90_PIN_SOFTMAX != 0 && D == 64;

  float s[32];
  uint32_t pa[4][4], pa_next[4][4];
  float corr[2];
  mbar_wait(bar_full, 0);
  my_turn();
  issue_s(s, 0);
  their_turn(false);
  wgmma_wait<0>();
  fence_regs(s);
  softmax(s, pa, 0, corr);  // O is zero: nothing to rescale

  // Step kt: S(kt) and P(kt - 1) V(kt - 1) on the tensor core while the softmax of tile kt waits
  // only for S(kt). O takes tile kt - 1's rescale just before P V (kt - 1) is issued (O is not in
  // flight there), as flash-attention 3 does: after the last wait of a step nothing but the stage
  // release is left, so the compiler has no reason to sink the exponentials below that wait (with
  // the rescale after the wait it did, and they ran after P V instead of under it). P alternates
  // between two register sets (the loop is unrolled by two) so that no copy redefines a wgmma input
  // in flight.
  auto rescale_o = [&] {
    if (__any_sync(0xffffffffu, (corr[0] != 1.f) | (corr[1] != 1.f))) {
#pragma unroll
      for (int dn = 0; dn < DT; ++dn) {
        o[4 * dn + 0] *= corr[0];
        o[4 * dn + 1] *= corr[0];
        o[4 * dn + 2] *= corr[1];
        o[4 * dn + 3] *= corr[1];
      }
    }
  };
  auto step = [&](int kt, uint32_t (&pa_cur)[4][4], uint32_t (&pa_nxt)[4][4]) {
    mbar_wait(bar_full + 8 * (kt % S), (kt / S) & 1);
    my_turn();
    issue_s(s, kt);
    rescale_o();  // corr of tile kt - 1
    issue_pv(pa_cur, kt - 1);
    their_turn(false);
    wgmma_wait<1>();  // S(kt) complete
    fence_regs(s);
    softmax(s, pa_nxt, kt, corr);
    fence_regs(pa_nxt);
    if constexpr (kPinSoftmax) {
      // Never taken (row sums are >= 0, NaN compares false), but a branch on the row sums ends the
      // basic block: ptxas otherwise sank the exponentials below the wait that follows (SASS).
      if (fminf(l_run[0], l_run[1]) < 0.f) __trap();
    }
    wgmma_wait<0>();  // P V (kt - 1) complete: its K/V stage is free
    fence_regs(o);
    fence_regs(pa_cur);
    if (lane == 0) mbar_arrive(bar_empty + 8 * ((kt - 1) % S));
  };
  int kt = 1;
#pragma unroll 1
  for (; kt + 1 < n_tiles; kt += 2) {
    step(kt, pa, pa_next);
    step(kt + 1, pa_next, pa);
  }
  if (kt < n_tiles) {
    step(kt, pa, pa_next);
    my_turn();
    rescale_o();
    issue_pv(pa_next, n_tiles - 1);
    their_turn(true);
    wgmma_wait<0>();
    fence_regs(pa_next);
  } else {
    my_turn();
    rescale_o();
    issue_pv(pa, n_tiles - 1);
    their_turn(true);
    wgmma_wait<0>();
    fence_regs(pa);
  }
  fence_regs(o);

  bf16* out_head = p.out + static_cast<size_t>(b) * T * hd + static_cast<size_t>(h) * D;
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const float inv = 1.f / quad_sum(l_run[hr]);
    const int tok = tok_cta + row0 + g + 8 * hr;
    if (tok < T) {
      bf16* dst = out_head + static_cast<size_t>(tok) * hd + 2 * t;
#pragma unroll
      for (int dn = 0; dn < DT; ++dn)
        *reinterpret_cast<uint32_t*>(dst + 8 * dn) = pack_bf16x2(o[4 * dn + 2 * hr] * inv, o[4 * dn + 2 * hr + 1] * inv);
    }
  }
#endif  // SEGANY_SM90A_DEVICE
}

// ---------------------------------------------------------------------------------------------
// Windowed attention on sm_90a: warpgroup MMA over a whole window at once
// ---------------------------------------------------------------------------------------------
//
// Windows of at most 14 x 14 tokens (SAM's), persistent CTAs of 2 warpgroups taking (window, head)
// items as the mma.sync window kernel does, with the same two-stage cp.async pipeline (item n + 1
// copied under item n) and the same gather from the image grid (padding tokens read pad_qkv).
// * Keys live in 14 grid rows of 16 slots (224), slots past grid_w zero in shared memory and
//   masked by rel_w = -inf, so that S = Q K^T is one wgmma m64n224k16 per k16 step for 64 queries
//   and every key of the window: no online softmax, one max and one sum per row, and a thread's
//   S columns 8j + 2t + e sit at key column 8 (j % 2) + 2t + e of grid row j / 2 (rel_w: 8
//   registers, rel_h: one per grid row, added to the row max as in the other kernels).
// * K and V in the canonical wgmma layouts, written by cp.async: head-dim columns 0-63 in a
//   128-byte-swizzled block (row = key slot, 128 B), columns 64-79 (head dim 80) in a 32-byte-
//   swizzled block. S takes K K-major (k-step kc: +32 B inside the 128 B atom, or the 32 B block);
//   O += P V takes V N-major (m64n64 from the first block, m64n16 from the second), P from
//   registers. Q stays row-major (padded stride): each warp ldmatrix-loads its 16 rows as A
//   fragments for both the bias prologue (mma.sync against the rel_pos tables, as the mma.sync
//   kernel) and S (A from registers); its rows are then its scratch for rel_h / rel_w and the
//   bf16 output tile.
// * 196 queries are 4 m64 tiles (the fourth holds 4 real rows: 256 rows computed for 196);
//   warpgroup w takes tiles w and w + 2 of each item. Warps whose 16 rows are all padding still
//   take part in the warpgroup's MMAs (zero Q) and write nothing.
// * cp.async writes through the generic proxy and wgmma reads through the async proxy: every
//   thread fences (fence.proxy.async) after its copies land, before the barrier that publishes them.
template <int kHeadDim>
struct WindowSm90Traits {
  static constexpr int kD = kHeadDim;
  static constexpr int kThreads = 256;  // 2 warpgroups
  static constexpr int kMaxGrid = 14;   // grid rows and columns (T <= 196: Q fits 208 rows)
  static constexpr int kSlots = 16;     // key slots per grid row
  static constexpr int kN = kMaxGrid * kSlots;
  static constexpr int kQRows = 208;
  static constexpr int kStride = kD + 8;  // Q rows and rel_pos tables, padded (as WindowTraits)
  static constexpr int kRelStride = 17;
  static constexpr int kChunks = kD / 16;
  static constexpr int kTableRows = 32;
  static constexpr bool kTail = kD > 64;  // head-dim columns 64..79 in the 32-byte-swizzled block
  static constexpr int kBlock0Bytes = kN * 128;
  static constexpr int kBlock1Bytes = kTail ? kN * 32 : 0;
  static constexpr int kQBytes = kQRows * kStride * 2;
  // Byte offsets from the 1024-aligned base: [K0 s0][V0 s0][K0 s1][V0 s1][K1 s0][V1 s0][K1 s1][V1 s1]
  // [Q s0][Q s1][rel_pos_h][rel_pos_w].
  __host__ __device__ static constexpr uint32_t k0(int s) { return s * 2 * kBlock0Bytes; }
  __host__ __device__ static constexpr uint32_t v0(int s) { return k0(s) + kBlock0Bytes; }
  __host__ __device__ static constexpr uint32_t k1(int s) { return 4 * kBlock0Bytes + s * 2 * kBlock1Bytes; }
  __host__ __device__ static constexpr uint32_t v1(int s) { return k1(s) + kBlock1Bytes; }
  __host__ __device__ static constexpr uint32_t q(int s) { return 4 * kBlock0Bytes + 4 * kBlock1Bytes + s * kQBytes; }
  static constexpr uint32_t kTables = q(2);
  static constexpr size_t kSmemBytes = kTables + 2 * kTableRows * kStride * 2 + 1024;  // + base alignment
  static_assert((kD == 64 || kD == 80) && kChunks * 16 == kD, "head dim 64 or 80");
  static_assert(kSmemBytes <= 227 * 1024, "more shared memory than an H100 block may have");
  static_assert(kBlock0Bytes % 1024 == 0 && kBlock1Bytes % 256 == 0, "swizzle atoms aligned");
  static_assert(2 * 16 * kRelStride * 4 <= 16 * kStride * 2, "rel scratch fits in a warp's Q rows");
};

template <int kHeadDim>
__global__ void __launch_bounds__(WindowSm90Traits<kHeadDim>::kThreads, 1)
    relpos_attention_window_sm90_kernel(const RelPosAttentionParams p, const float scale_log2, const int) {
#ifdef SEGANY_SM90A_DEVICE
  using Tr = WindowSm90Traits<kHeadDim>;
  constexpr int D = Tr::kD, KC = Tr::kChunks, kStride = Tr::kStride, kRS = Tr::kRelStride, G = Tr::kMaxGrid;
  constexpr int kCopies = D / 8;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = smem_aligned_1024(smem_raw);
  const uint32_t sbase = smem_u32(smem);
  bf16* const tab_h = reinterpret_cast<bf16*>(smem + Tr::kTables);
  bf16* const tab_w = tab_h + Tr::kTableRows * kStride;
  const WindowGeometry geo(p);
  const int gh = geo.gh, gw = geo.gw, T = geo.T, n_items = geo.n_items;
  const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const size_t hd = static_cast<size_t>(p.heads) * D;

  // Key slots that no token fills stay zero (finite: rel_w or rel_h = -inf masks them exactly).
  for (uint32_t i = tid; i < Tr::q(0) / 16; i += Tr::kThreads)
    *reinterpret_cast<uint4*>(smem + 16 * i) = make_uint4(0u, 0u, 0u, 0u);
  __syncthreads();

  // Q (row-major, padded) and K, V (swizzled, slot = 16 * row + column) of one item into stage s.
  auto issue = [&](int item, int s) {
    const WindowGeometry::Item it = geo.item(item);
    bf16* const qd = reinterpret_cast<bf16*>(smem + Tr::q(s));
    for (int i = tid; i < T * kCopies; i += Tr::kThreads) {
      const int tok = i / kCopies, ch = i - tok * kCopies;
      const bf16* src = geo.q_src(p, it, tok, D) + ch * 8;
      const int ty = geo.row_of(tok), slot = ty * Tr::kSlots + (tok - ty * gw);
      uint32_t kd, vd;
      if (ch < 8) {
        const uint32_t off = slot * 128 + ((ch ^ (slot & 7)) << 4);
        kd = Tr::k0(s) + off, vd = Tr::v0(s) + off;
      } else {
        const uint32_t off = slot * 32 + (((ch - 8) ^ ((slot >> 2) & 1)) << 4);
        kd = Tr::k1(s) + off, vd = Tr::v1(s) + off;
      }
      cp_async_16(qd + tok * kStride + ch * 8, src);
      cp_async_16(smem + kd, src + hd);
      cp_async_16(smem + vd, src + 2 * hd);
    }
  };

  int item = blockIdx.x;
  if (item < n_items) issue(item, 0);
  cp_async_commit();
  stage_rel_tables<D, kStride, Tr::kTableRows>(p, tab_h, tab_w, tid, Tr::kThreads);

  const int tab_off = k_lane_offset(lane, kStride);
  const int n_mtiles = (T + 63) / 64;
  const bool out_16b = (reinterpret_cast<uintptr_t>(p.out) & 15) == 0;

  int s = 0;
  for (; item < n_items; item += gridDim.x) {
    const int next = item + gridDim.x;
    if (next < n_items) issue(next, s ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();  // this item's Q, K, V (and the tables) are in shared memory for every thread

    const WindowGeometry::Item it = geo.item(item);
    bf16* const q_s = reinterpret_cast<bf16*>(smem + Tr::q(s));
    const uint32_t k0 = sbase + Tr::k0(s), v0 = sbase + Tr::v0(s), k1 = sbase + Tr::k1(s), v1 = sbase + Tr::v1(s);
    bf16* const out_head = p.out + static_cast<size_t>(it.h) * D;

    for (int mt = wg; mt < n_mtiles; mt += 2) {
      const int tok0 = 64 * mt + 16 * warp;
      const bool active = tok0 < T;
      bf16* const region = q_s + static_cast<size_t>(tok0) * kStride;  // this warp's Q rows: scratch after
      uint32_t qf[1][KC][4];
      float rh[2][G], rw[2][2][2];
      if (active) {
        const float* const relh_s =
            window_prologue<KC, kStride, kRS>(qf, rw, region, tab_h, tab_w, tab_off, geo, tok0, lane);
#pragma unroll
        for (int hr = 0; hr < 2; ++hr)
#pragma unroll
          for (int r = 0; r < G; ++r) rh[hr][r] = r < gh ? relh_s[(g + 8 * hr) * kRS + r] : -INFINITY;
      } else {  // all 16 rows padding: any finite logits (never written; a branch around their
                // softmax measured slower than computing it)
#pragma unroll
        for (int kc = 0; kc < KC; ++kc) qf[0][kc][0] = qf[0][kc][1] = qf[0][kc][2] = qf[0][kc][3] = 0u;
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
#pragma unroll
          for (int r = 0; r < G; ++r) rh[hr][r] = 0.f;
#pragma unroll
          for (int j = 0; j < 2; ++j) rw[hr][j][0] = rw[hr][j][1] = 0.f;
        }
      }

      // S = Q K^T for the 64 queries and all 224 key slots.
      float sacc[G * 8];
      wgmma_fence();
#pragma unroll
      for (int kc = 0; kc < KC; ++kc)
        wgmma_m64n224k16_rs(sacc, qf[0][kc], kc < 4 ? sw128_desc(k0 + kc * 32, 16, 1024) : sw32_desc(k1, 16, 256),
                            kc > 0);
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(sacc);
      fence_regs(qf[0]);

      // Softmax in the log2 domain: x = s * scale + rel_w; the row max adds rel_h per grid row, and
      // p = exp2(x - (m - rel_h)). S column 8j + 2t + e: grid row j / 2, key column 8 (j % 2) + 2t + e.
      uint32_t pa[G][4];
      float l_row[2];
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        auto at = [&](int r, int jj, int e) -> float& { return sacc[4 * (2 * r + jj) + 2 * hr + e]; };
        const float m = quad_max(window_row_max<G>(at, rw[hr], rh[hr], scale_log2));
        l_row[hr] = quad_sum(window_row_exp<G>(at, m, rh[hr]));
      }
#pragma unroll
      for (int kk = 0; kk < G; ++kk) {
        pa[kk][0] = pack_bf16x2(sacc[8 * kk + 0], sacc[8 * kk + 1]);
        pa[kk][1] = pack_bf16x2(sacc[8 * kk + 2], sacc[8 * kk + 3]);
        pa[kk][2] = pack_bf16x2(sacc[8 * kk + 4], sacc[8 * kk + 5]);
        pa[kk][3] = pack_bf16x2(sacc[8 * kk + 6], sacc[8 * kk + 7]);
      }

      // O = P V: 16 key slots (one grid row) per k-step.
      float o0[32], o1[8];
#pragma unroll
      for (int i = 0; i < 32; ++i) o0[i] = 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) o1[i] = 0.f;
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < G; ++kk) {
        wgmma_m64n64k16_rs_tb(o0, pa[kk], sw128_desc(v0 + kk * 2048, 8192, 1024));
        if constexpr (Tr::kTail) wgmma_m64n16k16_rs_tb(o1, pa[kk], sw32_desc(v1 + kk * 512, 256, 256));
      }
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(o0);
      fence_regs(o1);
      fence_regs(pa);

      if (active) {
        // O / l -> bf16 rows in the scratch (rel_h / rel_w are in registers), then coalesced stores.
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          const float inv = 1.f / l_row[hr];
          bf16* dst = region + (g + 8 * hr) * kStride + 2 * t;
#pragma unroll
          for (int dn = 0; dn < 8; ++dn)
            *reinterpret_cast<uint32_t*>(dst + 8 * dn) =
                pack_bf16x2(o0[4 * dn + 2 * hr] * inv, o0[4 * dn + 2 * hr + 1] * inv);
          if constexpr (Tr::kTail) {
#pragma unroll
            for (int dn = 0; dn < 2; ++dn)
              *reinterpret_cast<uint32_t*>(dst + 64 + 8 * dn) =
                  pack_bf16x2(o1[4 * dn + 2 * hr] * inv, o1[4 * dn + 2 * hr + 1] * inv);
          }
        }
        __syncwarp();
        store_window_rows<D, kStride>(region, out_head, hd, geo, it, tok0, lane, out_16b);
      }
    }
    __syncthreads();  // stage s is free: the next iteration's copy refills it
    s ^= 1;
  }
  cp_async_wait<0>();
#endif  // SEGANY_SM90A_DEVICE
}

// ---------------------------------------------------------------------------------------------
// Launch templates, one per head dim
// ---------------------------------------------------------------------------------------------

void check_launch(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("attention_relpos: ") + what + ": " + cudaGetErrorString(e));
}

constexpr int kMaxDevices = 64;

bool is_window_grid(int gh, int gw) { return gh >= 1 && gw >= 1 && gh <= 16 && gw <= 16; }
bool is_global_grid(int gh, int gw) { return gw == 64 && gh >= 1 && gh <= 64; }

bool aligned(const void* ptr, size_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// D^-0.5 * log2(e): the logit scale in the log2 domain the softmax runs in.
float scale_log2_of(int head_dim) {
  return static_cast<float>(1.4426950408889634 / std::sqrt(static_cast<double>(head_dim)));
}

// Raises a kernel's dynamic shared memory limit once per device (not a stream operation, but kept
// out of the launch path so that graph capture only ever sees the launches).
template <class Kernel>
void raise_smem_limit_once(Kernel kernel, size_t bytes, std::once_flag (&flags)[kMaxDevices]) {
  int device = 0;
  check_launch(cudaGetDevice(&device), "cudaGetDevice");
  auto raise = [&] {
    check_launch(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
                 "cudaFuncSetAttribute");
  };
  if (device < 0 || device >= kMaxDevices)
    raise();
  else
    std::call_once(flags[device], raise);
}

// One kernel launch's configuration; launch() enqueues it, info() describes it.
template <class Kernel>
struct LaunchPlan {
  Kernel kernel;
  const char* name;
  dim3 grid;
  int threads;
  size_t smem;
  int arg;  // the kernel's third argument (the window kernel's pipeline stages)

  void launch(const RelPosAttentionParams& p, float scale_log2, cudaStream_t stream) const {
    kernel<<<grid, threads, smem, stream>>>(p, scale_log2, arg);
    check_launch(cudaGetLastError(), name);
  }
  RelPosAttentionLaunchInfo info() const {
    RelPosAttentionLaunchInfo r;
    r.kernel = name;
    r.grid_blocks = static_cast<long long>(grid.x) * grid.y * grid.z;
    r.threads_per_block = threads;
    r.smem_bytes = smem;
    check_launch(cudaFuncGetAttributes(&r.attributes, kernel), "cudaFuncGetAttributes");
    check_launch(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&r.blocks_per_sm, kernel, threads, smem),
                 "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    return r;
  }
};

template <int kHeadDim>
auto global_plan(const RelPosAttentionParams& p) {
  using Tr = GlobalTraits<kHeadDim>;
  static std::once_flag smem_raised[kMaxDevices];
  auto kernel = relpos_attention_global_kernel<kHeadDim>;
  raise_smem_limit_once(kernel, Tr::kSmemBytes, smem_raised);
  const int T = p.grid_h * p.grid_w;
  const dim3 grid((T + Tr::kBlockM - 1) / Tr::kBlockM, p.heads, p.batch);
  return LaunchPlan<decltype(kernel)>{kernel,
                                      kHeadDim == 64 ? "relpos_attention_global<64>" : "relpos_attention_global<80>",
                                      grid, Tr::kThreads, Tr::kSmemBytes, 0};
}

// ---------------------------------------------------------------------------------------------
// sm_90a global plan: the tensor map, availability, launch
// ---------------------------------------------------------------------------------------------

std::atomic<bool> g_sm90_enabled{true};

using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// cuTensorMapEncodeTiled from the driver, found once through the runtime (no -lcuda); null if absent.
EncodeTiledFn encode_tiled_fn() {
  static EncodeTiledFn fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &q) !=
            cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      return static_cast<EncodeTiledFn>(nullptr);
    }
    return reinterpret_cast<EncodeTiledFn>(ptr);
  }();
  return fn;
}

// Whether the current device runs an sm_90a kernel: compute capability 9.0, `smem` bytes of opt-in
// shared memory, and a binary built for sm_90a in this executable (a build for sm_80 alone keeps the
// mma.sync kernels). Read once per device and kernel (Tag tells the caches apart).
template <class Tag, class Kernel>
bool sm90_usable(Kernel kernel, size_t smem, bool needs_tensor_maps) {
  static int cache[kMaxDevices];  // 0 unknown, 1 yes, 2 no
  static std::once_flag flags[kMaxDevices];
  int device = 0;
  check_launch(cudaGetDevice(&device), "cudaGetDevice");
  auto probe = [&] {
    int major = 0, minor = 0;
    check_launch(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute");
    check_launch(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), "cudaDeviceGetAttribute");
    int smem_optin = 0;
    check_launch(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
                 "cudaDeviceGetAttribute");
    if (major != 9 || minor != 0 || static_cast<size_t>(smem_optin) < smem || (needs_tensor_maps && !encode_tiled_fn()))
      return 2;
    cudaFuncAttributes a{};
    if (cudaFuncGetAttributes(&a, kernel) != cudaSuccess) {
      cudaGetLastError();
      return 2;
    }
    return a.binaryVersion >= 90 && a.ptxVersion >= 90 ? 1 : 2;
  };
  if (device < 0 || device >= kMaxDevices) return probe() == 1;
  std::call_once(flags[device], [&] { cache[device] = probe(); });
  return cache[device] == 1;
}

template <int kHeadDim>
bool sm90_kernel_usable() {
  struct Tag;
  return sm90_usable<Tag>(relpos_attention_global_sm90_kernel<kHeadDim>, Sm90Traits<kHeadDim>::kSmemBytes, true);
}

template <int kHeadDim>
struct Sm90Plan {
  const char* name;
  dim3 grid;

  // qkv as a 3-D tensor (head-dim columns, (q|k|v, head), tokens of all images), boxes of 64 x 1 x 64,
  // 128-byte swizzle; columns past head_dim read as zero.
  static CUtensorMap tensor_map(const RelPosAttentionParams& p) {
    CUtensorMap map;
    const cuuint64_t dims[3] = {static_cast<cuuint64_t>(kHeadDim), static_cast<cuuint64_t>(3 * p.heads),
                                static_cast<cuuint64_t>(p.batch) * p.grid_h * p.grid_w};
    const cuuint64_t strides[2] = {static_cast<cuuint64_t>(kHeadDim) * sizeof(bf16),
                                   static_cast<cuuint64_t>(3) * p.heads * kHeadDim * sizeof(bf16)};
    const cuuint32_t box[3] = {64, 1, 64};
    const cuuint32_t elem_strides[3] = {1, 1, 1};
    const CUresult r = encode_tiled_fn()(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, const_cast<bf16*>(p.qkv), dims,
                                         strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                         CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                         CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS)
      throw std::runtime_error("attention_relpos: cuTensorMapEncodeTiled failed (" + std::to_string(int(r)) + ")");
    return map;
  }
  void launch(const RelPosAttentionParams& p, float scale_log2, cudaStream_t stream) const {
    const CUtensorMap map = tensor_map(p);
    relpos_attention_global_sm90_kernel<kHeadDim>
        <<<grid, Sm90Traits<kHeadDim>::kThreads, Sm90Traits<kHeadDim>::kSmemBytes, stream>>>(map, p, scale_log2);
    check_launch(cudaGetLastError(), name);
  }
  RelPosAttentionLaunchInfo info() const {
    RelPosAttentionLaunchInfo r;
    auto kernel = relpos_attention_global_sm90_kernel<kHeadDim>;
    r.kernel = name;
    r.grid_blocks = static_cast<long long>(grid.x) * grid.y * grid.z;
    r.threads_per_block = Sm90Traits<kHeadDim>::kThreads;
    r.smem_bytes = Sm90Traits<kHeadDim>::kSmemBytes;
    check_launch(cudaFuncGetAttributes(&r.attributes, kernel), "cudaFuncGetAttributes");
    check_launch(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&r.blocks_per_sm, kernel, r.threads_per_block,
                                                               r.smem_bytes),
                 "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    return r;
  }
};

template <int kHeadDim>
Sm90Plan<kHeadDim> sm90_plan(const RelPosAttentionParams& p) {
  using Tr = Sm90Traits<kHeadDim>;
  static std::once_flag smem_raised[kMaxDevices];
  raise_smem_limit_once(relpos_attention_global_sm90_kernel<kHeadDim>, Tr::kSmemBytes, smem_raised);
  const int T = p.grid_h * p.grid_w;
  return Sm90Plan<kHeadDim>{
      kHeadDim == 64 ? "relpos_attention_global_sm90<64>" : "relpos_attention_global_sm90<80>",
      dim3((T + Tr::kBlockM - 1) / Tr::kBlockM, p.heads, p.batch)};
}

// Multiprocessor count and opt-in shared memory per block of the current device, read once.
struct DeviceLimits {
  int sms = 0;
  int smem_optin = 0;
};
DeviceLimits device_limits() {
  static DeviceLimits cache[kMaxDevices];
  static std::once_flag flags[kMaxDevices];
  int device = 0;
  check_launch(cudaGetDevice(&device), "cudaGetDevice");
  auto read = [device] {
    DeviceLimits l;
    check_launch(cudaDeviceGetAttribute(&l.sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
    check_launch(cudaDeviceGetAttribute(&l.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
                 "cudaDeviceGetAttribute");
    return l;
  };
  if (device < 0 || device >= kMaxDevices) return read();
  std::call_once(flags[device], [&] { cache[device] = read(); });
  return cache[device];
}

// Sequences (windows) the params describe: batch, or batch * windows per image.
long long windows_of(const RelPosAttentionParams& p) {
  if (p.image_h <= 0 || p.grid_h <= 0 || p.grid_w <= 0) return p.batch;
  return static_cast<long long>(p.batch) * ((p.image_h + p.grid_h - 1) / p.grid_h) *
         ((p.image_w + p.grid_w - 1) / p.grid_w);
}
long long window_items(const RelPosAttentionParams& p) { return windows_of(p) * p.heads; }

// Windows of at most 14 x 14 on sm_90a: the warpgroup-MMA kernel (one CTA per SM).
bool window_sm90_grid(int gh, int gw) { return gh <= 14 && gw <= 14; }

template <int kHeadDim>
bool window_sm90_usable() {
  struct Tag;
  return sm90_usable<Tag>(relpos_attention_window_sm90_kernel<kHeadDim>, WindowSm90Traits<kHeadDim>::kSmemBytes,
                          false);
}

template <int kHeadDim>
auto window_plan(const RelPosAttentionParams& p) {
  using Tr = WindowTraits<kHeadDim>;
  const DeviceLimits lim = device_limits();
  const dim3 grid(static_cast<unsigned>(std::min<long long>(window_items(p), lim.sms)));  // one CTA per SM
  if (g_sm90_enabled.load(std::memory_order_relaxed) && window_sm90_grid(p.grid_h, p.grid_w) &&
      window_sm90_usable<kHeadDim>()) {
    using Tr90 = WindowSm90Traits<kHeadDim>;
    static std::once_flag smem_raised[kMaxDevices];
    auto kernel = relpos_attention_window_sm90_kernel<kHeadDim>;
    raise_smem_limit_once(kernel, Tr90::kSmemBytes, smem_raised);
    return LaunchPlan<decltype(kernel)>{
        kernel, kHeadDim == 64 ? "relpos_attention_window_sm90<64>" : "relpos_attention_window_sm90<80>", grid,
        Tr90::kThreads, Tr90::kSmemBytes, 0};
  }
  static std::once_flag smem_raised[kMaxDevices];
  auto kernel = relpos_attention_window_kernel<kHeadDim>;
  const int T = p.grid_h * p.grid_w;
  // Two stages (copy of the next item under the compute of this one) where they fit: SAM's 14 x 14
  // at both head dims; single-stage otherwise (16 x 16 at head dim 80).
  const int stages = Tr::smem_bytes(T, 2) <= static_cast<size_t>(lim.smem_optin) ? 2 : 1;
  const size_t smem = Tr::smem_bytes(T, stages);
  if (smem > static_cast<size_t>(lim.smem_optin))
    throw std::invalid_argument("attention_relpos: window grid needs more shared memory than the device has");
  raise_smem_limit_once(kernel, static_cast<size_t>(lim.smem_optin), smem_raised);
  return LaunchPlan<decltype(kernel)>{kernel,
                                      kHeadDim == 64 ? "relpos_attention_window<64>" : "relpos_attention_window<80>",
                                      grid, Tr::kThreads, smem, stages};
}

// Calls f(plan) with the plan for p's shape, after checking p.
template <class F>
void with_plan(const RelPosAttentionParams& p, F&& f) {
  auto fail = [&](const std::string& why) {
    throw std::invalid_argument("attention_relpos: " + why + " (batch " + std::to_string(p.batch) + ", heads " +
                                std::to_string(p.heads) + ", head_dim " + std::to_string(p.head_dim) + ", grid " +
                                std::to_string(p.grid_h) + "x" + std::to_string(p.grid_w) + ")");
  };
  if (!(p.head_dim == 64 || p.head_dim == 80) ||
      !(is_window_grid(p.grid_h, p.grid_w) || is_global_grid(p.grid_h, p.grid_w)))
    fail("unsupported shape: head_dim must be 64 or 80 and the grid at most 16x16 (windows) or Hx64 with H <= 64");
  if (p.batch < 0 || p.heads <= 0) fail("bad batch or heads");
  const bool on_image = p.image_h > 0 || p.image_w > 0;
  if (on_image) {
    if (!is_window_grid(p.grid_h, p.grid_w)) fail("windows on an image grid must be at most 16x16");
    if (p.image_h <= 0 || p.image_w <= 0 || p.image_h > 4096 || p.image_w > 4096) fail("bad image grid");
  }
  if (p.batch > 0) {
    if (!p.qkv || !p.out || !p.rel_pos_h || !p.rel_pos_w) fail("null pointer");
    if (!aligned(p.qkv, 16)) fail("qkv must be 16-byte aligned");
    if (on_image && (!p.pad_qkv || !aligned(p.pad_qkv, 16))) fail("pad_qkv must be given, 16-byte aligned");
    if (!aligned(p.out, 4)) fail("out must be 4-byte aligned");
    const size_t table_align = p.rel_pos_fp32 ? 8 : 4;
    if (!aligned(p.rel_pos_h, table_align) || !aligned(p.rel_pos_w, table_align)) fail("rel_pos tables misaligned");
  }
  if (!on_image && is_global_grid(p.grid_h, p.grid_w)) {
    if (p.batch > 65535 || p.heads > 65535) fail("batch and heads must be below 65536 for global attention");
    const bool sm90 = g_sm90_enabled.load(std::memory_order_relaxed);
    if (p.head_dim == 64) {
      if (sm90 && sm90_kernel_usable<64>())
        f(sm90_plan<64>(p));
      else
        f(global_plan<64>(p));
    } else {
      if (sm90 && sm90_kernel_usable<80>())
        f(sm90_plan<80>(p));
      else
        f(global_plan<80>(p));
    }
  } else {
    if (window_items(p) > 0x7fffffffLL) fail("batch * windows * heads too large");
    if (p.head_dim == 64)
      f(window_plan<64>(p));
    else
      f(window_plan<80>(p));
  }
}

}  // namespace

bool attention_relpos_supported(int head_dim, int grid_h, int grid_w) {
  return (head_dim == 64 || head_dim == 80) && (is_window_grid(grid_h, grid_w) || is_global_grid(grid_h, grid_w));
}

double attention_relpos_flops(const RelPosAttentionParams& p) {
  const double T = static_cast<double>(p.grid_h) * p.grid_w;
  return 4.0 * static_cast<double>(windows_of(p)) * p.heads * T * T * p.head_dim;
}

void attention_relpos(const RelPosAttentionParams& p, cudaStream_t stream) {
  if (p.batch == 0 && p.heads > 0 && attention_relpos_supported(p.head_dim, p.grid_h, p.grid_w)) return;
  with_plan(p, [&](const auto& plan) { plan.launch(p, scale_log2_of(p.head_dim), stream); });
}

void attention_relpos_enable_sm90(bool enabled) { g_sm90_enabled.store(enabled, std::memory_order_relaxed); }

RelPosAttentionLaunchInfo attention_relpos_launch_info(const RelPosAttentionParams& p) {
  RelPosAttentionLaunchInfo info;
  with_plan(p, [&](const auto& plan) { info = plan.info(); });
  return info;
}

}  // namespace segany::cuda
