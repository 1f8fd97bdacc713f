// The BatchPredictor's predict() in three steps: validate every image and prompt (nothing runs on
// a bad batch), put each image's embedding on the device (the encoder for pixels, an upload for an
// embedding), then decode every image's prompts with the Decoder Predictor uses, one wait at the end.
//
// predict_files() streams, as the Embedder does, three stages deep:
//   workers:  decode image i (a bounded window ahead of the caller)
//   caller:   batch k: check its prompts, copy its pixels into pinned memory, enqueue preprocess,
//             encoder and the Decoder's work for every image of the batch; then wait for batch k-1
//             and hand its masks out
//   device:   runs batch k while the caller hands out batch k-1 and gathers batch k+1
// Two slots (pinned pixels, a Decoder with its buffers, the batch's results) alternate; a slot is
// refilled only after its previous batch was handed out. The Decoder reads each image's embedding
// straight from the encoder's output: the next forward, which overwrites it, is queued after.
#include "segany/batch_predictor.h"

#include "backend/backend.h"
#include "model/sam.h"
#include "pipeline/decoder.h"
#include "pipeline/streaming.h"

namespace segany {

BatchInput BatchInput::of_image(const Image& image, std::vector<Prompt> prompts) {
  BatchInput in;
  in.image = &image;
  in.prompts = std::move(prompts);
  return in;
}

BatchInput BatchInput::of_embedding(Tensor embedding, int original_h, int original_w, std::vector<Prompt> prompts) {
  BatchInput in;
  in.embedding = std::move(embedding);
  in.original_h = original_h;
  in.original_w = original_w;
  in.prompts = std::move(prompts);
  return in;
}

BatchInput BatchInput::of_embedding(const Embedding& e, std::vector<Prompt> prompts) {
  BatchInput in = of_embedding(e.embedding, e.original_h, e.original_w, std::move(prompts));
  in.input_h = e.input_h;
  in.input_w = e.input_w;
  in.name = e.name;
  return in;
}

struct BatchPredictor::Impl {
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Sam> sam;
  std::unique_ptr<Decoder> decoder;
  // Pinned copies of the images' pixels (CUDA), one per image of a batch, grown as needed, and
  // the fence after which the device has read them all.
  std::vector<Tensor> pixels;
  std::unique_ptr<Backend::Fence> pixels_read;

