// MaskGenerator: "segment everything". Prompts SAM with a grid of single points over the image (and,
// optionally, over overlapping crops of it), keeps the masks the model is confident in and that are
// stable under a shift of the logit threshold, and removes duplicates by box NMS. The behaviour and
// parameters are those of the original SamAutomaticMaskGenerator (automatic_mask_generator.py).
//
//   segany::Predictor predictor("sam_vit_h_4b8939.pth");
//   segany::MaskGenerator generator(predictor, {.points_per_side = 32});
//   for (const segany::MaskRecord& r : generator.generate(image)) ... r.rle, r.bbox, r.predicted_iou ...
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "segany/image.h"
#include "segany/predictor.h"
#include "segany/tensor.h"

namespace segany {

enum class MaskOutputMode { BinaryMask, UncompressedRle, CocoRle };
// "binary_mask", "uncompressed_rle", "coco_rle" (the original's spellings); throws on anything else.
MaskOutputMode mask_output_mode_from_name(const std::string& name);
const char* mask_output_mode_name(MaskOutputMode mode);

// The original's parameters and defaults (chosen there for ViT-H). Thresholds are compared as the
// original compares them: against float32 scores.
struct MaskGeneratorOptions {
  int points_per_side = 32;  // points per side of the grid; 0 when point_grids are given
  // Explicit grids, normalised to [0, 1] (x, y); grid i is used in crop layer i. Exclusive with
  // points_per_side.
  std::vector<std::vector<std::array<double, 2>>> point_grids;
  int points_per_batch = 64;             // points decoded together
  double pred_iou_thresh = 0.88;         // keep masks whose predicted IoU is above (0: no filter)
  double stability_score_thresh = 0.95;  // keep masks whose stability is at least (0: no filter)
  double stability_score_offset = 1.0;   // the threshold shift of the stability score
  double box_nms_thresh = 0.7;           // box IoU above which a duplicate is dropped (within a crop)
  int crop_n_layers = 0;                 // layer i has (2^i)^2 crops; 0: the whole image only
  double crop_nms_thresh = 0.7;          // box NMS between crops (smaller crops win)
  double crop_overlap_ratio = 512.0 / 1500.0;
  int crop_n_points_downscale_factor = 1;  // layer i has points_per_side / factor^i points a side
  int min_mask_region_area = 0;            // > 0: fill holes and drop islands smaller than this
  MaskOutputMode output_mode = MaskOutputMode::BinaryMask;
};

// One mask, as the original's records: coordinates are pixels of the whole image.
struct MaskRecord {
  Rle rle;               // always: the mask (uncompressed RLE)
  Tensor mask;           // output_mode BinaryMask: uint8 [H, W], 1 inside
  std::string coco_rle;  // output_mode CocoRle: pycocotools' compressed counts string
  int64_t area = 0;
  std::array<int, 4> bbox{};       // XYWH of the mask's box, w = x1 - x0 with x1 the last column (as the original)
  float predicted_iou = 0;         // the model's own estimate of the mask's quality
  float stability_score = 0;       // IoU of the mask thresholded at +offset and at -offset
  std::array<double, 2> point{};   // the point prompt (x, y) that produced it
  std::array<int, 4> crop_box{};   // XYWH of the crop it was predicted in
};

namespace detail {
struct MaskCandidate;  // a mask on its way through the filters (pipeline/mask_generator.cpp)
}

// Runs where the predictor runs: on CUDA the grid is decoded, filtered, de-duplicated and
// run-length encoded on the GPU, and only the kept masks come back.
class MaskGenerator {
 public:
  // Uses `predictor` (which must outlive the generator) for every crop: generate() replaces the
  // predictor's image. Throws segany::Error on inconsistent options.
  explicit MaskGenerator(Predictor& predictor, const MaskGeneratorOptions& options = {});
  ~MaskGenerator();
  MaskGenerator(const MaskGenerator&) = delete;
  MaskGenerator& operator=(const MaskGenerator&) = delete;

  // Masks for the whole image, in the original's order (by NMS: best first).
  std::vector<MaskRecord> generate(const Image& image);

  const MaskGeneratorOptions& options() const { return options_; }

 private:
  struct Buffers;
  // One crop's masks (XYXY in the image), after its filters and NMS.
  std::vector<detail::MaskCandidate> process_crop(const Image& image, const std::array<int, 4>& crop,
                                                  const std::vector<std::array<double, 2>>& grid);

  Predictor& predictor_;
  MaskGeneratorOptions options_;
  std::vector<std::vector<std::array<double, 2>>> grids_;  // one per crop layer
  std::unique_ptr<Buffers> buffers_;
};

}  // namespace segany
