// The automatic mask generator, step for step as the original's SamAutomaticMaskGenerator:
// for each crop (the whole image first), decode a grid of single-point prompts in batches with
// three masks each, filter by predicted IoU, by stability and by closeness to a crop edge, NMS the
// crop's masks by box; then NMS between crops, and optionally clean up small regions.
#include "segany/mask_generator.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "pipeline/amg_utils.h"

namespace segany {

MaskOutputMode mask_output_mode_from_name(const std::string& name) {
  if (name == "binary_mask") return MaskOutputMode::BinaryMask;
  if (name == "uncompressed_rle") return MaskOutputMode::UncompressedRle;
  if (name == "coco_rle") return MaskOutputMode::CocoRle;
  throw Error("unknown output mode '" + name + "' (expected binary_mask, uncompressed_rle or coco_rle)");
}

const char* mask_output_mode_name(MaskOutputMode mode) {
  switch (mode) {
    case MaskOutputMode::BinaryMask: return "binary_mask";
    case MaskOutputMode::UncompressedRle: return "uncompressed_rle";
    case MaskOutputMode::CocoRle: return "coco_rle";
  }
  return "?";
}

namespace {

constexpr float kMaskThreshold = 0.0f;  // Sam.mask_threshold
constexpr int kMasksPerPoint = 3;       // multimask output

// A mask on its way through the filters: what MaskData holds in the original.
struct Candidate {
  Rle rle;              // at the whole image's size
  amg::BoxXYXY box{};   // in the crop's frame until the crop is done, then the image's
  float iou = 0, stability = 0;
  std::array<double, 2> point{};
  amg::BoxXYXY crop{};
};

template <class T>
std::vector<T> take(std::vector<T>& v, const std::vector<int>& keep) {
  std::vector<T> out;
  out.reserve(keep.size());
  for (int i : keep) out.push_back(std::move(v[i]));
  return out;
}

bool finite(double v) { return std::isfinite(v); }

}  // namespace

MaskGenerator::MaskGenerator(Predictor& predictor, const MaskGeneratorOptions& options)
    : predictor_(predictor), options_(options) {
  const MaskGeneratorOptions& o = options_;
  check((o.points_per_side > 0) != !o.point_grids.empty(),
        "mask generator: give exactly one of points_per_side (> 0) and point_grids");
  check(o.points_per_side >= 0, "mask generator: points_per_side must not be negative");
  check(o.points_per_batch > 0, "mask generator: points_per_batch must be positive, got " +
                                    std::to_string(o.points_per_batch));
  check(o.crop_n_layers >= 0, "mask generator: crop_n_layers must not be negative");
  check(o.crop_n_points_downscale_factor >= 1, "mask generator: crop_n_points_downscale_factor must be at least 1");
  check(o.min_mask_region_area >= 0, "mask generator: min_mask_region_area must not be negative");
  for (double v : {o.pred_iou_thresh, o.stability_score_thresh, o.stability_score_offset, o.box_nms_thresh,
                   o.crop_nms_thresh, o.crop_overlap_ratio})
    check(finite(v), "mask generator: thresholds, offset and overlap ratio must be finite numbers");
  check(o.crop_overlap_ratio >= 0 && o.crop_overlap_ratio < 1, "mask generator: crop_overlap_ratio must be in [0, 1)");
  if (o.points_per_side > 0) {
    grids_ = amg::build_all_layer_point_grids(o.points_per_side, o.crop_n_layers, o.crop_n_points_downscale_factor);
  } else {
    check(static_cast<int>(o.point_grids.size()) >= o.crop_n_layers + 1,
          "mask generator: " + std::to_string(o.point_grids.size()) + " point grids for " +
              std::to_string(o.crop_n_layers + 1) + " crop layers");
    for (const auto& grid : o.point_grids) {
      check(!grid.empty(), "mask generator: an empty point grid");
      for (const auto& p : grid)
        check(finite(p[0]) && finite(p[1]) && p[0] >= 0 && p[0] <= 1 && p[1] >= 0 && p[1] <= 1,
              "mask generator: point grids are normalised to [0, 1]; found (" + std::to_string(p[0]) + ", " +
                  std::to_string(p[1]) + ")");
    }
    grids_ = o.point_grids;
  }
}

namespace {

Image crop_image(const Image& image, const amg::BoxXYXY& c) {
  Image out;
  out.width = c[2] - c[0];
  out.height = c[3] - c[1];
  out.rgb.resize(static_cast<size_t>(out.width) * out.height * 3);
  for (int y = 0; y < out.height; ++y)
    std::copy_n(image.pixel(c[0], c[1] + y), static_cast<size_t>(out.width) * 3, out.pixel(0, y));
  return out;
}

// One batch of points in the crop: _process_batch. Candidates come back in the original's order
// (point by point, three masks each), already uncropped to the image's size for the RLE.
std::vector<Candidate> process_batch(Predictor& predictor, const MaskGeneratorOptions& o,
                                     const std::vector<std::array<double, 2>>& points, const amg::BoxXYXY& crop,
                                     int orig_h, int orig_w) {
  std::vector<Prompt> prompts(points.size());
  for (size_t i = 0; i < points.size(); ++i) {
    prompts[i].points = {Point{static_cast<float>(points[i][0]), static_cast<float>(points[i][1]), 1}};
    prompts[i].multimask = true;
  }
  const std::vector<Masks> out = predictor.predict_batch_low_res(prompts);
  const int crop_w = crop[2] - crop[0], crop_h = crop[3] - crop[1];
  const bool whole_image = crop == amg::BoxXYXY{0, 0, orig_w, orig_h};
  const int n = static_cast<int>(points.size()) * kMasksPerPoint;
  std::vector<Candidate> cand(n);
  std::vector<uint8_t> kept(n, 0);
  // Thresholds as the original compares them: a Python float against a float32 tensor.
  const float iou_thresh = static_cast<float>(o.pred_iou_thresh);
  const float stability_thresh = static_cast<float>(o.stability_score_thresh);
  const float offset = static_cast<float>(o.stability_score_offset);
#pragma omp parallel
  {
    std::vector<uint8_t> mask(static_cast<size_t>(crop_w) * crop_h);
#pragma omp for schedule(dynamic)
    for (int i = 0; i < n; ++i) {
      const int p = i / kMasksPerPoint, k = i % kMasksPerPoint;
      const Masks& m = out[p];
      Candidate& c = cand[i];
      c.iou = m.scores.data_as<const float>()[k];
      c.point = points[p];
      if (o.pred_iou_thresh > 0.0 && !(c.iou > iou_thresh)) continue;
      // Logits at the crop's size (postprocess_masks with return_logits), then the stability score.
      const Tensor logits = predictor.upscale_logits(m.low_res_logits.slice0(k, k + 1));  // [1, crop_h, crop_w]
      const float* l = logits.data_as<const float>();
      c.stability = amg::stability_score(l, logits.numel(), kMaskThreshold, offset);
      if (o.stability_score_thresh > 0.0 && !(c.stability >= stability_thresh)) continue;
      for (size_t j = 0; j < mask.size(); ++j) mask[j] = l[j] > kMaskThreshold;
      c.box = amg::mask_to_box(mask.data(), crop_h, crop_w);
      if (amg::is_box_near_crop_edge(c.box, crop, {0, 0, orig_w, orig_h})) continue;
      if (whole_image) {
        c.rle = amg::mask_to_rle(mask.data(), crop_h, crop_w);
      } else {
        const std::vector<uint8_t> full = amg::uncrop_mask(mask.data(), crop, orig_h, orig_w);
        c.rle = amg::mask_to_rle(full.data(), orig_h, orig_w);
      }
      kept[i] = 1;
    }
  }
  std::vector<int> keep;
  for (int i = 0; i < n; ++i)
    if (kept[i]) keep.push_back(i);
  return take(cand, keep);
}

// _process_crop: every batch of the crop's grid, NMS within the crop, back to the image's frame.
std::vector<Candidate> process_crop(Predictor& predictor, const MaskGeneratorOptions& o, const Image& image,
                                    const amg::BoxXYXY& crop, const amg::PointGrid& grid) {
  const int orig_h = image.height, orig_w = image.width;
  const bool whole_image = crop == amg::BoxXYXY{0, 0, orig_w, orig_h};
  predictor.set_image(whole_image ? image : crop_image(image, crop));
  const double crop_w = crop[2] - crop[0], crop_h = crop[3] - crop[1];
  std::vector<Candidate> data;
  for (size_t begin = 0; begin < grid.size(); begin += o.points_per_batch) {
    const size_t end = std::min(grid.size(), begin + static_cast<size_t>(o.points_per_batch));
    std::vector<std::array<double, 2>> points;
    for (size_t i = begin; i < end; ++i) points.push_back({grid[i][0] * crop_w, grid[i][1] * crop_h});
    for (Candidate& c : process_batch(predictor, o, points, crop, orig_h, orig_w)) data.push_back(std::move(c));
  }
  std::vector<amg::BoxXYXY> boxes;
  std::vector<float> scores;
  for (const Candidate& c : data) {
    boxes.push_back(c.box);
    scores.push_back(c.iou);
  }
  data = take(data, amg::nms(boxes, scores, o.box_nms_thresh));
  for (Candidate& c : data) {
    c.box = amg::uncrop_box(c.box, crop);
    c.point = amg::uncrop_point(c.point, crop);
    c.crop = crop;
  }
  return data;
}

// postprocess_small_regions: fill small holes, drop small islands, and NMS again preferring the
// masks that needed no change.
std::vector<Candidate> remove_small_regions(std::vector<Candidate> data, int min_area, double nms_thresh) {
  if (data.empty()) return data;
  const int n = static_cast<int>(data.size());
  std::vector<amg::BoxXYXY> boxes(n);
  std::vector<float> scores(n);
  std::vector<Rle> changed_rle(n);
#pragma omp parallel for schedule(dynamic)
  for (int i = 0; i < n; ++i) {
    const int h = data[i].rle.height, w = data[i].rle.width;
    std::vector<uint8_t> mask = amg::rle_to_mask(data[i].rle);
    const bool holes = amg::remove_small_regions(mask, h, w, min_area, true);
    const bool islands = amg::remove_small_regions(mask, h, w, min_area, false);
    scores[i] = (holes || islands) ? 0.0f : 1.0f;
    boxes[i] = amg::mask_to_box(mask.data(), h, w);
    if (scores[i] == 0.0f) changed_rle[i] = amg::mask_to_rle(mask.data(), h, w);
  }
  const std::vector<int> keep = amg::nms(boxes, scores, nms_thresh);
  for (int i : keep)
    if (scores[i] == 0.0f) {
      data[i].rle = std::move(changed_rle[i]);
      data[i].box = boxes[i];
    }
  return take(data, keep);
}

}  // namespace

std::vector<MaskRecord> MaskGenerator::generate(const Image& image) {
  check(image.width > 0 && image.height > 0 && image.rgb.size() == size_t(image.width) * image.height * 3,
        "mask generator: empty or inconsistent image (" + std::to_string(image.width) + "x" +
            std::to_string(image.height) + ")");
  const MaskGeneratorOptions& o = options_;
  const amg::CropBoxes crops = amg::generate_crop_boxes(image.height, image.width, o.crop_n_layers, o.crop_overlap_ratio);
  std::vector<Candidate> data;
  for (size_t c = 0; c < crops.boxes.size(); ++c)
    for (Candidate& m : process_crop(predictor_, o, image, crops.boxes[c], grids_[crops.layers[c]]))
      data.push_back(std::move(m));

  if (crops.boxes.size() > 1) {
    // Duplicates between crops: the mask from the smaller crop wins (score 1 / crop area).
    std::vector<amg::BoxXYXY> boxes;
    std::vector<float> scores;
    for (const Candidate& m : data) {
      boxes.push_back(m.box);
      scores.push_back(1.0f / static_cast<float>(static_cast<int64_t>(m.crop[2] - m.crop[0]) * (m.crop[3] - m.crop[1])));
    }
    data = take(data, amg::nms(boxes, scores, o.crop_nms_thresh));
  }
  if (o.min_mask_region_area > 0)
    data = remove_small_regions(std::move(data), o.min_mask_region_area, std::max(o.box_nms_thresh, o.crop_nms_thresh));

  std::vector<MaskRecord> records(data.size());
  for (size_t i = 0; i < data.size(); ++i) {
    Candidate& m = data[i];
    MaskRecord& r = records[i];
    r.area = amg::area_from_rle(m.rle);
    r.bbox = amg::box_xyxy_to_xywh(m.box);
    r.predicted_iou = m.iou;
    r.stability_score = m.stability;
    r.point = m.point;
    r.crop_box = amg::box_xyxy_to_xywh(m.crop);
    if (o.output_mode == MaskOutputMode::BinaryMask) {
      const std::vector<uint8_t> mask = amg::rle_to_mask(m.rle);
      r.mask = Tensor::empty({m.rle.height, m.rle.width}, DType::U8);
      std::copy(mask.begin(), mask.end(), r.mask.data_as<uint8_t>());
    } else if (o.output_mode == MaskOutputMode::CocoRle) {
      r.coco_rle = amg::rle_to_coco_string(m.rle);
    }
    r.rle = std::move(m.rle);
  }
  return records;
}

}  // namespace segany
