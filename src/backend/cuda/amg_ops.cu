// The automatic mask generator's device ops (backend.h): selection (filters + box NMS), masks placed
// from a crop into the image, and COCO run lengths. Each is the twin of its host default in
// backend/mask_ops.cpp; the arithmetic that decides anything (stability, IoU) is IEEE float32 in
// the host's order, so both keep the same masks.
//
// select_masks, for n candidates:
//   filter   one thread a candidate: the filters, its score and its box;
//   rank     one thread a survivor: its place in NMS order (score descending, ties by index),
//            counted against every other survivor (n is a few thousand: n^2 compares is nothing);
//   overlap  one thread per (row a, 32 columns b > a): bit b of row a = IoU(a, b) > threshold;
//   sweep    one warp walks the rows in order, keeping a row not yet suppressed and or-ing its
//            row of bits into the suppressed set (torchvision's CUDA NMS, with the host's loop on
//            the device).
// encode_runs: a mask's words in segments of 2048, a block each: the blocks count the changes of
// value (a popcount per word) and note the last; a thread per mask turns its segments' counts
// into where each segment's runs start, one thread the masks' totals into offsets; the blocks
// then write the runs, each thread its own words, the differences between consecutive changes
// found by two block scans started from what the segments before found.
#include "backend/cuda/amg_ops.h"

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <string>

#include "backend/cuda/cuda_utils.h"
#include "backend/mask_ops.h"

namespace segany::cuda {
namespace {

// ---- select_masks -----------------------------------------------------------------------------

struct SelectArgs {
  const float* iou;
  const int32_t* stats;  // [n, 7]
  int n;
  bool filter_iou, filter_stability;
  float iou_thresh, stability_thresh;
  int crop[4], orig[4];
  double nms_thresh;
  int words;  // of a row of the overlap matrix: ceil(n / 32)
  // Scratch (SelectScratch) and output.
  float* score;     // [n]: the score, NaN when filtered out
  float4* box;      // [n]: the box as float, in NMS order after rank
  int* order;       // [n]: candidate at each place in NMS order
  int* survivors;   // [1]
  uint32_t* overlap;  // [n, words]
  int32_t* keep;    // [n + 1]
};

__global__ void select_filter_kernel(SelectArgs a) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= a.n) return;
  const int32_t* s = a.stats + int64_t(i) * 7;
  const float score = a.iou[i];
  bool ok = !isnan(score);
  if (a.filter_iou) ok = ok && score > a.iou_thresh;
  if (a.filter_stability) ok = ok && __fdiv_rn(static_cast<float>(s[5]), static_cast<float>(s[6])) >= a.stability_thresh;
  for (int k = 0; k < 4 && ok; ++k) {
    const float b = static_cast<float>(s[1 + k] + a.crop[k % 2]);
    const bool near_crop = fabsf(__fsub_rn(b, static_cast<float>(a.crop[k]))) <= 20.0f;
    const bool near_image = fabsf(__fsub_rn(b, static_cast<float>(a.orig[k]))) <= 20.0f;
    if (near_crop && !near_image) ok = false;
  }
  a.score[i] = ok ? score : __int_as_float(0x7fc00000);  // NaN: not a survivor
  if (ok) atomicAdd(a.survivors, 1);
}

__global__ void select_rank_kernel(SelectArgs a) {
  __shared__ float tile[256];
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const float si = i < a.n ? a.score[i] : __int_as_float(0x7fc00000);
  int rank = 0;
  for (int base = 0; base < a.n; base += 256) {
    __syncthreads();
    tile[threadIdx.x] = base + threadIdx.x < a.n ? a.score[base + threadIdx.x] : __int_as_float(0x7fc00000);
    __syncthreads();
    const int count = min(256, a.n - base);
    for (int t = 0; t < count; ++t) {
      const float sj = tile[t];  // NaN compares false: filtered candidates never count
      rank += (sj > si) || (sj == si && base + t < i);
    }
  }
  if (i >= a.n || isnan(si)) return;
  a.order[rank] = i;
  const int32_t* s = a.stats + int64_t(i) * 7;
  a.box[rank] = make_float4(static_cast<float>(s[1]), static_cast<float>(s[2]), static_cast<float>(s[3]),
                                     static_cast<float>(s[4]));
}

