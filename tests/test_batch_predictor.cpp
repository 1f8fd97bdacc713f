// The BatchPredictor against the Predictor and the golden outputs (../shared/golden): a batch that
// holds each model's image twice, as pixels and as a precomputed embedding, with 0, 1 and 16
// prompt sets of every shape gives, for each set, what Predictor::predict gives for it alone.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>

#include "io/checkpoint.h"
#include "segany/batch_predictor.h"
#include "segany/predictor.h"
#include "golden_cases.h"
#include "test_util.h"

namespace segany {
namespace {

using test::mask_iou;
using test::max_abs_diff;

std::string model_dir(const std::string& name) { return test::golden_dir() + "/" + name; }

PredictorOptions options_for(const std::string& name) {
  PredictorOptions opt;
  opt.config = model_dir(name) + "/config.json";
  return opt;
}

// A prompt set and, for a golden case, where its reference is.
struct Case {
  Prompt prompt;
  std::string golden;  // prefix in golden.safetensors, or empty
  int64_t index = -1;  // element of a batch case
};

// The golden cases: the five prompt cases and the three boxes of batch_boxes.
std::vector<Case> golden_cases(const io::TensorMap& g) {
  std::vector<Case> out;
  for (const std::string c : {"point1", "points_fg_bg", "box", "box_point", "mask_input"})
    out.push_back({test::prompt_of(g, c), c, -1});
  const Tensor boxes = g.at("batch_boxes.boxes").to_f32();
  for (int64_t i = 0; i < boxes.dim(0); ++i) {
    const float* b = boxes.data_as<float>() + 4 * i;
    Prompt p;
    p.box = Box{b[0], b[1], b[2], b[3]};
    out.push_back({p, "batch_boxes", i});
  }
  return out;
}

// A variation of the golden prompts with `n` points spread over the W x H image, every third one
// background; with the golden box when n % 3 == 0, the golden mask input when n % 4 == 1, and
// multimask for even n.
Case variation(const io::TensorMap& g, int n, int W, int H) {
  const Prompt base = test::prompt_of(g, "box_point");
  Prompt p;
  for (int j = 0; j < n; ++j) {
    const float x = std::fmod(base.points[0].x + 53.7f * j, static_cast<float>(W));
    const float y = std::fmod(base.points[0].y + 29.3f * j * j, static_cast<float>(H));
    p.points.push_back({x, y, j % 3 == 2 ? 0 : 1});
  }
  if (n % 3 == 0) p.box = base.box;
  if (n % 4 == 1) p.mask_input = test::prompt_of(g, "mask_input").mask_input;
  p.multimask = n % 2 == 0;
  return {p, "", -1};
}

std::vector<Prompt> prompts_of(const std::vector<Case>& cases) {
  std::vector<Prompt> out;
  for (const Case& c : cases) out.push_back(c.prompt);
  return out;
}

// Expects `m` to be what `predictor` (its image set) gives for `prompt` alone; returns the number of
// mask pixels that differ.
int64_t expect_as_alone(const Masks& m, Predictor& predictor, const Prompt& prompt) {
  const Masks alone = predictor.predict(prompt);
  EXPECT_EQ(m.count(), alone.count());
  EXPECT_EQ(m.masks.shape(), alone.masks.shape());
  if (m.count() != alone.count() || m.masks.shape() != alone.masks.shape()) return -1;
  EXPECT_LE(max_abs_diff(m.low_res_logits, alone.low_res_logits), 1e-5f);
  EXPECT_LE(max_abs_diff(m.scores, alone.scores), 1e-6f);
  // Masks identical, but for pixels whose logit is within float rounding of the threshold: a
  // batch of prompts runs the decoder's GEMMs with other shapes than one prompt, which moves
  // logits by ~1e-7 (bit-identical for a prompt decoded alone).
  const Tensor logits = predictor.upscale_logits(alone.low_res_logits);  // [M, H, W]
  int64_t differ = 0;
  for (int64_t j = 0; j < m.masks.numel(); ++j)
    if (m.masks.data_as<uint8_t>()[j] != alone.masks.data_as<uint8_t>()[j]) {
      ++differ;
      EXPECT_LE(std::fabs(logits.data_as<float>()[j]), 1e-5f) << "mask pixel " << j << " differs";
    }
  EXPECT_LE(differ, 16) << "mask pixels differ";
  return differ;
}

class BatchGolden : public ::testing::TestWithParam<std::string> {};

TEST_P(BatchGolden, EveryPromptSetAsAloneAndAsGolden) {
  SEGANY_REQUIRE_GOLDEN();
  const std::string name = GetParam();
  const io::TensorMap g = io::load_safetensors(model_dir(name) + "/golden.safetensors");
  const Image image = load_image(test::shared_dir() + "/images/" + test::golden_image(name));
  Predictor predictor(model_dir(name) + "/checkpoint.pth", options_for(name));
  predictor.set_image(image);
  const Tensor embedding = predictor.image_embedding();
  BatchPredictor batch_predictor(model_dir(name) + "/checkpoint.pth", options_for(name));

  // 16 sets each: the golden cases with variations of 9..16 points; the same for 1..8 points,
  // reversed (so that the golden cases come in another order); and one set of 3 points. Prompts
  // of a shape that two images hold one each decode together, each with its own embedding.
  std::vector<Case> a = golden_cases(g), b = golden_cases(g);
  for (int n = 9; n <= 16; ++n) a.push_back(variation(g, n, image.width, image.height));
  for (int n = 1; n <= 8; ++n) b.push_back(variation(g, n, image.width, image.height));
  std::reverse(b.begin(), b.end());
  ASSERT_EQ(a.size(), 16u);
  ASSERT_EQ(b.size(), 16u);
  const std::vector<Case> one = {variation(g, 3, image.width, image.height)};
  const std::vector<std::vector<Case>> cases = {a, {}, one, b, {}};

  std::vector<BatchInput> batch = {
      BatchInput::of_image(image, prompts_of(a)),
      BatchInput::of_image(image),  // no prompts: not encoded, no results
      BatchInput::of_embedding(embedding, image.height, image.width, prompts_of(one)),
      BatchInput::of_embedding(embedding, image.height, image.width, prompts_of(b)),
      BatchInput::of_embedding(embedding, image.height, image.width),
  };
  batch[2].name = "embedded";
  const std::vector<std::vector<Masks>> got = batch_predictor.predict(batch);
  ASSERT_EQ(got.size(), batch.size());
  for (size_t i = 0; i < batch.size(); ++i) {
    ASSERT_EQ(got[i].size(), cases[i].size()) << "image " << i;
    for (size_t k = 0; k < cases[i].size(); ++k) {
      SCOPED_TRACE("image " + std::to_string(i) + ", prompt " + std::to_string(k));
      const Masks& m = got[i][k];
      const int64_t differ = expect_as_alone(m, predictor, cases[i][k].prompt);
      if (cases[i].size() == 1) {
        EXPECT_EQ(differ, 0) << "a prompt decoded alone";
      }
      if (!cases[i][k].golden.empty()) test::expect_matches(m, g, cases[i][k].golden, cases[i][k].index);
    }
  }
  // An empty batch is no work.
  EXPECT_TRUE(batch_predictor.predict({}).empty());
}

INSTANTIATE_TEST_SUITE_P(Models, BatchGolden, ::testing::Values("micro_h80", "micro_h64"));

// Errors name the image (its index, or the name it was given) and the prompt; nothing runs.
TEST(BatchPredictor, ErrorsNameImageAndPrompt) {
  SEGANY_REQUIRE_GOLDEN();
  const std::string name = "micro_h64";
  const Image image = load_image(test::shared_dir() + "/images/dog.jpg");  // 800x534
  BatchPredictor bp(model_dir(name) + "/checkpoint.pth", options_for(name));
  const Tensor embedding = Tensor::zeros({1, 128, 64, 64});
  Prompt good;
  good.points = {{400, 250, 1}};
  Prompt outside;
  outside.points = {{400, 250, 1}, {900, 10, 1}};
  auto expect_error = [&](const std::vector<BatchInput>& batch, const std::vector<std::string>& parts) {
    try {
      bp.predict(batch);
      ADD_FAILURE() << "no error; expected " << parts[0];
    } catch (const Error& e) {
      for (const std::string& p : parts) EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << e.what();
    }
  };
  expect_error({BatchInput::of_image(image, {good}), BatchInput::of_image(image, {good, good, outside})},
               {"image 1, prompt 2: ", "point (900, 10) lies outside the 800x534 image"});
  BatchInput named = BatchInput::of_embedding(embedding, 534, 800, {Prompt{}});
  named.name = "dog.jpg";
  expect_error({named}, {"dog.jpg, prompt 0: ", "needs at least one point"});
  BatchInput both = BatchInput::of_image(image, {good});
  both.embedding = embedding;
  expect_error({both}, {"image 0: ", "an image or an embedding"});
  expect_error({BatchInput{}}, {"image 0: ", "an image or an embedding"});
  expect_error({BatchInput::of_image(image), BatchInput::of_embedding(Tensor::zeros({1, 256, 64, 64}), 534, 800)},
               {"image 1: ", "float32 [1, 128, 64, 64]", "[1, 256, 64, 64]"});
  expect_error({BatchInput::of_embedding(embedding, 0, 800, {good})}, {"image 0: ", "size"});
  BatchInput wrong_input = BatchInput::of_embedding(embedding, 534, 800, {good});
  wrong_input.input_h = 1024;
  wrong_input.input_w = 684;
  expect_error({wrong_input}, {"image 0: ", "684x1024"});
  Prompt bad_mask = good;
  bad_mask.mask_input = Tensor::zeros({1, 64, 64});
  expect_error({BatchInput::of_image(image, {good, bad_mask})}, {"image 0, prompt 1: ", "mask input"});
}

// predict_files: image files streamed in batches give each prompt set what Predictor::predict
// gives it; an unreadable image, a missing one and one with a prompt outside it fail alone and
// are reported with the reason; an image without prompts gets no masks; every image is handed
// out once, the successful ones in input order.
TEST(BatchPredictor, FilesStreamAsPromptsAlone) {
  SEGANY_REQUIRE_GOLDEN();
  const std::string name = "micro_h64";
  const io::TensorMap g = io::load_safetensors(model_dir(name) + "/golden.safetensors");
  const std::string dir = test::temp_dir("batch_files");
  const std::string dog = test::shared_dir() + "/images/dog.jpg", truck = test::shared_dir() + "/images/truck.jpg";
  std::ofstream(dir + "/broken.png") << "not a png";
  const Image dog_image = load_image(dog), truck_image = load_image(truck);

  Prompt good;
  good.points = {{400, 250, 1}};
  Prompt outside;
  outside.points = {{900, 10, 1}};  // inside the truck (1800x1200), outside the dog (800x534)
  const std::vector<Case> many = {variation(g, 1, 800, 534), variation(g, 3, 800, 534), variation(g, 4, 800, 534)};
  const std::vector<FileInput> inputs = {
      {dog, prompts_of(many), ""},
      {dir + "/broken.png", {good}, "the broken one"},
      {dog, {good, outside}, ""},
      {truck, {}, ""},
      {truck, {good, outside}, ""},
      {dir + "/missing.jpg", {good}, ""},
      {dog, {good}, ""},
  };
  const std::map<size_t, std::string> failures = {
      {1, ""}, {2, "prompt 1: point (900, 10) lies outside the 800x534 image"}, {5, "missing.jpg"}};

  Predictor on_dog(model_dir(name) + "/checkpoint.pth", options_for(name));
  on_dog.set_image(dog_image);
  Predictor on_truck(model_dir(name) + "/checkpoint.pth", options_for(name));
  on_truck.set_image(truck_image);
  BatchPredictor bp(model_dir(name) + "/checkpoint.pth", options_for(name));
  for (const StreamOptions stream :
       {StreamOptions{.batch = 2, .workers = 2}, StreamOptions{.batch = 8, .workers = 0}}) {
    SCOPED_TRACE("batch " + std::to_string(stream.batch) + ", workers " + std::to_string(stream.workers));
    std::map<size_t, FileResult> got;
    std::vector<size_t> succeeded;  // in the order they were handed out
    int batches = 0, batched = 0;
    const size_t failed = bp.predict_files(
        inputs,
        [&](FileResult& r) {
          EXPECT_FALSE(got.contains(r.index)) << "image " << r.index << " handed out twice";
          if (r.ok()) succeeded.push_back(r.index);
          got[r.index] = std::move(r);
        },
        {}, stream,
        [&](const EmbedBatchStats& b) {
          EXPECT_EQ(b.index, batches++);
          batched += b.images;
        });
    EXPECT_EQ(failed, failures.size());
    ASSERT_EQ(got.size(), inputs.size());
    EXPECT_TRUE(std::is_sorted(succeeded.begin(), succeeded.end()));
    EXPECT_EQ(batched, static_cast<int>(inputs.size() - failures.size()));
    EXPECT_EQ(got[1].name, "the broken one");
    EXPECT_EQ(got[0].name, dog);
    for (const auto& [i, why] : failures) {
      SCOPED_TRACE("image " + std::to_string(i));
      EXPECT_FALSE(got[i].ok());
      EXPECT_TRUE(got[i].masks.empty());
      EXPECT_NE(got[i].error.find(why), std::string::npos) << got[i].error;
    }
    EXPECT_TRUE(got[3].ok());
    EXPECT_TRUE(got[3].masks.empty());
    EXPECT_EQ(got[3].width, 1800);
    EXPECT_EQ(got[3].height, 1200);
    for (size_t i : {size_t{0}, size_t{4}, size_t{6}}) {
      const FileResult& r = got[i];
      ASSERT_TRUE(r.ok()) << r.error;
      ASSERT_EQ(r.masks.size(), inputs[i].prompts.size());
      EXPECT_EQ(r.width, i == 4 ? 1800 : 800);
      for (size_t k = 0; k < r.masks.size(); ++k) {
        SCOPED_TRACE("image " + std::to_string(i) + ", prompt " + std::to_string(k));
        expect_as_alone(r.masks[k], i == 4 ? on_truck : on_dog, inputs[i].prompts[k]);
      }
    }
  }
  // Nothing to do is no work.
  EXPECT_EQ(bp.predict_files({}, [](FileResult&) { ADD_FAILURE() << "no images"; }), 0u);
}

}  // namespace
}  // namespace segany
