// What a Predictor holds: for the pipeline code that works on its image beside it (MaskGenerator
// reads the image embedding and decodes on the same backend).
#pragma once

#include <memory>
#include <vector>

#include "backend/backend.h"
#include "model/sam.h"
#include "pipeline/decoder.h"
#include "segany/predictor.h"

namespace segany {

struct Predictor::Impl {
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Sam> sam;
  std::unique_ptr<Decoder> decoder;
  bool has_image = false;
  ImageFrame frame;
  Tensor embedding;  // [1, grid*grid, C] on the device
  // The image's pixels in memory the device copies from asynchronously (pinned on CUDA), and the
  // fence after which that copy is done and the buffer may be refilled.
  Tensor pixels;
  std::unique_ptr<Backend::Fence> pixels_read;

  std::vector<Masks> predict_batch(const std::vector<Prompt>& prompts, const MaskOutputs& outputs);
};

}  // namespace segany
