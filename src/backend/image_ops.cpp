// Pillow's bilinear resize in its own fixed-point arithmetic (Resample.c), and the host default of
// Backend::preprocess_images built on it. One step of rounding in the resized pixels moves every
// number after it, so the taps and the integer sums follow Pillow operation by operation.
#include "backend/image_ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "backend/backend.h"
#include "segany/error.h"

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

double bilinear_filter(double x) {
  if (x < 0.0) x = -x;
  return x < 1.0 ? 1.0 - x : 0.0;
}

uint8_t clip8(int32_t acc) { return static_cast<uint8_t>(std::clamp(acc >> kResizePrecisionBits, 0, 255)); }

// Horizontal pass over source rows [row0, row0 + rows): [rows, in_w, 3] -> out [rows, out_w, 3].
void resample_horizontal(const uint8_t* src, int src_w, int row0, int rows, const ResizeTaps& c, uint8_t* out) {
  const int out_w = c.out_size;
#pragma omp parallel for schedule(static)
  for (int yy = 0; yy < rows; ++yy) {
    for (int xx = 0; xx < out_w; ++xx) {
      const int32_t* k = &c.weights[static_cast<size_t>(xx) * c.ksize];
      const uint8_t* in = src + (static_cast<size_t>(yy + row0) * src_w + c.first[xx]) * 3;
      int32_t s0 = 1 << (kResizePrecisionBits - 1), s1 = s0, s2 = s0;  // + 0.5 for rounding
      for (int x = 0; x < c.count[xx]; ++x, in += 3) {
        s0 += in[0] * k[x];
        s1 += in[1] * k[x];
        s2 += in[2] * k[x];
      }
      uint8_t* o = out + (static_cast<size_t>(yy) * out_w + xx) * 3;
      o[0] = clip8(s0);
      o[1] = clip8(s1);
      o[2] = clip8(s2);
    }
  }
}

// Vertical pass: src [.., width, 3] -> out [out_h, width, 3], with `first` counted from the row
// of `src` numbered row_offset.
void resample_vertical(const uint8_t* src, int width, const ResizeTaps& c, int row_offset, uint8_t* out) {
  const size_t stride = static_cast<size_t>(width) * 3;
  const int out_h = c.out_size;
#pragma omp parallel for schedule(static)
  for (int yy = 0; yy < out_h; ++yy) {
    const int32_t* k = &c.weights[static_cast<size_t>(yy) * c.ksize];
    const uint8_t* base = src + (c.first[yy] - row_offset) * stride;
    uint8_t* o = out + yy * stride;
    for (size_t i = 0; i < stride; ++i) {
      int32_t s = 1 << (kResizePrecisionBits - 1);
      for (int y = 0; y < c.count[yy]; ++y) s += base[y * stride + i] * k[y];
      o[i] = clip8(s);
    }
  }
}

}  // namespace

// The arithmetic mirrors Pillow's in doubles, so the taps and their rounding to fixed point come out
// identical; keep it free of FMA contraction (the default -std=c++20 on x86-64 has none).
ResizeTaps pil_bilinear_taps(int in_size, int out_size) {
  check(in_size > 0 && out_size > 0,
        "resize taps from " + std::to_string(in_size) + " to " + std::to_string(out_size) + " pixels");
  ResizeTaps c;
  c.in_size = in_size;
  c.out_size = out_size;
  if (in_size == out_size) {  // the pass Pillow skips: each output is its input
    c.ksize = 1;
    c.first.resize(out_size);
    for (int i = 0; i < out_size; ++i) c.first[i] = i;
    c.count.assign(out_size, 1);
    c.weights.assign(out_size, 1 << kResizePrecisionBits);
    return c;
  }
  // Pillow takes the source box (0, 0, w, h) as C floats and subtracts them in float.
  const double scale = static_cast<double>(static_cast<float>(in_size) - 0.0f) / out_size;
  const double filterscale = std::max(scale, 1.0);
  const double support = 1.0 * filterscale;  // the bilinear filter's support is 1
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
      w[x] = kx < 0 ? static_cast<int32_t>(-0.5 + kx * (1 << kResizePrecisionBits))
                    : static_cast<int32_t>(0.5 + kx * (1 << kResizePrecisionBits));
    }
    c.first[xx] = xmin;
    c.count[xx] = xmax;
  }
  return c;
}

