#include "pipeline/decoder.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>

#include "backend/image_ops.h"
#include "pipeline/postprocess.h"

namespace segany {
namespace {

bool finite(float v) { return std::isfinite(v); }

// A coordinate as a user typed it: "5000", "12.5", "nan".
std::string num(float v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", static_cast<double>(v));
  return buf;
}

// Elements from `offset`, rounded up so that each group's region starts on 256 bytes.
int64_t aligned(int64_t offset) { return (offset + 63) / 64 * 64; }

// A host staging buffer of at least `numel` elements of `dtype`, reused while it is large enough.
Tensor& staging(Backend& be, Tensor& buf, int64_t numel, DType dtype) {
  if (!buf.defined() || buf.dtype() != dtype || buf.numel() < numel)
    buf = be.alloc_host({std::max<int64_t>(numel, buf.defined() ? buf.numel() * 3 / 2 : 0)}, dtype);
  return buf;
}

}  // namespace

ImageFrame image_frame(int original_h, int original_w, int img_size) {
  ImageFrame f;
  f.original_h = original_h;
  f.original_w = original_w;
  resized_shape(original_h, original_w, img_size, f.input_h, f.input_w);
  check(f.input_h > 0 && f.input_w > 0, "image of " + std::to_string(original_w) + "x" + std::to_string(original_h) +
                                            " pixels is too thin to resize to " + std::to_string(img_size));
  return f;
}

Tensor encode_image(Sam& sam, const Tensor& pixels, Backend::Fence* pixels_read) {
  Backend& be = sam.backend();
  // Resize, normalise and pad on the backend, straight into the encoder's input buffer.
  be.preprocess_images({pixels}, sam.image_encoder().input(1));
  if (pixels_read) be.record(*pixels_read);
  const Tensor& emb = sam.image_encoder().forward(1);  // [1, G, G, C], reused by the next forward
  const int64_t G = emb.dim(1), C = emb.dim(3);
  Tensor tokens = be.alloc({1, G * G, C}, emb.dtype());
  be.copy_tokens(emb.view({1, G * G, C}), 0, tokens, 0, static_cast<int>(G * G));
  return tokens;
}

void check_embedding(const Sam& sam, const Tensor& nchw, const std::string& what) {
  const int64_t G = sam.config().image_encoder.grid(), C = sam.config().mask_decoder.transformer_dim;
  check(nchw.defined() && nchw.device() == Device::CPU && nchw.dtype() == DType::F32 &&
            nchw.shape() == Shape({1, C, G, G}),
        what + "embedding must be float32 " + shape_str({1, C, G, G}) + " on the host (as Predictor::image_embedding " +
            "gives), found " +
            (nchw.defined() ? std::string(dtype_name(nchw.dtype())) + " " + shape_str(nchw.shape())
                            : std::string("none")));
}

Tensor embedding_to_device(Sam& sam, const Tensor& nchw, const std::string& what) {
  check_embedding(sam, nchw, what);
  const int64_t G = sam.config().image_encoder.grid(), C = sam.config().mask_decoder.transformer_dim;
  // [1, C, G, G] -> [1, G*G, C]
  Tensor tokens = Tensor::empty({1, G * G, C});
  const float* src = nchw.data_as<const float>();
  float* dst = tokens.data_as<float>();
  for (int64_t c = 0; c < C; ++c)
    for (int64_t t = 0; t < G * G; ++t) dst[t * C + c] = src[c * G * G + t];
  Backend& be = sam.backend();
  Tensor out = be.alloc({1, G * G, C});
  be.copy_from_host(tokens, out);
  return out;
}

Tensor embedding_to_host(Sam& sam, const Tensor& tokens) {
  const Tensor e = sam.backend().download(tokens);  // [1, G*G, C]
  const int64_t G = sam.config().image_encoder.grid(), C = e.dim(2);
  Tensor out = Tensor::empty({1, C, G, G});
  for (int64_t t = 0; t < G * G; ++t)
    for (int64_t c = 0; c < C; ++c) out.data_as<float>()[c * G * G + t] = e.data_as<const float>()[t * C + c];
  return out;
}

PreparedPrompt prepare_prompt(const Prompt& p, const ImageFrame& frame, const SamConfig& cfg,
                              const std::string& where) {
  check(!p.points.empty() || p.box || p.mask_input.defined(),
        where + "needs at least one point, a box or a mask input");
  PreparedPrompt out;
  out.multimask = p.multimask;
  // ResizeLongestSide.apply_coords: scale each axis by new/old size (in double, as numpy does).
  const double sx = static_cast<double>(frame.input_w) / frame.original_w;
  const double sy = static_cast<double>(frame.input_h) / frame.original_h;
  auto inside = [&](float x, float y, const std::string& what) {
    check(finite(x) && finite(y), where + what + " (" + num(x) + ", " + num(y) + ") is not a finite number");
    check(x >= 0 && y >= 0 && x <= frame.original_w && y <= frame.original_h,
          where + what + " (" + num(x) + ", " + num(y) + ") lies outside the " + std::to_string(frame.original_w) +
              "x" + std::to_string(frame.original_h) + " image");
  };
  for (const Point& pt : p.points) {
    inside(pt.x, pt.y, "point");
    check(pt.label == 0 || pt.label == 1,
          where + "point label " + std::to_string(pt.label) + " must be 1 (foreground) or 0 (background)");
    out.set.points.push_back(static_cast<float>(pt.x * sx));
    out.set.points.push_back(static_cast<float>(pt.y * sy));
    out.set.labels.push_back(pt.label);
  }
  if (p.box) {
    const Box& b = *p.box;
    inside(b.x0, b.y0, "box corner");
    inside(b.x1, b.y1, "box corner");
    check(b.x0 <= b.x1 && b.y0 <= b.y1, where + "box must have x0 <= x1 and y0 <= y1");
    out.set.has_box = true;
    out.set.box[0] = static_cast<float>(b.x0 * sx);
    out.set.box[1] = static_cast<float>(b.y0 * sy);
    out.set.box[2] = static_cast<float>(b.x1 * sx);
    out.set.box[3] = static_cast<float>(b.y1 * sy);
  }
  if (p.mask_input.defined()) {
    const int64_t side = 4 * cfg.image_encoder.grid();
    check(p.mask_input.dtype() == DType::F32 && p.mask_input.numel() == side * side &&
              (p.mask_input.ndim() == 2 || (p.mask_input.ndim() == 3 && p.mask_input.dim(0) == 1)),
          where + "mask input must be float32 [1, " + std::to_string(side) + ", " + std::to_string(side) + "], found " +
              dtype_name(p.mask_input.dtype()) + " " + shape_str(p.mask_input.shape()));
    const float* m = p.mask_input.data_as<const float>();
    for (int64_t i = 0; i < p.mask_input.numel(); ++i)
      check(finite(m[i]), where + "mask input holds a value that is not finite");
    out.mask_input = &p.mask_input;
  }
  return out;
}

Decoder::Decoder(Sam& sam) : sam_(sam), done_(sam.backend().make_fence()) {}

void Decoder::decode(std::span<const Job> jobs, bool masks_at_image_size) {
  Backend& be = sam_.backend();
  const SamConfig& cfg = sam_.config();
  const int64_t G = cfg.image_encoder.grid(), C = cfg.mask_decoder.transformer_dim, side = 4 * G;
  const int64_t T = sam_.mask_decoder().num_mask_tokens();

  // One group: prompts of one image decoded in one batch, its outputs still on the device.
  struct Group {
    const Job* job = nullptr;
    std::vector<size_t> members;  // indices into job->prompts
    MaskDecoder::Output dec;
    int64_t low_offset = 0, iou_offset = 0;  // where its outputs land in the staging buffers
  };
  std::vector<Group> groups;
  for (const Job& job : jobs) {
    check(job.out.size() == job.prompts.size(), "decoder: one Masks per prompt");
    // Prompts decode together when they have the same number of sparse tokens and all or none
    // carry a mask input.
    std::map<std::pair<int, bool>, std::vector<size_t>> by_shape;
    for (size_t i = 0; i < job.prompts.size(); ++i)
      by_shape[{job.prompts[i].set.sparse_tokens(), job.prompts[i].mask_input != nullptr}].push_back(i);
    for (auto& [key, members] : by_shape) groups.push_back(Group{&job, std::move(members), {}, 0, 0});
  }

  // Queue every group: prompt encoder, then mask decoder against the image's shared embedding.
  int64_t low_total = 0, iou_total = 0;
  for (Group& g : groups) {
    const int64_t P = static_cast<int64_t>(g.members.size());
    std::vector<const PromptSet*> sets;
    for (size_t i : g.members) sets.push_back(&g.job->prompts[i].set);
    Tensor sparse = be.alloc({P, sets[0]->sparse_tokens(), C});
    be.copy_from_host(sam_.prompt_encoder().embed_sparse(sets), sparse);
    Tensor dense;
    if (g.job->prompts[g.members[0]].mask_input) {
      Tensor masks_host = Tensor::empty({P, side, side});
      for (int64_t i = 0; i < P; ++i)
        std::copy_n(g.job->prompts[g.members[i]].mask_input->data_as<const float>(), side * side,
                    masks_host.data_as<float>() + i * side * side);
      Tensor masks = be.alloc(masks_host.shape());
      be.copy_from_host(masks_host, masks);
      dense = be.alloc({P, G, G, C});
      sam_.prompt_encoder().embed_masks(masks, dense);
    } else {
      dense = sam_.prompt_encoder().no_mask_embed();
    }
    g.dec = sam_.mask_decoder().forward(*g.job->embedding, sam_.prompt_encoder().image_pe(), sparse, dense);
    g.low_offset = low_total;
    g.iou_offset = iou_total;
    low_total = aligned(low_total + g.dec.low_res_logits.numel());
    iou_total = aligned(iou_total + g.dec.iou.numel());
  }
  if (groups.empty()) return;

  // Every group's outputs to the host, then one wait.
  Tensor& low_host = staging(be, staging_low_, low_total, groups[0].dec.low_res_logits.dtype());
  Tensor& iou_host = staging(be, staging_iou_, iou_total, groups[0].dec.iou.dtype());
  std::vector<Tensor> lows, ious;  // each group's region of the staging buffers
  for (const Group& g : groups) {
    Tensor low = low_host.slice0(g.low_offset, g.low_offset + g.dec.low_res_logits.numel());
    Tensor iou = iou_host.slice0(g.iou_offset, g.iou_offset + g.dec.iou.numel());
    be.download_async(g.dec.low_res_logits, low);
    be.download_async(g.dec.iou, iou);
    lows.push_back(low);
    ious.push_back(iou);
  }
  be.record(*done_);
  done_->wait();

  for (size_t gi = 0; gi < groups.size(); ++gi) {
    const Group& g = groups[gi];
    const Tensor low = lows[gi].dtype() == DType::F32 ? lows[gi] : lows[gi].to_f32();  // [P, T, side, side]
    const Tensor iou = ious[gi].dtype() == DType::F32 ? ious[gi] : ious[gi].to_f32();  // [P, 1, T]
    const ImageFrame& f = g.job->frame;
    for (size_t k = 0; k < g.members.size(); ++k) {
      const int64_t i = static_cast<int64_t>(k);
      const PreparedPrompt& p = g.job->prompts[g.members[k]];
      // Multimask output skips token 0 (the single-mask token), as the original does.
      const int64_t first = p.multimask ? 1 : 0, count = p.multimask ? T - 1 : 1;
      Masks& m = g.job->out[g.members[k]];
      m.low_res_logits = Tensor::empty({count, side, side});
      m.scores = Tensor::empty({count});
      for (int64_t j = 0; j < count; ++j) {
        std::copy_n(low.data_as<const float>() + (i * T + first + j) * side * side, side * side,
                    m.low_res_logits.data_as<float>() + j * side * side);
        m.scores.data_as<float>()[j] = iou.data_as<const float>()[i * T + first + j];
      }
      if (masks_at_image_size)
        m.masks = postprocess_masks(m.low_res_logits, cfg.image_encoder.img_size, f.input_h, f.input_w, f.original_h,
                                    f.original_w);
    }
  }
}

}  // namespace segany
