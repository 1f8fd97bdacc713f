// What Predictor (one image) and BatchPredictor (many images) share: image embeddings in the layout
// the mask decoder reads, prompts validated and moved into the model's frame, and the Decoder,
// which turns prompts into masks against embeddings already on the device.
//
// The Decoder groups each image's prompts into sets that decode in one batch (the same number of
// sparse tokens, all or none with a mask input, all single- or all multi-mask), queues every
// group of every image, each followed by its postprocessing and the copy of its outputs to the
// host, and only then waits, once for all of them. The image embedding
// [1, G*G, C] is shared by every prompt of its image: MaskDecoder::forward broadcasts it. Groups
// of one prompt from different images that share a shape decode together (up to 16 a run), each
// with its image's embedding copied into the run's buffer once.
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
  // the backend counts them (rle without masks); masks with more take a second download, after
  // which the Decoder brings back as many at once (up to kMostRunsPerMask).
  static constexpr int64_t kMostRunsPerMask = int64_t{1} << 20;
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
  void decode(std::span<const Job> jobs, const MaskOutputs& outputs) {
    enqueue(jobs, outputs);
    finish();
  }
  // decode() in two halves, so that the host can prepare the next call while the device runs this
  // one: enqueue() queues the work and returns, finish() waits for it and fills the Masks. The
  // jobs (their embeddings, prompts and Masks) must live until finish(); one call pending at a
  // time. Buffers the device reads or writes are this Decoder's: two Decoders may have a call
  // pending each.
  void enqueue(std::span<const Job> jobs, const MaskOutputs& outputs);
  void finish();
  // Run lengths per mask that the next call brings back with its first download.
  int64_t runs_per_mask() const { return runs_per_mask_; }

 private:
  // One group: prompts of one image decoded in one batch.
  struct Group {
    const Job* job = nullptr;
    std::vector<size_t> members;  // indices into job->prompts
    int64_t Ns = 0;
    bool mask_inputs = false, multimask = false;
    int64_t first = 0, count = 0, words = 0;
    // Offsets (4-byte elements) into the host buffers.
    int64_t coords = 0, labels = 0, masks = 0;                             // inputs
    int64_t low = 0, iou = 0, bits = 0, stats = 0, offsets = 0, runs = 0;  // outputs
    // Offsets into the device buffers of bits, run offsets and runs: each group has its own.
    int64_t bits_dev = 0, offsets_dev = 0, runs_dev = 0;
    int64_t row = 0;  // its first prompt's row in the decoder run it is part of
  };
  // Groups of one prompt from different images decoded in one run, at most.
  static constexpr size_t kMostImagesPerRun = 16;
  // Queues a group's postprocessing and downloads, from its rows of the run's outputs.
  void enqueue_outputs(const Group& g, const MaskDecoder::Batch& b, const MaskOutputs& outputs);

  Sam& sam_;
  int64_t runs_per_mask_;
  // The pending call: its groups (empty: none) and what it asked for.
  std::vector<Group> groups_;
  MaskOutputs outputs_;
  // Host buffers the device reads from and writes to (pinned on CUDA), grown as needed and reused.
  Tensor inputs_host_, outputs_host_;
  // Device buffers for each group's postprocessed outputs, reused group after group.
  Tensor low_dev_, iou_dev_, bits_dev_, stats_dev_, offsets_dev_, runs_dev_, runs_host_;
  std::unique_ptr<Backend::Fence> done_;
};

}  // namespace segany
