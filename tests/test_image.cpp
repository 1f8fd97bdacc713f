// Image files (io/image.cpp) and SAM's preprocessing (pipeline/preprocess.cpp).
// The decoder and the resize must give PIL's pixels: the golden resized images were made by PIL.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include <jpeglib.h>
#include <nlohmann/json.hpp>

#include "pipeline/preprocess.h"
#include "segany/error.h"
#include "segany/image.h"
#include "test_util.h"

namespace segany {
namespace {

using Bytes = std::vector<uint8_t>;

Bytes read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  EXPECT_TRUE(f.good()) << "cannot open " << path;
  return Bytes(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

void write_bytes(const std::string& path, const Bytes& bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(f.good()) << "cannot write " << path;
}

std::string image_path(const std::string& name) { return test::shared_dir() + "/images/" + name; }
// The sample photos live in ../shared beside the project, like the golden data; skip without them.
#define REQUIRE_SAMPLE_IMAGES()                                                                 \
  if (!std::filesystem::exists(image_path("dog.jpg")) || !std::filesystem::exists(image_path("truck.jpg"))) \
  GTEST_SKIP() << "no sample images at " << test::shared_dir() << "/images"

// The message of the segany::Error that f throws; fails the test when it throws nothing.
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected a segany::Error";
  return "";
}
#define EXPECT_CONTAINS(text, part) \
  EXPECT_NE(std::string(text).find(part), std::string::npos) << "'" << (text) << "' lacks '" << (part) << "'"

Image decode(const Bytes& bytes, const std::string& name = "test") {
  return decode_image(bytes.data(), bytes.size(), name);
}

// ---------------------------------------------------------------------------------------------
// A few lines of safetensors reading (8-byte little-endian header length, JSON header, raw data),
// enough for the golden file, so this test does not depend on the library's checkpoint reader.
struct SafeTensorsFile {
  Bytes bytes;
  nlohmann::json header;
  size_t data_start = 0;

