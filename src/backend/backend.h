// The ops the SAM graph (model/) is written in. A backend implements them at the granularity
// that fusion needs; the CPU backend is the fp32 reference and the CUDA backend its fast twin.
//
// Activations are Tensors on the backend's device, allocated by alloc() and reused across calls
// (the model keeps one workspace per batch size). Layouts are channels-last throughout: an image
// grid is [B, H, W, C], a token sequence [B, T, C]. Weights are prepared once at load into what
// the backend runs fastest (transposed, bf16, fp8 with scales, 2:4 compressed); the model only
// holds the opaque handles.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "segany/tensor.h"

namespace segany {

enum class Activation { None, ReLU, GELU };  // GELU is the exact (erf) one, as torch.nn.GELU

// A linear layer y = x W^T + b prepared for one backend. The model never looks inside.
class LinearWeights {
 public:
  virtual ~LinearWeights() = default;
  int64_t in_features = 0;
  int64_t out_features = 0;
  bool has_bias = false;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;
  virtual std::string name() const = 0;

  // ---- memory --------------------------------------------------------------------------------
  // The dtype the image encoder's activations are kept in (float32 on the CPU, bf16 on the GPU).
  virtual DType activation_dtype() const = 0;
  // The dtype the prompt path (prompt encoder, mask decoder) keeps its activations in, arithmetic
  // in fp32 throughout: float32 on the CPU, fp16 on the GPU. Its masks are thresholded logits, and
  // low-confidence masks hold wide areas of logits near the threshold: bf16's 8-bit significand
  // moves a few percent of their pixels, fp16's 11 bits about as few as fp32 on TF32 tensor cores.
  virtual DType prompt_dtype() const { return activation_dtype(); }
  // The dtype of the image encoder's residual stream, which every block adds into: float32 (a bf16
  // stream rounded after each of 2 x depth adds would be a bf16 encoder's largest error), unless
  // the backend runs a lower-precision encoder whose quantization error dwarfs that rounding.
  virtual DType residual_dtype() const { return DType::F32; }
  // An activation buffer on the device, owned by the returned tensor. Not for the hot path:
  // the model allocates its workspace once per batch size.
  virtual Tensor alloc(const Shape& shape, DType dtype) = 0;
  Tensor alloc(const Shape& shape) { return alloc(shape, activation_dtype()); }
  // A parameter (norm weights, position tables, embeddings) copied to the device as float32.
  virtual Tensor upload(const Tensor& host) = 0;
  // Device -> host float32 copy (waits for the device).
  virtual Tensor download(const Tensor& device_tensor) = 0;
  // Host float32 -> existing device tensor of the same element count.
  virtual void copy_from_host(const Tensor& host, Tensor& device_tensor) = 0;

  // Host memory that the device copies from and to asynchronously (pinned on CUDA, plain memory
  // on the CPU), zero-filled. Not for the hot path: callers keep such buffers and reuse them.
  virtual Tensor alloc_host(const Shape& shape, DType dtype) { return Tensor::empty(shape, dtype); }
  // Enqueues a byte copy of a device tensor into `host` (same dtype and element count; from
  // alloc_host for the copy to be asynchronous). `host` holds the data once a fence recorded
  // after this call has passed. The default copies at once (host memory on both sides).
  virtual void download_async(const Tensor& device_tensor, Tensor& host);

  // A point in the backend's queue of work: wait() returns once everything enqueued before the
  // fence's latest record() has finished. How a caller reuses a host buffer that the device still
  // reads, or reads results without waiting for work queued after them (one sync per batch).
  class Fence {
   public:
    virtual ~Fence() = default;
    virtual void wait() {}
  };
  virtual std::unique_ptr<Fence> make_fence() { return std::make_unique<Fence>(); }
  virtual void record(Fence& /*fence*/) {}

  // Enqueues a byte copy of `host` (from alloc_host, same dtype and element count) into a device
  // tensor; `host` must stay unchanged until a fence recorded after this call has passed. The
  // default copies at once (host memory on both sides).
  virtual void upload_async(const Tensor& host, Tensor& device_tensor);

  // Device memory this backend allocated (activations, weights, workspaces), in bytes: now, and
  // the most at any time since construction or reset_peak_memory(). Pinned host memory is
  // reported apart. Backends that do not track it report zeros.
  struct MemoryStats {
    size_t current = 0, peak = 0;
    size_t pinned_host = 0;  // pinned host buffers (staging, alloc_host), not device memory
  };
  virtual MemoryStats memory_stats() const { return {}; }
  virtual void reset_peak_memory() {}

