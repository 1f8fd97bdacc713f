// The CPU backend's ops against naive loops written straight from their definitions (and from
// the original's PyTorch code): the reference every faster backend is held to.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "backend/backend.h"
#include "backend/quantize.h"
#include "model/layers.h"

namespace segany {
namespace {

Tensor randn(Shape s, uint32_t seed, float std = 1.0f) {
  Tensor t = Tensor::empty(std::move(s));
  std::mt19937 g(seed);
  std::normal_distribution<float> d(0.0f, std);
  for (int64_t i = 0; i < t.numel(); ++i) t.data_as<float>()[i] = d(g);
  return t;
}

float max_diff(const Tensor& a, const Tensor& b) {
  EXPECT_EQ(a.numel(), b.numel());
  float m = 0;
  for (int64_t i = 0; i < a.numel(); ++i) {
    const float d = std::fabs(a.data_as<float>()[i] - b.data_as<float>()[i]);
    if (!(d <= m)) m = d;
  }
  return m;
}

class CpuOps : public ::testing::Test {
 protected:
  std::unique_ptr<Backend> be = make_cpu_backend();
};

TEST_F(CpuOps, LinearEpilogues) {
  const Tensor x = randn({2, 5, 7}, 1), w = randn({3, 7}, 2), b = randn({3}, 3), r = randn({2, 5, 3}, 4);
  auto lw = be->prepare_linear("t", w, &b);
  for (Activation act : {Activation::None, Activation::ReLU, Activation::GELU})
    for (bool with_res : {false, true}) {
      Tensor y = Tensor::empty({2, 5, 3}), ref = Tensor::empty({2, 5, 3});
      be->linear(x, *lw, y, act, with_res ? &r : nullptr);
      for (int i = 0; i < 10; ++i)
        for (int o = 0; o < 3; ++o) {
          double s = b.data_as<float>()[o];
          for (int k = 0; k < 7; ++k) s += double(x.data_as<float>()[i * 7 + k]) * w.data_as<float>()[o * 7 + k];
          if (act == Activation::ReLU) s = std::max(0.0, s);
          if (act == Activation::GELU) s = 0.5 * s * (1 + std::erf(s / std::sqrt(2.0)));
          ref.data_as<float>()[i * 3 + o] = float(s + (with_res ? r.data_as<float>()[i * 3 + o] : 0));
        }
      EXPECT_LE(max_diff(y, ref), 1e-5f) << int(act) << with_res;
    }
  // Residual accumulated in place.
  Tensor y = r.clone();
  be->linear(x, *lw, y, Activation::None, &y);
  Tensor ref = Tensor::empty({2, 5, 3});
  be->linear(x, *lw, ref, Activation::None, &r);
  EXPECT_LE(max_diff(y, ref), 1e-6f);
}

// SAM's Attention with use_rel_pos, straight from the definition (add_decomposed_rel_pos):
// logits = scale q.k + q.Rh[qh - kh + gh - 1] + q.Rw[qw - kw + gw - 1]. qkv [B, gh*gw, 3, heads, D].
Tensor attention_relpos_by_definition(const Tensor& qkv, const Tensor& rh, const Tensor& rw, int heads, int gh,
                                      int gw) {
  const int T = gh * gw, D = int(qkv.dim(-1)) / (3 * heads), B = int(qkv.numel() / (int64_t(T) * 3 * heads * D));
  Tensor out = Tensor::empty({B, T, heads * D});
  const float* p = qkv.data_as<float>();
  auto at = [&](int b, int t, int which, int h, int d) { return p[((b * T + t) * 3 + which) * heads * D + h * D + d]; };
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < heads; ++h)
      for (int i = 0; i < T; ++i) {
        std::vector<double> logit(T);
        double mx = -1e30;
        for (int j = 0; j < T; ++j) {
          double s = 0, bh = 0, bw = 0;
          for (int d = 0; d < D; ++d) {
            s += double(at(b, i, 0, h, d)) * at(b, j, 1, h, d);
            bh += double(at(b, i, 0, h, d)) * rh.data_as<float>()[(i / gw - j / gw + gh - 1) * D + d];
            bw += double(at(b, i, 0, h, d)) * rw.data_as<float>()[(i % gw - j % gw + gw - 1) * D + d];
          }
          logit[j] = s / std::sqrt(double(D)) + bh + bw;
          mx = std::max(mx, logit[j]);
        }
        double sum = 0;
        for (double& l : logit) sum += (l = std::exp(l - mx));
        for (int d = 0; d < D; ++d) {
          double o = 0;
          for (int j = 0; j < T; ++j) o += logit[j] / sum * at(b, j, 2, h, d);
          out.data_as<float>()[(b * T + i) * heads * D + h * D + d] = float(o);
        }
      }
  return out;
}

TEST_F(CpuOps, AttentionRelPosMatchesDefinition) {
  const int B = 2, heads = 3, D = 8, gh = 4, gw = 5, T = gh * gw;
  const Tensor qkv = randn({B, T, 3 * heads * D}, 8), rh = randn({2 * gh - 1, D}, 9, 0.5f),
               rw = randn({2 * gw - 1, D}, 10, 0.5f);
  Tensor out = Tensor::empty({B, T, heads * D});
  be->attention_relpos(qkv, rh, rw, heads, gh, gw, out);
  EXPECT_LE(max_diff(out, attention_relpos_by_definition(qkv, rh, rw, heads, gh, gw)), 2e-5f);
}

// window_attention_relpos on the grid == SAM's windowed block written out: LayerNorm, zero-pad to
// a multiple of the window, qkv linear on every padded token (a padding token gets the bias),
// window partition, attention per window, unpartition with the padding cropped.
TEST_F(CpuOps, WindowAttentionRelPosIsSamsWindowedAttention) {
  const int B = 2, H = 9, W = 11, heads = 2, D = 8, C = heads * D, ws = 4;  // pads to 12 x 12: 9 windows
  const int nh = 3, nw = 3, T = ws * ws;
  const Tensor x = randn({B, H, W, C}, 30), g = randn({C}, 31), bt = randn({C}, 32);
  const Tensor wq = randn({3 * C, C}, 33, 0.3f), bq = randn({3 * C}, 34), rh = randn({2 * ws - 1, D}, 35, 0.5f),
               rw = randn({2 * ws - 1, D}, 36, 0.5f);
  auto qkv_lin = be->prepare_linear("qkv", wq, &bq);

  // The op: norm and qkv on the real tokens only, attention on the grid.
  Tensor xn = Tensor::empty({B, H, W, C}), qkv = Tensor::empty({B, H, W, 3 * C}), out = Tensor::empty({B, H, W, C});
  be->layer_norm(x, g, bt, 1e-6f, xn);
  be->linear(xn, *qkv_lin, qkv);
  be->window_attention_relpos(qkv, bq, rh, rw, heads, ws, out);

  // The original, naively: pad the normalised grid with zeros, qkv per padded token.
  Tensor padded = Tensor::zeros({B, nh * ws, nw * ws, C});
  for (int b = 0; b < B; ++b)
    for (int r = 0; r < H; ++r)
      for (int c = 0; c < W; ++c)
        for (int k = 0; k < C; ++k)
          padded.data_as<float>()[((b * nh * ws + r) * nw * ws + c) * C + k] = xn.data_as<float>()[((b * H + r) * W + c) * C + k];
  Tensor windows = Tensor::empty({B * nh * nw, T, 3 * C});
  for (int b = 0; b < B; ++b)
    for (int r = 0; r < nh * ws; ++r)
      for (int c = 0; c < nw * ws; ++c) {
        const float* in = padded.data_as<float>() + ((b * nh * ws + r) * nw * ws + c) * C;
        float* dst = windows.data_as<float>() + (((b * nh + r / ws) * nw + c / ws) * T + (r % ws) * ws + c % ws) * 3 * C;
        for (int o = 0; o < 3 * C; ++o) {
          double s = bq.data_as<float>()[o];
          for (int k = 0; k < C; ++k) s += double(in[k]) * wq.data_as<float>()[o * C + k];
          dst[o] = float(s);
        }
      }
  const Tensor attn = attention_relpos_by_definition(windows, rh, rw, heads, ws, ws);
  Tensor want = Tensor::empty({B, H, W, C});
  for (int b = 0; b < B; ++b)
    for (int r = 0; r < H; ++r)
      for (int c = 0; c < W; ++c)
        for (int k = 0; k < C; ++k)
          want.data_as<float>()[((b * H + r) * W + c) * C + k] =
              attn.data_as<float>()[(((b * nh + r / ws) * nw + c / ws) * T + (r % ws) * ws + c % ws) * C + k];
  EXPECT_LE(max_diff(out, want), 5e-5f);
  EXPECT_THROW(be->window_attention_relpos(qkv, randn({C}, 1), rh, rw, heads, ws, out), Error);
}

TEST_F(CpuOps, AttentionBroadcastsBatchOne) {
  const Tensor q = randn({3, 4, 16}, 11), k = randn({1, 9, 16}, 12), v = randn({1, 9, 16}, 13);
  Tensor out = Tensor::empty({3, 4, 16});
  be->attention(q, k, v, 2, out);
  for (int b = 0; b < 3; ++b) {
    Tensor one = Tensor::empty({1, 4, 16});
    be->attention(q.slice0(b, b + 1), k, v, 2, one);
    EXPECT_EQ(max_diff(one, out.slice0(b, b + 1)), 0.0f);
  }
  // k and v per batch, q shared.
  const Tensor kb = randn({3, 9, 16}, 14), vb = randn({3, 9, 16}, 15);
  Tensor out2 = Tensor::empty({3, 4, 16});
  be->attention(q.slice0(0, 1), kb, vb, 2, out2);
  Tensor one = Tensor::empty({1, 4, 16});
  be->attention(q.slice0(0, 1), kb.slice0(2, 3), vb.slice0(2, 3), 2, one);
  EXPECT_EQ(max_diff(one, out2.slice0(2, 3)), 0.0f);
}

// patchify + linear == a stride-p convolution; the transposed one is a linear layer whose output
// holds each input pixel's p x p patch, feature order (ky, kx, c).
TEST_F(CpuOps, ConvolutionsAsLinearLayers) {
  const int B = 2, H = 6, W = 4, Ci = 3, Co = 5, p = 2;
  const Tensor x = randn({B, H, W, Ci}, 16), w = randn({Co, Ci, p, p}, 17), b = randn({Co}, 18);
  Tensor patches = Tensor::empty({B, H / p, W / p, p * p * Ci}), y = Tensor::empty({B, H / p, W / p, Co});
  be->patchify(x, p, patches);
  auto lin = be->prepare_linear("conv", conv_weight_as_linear(w), &b);
  be->linear(patches, *lin, y);
  for (int n = 0; n < B; ++n)
    for (int i = 0; i < H / p; ++i)
      for (int j = 0; j < W / p; ++j)
        for (int o = 0; o < Co; ++o) {
          double s = b.data_as<float>()[o];
          for (int c = 0; c < Ci; ++c)
            for (int ky = 0; ky < p; ++ky)
              for (int kx = 0; kx < p; ++kx)
                s += double(w.data_as<float>()[((o * Ci + c) * p + ky) * p + kx]) *
                     x.data_as<float>()[((n * H + i * p + ky) * W + j * p + kx) * Ci + c];
          ASSERT_NEAR(y.data_as<float>()[((n * H / p + i) * W / p + j) * Co + o], s, 1e-5);
        }
  // Transposed: [B, 3, 2, Ci] -> [B, 6, 4, Co]
  const Tensor xt = randn({B, H / p, W / p, Ci}, 19), wt = randn({Ci, Co, p, p}, 20);
  Tensor lw, lb;
  conv_transpose_as_linear(wt, b, lw, lb);
  auto tl = be->prepare_linear("convT", lw, &lb);
  Tensor patches_t = Tensor::empty({B, H / p, W / p, p * p * Co});
  be->linear(xt, *tl, patches_t);
  for (int n = 0; n < B; ++n)
    for (int r = 0; r < H; ++r)
      for (int c = 0; c < W; ++c)
        for (int o = 0; o < Co; ++o) {
          double s = b.data_as<float>()[o];
          for (int k = 0; k < Ci; ++k)
            s += double(xt.data_as<float>()[((n * H / p + r / p) * W / p + c / p) * Ci + k]) *
                 wt.data_as<float>()[((k * Co + o) * p + r % p) * p + c % p];
          const int64_t at = ((n * H / p + r / p) * W / p + c / p) * p * p * Co + ((r % p) * p + c % p) * Co + o;
          ASSERT_NEAR(patches_t.data_as<float>()[at], s, 1e-5);
        }
}

// The decoder's masks from two 2x2 transposed convolutions left in patch order: pixel
// (4i + 2a + c, 4j + 2b + d) of the mask is the GELU'd feature row that the first convolution's
// patch (a, b) of cell (i, j), then the second's patch (c, d), put there.
TEST_F(CpuOps, HypernetworkMasksReadThePatchOrder) {
  const int64_t P = 2, T = 3, D = 5, G = 3, side = 4 * G;
  const Tensor up = randn({P, side * side, D}, 23), hyper = randn({P, T, D}, 24);
  Tensor low = Tensor::empty({P, T, side, side});
  be->hypernetwork_masks(up, hyper, low);
  auto gelu = [](double v) { return 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0))); };
  for (int64_t p = 0; p < P; ++p)
    for (int64_t i = 0; i < G; ++i)
      for (int64_t j = 0; j < G; ++j)
        for (int64_t a = 0; a < 2; ++a)
          for (int64_t bb = 0; bb < 2; ++bb)
            for (int64_t c = 0; c < 2; ++c)
              for (int64_t d = 0; d < 2; ++d) {
                // cell (i, j) -> its patch row of [G G 4] -> that row's patch of [G G 4 4]
                const int64_t row = ((i * G + j) * 4 + (a * 2 + bb)) * 4 + (c * 2 + d);
                const int64_t y = 4 * i + 2 * a + c, x = 4 * j + 2 * bb + d;
                for (int64_t t = 0; t < T; ++t) {
                  double s = 0;
                  for (int64_t k = 0; k < D; ++k)
                    s += double(hyper.data_as<float>()[(p * T + t) * D + k]) *
                         gelu(up.data_as<float>()[(p * side * side + row) * D + k]);
                  ASSERT_NEAR(low.data_as<float>()[((p * T + t) * side + y) * side + x], s, 1e-5);
                }
              }
  Tensor wrong = Tensor::empty({P, T, side, side + 4});
  EXPECT_THROW(be->hypernetwork_masks(up, hyper, wrong), Error);
}

