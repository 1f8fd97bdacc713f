// Parsing of prompt arguments and formatting shared by the subcommands.
#include <charconv>
#include <cmath>
#include <cstdio>
#include <string>
#include <system_error>
#include <vector>

#include "commands.h"
#include "segany/error.h"

namespace segany::cli {
namespace {

std::vector<std::string> split_commas(const std::string& text) {
  std::vector<std::string> parts;
  size_t begin = 0;
  for (;;) {
    const size_t comma = text.find(',', begin);
    parts.push_back(text.substr(begin, comma - begin));
    if (comma == std::string::npos) return parts;
    begin = comma + 1;
  }
}

// The whole of `s` as a number, or false. from_chars, unlike strtof, ignores the locale and refuses
// leading spaces; it accepts "nan" and "inf", which the Predictor rejects with a clearer message.
template <class T>
bool parse_number(const std::string& s, T& out) {
  if (s.empty()) return false;
  const char* first = s.data();
  if (*first == '+') ++first;  // "+3" is a fine way to write 3; from_chars alone refuses it
  const char* last = s.data() + s.size();
  const auto [end, ec] = std::from_chars(first, last, out);
  return ec == std::errc() && end == last;
}

}  // namespace

Point parse_point(const std::string& text) {
  const std::vector<std::string> parts = split_commas(text);
  Point p;
  const bool ok = (parts.size() == 2 || parts.size() == 3) && parse_number(parts[0], p.x) &&
                  parse_number(parts[1], p.y) && (parts.size() == 2 || parse_number(parts[2], p.label));
  check(ok, "--point '" + text + "': expected X,Y or X,Y,LABEL (pixels of the image; LABEL 1 foreground, 0 background)");
  return p;
}

Box parse_box(const std::string& text) {
  const std::vector<std::string> parts = split_commas(text);
  Box b;
  const bool ok = parts.size() == 4 && parse_number(parts[0], b.x0) && parse_number(parts[1], b.y0) &&
                  parse_number(parts[2], b.x1) && parse_number(parts[3], b.y1);
  check(ok, "--box '" + text + "': expected X0,Y0,X1,Y1 (pixels of the image, top-left then bottom-right)");
  return b;
}

std::string human_bytes(uint64_t bytes) {
  const char* units[] = {"B", "KB", "MB", "GB", "TB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1000.0 && u < 4) {
    v /= 1000.0;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof buf, u == 0 ? "%.0f %s" : "%.1f %s", v, units[u]);
  return buf;
}

std::string group_thousands(int64_t n) {
  std::string digits = std::to_string(n < 0 ? -n : n), out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return n < 0 ? "-" + out : out;
}

void add_model_args(CLI::App* app, ModelArgs& m) {
  app->add_option("checkpoint", m.checkpoint, "SAM checkpoint: the official .pth or a .safetensors")
      ->required()
      ->check(CLI::ExistingFile);
  app->add_option("--config", m.config, "config.json with the architecture, for checkpoints whose shapes do not say it all")
      ->check(CLI::ExistingFile);
  app->add_option("--device", m.device, "cpu, or cuda (needs a CUDA build and a GPU)")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  app->add_option("--dtype", m.dtype,
                  "on cuda, the image encoder's linear layers: bf16, or fp8 (each block's qkv and lin1 in e4m3; "
                  "compute capability 8.9 or newer)")
      ->check(CLI::IsMember({"bf16", "fp8"}))
      ->capture_default_str();
  app->add_option("--threads", m.threads, "CPU threads; 0: all cores")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
}

double rounded(double v) { return std::round(v * 1e6) / 1e6; }

std::string format_result(const nlohmann::ordered_json& result) {
  std::string text = "{\n";
  size_t i = 0;
  for (const auto& [key, value] : result.items()) {
    text += "  " + nlohmann::json(key).dump() + ": ";
    if (value.is_array() && !value.empty() && value.front().is_object()) {
      text += "[\n";
      for (size_t k = 0; k < value.size(); ++k) text += "    " + value[k].dump() + (k + 1 < value.size() ? ",\n" : "\n");
      text += "  ]";
    } else {
      text += value.dump();
    }
    text += ++i < result.size() ? ",\n" : "\n";
  }
  return text + "}\n";
}

}  // namespace segany::cli
