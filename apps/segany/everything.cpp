// segany everything: the automatic mask generator ("segment everything") on one image or a folder.
// One image: DIR/<stem>.json. A folder: the same file per image (which is also how a run resumes:
// an image whose file exists, made with the same parameters, is skipped) and DIR/annotations.json
// in COCO form, rewritten as the run goes and at its end. An image that cannot be read is
// reported and skipped; the exit code is then 2.
#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "pipeline/amg_utils.h"
#include "segany/error.h"
#include "segany/image.h"
#include "segany/mask_generator.h"
#include "segany/predictor.h"

namespace segany::cli {
namespace {

namespace fs = std::filesystem;
using nlohmann::ordered_json;

struct EverythingOptions {
  ModelArgs model;
  std::string input, out = "out", output_mode = "coco_rle";
  MaskGeneratorOptions gen;
  bool overlay = false;
};

bool is_image_file(const fs::path& p) {
  std::string ext = p.extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return std::tolower(c); });
  return ext == ".jpg" || ext == ".jpeg" || ext == ".png";
}

std::string read_text(const fs::path& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

// Written beside and renamed, so that a file that exists is a whole one (resuming relies on it).
void write_atomically(const fs::path& path, const std::string& text) {
  const fs::path tmp = path.string() + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary);
    f << text;
    f.close();
    check(f.good(), "cannot write " + tmp.string());
  }
  fs::rename(tmp, path);
}

// A record as the original's, with the segmentation in the chosen form; binary masks are PNG files
// (mask_dir/<i>.png, named relative to the output folder).
ordered_json record_json(const MaskRecord& r, size_t index, MaskOutputMode mode, const fs::path& out,
                         const std::string& mask_dir) {
  ordered_json seg;
  if (mode == MaskOutputMode::CocoRle) {
    seg = ordered_json{{"size", {r.rle.height, r.rle.width}}, {"counts", r.coco_rle}};
  } else if (mode == MaskOutputMode::UncompressedRle) {
    seg = ordered_json{{"size", {r.rle.height, r.rle.width}}, {"counts", r.rle.counts}};
  } else {
    const std::string file = mask_dir + "/" + std::to_string(index) + ".png";
    fs::create_directories(out / mask_dir);
    std::vector<uint8_t> gray(r.mask.numel());
    for (size_t i = 0; i < gray.size(); ++i) gray[i] = r.mask.data_as<const uint8_t>()[i] ? 255 : 0;
    save_png((out / file).string(), gray.data(), r.rle.width, r.rle.height, 1);
    seg = file;
  }
  return ordered_json{{"segmentation", seg},
                      {"area", r.area},
                      {"bbox", r.bbox},
                      {"predicted_iou", rounded(r.predicted_iou)},
                      {"point_coords", {{r.point[0], r.point[1]}}},
                      {"stability_score", rounded(r.stability_score)},
                      {"crop_box", r.crop_box}};
}

ordered_json params_json(const EverythingOptions& o) {
  const MaskGeneratorOptions& g = o.gen;
  return ordered_json{{"points_per_side", g.points_per_side},
                      {"points_per_batch", g.points_per_batch},
                      {"pred_iou_thresh", g.pred_iou_thresh},
                      {"stability_score_thresh", g.stability_score_thresh},
                      {"stability_score_offset", g.stability_score_offset},
                      {"box_nms_thresh", g.box_nms_thresh},
                      {"crop_n_layers", g.crop_n_layers},
                      {"crop_nms_thresh", g.crop_nms_thresh},
                      {"crop_overlap_ratio", g.crop_overlap_ratio},
                      {"crop_n_points_downscale_factor", g.crop_n_points_downscale_factor},
                      {"min_mask_region_area", g.min_mask_region_area},
                      {"output_mode", o.output_mode},
                      {"checkpoint", fs::path(o.model.checkpoint).filename().string()}};
}

// The image with every mask tinted in its own colour, largest first so that small ones stay visible.
Image render_masks(const Image& image, const std::vector<MaskRecord>& records) {
  Image out = image;
  std::vector<size_t> order(records.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return records[a].area > records[b].area; });
  for (size_t k = 0; k < order.size(); ++k) {
    // Hues spread by the golden angle: neighbours in the list get distant colours.
    const double hue = std::fmod(k * 137.508, 360.0) / 60.0;
    const double x = 1 - std::fabs(std::fmod(hue, 2.0) - 1);
    const std::array<double, 6 * 3> table = {1, x, 0, x, 1, 0, 0, 1, x, 0, x, 1, x, 0, 1, 1, 0, x};
    const int sector = static_cast<int>(hue) % 6;
    const double rgb[3] = {table[sector * 3] * 230 + 25, table[sector * 3 + 1] * 230 + 25, table[sector * 3 + 2] * 230 + 25};
    const std::vector<uint8_t> mask = amg::rle_to_mask(records[order[k]].rle);
    for (size_t i = 0; i < mask.size(); ++i)
      if (mask[i])
        for (int c = 0; c < 3; ++c)
          out.rgb[i * 3 + c] = static_cast<uint8_t>(std::lround(0.45 * out.rgb[i * 3 + c] + 0.55 * rgb[c]));
  }
  return out;
}