void resize_bilinear_pil(const uint8_t* src, int src_w, int src_h, int out_w, int out_h, uint8_t* out) {
  check(src_w > 0 && src_h > 0, "resize of an empty image (" + std::to_string(src_w) + "x" + std::to_string(src_h) + ")");
  check(out_w > 0 && out_h > 0, "cannot resize to " + std::to_string(out_w) + "x" + std::to_string(out_h) + " pixels");
  // ImagingResampleInner: the vertical taps first, to know which source rows the horizontal pass
  // must produce; then horizontal into a temporary of just those rows; then vertical. A pass whose
  // size does not change is skipped.
  const bool horizontal = out_w != src_w, vertical = out_h != src_h;
  if (!horizontal && !vertical) {
    std::memcpy(out, src, static_cast<size_t>(src_w) * src_h * 3);
    return;
  }
  const ResizeTaps vert = pil_bilinear_taps(src_h, out_h);
  if (!horizontal) {
    resample_vertical(src, src_w, vert, 0, out);
    return;
  }
  const ResizeTaps horiz = pil_bilinear_taps(src_w, out_w);
  if (!vertical) {
    resample_horizontal(src, src_w, 0, src_h, horiz, out);
    return;
  }
  const int row_first = vert.first.front();
  const int row_last = vert.first.back() + vert.count.back();
  std::vector<uint8_t> temp(static_cast<size_t>(row_last - row_first) * out_w * 3);
  resample_horizontal(src, src_w, row_first, row_last - row_first, horiz, temp.data());
  resample_vertical(temp.data(), out_w, vert, row_first, out);
}

Image resize_bilinear_pil(const Image& src, int out_w, int out_h) {
  check(src.width > 0 && src.height > 0 && src.rgb.size() == static_cast<size_t>(src.width) * src.height * 3,
        "resize of an empty or inconsistent image (" + std::to_string(src.width) + "x" +
            std::to_string(src.height) + ")");
  check(out_w > 0 && out_h > 0,
        "cannot resize to " + std::to_string(out_w) + "x" + std::to_string(out_h) + " pixels");
  Image out;
  out.width = out_w;
  out.height = out_h;
  out.rgb.resize(static_cast<size_t>(out_w) * out_h * 3);
  resize_bilinear_pil(src.rgb.data(), src.width, src.height, out_w, out_h, out.rgb.data());
  return out;
}

void normalise_into(const uint8_t* resized, int h, int w, int target, float* out) {
#pragma omp parallel for schedule(static)
  for (int y = 0; y < h; ++y) {
    const uint8_t* in = resized + static_cast<size_t>(y) * w * 3;
    float* row = out + static_cast<size_t>(y) * target * 3;
    for (int x = 0; x < w; ++x)
      for (int c = 0; c < 3; ++c) row[x * 3 + c] = (static_cast<float>(in[x * 3 + c]) - kPixelMean[c]) / kPixelStd[c];
  }
}

// ---- the host defaults of Backend's ops (backend.h) ----------------------------------------------

void Backend::download_async(const Tensor& src, Tensor& host) {
  check(src.dtype() == host.dtype() && src.numel() == host.numel(),
        std::string("download_async: ") + dtype_name(src.dtype()) + " " + shape_str(src.shape()) + " into " +
            dtype_name(host.dtype()) + " " + shape_str(host.shape()));
  if (src.nbytes() > 0) std::memcpy(host.data(), src.data(), src.nbytes());
}

void Backend::preprocess_images(const std::vector<Tensor>& images, Tensor& input) {
  check(input.device() == Device::CPU && input.ndim() == 4 && input.dim(3) == 3 && input.dim(1) == input.dim(2) &&
            input.dim(0) == static_cast<int64_t>(images.size()) &&
            (input.dtype() == DType::F32 || input.dtype() == DType::BF16),
        "preprocess_images: input " + std::string(dtype_name(input.dtype())) + " " + shape_str(input.shape()) +
            " for " + std::to_string(images.size()) + " images (host memory, float32 or bf16 [B, S, S, 3])");
  const int S = static_cast<int>(input.dim(1));
  const int64_t plane = int64_t(S) * S * 3;
  std::vector<float> f32(input.dtype() == DType::F32 ? 0 : plane);
  for (size_t i = 0; i < images.size(); ++i) {
    const Tensor& im = images[i];
    check(im.dtype() == DType::U8 && im.ndim() == 3 && im.dim(2) == 3 && im.device() == Device::CPU,
          "preprocess_images: image " + std::to_string(i) + " must be host u8 [h, w, 3], found " +
              dtype_name(im.dtype()) + " " + shape_str(im.shape()));
    const int H = static_cast<int>(im.dim(0)), W = static_cast<int>(im.dim(1));
    int h = 0, w = 0;
    resized_shape(H, W, S, h, w);
    check(h > 0 && w > 0, "image of " + std::to_string(W) + "x" + std::to_string(H) +
                              " pixels is too thin to resize to " + std::to_string(S));
    std::vector<uint8_t> resized(static_cast<size_t>(h) * w * 3);
    resize_bilinear_pil(im.data_as<const uint8_t>(), W, H, w, h, resized.data());
    float* dst = input.dtype() == DType::F32 ? input.data_as<float>() + i * plane : f32.data();
    std::fill(dst, dst + plane, 0.0f);
    normalise_into(resized.data(), h, w, S, dst);
    if (input.dtype() == DType::BF16) {
      uint16_t* o = input.data_as<uint16_t>() + i * plane;
      for (int64_t k = 0; k < plane; ++k) o[k] = f32_to_bf16(dst[k]);
    }
  }
}

}  // namespace segany
