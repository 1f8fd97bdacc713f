// The BatchPredictor in three steps: validate every image and prompt (nothing runs on a bad
// batch), put each image's embedding on the device (the encoder for pixels, an upload for an
// embedding), then decode every image's prompts with the Decoder Predictor uses, one wait at the end.
#include "segany/batch_predictor.h"

#include <cstring>

#include "backend/backend.h"
#include "model/sam.h"
#include "pipeline/decoder.h"

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
};

BatchPredictor::BatchPredictor(const std::string& checkpoint, const PredictorOptions& options)
    : impl_(std::make_unique<Impl>()) {
  impl_->backend = make_backend(options.device, options.threads);
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
    const Image& image = *in.image;
    const Shape shape{image.height, image.width, 3};
    if (be.device() == Device::CPU) {
      pixels.push_back(Tensor::wrap(const_cast<uint8_t*>(image.rgb.data()), shape, DType::U8, nullptr));
    } else {
      Tensor& buf = im.pixels[i];
      if (!buf.defined() || buf.numel() < shape_numel(shape)) buf = be.alloc_host({shape_numel(shape)}, DType::U8);
      std::memcpy(buf.data(), image.rgb.data(), image.rgb.size());
      pixels.push_back(buf.view_prefix(shape));
    }
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

}  // namespace segany
