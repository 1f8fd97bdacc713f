#include "backend/mask_ops.h"

#include <algorithm>
#include <array>
#include <bit>
#include <cstring>
#include <cmath>
#include <limits>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace segany {
namespace {

// One axis of torch's bilinear interpolation (align_corners=False): for each output index, the two
// source indices and their weights. Computed in float, as torch does for float tensors.
struct Axis {
  std::vector<int> i0, i1;
  std::vector<float> l0, l1;
};

Axis make_axis(int in, int out, int count) {
  Axis a;
  const float scale = static_cast<float>(in) / static_cast<float>(out);
  for (int o = 0; o < count; ++o) {
    float src = scale * (static_cast<float>(o) + 0.5f) - 0.5f;
    if (src < 0) src = 0;
    const int i0 = static_cast<int>(src);
    const int step = i0 < in - 1 ? 1 : 0;
    const float l1 = src - static_cast<float>(i0);
    a.i0.push_back(i0);
    a.i1.push_back(i0 + step);
    a.l0.push_back(1.0f - l1);
    a.l1.push_back(l1);
  }
  return a;
}

void require_host(const Tensor& t, DType dtype, const char* op, const char* what) {
  check(t.defined() && t.device() == Device::CPU && t.dtype() == dtype,
        std::string(op) + ": " + what + " must be a " + dtype_name(dtype) + " host tensor" +
            (t.defined() ? std::string(", found ") + dtype_name(t.dtype()) + " " + shape_str(t.shape()) : ""));
}

}  // namespace

void resize_bilinear_window(const float* src, int h, int w, int H, int W, int rows, int cols, float* dst) {
  const Axis ay = make_axis(h, H, rows), ax = make_axis(w, W, cols);
  for (int y = 0; y < rows; ++y) {
    const float* r0 = src + static_cast<size_t>(ay.i0[y]) * w;
    const float* r1 = src + static_cast<size_t>(ay.i1[y]) * w;
    float* out = dst + static_cast<size_t>(y) * cols;
    for (int x = 0; x < cols; ++x)
      out[x] = ay.l0[y] * (ax.l0[x] * r0[ax.i0[x]] + ax.l1[x] * r0[ax.i1[x]]) +
               ay.l1[y] * (ax.l0[x] * r1[ax.i0[x]] + ax.l1[x] * r1[ax.i1[x]]);
  }
}

void upscale_mask_logits(const float* low_res, int h, int w, const Backend::MaskFrame& f, float* mid, float* out) {
  resize_bilinear_window(low_res, h, w, f.img_size, f.img_size, f.input_h, f.input_w, mid);
  resize_bilinear_window(mid, f.input_h, f.input_w, f.height, f.width, f.height, f.width, out);
}

HypernetworkShape hypernetwork_shape(const Tensor& up, const Tensor& hyper, const Tensor& low_res) {
  HypernetworkShape s;
  const std::string shapes = shape_str(up.shape()) + ", " + shape_str(hyper.shape()) + " -> " + shape_str(low_res.shape());
  check((up.dtype() == DType::F32 || up.dtype() == DType::BF16 || up.dtype() == DType::F16) &&
            hyper.dtype() == up.dtype() && low_res.dtype() == DType::F32,
        "hypernetwork_masks: the upscaled image and the hypernetwork outputs must share a dtype (float32, bf16 or "
        "fp16) and the masks be float32 (" + shapes + ")");
  check(up.ndim() == 3 && hyper.ndim() == 3 && low_res.ndim() == 4,
        "hypernetwork_masks: expected up [P, 16 G G, D], hyper [P, T, D], low_res [P, T, 4G, 4G], found " + shapes);
  s.P = hyper.dim(0), s.T = hyper.dim(1), s.D = hyper.dim(2);
  const int64_t side = low_res.dim(2);
  s.G = side / 4;
  check(side > 0 && side % 4 == 0 && low_res.dim(3) == side && low_res.dim(0) == s.P && low_res.dim(1) == s.T &&
            up.dim(0) == s.P && up.dim(1) == side * side && up.dim(2) == s.D && s.D > 0,
        "hypernetwork_masks: expected up [P, 16 G G, D], hyper [P, T, D], low_res [P, T, 4G, 4G], found " + shapes);
  return s;
}

int64_t mask_bit_words(int height, int width) { return (int64_t(height) * width + 31) / 32; }

