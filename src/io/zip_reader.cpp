#include "io/zip_reader.h"

#include <algorithm>

#include "segany/error.h"

namespace segany::io {

namespace {

// Record signatures and fixed sizes from PKWARE's APPNOTE.TXT.
constexpr uint32_t kLocalHeaderSig = 0x04034b50, kCentralSig = 0x02014b50, kEndSig = 0x06054b50,
                   kZip64EndSig = 0x06064b50, kZip64LocatorSig = 0x07064b50;
constexpr uint64_t kLocalHeaderSize = 30, kCentralSize = 46, kEndSize = 22, kZip64EndSize = 56,
                   kZip64LocatorSize = 20, kMaxComment = 0xffff;
constexpr uint16_t kZip64ExtraId = 0x0001;

// Little-endian reads at an offset that the caller has already bounds-checked.
uint16_t u16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | p[1] << 8); }
uint32_t u32(const uint8_t* p) { return u16(p) | static_cast<uint32_t>(u16(p + 2)) << 16; }
uint64_t u64(const uint8_t* p) { return u32(p) | static_cast<uint64_t>(u32(p + 4)) << 32; }

// True when [offset, offset + len) lies inside a buffer of `size` bytes, without overflow.
bool within(uint64_t offset, uint64_t len, uint64_t size) { return offset <= size && len <= size - offset; }

}  // namespace

