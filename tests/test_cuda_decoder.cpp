// The prompt path on the GPU (prompt encoder and mask decoder with fp16 activations, fused
// postprocessing, graph replayed) against the fp32 CPU path, given the same image embedding: on
// both golden models, and (printed) on a random full-size vit_h decoder. Bounds (the issue's): low-res logits within 2e-2
// absolute, IoU predictions within 1e-2, masks IoU >= 0.99. And a mixed GPU batch (images with
// 0, 1 and 64 prompt sets of 1 to 16 points, boxes, mask inputs) against each prompt alone. And
// the mask generator on the GPU against the CPU's.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>

#include "backend/backend.h"
#include "golden_cases.h"
#include "io/checkpoint.h"
#include "model/random_init.h"
#include "model/sam.h"
#include "pipeline/amg_utils.h"
#include "pipeline/decoder.h"
#include "pipeline/postprocess.h"
#include "segany/batch_predictor.h"
#include "segany/mask_generator.h"
#include "test_util.h"

namespace segany {
namespace {

#define SEGANY_REQUIRE_CUDA() \
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device"

double iou_u8(const uint8_t* a, const uint8_t* b, int64_t n) {
  int64_t inter = 0, uni = 0;
  for (int64_t i = 0; i < n; ++i) {
    inter += a[i] && b[i];
    uni += a[i] || b[i];
  }
  return uni == 0 ? 1.0 : double(inter) / double(uni);
}

// Worst differences of a set of Masks against a reference set.
struct Worst {
  float logits = 0, scores = 0;
  double mask_iou = 1.0;
  int64_t area = 0;  // of the worst mask (the reference's)
  float score = 0;   // its predicted IoU
  int prompts = 0;
  void add(const Masks& got, const Masks& want) {
    ASSERT_EQ(got.count(), want.count());
    logits = std::max(logits, test::max_abs_diff(got.low_res_logits, want.low_res_logits));
    scores = std::max(scores, test::max_abs_diff(got.scores, want.scores));
    const int64_t pixels = want.masks.numel() / std::max(want.count(), 1);
    for (int m = 0; m < want.count(); ++m) {
      const uint8_t* w = want.masks.data_as<uint8_t>() + m * pixels;
      const double v = iou_u8(got.masks.data_as<uint8_t>() + m * pixels, w, pixels);
      if (v < mask_iou) {
        mask_iou = v;
        area = std::count(w, w + pixels, uint8_t(1));
        score = want.scores.data_as<float>()[m];
      }
    }
    ++prompts;
  }
  void expect_within(const char* what) const {
    std::printf("[ info ] %s (%d prompts): low-res logits max |diff| %.3e, IoU predictions %.3e, worst mask IoU "
                "%.5f (area %lld px, predicted IoU %.3f)\n",
                what, prompts, logits, scores, mask_iou, (long long)area, score);
    EXPECT_LE(logits, 2e-2f) << what;
    EXPECT_LE(scores, 1e-2f) << what;
    EXPECT_GE(mask_iou, 0.99) << what;
  }
};

// Boxes and areas as the host computes them from the uint8 masks, and the run lengths of the
// rle-only output as the host computes them from the same masks.
void expect_consistent(const Masks& m, const Masks& rle_only) {
  const int H = static_cast<int>(m.masks.dim(1)), W = static_cast<int>(m.masks.dim(2));
  ASSERT_EQ(static_cast<int>(rle_only.rle.size()), m.count());
  for (int j = 0; j < m.count(); ++j) {
    const uint8_t* mask = m.masks.data_as<uint8_t>() + int64_t(j) * H * W;
    const MaskStats st = mask_stats(mask, H, W);
    EXPECT_EQ(m.areas.data_as<int64_t>()[j], st.area);
    const int32_t* b = m.boxes.data_as<int32_t>() + 4 * j;
    if (st.area > 0) {
      EXPECT_EQ(b[0], st.bbox_xywh[0]);
      EXPECT_EQ(b[1], st.bbox_xywh[1]);
      EXPECT_EQ(b[2] - b[0] + 1, st.bbox_xywh[2]);
      EXPECT_EQ(b[3] - b[1] + 1, st.bbox_xywh[3]);
    }
    EXPECT_TRUE(rle_only.rle[j] == amg::mask_to_rle(mask, H, W)) << "mask " << j;
    EXPECT_EQ(rle_only.areas.data_as<int64_t>()[j], st.area);
  }
}

std::string model_dir(const std::string& name) { return test::golden_dir() + "/" + name; }

PredictorOptions options(const std::string& name, const std::string& device) {
  PredictorOptions o;
  o.config = model_dir(name) + "/config.json";
  o.device = device;
  return o;
}

// `n` points spread over the image (every third one background); the golden box when n % 3 == 0,
// the golden mask input when n % 4 == 1, multimask for even n.
Prompt variation(const io::TensorMap& g, int n, int W, int H) {
  const Prompt base = test::prompt_of(g, "box_point");
  Prompt p;
  for (int j = 0; j < n; ++j)
    p.points.push_back({std::fmod(base.points[0].x + 53.7f * j, float(W)), std::fmod(base.points[0].y + 29.3f * j * j, float(H)),
                        j % 3 == 2 ? 0 : 1});
  if (n % 3 == 0) p.box = base.box;
  if (n % 4 == 1) p.mask_input = test::prompt_of(g, "mask_input").mask_input;
  p.multimask = n % 2 == 0;
  return p;
}

class DecoderGolden : public ::testing::TestWithParam<std::pair<std::string, std::string>> {};

TEST_P(DecoderGolden, GpuMatchesCpuAndABatchMatchesEachPromptAlone) {
  SEGANY_REQUIRE_CUDA();
  SEGANY_REQUIRE_GOLDEN();
  const auto& [name, image_name] = GetParam();
  const io::TensorMap g = io::load_safetensors(model_dir(name) + "/golden.safetensors");
  const Image image = load_image(test::shared_dir() + "/images/" + image_name);
  const std::string ckpt = model_dir(name) + "/checkpoint.pth";
  Predictor cpu(ckpt, options(name, "cpu"));
  cpu.set_image(image);
  const Tensor embedding = cpu.image_embedding();  // both decoders read the same fp32 embedding

  // The golden cases and variations of 1 to 16 points.
  std::vector<Prompt> prompts;
  for (const std::string c : {"point1", "points_fg_bg", "box", "box_point", "mask_input"})
    prompts.push_back(test::prompt_of(g, c));
  for (int n = 1; n <= 16; ++n) prompts.push_back(variation(g, n, image.width, image.height));

  BatchPredictor gpu(ckpt, options(name, "cuda"));
  BatchPredictor ref(ckpt, options(name, "cpu"));
  auto input = [&](std::vector<Prompt> p) {
    return BatchInput::of_embedding(embedding, image.height, image.width, std::move(p));
  };
  const MaskOutputs all{.masks = true, .rle = false, .low_res_logits = true};
  const std::vector<Masks> want = ref.predict({input(prompts)}, all)[0];
  // Twice: the second call replays the decoder's graphs.
  std::vector<Masks> got = gpu.predict({input(prompts)}, all)[0];
  got = gpu.predict({input(prompts)}, all)[0];
  Worst vs_cpu;
  for (size_t k = 0; k < prompts.size(); ++k) vs_cpu.add(got[k], want[k]);
  vs_cpu.expect_within((name + " gpu vs cpu").c_str());

  // Run lengths straight from the GPU's column-major bits, boxes and areas from its stats.
  const std::vector<Masks> rle = gpu.predict({input(prompts)}, {.masks = false, .rle = true, .low_res_logits = false})[0];
  for (size_t k = 0; k < prompts.size(); ++k) {
    SCOPED_TRACE("prompt " + std::to_string(k));
    EXPECT_FALSE(rle[k].masks.defined());
    EXPECT_FALSE(rle[k].low_res_logits.defined());
    expect_consistent(got[k], rle[k]);
  }

  // A mixed batch: the image with 64 sets (each variation four times, in another order), the
  // image with none (not encoded), the image with one set; against each set decoded alone.
  std::vector<Prompt> many;
  for (int r = 0; r < 4; ++r)
    for (int n = 16; n >= 1; --n) many.push_back(variation(g, (n + 5 * r) % 16 + 1, image.width, image.height));
  const std::vector<Prompt> one = {prompts[3]};
  const std::vector<std::vector<Masks>> batch =
      gpu.predict({BatchInput::of_image(image, many), BatchInput::of_image(image), input(one)}, all);
  ASSERT_EQ(batch.size(), 3u);
  ASSERT_EQ(batch[0].size(), many.size());
  EXPECT_TRUE(batch[1].empty());
  ASSERT_EQ(batch[2].size(), 1u);
  Predictor alone(ckpt, options(name, "cuda"));
  alone.set_image(image);
  Worst vs_alone;
  for (size_t k = 0; k < many.size(); ++k) vs_alone.add(batch[0][k], alone.predict(many[k]));
  vs_alone.expect_within((name + " gpu batch of 64 vs alone").c_str());
  // The embedding input against the Predictor's own (GPU-encoded) embedding: the CPU's.
  Worst embedded;
  embedded.add(batch[2][0], want[3]);
  embedded.expect_within((name + " precomputed embedding").c_str());
}

// Segment everything on the GPU (grid decoded, filtered, NMS-ed and run-length encoded there)
// against the CPU's generator: the same number of records, and each CPU record has a GPU record
// from the same point and crop with mask IoU >= 0.99, predicted IoU within 1e-2. Settings: the
// golden amg.json's (8 points a side, thresholds 0), and one crop layer with batches that split
// the grid unevenly.
TEST_P(DecoderGolden, MaskGeneratorOnTheGpuKeepsTheCpusMasks) {
  SEGANY_REQUIRE_CUDA();
  SEGANY_REQUIRE_GOLDEN();
  const auto& [name, image_name] = GetParam();
  const Image image = load_image(test::shared_dir() + "/images/" + image_name);
  const std::string ckpt = model_dir(name) + "/checkpoint.pth";
  Predictor cpu(ckpt, options(name, "cpu")), gpu(ckpt, options(name, "cuda"));
  MaskGeneratorOptions golden;
  golden.points_per_side = 8;
  golden.points_per_batch = 32;
  golden.pred_iou_thresh = 0;
  golden.stability_score_thresh = 0;
  golden.output_mode = MaskOutputMode::UncompressedRle;
  // Random weights give near-identical masks, which the NMS at 0.7 reduces to one; at 0.95 more
  // stay for the comparison.
  MaskGeneratorOptions crops = golden;
  crops.points_per_side = 6;
  crops.points_per_batch = 7;
  crops.crop_n_layers = 1;
  crops.box_nms_thresh = crops.crop_nms_thresh = 0.95;
  for (const MaskGeneratorOptions& o : {golden, crops}) {
    SCOPED_TRACE("crop layers " + std::to_string(o.crop_n_layers));
    const std::vector<MaskRecord> want = MaskGenerator(cpu, o).generate(image);
    const std::vector<MaskRecord> got = MaskGenerator(gpu, o).generate(image);
    ASSERT_EQ(got.size(), want.size());
    ASSERT_FALSE(want.empty());
    std::vector<bool> used(got.size(), false);
    double worst_iou = 1.0;
    float worst_score = 0, worst_stability = 0;
    for (const MaskRecord& w : want) {
      const std::vector<uint8_t> wm = amg::rle_to_mask(w.rle);
      int best = -1;
      double best_iou = -1;
      for (size_t j = 0; j < got.size(); ++j) {
        if (used[j] || got[j].point != w.point || got[j].crop_box != w.crop_box) continue;
        const std::vector<uint8_t> gm = amg::rle_to_mask(got[j].rle);
        const double v = iou_u8(gm.data(), wm.data(), static_cast<int64_t>(wm.size()));
        if (v > best_iou) best_iou = v, best = static_cast<int>(j);
      }
      ASSERT_GE(best, 0) << "no GPU record from point (" << w.point[0] << ", " << w.point[1] << ")";
      used[best] = true;
      worst_iou = std::min(worst_iou, best_iou);
      worst_score = std::max(worst_score, std::fabs(got[best].predicted_iou - w.predicted_iou));
      worst_stability = std::max(worst_stability, std::fabs(got[best].stability_score - w.stability_score));
      EXPECT_EQ(got[best].area, amg::area_from_rle(got[best].rle));
    }
    std::printf("[ info ] %s, %d crop layer(s): %zu records; worst mask IoU %.5f, predicted IoU max |diff| %.2e, "
                "stability max |diff| %.2e\n",
                name.c_str(), o.crop_n_layers, want.size(), worst_iou, worst_score, worst_stability);
    EXPECT_GE(worst_iou, 0.99);
    EXPECT_LE(worst_score, 1e-2f);
  }
}

// Image files streamed through the GPU (decoded on workers, encoded two at a time while the
// previous pair's masks are handed out; each image's prompts read the encoder's output in place)
// against each prompt set decoded alone; a file that cannot be read fails alone.
TEST_P(DecoderGolden, StreamedFilesMatchEachPromptAlone) {
  SEGANY_REQUIRE_CUDA();
  SEGANY_REQUIRE_GOLDEN();
  const auto& [name, image_name] = GetParam();
  const io::TensorMap g = io::load_safetensors(model_dir(name) + "/golden.safetensors");
  const std::string path = test::shared_dir() + "/images/" + image_name, dir = test::temp_dir("cuda_files");
  std::ofstream(dir + "/broken.jpg") << "not a jpeg";
  const Image image = load_image(path);
  const std::string ckpt = model_dir(name) + "/checkpoint.pth";
  std::vector<FileInput> inputs;
  for (int i = 0; i < 7; ++i) {
    FileInput in{i == 3 ? dir + "/broken.jpg" : path, {}, ""};
    for (int n = 1; n <= i % 4 + 1; ++n)
      in.prompts.push_back(variation(g, (n + 3 * i) % 16 + 1, image.width, image.height));
    inputs.push_back(std::move(in));
  }
  BatchPredictor gpu(ckpt, options(name, "cuda"));
  Predictor alone(ckpt, options(name, "cuda"));
  alone.set_image(image);
  const MaskOutputs all{.masks = true, .rle = false, .low_res_logits = true};
  for (int pass = 0; pass < 2; ++pass) {  // the second replays the graphs the first captured
    std::vector<FileResult> got(inputs.size());
    const size_t failed = gpu.predict_files(
        inputs, [&](FileResult& r) { got[r.index] = std::move(r); }, all, StreamOptions{.batch = 2, .workers = 2});
    EXPECT_EQ(failed, 1u);
    EXPECT_FALSE(got[3].ok());
    Worst vs_alone;
    for (size_t i = 0; i < inputs.size(); ++i) {
      if (i == 3) continue;
      ASSERT_TRUE(got[i].ok()) << got[i].error;
      ASSERT_EQ(got[i].masks.size(), inputs[i].prompts.size());
      for (size_t k = 0; k < inputs[i].prompts.size(); ++k)
        vs_alone.add(got[i].masks[k], alone.predict(inputs[i].prompts[k]));
    }
    vs_alone.expect_within((name + " streamed files vs alone").c_str());
  }
}

INSTANTIATE_TEST_SUITE_P(Models, DecoderGolden,
                         ::testing::Values(std::make_pair(std::string("micro_h80"), std::string("truck.jpg")),
                                           std::make_pair(std::string("micro_h64"), std::string("dog.jpg"))));

// A full-size vit_h decoder with random weights, on a random embedding of unit scale (what the
// neck's LayerNorm gives), for a 1800x1200 image: points, a box and multimask. Its differences to
// the CPU are printed, not held to the bounds above: a random full-size decoder is chaotic (on the
// CPU alone, a perturbation of 1e-4 of the embedding, below any rounding of the GPU's, moves its
// logits by more than 2e-2: test_conditioning.cpp), so no GPU arithmetic can meet them there. The
// full-size shapes are held to the CPU op by op (test_cuda.cpp); here graph replay must equal
// the eager pass bit for bit, and the outputs must be complete and finite.
TEST(CudaDecoder, RandomVitHAgainstTheCpu) {
  SEGANY_REQUIRE_CUDA();
  const SamConfig cfg = SamConfig::vit_h();
  const io::TensorMap weights = random_sam_weights(cfg, 2);
  auto cpu_be = make_cpu_backend();
  auto gpu_be = make_cuda_backend(0);
  Sam cpu(cfg, weights, *cpu_be), gpu(cfg, weights, *gpu_be);
  const int64_t G = cfg.image_encoder.grid(), C = cfg.mask_decoder.transformer_dim;
  Tensor emb = Tensor::empty({1, G * G, C});
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;
  for (int64_t i = 0; i < emb.numel(); ++i) emb.data_as<float>()[i] = normal(rng);
  Tensor emb_gpu = gpu_be->alloc({1, G * G, C}, DType::F32);
  gpu_be->copy_from_host(emb, emb_gpu);

  const ImageFrame frame = image_frame(1200, 1800, cfg.image_encoder.img_size);
  std::vector<Prompt> prompts(4);
  prompts[0].points = {{900, 600, 1}};
  prompts[1].points = {{500, 300, 1}, {1300, 900, 0}, {700, 1000, 1}};
  prompts[2].box = Box{200, 150, 1500, 1100};
  prompts[3].points = {{1000, 500, 1}};
  prompts[3].multimask = true;
  std::vector<PreparedPrompt> prepared;
  for (const Prompt& p : prompts) prepared.push_back(prepare_prompt(p, frame, cfg, ""));
  std::vector<Masks> want(prepared.size()), eager(prepared.size()), replay(prepared.size());
  Decoder dc(cpu), dg(gpu);
  const Decoder::Job jc{&emb, frame, prepared, want}, je{&emb_gpu, frame, prepared, eager},
      jr{&emb_gpu, frame, prepared, replay};
  dc.decode({&jc, 1}, MaskOutputs{});
  dg.decode({&je, 1}, MaskOutputs{});  // the first call of each shape runs eagerly
  dg.decode({&jr, 1}, MaskOutputs{});  // the second captures a graph and launches it
  dg.decode({&jr, 1}, MaskOutputs{});  // the third replays it
  Worst w;
  for (size_t k = 0; k < prompts.size(); ++k) {
    ASSERT_EQ(eager[k].count(), want[k].count());
    EXPECT_EQ(test::max_abs_diff(replay[k].low_res_logits, eager[k].low_res_logits), 0.0f) << "prompt " << k;
    EXPECT_EQ(test::max_abs_diff(replay[k].scores, eager[k].scores), 0.0f) << "prompt " << k;
    EXPECT_EQ(std::memcmp(replay[k].masks.data(), eager[k].masks.data(), eager[k].masks.nbytes()), 0);
    w.add(eager[k], want[k]);
  }
  EXPECT_TRUE(std::isfinite(w.logits) && std::isfinite(w.scores));
  std::printf("[ info ] random vit_h gpu vs cpu (printed, not asserted): low-res logits max |diff| %.3e, IoU "
              "predictions %.3e, worst mask IoU %.5f\n",
              w.logits, w.scores, w.mask_iou);
}

}  // namespace
}  // namespace segany
