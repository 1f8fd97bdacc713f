// Image files in and out: JPEG through libjpeg(-turbo), PNG through libpng, both decoded the way
// PIL decodes them (Image.open(...) then exif_transpose and convert("RGB")), because the original
// SAM pipeline sees PIL's pixels and our golden references were made from them.
//
// Both libraries report fatal errors through a callback that must not return. A C++ exception may
// not unwind through their C frames, so the callback longjmps back to a setjmp in the function that
// called into the library, and that function turns the failure into a `false` return. Between a
// setjmp and its longjmp there must be no object with a destructor (longjmp would skip it): every
// such function below holds only plain locals, and all memory it writes to is allocated by its
// caller beforehand.
#include "segany/image.h"

#include <algorithm>
#include <cerrno>
#include <csetjmp>
#include <cstdio>
#include <cstring>
#include <memory>
#include <optional>
#include <string_view>

#include <jerror.h>
#include <jpeglib.h>
#include <png.h>

#include "segany/error.h"

namespace segany {
namespace {

// ---------------------------------------------------------------------------------------------
// Common checks and helpers

std::string quoted(const std::string& name) { return "'" + name + "'"; }

[[noreturn]] void fail_read(const std::string& name, const std::string& why) {
  throw Error("cannot read image " + quoted(name) + ": " + why);
}

// Refuses empty and oversized images from their header, before any pixel memory is allocated.
void check_dimensions(const std::string& name, int64_t width, int64_t height) {
  if (width <= 0 || height <= 0)
    throw Error("image " + quoted(name) + " is " + std::to_string(width) + "x" + std::to_string(height) +
                " pixels: it has no pixels");
  if (width > kMaxImagePixels / height)
    throw Error("image " + quoted(name) + " is " + std::to_string(width) + "x" + std::to_string(height) +
                " pixels; the limit is " + std::to_string(kMaxImagePixels) + " pixels (16384x16384)");
}

struct FileCloser {
  void operator()(FILE* f) const { std::fclose(f); }
};
using FilePtr = std::unique_ptr<FILE, FileCloser>;

std::vector<uint8_t> read_file(const std::string& path) {
  FilePtr f(std::fopen(path.c_str(), "rb"));
  if (!f) fail_read(path, std::strerror(errno));
  std::vector<uint8_t> bytes;
  uint8_t chunk[1 << 16];
  for (;;) {
    size_t n = std::fread(chunk, 1, sizeof chunk, f.get());
    bytes.insert(bytes.end(), chunk, chunk + n);
    if (n < sizeof chunk) break;
  }
  if (std::ferror(f.get())) fail_read(path, std::strerror(errno));  // e.g. EISDIR for a folder
  return bytes;
}

uint16_t read_u16(const uint8_t* p, bool big_endian) {
  return big_endian ? static_cast<uint16_t>(p[0] << 8 | p[1]) : static_cast<uint16_t>(p[1] << 8 | p[0]);
}
uint32_t read_u32(const uint8_t* p, bool big_endian) {
  return big_endian ? uint32_t{p[0]} << 24 | uint32_t{p[1]} << 16 | uint32_t{p[2]} << 8 | p[3]
                    : uint32_t{p[3]} << 24 | uint32_t{p[2]} << 16 | uint32_t{p[1]} << 8 | p[0];
}

// ---------------------------------------------------------------------------------------------
// EXIF orientation, as PIL.ImageOps.exif_transpose reads and applies it

// The Orientation tag (0x0112) of IFD0 in an Exif block (a TIFF header, optionally preceded by
// "Exif\0\0"): nullopt when the block has none, 0 when the tag is there but not one number.
// A broken Exif block must not stop a photo from loading, so every offset is bounds-checked and
// anything unreadable counts as no tag.
std::optional<int> exif_orientation(const uint8_t* data, size_t size) {
  while (size >= 6 && std::memcmp(data, "Exif\0\0", 6) == 0) data += 6, size -= 6;
  if (size < 8) return std::nullopt;
  bool big_endian;
  if (std::memcmp(data, "II*\0", 4) == 0) big_endian = false;
  else if (std::memcmp(data, "MM\0*", 4) == 0) big_endian = true;
  else return std::nullopt;
  const size_t ifd = read_u32(data + 4, big_endian);
  if (ifd > size || size - ifd < 2) return std::nullopt;
  const size_t count = read_u16(data + ifd, big_endian);
  for (size_t i = 0; i < count; ++i) {
    const size_t entry = ifd + 2 + 12 * i;
    if (entry + 12 > size) return std::nullopt;
    const uint8_t* e = data + entry;
    if (read_u16(e, big_endian) != 0x0112) continue;
    const uint16_t type = read_u16(e + 2, big_endian);
    if (read_u32(e + 4, big_endian) != 1) return 0;  // PIL reads a tuple: no orientation
    if (type == 3) return read_u16(e + 8, big_endian);  // SHORT, the type the standard gives
    if (type == 4) return static_cast<int>(std::min<uint32_t>(read_u32(e + 8, big_endian), 9));  // LONG
    if (type == 1) return e[8];                         // BYTE
    return 0;
  }
  return std::nullopt;
}

// PIL's getexif() falls back to the XMP packet's tiff:Orientation when Exif has no such tag; it
// takes the first match of the regular expression `tiff:Orientation(="|>)([0-9])`.
int xmp_orientation(std::string_view xmp) {
  constexpr std::string_view key = "tiff:Orientation";
  for (size_t at = xmp.find(key); at != std::string_view::npos; at = xmp.find(key, at + 1)) {
    std::string_view rest = xmp.substr(at + key.size());
    if (rest.size() >= 3 && rest.substr(0, 2) == "=\"" && rest[2] >= '0' && rest[2] <= '9') return rest[2] - '0';
    if (rest.size() >= 2 && rest[0] == '>' && rest[1] >= '0' && rest[1] <= '9') return rest[1] - '0';
  }
  return 0;
}

// Applies an EXIF orientation the way exif_transpose does: 2 FLIP_LEFT_RIGHT, 3 ROTATE_180,
// 4 FLIP_TOP_BOTTOM, 5 TRANSPOSE, 6 ROTATE_270 (clockwise), 7 TRANSVERSE, 8 ROTATE_90
// (counter-clockwise); any other value leaves the image as it is.
Image apply_orientation(Image src, int orientation) {
  if (orientation < 2 || orientation > 8) return src;
  const int W = src.width, H = src.height;
  const bool swaps = orientation >= 5;
  Image out;
  out.width = swaps ? H : W;
  out.height = swaps ? W : H;
  out.rgb.resize(src.rgb.size());
  // For each output pixel (x, y), the source pixel it comes from.
  auto source = [&](int x, int y, int& sx, int& sy) {
    switch (orientation) {
      case 2: sx = W - 1 - x; sy = y; break;
      case 3: sx = W - 1 - x; sy = H - 1 - y; break;
      case 4: sx = x; sy = H - 1 - y; break;
      case 5: sx = y; sy = x; break;
      case 6: sx = y; sy = H - 1 - x; break;
      case 7: sx = W - 1 - y; sy = H - 1 - x; break;
      default: sx = W - 1 - y; sy = x; break;  // 8
    }
  };
#pragma omp parallel for schedule(static)
  for (int y = 0; y < out.height; ++y) {
    for (int x = 0; x < out.width; ++x) {
      int sx, sy;
      source(x, y, sx, sy);
      std::memcpy(out.pixel(x, y), src.pixel(sx, sy), 3);
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// JPEG

struct JpegErrorManager {
  jpeg_error_mgr pub;  // first, so that libjpeg's jpeg_error_mgr* is also a JpegErrorManager*
  std::jmp_buf jump;
  char message[JMSG_LENGTH_MAX];
};

[[noreturn]] void jpeg_fatal(j_common_ptr cinfo) {
  auto* err = reinterpret_cast<JpegErrorManager*>(cinfo->err);
  err->pub.format_message(cinfo, err->message);
  std::longjmp(err->jump, 1);
}

// libjpeg meets the end of a truncated file with a warning and fills the rest of the image with
// gray. PIL refuses such a file ("image file is truncated"), and so do we. Other warnings (stray
// bytes between markers, corrupt entropy data it can resynchronise from) are tolerated, as PIL
// tolerates them, and never printed.
void jpeg_message(j_common_ptr cinfo, int msg_level) {
  if (msg_level < 0 && cinfo->err->msg_code == JWRN_JPEG_EOF) jpeg_fatal(cinfo);
}

struct JpegDecoder {
  jpeg_decompress_struct cinfo{};
  JpegErrorManager err{};
  const uint8_t* data = nullptr;
  size_t size = 0;
  bool cmyk = false;  // decoding to CMYK (CMYK or YCCK files), converted to RGB row by row

  JpegDecoder() {
    // jpeg_destroy_decompress is safe even when jpeg_create_decompress failed half-way: a
    // zero-initialised cinfo has no memory manager, and destroy then does nothing.
    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = jpeg_fatal;
    err.pub.emit_message = jpeg_message;
  }
  ~JpegDecoder() { jpeg_destroy_decompress(&cinfo); }
  JpegDecoder(const JpegDecoder&) = delete;
  JpegDecoder& operator=(const JpegDecoder&) = delete;
};

// Reads the markers up to the first scan: size, colour space, saved APP1 (Exif, XMP) segments.
bool jpeg_read_header_guarded(JpegDecoder& d) {
  if (setjmp(d.err.jump)) return false;
  jpeg_create_decompress(&d.cinfo);
  jpeg_mem_src(&d.cinfo, d.data, static_cast<unsigned long>(d.size));
  jpeg_save_markers(&d.cinfo, JPEG_APP0 + 1, 0xFFFF);
  jpeg_read_header(&d.cinfo, TRUE);
  return true;
}

// PIL's conversion of its CMYK to RGB (Convert.c cmyk2rgb), where PIL's CMYK is the complement of
// what libjpeg returns: PIL opens every 4-component JPEG with raw mode "CMYK;I" (Adobe's inverted
// convention). With c = 255 - raw_c and k = 255 - raw_k: value = (255 - k) - c * (255 - k) / 255.
void cmyk_row_to_rgb(const uint8_t* raw, uint8_t* rgb, int width) {
  for (int x = 0; x < width; ++x, raw += 4, rgb += 3) {
    const int nk = raw[3];
    for (int c = 0; c < 3; ++c) {
      const int t = (255 - raw[c]) * nk + 128;  // MULDIV255: (a * b + 127) / 255, rounded
      const int v = nk - (((t >> 8) + t) >> 8);
      rgb[c] = static_cast<uint8_t>(std::clamp(v, 0, 255));
    }
  }
}

// Decodes every scanline into `out` (width * height * 3 bytes); `cmyk_row` (width * 4 bytes) is
// scratch space for CMYK files.
bool jpeg_read_pixels_guarded(JpegDecoder& d, uint8_t* out, uint8_t* cmyk_row) {
  if (setjmp(d.err.jump)) return false;
  // Pillow's settings are libjpeg's defaults: the accurate integer IDCT (JDCT_ISLOW) and fancy
  // (triangle-filter) chroma upsampling. Set them explicitly so a changed default cannot drift us.
  d.cinfo.dct_method = JDCT_ISLOW;
  d.cinfo.do_fancy_upsampling = TRUE;
  d.cinfo.out_color_space = d.cmyk ? JCS_CMYK : JCS_RGB;  // gray is expanded to RGB by libjpeg
  jpeg_start_decompress(&d.cinfo);
  if (d.cinfo.output_components != (d.cmyk ? 4 : 3)) {
    std::snprintf(d.err.message, sizeof d.err.message, "unexpected %d output components",
                  d.cinfo.output_components);
    return false;
  }
  while (d.cinfo.output_scanline < d.cinfo.output_height) {
    uint8_t* row = out + static_cast<size_t>(d.cinfo.output_scanline) * d.cinfo.output_width * 3;
    JSAMPROW rows[1] = {d.cmyk ? cmyk_row : row};
    if (jpeg_read_scanlines(&d.cinfo, rows, 1) != 1) {  // only a suspending source returns 0
      std::snprintf(d.err.message, sizeof d.err.message, "decoder stopped early");
      return false;
    }
    if (d.cmyk) cmyk_row_to_rgb(cmyk_row, row, static_cast<int>(d.cinfo.output_width));
  }
  // No jpeg_finish_decompress: every pixel is decoded, and what may follow the last scan (a
  // missing EOI, trailing bytes) does not change the image.
  return true;
}

// The orientation from the saved APP1 segments, as PIL collects them: the Exif block is the first
// "Exif\0\0" segment with the payloads of any later ones appended (an Exif block too large for one
// segment continues in the next); the XMP packet is the last XMP segment's, after its
// identifier's NUL.
int jpeg_orientation(jpeg_saved_marker_ptr markers) {
  constexpr std::string_view exif_id("Exif\0\0", 6);
  constexpr std::string_view xmp_id("http://ns.adobe.com/xap/1.0/\0", 29);
  std::string exif;
  std::string_view xmp;
  for (jpeg_saved_marker_ptr m = markers; m; m = m->next) {
    if (m->marker != JPEG_APP0 + 1) continue;
    std::string_view segment(reinterpret_cast<const char*>(m->data), m->data_length);
    if (segment.substr(0, exif_id.size()) == exif_id) exif += exif.empty() ? segment : segment.substr(exif_id.size());
    else if (segment.substr(0, xmp_id.size()) == xmp_id) xmp = segment.substr(xmp_id.size());
  }
  if (auto tag = exif_orientation(reinterpret_cast<const uint8_t*>(exif.data()), exif.size())) return *tag;
  return xmp_orientation(xmp);
}

Image decode_jpeg(const uint8_t* data, size_t size, const std::string& name) {
  JpegDecoder d;
  d.data = data;
  d.size = size;
  if (!jpeg_read_header_guarded(d)) fail_read(name, d.err.message);
  check_dimensions(name, d.cinfo.image_width, d.cinfo.image_height);

  switch (d.cinfo.jpeg_color_space) {
    case JCS_GRAYSCALE: case JCS_YCbCr: case JCS_RGB: d.cmyk = false; break;
    case JCS_CMYK: case JCS_YCCK: d.cmyk = true; break;
    default:
      fail_read(name, "unsupported JPEG with " + std::to_string(d.cinfo.num_components) + " colour components");
  }

  const int orientation = jpeg_orientation(d.cinfo.marker_list);

  Image im;
  im.width = static_cast<int>(d.cinfo.image_width);
  im.height = static_cast<int>(d.cinfo.image_height);
  im.rgb.resize(static_cast<size_t>(im.width) * im.height * 3);
  std::vector<uint8_t> cmyk_row(d.cmyk ? static_cast<size_t>(im.width) * 4 : 0);
  if (!jpeg_read_pixels_guarded(d, im.rgb.data(), cmyk_row.data())) fail_read(name, d.err.message);
  return apply_orientation(std::move(im), orientation);
}

// ---------------------------------------------------------------------------------------------
// PNG

struct PngContext {
  const uint8_t* data = nullptr;  // reading: the whole file
  size_t size = 0;
  size_t pos = 0;
  FILE* file = nullptr;           // writing
  char message[256] = {};
};

[[noreturn]] void png_fatal(png_structp png, png_const_charp msg) {
  auto* ctx = static_cast<PngContext*>(png_get_error_ptr(png));
  std::snprintf(ctx->message, sizeof ctx->message, "%s", msg);
  png_longjmp(png, 1);
}
void png_warning_ignored(png_structp, png_const_charp) {}  // PIL ignores them too

void png_read_from_memory(png_structp png, png_bytep out, png_size_t length) {
  auto* ctx = static_cast<PngContext*>(png_get_io_ptr(png));
  if (length > ctx->size - ctx->pos) png_error(png, "the file is truncated");
  std::memcpy(out, ctx->data + ctx->pos, length);
  ctx->pos += length;
}

struct PngReader {
  PngContext ctx;
  png_structp png = nullptr;
  png_infop info = nullptr;
  int passes = 1;

  PngReader() {
    png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &ctx, png_fatal, png_warning_ignored);
    if (png) info = png_create_info_struct(png);
    if (!png || !info) throw Error("out of memory creating a PNG decoder");
  }
  ~PngReader() { png_destroy_read_struct(&png, &info, nullptr); }
  PngReader(const PngReader&) = delete;
  PngReader& operator=(const PngReader&) = delete;
};

// Reads the chunks before the image data and asks libpng for 8-bit RGB rows whatever the file
// holds, matching PIL's convert("RGB"): palettes looked up (transparency ignored), gray bit depths
// below 8 scaled to 0..255, gray replicated, alpha dropped, 16-bit samples cut to their high byte
// (what PIL's "RGB;16B" unpacker does).
// (PIL opens 16-bit gray as mode "I;16", whose convert("RGB") clamps values to 255 and whitens
// nearly everything; we take the high byte there too, the only useful reading.)
bool png_read_header_guarded(PngReader& r) {
  if (setjmp(png_jmpbuf(r.png))) return false;
  png_set_read_fn(r.png, &r.ctx, png_read_from_memory);
  png_read_info(r.png, r.info);
  png_set_palette_to_rgb(r.png);
  png_set_expand_gray_1_2_4_to_8(r.png);
  png_set_strip_16(r.png);
  png_set_strip_alpha(r.png);
  png_set_gray_to_rgb(r.png);
  r.passes = png_set_interlace_handling(r.png);
  png_read_update_info(r.png, r.info);
  if (png_get_bit_depth(r.png, r.info) != 8 || png_get_channels(r.png, r.info) != 3) {
    std::snprintf(r.ctx.message, sizeof r.ctx.message, "cannot convert this PNG to 8-bit RGB");
    return false;
  }
  return true;
}

// Decodes the rows into `out` (width * height * 3 bytes). Interlaced images take one sweep per
// pass, each filling in the pixels of that pass over the rows already there.
bool png_read_pixels_guarded(PngReader& r, uint8_t* out) {
  if (setjmp(png_jmpbuf(r.png))) return false;
  const png_uint_32 height = png_get_image_height(r.png, r.info);
  const size_t stride = png_get_rowbytes(r.png, r.info);
  for (int pass = 0; pass < r.passes; ++pass)
    for (png_uint_32 y = 0; y < height; ++y) png_read_row(r.png, out + y * stride, nullptr);
  return true;
}

// The chunks after the image data, for an eXIf chunk placed there. The pixels are complete by now,
// so a damaged tail is not worth refusing the image for: the result only says whether it was read.
bool png_read_tail_guarded(PngReader& r) {
  if (setjmp(png_jmpbuf(r.png))) return false;
  png_read_end(r.png, r.info);
  return true;
}

std::optional<int> png_exif_orientation(PngReader& r) {
#ifdef PNG_eXIf_SUPPORTED
  png_bytep exif = nullptr;
  png_uint_32 length = 0;
  if (png_get_eXIf_1(r.png, r.info, &length, &exif) != 0 && exif) return exif_orientation(exif, length);
#endif
  return std::nullopt;
}

Image decode_png(const uint8_t* data, size_t size, const std::string& name) {
  // IHDR must come first, right after the signature: check the size from it before libpng
  // allocates anything for the image.
  if (size >= 24 && std::memcmp(data + 12, "IHDR", 4) == 0)
    check_dimensions(name, read_u32(data + 16, true), read_u32(data + 20, true));

  PngReader r;
  r.ctx.data = data;
  r.ctx.size = size;
  if (!png_read_header_guarded(r)) fail_read(name, r.ctx.message);
  Image im;
  im.width = static_cast<int>(png_get_image_width(r.png, r.info));
  im.height = static_cast<int>(png_get_image_height(r.png, r.info));
  check_dimensions(name, png_get_image_width(r.png, r.info), png_get_image_height(r.png, r.info));
  im.rgb.resize(static_cast<size_t>(im.width) * im.height * 3);
  if (!png_read_pixels_guarded(r, im.rgb.data())) fail_read(name, r.ctx.message);
  // An eXIf chunk may sit before or after the image data. (PIL would also look at XMP in iTXt
  // chunks; libpng keeps those as text, and PNGs with an orientation anywhere are rare enough.)
  std::optional<int> orientation = png_exif_orientation(r);
  if (!orientation && png_read_tail_guarded(r)) orientation = png_exif_orientation(r);
  return apply_orientation(std::move(im), orientation.value_or(1));
}

void png_write_to_file(png_structp png, png_bytep data, png_size_t length) {
  auto* ctx = static_cast<PngContext*>(png_get_io_ptr(png));
  if (std::fwrite(data, 1, length, ctx->file) != length) png_error(png, std::strerror(errno));
}
void png_flush_file(png_structp png) {
  auto* ctx = static_cast<PngContext*>(png_get_io_ptr(png));
  std::fflush(ctx->file);
}

struct PngWriter {
  PngContext ctx;
  png_structp png = nullptr;
  png_infop info = nullptr;

  PngWriter() {
    png = png_create_write_struct(PNG_LIBPNG_VER_STRING, &ctx, png_fatal, png_warning_ignored);
    if (png) info = png_create_info_struct(png);
    if (!png || !info) throw Error("out of memory creating a PNG encoder");
  }
  ~PngWriter() { png_destroy_write_struct(&png, &info); }
  PngWriter(const PngWriter&) = delete;
  PngWriter& operator=(const PngWriter&) = delete;
};

bool png_write_guarded(PngWriter& w, const uint8_t* pixels, int width, int height, int channels) {
  if (setjmp(png_jmpbuf(w.png))) return false;
  png_set_write_fn(w.png, &w.ctx, png_write_to_file, png_flush_file);
  png_set_IHDR(w.png, w.info, static_cast<png_uint_32>(width), static_cast<png_uint_32>(height), 8,
               channels == 3 ? PNG_COLOR_TYPE_RGB : PNG_COLOR_TYPE_GRAY, PNG_INTERLACE_NONE,
               PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  png_write_info(w.png, w.info);
  const size_t stride = static_cast<size_t>(width) * channels;
  for (int y = 0; y < height; ++y) png_write_row(w.png, pixels + y * stride);
  png_write_end(w.png, nullptr);
  return true;
}

}  // namespace

// ---------------------------------------------------------------------------------------------

Image decode_image(const uint8_t* data, size_t size, const std::string& name) {
  static constexpr uint8_t kJpegMagic[3] = {0xFF, 0xD8, 0xFF};
  static constexpr uint8_t kPngMagic[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  if (data && size >= 3 && std::memcmp(data, kJpegMagic, 3) == 0) return decode_jpeg(data, size, name);
  if (data && size >= 8 && std::memcmp(data, kPngMagic, 8) == 0) return decode_png(data, size, name);
  fail_read(name, "not a JPEG or PNG file");
}

Image load_image(const std::string& path) {
  std::vector<uint8_t> bytes = read_file(path);
  return decode_image(bytes.data(), bytes.size(), path);
}

void save_png(const std::string& path, const uint8_t* pixels, int width, int height, int channels) {
  const std::string where = "cannot write PNG " + quoted(path) + ": ";
  if (channels != 1 && channels != 3)
    throw Error(where + "channels must be 1 (gray) or 3 (RGB), not " + std::to_string(channels));
  if (width <= 0 || height <= 0 || !pixels)
    throw Error(where + "empty image (" + std::to_string(width) + "x" + std::to_string(height) + ")");

  FilePtr file(std::fopen(path.c_str(), "wb"));
  if (!file) throw Error(where + std::strerror(errno));
  bool ok;
  std::string message;
  {
    PngWriter w;
    w.ctx.file = file.get();
    ok = png_write_guarded(w, pixels, width, height, channels);
    message = w.ctx.message;
  }
  // fclose reports what buffered writes could not (a full disk); a half-written file is removed.
  if (std::fclose(file.release()) != 0 && ok) {
    ok = false;
    message = std::strerror(errno);
  }
  if (!ok) {
    std::remove(path.c_str());
    throw Error(where + message);
  }
}

}  // namespace segany
