// An ordered name -> tensor map: what a checkpoint holds. Tensors may be views into an mmap'd
// file that the map keeps alive.
#pragma once

#include <map>
#include <string>
#include <vector>

#include "segany/tensor.h"

namespace segany::io {

class TensorMap {
 public:
  void insert(const std::string& name, Tensor t);  // throws on a duplicate name
  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  // Throws "tensor 'name' missing from <source>" when absent.
  const Tensor& at(const std::string& name) const;
  // at() plus a shape check: throws "tensor 'name': expected [..], found [..]".
  const Tensor& at(const std::string& name, const Shape& expected) const;
  const std::vector<std::pair<std::string, Tensor>>& items() const { return items_; }
  size_t size() const { return items_.size(); }
  std::string source;  // file name, for error messages

 private:
  std::vector<std::pair<std::string, Tensor>> items_;
  std::map<std::string, size_t> index_;
};

}  // namespace segany::io
