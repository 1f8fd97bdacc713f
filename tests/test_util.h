// Shared helpers for tests: where the golden data is, temp folders.
#pragma once

#include <gtest/gtest.h>

#include <filesystem>
#include <string>

namespace segany::test {

inline std::string shared_dir() { return SEGANY_SHARED_DIR; }
inline std::string golden_dir() { return std::string(SEGANY_SHARED_DIR) + "/golden"; }
inline bool have_golden() { return std::filesystem::exists(golden_dir() + "/README.md"); }
#define SEGANY_REQUIRE_GOLDEN() \
  if (!::segany::test::have_golden()) GTEST_SKIP() << "no golden data at " << ::segany::test::golden_dir()

// A fresh empty folder for one test.
inline std::string temp_dir(const std::string& name) {
  std::filesystem::path p = std::filesystem::path(SEGANY_TEST_TMP) / name;
  std::filesystem::remove_all(p);
  std::filesystem::create_directories(p);
  return p.string();
}

}  // namespace segany::test
