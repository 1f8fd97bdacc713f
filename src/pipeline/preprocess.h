// Image preprocessing exactly as the original SAM: resize so the longest side is `target`
// (PIL's bilinear resampling, antialiased when shrinking), normalise with SAM's pixel mean/std,
// zero-pad bottom and right to target x target. The pixel arithmetic (resized_shape,
// resize_bilinear_pil, kPixelMean/kPixelStd) lives in backend/image_ops.h, shared with the
// backends' preprocess_images op; this is its fp32 host reference.
#pragma once

#include "backend/image_ops.h"
#include "segany/image.h"
#include "segany/tensor.h"

namespace segany {

struct Preprocessed {
  Tensor input;     // float32 [1, target, target, 3], normalised, zero-padded (channels-last)
  int input_h = 0;  // size of the resized image inside the padded square
  int input_w = 0;
  int original_h = 0;
  int original_w = 0;
};
Preprocessed preprocess(const Image& image, int target = 1024);

}  // namespace segany
