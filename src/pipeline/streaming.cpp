#include "pipeline/streaming.h"

#include <algorithm>
#include <cstring>

#include "backend/image_ops.h"
#include "segany/error.h"

namespace segany {

Prefetcher::Prefetcher(size_t n, int workers, size_t window, Loader load, int target)
    : n_(n), window_(std::max<size_t>(window, 1)), load_(std::move(load)), target_(target), ready_(n) {
  for (int w = 0; w < workers; ++w) threads_.emplace_back([this] { work(); });
}

Prefetcher::~Prefetcher() {
  {
    std::lock_guard<std::mutex> lock(m_);
    stop_ = true;
  }
  more_.notify_all();
  for (std::thread& t : threads_) t.join();
}

Loaded Prefetcher::take(size_t i) {
  if (threads_.empty()) return load(i);
  std::unique_lock<std::mutex> lock(m_);
  done_.wait(lock, [&] { return ready_[i].has_value(); });
  Loaded out = std::move(*ready_[i]);
  ready_[i].reset();
  taken_ = i + 1;
  lock.unlock();
  more_.notify_all();
  return out;
}

void Prefetcher::work() {
  for (;;) {
    size_t i;
    {
      std::unique_lock<std::mutex> lock(m_);
      more_.wait(lock, [&] { return stop_ || next_ >= n_ || next_ < taken_ + window_; });
      if (stop_ || next_ >= n_) return;
      i = next_++;
    }
    Loaded l = load(i);
    {
      std::lock_guard<std::mutex> lock(m_);
      ready_[i] = std::move(l);
    }
    done_.notify_all();
  }
}

Loaded Prefetcher::load(size_t i) const {
  Loaded l;
  try {
    l.image = load_(i);
    check(l.image && l.image->width > 0 && l.image->height > 0 &&
              l.image->rgb.size() == size_t(l.image->width) * l.image->height * 3,
          "empty or inconsistent image");
    int h = 0, w = 0;
    resized_shape(l.image->height, l.image->width, target_, h, w);
    check(h > 0 && w > 0, "image of " + std::to_string(l.image->width) + "x" + std::to_string(l.image->height) +
                              " pixels is too thin to resize to " + std::to_string(target_));
  } catch (const std::exception& e) {
    l.image.reset();
    l.error = e.what();
  }
  return l;
}

int decode_workers(int workers, size_t images) {
  if (workers == 0) workers = static_cast<int>(std::clamp(std::thread::hardware_concurrency(), 1u, 4u));
  return static_cast<int>(std::min<size_t>(workers, std::max<size_t>(images, 1)));
}

Tensor host_pixels(Backend& be, const std::shared_ptr<const Image>& image, Tensor& pinned) {
  const Shape shape{image->height, image->width, 3};
  if (be.device() == Device::CPU) return Tensor::wrap(const_cast<uint8_t*>(image->rgb.data()), shape, DType::U8, image);
  if (!pinned.defined() || pinned.numel() < shape_numel(shape))
    pinned = be.alloc_host({std::max<int64_t>(shape_numel(shape), pinned.defined() ? pinned.numel() * 3 / 2 : 0)},
                           DType::U8);
  std::memcpy(pinned.data(), image->rgb.data(), image->rgb.size());
  return pinned.view_prefix(shape);
}

EmbedBatchStats BatchClock::lap(int images) {
  const auto now = std::chrono::steady_clock::now();
  EmbedBatchStats st;
  st.index = batches_++;
  st.images = images;
  st.ms = std::chrono::duration<double, std::milli>(now - last_).count();
  last_ = now;
  return st;
}

}  // namespace segany