  explicit SafeTensorsFile(const std::string& path) : bytes(read_bytes(path)) {
    if (bytes.size() < 8) throw std::runtime_error("short safetensors file " + path);
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = n << 8 | bytes[i];
    header = nlohmann::json::parse(bytes.begin() + 8, bytes.begin() + 8 + static_cast<std::ptrdiff_t>(n));
    data_start = 8 + n;
  }
  const uint8_t* data(const std::string& name, const std::string& dtype, std::vector<int64_t>& shape) const {
    const auto& t = header.at(name);
    EXPECT_EQ(t.at("dtype").get<std::string>(), dtype) << name;
    shape = t.at("shape").get<std::vector<int64_t>>();
    return bytes.data() + data_start + t.at("data_offsets")[0].get<size_t>();
  }
  std::vector<int32_t> i32(const std::string& name) const {
    std::vector<int64_t> shape;
    const uint8_t* p = data(name, "I32", shape);
    std::vector<int32_t> v(static_cast<size_t>(shape.at(0)));
    std::memcpy(v.data(), p, v.size() * 4);
    return v;
  }
};

// ---------------------------------------------------------------------------------------------
// Golden: PIL's decode + resize of the sample photos, to the last bit.

struct GoldenCase {
  const char* model;
  const char* image;
  int width, height;
};

class ResizedGolden : public ::testing::TestWithParam<GoldenCase> {};

TEST_P(ResizedGolden, DecodeAndResizeMatchPillow) {
  SEGANY_REQUIRE_GOLDEN();
  const GoldenCase& c = GetParam();
  SafeTensorsFile golden(test::golden_dir() + "/" + c.model + "/golden.safetensors");
  const Image im = load_image(image_path(c.image));
  ASSERT_EQ(im.width, c.width);
  ASSERT_EQ(im.height, c.height);
  EXPECT_EQ(golden.i32("image.original"), (std::vector<int32_t>{im.height, im.width}));

  int h = 0, w = 0;
  resized_shape(im.height, im.width, 1024, h, w);
  EXPECT_EQ(golden.i32("image.input"), (std::vector<int32_t>{h, w}));

  std::vector<int64_t> shape;
  const uint8_t* want = golden.data("image.resized_u8", "U8", shape);
  ASSERT_EQ(shape, (std::vector<int64_t>{h, w, 3}));
  const Image got = resize_bilinear_pil(im, w, h);
  ASSERT_EQ(got.rgb.size(), static_cast<size_t>(h) * w * 3);

  int64_t values_off = 0, pixels_off = 0;
  int max_diff = 0;
  for (int64_t p = 0; p < int64_t{h} * w; ++p) {
    bool off = false;
    for (int ch = 0; ch < 3; ++ch) {
      const int d = std::abs(int{got.rgb[p * 3 + ch]} - int{want[p * 3 + ch]});
      max_diff = std::max(max_diff, d);
      values_off += d != 0;
      off |= d != 0;
    }
    pixels_off += off;
  }
  std::printf("[ golden   ] %s (%s, %dx%d -> %dx%d): %lld of %lld pixels differ (%lld values), max abs diff %d\n",
              c.image, c.model, im.width, im.height, w, h, static_cast<long long>(pixels_off),
              static_cast<long long>(int64_t{h} * w), static_cast<long long>(values_off), max_diff);
  // golden/README.md: max abs difference 1, on under 1% of pixels.
  EXPECT_LE(max_diff, 1);
  EXPECT_LT(static_cast<double>(pixels_off), 0.01 * h * w);
}

INSTANTIATE_TEST_SUITE_P(Images, ResizedGolden,
                         ::testing::Values(GoldenCase{"micro_h80", "truck.jpg", 1800, 1200},
                                           GoldenCase{"micro_h64", "dog.jpg", 800, 534}),
                         [](const auto& info) { return std::string(info.param.model); });

// ---------------------------------------------------------------------------------------------
// resized_shape, resize, preprocess

TEST(Preprocess, ResizedShapeIsResizeLongestSide) {
  int h = 0, w = 0;
  resized_shape(1200, 1800, 1024, h, w);
  EXPECT_EQ(h, 683);  // 1200 * 1024 / 1800 = 682.67
  EXPECT_EQ(w, 1024);
  resized_shape(1800, 1200, 1024, h, w);
  EXPECT_EQ(h, 1024);
  EXPECT_EQ(w, 683);
  resized_shape(534, 800, 1024, h, w);
  EXPECT_EQ(h, 684);  // 683.52
  EXPECT_EQ(w, 1024);
  resized_shape(1024, 1024, 1024, h, w);
  EXPECT_EQ(h, 1024);
  EXPECT_EQ(w, 1024);
  resized_shape(100, 50, 1024, h, w);  // upscaling
  EXPECT_EQ(h, 1024);
  EXPECT_EQ(w, 512);
  EXPECT_THROW(resized_shape(0, 10, 1024, h, w), Error);
}

Image solid_row(std::vector<uint8_t> values) {
  Image im;
  im.width = static_cast<int>(values.size());
  im.height = 1;
  for (uint8_t v : values) im.rgb.insert(im.rgb.end(), {v, v, v});
  return im;
}

TEST(Preprocess, ResizeBilinearByHand) {
  // Shrinking 4 -> 2: the triangle is stretched to support 2 (antialiasing). Output 0 has taps on
  // inputs 0..2 with weights 0.75, 0.75, 0.25 (normalised by 1.75): (100*0.75 + 200*0.25) / 1.75 =
  // 71.4; output 1 on inputs 1..3: (100*0.25 + 200*0.75 + 255*0.75) / 1.75 = 209.3.
  Image small = resize_bilinear_pil(solid_row({0, 100, 200, 255}), 2, 1);
  ASSERT_EQ(small.width, 2);
  ASSERT_EQ(small.height, 1);
  EXPECT_EQ(small.rgb, (std::vector<uint8_t>{71, 71, 71, 209, 209, 209}));
  // Growing 2 -> 4: plain linear interpolation at centres 0.25, 0.75, 1.25, 1.75, clamped at edges.
  Image big = resize_bilinear_pil(solid_row({0, 100}), 4, 1);
  ASSERT_EQ(big.width, 4);
  EXPECT_EQ(big.rgb, (std::vector<uint8_t>{0, 0, 0, 25, 25, 25, 75, 75, 75, 100, 100, 100}));
  // The same size is a copy; a flat image stays flat.
  Image flat;
  flat.width = 37;
  flat.height = 23;
  flat.rgb.assign(37 * 23 * 3, 77);
  EXPECT_EQ(resize_bilinear_pil(flat, 37, 23).rgb, flat.rgb);
  Image flat2 = resize_bilinear_pil(flat, 11, 50);
  EXPECT_EQ(flat2.width, 11);
  EXPECT_EQ(flat2.height, 50);
  EXPECT_TRUE(std::all_of(flat2.rgb.begin(), flat2.rgb.end(), [](uint8_t v) { return v == 77; }));
  EXPECT_THROW(resize_bilinear_pil(flat, 0, 5), Error);
}

Image pattern_image(int w, int h) {
  Image im;
  im.width = w;
  im.height = h;
  im.rgb.resize(static_cast<size_t>(w) * h * 3);
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x) {
      uint8_t* p = im.pixel(x, y);
      p[0] = static_cast<uint8_t>(x * 7 + y * 3);
      p[1] = static_cast<uint8_t>(x * y + 11);
      p[2] = static_cast<uint8_t>(255 - x * 5);
    }
  return im;
}

TEST(Preprocess, NormalisesAndPadsWithZeros) {
  for (auto [w, h] : {std::pair{40, 30}, std::pair{30, 40}}) {
    const Image im = pattern_image(w, h);
    const Preprocessed p = preprocess(im, 64);
    const int rh = h > w ? 64 : 48, rw = h > w ? 48 : 64;
    EXPECT_EQ(p.input_h, rh);
    EXPECT_EQ(p.input_w, rw);
    EXPECT_EQ(p.original_h, h);
    EXPECT_EQ(p.original_w, w);
    ASSERT_EQ(p.input.shape(), (Shape{1, 64, 64, 3}));
    ASSERT_EQ(p.input.dtype(), DType::F32);
    const Image resized = resize_bilinear_pil(im, rw, rh);
    const float* x = p.input.data_as<const float>();
    int64_t checked = 0;
    for (int y = 0; y < 64; ++y)
      for (int xx = 0; xx < 64; ++xx)
        for (int c = 0; c < 3; ++c) {
          const float v = x[(y * 64 + xx) * 3 + c];
          if (y >= rh || xx >= rw) {
            ASSERT_EQ(v, 0.0f) << "padding at " << xx << "," << y;
          } else {
            // Sam.preprocess in float32: (pixel - mean) / std, exactly.
            const float want = (static_cast<float>(resized.pixel(xx, y)[c]) - kPixelMean[c]) / kPixelStd[c];
            ASSERT_EQ(v, want) << "at " << xx << "," << y << " channel " << c;
            ++checked;
          }
        }
    EXPECT_EQ(checked, int64_t{rh} * rw * 3);
  }
  // A few values by hand: 0 -> -mean/std, 255 -> (255 - mean)/std.
  Image black;
  black.width = black.height = 2;
  black.rgb = {0, 0, 0, 255, 255, 255, 0, 0, 0, 255, 255, 255};
  const Preprocessed p = preprocess(black, 2);
  const float* x = p.input.data_as<const float>();
  EXPECT_FLOAT_EQ(x[0], -123.675f / 58.395f);
  EXPECT_FLOAT_EQ(x[1], -116.28f / 57.12f);
  EXPECT_FLOAT_EQ(x[2], -103.53f / 57.375f);
  EXPECT_FLOAT_EQ(x[3], (255 - 123.675f) / 58.395f);
  EXPECT_FLOAT_EQ(x[5], (255 - 103.53f) / 57.375f);
}

TEST(Preprocess, RefusesImagesThatVanish) {
  Image thin;
  thin.width = 5000;
  thin.height = 1;
  thin.rgb.assign(5000 * 3, 1);
  EXPECT_CONTAINS(error_of([&] { preprocess(thin, 1024); }), "too thin");
}

// ---------------------------------------------------------------------------------------------
// JPEG: the sample photos, orientation, colour spaces, broken files

TEST(Jpeg, DecodesSamplePhotos) {
  REQUIRE_SAMPLE_IMAGES();
  const Image truck = load_image(image_path("truck.jpg"));  // 4:2:0 chroma, fancy upsampling
  EXPECT_EQ(truck.width, 1800);
  EXPECT_EQ(truck.height, 1200);
  EXPECT_EQ(truck.rgb.size(), 1800u * 1200 * 3);
  const Image dog = load_image(image_path("dog.jpg"));  // Exif without orientation, XMP, Adobe
  EXPECT_EQ(dog.width, 800);
  EXPECT_EQ(dog.height, 534);
}

// A JPEG segment: marker, 2-byte big-endian length (counting itself), payload.
Bytes segment(uint8_t marker, const Bytes& payload) {
  Bytes s(payload.size() + 4);
  s[0] = 0xFF;
  s[1] = marker;
  s[2] = static_cast<uint8_t>((payload.size() + 2) >> 8);
  s[3] = static_cast<uint8_t>(payload.size() + 2);
  std::copy(payload.begin(), payload.end(), s.begin() + 4);
  return s;
}
Bytes with_segment_at(const Bytes& jpeg, size_t at, const Bytes& seg) {
  // Sized up front rather than grown with insert(), which trips GCC 12's -Warray-bounds.
  Bytes out(jpeg.size() + seg.size());
  auto split = jpeg.begin() + static_cast<std::ptrdiff_t>(at);
  std::copy(seg.begin(), seg.end(), std::copy(jpeg.begin(), split, out.begin()));
  std::copy(split, jpeg.end(), out.begin() + static_cast<std::ptrdiff_t>(at + seg.size()));
  return out;
}
// Offset of the first segment that is not an APPn one (where the tables start).
size_t after_app_segments(const Bytes& jpeg) {
  size_t i = 2;
  while (i + 4 <= jpeg.size() && jpeg[i] == 0xFF && jpeg[i + 1] >= 0xE0 && jpeg[i + 1] <= 0xEF)
    i += 2 + (jpeg[i + 2] << 8 | jpeg[i + 3]);
  return i;
}
size_t find_marker(const Bytes& jpeg, uint8_t marker) {
  size_t i = 2;
  while (i + 4 <= jpeg.size() && jpeg[i] == 0xFF && jpeg[i + 1] != marker) i += 2 + (jpeg[i + 2] << 8 | jpeg[i + 3]);
  return i;
}

// An Exif APP1 payload whose IFD0 holds one Orientation entry (SHORT).
Bytes exif_payload(int orientation, bool big_endian) {
  auto u16 = [&](Bytes& b, int v) {
    if (big_endian) b.insert(b.end(), {static_cast<uint8_t>(v >> 8), static_cast<uint8_t>(v)});
    else b.insert(b.end(), {static_cast<uint8_t>(v), static_cast<uint8_t>(v >> 8)});
  };
  auto u32 = [&](Bytes& b, uint32_t v) {
    if (big_endian) { u16(b, static_cast<int>(v >> 16)); u16(b, static_cast<int>(v & 0xFFFF)); }
    else { u16(b, static_cast<int>(v & 0xFFFF)); u16(b, static_cast<int>(v >> 16)); }
  };
  Bytes b = {'E', 'x', 'i', 'f', 0, 0};
  if (big_endian) b.insert(b.end(), {'M', 'M', 0, 42});
  else b.insert(b.end(), {'I', 'I', 42, 0});
  u32(b, 8);                // IFD0 right after the header
  u16(b, 2);                // two entries: an unrelated one, then Orientation
  u16(b, 0x010F); u16(b, 2); u32(b, 4); b.insert(b.end(), {'A', 'B', 'C', 0});  // Make = "ABC"
  u16(b, 0x0112); u16(b, 3); u32(b, 1); u16(b, orientation); u16(b, 0);
  u32(b, 0);                // no IFD1
  return b;
}

// exif_transpose's operations, composed from flips and the transpose (another route to the same
// eight results than the decoder's index arithmetic).
Image flip_lr(const Image& a) {
  Image o = a;
  for (int y = 0; y < a.height; ++y)
    for (int x = 0; x < a.width; ++x) std::memcpy(o.pixel(x, y), a.pixel(a.width - 1 - x, y), 3);
  return o;
}
Image flip_tb(const Image& a) {
  Image o = a;
  for (int y = 0; y < a.height; ++y)
    for (int x = 0; x < a.width; ++x) std::memcpy(o.pixel(x, y), a.pixel(x, a.height - 1 - y), 3);
  return o;
}
Image transpose(const Image& a) {
  Image o = a;
  std::swap(o.width, o.height);
  for (int y = 0; y < o.height; ++y)
    for (int x = 0; x < o.width; ++x) std::memcpy(o.pixel(x, y), a.pixel(y, x), 3);
  return o;
}
Image oriented(const Image& a, int orientation) {
  switch (orientation) {
    case 2: return flip_lr(a);                     // FLIP_LEFT_RIGHT
    case 3: return flip_tb(flip_lr(a));            // ROTATE_180
    case 4: return flip_tb(a);                     // FLIP_TOP_BOTTOM
    case 5: return transpose(a);                   // TRANSPOSE
    case 6: return flip_lr(transpose(a));          // ROTATE_270: 90 degrees clockwise
    case 7: return flip_tb(flip_lr(transpose(a)));  // TRANSVERSE
    case 8: return flip_tb(transpose(a));          // ROTATE_90: 90 degrees counter-clockwise
    default: return a;
  }
}

TEST(Jpeg, ExifOrientationAsExifTranspose) {
  REQUIRE_SAMPLE_IMAGES();
  const Bytes dog = read_bytes(image_path("dog.jpg"));
  const Image plain = decode(dog);
  for (bool big_endian : {false, true}) {
    for (int o = 1; o <= 8; ++o) {
      // Right after SOI, so it is the first Exif segment (the one PIL reads), ahead of dog.jpg's own.
      const Image im = decode(with_segment_at(dog, 2, segment(0xE1, exif_payload(o, big_endian))));
      const Image want = oriented(plain, o);
      EXPECT_EQ(im.width, o >= 5 ? plain.height : plain.width) << "orientation " << o;
      EXPECT_EQ(im.height, o >= 5 ? plain.width : plain.height) << "orientation " << o;
      EXPECT_TRUE(im.rgb == want.rgb) << "orientation " << o << (big_endian ? " (MM)" : " (II)");
    }
  }
  // Orientation 6 means "turn clockwise to view": the bottom-left pixel becomes the top-left one.
  const Image cw = decode(with_segment_at(dog, 2, segment(0xE1, exif_payload(6, false))));
  EXPECT_EQ(std::memcmp(cw.pixel(0, 0), plain.pixel(0, plain.height - 1), 3), 0);
  EXPECT_EQ(std::memcmp(cw.pixel(cw.width - 1, 0), plain.pixel(0, 0), 3), 0);
  // Values outside 1..8 change nothing.
  EXPECT_TRUE(decode(with_segment_at(dog, 2, segment(0xE1, exif_payload(9, false)))).rgb == plain.rgb);
}

TEST(Jpeg, XmpOrientationWhenExifHasNone) {
  REQUIRE_SAMPLE_IMAGES();
  // dog.jpg's Exif block has no Orientation; PIL then reads the (last) XMP packet's.
  const Bytes dog = read_bytes(image_path("dog.jpg"));
  const Image plain = decode(dog);
  const std::string xmp = std::string("http://ns.adobe.com/xap/1.0/") + '\0' +
                          "<x:xmpmeta><rdf:Description tiff:Orientation=\"8\"/></x:xmpmeta>";
  const Image im = decode(with_segment_at(dog, after_app_segments(dog), segment(0xE1, Bytes(xmp.begin(), xmp.end()))));
  EXPECT_EQ(im.width, plain.height);
  EXPECT_TRUE(im.rgb == oriented(plain, 8).rgb);
  // An Exif Orientation (even 1) wins over XMP.
  Bytes both = with_segment_at(dog, after_app_segments(dog), segment(0xE1, Bytes(xmp.begin(), xmp.end())));
  both = with_segment_at(both, 2, segment(0xE1, exif_payload(1, true)));
  EXPECT_TRUE(decode(both).rgb == plain.rgb);
}

TEST(Jpeg, BrokenExifIsIgnored) {
  REQUIRE_SAMPLE_IMAGES();
  const Bytes dog = read_bytes(image_path("dog.jpg"));
  const Image plain = decode(dog);
  Bytes bad_offset = exif_payload(6, false);
  bad_offset[6 + 4] = 0xF0;  // IFD0 offset far past the end
  Bytes cut = exif_payload(6, true);
  cut.resize(20);            // ends inside the first entry
  Bytes junk = {'E', 'x', 'i', 'f', 0, 0, 'X', 'X', 1, 2};
  for (const Bytes& payload : {bad_offset, cut, junk, Bytes{'E', 'x', 'i', 'f', 0, 0}}) {
    const Image im = decode(with_segment_at(dog, 2, segment(0xE1, payload)));
    EXPECT_EQ(im.width, plain.width);
    EXPECT_TRUE(im.rgb == plain.rgb);
  }
  // An entry count beyond the block: the entries that are there still count, as in PIL (its IFD
  // reader keeps the tags read before the damage).
  Bytes bad_count = exif_payload(6, false);
  bad_count[6 + 8] = 0xFF;   // 65535 entries in a block that holds 2
  bad_count[6 + 9] = 0xFF;
  EXPECT_TRUE(decode(with_segment_at(dog, 2, segment(0xE1, bad_count))).rgb == oriented(plain, 6).rgb);
}

// Compresses pixels with libjpeg (default error handling: these inputs are valid).
Bytes encode_jpeg(int w, int h, int components, J_COLOR_SPACE in_space, J_COLOR_SPACE file_space, const Bytes& pixels,
                  bool progressive = false) {
  jpeg_compress_struct c{};
  jpeg_error_mgr err{};
  c.err = jpeg_std_error(&err);
  jpeg_create_compress(&c);
  unsigned char* buffer = nullptr;
  unsigned long size = 0;
  jpeg_mem_dest(&c, &buffer, &size);
  c.image_width = static_cast<JDIMENSION>(w);
  c.image_height = static_cast<JDIMENSION>(h);
  c.input_components = components;
  c.in_color_space = in_space;
  jpeg_set_defaults(&c);
  jpeg_set_colorspace(&c, file_space);
  jpeg_set_quality(&c, 95, TRUE);
  if (progressive) jpeg_simple_progression(&c);
  jpeg_start_compress(&c, TRUE);
  while (c.next_scanline < c.image_height) {
    JSAMPROW row = const_cast<uint8_t*>(pixels.data()) + static_cast<size_t>(c.next_scanline) * w * components;
    jpeg_write_scanlines(&c, &row, 1);
  }
  jpeg_finish_compress(&c);
  Bytes out(buffer, buffer + size);
  std::free(buffer);  // jpeg_mem_dest's buffer is malloc'ed by libjpeg
  jpeg_destroy_compress(&c);
  return out;
}

// libjpeg's own decode into `space`, for comparison.
Bytes decode_raw(const Bytes& jpeg, J_COLOR_SPACE space) {
  jpeg_decompress_struct d{};
  jpeg_error_mgr err{};
  d.err = jpeg_std_error(&err);
  jpeg_create_decompress(&d);
  jpeg_mem_src(&d, jpeg.data(), static_cast<unsigned long>(jpeg.size()));
  jpeg_read_header(&d, TRUE);
  d.out_color_space = space;
  jpeg_start_decompress(&d);
  Bytes out(static_cast<size_t>(d.output_width) * d.output_height * d.output_components);
  while (d.output_scanline < d.output_height) {
    JSAMPROW row = out.data() + static_cast<size_t>(d.output_scanline) * d.output_width * d.output_components;
    jpeg_read_scanlines(&d, &row, 1);
  }
  jpeg_finish_decompress(&d);
  jpeg_destroy_decompress(&d);
  return out;
}

TEST(Jpeg, GrayscaleBecomesGrayRgb) {
  const int w = 40, h = 24;
  Bytes gray(w * h);
  for (int i = 0; i < w * h; ++i) gray[i] = static_cast<uint8_t>(i * 13 % 251);
  const Bytes jpeg = encode_jpeg(w, h, 1, JCS_GRAYSCALE, JCS_GRAYSCALE, gray);
  const Bytes want = decode_raw(jpeg, JCS_GRAYSCALE);
  const Image im = decode(jpeg);
  ASSERT_EQ(im.width, w);
  ASSERT_EQ(im.height, h);
  for (int i = 0; i < w * h; ++i)
    for (int c = 0; c < 3; ++c) ASSERT_EQ(im.rgb[i * 3 + c], want[i]) << "pixel " << i;
}

// PIL opens 4-component JPEGs as inverted ("Adobe") CMYK and converts with cmyk2rgb.
uint8_t pil_cmyk_channel(uint8_t raw_c, uint8_t raw_k) {
  const int c = 255 - raw_c, k = 255 - raw_k, nk = 255 - k;
  const int t = c * nk + 128;
  return static_cast<uint8_t>(std::clamp(nk - (((t >> 8) + t) >> 8), 0, 255));
}

TEST(Jpeg, CmykAndYcckAsPil) {
  // Four flat 16x16 quadrants of raw (Adobe-inverted) CMYK: no ink, full K, cyan ink, a mix.
  const int w = 32, h = 32;
  const uint8_t quads[4][4] = {{255, 255, 255, 255}, {255, 255, 255, 0}, {0, 255, 255, 255}, {200, 120, 60, 180}};
  Bytes cmyk(w * h * 4);
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x) std::memcpy(&cmyk[(y * w + x) * 4], quads[(y / 16) * 2 + x / 16], 4);
  for (J_COLOR_SPACE file_space : {JCS_CMYK, JCS_YCCK}) {
    const Bytes jpeg = encode_jpeg(w, h, 4, JCS_CMYK, file_space, cmyk);
    const Bytes raw = decode_raw(jpeg, JCS_CMYK);
    const Image im = decode(jpeg);
    ASSERT_EQ(im.width, w);
    ASSERT_EQ(im.height, h);
    for (int i = 0; i < w * h; ++i)
      for (int c = 0; c < 3; ++c)
        ASSERT_EQ(im.rgb[i * 3 + c], pil_cmyk_channel(raw[i * 4 + c], raw[i * 4 + 3])) << "pixel " << i;
    // What the quadrants mean (JPEG loss and YCCK rounding allow a few units).
    auto near = [&](int x, int y, int r, int g, int b) {
      const uint8_t* p = im.pixel(x, y);
      EXPECT_NEAR(p[0], r, 3);
      EXPECT_NEAR(p[1], g, 3);
      EXPECT_NEAR(p[2], b, 3);
    };
    near(8, 8, 255, 255, 255);  // no ink: white
    near(24, 8, 0, 0, 0);       // full black
    near(8, 24, 0, 255, 255);   // cyan
  }
}

