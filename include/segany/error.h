// segany::Error: every failure the library reports. The message says what was wrong and
// where (file, tensor name, expected vs found); the CLI prints it and exits with code 2.
#pragma once

#include <stdexcept>
#include <string>

namespace segany {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

// Throws segany::Error(msg) when cond is false.
inline void check(bool cond, const std::string& msg) {
  if (!cond) throw Error(msg);
}

}  // namespace segany
