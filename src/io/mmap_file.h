// A whole file mapped read-only into memory. Checkpoint tensors are views into it, so the mapping is
// shared: each view holds a shared_ptr to it (as its owner) and the file stays mapped while any
// tensor from it is alive.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

namespace segany::io {

class MmapFile {
 public:
  // Throws segany::Error naming the path and the system's reason when the file cannot be opened or
  // mapped. An empty file maps to an empty span.
  explicit MmapFile(const std::string& path);
  // The usual way in: shared, so that tensor views can hold the mapping.
  static std::shared_ptr<const MmapFile> open(const std::string& path) {
    return std::make_shared<const MmapFile>(path);
  }

  ~MmapFile();
  MmapFile(const MmapFile&) = delete;
  MmapFile& operator=(const MmapFile&) = delete;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  std::span<const uint8_t> bytes() const { return {data_, size_}; }
  const std::string& path() const { return path_; }

  // A hint for the kernel (madvise), which may ignore it. Random while only scattered headers are
  // read: read-ahead is often several MB per fault, and 600 zip headers spread over a 2.5 GB
  // checkpoint would otherwise pull in the whole file before the first tensor is used.
  enum class Access { Normal, Random };
  void advise(Access access) const;

 private:
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  std::string path_;
};

}  // namespace segany::io
