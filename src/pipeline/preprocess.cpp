// SAM's preprocessing: ResizeLongestSide (PIL bilinear through torchvision), then
// Sam.preprocess (normalise, pad). The resize reproduces Pillow's Resample.c bit for bit
// (backend/image_ops.cpp), because one step of rounding in the resized pixels moves every number
// after it.
#include "pipeline/preprocess.h"

#include <string>

namespace segany {

Preprocessed preprocess(const Image& image, int target) {
  Preprocessed p;
  p.original_h = image.height;
  p.original_w = image.width;
  resized_shape(image.height, image.width, target, p.input_h, p.input_w);
  // Shrinking may round a side to 0 (a 1x5000 image to 1024); nothing can be encoded from that.
  check(p.input_h > 0 && p.input_w > 0,
        "image of " + std::to_string(image.width) + "x" + std::to_string(image.height) +
            " pixels is too thin to resize to " + std::to_string(target));
  const Image resized = resize_bilinear_pil(image, p.input_w, p.input_h);
  // Sam.preprocess: (pixel - mean) / std in float32, zero padding at the bottom and right.
  p.input = Tensor::zeros({1, target, target, 3});  // [1, T, T, 3], channels-last
  normalise_into(resized.rgb.data(), p.input_h, p.input_w, target, p.input.data_as<float>());
  return p;
}

}  // namespace segany