// Masks for one image, written to DIR/<stem>.json (and the overlay); returns the record count.
size_t segment_one(MaskGenerator& generator, const EverythingOptions& o, const fs::path& path, const Image& image) {
  const fs::path out(o.out);
  const std::string stem = path.stem().string();
  const MaskOutputMode mode = generator.options().output_mode;
  const std::vector<MaskRecord> records = generator.generate(image);
  ordered_json result;
  result["image"] = ordered_json{{"file_name", path.filename().string()}, {"height", image.height}, {"width", image.width}};
  result["params"] = params_json(o);
  result["annotations"] = ordered_json::array();
  for (size_t i = 0; i < records.size(); ++i) result["annotations"].push_back(record_json(records[i], i, mode, out, stem));
  if (o.overlay) save_png((out / (stem + "_overlay.png")).string(), render_masks(image, records));
  write_atomically(out / (stem + ".json"), format_result(result));
  return records.size();
}

// Whether DIR/<stem>.json holds this image's result with these parameters.
bool already_done(const fs::path& result, const std::string& file_name, const ordered_json& params) {
  if (!fs::exists(result)) return false;
  try {
    const ordered_json j = ordered_json::parse(read_text(result));
    return j.at("image").at("file_name") == file_name && j.at("params") == params;
  } catch (const std::exception&) {
    return false;
  }
}

// DIR/annotations.json in COCO form from the per-image files of `done` (ids follow the folder's order).
void write_annotations(const fs::path& out, const std::vector<fs::path>& images, const std::vector<bool>& done) {
  ordered_json coco;
  coco["images"] = ordered_json::array();
  coco["annotations"] = ordered_json::array();
  int64_t next_id = 1;
  for (size_t i = 0; i < images.size(); ++i) {
    if (!done[i]) continue;
    const ordered_json j = ordered_json::parse(read_text(out / (images[i].stem().string() + ".json")));
    const int image_id = static_cast<int>(i) + 1;
    ordered_json im{{"id", image_id}};
    for (const auto& [k, v] : j.at("image").items()) im[k] = v;
    coco["images"].push_back(im);
    for (const ordered_json& a : j.at("annotations")) {
      ordered_json ann{{"id", next_id++}, {"image_id", image_id}};
      for (const auto& [k, v] : a.items()) ann[k] = v;
      coco["annotations"].push_back(std::move(ann));
    }
  }
  write_atomically(out / "annotations.json", format_result(coco));
}