TEST_F(CpuOps, Conv3x3ViaIm2col) {
  const int B = 1, H = 5, W = 4, Ci = 3, Co = 2;
  const Tensor x = randn({B, H, W, Ci}, 21), w = randn({Co, Ci, 3, 3}, 22);
  Tensor cols = Tensor::empty({B, H, W, 9 * Ci}), y = Tensor::empty({B, H, W, Co});
  be->im2col3x3(x, cols);
  auto lin = be->prepare_linear("conv3", conv_weight_as_linear(w), nullptr);
  be->linear(cols, *lin, y);
  for (int r = 0; r < H; ++r)
    for (int c = 0; c < W; ++c)
      for (int o = 0; o < Co; ++o) {
        double s = 0;
        for (int k = 0; k < Ci; ++k)
          for (int ky = 0; ky < 3; ++ky)
            for (int kx = 0; kx < 3; ++kx) {
              const int rr = r + ky - 1, cc = c + kx - 1;
              if (rr < 0 || rr >= H || cc < 0 || cc >= W) continue;
              s += double(w.data_as<float>()[((o * Ci + k) * 3 + ky) * 3 + kx]) * x.data_as<float>()[(rr * W + cc) * Ci + k];
            }
        ASSERT_NEAR(y.data_as<float>()[(r * W + c) * Co + o], s, 1e-5);
      }
}