namespace {

// Byte b's 8 bits spread over 8 bytes (bit k -> byte k, 0 or 1), in memory order.
constexpr std::array<uint64_t, 256> spread_bits_table() {
  std::array<uint64_t, 256> t{};
  for (int b = 0; b < 256; ++b)
    for (int k = 0; k < 8; ++k)
      if (b & (1 << k)) {
        if constexpr (std::endian::native == std::endian::little)
          t[b] |= uint64_t(1) << (8 * k);
        else
          t[b] |= uint64_t(1) << (8 * (7 - k));
      }
  return t;
}
constexpr std::array<uint64_t, 256> kSpreadBits = spread_bits_table();

}  // namespace

void unpack_mask_bits(const uint32_t* bits, int64_t pixels, uint8_t* out) {
  // Whole words a byte of bits at a time (8 pixels from one table entry), the tail bit by bit.
  const int64_t whole = pixels / 32;
  int64_t w = 0;
#if defined(__SSE2__)
  // Where the output is 16-byte aligned, streaming stores: a mask is written once and read later
  // (often by another thread), so the cache lines it fills need not be read in first. Masks of
  // many prompts are hundreds of MB; this halves the memory traffic of filling them.
  if (reinterpret_cast<uintptr_t>(out) % 16 == 0) {
    for (; w < whole; ++w) {
      const uint32_t word = bits[w];
      auto* o = reinterpret_cast<__m128i*>(out + w * 32);
      _mm_stream_si128(o, _mm_set_epi64x(static_cast<int64_t>(kSpreadBits[(word >> 8) & 0xffu]),
                                         static_cast<int64_t>(kSpreadBits[word & 0xffu])));
      _mm_stream_si128(o + 1, _mm_set_epi64x(static_cast<int64_t>(kSpreadBits[word >> 24]),
                                             static_cast<int64_t>(kSpreadBits[(word >> 16) & 0xffu])));
    }
    _mm_sfence();  // the streamed stores are ordered before whatever this thread does next
  }
#endif
  for (; w < whole; ++w) {
    const uint32_t word = bits[w];
    for (int j = 0; j < 4; ++j) std::memcpy(out + w * 32 + j * 8, &kSpreadBits[(word >> (8 * j)) & 0xffu], 8);
  }
  for (int64_t i = whole * 32; i < pixels; ++i) out[i] = static_cast<uint8_t>((bits[i / 32] >> (i % 32)) & 1u);
}

std::vector<uint32_t> run_lengths_from_bits(const uint32_t* bits, int64_t pixels) {
  // Walk from one change of value to the next: whole words of the current value are skipped,
  // and inside a word the next change is a count of trailing zeros.
  std::vector<uint32_t> counts;
  uint32_t value = 0;  // the value of the current run
  int64_t start = 0, i = 0;
  while (i < pixels) {
    const int64_t w = i / 32, b = i % 32;
    uint32_t diff = (value ? ~bits[w] : bits[w]) >> b;  // 1 where the value changes, from bit b on
    if (diff == 0) {
      i = (w + 1) * 32;
      continue;
    }
    i += std::countr_zero(diff);
    if (i >= pixels) break;
    counts.push_back(static_cast<uint32_t>(i - start));
    start = i;
    value ^= 1u;
  }
  counts.push_back(static_cast<uint32_t>(pixels - start));
  return counts;
}

int64_t select_masks_count(const Tensor& iou, const Tensor& stats, const Tensor& keep, int64_t most,
                           const std::string& op) {
  const int64_t n = iou.numel();
  check(stats.numel() == n * 7 && keep.numel() == n + 1 && n < most,
        op + ": iou " + shape_str(iou.shape()) + ", stats " + shape_str(stats.shape()) + ", keep " +
            shape_str(keep.shape()) + " (expected [n], [n, 7], [n + 1] with n < " + std::to_string(most) + ")");
  return n;
}

float stability_from_counts(int64_t intersections, int64_t unions) {
  return static_cast<float>(intersections) / static_cast<float>(unions);
}

bool box_near_crop_edge(const int box[4], const int crop[4], const int orig[4], float atol) {
  for (int k = 0; k < 4; ++k) {
    // The box back in the image's frame, then torch.isclose with rtol 0: |a - b| <= atol.
    const float b = static_cast<float>(box[k] + crop[k % 2]);
    const bool near_crop = std::fabs(b - static_cast<float>(crop[k])) <= atol;
    const bool near_image = std::fabs(b - static_cast<float>(orig[k])) <= atol;
    if (near_crop && !near_image) return true;
  }
  return false;
}

