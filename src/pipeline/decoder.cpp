#include "pipeline/decoder.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <exception>
#include <functional>
#include <map>
#include <tuple>

#include "backend/image_ops.h"
#include "backend/mask_ops.h"
#include "pipeline/amg_utils.h"
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

std::vector<Tensor> encode_images(Sam& sam, const std::vector<Tensor>& pixels, Backend::Fence* pixels_read,
                                  int64_t batch) {
  Backend& be = sam.backend();
  std::vector<Tensor> out;
  for (size_t first = 0; first < pixels.size(); first += static_cast<size_t>(batch)) {
    const size_t last = std::min(pixels.size(), first + static_cast<size_t>(batch));
    const int64_t B = static_cast<int64_t>(last - first);
    // Resize, normalise and pad on the backend, straight into the encoder's input buffer.
    be.preprocess_images({pixels.begin() + first, pixels.begin() + last}, sam.image_encoder().input(B));
    if (pixels_read) be.record(*pixels_read);
    const Tensor& emb = sam.image_encoder().forward(B);  // [B, G, G, C], reused by the next forward
    const int64_t G = emb.dim(1), C = emb.dim(3);
    for (int64_t i = 0; i < B; ++i) {
      Tensor tokens = be.alloc({1, G * G, C}, emb.dtype());
      be.copy_tokens(emb.slice0(i, i + 1).view({1, G * G, C}), 0, tokens, 0, static_cast<int>(G * G));
      out.push_back(std::move(tokens));
    }
  }
  return out;
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
  Tensor tokens = Tensor::uninitialized({1, G * G, C});
  const float* src = nchw.data_as<const float>();
  float* dst = tokens.data_as<float>();
  for (int64_t c = 0; c < C; ++c)
    for (int64_t t = 0; t < G * G; ++t) dst[t * C + c] = src[c * G * G + t];
  Backend& be = sam.backend();
  Tensor out = be.alloc({1, G * G, C}, DType::F32);
  be.copy_from_host(tokens, out);
  return out;
}

