// Loading a model from a checkpoint that does not fit its architecture: every problem is an
// Error naming the tensor and what was expected, before any computation.
#include <gtest/gtest.h>

#include <functional>

#include "backend/backend.h"
#include "io/checkpoint.h"
#include "model/random_init.h"
#include "model/sam.h"
#include "segany/predictor.h"
#include "test_util.h"

namespace segany {
namespace {

const char* kQkv = "image_encoder.blocks.1.attn.qkv.weight";

std::string golden_config() { return test::golden_dir() + "/micro_h64/config.json"; }

// The golden micro_h64 checkpoint rewritten as safetensors with `edit` applied to its tensor list.
std::string edited_checkpoint(const std::string& name,
                              const std::function<void(std::vector<std::pair<std::string, Tensor>>&)>& edit) {
  const io::TensorMap w = io::load_checkpoint(test::golden_dir() + "/micro_h64/checkpoint.pth");
  std::vector<std::pair<std::string, Tensor>> items = w.items();
  edit(items);
  const std::string path = test::temp_dir("model_load") + "/" + name + ".safetensors";
  io::save_safetensors(path, items);
  return path;
}

std::string load_error(const std::string& checkpoint, const std::string& config) {
  try {
    PredictorOptions opt;
    opt.config = config;
    Predictor p(checkpoint, opt);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(ModelLoad, WrongShapeNamesTheTensorAndBothShapes) {
  SEGANY_REQUIRE_GOLDEN();
  const std::string path = edited_checkpoint("wrong_shape", [](auto& items) {
    for (auto& [n, t] : items)
      if (n == kQkv) t = Tensor::zeros({384, 64});  // [3C, C] with C = 128 expected
  });
  const std::string err = load_error(path, golden_config());
  EXPECT_NE(err.find(kQkv), std::string::npos) << err;
  EXPECT_NE(err.find("[384, 128]"), std::string::npos) << err;
  EXPECT_NE(err.find("[384, 64]"), std::string::npos) << err;
}

TEST(ModelLoad, MissingTensorIsNamed) {
  SEGANY_REQUIRE_GOLDEN();
  const std::string path = edited_checkpoint("missing", [](auto& items) {
    std::erase_if(items, [](const auto& it) { return it.first == "mask_decoder.iou_token.weight"; });
  });
  const std::string err = load_error(path, golden_config());
  EXPECT_NE(err.find("mask_decoder.iou_token.weight"), std::string::npos) << err;
  EXPECT_NE(err.find("missing"), std::string::npos) << err;
}

TEST(ModelLoad, ConfigThatDoesNotMatchTheCheckpoint) {
  SEGANY_REQUIRE_GOLDEN();
  // micro_h64's weights under micro_h80's architecture.
  const std::string err = load_error(test::golden_dir() + "/micro_h64/checkpoint.pth",
                                     test::golden_dir() + "/micro_h80/config.json");
  EXPECT_NE(err.find("expected shape"), std::string::npos) << err;
}

TEST(ModelLoad, InferenceRejectsShapesNoSamHas) {
  SEGANY_REQUIRE_GOLDEN();
  // rel_pos_h whose head dim does not divide the embedding dim.
  const std::string path = edited_checkpoint("bad_head_dim", [](auto& items) {
    for (auto& [n, t] : items)
      if (n == "image_encoder.blocks.0.attn.rel_pos_h") t = Tensor::zeros({27, 48});
  });
  const std::string err = load_error(path, "");
  EXPECT_NE(err.find("rel_pos_h"), std::string::npos) << err;
}

TEST(ModelLoad, OfficialArchitecturesAreInferredFromShapes) {
  for (const std::string arch : {"vit_b", "vit_l", "vit_h"}) {
    const SamConfig want = SamConfig::from_arch(arch);
    io::TensorMap shapes;  // zero-size stand-ins are enough: inference reads shapes only
    for (const auto& [name, shape] : want.parameter_shapes()) shapes.insert(name, Tensor::wrap(nullptr, shape, DType::F32, nullptr));
    const SamConfig got = SamConfig::infer(shapes);
    EXPECT_EQ(got.arch, arch);
    EXPECT_EQ(got.describe(), want.describe());
  }
}

}  // namespace
}  // namespace segany
