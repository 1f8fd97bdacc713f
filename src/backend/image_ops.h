// SAM's preprocessing where it touches pixels: Pillow's fixed-point bilinear resize and the
// normalisation. One set of filter taps (ResizeTaps) and one integer recipe serve the CPU reference
// (pipeline/preprocess.cpp), the host default of Backend::preprocess_images and the CUDA kernel,
// which receives these very tables; so every path gives the same uint8 pixels, bit for bit.
//
// The recipe (Pillow's ImagingResampleInner for 8-bit images): a horizontal pass, each output value
// clip8((2^21 + sum_i in[first + i] * w[i]) >> 22), then a vertical pass of the same form over the
// horizontal pass's uint8 output. A pass whose size does not change is skipped by Pillow; its
// identity taps (one tap of weight 2^22) give the same pixels, which is what the GPU runs.
#pragma once

#include <cstdint>
#include <vector>

#include "segany/image.h"

namespace segany {

// Sam.pixel_mean / pixel_std.
constexpr float kPixelMean[3] = {123.675f, 116.28f, 103.53f};
constexpr float kPixelStd[3] = {58.395f, 57.12f, 57.375f};

// Pillow keeps 8-bit resampling in 32-bit fixed point with 22 fractional bits.
constexpr int kResizePrecisionBits = 32 - 8 - 2;

// (h, w) after resizing the longest side to `target`: int(side * target / max(H, W) + 0.5).
void resized_shape(int height, int width, int target, int& out_h, int& out_w);

// One axis's filter taps: output position o reads input positions [first[o], first[o] + count[o])
// with fixed-point weights weights[o * ksize + 0 .. count[o]).
struct ResizeTaps {
  int in_size = 0, out_size = 0;
  int ksize = 0;
  std::vector<int32_t> first, count, weights;
};

// Pillow's precompute_coeffs + normalize_coeffs_8bpc for the bilinear (triangle) filter; when
// shrinking, the triangle is stretched by the scale (the antialiasing). in_size == out_size gives
// the identity taps (the pass Pillow skips).
ResizeTaps pil_bilinear_taps(int in_size, int out_size);

// PIL's Image.resize((out_w, out_h), BILINEAR) of RGB u8 src [src_h, src_w, 3] into out
// [out_h, out_w, 3], bit-exact with Pillow.
void resize_bilinear_pil(const uint8_t* src, int src_w, int src_h, int out_w, int out_h, uint8_t* out);
Image resize_bilinear_pil(const Image& src, int out_w, int out_h);

// Sam.preprocess of a resized image [h, w, 3]: (pixel - mean) / std in float32 into the top-left
// of out [target, target, 3]; the rest of `out` is left as it is (zero it for the padding).
void normalise_into(const uint8_t* resized, int h, int w, int target, float* out);

}  // namespace segany
