// The CUDA backend's own kernels (everything but the GEMMs and the flash attention with rel-pos),
// each the twin of the CPU backend's op of the same name: same shapes, same semantics. They take
// bf16 or fp32 activations (any mix of the two between input and output), norm parameters and
// rel-pos tables in fp32, compute in fp32, and enqueue on `stream` without allocating or
// synchronising, so that they can be captured in a CUDA graph. Shapes are checked here and a
// mismatch throws segany::Error.
#pragma once

#include <cuda_runtime.h>

#include "backend/backend.h"

namespace segany::cuda {

struct GemmArgs;  // gemm.h

// y = LayerNorm(x) over the last dim (y may alias x). gamma, beta: fp32 [C].
void layer_norm(const Tensor& x, const Tensor& gamma, const Tensor& beta, float eps, Tensor& y, Activation act,
                cudaStream_t stream);
// Backend::add_layer_norm: y = act(LayerNorm(x + r)) and y_pe = y + pe, r and pe optional (null),
// each repeated over x as add() repeats b. One pass: the rows stay in registers.
void add_layer_norm(const Tensor& x, const Tensor* r, const Tensor& gamma, const Tensor& beta, float eps, Tensor& y,
                    const Tensor* pe, Tensor* y_pe, Activation act, cudaStream_t stream);

// y = a + b with b repeated over a (b's numel divides a's, same last dim). y may alias a.
void add(const Tensor& a, const Tensor& b, Tensor& y, cudaStream_t stream);

// dst[:, dst_begin + i, :] = src[:, src_begin + i, :], converting dtypes where they differ.
void copy_tokens(const Tensor& src, int src_begin, Tensor& dst, int dst_begin, int count, cudaStream_t stream);

// x = act(x) in place (GELU: exact erf form).
void activation(Tensor& x, Activation act, cudaStream_t stream);

// y = LayerNorm(x) straight into e4m3 rows with a scale each (quantize_rows_e4m3's layout and
// arithmetic on the fp32 normalised values; x bf16 or fp32, gamma and beta fp32). Only where
// layer_norm_e4m3_fits (C % 8 == 0, C <= 2048, 16-byte aligned); q 8-byte aligned.
bool layer_norm_e4m3_fits(const Tensor& x, const Tensor& gamma, const Tensor& beta);
void layer_norm_e4m3(const Tensor& x, const Tensor& gamma, const Tensor& beta, float eps, uint8_t* q, float* scale,
                     cudaStream_t stream);

// Each row of x [rows, K] (bf16 or fp32, on the device) to e4m3 with its own scale, as
// quantize_rows_e4m3 (backend/quantize.h) does on the host, bit for bit: q [rows, K] bytes and
// scale [rows] float32, both device memory of at least that size.
void quantize_rows_e4m3(const Tensor& x, uint8_t* q, float* scale, cudaStream_t stream);

// Space-to-depth and 3x3 im2col, channels-last, feature order (ky, kx, c).
void patchify(const Tensor& x, int p, Tensor& y, cudaStream_t stream);
void im2col3x3(const Tensor& x, Tensor& y, cudaStream_t stream);

// Plain multi-head attention, q [Bq, Tq, D], k [Bk, Tk, D], v [Bv, Tk, D] (a batch of 1 is
// shared), out [B, Tq, D]. One block per (query tile of 16, head, batch), keys in tiles of 32 with
// an online fp32 softmax: simple and exact rather than fast (head_dim <= 128).
// scratch: device memory the kernel for few queries and many keys may spread its keys over more
// blocks with (the split's partial outputs); none: no split.
struct AttentionScratch {
  float* data = nullptr;
  size_t floats = 0;
};
void attention(const Tensor& q, const Tensor& k, const Tensor& v, int heads, Tensor& out, cudaStream_t stream,
               const AttentionScratch& scratch = {});

// The same kernel with SAM's decomposed relative position bias, for the shapes the flash kernel
// (attention_relpos.h) does not take: qkv [B, T, 3, heads, hd], rel_pos_h [2*gh-1, hd] and
// rel_pos_w [2*gw-1, hd] in fp32, out [B, T, heads*hd].
void attention_relpos_reference(const Tensor& qkv, const Tensor& rel_pos_h, const Tensor& rel_pos_w, int heads,
                                int grid_h, int grid_w, Tensor& out, cudaStream_t stream);

// The same inside SAM's windows on an image grid (Backend::window_attention_relpos): qkv
// [B, H, W, 3*heads*hd], pad_qkv [3*heads*hd] (same dtype), rel_pos tables [2*window-1, hd] in fp32,
// out [B, H, W, heads*hd], real tokens only.
void window_attention_relpos_reference(const Tensor& qkv, const Tensor& pad_qkv, const Tensor& rel_pos_h,
                                       const Tensor& rel_pos_w, int heads, int window, Tensor& out,
                                       cudaStream_t stream);

// D = act(A B^T + bias) + C as GemmArgs describes it, in plain fp32 arithmetic (GELU exact):
// the fallback for products cuBLASLt has no algorithm for (tiny or oddly aligned shapes).
void gemm_reference(const GemmArgs& args, cudaStream_t stream);

}  // namespace segany::cuda