TEST(Jpeg, ProgressiveDecodesAndTruncatedFails) {
  const Image src = pattern_image(96, 64);
  const Bytes jpeg = encode_jpeg(96, 64, 3, JCS_RGB, JCS_YCbCr, src.rgb, /*progressive=*/true);
  const Image im = decode(jpeg);
  EXPECT_EQ(im.width, 96);
  EXPECT_TRUE(im.rgb == decode_raw(jpeg, JCS_RGB));
  for (double f : {0.3, 0.7, 0.9}) {
    const Bytes cut(jpeg.begin(), jpeg.begin() + static_cast<std::ptrdiff_t>(jpeg.size() * f));
    EXPECT_THROW(decode(cut), Error) << "cut at " << f;
  }
}

TEST(Jpeg, TruncatedFileIsAnError) {
  REQUIRE_SAMPLE_IMAGES();
  // libjpeg would warn and fill the rest with gray; PIL (and we) refuse.
  const Bytes dog = read_bytes(image_path("dog.jpg"));
  for (double f : {0.0001, 0.002, 0.01, 0.05, 0.3, 0.6, 0.9, 0.95}) {
    const Bytes cut(dog.begin(), dog.begin() + static_cast<std::ptrdiff_t>(dog.size() * f));
    const std::string msg = error_of([&] { decode(cut, "cut.jpg"); });
    EXPECT_CONTAINS(msg, "cannot read image 'cut.jpg'");
  }
  const std::string dir = test::temp_dir("image_truncated");
  const Bytes truck = read_bytes(image_path("truck.jpg"));
  write_bytes(dir + "/half.jpg", Bytes(truck.begin(), truck.begin() + static_cast<std::ptrdiff_t>(truck.size() / 2)));
  const std::string msg = error_of([&] { load_image(dir + "/half.jpg"); });
  EXPECT_CONTAINS(msg, "half.jpg");
  EXPECT_CONTAINS(msg, "Premature end of JPEG file");
}