  // predict_files: one batch in flight.
  struct Slot {
    std::vector<Tensor> pixels;  // pinned u8 buffers, one per encoded image, grown as needed
    std::unique_ptr<Decoder> decoder;
    std::vector<FileResult> items;                       // the batch's images, in input order
    std::vector<std::shared_ptr<const Image>> images;    // their pixels (the CPU backend reads them)
    std::vector<ImageFrame> frames;
    std::vector<std::vector<PreparedPrompt>> prepared;   // each item's prompts in the model's frame
    std::vector<Tensor> embeddings;                      // views of the encoder's output
    std::vector<Decoder::Job> jobs;
  };
  Slot slots[2];
};

BatchPredictor::BatchPredictor(const std::string& checkpoint, const PredictorOptions& options)
    : impl_(std::make_unique<Impl>()) {
  impl_->backend = make_backend(options.device, options.threads, options.dtype);
  impl_->sam = Sam::load(checkpoint, options.config, *impl_->backend);
  impl_->decoder = std::make_unique<Decoder>(*impl_->sam);
  impl_->pixels_read = impl_->backend->make_fence();
}

BatchPredictor::~BatchPredictor() = default;
BatchPredictor::BatchPredictor(BatchPredictor&&) noexcept = default;
BatchPredictor& BatchPredictor::operator=(BatchPredictor&&) noexcept = default;

std::string BatchPredictor::arch() const { return impl_->sam->config().arch; }

std::vector<std::vector<Masks>> BatchPredictor::predict(const std::vector<BatchInput>& batch, const MaskOutputs& outputs) {
  Impl& im = *impl_;
  Backend& be = *im.backend;
  Sam& sam = *im.sam;
  const int S = sam.config().image_encoder.img_size;
  const size_t n = batch.size();

  // 1. Validate. Every image's prompts, in the model's frame, packed one image after another:
  // image i's are prepared[offsets[i] .. offsets[i + 1]).
  std::vector<ImageFrame> frames(n);
  std::vector<PreparedPrompt> prepared;
  std::vector<size_t> offsets{0};
  for (size_t i = 0; i < n; ++i) {
    const BatchInput& in = batch[i];
    const std::string name = in.name.empty() ? "image " + std::to_string(i) : in.name;
    check((in.image != nullptr) != in.embedding.defined(), name + ": give an image or an embedding (one of them)");
    if (in.image) {
      const Image& image = *in.image;
      check(image.width > 0 && image.height > 0 && image.rgb.size() == size_t(image.width) * image.height * 3,
            name + ": empty or inconsistent image (" + std::to_string(image.width) + "x" +
                std::to_string(image.height) + ")");
      frames[i] = image_frame(image.height, image.width, S);
    } else {
      check_embedding(sam, in.embedding, name + ": ");
      check(in.original_h > 0 && in.original_w > 0,
            name + ": an embedding needs the image's size (original_h, original_w)");
      frames[i] = image_frame(in.original_h, in.original_w, S);
      const bool input_given = in.input_h != 0 || in.input_w != 0;
      check(!input_given || (in.input_h == frames[i].input_h && in.input_w == frames[i].input_w),
            name + ": input size " + std::to_string(in.input_h) + "x" + std::to_string(in.input_w) +
                " (h x w) is not " + std::to_string(frames[i].input_h) + "x" + std::to_string(frames[i].input_w) +
                ", the size a " + std::to_string(in.original_h) + "x" + std::to_string(in.original_w) +
                " image is resized to");
    }
    for (size_t k = 0; k < in.prompts.size(); ++k)
      prepared.push_back(
          prepare_prompt(in.prompts[k], frames[i], sam.config(), name + ", prompt " + std::to_string(k) + ": "));
    offsets.push_back(prepared.size());
  }

  // 2. Embeddings on the device: images with prompts through the encoder in batches of up to 8
  // (queued, no wait: each image has its own pinned pixel buffer), precomputed ones uploaded.
  im.pixels_read->wait();  // a previous call that threw may have left uploads in flight
  if (im.pixels.size() < n) im.pixels.resize(n);
  std::vector<Tensor> embeddings(n), pixels;
  std::vector<size_t> encoded;
  for (size_t i = 0; i < n; ++i) {
    const BatchInput& in = batch[i];
    if (offsets[i] == offsets[i + 1]) continue;  // no prompts: nothing to encode
    if (!in.image) {
      embeddings[i] = embedding_to_device(sam, in.embedding, "");
      continue;
    }
    const std::shared_ptr<const Image> borrowed(std::shared_ptr<const Image>(), in.image);  // owns nothing
    pixels.push_back(host_pixels(be, borrowed, im.pixels[i]));
    encoded.push_back(i);
  }
  std::vector<Tensor> made = encode_images(sam, pixels, im.pixels_read.get());
  for (size_t j = 0; j < encoded.size(); ++j) embeddings[encoded[j]] = std::move(made[j]);

  // 3. Decode every image's prompts against its embedding; one wait for the whole batch.
  std::vector<Masks> flat(prepared.size());
  std::vector<Decoder::Job> jobs;
  for (size_t i = 0; i < n; ++i) {
    const size_t count = offsets[i + 1] - offsets[i];
    if (count == 0) continue;
    jobs.push_back(Decoder::Job{&embeddings[i], frames[i],
                                std::span<const PreparedPrompt>(prepared).subspan(offsets[i], count),
                                std::span<Masks>(flat).subspan(offsets[i], count)});
  }
  im.decoder->decode(jobs, outputs);

  std::vector<std::vector<Masks>> results(n);
  for (size_t i = 0; i < n; ++i)
    for (size_t j = offsets[i]; j < offsets[i + 1]; ++j) results[i].push_back(std::move(flat[j]));
  return results;
}

size_t BatchPredictor::predict_files(const std::vector<FileInput>& inputs,
                                     const std::function<void(FileResult&)>& on_result, const MaskOutputs& outputs,
                                     const StreamOptions& stream,
                                     const std::function<void(const EmbedBatchStats&)>& on_batch) {
  check(stream.batch > 0, "predict_files: batch must be positive, found " + std::to_string(stream.batch));
  check(stream.workers >= 0, "predict_files: workers must be 0 (automatic) or more");
  Impl& im = *impl_;
  Backend& be = *im.backend;
  Sam& sam = *im.sam;
  ImageEncoder& encoder = sam.image_encoder();
  const int S = sam.config().image_encoder.img_size;
  const int64_t B = stream.batch;
  const bool host_device = be.device() == Device::CPU;  // the backend reads host memory as it is
  for (Impl::Slot& s : im.slots) {
    if (s.decoder) s.decoder->finish();  // a previous run that threw may have left a call pending
    else s.decoder = std::make_unique<Decoder>(sam);
    s.items.clear();
  }
  const size_t n = inputs.size();
  const int workers = decode_workers(stream.workers, n);
  Prefetcher prefetch(
      n, workers, static_cast<size_t>(2 * B + workers),
      [&](size_t i) { return std::make_shared<const Image>(load_image(inputs[i].path)); }, S);

  BatchClock clock;
  size_t failed = 0, next = 0;
  Impl::Slot* pending = nullptr;  // enqueued, not yet handed out
  auto fail = [&](FileResult& r, const std::string& why) {
    r.error = why;
    r.masks.clear();
    ++failed;
    on_result(r);
  };
  auto finish_pending = [&] {
    Impl::Slot& s = *pending;
    pending = nullptr;
    s.decoder->finish();
    const int count = static_cast<int>(s.items.size());
    for (FileResult& r : s.items) on_result(r);
    s.items.clear();
    const EmbedBatchStats st = clock.lap(count);
    if (on_batch) on_batch(st);
  };
  for (int cur = 0;; cur ^= 1) {
    Impl::Slot& s = im.slots[cur];  // free: its last batch was handed out before `pending` was enqueued
    s.images.clear();
    s.frames.clear();
    s.prepared.clear();
    int64_t encoded = 0;
    while (encoded < B && next < n) {
      const size_t i = next++;
      const FileInput& in = inputs[i];
      FileResult r;
      r.index = i;
      r.name = in.name.empty() ? in.path : in.name;
      Loaded l = prefetch.take(i);
      if (!l.error.empty()) {
        fail(r, l.error);
        continue;
      }
      r.width = l.image->width;
      r.height = l.image->height;
      const ImageFrame frame = image_frame(r.height, r.width, S);  // the prefetcher checked that it resizes
      std::vector<PreparedPrompt> prepared;
      try {
        for (size_t k = 0; k < in.prompts.size(); ++k)
          prepared.push_back(prepare_prompt(in.prompts[k], frame, sam.config(), "prompt " + std::to_string(k) + ": "));
      } catch (const Error& e) {
        fail(r, e.what());
        continue;
      }
      r.masks.resize(prepared.size());
      if (!prepared.empty()) ++encoded;
      s.items.push_back(std::move(r));
      s.images.push_back(prepared.empty() ? nullptr : std::move(l.image));
      s.frames.push_back(frame);
      s.prepared.push_back(std::move(prepared));
    }
    if (s.items.empty()) break;

    // Pixels to the device and through the encoder, for the images with prompts.
    std::vector<Tensor> pixels;
    std::vector<size_t> which;  // item of each encoded image
    if (s.pixels.size() < static_cast<size_t>(B)) s.pixels.resize(B);
    for (size_t j = 0; j < s.items.size(); ++j) {
      if (!s.images[j]) continue;
      pixels.push_back(host_pixels(be, s.images[j], s.pixels[pixels.size()]));
      which.push_back(j);
    }
    s.embeddings.assign(s.items.size(), Tensor());
    if (!pixels.empty()) {
      const int64_t b = static_cast<int64_t>(pixels.size());
      be.preprocess_images(pixels, encoder.input(b));
      const Tensor& emb = encoder.forward(b);  // [b, G, G, C], overwritten by the next forward only
      const int64_t G = emb.dim(1), C = emb.dim(3);
      for (size_t e = 0; e < which.size(); ++e)
        s.embeddings[which[e]] = emb.slice0(static_cast<int64_t>(e), static_cast<int64_t>(e) + 1).view({1, G * G, C});
    }
    s.jobs.clear();
    for (size_t j = 0; j < s.items.size(); ++j)
      if (!s.prepared[j].empty())
        s.jobs.push_back(Decoder::Job{&s.embeddings[j], s.frames[j], s.prepared[j], s.items[j].masks});
    s.decoder->enqueue(s.jobs, outputs);
    if (pending) finish_pending();  // the device runs this batch meanwhile
    pending = &s;
    if (host_device) finish_pending();  // the batch ran in the calls above: nothing to overlap
  }
  if (pending) finish_pending();
  return failed;
}

}  // namespace segany