ZipReader::ZipReader(std::span<const uint8_t> archive, std::string source)
    : archive_(archive), source_(std::move(source)) {
  const uint8_t* base = archive_.data();
  const uint64_t size = archive_.size();
  auto fail = [&](const std::string& what) -> Error {
    return Error(source_ + ": " + what + " (the file has " + std::to_string(size) + " bytes)");
  };

  // The end-of-central-directory record is the last thing in the file, followed only by a comment
  // of at most 64 KiB, so scan backwards for its signature over that window.
  if (size < kEndSize) throw fail("too short to be a zip archive; the file is truncated or not a checkpoint");
  uint64_t end = UINT64_MAX;
  const uint64_t lowest = size - kEndSize > kMaxComment ? size - kEndSize - kMaxComment : 0;
  for (uint64_t pos = size - kEndSize + 1; pos-- > lowest;) {
    if (u32(base + pos) == kEndSig && pos + kEndSize + u16(base + pos + 20) <= size) {
      end = pos;
      break;
    }
  }
  if (end == UINT64_MAX)
    throw fail("no zip end-of-central-directory record; the file is truncated or not a zip archive");

  uint64_t disk = u16(base + end + 4), cd_disk = u16(base + end + 6);
  uint64_t count = u16(base + end + 10), cd_size = u32(base + end + 12), cd_offset = u32(base + end + 16);
  uint64_t directory_end = end;  // the central directory must end before this

  // ZIP64: a locator just before the classic record points at a 64-bit twin of it. Writers set the
  // classic fields to all-ones when the real value needs the twin.
  const bool saturated = count == 0xffff || cd_size == 0xffffffff || cd_offset == 0xffffffff;
  if (end >= kZip64LocatorSize && u32(base + end - kZip64LocatorSize) == kZip64LocatorSig) {
    const uint8_t* loc = base + end - kZip64LocatorSize;
    uint64_t z = u64(loc + 8);
    if (u32(loc + 4) != 0 || u32(loc + 16) > 1) throw fail("multi-disk zip archives are not supported");
    if (!within(z, kZip64EndSize, end - kZip64LocatorSize) || u32(base + z) != kZip64EndSig)
      throw fail("the ZIP64 locator points at offset " + std::to_string(z) +
                 ", where there is no ZIP64 end-of-central-directory record");
    disk = u32(base + z + 16);
    cd_disk = u32(base + z + 20);
    count = u64(base + z + 32);
    cd_size = u64(base + z + 40);
    cd_offset = u64(base + z + 48);
    directory_end = z;
  } else if (saturated) {
    throw fail("the end-of-central-directory record needs ZIP64 values but there is no ZIP64 locator");
  }
  if (disk != 0 || cd_disk != 0) throw fail("multi-disk zip archives are not supported");
  if (!within(cd_offset, cd_size, directory_end))
    throw fail("the central directory (offset " + std::to_string(cd_offset) + ", " + std::to_string(cd_size) +
               " bytes) lies outside the file; it is truncated or damaged");
  if (count > cd_size / kCentralSize)
    throw fail("the directory claims " + std::to_string(count) + " entries but has room for " +
               std::to_string(cd_size / kCentralSize));

  entries_.reserve(count);
  const uint8_t* cd = base + cd_offset;
  uint64_t pos = 0;
  for (uint64_t i = 0; i < count; ++i) {
    if (!within(pos, kCentralSize, cd_size) || u32(cd + pos) != kCentralSig)
      throw fail("central directory entry " + std::to_string(i) + " is damaged");
    const uint8_t* h = cd + pos;
    const uint64_t name_len = u16(h + 28), extra_len = u16(h + 30), comment_len = u16(h + 32);
    if (!within(pos + kCentralSize, name_len + extra_len + comment_len, cd_size))
      throw fail("central directory entry " + std::to_string(i) + " runs past the directory");
    Entry e;
    e.flags = u16(h + 8);
    e.method = u16(h + 10);
    e.size = u32(h + 20);
    e.uncompressed_size = u32(h + 24);
    uint64_t disk_start = u16(h + 34);
    uint64_t local = u32(h + 42);
    e.name.assign(reinterpret_cast<const char*>(h + kCentralSize), name_len);

    // The ZIP64 extra field holds, in this order, only those values whose classic field is all-ones.
    const uint8_t* extra = h + kCentralSize + name_len;
    for (uint64_t x = 0; x + 4 <= extra_len;) {
      const uint16_t id = u16(extra + x), len = u16(extra + x + 2);
      if (x + 4 + len > extra_len) throw fail("zip entry '" + e.name + "' has a damaged extra field");
      if (id == kZip64ExtraId) {
        const uint8_t* f = extra + x + 4;
        uint64_t left = len;
        auto take64 = [&](uint64_t& v) {
          if (left < 8) throw fail("zip entry '" + e.name + "' has a short ZIP64 extra field");
          v = u64(f);
          f += 8;
          left -= 8;
        };
        if (e.uncompressed_size == 0xffffffff) take64(e.uncompressed_size);
        if (e.size == 0xffffffff) take64(e.size);
        if (local == 0xffffffff) take64(local);
        if (disk_start == 0xffff) {
          if (left < 4) throw fail("zip entry '" + e.name + "' has a short ZIP64 extra field");
          disk_start = u32(f);
        }
      }
      x += 4 + len;
    }
    if (disk_start != 0) throw fail("multi-disk zip archives are not supported");

    // The local header repeats the name and has its own extra field (torch pads it so that data
    // starts on a 64-byte boundary); the data follows it. Its size fields may be zero (torch sets
    // the data-descriptor flag), so the sizes come from the central directory.
    if (!within(local, kLocalHeaderSize, size) || u32(base + local) != kLocalHeaderSig)
      throw fail("zip entry '" + e.name + "': no local header at offset " + std::to_string(local) +
                 "; the file is truncated or damaged");
    e.data_offset = local + kLocalHeaderSize + u16(base + local + 26) + u16(base + local + 28);
    if (!within(e.data_offset, e.size, size))
      throw fail("zip entry '" + e.name + "' needs bytes " + std::to_string(e.data_offset) + ".." +
                 std::to_string(e.data_offset + e.size) + ", past the end of the file; it is truncated");
    entries_.push_back(std::move(e));
    pos += kCentralSize + name_len + extra_len + comment_len;
  }
}

const ZipReader::Entry* ZipReader::find(const std::string& name) const {
  auto it = std::find_if(entries_.begin(), entries_.end(), [&](const Entry& e) { return e.name == name; });
  return it == entries_.end() ? nullptr : &*it;
}

std::span<const uint8_t> ZipReader::data(const Entry& e) const {
  if (e.flags & 1) throw Error(source_ + ": zip entry '" + e.name + "' is encrypted");
  if (e.method != 0)
    throw Error(source_ + ": zip entry '" + e.name + "' is compressed (method " + std::to_string(e.method) +
                "); torch.save stores entries uncompressed, so this archive was re-packed: "
                "re-zip it with no compression (zip -0) or save it again with torch.save");
  if (e.size != e.uncompressed_size)
    throw Error(source_ + ": zip entry '" + e.name + "' is stored with " + std::to_string(e.size) +
                " bytes but claims " + std::to_string(e.uncompressed_size) + " uncompressed");
  return archive_.subspan(e.data_offset, e.size);
}

}  // namespace segany::io
