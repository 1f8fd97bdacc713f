// The Embedder's pipeline, three stages deep:
//
//   workers:  decode image i (a window of images ahead of the consumer, so memory stays bounded)
//   caller:   batch k: copy its pixels into pinned memory, enqueue preprocess + encoder + the copy
//             of the embeddings into pinned memory, record the slot's fence; then wait for batch
//             k-1's fence and hand its embeddings out
//   device:   runs batch k while the caller hands out batch k-1 and gathers batch k+1
//
// Two slots (pinned pixels, pinned embeddings, a fence) alternate between batches: a slot is
// refilled only after its previous batch's fence has passed, so no buffer the device may still
// read is overwritten, and the caller waits for the device once per batch.
#include "segany/embedder.h"

#include <algorithm>

#include "backend/backend.h"
#include "backend/image_ops.h"
#include "model/sam.h"
#include "pipeline/streaming.h"

namespace segany {
namespace {

// src [G*G, C] -> dst [C, G*G], in tiles so that neither side is read or written with a long stride.
void transpose(const float* src, int64_t T, int64_t C, float* dst) {
  constexpr int64_t kTile = 32;
  for (int64_t t0 = 0; t0 < T; t0 += kTile)
    for (int64_t c0 = 0; c0 < C; c0 += kTile)
      for (int64_t t = t0; t < std::min(T, t0 + kTile); ++t)
        for (int64_t c = c0; c < std::min(C, c0 + kTile); ++c) dst[c * T + t] = src[t * C + c];
}

}  // namespace

struct Embedder::Impl {
  EmbedderOptions options;
  std::unique_ptr<Backend> backend;
  std::unique_ptr<Sam> sam;

  // One batch in flight.
  struct Slot {
    std::vector<Tensor> pixels;  // pinned u8 buffers, one per position in the batch, grown as needed
    Tensor out;                  // pinned float32 [batch, G, G, C]
    std::unique_ptr<Backend::Fence> fence;
    std::vector<Embedding> items;  // the batch's images, embeddings not yet filled in
  };
  Slot slots[2];

