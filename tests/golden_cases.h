// The golden cases of ../shared/golden/*/golden.safetensors: their prompts, and predictions
// checked against their outputs with the tolerances of golden/README.md.
#pragma once

#include <map>
#include <string>

#include "io/tensor_map.h"
#include "segany/predictor.h"
#include "test_util.h"

namespace segany::test {

// The image each golden model's cases were made on (golden/README.md); the model's folder is
// golden_dir()/<model>.
inline const std::string& golden_image(const std::string& model) {
  static const std::map<std::string, std::string> images = {{"micro_h80", "truck.jpg"}, {"micro_h64", "dog.jpg"}};
  return images.at(model);
}

// `got` against the golden tensors under `prefix` (prefix.iou [M], prefix.low_res_logits
// [M, 256, 256], prefix.masks_packed [M, H, W/8]); `index` picks one element of a batch case.
inline void expect_matches(const Masks& got, const io::TensorMap& g, const std::string& prefix, int64_t index = -1) {
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

// The prompt of golden case `c` (points, labels, box, mask input, multimask).
inline Prompt prompt_of(const io::TensorMap& g, const std::string& c) {
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

}  // namespace segany::test