TEST(Jpeg, CorruptBytesNeverCrash) {
  REQUIRE_SAMPLE_IMAGES();
  // Random damage must end in an image or a segany::Error, never in a crash (run under ASan to
  // make this stricter).
  const Bytes dog = read_bytes(image_path("dog.jpg"));
  std::mt19937 rng(1234);
  int decoded = 0, refused = 0;
  for (int trial = 0; trial < 60; ++trial) {
    Bytes bad = dog;
    const int hits = 1 + trial % 8;
    for (int i = 0; i < hits; ++i) {
      // Half the damage in the headers (the first 1.5 KB), half anywhere.
      const size_t limit = (i % 2) ? bad.size() : std::min<size_t>(1500, bad.size());
      bad[rng() % limit] = static_cast<uint8_t>(rng());
    }
    try {
      const Image im = decode(bad);
      EXPECT_EQ(im.rgb.size(), static_cast<size_t>(im.width) * im.height * 3);
      ++decoded;
    } catch (const Error&) {
      ++refused;
    }
  }
  std::printf("[ corrupt  ] 60 damaged JPEGs: %d decoded, %d refused\n", decoded, refused);
}

TEST(Jpeg, HugeDimensionsRefusedFromHeader) {
  REQUIRE_SAMPLE_IMAGES();
  Bytes dog = read_bytes(image_path("dog.jpg"));
  const size_t sof = find_marker(dog, 0xC0);
  ASSERT_LT(sof + 9, dog.size());
  // SOF0: FF C0, length, precision, height (2), width (2).
  dog[sof + 5] = 40000 >> 8;
  dog[sof + 6] = 40000 & 0xFF;
  dog[sof + 7] = 40000 >> 8;
  dog[sof + 8] = 40000 & 0xFF;
  const std::string msg = error_of([&] { decode(dog, "x.jpg"); });
  EXPECT_CONTAINS(msg, "image 'x.jpg' is 40000x40000 pixels; the limit is");
}

