// Reading and writing model weights.
//
// - PyTorch .pth (torch.save's zip: <root>/data.pkl + <root>/data/<key>), read through a restricted
//   unpickler that knows only what a state_dict needs. Any other global, an unknown opcode, a storage
//   out of bounds or a truncated file is an Error naming the problem; nothing in the pickle is run.
// - safetensors, read and written.
// Tensors are zero-copy views into an mmap of the file; each tensor keeps the mapping alive. The
// mapping is read-only: clone() a tensor before writing to it. (A storage that the file does not
// align for its dtype is copied instead, so every view is aligned.)
#pragma once

#include <map>
#include <string>
#include <vector>

#include "io/tensor_map.h"

namespace segany::io {

// Dispatches on the file's first bytes (zip magic -> .pth, else safetensors).
TensorMap load_checkpoint(const std::string& path);
TensorMap load_pth(const std::string& path);
TensorMap load_safetensors(const std::string& path);

// Writes tensors (host, any dtype) in the given order. Metadata goes to "__metadata__".
// Written to a temporary file beside `path` and renamed, so a failure never leaves half a file.
void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

}  // namespace segany::io
