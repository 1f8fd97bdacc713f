// What the streamed pipelines (the Embedder, BatchPredictor::predict_files) share: images decoded
// on worker threads ahead of the thread that batches them, within a bounded window; their pixels
// staged where the backend reads them; the wall time of each batch.
#pragma once
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "backend/backend.h"
#include "segany/embedder.h"
#include "segany/image.h"

namespace segany {

// An image ready to be batched, or why it is not.
struct Loaded {
  std::shared_ptr<const Image> image;
  std::string error;
};

using Loader = std::function<std::shared_ptr<const Image>(size_t)>;

// Runs `load` for indices 0..n-1 on worker threads, at most `window` images ahead of the one
// take() last returned. With no workers, take() loads inline. A loaded image is checked to be
// resizable to `target` (its longest side), so that a bad one never fails a batch.
class Prefetcher {
 public:
  Prefetcher(size_t n, int workers, size_t window, Loader load, int target);
  ~Prefetcher();
  Prefetcher(const Prefetcher&) = delete;
  Prefetcher& operator=(const Prefetcher&) = delete;

  // Image i, once loaded; each index once, in increasing order.
  Loaded take(size_t i);

 private:
  void work();
  Loaded load(size_t i) const;

  const size_t n_, window_;
  const Loader load_;
  const int target_;
  std::mutex m_;
  std::condition_variable more_, done_;
  size_t next_ = 0, taken_ = 0;
  bool stop_ = false;
  std::vector<std::optional<Loaded>> ready_;
  std::vector<std::thread> threads_;
};

// Decoding threads for `workers` (0: min(4, hardware threads)) and `images` images.
int decode_workers(int workers, size_t images);

// The image's pixels u8 [h, w, 3] where the backend reads them: the image itself on the CPU (the
// tensor keeps it alive), else a copy in `pinned`, a page-locked buffer grown as needed.
Tensor host_pixels(Backend& be, const std::shared_ptr<const Image>& image, Tensor& pinned);

// Each batch's number and wall time since the previous batch was handed out (the first: since
// the clock was made): the pipeline's steady cost per batch.
class BatchClock {
 public:
  EmbedBatchStats lap(int images);

 private:
  std::chrono::steady_clock::time_point last_ = std::chrono::steady_clock::now();
  int batches_ = 0;
};

}  // namespace segany
