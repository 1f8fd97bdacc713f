// Why the GPU tests do not hold random full-size models' masks to IoU 0.99: their masks are
// chaotic functions of the image embedding. Decoding, in fp32 on the CPU, the same embedding with
// a random perturbation of 1e-3 of its RMS (half of one bf16 rounding) already changes them more.
// The golden models, whose masks are well conditioned, are held to 0.99 (test_cuda_model.cpp).
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "backend/backend.h"
#include "model/random_init.h"
#include "model/sam.h"
#include "pipeline/preprocess.h"
#include "segany/image.h"
#include "test_util.h"

namespace segany {
namespace {

// Every mask token's low-res logits [1, T, 256, 256] for one prompt against embedding e [1, HW, C].
Tensor decode_low_res(Sam& sam, const Tensor& e, const PromptSet& prompt) {
  MaskDecoder::Batch& b = sam.mask_decoder().batch(1, prompt.sparse_tokens(), false);
  sam.backend().copy_tokens(e, 0, b.embedding, 0, static_cast<int>(e.dim(1)));
  PromptEncoder::pack(prompt, b.coords.data_as<float>(), b.labels.data_as<int32_t>());
  sam.mask_decoder().forward(b);
  return b.low_res.clone();
}

TEST(Conditioning, RandomVitBMasksFlipUnderAPerturbationSmallerThanBf16) {
  SEGANY_REQUIRE_GOLDEN();  // for the image
  const SamConfig cfg = SamConfig::vit_b();
  auto be = make_cpu_backend();
  Sam sam(cfg, random_sam_weights(cfg, 1), *be);
  const Preprocessed pre = preprocess(load_image(test::shared_dir() + "/images/groceries.jpg"), 1024);
  be->copy_from_host(pre.input, sam.image_encoder().input(1));
  const Tensor emb = sam.image_encoder().forward(1).clone().view({1, 4096, 256});
  double ss = 0;
  for (int64_t i = 0; i < emb.numel(); ++i) ss += double(emb.data_as<float>()[i]) * emb.data_as<float>()[i];
  const float rms = static_cast<float>(std::sqrt(ss / emb.numel()));

  PromptSet prompt;
  prompt.points = {0.5f * pre.input_w, 0.5f * pre.input_h};
  prompt.labels = {1};
  auto decode = [&](const Tensor& e) { return decode_low_res(sam, e, prompt); };
  const Tensor ref = decode(emb);
  Tensor noisy = emb.clone();
  std::mt19937 gen(7);
  std::normal_distribution<float> normal(0.0f, 1e-3f * rms);
  for (int64_t i = 0; i < noisy.numel(); ++i) noisy.data_as<float>()[i] += normal(gen);
  const Tensor got = decode(noisy);

  const int64_t per_mask = ref.numel() / ref.dim(1);
  double worst = 1.0;
  for (int64_t t = 0; t < ref.dim(1); ++t) {
    int64_t inter = 0, uni = 0;
    for (int64_t i = 0; i < per_mask; ++i) {
      const bool a = ref.data_as<float>()[t * per_mask + i] > 0, b = got.data_as<float>()[t * per_mask + i] > 0;
      inter += a && b;
      uni += a || b;
    }
    const double iou = uni ? double(inter) / double(uni) : 1.0;
    std::printf("[ info ] mask token %lld: IoU %.4f after a 1e-3 perturbation\n", (long long)t, iou);
    worst = std::min(worst, iou);
  }
  EXPECT_LT(worst, 0.99) << "random vit_b masks turned out well conditioned: hold them to IoU 0.99 on the GPU";
}

// The same for the mask decoder alone (the full-size one, as vit_b, vit_l and vit_h share it): a
// random embedding of unit scale and a perturbation of 1e-4 of it, four times below a TF32
// rounding and forty below a bf16 one, move the random decoder's logits by more than the 2e-2 the
// GPU is held to on the golden models (test_cuda_decoder.cpp).
TEST(Conditioning, RandomDecoderLogitsMoveUnderAPerturbationBelowTf32) {
  const SamConfig cfg = SamConfig::vit_b();
  auto be = make_cpu_backend();
  Sam sam(cfg, random_sam_weights(cfg, 2), *be);
  Tensor emb = Tensor::empty({1, 4096, 256});
  std::mt19937 gen(5);
  std::normal_distribution<float> normal;
  for (int64_t i = 0; i < emb.numel(); ++i) emb.data_as<float>()[i] = normal(gen);
  PromptSet prompt;
  prompt.points = {512.0f, 400.0f};
  prompt.labels = {1};
  auto decode = [&](const Tensor& e) { return decode_low_res(sam, e, prompt); };
  const Tensor ref = decode(emb);
  Tensor noisy = emb.clone();
  for (int64_t i = 0; i < noisy.numel(); ++i) noisy.data_as<float>()[i] += 1e-4f * normal(gen);
  const float moved = test::max_abs_diff(decode(noisy), ref);
  std::printf("[ info ] random decoder: a 1e-4 perturbation moves the logits by up to %.4f\n", moved);
  EXPECT_GT(moved, 2e-2f) << "the random decoder turned out well conditioned: hold random vit_h to the bounds on the GPU";
}

}  // namespace
}  // namespace segany