void run_everything(EverythingOptions o) {
  o.gen.output_mode = mask_output_mode_from_name(o.output_mode);
  const bool folder = fs::is_directory(o.input);
  std::vector<fs::path> images;
  if (folder) {
    for (const fs::directory_entry& e : fs::directory_iterator(o.input))
      if (e.is_regular_file() && is_image_file(e.path())) images.push_back(e.path());
    std::sort(images.begin(), images.end());
    check(!images.empty(), "everything: no .jpg, .jpeg or .png file in " + o.input);
    std::map<std::string, fs::path> stems;
    for (const fs::path& p : images) {
      const auto [it, fresh] = stems.emplace(p.stem().string(), p);
      check(fresh, "everything: '" + it->second.string() + "' and '" + p.string() + "' would both write " +
                       (fs::path(o.out) / (p.stem().string() + ".json")).string());
    }
  } else {
    images.push_back(o.input);
  }
  Predictor predictor(o.model.checkpoint, o.model.predictor_options());
  MaskGenerator generator(predictor, o.gen);  // checks the parameters before any image is read
  fs::create_directories(o.out);

  if (!folder) {
    const Image image = load_image(o.input);
    const auto start = std::chrono::steady_clock::now();
    const size_t n = segment_one(generator, o, images[0], image);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::printf("%s: %dx%d, %zu masks in %.2f s -> %s\n", o.input.c_str(), image.width, image.height, n, s,
                (fs::path(o.out) / (images[0].stem().string() + ".json")).string().c_str());
    return;
  }

  const ordered_json params = params_json(o);
  std::vector<bool> done(images.size(), false);
  size_t skipped = 0, failed = 0, processed = 0, todo = 0;
  for (size_t i = 0; i < images.size(); ++i) {
    done[i] = already_done(fs::path(o.out) / (images[i].stem().string() + ".json"), images[i].filename().string(), params);
    skipped += done[i];
  }
  todo = images.size() - skipped;
  if (skipped)
    std::fprintf(stderr, "%zu of %zu images already done in %s (same parameters): skipped\n", skipped, images.size(),
                 o.out.c_str());
  const auto start = std::chrono::steady_clock::now();
  auto last_write = start, first_done = start;
  for (size_t i = 0; i < images.size(); ++i) {
    if (done[i]) continue;
    size_t masks = 0;
    try {
      const Image image = load_image(images[i].string());
      masks = segment_one(generator, o, images[i], image);
      done[i] = true;
    } catch (const std::exception& e) {
      std::cout.flush();
      std::fprintf(stderr, "segany: skipping %s: %s\n", images[i].string().c_str(), e.what());
      ++failed;
    }
    ++processed;
    const auto now = std::chrono::steady_clock::now();
    if (processed == 1) first_done = now;
    const double s = std::chrono::duration<double>(now - start).count();
    const double rate = s > 0 ? processed / s : 0.0;
    const double eta = rate > 0 ? (todo - processed) / rate : 0.0;
    std::fprintf(stderr, "[%zu/%zu] %s: %zu masks, %.2f img/s, ETA %.0f s\n", processed, todo,
                 images[i].filename().string().c_str(), masks, rate, eta);
    // annotations.json follows the run, rewritten at most every 30 s (and at the end).
    if (std::chrono::duration<double>(now - last_write).count() >= 30) {
      write_annotations(o.out, images, done);
      last_write = now;
    }
  }
  write_annotations(o.out, images, done);
  const size_t total_done = std::count(done.begin(), done.end(), true);
  std::printf("%zu of %zu images segmented (%zu this run, %zu already done) -> %s\n", total_done, images.size(),
              processed - failed, skipped, (fs::path(o.out) / "annotations.json").string().c_str());
  if (processed > 1) {
    // Per image once the first (which also prepares the device: buffers, graphs) is done; each
    // image's time includes reading and decoding it and writing its JSON.
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - first_done).count();
    std::printf("%.1f ms per image after the first (%zu images)\n", 1e3 * s / (processed - 1), processed - 1);
  }
  check(failed == 0, std::to_string(failed) + " of " + std::to_string(images.size()) +
                         " images could not be segmented (named above)");
}

}  // namespace

Command add_everything(CLI::App& parent) {
  auto o = std::make_shared<EverythingOptions>();
  CLI::App* app = parent.add_subcommand(
      "everything",
      "Segment everything: the automatic mask generator (a grid of point prompts, filtered and de-duplicated) on "
      "an image or a folder of images. Writes DIR/<stem>.json per image and, for a folder, DIR/annotations.json "
      "(COCO); a folder run resumes where it stopped.");
  add_model_args(app, o->model);
  app->add_option("input", o->input, "a JPEG or PNG image, or a folder of them")->required()->check(CLI::ExistingPath);
  MaskGeneratorOptions& g = o->gen;
  app->add_option("--points-per-side", g.points_per_side, "points per side of the prompt grid")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app->add_option("--points-per-batch", g.points_per_batch, "points decoded together")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app->add_option("--pred-iou-thresh", g.pred_iou_thresh, "keep masks whose predicted IoU is above this (0: all)")
      ->capture_default_str();
  app->add_option("--stability-score-thresh", g.stability_score_thresh,
                  "keep masks whose stability score is at least this (0: all)")
      ->capture_default_str();
  app->add_option("--stability-score-offset", g.stability_score_offset,
                  "logit offset of the stability score's two thresholds")
      ->capture_default_str();
  app->add_option("--box-nms-thresh", g.box_nms_thresh, "box IoU above which a duplicate mask is dropped")
      ->capture_default_str();
  app->add_option("--crop-n-layers", g.crop_n_layers, "crop layers (layer i: (2^i)^2 crops); 0: the whole image only")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app->add_option("--crop-nms-thresh", g.crop_nms_thresh, "box IoU for duplicates between crops")->capture_default_str();
  app->add_option("--crop-overlap-ratio", g.crop_overlap_ratio, "overlap of the first layer's crops, of the short side")
      ->capture_default_str();
  app->add_option("--crop-n-points-downscale-factor", g.crop_n_points_downscale_factor,
                  "layer i has points-per-side / factor^i points a side")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app->add_option("--min-mask-region-area", g.min_mask_region_area,
                  "fill holes and remove islands smaller than this many pixels (0: off)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app->add_option("--output-mode", o->output_mode,
                  "segmentation as coco_rle (pycocotools' strings), uncompressed_rle, or binary_mask (PNG files "
                  "DIR/<stem>/<i>.png)")
      ->check(CLI::IsMember({"coco_rle", "uncompressed_rle", "binary_mask"}))
      ->capture_default_str();
  app->add_option("--out", o->out, "output folder (created if missing)")->capture_default_str();
  app->add_flag("--overlay", o->overlay, "also write DIR/<stem>_overlay.png, each mask in its own colour");
  return {app, [o] { run_everything(*o); }};
}

}  // namespace segany::cli