// The host's box_iou, operation for operation.
__device__ __forceinline__ float iou_of(float4 a, float4 b) {
  const float area_a = __fmul_rn(__fsub_rn(a.z, a.x), __fsub_rn(a.w, a.y));
  const float area_b = __fmul_rn(__fsub_rn(b.z, b.x), __fsub_rn(b.w, b.y));
  const float w = fmaxf(0.0f, __fsub_rn(fminf(a.z, b.z), fmaxf(a.x, b.x)));
  const float h = fmaxf(0.0f, __fsub_rn(fminf(a.w, b.w), fmaxf(a.y, b.y)));
  const float inter = __fmul_rn(w, h);
  return __fdiv_rn(inter, __fsub_rn(__fadd_rn(area_a, area_b), inter));
}

__global__ void select_overlap_kernel(SelectArgs a) {
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int row = static_cast<int>(t / a.words), word = static_cast<int>(t % a.words);
  const int survivors = *a.survivors;
  if (row >= survivors || (word + 1) * 32 <= row + 1) return;  // only columns b > row are read
  const float4 mine = a.box[row];
  uint32_t bits = 0;
  for (int k = 0; k < 32; ++k) {
    const int b = word * 32 + k;
    if (b <= row || b >= survivors) continue;
    if (static_cast<double>(iou_of(mine, a.box[b])) > a.nms_thresh) bits |= 1u << k;
  }
  a.overlap[int64_t(row) * a.words + word] = bits;
}

// One warp; `suppressed` in shared memory, one bit per place in NMS order.
__global__ void select_sweep_kernel(SelectArgs a) {
  extern __shared__ uint32_t suppressed[];
  const int lane = threadIdx.x, survivors = *a.survivors;
  const int words = (survivors + 31) / 32;
  for (int w = lane; w < words; w += 32) suppressed[w] = 0;
  __syncwarp();
  int kept = 0;
  for (int row = 0; row < survivors; ++row) {
    if ((suppressed[row / 32] >> (row % 32)) & 1u) continue;
    if (lane == 0) a.keep[1 + kept] = a.order[row];
    ++kept;
    const uint32_t* bits = a.overlap + int64_t(row) * a.words;
    // Words from the one holding column row + 1: the overlap kernel wrote those.
    for (int w = (row + 1) / 32 + lane; w < words; w += 32) suppressed[w] |= bits[w];
    __syncwarp();
  }
  if (lane == 0) a.keep[0] = kept;
}

// ---- uncrop_bits ------------------------------------------------------------------------------

__global__ void uncrop_bits_kernel(const uint32_t* __restrict__ in, int64_t in_words, int cx, int cy, int cw, int ch,
                                   int image_h, int64_t pixels, uint32_t* __restrict__ out, int64_t out_words,
                                   int64_t total) {
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (t >= total) return;
  const int64_t k = t / out_words, word = t - k * out_words;
  const uint32_t* src = in + k * in_words;
  const int64_t begin = word * 32;
  int x = static_cast<int>(begin / image_h), y = static_cast<int>(begin - int64_t(x) * image_h);
  uint32_t bits = 0;
  for (int b = 0; b < 32 && begin + b < pixels; ++b) {
    const int u = x - cx, v = y - cy;
    if (u >= 0 && u < cw && v >= 0 && v < ch) {
      const int64_t i = int64_t(u) * ch + v;
      bits |= ((src[i / 32] >> (i % 32)) & 1u) << b;
    }
    if (++y == image_h) y = 0, ++x;
  }
  out[t] = bits;
}

// ---- encode_runs ------------------------------------------------------------------------------

// A mask's words are cut into segments of kRunSegmentWords, a block each, its threads
// kRunWordsPerThread consecutive words each (every load of a thread in flight at once).
constexpr int kRunThreads = 256, kRunWordsPerThread = 8, kRunSegmentWords = kRunThreads * kRunWordsPerThread;

struct Larger {
  __device__ int64_t operator()(int64_t a, int64_t b) const { return a > b ? a : b; }
};

