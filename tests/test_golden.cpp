// The CPU path against the original Segment Anything's outputs (../shared/golden): the image
// embedding, every prompt case and a batch of boxes, with the tolerances of golden/README.md.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <memory>

#include "io/checkpoint.h"
#include "segany/predictor.h"
#include "test_util.h"

namespace segany {
namespace {

using test::mask_iou;
using test::max_abs_diff;

struct Model {
  std::string dir, image;
};

const std::map<std::string, Model>& models() {
  static const std::map<std::string, Model> m = {
      {"micro_h80", {"micro_h80", "truck.jpg"}},
      {"micro_h64", {"micro_h64", "dog.jpg"}},
  };
  return m;
}

// One predictor per model with its image set, shared by the cases (the encoder is the slow part).
struct Loaded {
  std::unique_ptr<Predictor> predictor;
  io::TensorMap golden;
};

Loaded& loaded(const std::string& name) {
  static std::map<std::string, Loaded> cache;
  auto it = cache.find(name);
  if (it != cache.end()) return it->second;
  const std::string dir = test::golden_dir() + "/" + models().at(name).dir;
  Loaded l;
  PredictorOptions opt;
  opt.config = dir + "/config.json";
  l.predictor = std::make_unique<Predictor>(dir + "/checkpoint.pth", opt);
  l.predictor->set_image(load_image(test::shared_dir() + "/images/" + models().at(name).image));
  l.golden = io::load_safetensors(dir + "/golden.safetensors");
  return cache.emplace(name, std::move(l)).first->second;
}

// Checks masks, scores and low-res logits of `got` against golden tensors under `prefix`
// (prefix.iou [M], prefix.low_res_logits [M, 256, 256], prefix.masks_packed [M, H, W/8]).
void expect_matches(const Masks& got, const io::TensorMap& g, const std::string& prefix, int64_t index = -1) {
  Tensor iou = g.at(prefix + ".iou"), low = g.at(prefix + ".low_res_logits"), packed = g.at(prefix + ".masks_packed");
  if (index >= 0) {  // one element of a batch
    iou = iou.slice0(index, index + 1);
    low = low.slice0(index, index + 1);
    packed = packed.slice0(index, index + 1);
  }
  const int64_t M = iou.numel();
  ASSERT_EQ(got.count(), M) << prefix;
  EXPECT_LE(max_abs_diff(got.scores, iou.view({M})), 1e-4f) << prefix << ": IoU predictions";
  EXPECT_LE(max_abs_diff(got.low_res_logits, low.view({M, 256, 256})), 1e-3f) << prefix << ": low-res logits";
  const int H = static_cast<int>(got.masks.dim(1)), W = static_cast<int>(got.masks.dim(2));
  ASSERT_EQ(packed.numel(), M * H * ((W + 7) / 8)) << prefix << ": mask size";
  for (int64_t m = 0; m < M; ++m)
    EXPECT_GE(mask_iou(got.masks.data_as<uint8_t>() + m * H * W, packed.data_as<uint8_t>() + m * H * ((W + 7) / 8), H, W),
              0.995)
        << prefix << ": mask " << m;
}

Prompt prompt_of(const io::TensorMap& g, const std::string& c) {
  Prompt p;
  if (g.contains(c + ".point_coords")) {
    const Tensor pc = g.at(c + ".point_coords").to_f32(), pl = g.at(c + ".point_labels");
    for (int64_t i = 0; i < pc.dim(0); ++i)
      p.points.push_back({pc.data_as<float>()[2 * i], pc.data_as<float>()[2 * i + 1], pl.data_as<int32_t>()[i]});
  }
  if (g.contains(c + ".box")) {
    const float* b = g.at(c + ".box").data_as<const float>();
    p.box = Box{b[0], b[1], b[2], b[3]};
  }
  if (g.contains(c + ".mask_input")) p.mask_input = g.at(c + ".mask_input").to_f32();
  p.multimask = g.at(c + ".multimask").data_as<const int32_t>()[0] != 0;
  return p;
}

class Golden : public ::testing::TestWithParam<std::string> {};

TEST_P(Golden, ImageEmbedding) {
  SEGANY_REQUIRE_GOLDEN();
  Loaded& l = loaded(GetParam());
  const Tensor& ref = l.golden.at("image.embedding");
  const Tensor got = l.predictor->image_embedding();
  ASSERT_EQ(got.shape(), ref.shape());
  EXPECT_LE(max_abs_diff(got, ref), 1e-3f);
}

TEST_P(Golden, PromptCases) {
  SEGANY_REQUIRE_GOLDEN();
  Loaded& l = loaded(GetParam());
  for (const std::string c : {"point1", "points_fg_bg", "box", "box_point", "mask_input"}) {
    SCOPED_TRACE(c);
    expect_matches(l.predictor->predict(prompt_of(l.golden, c)), l.golden, c);
  }
}

TEST_P(Golden, BatchOfBoxes) {
  SEGANY_REQUIRE_GOLDEN();
  Loaded& l = loaded(GetParam());
  const Tensor boxes = l.golden.at("batch_boxes.boxes").to_f32();
  std::vector<Prompt> prompts(boxes.dim(0));
  for (int64_t i = 0; i < boxes.dim(0); ++i) {
    const float* b = boxes.data_as<float>() + 4 * i;
    prompts[i].box = Box{b[0], b[1], b[2], b[3]};
  }
  const std::vector<Masks> out = l.predictor->predict_batch(prompts);
  ASSERT_EQ(out.size(), prompts.size());
  for (size_t i = 0; i < out.size(); ++i) expect_matches(out[i], l.golden, "batch_boxes", static_cast<int64_t>(i));
}

// A mixed batch decodes each prompt exactly as alone.
TEST_P(Golden, MixedBatchEqualsSinglePrompts) {
  SEGANY_REQUIRE_GOLDEN();
  Loaded& l = loaded(GetParam());
  std::vector<Prompt> prompts;
  for (const std::string c : {"point1", "box", "box_point", "mask_input", "points_fg_bg", "point1"})
    prompts.push_back(prompt_of(l.golden, c));
  const std::vector<Masks> batch = l.predictor->predict_batch(prompts);
  for (size_t i = 0; i < prompts.size(); ++i) {
    const Masks one = l.predictor->predict(prompts[i]);
    EXPECT_LE(max_abs_diff(batch[i].low_res_logits, one.low_res_logits), 1e-4f) << "prompt " << i;
    EXPECT_LE(max_abs_diff(batch[i].scores, one.scores), 1e-5f) << "prompt " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(Models, Golden, ::testing::Values("micro_h80", "micro_h64"));

}  // namespace
}  // namespace segany