Tensor embedding_to_host(Sam& sam, const Tensor& tokens) {
  const Tensor e = sam.backend().download(tokens);  // [1, G*G, C]
  const int64_t G = sam.config().image_encoder.grid(), C = e.dim(2);
  Tensor out = Tensor::uninitialized({1, C, G, G});
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

Decoder::Decoder(Sam& sam, int64_t runs_per_mask)
    : sam_(sam), runs_per_mask_(std::max<int64_t>(runs_per_mask, 1)), done_(sam.backend().make_fence()) {}

namespace {

// Carves consecutive, 256-byte aligned regions of one buffer.
class Layout {
 public:
  // Reserves `numel` elements of 4 bytes; returns their offset in elements.
  int64_t take(int64_t numel) {
    const int64_t at = size_;
    size_ = (size_ + numel + 63) / 64 * 64;
    return at;
  }
  int64_t size() const { return size_; }

 private:
  int64_t size_ = 0;
};

// A view of `numel` 4-byte elements at `offset` of `buffer`, as `dtype` (float32 or int32).
Tensor region(const Tensor& buffer, int64_t offset, const Shape& shape, DType dtype) {
  auto* p = static_cast<char*>(const_cast<void*>(buffer.data())) + offset * 4;
  return Tensor::wrap(p, shape, dtype, buffer.owner(), buffer.device());
}

// A view of `shape` int64 elements at `offset` (in int64 elements) of an int64 `buffer`.
Tensor region64(const Tensor& buffer, int64_t offset, const Shape& shape) {
  auto* p = static_cast<char*>(const_cast<void*>(buffer.data())) + offset * 8;
  return Tensor::wrap(p, shape, DType::I64, buffer.owner(), buffer.device());
}

// f(0) .. f(n - 1) on the OpenMP threads (inline for a single task); the first exception is
// rethrown once all have run.
void parallel_tasks(size_t n, const std::function<void(size_t)>& f) {
  std::exception_ptr failure;
#pragma omp parallel for schedule(dynamic) if (n > 1)
  for (size_t i = 0; i < n; ++i) {
    try {
      f(i);
    } catch (...) {
#pragma omp critical(segany_decoder_failure)
      if (!failure) failure = std::current_exception();
    }
  }
  if (failure) std::rethrow_exception(failure);
}

// A buffer of at least `numel` 4-byte elements, reused while large enough.
Tensor& grown(Tensor& buf, int64_t numel, const std::function<Tensor(int64_t)>& make) {
  if (!buf.defined() || buf.numel() < numel)
    buf = make(std::max<int64_t>({numel, buf.defined() ? buf.numel() * 3 / 2 : 0, 1}));
  return buf;
}

}  // namespace

void Decoder::enqueue(std::span<const Job> jobs, const MaskOutputs& outputs) {
  check(groups_.empty(), "decoder: the previous call was not finished");
  Backend& be = sam_.backend();
  const SamConfig& cfg = sam_.config();
  const int64_t G = cfg.image_encoder.grid(), side = 4 * G, plane = side * side;
  const int64_t T = sam_.mask_decoder().num_mask_tokens();
  const bool post = outputs.masks || outputs.rle;
  // Bits row-major to expand into uint8 masks on the host. For run lengths alone, column-major bits
  // whose runs the device counts: only the runs come back. With both asked for, the runs are
  // counted on the uint8 masks.
  const bool device_runs = outputs.rle && !outputs.masks;
  // Runs each mask brings back with the first download; a call whose masks have more in all
  // fetches the rest after it (a second sync).
  const int64_t runs_per_mask = runs_per_mask_;

  std::vector<Group> groups;
  for (const Job& job : jobs) {
    check(job.out.size() == job.prompts.size(), "decoder: one Masks per prompt");
    std::map<std::tuple<int, bool, bool>, std::vector<size_t>> by_shape;
    for (size_t i = 0; i < job.prompts.size(); ++i) {
      const PreparedPrompt& p = job.prompts[i];
      by_shape[{p.set.sparse_tokens(), p.mask_input != nullptr, p.multimask}].push_back(i);
    }
    for (auto& [key, members] : by_shape) {
      Group g;
      g.job = &job;
      g.members = std::move(members);
      std::tie(g.Ns, g.mask_inputs, g.multimask) =
          std::tuple<int64_t, bool, bool>(std::get<0>(key), std::get<1>(key), std::get<2>(key));
      // Multimask output skips token 0 (the single-mask token), as the original does.
      g.first = g.multimask ? 1 : 0;
      g.count = g.multimask ? T - 1 : 1;
      g.words = post ? mask_bit_words(job.frame.original_h, job.frame.original_w) : 0;
      groups.push_back(std::move(g));
    }
  }
  if (groups.empty()) return;

  // The decoder's runs: a group alone (its image's embedding shared by its prompts), or groups of
  // one prompt each from different images that share a shape, decoded together with an embedding
  // per prompt (each image's once: nothing is repeated), up to kMostImagesPerRun of them.
  struct Run {
    std::vector<size_t> groups;  // indices into `groups`, rows in this order
    int64_t P = 0;
    bool own_images = false;
    int64_t coords = 0, labels = 0, masks = 0;  // inputs: offsets (4-byte elements) in the host buffer
  };
  std::vector<Run> runs;
  {
    std::map<std::tuple<int64_t, bool, bool>, std::vector<size_t>> singles;
    for (size_t gi = 0; gi < groups.size(); ++gi) {
      const Group& g = groups[gi];
      if (g.members.size() == 1)
        singles[{g.Ns, g.mask_inputs, g.multimask}].push_back(gi);
      else
        runs.push_back(Run{{gi}, static_cast<int64_t>(g.members.size()), false});
    }
    for (const auto& [key, list] : singles)
      for (size_t at = 0; at < list.size(); at += kMostImagesPerRun) {
        Run r;
        r.groups.assign(list.begin() + at, list.begin() + std::min(list.size(), at + kMostImagesPerRun));
        r.P = static_cast<int64_t>(r.groups.size());
        r.own_images = r.P > 1;
        runs.push_back(std::move(r));
      }
  }

  // Where everything goes, then the inputs packed into the host buffer.
  Layout in, out, bits_at, offsets_at, runs_at;
  int64_t most_masks = 0;
  for (Run& r : runs) {
    const Group& g0 = groups[r.groups[0]];
    r.coords = in.take(r.P * g0.Ns * 2);
    r.labels = in.take(r.P * g0.Ns);
    if (g0.mask_inputs) r.masks = in.take(r.P * plane);
    int64_t row = 0;
    for (size_t gi : r.groups) {
      groups[gi].row = row;
      row += static_cast<int64_t>(groups[gi].members.size());
    }
  }
  for (Group& g : groups) {
    const int64_t P = static_cast<int64_t>(g.members.size()), M = P * g.count;
    if (outputs.low_res_logits) g.low = out.take(M * plane);
    g.iou = out.take(M);
    if (post) {
      g.stats = out.take(M * 7);
      g.bits_dev = bits_at.take(M * g.words);
    }
    if (device_runs) {
      g.offsets = out.take(2 * (M + 1));  // int64
      g.runs = out.take(M * runs_per_mask);
      g.offsets_dev = offsets_at.take(M + 1);
      g.runs_dev = runs_at.take(M * runs_per_mask);
    } else if (post) {
      g.bits = out.take(M * g.words);
    }
    most_masks = std::max(most_masks, M);
  }
  auto host = [&be](int64_t n) { return be.alloc_host({n}, DType::I32); };
  Tensor& ih = grown(inputs_host_, in.size(), host);
  grown(outputs_host_, out.size(), host);
  for (const Run& r : runs) {
    auto* coords = reinterpret_cast<float*>(ih.data_as<int32_t>() + r.coords);
    int32_t* labels = ih.data_as<int32_t>() + r.labels;
    for (size_t gi : r.groups) {
      const Group& g = groups[gi];
      for (size_t k = 0; k < g.members.size(); ++k) {
        const PreparedPrompt& p = g.job->prompts[g.members[k]];
        const int64_t row = g.row + static_cast<int64_t>(k);
        PromptEncoder::pack(p.set, coords + row * g.Ns * 2, labels + row * g.Ns);
        if (g.mask_inputs)
          std::copy_n(p.mask_input->data_as<const float>(), plane,
                      reinterpret_cast<float*>(ih.data_as<int32_t>() + r.masks) + row * plane);
      }
    }
  }
  auto device = [&be](int64_t n) { return be.alloc({n}, DType::I32); };
  grown(low_dev_, outputs.low_res_logits ? most_masks * plane : 1,
        [&be](int64_t n) { return be.alloc({n}, DType::F32); });
  grown(iou_dev_, most_masks, [&be](int64_t n) { return be.alloc({n}, DType::F32); });
  grown(stats_dev_, post ? most_masks * 7 : 1, device);
  grown(bits_dev_, std::max<int64_t>(bits_at.size(), 1), device);
  grown(offsets_dev_, std::max<int64_t>(offsets_at.size(), 1), [&be](int64_t n) { return be.alloc({n}, DType::I64); });
  grown(runs_dev_, std::max<int64_t>(runs_at.size(), 1), device);

  // Queue every run: inputs up, prompt encoder and mask decoder against the images' embeddings,
  // then each group's postprocessing and outputs down. Runs that share a shape share its buffers:
  // the stream's order keeps one run's outputs from being overwritten before they are copied.
  MaskDecoder& decoder = sam_.mask_decoder();
  for (const Run& r : runs) {
    const Group& g0 = groups[r.groups[0]];
    MaskDecoder::Batch& b = decoder.batch(r.P, g0.Ns, g0.mask_inputs, r.own_images);
    const int64_t HW = b.embedding.dim(1);
    for (size_t gi : r.groups) {  // own images: row i's; else the one image's, shared
      const Group& g = groups[gi];
      Tensor to = b.embedding.slice0(r.own_images ? g.row : 0, r.own_images ? g.row + 1 : 1);
      be.copy_tokens(g.job->embedding->view(to.shape()), 0, to, 0, static_cast<int>(HW));
      if (!r.own_images) break;
    }
    be.upload_async(region(ih, r.coords, b.coords.shape(), DType::F32), b.coords);
    be.upload_async(region(ih, r.labels, b.labels.shape(), DType::I32), b.labels);
    if (g0.mask_inputs) be.upload_async(region(ih, r.masks, b.masks.shape(), DType::F32), b.masks);
    decoder.forward(b);
    for (size_t gi : r.groups) enqueue_outputs(groups[gi], b, outputs);
  }
  be.record(*done_);
  outputs_ = outputs;
  groups_ = std::move(groups);
}

void Decoder::enqueue_outputs(const Group& g, const MaskDecoder::Batch& b, const MaskOutputs& outputs) {
  Backend& be = sam_.backend();
  const SamConfig& cfg = sam_.config();
  const int64_t G = cfg.image_encoder.grid(), side = 4 * G, plane = side * side;
  const int64_t T = sam_.mask_decoder().num_mask_tokens();
  const bool post = outputs.masks || outputs.rle, device_runs = outputs.rle && !outputs.masks;
  const int64_t runs_per_mask = runs_per_mask_;
  const int64_t P = static_cast<int64_t>(g.members.size()), M = P * g.count;
  const Tensor low_res = b.low_res.slice0(g.row, g.row + P);  // this group's rows of the run
  const Tensor& oh = outputs_host_;
  // The selected masks' scores and logits, compacted.
  Tensor iou = iou_dev_.view_prefix({P, g.count, 1});
  be.copy_tokens(b.iou.slice0(g.row, g.row + P).view({P, T, 1}), static_cast<int>(g.first), iou, 0,
                 static_cast<int>(g.count));
  Tensor iou_host = region(oh, g.iou, iou.shape(), DType::F32);
  be.download_async(iou, iou_host);
  if (outputs.low_res_logits) {
    Tensor low = low_dev_.view_prefix({P, g.count, plane});
    be.copy_tokens(low_res.view({P, T, plane}), static_cast<int>(g.first), low, 0, static_cast<int>(g.count));
    Tensor low_host = region(oh, g.low, low.shape(), DType::F32);
    be.download_async(low, low_host);
  }
  if (post) {
    const ImageFrame& f = g.job->frame;
    const Backend::MaskFrame frame{static_cast<int>(cfg.image_encoder.img_size), f.input_h, f.input_w, f.original_h,
                                   f.original_w};
    Tensor stats = stats_dev_.view_prefix({M, 7});
    Tensor bits = region(bits_dev_, g.bits_dev, {M, g.words}, DType::I32);
    be.postprocess_masks(low_res, static_cast<int>(g.first), static_cast<int>(g.count), frame, 0.0f, 0.0f, device_runs,
                         &bits, stats);
    Tensor stats_host = region(oh, g.stats, stats.shape(), DType::I32);
    be.download_async(stats, stats_host);
    if (device_runs) {
      Tensor offsets = region64(offsets_dev_, g.offsets_dev, {M + 1});
      Tensor runs = region(runs_dev_, g.runs_dev, {M * runs_per_mask}, DType::I32);
      be.encode_runs(bits, int64_t(f.original_h) * f.original_w, offsets, runs);
      Tensor offsets_host = region(oh, g.offsets, {M + 1}, DType::I64);
      Tensor runs_host = region(oh, g.runs, runs.shape(), DType::I32);
      be.download_async(offsets, offsets_host);
      be.download_async(runs, runs_host);
    } else {
      Tensor bits_host = region(oh, g.bits, bits.shape(), DType::I32);
      be.download_async(bits, bits_host);
    }
  }
}

void Decoder::finish() {
  if (groups_.empty()) return;
  const std::vector<Group> groups = std::move(groups_);
  groups_.clear();
  const MaskOutputs outputs = outputs_;
  Backend& be = sam_.backend();
  const int64_t G = sam_.config().image_encoder.grid(), side = 4 * G, plane = side * side;
  const bool post = outputs.masks || outputs.rle, device_runs = outputs.rle && !outputs.masks;
  const int64_t runs_per_mask = runs_per_mask_;
  const Tensor &oh = outputs_host_, &bits_dev = bits_dev_, &offsets_dev = offsets_dev_;
  auto host = [&be](int64_t n) { return be.alloc_host({n}, DType::I32); };
  auto device = [&be](int64_t n) { return be.alloc({n}, DType::I32); };
  done_->wait();

  // Groups whose masks have more runs than came back: counted again into a buffer that holds
  // them all (each group's bits are still on the device), then fetched.
  std::map<const Group*, const uint32_t*> more_runs;
  if (device_runs) {
    Layout more;
    std::vector<std::pair<const Group*, int64_t>> again;
    for (const Group& g : groups) {
      const int64_t M = static_cast<int64_t>(g.members.size()) * g.count;
      const int64_t total = reinterpret_cast<const int64_t*>(oh.data_as<int32_t>() + g.offsets)[M];
      if (total > M * runs_per_mask) again.emplace_back(&g, more.take(total));
    }
    if (!again.empty()) {
      Tensor& runs_more = grown(runs_dev_, more.size(), device);
      Tensor& host_more = grown(runs_host_, more.size(), host);
      for (const auto& [g, at] : again) {
        const int64_t M = static_cast<int64_t>(g->members.size()) * g->count;
        const int64_t total = reinterpret_cast<const int64_t*>(oh.data_as<int32_t>() + g->offsets)[M];
        Tensor bits = region(bits_dev, g->bits_dev, {M, g->words}, DType::I32);
        Tensor offsets = region64(offsets_dev, g->offsets_dev, {M + 1});
        Tensor runs = region(runs_more, at, {total}, DType::I32);
        be.encode_runs(bits, int64_t(g->job->frame.original_h) * g->job->frame.original_w, offsets, runs);
        Tensor runs_host = region(host_more, at, {total}, DType::I32);
        be.download_async(runs, runs_host);
        more_runs[g] = reinterpret_cast<const uint32_t*>(host_more.data_as<int32_t>() + at);
        // Later calls bring back this many runs a mask (and a quarter more) with their first
        // download: masks like these (a stream of similar images) then need no second sync, which
        // would also wait for whatever was queued after this call.
        const int64_t per_mask = (total + M - 1) / M;
        runs_per_mask_ = std::min(std::max(runs_per_mask_, per_mask + per_mask / 4), kMostRunsPerMask);
      }
      be.record(*done_);
      done_->wait();
    }
  }

  // Fill the Masks on the host, in parallel: each prompt's scores, boxes, areas, low-res logits and
  // device-counted run lengths, and its tensors; then the uint8 masks from their bits in chunks
  // of pixels (one large mask spreads over every thread); then run lengths counted on them.
  struct Item {
    const Group* g;
    size_t k;  // the prompt's index in its group
  };
  std::vector<Item> items;
  for (const Group& g : groups)
    for (size_t k = 0; k < g.members.size(); ++k) items.push_back({&g, k});
  auto masks_of = [](const Item& item) -> Masks& { return item.g->job->out[item.g->members[item.k]]; };
  parallel_tasks(items.size(), [&](size_t it) {
    const Group& g = *items[it].g;
    const ImageFrame& f = g.job->frame;
    const int64_t H = f.original_h, W = f.original_w;
    const float* iou = reinterpret_cast<const float*>(oh.data_as<int32_t>() + g.iou);
    const float* low = reinterpret_cast<const float*>(oh.data_as<int32_t>() + g.low);
    const int32_t* stats = oh.data_as<int32_t>() + g.stats;
    Masks& m = masks_of(items[it]);
    m = Masks{};  // whatever it held before goes, rather than being appended to
    const int64_t n = g.count, at = static_cast<int64_t>(items[it].k) * n;  // this prompt's first mask
    m.scores = Tensor::empty({n});
    std::copy_n(iou + at, n, m.scores.data_as<float>());
    if (outputs.low_res_logits) {
      m.low_res_logits = Tensor::uninitialized({n, side, side});
      std::copy_n(low + at * plane, n * plane, m.low_res_logits.data_as<float>());
    }
    if (!post) return;
    m.boxes = Tensor::empty({n, 4}, DType::I32);
    m.areas = Tensor::empty({n}, DType::I64);
    for (int64_t j = 0; j < n; ++j) {
      const int32_t* st = stats + (at + j) * 7;
      m.areas.data_as<int64_t>()[j] = st[0];
      std::copy_n(st + 1, 4, m.boxes.data_as<int32_t>() + j * 4);
    }
    if (outputs.masks) {
      m.masks = Tensor::uninitialized({n, H, W}, DType::U8);
    } else if (device_runs) {
      const auto* off = reinterpret_cast<const int64_t*>(oh.data_as<int32_t>() + g.offsets);
      const auto it_more = more_runs.find(&g);
      const uint32_t* runs = it_more != more_runs.end()
                                 ? it_more->second
                                 : reinterpret_cast<const uint32_t*>(oh.data_as<int32_t>() + g.runs);
      for (int64_t j = 0; j < n; ++j)
        m.rle.push_back(Rle{static_cast<int>(H), static_cast<int>(W),
                            std::vector<uint32_t>(runs + off[at + j], runs + off[at + j + 1])});
    }
  });
  if (!outputs.masks) return;

  // The masks' pixels, kChunk (a multiple of 32: whole words of bits) at a time.
  constexpr int64_t kChunk = int64_t{1} << 18;
  struct Chunk {
    const Item* item;
    int64_t j, begin, end;  // mask j of the prompt, pixels [begin, end)
  };
  std::vector<Chunk> chunks;
  for (const Item& item : items) {
    const int64_t pixels = int64_t{item.g->job->frame.original_h} * item.g->job->frame.original_w;
    for (int64_t j = 0; j < item.g->count; ++j)
      for (int64_t begin = 0; begin < pixels; begin += kChunk)
        chunks.push_back({&item, j, begin, std::min(pixels, begin + kChunk)});
  }
  parallel_tasks(chunks.size(), [&](size_t c) {
    const Chunk& ch = chunks[c];
    const Group& g = *ch.item->g;
    const int64_t pixels = int64_t{g.job->frame.original_h} * g.job->frame.original_w;
    const int64_t mask = static_cast<int64_t>(ch.item->k) * g.count + ch.j;  // in the group
    const auto* bits = reinterpret_cast<const uint32_t*>(oh.data_as<int32_t>() + g.bits) + mask * g.words;
    uint8_t* u8 = masks_of(*ch.item).masks.data_as<uint8_t>() + ch.j * pixels;
    unpack_mask_bits(bits + ch.begin / 32, ch.end - ch.begin, u8 + ch.begin);
  });
  if (!outputs.rle) return;
  for (const Item& item : items) masks_of(item).rle.resize(static_cast<size_t>(item.g->count));
  std::vector<std::pair<const Item*, int64_t>> all_masks;
  for (const Item& item : items)
    for (int64_t j = 0; j < item.g->count; ++j) all_masks.emplace_back(&item, j);
  parallel_tasks(all_masks.size(), [&](size_t i) {
    const auto& [item, j] = all_masks[i];
    const ImageFrame& f = item->g->job->frame;
    Masks& m = masks_of(*item);
    m.rle[static_cast<size_t>(j)] =
        amg::mask_to_rle(m.masks.data_as<uint8_t>() + j * int64_t{f.original_h} * f.original_w, f.original_h,
                         f.original_w);
  });
}

}  // namespace segany
