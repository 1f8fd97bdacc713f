// segany embed: image embeddings for many images, in batches, one safetensors file per image.
// The pipeline (decoding on worker threads, preprocessing on the device, one wait per batch) is
// the library's Embedder; this file parses options, names files and reports.
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "commands.h"
#include "io/checkpoint.h"
#include "segany/embedder.h"
#include "segany/error.h"

namespace segany::cli {
namespace {

struct EmbedOptions {
  ModelArgs model;
  std::string out = "out";
  std::vector<std::string> images;
  int batch = 1, workers = 0;
};

Tensor pair_i32(int a, int b) {
  Tensor t = Tensor::empty({2}, DType::I32);
  t.data_as<int32_t>()[0] = a;
  t.data_as<int32_t>()[1] = b;
  return t;
}

void run_embed(const EmbedOptions& o) {
  namespace fs = std::filesystem;
  // Each image's file is named by its stem: two images of one stem would overwrite each other.
  std::map<std::string, std::string> stems;
  for (const std::string& path : o.images) {
    const std::string stem = fs::path(path).stem().string();
    check(!stem.empty(), "embed: cannot name an output file for '" + path + "'");
    const auto [it, fresh] = stems.emplace(stem, path);
    check(fresh, "embed: '" + it->second + "' and '" + path + "' would both write " +
                     (fs::path(o.out) / (stem + ".safetensors")).string());
  }
  EmbedderOptions eo;
  eo.device = o.model.device;
  eo.dtype = o.model.dtype;
  eo.config = o.model.config;
  eo.threads = o.model.threads;
  eo.batch = o.batch;
  eo.workers = o.workers;
  Embedder embedder(o.model.checkpoint, eo);
  fs::create_directories(o.out);

  const auto start = std::chrono::steady_clock::now();
  size_t written = 0;
  const size_t failed = embedder.embed_files(
      o.images,
      [&](Embedding& e) {
        if (!e.ok()) {
          std::cout.flush();
          std::cerr << "segany: skipping " << e.name << ": " << e.error << "\n";
          return;
        }
        const fs::path file = fs::path(o.out) / (fs::path(e.name).stem().string() + ".safetensors");
        io::save_safetensors(file.string(),
                             {{"image_embedding", e.embedding},
                              {"original_size", pair_i32(e.original_h, e.original_w)},
                              {"input_size", pair_i32(e.input_h, e.input_w)}},
                             {{"format", "pt"}, {"image", e.name}, {"checkpoint", o.model.checkpoint}});
        ++written;
      },
      [&](const EmbedBatchStats& b) {
        std::printf("batch %d: %d image%s in %.1f ms, %.2f img/s\n", b.index + 1, b.images,
                    b.images == 1 ? "" : "s", b.ms, b.images_per_s());
        std::fflush(stdout);
      });
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("embedded %zu of %zu images with %s on %s in %.2f s (%.2f img/s) into %s\n", written, o.images.size(),
              embedder.arch().c_str(), o.model.device.c_str(), s, s > 0 ? written / s : 0.0, o.out.c_str());
  check(failed == 0, std::to_string(failed) + " of " + std::to_string(o.images.size()) +
                         " images could not be embedded (named above)");
}

}  // namespace

Command add_embed(CLI::App& parent) {
  auto o = std::make_shared<EmbedOptions>();
  CLI::App* app = parent.add_subcommand(
      "embed",
      "Image embeddings for many images, in batches: DIR/<image stem>.safetensors with image_embedding float32 "
      "[1, C, 64, 64], original_size and input_size int32 [2] (h, w). An image that cannot be read is reported and "
      "skipped; the exit code is then 2.");
  add_model_args(app, o->model);
  app->add_option("images", o->images, "JPEG or PNG images")->required();
  app->add_option("--batch", o->batch, "images per encoder call")->check(CLI::PositiveNumber)->capture_default_str();
  app->add_option("--out", o->out, "output folder (created if missing)")->capture_default_str();
  app->add_option("--workers", o->workers, "image decoding threads; 0: min(4, cores)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  return {app, [o] { run_embed(*o); }};
}

}  // namespace segany::cli
