#include "pipeline/postprocess.h"

#include <algorithm>
#include <vector>

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
    float src = scale * (o + 0.5f) - 0.5f;
    if (src < 0) src = 0;
    const int i0 = static_cast<int>(src);
    const int step = i0 < in - 1 ? 1 : 0;
    const float l1 = src - i0;
    a.i0.push_back(i0);
    a.i1.push_back(i0 + step);
    a.l0.push_back(1.0f - l1);
    a.l1.push_back(l1);
  }
  return a;
}

// dst [rows, cols] = the top-left rows x cols of src [h, w] resized to [H, W].
void resize_window(const float* src, int h, int w, int H, int W, int rows, int cols, float* dst) {
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

}  // namespace

void resize_bilinear(const float* src, int h, int w, float* dst, int H, int W) { resize_window(src, h, w, H, W, H, W, dst); }

Tensor postprocess_masks(const Tensor& low_res, int img_size, int input_h, int input_w, int original_h, int original_w,
                         float threshold) {
  check(low_res.ndim() == 3 && low_res.dtype() == DType::F32, "postprocess: low-res logits must be float32 [M, h, w]");
  const int M = static_cast<int>(low_res.dim(0)), h = static_cast<int>(low_res.dim(1)), w = static_cast<int>(low_res.dim(2));
  Tensor masks = Tensor::empty({M, original_h, original_w}, DType::U8);
#pragma omp parallel
  {
    std::vector<float> mid(static_cast<size_t>(input_h) * input_w), full(static_cast<size_t>(original_h) * original_w);
#pragma omp for schedule(dynamic)
    for (int m = 0; m < M; ++m) {
      // Upscale to img_size^2 (only the part inside the resized image is kept), then to the original size.
      resize_window(low_res.data_as<const float>() + static_cast<size_t>(m) * h * w, h, w, img_size, img_size, input_h,
                    input_w, mid.data());
      resize_window(mid.data(), input_h, input_w, original_h, original_w, original_h, original_w, full.data());
      uint8_t* out = masks.data_as<uint8_t>() + static_cast<size_t>(m) * original_h * original_w;
      for (size_t i = 0; i < full.size(); ++i) out[i] = full[i] > threshold ? 1 : 0;
    }
  }
  return masks;
}

Tensor upscale_logits(const Tensor& low_res, int img_size, int input_h, int input_w, int original_h, int original_w) {
  check(low_res.ndim() == 3 && low_res.dtype() == DType::F32, "upscale_logits: low-res logits must be float32 [M, h, w]");
  const int M = static_cast<int>(low_res.dim(0)), h = static_cast<int>(low_res.dim(1)), w = static_cast<int>(low_res.dim(2));
  Tensor out = Tensor::empty({M, original_h, original_w});
  std::vector<float> mid(static_cast<size_t>(input_h) * input_w);
  for (int m = 0; m < M; ++m) {
    resize_window(low_res.data_as<const float>() + static_cast<size_t>(m) * h * w, h, w, img_size, img_size, input_h,
                  input_w, mid.data());
    resize_window(mid.data(), input_h, input_w, original_h, original_w, original_h, original_w,
                  out.data_as<float>() + static_cast<size_t>(m) * original_h * original_w);
  }
  return out;
}

MaskStats mask_stats(const uint8_t* mask, int height, int width) {
  MaskStats s;
  int x0 = width, y0 = height, x1 = -1, y1 = -1;
  for (int y = 0; y < height; ++y)
    for (int x = 0; x < width; ++x)
      if (mask[static_cast<size_t>(y) * width + x]) {
        ++s.area;
        x0 = std::min(x0, x);
        x1 = std::max(x1, x);
        y0 = std::min(y0, y);
        y1 = std::max(y1, y);
      }
  if (s.area) s.bbox_xywh = {x0, y0, x1 - x0 + 1, y1 - y0 + 1};
  return s;
}

}  // namespace segany
