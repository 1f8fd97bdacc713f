// The automatic mask generator: its building blocks against the original's outputs
// (../shared/golden/amg_utils.*), exactly; pycocotools' compressed RLE strings; small-region
// removal by hand; and the whole generator on the golden micro models against amg.json.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <map>
#include <memory>
#include <random>

#include <nlohmann/json.hpp>

#include "backend/backend.h"
#include "backend/mask_ops.h"
#include "io/checkpoint.h"
#include "model/random_init.h"
#include "model/sam.h"
#include "pipeline/amg_utils.h"
#include "pipeline/decoder.h"
#include "segany/mask_generator.h"
#include "segany/predictor.h"
#include "test_util.h"

namespace segany {
namespace {

nlohmann::json read_json(const std::string& path) {
  std::ifstream f(path);
  return nlohmann::json::parse(f);
}

struct AmgGolden {
  io::TensorMap t;
  nlohmann::json j;
  int n = 0, h = 0, w = 0;
  const float* logits(int i) const { return t.at("logits").data_as<const float>() + static_cast<size_t>(i) * h * w; }
  std::vector<uint8_t> mask(int i) const {
    std::vector<uint8_t> m(static_cast<size_t>(h) * w);
    for (size_t k = 0; k < m.size(); ++k) m[k] = logits(i)[k] > 0.0f;
    return m;
  }
  amg::BoxXYXY box(const std::string& name, int i) const {
    const int32_t* b = t.at(name).data_as<const int32_t>() + 4 * i;
    return {b[0], b[1], b[2], b[3]};
  }
};

const AmgGolden& amg_golden() {
  static const AmgGolden g = [] {
    AmgGolden g;
    g.t = io::load_safetensors(test::golden_dir() + "/amg_utils.safetensors");
    g.j = read_json(test::golden_dir() + "/amg_utils.json");
    const Tensor& l = g.t.at("logits");
    g.n = static_cast<int>(l.dim(0));
    g.h = static_cast<int>(l.dim(1));
    g.w = static_cast<int>(l.dim(2));
    return g;
  }();
  return g;
}

Rle rle_of_json(const nlohmann::json& j) {
  Rle r;
  r.height = j.at("size")[0].get<int>();
  r.width = j.at("size")[1].get<int>();
  r.counts = j.at("counts").get<std::vector<uint32_t>>();
  return r;
}

// ---------------------------------------------------------------------------------------------
// Building blocks against the original (exact)

TEST(AmgUtils, StabilityScore) {
  SEGANY_REQUIRE_GOLDEN();
  const AmgGolden& g = amg_golden();
  const float* ref = g.t.at("stability_score").data_as<const float>();
  for (int i = 0; i < g.n; ++i) {
    const float s = amg::stability_score(g.logits(i), static_cast<int64_t>(g.h) * g.w, 0.0f, 1.0f);
    if (std::isnan(ref[i]))
      EXPECT_TRUE(std::isnan(s)) << "mask " << i << ": empty, 0 / 0";
    else
      EXPECT_NEAR(s, ref[i], 1e-6) << "mask " << i;
  }
}

TEST(AmgUtils, BoxesOfMasks) {
  SEGANY_REQUIRE_GOLDEN();
  const AmgGolden& g = amg_golden();
  for (int i = 0; i < g.n; ++i) {
    const amg::BoxXYXY box = amg::mask_to_box(g.mask(i).data(), g.h, g.w);
    EXPECT_EQ(box, g.box("boxes_xyxy", i)) << "mask " << i;
  }
  // The reference applied the original's box_xyxy_to_xywh to all 12 boxes at once; written for
  // one box, it then subtracts rows rather than columns (row 2 -= row 0, row 3 -= row 1). The
  // generator applies it to one box at a time, as here.
  for (int i = 0; i < g.n; ++i) {
    amg::BoxXYXY want = g.box("boxes_xyxy", i);
    if (i == 2 || i == 3)
      for (int k = 0; k < 4; ++k) want[k] -= g.box("boxes_xyxy", i - 2)[k];
    EXPECT_EQ(g.box("box_xyxy_to_xywh", i), want) << "row " << i;
    const amg::BoxXYXY b = g.box("boxes_xyxy", i);
    EXPECT_EQ(amg::box_xyxy_to_xywh(b), (amg::BoxXYXY{b[0], b[1], b[2] - b[0], b[3] - b[1]}));
  }
}

TEST(AmgUtils, NmsKeepsTheOriginalsIndicesInOrder) {
  SEGANY_REQUIRE_GOLDEN();
  const AmgGolden& g = amg_golden();
  std::vector<amg::BoxXYXY> boxes;
  for (int i = 0; i < g.n; ++i) boxes.push_back(g.box("boxes_xyxy", i));
  const float* s = g.t.at("nms_scores").data_as<const float>();
  const std::vector<int> keep = amg::nms(boxes, std::vector<float>(s, s + g.n), 0.7);
  const Tensor& ref = g.t.at("nms_keep");
  EXPECT_EQ(keep, std::vector<int>(ref.data_as<const int32_t>(), ref.data_as<const int32_t>() + ref.numel()));
}

TEST(AmgUtils, NmsTiesKeepInputOrder) {
  // Equal scores (the crop NMS gives every mask of a crop the same one): the earlier box wins.
  const std::vector<amg::BoxXYXY> boxes = {{0, 0, 10, 10}, {0, 0, 10, 10}, {20, 20, 30, 30}, {1, 1, 10, 10}};
  EXPECT_EQ(amg::nms(boxes, {1, 1, 1, 1}, 0.7), (std::vector<int>{0, 2}));
  EXPECT_EQ(amg::nms(boxes, {0, 1, 1, 1}, 0.7), (std::vector<int>{1, 2}));
  // IoU exactly at the threshold does not suppress: 50 / 100 = 0.5.
  EXPECT_EQ(amg::nms({{0, 0, 10, 10}, {0, 0, 10, 5}}, {1, 0.5f}, 0.5), (std::vector<int>{0, 1}));
}

TEST(AmgUtils, PointGrids) {
  SEGANY_REQUIRE_GOLDEN();
  const AmgGolden& g = amg_golden();
  for (int n : {8, 32}) {
    const Tensor& ref = g.t.at("point_grid_" + std::to_string(n));
    const amg::PointGrid grid = amg::build_point_grid(n);
    ASSERT_EQ(static_cast<int64_t>(grid.size()), ref.dim(0));
    for (size_t i = 0; i < grid.size(); ++i)
      for (int k = 0; k < 2; ++k)
        EXPECT_EQ(static_cast<float>(grid[i][k]), ref.data_as<const float>()[2 * i + k]) << n << ": point " << i;
  }
  const std::vector<amg::PointGrid> layers = amg::build_all_layer_point_grids(32, 2, 2);
  ASSERT_EQ(layers.size(), 3u);
  EXPECT_EQ(layers[0].size(), 32u * 32u);
  EXPECT_EQ(layers[1].size(), 16u * 16u);
  EXPECT_EQ(layers[2].size(), 8u * 8u);
}

TEST(AmgUtils, CropBoxesAndLayers) {
  SEGANY_REQUIRE_GOLDEN();
  const AmgGolden& g = amg_golden();
  struct Case {
    std::string name;
    int h, w, layers;
  };
  for (const Case& c : {Case{"1200x1800_l1", 1200, 1800, 1}, Case{"534x800_l2", 534, 800, 2}}) {
    const amg::CropBoxes crops = amg::generate_crop_boxes(c.h, c.w, c.layers, 512.0 / 1500.0);
    const Tensor& layers = g.t.at("crop_layers_" + c.name);
    ASSERT_EQ(static_cast<int64_t>(crops.boxes.size()), layers.numel()) << c.name;
    for (size_t i = 0; i < crops.boxes.size(); ++i) {
      EXPECT_EQ(crops.boxes[i], g.box("crop_boxes_" + c.name, static_cast<int>(i))) << c.name << ": crop " << i;
      EXPECT_EQ(crops.layers[i], layers.data_as<const int32_t>()[i]) << c.name << ": crop " << i;
    }
  }
}

TEST(AmgUtils, NearCropEdge) {
  SEGANY_REQUIRE_GOLDEN();
  const AmgGolden& g = amg_golden();
  const int32_t* ref = g.t.at("near_crop_edge_16_0_112_96").data_as<const int32_t>();
  for (int i = 0; i < g.n; ++i)
    EXPECT_EQ(amg::is_box_near_crop_edge(g.box("boxes_xyxy", i), {16, 0, 112, 96}, {0, 0, g.w, g.h}), ref[i] != 0)
        << "box " << i;
}

TEST(AmgUtils, UncompressedRleAndArea) {
  SEGANY_REQUIRE_GOLDEN();
  const AmgGolden& g = amg_golden();
  ASSERT_EQ(g.j.at("rle").size(), static_cast<size_t>(g.n));
  for (int i = 0; i < g.n; ++i) {
    const std::vector<uint8_t> mask = g.mask(i);
    const Rle rle = amg::mask_to_rle(mask.data(), g.h, g.w);
    EXPECT_EQ(rle, rle_of_json(g.j["rle"][i])) << "mask " << i;
    EXPECT_EQ(amg::area_from_rle(rle), g.j["areas"][i].get<int64_t>()) << "mask " << i;
    EXPECT_EQ(amg::rle_to_mask(rle), mask) << "mask " << i;
  }
}

TEST(AmgUtils, UncropMaskBoxPoint) {
  const std::vector<uint8_t> crop = {1, 0, 0, 1, 1, 0};  // [2, 3]
  const std::vector<uint8_t> full = amg::uncrop_mask(crop.data(), {1, 2, 4, 4}, 5, 4);
  const std::vector<uint8_t> expect = {0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0};
  EXPECT_EQ(full, expect);
  EXPECT_EQ(amg::uncrop_box({0, 0, 2, 1}, {1, 2, 4, 4}), (amg::BoxXYXY{1, 2, 3, 3}));
  EXPECT_EQ(amg::uncrop_point({0.5, 1.25}, {1, 2, 4, 4}), (std::array<double, 2>{1.5, 3.25}));
}

// The backend's mask generator ops (their host defaults, the CUDA kernels' twins) against the
// building blocks above.
TEST(AmgOps, SelectMasksIsTheFiltersThenTheNms) {
  const std::unique_ptr<Backend> cpu = make_cpu_backend();
  const int image_w = 800, image_h = 600;
  const amg::BoxXYXY crop{100, 50, 600, 450};
  const test::AmgCandidates c = test::random_amg_candidates(400, crop[2] - crop[0], crop[3] - crop[1], 11);
  for (int filters = 0; filters < 4; ++filters) {
    Backend::MaskSelection sel;
    sel.filter_iou = filters & 1, sel.filter_stability = filters & 2;
    sel.iou_thresh = 0.4f, sel.stability_thresh = 0.5f;
    std::copy(crop.begin(), crop.end(), sel.crop);
    sel.image_h = image_h, sel.image_w = image_w;
    sel.nms_thresh = 0.7;
    std::vector<int> survivors;
    std::vector<amg::BoxXYXY> boxes;
    std::vector<float> scores;
    for (int i = 0; i < 400; ++i) {
      const int32_t* s = c.stats.data_as<const int32_t>() + i * 7;
      const float iou = c.iou.data_as<const float>()[i];
      if (sel.filter_iou && !(iou > sel.iou_thresh)) continue;
      if (sel.filter_stability && !(static_cast<float>(s[5]) / static_cast<float>(s[6]) >= sel.stability_thresh)) continue;
      const amg::BoxXYXY box{s[1], s[2], s[3], s[4]};
      if (amg::is_box_near_crop_edge(box, crop, {0, 0, image_w, image_h})) continue;
      survivors.push_back(i);
      boxes.push_back(box);
      scores.push_back(iou);
    }
    std::vector<int> want;
    for (int k : amg::nms(boxes, scores, sel.nms_thresh)) want.push_back(survivors[k]);
    Tensor keep = Tensor::empty({401}, DType::I32);
    cpu->select_masks(c.iou, c.stats, sel, keep);
    const int32_t* k = keep.data_as<const int32_t>();
    EXPECT_EQ(std::vector<int>(k + 1, k + 1 + k[0]), want) << "filters " << filters;
    // Enough survive, and the NMS drops some of them, for the comparison to mean something.
    EXPECT_GT(want.size(), 20u);
    EXPECT_LT(want.size(), survivors.size());
  }
}

// Bit-packed masks to uint8, a pixel per byte: whole words and a partial last word.
TEST(AmgOps, UnpackedBitsAreEachPixelsBit) {
  std::mt19937 gen(11);
  for (int64_t pixels : {int64_t(1), int64_t(31), int64_t(32), int64_t(33), int64_t(1920) * 1080, int64_t(1000003)}) {
    std::vector<uint32_t> bits((pixels + 31) / 32);
    for (uint32_t& w : bits) w = static_cast<uint32_t>(gen());
    for (int64_t shift : {0, 1}) {  // a 16-byte aligned output (streaming stores) and one that is not
      std::vector<uint8_t> buffer(pixels + 17, 7);
      uint8_t* got = buffer.data() + (16 - reinterpret_cast<uintptr_t>(buffer.data()) % 16) % 16 + shift;
      unpack_mask_bits(bits.data(), pixels, got);
      for (int64_t i = 0; i < pixels; ++i)
        ASSERT_EQ(got[i], (bits[i / 32] >> (i % 32)) & 1u) << "pixel " << i << " of " << pixels << ", shift " << shift;
      EXPECT_EQ(got[pixels], 7) << "written past the last pixel";
    }
  }
}

TEST(AmgOps, UncroppedBitsRunLengthsAreTheRleOfTheUncroppedMask) {
  const std::unique_ptr<Backend> cpu = make_cpu_backend();
  const int H = 61, W = 47;
  for (const amg::BoxXYXY& crop : {amg::BoxXYXY{0, 0, W, H}, amg::BoxXYXY{5, 0, 30, H}, amg::BoxXYXY{0, 9, W, 40},
                                   amg::BoxXYXY{13, 17, 44, 58}}) {
    const int cw = crop[2] - crop[0], ch = crop[3] - crop[1];
    std::vector<std::vector<uint8_t>> masks;
    for (int k = 0; k < 9; ++k) masks.push_back(test::random_blob_mask(ch, cw, 100 + k));
    masks.push_back(std::vector<uint8_t>(size_t(cw) * ch, 1));  // full: touches every crop edge
    const int64_t K = static_cast<int64_t>(masks.size());
    const Tensor bits = test::column_major_bits(masks, ch, cw);
    Tensor placed = Tensor::empty({K, (int64_t(H) * W + 31) / 32}, DType::I32);
    cpu->uncrop_bits(bits, crop.data(), H, W, placed);
    Tensor offsets = Tensor::empty({K + 1}, DType::I64), runs = Tensor::empty({4}, DType::I32);
    cpu->encode_runs(placed, int64_t(H) * W, offsets, runs);  // too small: only the offsets
    const int64_t total = offsets.data_as<const int64_t>()[K];
    ASSERT_GT(total, 4);
    runs = Tensor::empty({total}, DType::I32);
    cpu->encode_runs(placed, int64_t(H) * W, offsets, runs);
    const int64_t* off = offsets.data_as<const int64_t>();
    const auto* r = reinterpret_cast<const uint32_t*>(runs.data_as<const int32_t>());
    for (int64_t k = 0; k < K; ++k) {
      const Rle want = amg::mask_to_rle(amg::uncrop_mask(masks[k].data(), crop, H, W).data(), H, W);
      EXPECT_EQ(std::vector<uint32_t>(r + off[k], r + off[k + 1]), want.counts) << "mask " << k;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// COCO compressed RLE. The expected strings were made once with pycocotools 2.0.11:
// mask_utils.encode(np.asfortranarray(mask)) for the masks, and
// mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w) for the uncompressed RLEs
// (what the original's coco_encode_rle calls).

TEST(CocoRle, HandMadeMasksAsPycocotools) {
  const std::vector<uint8_t> a = {0, 1, 1, 0, 0,  //
                                  0, 1, 1, 1, 0,  //
                                  1, 0, 0, 1, 0,  //
                                  0, 0, 0, 0, 1};
  EXPECT_EQ(amg::rle_to_coco_string(amg::mask_to_rle(a.data(), 4, 5)), "211110101O");
  const std::vector<uint8_t> zeros(9, 0), ones(6, 1);
  EXPECT_EQ(amg::rle_to_coco_string(amg::mask_to_rle(zeros.data(), 3, 3)), "9");
  EXPECT_EQ(amg::rle_to_coco_string(amg::mask_to_rle(ones.data(), 2, 3)), "06");
  // Counts of several 5-bit groups and negative differences against the count two before.
  const Rle big{2, 85005, {100000, 3, 5, 70000, 1, 1}};
  EXPECT_EQ(amg::rle_to_coco_string(big), "PeQ335][T2LadkM");
  EXPECT_EQ(amg::rle_from_coco_string("PeQ335][T2LadkM", 2, 85005), big);
}

TEST(CocoRle, GoldenRlesAsPycocotoolsAndRoundTrip) {
  SEGANY_REQUIRE_GOLDEN();
  const AmgGolden& g = amg_golden();
  for (int i = 0; i < g.n; ++i) {
    const Rle rle = rle_of_json(g.j["rle"][i]);
    const std::string s = amg::rle_to_coco_string(rle);
    EXPECT_EQ(amg::rle_from_coco_string(s, rle.height, rle.width), rle) << "mask " << i;
  }
  EXPECT_EQ(amg::rle_to_coco_string(rle_of_json(g.j["rle"][0])),
            "_\\85i20ZMLb29OH]M9a23`MC\\2>32M10000O_OdMa0]2O110N1O101M3O2FZM30Ml20`g1");
  EXPECT_EQ(amg::rle_to_coco_string(rle_of_json(g.j["rle"][10])), "PP<");  // empty 96x128
}

TEST(CocoRle, MalformedStringsAreErrors) {
  EXPECT_THROW(amg::rle_from_coco_string("9", 3, 4), Error);   // covers 9 pixels, not 12
  EXPECT_THROW(amg::rle_from_coco_string("P", 3, 3), Error);   // ends inside a count
  EXPECT_THROW(amg::rle_from_coco_string("9\x01", 3, 3), Error);
  EXPECT_THROW(amg::rle_to_mask(Rle{2, 2, {1, 1}}), Error);
}

// ---------------------------------------------------------------------------------------------
// Connected components and small regions (cv2.connectedComponentsWithStats, 8-connectivity)

TEST(SmallRegions, ComponentsAreEightConnectedAndNumberedByBlockScan) {
  // Pixels that touch only diagonally are one component. Components are numbered by the first
  // 2x2 block that holds them (block rows of two pixel rows, left to right), not by raster order:
  // the one at (0, 1) comes before the one at (4, 0).
  const std::vector<uint8_t> m = {0, 0, 0, 0, 1, 1,  //
                                  1, 0, 0, 0, 0, 0,  //
                                  0, 1, 0, 0, 0, 0,  //
                                  0, 0, 0, 1, 1, 0};
  std::vector<int> labels;
  std::vector<int64_t> sizes;
  ASSERT_EQ(amg::connected_components(m.data(), 4, 6, labels, sizes), 4);
  // Block (0, 0) holds the pixel at (0, 1): that component is label 1, the one at (4, 0) label 2.
  EXPECT_EQ(labels[1 * 6 + 0], 1);
  EXPECT_EQ(labels[2 * 6 + 1], 1);  // diagonal neighbour
  EXPECT_EQ(labels[0 * 6 + 4], 2);
  EXPECT_EQ(labels[3 * 6 + 3], 3);
  EXPECT_EQ(sizes, (std::vector<int64_t>{18, 2, 2, 2}));
}

TEST(SmallRegions, FillsSmallHolesAndRemovesSmallIslands) {
  // A 6x6 square with a one-pixel hole, and a one-pixel island apart from it.
  const int h = 8, w = 10;
  std::vector<uint8_t> m(h * w, 0);
  for (int y = 1; y < 7; ++y)
    for (int x = 1; x < 7; ++x) m[y * w + x] = 1;
  m[3 * w + 3] = 0;  // hole
  m[2 * w + 8] = 1;  // island
  std::vector<uint8_t> holes = m;
  EXPECT_TRUE(amg::remove_small_regions(holes, h, w, 2, true));
  EXPECT_EQ(holes[3 * w + 3], 1);
  EXPECT_EQ(holes[2 * w + 8], 1);
  std::vector<uint8_t> islands = holes;
  EXPECT_TRUE(amg::remove_small_regions(islands, h, w, 2, false));
  EXPECT_EQ(islands[2 * w + 8], 0);
  EXPECT_EQ(islands[3 * w + 3], 1);
  EXPECT_FALSE(amg::remove_small_regions(islands, h, w, 2, false));  // nothing small left
  EXPECT_FALSE(amg::remove_small_regions(islands, h, w, 2, true));
  // Every island small: the largest stays.
  std::vector<uint8_t> all_small = m;
  EXPECT_TRUE(amg::remove_small_regions(all_small, h, w, 1000, false));
  EXPECT_EQ(all_small[2 * w + 8], 0);
  EXPECT_EQ(all_small[1 * w + 1], 1);
  // The outside of a mask is a "hole" too, filled when small (as the original does).
  std::vector<uint8_t> almost_full(h * w, 1);
  almost_full[0] = 0;
  EXPECT_TRUE(amg::remove_small_regions(almost_full, h, w, 2, true));
  EXPECT_EQ(almost_full[0], 1);
}

// ---------------------------------------------------------------------------------------------
// The whole generator against the original (amg.json)

struct Model {
  std::string dir, image;
};

class AmgGoldenModel : public ::testing::TestWithParam<Model> {};

MaskGeneratorOptions options_of(const nlohmann::json& p) {
  MaskGeneratorOptions o;
  o.points_per_side = p.at("points_per_side").get<int>();
  o.points_per_batch = p.at("points_per_batch").get<int>();
  o.pred_iou_thresh = p.at("pred_iou_thresh").get<double>();
  o.stability_score_thresh = p.at("stability_score_thresh").get<double>();
  o.stability_score_offset = p.at("stability_score_offset").get<double>();
  o.box_nms_thresh = p.at("box_nms_thresh").get<double>();
  o.crop_n_layers = p.at("crop_n_layers").get<int>();
  o.min_mask_region_area = p.at("min_mask_region_area").get<int>();
  o.output_mode = mask_output_mode_from_name(p.at("output_mode").get<std::string>());
  return o;
}

double rle_iou(const Rle& a, const Rle& b) {
  const std::vector<uint8_t> ma = amg::rle_to_mask(a), mb = amg::rle_to_mask(b);
  int64_t inter = 0, uni = 0;
  for (size_t i = 0; i < ma.size(); ++i) {
    inter += ma[i] && mb[i];
    uni += ma[i] || mb[i];
  }
  return uni ? static_cast<double>(inter) / uni : 1.0;
}

TEST_P(AmgGoldenModel, RecordsMatchTheOriginal) {
  SEGANY_REQUIRE_GOLDEN();
  const std::string dir = test::golden_dir() + "/" + GetParam().dir;
  const nlohmann::json ref = read_json(dir + "/amg.json");
  PredictorOptions po;
  po.config = dir + "/config.json";
  Predictor predictor(dir + "/checkpoint.pth", po);
  MaskGenerator generator(predictor, options_of(ref.at("params")));
  const Image image = load_image(test::shared_dir() + "/images/" + GetParam().image);
  const std::vector<MaskRecord> got = generator.generate(image);
  const nlohmann::json& records = ref.at("records");
  ASSERT_EQ(got.size(), records.size());
  for (size_t i = 0; i < got.size(); ++i) {
    SCOPED_TRACE("record " + std::to_string(i));
    const nlohmann::json& r = records[i];
    const Rle want = rle_of_json(r.at("segmentation"));
    EXPECT_EQ(got[i].rle.height, image.height);
    EXPECT_EQ(got[i].rle.width, image.width);
    if (got[i].rle != want) {
      EXPECT_GE(rle_iou(got[i].rle, want), 0.99);
    }
    EXPECT_EQ(got[i].area, amg::area_from_rle(got[i].rle));
    EXPECT_NEAR(static_cast<double>(got[i].area), r.at("area").get<double>(), 0.01 * r.at("area").get<double>());
    for (int k = 0; k < 4; ++k) {
      EXPECT_NEAR(got[i].bbox[k], r.at("bbox")[k].get<double>(), 1.0) << "bbox " << k;
      EXPECT_EQ(got[i].crop_box[k], r.at("crop_box")[k].get<double>()) << "crop_box " << k;
    }
    EXPECT_NEAR(got[i].predicted_iou, r.at("predicted_iou").get<double>(), 1e-3);
    EXPECT_NEAR(got[i].stability_score, r.at("stability_score").get<double>(), 1e-3);
    EXPECT_EQ(got[i].point[0], r.at("point_coords")[0][0].get<double>());
    EXPECT_EQ(got[i].point[1], r.at("point_coords")[0][1].get<double>());
  }
}

INSTANTIATE_TEST_SUITE_P(Models, AmgGoldenModel,
                         ::testing::Values(Model{"micro_h80", "truck.jpg"}, Model{"micro_h64", "dog.jpg"}),
                         [](const auto& info) { return info.param.dir; });

// Crops, small-region removal and every output mode on a micro model: the records are
// consistent with themselves (no reference exists for these settings).
TEST(AmgGenerator, CropsSmallRegionsAndOutputModesAreConsistent) {
  SEGANY_REQUIRE_GOLDEN();
  const std::string dir = test::golden_dir() + "/micro_h64";
  PredictorOptions po;
  po.config = dir + "/config.json";
  Predictor predictor(dir + "/checkpoint.pth", po);
  const Image image = load_image(test::shared_dir() + "/images/dog.jpg");
  MaskGeneratorOptions o;
  o.points_per_side = 4;
  o.points_per_batch = 5;  // batches that split the grid unevenly
  o.pred_iou_thresh = 0;
  o.stability_score_thresh = 0;
  o.crop_n_layers = 1;
  o.min_mask_region_area = 50;
  const amg::CropBoxes crops = amg::generate_crop_boxes(image.height, image.width, 1, o.crop_overlap_ratio);
  // Each output mode costs five encoder passes here: binary masks and COCO strings are checked
  // against the RLE in one run.
  o.output_mode = MaskOutputMode::BinaryMask;
  const std::vector<MaskRecord> recs = MaskGenerator(predictor, o).generate(image);
  ASSERT_FALSE(recs.empty());
  for (size_t i = 0; i < recs.size(); ++i) {
    SCOPED_TRACE("record " + std::to_string(i));
    const MaskRecord& r = recs[i];
    const std::vector<uint8_t> mask = amg::rle_to_mask(r.rle);
    EXPECT_EQ(r.area, std::count(mask.begin(), mask.end(), 1));
    EXPECT_EQ(r.bbox, amg::box_xyxy_to_xywh(amg::mask_to_box(mask.data(), image.height, image.width)));
    const amg::BoxXYXY crop{r.crop_box[0], r.crop_box[1], r.crop_box[0] + r.crop_box[2], r.crop_box[1] + r.crop_box[3]};
    EXPECT_NE(std::find(crops.boxes.begin(), crops.boxes.end(), crop), crops.boxes.end());
    EXPECT_GE(r.point[0], crop[0]);
    EXPECT_LE(r.point[0], crop[2]);
    ASSERT_TRUE(r.mask.defined());
    EXPECT_TRUE(std::equal(mask.begin(), mask.end(), r.mask.data_as<const uint8_t>()));
    EXPECT_TRUE(r.coco_rle.empty());
    // No island smaller than the minimum area is left, unless it is all there is.
    std::vector<int> labels;
    std::vector<int64_t> sizes;
    if (amg::connected_components(mask.data(), image.height, image.width, labels, sizes) > 2) {
      for (size_t l = 1; l < sizes.size(); ++l) EXPECT_GE(sizes[l], o.min_mask_region_area);
    }
  }
}

TEST(AmgGenerator, OutputModesDescribeTheSameMasks) {
  SEGANY_REQUIRE_GOLDEN();
  const std::string dir = test::golden_dir() + "/micro_h64";
  PredictorOptions po;
  po.config = dir + "/config.json";
  Predictor predictor(dir + "/checkpoint.pth", po);
  const Image image = load_image(test::shared_dir() + "/images/dog.jpg");
  MaskGeneratorOptions o;
  o.points_per_side = 3;
  o.pred_iou_thresh = 0;
  o.stability_score_thresh = 0;
  o.box_nms_thresh = 1.0;  // keep every mask
  o.output_mode = MaskOutputMode::CocoRle;
  const std::vector<MaskRecord> coco = MaskGenerator(predictor, o).generate(image);
  o.output_mode = MaskOutputMode::UncompressedRle;
  const std::vector<MaskRecord> rle = MaskGenerator(predictor, o).generate(image);
  ASSERT_EQ(coco.size(), rle.size());
  EXPECT_EQ(coco.size(), 27u);  // 9 points, 3 masks each, none dropped
  for (size_t i = 0; i < coco.size(); ++i) {
    EXPECT_EQ(coco[i].rle, rle[i].rle);
    EXPECT_FALSE(rle[i].mask.defined());
    EXPECT_EQ(amg::rle_from_coco_string(coco[i].coco_rle, image.height, image.width), rle[i].rle);
  }
}

TEST(AmgGenerator, RejectsInconsistentOptions) {
  SEGANY_REQUIRE_GOLDEN();
  const std::string dir = test::golden_dir() + "/micro_h64";
  PredictorOptions po;
  po.config = dir + "/config.json";
  Predictor predictor(dir + "/checkpoint.pth", po);
  MaskGeneratorOptions o;
  o.point_grids = {{{0.5, 0.5}}};  // and points_per_side 32: both
  EXPECT_THROW(MaskGenerator(predictor, o), Error);
  o.points_per_side = 0;
  EXPECT_NO_THROW(MaskGenerator(predictor, o));
  o.crop_n_layers = 1;  // one grid for two layers
  EXPECT_THROW(MaskGenerator(predictor, o), Error);
  o = MaskGeneratorOptions{};
  o.points_per_batch = 0;
  EXPECT_THROW(MaskGenerator(predictor, o), Error);
  EXPECT_THROW(mask_output_mode_from_name("png"), Error);
}

// The prompt path's COCO run lengths: counted by the backend from column-major bits when no
// uint8 masks are asked for, fetched with the first download up to runs_per_mask a mask and after
// it where masks have more; equal to the host's runs of the uint8 masks either way.
TEST(PromptRunLengths, FromTheBackendEqualTheMasksRuns) {
  const SamConfig cfg = SamConfig::vit_b();
  auto be = make_cpu_backend();
  Sam sam(cfg, random_sam_weights(cfg, 3), *be);
  const int64_t G = cfg.image_encoder.grid(), C = cfg.mask_decoder.transformer_dim;
  Tensor embedding = Tensor::empty({1, G * G, C});
  std::mt19937 gen(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (int64_t i = 0; i < embedding.numel(); ++i) embedding.data_as<float>()[i] = normal(gen);
  const ImageFrame frame = image_frame(1200, 1800, cfg.image_encoder.img_size);
  std::vector<PreparedPrompt> prepared;
  std::vector<Prompt> prompts(3);
  prompts[0].points = {{900, 600, 1}};
  prompts[1].points = {{300, 200, 1}, {1500, 1000, 0}};
  prompts[1].multimask = false;
  prompts[2].box = Box{100, 150, 1700, 1100};
  for (const Prompt& p : prompts) prepared.push_back(prepare_prompt(p, frame, cfg, ""));
  auto decode = [&](Decoder& decoder, const MaskOutputs& outputs) {
    std::vector<Masks> out(prepared.size());
    const Decoder::Job job{&embedding, frame, prepared, out};
    decoder.decode({&job, 1}, outputs);
    return out;
  };
  Decoder plenty(sam, 4096), few(sam, 16);
  const std::vector<Masks> want = decode(plenty, {.masks = true, .rle = true, .low_res_logits = false});
  size_t most_runs = 0;
  // The third call: `few` has grown to bring back the runs it had to fetch a second time.
  for (Decoder* decoder : {&plenty, &few, &few}) {
    SCOPED_TRACE("runs per mask " + std::to_string(decoder->runs_per_mask()));
    const std::vector<Masks> got = decode(*decoder, {.masks = false, .rle = true, .low_res_logits = false});
    ASSERT_EQ(got.size(), want.size());
    for (size_t k = 0; k < got.size(); ++k) {
      EXPECT_FALSE(got[k].masks.defined());
      ASSERT_EQ(got[k].rle.size(), want[k].rle.size());
      for (size_t j = 0; j < got[k].rle.size(); ++j) {
        EXPECT_TRUE(got[k].rle[j] == want[k].rle[j]) << "prompt " << k << ", mask " << j;
        most_runs = std::max(most_runs, want[k].rle[j].counts.size());
      }
      for (int64_t j = 0; j < want[k].areas.numel(); ++j)
        EXPECT_EQ(got[k].areas.data_as<int64_t>()[j], want[k].areas.data_as<int64_t>()[j]);
    }
  }
  EXPECT_GT(most_runs, 16u) << "no mask has more runs than the first download brings";
  EXPECT_GT(few.runs_per_mask(), 16) << "a second download did not grow the first";
  // Random weights give noise-like masks (~10^5 runs): both grew to what these masks need.
  EXPECT_EQ(few.runs_per_mask(), plenty.runs_per_mask());

  // Masks decoded into a second time hold that call's results alone: nothing of the first is
  // kept or appended to.
  std::vector<Masks> reused(prepared.size());
  const Decoder::Job job{&embedding, frame, prepared, reused};
  plenty.decode({&job, 1}, {.masks = true, .rle = true, .low_res_logits = false});
  plenty.decode({&job, 1}, {.masks = false, .rle = true, .low_res_logits = false});
  for (size_t k = 0; k < reused.size(); ++k) {
    EXPECT_FALSE(reused[k].masks.defined()) << "prompt " << k;
    ASSERT_EQ(reused[k].rle.size(), want[k].rle.size()) << "prompt " << k;
    for (size_t j = 0; j < want[k].rle.size(); ++j) EXPECT_TRUE(reused[k].rle[j] == want[k].rle[j]);
  }
}

}  // namespace
}  // namespace segany
