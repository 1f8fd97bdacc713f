#include "pipeline/amg_utils.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "backend/mask_ops.h"
#include "segany/error.h"

namespace segany::amg {

float stability_score(const float* logits, int64_t count, float mask_threshold, float offset) {
  // The original compares float32 logits with the Python float sum, cast to float32.
  const float high = static_cast<float>(static_cast<double>(mask_threshold) + offset);
  const float low = static_cast<float>(static_cast<double>(mask_threshold) - offset);
  int64_t intersections = 0, unions = 0;
  for (int64_t i = 0; i < count; ++i) {
    intersections += logits[i] > high;
    unions += logits[i] > low;
  }
  return stability_from_counts(intersections, unions);
}

BoxXYXY mask_to_box(const uint8_t* mask, int h, int w) {
  int x0 = w, y0 = h, x1 = -1, y1 = -1;
  for (int y = 0; y < h; ++y) {
    const uint8_t* row = mask + static_cast<size_t>(y) * w;
    int first = -1, last = -1;
    for (int x = 0; x < w; ++x)
      if (row[x]) {
        if (first < 0) first = x;
        last = x;
      }
    if (first < 0) continue;
    x0 = std::min(x0, first);
    x1 = std::max(x1, last);
    y0 = std::min(y0, y);
    y1 = y;
  }
  if (x1 < 0) return {0, 0, 0, 0};
  return {x0, y0, x1, y1};
}

BoxXYXY box_xyxy_to_xywh(const BoxXYXY& b) { return {b[0], b[1], b[2] - b[0], b[3] - b[1]}; }

std::vector<int> nms(const std::vector<BoxXYXY>& boxes, const std::vector<float>& scores, double iou_threshold) {
  check(boxes.size() == scores.size(), "nms: " + std::to_string(boxes.size()) + " boxes but " +
                                           std::to_string(scores.size()) + " scores");
  static_assert(sizeof(BoxXYXY) == sizeof(int[4]));
  return box_nms(reinterpret_cast<const int(*)[4]>(boxes.data()), scores.data(), static_cast<int>(boxes.size()),
                 iou_threshold);
}

PointGrid build_point_grid(int n) {
  check(n > 0, "point grid: points per side must be positive, got " + std::to_string(n));
  // numpy.linspace(offset, 1 - offset, n): i * step + start, the last exactly the stop.
  const double start = 1.0 / (2 * n), stop = 1.0 - start;
  std::vector<double> side(n);
  const double step = n > 1 ? (stop - start) / (n - 1) : 0.0;
  for (int i = 0; i < n; ++i) side[i] = i * step + start;
  if (n > 1) side[n - 1] = stop;
  PointGrid grid;
  grid.reserve(static_cast<size_t>(n) * n);
  for (int y = 0; y < n; ++y)
    for (int x = 0; x < n; ++x) grid.push_back({side[x], side[y]});
  return grid;
}

std::vector<PointGrid> build_all_layer_point_grids(int n_per_side, int n_layers, int scale_per_layer) {
  std::vector<PointGrid> grids;
  for (int i = 0; i <= n_layers; ++i) {
    const int n = static_cast<int>(n_per_side / std::pow(static_cast<double>(scale_per_layer), i));
    check(n > 0, "point grid of crop layer " + std::to_string(i) + " has no points (" + std::to_string(n_per_side) +
                     " points a side, downscaled by " + std::to_string(scale_per_layer) + " per layer)");
    grids.push_back(build_point_grid(n));
  }
  return grids;
}

CropBoxes generate_crop_boxes(int im_h, int im_w, int n_layers, double overlap_ratio) {
  CropBoxes out;
  const int short_side = std::min(im_h, im_w);
  out.boxes.push_back({0, 0, im_w, im_h});
  out.layers.push_back(0);
  auto crop_len = [](int orig_len, int n_crops, int overlap) {
    return static_cast<int>(std::ceil(static_cast<double>(overlap * (n_crops - 1) + orig_len) / n_crops));
  };
  for (int layer = 0; layer < n_layers; ++layer) {
    const int n = 1 << (layer + 1);
    const int overlap = static_cast<int>(overlap_ratio * short_side * (2.0 / n));
    const int crop_w = crop_len(im_w, n, overlap), crop_h = crop_len(im_h, n, overlap);
    for (int i = 0; i < n; ++i)      // x outer, y inner: itertools.product(x0s, y0s)
      for (int j = 0; j < n; ++j) {
        const int x0 = (crop_w - overlap) * i, y0 = (crop_h - overlap) * j;
        out.boxes.push_back({x0, y0, std::min(x0 + crop_w, im_w), std::min(y0 + crop_h, im_h)});
        out.layers.push_back(layer + 1);
      }
  }
  return out;
}

bool is_box_near_crop_edge(const BoxXYXY& box, const BoxXYXY& crop_box, const BoxXYXY& orig_box, float atol) {
  return box_near_crop_edge(box.data(), crop_box.data(), orig_box.data(), atol);
}

BoxXYXY uncrop_box(const BoxXYXY& b, const BoxXYXY& crop) {
  return {b[0] + crop[0], b[1] + crop[1], b[2] + crop[0], b[3] + crop[1]};
}

std::array<double, 2> uncrop_point(const std::array<double, 2>& p, const BoxXYXY& crop) {
  return {p[0] + crop[0], p[1] + crop[1]};
}

std::vector<uint8_t> uncrop_mask(const uint8_t* mask, const BoxXYXY& crop, int orig_h, int orig_w) {
  const int w = crop[2] - crop[0], h = crop[3] - crop[1];
  std::vector<uint8_t> out(static_cast<size_t>(orig_h) * orig_w, 0);
  for (int y = 0; y < h; ++y)
    std::copy_n(mask + static_cast<size_t>(y) * w, w, out.data() + static_cast<size_t>(y + crop[1]) * orig_w + crop[0]);
  return out;
}

Rle mask_to_rle(const uint8_t* mask, int h, int w) {
  // Column-major order, through a transpose in tiles (reading a big mask column by column would
  // miss the cache on every pixel).
  std::vector<uint8_t> t(static_cast<size_t>(h) * w);
  constexpr int kTile = 64;
  for (int y0 = 0; y0 < h; y0 += kTile)
    for (int x0 = 0; x0 < w; x0 += kTile)
      for (int x = x0; x < std::min(w, x0 + kTile); ++x)
        for (int y = y0; y < std::min(h, y0 + kTile); ++y)
          t[static_cast<size_t>(x) * h + y] = mask[static_cast<size_t>(y) * w + x] != 0;
  Rle rle;
  rle.height = h;
  rle.width = w;
  uint8_t value = 0;  // the counts start with a run of zeros, possibly empty
  size_t start = 0;
  for (size_t i = 0; i < t.size(); ++i)
    if (t[i] != value) {
      rle.counts.push_back(static_cast<uint32_t>(i - start));
      start = i;
      value = t[i];
    }
  rle.counts.push_back(static_cast<uint32_t>(t.size() - start));
  return rle;
}

std::vector<uint8_t> rle_to_mask(const Rle& rle) {
  const int64_t total = static_cast<int64_t>(rle.height) * rle.width;
  int64_t sum = 0;
  for (uint32_t c : rle.counts) sum += c;
  check(sum == total, "RLE counts cover " + std::to_string(sum) + " pixels, not " + std::to_string(rle.height) + "x" +
                          std::to_string(rle.width));
  std::vector<uint8_t> mask(static_cast<size_t>(total), 0);
  int64_t i = 0;
  bool value = false;
  for (uint32_t c : rle.counts) {
    if (value) {
      // Pixel i of the column-major order is (x, y) = (i / h, i % h); walk the run column by column.
      int64_t x = i / rle.height, y = i % rle.height;
      for (uint32_t k = 0; k < c; ++k) {
        mask[static_cast<size_t>(y) * rle.width + x] = 1;
        if (++y == rle.height) {
          y = 0;
          ++x;
        }
      }
    }
    i += c;
    value = !value;
  }
  return mask;
}

int64_t area_from_rle(const Rle& rle) {
  int64_t area = 0;
  for (size_t i = 1; i < rle.counts.size(); i += 2) area += rle.counts[i];
  return area;
}

std::string rle_to_coco_string(const Rle& rle) {
  std::string s;
  const std::vector<uint32_t>& c = rle.counts;
  for (size_t i = 0; i < c.size(); ++i) {
    int64_t x = c[i];
    if (i > 2) x -= c[i - 2];
    for (bool more = true; more;) {
      char ch = static_cast<char>(x & 0x1f);
      x >>= 5;  // arithmetic: a negative difference ends in a run of 1 bits
      more = (ch & 0x10) ? x != -1 : x != 0;
      if (more) ch |= 0x20;
      s += static_cast<char>(ch + 48);
    }
  }
  return s;
}

Rle rle_from_coco_string(const std::string& s, int h, int w) {
  Rle rle;
  rle.height = h;
  rle.width = w;
  size_t p = 0;
  while (p < s.size()) {
    int64_t x = 0;
    int k = 0;
    for (bool more = true; more; ++k) {
      check(p < s.size() && k < 12, "COCO RLE string ends inside a count, or has a count too long");
      const int c = s[p++] - 48;
      check(c >= 0 && c < 64, "COCO RLE string holds a character outside '0'..'o'");
      x |= static_cast<int64_t>(c & 0x1f) << (5 * k);
      more = (c & 0x20) != 0;
      if (!more && (c & 0x10)) x |= static_cast<int64_t>(-1) * (int64_t{1} << (5 * (k + 1)));
    }
    if (rle.counts.size() > 2) x += rle.counts[rle.counts.size() - 2];
    check(x >= 0 && x <= static_cast<int64_t>(UINT32_MAX), "COCO RLE string decodes to a negative or huge count");
    rle.counts.push_back(static_cast<uint32_t>(x));
  }
  int64_t sum = 0;
  for (uint32_t c : rle.counts) sum += c;
  check(sum == static_cast<int64_t>(h) * w, "COCO RLE string covers " + std::to_string(sum) + " pixels, not " +
                                                std::to_string(h) + "x" + std::to_string(w));
  return rle;
}

namespace {

int find_root(std::vector<int>& parent, int i) {
  while (parent[i] != i) {
    parent[i] = parent[parent[i]];
    i = parent[i];
  }
  return i;
}

}  // namespace

int connected_components(const uint8_t* mask, int h, int w, std::vector<int>& labels, std::vector<int64_t>& sizes) {
  const size_t n = static_cast<size_t>(h) * w;
  labels.assign(n, 0);
  // Pass 1: provisional labels, merged with the already-seen neighbours W, NW, N, NE.
  std::vector<int> parent{0};
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x) {
      const size_t i = static_cast<size_t>(y) * w + x;
      if (!mask[i]) continue;
      int label = 0;
      auto join = [&](int nx, int ny) {
        if (nx < 0 || ny < 0 || nx >= w) return;
        const int other = labels[static_cast<size_t>(ny) * w + nx];
        if (!other) return;
        if (!label) {
          label = find_root(parent, other);
          return;
        }
        const int a = find_root(parent, label), b = find_root(parent, other);
        if (a != b) parent[std::max(a, b)] = std::min(a, b);
        label = std::min(a, b);
      };
      join(x - 1, y);
      join(x - 1, y - 1);
      join(x, y - 1);
      join(x + 1, y - 1);
      if (!label) {
        label = static_cast<int>(parent.size());
        parent.push_back(label);
      }
      labels[i] = label;
    }
  // Number the components in the order in which OpenCV's block scan (2x2 blocks, row pairs) meets
  // them first; two components never share a 2x2 block under 8-connectivity.
  const int provisional = static_cast<int>(parent.size());
  const int64_t no_block = INT64_MAX;
  std::vector<int64_t> first_block(provisional, no_block);
  const int64_t blocks_per_row = (w + 1) / 2;
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x) {
      const size_t i = static_cast<size_t>(y) * w + x;
      if (!labels[i]) continue;
      const int root = find_root(parent, labels[i]);
      labels[i] = root;
      first_block[root] = std::min(first_block[root], (y / 2) * blocks_per_row + x / 2);
    }
  std::vector<int> roots;
  for (int r = 1; r < provisional; ++r)
    if (first_block[r] != no_block) roots.push_back(r);
  std::sort(roots.begin(), roots.end(), [&](int a, int b) { return first_block[a] < first_block[b]; });
  std::vector<int> final_label(provisional, 0);
  for (size_t k = 0; k < roots.size(); ++k) final_label[roots[k]] = static_cast<int>(k) + 1;
  sizes.assign(roots.size() + 1, 0);
  for (size_t i = 0; i < n; ++i) {
    labels[i] = final_label[labels[i]];
    ++sizes[labels[i]];
  }
  return static_cast<int>(roots.size()) + 1;
}

