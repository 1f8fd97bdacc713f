// BatchPredictor: many images, any number of prompt sets each, in one call. Each image comes as
// pixels (encoded first) or as an embedding computed earlier (Predictor::image_embedding, the
// Embedder, `segany embed`). Every prompt set gives the same Masks as Predictor::predict would.
//
//   segany::BatchPredictor predictor("sam_vit_h_4b8939.pth", {.device = "cuda"});
//   std::vector<segany::BatchInput> batch;
//   batch.push_back(segany::BatchInput::of_image(image, {prompt_a, prompt_b}));
//   batch.push_back(segany::BatchInput::of_embedding(embedding, {prompt_c}));
//   auto masks = predictor.predict(batch);  // masks[image][prompt set]
//
// Inside, each image's embedding stays on the device and is shared by all of its prompts; the
// prompts of an image decode together in groups of equal shape, and the results come back to
// the host with one wait for the whole batch.
#pragma once

#include <cstddef>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "segany/embedder.h"
#include "segany/image.h"
#include "segany/predictor.h"
#include "segany/tensor.h"

namespace segany {

// One image of a batch and its prompt sets (any number, none included: an image without prompts
// is not encoded and gets no results).
struct BatchInput {
  // The image: pixels to encode (borrowed: they must outlive predict()) ...
  const Image* image = nullptr;
  // ... or its embedding, float32 [1, C, 64, 64] on the host, with the image's size and its size
  // once resized (input_h/input_w 0: computed from the original size, as the encoder resizes).
  Tensor embedding;
  int original_h = 0, original_w = 0, input_h = 0, input_w = 0;
  std::vector<Prompt> prompts;
  // How errors name this image; empty: "image <index in the batch>".
  std::string name;

  static BatchInput of_image(const Image& image, std::vector<Prompt> prompts = {});
  static BatchInput of_embedding(Tensor embedding, int original_h, int original_w, std::vector<Prompt> prompts = {});
  static BatchInput of_embedding(const Embedding& e, std::vector<Prompt> prompts = {});
};

// One image file and its prompt sets, for BatchPredictor::predict_files.
struct FileInput {
  std::string path;
  std::vector<Prompt> prompts;
  std::string name;  // how results and errors name it; empty: the path
};

// One image's results from predict_files.
struct FileResult {
  size_t index = 0;            // position in the input list
  std::string name;            // FileInput::name, or its path
  int width = 0, height = 0;   // the image's size (0 if it could not be read)
  std::vector<Masks> masks;    // masks[k] for prompts[k]
  std::string error;           // why it failed (no masks), or empty
  bool ok() const { return error.empty(); }
};

// How predict_files streams: images per encoder call, and decoding threads.
struct StreamOptions {
  int batch = 8;
  int workers = 0;  // 0: min(4, hardware threads)
};

class BatchPredictor {
 public:
  explicit BatchPredictor(const std::string& checkpoint, const PredictorOptions& options = {});
  ~BatchPredictor();
  BatchPredictor(BatchPredictor&&) noexcept;
  BatchPredictor& operator=(BatchPredictor&&) noexcept;

  // Masks for every prompt set of every image: result[i][k] for batch[i].prompts[k], as
  // Predictor::predict gives them. Everything is validated before the model runs; errors name
  // the image and the prompt ("image 2, prompt 5: point (900, 10) lies outside the 800x534 image").
  std::vector<std::vector<Masks>> predict(const std::vector<BatchInput>& batch, const MaskOutputs& outputs = {});

  // Many image files, streamed: decoded on worker threads, copied into pinned memory and encoded
  // in batches of `stream.batch`, their prompts decoded right after; the device runs batch k while
  // the calling thread hands out batch k-1 and gathers batch k+1 (one wait per batch). on_result
  // runs on the calling thread once per image: one that fails (unreadable, or a prompt that does
  // not fit it: "prompt 1: point (900, 10) lies outside the 800x534 image") as soon as its turn
  // comes, the others when their batch is done, in input order among them. An image without
  // prompts is not encoded and gets no masks. on_batch, if given, after each batch. Returns the
  // number of images that failed.
  size_t predict_files(const std::vector<FileInput>& inputs, const std::function<void(FileResult&)>& on_result,
                       const MaskOutputs& outputs = {}, const StreamOptions& stream = {},
                       const std::function<void(const EmbedBatchStats&)>& on_batch = nullptr);

  std::string arch() const;  // vit_b, vit_l, vit_h or custom

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace segany