  size_t run(size_t n, const Loader& load, const std::function<std::string(size_t)>& name, int workers,
             const std::function<void(Embedding&)>& on_result,
             const std::function<void(const EmbedBatchStats&)>& on_batch);
  // Waits for the slot's batch and hands its embeddings out.
  void finish(Slot& s, const std::function<void(Embedding&)>& on_result);
};

Embedder::Embedder(const std::string& checkpoint, const EmbedderOptions& options) : impl_(std::make_unique<Impl>()) {
  check(options.batch > 0, "embedder: batch must be positive, found " + std::to_string(options.batch));
  check(options.workers >= 0, "embedder: workers must be 0 (automatic) or more");
  impl_->options = options;
  impl_->backend = make_backend(options.device, options.threads, options.dtype);
  impl_->sam = Sam::load(checkpoint, options.config, *impl_->backend);
  for (Impl::Slot& s : impl_->slots) s.fence = impl_->backend->make_fence();
}

Embedder::~Embedder() = default;
Embedder::Embedder(Embedder&&) noexcept = default;
Embedder& Embedder::operator=(Embedder&&) noexcept = default;

int Embedder::batch() const { return impl_->options.batch; }
std::string Embedder::arch() const { return impl_->sam->config().arch; }
std::string Embedder::device() const { return impl_->options.device; }

size_t Embedder::Impl::run(size_t n, const Loader& load, const std::function<std::string(size_t)>& name, int workers,
                           const std::function<void(Embedding&)>& on_result,
                           const std::function<void(const EmbedBatchStats&)>& on_batch) {
  Backend& be = *backend;
  ImageEncoder& encoder = sam->image_encoder();
  const ImageEncoderConfig& cfg = sam->config().image_encoder;
  const int64_t B = options.batch, G = cfg.grid(), C = cfg.out_chans;
  const bool host_device = be.device() == Device::CPU;  // the backend reads host memory as it is
  for (Slot& s : slots) {
    s.fence->wait();  // a previous run that threw may have left work in flight
    s.items.clear();
    if (!s.out.defined()) s.out = be.alloc_host({B, G, G, C}, DType::F32);
    s.pixels.resize(B);
  }
  // Two batches ahead: one being gathered, one queued behind the one the device runs.
  Prefetcher prefetch(n, workers, static_cast<size_t>(2 * B + workers), load, cfg.img_size);

  BatchClock clock;
  size_t failed = 0, next = 0;
  Slot* pending = nullptr;  // enqueued, not yet handed out
  auto finish_pending = [&] {
    const int count = static_cast<int>(pending->items.size());
    finish(*pending, on_result);
    pending = nullptr;
    const EmbedBatchStats st = clock.lap(count);
    if (on_batch) on_batch(st);
  };
  for (int cur = 0;; cur ^= 1) {
    Slot& s = slots[cur];  // free: its last batch was handed out before `pending` was enqueued
    std::vector<Tensor> images;  // u8 [h, w, 3]: pinned copies, or on the CPU the decoded images themselves
    while (static_cast<int64_t>(s.items.size()) < B && next < n) {
      const size_t i = next++;
      Loaded l = prefetch.take(i);
      Embedding e;
      e.index = i;
      e.name = name(i);
      if (!l.error.empty()) {
        e.error = l.error;
        ++failed;
        on_result(e);
        continue;
      }
      const Image& im = *l.image;
      images.push_back(host_pixels(be, l.image, s.pixels[s.items.size()]));
      e.original_h = im.height;
      e.original_w = im.width;
      resized_shape(im.height, im.width, cfg.img_size, e.input_h, e.input_w);
      s.items.push_back(std::move(e));
    }
    if (s.items.empty()) break;
    const int64_t b = static_cast<int64_t>(s.items.size());
    be.preprocess_images(images, encoder.input(b));
    const Tensor& out = encoder.forward(b);  // [b, G, G, C] float32
    Tensor host = s.out.view_prefix(out.shape());
    be.download_async(out, host);
    be.record(*s.fence);
    if (pending) finish_pending();  // the device runs this batch meanwhile
    pending = &s;
    if (host_device) finish_pending();  // the batch ran in the calls above: nothing to overlap
  }
  if (pending) finish_pending();
  return failed;
}

void Embedder::Impl::finish(Slot& s, const std::function<void(Embedding&)>& on_result) {
  s.fence->wait();
  const ImageEncoderConfig& cfg = sam->config().image_encoder;
  const int64_t G = cfg.grid(), C = cfg.out_chans;
  // [b, G, G, C] -> b x [1, C, G, G], the images in parallel: this is the caller's largest share of
  // the work per batch, and the device waits for it once the caller falls behind.
  const int count = static_cast<int>(s.items.size());
  for (Embedding& e : s.items) e.embedding = Tensor::uninitialized({1, C, G, G});
#pragma omp parallel for schedule(static)
  for (int j = 0; j < count; ++j)
    transpose(s.out.data_as<const float>() + static_cast<int64_t>(j) * G * G * C, G * G, C,
              s.items[j].embedding.data_as<float>());
  for (Embedding& e : s.items) on_result(e);
  s.items.clear();
}

size_t Embedder::embed_files(const std::vector<std::string>& paths, const std::function<void(Embedding&)>& on_result,
                             const std::function<void(const EmbedBatchStats&)>& on_batch) {
  return impl_->run(
      paths.size(), [&](size_t i) { return std::make_shared<const Image>(load_image(paths[i])); },
      [&](size_t i) { return paths[i]; }, decode_workers(impl_->options.workers, paths.size()), on_result, on_batch);
}

std::vector<Embedding> Embedder::embed(const std::vector<Image>& images) {
  std::vector<Embedding> out(images.size());
  // The caller's images, borrowed (an aliasing pointer that owns nothing), loaded inline.
  impl_->run(
      images.size(), [&](size_t i) { return std::shared_ptr<const Image>(std::shared_ptr<const Image>(), &images[i]); },
      [](size_t i) { return "image " + std::to_string(i); }, 0, [&](Embedding& e) { out[e.index] = std::move(e); },
      nullptr);
  return out;
}

}  // namespace segany
