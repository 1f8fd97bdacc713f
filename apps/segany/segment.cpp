// segany segment: one image, one prompt -> mask PNGs, an overlay for people and result.json for
// programs; optionally the raw tensors (--dump) for comparison with the original implementation.
// With --prompts FILE.json: many images, any number of prompt sets each, through the
// BatchPredictor -> results.json with COCO RLE masks (and mask PNGs with --png).
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
#include <optional>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "io/checkpoint.h"
#include "overlay.h"
#include "pipeline/amg_utils.h"
#include "pipeline/postprocess.h"
#include "segany/batch_predictor.h"
#include "segany/error.h"
#include "segany/image.h"
#include "segany/predictor.h"

namespace segany::cli {
namespace {

struct SegmentOptions {
  ModelArgs model;
  std::string image, mask_input, out = "out", dump;
  std::vector<std::string> points;
  std::string box;
  bool multimask = false;
  std::string prompts;  // --prompts FILE.json: the batch mode
  bool png = false;
  int batch = 8, workers = 0;  // with --prompts: images per encoder call, decoding threads
};

bool is_floating(DType t) { return t == DType::F32 || t == DType::F16 || t == DType::BF16 || t == DType::F64; }

// The `mask_input` tensor of a safetensors (or .pth) file as float32 [1, S, S]. The Predictor checks
// S against the model; this checks what can be checked before the model is loaded. Errors start
// with `what` and the path.
Tensor load_mask_input(const std::string& path, const std::string& what = "--mask-input ") {
  const io::TensorMap file = io::load_checkpoint(path);
  if (!file.contains("mask_input")) {
    std::string names;
    for (size_t i = 0; i < file.items().size() && i < 5; ++i) names += (i ? ", " : "") + file.items()[i].first;
    if (file.size() > 5) names += ", ...";
    throw Error(what + path + ": no tensor named 'mask_input' (the file holds " +
                (names.empty() ? std::string("no tensors") : names) + ")");
  }
  const Tensor& t = file.at("mask_input");
  check(is_floating(t.dtype()) && t.ndim() == 3 && t.dim(0) == 1 && t.dim(1) == t.dim(2),
        what + path + ": 'mask_input' must be floating-point [1, 256, 256] low-res logits, found " +
            dtype_name(t.dtype()) + " " + shape_str(t.shape()));
  return t.to_f32();  // a copy: it outlives the file's mapping
}

double ms_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
}

void write_text(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary);
  f << text;
  f.close();
  check(f.good(), "cannot write " + path);
}

