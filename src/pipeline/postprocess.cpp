#include "pipeline/postprocess.h"

#include "backend/mask_ops.h"

#include <algorithm>
#include <vector>

namespace segany {

void resize_bilinear(const float* src, int h, int w, float* dst, int H, int W) {
  resize_bilinear_window(src, h, w, H, W, H, W, dst);
}

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
      resize_bilinear_window(low_res.data_as<const float>() + static_cast<size_t>(m) * h * w, h, w, img_size, img_size, input_h,
                    input_w, mid.data());
      resize_bilinear_window(mid.data(), input_h, input_w, original_h, original_w, original_h, original_w, full.data());
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
    resize_bilinear_window(low_res.data_as<const float>() + static_cast<size_t>(m) * h * w, h, w, img_size, img_size, input_h,
                  input_w, mid.data());
    resize_bilinear_window(mid.data(), input_h, input_w, original_h, original_w, original_h, original_w,
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
