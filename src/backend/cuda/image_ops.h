// SAM's preprocessing on the GPU: the twin of Backend::preprocess_images's host default
// (backend/image_ops.cpp). The host computes Pillow's filter taps (pil_bilinear_taps) and uploads
// them with the images; the kernel applies the same integer arithmetic, so its uint8 pixels equal
// the CPU's bit for bit, and the float32 normalisation is IEEE-exact (no contraction, no fast
// division), so its float32 output equals the CPU's too.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "segany/tensor.h"

namespace segany::cuda {

// One image of a batch, as the kernel reads it. Offsets count int32 values into the batch's tap
// table, and bytes into its pixel buffer.
struct PreprocessImageParams {
  int64_t pixels = 0;  // RGB u8 [in_h, in_w, 3]
  int in_h = 0, in_w = 0, out_h = 0, out_w = 0;
  int hk = 0, vk = 0;  // ksize of the horizontal and vertical taps
  int hfirst = 0, hcount = 0, hweights = 0;  // [out_w], [out_w], [out_w, hk]
  int vfirst = 0, vcount = 0, vweights = 0;  // [out_h], [out_h], [out_h, vk]
};

// input [B, S, S, 3] (float32 or bf16) = normalise(resize(image b)) with zero padding, for the B
// images described by params (device memory, B entries). Enqueued on `stream`; no allocation.
void preprocess_images(const PreprocessImageParams* params, const int32_t* taps, const uint8_t* pixels, int batch,
                       Tensor& input, cudaStream_t stream);

}  // namespace segany::cuda