TEST_F(CpuOps, AddBroadcastAndCopyTokens) {
  const Tensor a = randn({3, 4, 5}, 23), b = randn({1, 4, 5}, 24), c = randn({5}, 25);
  Tensor y = Tensor::empty({3, 4, 5});
  be->add(a, b, y);
  EXPECT_EQ(y.data_as<float>()[2 * 20 + 7], a.data_as<float>()[2 * 20 + 7] + b.data_as<float>()[7]);
  be->add(a, c, y);
  EXPECT_EQ(y.data_as<float>()[2 * 20 + 7], a.data_as<float>()[2 * 20 + 7] + c.data_as<float>()[2]);
  EXPECT_THROW(be->add(a, randn({3}, 1), y), Error);
  Tensor dst = Tensor::zeros({3, 6, 5});
  be->copy_tokens(a, 1, dst, 4, 2);
  EXPECT_EQ(dst.data_as<float>()[(2 * 6 + 5) * 5 + 3], a.data_as<float>()[(2 * 4 + 2) * 5 + 3]);
  EXPECT_EQ(dst.data_as<float>()[(2 * 6 + 3) * 5 + 3], 0.0f);
  EXPECT_THROW(be->copy_tokens(a, 3, dst, 0, 2), Error);
}

// e4m3 (the CUDA backend's fp8): every code decodes and encodes back to itself; halfway values round
// to the even code; out of range saturates at +-448; NaN stays NaN.
TEST(Fp8, E4m3ConversionsRoundToNearestEvenAndSaturate) {
  for (int c = 0; c < 256; ++c) {
    const float v = e4m3_to_f32(static_cast<uint8_t>(c));
    if ((c & 0x7f) == 0x7f) {
      EXPECT_TRUE(std::isnan(v)) << c;
      EXPECT_EQ(f32_to_e4m3(v) & 0x7f, 0x7f) << c;
      continue;
    }
    EXPECT_EQ(f32_to_e4m3(v), c) << "code " << c << " = " << v;
  }
  EXPECT_EQ(e4m3_to_f32(0x7e), 448.0f);
  EXPECT_EQ(e4m3_to_f32(0x01), std::ldexp(1.0f, -9));  // the smallest subnormal
  EXPECT_EQ(e4m3_to_f32(0x08), std::ldexp(1.0f, -6));  // the smallest normal
  for (int c = 0; c < 0x7e; ++c) {  // positive finite neighbours c, c + 1
    const float lo = e4m3_to_f32(static_cast<uint8_t>(c)), hi = e4m3_to_f32(static_cast<uint8_t>(c + 1));
    const float mid = 0.5f * (lo + hi);
    EXPECT_EQ(f32_to_e4m3(mid), c % 2 == 0 ? c : c + 1) << "halfway between codes " << c << " and " << c + 1;
    EXPECT_EQ(f32_to_e4m3(std::nextafter(mid, 0.0f)), c) << c;
    EXPECT_EQ(f32_to_e4m3(std::nextafter(mid, 1e9f)), c + 1) << c;
    EXPECT_EQ(f32_to_e4m3(-mid), 0x80 | (c % 2 == 0 ? c : c + 1)) << c;
  }
  for (float big : {449.0f, 464.0f, 1e6f, std::numeric_limits<float>::infinity()}) {
    EXPECT_EQ(f32_to_e4m3(big), 0x7e) << big;
    EXPECT_EQ(f32_to_e4m3(-big), 0xfe) << -big;
  }
  EXPECT_EQ(f32_to_e4m3(std::ldexp(1.0f, -11)), 0x00);  // a quarter of the smallest subnormal
}

