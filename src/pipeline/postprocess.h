// From low-res logits to masks at the image's size, as the original postprocess_masks:
// bilinear to img_size^2, crop to the resized image, bilinear to the original size, threshold.
#pragma once

#include <array>

#include "segany/tensor.h"

namespace segany {

// Bilinear resize of one float map [h, w] to [H, W], as torch.nn.functional.interpolate
// (mode="bilinear", align_corners=False) computes it in float32.
void resize_bilinear(const float* src, int h, int w, float* dst, int H, int W);

// low_res [M, 256, 256] -> uint8 masks [M, original_h, original_w] (1 where the logit > threshold).
Tensor postprocess_masks(const Tensor& low_res, int img_size, int input_h, int input_w, int original_h,
                         int original_w, float threshold = 0.0f);

// low_res [M, 256, 256] -> float32 logits [M, original_h, original_w]: the same upscaling as
// postprocess_masks, without the threshold (the original's return_logits=True).
Tensor upscale_logits(const Tensor& low_res, int img_size, int input_h, int input_w, int original_h, int original_w);

// Area and bounding box (x, y, w, h) of a binary mask [H, W]; an empty mask gives zeros.
struct MaskStats {
  int64_t area = 0;
  std::array<int, 4> bbox_xywh{0, 0, 0, 0};
};
MaskStats mask_stats(const uint8_t* mask, int height, int width);

}  // namespace segany
