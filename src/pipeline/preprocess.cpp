// SAM's preprocessing: ResizeLongestSide (PIL bilinear through torchvision), then
// Sam.preprocess (normalise, pad). The resize reproduces Pillow's Resample.c bit for bit, because
// one step of rounding in the resized pixels moves every number after it.
#include "pipeline/preprocess.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

namespace segany {

void resized_shape(int height, int width, int target, int& out_h, int& out_w) {
  check(height > 0 && width > 0 && target > 0,
        "cannot resize a " + std::to_string(width) + "x" + std::to_string(height) + " image to " +
            std::to_string(target));
  // ResizeLongestSide.get_preprocess_shape, in Python floats (doubles).
  const double scale = target * 1.0 / std::max(height, width);
  out_h = static_cast<int>(height * scale + 0.5);
  out_w = static_cast<int>(width * scale + 0.5);
}

namespace {

// Pillow keeps 8-bit resampling in 32-bit fixed point with 22 fractional bits: 8 bits for the
// value and 2 spare for filters whose weights overshoot 1 (bilinear's never do, but the scale is
// Pillow's, and so must be ours).
constexpr int kPrecisionBits = 32 - 8 - 2;

// One output pixel's filter taps along an axis: input positions [first, first + count) with
// fixed-point weights weights[i * ksize + 0 .. count).
struct ResampleCoeffs {
  int ksize = 0;
  std::vector<int> first, count;
  std::vector<int32_t> weights;
};

double bilinear_filter(double x) {
  if (x < 0.0) x = -x;
  return x < 1.0 ? 1.0 - x : 0.0;
}

// Pillow's precompute_coeffs + normalize_coeffs_8bpc for the bilinear (triangle) filter. When
// shrinking, the triangle is stretched by the scale (support grows), which is the antialiasing.
// The arithmetic mirrors Pillow's operation by operation in doubles, so the taps and their
// rounding to fixed point come out identical; keep it free of FMA contraction (the default
// -std=c++20 on x86-64 has none).
ResampleCoeffs precompute_coeffs(int in_size, int out_size) {
  // Pillow takes the source box (0, 0, w, h) as C floats and subtracts them in float.
  const double scale = static_cast<double>(static_cast<float>(in_size) - 0.0f) / out_size;
  const double filterscale = std::max(scale, 1.0);
  const double support = 1.0 * filterscale;  // the bilinear filter's support is 1
  ResampleCoeffs c;
  c.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  c.first.resize(out_size);
  c.count.resize(out_size);
  c.weights.assign(static_cast<size_t>(out_size) * c.ksize, 0);
  std::vector<double> k(c.ksize);
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = 0.0 + (xx + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    const int xmin = std::max(static_cast<int>(center - support + 0.5), 0);
    const int xmax = std::min(static_cast<int>(center + support + 0.5), in_size) - xmin;
    double ww = 0.0;
    for (int x = 0; x < xmax; ++x) {
      k[x] = bilinear_filter((x + xmin - center + 0.5) * ss);
      ww += k[x];
    }
    int32_t* w = &c.weights[static_cast<size_t>(xx) * c.ksize];
    for (int x = 0; x < xmax; ++x) {
      const double kx = ww != 0.0 ? k[x] / ww : k[x];
      // Round half away from zero, as normalize_coeffs_8bpc.
      w[x] = kx < 0 ? static_cast<int32_t>(-0.5 + kx * (1 << kPrecisionBits))
                    : static_cast<int32_t>(0.5 + kx * (1 << kPrecisionBits));
    }
    c.first[xx] = xmin;
    c.count[xx] = xmax;
  }
  return c;
}

uint8_t clip8(int32_t acc) { return static_cast<uint8_t>(std::clamp(acc >> kPrecisionBits, 0, 255)); }

// Horizontal pass over source rows [row0, row0 + rows): [rows, in_w, 3] -> [rows, out_w, 3].
Image resample_horizontal(const Image& src, int row0, int rows, const ResampleCoeffs& c, int out_w) {
  Image out;
  out.width = out_w;
  out.height = rows;
  out.rgb.resize(static_cast<size_t>(out_w) * rows * 3);
#pragma omp parallel for schedule(static)
  for (int yy = 0; yy < rows; ++yy) {
    for (int xx = 0; xx < out_w; ++xx) {
      const int32_t* k = &c.weights[static_cast<size_t>(xx) * c.ksize];
      const uint8_t* in = src.pixel(c.first[xx], yy + row0);
      int32_t s0 = 1 << (kPrecisionBits - 1), s1 = s0, s2 = s0;  // + 0.5 for rounding
      for (int x = 0; x < c.count[xx]; ++x, in += 3) {
        s0 += in[0] * k[x];
        s1 += in[1] * k[x];
        s2 += in[2] * k[x];
      }
      uint8_t* o = out.pixel(xx, yy);
      o[0] = clip8(s0);
      o[1] = clip8(s1);
      o[2] = clip8(s2);
    }
  }
  return out;
}

// Vertical pass: [in_h, w, 3] -> [out_h, w, 3], with `first` relative to the rows of `src`.
Image resample_vertical(const Image& src, const ResampleCoeffs& c, int row_offset, int out_h) {
  Image out;
  out.width = src.width;
  out.height = out_h;
  out.rgb.resize(static_cast<size_t>(src.width) * out_h * 3);
  const size_t stride = static_cast<size_t>(src.width) * 3;
#pragma omp parallel for schedule(static)
  for (int yy = 0; yy < out_h; ++yy) {
    const int32_t* k = &c.weights[static_cast<size_t>(yy) * c.ksize];
    const uint8_t* base = src.rgb.data() + (c.first[yy] - row_offset) * stride;
    uint8_t* o = out.rgb.data() + yy * stride;
    for (size_t i = 0; i < stride; ++i) {
      int32_t s = 1 << (kPrecisionBits - 1);
      for (int y = 0; y < c.count[yy]; ++y) s += base[y * stride + i] * k[y];
      o[i] = clip8(s);
    }
  }
  return out;
}

}  // namespace

Image resize_bilinear_pil(const Image& src, int out_w, int out_h) {
  check(src.width > 0 && src.height > 0 && src.rgb.size() == static_cast<size_t>(src.width) * src.height * 3,
        "resize of an empty or inconsistent image (" + std::to_string(src.width) + "x" +
            std::to_string(src.height) + ")");
  check(out_w > 0 && out_h > 0,
        "cannot resize to " + std::to_string(out_w) + "x" + std::to_string(out_h) + " pixels");
  // ImagingResampleInner: the vertical taps first, to know which source rows the horizontal pass
  // must produce; then horizontal into a temporary of just those rows; then vertical. A pass whose
  // size does not change is skipped (its taps would be the identity anyway).
  const bool horizontal = out_w != src.width, vertical = out_h != src.height;
  if (!horizontal && !vertical) return src;
  const ResampleCoeffs vert = precompute_coeffs(src.height, out_h);
  const int row_first = vert.first.front();
  const int row_last = vert.first.back() + vert.count.back();
  if (!horizontal) return resample_vertical(src, vert, 0, out_h);
  const ResampleCoeffs horiz = precompute_coeffs(src.width, out_w);
  const Image temp = resample_horizontal(src, row_first, row_last - row_first, horiz, out_w);
  if (!vertical) return temp;
  return resample_vertical(temp, vert, row_first, out_h);
}

Preprocessed preprocess(const Image& image, int target) {
  Preprocessed p;
  p.original_h = image.height;
  p.original_w = image.width;
  resized_shape(image.height, image.width, target, p.input_h, p.input_w);
  // Shrinking may round a side to 0 (a 1x5000 image to 1024); nothing can be encoded from that.
  check(p.input_h > 0 && p.input_w > 0,
        "image of " + std::to_string(image.width) + "x" + std::to_string(image.height) +
            " pixels is too thin to resize to " + std::to_string(target));
  const Image resized = resize_bilinear_pil(image, p.input_w, p.input_h);

  // Sam.preprocess: (pixel - mean) / std in float32, zero padding at the bottom and right.
  p.input = Tensor::zeros({1, target, target, 3});  // [1, T, T, 3], channels-last
  float* out = p.input.data_as<float>();
#pragma omp parallel for schedule(static)
  for (int y = 0; y < p.input_h; ++y) {
    const uint8_t* in = resized.rgb.data() + static_cast<size_t>(y) * p.input_w * 3;
    float* row = out + static_cast<size_t>(y) * target * 3;
    for (int x = 0; x < p.input_w; ++x)
      for (int c = 0; c < 3; ++c) row[x * 3 + c] = (static_cast<float>(in[x * 3 + c]) - kPixelMean[c]) / kPixelStd[c];
  }
  return p;
}

}  // namespace segany
