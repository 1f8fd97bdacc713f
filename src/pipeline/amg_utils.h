// The automatic mask generator's building blocks, each one as the original computes it
// (segment_anything/utils/amg.py, torchvision's nms, pycocotools' RLE strings, OpenCV's connected
// components). Boxes are XYXY with inclusive pixel coordinates (x1 is the last column of the mask).
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "segany/mask_generator.h"

namespace segany::amg {

using BoxXYXY = std::array<int, 4>;
using PointGrid = std::vector<std::array<double, 2>>;  // (x, y) in [0, 1]

// IoU of logits > threshold + offset with logits > threshold - offset, in float32 as the original
// divides int32 counts; NaN where both are empty (0 / 0, as torch gives).
float stability_score(const float* logits, int64_t count, float mask_threshold, float offset);

// Box around the nonzero pixels of mask [h, w] (row-major); [0, 0, 0, 0] for an empty mask.
BoxXYXY mask_to_box(const uint8_t* mask, int h, int w);
// [x0, y0, x1 - x0, y1 - y0].
BoxXYXY box_xyxy_to_xywh(const BoxXYXY& box);

// torchvision.ops.nms on float boxes: by score descending (stable for ties), a box is dropped when
// its IoU with a kept one is above iou_threshold; areas (x1 - x0) * (y1 - y0) without +1, so a
// degenerate box has area 0 and (NaN IoU) never suppresses nor is suppressed by its twin.
// Returns the kept indices, best first.
std::vector<int> nms(const std::vector<BoxXYXY>& boxes, const std::vector<float>& scores, double iou_threshold);

// n x n points at the centres of an n x n tiling of [0, 1]^2, row by row (numpy.linspace's values).
PointGrid build_point_grid(int n_per_side);
// One grid per crop layer: layer i has int(n_per_side / scale_per_layer^i) points a side.
std::vector<PointGrid> build_all_layer_point_grids(int n_per_side, int n_layers, int scale_per_layer);

// The whole image (layer 0), then for layer i = 1..n_layers (2^i)^2 overlapping crops, x-major.
struct CropBoxes {
  std::vector<BoxXYXY> boxes;  // [x0, y0, x1, y1), pixels
  std::vector<int> layers;
};
CropBoxes generate_crop_boxes(int im_h, int im_w, int n_layers, double overlap_ratio);

// Whether `box` (in the crop's frame) lies within atol of an edge of the crop that is not an edge
// of the image (orig_box [0, 0, W, H]).
bool is_box_near_crop_edge(const BoxXYXY& box, const BoxXYXY& crop_box, const BoxXYXY& orig_box, float atol = 20.0f);

BoxXYXY uncrop_box(const BoxXYXY& box, const BoxXYXY& crop_box);
std::array<double, 2> uncrop_point(const std::array<double, 2>& point, const BoxXYXY& crop_box);
// mask [crop h, crop w] -> [orig_h, orig_w], zero outside the crop.
std::vector<uint8_t> uncrop_mask(const uint8_t* mask, const BoxXYXY& crop_box, int orig_h, int orig_w);

// RLE of mask [h, w] (row-major, nonzero inside).
Rle mask_to_rle(const uint8_t* mask, int h, int w);
// The mask of an RLE, row-major [h, w], 1 inside. Throws when the counts do not cover h * w.
std::vector<uint8_t> rle_to_mask(const Rle& rle);
int64_t area_from_rle(const Rle& rle);

// pycocotools' compressed counts string (rleToString): each count, minus the count two before it
// from the fourth on, in 5-bit groups with a continuation bit, as characters from '0'.
std::string rle_to_coco_string(const Rle& rle);
// The inverse (rleFrString). Throws on a malformed string.
Rle rle_from_coco_string(const std::string& counts, int h, int w);

// Connected components with 8-connectivity of the nonzero pixels of mask [h, w], as OpenCV's
// connectedComponentsWithStats numbers them: label 0 is the background, labels 1.. follow the
// order in which a scan of 2x2 blocks (row pairs, left to right) first meets each component.
// Returns the number of labels including the background; labels [h * w], sizes [n] (sizes[0] is
// the background's pixel count).
int connected_components(const uint8_t* mask, int h, int w, std::vector<int>& labels, std::vector<int64_t>& sizes);

// remove_small_regions: holes (regions of the inverted mask) or islands (regions of the mask)
// smaller than area_thresh are filled or removed; if every island is small, the largest stays.
// Edits mask [h, w] (0/1) in place; returns whether anything was small (the original's "changed").
bool remove_small_regions(std::vector<uint8_t>& mask, int h, int w, double area_thresh, bool holes);

}  // namespace segany::amg
