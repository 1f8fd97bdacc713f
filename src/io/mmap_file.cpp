#include "io/mmap_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "segany/error.h"

namespace segany::io {

namespace {

// Closes the descriptor on every path out of open(); the mapping itself does not need it.
struct Fd {
  int fd;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

std::string sys_error(const std::string& what, const std::string& path) {
  return "cannot " + what + " " + path + ": " + std::strerror(errno);
}

}  // namespace

MmapFile::MmapFile(const std::string& path) : path_(path) {
  Fd f{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
  if (f.fd < 0) throw Error(sys_error("open", path));
  struct stat st {};
  if (::fstat(f.fd, &st) != 0) throw Error(sys_error("stat", path));
  if (!S_ISREG(st.st_mode)) throw Error("cannot map " + path + ": not a regular file");

  size_ = static_cast<size_t>(st.st_size);
  if (size_ == 0) return;  // mmap refuses length 0; an empty span says it all

  // PROT_READ and MAP_PRIVATE: the file is never written, and a read-only private mapping costs no
  // commit charge, so a multi-gigabyte checkpoint maps instantly even under strict overcommit.
  // Pages are read on first touch.
  void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, f.fd, 0);
  if (p == MAP_FAILED) throw Error(sys_error("map", path));
  data_ = static_cast<const uint8_t*>(p);
}

void MmapFile::advise(Access access) const {
  if (data_) ::madvise(const_cast<uint8_t*>(data_), size_, access == Access::Random ? MADV_RANDOM : MADV_NORMAL);
}

MmapFile::~MmapFile() {
  if (data_) ::munmap(const_cast<uint8_t*>(data_), size_);
}

}  // namespace segany::io
