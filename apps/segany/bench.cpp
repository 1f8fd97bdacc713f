// segany bench: how fast the image encoder and the prompt path run on a backend, printed as one
// JSON line. Random weights by default: speed does not depend on what the weights are, and no
// download is needed. The model classes are driven directly, as the Predictor drives them, so that
// the encoder is timed on a batch and without image decoding or resizing.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "backend/backend.h"
#include "commands.h"
#include "io/checkpoint.h"
#include "model/config.h"
#include "model/random_init.h"
#include "model/sam.h"
#include "pipeline/decoder.h"
#include "segany/error.h"

namespace segany::cli {
namespace {

struct BenchOptions {
  std::string arch, config, checkpoint, device = "cpu";
  int batch = 1, iters = 0, warmup = -1, threads = 0, prompts = 1;
  std::string image_size = "1920x1080", dtype = "bf16";
  int image_w = 1920, image_h = 1080;
  std::vector<std::string> outputs{"masks", "low-res"};
  bool profile = false, decoder = false;
};

// Milliseconds per call of f, averaged over `iters` calls after `warmup` untimed ones. f must
// wait for the device itself (it ends in synchronize or a download).
template <class F>
double time_ms(int warmup, int iters, F&& f) {
  for (int i = 0; i < warmup; ++i) f();
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < iters; ++i) f();
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count() / iters;
}

double rounded3(double v) { return std::round(v * 1000.0) / 1000.0; }

void run_bench(BenchOptions o) {
  const bool cuda = o.device == "cuda";
  if (o.iters <= 0) o.iters = cuda ? 20 : 3;
  if (o.warmup < 0) o.warmup = cuda ? 3 : 1;

  io::TensorMap weights;
  SamConfig cfg;
  if (!o.checkpoint.empty()) {
    weights = io::load_checkpoint(o.checkpoint);
    cfg = o.config.empty() ? SamConfig::infer(weights) : SamConfig::from_json_file(o.config);
  } else {
    cfg = o.config.empty() ? SamConfig::from_arch(o.arch) : SamConfig::from_json_file(o.config);
    weights = random_sam_weights(cfg, 0);
  }
  const EncoderPrecision precision = o.dtype == "fp8" ? EncoderPrecision::FP8 : EncoderPrecision::BF16;
  std::unique_ptr<Backend> be = cuda ? make_cuda_backend(0, precision) : make_cpu_backend(o.threads);
  Sam sam(cfg, weights, *be);
  weights = io::TensorMap();  // the backend holds its own prepared copy
  const Backend::MemoryStats after_load = be->memory_stats();  // the weights (and fixed workspaces)

  // Encoder: a batch of normalised, padded images (unit-scale noise, as normalised pixels are).
  // With --decoder, one image only, for the decoder's embedding.
  const int64_t B = o.decoder ? 1 : o.batch, S = cfg.image_encoder.img_size, G = cfg.image_encoder.grid();
  Tensor host = Tensor::empty({B, S, S, 3});
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  for (int64_t i = 0; i < host.numel(); ++i) host.data_as<float>()[i] = normal(rng);
  ImageEncoder& encoder = sam.image_encoder();
  be->copy_from_host(host, encoder.input(B));
  const Tensor* encoded = nullptr;  // [B, G, G, C], valid until the next forward
  const double encoder_ms = time_ms(o.decoder ? 0 : o.warmup, o.decoder ? 1 : o.iters, [&] {
    encoded = &encoder.forward(B);
    be->synchronize();
  });
  // Where the time goes, from one more pass with per-op timing (which slows it down).
  auto profiled = [&](const auto& run) {
    be->set_profiling(true);
    run();
    be->synchronize();
    std::map<std::string, double> p = be->profile();
    be->set_profiling(false);
    return p;
  };
  std::map<std::string, double> profile;
  if (o.profile && !o.decoder) profile = profiled([&] { encoded = &encoder.forward(B); });

  // Prompt path: `prompts` one-point prompts on one image of image_w x image_h pixels, decoded
  // together against the first image's embedding as the Predictor runs them: prompt encoder,
  // mask decoder, postprocessing, results expanded on the host into what --outputs names.
  const int64_t C = encoded->dim(3);
  Tensor embedding = be->alloc({1, G * G, C}, DType::F32);
  be->copy_tokens(encoded->slice0(0, 1).view({1, G * G, C}), 0, embedding, 0, static_cast<int>(G * G));
  const ImageFrame frame = image_frame(o.image_h, o.image_w, static_cast<int>(S));
  std::vector<PreparedPrompt> prepared;
  for (int i = 0; i < o.prompts; ++i) {  // points spread over the image
    Prompt click;
    click.points = {{static_cast<float>((i * 37 % 64 + 0.5) / 64.0 * o.image_w),
                     static_cast<float>((i * 11 % 64 + 0.5) / 64.0 * o.image_h), 1}};
    prepared.push_back(prepare_prompt(click, frame, cfg, ""));
  }
  std::vector<Masks> results(prepared.size());
  Decoder decoder(sam);
  const Decoder::Job job{&embedding, frame, prepared, results};
  MaskOutputs outputs{.masks = false, .rle = false, .low_res_logits = false};
  for (const std::string& name : o.outputs) {
    if (name == "masks") outputs.masks = true;
    if (name == "rle") outputs.rle = true;
    if (name == "low-res") outputs.low_res_logits = true;
  }
  // The decoder takes milliseconds where the encoder takes seconds: ten times the iterations.
  const double decoder_ms =
      time_ms(std::max(o.warmup, 1), 10 * o.iters, [&] { decoder.decode({&job, 1}, outputs); });
  // The same calls in three parts: the host queueing the work (enqueue), the device finishing
  // it after that (device_wait), and the host filling the results (finish).
  double enqueue_ms = 0, wait_ms = 0, finish_ms = 0;
  {
    const int calls = 10 * o.iters;
    using clock = std::chrono::steady_clock;
    auto ms = [](clock::time_point a, clock::time_point b) {
      return std::chrono::duration<double, std::milli>(b - a).count();
    };
    for (int i = 0; i < calls; ++i) {
      const auto t0 = clock::now();
      decoder.enqueue({&job, 1}, outputs);
      const auto t1 = clock::now();
      be->synchronize();
      const auto t2 = clock::now();
      decoder.finish();
      const auto t3 = clock::now();
      enqueue_ms += ms(t0, t1) / calls, wait_ms += ms(t1, t2) / calls, finish_ms += ms(t2, t3) / calls;
    }
  }
  std::map<std::string, double> decoder_profile;
  if (o.profile) decoder_profile = profiled([&] { decoder.decode({&job, 1}, outputs); });

  const Backend::MemoryStats memory = be->memory_stats();
  const double per_image = encoder_ms / static_cast<double>(B);
  nlohmann::ordered_json j;
  j["arch"] = cfg.arch;
  j["device"] = o.device;
  j["dtype"] = cuda ? o.dtype : "f32";
  j["threads"] = cuda ? o.threads : (o.threads > 0 ? o.threads : omp_get_max_threads());
  j["batch"] = B;
  if (!o.decoder) {
    j["encoder_ms_per_image"] = rounded3(per_image);
    j["encoder_img_per_s"] = rounded3(1000.0 / per_image);
    j["ms_per_batch"] = rounded3(encoder_ms);
  }
  j["decoder_ms_per_call"] = rounded3(decoder_ms);
  j["decoder_ms_per_prompt"] = rounded3(decoder_ms / o.prompts);
  j["decoder_split_ms"] = {
      {"enqueue", rounded3(enqueue_ms)}, {"device_wait", rounded3(wait_ms)}, {"finish", rounded3(finish_ms)}};
  j["prompts"] = o.prompts;
  j["image"] = std::to_string(o.image_w) + "x" + std::to_string(o.image_h);
  {
    std::string names;
    for (const std::string& n : o.outputs) names += (names.empty() ? "" : ",") + n;
    j["outputs"] = names;
  }
  j["params"] = sam.parameter_count();
  j["iters"] = o.iters;
  j["warmup"] = o.warmup;
  j["backend"] = be->name();
  j["weights"] = o.checkpoint.empty() ? "random" : o.checkpoint;
  if (cuda) {
    // Device memory the backend allocated: once the model was loaded, and at most over the run
    // (weights, the encoder's workspace for this batch, the decoder's buffers, cuBLASLt's workspace).
    constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
    j["weights_gib"] = rounded3(static_cast<double>(after_load.current) / kGiB);
    j["peak_gpu_gib"] = rounded3(static_cast<double>(memory.peak) / kGiB);
  }
  if (o.profile) {
    // Empty objects where the backend cannot measure.
    if (!o.decoder) {
      nlohmann::ordered_json& p = j["encoder_profile_ms"];
      p = nlohmann::ordered_json::object();
      for (const auto& [op, ms] : profile) p[op] = rounded3(ms / static_cast<double>(B));
    }
    nlohmann::ordered_json& d = j["decoder_profile_ms"];
    d = nlohmann::ordered_json::object();
    for (const auto& [op, ms] : decoder_profile) d[op] = rounded3(ms);
  }
  std::cout << j.dump() << std::endl;
}

}  // namespace