  // ---- weights -------------------------------------------------------------------------------
  // `name` is the checkpoint name (e.g. "image_encoder.blocks.3.mlp.lin1") so that a backend may
  // choose a format per layer (fp8, 2:4 sparse) without the model knowing.
  // weight: host [out, in]; bias: host [out] or null.
  virtual std::unique_ptr<LinearWeights> prepare_linear(const std::string& name, const Tensor& weight,
                                                        const Tensor* bias) = 0;

  // ---- ops -----------------------------------------------------------------------------------
  // y[N, out] = act(x[N, in] W^T + b) (+ residual[N, out]). `residual` may be `y` itself.
  // x and y may have any leading shape; the last dim is the feature dim.
  virtual void linear(const Tensor& x, const LinearWeights& w, Tensor& y, Activation act = Activation::None,
                      const Tensor* residual = nullptr) = 0;

  // y = act(LayerNorm(x)) over the last dim, statistics in fp32. y may alias x.
  virtual void layer_norm(const Tensor& x, const Tensor& gamma, const Tensor& beta, float eps, Tensor& y,
                          Activation act = Activation::None) = 0;
  // y = LayerNorm(x + r), r repeated to x's size as add() repeats b; with `pe`, also y_pe = y + pe
  // (pe repeated likewise). The mask decoder's image side: residual, norm and the positional
  // encoding its next attention reads, in one pass. y may alias x, or r where r is not repeated.
  // The default composes add and layer_norm.
  virtual void add_layer_norm(const Tensor& x, const Tensor& r, const Tensor& gamma, const Tensor& beta, float eps,
                              Tensor& y, const Tensor* pe = nullptr, Tensor* y_pe = nullptr);
  // y = act(LayerNorm(x) W^T + b), through xn (the activation dtype, x's shape): afterwards xn
  // holds LayerNorm(x), unless the backend feeds the norm straight into the product (the CUDA
  // backend's fp8 layers take the norm's rows already quantized), when its contents are
  // unspecified. The default is layer_norm, then linear.
  virtual void norm_linear(const Tensor& x, const Tensor& gamma, const Tensor& beta, float eps, Tensor& xn,
                           const LinearWeights& w, Tensor& y, Activation act = Activation::None) {
    layer_norm(x, gamma, beta, eps, xn);
    linear(xn, w, y, act);
  }

  // Multi-head self-attention with SAM's decomposed relative position bias, over a grid of
  // grid_h x grid_w tokens per sequence:
  //   qkv [B, T=grid_h*grid_w, 3, heads, head_dim] (the qkv linear's output, viewed)
  //   rel_pos_h [2*grid_h-1, head_dim], rel_pos_w [2*grid_w-1, head_dim]
  //   out [B, T, heads*head_dim], heads concatenated as SAM does.
  //   logits(q, k) = scale * q.k + q.Rh[qh - kh + grid_h - 1] + q.Rw[qw - kw + grid_w - 1]
  virtual void attention_relpos(const Tensor& qkv, const Tensor& rel_pos_h, const Tensor& rel_pos_w, int heads,
                                int grid_h, int grid_w, Tensor& out) = 0;

  // The same attention inside SAM's windows, read from and written to the image grid:
  //   qkv [B, H, W, 3*C] (the qkv linear's output on the grid; per token [3, heads, head_dim])
  //   pad_qkv [3*C] in the activation dtype: q, k, v of the padding tokens (the qkv bias, since
  //     SAM pads the normalised input with zeros)
  //   rel_pos_h, rel_pos_w [2*window-1, head_dim]; out [B, H, W, heads*head_dim]
  // The grid is padded bottom and right to a multiple of `window` with pad_qkv tokens and cut into
  // window x window windows; each attends over all its tokens, padding included (as SAM does), and
  // only the real tokens' outputs are written.
  virtual void window_attention_relpos(const Tensor& qkv, const Tensor& pad_qkv, const Tensor& rel_pos_h,
                                       const Tensor& rel_pos_w, int heads, int window, Tensor& out) = 0;

  // Plain multi-head attention on already projected q [B, Tq, D], k [B, Tk, D], v [B, Tk, D]
  // (D = heads * head_dim): out [B, Tq, D] = softmax(q k^T / sqrt(head_dim)) v per head.
  // Any of q, k, v may have batch 1 and is then shared by the whole batch (one image embedding
  // read by every prompt); out has the largest batch.
  virtual void attention(const Tensor& q, const Tensor& k, const Tensor& v, int heads, Tensor& out) = 0;

