// The automatic mask generator, step for step as the original's SamAutomaticMaskGenerator:
// for each crop (the whole image first), decode a grid of single-point prompts in batches with
// three masks each, filter by predicted IoU, by stability and by closeness to a crop edge, NMS the
// crop's masks by box; then NMS between crops, and optionally clean up small regions.
#include "segany/mask_generator.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <string>

#include "backend/mask_ops.h"
#include "pipeline/amg_utils.h"
#include "pipeline/predictor_impl.h"

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

namespace detail {

// What MaskData holds in the original, for one mask.
struct MaskCandidate {
  Rle rle;              // at the whole image's size
  amg::BoxXYXY box{};   // in the image's frame
  float iou = 0, stability = 0;
  std::array<double, 2> point{};
  amg::BoxXYXY crop{};
};

}  // namespace detail

namespace {

using Candidate = detail::MaskCandidate;
constexpr float kMaskThreshold = 0.0f;  // Sam.mask_threshold
constexpr int kMasksPerPoint = 3;       // multimask output

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
    : predictor_(predictor), options_(options), buffers_(std::make_unique<Buffers>()) {
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

// A buffer of at least `numel` elements, reused while large enough.
Tensor& grown(Tensor& buf, int64_t numel, const std::function<Tensor(int64_t)>& make) {
  if (!buf.defined() || buf.numel() < numel) buf = make(std::max<int64_t>(numel, buf.defined() ? buf.numel() * 3 / 2 : 1));
  return buf;
}

}  // namespace

// Buffers kept from crop to crop (device memory on the predictor's backend, and host memory it
// copies from and to), grown as needed.
struct MaskGenerator::Buffers {
  Tensor coords, labels;                   // host: the grid's prompts
  Tensor low, iou, stats, keep;            // device: every candidate of the crop
  Tensor kept_stats, bits, image_bits;     // device: the kept masks
  Tensor offsets, runs;                    // device: their run lengths
  Tensor keep_host, iou_host, stats_host, offsets_host, runs_host;
  std::unique_ptr<Backend::Fence> done;
};

MaskGenerator::~MaskGenerator() = default;

// _process_crop and its _process_batch calls, on the predictor's backend: the crop's grid decoded
// batch by batch (three masks a point) into buffers that hold every candidate's low-res logits and
// predicted IoU; one postprocessing pass for the stability counts and boxes; the filters and box
// NMS (select_masks); then the kept masks alone are upscaled again into bits, placed in the image
// and run-length encoded. Two waits: for the kept list, and for the run lengths.
std::vector<Candidate> MaskGenerator::process_crop(const Image& image, const amg::BoxXYXY& crop,
                                                                  const amg::PointGrid& grid) {
  const MaskGeneratorOptions& o = options_;
  const int orig_h = image.height, orig_w = image.width;
  const bool whole_image = crop == amg::BoxXYXY{0, 0, orig_w, orig_h};
  predictor_.set_image(whole_image ? image : crop_image(image, crop));
  Predictor::Impl& im = *predictor_.impl_;
  Backend& be = *im.backend;
  Sam& sam = *im.sam;
  Buffers& buf = *buffers_;
  if (!buf.done) buf.done = be.make_fence();
  const SamConfig& cfg = sam.config();
  const int64_t side = 4 * cfg.image_encoder.grid(), plane = side * side;
  const int64_t T = sam.mask_decoder().num_mask_tokens(), n = static_cast<int64_t>(grid.size()), N = n * kMasksPerPoint;
  check(T == kMasksPerPoint + 1, "mask generator: the model has " + std::to_string(T) +
                                     " mask tokens; segment everything needs 4 (one single, three multimask)");
  auto device_f32 = [&be](int64_t k) { return be.alloc({k}, DType::F32); };
  auto device_i32 = [&be](int64_t k) { return be.alloc({k}, DType::I32); };
  auto host_i32 = [&be](int64_t k) { return be.alloc_host({k}, DType::I32); };

  // The grid's prompts, one point each, in the model's frame.
  const double crop_w = crop[2] - crop[0], crop_h = crop[3] - crop[1];
  std::vector<std::array<double, 2>> points(static_cast<size_t>(n));
  int64_t Ns = 0;
  for (int64_t i = 0; i < n; ++i) {
    points[i] = {grid[i][0] * crop_w, grid[i][1] * crop_h};
    Prompt p;
    p.points = {Point{static_cast<float>(points[i][0]), static_cast<float>(points[i][1]), 1}};
    const PreparedPrompt prepared = prepare_prompt(p, im.frame, cfg, "grid point " + std::to_string(i) + ": ");
    if (i == 0) Ns = prepared.set.sparse_tokens();
    grown(buf.coords, n * Ns * 2, [&be](int64_t k) { return be.alloc_host({k}, DType::F32); });
    grown(buf.labels, n * Ns, host_i32);
    PromptEncoder::pack(prepared.set, buf.coords.data_as<float>() + i * Ns * 2, buf.labels.data_as<int32_t>() + i * Ns);
  }
  const Tensor coords = buf.coords.view_prefix({n, Ns, 2}), labels = buf.labels.view_prefix({n, Ns});

  // Decode: every candidate's logits and score, in the original's order (point by point, three
  // masks each), and its stability counts and box at the crop's size.
  const Backend::MaskFrame frame{static_cast<int>(cfg.image_encoder.img_size), im.frame.input_h, im.frame.input_w,
                                 im.frame.original_h, im.frame.original_w};
  const float offset = static_cast<float>(o.stability_score_offset);
  Tensor low = grown(buf.low, N * plane, device_f32).view_prefix({n, kMasksPerPoint, plane});
  Tensor iou = grown(buf.iou, N, device_f32).view_prefix({n, kMasksPerPoint, 1});
  Tensor stats = grown(buf.stats, N * 7, device_i32).view_prefix({N, 7});
  const Tensor low4 = low.view({n, kMasksPerPoint, side, side});
  MaskDecoder& decoder = sam.mask_decoder();
  for (int64_t begin = 0; begin < n; begin += o.points_per_batch) {
    const int64_t P = std::min<int64_t>(o.points_per_batch, n - begin);
    MaskDecoder::Batch& b = decoder.batch(P, Ns, false);
    be.copy_tokens(im.embedding.view(b.embedding.shape()), 0, b.embedding, 0, static_cast<int>(b.embedding.dim(1)));
    be.upload_async(coords.slice0(begin, begin + P), b.coords);
    be.upload_async(labels.slice0(begin, begin + P), b.labels);
    decoder.forward(b);
    Tensor low_part = low.slice0(begin, begin + P), iou_part = iou.slice0(begin, begin + P);
    be.copy_tokens(b.low_res.view({P, T, plane}), 1, low_part, 0, kMasksPerPoint);  // the multimask tokens
    be.copy_tokens(b.iou.view({P, T, 1}), 1, iou_part, 0, kMasksPerPoint);
    Tensor stats_part = stats.slice0(begin * kMasksPerPoint, (begin + P) * kMasksPerPoint);
    be.postprocess_masks(low4.slice0(begin, begin + P), 0, kMasksPerPoint, frame, kMaskThreshold, offset, false,
                         nullptr, stats_part);
  }

  // The filters and the crop's NMS.
  Backend::MaskSelection sel;
  // Thresholds as the original compares them: a Python float against a float32 tensor.
  sel.filter_iou = o.pred_iou_thresh > 0.0;
  sel.filter_stability = o.stability_score_thresh > 0.0;
  sel.iou_thresh = static_cast<float>(o.pred_iou_thresh);
  sel.stability_thresh = static_cast<float>(o.stability_score_thresh);
  std::copy(crop.begin(), crop.end(), sel.crop);
  sel.image_h = orig_h, sel.image_w = orig_w;
  sel.nms_thresh = o.box_nms_thresh;
  Tensor keep = grown(buf.keep, N + 1, device_i32).view_prefix({N + 1});
  be.select_masks(iou.view({N}), stats, sel, keep);
  Tensor keep_host = grown(buf.keep_host, N + 1, host_i32).view_prefix({N + 1});
  Tensor iou_host = grown(buf.iou_host, N, [&be](int64_t k) { return be.alloc_host({k}, DType::F32); }).view_prefix({N});
  Tensor stats_host = grown(buf.stats_host, N * 7, host_i32).view_prefix({N, 7});
  be.download_async(keep, keep_host);
  be.download_async(iou.view({N}), iou_host);
  be.download_async(stats, stats_host);
  be.record(*buf.done);
  buf.done->wait();
  const int K = keep_host.data_as<const int32_t>()[0];
  if (K == 0) return {};

  // The kept masks: bits (column-major, COCO's order) in the crop, placed in the image, run lengths.
  const int64_t crop_words = mask_bit_words(frame.height, frame.width);
  Tensor kept_stats = grown(buf.kept_stats, int64_t(K) * 7, device_i32).view_prefix({K, 7});
  Tensor bits = grown(buf.bits, K * crop_words, device_i32).view_prefix({K, crop_words});
  constexpr int kChunk = 16384;  // masks per postprocess call
  for (int k0 = 0; k0 < K; k0 += kChunk) {
    const int k1 = std::min(K, k0 + kChunk);
    const Tensor kept = keep.slice0(1 + k0, 1 + k1);
    Tensor bits_part = bits.slice0(k0, k1), stats_part = kept_stats.slice0(k0, k1);
    be.postprocess_masks(low4, 0, kMasksPerPoint, frame, kMaskThreshold, offset, true, &bits_part, stats_part, &kept);
  }
  if (!whole_image) {
    const int64_t words = mask_bit_words(orig_h, orig_w);
    Tensor placed = grown(buf.image_bits, K * words, device_i32).view_prefix({K, words});
    be.uncrop_bits(bits, crop.data(), orig_h, orig_w, placed);
    bits = placed;
  }
  const int64_t pixels = int64_t(orig_h) * orig_w;
  Tensor offsets = grown(buf.offsets, K + 1, [&be](int64_t k) { return be.alloc({k}, DType::I64); }).view_prefix({K + 1});
  Tensor offsets_host =
      grown(buf.offsets_host, K + 1, [&be](int64_t k) { return be.alloc_host({k}, DType::I64); }).view_prefix({K + 1});
  grown(buf.runs, int64_t(K) * 64, device_i32);
  be.encode_runs(bits, pixels, offsets, buf.runs);
  be.download_async(offsets, offsets_host);
  be.record(*buf.done);
  buf.done->wait();
  const int64_t total = offsets_host.data_as<const int64_t>()[K];
  if (total > buf.runs.numel()) {
    grown(buf.runs, total, device_i32);
    be.encode_runs(bits, pixels, offsets, buf.runs);
  }
  Tensor runs_host = grown(buf.runs_host, total, host_i32).view_prefix({total});
  be.download_async(buf.runs.view_prefix({total}), runs_host);
  be.record(*buf.done);
  buf.done->wait();

  std::vector<Candidate> data(static_cast<size_t>(K));
  const int32_t* st = stats_host.data_as<const int32_t>();
  const int64_t* off = offsets_host.data_as<const int64_t>();
  const auto* runs = reinterpret_cast<const uint32_t*>(runs_host.data_as<const int32_t>());
  for (int k = 0; k < K; ++k) {
    const int i = keep_host.data_as<const int32_t>()[1 + k];
    Candidate& c = data[k];
    c.iou = iou_host.data_as<const float>()[i];
    c.stability = stability_from_counts(st[int64_t(i) * 7 + 5], st[int64_t(i) * 7 + 6]);
    c.box = amg::uncrop_box({st[int64_t(i) * 7 + 1], st[int64_t(i) * 7 + 2], st[int64_t(i) * 7 + 3],
                             st[int64_t(i) * 7 + 4]},
                            crop);
    c.point = amg::uncrop_point(points[i / kMasksPerPoint], crop);
    c.crop = crop;
    c.rle = Rle{orig_h, orig_w, std::vector<uint32_t>(runs + off[k], runs + off[k + 1])};
  }
  return data;
}

namespace {

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
    for (Candidate& m : process_crop(image, crops.boxes[c], grids_[crops.layers[c]]))
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