Command add_bench(CLI::App& parent) {
  auto o = std::make_shared<BenchOptions>();
  CLI::App* app = parent.add_subcommand(
      "bench",
      "Time the image encoder (per image, on a batch of random inputs) and the prompt path (prompt encoder, mask "
      "decoder and postprocessing for one-point prompts on one image, results on the host). Random weights unless "
      "--checkpoint. Prints one JSON line.");
  CLI::Option* arch = app->add_option("--arch", o->arch, "architecture")->check(CLI::IsMember({"vit_b", "vit_l", "vit_h"}));
  CLI::Option* config = app->add_option("--config", o->config, "config.json with the architecture, instead of --arch")
                            ->check(CLI::ExistingFile);
  CLI::Option* checkpoint =
      app->add_option("--checkpoint", o->checkpoint, "time this checkpoint's weights instead of random ones")
          ->check(CLI::ExistingFile);
  arch->excludes(config);
  arch->excludes(checkpoint);
  app->add_option("--device", o->device, "cpu, or cuda (needs a CUDA build and a GPU)")
      ->check(CLI::IsMember({"cpu", "cuda"}))
      ->capture_default_str();
  app->add_option("--dtype", o->dtype,
                  "the encoder's linear layers on cuda: bf16, or fp8 (e4m3, compute capability 8.9+; the "
                  "transformer blocks' layers, weights scaled per channel and activations per row)")
      ->check(CLI::IsMember({"bf16", "fp8"}))
      ->capture_default_str();
  app->add_option("--batch", o->batch, "images per encoder call")->check(CLI::PositiveNumber)->capture_default_str();
  app->add_option("--iters", o->iters, "timed encoder calls (default 3 on cpu, 20 on cuda; the decoder runs 10x as many)")
      ->check(CLI::PositiveNumber);
  app->add_option("--warmup", o->warmup, "untimed calls first (default 1 on cpu, 3 on cuda)")
      ->check(CLI::NonNegativeNumber);
  app->add_option("--threads", o->threads, "CPU threads; 0: all cores")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  app->add_option("--prompts", o->prompts, "one-point prompts decoded together per call of the prompt path")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app->add_flag("--decoder", o->decoder,
                "time the prompt path only (one image is encoded for its embedding; encoder figures left out)");
  app->add_option("--image-size", o->image_size, "the size (WxH) of the image the prompts' masks are made for")
      ->capture_default_str();
  app->add_option("--outputs", o->outputs,
                  "what each prompt's masks come back as, any of: masks (uint8 at the image's size), rle, low-res")
      ->check(CLI::IsMember({"masks", "rle", "low-res"}))
      ->delimiter(',')
      ->capture_default_str();
  app->add_flag("--profile",
                o->profile, "add encoder_profile_ms: the encoder's time per image by op class, from one extra pass "
                            "(backends that cannot measure give {})");
  app->callback([o, arch, config, checkpoint] {
    if (arch->count() == 0 && config->count() == 0 && checkpoint->count() == 0)
      throw CLI::RequiredError("--arch, --config or --checkpoint");
    if (o->dtype != "bf16" && o->device != "cuda")
      throw CLI::ValidationError("--dtype", "'" + o->dtype + "' is for --device cuda (the cpu path is float32)");
    char x = 0, rest = 0;
    if (std::sscanf(o->image_size.c_str(), "%d%c%d%c", &o->image_w, &x, &o->image_h, &rest) != 3 || x != 'x' ||
        o->image_w <= 0 || o->image_h <= 0 || int64_t(o->image_w) * o->image_h > (int64_t(1) << 28))
      throw CLI::ValidationError("--image-size", "'" + o->image_size + "' is not WxH with positive sides (at most 2^28 pixels)");
  });
  return {app, [o] { run_bench(*o); }};
}

}  // namespace segany::cli