  // y = a + b elementwise, b repeated to a's size: b's shape is a trailing part of a's (a bias
  // [C] on [B, T, C], an image [1, T, C] on every prompt [B, T, C]). y may alias a.
  virtual void add(const Tensor& a, const Tensor& b, Tensor& y) = 0;
  // dst[:, dst_begin + i, :] = src[:, src_begin + i, :] for i < count; src [B, Ts, C] (or [1, Ts, C],
  // copied into every sequence of dst), dst [B, Td, C].
  virtual void copy_tokens(const Tensor& src, int src_begin, Tensor& dst, int dst_begin, int count) = 0;
  // x = act(x) in place.
  virtual void activation(Tensor& x, Activation act) = 0;

  // Space-to-depth: x [B, H, W, C] -> y [B, H/p, W/p, p*p*C], feature order (ky, kx, c).
  // A stride-p pxp convolution is patchify + linear.
  virtual void patchify(const Tensor& x, int p, Tensor& y) = 0;
  // im2col of a 3x3, padding 1 convolution: x [B, H, W, C] -> y [B, H, W, 9*C], order (ky, kx, c).
  virtual void im2col3x3(const Tensor& x, Tensor& y) = 0;

  // The mask decoder's low-res masks, float32: low_res[p, t, y, x] = hyper[p, t, :] . GELU(up[p, r, :])
  // for every pixel (y, x) of the [4G, 4G] masks, where up [P, 16 G G, D] is the upscaled image in
  // the upscaling's patch order (pixel (4i + 2a + c, 4j + 2b + d) is row r = ((i G + j) 4 + 2a + b) 4
  // + 2c + d: two 2x2 transposed convolutions, never put in pixel order), hyper [P, T, D] the
  // hypernetworks' outputs and low_res [P, T, 4G, 4G].
  virtual void hypernetwork_masks(const Tensor& up, const Tensor& hyper, Tensor& low_res) = 0;

  // SAM's sparse prompt embedding (the prompt encoder's points and box corners), for P prompts
  // of N tokens each:
  //   out[p, t] = table[labels[p, t] + 1] + (labels[p, t] >= 0 ? fourier(coords[p, t]) : 0)
  // coords float32 [P, N, 2] (x, y in the model's input frame), labels int32 [P, N]: -1 the padding
  // point, 0 background, 1 foreground, 2 box top-left, 3 box bottom-right; gaussian float32
  // [2, C/2] and table float32 [5, C] (not_a_point_embed, point_embeddings 0..3) on the device;
  // fourier(x, y) = [sin(2 pi u), cos(2 pi u)], u = (2 ((x, y) + 0.5) / img_size - 1) gaussian;
  // out [P, N, C]. The default runs on the host (backend/mask_ops.h): the CUDA kernel's twin.
  virtual void embed_points(const Tensor& coords, const Tensor& labels, const Tensor& gaussian, const Tensor& table,
                            int img_size, Tensor& out);

  // SAM's postprocessing of mask logits, fused, for masks j < count of every prompt p:
  //   logits = low_res[p, first + j] (float32 [P, T, h, w]) bilinearly upscaled to img_size^2, cut
  //   to input_h x input_w, upscaled to height x width (torch's interpolate, as the original), then
  //   bits (optional, int32 [P * count, words], words = ceil(height * width / 32)): mask m =
  //     p * count + j is logits > threshold, one bit a pixel, LSB first, pixels in row-major order
  //     (or column-major, the order of COCO's RLE);
  //   stats int32 [P * count, 7]: area, x0, y0, x1, y1 (the box, inclusive; zeros when the mask
  //     is empty), the pixels with logits > threshold + offset and > threshold - offset (the
  //     stability score's counts).
  // With `select` (int32 [M'] of mask indices p * count + j, on the device), only those masks are
  // processed: row i of bits and stats is mask select[i].
  // The default runs on the host (backend/mask_ops.h): the CUDA kernel's twin.
  struct MaskFrame {
    int img_size = 0, input_h = 0, input_w = 0, height = 0, width = 0;
  };
  virtual void postprocess_masks(const Tensor& low_res, int first, int count, const MaskFrame& frame, float threshold,
                                 float offset, bool column_major, Tensor* bits, Tensor& stats,
                                 const Tensor* select = nullptr);

