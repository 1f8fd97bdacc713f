// Shared helpers for tests: where the golden data is, temp folders.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "segany/image.h"
#include "segany/tensor.h"

namespace segany::test {

inline std::string shared_dir() { return SEGANY_SHARED_DIR; }
inline std::string golden_dir() { return std::string(SEGANY_SHARED_DIR) + "/golden"; }
inline bool have_golden() { return std::filesystem::exists(golden_dir() + "/README.md"); }
#define SEGANY_REQUIRE_GOLDEN() \
  if (!::segany::test::have_golden()) GTEST_SKIP() << "no golden data at " << ::segany::test::golden_dir()

// A fresh empty folder for one test, named after `name` and the running test: ctest runs the tests
// of one executable in parallel processes, which must not empty each other's folders.
inline std::string temp_dir(const std::string& name) {
  std::filesystem::path p = std::filesystem::path(SEGANY_TEST_TMP) / name;
  if (const auto* info = ::testing::UnitTest::GetInstance()->current_test_info())
    p /= std::string(info->test_suite_name()) + "." + info->name();
  std::filesystem::remove_all(p);
  std::filesystem::create_directories(p);
  return p.string();
}

// Largest |a - b| over two tensors of any float dtype; a NaN anywhere gives NaN (a failure).
// A deterministic w x h image with detail at every scale, so that a wrong resize tap shows.
inline Image pattern_image(int w, int h) {
  Image im;
  im.width = w;
  im.height = h;
  im.rgb.resize(static_cast<size_t>(w) * h * 3);
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x)
      for (int c = 0; c < 3; ++c) im.pixel(x, y)[c] = static_cast<uint8_t>((x * 7 + y * 13 + c * 101 + x * y) % 256);
  return im;
}

// The image's pixels copied into t, a [height, width, 3] U8 tensor in host memory (pinned or not).
inline Tensor u8_pixels(const Image& im, Tensor t) {
  std::copy(im.rgb.begin(), im.rgb.end(), t.data_as<uint8_t>());
  return t;
}
inline Tensor u8_pixels(const Image& im) { return u8_pixels(im, Tensor::empty({im.height, im.width, 3}, DType::U8)); }

inline float max_abs_diff(const Tensor& a, const Tensor& b) {
  EXPECT_EQ(a.numel(), b.numel());
  const Tensor fa = a.to_f32(), fb = b.to_f32();
  float m = 0;
  for (int64_t i = 0; i < std::min(a.numel(), b.numel()); ++i) {
    const float d = std::fabs(fa.data_as<float>()[i] - fb.data_as<float>()[i]);
    if (!(d <= m)) m = d;
  }
  return m;
}

// IoU of mask m (uint8 [H, W]) with a reference mask packed as numpy.packbits rows (golden files).
inline double mask_iou(const uint8_t* m, const uint8_t* packed, int H, int W) {
  const int row_bytes = (W + 7) / 8;
  int64_t inter = 0, uni = 0;
  for (int y = 0; y < H; ++y)
    for (int x = 0; x < W; ++x) {
      const bool r = (packed[y * row_bytes + x / 8] >> (7 - x % 8)) & 1;
      const bool a = m[static_cast<size_t>(y) * W + x] != 0;
      inter += (a && r);
      uni += (a || r);
    }
  return uni == 0 ? 1.0 : static_cast<double>(inter) / static_cast<double>(uni);
}

// Candidates for Backend::select_masks: n masks in clusters of overlapping boxes inside a
// crop_w x crop_h crop (some touching its edges, some empty), predicted IoUs on a coarse grid (so
// that ties occur), stability counts (some 0 / 0). iou float32 [n], stats int32 [n, 7].
struct AmgCandidates {
  Tensor iou, stats;
};
inline AmgCandidates random_amg_candidates(int64_t n, int crop_w, int crop_h, uint64_t seed) {
  std::mt19937_64 rng(seed);
  auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  AmgCandidates c{Tensor::empty({n}), Tensor::empty({n, 7}, DType::I32)};
  int cx = 0, cy = 0, bw = 0, bh = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (i % 6 == 0) {  // a new cluster
      cx = uniform(0, crop_w - 1), cy = uniform(0, crop_h - 1);
      bw = uniform(0, crop_w / 4), bh = uniform(0, crop_h / 4);
    }
    int32_t* s = c.stats.data_as<int32_t>() + i * 7;
    const int x0 = std::clamp(cx + uniform(-4, 4), 0, crop_w - 1), y0 = std::clamp(cy + uniform(-4, 4), 0, crop_h - 1);
    const int x1 = std::clamp(x0 + bw + uniform(-4, 4), x0, crop_w - 1);
    const int y1 = std::clamp(y0 + bh + uniform(-4, 4), y0, crop_h - 1);
    const bool empty = i % 37 == 5;
    s[0] = empty ? 0 : (x1 - x0 + 1) * (y1 - y0 + 1) / 2;
    s[1] = empty ? 0 : x0, s[2] = empty ? 0 : y0, s[3] = empty ? 0 : x1, s[4] = empty ? 0 : y1;
    s[6] = i % 53 == 7 ? 0 : uniform(1, 5000);
    s[5] = s[6] == 0 ? 0 : uniform(0, s[6]);
    c.iou.data_as<float>()[i] = static_cast<float>(uniform(0, 32)) / 32.0f;
  }
  return c;
}

// A random mask [h, w] (row-major, 0/1) of a few overlapping rectangles.
inline std::vector<uint8_t> random_blob_mask(int h, int w, uint64_t seed) {
  std::mt19937_64 rng(seed);
  auto uniform = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  std::vector<uint8_t> m(static_cast<size_t>(h) * w, 0);
  const int rects = uniform(0, 4);
  for (int r = 0; r < rects; ++r) {
    const int x0 = uniform(0, w - 1), y0 = uniform(0, h - 1);
    const int x1 = uniform(x0, w - 1), y1 = uniform(y0, h - 1);
    for (int y = y0; y <= y1; ++y)
      for (int x = x0; x <= x1; ++x) m[static_cast<size_t>(y) * w + x] ^= 1;
  }
  return m;
}

// Masks [h, w] (row-major) -> int32 [K, ceil(h * w / 32)], one bit a pixel in column-major order
// (postprocess_masks's COCO order).
inline Tensor column_major_bits(const std::vector<std::vector<uint8_t>>& masks, int h, int w) {
  const int64_t words = (int64_t(h) * w + 31) / 32, K = static_cast<int64_t>(masks.size());
  Tensor t = Tensor::empty({K, words}, DType::I32);
  auto* b = reinterpret_cast<uint32_t*>(t.data_as<int32_t>());
  std::fill_n(b, K * words, 0u);
  for (int64_t k = 0; k < K; ++k)
    for (int x = 0; x < w; ++x)
      for (int y = 0; y < h; ++y)
        if (masks[k][static_cast<size_t>(y) * w + x]) {
          const int64_t i = int64_t(x) * h + y;
          b[k * words + i / 32] |= 1u << (i % 32);
        }
  return t;
}

}  // namespace segany::test
