// The fp32 reference backend: OpenBLAS for every matrix product, OpenMP for the rest.
// It is the numerical twin of every CUDA kernel and what the golden tests hold to the original.
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "backend/backend.h"
#include "backend/cpu/softmax.h"
#include "backend/mask_ops.h"

namespace segany {
namespace {

class CpuLinear final : public LinearWeights {
 public:
  Tensor weight;  // [out, in] float32, as the checkpoint stores it (sgemm reads it transposed)
  Tensor bias;    // [out] or undefined
};

void require_f32_cpu(const Tensor& t, const char* what) {
  check(t.defined() && t.device() == Device::CPU && t.dtype() == DType::F32,
        std::string("cpu backend: ") + what + " must be a float32 host tensor");
}

int64_t rows_of(const Tensor& t) { return t.numel() / t.dim(-1); }

// C[M, N] = alpha * A[M, K] B[N, K]^T + beta * C, all row-major contiguous.
void sgemm_nt(int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda, const float* B,
              int64_t ldb, float beta, float* C, int64_t ldc) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(M), static_cast<int>(N),
              static_cast<int>(K), alpha, A, static_cast<int>(lda), B, static_cast<int>(ldb), beta, C,
              static_cast<int>(ldc));
}

// C[M, N] = A[M, K] B[K, N].
void sgemm_nn(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
              int64_t ldc) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(M), static_cast<int>(N),
              static_cast<int>(K), 1.0f, A, static_cast<int>(lda), B, static_cast<int>(ldb), 0.0f, C,
              static_cast<int>(ldc));
}

inline float gelu(float x) { return 0.5f * x * (1.0f + std::erf(x * 0.70710678118654752440f)); }

inline float apply(Activation act, float x) {
  switch (act) {
    case Activation::None: return x;
    case Activation::ReLU: return x > 0.0f ? x : 0.0f;
    case Activation::GELU: return gelu(x);
  }
  return x;
}

// Row-wise exp(x - max) in place; inv_sum[r] = 1 / sum of row r. The caller scales the rows of
// P V by inv_sum, which is softmax(x) V with one pass less over the [rows, cols] matrix.
void exp_rows(float* x, int64_t rows, int64_t cols, float* inv_sum) {
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) inv_sum[r] = cpu::exp_row(x + r * cols, cols);
}

// dst rows (stride dst_stride) = src rows [T, D] * inv_sum[row].
void scatter_scaled(const float* src, int64_t T, int64_t D, const float* inv_sum, float* dst, int64_t dst_stride) {
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T; ++t)
    for (int64_t d = 0; d < D; ++d) dst[t * dst_stride + d] = src[t * D + d] * inv_sum[t];
}

