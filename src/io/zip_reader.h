// The central directory of a zip archive held in memory (an mmap'd .pth), enough to find the
// entries torch.save writes and where each one's bytes lie. torch.save stores entries uncompressed
// (method 0, STORED), so an entry's bytes are used in place; a compressed or encrypted entry is an
// Error when its bytes are asked for. ZIP64 records are read, since checkpoints over 4 GiB need them.
// CRCs are not checked: that would read every byte of a multi-gigabyte file at load.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace segany::io {

class ZipReader {
 public:
  struct Entry {
    std::string name;
    uint64_t data_offset = 0;  // of the entry's first byte, from the start of the archive
    uint64_t size = 0;         // stored (compressed) size; equals the uncompressed size when STORED
    uint64_t uncompressed_size = 0;
    uint16_t method = 0;  // 0 = STORED
    uint16_t flags = 0;   // bit 0 = encrypted
  };

  // Parses the directory of `archive`; `source` names it in errors. Throws segany::Error on a
  // missing or damaged directory, an entry outside the archive, or a multi-disk archive.
  // `archive` must outlive the reader (it is an mmap owned by the caller).
  ZipReader(std::span<const uint8_t> archive, std::string source);

  const std::vector<Entry>& entries() const { return entries_; }
  const Entry* find(const std::string& name) const;  // null when absent
  // The entry's bytes, in place. Throws if it is compressed or encrypted.
  std::span<const uint8_t> data(const Entry& e) const;

 private:
  std::span<const uint8_t> archive_;
  std::string source_;
  std::vector<Entry> entries_;
};

}  // namespace segany::io
