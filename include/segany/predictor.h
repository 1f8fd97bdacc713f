// Predictor: one image, many prompts. set_image() runs the image encoder once; predict() turns a
// prompt (points, a box, a low-res mask) into masks at the image's size, in about a millisecond
// on a GPU. Coordinates are pixels of the original image.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "segany/image.h"
#include "segany/tensor.h"

namespace segany {

struct Point {
  float x = 0, y = 0;
  int label = 1;  // 1 foreground, 0 background
};

struct Box {
  float x0 = 0, y0 = 0, x1 = 0, y1 = 0;
};

struct Prompt {
  std::vector<Point> points;
  std::optional<Box> box;
  Tensor mask_input;  // optional float32 [1, 256, 256] low-res logits, e.g. a previous prediction
  bool multimask = false;  // three masks for an ambiguous prompt instead of one
};

// Uncompressed run-length encoding as pycocotools writes it: the mask read column by column
// (Fortran order), counts alternating runs of 0 and 1, starting with a run of 0 (possibly empty).
struct Rle {
  int height = 0, width = 0;
  std::vector<uint32_t> counts;
  bool operator==(const Rle&) const = default;
};

// What a prediction returns for each mask besides its score. Masks leave the GPU bit-packed and the
// host expands them into what is asked for here; run lengths alone (rle without masks) are counted
// on the GPU, and only they leave it.
struct MaskOutputs {
  bool masks = true;           // Masks::masks, uint8 [M, H, W]
  bool rle = false;            // Masks::rle, each mask run-length encoded (COCO's order)
  bool low_res_logits = true;  // Masks::low_res_logits [M, 256, 256]
};

struct Masks {
  Tensor masks;           // uint8 [M, H, W], 1 inside the mask
  Tensor scores;          // float32 [M], predicted IoU
  Tensor low_res_logits;  // float32 [M, 256, 256]
  // With masks or rle: each mask's box, int32 [M, 4] x0, y0, x1, y1 (inclusive; zeros when the
  // mask is empty), and its area in pixels, int64 [M].
  Tensor boxes, areas;
  std::vector<Rle> rle;  // with MaskOutputs::rle
  int count() const { return scores.defined() ? static_cast<int>(scores.dim(0)) : 0; }
};

struct PredictorOptions {
  std::string device = "cpu";  // "cpu" or "cuda"
  std::string config;          // config.json for checkpoints whose shapes don't say it all
  int threads = 0;             // CPU threads; 0: all
  // On cuda, the image encoder's linear layers: "bf16", or "fp8" (each block's qkv and lin1 in
  // e4m3; compute capability 8.9 or newer; README, Performance). Only "bf16" on cpu (which is fp32).
  std::string dtype = "bf16";
};

class Predictor {
 public:
  explicit Predictor(const std::string& checkpoint, const PredictorOptions& options = {});
  ~Predictor();
  Predictor(Predictor&&) noexcept;
  Predictor& operator=(Predictor&&) noexcept;

  void set_image(const Image& image);
  bool has_image() const;

  Masks predict(const Prompt& prompt);
  Masks predict(const std::vector<Point>& points, const std::optional<Box>& box = std::nullopt,
                const Tensor& mask_input = Tensor(), bool multimask = false);
  // Several prompt sets against the current image, decoded together where their shapes allow.
  std::vector<Masks> predict_batch(const std::vector<Prompt>& prompts, const MaskOutputs& outputs = {});
  // Low-res logits float32 [M, 256, 256] -> float32 [M, H, W] at the current image's size, upscaled
  // as predict() does before thresholding at 0 (the original's return_logits=True). Thread-safe.
  Tensor upscale_logits(const Tensor& low_res) const;

  // float32 [1, C, 64, 64], as the original's get_image_embedding().
  Tensor image_embedding() const;
  std::string describe() const;  // the architecture
  std::string arch() const;      // vit_b, vit_l, vit_h or custom
  int64_t parameter_count() const;

 private:
  friend class MaskGenerator;  // decodes its grids against the image embedding in place
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace segany
