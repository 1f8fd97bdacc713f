// segany segment: one image, one prompt -> mask PNGs, an overlay for people and result.json for
// programs; optionally the raw tensors (--dump) for comparison with the original implementation.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "io/checkpoint.h"
#include "overlay.h"
#include "pipeline/postprocess.h"
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
};

bool is_floating(DType t) { return t == DType::F32 || t == DType::F16 || t == DType::BF16 || t == DType::F64; }

// The `mask_input` tensor of a safetensors (or .pth) file as float32 [1, S, S]. The Predictor checks
// S against the model; this checks what can be checked before the model is loaded.
Tensor load_mask_input(const std::string& path) {
  const io::TensorMap file = io::load_checkpoint(path);
  if (!file.contains("mask_input")) {
    std::string names;
    for (size_t i = 0; i < file.items().size() && i < 5; ++i) names += (i ? ", " : "") + file.items()[i].first;
    if (file.size() > 5) names += ", ...";
    throw Error("--mask-input " + path + ": no tensor named 'mask_input' (the file holds " +
                (names.empty() ? std::string("no tensors") : names) + ")");
  }
  const Tensor& t = file.at("mask_input");
  check(is_floating(t.dtype()) && t.ndim() == 3 && t.dim(0) == 1 && t.dim(1) == t.dim(2),
        "--mask-input " + path + ": 'mask_input' must be floating-point [1, 256, 256] low-res logits, found " +
            dtype_name(t.dtype()) + " " + shape_str(t.shape()));
  return t.to_f32();  // a copy: it outlives the file's mapping
}

double ms_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
}

// Scores are float32 predictions; six decimals keep result.json readable and lose nothing real.
double rounded(float v) { return std::round(static_cast<double>(v) * 1e6) / 1e6; }

// result.json for people and programs alike: one line per key and one per mask, rather than
// nlohmann's one line per number.
std::string format_result(const nlohmann::ordered_json& result) {
  std::string text = "{\n";
  size_t i = 0;
  for (const auto& [key, value] : result.items()) {
    text += "  " + nlohmann::json(key).dump() + ": ";
    if (value.is_array() && !value.empty() && value.front().is_object()) {
      text += "[\n";
      for (size_t k = 0; k < value.size(); ++k) text += "    " + value[k].dump() + (k + 1 < value.size() ? ",\n" : "\n");
      text += "  ]";
    } else {
      text += value.dump();
    }
    text += ++i < result.size() ? ",\n" : "\n";
  }
  return text + "}\n";
}

void write_text(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary);
  f << text;
  f.close();
  check(f.good(), "cannot write " + path);
}

void run_segment(const SegmentOptions& o) {
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

}  // namespace

Command add_segment(CLI::App& parent) {
  auto o = std::make_shared<SegmentOptions>();
  CLI::App* app = parent.add_subcommand(
      "segment",
      "Masks for one image and one prompt (points, a box, a low-res mask). Writes DIR/mask_<i>.png (0/255), "
      "DIR/overlay.png and DIR/result.json (score, area and bbox of each mask).");
  add_model_args(app, o->model);
  app->add_option("image", o->image, "JPEG or PNG image")->required()->check(CLI::ExistingFile);
  app->add_option("--point", o->points,
                  "X,Y[,LABEL]: a point in pixels of the image; LABEL 1 foreground (default), 0 background. "
                  "Repeat for several points")
      ->type_name("X,Y[,LABEL]")
      ->allow_extra_args(false);  // one value per --point, so that it never swallows the positionals
  app->add_option("--box", o->box, "X0,Y0,X1,Y1: a box in pixels of the image")->type_name("X0,Y0,X1,Y1");
  app->add_option("--mask-input", o->mask_input,
                  "safetensors file with a float32 'mask_input' [1, 256, 256]: low-res logits of an earlier "
                  "prediction (a --dump file holds one)")
      ->check(CLI::ExistingFile);
  app->add_flag("--multimask", o->multimask, "three masks for an ambiguous prompt instead of one");
  app->add_option("--out", o->out, "output folder (created if missing)")->capture_default_str();
  app->add_option("--dump", o->dump,
                  "also write the raw tensors to this safetensors file: image_embedding [1, C, 64, 64], "
                  "low_res_logits [M, 256, 256], iou_predictions [M], mask_input [1, 256, 256] (the best mask's "
                  "logits)");
  return {app, [o] { run_segment(*o); }};
}

}  // namespace segany::cli
