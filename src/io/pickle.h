// A restricted unpickler for the data.pkl inside a torch.save archive.
//
// It reads pickle protocols 2 to 5 as torch writes a state_dict and builds a small tree of values;
// it never imports or calls anything. Globals are checked against the handful a state_dict needs
// (collections.OrderedDict, torch._utils._rebuild_tensor_v2 / _rebuild_parameter, the typed storage
// classes, dtype objects), and "calling" one of them (REDUCE) is interpreted here: an OrderedDict
// becomes a Dict, a rebuilt tensor becomes a Tensor value pointing at its storage. Any other global,
// an unknown opcode, a malformed stack or a read past the end is an Error naming the offset.
#pragma once

#include <cstdint>
#include <deque>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "segany/tensor.h"

namespace segany::io {

struct PickleValue {
  enum class Kind : uint8_t { None, Bool, Int, Float, String, Tuple, List, Dict, Global, Storage, Tensor };
  Kind kind = Kind::None;

  bool boolean = false;
  int64_t integer = 0;
  double real = 0;
  // String: the text. Global: "module.name". Storage: its key (the archive entry data/<key>).
  std::string text;
  std::vector<const PickleValue*> items;  // Tuple, List
  // Dict, in insertion order. A key set twice appears twice: the caller decides what that means.
  std::vector<std::pair<const PickleValue*, const PickleValue*>> dict;

  // Storage: torch.<X>Storage('key', location, numel).
  DType dtype = DType::F32;
  std::string location;
  int64_t numel = 0;

  // Tensor: _rebuild_tensor_v2(storage, storage_offset, size, stride, ...), in elements.
  const PickleValue* storage = nullptr;
  int64_t storage_offset = 0;
  Shape size, stride;

  // The value under a string key of a Dict, or null.
  const PickleValue* get(const std::string& key) const;
};

const char* pickle_kind_name(PickleValue::Kind k);  // "dict", "tensor", ...

// Unpickles `bytes` at construction; `source` (e.g. "checkpoint model.pth") prefixes every error.
// Holds every value it built: pointers from root() live as long as this object, which therefore
// neither copies nor moves.
class Pickle {
 public:
  Pickle(std::span<const uint8_t> bytes, std::string source);
  Pickle(const Pickle&) = delete;
  Pickle& operator=(const Pickle&) = delete;

  const PickleValue& root() const { return *root_; }

 private:
  std::deque<PickleValue> values_;  // a deque never moves its elements, so pointers stay valid
  const PickleValue* root_ = nullptr;
  friend class Unpickler;
};

}  // namespace segany::io