// Where the value changes in word w of a mask: bit b set when pixel 32 w + b differs from the pixel
// before it (the one before pixel 0 being 0); no bits past the last pixel.
__device__ __forceinline__ uint32_t changes(const uint32_t* bits, int64_t w, int64_t words, int64_t pixels) {
  const uint32_t x = bits[w], before = w > 0 ? bits[w - 1] >> 31 : 0u;
  uint32_t d = x ^ ((x << 1) | before);
  if (w == words - 1 && pixels % 32) d &= (1u << (pixels % 32)) - 1u;
  return d;
}

// Per (mask, segment): its changes of value, where the last of them is (-1: none), where its runs
// start among the mask's (the changes before it) and where the last change before it is (-1: none).
struct RunSegments {
  int64_t *count, *last, *start, *before;
};

// This thread's words of block b's segment: the changes in each (zero past the mask's end), their
// number, and the position of the last.
struct SegmentWords {
  uint32_t d[kRunWordsPerThread];
  int64_t first_word = 0, n = 0, last = -1;
  __device__ SegmentWords(const uint32_t* bits, int64_t words, int64_t pixels, int segments) {
    const int64_t k = blockIdx.x / segments, s = blockIdx.x % segments;
    const uint32_t* mask = bits + k * words;
    first_word = s * kRunSegmentWords + int64_t(threadIdx.x) * kRunWordsPerThread;
#pragma unroll
    for (int i = 0; i < kRunWordsPerThread; ++i) {
      const int64_t w = first_word + i;
      d[i] = w < words ? changes(mask, w, words, pixels) : 0u;
    }
#pragma unroll
    for (int i = 0; i < kRunWordsPerThread; ++i) {
      n += __popc(d[i]);
      if (d[i]) last = (first_word + i) * 32 + 31 - __clz(d[i]);
    }
  }
};

__global__ void __launch_bounds__(kRunThreads) count_runs_kernel(const uint32_t* __restrict__ bits, int64_t words,
                                                                 int64_t pixels, int segments, RunSegments seg) {
  using Reduce = cub::BlockReduce<int64_t, kRunThreads>;
  __shared__ typename Reduce::TempStorage sum_temp, max_temp;
  const SegmentWords sw(bits, words, pixels, segments);
  const int64_t n = Reduce(sum_temp).Sum(sw.n);
  const int64_t last = Reduce(max_temp).Reduce(sw.last, Larger{});
  if (threadIdx.x == 0) seg.count[blockIdx.x] = n, seg.last[blockIdx.x] = last;
}

// A thread per mask: its segments' starts, the last change before each, and its number of runs
// (changes + 1) into offsets[k + 1].
__global__ void scan_segments_kernel(int64_t masks, int segments, RunSegments seg, int64_t* offsets) {
  const int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (k >= masks) return;
  int64_t run = 0, previous = -1;
  for (int64_t b = k * segments; b < (k + 1) * segments; ++b) {
    seg.start[b] = run, seg.before[b] = previous;
    run += seg.count[b];
    if (seg.last[b] >= 0) previous = seg.last[b];
  }
  offsets[k + 1] = run + 1;
}

__global__ void scan_runs_kernel(int64_t* offsets, int64_t masks) {
  offsets[0] = 0;
  for (int64_t k = 1; k <= masks; ++k) offsets[k] += offsets[k - 1];
}

