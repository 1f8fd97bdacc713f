#include "segany/predictor.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <tuple>

#include "backend/backend.h"
#include "model/sam.h"
#include "pipeline/postprocess.h"
#include "pipeline/preprocess.h"

namespace segany {

struct Predictor::Impl {
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Sam> sam;
  bool has_image = false;
  int original_h = 0, original_w = 0, input_h = 0, input_w = 0;
  Tensor embedding;  // [1, grid*grid, C] on the device
  // The image's pixels in memory the device copies from asynchronously (pinned on CUDA), and the
  // fence after which that copy is done and the buffer may be refilled.
  Tensor pixels;
  std::unique_ptr<Backend::Fence> pixels_read;

  // A prompt in the model's frame, validated.
  struct Prepared {
    PromptSet set;
    const Tensor* mask_input = nullptr;
    bool multimask = false;
  };
  Prepared prepare(const Prompt& p, size_t index) const;
  // Decodes prompts that share a sparse length and mask-input presence in one batch.
  // masks_at_image_size false: stop at the low-res logits (Masks::masks stays undefined).
  void decode(const std::vector<const Prepared*>& group, std::vector<Masks*>& out, bool masks_at_image_size);
  std::vector<Masks> predict_batch(const std::vector<Prompt>& prompts, bool masks_at_image_size);
};

namespace {

std::string where(size_t index) { return "prompt " + std::to_string(index) + ": "; }

bool finite(float v) { return std::isfinite(v); }

// A coordinate as a user typed it: "5000", "12.5", "nan".
std::string num(float v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", static_cast<double>(v));
  return buf;
}

}  // namespace

Predictor::Impl::Prepared Predictor::Impl::prepare(const Prompt& p, size_t index) const {
  check(has_image, "predict: no image set (call set_image first)");
  check(!p.points.empty() || p.box || p.mask_input.defined(),
        where(index) + "needs at least one point, a box or a mask input");
  const int S = sam->config().image_encoder.img_size;
  Prepared out;
  out.multimask = p.multimask;
  // ResizeLongestSide.apply_coords: scale each axis by new/old size (in double, as numpy does).
  const double sx = static_cast<double>(input_w) / original_w, sy = static_cast<double>(input_h) / original_h;
  auto inside = [&](float x, float y, const std::string& what) {
    check(finite(x) && finite(y), where(index) + what + " (" + num(x) + ", " + num(y) + ") is not a finite number");
    check(x >= 0 && y >= 0 && x <= original_w && y <= original_h,
          where(index) + what + " (" + num(x) + ", " + num(y) + ") lies outside the " + std::to_string(original_w) +
              "x" + std::to_string(original_h) + " image");
  };
  for (const Point& pt : p.points) {
    inside(pt.x, pt.y, "point");
    check(pt.label == 0 || pt.label == 1,
          where(index) + "point label " + std::to_string(pt.label) + " must be 1 (foreground) or 0 (background)");
    out.set.points.push_back(static_cast<float>(pt.x * sx));
    out.set.points.push_back(static_cast<float>(pt.y * sy));
    out.set.labels.push_back(pt.label);
  }
  if (p.box) {
    const Box& b = *p.box;
    inside(b.x0, b.y0, "box corner");
    inside(b.x1, b.y1, "box corner");
    check(b.x0 <= b.x1 && b.y0 <= b.y1, where(index) + "box must have x0 <= x1 and y0 <= y1");
    out.set.has_box = true;
    out.set.box[0] = static_cast<float>(b.x0 * sx);
    out.set.box[1] = static_cast<float>(b.y0 * sy);
    out.set.box[2] = static_cast<float>(b.x1 * sx);
    out.set.box[3] = static_cast<float>(b.y1 * sy);
  }
  if (p.mask_input.defined()) {
    const int64_t side = 4 * sam->config().image_encoder.grid();
    check(p.mask_input.dtype() == DType::F32 && p.mask_input.numel() == side * side &&
              (p.mask_input.ndim() == 2 || (p.mask_input.ndim() == 3 && p.mask_input.dim(0) == 1)),
          where(index) + "mask input must be float32 [1, " + std::to_string(side) + ", " + std::to_string(side) +
              "], found " + dtype_name(p.mask_input.dtype()) + " " + shape_str(p.mask_input.shape()));
    const float* m = p.mask_input.data_as<const float>();
    for (int64_t i = 0; i < p.mask_input.numel(); ++i)
      check(finite(m[i]), where(index) + "mask input holds a value that is not finite");
    out.mask_input = &p.mask_input;
  }
  (void)S;
  return out;
}

void Predictor::Impl::decode(const std::vector<const Prepared*>& group, std::vector<Masks*>& out,
                             bool masks_at_image_size) {
  Backend& be = *backend;
  const SamConfig& cfg = sam->config();
  const int64_t P = static_cast<int64_t>(group.size()), G = cfg.image_encoder.grid(), C = cfg.mask_decoder.transformer_dim;
  std::vector<const PromptSet*> sets;
  for (const Prepared* p : group) sets.push_back(&p->set);
  Tensor sparse = be.alloc({P, sets[0]->sparse_tokens(), C});
  be.copy_from_host(sam->prompt_encoder().embed_sparse(sets), sparse);
  Tensor dense;
  if (group[0]->mask_input) {
    Tensor masks_host = Tensor::empty({P, 4 * G, 4 * G});
    for (int64_t i = 0; i < P; ++i)
      std::copy_n(group[i]->mask_input->data_as<const float>(), 16 * G * G, masks_host.data_as<float>() + i * 16 * G * G);
    Tensor masks = be.alloc(masks_host.shape());
    be.copy_from_host(masks_host, masks);
    dense = be.alloc({P, G, G, C});
    sam->prompt_encoder().embed_masks(masks, dense);
  } else {
    dense = sam->prompt_encoder().no_mask_embed();
  }
  MaskDecoder::Output dec = sam->mask_decoder().forward(embedding, sam->prompt_encoder().image_pe(), sparse, dense);
  const Tensor low = be.download(dec.low_res_logits);  // [P, T, 4G, 4G]
  const Tensor iou = be.download(dec.iou);             // [P, 1, T]
  const int64_t T = sam->mask_decoder().num_mask_tokens(), side = 4 * G;
  for (int64_t i = 0; i < P; ++i) {
    // Multimask output skips token 0 (the single-mask token), as the original does.
    const int64_t first = group[i]->multimask ? 1 : 0, count = group[i]->multimask ? T - 1 : 1;
    Masks& m = *out[i];
    m.low_res_logits = Tensor::empty({count, side, side});
    m.scores = Tensor::empty({count});
    for (int64_t k = 0; k < count; ++k) {
      std::copy_n(low.data_as<const float>() + ((i * T) + first + k) * side * side, side * side,
                  m.low_res_logits.data_as<float>() + k * side * side);
      m.scores.data_as<float>()[k] = iou.data_as<const float>()[i * T + first + k];
    }
    if (masks_at_image_size)
      m.masks = postprocess_masks(m.low_res_logits, cfg.image_encoder.img_size, input_h, input_w, original_h, original_w);
  }
}

Predictor::Predictor(const std::string& checkpoint, const PredictorOptions& options) : impl_(std::make_unique<Impl>()) {
  if (options.device == "cpu")
    impl_->backend = make_cpu_backend(options.threads);
  else if (options.device == "cuda")
    impl_->backend = make_cuda_backend(0);
  else
    throw Error("unknown device '" + options.device + "' (expected cpu or cuda)");
  impl_->sam = Sam::load(checkpoint, options.config, *impl_->backend);
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
  int input_h = 0, input_w = 0;
  resized_shape(image.height, image.width, S, input_h, input_w);
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
  be.preprocess_images({pixels}, im.sam->image_encoder().input(1));
  if (im.pixels_read) be.record(*im.pixels_read);
  const Tensor& emb = im.sam->image_encoder().forward(1);  // [1, G, G, C], reused by the next forward
  const int64_t G = emb.dim(1), C = emb.dim(3);
  im.embedding = be.alloc({1, G * G, C}, emb.dtype());
  be.copy_tokens(emb.view({1, G * G, C}), 0, im.embedding, 0, static_cast<int>(G * G));
  im.original_h = image.height;
  im.original_w = image.width;
  im.input_h = input_h;
  im.input_w = input_w;
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

std::vector<Masks> Predictor::predict_batch(const std::vector<Prompt>& prompts) {
  return impl_->predict_batch(prompts, true);
}

std::vector<Masks> Predictor::predict_batch_low_res(const std::vector<Prompt>& prompts) {
  return impl_->predict_batch(prompts, false);
}

Tensor Predictor::upscale_logits(const Tensor& low_res) const {
  const Impl& im = *impl_;
  check(im.has_image, "upscale_logits: no image set");
  return segany::upscale_logits(low_res, im.sam->config().image_encoder.img_size, im.input_h, im.input_w,
                                im.original_h, im.original_w);
}

std::vector<Masks> Predictor::Impl::predict_batch(const std::vector<Prompt>& prompts, bool masks_at_image_size) {
  std::vector<Impl::Prepared> prepared;
  for (size_t i = 0; i < prompts.size(); ++i) prepared.push_back(prepare(prompts[i], i));
  // Prompts decode together when they have the same number of sparse tokens and all or none
  // carry a mask input; the image embedding is shared, never copied per prompt.
  std::map<std::pair<int, bool>, std::vector<size_t>> groups;
  for (size_t i = 0; i < prepared.size(); ++i)
    groups[{prepared[i].set.sparse_tokens(), prepared[i].mask_input != nullptr}].push_back(i);
  std::vector<Masks> results(prompts.size());
  for (const auto& [key, members] : groups) {
    std::vector<const Impl::Prepared*> group;
    std::vector<Masks*> out;
    for (size_t i : members) {
      group.push_back(&prepared[i]);
      out.push_back(&results[i]);
    }
    decode(group, out, masks_at_image_size);
  }
  return results;
}

Tensor Predictor::image_embedding() const {
  check(impl_->has_image, "image_embedding: no image set");
  const Tensor e = impl_->backend->download(impl_->embedding);  // [1, G*G, C]
  const int64_t G = impl_->sam->config().image_encoder.grid(), C = e.dim(2);
  Tensor out = Tensor::empty({1, C, G, G});
  for (int64_t t = 0; t < G * G; ++t)
    for (int64_t c = 0; c < C; ++c) out.data_as<float>()[c * G * G + t] = e.data_as<const float>()[t * C + c];
  return out;
}

std::string Predictor::describe() const { return impl_->sam->config().describe(); }
std::string Predictor::arch() const { return impl_->sam->config().arch; }
int64_t Predictor::parameter_count() const { return impl_->sam->parameter_count(); }

}  // namespace segany
