// The automatic mask generator's ops on the GPU (Backend::select_masks, uncrop_bits, encode_runs):
// twins of their host defaults in backend/mask_ops.cpp. Enqueued on `stream`; select_masks and
// encode_runs keep their scratch in `scratch`, grown through `alloc` when a call needs more.
#pragma once

#include <cuda_runtime.h>

#include <functional>

#include "backend/backend.h"

namespace segany::cuda {

struct SelectScratch {
  Tensor buffer;
};

void select_masks(const Tensor& iou, const Tensor& stats, const Backend::MaskSelection& selection, Tensor& keep,
                  SelectScratch& scratch, const std::function<Tensor(int64_t)>& alloc, cudaStream_t stream);

void uncrop_bits(const Tensor& bits, const int crop[4], int image_h, int image_w, Tensor& out, cudaStream_t stream);

// encode_runs' scratch: 32 bytes per 2048 words of every mask.
struct RunScratch {
  Tensor buffer;  // int64
};

void encode_runs(const Tensor& bits, int64_t pixels, Tensor& offsets, Tensor& runs, RunScratch& scratch,
                 const std::function<Tensor(int64_t)>& alloc, cudaStream_t stream);

}  // namespace segany::cuda
