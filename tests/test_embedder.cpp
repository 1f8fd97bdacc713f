// The Embedder on the CPU (pipeline/embedder.cpp) and the host default of
// Backend::preprocess_images (backend/image_ops.cpp) that both it and the Predictor run: the
// preprocessing equals preprocess() to the bit, the embeddings equal the original's (golden
// micro_h64 on dog.jpg), batching changes nothing, and a bad image is skipped, not fatal.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "io/checkpoint.h"
#include "pipeline/preprocess.h"
#include "segany/embedder.h"
#include "segany/predictor.h"
#include "test_util.h"

namespace segany {
namespace {

using test::max_abs_diff;

std::string micro() { return test::golden_dir() + "/micro_h64"; }
std::string image_path(const std::string& name) { return test::shared_dir() + "/images/" + name; }

// preprocess_images on the CPU backend against preprocess(), bit for bit, float32 and bf16.
void expect_host_preprocess_matches(const std::vector<Image>& images, int S) {
  auto be = make_cpu_backend(1);
  std::vector<Tensor> in;
  for (const Image& im : images) in.push_back(test::u8_pixels(im));
  const int64_t B = static_cast<int64_t>(images.size());
  Tensor f32 = Tensor::empty({B, S, S, 3}), bf16 = Tensor::empty({B, S, S, 3}, DType::BF16);
  for (int64_t i = 0; i < f32.numel(); ++i) f32.data_as<float>()[i] = NAN;  // every value must be written
  be->preprocess_images(in, f32);
  be->preprocess_images(in, bf16);
  for (int64_t b = 0; b < B; ++b) {
    const Preprocessed want = preprocess(images[b], S);
    const float* w = want.input.data_as<const float>();
    const float* g = f32.data_as<const float>() + b * S * S * 3;
    const uint16_t* h = bf16.data_as<const uint16_t>() + b * S * S * 3;
    int64_t bad = 0, bad16 = 0;
    for (int64_t i = 0; i < int64_t(S) * S * 3; ++i) {
      bad += std::memcmp(&w[i], &g[i], sizeof(float)) != 0;
      bad16 += h[i] != f32_to_bf16(w[i]);
    }
    EXPECT_EQ(bad, 0) << "image " << b << " (" << images[b].width << "x" << images[b].height << ") float32";
    EXPECT_EQ(bad16, 0) << "image " << b << " bf16";
  }
}

TEST(PreprocessImages, HostMatchesPreprocessOnPatterns) {
  // Shrinking both sides, one side unchanged (a pass Pillow skips), enlarging, a square.
  expect_host_preprocess_matches(
      {test::pattern_image(300, 200), test::pattern_image(128, 97), test::pattern_image(40, 128),
       test::pattern_image(37, 23), test::pattern_image(128, 128)},
      128);
}

TEST(PreprocessImages, HostMatchesPreprocessOnPhotos) {
  SEGANY_REQUIRE_GOLDEN();
  expect_host_preprocess_matches({load_image(image_path("dog.jpg")), load_image(image_path("truck.jpg"))}, 1024);
}

TEST(PreprocessImages, RejectsWhatItCannotResize) {
  auto be = make_cpu_backend(1);
  Tensor input = Tensor::empty({1, 64, 64, 3});
  Tensor thin = Tensor::empty({1, 5000, 3}, DType::U8);
  EXPECT_THROW(be->preprocess_images({thin}, input), Error);
  Tensor gray = Tensor::empty({10, 10, 1}, DType::U8);
  EXPECT_THROW(be->preprocess_images({gray}, input), Error);
  EXPECT_THROW(be->preprocess_images(
                   {test::u8_pixels(test::pattern_image(10, 10)), test::u8_pixels(test::pattern_image(10, 10))}, input),
               Error);
}

// ---- the Embedder on the golden model --------------------------------------------------------

EmbedderOptions micro_options(int batch) {
  EmbedderOptions o;
  o.config = micro() + "/config.json";
  o.batch = batch;
  return o;
}

TEST(Embedder, MatchesTheOriginalOnDog) {
  SEGANY_REQUIRE_GOLDEN();
  Embedder embedder(micro() + "/checkpoint.pth", micro_options(1));
  const std::vector<Embedding> out = embedder.embed({load_image(image_path("dog.jpg"))});
  ASSERT_EQ(out.size(), 1u);
  ASSERT_TRUE(out[0].ok()) << out[0].error;
  const io::TensorMap golden = io::load_safetensors(micro() + "/golden.safetensors");
  const Tensor& want = golden.at("image.embedding");  // [1, C, 64, 64]
  EXPECT_EQ(out[0].embedding.shape(), want.shape());
  EXPECT_LE(max_abs_diff(out[0].embedding, want), 1e-3f);
  EXPECT_EQ(out[0].original_h, 534);
  EXPECT_EQ(out[0].original_w, 800);
  const int32_t* input = golden.at("image.input").data_as<const int32_t>();
  EXPECT_EQ(out[0].input_h, input[0]);
  EXPECT_EQ(out[0].input_w, input[1]);
}

TEST(Embedder, ABatchOfTwoEqualsSingleImagesAndThePredictor) {
  SEGANY_REQUIRE_GOLDEN();
  const std::vector<Image> images = {load_image(image_path("dog.jpg")), load_image(image_path("truck.jpg"))};
  Embedder single(micro() + "/checkpoint.pth", micro_options(1));
  Embedder pair(micro() + "/checkpoint.pth", micro_options(2));
  const std::vector<Embedding> a = single.embed(images), b = pair.embed(images);
  ASSERT_EQ(a.size(), 2u);
  ASSERT_EQ(b.size(), 2u);
  PredictorOptions po;
  po.config = micro() + "/config.json";
  Predictor predictor(micro() + "/checkpoint.pth", po);
  for (size_t i = 0; i < 2; ++i) {
    ASSERT_TRUE(a[i].ok() && b[i].ok());
    EXPECT_EQ(a[i].index, i);
    EXPECT_EQ(b[i].index, i);
    EXPECT_LE(max_abs_diff(a[i].embedding, b[i].embedding), 1e-4f) << "image " << i;
    EXPECT_EQ(b[i].original_w, images[i].width);
    predictor.set_image(images[i]);
    EXPECT_LE(max_abs_diff(a[i].embedding, predictor.image_embedding()), 1e-4f) << "image " << i;
  }
}

TEST(Embedder, SkipsABadImageAndGoesOn) {
  SEGANY_REQUIRE_GOLDEN();
  const std::string dir = test::temp_dir("embedder_bad");
  const std::string bad = dir + "/broken.jpg";
  std::ofstream(bad) << "not a jpeg";
  const std::vector<std::string> paths = {image_path("dog.jpg"), bad, dir + "/missing.png", image_path("dog.jpg")};
  EmbedderOptions o = micro_options(2);
  o.workers = 2;
  Embedder embedder(micro() + "/checkpoint.pth", o);
  std::vector<Embedding> results;
  std::vector<EmbedBatchStats> batches;
  const size_t failed = embedder.embed_files(
      paths, [&](Embedding& e) { results.push_back(std::move(e)); },
      [&](const EmbedBatchStats& s) { batches.push_back(s); });
  EXPECT_EQ(failed, 2u);
  ASSERT_EQ(results.size(), 4u);
  int ok = 0;
  for (const Embedding& e : results) {
    EXPECT_EQ(e.name, paths[e.index]);
    if (e.index == 1 || e.index == 2) {
      EXPECT_FALSE(e.ok());
      EXPECT_FALSE(e.embedding.defined());
    } else {
      ASSERT_TRUE(e.ok()) << e.error;
      ++ok;
    }
  }
  EXPECT_EQ(ok, 2);
  // The two good images form one full batch despite the failures between them.
  ASSERT_EQ(batches.size(), 1u);
  EXPECT_EQ(batches[0].images, 2);
  EXPECT_GT(batches[0].images_per_s(), 0);
}

}  // namespace
}  // namespace segany