// ---------------------------------------------------------------------------------------------
// Not images, missing files

TEST(ImageFile, NotAnImage) {
  const std::string dir = test::temp_dir("image_not");
  const std::string text = dir + "/notes.jpg";
  write_bytes(text, Bytes{'h', 'e', 'l', 'l', 'o', '\n'});
  EXPECT_EQ(error_of([&] { load_image(text); }), "cannot read image '" + text + "': not a JPEG or PNG file");
  write_bytes(dir + "/empty.png", Bytes{});
  EXPECT_CONTAINS(error_of([&] { load_image(dir + "/empty.png"); }), "not a JPEG or PNG file");
  EXPECT_CONTAINS(error_of([&] { decode_image(nullptr, 0); }), "<memory>");
}

TEST(ImageFile, MissingFileNamesThePath) {
  const std::string path = test::temp_dir("image_missing") + "/no_such.jpg";
  const std::string msg = error_of([&] { load_image(path); });
  EXPECT_CONTAINS(msg, "'" + path + "'");
  EXPECT_CONTAINS(msg, "No such file");
  EXPECT_CONTAINS(error_of([&] { load_image(test::temp_dir("image_dir")); }), "cannot read image");
}

// ---------------------------------------------------------------------------------------------
// PNG: save/load round trips, and files of every colour type written by hand (stored deflate
// blocks, no compression library needed) to check what PIL's convert("RGB") would give.