  // The automatic mask generator's selection in one crop (the original's _process_batch filters
  // and _process_crop's box NMS). Candidate i < n has its predicted IoU iou[i] (float32 [n]) and
  // postprocess_masks's stats[i] (int32 [n, 7], threshold 0, offset the stability offset). It
  // survives the filters when
  //   iou[i] is a number, and > iou_thresh where filter_iou,
  //   float(stats[i][5]) / float(stats[i][6]) (the stability score) >= stability_thresh where
  //     filter_stability,
  //   its box (stats[i][1..4], in the crop's frame) is not within 20 pixels of an edge of `crop`
  //     (XYXY in the image) that is not an edge of the image_w x image_h image;
  // then the survivors go through box NMS (amg::nms: by iou descending, ties by index; a box whose
  // IoU with a kept one is > nms_thresh is dropped). keep int32 [n + 1]: keep[0] = K, the number
  // kept, and keep[1..K] the kept candidates, best first; the rest is left as is.
  // The default runs on the host: the CUDA kernels' twin.
  struct MaskSelection {
    bool filter_iou = false, filter_stability = false;
    float iou_thresh = 0, stability_thresh = 0;
    int crop[4] = {0, 0, 0, 0};
    int image_h = 0, image_w = 0;
    double nms_thresh = 0.7;
  };
  virtual void select_masks(const Tensor& iou, const Tensor& stats, const MaskSelection& selection, Tensor& keep);

  // Masks of a crop placed in the whole image: bits int32 [K, words] (postprocess_masks's,
  // column-major, of a crop of the image) -> out int32 [K, ceil(image_h * image_w / 32)], the same
  // masks column-major in the image_w x image_h image, zero outside crop (XYXY).
  // The default runs on the host: the CUDA kernel's twin.
  virtual void uncrop_bits(const Tensor& bits, const int crop[4], int image_h, int image_w, Tensor& out);

  // COCO's run lengths of K bit-packed masks of `pixels` pixels each (bits int32 [K, words],
  // column-major, as postprocess_masks writes them): mask k's runs, alternating 0 and 1 from a run
  // of 0 (possibly empty), go to runs[offsets[k] .. offsets[k + 1]) (int32 holding uint32).
  // offsets int64 [K + 1] is always written; runs only when offsets[K] <= runs.numel(): a caller
  // that finds more reads offsets[K] and calls again with a buffer that large.
  // The default runs on the host: the CUDA kernels' twin.
  virtual void encode_runs(const Tensor& bits, int64_t pixels, Tensor& offsets, Tensor& runs);

  // SAM's preprocessing of a batch (backend/image_ops.h): each images[i], RGB u8 [h, w, 3] in host
  // memory, resized so that its longest side is S with Pillow's bilinear filter (bit-exact, the
  // integer arithmetic of pipeline/preprocess.cpp), normalised with SAM's pixel mean and std and
  // zero-padded bottom and right into input[i] of input [images.size(), S, S, 3] (float32 or
  // bf16, the encoder's input buffer). The images are read asynchronously: from alloc_host memory,
  // and left unchanged until a fence recorded after the call has passed. The default runs on the
  // host, for backends whose tensors live there (the CPU's); it is the twin of the CUDA kernel.
  virtual void preprocess_images(const std::vector<Tensor>& images, Tensor& input);

  // Waits for all queued work (no-op on the CPU).
  virtual void synchronize() = 0;

  // Runs `body`, a fixed sequence of ops on buffers that stay put between calls. A backend may
  // record it once per key and replay the recording afterwards (CUDA graphs); the CPU calls it.
  virtual void run_graph(const std::string& key, const std::function<void()>& body) { body(); }

  // Device time per op class ("gemm", "attention", "norm", "other") in ms, summed over the ops
  // run since profiling was switched on. Profiling times each op, so it is for benchmarks only,
  // and it disables graph replay while on. Backends that cannot measure return nothing.
  virtual void set_profiling(bool on) {}
  virtual std::map<std::string, double> profile() { return {}; }
};

// The backend of a device named as users name it: "cpu" or "cuda", with the encoder's dtype
// "bf16" (the GPU's default; the CPU computes in fp32) or "fp8" (cuda only). Throws on anything else.
std::unique_ptr<Backend> make_backend(const std::string& device, int threads = 0, const std::string& dtype = "bf16");
std::unique_ptr<Backend> make_cpu_backend(int threads = 0);  // 0: OpenMP's default
// The image encoder's linear layers on the GPU: bf16 (the default), or fp8 (e4m3 with a scale per
// weight channel and per activation row; compute capability 8.9 or newer). The prompt path is fp16
// either way.
enum class EncoderPrecision { BF16, FP8 };
std::unique_ptr<Backend> make_cuda_backend(int device = 0, EncoderPrecision precision = EncoderPrecision::BF16);  // throws where CUDA is unavailable
bool cuda_available();

}  // namespace segany
