// An 8-bit RGB image, and reading/writing image files.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace segany {

struct Image {
  int width = 0;
  int height = 0;
  std::vector<uint8_t> rgb;  // height * width * 3, row-major, interleaved RGB
  uint8_t* pixel(int x, int y) { return rgb.data() + (static_cast<size_t>(y) * width + x) * 3; }
  const uint8_t* pixel(int x, int y) const { return rgb.data() + (static_cast<size_t>(y) * width + x) * 3; }
};

// Largest image accepted, in pixels (width * height); larger ones are refused before decoding.
constexpr int64_t kMaxImagePixels = 16384LL * 16384LL;

// Decodes a JPEG (gray, YCbCr, RGB, CMYK/YCCK) or PNG (8/16-bit, gray, palette, alpha dropped)
// into RGB with PIL's pixel values, EXIF orientation applied as PIL's exif_transpose. Throws
// segany::Error naming the file and the problem (unreadable, truncated, corrupt, too large).
Image load_image(const std::string& path);
Image decode_image(const uint8_t* data, size_t size, const std::string& name = "<memory>");

// Writes an 8-bit PNG: RGB (channels 3) or gray (channels 1). Throws on failure.
void save_png(const std::string& path, const uint8_t* pixels, int width, int height, int channels);
inline void save_png(const std::string& path, const Image& im) { save_png(path, im.rgb.data(), im.width, im.height, 3); }

}  // namespace segany
