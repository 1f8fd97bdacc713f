#include "overlay.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>

namespace segany::cli {
namespace {

using Rgb = std::array<uint8_t, 3>;

// Distinct colours for masks, none of them the green or red of the prompt's points.
constexpr Rgb kMaskColours[] = {{30, 144, 255}, {255, 127, 14}, {148, 103, 189}, {227, 119, 194},
                                {23, 190, 207}, {140, 86, 75},  {188, 189, 34},  {127, 127, 127}};
constexpr Rgb kForeground{0, 220, 0}, kBackground{230, 0, 0}, kBoxColour{255, 215, 0}, kWhite{255, 255, 255};
constexpr float kMaskAlpha = 0.45f;  // enough tint to see the mask, little enough to see the image under it

void put(Image& im, int x, int y, const Rgb& c) {
  if (x < 0 || y < 0 || x >= im.width || y >= im.height) return;
  std::copy(c.begin(), c.end(), im.pixel(x, y));
}

void blend(Image& im, int x, int y, const Rgb& c, float alpha) {
  uint8_t* p = im.pixel(x, y);
  for (int k = 0; k < 3; ++k) p[k] = static_cast<uint8_t>(std::lround((1 - alpha) * p[k] + alpha * c[k]));
}

void disc(Image& im, float cx, float cy, int radius, const Rgb& c) {
  const int x0 = static_cast<int>(std::lround(cx)), y0 = static_cast<int>(std::lround(cy));
  for (int dy = -radius; dy <= radius; ++dy)
    for (int dx = -radius; dx <= radius; ++dx)
      if (dx * dx + dy * dy <= radius * radius) put(im, x0 + dx, y0 + dy, c);
}

void rectangle(Image& im, const Box& b, int thickness, const Rgb& c) {
  const int x0 = static_cast<int>(std::lround(b.x0)), y0 = static_cast<int>(std::lround(b.y0));
  const int x1 = static_cast<int>(std::lround(b.x1)), y1 = static_cast<int>(std::lround(b.y1));
  for (int t = 0; t < thickness; ++t) {
    for (int x = x0 - t; x <= x1 + t; ++x) {
      put(im, x, y0 - t, c);
      put(im, x, y1 + t, c);
    }
    for (int y = y0 - t; y <= y1 + t; ++y) {
      put(im, x0 - t, y, c);
      put(im, x1 + t, y, c);
    }
  }
}

}  // namespace

Image render_overlay(const Image& image, const Tensor& masks, const Prompt& prompt) {
  Image out = image;
  const int W = image.width, H = image.height;
  const int64_t M = masks.defined() ? masks.dim(0) : 0;
  for (int64_t m = 0; m < M; ++m) {
    const uint8_t* mask = masks.data_as<const uint8_t>() + m * static_cast<int64_t>(W) * H;
    const Rgb& colour = kMaskColours[m % std::size(kMaskColours)];
    auto inside = [&](int x, int y) { return x >= 0 && y >= 0 && x < W && y < H && mask[y * W + x]; };
    for (int y = 0; y < H; ++y)
      for (int x = 0; x < W; ++x) {
        if (!inside(x, y)) continue;
        // The mask's edge in full colour, so that overlapping masks stay apart.
        const bool edge = !inside(x - 1, y) || !inside(x + 1, y) || !inside(x, y - 1) || !inside(x, y + 1);
        blend(out, x, y, colour, edge ? 1.0f : kMaskAlpha);
      }
  }
  // Marks scale with the image so that they are visible on a 4K photo and not huge on a thumbnail.
  const int side = std::min(W, H);
  if (prompt.box) rectangle(out, *prompt.box, std::max(2, side / 250), kBoxColour);
  const int radius = std::max(3, side / 90);
  for (const Point& p : prompt.points) {
    disc(out, p.x, p.y, radius + 1, kWhite);  // a white rim keeps the dot visible on any colour
    disc(out, p.x, p.y, radius, p.label == 1 ? kForeground : kBackground);
  }
  return out;
}

}  // namespace segany::cli