uint32_t crc32(const uint8_t* p, size_t n, uint32_t crc = 0) {
  crc = ~crc;
  for (size_t i = 0; i < n; ++i) {
    crc ^= p[i];
    for (int k = 0; k < 8; ++k) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
  }
  return ~crc;
}

void put_u32be(Bytes& b, uint32_t v) {
  b.insert(b.end(), {static_cast<uint8_t>(v >> 24), static_cast<uint8_t>(v >> 16), static_cast<uint8_t>(v >> 8),
                     static_cast<uint8_t>(v)});
}

void put_chunk(Bytes& png, const char* type, const Bytes& data) {
  put_u32be(png, static_cast<uint32_t>(data.size()));
  const size_t start = png.size();
  png.insert(png.end(), type, type + 4);
  png.insert(png.end(), data.begin(), data.end());
  put_u32be(png, crc32(png.data() + start, png.size() - start));
}

struct PngChunk {
  const char* type;
  Bytes data;
};

// A PNG of `rows` (each already packed at `bit_depth`), with `extra` chunks before the image data.
Bytes make_png(uint32_t w, uint32_t h, int bit_depth, int color_type, const std::vector<Bytes>& rows,
               const std::vector<PngChunk>& extra = {}) {
  Bytes png = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  Bytes ihdr;
  put_u32be(ihdr, w);
  put_u32be(ihdr, h);
  ihdr.insert(ihdr.end(), {static_cast<uint8_t>(bit_depth), static_cast<uint8_t>(color_type), 0, 0, 0});
  put_chunk(png, "IHDR", ihdr);
  for (const PngChunk& c : extra) put_chunk(png, c.type, c.data);
  Bytes raw;  // filter type 0 before each row
  for (const Bytes& r : rows) {
    raw.push_back(0);
    raw.insert(raw.end(), r.begin(), r.end());
  }
  Bytes z = {0x78, 0x01};  // zlib header, then stored blocks of up to 65535 bytes
  size_t at = 0;
  do {
    const size_t n = std::min<size_t>(65535, raw.size() - at);
    const bool last = at + n == raw.size();
    z.insert(z.end(), {static_cast<uint8_t>(last), static_cast<uint8_t>(n), static_cast<uint8_t>(n >> 8),
                       static_cast<uint8_t>(~n), static_cast<uint8_t>(~n >> 8)});
    z.insert(z.end(), raw.begin() + static_cast<std::ptrdiff_t>(at), raw.begin() + static_cast<std::ptrdiff_t>(at + n));
    at += n;
  } while (at < raw.size());
  uint32_t a = 1, b = 0;  // Adler-32
  for (uint8_t v : raw) a = (a + v) % 65521, b = (b + a) % 65521;
  put_u32be(z, b << 16 | a);
  put_chunk(png, "IDAT", z);
  put_chunk(png, "IEND", {});
  return png;
}

