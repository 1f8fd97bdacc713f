// What Predictor (one image) and BatchPredictor (many images) share: image embeddings in the layout
// the mask decoder reads, prompts validated and moved into the model's frame, and the Decoder,
// which turns prompts into masks against embeddings already on the device.
//
// The Decoder groups each image's prompts into sets that decode in one batch (the same number of
// sparse tokens, all or none with a mask input, all single- or all multi-mask), queues every
// group of every image, each followed by its postprocessing and the copy of its outputs to the
// host, and only then waits, once for all of them. The image embedding
// [1, G*G, C] is shared by every prompt of its image: MaskDecoder::forward broadcasts it.
#pragma once

#include <memory>
#include <span>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "model/sam.h"
#include "segany/predictor.h"

namespace segany {

// Where an image sits in the model's input: its size, and its size once resized (longest side
// img_size) inside the padded square.
struct ImageFrame {
  int original_h = 0, original_w = 0, input_h = 0, input_w = 0;
};
// The frame of an image of original_h x original_w pixels (throws if it cannot be resized).
ImageFrame image_frame(int original_h, int original_w, int img_size);

// Images' pixels u8 [h, w, 3] (host memory the backend reads: the image itself on the CPU, pinned
// on CUDA) -> their image embeddings [1, G*G, C] on the device, each in a tensor of its own,
// through the encoder in batches of up to `batch`. Records `pixels_read`, if given, once the
// device no longer needs the pixels.
std::vector<Tensor> encode_images(Sam& sam, const std::vector<Tensor>& pixels, Backend::Fence* pixels_read = nullptr,
                                  int64_t batch = 8);
// Throws unless `nchw` is an image embedding of this model: float32 [1, C, G, G] on the host.
void check_embedding(const Sam& sam, const Tensor& nchw, const std::string& what);
// float32 [1, C, G, G] on the host (Predictor::image_embedding, Embedder) <-> [1, G*G, C] on the device.
Tensor embedding_to_device(Sam& sam, const Tensor& nchw, const std::string& what);
Tensor embedding_to_host(Sam& sam, const Tensor& tokens);

// A prompt in the model's frame, validated. mask_input points into the caller's Prompt.
struct PreparedPrompt {
  PromptSet set;
  const Tensor* mask_input = nullptr;
  bool multimask = false;
};
// Checks `p` against the image and the model; errors start with `where` ("prompt 3: ").
PreparedPrompt prepare_prompt(const Prompt& p, const ImageFrame& frame, const SamConfig& cfg, const std::string& where);

class Decoder {
 public:
  // runs_per_mask: COCO run lengths that come back with a call's one download, per mask, where
  // the backend counts them (rle without masks); masks with more take a second download.
  explicit Decoder(Sam& sam, int64_t runs_per_mask = 4096);

  // One image's prompts: its embedding [1, G*G, C] on the device, and where its Masks go
  // (out.size() == prompts.size()).
  struct Job {
    const Tensor* embedding = nullptr;
    ImageFrame frame;
    std::span<const PreparedPrompt> prompts;
    std::span<Masks> out;
  };
  // Decodes every job's prompts, grouped as above, and postprocesses them on the backend (mask
  // selection, upscaling, threshold, boxes, areas, bit-packing); then one wait for the device, and
  // the host fills each Masks with what `outputs` asks for.
  void decode(std::span<const Job> jobs, const MaskOutputs& outputs);

 private:
  Sam& sam_;
  int64_t runs_per_mask_;
  // Host buffers the device reads from and writes to (pinned on CUDA), grown as needed and reused.
  Tensor inputs_host_, outputs_host_;
  // Device buffers for each group's postprocessed outputs, reused group after group.
  Tensor low_dev_, iou_dev_, bits_dev_, stats_dev_, offsets_dev_, runs_dev_, runs_host_;
  std::unique_ptr<Backend::Fence> done_;
};

}  // namespace segany