__global__ void __launch_bounds__(kRunThreads) write_runs_kernel(const uint32_t* __restrict__ bits, int64_t words,
                                                                 int64_t pixels, int segments, RunSegments seg,
                                                                 const int64_t* __restrict__ offsets, int64_t masks,
                                                                 int64_t capacity, uint32_t* __restrict__ runs) {
  using Sum = cub::BlockScan<int64_t, kRunThreads>;
  __shared__ typename Sum::TempStorage sum_temp, max_temp;
  if (offsets[masks] > capacity) return;
  const SegmentWords sw(bits, words, pixels, segments);
  int64_t index, total, before;
  Sum(sum_temp).ExclusiveSum(sw.n, index, total);
  // The last change before this thread's words (none: the first run starts at 0).
  Sum(max_temp).ExclusiveScan(sw.last, before, seg.before[blockIdx.x], Larger{});
  int64_t previous = before < 0 ? 0 : before;
  const int64_t k = blockIdx.x / segments;
  uint32_t* out = runs + offsets[k] + seg.start[blockIdx.x];
#pragma unroll
  for (int i = 0; i < kRunWordsPerThread; ++i) {
    uint32_t d = sw.d[i];
    while (d) {
      const int64_t at = (sw.first_word + i) * 32 + __ffs(d) - 1;
      out[index++] = static_cast<uint32_t>(at - previous);
      previous = at;
      d &= d - 1;
    }
  }
  // The last run, to the end of the mask: the last thread of the last segment has seen every
  // change before it, and its own.
  if (blockIdx.x % segments == segments - 1 && threadIdx.x == kRunThreads - 1)
    out[total] = static_cast<uint32_t>(pixels - previous);
}

}  // namespace

void select_masks(const Tensor& iou, const Tensor& stats, const Backend::MaskSelection& sel, Tensor& keep,
                  SelectScratch& scratch, const std::function<Tensor(int64_t)>& alloc, cudaStream_t stream) {
  const char* op = "select_masks";
  require_gpu(iou, DType::F32, op, "iou");
  require_gpu(stats, DType::I32, op, "stats");
  require_gpu(keep, DType::I32, op, "keep");
  const int64_t n = select_masks_count(iou, stats, keep, int64_t(1) << 24, "cuda select_masks");
  CUDA_CHECK(cudaMemsetAsync(keep.data(), 0, sizeof(int32_t), stream));
  if (n == 0) return;
  const int64_t words = (n + 31) / 32;
  // Scratch in 4-byte units: score n, box 4n, order n, survivors 1 (+3 to keep float4 aligned), overlap n * words.
  const int64_t need = n + 4 * n + n + 4 + n * words;
  if (!scratch.buffer.defined() || scratch.buffer.numel() < need) scratch.buffer = alloc(need);
  auto* base = static_cast<uint32_t*>(scratch.buffer.data());
  SelectArgs a{};
  a.iou = iou.data_as<const float>();
  a.stats = stats.data_as<const int32_t>();
  a.n = static_cast<int>(n);
  a.filter_iou = sel.filter_iou, a.filter_stability = sel.filter_stability;
  a.iou_thresh = sel.iou_thresh, a.stability_thresh = sel.stability_thresh;
  for (int k = 0; k < 4; ++k) a.crop[k] = sel.crop[k];
  a.orig[0] = 0, a.orig[1] = 0, a.orig[2] = sel.image_w, a.orig[3] = sel.image_h;
  a.nms_thresh = sel.nms_thresh;
  a.words = static_cast<int>(words);
  a.box = reinterpret_cast<float4*>(base);  // first: 16-byte aligned
  a.score = reinterpret_cast<float*>(base + 4 * n);
  a.order = reinterpret_cast<int*>(base + 5 * n);
  a.survivors = reinterpret_cast<int*>(base + 6 * n);
  a.overlap = base + 6 * n + 4;
  a.keep = keep.data_as<int32_t>();
  CUDA_CHECK(cudaMemsetAsync(a.survivors, 0, sizeof(int), stream));
  const auto blocks = static_cast<unsigned>((n + 255) / 256);
  select_filter_kernel<<<blocks, 256, 0, stream>>>(a);
  CUDA_CHECK_LAUNCH("select_masks filter kernel");
  select_rank_kernel<<<blocks, 256, 0, stream>>>(a);
  CUDA_CHECK_LAUNCH("select_masks rank kernel");
  const int64_t cells = n * words;
  select_overlap_kernel<<<static_cast<unsigned>((cells + 255) / 256), 256, 0, stream>>>(a);
  CUDA_CHECK_LAUNCH("select_masks overlap kernel");
  select_sweep_kernel<<<1, 32, static_cast<size_t>(words) * 4, stream>>>(a);
  CUDA_CHECK_LAUNCH("select_masks sweep kernel");
}

