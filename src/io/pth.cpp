// PyTorch .pth checkpoints: torch.save's zip archive, read in place.
//
// <root>/data.pkl is a pickle of the state_dict whose tensors refer to storages by key; each storage
// is the archive entry <root>/data/<key>, raw little-endian elements. The pickle is read by the
// restricted unpickler (io/pickle.h); each tensor becomes a view into the mmap'd archive.
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <unordered_map>

#include "io/checkpoint.h"
#include "io/mmap_file.h"
#include "io/pickle.h"
#include "io/zip_reader.h"

namespace segany::io {

namespace {

using Kind = PickleValue::Kind;

bool ends_with(const std::string& s, const std::string& tail) {
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

// Some checkpoints wrap the state_dict: {"model": {...}, "epoch": ...} or {"state_dict": {...}}.
const PickleValue& state_dict_of(const PickleValue& root) {
  for (const char* key : {"model", "state_dict"})
    if (const PickleValue* inner = root.get(key); inner && inner->kind == Kind::Dict) return *inner;
  return root;
}

// torch tensors in a state_dict are contiguous; a strided view would need a copy and hints that the
// file is not a plain state_dict. Dimensions of size 1 may carry any stride.
// Called once the size is known to fit in the storage, so the running product cannot overflow.
bool row_major(const Shape& size, const Shape& stride) {
  int64_t expected = 1;
  for (int64_t d : size)
    if (d == 0) return true;  // no elements: any stride describes them
  for (size_t i = size.size(); i-- > 0;) {
    if (size[i] != 1 && stride[i] != expected) return false;
    expected *= size[i];
  }
  return true;
}

}  // namespace

TensorMap load_pth(const std::string& path) {
  const std::string source = "checkpoint " + path;
  std::shared_ptr<const MmapFile> file = MmapFile::open(path);
  file->advise(MmapFile::Access::Random);  // until the tensors are found: only headers are read
  ZipReader zip(file->bytes(), source);

  // The root folder's name varies ("archive", "checkpoint", the file's stem): find it by its pickle.
  const ZipReader::Entry* pkl = nullptr;
  for (const ZipReader::Entry& e : zip.entries()) {
    if (e.name != "data.pkl" && !ends_with(e.name, "/data.pkl")) continue;
    if (pkl) throw Error(source + ": two pickles, '" + pkl->name + "' and '" + e.name + "'");
    pkl = &e;
  }
  if (!pkl) throw Error(source + ": a zip archive without data.pkl; not a torch.save checkpoint");
  const std::string root = pkl->name.substr(0, pkl->name.size() - std::string("data.pkl").size());

  // Storages are read as little-endian; torch records the writer's byte order when it is not implied.
  if (const ZipReader::Entry* order = zip.find(root + "byteorder")) {
    std::span<const uint8_t> b = zip.data(*order);
    if (std::string(b.begin(), b.end()) != "little")
      throw Error(source + ": written on a big-endian machine (byteorder '" + std::string(b.begin(), b.end()) +
                  "'); only little-endian checkpoints are supported");
  }

  std::unordered_map<std::string, const ZipReader::Entry*> by_name;
  for (const ZipReader::Entry& e : zip.entries()) by_name.emplace(e.name, &e);

  Pickle pickle(zip.data(*pkl), source);
  if (pickle.root().kind != Kind::Dict)
    throw Error(source + ": the pickle holds a " + std::string(pickle_kind_name(pickle.root().kind)) +
                ", not a state_dict");

  TensorMap out;
  out.source = path;
  for (const auto& [key, value] : state_dict_of(pickle.root()).dict) {
    if (key->kind != Kind::String)
      throw Error(source + ": the state_dict has a key of type " + pickle_kind_name(key->kind) +
                  "; tensor names must be strings");
    const std::string& name = key->text;
    if (value->kind != Kind::Tensor)
      throw Error(source + ": '" + name + "' is of type " + pickle_kind_name(value->kind) + ", not a tensor");
    const PickleValue& t = *value;
    const PickleValue& storage = *t.storage;

    auto it = by_name.find(root + "data/" + storage.text);
    if (it == by_name.end())
      throw Error(source + ": tensor '" + name + "': storage '" + storage.text + "' is missing from the archive");
    std::span<const uint8_t> bytes = zip.data(*it->second);

    // Bounds in bytes, with overflow checks: a hostile size tuple must not wrap around.
    const uint64_t elem = dtype_size(storage.dtype);
    uint64_t numel = 1, need = 0;
    bool overflow = false;
    for (int64_t d : t.size) overflow |= __builtin_mul_overflow(numel, static_cast<uint64_t>(d), &numel);
    overflow |= __builtin_add_overflow(numel, static_cast<uint64_t>(t.storage_offset), &need);
    overflow |= __builtin_mul_overflow(need, elem, &need);
    if (overflow || need > bytes.size())
      throw Error(source + ": tensor '" + name + "': storage '" + storage.text + "' holds " +
                  std::to_string(bytes.size()) + " bytes, the tensor needs " +
                  (overflow ? std::string("more than 2^64") : std::to_string(need)) + " (size " +
                  shape_str(t.size) + ", offset " + std::to_string(t.storage_offset) + ", " +
                  dtype_name(storage.dtype) + ")");

    if (!row_major(t.size, t.stride))
      throw Error(source + ": tensor '" + name + "' of size " + shape_str(t.size) + " has stride " +
                  shape_str(t.stride) + "; only contiguous row-major tensors are supported");

    const uint8_t* p = bytes.data() + t.storage_offset * elem;
    if (reinterpret_cast<uintptr_t>(p) % elem == 0) {
      // The usual case: torch aligns storages at 64 bytes, so the tensor is the mapped bytes.
      // The view is read-only memory; a caller that wants to modify weights clones them first.
      out.insert(name, Tensor::wrap(const_cast<uint8_t*>(p), t.size, storage.dtype, file));
    } else {
      // An archive re-packed without alignment: copy rather than hand out a misaligned pointer.
      Tensor copy = Tensor::empty(t.size, storage.dtype);
      if (copy.nbytes()) std::memcpy(copy.data(), p, copy.nbytes());
      out.insert(name, std::move(copy));
    }
  }
  file->advise(MmapFile::Access::Normal);  // whoever uses the weights next reads them in order
  return out;
}

TensorMap load_checkpoint(const std::string& path) {
  char magic[4] = {};
  {
    std::ifstream f(path, std::ios::binary);
    if (!f) throw Error("cannot open checkpoint " + path + ": " + std::strerror(errno));
    f.read(magic, sizeof magic);
  }
  if (std::memcmp(magic, "PK\x03\x04", 4) == 0 || std::memcmp(magic, "PK\x05\x06", 4) == 0) return load_pth(path);
  if (static_cast<uint8_t>(magic[0]) == 0x80)
    throw Error("checkpoint " + path + ": a bare pickle, torch.save's legacy (pre-1.6) format, which is not "
                "supported; save it again with a current torch.save, or convert it to safetensors");
  return load_safetensors(path);
}

}  // namespace segany::io
