// Shared helpers for tests: where the golden data is, temp folders.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <string>

#include "segany/tensor.h"

namespace segany::test {

inline std::string shared_dir() { return SEGANY_SHARED_DIR; }
inline std::string golden_dir() { return std::string(SEGANY_SHARED_DIR) + "/golden"; }
inline bool have_golden() { return std::filesystem::exists(golden_dir() + "/README.md"); }
#define SEGANY_REQUIRE_GOLDEN() \
  if (!::segany::test::have_golden()) GTEST_SKIP() << "no golden data at " << ::segany::test::golden_dir()

// A fresh empty folder for one test.
inline std::string temp_dir(const std::string& name) {
  std::filesystem::path p = std::filesystem::path(SEGANY_TEST_TMP) / name;
  std::filesystem::remove_all(p);
  std::filesystem::create_directories(p);
  return p.string();
}

// Largest |a - b| over two tensors of any float dtype; a NaN anywhere gives NaN (a failure).
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

}  // namespace segany::test