float box_iou(const float a[4], const float b[4]) {
  const float area_a = (a[2] - a[0]) * (a[3] - a[1]), area_b = (b[2] - b[0]) * (b[3] - b[1]);
  const float w = std::max(0.0f, std::min(a[2], b[2]) - std::max(a[0], b[0]));
  const float h = std::max(0.0f, std::min(a[3], b[3]) - std::max(a[1], b[1]));
  const float inter = w * h;
  return inter / (area_a + area_b - inter);
}

std::vector<int> box_nms(const int (*boxes)[4], const float* scores, int n, double iou_threshold) {
  std::vector<int> order(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return scores[a] > scores[b]; });
  std::vector<std::array<float, 4>> f(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i)
    for (int k = 0; k < 4; ++k) f[i][k] = static_cast<float>(boxes[i][k]);
  std::vector<uint8_t> suppressed(static_cast<size_t>(n), 0);
  std::vector<int> keep;
  for (int oi = 0; oi < n; ++oi) {
    const int i = order[oi];
    if (suppressed[i]) continue;
    keep.push_back(i);
    for (int oj = oi + 1; oj < n; ++oj) {
      const int j = order[oj];
      // NaN (two empty boxes) compares false: neither suppresses the other.
      if (!suppressed[j] && static_cast<double>(box_iou(f[i].data(), f[j].data())) > iou_threshold) suppressed[j] = 1;
    }
  }
  return keep;
}

// ---- the host defaults of Backend's ops (backend.h) ----------------------------------------------

void Backend::upload_async(const Tensor& host, Tensor& dst) {
  check(host.dtype() == dst.dtype() && host.numel() == dst.numel(),
        std::string("upload_async: ") + dtype_name(host.dtype()) + " " + shape_str(host.shape()) + " into " +
            dtype_name(dst.dtype()) + " " + shape_str(dst.shape()));
  if (host.nbytes() > 0) std::memmove(dst.data(), host.data(), host.nbytes());
}

void Backend::embed_points(const Tensor& coords, const Tensor& labels, const Tensor& gaussian, const Tensor& table,
                           int img_size, Tensor& out) {
  const char* op = "embed_points";
  require_host(coords, DType::F32, op, "coords");
  require_host(labels, DType::I32, op, "labels");
  require_host(gaussian, DType::F32, op, "gaussian");
  require_host(table, DType::F32, op, "table");
  require_host(out, DType::F32, op, "output");
  const int64_t C = table.dim(-1), half = C / 2, N = labels.numel();
  check(table.numel() == 5 * C && C % 2 == 0 && gaussian.numel() == 2 * half && coords.numel() == 2 * N &&
            out.numel() == N * C && img_size > 0,
        std::string(op) + ": coords " + shape_str(coords.shape()) + ", labels " + shape_str(labels.shape()) +
            ", gaussian " + shape_str(gaussian.shape()) + ", table " + shape_str(table.shape()) + " -> " +
            shape_str(out.shape()));
  const float inv = 1.0f / static_cast<float>(img_size);
  const float* g = gaussian.data_as<const float>();
  for (int64_t t = 0; t < N; ++t) {
    const int label = labels.data_as<const int32_t>()[t];
    check(label >= -1 && label <= 3, std::string(op) + ": label " + std::to_string(label) + " is not in -1..3");
    const float* e = table.data_as<const float>() + (label + 1) * C;
    float* row = out.data_as<float>() + t * C;
    if (label < 0) {
      std::copy_n(e, C, row);
      continue;
    }
    const float x = (coords.data_as<const float>()[2 * t] + 0.5f) * inv;
    const float y = (coords.data_as<const float>()[2 * t + 1] + 0.5f) * inv;
    const float cx = 2.0f * x - 1.0f, cy = 2.0f * y - 1.0f;
    for (int64_t k = 0; k < half; ++k) {
      const float v = 2.0f * static_cast<float>(M_PI) * (cx * g[k] + cy * g[half + k]);
      row[k] = std::sin(v) + e[k];
      row[half + k] = std::cos(v) + e[half + k];
    }
  }
}

