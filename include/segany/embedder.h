// Embedder: many images in, image embeddings out, in batches. Images are decoded and copied into
// pinned memory on worker threads while the device encodes the previous batch; resizing and
// normalisation run on the device (Backend::preprocess_images); each batch's embeddings come back
// with one wait. An image that cannot be read is reported and skipped; the others go on.
//
//   segany::Embedder embedder("sam_vit_h_4b8939.pth", {.device = "cuda", .batch = 8});
//   embedder.embed_files(paths, [](segany::Embedding& e) { ... e.embedding ... });
#pragma once

#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "segany/image.h"
#include "segany/tensor.h"

namespace segany {

struct EmbedderOptions {
  std::string device = "cpu";  // "cpu" or "cuda"
  std::string config;          // config.json for checkpoints whose shapes don't say it all
  int threads = 0;             // CPU threads for the CPU backend; 0: all
  int batch = 1;               // images per encoder call
  int workers = 0;             // decoding threads; 0: min(4, hardware threads)
  std::string dtype = "bf16";  // on cuda: "bf16" or "fp8", as PredictorOptions::dtype
};

// One image's result.
struct Embedding {
  size_t index = 0;       // position in the input list
  std::string name;       // its path, or "image <index>" for images given in memory
  Tensor embedding;       // float32 [1, C, 64, 64] (NCHW, as the original's get_image_embedding)
  int original_h = 0, original_w = 0;  // the image's size
  int input_h = 0, input_w = 0;        // its size once resized (inside the padded square)
  std::string error;      // why it failed (embedding undefined), or empty
  bool ok() const { return error.empty(); }
};

// After each batch: its number (from 0), its images and the wall time since the previous batch
// finished (the first: since the run began), which is the pipeline's steady-state cost per batch.
struct EmbedBatchStats {
  int index = 0;
  int images = 0;
  double ms = 0;
  double images_per_s() const { return ms > 0 ? images * 1000.0 / ms : 0.0; }
};

class Embedder {
 public:
  explicit Embedder(const std::string& checkpoint, const EmbedderOptions& options = {});
  ~Embedder();
  Embedder(Embedder&&) noexcept;
  Embedder& operator=(Embedder&&) noexcept;

  // Decodes the files on worker threads and encodes them in batches of `batch` successfully
  // decoded images (the last may be smaller). on_result runs on the calling thread once per
  // image: a failed one as soon as its turn comes, the others when their batch is done; in input
  // order among the successful ones. on_batch, if given, after each batch.
  // Returns the number of images that failed.
  size_t embed_files(const std::vector<std::string>& paths, const std::function<void(Embedding&)>& on_result,
                     const std::function<void(const EmbedBatchStats&)>& on_batch = nullptr);
  // Images in memory; results in input order.
  std::vector<Embedding> embed(const std::vector<Image>& images);

  int batch() const;
  std::string arch() const;  // vit_b, vit_l, vit_h or custom
  std::string device() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace segany
