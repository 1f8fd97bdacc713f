// The CUDA backend's ops against their CPU twins, on the shapes of the official configs (vit_b:
// C 768, 12 heads; vit_l: 1024, 16; vit_h: 1280, 16; head dims 64 and 80) and the decoder's.
//
// Both backends get the same inputs, rounded to bf16 first, so that the comparison measures the
// op and not the rounding of its inputs. The CPU runs in fp32; the GPU keeps activations in bf16
// and accumulates in fp32. The bound on the relative error ||gpu - cpu|| / ||cpu|| is 1e-2: the
// GPU's output is rounded to bf16 (8 bits of mantissa: up to 2^-9 = 0.2% per element, about 0.1%
// in norm), and an op that keeps bf16 intermediates (the attention's probabilities, a residual
// added to a bf16 output) rounds once or twice more, each a few 1e-3 at worst; fp32 accumulation
// over K <= 5120 adds ~1e-6. A wrong index, a missed element or a wrong scale gives errors of
// order one. Outputs are poisoned with NaN before each GPU run, so an unwritten element fails.
// Every test skips where there is no CUDA device.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/quantize.h"
#include "io/checkpoint.h"
#include "pipeline/preprocess.h"
#include "segany/embedder.h"
#include "segany/predictor.h"
#include "test_util.h"

#if defined(SEGANY_HAVE_CUDA)
#include <cuda_runtime.h>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/kernels.h"
#endif

namespace segany {
namespace {

// ---- inputs and comparisons --------------------------------------------------------------------

// splitmix64: fast and reproducible, so that the large inputs (42M values) cost little.
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 1) {}
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  float uniform() { return static_cast<float>(next() >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f; }  // [-1, 1)
};

// Uniform values of standard deviation `stddev` around `mean`, rounded to bf16.
Tensor random_bf16(const Shape& shape, uint64_t seed, float stddev = 1.0f, float mean = 0.0f) {
  Tensor t = Tensor::empty(shape);
  Rng rng(seed);
  float* p = t.data_as<float>();
  const float a = stddev * std::sqrt(3.0f);
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = bf16_to_f32(f32_to_bf16(mean + a * rng.uniform()));
  return t;
}

struct Diff {
  double rel = 0;      // ||got - want|| / ||want||
  double max_abs = 0;  // max |got - want|
  double max_ref = 0;  // max |want|
};

Diff compare(const Tensor& got, const Tensor& want) {
  EXPECT_EQ(got.numel(), want.numel());
  Diff d;
  double num = 0, den = 0;
  const float* g = got.data_as<const float>();
  const float* w = want.data_as<const float>();
  for (int64_t i = 0; i < want.numel(); ++i) {
    const double e = double(g[i]) - double(w[i]);
    num += e * e;
    den += double(w[i]) * w[i];
    const double ae = std::fabs(e);
    if (!(ae <= d.max_abs)) d.max_abs = ae;  // NaN sticks
    d.max_ref = std::max(d.max_ref, std::fabs(double(w[i])));
  }
  d.rel = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  return d;
}

std::string show(const Diff& d) {
  return "rel " + std::to_string(d.rel) + ", max abs " + std::to_string(d.max_abs) + " (max |ref| " +
         std::to_string(d.max_ref) + ")";
}

// Relative L2 error <= rel, and every element within abs_frac of the reference's largest value.
#define EXPECT_CLOSE(got, want, rel_bound, abs_frac)                                             \
  do {                                                                                           \
    const Diff d_ = compare(got, want);                                                          \
    EXPECT_LE(d_.rel, rel_bound) << show(d_);                                                    \
    EXPECT_LE(d_.max_abs, (abs_frac) * d_.max_ref + 1e-6) << show(d_);                           \
    std::printf("    %-48s %s\n", ::testing::UnitTest::GetInstance()->current_test_info()->name(), show(d_).c_str()); \
  } while (0)

struct Vit {
  const char* name;
  int C, heads;
  int head_dim() const { return C / heads; }
};
constexpr Vit kVits[] = {{"vit_b", 768, 12}, {"vit_l", 1024, 16}, {"vit_h", 1280, 16}};

class CudaOps : public ::testing::Test {
 public:
  void SetUp() override {
    if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
    gpu = make_cuda_backend(0);
    cpu = make_cpu_backend();
  }

  // The host tensor on the GPU as `dtype` (bf16 by default).
  Tensor dev(const Tensor& host, DType dtype = DType::BF16) {
    Tensor d = gpu->alloc(host.shape(), dtype);
    gpu->copy_from_host(host, d);
    return d;
  }
  // A GPU buffer filled with NaN: whatever an op leaves unwritten shows in the comparison.
  Tensor poisoned(const Shape& shape, DType dtype = DType::BF16) {
    Tensor h = Tensor::empty(shape);
    std::fill_n(h.data_as<float>(), h.numel(), std::numeric_limits<float>::quiet_NaN());
    return dev(h, dtype);
  }
  Tensor host(const Tensor& d) { return gpu->download(d); }

