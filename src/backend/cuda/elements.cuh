// Element access for the CUDA backend's kernels: fp32, bf16 or fp16 in memory, fp32 in registers.
// V consecutive elements move with 16-byte accesses where V == 8 (one uint4 of bf16 or fp16, two
// float4 of fp32); the address must then be 16-byte aligned.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <string>

#include "segany/error.h"
#include "segany/tensor.h"

namespace segany::cuda {

using bf16 = __nv_bfloat16;
using fp16 = __half;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(fp16 v) { return __half2float(v); }
template <class T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ bf16 from_float<bf16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ fp16 from_float<fp16>(float v) { return __float2half_rn(v); }

// Pairs of 16-bit elements, the unit of their vector conversions.
__device__ __forceinline__ float2 to_float2(__nv_bfloat162 h) { return __bfloat1622float2(h); }
__device__ __forceinline__ float2 to_float2(__half2 h) { return __half22float2(h); }
template <class T> struct Pair;
template <> struct Pair<bf16> {
  using type = __nv_bfloat162;
  __device__ static type of(float a, float b) { return __floats2bfloat162_rn(a, b); }
};
template <> struct Pair<fp16> {
  using type = __half2;
  __device__ static type of(float a, float b) { return __floats2half2_rn(a, b); }
};

template <int V, class T>
  requires(sizeof(T) == 2)
__device__ __forceinline__ void load_vec(const T* p, float (&v)[V]) {
  if constexpr (V == 8) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const auto* h = reinterpret_cast<const typename Pair<T>::type*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = to_float2(h[i]);
      v[2 * i] = f.x;
      v[2 * i + 1] = f.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) v[i] = to_float(p[i]);
  }
}
template <int V>
__device__ __forceinline__ void load_vec(const float* p, float (&v)[V]) {
  if constexpr (V == 8) {
    const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) v[i] = p[i];
  }
}
template <int V, class T>
  requires(sizeof(T) == 2)
__device__ __forceinline__ void store_vec(T* p, const float (&v)[V]) {
  if constexpr (V == 8) {
    uint4 u;
    auto* h = reinterpret_cast<typename Pair<T>::type*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = Pair<T>::of(v[2 * i], v[2 * i + 1]);
    *reinterpret_cast<uint4*>(p) = u;
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) p[i] = from_float<T>(v[i]);
  }
}
template <int V>
__device__ __forceinline__ void store_vec(float* p, const float (&v)[V]) {
  if constexpr (V == 8) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) p[i] = v[i];
  }
}

// Calls f(T{}) with T the C++ element type of dtype t (float, bf16 or fp16).
template <class F>
void with_type(DType t, F&& f) {
  if (t == DType::F32)
    f(float{});
  else if (t == DType::BF16)
    f(bf16{});
  else if (t == DType::F16)
    f(fp16{});
  else
    throw Error(std::string("cuda backend: unsupported element type ") + dtype_name(t));
}

}  // namespace segany::cuda