void run_segment(const SegmentOptions& o) {
  check(!o.image.empty(), "segment: give an image (IMAGE) or a prompts file (--prompts FILE.json)");
  // Everything that can be wrong with the arguments is found before the (slow) image encoder runs.
  Prompt prompt;
  for (const std::string& p : o.points) prompt.points.push_back(parse_point(p));
  if (!o.box.empty()) prompt.box = parse_box(o.box);
  if (!o.mask_input.empty()) prompt.mask_input = load_mask_input(o.mask_input);
  prompt.multimask = o.multimask;
  check(!prompt.points.empty() || prompt.box || prompt.mask_input.defined(),
        "segment: give at least one --point, a --box or a --mask-input");
  const Image image = load_image(o.image);

  Predictor predictor(o.model.checkpoint, o.model.predictor_options());

  auto start = std::chrono::steady_clock::now();
  predictor.set_image(image);
  const double encoder_ms = ms_since(start);
  start = std::chrono::steady_clock::now();
  const Masks masks = predictor.predict(prompt);
  const double decoder_ms = ms_since(start);

  std::filesystem::create_directories(o.out);
  const std::filesystem::path dir(o.out);
  const int M = masks.count(), W = image.width, H = image.height;
  nlohmann::ordered_json result;
  result["image"] = o.image;
  result["width"] = W;
  result["height"] = H;
  result["checkpoint"] = o.model.checkpoint;
  result["arch"] = predictor.arch();
  nlohmann::ordered_json& pj = result["prompt"];
  pj["points"] = nlohmann::json::array();
  for (const Point& p : prompt.points) pj["points"].push_back({p.x, p.y, p.label});
  if (prompt.box) pj["box"] = {prompt.box->x0, prompt.box->y0, prompt.box->x1, prompt.box->y1};
  if (!o.mask_input.empty()) pj["mask_input"] = o.mask_input;
  pj["multimask"] = o.multimask;
  result["masks"] = nlohmann::json::array();

  std::printf("%s: %dx%d, model %s (%s parameters) on %s: encoder %.0f ms, prompt %.1f ms\n", o.image.c_str(), W,
              H, predictor.arch().c_str(), group_thousands(predictor.parameter_count()).c_str(), o.model.device.c_str(),
              encoder_ms, decoder_ms);
  std::vector<uint8_t> gray(static_cast<size_t>(W) * H);
  for (int m = 0; m < M; ++m) {
    const uint8_t* mask = masks.masks.data_as<const uint8_t>() + static_cast<size_t>(m) * W * H;
    for (size_t i = 0; i < gray.size(); ++i) gray[i] = mask[i] ? 255 : 0;
    const std::string file = "mask_" + std::to_string(m) + ".png";
    save_png((dir / file).string(), gray.data(), W, H, 1);
    const MaskStats st = mask_stats(mask, H, W);
    const float score = masks.scores.data_as<const float>()[m];
    result["masks"].push_back(nlohmann::ordered_json{{"file", file},
                                                     {"score", rounded(score)},
                                                     {"area", st.area},
                                                     {"bbox", st.bbox_xywh}});
    std::printf("  %s  score %.4f  area %lld  bbox [%d, %d, %d, %d]\n", (dir / file).string().c_str(), score,
                static_cast<long long>(st.area), st.bbox_xywh[0], st.bbox_xywh[1], st.bbox_xywh[2], st.bbox_xywh[3]);
  }
  save_png((dir / "overlay.png").string(), render_overlay(image, masks.masks, prompt));
  write_text((dir / "result.json").string(), format_result(result));
  std::printf("  %s\n  %s\n", (dir / "overlay.png").string().c_str(), (dir / "result.json").string().c_str());

  if (!o.dump.empty()) {
    // mask_input: the best mask's logits, so that a dump can be fed back with --mask-input as the
    // original's examples feed logits[argmax(scores)][None].
    int best = 0;
    for (int m = 1; m < M; ++m)
      if (masks.scores.data_as<const float>()[m] > masks.scores.data_as<const float>()[best]) best = m;
    const Tensor low = masks.low_res_logits;  // [M, 256, 256]
    const Tensor best_logits = low.slice0(best, best + 1);
    const std::filesystem::path dump_dir = std::filesystem::path(o.dump).parent_path();
    if (!dump_dir.empty()) std::filesystem::create_directories(dump_dir);
    io::save_safetensors(o.dump,
                         {{"image_embedding", predictor.image_embedding()},
                          {"low_res_logits", low},
                          {"iou_predictions", masks.scores},
                          {"mask_input", best_logits}},
                         {{"format", "pt"}, {"image", o.image}, {"checkpoint", o.model.checkpoint}});
    std::printf("  %s\n", o.dump.c_str());
  }
}

// ---------------------------------------------------------------------------------------------
// --prompts FILE.json: many images, many prompt sets each.

namespace fs = std::filesystem;
using nlohmann::ordered_json;

// One image of the prompts file: its path as written there, where it is, and its prompt sets.
struct PromptsEntry {
  std::string file;
  fs::path path;
  std::vector<Prompt> prompts;
};

float json_number(const nlohmann::json& v, const std::string& where) {
  check(v.is_number(), where + "expected a number, found " + v.dump());
  return v.get<float>();
}