// Copies head h of a [T, stride] row layout into a contiguous [T, D] block.
void gather_head(const float* src, int64_t T, int64_t stride, int64_t D, float* dst) {
  for (int64_t t = 0; t < T; ++t) std::memcpy(dst + t * D, src + t * stride, D * sizeof(float));
}

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int threads) {
    if (threads > 0) {
      omp_set_num_threads(threads);
      openblas_set_num_threads(threads);
    }
  }
  Device device() const override { return Device::CPU; }
  std::string name() const override { return "cpu"; }

  DType activation_dtype() const override { return DType::F32; }
  Tensor alloc(const Shape& shape, DType dtype) override { return Tensor::empty(shape, dtype); }
  Tensor upload(const Tensor& host) override { return host.to_f32(); }
  Tensor download(const Tensor& t) override { return t.to_f32(); }
  void copy_from_host(const Tensor& host, Tensor& dst) override {
    require_f32_cpu(host, "copy_from_host source");
    check(host.numel() == dst.numel(), "copy_from_host: " + shape_str(host.shape()) + " into " + shape_str(dst.shape()));
    std::memcpy(dst.data(), host.data(), host.nbytes());
  }

  std::unique_ptr<LinearWeights> prepare_linear(const std::string& name, const Tensor& weight,
                                                const Tensor* bias) override {
    check(weight.ndim() == 2, "linear '" + name + "': weight must be 2-d, found " + shape_str(weight.shape()));
    auto w = std::make_unique<CpuLinear>();
    w->out_features = weight.dim(0);
    w->in_features = weight.dim(1);
    w->weight = weight.to_f32();
    if (bias) {
      check(bias->numel() == w->out_features, "linear '" + name + "': bias has " + std::to_string(bias->numel()) +
                                                  " values for " + std::to_string(w->out_features) + " outputs");
      w->bias = bias->to_f32().view({w->out_features});
      w->has_bias = true;
    }
    return w;
  }

  void linear(const Tensor& x, const LinearWeights& lw, Tensor& y, Activation act, const Tensor* residual) override {
    const auto& w = static_cast<const CpuLinear&>(lw);
    require_f32_cpu(x, "linear input");
    require_f32_cpu(y, "linear output");
    const int64_t K = w.in_features, N = w.out_features, M = rows_of(x);
    check(x.dim(-1) == K && y.dim(-1) == N && rows_of(y) == M,
          "linear: input " + shape_str(x.shape()) + ", output " + shape_str(y.shape()) + " for weight [" +
              std::to_string(N) + ", " + std::to_string(K) + "]");
    const bool residual_in_y = residual && residual->data() == y.data();
    check(!(residual && act != Activation::None && residual_in_y),
          "linear: an activated output cannot accumulate into its residual in place");
    float* out = y.data_as<float>();
    float beta = 0.0f;
    if (residual && act == Activation::None) {
      if (!residual_in_y) std::memcpy(out, residual->data(), y.nbytes());
      beta = 1.0f;
    }
    sgemm_nt(M, N, K, 1.0f, x.data_as<const float>(), K, w.weight.data_as<const float>(), K, beta, out, N);
    const float* b = w.has_bias ? w.bias.data_as<const float>() : nullptr;
    const float* res = (residual && act != Activation::None) ? residual->data_as<const float>() : nullptr;
    if (!b && act == Activation::None && !res) return;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < M; ++i) {
      float* row = out + i * N;
      for (int64_t j = 0; j < N; ++j) {
        float v = row[j] + (b ? b[j] : 0.0f);
        v = apply(act, v);
        row[j] = res ? v + res[i * N + j] : v;
      }
    }
  }

  void layer_norm(const Tensor& x, const Tensor& gamma, const Tensor& beta, float eps, Tensor& y,
                  Activation act) override {
    require_f32_cpu(x, "layer_norm input");
    const int64_t C = x.dim(-1), M = rows_of(x);
    check(y.numel() == x.numel() && gamma.numel() == C && beta.numel() == C,
          "layer_norm: input " + shape_str(x.shape()) + ", output " + shape_str(y.shape()) + ", weight " +
              shape_str(gamma.shape()));
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < M; ++i) {
      float* out = y.data_as<float>() + i * C;
      norm_row(x.data_as<const float>() + i * C, gamma.data_as<const float>(), beta.data_as<const float>(), C, eps, out);
      if (act != Activation::None)
        for (int64_t c = 0; c < C; ++c) out[c] = apply(act, out[c]);
    }
  }

  void attention_relpos(const Tensor& qkv, const Tensor& rel_pos_h, const Tensor& rel_pos_w, int heads, int gh,
                        int gw, Tensor& out) override {
    require_f32_cpu(qkv, "attention_relpos qkv");
    const int64_t T = int64_t(gh) * gw;
    const int64_t B = qkv.numel() / (T * qkv.dim(-1));
    const int64_t D = qkv.dim(-1) / (3 * heads);
    check(qkv.dim(-1) == 3 * heads * D && qkv.numel() == B * T * 3 * heads * D,
          "attention_relpos: qkv " + shape_str(qkv.shape()) + " does not hold " + std::to_string(T) + " tokens of 3 x " +
              std::to_string(heads) + " heads");
    check(rel_pos_h.numel() == (2 * gh - 1) * D && rel_pos_w.numel() == (2 * gw - 1) * D,
          "attention_relpos: rel_pos tables " + shape_str(rel_pos_h.shape()) + ", " + shape_str(rel_pos_w.shape()) +
              " for a " + std::to_string(gh) + "x" + std::to_string(gw) + " grid of head dim " + std::to_string(D));
    check(out.numel() == B * T * heads * D, "attention_relpos: output " + shape_str(out.shape()));
    for (int64_t b = 0; b < B; ++b)
      relpos_sequence(qkv.data_as<const float>() + b * T * 3 * heads * D, rel_pos_h.data_as<const float>(),
                      rel_pos_w.data_as<const float>(), heads, D, gh, gw, out.data_as<float>() + b * T * heads * D);
  }

  // Each window gathered into a [window^2, 3C] sequence (padding rows = pad_qkv), attended as
  // attention_relpos does, and its real rows scattered back to the grid.
  void window_attention_relpos(const Tensor& qkv, const Tensor& pad_qkv, const Tensor& rel_pos_h,
                               const Tensor& rel_pos_w, int heads, int ws, Tensor& out) override {
    require_f32_cpu(qkv, "window_attention_relpos qkv");
    require_f32_cpu(pad_qkv, "window_attention_relpos pad_qkv");
    require_f32_cpu(out, "window_attention_relpos output");
    check(qkv.ndim() == 4 && heads > 0 && ws > 0 && qkv.dim(3) % (3 * heads) == 0,
          "window_attention_relpos: qkv " + shape_str(qkv.shape()) + " must be [B, H, W, 3 x " +
              std::to_string(heads) + " heads x head_dim]");
    const int64_t B = qkv.dim(0), H = qkv.dim(1), W = qkv.dim(2), C3 = qkv.dim(3), C = C3 / 3, D = C / heads;
    check(pad_qkv.numel() == C3, "window_attention_relpos: pad_qkv " + shape_str(pad_qkv.shape()) + " for qkv " +
                                     shape_str(qkv.shape()));
    check(rel_pos_h.numel() == (2 * ws - 1) * D && rel_pos_w.numel() == (2 * ws - 1) * D,
          "window_attention_relpos: rel_pos tables " + shape_str(rel_pos_h.shape()) + ", " +
              shape_str(rel_pos_w.shape()) + " for windows of " + std::to_string(ws) + " and head dim " +
              std::to_string(D));
    check(out.numel() == B * H * W * C, "window_attention_relpos: output " + shape_str(out.shape()) + " for qkv " +
                                            shape_str(qkv.shape()));
    const int64_t T = int64_t(ws) * ws, nh = (H + ws - 1) / ws, nw = (W + ws - 1) / ws;
    float* win_qkv = scratch(8, T * C3);
    float* win_out = scratch(9, T * C);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t wy = 0; wy < nh; ++wy)
        for (int64_t wx = 0; wx < nw; ++wx) {
          for (int64_t t = 0; t < T; ++t) {
            const int64_t r = wy * ws + t / ws, c = wx * ws + t % ws;
            const float* src = (r < H && c < W) ? qkv.data_as<const float>() + ((b * H + r) * W + c) * C3
                                                : pad_qkv.data_as<const float>();
            std::memcpy(win_qkv + t * C3, src, C3 * sizeof(float));
          }
          relpos_sequence(win_qkv, rel_pos_h.data_as<const float>(), rel_pos_w.data_as<const float>(), heads, D, ws,
                          ws, win_out);
          for (int64_t t = 0; t < T; ++t) {
            const int64_t r = wy * ws + t / ws, c = wx * ws + t % ws;
            if (r < H && c < W)
              std::memcpy(out.data_as<float>() + ((b * H + r) * W + c) * C, win_out + t * C, C * sizeof(float));
          }
        }
  }

  void attention(const Tensor& qt, const Tensor& kt, const Tensor& vt, int heads, Tensor& out) override {
    require_f32_cpu(qt, "attention q");
    const int64_t Bq = qt.dim(0), Bk = kt.dim(0), Bv = vt.dim(0), B = std::max({Bq, Bk, Bv});
    const int64_t Tq = qt.dim(1), D = qt.dim(2), Tk = kt.dim(1);
    auto ok_batch = [B](int64_t b) { return b == B || b == 1; };
    check(D % heads == 0 && kt.dim(2) == D && vt.dim(2) == D && vt.dim(1) == Tk && ok_batch(Bq) && ok_batch(Bk) &&
              ok_batch(Bv) && out.numel() == B * Tq * D,
          "attention: q " + shape_str(qt.shape()) + ", k " + shape_str(kt.shape()) + ", v " + shape_str(vt.shape()) +
              " -> " + shape_str(out.shape()));
    const int64_t hd = D / heads;
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    float* q = scratch(0, Tq * hd);
    float* k = scratch(1, Tk * hd);
    float* v = scratch(2, Tk * hd);
    float* o = scratch(3, Tq * hd);
    float* s = scratch(4, Tq * Tk);
    float* inv = scratch(5, Tq);
    for (int64_t b = 0; b < B; ++b)
      for (int h = 0; h < heads; ++h) {
        gather_head(qt.data_as<const float>() + (Bq == 1 ? 0 : b) * Tq * D + h * hd, Tq, D, hd, q);
        gather_head(kt.data_as<const float>() + (Bk == 1 ? 0 : b) * Tk * D + h * hd, Tk, D, hd, k);
        gather_head(vt.data_as<const float>() + (Bv == 1 ? 0 : b) * Tk * D + h * hd, Tk, D, hd, v);
        sgemm_nt(Tq, Tk, hd, scale, q, hd, k, hd, 0.0f, s, Tk);
        exp_rows(s, Tq, Tk, inv);
        sgemm_nn(Tq, hd, Tk, s, Tk, v, hd, o, hd);
        scatter_scaled(o, Tq, hd, inv, out.data_as<float>() + b * Tq * D + h * hd, D);
      }
  }

  void add(const Tensor& a, const Tensor& b, Tensor& y) override {
    require_f32_cpu(a, "add input");
    const int64_t n = a.numel(), nb = b.numel();
    check(y.numel() == n && nb > 0 && n % nb == 0 && b.dim(-1) == a.dim(-1),
          "add: " + shape_str(a.shape()) + " + " + shape_str(b.shape()) + " -> " + shape_str(y.shape()));
    const float* as = a.data_as<const float>();
    const float* bs = b.data_as<const float>();
    float* ys = y.data_as<float>();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n / nb; ++i)
      for (int64_t j = 0; j < nb; ++j) ys[i * nb + j] = as[i * nb + j] + bs[j];
  }

  void copy_tokens(const Tensor& src, int src_begin, Tensor& dst, int dst_begin, int count) override {
    require_f32_cpu(src, "copy_tokens source");
    require_f32_cpu(dst, "copy_tokens destination");
    const int64_t B = dst.dim(0), Ts = src.dim(1), Td = dst.dim(1), C = src.dim(2);
    const bool shared = src.dim(0) == 1;  // one source sequence copied into every destination
    check(src.ndim() == 3 && dst.ndim() == 3 && (src.dim(0) == B || shared) && dst.dim(2) == C && src_begin >= 0 &&
              dst_begin >= 0 && count >= 0 && src_begin + count <= Ts && dst_begin + count <= Td,
          "copy_tokens: " + shape_str(src.shape()) + "[" + std::to_string(src_begin) + "+" + std::to_string(count) +
              "] into " + shape_str(dst.shape()) + "[" + std::to_string(dst_begin) + "]");
    for (int64_t b = 0; b < B; ++b)
      std::memcpy(dst.data_as<float>() + (b * Td + dst_begin) * C,
                  src.data_as<const float>() + ((shared ? 0 : b) * Ts + src_begin) * C,
                  count * C * sizeof(float));
  }

  void activation(Tensor& x, Activation act) override {
    float* p = x.data_as<float>();
    const int64_t n = x.numel();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) p[i] = apply(act, p[i]);
  }

  void patchify(const Tensor& x, int p, Tensor& y) override {
    const int64_t B = x.dim(0), H = x.dim(1), W = x.dim(2), C = x.dim(3), Ho = H / p, Wo = W / p;
    check(H % p == 0 && W % p == 0 && y.numel() == x.numel(),
          "patchify: " + shape_str(x.shape()) + " by " + std::to_string(p) + " into " + shape_str(y.shape()));
    const float* xs = x.data_as<const float>();
    float* ys = y.data_as<float>();
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < Ho; ++i)
        for (int64_t j = 0; j < Wo; ++j)
          for (int64_t ky = 0; ky < p; ++ky)
            std::memcpy(ys + (((b * Ho + i) * Wo + j) * p + ky) * p * C, xs + ((b * H + i * p + ky) * W + j * p) * C,
                        p * C * sizeof(float));
  }

  void im2col3x3(const Tensor& x, Tensor& y) override {
    const int64_t B = x.dim(0), H = x.dim(1), W = x.dim(2), C = x.dim(3);
    check(y.numel() == 9 * x.numel(), "im2col3x3: " + shape_str(x.shape()) + " into " + shape_str(y.shape()));
    const float* xs = x.data_as<const float>();
    float* ys = y.data_as<float>();
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < H; ++i)
        for (int64_t j = 0; j < W; ++j)
          for (int ky = 0; ky < 3; ++ky)
            for (int kx = 0; kx < 3; ++kx) {
              float* dst = ys + (((b * H + i) * W + j) * 9 + ky * 3 + kx) * C;
              const int64_t r = i + ky - 1, c = j + kx - 1;
              if (r < 0 || r >= H || c < 0 || c >= W)
                std::memset(dst, 0, C * sizeof(float));
              else
                std::memcpy(dst, xs + ((b * H + r) * W + c) * C, C * sizeof(float));
            }
  }

  void hypernetwork_masks(const Tensor& up, const Tensor& hyper, Tensor& low_res) override {
    require_f32_cpu(up, "hypernetwork_masks upscaled image");
    require_f32_cpu(hyper, "hypernetwork_masks hypernetwork outputs");
    require_f32_cpu(low_res, "hypernetwork_masks output");
    const HypernetworkShape s = hypernetwork_shape(up, hyper, low_res);
    const int64_t side = 4 * s.G, plane = side * side;
    const float* ups = up.data_as<const float>();
    const float* hs = hyper.data_as<const float>();
    float* out = low_res.data_as<float>();
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t p = 0; p < s.P; ++p)
      for (int64_t y = 0; y < side; ++y) {
        std::vector<float> g(static_cast<size_t>(s.D));
        for (int64_t x = 0; x < side; ++x) {
          const float* u = ups + (p * plane + hypernetwork_row(y, x, s.G)) * s.D;
          for (int64_t k = 0; k < s.D; ++k) g[k] = gelu(u[k]);
          for (int64_t t = 0; t < s.T; ++t) {
            const float* h = hs + (p * s.T + t) * s.D;
            float acc = 0.0f;
            for (int64_t k = 0; k < s.D; ++k) acc += h[k] * g[k];
            out[(p * s.T + t) * plane + y * side + x] = acc;
          }
        }
      }
  }

  void synchronize() override {}

 private:
  // Scratch buffers of the attention ops, kept between calls: the 4096 x 4096 scores of a
  // global block would otherwise be allocated and page-faulted in for every head.
  float* scratch(int slot, int64_t n) {
    std::vector<float>& b = scratch_[slot];
    if (static_cast<int64_t>(b.size()) < n) b.resize(n);
    return b.data();
  }
  std::vector<float> scratch_[10];

  // attention_relpos of one sequence: qkv [T, 3, heads, D] -> out [T, heads * D], T = gh * gw.
  void relpos_sequence(const float* qkv, const float* rel_pos_h, const float* rel_pos_w, int heads, int64_t D, int gh,
                       int gw, float* out) {
    const int64_t T = int64_t(gh) * gw;
    const float scale = 1.0f / std::sqrt(static_cast<float>(D));
    const int64_t stride = 3 * heads * D;
    float* q = scratch(0, T * D);
    float* k = scratch(1, T * D);
    float* v = scratch(2, T * D);
    float* o = scratch(3, T * D);
    float* s = scratch(4, T * T);
    float* inv = scratch(5, T);
    float* qrh = scratch(6, T * (2 * gh - 1));
    float* qrw = scratch(7, T * (2 * gw - 1));
    for (int h = 0; h < heads; ++h) {
      const float* base = qkv + h * D;
      gather_head(base, T, stride, D, q);
      gather_head(base + heads * D, T, stride, D, k);
      gather_head(base + 2 * heads * D, T, stride, D, v);
      // q against every relative offset: qrh[i, r] = q_i . rel_pos_h[r]
      sgemm_nt(T, 2 * gh - 1, D, 1.0f, q, D, rel_pos_h, D, 0.0f, qrh, 2 * gh - 1);
      sgemm_nt(T, 2 * gw - 1, D, 1.0f, q, D, rel_pos_w, D, 0.0f, qrw, 2 * gw - 1);
      sgemm_nt(T, T, D, scale, q, D, k, D, 0.0f, s, T);
      // logit[i, j] += rel_h[i, row(j)] + rel_w[i, col(j)], offsets qh - kh + gh - 1
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < T; ++i) {
        const int64_t qi = i / gw, qj = i % gw;
        const float* rh = qrh + i * (2 * gh - 1) + qi + gh - 1;
        const float* rw = qrw + i * (2 * gw - 1) + qj + gw - 1;
        float* row = s + i * T;
        for (int64_t kr = 0; kr < gh; ++kr) {
          const float bh = rh[-kr];
          float* seg = row + kr * gw;
          for (int64_t kc = 0; kc < gw; ++kc) seg[kc] += bh + rw[-kc];
        }
      }
      exp_rows(s, T, T, inv);
      sgemm_nn(T, D, T, s, T, v, D, o, D);
      scatter_scaled(o, T, D, inv, out + h * D, heads * D);
    }
  }

  static void norm_row(const float* x, const float* g, const float* b, int64_t C, float eps, float* y) {
    double sum = 0.0;
    for (int64_t k = 0; k < C; ++k) sum += x[k];
    const float mean = static_cast<float>(sum / C);
    double var = 0.0;
    for (int64_t k = 0; k < C; ++k) var += double(x[k] - mean) * (x[k] - mean);
    const float rstd = 1.0f / std::sqrt(static_cast<float>(var / C) + eps);
    for (int64_t k = 0; k < C; ++k) y[k] = (x[k] - mean) * rstd * g[k] + b[k];
  }
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(int threads) { return std::make_unique<CpuBackend>(threads); }

}  // namespace segany