// An 8-bit RGB PNG with Adam7 interlacing: seven passes, each a sub-image of every dx-th pixel
// from (x0, y0) on every dy-th row, with its own filter bytes; empty passes are left out.
Bytes make_interlaced_png(const Image& im) {
  static constexpr int kPasses[7][4] = {{0, 0, 8, 8}, {4, 0, 8, 8}, {0, 4, 4, 8}, {2, 0, 4, 4},
                                        {0, 2, 2, 4}, {1, 0, 2, 2}, {0, 1, 1, 2}};  // x0, y0, dx, dy
  Bytes raw;
  for (const auto& p : kPasses) {
    if (p[0] >= im.width || p[1] >= im.height) continue;
    for (int y = p[1]; y < im.height; y += p[3]) {
      raw.push_back(0);
      for (int x = p[0]; x < im.width; x += p[2]) raw.insert(raw.end(), im.pixel(x, y), im.pixel(x, y) + 3);
    }
  }
  // make_png adds a filter byte per row: hand it the whole stream as one "row" of a 1-row image,
  // then patch IHDR's height and interlace method, and the CRCs that cover them.
  Bytes png = make_png(static_cast<uint32_t>(im.width), 1, 8, 2, {Bytes(raw.begin() + 1, raw.end())});
  png[20] = static_cast<uint8_t>(im.height >> 24);
  png[21] = static_cast<uint8_t>(im.height >> 16);
  png[22] = static_cast<uint8_t>(im.height >> 8);
  png[23] = static_cast<uint8_t>(im.height);
  png[28] = 1;  // Adam7
  const uint32_t crc = crc32(png.data() + 12, 17);
  png[29] = static_cast<uint8_t>(crc >> 24);
  png[30] = static_cast<uint8_t>(crc >> 16);
  png[31] = static_cast<uint8_t>(crc >> 8);
  png[32] = static_cast<uint8_t>(crc);
  return png;
}

// The RGB that an image of gray values should decode to.
Bytes gray_rgb(const Bytes& gray) {
  Bytes rgb;
  for (uint8_t g : gray) rgb.insert(rgb.end(), {g, g, g});
  return rgb;
}

TEST(Png, SaveLoadRoundTrip) {
  const std::string dir = test::temp_dir("image_png");
  const Image im = pattern_image(37, 21);
  save_png(dir + "/rgb.png", im);
  const Image back = load_image(dir + "/rgb.png");
  EXPECT_EQ(back.width, 37);
  EXPECT_EQ(back.height, 21);
  EXPECT_TRUE(back.rgb == im.rgb);

  Bytes gray(37 * 21);
  for (size_t i = 0; i < gray.size(); ++i) gray[i] = static_cast<uint8_t>(i * 7);
  save_png(dir + "/gray.png", gray.data(), 37, 21, 1);
  const Image g = load_image(dir + "/gray.png");
  EXPECT_EQ(g.width, 37);
  EXPECT_TRUE(g.rgb == gray_rgb(gray));
}

TEST(Png, SaveErrorsNameThePath) {
  const std::string path = test::temp_dir("image_png_err") + "/no/such/folder/out.png";
  const Image im = pattern_image(4, 4);
  EXPECT_CONTAINS(error_of([&] { save_png(path, im); }), "'" + path + "'");
  EXPECT_CONTAINS(error_of([&] { save_png(path, im.rgb.data(), 4, 4, 2); }), "channels");
  EXPECT_CONTAINS(error_of([&] { save_png(path, im.rgb.data(), 0, 4, 3); }), "'" + path + "'");
}

