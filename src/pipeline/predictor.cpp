#include "segany/predictor.h"

#include <cstring>

#include "pipeline/postprocess.h"
#include "pipeline/predictor_impl.h"

namespace segany {

Predictor::Predictor(const std::string& checkpoint, const PredictorOptions& options) : impl_(std::make_unique<Impl>()) {
  impl_->backend = make_backend(options.device, options.threads, options.dtype);
  impl_->sam = Sam::load(checkpoint, options.config, *impl_->backend);
  impl_->decoder = std::make_unique<Decoder>(*impl_->sam);
}

Predictor::~Predictor() = default;
Predictor::Predictor(Predictor&&) noexcept = default;
Predictor& Predictor::operator=(Predictor&&) noexcept = default;

void Predictor::set_image(const Image& image) {
  Impl& im = *impl_;
  Backend& be = *im.backend;
  const int S = im.sam->config().image_encoder.img_size;
  check(image.width > 0 && image.height > 0 && image.rgb.size() == size_t(image.width) * image.height * 3,
        "set_image: empty or inconsistent image (" + std::to_string(image.width) + "x" +
            std::to_string(image.height) + ")");
  const ImageFrame frame = image_frame(image.height, image.width, S);
  // Resize, normalise and pad on the backend (on the GPU for CUDA; the CPU runs preprocess()'s
  // own arithmetic), straight into the encoder's input buffer.
  const Shape shape{image.height, image.width, 3};
  Tensor pixels;
  if (be.device() == Device::CPU) {
    pixels = Tensor::wrap(const_cast<uint8_t*>(image.rgb.data()), shape, DType::U8, nullptr);
  } else {
    if (!im.pixels_read) im.pixels_read = be.make_fence();
    im.pixels_read->wait();  // the previous image's upload has left the buffer
    if (!im.pixels.defined() || im.pixels.numel() < shape_numel(shape))
      im.pixels = be.alloc_host({shape_numel(shape)}, DType::U8);
    std::memcpy(im.pixels.data(), image.rgb.data(), image.rgb.size());
    pixels = im.pixels.view_prefix(shape);
  }
  im.embedding = encode_images(*im.sam, {pixels}, im.pixels_read.get()).front();
  im.frame = frame;
  im.has_image = true;
}

bool Predictor::has_image() const { return impl_->has_image; }

Masks Predictor::predict(const Prompt& prompt) { return std::move(predict_batch({prompt}).front()); }

Masks Predictor::predict(const std::vector<Point>& points, const std::optional<Box>& box, const Tensor& mask_input,
                         bool multimask) {
  Prompt p;
  p.points = points;
  p.box = box;
  p.mask_input = mask_input;
  p.multimask = multimask;
  return predict(p);
}

std::vector<Masks> Predictor::predict_batch(const std::vector<Prompt>& prompts, const MaskOutputs& outputs) {
  return impl_->predict_batch(prompts, outputs);
}

Tensor Predictor::upscale_logits(const Tensor& low_res) const {
  const Impl& im = *impl_;
  check(im.has_image, "upscale_logits: no image set");
  return segany::upscale_logits(low_res, im.sam->config().image_encoder.img_size, im.frame.input_h, im.frame.input_w,
                                im.frame.original_h, im.frame.original_w);
}

std::vector<Masks> Predictor::Impl::predict_batch(const std::vector<Prompt>& prompts, const MaskOutputs& outputs) {
  std::vector<PreparedPrompt> prepared;
  for (size_t i = 0; i < prompts.size(); ++i) {
    check(has_image, "predict: no image set (call set_image first)");
    prepared.push_back(prepare_prompt(prompts[i], frame, sam->config(), "prompt " + std::to_string(i) + ": "));
  }
  std::vector<Masks> results(prompts.size());
  const Decoder::Job job{&embedding, frame, prepared, results};
  decoder->decode({&job, 1}, outputs);
  return results;
}

Tensor Predictor::image_embedding() const {
  check(impl_->has_image, "image_embedding: no image set");
  return embedding_to_host(*impl_->sam, impl_->embedding);
}

std::string Predictor::describe() const { return impl_->sam->config().describe(); }
std::string Predictor::arch() const { return impl_->sam->config().arch; }
int64_t Predictor::parameter_count() const { return impl_->sam->parameter_count(); }

}  // namespace segany