// One prompt set: {"points": [[x, y, label], ...], "box": [x0, y0, x1, y1], "mask_input": "file",
// "multimask": false}, every key optional. Range and finiteness are the BatchPredictor's to check.
Prompt parse_prompt(const nlohmann::json& j, const fs::path& folder, const std::string& where) {
  check(j.is_object(), where + "expected an object with points, box, mask_input or multimask, found " + j.dump());
  Prompt p;
  for (const auto& [key, v] : j.items()) {
    if (key == "points") {
      check(v.is_array(), where + "points: expected [[x, y, label], ...], found " + v.dump());
      for (size_t i = 0; i < v.size(); ++i) {
        const std::string at = where + "points[" + std::to_string(i) + "]: ";
        check(v[i].is_array() && (v[i].size() == 2 || v[i].size() == 3),
              at + "expected [x, y] or [x, y, label], found " + v[i].dump());
        Point pt{json_number(v[i][0], at), json_number(v[i][1], at), 1};
        if (v[i].size() == 3) {
          check(v[i][2].is_number_integer(),
                at + "label must be 1 (foreground) or 0 (background), found " + v[i][2].dump());
          pt.label = v[i][2].get<int>();
        }
        p.points.push_back(pt);
      }
    } else if (key == "box") {
      check(v.is_array() && v.size() == 4, where + "box: expected [x0, y0, x1, y1], found " + v.dump());
      p.box = Box{json_number(v[0], where + "box: "), json_number(v[1], where + "box: "),
                  json_number(v[2], where + "box: "), json_number(v[3], where + "box: ")};
    } else if (key == "mask_input") {
      check(v.is_string(), where + "mask_input: expected a safetensors file name, found " + v.dump());
      const fs::path path = folder / v.get<std::string>();
      try {
        p.mask_input = load_mask_input(path.string(), "");
      } catch (const std::exception& e) {
        throw Error(where + "mask_input: " + e.what());
      }
    } else if (key == "multimask") {
      check(v.is_boolean(), where + "multimask: expected true or false, found " + v.dump());
      p.multimask = v.get<bool>();
    } else {
      throw Error(where + "unknown key '" + key + "' (expected points, box, mask_input, multimask)");
    }
  }
  return p;
}

// The whole prompts file, checked before the model loads. Image paths are relative to its folder.
std::vector<PromptsEntry> read_prompts_file(const std::string& file) {
  std::ifstream f(file, std::ios::binary);
  check(f.good(), "--prompts " + file + ": cannot read the file");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(f);
  } catch (const nlohmann::json::exception& e) {
    throw Error("--prompts " + file + ": not valid JSON: " + e.what());
  }
  const std::string where = "--prompts " + file + ": ";
  check(j.is_object() && j.contains("images") && j["images"].is_array(),
        where + "expected {\"images\": [{\"file\": ..., \"prompts\": [...]}, ...]}");
  const fs::path folder = fs::path(file).parent_path();
  std::vector<PromptsEntry> entries;
  for (size_t i = 0; i < j["images"].size(); ++i) {
    const nlohmann::json& im = j["images"][i];
    std::string at = where + "image " + std::to_string(i) + ": ";
    check(im.is_object() && im.contains("file") && im["file"].is_string(),
          at + "expected {\"file\": \"image.jpg\", \"prompts\": [...]}, found " + im.dump());
    PromptsEntry e;
    e.file = im["file"].get<std::string>();
    e.path = folder / e.file;
    at = where + "image " + std::to_string(i) + " (" + e.file + ")";
    for (const auto& [key, v] : im.items())
      check(key == "file" || key == "prompts", at + ": unknown key '" + key + "' (expected file, prompts)");
    if (im.contains("prompts")) {
      check(im["prompts"].is_array(), at + ": prompts must be a list of prompt sets");
      for (size_t k = 0; k < im["prompts"].size(); ++k)
        e.prompts.push_back(parse_prompt(im["prompts"][k], folder, at + ", prompt " + std::to_string(k) + ": "));
    }
    entries.push_back(std::move(e));
  }
  return entries;
}

// Mask j's record: score, area, bbox (XYWH, w = x1 - x0 + 1) and the segmentation as a COCO
// compressed RLE, from what the predictor computed (run lengths, area and box).
ordered_json mask_json(const Masks& m, int j) {
  const int32_t* b = m.boxes.data_as<const int32_t>() + 4 * j;
  const int64_t area = m.areas.data_as<const int64_t>()[j];
  const std::array<int, 4> bbox =
      area > 0 ? std::array<int, 4>{b[0], b[1], b[2] - b[0] + 1, b[3] - b[1] + 1} : std::array<int, 4>{0, 0, 0, 0};
  const Rle& rle = m.rle[j];
  return ordered_json{{"score", rounded(m.scores.data_as<const float>()[j])},
                      {"area", area},
                      {"bbox", bbox},
                      {"segmentation",
                       ordered_json{{"size", {rle.height, rle.width}}, {"counts", amg::rle_to_coco_string(rle)}}}};
}

