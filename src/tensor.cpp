#include "segany/tensor.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdlib>
#include <cstring>
#include <sstream>

namespace segany {

size_t dtype_size(DType t) {
  switch (t) {
    case DType::F64: case DType::I64: return 8;
    case DType::F32: case DType::I32: return 4;
    case DType::F16: case DType::BF16: case DType::I16: return 2;
    case DType::I8: case DType::U8: case DType::Bool: case DType::F8E4M3: return 1;
  }
  return 0;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
    case DType::F64: return "F64";
    case DType::I64: return "I64";
    case DType::I32: return "I32";
    case DType::I16: return "I16";
    case DType::I8: return "I8";
    case DType::U8: return "U8";
    case DType::Bool: return "BOOL";
    case DType::F8E4M3: return "F8_E4M3";
  }
  return "?";
}

DType dtype_from_name(const std::string& n) {
  for (DType t : {DType::F32, DType::F16, DType::BF16, DType::F64, DType::I64, DType::I32, DType::I16,
                  DType::I8, DType::U8, DType::Bool, DType::F8E4M3})
    if (n == dtype_name(t)) return t;
  throw Error("unknown dtype '" + n + "'");
}

std::string shape_str(const Shape& s) {
  std::ostringstream o;
  o << '[';
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << ']';
  return o.str();
}

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) {
    // Called on every numel(): build a message only on failure.
    if (d < 0) throw Error("negative dimension in shape " + shape_str(s));
    if (d != 0 && n > INT64_MAX / d) throw Error("shape " + shape_str(s) + " overflows");
    n *= d;
  }
  return n;
}

Tensor Tensor::empty(Shape shape, DType dtype) {
  Tensor t = uninitialized(std::move(shape), dtype);
  std::memset(t.data_, 0, t.nbytes());
  return t;
}

Tensor Tensor::uninitialized(Shape shape, DType dtype) {
  Tensor t;
  t.shape_ = std::move(shape);
  t.dtype_ = dtype;
  t.defined_ = true;
  size_t bytes = t.nbytes();
  size_t alloc = (bytes + 63) / 64 * 64;
  if (alloc == 0) alloc = 64;
  void* p = std::aligned_alloc(64, alloc);
  if (!p) throw Error("out of host memory allocating " + std::to_string(bytes) + " bytes");
  t.data_ = p;
  t.owner_ = std::shared_ptr<const void>(p, [](const void* q) { std::free(const_cast<void*>(q)); });
  return t;
}

Tensor Tensor::wrap(void* data, Shape shape, DType dtype, std::shared_ptr<const void> owner, Device device) {
  Tensor t;
  t.data_ = data;
  t.shape_ = std::move(shape);
  t.dtype_ = dtype;
  t.owner_ = std::move(owner);
  t.device_ = device;
  t.defined_ = true;
  return t;
}

Tensor Tensor::view(Shape shape) const {
  check(shape_numel(shape) == numel(),
        "cannot view a tensor of shape " + shape_str(shape_) + " as " + shape_str(shape));
  Tensor t = *this;
  t.shape_ = std::move(shape);
  return t;
}

Tensor Tensor::view_prefix(Shape shape) const {
  check(shape_numel(shape) <= numel(),
        "cannot view " + shape_str(shape) + " inside a tensor of shape " + shape_str(shape_));
  Tensor t = *this;
  t.shape_ = std::move(shape);
  return t;
}

Tensor Tensor::slice0(int64_t begin, int64_t end) const {
  check(ndim() >= 1 && 0 <= begin && begin <= end && end <= shape_[0],
        "slice [" + std::to_string(begin) + ", " + std::to_string(end) + ") out of range for " + shape_str(shape_));
  Tensor t = *this;
  size_t row = shape_numel(Shape(shape_.begin() + 1, shape_.end())) * dtype_size(dtype_);
  t.data_ = static_cast<char*>(data_) + begin * row;
  t.shape_[0] = end - begin;
  return t;
}

Tensor Tensor::clone() const {
  check(device_ == Device::CPU, "clone() of a device tensor");
  Tensor t = empty(shape_, dtype_);
  if (nbytes()) std::memcpy(t.data_, data_, nbytes());
  return t;
}