void Backend::postprocess_masks(const Tensor& low_res, int first, int count, const MaskFrame& f, float threshold,
                                float offset, bool column_major, Tensor* bits, Tensor& stats, const Tensor* select) {
  const char* op = "postprocess_masks";
  require_host(low_res, DType::F32, op, "low-res logits");
  require_host(stats, DType::I32, op, "stats");
  check(low_res.ndim() == 4 && first >= 0 && count >= 0 && first + count <= low_res.dim(1),
        std::string(op) + ": masks " + std::to_string(first) + "+" + std::to_string(count) + " of low-res logits " +
            shape_str(low_res.shape()) + " (expected [P, T, h, w])");
  check(f.img_size > 0 && f.input_h > 0 && f.input_w > 0 && f.input_h <= f.img_size && f.input_w <= f.img_size &&
            f.height > 0 && f.width > 0,
        std::string(op) + ": inconsistent frame");
  const int64_t P = low_res.dim(0), T = low_res.dim(1), words = mask_bit_words(f.height, f.width);
  const int64_t M = select ? select->numel() : P * count;
  const int h = static_cast<int>(low_res.dim(2)), w = static_cast<int>(low_res.dim(3));
  if (select) {
    require_host(*select, DType::I32, op, "select");
    for (int64_t i = 0; i < M; ++i) {
      const int32_t m = select->data_as<const int32_t>()[i];
      check(m >= 0 && m < P * count, std::string(op) + ": selected mask " + std::to_string(m) + " of " +
                                         std::to_string(P * count));
    }
  }
  check(stats.numel() == M * 7, std::string(op) + ": stats " + shape_str(stats.shape()) + " for " + std::to_string(M) +
                                    " masks (expected [M, 7])");
  if (bits) {
    require_host(*bits, DType::I32, op, "bits");
    check(bits->numel() == M * words, std::string(op) + ": bits " + shape_str(bits->shape()) + " for " +
                                          std::to_string(M) + " masks of " + std::to_string(words) + " words");
  }
  const int64_t pixels = int64_t(f.height) * f.width;
#pragma omp parallel
  {
    std::vector<float> mid(static_cast<size_t>(f.input_h) * f.input_w), full(static_cast<size_t>(pixels));
#pragma omp for schedule(dynamic)
    for (int64_t m = 0; m < M; ++m) {
      const int64_t src = select ? select->data_as<const int32_t>()[m] : m;
      const int64_t p = src / count, j = src % count;
      upscale_mask_logits(low_res.data_as<const float>() + ((p * T + first + j) * h) * w, h, w, f, mid.data(),
                          full.data());
      int64_t area = 0, hi = 0, lo = 0;
      int x0 = f.width, y0 = f.height, x1 = -1, y1 = -1;
      uint32_t* out = bits ? reinterpret_cast<uint32_t*>(bits->data_as<int32_t>()) + m * words : nullptr;
      if (out) std::fill(out, out + words, 0u);
      for (int y = 0; y < f.height; ++y)
        for (int x = 0; x < f.width; ++x) {
          const float v = full[static_cast<size_t>(y) * f.width + x];
          hi += v > threshold + offset;
          lo += v > threshold - offset;
          if (!(v > threshold)) continue;
          ++area;
          x0 = std::min(x0, x), x1 = std::max(x1, x), y0 = std::min(y0, y), y1 = std::max(y1, y);
          if (out) {
            const int64_t i = column_major ? int64_t(x) * f.height + y : int64_t(y) * f.width + x;
            out[i / 32] |= 1u << (i % 32);
          }
        }
      int32_t* s = stats.data_as<int32_t>() + m * 7;
      const bool empty = area == 0;
      s[0] = static_cast<int32_t>(area);
      s[1] = empty ? 0 : x0, s[2] = empty ? 0 : y0, s[3] = empty ? 0 : x1, s[4] = empty ? 0 : y1;
      s[5] = static_cast<int32_t>(hi);
      s[6] = static_cast<int32_t>(lo);
    }
  }
}

