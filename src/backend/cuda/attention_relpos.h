// Flash attention with SAM's decomposed relative position bias fused inside (image encoder,
// bf16 in / bf16 out, fp32 accumulation and softmax statistics). Standalone: no other segany
// header, so the kernel and its check program build on their own.
//
// For each sequence b and head h, over a grid_h x grid_w grid of tokens (t = row * grid_w + col):
//   q, k, v   = qkv[b, :, 0/1/2, h, :]                                        // [T, D]
//   rel_h[i, kr] = q[i] . rel_pos_h[row(i) - kr + grid_h - 1]                  // q unscaled
//   rel_w[i, kc] = q[i] . rel_pos_w[col(i) - kc + grid_w - 1]
//   logit[i, j]  = D^-0.5 * q[i] . k[j] + rel_h[i, row(j)] + rel_w[i, col(j)]
//   out[b, i, h*D:(h+1)*D] = softmax_j(logit[i, :]) @ v
// The T x T bias is never materialised; the two small products are the kernel's prologue.
//
// Windowed attention on an image grid (image_h > 0, windows only): qkv is [batch, image_h, image_w,
// 3, heads, head_dim] and out [batch, image_h, image_w, heads*head_dim]. The grid is padded bottom
// and right to multiples of grid_h x grid_w and cut into windows, each a sequence as above; token
// (ty, tx) of window (wy, wx) is grid token (wy*grid_h + ty, wx*grid_w + tx), and a padding token
// (outside the image) has q, k, v = pad_qkv [3, heads, head_dim]. Only real tokens are written.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>

namespace segany::cuda {

struct RelPosAttentionParams {
  const __nv_bfloat16* qkv = nullptr;  // [batch, T, 3, heads, head_dim] (or the grid), 16-byte aligned
  // [2*grid_h-1, head_dim] and [2*grid_w-1, head_dim], contiguous. float32 (as the checkpoint
  // stores them) when rel_pos_fp32, else bf16. Either way the kernel rounds them to bf16 and
  // forms q.rel_pos with bf16 tensor-core products accumulated in fp32 (q is bf16 already).
  const void* rel_pos_h = nullptr;
  const void* rel_pos_w = nullptr;
  bool rel_pos_fp32 = false;
  __nv_bfloat16* out = nullptr;  // [batch, T, heads*head_dim]
  int batch = 0;                 // sequences, or images when image_h > 0
  int heads = 0;
  int head_dim = 0;  // 64 (vit_b, vit_l) or 80 (vit_h)
  int grid_h = 0;    // the attention grid: the image (global) or a window
  int grid_w = 0;
  // Windows cut from an image grid (see above); 0: qkv and out are sequences of grid_h x grid_w.
  int image_h = 0;
  int image_w = 0;
  const __nv_bfloat16* pad_qkv = nullptr;  // [3, heads, head_dim], 16-byte aligned (image_h > 0)
};

// Shapes the kernels take: head_dim 64 or 80, and either
//   windows: grid_h, grid_w <= 16 (SAM: 14 x 14), or
//   global:  grid_w == 64 and grid_h <= 64 (SAM: 64 x 64 at 1024 px).
bool attention_relpos_supported(int head_dim, int grid_h, int grid_w);

// The fused kernels need no workspace; kept so that callers sizing one per op need no special case.
inline size_t attention_relpos_workspace_bytes(int /*batch*/, int /*heads*/, int /*grid_h*/, int /*grid_w*/) {
  return 0;
}

// Enqueues the attention on `stream`: no allocation, no synchronisation, capturable in a CUDA
// graph. Throws std::invalid_argument on a shape or pointer it does not take, and
// std::runtime_error when the launch fails.
void attention_relpos(const RelPosAttentionParams& params, cudaStream_t stream);

// What attention_relpos(params) launches, for reports and tuning (raises nothing but the kernel's
// shared memory limit, which the first launch would do too).
struct RelPosAttentionLaunchInfo {
  const char* kernel = "";  // e.g. "relpos_attention_global<80>"
  long long grid_blocks = 0;
  int threads_per_block = 0;
  size_t smem_bytes = 0;            // dynamic shared memory per block
  int blocks_per_sm = 0;            // occupancy the driver reports for that
  cudaFuncAttributes attributes{};  // registers (numRegs), local memory (localSizeBytes), ...
};
RelPosAttentionLaunchInfo attention_relpos_launch_info(const RelPosAttentionParams& params);

// Global attention, and windows up to 14 x 14, run warpgroup-MMA (wgmma) kernels on compute
// capability 9.0 when this binary was built for sm_90a, else the mma.sync kernels. Passing false
// forces the mma.sync kernels (for comparisons and checks); process-wide, default true.
void attention_relpos_enable_sm90(bool enabled);

// 4 * sequences * heads * T^2 * head_dim (sequences: batch, or batch * windows): the FLOPs of QK^T and PV, the convention for TFLOP/s
// figures (the bias prologue, a few percent, is not counted).
double attention_relpos_flops(const RelPosAttentionParams& params);

}  // namespace segany::cuda