Tensor Tensor::to_f32() const {
  check(device_ == Device::CPU, "to_f32() of a device tensor");
  Tensor t = empty(shape_, DType::F32);
  float* out = t.data_as<float>();
  const int64_t n = numel();
  switch (dtype_) {
    case DType::F32: if (n) std::memcpy(out, data_, nbytes()); break;
    case DType::F16: for (int64_t i = 0; i < n; ++i) out[i] = f16_to_f32(data_as<const uint16_t>()[i]); break;
    case DType::BF16: for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_f32(data_as<const uint16_t>()[i]); break;
    case DType::F64: for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(data_as<const double>()[i]); break;
    case DType::I64: for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(data_as<const int64_t>()[i]); break;
    case DType::I32: for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(data_as<const int32_t>()[i]); break;
    case DType::I16: for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(data_as<const int16_t>()[i]); break;
    case DType::I8: for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(data_as<const int8_t>()[i]); break;
    case DType::U8: case DType::Bool:
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(data_as<const uint8_t>()[i]);
      break;
    case DType::F8E4M3: for (int64_t i = 0; i < n; ++i) out[i] = e4m3_to_f32(data_as<const uint8_t>()[i]); break;
  }
  return t;
}

float e4m3_to_f32(uint8_t v) {
  const float sign = (v & 0x80u) ? -1.0f : 1.0f;
  const int e = (v >> 3) & 0xf, m = v & 0x7;
  if (e == 0xf && m == 0x7) return std::numeric_limits<float>::quiet_NaN();
  if (e == 0) return sign * std::ldexp(static_cast<float>(m), -9);  // subnormal: m x 2^-9
  return sign * std::ldexp(1.0f + static_cast<float>(m) / 8.0f, e - 7);
}

uint8_t f32_to_e4m3(float v) {
  const uint8_t sign = std::signbit(v) ? 0x80u : 0x00u;
  if (std::isnan(v)) return sign | 0x7fu;
  const float a = std::min(std::fabs(v), 448.0f);  // saturate: 448 is e4m3's largest finite value
  if (a < 0.015625f) {
    // Below 2^-6: subnormals m x 2^-9, m = 0..7 (m = 8 is 2^-6, whose encoding is 8 as well).
    return sign | static_cast<uint8_t>(std::nearbyint(a * 512.0f));
  }
  int e2 = 0;
  const float f = std::frexp(a, &e2);  // a = f 2^e2, f in [0.5, 1)
  int exponent = e2 - 1 + 7;           // biased, of 1.m x 2^(e2 - 1)
  int mant = static_cast<int>(std::nearbyint((2.0f * f - 1.0f) * 8.0f));  // exact product; RNE
  if (mant == 8) mant = 0, ++exponent;
  return sign | static_cast<uint8_t>(exponent << 3 | mant);
}

float bf16_to_f32(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

float f16_to_f32(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ffu, u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      do { ++e; man <<= 1; } while (!(man & 0x400u));
      u = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (man & 0x3ffu) << 13;
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | man << 13;
  } else {
    u = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  int32_t exp = static_cast<int32_t>((u >> 23) & 0xff) - 127 + 15;
  uint32_t man = u & 0x7fffffu;
  if (((u >> 23) & 0xff) == 0xff) return static_cast<uint16_t>(sign | 0x7c00u | (man ? 0x200u : 0));
  if (exp >= 31) return static_cast<uint16_t>(sign | 0x7c00u);
  if (exp <= 0) {
    if (exp < -10) return static_cast<uint16_t>(sign);
    man |= 0x800000u;
    uint32_t shift = static_cast<uint32_t>(14 - exp);
    uint32_t half = man >> shift, rem = man & ((1u << shift) - 1), mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1))) ++half;
    return static_cast<uint16_t>(sign | half);
  }
  uint32_t half = sign | static_cast<uint32_t>(exp) << 10 | man >> 13;
  uint32_t rem = man & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (half & 1))) ++half;
  return static_cast<uint16_t>(half);
}

}  // namespace segany