// results.json: one line per prompt set, so that a file of many images stays readable.
std::string format_results(const std::vector<ordered_json>& images) {
  std::string text = "{\n  \"images\": [";
  for (size_t i = 0; i < images.size(); ++i) {
    const ordered_json& im = images[i];
    text += i ? ",\n    {" : "\n    {";
    for (const char* key : {"file", "width", "height"})
      text += nlohmann::json(key).dump() + ": " + im[key].dump() + ", ";
    text += "\"results\": [";
    const ordered_json& results = im["results"];
    for (size_t k = 0; k < results.size(); ++k) text += (k ? ",\n      " : "\n      ") + results[k].dump();
    text += results.empty() ? "]}" : "\n    ]}";
  }
  return text + (images.empty() ? "]\n}\n" : "\n  ]\n}\n");
}

void run_segment_prompts(const SegmentOptions& o) {
  const std::vector<PromptsEntry> entries = read_prompts_file(o.prompts);
  const fs::path dir(o.out);
  if (o.png) {  // PNGs are named by the image's stem: two images of one stem would overwrite each other
    std::map<std::string, std::string> stems;
    for (const PromptsEntry& e : entries) {
      const auto [it, fresh] = stems.emplace(e.path.stem().string(), e.file);
      check(fresh, "--prompts " + o.prompts + ": '" + it->second + "' and '" + e.file + "' would both write " +
                       (dir / (e.path.stem().string() + "_0_0.png")).string());
    }
  }
  BatchPredictor predictor(o.model.checkpoint, o.model.predictor_options());
  fs::create_directories(dir);

  std::vector<FileInput> inputs;
  for (size_t i = 0; i < entries.size(); ++i)
    inputs.push_back(FileInput{entries[i].path.string(), entries[i].prompts,
                               "image " + std::to_string(i) + " (" + entries[i].file + ")"});
  // Results by input position (a failed image is reported before the batch ahead of it is done).
  std::vector<std::optional<ordered_json>> done(entries.size());
  size_t sets = 0, masks = 0, images = 0;
  const auto start = std::chrono::steady_clock::now();
  auto first_batch = start;
  size_t after_first = 0;  // images handed out after the first batch (graph capture, GEMM tuning)
  auto on_result = [&](FileResult& res) {
    if (!res.ok()) {
      std::cout.flush();
      std::fprintf(stderr, "segany: skipping %s: %s\n", res.name.c_str(), res.error.c_str());
      return;
    }
    const PromptsEntry& e = entries[res.index];
    const int W = res.width, H = res.height;
    ordered_json im{{"file", e.file}, {"width", W}, {"height", H}, {"results", ordered_json::array()}};
    size_t image_masks = 0;
    for (size_t k = 0; k < res.masks.size(); ++k) {
      const Masks& m = res.masks[k];
      ordered_json r{{"prompt", k}, {"masks", ordered_json::array()}};
      for (int mi = 0; mi < m.count(); ++mi) {
        r["masks"].push_back(mask_json(m, mi));
        if (o.png) {
          const uint8_t* mask = m.masks.data_as<const uint8_t>() + static_cast<size_t>(mi) * W * H;
          std::vector<uint8_t> gray(static_cast<size_t>(W) * H);
          for (size_t p = 0; p < gray.size(); ++p) gray[p] = mask[p] ? 255 : 0;
          const std::string png = e.path.stem().string() + "_" + std::to_string(k) + "_" + std::to_string(mi) + ".png";
          save_png((dir / png).string(), gray.data(), W, H, 1);
        }
      }
      image_masks += m.count();
      im["results"].push_back(std::move(r));
    }
    std::printf("%s: %dx%d, %zu prompt set%s, %zu masks\n", e.file.c_str(), W, H, res.masks.size(),
                res.masks.size() == 1 ? "" : "s", image_masks);
    sets += res.masks.size();
    masks += image_masks;
    ++images;
    done[res.index] = std::move(im);
  };
  int batches = 0;
  const size_t failed = predictor.predict_files(
      inputs, on_result, MaskOutputs{.masks = o.png, .rle = true, .low_res_logits = false},
      StreamOptions{.batch = o.batch, .workers = o.workers}, [&](const EmbedBatchStats& b) {
        if (batches++ == 0)
          first_batch = std::chrono::steady_clock::now();
        else
          after_first += b.images;
      });
  const double total_s = ms_since(start) / 1000, steady_s = ms_since(first_batch) / 1000;
  std::vector<ordered_json> written;
  for (std::optional<ordered_json>& im : done)
    if (im) written.push_back(std::move(*im));
  write_text((dir / "results.json").string(), format_results(written));
  std::printf("%zu of %zu images, %zu prompt sets, %zu masks with %s on %s in %.2f s", images, entries.size(), sets,
              masks, predictor.arch().c_str(), o.model.device.c_str(), total_s);
  if (after_first > 0 && steady_s > 0)
    std::printf(" (after the first batch: %.2f img/s)", static_cast<double>(after_first) / steady_s);
  std::printf(" -> %s\n", (dir / "results.json").string().c_str());
  check(failed == 0, std::to_string(failed) + " of " + std::to_string(entries.size()) +
                         " images could not be segmented (named above)");
}

}  // namespace