void Backend::select_masks(const Tensor& iou, const Tensor& stats, const MaskSelection& sel, Tensor& keep) {
  const char* op = "select_masks";
  require_host(iou, DType::F32, op, "iou");
  require_host(stats, DType::I32, op, "stats");
  require_host(keep, DType::I32, op, "keep");
  const int64_t n = select_masks_count(iou, stats, keep, int64_t(1) << 31, op);
  const float* s = iou.data_as<const float>();
  const auto* st = reinterpret_cast<const int32_t(*)[7]>(stats.data_as<const int32_t>());
  const int orig[4] = {0, 0, sel.image_w, sel.image_h};
  std::vector<int> survivors;
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(s[i])) continue;
    if (sel.filter_iou && !(s[i] > sel.iou_thresh)) continue;
    if (sel.filter_stability && !(stability_from_counts(st[i][5], st[i][6]) >= sel.stability_thresh)) continue;
    if (box_near_crop_edge(st[i] + 1, sel.crop, orig, 20.0f)) continue;
    survivors.push_back(static_cast<int>(i));
  }
  const int m = static_cast<int>(survivors.size());
  std::vector<std::array<int, 4>> boxes(static_cast<size_t>(m));
  std::vector<float> scores(static_cast<size_t>(m));
  for (int k = 0; k < m; ++k) {
    std::copy_n(st[survivors[k]] + 1, 4, boxes[k].data());
    scores[k] = s[survivors[k]];
  }
  const std::vector<int> kept = box_nms(reinterpret_cast<const int(*)[4]>(boxes.data()), scores.data(), m,
                                        sel.nms_thresh);
  int32_t* out = keep.data_as<int32_t>();
  out[0] = static_cast<int32_t>(kept.size());
  for (size_t k = 0; k < kept.size(); ++k) out[1 + k] = survivors[kept[k]];
}

void Backend::uncrop_bits(const Tensor& bits, const int crop[4], int image_h, int image_w, Tensor& out) {
  const char* op = "uncrop_bits";
  require_host(bits, DType::I32, op, "bits");
  require_host(out, DType::I32, op, "output");
  const int cw = crop[2] - crop[0], ch = crop[3] - crop[1];
  check(crop[0] >= 0 && crop[1] >= 0 && cw > 0 && ch > 0 && crop[2] <= image_w && crop[3] <= image_h,
        std::string(op) + ": the crop lies outside the image");
  const int64_t K = bits.dim(0), in_words = mask_bit_words(ch, cw), out_words = mask_bit_words(image_h, image_w);
  check(bits.numel() == K * in_words && out.numel() == K * out_words,
        std::string(op) + ": bits " + shape_str(bits.shape()) + " -> " + shape_str(out.shape()) + " for " +
            std::to_string(K) + " masks");
  const auto* src = reinterpret_cast<const uint32_t*>(bits.data_as<const int32_t>());
  auto* dst = reinterpret_cast<uint32_t*>(out.data_as<int32_t>());
  std::fill_n(dst, K * out_words, 0u);
  for (int64_t k = 0; k < K; ++k)
    for (int x = 0; x < cw; ++x)
      for (int y = 0; y < ch; ++y) {
        const int64_t i = int64_t(x) * ch + y, o = int64_t(crop[0] + x) * image_h + crop[1] + y;
        if ((src[k * in_words + i / 32] >> (i % 32)) & 1u) dst[k * out_words + o / 32] |= 1u << (o % 32);
      }
}

void Backend::encode_runs(const Tensor& bits, int64_t pixels, Tensor& offsets, Tensor& runs) {
  const char* op = "encode_runs";
  require_host(bits, DType::I32, op, "bits");
  require_host(offsets, DType::I64, op, "offsets");
  require_host(runs, DType::I32, op, "runs");
  const int64_t words = (pixels + 31) / 32, K = offsets.numel() - 1;
  check(pixels > 0 && K >= 0 && bits.numel() == K * words,
        std::string(op) + ": bits " + shape_str(bits.shape()) + " for " + std::to_string(K) + " masks of " +
            std::to_string(pixels) + " pixels");
  std::vector<std::vector<uint32_t>> counts(static_cast<size_t>(K));
  const auto* b = reinterpret_cast<const uint32_t*>(bits.data_as<const int32_t>());
#pragma omp parallel for schedule(dynamic)
  for (int64_t k = 0; k < K; ++k) counts[k] = run_lengths_from_bits(b + k * words, pixels);
  int64_t* off = offsets.data_as<int64_t>();
  off[0] = 0;
  for (int64_t k = 0; k < K; ++k) off[k + 1] = off[k] + static_cast<int64_t>(counts[k].size());
  if (off[K] > runs.numel()) return;
  auto* r = reinterpret_cast<uint32_t*>(runs.data_as<int32_t>());
  for (int64_t k = 0; k < K; ++k) std::copy(counts[k].begin(), counts[k].end(), r + off[k]);
}

}  // namespace segany
