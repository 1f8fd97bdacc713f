// The two ends of the mask decoder on the host: the twins of the CUDA kernels behind
// Backend::embed_points and Backend::postprocess_masks (whose defaults are built on them), and the
// host side of their outputs (bit-packed masks -> uint8 masks or COCO run lengths).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "backend/backend.h"

namespace segany {

// dst [rows, cols] = the top-left rows x cols of src [h, w] resized to [H, W] with torch's
// bilinear interpolation (align_corners=False), in float32 as torch computes it.
void resize_bilinear_window(const float* src, int h, int w, int H, int W, int rows, int cols, float* dst);

// One mask's low-res logits [h, w] -> its logits at the image's size [frame.height, frame.width]:
// upscaled to img_size^2, cut to input_h x input_w, upscaled again (the original's
// postprocess_masks). `mid` holds input_h * input_w floats of scratch.
void upscale_mask_logits(const float* low_res, int h, int w, const Backend::MaskFrame& frame, float* mid, float* out);

// The shapes of Backend::hypernetwork_masks, checked (both backends' twins): P prompts, T masks
// each, D features, masks of side 4G.
struct HypernetworkShape {
  int64_t P = 0, T = 0, D = 0, G = 0;
};
HypernetworkShape hypernetwork_shape(const Tensor& up, const Tensor& hyper, const Tensor& low_res);
// Row of the upscaled image (in patch order) that holds pixel (y, x) of a mask of side 4G.
inline int64_t hypernetwork_row(int64_t y, int64_t x, int64_t G) {
  return (((y >> 2) * G + (x >> 2)) * 4 + ((y >> 1) & 1) * 2 + ((x >> 1) & 1)) * 4 + (y & 1) * 2 + (x & 1);
}

// Words of 32 bits that one bit-packed mask of height x width pixels takes.
int64_t mask_bit_words(int height, int width);
// A bit-packed mask (row-major pixel order) -> uint8 [pixels], 1 inside.
void unpack_mask_bits(const uint32_t* bits, int64_t pixels, uint8_t* out);
// A bit-packed mask in column-major order -> COCO's run lengths: alternating runs of 0 and 1,
// starting with a run of 0 (possibly empty).
std::vector<uint32_t> run_lengths_from_bits(const uint32_t* bits, int64_t pixels);

// The automatic mask generator's arithmetic that Backend::select_masks shares with
// pipeline/amg_utils.h (which documents it): the stability score from its two pixel counts,
// float32 as the original divides them (NaN for 0 / 0); whether a box (XYXY, the crop's frame) lies
// near an edge of the crop that is not an edge of the image (orig, XYXY); torchvision's box NMS
// (boxes XYXY [n][4]), returning the kept indices best first.
float stability_from_counts(int64_t intersections, int64_t unions);
// The shapes of Backend::select_masks, checked (both backends' twins): iou [n], stats [n, 7], keep
// [n + 1], n below `most` (what the backend's arithmetic takes); returns n. `op` starts the error.
int64_t select_masks_count(const Tensor& iou, const Tensor& stats, const Tensor& keep, int64_t most,
                           const std::string& op);
bool box_near_crop_edge(const int box[4], const int crop[4], const int orig[4], float atol);
std::vector<int> box_nms(const int (*boxes)[4], const float* scores, int n, double iou_threshold);
// The IoU torchvision's nms computes for two boxes in float32 (NaN for two empty boxes).
float box_iou(const float a[4], const float b[4]);

}  // namespace segany