void uncrop_bits(const Tensor& bits, const int crop[4], int image_h, int image_w, Tensor& out, cudaStream_t stream) {
  const char* op = "uncrop_bits";
  require_gpu(bits, DType::I32, op, "bits");
  require_gpu(out, DType::I32, op, "output");
  const int cw = crop[2] - crop[0], ch = crop[3] - crop[1];
  check(crop[0] >= 0 && crop[1] >= 0 && cw > 0 && ch > 0 && crop[2] <= image_w && crop[3] <= image_h,
        "cuda uncrop_bits: the crop lies outside the image");
  const int64_t K = bits.dim(0), in_words = mask_bit_words(ch, cw), out_words = mask_bit_words(image_h, image_w);
  check(bits.numel() == K * in_words && out.numel() == K * out_words,
        "cuda uncrop_bits: bits " + shape_str(bits.shape()) + " -> " + shape_str(out.shape()) + " for " +
            std::to_string(K) + " masks");
  const int64_t total = K * out_words;
  if (total == 0) return;
  uncrop_bits_kernel<<<static_cast<unsigned>((total + 255) / 256), 256, 0, stream>>>(
      static_cast<const uint32_t*>(bits.data()), in_words, crop[0], crop[1], cw, ch, image_h,
      int64_t(image_h) * image_w, static_cast<uint32_t*>(out.data()), out_words, total);
  CUDA_CHECK_LAUNCH("uncrop_bits kernel");
}

void encode_runs(const Tensor& bits, int64_t pixels, Tensor& offsets, Tensor& runs, RunScratch& scratch,
                 const std::function<Tensor(int64_t)>& alloc, cudaStream_t stream) {
  const char* op = "encode_runs";
  require_gpu(bits, DType::I32, op, "bits");
  require_gpu(offsets, DType::I64, op, "offsets");
  require_gpu(runs, DType::I32, op, "runs");
  const int64_t words = (pixels + 31) / 32, K = offsets.numel() - 1;
  check(pixels > 0 && K >= 0 && bits.numel() == K * words && K < (int64_t(1) << 31),
        "cuda encode_runs: bits " + shape_str(bits.shape()) + " for " + std::to_string(K) + " masks of " +
            std::to_string(pixels) + " pixels");
  if (K == 0) {
    CUDA_CHECK(cudaMemsetAsync(offsets.data(), 0, sizeof(int64_t), stream));
    return;
  }
  const int64_t segments = (words + kRunSegmentWords - 1) / kRunSegmentWords, blocks = K * segments;
  check(blocks < (int64_t(1) << 31), "cuda encode_runs: " + std::to_string(K) + " masks of " +
                                         std::to_string(pixels) + " pixels are too many segments for one grid");
  if (!scratch.buffer.defined() || scratch.buffer.numel() < 4 * blocks) scratch.buffer = alloc(4 * blocks);
  int64_t* base = scratch.buffer.data_as<int64_t>();
  const RunSegments seg{base, base + blocks, base + 2 * blocks, base + 3 * blocks};
  const auto* b = static_cast<const uint32_t*>(bits.data());
  const int S = static_cast<int>(segments);
  count_runs_kernel<<<static_cast<unsigned>(blocks), kRunThreads, 0, stream>>>(b, words, pixels, S, seg);
  CUDA_CHECK_LAUNCH("encode_runs count kernel");
  scan_segments_kernel<<<static_cast<unsigned>((K + 255) / 256), 256, 0, stream>>>(K, S, seg,
                                                                                   offsets.data_as<int64_t>());
  CUDA_CHECK_LAUNCH("encode_runs segment scan kernel");
  scan_runs_kernel<<<1, 1, 0, stream>>>(offsets.data_as<int64_t>(), K);
  CUDA_CHECK_LAUNCH("encode_runs scan kernel");
  write_runs_kernel<<<static_cast<unsigned>(blocks), kRunThreads, 0, stream>>>(
      b, words, pixels, S, seg, offsets.data_as<const int64_t>(), K, runs.numel(), static_cast<uint32_t*>(runs.data()));
  CUDA_CHECK_LAUNCH("encode_runs write kernel");
}

}  // namespace segany::cuda
