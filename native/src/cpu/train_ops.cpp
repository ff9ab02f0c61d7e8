// The training building blocks other than the FFN (whose kernels live in hybrid.cpp): linear
// layers through the dense GEMM, RoPE, cross-entropy, AdamW (causal attention is in
// train_attention*.cpp, RMSNorm and the gradient's sum of squares in train_norm*.cpp; the
// AVX-512 transpose and AdamW in train_ops_avx512.cpp). Each forward sits next to its backward.
// f32 storage; reductions that decide a row's scale are accumulated in float64.
#include "train_ops.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "sparsellm/cpu_info.h"
#include "sparsellm/gemm.h"

namespace sparsellm::trainops {

void transpose_avx512(const float* in, int64_t ld_in, int64_t rows, int64_t cols, float* out, int64_t ld_out);
void adamw_avx512(float* w, const float* g, float* m, float* v, int64_t n, float lr, float b1, float b2, float eps,
                  float wd, double c1, double c2, float gscale);

void transpose(const float* in, int64_t ld_in, int64_t rows, int64_t cols, float* out, int64_t ld_out) {
  if (active_isa() == Isa::Avx512) return transpose_avx512(in, ld_in, rows, cols, out, ld_out);
  const int64_t Bk = 64;
#pragma omp parallel for collapse(2) schedule(static) num_threads(num_threads())
  for (int64_t r0 = 0; r0 < rows; r0 += Bk)
    for (int64_t c0 = 0; c0 < cols; c0 += Bk)
      for (int64_t c = c0; c < std::min(cols, c0 + Bk); ++c)
        for (int64_t r = r0; r < std::min(rows, r0 + Bk); ++r) out[c * ld_out + r] = in[r * ld_in + c];
}

// y [M, dout] = x [M, din] · Wᵀ, W [dout, din].
void linear_forward(const float* x, int64_t M, int64_t din, const float* W, int64_t dout, float* y) {
  gemm(x, din, M, WeightView{W, DType::F32, dout, din, din}, y, dout);
}

// dx [M, din] = dy · W (overwritten, unless dx is null); dW [dout, din] = dyᵀ · x when `first`
// (no earlier micro-batch wrote it), else dW += dyᵀ · x. Both through the GEMM on transposed
// copies (Wᵀ for dx; dyᵀ and xᵀ for dW: the token dimension becomes the contracted one).
void linear_backward(const float* x, const float* dy, int64_t M, int64_t din, const float* W, int64_t dout,
                     float* dx, float* dW, bool first, Scratch& s) {
  if (dx) {
    s.wt.resize(static_cast<size_t>(din * dout));
    transpose(W, din, dout, din, s.wt.data(), dout);  // Wᵀ [din, dout]
    gemm(dy, dout, M, WeightView{s.wt.data(), DType::F32, din, dout, dout}, dx, din);
  }
  s.at.resize(static_cast<size_t>(dout * M));
  s.bt.resize(static_cast<size_t>(din * M));
  transpose(dy, dout, M, dout, s.at.data(), M);  // dyᵀ [dout, M]
  transpose(x, din, M, din, s.bt.data(), M);     // xᵀ [din, M]
  if (first) {
    gemm(s.at.data(), M, dout, WeightView{s.bt.data(), DType::F32, din, M, M}, dW, din);
    return;
  }
  s.out.resize(static_cast<size_t>(dout * din));
  gemm(s.at.data(), M, dout, WeightView{s.bt.data(), DType::F32, din, M, M}, s.out.data(), din);
  add_to(dW, s.out.data(), dout * din);
}

void add_to(float* dst, const float* src, int64_t n) {
#pragma omp parallel for schedule(static) num_threads(num_threads())
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}

void rope_tables(int64_t positions, int64_t hd, double theta, std::vector<float>& cos_t, std::vector<float>& sin_t) {
  const int64_t half = hd / 2;
  cos_t.resize(static_cast<size_t>(positions * half));
  sin_t.resize(static_cast<size_t>(positions * half));
  for (int64_t p = 0; p < positions; ++p)
    for (int64_t i = 0; i < half; ++i) {
      const double a = static_cast<double>(p) * std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(hd));
      cos_t[static_cast<size_t>(p * half + i)] = static_cast<float>(std::cos(a));
      sin_t[static_cast<size_t>(p * half + i)] = static_cast<float>(std::sin(a));
    }
}