bool remove_small_regions(std::vector<uint8_t>& mask, int h, int w, double area_thresh, bool holes) {
  std::vector<uint8_t> working(mask.size());
  for (size_t i = 0; i < mask.size(); ++i) working[i] = static_cast<uint8_t>(holes ^ (mask[i] != 0));
  std::vector<int> labels;
  std::vector<int64_t> sizes;
  const int n = connected_components(working.data(), h, w, labels, sizes);
  std::vector<uint8_t> small(n, 0);
  bool any_small = false;
  for (int l = 1; l < n; ++l)
    if (static_cast<double>(sizes[l]) < area_thresh) small[l] = any_small = true;
  if (!any_small) return false;
  // fill: the labels that become the new mask.
  std::vector<uint8_t> fill(n, 0);
  if (holes) {
    fill[0] = 1;  // the mask itself, plus its small holes
    for (int l = 1; l < n; ++l) fill[l] = small[l];
  } else {
    bool any = false;
    for (int l = 1; l < n; ++l) any |= (fill[l] = !small[l]);
    if (!any) {  // every island is small: keep the largest (the first of equals, as argmax)
      int largest = 1;
      for (int l = 2; l < n; ++l)
        if (sizes[l] > sizes[largest]) largest = l;
      fill[largest] = 1;
    }
  }
  for (size_t i = 0; i < mask.size(); ++i) mask[i] = fill[labels[i]];
  return true;
}

}  // namespace segany::amg
