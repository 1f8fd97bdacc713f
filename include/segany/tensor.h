// A contiguous, row-major n-d array on one device. It either owns its storage or views memory
// owned by someone else (an mmap'd checkpoint, a backend workspace) and keeps that owner alive.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <string>
#include <vector>

#include "segany/error.h"

namespace segany {

enum class DType : uint8_t { F32, F16, BF16, F64, I64, I32, I16, I8, U8, Bool, F8E4M3 };  // F8E4M3: OCP e4m3fn
enum class Device : uint8_t { CPU, CUDA };

size_t dtype_size(DType t);
const char* dtype_name(DType t);  // safetensors spelling: "F32", "BF16", ...
DType dtype_from_name(const std::string& name);  // throws on an unknown name

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& s);  // "[1, 256, 64, 64]"
int64_t shape_numel(const Shape& s);

class Tensor {
 public:
  Tensor() = default;

  // Owning host tensor, 64-byte aligned, zero-filled.
  static Tensor empty(Shape shape, DType dtype = DType::F32);
  // The same without the zero fill, for an output that is written whole right away (a large
  // one's fill would double the memory traffic of writing it).
  static Tensor uninitialized(Shape shape, DType dtype = DType::F32);
  static Tensor zeros(Shape shape, DType dtype = DType::F32) { return empty(std::move(shape), dtype); }
  // A view of memory owned by `owner` (may be null for memory that outlives the view).
  static Tensor wrap(void* data, Shape shape, DType dtype, std::shared_ptr<const void> owner,
                     Device device = Device::CPU);

  bool defined() const { return defined_; }
  void* data() const { return data_; }
  template <class T> T* data_as() const { return static_cast<T*>(data_); }
  const Shape& shape() const { return shape_; }
  int ndim() const { return static_cast<int>(shape_.size()); }
  int64_t dim(int i) const { return shape_.at(i < 0 ? shape_.size() + i : i); }
  int64_t numel() const { return shape_numel(shape_); }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  const std::shared_ptr<const void>& owner() const { return owner_; }

  // Same memory, another shape of the same element count.
  Tensor view(Shape shape) const;
  // The first shape_numel(shape) elements, viewed as `shape` (for buffers reused by several
  // intermediates whose lifetimes do not overlap).
  Tensor view_prefix(Shape shape) const;
  // Rows [begin, end) of the first dimension, sharing memory.
  Tensor slice0(int64_t begin, int64_t end) const;
  // Host copy converted to float32 (from F32/F16/BF16/F64/integers). CPU tensors only.
  Tensor to_f32() const;
  // Host deep copy.
  Tensor clone() const;

 private:
  std::shared_ptr<const void> owner_;
  void* data_ = nullptr;
  Shape shape_;
  DType dtype_ = DType::F32;
  Device device_ = Device::CPU;
  bool defined_ = false;
};

// bf16/f16 <-> f32 conversions (round to nearest even), used by loaders and backends.
float bf16_to_f32(uint16_t v);
uint16_t f32_to_bf16(float v);
float f16_to_f32(uint16_t v);
uint16_t f32_to_f16(float v);
// e4m3 (OCP fp8 "e4m3fn": no infinities, +-448 the largest finite) <-> f32: round to nearest even,
// anything beyond +-448 saturating to it (CUDA's __NV_SATFINITE), NaN staying NaN (0x7f / 0xff).
float e4m3_to_f32(uint8_t v);
uint8_t f32_to_e4m3(float v);

}  // namespace segany