  std::unique_ptr<Backend> gpu, cpu;
};

// ---- linear ------------------------------------------------------------------------------------

struct LinearCase {
  int64_t M, K, N;
  bool bias;
  Activation act;
  bool residual_in_place;
  DType out = DType::BF16;
  // A layer of the encoder (bf16), or of the mask decoder (the prompt path's dtype): the backend
  // picks the format by the name.
  bool decoder = false;
};

void run_linear_case(Backend& gpu, Backend& cpu, const LinearCase& c, uint64_t seed) {
  const Tensor x = random_bf16({c.M, c.K}, seed);
  const Tensor w = random_bf16({c.N, c.K}, seed + 1, 1.0f / std::sqrt(float(c.K)));
  const Tensor b = random_bf16({c.N}, seed + 2, 0.5f);
  const Tensor r = random_bf16({c.M, c.N}, seed + 3);
  const std::string name = c.decoder ? "mask_decoder.test" : "image_encoder.test";
  auto wc = cpu.prepare_linear(name, w, c.bias ? &b : nullptr);
  auto wg = gpu.prepare_linear(name, w, c.bias ? &b : nullptr);
  const DType in = c.decoder ? gpu.prompt_dtype() : gpu.activation_dtype();
  const DType out = c.out == DType::F32 ? DType::F32 : in;
  Tensor want = Tensor::empty({c.M, c.N});
  cpu.linear(x, *wc, want, c.act, c.residual_in_place ? &r : nullptr);

  Tensor xg = gpu.alloc(x.shape(), in);
  gpu.copy_from_host(x, xg);
  Tensor yg = gpu.alloc({c.M, c.N}, out);
  if (c.residual_in_place) {
    gpu.copy_from_host(r, yg);
    gpu.linear(xg, *wg, yg, c.act, &yg);
  } else {
    Tensor nan = Tensor::empty({c.M, c.N});
    std::fill_n(nan.data_as<float>(), nan.numel(), std::numeric_limits<float>::quiet_NaN());
    gpu.copy_from_host(nan, yg);
    gpu.linear(xg, *wg, yg, c.act, nullptr);
  }
  const Tensor got = gpu.download(yg);
  // cuBLASLt's GELU is the tanh form (|difference to erf| < 5e-4): inside both bounds. fp16
  // outputs are rounded 8x finer than bf16 ones.
  if (out == DType::F16)
    EXPECT_CLOSE(got, want, 2e-3, 3e-3);
  else
    EXPECT_CLOSE(got, want, 1e-2, 2e-2);
}

TEST_F(CudaOps, LinearEncoderShapes) {
  const int64_t M = 2 * 4096;  // two images of 64 x 64 tokens
  uint64_t seed = 100;
  for (const Vit& v : kVits) {
    SCOPED_TRACE(v.name);
    const int64_t C = v.C;
    run_linear_case(*gpu, *cpu, {M, C, 3 * C, true, Activation::None, false}, seed += 10);  // qkv
    run_linear_case(*gpu, *cpu, {M, C, 4 * C, true, Activation::GELU, false}, seed += 10);  // mlp.lin1
    run_linear_case(*gpu, *cpu, {M, 4 * C, C, true, Activation::None, true}, seed += 10);   // mlp.lin2 + x
    // attn.proj into the float32 stream in place: the first product of the shape is tuned, on
    // scratch rows (32 MiB holds fewer than M); the residual must still be added once.
    run_linear_case(*gpu, *cpu, {M, C, C, true, Activation::None, true, DType::F32}, seed += 10);
  }
}

TEST_F(CudaOps, LinearEpiloguesAndSmallShapes) {
  uint64_t seed = 200;
  for (Activation act : {Activation::None, Activation::ReLU, Activation::GELU})
    for (bool bias : {false, true}) {
      SCOPED_TRACE(std::to_string(int(act)) + (bias ? " bias" : " no bias"));
      run_linear_case(*gpu, *cpu, {4096, 768, 768, bias, act, false}, seed += 10);
      run_linear_case(*gpu, *cpu, {21, 256, 2048, bias, act, false}, seed += 10);  // decoder MLP, 3 prompts
      run_linear_case(*gpu, *cpu, {4096, 768, 768, bias, act, false, DType::F32}, seed += 10);
    }
  run_linear_case(*gpu, *cpu, {4096, 2304, 256, false, Activation::None, false}, seed += 10);  // neck 3x3
}

TEST_F(CudaOps, LinearDecoderShapes) {
  // The prompt path's layers (fp16 on the GPU), 64 prompts of 7 tokens on a 64 x 64 image.
  uint64_t seed = 250;
  const int64_t tokens = 64 * 7, cells = 64 * 4096;
  const bool dec = true;
  run_linear_case(*gpu, *cpu, {tokens, 256, 2048, true, Activation::ReLU, false, DType::BF16, dec}, seed += 10);
  run_linear_case(*gpu, *cpu, {tokens, 2048, 256, true, Activation::None, true, DType::BF16, dec}, seed += 10);
  run_linear_case(*gpu, *cpu, {tokens, 256, 256, true, Activation::None, true, DType::BF16, dec}, seed += 10);
  run_linear_case(*gpu, *cpu, {cells, 256, 128, true, Activation::None, false, DType::BF16, dec}, seed += 10);
  run_linear_case(*gpu, *cpu, {cells, 128, 256, true, Activation::None, false, DType::BF16, dec}, seed += 10);
  run_linear_case(*gpu, *cpu, {4 * cells, 64, 128, true, Activation::None, false, DType::BF16, dec}, seed += 10);
  run_linear_case(*gpu, *cpu, {3 * 128 * 128, 4, 4, true, Activation::None, false, DType::BF16, dec}, seed += 10);
  run_linear_case(*gpu, *cpu, {64, 256, 4, true, Activation::None, false, DType::F32, dec}, seed += 10);  // iou out
}

// ---- fp8 linear layers -------------------------------------------------------------------------

#if defined(SEGANY_HAVE_CUDA)
// The activations' quantization kernel against backend/quantize.h: the same bytes and scales, bit
// for bit, on rows of magnitudes 1e-6 to 1e6, a row of zeros, bf16 and float32 inputs, and a width
// that takes the element-wise kernel.
TEST_F(CudaOps, QuantizeRowsE4m3EqualsTheCpu) {
  for (const auto& [rows, K, dt] : {std::tuple<int64_t, int64_t, DType>{777, 1280, DType::BF16},
                                    {300, 5120, DType::BF16}, {129, 768, DType::F32}, {65, 20, DType::BF16}}) {
    SCOPED_TRACE(std::to_string(rows) + " x " + std::to_string(K) + " " + dtype_name(dt));
    Tensor x = random_bf16({rows, K}, 3000 + K);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t k = 0; k < K; ++k) {
        float& v = x.data_as<float>()[r * K + k];
        v = r == 5 ? 0.0f : bf16_to_f32(f32_to_bf16(v * std::pow(10.0f, float(r % 13) - 6.0f)));
      }
    std::vector<uint8_t> want_q(rows * K);
    std::vector<float> want_s(rows);
    quantize_rows_e4m3(x.data_as<float>(), rows, K, want_q.data(), want_s.data());
    const Tensor xg = dev(x, dt);
    Tensor q = gpu->alloc({rows, K}, DType::F8E4M3), sc = gpu->alloc({rows}, DType::F32);
    cuda::quantize_rows_e4m3(xg, q.data_as<uint8_t>(), sc.data_as<float>(), cuda_stream(*gpu));
    std::vector<uint8_t> got_q(rows * K);
    std::vector<float> got_s(rows);
    gpu->synchronize();
    ASSERT_EQ(cudaMemcpy(got_q.data(), q.data(), got_q.size(), cudaMemcpyDeviceToHost), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(got_s.data(), sc.data(), got_s.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    int64_t bad = 0;
    for (size_t i = 0; i < want_q.size(); ++i)
      if (got_q[i] != want_q[i] && bad++ < 5)
        ADD_FAILURE() << "element " << i << " (row " << i / K << "): gpu " << int(got_q[i]) << ", cpu "
                      << int(want_q[i]) << " for " << x.data_as<float>()[i];
    EXPECT_EQ(bad, 0);
    for (int64_t r = 0; r < rows; ++r) EXPECT_EQ(got_s[r], want_s[r]) << "row " << r;
    EXPECT_EQ(want_s[5], 1.0f);  // the row of zeros
  }
}

// LayerNorm into e4m3 rows against the CPU's norm quantized by quantize.h: the arithmetic differs
// only in the order of the fp32 sums, so nearly every byte is the same and the rest are one e4m3
// step apart (a value that sat at a rounding boundary); scales within 1e-5. Then norm_linear with an
// fp8 layer against the CPU's norm and linear on the quantized operands (the fp8 twin's bounds).
TEST_F(CudaOps, LayerNormIntoE4m3EqualsTheCpuNormQuantized) {
  for (const auto& [rows, C, dt] : {std::tuple<int64_t, int64_t, DType>{2 * 4096, 1280, DType::F32},
                                    {1000, 768, DType::F32}, {333, 160, DType::BF16}, {100, 2048, DType::F32}}) {
    SCOPED_TRACE(std::to_string(rows) + " x " + std::to_string(C));
    const Tensor x = random_bf16({rows, C}, 3200 + C, 1.5f, 0.5f);
    const Tensor g = random_bf16({C}, 3201 + C, 0.3f, 1.0f), b = random_bf16({C}, 3202 + C, 0.3f);
    Tensor xn = Tensor::empty({rows, C});
    cpu->layer_norm(x, g, b, 1e-6f, xn);
    std::vector<uint8_t> want_q(rows * C);
    std::vector<float> want_s(rows);
    quantize_rows_e4m3(xn.data_as<float>(), rows, C, want_q.data(), want_s.data());
    const Tensor xg = dev(x, dt), gg = gpu->upload(g), bg = gpu->upload(b);
    Tensor q = gpu->alloc({rows, C}, DType::F8E4M3), sc = gpu->alloc({rows}, DType::F32);
    ASSERT_TRUE(cuda::layer_norm_e4m3_fits(xg, gg, bg));
    cuda::layer_norm_e4m3(xg, gg, bg, 1e-6f, q.data_as<uint8_t>(), sc.data_as<float>(), cuda_stream(*gpu));
    gpu->synchronize();
    std::vector<uint8_t> got_q(rows * C);
    std::vector<float> got_s(rows);
    ASSERT_EQ(cudaMemcpy(got_q.data(), q.data(), got_q.size(), cudaMemcpyDeviceToHost), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(got_s.data(), sc.data(), got_s.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    int64_t differ = 0;
    for (size_t i = 0; i < want_q.size(); ++i) {
      if (got_q[i] == want_q[i]) continue;
      ++differ;
      const float w = e4m3_to_f32(want_q[i]), o = e4m3_to_f32(got_q[i]);
      ASSERT_LE(std::fabs(o - w), std::fabs(w) / 8 + std::ldexp(1.0f, -9)) << "element " << i;
    }
    EXPECT_LE(differ, static_cast<int64_t>(want_q.size() / 1000)) << differ << " of " << want_q.size() << " differ";
    for (int64_t r = 0; r < rows; ++r) EXPECT_NEAR(got_s[r], want_s[r], 1e-5 * want_s[r]) << "row " << r;
  }
}

// An fp8 layer (a backend made with EncoderPrecision::FP8; the encoder blocks' qkv and lin1 take
// it) against its CPU twin: the CPU's fp32 product of the same quantized operands (weights per
// output channel, activations per row, dequantized), so that the bounds are the bf16 tests' own.
// Also, as a sanity bound, the fp8 layer within 8% (relative L2) of the unquantized product: e4m3
// rounds each operand by up to 2^-4 relative, ~3-4% on such products.
TEST_F(CudaOps, Fp8LinearMatchesItsQuantizedCpuTwin) {
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, 0);
  if (major * 10 + minor < 89) {
    EXPECT_THROW(make_cuda_backend(0, EncoderPrecision::FP8), Error);
    GTEST_SKIP() << "fp8 needs compute capability 8.9 or newer";
  }
  std::unique_ptr<Backend> gpu8 = make_cuda_backend(0, EncoderPrecision::FP8);
  // The fp8 encoder's residual stream is bf16; the bf16 encoder's stays float32.
  EXPECT_EQ(gpu8->residual_dtype(), DType::BF16);
  EXPECT_EQ(gpu->residual_dtype(), DType::F32);
  uint64_t seed = 3100;
  const int64_t M = 1000;
  for (const LinearCase& c : {LinearCase{M, 1280, 3840, true, Activation::None, false},         // qkv
                              LinearCase{M, 1280, 5120, true, Activation::GELU, false},         // lin1
                              LinearCase{M, 5120, 1280, true, Activation::None, true},          // lin2 + x
                              LinearCase{M, 1280, 1280, true, Activation::None, true, DType::F32},  // proj into f32
                              LinearCase{M, 768, 2304, false, Activation::None, false},
                              LinearCase{M, 768, 768, true, Activation::GELU, false, DType::F32}}) {
    SCOPED_TRACE(std::to_string(c.K) + " -> " + std::to_string(c.N));
    seed += 10;
    const Tensor x = random_bf16({c.M, c.K}, seed);
    const Tensor w = random_bf16({c.N, c.K}, seed + 1, 1.0f / std::sqrt(float(c.K)));
    const Tensor b = random_bf16({c.N}, seed + 2, 0.5f);
    const Tensor r = random_bf16({c.M, c.N}, seed + 3);
    auto dequantized = [](const Tensor& t) {
      const int64_t rows = t.dim(0), K = t.dim(1);
      std::vector<uint8_t> q(rows * K);
      std::vector<float> sc(rows);
      quantize_rows_e4m3(t.data_as<float>(), rows, K, q.data(), sc.data());
      Tensor d = Tensor::empty(t.shape());
      for (int64_t i = 0; i < rows * K; ++i) d.data_as<float>()[i] = e4m3_to_f32(q[i]) * sc[i / K];
      return d;
    };
    const Tensor* res = c.residual_in_place ? &r : nullptr;
    Tensor want = Tensor::empty({c.M, c.N}), exact = Tensor::empty({c.M, c.N});
    cpu->linear(dequantized(x), *cpu->prepare_linear("twin", dequantized(w), c.bias ? &b : nullptr), want, c.act, res);
    cpu->linear(x, *cpu->prepare_linear("exact", w, c.bias ? &b : nullptr), exact, c.act, res);

    auto wg = gpu8->prepare_linear("image_encoder.blocks.0.mlp.lin1", w, c.bias ? &b : nullptr);
    ASSERT_EQ(dynamic_cast<const cuda::CudaLinear&>(*wg).format(), cuda::LinearFormat::FP8_E4M3);
    Tensor xg = gpu8->alloc(x.shape(), DType::BF16);
    gpu8->copy_from_host(x, xg);
    Tensor yg = gpu8->alloc({c.M, c.N}, c.out);
    if (c.residual_in_place) {
      gpu8->copy_from_host(r, yg);
      gpu8->linear(xg, *wg, yg, c.act, &yg);
    } else {
      Tensor nan = Tensor::empty({c.M, c.N});
      std::fill_n(nan.data_as<float>(), nan.numel(), std::numeric_limits<float>::quiet_NaN());
      gpu8->copy_from_host(nan, yg);
      gpu8->linear(xg, *wg, yg, c.act, nullptr);
    }
    const Tensor got = gpu8->download(yg);
    EXPECT_CLOSE(got, want, 1e-2, 2e-2);
    if (!c.residual_in_place) {  // through a LayerNorm: norm_linear feeds the norm's e4m3 rows to the product
      const Tensor g = random_bf16({c.K}, seed + 4, 0.3f, 1.0f), be = random_bf16({c.K}, seed + 5, 0.3f);
      Tensor xn = Tensor::empty({c.M, c.K}), want_n = Tensor::empty({c.M, c.N});
      cpu->layer_norm(x, g, be, 1e-6f, xn);
      cpu->linear(dequantized(xn), *cpu->prepare_linear("twin", dequantized(w), c.bias ? &b : nullptr), want_n, c.act);
      Tensor xf = gpu8->alloc(x.shape(), DType::F32), xng = gpu8->alloc(x.shape(), DType::BF16);
      gpu8->copy_from_host(x, xf);
      gpu8->norm_linear(xf, gpu8->upload(g), gpu8->upload(be), 1e-6f, xng, *wg, yg, c.act);
      EXPECT_CLOSE(gpu8->download(yg), want_n, 1e-2, 2e-2);
    }
    const Diff vs_exact = compare(got, exact);
    EXPECT_LE(vs_exact.rel, 0.08) << show(vs_exact);
    std::printf("    fp8 against the unquantized product: %s\n", show(vs_exact).c_str());
  }
  // The other layers keep bf16 (and the prompt path fp16), as do qkv and lin1 with sizes that are
  // not multiples of 16; they still run on the fp8 backend.
  auto format_of = [&](const std::string& name, int64_t n, int64_t k) {
    return dynamic_cast<const cuda::CudaLinear&>(*gpu8->prepare_linear(name, random_bf16({n, k}, 3999), nullptr)).format();
  };
  EXPECT_EQ(format_of("image_encoder.blocks.3.attn.qkv", 48, 32), cuda::LinearFormat::FP8_E4M3);
  EXPECT_EQ(format_of("image_encoder.blocks.3.attn.proj", 48, 32), cuda::LinearFormat::BF16);
  EXPECT_EQ(format_of("image_encoder.blocks.3.mlp.lin2", 48, 32), cuda::LinearFormat::BF16);
  EXPECT_EQ(format_of("image_encoder.neck.0", 48, 32), cuda::LinearFormat::BF16);
  EXPECT_EQ(format_of("image_encoder.blocks.3.mlp.lin1", 24, 20), cuda::LinearFormat::BF16);
  EXPECT_EQ(format_of("mask_decoder.transformer.layers.0.mlp.lin1", 48, 32), cuda::LinearFormat::FP16);
  const Tensor w = random_bf16({24, 20}, 3997);
  Tensor x = gpu8->alloc({4, 20}, DType::BF16), y = gpu8->alloc({4, 24}, DType::BF16);
  gpu8->copy_from_host(random_bf16({4, 20}, 3998), x);
  EXPECT_NO_THROW(gpu8->linear(x, *gpu8->prepare_linear("image_encoder.blocks.0.mlp.lin1", w, nullptr), y));
}
#endif

// ---- norms and windows -------------------------------------------------------------------------

TEST_F(CudaOps, LayerNorm) {
  uint64_t seed = 300;
  // Encoder widths, the neck, the micro models, the decoder and the prompt encoder's mask path;
  // 20 and 3 take the any-width kernel.
  for (int64_t C : {768, 1024, 1280, 256, 160, 128, 32, 64, 4, 16, 20, 3}) {
    SCOPED_TRACE("C=" + std::to_string(C));
    const int64_t rows = C >= 128 ? 2 * 4096 : 3 * 4096;
    const Tensor x = random_bf16({rows, C}, seed += 10, 1.5f, 2.0f);  // an offset mean tests the statistics
    const Tensor g = random_bf16({C}, seed + 1, 0.3f, 1.0f), b = random_bf16({C}, seed + 2, 0.3f);
    Tensor want = Tensor::empty({rows, C});
    cpu->layer_norm(x, g, b, 1e-6f, want);
    Tensor y = poisoned({rows, C});
    gpu->layer_norm(dev(x), gpu->upload(g), gpu->upload(b), 1e-6f, y);
    EXPECT_CLOSE(host(y), want, 1e-2, 2e-2);
  }
  // In place (the neck and the decoder norm their own buffers), and from a float32 input.
  const Tensor x = random_bf16({500, 256}, 390, 1.0f, -1.0f), g = random_bf16({256}, 391), b = random_bf16({256}, 392);
  Tensor want = Tensor::empty({500, 256});
  cpu->layer_norm(x, g, b, 1e-5f, want);
  Tensor xy = dev(x);
  gpu->layer_norm(xy, gpu->upload(g), gpu->upload(b), 1e-5f, xy);
  EXPECT_CLOSE(host(xy), want, 1e-2, 2e-2);
  Tensor y = poisoned({500, 256});
  gpu->layer_norm(dev(x, DType::F32), gpu->upload(g), gpu->upload(b), 1e-5f, y);
  EXPECT_CLOSE(host(y), want, 1e-2, 2e-2);
  // Followed by GELU, in float32 (the decoder's upscaling: 64 channels), both kernels.
  for (int64_t C : {64, 20}) {
    const Tensor xg = random_bf16({4096, C}, 393 + C, 1.5f, 0.5f), gg = random_bf16({C}, 394), bg = random_bf16({C}, 395);
    Tensor wg = Tensor::empty({4096, C});
    cpu->layer_norm(xg, gg, bg, 1e-6f, wg, Activation::GELU);
    Tensor yg = poisoned({4096, C}, DType::F32);
    gpu->layer_norm(dev(xg, DType::F32), gpu->upload(gg), gpu->upload(bg), 1e-6f, yg, Activation::GELU);
    EXPECT_CLOSE(host(yg), wg, 1e-5, 1e-5);
  }
  // Row counts that leave a warp's row groups part empty (8 and 16 lanes per row).
  for (int64_t C : {64, 128, 32}) {
    SCOPED_TRACE("C=" + std::to_string(C) + ", 4093 rows");
    const Tensor xo = random_bf16({4093, C}, 396 + C, 1.5f, 0.5f), go = random_bf16({C}, 397), bo = random_bf16({C}, 398);
    Tensor wo = Tensor::empty({4093, C});
    cpu->layer_norm(xo, go, bo, 1e-6f, wo);
    Tensor yo = poisoned({4093, C}, DType::F32);
    gpu->layer_norm(dev(xo, DType::F32), gpu->upload(go), gpu->upload(bo), 1e-6f, yo);
    EXPECT_CLOSE(host(yo), wo, 1e-5, 1e-5);
  }
}

TEST_F(CudaOps, AddLayerNormWithPositionalEncoding) {
  // The decoder's image side (fp16 on the GPU; and float32): keys [P, HW, C] = norm(attention out
  // + keys), the keys of the first layer one image [1, HW, C] shared by every prompt, then in place
  // over its own residual; with k = keys + pe. C = 256 takes the vector kernel, 20 the any-width one.
  for (DType dt : {DType::F16, DType::F32})
  for (int64_t C : {256, 20}) {
    const int64_t P = 3, HW = 1000;
    const Tensor x = random_bf16({P, HW, C}, 410 + C), shared = random_bf16({1, HW, C}, 411 + C, 2.0f, 1.0f);
    const Tensor own = random_bf16({P, HW, C}, 412 + C), pe = random_bf16({1, HW, C}, 413 + C);
    const Tensor g = random_bf16({C}, 414, 0.3f, 1.0f), b = random_bf16({C}, 415, 0.3f);
    const Tensor gd = gpu->upload(g), bd = gpu->upload(b), ped = dev(pe, dt);
    // fp16 rounds each output (and y + pe rounds the rounded y again).
    const double bound = dt == DType::F32 ? 1e-5 : 1.5e-3;
    for (const Tensor* r : {&shared, &own}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " C=" + std::to_string(C) +
                   (r == &shared ? ", shared residual" : ", own residual, in place"));
      Tensor want = Tensor::empty({P, HW, C}), want_pe = Tensor::empty({P, HW, C});
      cpu->add_layer_norm(x, *r, g, b, 1e-5f, want, &pe, &want_pe);
      Tensor rd = dev(*r, dt);
      Tensor y = r == &own ? rd : poisoned({P, HW, C}, dt), y_pe = poisoned({P, HW, C}, dt);
      gpu->add_layer_norm(dev(x, dt), rd, gd, bd, 1e-5f, y, &ped, &y_pe);
      EXPECT_CLOSE(host(y), want, bound, bound);
      EXPECT_CLOSE(host(y_pe), want_pe, bound, bound);
    }
  }
}

// ---- attention -------------------------------------------------------------------------------

void attention_relpos_case(CudaOps& t, Backend& gpu, Backend& cpu, int B, int heads, int hd, int gh, int gw,
                           uint64_t seed) {
  SCOPED_TRACE("B=" + std::to_string(B) + " heads=" + std::to_string(heads) + " hd=" + std::to_string(hd) + " grid " +
               std::to_string(gh) + "x" + std::to_string(gw));
  const int64_t T = int64_t(gh) * gw;
  const Tensor qkv = random_bf16({B, T, 3 * heads * hd}, seed);
  // std 0.1 tables: q . R has a std of ~0.1 sqrt(hd) ~ 0.8, as large as the content logits.
  const Tensor rh = random_bf16({2 * gh - 1, hd}, seed + 1, 0.1f), rw = random_bf16({2 * gw - 1, hd}, seed + 2, 0.1f);
  Tensor want = Tensor::empty({B, T, heads * hd});
  cpu.attention_relpos(qkv, rh, rw, heads, gh, gw, want);
  Tensor qg = gpu.alloc(qkv.shape());
  gpu.copy_from_host(qkv, qg);
  Tensor out = t.poisoned({B, T, int64_t(heads) * hd});
  gpu.attention_relpos(qg, gpu.upload(rh), gpu.upload(rw), heads, gh, gw, out);
  EXPECT_CLOSE(gpu.download(out), want, 1e-2, 3e-2);
}

// Windows cut from a B x H x W grid of qkv (padding tokens = pad_qkv), written back to the grid.
void window_attention_relpos_case(CudaOps& t, Backend& gpu, Backend& cpu, int B, int H, int W, int heads, int hd,
                                  int window, uint64_t seed) {
  SCOPED_TRACE("B=" + std::to_string(B) + " grid " + std::to_string(H) + "x" + std::to_string(W) + " heads=" +
               std::to_string(heads) + " hd=" + std::to_string(hd) + " window " + std::to_string(window));
  const int64_t C = int64_t(heads) * hd;
  const Tensor qkv = random_bf16({B, H, W, 3 * C}, seed), pad = random_bf16({3 * C}, seed + 3);
  const Tensor rh = random_bf16({2 * window - 1, hd}, seed + 1, 0.1f), rw = random_bf16({2 * window - 1, hd}, seed + 2, 0.1f);
  Tensor want = Tensor::empty({B, H, W, C});
  cpu.window_attention_relpos(qkv, pad, rh, rw, heads, window, want);
  Tensor out = t.poisoned({B, H, W, C});
  gpu.window_attention_relpos(t.dev(qkv), t.dev(pad), gpu.upload(rh), gpu.upload(rw), heads, window, out);
  EXPECT_CLOSE(gpu.download(out), want, 1e-2, 3e-2);
}

TEST_F(CudaOps, WindowAttentionRelPos) {
  // SAM: 64 x 64 grids, 14 x 14 windows (padded to 70 x 70: 25 windows per image).
  window_attention_relpos_case(*this, *gpu, *cpu, 2, 64, 64, 12, 64, 14, 500);  // vit_b
  window_attention_relpos_case(*this, *gpu, *cpu, 1, 64, 64, 16, 64, 14, 510);  // vit_l
  window_attention_relpos_case(*this, *gpu, *cpu, 2, 64, 64, 16, 80, 14, 520);  // vit_h
  // Odd grids (padding on both sides of a window row), windows that divide the grid, and shapes
  // the flash kernel does not take (head dim 32, windows of 20: the reference kernel).
  window_attention_relpos_case(*this, *gpu, *cpu, 3, 9, 23, 2, 64, 7, 530);
  window_attention_relpos_case(*this, *gpu, *cpu, 1, 28, 28, 3, 80, 14, 540);
  window_attention_relpos_case(*this, *gpu, *cpu, 2, 17, 30, 2, 32, 14, 550);
  window_attention_relpos_case(*this, *gpu, *cpu, 1, 25, 21, 2, 64, 20, 560);
}

TEST_F(CudaOps, AttentionRelPosWindowSequences) {
  // attention_relpos on sequences of window size (the flash window kernel without a grid).
  attention_relpos_case(*this, *gpu, *cpu, 50, 16, 80, 14, 14, 570);
}

TEST_F(CudaOps, AttentionRelPosGlobal) {
  attention_relpos_case(*this, *gpu, *cpu, 2, 12, 64, 64, 64, 600);  // vit_b
  attention_relpos_case(*this, *gpu, *cpu, 1, 16, 80, 64, 64, 610);  // vit_h
}

TEST_F(CudaOps, AttentionRelPosOtherShapes) {
  // Shapes the flash kernel does not take go to the reference kernel: smaller head dims, and
  // global grids other than 64 wide (smaller images).
  attention_relpos_case(*this, *gpu, *cpu, 4, 2, 32, 14, 14, 700);
  attention_relpos_case(*this, *gpu, *cpu, 2, 4, 64, 24, 24, 710);
  attention_relpos_case(*this, *gpu, *cpu, 1, 2, 80, 20, 32, 720);
}

void attention_case(CudaOps& t, Backend& gpu, Backend& cpu, Shape qs, Shape ks, int heads, uint64_t seed,
                    DType dt = DType::BF16) {
  SCOPED_TRACE(std::string(dtype_name(dt)) + " q " + shape_str(qs) + " k " + shape_str(ks) + " heads " +
               std::to_string(heads));
  Shape vs = ks;
  const Tensor q = random_bf16(qs, seed), k = random_bf16(ks, seed + 1), v = random_bf16(vs, seed + 2);
  const int64_t B = std::max(qs[0], ks[0]);
  Tensor want = Tensor::empty({B, qs[1], qs[2]});
  cpu.attention(q, k, v, heads, want);
  Tensor out = t.poisoned({B, qs[1], qs[2]}, dt);
  gpu.attention(t.dev(q, dt), t.dev(k, dt), t.dev(v, dt), heads, out);
  if (dt == DType::BF16)
    EXPECT_CLOSE(gpu.download(out), want, 1e-2, 3e-2);
  else
    EXPECT_CLOSE(gpu.download(out), want, 2e-3, 4e-3);
}

TEST_F(CudaOps, AttentionDecoderShapes) {
  // In the prompt path's fp16, and in bf16.
  for (DType dt : {DType::F16, DType::BF16}) {
    attention_case(*this, *gpu, *cpu, {3, 7, 128}, {1, 4096, 128}, 8, 800, dt);  // tokens -> image (downsampled)
    attention_case(*this, *gpu, *cpu, {3, 4096, 128}, {3, 7, 128}, 8, 810, dt);  // image -> tokens
    attention_case(*this, *gpu, *cpu, {3, 7, 256}, {3, 7, 256}, 8, 820, dt);     // token self-attention
    attention_case(*this, *gpu, *cpu, {1, 5, 64}, {3, 4096, 64}, 8, 830, dt);    // a shared q, per-batch keys
    attention_case(*this, *gpu, *cpu, {2, 33, 96}, {2, 70, 96}, 1, 840, dt);     // head dim 96, ragged tiles
    attention_case(*this, *gpu, *cpu, {2, 32, 256}, {2, 1000, 256}, 8, 850, dt);  // 32 queries (the most), hd 32
    attention_case(*this, *gpu, *cpu, {2, 300, 512}, {1, 32, 512}, 8, 860, dt);   // 32 keys (the most), hd 64
    attention_case(*this, *gpu, *cpu, {1, 33, 64}, {1, 33, 64}, 2, 870, dt);      // 33 of each: the tiled kernel
    attention_case(*this, *gpu, *cpu, {2, 20, 512}, {2, 300, 512}, 8, 880, dt);   // few queries, head dim 64
    attention_case(*this, *gpu, *cpu, {2, 12, 128}, {1, 777, 128}, 8, 890, dt);   // 9 to 16 queries
  }
}

// ---- elementwise and layout ------------------------------------------------------------------

TEST_F(CudaOps, AddBroadcast) {
  // pos_embed [1, 64, 64, C] (fp32 parameter) onto every image, in place.
  const Tensor a = random_bf16({2, 64, 64, 768}, 900), pe = random_bf16({1, 64, 64, 768}, 901);
  Tensor want = Tensor::empty(a.shape());
  cpu->add(a, pe, want);
  Tensor ag = dev(a);
  gpu->add(ag, gpu->upload(pe), ag);
  EXPECT_CLOSE(host(ag), want, 1e-2, 2e-2);
  // A bias [C] on [B, T, C] with an odd C, into a float32 output; an image [1, T, C] on every prompt.
  const Tensor x = random_bf16({3, 7, 20}, 902), bias = random_bf16({20}, 903);
  Tensor want2 = Tensor::empty(x.shape());
  cpu->add(x, bias, want2);
  Tensor y = poisoned(x.shape(), DType::F32);
  gpu->add(dev(x), dev(bias), y);
  EXPECT_CLOSE(host(y), want2, 1e-2, 2e-2);
  const Tensor img = random_bf16({1, 4096, 256}, 904), prompts = random_bf16({3, 4096, 256}, 905);
  Tensor want3 = Tensor::empty(prompts.shape());
  cpu->add(prompts, img, want3);
  Tensor y3 = poisoned(prompts.shape());
  gpu->add(dev(prompts), dev(img), y3);
  EXPECT_CLOSE(host(y3), want3, 1e-2, 2e-2);
}

TEST_F(CudaOps, CopyTokens) {
  const Tensor src = random_bf16({3, 12, 256}, 1000), dst0 = random_bf16({3, 9, 256}, 1001);
  Tensor want = dst0.clone();
  cpu->copy_tokens(src, 5, want, 2, 6);
  Tensor d = dev(dst0);
  gpu->copy_tokens(dev(src), 5, d, 2, 6);  // same dtype: a strided copy
  EXPECT_CLOSE(host(d), want, 0.0, 0.0);
  Tensor d2 = dev(dst0);
  gpu->copy_tokens(dev(src, DType::F32), 5, d2, 2, 6);  // fp32 parameter rows into bf16 tokens
  EXPECT_CLOSE(host(d2), want, 0.0, 0.0);
  Tensor d16 = dev(dst0, DType::F16);
  gpu->copy_tokens(dev(src, DType::F32), 5, d16, 2, 6);  // into fp16 tokens: exact but for subnormals
  EXPECT_CLOSE(host(d16), want, 1e-6, 1e-6);
  const Tensor s3 = random_bf16({2, 5, 3}, 1002), d3 = random_bf16({2, 4, 3}, 1003);
  Tensor want3 = d3.clone();
  cpu->copy_tokens(s3, 1, want3, 0, 3);
  Tensor g3 = dev(d3, DType::F32);
  gpu->copy_tokens(dev(s3), 1, g3, 0, 3);  // bf16 into fp32, odd C
  EXPECT_CLOSE(host(g3), want3, 0.0, 0.0);
}

TEST_F(CudaOps, CopyTokensFromOneSequenceIntoEvery) {
  const Tensor src = random_bf16({1, 7, 256}, 1010), dst0 = random_bf16({5, 12, 256}, 1011);
  Tensor want = dst0.clone();
  cpu->copy_tokens(src, 0, want, 3, 7);
  for (DType from : {DType::BF16, DType::F32, DType::F16})
    for (DType to : {DType::BF16, DType::F16}) {
      Tensor d = dev(dst0, to);
      gpu->copy_tokens(dev(src, from), 0, d, 3, 7);
      const double bound = from == DType::F16 || to == DType::F16 ? 1e-6 : 0.0;  // fp16's subnormals
      EXPECT_CLOSE(host(d), want, bound, bound);
    }
}

// Points, padding points and box corners of 37 prompts: fp32 within the last bits of sinf/cosf,
// bf16 and fp16 within their rounding.
TEST_F(CudaOps, EmbedPoints) {
  const int64_t P = 37, N = 5, C = 256;
  Tensor coords = Tensor::empty({P, N, 2}), labels = Tensor::empty({P, N}, DType::I32);
  Rng rng(1020);
  for (int64_t i = 0; i < P * N; ++i) {
    coords.data_as<float>()[2 * i] = 512.0f + 512.0f * rng.uniform();
    coords.data_as<float>()[2 * i + 1] = 512.0f + 512.0f * rng.uniform();
    labels.data_as<int32_t>()[i] = static_cast<int32_t>(rng.next() % 5) - 1;
  }
  const Tensor gaussian = random_bf16({2, C / 2}, 1021), table = random_bf16({5, C}, 1022);
  Tensor want = Tensor::empty({P, N, C});
  cpu->embed_points(coords, labels, gaussian, table, 1024, want);
  Tensor lg = gpu->alloc(labels.shape(), DType::I32);
  gpu->upload_async(labels, lg);
  const Tensor cg = dev(coords, DType::F32), gg = dev(gaussian, DType::F32), tg = dev(table, DType::F32);
  for (DType out : {DType::F32, DType::BF16, DType::F16}) {
    Tensor got = poisoned({P, N, C}, out);
    gpu->embed_points(cg, lg, gg, tg, 1024, got);
    if (out == DType::F32)
      EXPECT_CLOSE(host(got), want, 1e-6, 1e-6);
    else if (out == DType::F16)
      EXPECT_CLOSE(host(got), want, 5e-4, 5e-4);
    else
      EXPECT_CLOSE(host(got), want, 4e-3, 4e-3);
  }
}

// The same bytes on the GPU (any dtype), and back.
Tensor to_gpu(Backend& gpu, const Tensor& h) {
  Tensor d = gpu.alloc(h.shape(), h.dtype());
  gpu.upload_async(h, d);
  gpu.synchronize();
  return d;
}
Tensor to_host(Backend& gpu, const Tensor& d) {
  Tensor h = Tensor::empty(d.shape(), d.dtype());
  gpu.download_async(d, h);
  gpu.synchronize();
  return h;
}

// The fused upscale + threshold + stats against the host twin, bit for bit: masks of odd sizes
// (words that cross rows), shrunk and enlarged, both pixel orders, a selection of mask tokens, an
// empty mask, and smooth logits so that the masks have real edges.
TEST_F(CudaOps, PostprocessMasksEqualsTheCpuBitForBit) {
  const int64_t P = 3, T = 4, S = 256;
  Tensor low = Tensor::empty({P, T, S, S});
  for (int64_t m = 0; m < P * T; ++m)
    for (int64_t y = 0; y < S; ++y)
      for (int64_t x = 0; x < S; ++x)
        low.data_as<float>()[(m * S + y) * S + x] =
            m == 5 ? -3.0f  // an empty mask
                   : 4.0f * std::sin(0.05f * x * (1 + m % 3) + 0.3f * m) * std::cos(0.04f * y * (1 + m % 2)) + 0.5f;
  const Tensor low_dev = dev(low, DType::F32);
  struct Case {
    int h, w, first, count;
    bool column_major;
  };
  for (const Case& c : {Case{683, 1024, 0, 4, false}, Case{333, 517, 1, 3, true}, Case{1200, 1800, 0, 1, false},
                        Case{1200, 1800, 1, 3, true}, Case{7, 3, 0, 4, true}}) {
    Backend::MaskFrame f;
    f.img_size = 1024;
    const double scale = 1024.0 / std::max(c.h, c.w);
    f.input_h = static_cast<int>(c.h * scale + 0.5), f.input_w = static_cast<int>(c.w * scale + 0.5);
    f.height = c.h, f.width = c.w;
    const int64_t M = P * c.count, words = (int64_t(c.h) * c.w + 31) / 32;
    Tensor want_bits = Tensor::empty({M, words}, DType::I32), want_stats = Tensor::empty({M, 7}, DType::I32);
    cpu->postprocess_masks(low, c.first, c.count, f, 0.0f, 1.0f, c.column_major, &want_bits, want_stats);
    Tensor bits = gpu->alloc({M, words}, DType::I32), stats = gpu->alloc({M, 7}, DType::I32);
    gpu->postprocess_masks(low_dev, c.first, c.count, f, 0.0f, 1.0f, c.column_major, &bits, stats);
    Tensor got_bits = Tensor::empty({M, words}, DType::I32), got_stats = Tensor::empty({M, 7}, DType::I32);
    gpu->download_async(bits, got_bits);
    gpu->download_async(stats, got_stats);
    gpu->synchronize();
    int64_t differing = 0;
    for (int64_t i = 0; i < M * words; ++i)
      differing += std::popcount(static_cast<uint32_t>(got_bits.data_as<int32_t>()[i] ^ want_bits.data_as<int32_t>()[i]));
    EXPECT_EQ(differing, 0) << c.h << "x" << c.w;
    for (int64_t i = 0; i < M * 7; ++i)
      EXPECT_EQ(got_stats.data_as<int32_t>()[i], want_stats.data_as<int32_t>()[i])
          << c.h << "x" << c.w << ", mask " << i / 7 << ", stat " << i % 7;
    // Stats only (no bits): the same stats.
    gpu->postprocess_masks(low_dev, c.first, c.count, f, 0.0f, 1.0f, c.column_major, nullptr, stats);
    gpu->download_async(stats, got_stats);
    gpu->synchronize();
    EXPECT_EQ(std::memcmp(got_stats.data(), want_stats.data(), want_stats.nbytes()), 0);
    // A selection of masks, out of order: the rows of the selected ones.
    Tensor select = Tensor::empty({2}, DType::I32);
    select.data_as<int32_t>()[0] = static_cast<int32_t>(M - 1), select.data_as<int32_t>()[1] = 0;
    Tensor sel_bits = gpu->alloc({2, words}, DType::I32), sel_stats = gpu->alloc({2, 7}, DType::I32);
    const Tensor select_dev = to_gpu(*gpu, select);
    gpu->postprocess_masks(low_dev, c.first, c.count, f, 0.0f, 1.0f, c.column_major, &sel_bits, sel_stats, &select_dev);
    const Tensor sb = to_host(*gpu, sel_bits), ss = to_host(*gpu, sel_stats);
    for (int r = 0; r < 2; ++r) {
      const int64_t m = select.data_as<int32_t>()[r];
      EXPECT_EQ(std::memcmp(sb.data_as<int32_t>() + r * words, want_bits.data_as<int32_t>() + m * words, words * 4), 0);
      EXPECT_EQ(std::memcmp(ss.data_as<int32_t>() + r * 7, want_stats.data_as<int32_t>() + m * 7, 28), 0);
    }
    std::printf("    %dx%d: %lld masks, areas", c.h, c.w, (long long)M);
    for (int64_t m = 0; m < M; ++m) std::printf(" %d", want_stats.data_as<int32_t>()[m * 7]);
    std::printf("\n");
  }
}

// ---- the mask generator's ops ------------------------------------------------------------------

// Filters and NMS: the same masks kept in the same order, with every filter on and off, with ties
// of predicted IoU, empty boxes and masks near the crop's edges; and a whole image's 3072.
TEST_F(CudaOps, SelectMasksEqualsTheCpu) {
  struct Case {
    int64_t n;
    std::array<int, 4> crop;
    bool filters;
  };
  for (const Case& c : {Case{400, {100, 50, 600, 450}, true}, Case{400, {100, 50, 600, 450}, false},
                        Case{3072, {0, 0, 1800, 1200}, false}, Case{1, {0, 0, 64, 64}, false},
                        Case{0, {0, 0, 64, 64}, true}}) {
    SCOPED_TRACE("n " + std::to_string(c.n) + (c.filters ? ", filters" : ""));
    const test::AmgCandidates cand = test::random_amg_candidates(c.n, c.crop[2] - c.crop[0], c.crop[3] - c.crop[1], 7 + c.n);
    Backend::MaskSelection sel;
    sel.filter_iou = sel.filter_stability = c.filters;
    sel.iou_thresh = 0.4f, sel.stability_thresh = 0.5f;
    std::copy(c.crop.begin(), c.crop.end(), sel.crop);
    sel.image_h = 600, sel.image_w = 800;
    if (c.crop[3] == 1200) sel.image_h = 1200, sel.image_w = 1800;
    if (c.crop[3] == 64) sel.image_h = 64, sel.image_w = 64;
    sel.nms_thresh = 0.7;
    Tensor want = Tensor::empty({c.n + 1}, DType::I32);
    cpu->select_masks(cand.iou, cand.stats, sel, want);
    Tensor keep = to_gpu(*gpu, Tensor::empty({c.n + 1}, DType::I32));
    gpu->select_masks(to_gpu(*gpu, cand.iou), to_gpu(*gpu, cand.stats), sel, keep);
    const Tensor got = to_host(*gpu, keep);
    const int32_t* w = want.data_as<const int32_t>();
    const int32_t* g = got.data_as<const int32_t>();
    ASSERT_EQ(g[0], w[0]);
    EXPECT_EQ(std::vector<int32_t>(g + 1, g + 1 + g[0]), std::vector<int32_t>(w + 1, w + 1 + w[0]));
    std::printf("    %lld candidates: %d kept\n", (long long)c.n, w[0]);
  }
}

// Masks of crops placed in a 1200 x 1800 image (33 segments of the run-length kernels each; blobs,
// all ones and noise) and run-length encoded: the same bits and runs as the host's, and with too
// small a runs buffer, the right offsets and runs left alone.
TEST_F(CudaOps, UncropBitsAndEncodeRunsEqualTheCpu) {
  const int H = 1200, W = 1800;
  for (const std::array<int, 4>& crop : {std::array<int, 4>{0, 0, W, H}, std::array<int, 4>{0, 0, 950, 650},
                                         std::array<int, 4>{850, 550, W, H}, std::array<int, 4>{13, 0, 977, H}}) {
    const int cw = crop[2] - crop[0], ch = crop[3] - crop[1];
    SCOPED_TRACE("crop " + std::to_string(cw) + "x" + std::to_string(ch));
    std::vector<std::vector<uint8_t>> masks;
    for (int k = 0; k < 12; ++k) masks.push_back(test::random_blob_mask(ch, cw, 300 + k));
    masks.push_back(std::vector<uint8_t>(size_t(cw) * ch, 1));
    std::vector<uint8_t> noise(size_t(cw) * ch);  // a run every other pixel: the scans' worst case
    std::mt19937 gen(17);
    for (uint8_t& v : noise) v = static_cast<uint8_t>(gen() & 1u);
    masks.push_back(std::move(noise));
    const int64_t K = static_cast<int64_t>(masks.size()), words = (int64_t(H) * W + 31) / 32;
    const Tensor bits = test::column_major_bits(masks, ch, cw);
    Tensor want_placed = Tensor::empty({K, words}, DType::I32);
    cpu->uncrop_bits(bits, crop.data(), H, W, want_placed);
    Tensor placed = to_gpu(*gpu, Tensor::empty({K, words}, DType::I32));
    gpu->uncrop_bits(to_gpu(*gpu, bits), crop.data(), H, W, placed);
    EXPECT_EQ(std::memcmp(to_host(*gpu, placed).data(), want_placed.data(), want_placed.nbytes()), 0);

    Tensor want_offsets = Tensor::empty({K + 1}, DType::I64), none = Tensor::empty({0}, DType::I32);
    cpu->encode_runs(want_placed, int64_t(H) * W, want_offsets, none);
    const int64_t total = want_offsets.data_as<const int64_t>()[K];
    Tensor want_runs = Tensor::empty({total}, DType::I32);
    cpu->encode_runs(want_placed, int64_t(H) * W, want_offsets, want_runs);
    // Too small a buffer: offsets only, the buffer untouched.
    Tensor small_host = Tensor::empty({total - 1}, DType::I32);
    std::fill_n(small_host.data_as<int32_t>(), total - 1, -7);
    Tensor small = to_gpu(*gpu, small_host), offsets = to_gpu(*gpu, Tensor::empty({K + 1}, DType::I64));
    gpu->encode_runs(placed, int64_t(H) * W, offsets, small);
    EXPECT_EQ(std::memcmp(to_host(*gpu, offsets).data(), want_offsets.data(), want_offsets.nbytes()), 0);
    const Tensor small_after = to_host(*gpu, small);
    EXPECT_TRUE(std::all_of(small_after.data_as<const int32_t>(), small_after.data_as<const int32_t>() + total - 1,
                            [](int32_t v) { return v == -7; }));
    Tensor runs = to_gpu(*gpu, Tensor::empty({total}, DType::I32));
    gpu->encode_runs(placed, int64_t(H) * W, offsets, runs);
    EXPECT_EQ(std::memcmp(to_host(*gpu, runs).data(), want_runs.data(), want_runs.nbytes()), 0);
    std::printf("    crop %dx%d: %lld masks, %lld runs\n", cw, ch, (long long)K, (long long)total);
  }
}

TEST_F(CudaOps, Activations) {
  for (DType dt : {DType::BF16, DType::F32, DType::F16})
    for (Activation act : {Activation::GELU, Activation::ReLU})
      for (int64_t n : {int64_t(3) * 256 * 256 * 32, int64_t(1001)}) {
        SCOPED_TRACE(std::string(dtype_name(dt)) + " act " + std::to_string(int(act)) + " n " + std::to_string(n));
        const Tensor x = random_bf16({n}, 1100 + n, 2.0f);
        Tensor want = x.clone();
        cpu->activation(want, act);
        Tensor g = dev(x, dt);
        gpu->activation(g, act);
        EXPECT_CLOSE(host(g), want, 1e-2, 1e-2);
      }
}

TEST_F(CudaOps, PatchifyIm2col) {
  struct P { Shape x; int p; };
  for (const P& c : {P{{2, 1024, 1024, 3}, 16}, P{{3, 256, 256, 1}, 2}, P{{3, 128, 128, 4}, 2}}) {
    SCOPED_TRACE("patchify " + shape_str(c.x));
    const Tensor x = random_bf16(c.x, 1200 + c.x[3]);
    const int64_t Ho = c.x[1] / c.p, Wo = c.x[2] / c.p;
    Tensor want = Tensor::empty({c.x[0], Ho, Wo, c.p * c.p * c.x[3]});
    cpu->patchify(x, c.p, want);
    Tensor y = poisoned(want.shape());
    gpu->patchify(dev(x), c.p, y);
    EXPECT_CLOSE(host(y), want, 0.0, 0.0);
  }
  for (const Shape& s : {Shape{2, 64, 64, 256}, Shape{1, 9, 11, 3}}) {
    SCOPED_TRACE("im2col3x3 " + shape_str(s));
    const Tensor x = random_bf16(s, 1400 + s[3]);
    Tensor want = Tensor::empty({s[0], s[1], s[2], 9 * s[3]});
    cpu->im2col3x3(x, want);
    Tensor y = poisoned(want.shape());
    gpu->im2col3x3(dev(x), y);
    EXPECT_CLOSE(host(y), want, 0.0, 0.0);
  }
}

TEST_F(CudaOps, HypernetworkMasks) {
  // The decoder's masks: 4 hypernetwork outputs of 32 against a [256, 256] upscaled image in patch
  // order, per prompt; then widths the vector loads do not take and fewer masks. Inputs in each
  // float dtype (bf16 values, exact in all three): the same float32 masks.
  struct Case { int64_t P, T, D, G; };
  for (DType dt : {DType::F16, DType::F32, DType::BF16})
  for (const Case& c : {Case{3, 4, 32, 64}, Case{2, 3, 6, 5}, Case{1, 1, 16, 2}}) {
    SCOPED_TRACE(std::string(dtype_name(dt)) + " P=" + std::to_string(c.P) + " T=" + std::to_string(c.T) +
                 " D=" + std::to_string(c.D) + " G=" + std::to_string(c.G));
    const int64_t side = 4 * c.G;
    const Tensor up = random_bf16({c.P, side * side, c.D}, 1500 + c.D), hyper = random_bf16({c.P, c.T, c.D}, 1501);
    Tensor want = Tensor::empty({c.P, c.T, side, side});
    cpu->hypernetwork_masks(up, hyper, want);
    Tensor y = poisoned(want.shape(), DType::F32);
    gpu->hypernetwork_masks(dev(up, dt), dev(hyper, dt), y);
    EXPECT_CLOSE(host(y), want, 1e-5, 1e-5);
  }
}

// ---- graphs and profiling --------------------------------------------------------------------

TEST_F(CudaOps, GraphReplayMatchesEager) {
  // A windowed block: norm, qkv, window attention, proj with residual, MLP with residual.
  const int B = 1, G = 64, ws = 14, C = 768, heads = 12;
  const int64_t rows = int64_t(B) * G * G;
  const Tensor g = random_bf16({C}, 1600, 0.3f, 1.0f), bt = random_bf16({C}, 1601, 0.3f);
  const Tensor wqkv = random_bf16({3 * C, C}, 1602, 1.0f / std::sqrt(float(C))), bqkv = random_bf16({3 * C}, 1603);
  const Tensor wp = random_bf16({C, C}, 1612, 1.0f / std::sqrt(float(C))), bp = random_bf16({C}, 1613);
  const Tensor w1 = random_bf16({4 * C, C}, 1604, 1.0f / std::sqrt(float(C))), b1 = random_bf16({4 * C}, 1605);
  const Tensor w2 = random_bf16({C, 4 * C}, 1606, 0.5f / std::sqrt(float(C))), b2 = random_bf16({C}, 1607);
  const Tensor rh = random_bf16({2 * ws - 1, C / heads}, 1608, 0.1f), rw = random_bf16({2 * ws - 1, C / heads}, 1609, 0.1f);
  auto qkv_w = gpu->prepare_linear("qkv", wqkv, &bqkv);
  auto proj_w = gpu->prepare_linear("proj", wp, &bp);
  auto lin1 = gpu->prepare_linear("lin1", w1, &b1);
  auto lin2 = gpu->prepare_linear("lin2", w2, &b2);
  const Tensor gg = gpu->upload(g), bg = gpu->upload(bt), rhg = gpu->upload(rh), rwg = gpu->upload(rw);
  const Tensor pad = dev(bqkv);
  Tensor x = gpu->alloc({B, G, G, C}), xn = gpu->alloc({rows, C}), qkv = gpu->alloc({B, G, G, 3 * C});
  Tensor attn = gpu->alloc({B, G, G, C}), hidden = gpu->alloc({rows, 4 * C});
  auto body = [&] {
    gpu->layer_norm(x, gg, bg, 1e-6f, xn);
    gpu->linear(xn, *qkv_w, qkv);
    gpu->window_attention_relpos(qkv, pad, rhg, rwg, heads, ws, attn);
    gpu->linear(attn, *proj_w, x, Activation::None, &x);
    gpu->layer_norm(x, gg, bg, 1e-6f, xn);
    gpu->linear(xn, *lin1, hidden, Activation::GELU);
    gpu->linear(hidden, *lin2, x, Activation::None, &x);
  };
  auto run = [&](const Tensor& input, bool graph) {
    gpu->copy_from_host(input, x);
    if (graph)
      gpu->run_graph("test_block", body);
    else
      body();
    return gpu->download(x);
  };
  const Tensor in1 = random_bf16({B, G, G, C}, 1610), in2 = random_bf16({B, G, G, C}, 1611);
  const Tensor eager1 = run(in1, false), eager2 = run(in2, false);
  EXPECT_GT(compare(eager1, eager2).rel, 0.1);  // the inputs matter
  // Call 1 runs eagerly, call 2 captures and launches, calls 3 and 4 replay; replays must read the
  // buffers' current contents, not what they held at capture.
  for (int call = 1; call <= 4; ++call) {
    const bool second = call % 2 == 0;
    const Tensor got = run(second ? in2 : in1, true);
    const Diff d = compare(got, second ? eager2 : eager1);
    EXPECT_EQ(d.max_abs, 0.0) << "call " << call << ": " << show(d);
  }
  // Profiling runs the same body eagerly and times each class of op.
  gpu->set_profiling(true);
  const Tensor profiled = run(in1, true);
  const auto prof = gpu->profile();
  gpu->set_profiling(false);
  EXPECT_EQ(compare(profiled, eager1).max_abs, 0.0);
  for (const char* cls : {"gemm", "attention", "norm"}) {
    ASSERT_TRUE(prof.count(cls)) << cls;
    EXPECT_GT(prof.at(cls), 0.0) << cls;
  }
  std::printf("    profile: gemm %.3f ms, attention %.3f ms, norm %.3f ms, other %.3f ms\n", prof.at("gemm"),
              prof.at("attention"), prof.at("norm"), prof.at("other"));
}

TEST_F(CudaOps, ErrorsAreExceptions) {
  Tensor a = gpu->alloc({2, 3, 8}), b = gpu->alloc({2, 3, 9}), y = gpu->alloc({2, 3, 8});
  EXPECT_THROW(gpu->add(a, b, y), Error);
  const Tensor w = random_bf16({4, 5}, 1700);
  auto lw = gpu->prepare_linear("bad", w, nullptr);
  EXPECT_THROW(gpu->linear(a, *lw, y), Error);  // K mismatch
  auto cw = cpu->prepare_linear("cpu", w, nullptr);
  Tensor x5 = gpu->alloc({3, 5}), y4 = gpu->alloc({3, 4});
  EXPECT_THROW(gpu->linear(x5, *cw, y4), Error);  // CPU weights on the GPU
  EXPECT_NO_THROW(gpu->linear(x5, *lw, y4));
  gpu->synchronize();
}

// ---- preprocessing, memory, the Embedder -------------------------------------------------------

Tensor u8_tensor(Backend& be, const Image& im, bool pinned) {
  return pinned ? test::u8_pixels(im, be.alloc_host({im.height, im.width, 3}, DType::U8)) : test::u8_pixels(im);
}

// The GPU's resize + normalise + pad against preprocess() on the CPU: float32 identical to the bit,
// bf16 the CPU's value rounded to nearest even.
void expect_gpu_preprocess_matches(Backend& gpu, const std::vector<Image>& images, int S) {
  std::vector<Tensor> in;
  for (size_t i = 0; i < images.size(); ++i) in.push_back(u8_tensor(gpu, images[i], i % 2 == 0));  // pinned and not
  const int64_t B = static_cast<int64_t>(images.size()), plane = int64_t(S) * S * 3;
  Tensor nan = Tensor::empty({B, S, S, 3});
  std::fill_n(nan.data_as<float>(), nan.numel(), std::numeric_limits<float>::quiet_NaN());
  Tensor f32 = gpu.alloc({B, S, S, 3}, DType::F32), bf16 = gpu.alloc({B, S, S, 3}, DType::BF16);
  gpu.copy_from_host(nan, f32);
  gpu.copy_from_host(nan, bf16);
  gpu.preprocess_images(in, f32);
  gpu.preprocess_images(in, bf16);
  const Tensor got = gpu.download(f32), got16 = gpu.download(bf16);
  for (int64_t b = 0; b < B; ++b) {
    const Preprocessed want = preprocess(images[b], S);
    const float* w = want.input.data_as<const float>();
    const float* g = got.data_as<const float>() + b * plane;
    const float* g16 = got16.data_as<const float>() + b * plane;
    int64_t bad = 0, bad16 = 0, first = -1;
    for (int64_t i = 0; i < plane; ++i) {
      const bool differs = std::memcmp(&w[i], &g[i], sizeof(float)) != 0;
      if (differs && first < 0) first = i;
      bad += differs;
      bad16 += g16[i] != bf16_to_f32(f32_to_bf16(w[i]));
    }
    EXPECT_EQ(bad, 0) << images[b].width << "x" << images[b].height << ": first difference at " << first << ": "
                      << (first >= 0 ? g[first] : 0.f) << " vs " << (first >= 0 ? w[first] : 0.f);
    EXPECT_EQ(bad16, 0) << images[b].width << "x" << images[b].height << " (bf16)";
  }
}

TEST_F(CudaOps, PreprocessImagesEqualsTheCpuBitForBit) {
  expect_gpu_preprocess_matches(
      *gpu,
      {test::pattern_image(300, 200), test::pattern_image(128, 97), test::pattern_image(40, 128),
       test::pattern_image(37, 23), test::pattern_image(128, 128)},
      128);
  if (!std::filesystem::exists(test::shared_dir() + "/images/truck.jpg")) GTEST_SKIP() << "no sample images";
  expect_gpu_preprocess_matches(*gpu, {load_image(test::shared_dir() + "/images/truck.jpg"),
                                       load_image(test::shared_dir() + "/images/dog.jpg")},
                                1024);
}

TEST_F(CudaOps, MemoryStatsCountEveryAllocation) {
  const Backend::MemoryStats start = gpu->memory_stats();
  EXPECT_GE(start.current, size_t(32) << 20);  // cuBLASLt's workspace
  {
    Tensor a = gpu->alloc({64 << 20}, DType::U8);
    EXPECT_EQ(gpu->memory_stats().current, start.current + (64 << 20));
    EXPECT_GE(gpu->memory_stats().peak, start.current + (64 << 20));
    Tensor pinned = gpu->alloc_host({8 << 20}, DType::U8);
    EXPECT_EQ(gpu->memory_stats().current, start.current + (64 << 20));  // host memory is not device memory
    EXPECT_GE(gpu->memory_stats().pinned_host, size_t(8) << 20);
  }
  const Backend::MemoryStats after = gpu->memory_stats();
  EXPECT_EQ(after.current, start.current);
  EXPECT_GE(after.peak, start.current + (64 << 20));
  EXPECT_EQ(after.pinned_host, start.pinned_host);
  gpu->reset_peak_memory();
  EXPECT_EQ(gpu->memory_stats().peak, start.current);
}

TEST_F(CudaOps, FencesAndAsyncDownloads) {
  const Tensor x = random_bf16({1000, 64}, 1800);
  const Tensor d = dev(x, DType::F32);
  Tensor h = gpu->alloc_host({1000, 64}, DType::F32);
  auto fence = gpu->make_fence();
  fence->wait();  // never recorded: returns at once
  gpu->download_async(d, h);
  gpu->record(*fence);
  fence->wait();
  EXPECT_EQ(compare(h, x).max_abs, 0.0);
  Tensor wrong = gpu->alloc_host({999, 64}, DType::F32);
  EXPECT_THROW(gpu->download_async(d, wrong), Error);
}

// The Embedder on the GPU (pinned pipeline, GPU preprocessing, batches of 2 across failures)
// against the Predictor on the GPU, image by image.
TEST(CudaEmbedder, MatchesThePredictorOnTheGpu) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA device";
  SEGANY_REQUIRE_GOLDEN();
  const std::string dir = test::golden_dir() + "/micro_h64", images = test::shared_dir() + "/images/";
  const std::vector<std::string> paths = {images + "dog.jpg", images + "truck.jpg", images + "groceries.jpg",
                                          images + "no_such.jpg", images + "dog.jpg"};
  EmbedderOptions eo;
  eo.device = "cuda";
  eo.config = dir + "/config.json";
  eo.batch = 2;
  Embedder embedder(dir + "/checkpoint.pth", eo);
  std::vector<Embedding> got(paths.size());
  std::vector<EmbedBatchStats> batches;
  const size_t failed = embedder.embed_files(
      paths, [&](Embedding& e) { got[e.index] = std::move(e); }, [&](const EmbedBatchStats& b) { batches.push_back(b); });
  EXPECT_EQ(failed, 1u);
  ASSERT_EQ(batches.size(), 2u);
  EXPECT_EQ(batches[0].images, 2);
  EXPECT_EQ(batches[1].images, 2);
  for (const EmbedBatchStats& b : batches) std::printf("    batch %d: %d images, %.1f ms\n", b.index, b.images, b.ms);

  PredictorOptions po;
  po.device = "cuda";
  po.config = dir + "/config.json";
  Predictor predictor(dir + "/checkpoint.pth", po);
  PredictorOptions pc = po;
  pc.device = "cpu";
  Predictor reference(dir + "/checkpoint.pth", pc);
  for (size_t i = 0; i < paths.size(); ++i) {
    if (i == 3) {
      EXPECT_FALSE(got[i].ok());
      EXPECT_NE(got[i].error.find("no_such.jpg"), std::string::npos) << got[i].error;
      continue;
    }
    ASSERT_TRUE(got[i].ok()) << got[i].error;
    const Image im = load_image(paths[i]);
    predictor.set_image(im);
    const Tensor want = predictor.image_embedding();
    ASSERT_EQ(got[i].embedding.shape(), want.shape());
    const Diff d = compare(got[i].embedding, want);
    EXPECT_LE(d.rel, 1e-3) << paths[i] << ": " << show(d);
    std::printf("    %-16s embedder vs predictor (gpu): %s\n", paths[i].substr(images.size()).c_str(), show(d).c_str());
    if (i < 2) {  // the bf16 GPU encoder against the fp32 CPU one, for the record
      reference.set_image(im);
      std::printf("    %-16s gpu vs cpu: %s\n", paths[i].substr(images.size()).c_str(),
                  show(compare(want, reference.image_embedding())).c_str());
    }
  }
  // The golden reference, through the GPU path end to end.
  const io::TensorMap golden = io::load_safetensors(dir + "/golden.safetensors");
  const Diff dg = compare(got[0].embedding, golden.at("image.embedding").to_f32());
  std::printf("    dog vs golden (bf16 encoder): %s\n", show(dg).c_str());
  EXPECT_LE(dg.rel, 2e-2) << show(dg);
}

}  // namespace
}  // namespace segany
