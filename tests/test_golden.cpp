// The CPU path against the original Segment Anything's outputs (../shared/golden): the image
// embedding, every prompt case and a batch of boxes, with the tolerances of golden/README.md.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <memory>

#include "io/checkpoint.h"
#include "segany/predictor.h"
#include "golden_cases.h"
#include "test_util.h"

namespace segany {
namespace {

using test::mask_iou;
using test::expect_matches;
using test::max_abs_diff;
using test::prompt_of;

// One predictor per model with its image set, shared by the cases (the encoder is the slow part).
struct Loaded {
  std::unique_ptr<Predictor> predictor;
  io::TensorMap golden;
};

Loaded& loaded(const std::string& name) {
  static std::map<std::string, Loaded> cache;
  auto it = cache.find(name);
  if (it != cache.end()) return it->second;
  const std::string dir = test::golden_dir() + "/" + name;
  Loaded l;
  PredictorOptions opt;
  opt.config = dir + "/config.json";
  l.predictor = std::make_unique<Predictor>(dir + "/checkpoint.pth", opt);
  l.predictor->set_image(load_image(test::shared_dir() + "/images/" + test::golden_image(name)));
  l.golden = io::load_safetensors(dir + "/golden.safetensors");
  return cache.emplace(name, std::move(l)).first->second;
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