TEST(Png, EveryColourTypeAsPilConvertRgb) {
  // 8-bit gray
  EXPECT_TRUE(decode(make_png(3, 1, 8, 0, {{0, 128, 255}})).rgb == gray_rgb({0, 128, 255}));
  // 1-, 2-, 4-bit gray scale up to 0..255 (bit replication, as PIL's "1", "L;2", "L;4")
  EXPECT_TRUE(decode(make_png(10, 1, 1, 0, {{0b10110000, 0b01000000}})).rgb ==
              gray_rgb({255, 0, 255, 255, 0, 0, 0, 0, 0, 255}));
  EXPECT_TRUE(decode(make_png(4, 1, 2, 0, {{0b00011011}})).rgb == gray_rgb({0, 85, 170, 255}));
  EXPECT_TRUE(decode(make_png(3, 1, 4, 0, {{0x0F, 0x70}})).rgb == gray_rgb({0, 255, 119}));
  // 16-bit gray and RGB keep the high byte
  EXPECT_TRUE(decode(make_png(2, 1, 16, 0, {{0x12, 0xFF, 0xAB, 0x01}})).rgb == gray_rgb({0x12, 0xAB}));
  EXPECT_TRUE(decode(make_png(1, 1, 16, 2, {{1, 2, 3, 4, 5, 6}})).rgb == (Bytes{1, 3, 5}));
  // gray + alpha, RGBA (8 and 16 bit): alpha dropped, not blended
  EXPECT_TRUE(decode(make_png(2, 1, 8, 4, {{10, 0, 200, 255}})).rgb == gray_rgb({10, 200}));
  EXPECT_TRUE(decode(make_png(2, 1, 8, 6, {{1, 2, 3, 0, 4, 5, 6, 128}})).rgb == (Bytes{1, 2, 3, 4, 5, 6}));
  EXPECT_TRUE(decode(make_png(1, 1, 16, 6, {{9, 0, 8, 0, 7, 0, 0, 0}})).rgb == (Bytes{9, 8, 7}));
  // palette, with transparency that convert("RGB") ignores, at 8 and 4 bits
  const std::vector<PngChunk> palette = {{"PLTE", {10, 20, 30, 40, 50, 60, 70, 80, 90}}, {"tRNS", {0, 128}}};
  EXPECT_TRUE(decode(make_png(3, 1, 8, 3, {{2, 0, 1}}, palette)).rgb == (Bytes{70, 80, 90, 10, 20, 30, 40, 50, 60}));
  EXPECT_TRUE(decode(make_png(3, 1, 4, 3, {{0x12, 0x00}}, palette)).rgb ==
              (Bytes{40, 50, 60, 70, 80, 90, 10, 20, 30}));
  // RGB with a tRNS colour key: still plain RGB
  EXPECT_TRUE(decode(make_png(1, 2, 8, 2, {{1, 2, 3}, {4, 5, 6}}, {{"tRNS", {0, 1, 0, 2, 0, 3}}})).rgb ==
              (Bytes{1, 2, 3, 4, 5, 6}));
}

TEST(Png, Interlaced) {
  const Image im = pattern_image(37, 29);  // sizes that leave every pass ragged
  const Image back = decode(make_interlaced_png(im));
  EXPECT_EQ(back.width, 37);
  EXPECT_EQ(back.height, 29);
  EXPECT_TRUE(back.rgb == im.rgb);
}

TEST(Png, ExifOrientationChunk) {
  // eXIf holds the TIFF block without the "Exif\0\0" prefix.
  Image im = pattern_image(5, 3);
  std::vector<Bytes> rows;
  for (int y = 0; y < 3; ++y) rows.emplace_back(im.pixel(0, y), im.pixel(0, y) + 15);
  Bytes exif = exif_payload(6, true);
  exif.erase(exif.begin(), exif.begin() + 6);
  const Image turned = decode(make_png(5, 3, 8, 2, rows, {{"eXIf", exif}}));
  EXPECT_EQ(turned.width, 3);
  EXPECT_EQ(turned.height, 5);
  EXPECT_TRUE(turned.rgb == oriented(im, 6).rgb);
}

TEST(Png, HugeOrEmptyHeaderRefusedBeforeDecoding) {
  // Only a header and a tiny image data chunk: the size must be refused from IHDR alone.
  const Bytes huge = make_png(100000, 100000, 8, 2, {{0, 0, 0}});
  EXPECT_EQ(error_of([&] { decode(huge, "big.png"); }),
            "image 'big.png' is 100000x100000 pixels; the limit is 268435456 pixels (16384x16384)");
  Bytes header_only(huge.begin(), huge.begin() + 33);  // signature + IHDR
  EXPECT_CONTAINS(error_of([&] { decode(header_only, "big.png"); }), "100000x100000");
  EXPECT_CONTAINS(error_of([&] { decode(make_png(0, 5, 8, 2, {}), "zero.png"); }), "zero.png");
}

TEST(Png, TruncatedOrCorruptIsAnError) {
  const std::string dir = test::temp_dir("image_png_cut");
  save_png(dir + "/full.png", pattern_image(64, 48));
  const Bytes full = read_bytes(dir + "/full.png");
  for (double f : {0.01, 0.1, 0.3, 0.5, 0.8, 0.95}) {
    const Bytes cut(full.begin(), full.begin() + static_cast<std::ptrdiff_t>(full.size() * f));
    write_bytes(dir + "/cut.png", cut);
    EXPECT_CONTAINS(error_of([&] { load_image(dir + "/cut.png"); }), "cannot read image '" + dir + "/cut.png'");
  }
  Bytes bad_crc = full;
  bad_crc[45] ^= 0x55;  // inside the image data: the critical chunk's CRC no longer matches
  EXPECT_THROW(decode(bad_crc), Error);

  std::mt19937 rng(99);
  for (int trial = 0; trial < 40; ++trial) {
    Bytes bad = full;
    for (int i = 0; i <= trial % 4; ++i) bad[8 + rng() % (bad.size() - 8)] = static_cast<uint8_t>(rng());
    try {
      decode(bad);
    } catch (const Error&) {
    }
  }
}

}  // namespace
}  // namespace segany
