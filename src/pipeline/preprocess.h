// Image preprocessing exactly as the original SAM: resize so the longest side is `target`
// (PIL's bilinear resampling, antialiased when shrinking), normalise with SAM's pixel mean/std,
// zero-pad bottom and right to target x target.
#pragma once

#include "segany/image.h"
#include "segany/tensor.h"

namespace segany {

constexpr float kPixelMean[3] = {123.675f, 116.28f, 103.53f};
constexpr float kPixelStd[3] = {58.395f, 57.12f, 57.375f};

// (h, w) after resizing the longest side to `target`: int(side * target / max(H, W) + 0.5).
void resized_shape(int height, int width, int target, int& out_h, int& out_w);

// PIL's Image.resize(size, BILINEAR) on 8-bit RGB, bit-exact with Pillow's fixed-point code.
Image resize_bilinear_pil(const Image& src, int out_w, int out_h);

struct Preprocessed {
  Tensor input;     // float32 [1, target, target, 3], normalised, zero-padded (channels-last)
  int input_h = 0;  // size of the resized image inside the padded square
  int input_w = 0;
  int original_h = 0;
  int original_w = 0;
};
Preprocessed preprocess(const Image& image, int target = 1024);

}  // namespace segany
