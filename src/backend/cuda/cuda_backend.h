// The CUDA backend's extras beyond backend.h: its options, and its stream for callers that
// enqueue their own work next to the model's (the pipeline's uploads and pre/post-processing).
//
// Activations are bf16 (activation_dtype()), parameters from upload() fp32. linear layers
// take bf16 inputs and write bf16 or fp32; every other op takes bf16 or fp32 on either side.
// No op needs scratch memory, so there is no arena: ops enqueue work and nothing else.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <memory>

#include "backend/backend.h"
#include "backend/cuda/gemm.h"

namespace segany {

struct CudaOptions {
  // How prepare_linear stores the image encoder's weights: BF16, or FP8_E4M3 (the transformer
  // blocks' layers; compute capability 8.9 or newer, checked at construction). Sparse24 is refused
  // with a message until its CudaLinear subclass exists.
  cuda::LinearFormat linear_format = cuda::LinearFormat::BF16;
  size_t gemm_workspace_bytes = size_t(32) << 20;  // cuBLASLt's workspace, allocated once
  // Time the heuristic's candidates on the first product of each shape and keep the fastest
  // (gemm.h); false keeps the heuristic's first choice (no timing, no syncs at plan creation).
  bool tune_gemm = true;
  // Run attention_relpos through the plain reference kernel (kernels.h) even where the flash
  // kernel takes the shape: for A/B checks of the flash kernel inside the whole model.
  bool reference_attention = false;
};

std::unique_ptr<Backend> make_cuda_backend(int device, const CudaOptions& options);

// The device is made current on the calling thread at construction; a thread that drives a
// backend of another device must cudaSetDevice first.
//
// The backend's one stream (non-blocking): every op, copy and graph launch goes there.
// Throws segany::Error if `backend` is not a CUDA backend.
cudaStream_t cuda_stream(Backend& backend);

}  // namespace segany
