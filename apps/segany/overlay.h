// A picture of a prediction for people: the image with each mask tinted in its own colour and
// outlined, the prompt's points as dots (green foreground, red background) and its box outlined.
#pragma once

#include "segany/image.h"
#include "segany/predictor.h"

namespace segany::cli {

// masks: uint8 [M, H, W] at the image's size (Masks::masks).
Image render_overlay(const Image& image, const Tensor& masks, const Prompt& prompt);

}  // namespace segany::cli