Command add_segment(CLI::App& parent) {
  auto o = std::make_shared<SegmentOptions>();
  CLI::App* app = parent.add_subcommand(
      "segment",
      "Masks for one image and one prompt (points, a box, a low-res mask). Writes DIR/mask_<i>.png (0/255), "
      "DIR/overlay.png and DIR/result.json (score, area and bbox of each mask). With --prompts: many images, "
      "any number of prompts each, into DIR/results.json.");
  add_model_args(app, o->model);
  CLI::Option* image = app->add_option("image", o->image, "JPEG or PNG image (or --prompts)")->check(CLI::ExistingFile);
  CLI::Option* point =
      app->add_option("--point", o->points,
                      "X,Y[,LABEL]: a point in pixels of the image; LABEL 1 foreground (default), 0 background. "
                      "Repeat for several points")
          ->type_name("X,Y[,LABEL]")
          ->allow_extra_args(false);  // one value per --point, so that it never swallows the positionals
  CLI::Option* box =
      app->add_option("--box", o->box, "X0,Y0,X1,Y1: a box in pixels of the image")->type_name("X0,Y0,X1,Y1");
  CLI::Option* mask_input =
      app->add_option("--mask-input", o->mask_input,
                      "safetensors file with a float32 'mask_input' [1, 256, 256]: low-res logits of an earlier "
                      "prediction (a --dump file holds one)")
          ->check(CLI::ExistingFile);
  CLI::Option* multimask =
      app->add_flag("--multimask", o->multimask, "three masks for an ambiguous prompt instead of one");
  app->add_option("--out", o->out, "output folder (created if missing)")->capture_default_str();
  CLI::Option* dump =
      app->add_option("--dump", o->dump,
                      "also write the raw tensors to this safetensors file: image_embedding [1, C, 64, 64], "
                      "low_res_logits [M, 256, 256], iou_predictions [M], mask_input [1, 256, 256] (the best mask's "
                      "logits)");
  CLI::Option* prompts =
      app->add_option(
             "--prompts", o->prompts,
             "instead of IMAGE and one prompt: a JSON file {\"images\": [{\"file\": \"a.jpg\", \"prompts\": "
             "[{\"points\": [[x, y, label], ...], \"box\": [x0, y0, x1, y1], \"mask_input\": \"m.safetensors\", "
             "\"multimask\": false}, ...]}, ...]} (paths relative to the file's folder). Writes DIR/results.json "
             "(score, area, bbox and COCO RLE of every mask)")
          ->check(CLI::ExistingFile);
  for (CLI::Option* single : {image, point, box, mask_input, multimask, dump}) prompts->excludes(single);
  app->add_flag("--png", o->png, "with --prompts: also write DIR/<image stem>_<prompt>_<mask>.png (0/255)")
      ->needs(prompts);
  app->add_option("--batch", o->batch, "with --prompts: images per encoder call")
      ->check(CLI::PositiveNumber)
      ->needs(prompts)
      ->capture_default_str();
  app->add_option("--workers", o->workers, "with --prompts: image decoding threads; 0: min(4, cores)")
      ->check(CLI::NonNegativeNumber)
      ->needs(prompts)
      ->capture_default_str();
  return {app, [o] { o->prompts.empty() ? run_segment(*o) : run_segment_prompts(*o); }};
}

}  // namespace segany::cli
