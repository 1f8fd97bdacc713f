// The two ends of the mask decoder on the GPU: the twins of Backend::embed_points,
// Backend::hypernetwork_masks and Backend::postprocess_masks's host versions (backend/mask_ops.h,
// the CPU backend). Both compute in IEEE float32
// without contraction (explicit _rn intrinsics), in the host code's order, so the postprocessed
// masks equal the CPU's bit for bit for the same low-res logits; the sparse embeddings differ by
// the last bit or two of sinf/cosf. Enqueued on `stream`, no allocation: graph-capturable.
#pragma once

#include <cuda_runtime.h>

#include "backend/backend.h"

namespace segany::cuda {

void embed_points(const Tensor& coords, const Tensor& labels, const Tensor& gaussian, const Tensor& table, int img_size,
                  Tensor& out, cudaStream_t stream);

// Backend::hypernetwork_masks: one thread per mask pixel, reading its row of the upscaled image in
// patch order (GELU applied as it is read) and writing the T masks' logits in pixel order.
void hypernetwork_masks(const Tensor& up, const Tensor& hyper, Tensor& low_res, cudaStream_t stream);

void postprocess_masks(const Tensor& low_res, int first, int count, const Backend::MaskFrame& frame, float threshold,
                       float offset, bool column_major, Tensor* bits, Tensor& stats, const Tensor* select,
                       cudaStream_t stream);

}  // namespace segany::cuda
