// Resize (Pillow's fixed-point bilinear), normalise and pad in one kernel: one thread per output
// pixel, which runs the vertical taps over rows of the horizontal pass computed on the fly. Each
// horizontal value is clipped to uint8 before the vertical pass uses it, as Pillow's temporary
// image is, so the result is Pillow's to the bit. Shrinking 1800 -> 1024 takes about 4 x 4 taps a
// pixel: the kernel costs microseconds next to the encoder, and needs no shared memory.
#include "backend/cuda/image_ops.h"

#include <cuda_bf16.h>

#include <string>

#include "backend/cuda/cuda_utils.h"
#include "backend/cuda/elements.cuh"
#include "backend/image_ops.h"

namespace segany::cuda {
namespace {

struct PixelNorm {
  float mean[3], std[3];
};

__device__ __forceinline__ int32_t clip8(int32_t acc) { return min(max(acc >> kResizePrecisionBits, 0), 255); }

template <class T>
__global__ void preprocess_kernel(const PreprocessImageParams* __restrict__ params, const int32_t* __restrict__ taps,
                                  const uint8_t* __restrict__ pixels, int S, PixelNorm norm, T* __restrict__ out) {
  const int x = blockIdx.x * blockDim.x + threadIdx.x;
  const int y = blockIdx.y;
  const int b = blockIdx.z;
  if (x >= S) return;
  const PreprocessImageParams p = params[b];
  float v[3] = {0.0f, 0.0f, 0.0f};  // the zero padding
  if (x < p.out_w && y < p.out_h) {
    constexpr int32_t half = 1 << (kResizePrecisionBits - 1);
    const int hf = taps[p.hfirst + x], hc = taps[p.hcount + x];
    const int32_t* hw = taps + p.hweights + x * p.hk;
    const int vf = taps[p.vfirst + y], vc = taps[p.vcount + y];
    const int32_t* vw = taps + p.vweights + y * p.vk;
    const uint8_t* image = pixels + p.pixels;
    int32_t acc[3] = {half, half, half};
    for (int j = 0; j < vc; ++j) {
      const uint8_t* in = image + (static_cast<int64_t>(vf + j) * p.in_w + hf) * 3;
      int32_t s[3] = {half, half, half};
      for (int i = 0; i < hc; ++i) {
        const int32_t w = hw[i];
        s[0] += int32_t(in[3 * i + 0]) * w;
        s[1] += int32_t(in[3 * i + 1]) * w;
        s[2] += int32_t(in[3 * i + 2]) * w;
      }
      const int32_t wv = vw[j];
      acc[0] += clip8(s[0]) * wv;
      acc[1] += clip8(s[1]) * wv;
      acc[2] += clip8(s[2]) * wv;
    }
#pragma unroll
    for (int c = 0; c < 3; ++c)  // (pixel - mean) / std, each step rounded as the CPU's float32
      v[c] = __fdiv_rn(__fsub_rn(static_cast<float>(clip8(acc[c])), norm.mean[c]), norm.std[c]);
  }
  T* o = out + ((static_cast<int64_t>(b) * S + y) * S + x) * 3;
  o[0] = from_float<T>(v[0]);
  o[1] = from_float<T>(v[1]);
  o[2] = from_float<T>(v[2]);
}

}  // namespace

void preprocess_images(const PreprocessImageParams* params, const int32_t* taps, const uint8_t* pixels, int batch,
                       Tensor& input, cudaStream_t stream) {
  check(input.device() == Device::CUDA && input.ndim() == 4 && input.dim(0) == batch && input.dim(1) == input.dim(2) &&
            input.dim(3) == 3 && is_float_dtype(input.dtype()),
        "cuda preprocess_images: input must be a GPU float32, bf16 or fp16 [" + std::to_string(batch) +
            ", S, S, 3] tensor, found " + dtype_name(input.dtype()) + " " + shape_str(input.shape()));
  if (batch == 0) return;
  const int S = static_cast<int>(input.dim(1));
  PixelNorm norm;
  for (int c = 0; c < 3; ++c) norm.mean[c] = kPixelMean[c], norm.std[c] = kPixelStd[c];
  const dim3 block(128);
  const dim3 grid((S + block.x - 1) / block.x, S, batch);
  with_type(input.dtype(), [&](auto t) {
    preprocess_kernel<<<grid, block, 0, stream>>>(params, taps, pixels, S, norm, static_cast<decltype(t)*>(input.data()));
  });
  CUDA_CHECK_LAUNCH("preprocess_images");
}

}  // namespace segany::cuda
