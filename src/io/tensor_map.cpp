#include "io/tensor_map.h"

namespace segany::io {

void TensorMap::insert(const std::string& name, Tensor t) {
  check(!index_.count(name), "duplicate tensor '" + name + "' in " + source);
  index_[name] = items_.size();
  items_.emplace_back(name, std::move(t));
}

const Tensor& TensorMap::at(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) throw Error("tensor '" + name + "' missing from " + (source.empty() ? "checkpoint" : source));
  return items_[it->second].second;
}

const Tensor& TensorMap::at(const std::string& name, const Shape& expected) const {
  const Tensor& t = at(name);
  check(t.shape() == expected, "tensor '" + name + "' in " + (source.empty() ? "checkpoint" : source) +
                                   ": expected shape " + shape_str(expected) + ", found " + shape_str(t.shape()));
  return t;
}

}  // namespace segany::io