// fp8 is a GPU dtype: the CPU backend refuses it, and anything but bf16 / fp8 is refused everywhere.
TEST(Fp8, OnlyTheCudaBackendTakesIt) {
  EXPECT_NO_THROW(make_backend("cpu", 1, "bf16"));
  EXPECT_THROW(make_backend("cpu", 1, "fp8"), Error);
  EXPECT_THROW(make_backend("cuda", 1, "int4"), Error);
}

TEST(Fp8, RowsQuantizeToTheirOwnScale) {
  const int64_t K = 37;
  std::vector<float> x(3 * K);
  std::mt19937 gen(5);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (int64_t k = 0; k < K; ++k) x[k] = 1000.0f * u(gen), x[K + k] = 0.0f, x[2 * K + k] = 1e-3f * u(gen);
  x[2 * K + 7] = -0.002f;  // the third row's largest magnitude, negative
  std::vector<uint8_t> q(3 * K);
  std::vector<float> scale(3);
  quantize_rows_e4m3(x.data(), 3, K, q.data(), scale.data());
  EXPECT_EQ(scale[1], 1.0f);  // zeros: scale 1
  for (int64_t k = 0; k < K; ++k) EXPECT_EQ(q[K + k], 0);
  EXPECT_EQ(scale[2], 0.002f / 448.0f);
  EXPECT_EQ(q[2 * K + 7], 0xfe);  // -448
  for (int r : {0, 2})
    for (int64_t k = 0; k < K; ++k) {  // within half an e4m3 step (2^-4 relative), or subnormal
      const float v = x[r * K + k], back = e4m3_to_f32(q[r * K + k]) * scale[r];
      EXPECT_LE(std::fabs(back - v), std::max(std::fabs(v) / 16.0f, scale[r] * std::ldexp(1.0f, -10))) << r << " " << k;
    }
  x[K + 3] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THROW(quantize_rows_e4m3(x.data(), 3, K, q.data(), scale.data()), Error);
}

}  // namespace
}  // namespace segany