// In place on x [B·T, ld] (heads at columns 0 .. H·hd): the pair (i, i + hd/2) of each head at
// position t is rotated by +angle (forward) or −angle (backward: the transpose of the rotation).
void rope_apply(float* x, int64_t ld, int64_t B, int64_t T, int64_t H, int64_t hd, const float* cos_t,
                const float* sin_t, bool inverse) {
  const int64_t half = hd / 2;
  const float sg = inverse ? -1.f : 1.f;
#pragma omp parallel for schedule(static) num_threads(num_threads())
  for (int64_t r = 0; r < B * T; ++r) {
    const int64_t t = r % T;
    const float* c = cos_t + t * half;
    const float* s = sin_t + t * half;
    for (int64_t h = 0; h < H; ++h) {
      float* xh = x + r * ld + h * hd;
      for (int64_t i = 0; i < half; ++i) {
        const float a = xh[i], b = xh[i + half];
        xh[i] = a * c[i] - sg * b * s[i];
        xh[i + half] = b * c[i] + sg * a * s[i];
      }
    }
  }
}

// Row-wise softmax cross-entropy. logits [M, V] are replaced by dlogits = (softmax − onehot)·gscale.
// Returns Σ_rows −log softmax[target] (float64).
double cross_entropy(float* logits, const int32_t* targets, int64_t M, int64_t V, float gscale) {
  std::vector<double> row(static_cast<size_t>(M));
#pragma omp parallel for schedule(static) num_threads(num_threads())
  for (int64_t m = 0; m < M; ++m) {
    float* l = logits + m * V;
    float mx = -INFINITY;
    for (int64_t i = 0; i < V; ++i) mx = std::max(mx, l[i]);
    double sum = 0;
    for (int64_t i = 0; i < V; ++i) sum += std::exp(static_cast<double>(l[i] - mx));
    const int32_t tg = targets[m];
    row[static_cast<size_t>(m)] = std::log(sum) - static_cast<double>(l[tg] - mx);
    const double inv = 1.0 / sum;
    for (int64_t i = 0; i < V; ++i) {
      const double pr = std::exp(static_cast<double>(l[i] - mx)) * inv;
      l[i] = static_cast<float>((pr - (i == tg ? 1.0 : 0.0)) * gscale);
    }
  }
  double total = 0;
  for (int64_t m = 0; m < M; ++m) total += row[static_cast<size_t>(m)];
  return total;
}

// AdamW on w[begin, end): m = β1 m + (1−β1) g; v = β2 v + (1−β2) g²;
// w −= lr · (m̂ / (sqrt(v̂) + eps) + wd · w), with bias corrections c1 = 1 − β1^t, c2 = 1 − β2^t.
void adamw(float* w, const float* g, float* m, float* v, int64_t n, float lr, float b1, float b2, float eps, float wd,
           double c1, double c2, float gscale) {
  if (active_isa() == Isa::Avx512) return adamw_avx512(w, g, m, v, n, lr, b1, b2, eps, wd, c1, c2, gscale);
  const float ic1 = static_cast<float>(1.0 / c1);
  const float ic2 = static_cast<float>(1.0 / c2);
#pragma omp parallel for schedule(static) num_threads(num_threads())
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i] * gscale;
    const float mi = b1 * m[i] + (1.f - b1) * gi;
    const float vi = b2 * v[i] + (1.f - b2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    w[i] -= lr * ((mi * ic1) / (std::sqrt(vi * ic2) + eps) + wd * w[i]);
  }
}

}  // namespace sparsellm::trainops
