// Internal: causal multi-head attention of training (forward keeps the probabilities P, backward),
// written once as blocked loops over one (sequence, head) at a time and compiled per ISA
// (train_attention*.cpp) around a small register-tiled product kernel. Everything here has
// internal linkage so that the AVX-512 / AVX2 builds never leak into portable code.
//
// Layouts: q, k, v [B·T, ld_in] (head h at columns h·hd .. h·hd + hd), out and dout [B·T, ld_out],
// dq, dk, dv [B·T, ld_grad]; P [B, H, T, T] (row t holds the softmax over keys 0..t and zeros to the
// end of its block of kRows rows; the columns after that are never written nor read).
// Per (b, h), with scale = 1/sqrt(hd):
//   forward:  S = q·kᵀ, P = softmax_causal(scale·S), out = P·v
//   backward: dP = dout·vᵀ, dS = P ⊙ (dP − rowsum(dP ⊙ P))·scale, dq = dS·k, dk = dSᵀ·q, dv = Pᵀ·dout
// Rows are taken in blocks of kRows; the products run only over the causal range (a block of
// rows t0..t0+R needs keys 0..t0+R; a block of keys s0..s0+R needs queries s0..T), and the
// entries above the diagonal inside a block are exact zeros of P and dS.
#pragma once
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace sparsellm::trainops {

// The product every attention step is made of:
//   C[r, n] (+)= Σ_{k < K} A[r·ars + k·aks] · B[k·ldb + n]      r < R ≤ kRows, n < N
// (overwrites C when `acc` is false). A's strides make A either row-major (ars = lda, aks = 1)
// or transposed (ars = 1, aks = lda).
constexpr int kRows = 8;
using BlockProduct = void (*)(int R, int64_t N, int64_t K, const float* A, int64_t ars, int64_t aks, const float* B,
                              int64_t ldb, float* C, int64_t ldc, bool acc);

namespace {

// Plain loops of the same product (portable and AVX2 builds; the compiler vectorises over n).
inline void block_product_loops(int R, int64_t N, int64_t K, const float* A, int64_t ars, int64_t aks, const float* B,
                                int64_t ldb, float* C, int64_t ldc, bool acc) {
  for (int r = 0; r < R; ++r) {
    float* c = C + r * ldc;
    if (!acc) std::memset(c, 0, sizeof(float) * static_cast<size_t>(N));
    const float* a = A + r * ars;
    for (int64_t k = 0; k < K; ++k) {
      const float ak = a[k * aks];
      const float* b = B + k * ldb;
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) c[n] += ak * b[n];
    }
  }
}

// e^x for x <= 0 (0 below -87), as branch-free code the compiler vectorises: x = n·ln2 + r with
// n = round(x / ln2) (two-part ln2, so r is exact to f32), |r| <= ln2/2, e^r by its Taylor series
// to degree 7 (truncation r⁸/8! < 6e-9), then the 2^n factor through the exponent bits.
inline float exp_le0(float x) {
  x = x < -87.f ? -87.f : x;
  const float shifter = 12582912.f;  // 1.5·2^23: adding and subtracting it rounds to an integer
  const float n = (x * 1.44269504f + shifter) - shifter;
  const float r = (x - n * 0.693145752f) - n * 1.42860677e-6f;
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

// Row t of S (scores 0..t valid) becomes softmax(scale·S[t, 0..t]), zeros to `end`.
inline void softmax_row(float* row, int64_t t, int64_t end, float scale) {
  const int64_t n = t + 1;
  float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
  for (int64_t s = 0; s < n; ++s) mx = row[s] > mx ? row[s] : mx;
  const float mxs = mx * scale;
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t s = 0; s < n; ++s) {
    const float e = exp_le0(row[s] * scale - mxs);
    row[s] = e;
    sum += e;
  }
  const float inv = 1.f / sum;
#pragma omp simd
  for (int64_t s = 0; s < n; ++s) row[s] *= inv;
  if (n < end) std::memset(row + n, 0, sizeof(float) * static_cast<size_t>(end - n));
}

// out [T, hd] (ld) of one head: xt [hd, T] = xᵀ.
inline void gather_transposed(const float* x, int64_t ld, int64_t T, int64_t hd, float* xt) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < hd; ++i) xt[i * T + t] = x[t * ld + i];
}

inline void attention_forward_impl(BlockProduct mm, const float* q, const float* k, const float* v, int64_t ld_in,
                                   int64_t B, int64_t T, int64_t H, int64_t hd, float* P, float* out, int64_t ld_out,
                                   int threads) {
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> kt(static_cast<size_t>(hd * T));
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t base_in = b * T * ld_in + h * hd, base_out = b * T * ld_out + h * hd;
        float* Pbh = P + (b * H + h) * T * T;
        gather_transposed(k + base_in, ld_in, T, hd, kt.data());
        for (int64_t t0 = 0; t0 < T; t0 += kRows) {
          const int R = static_cast<int>(std::min<int64_t>(kRows, T - t0));
          const int64_t n = std::min(T, t0 + R);  // keys this block of rows can see
          mm(R, n, hd, q + base_in + t0 * ld_in, ld_in, 1, kt.data(), T, Pbh + t0 * T, T, false);
          for (int r = 0; r < R; ++r) softmax_row(Pbh + (t0 + r) * T, t0 + r, n, scale);
          mm(R, hd, n, Pbh + t0 * T, T, 1, v + base_in, ld_in, out + base_out + t0 * ld_out, ld_out, false);
        }
      }
  }
}

inline void attention_backward_impl(BlockProduct mm, const float* q, const float* k, const float* v, int64_t ld_in,
                                    const float* P, const float* dout, int64_t ld_out, int64_t B, int64_t T, int64_t H,
                                    int64_t hd, float* dq, float* dk, float* dv, int64_t ld_grad, int threads) {
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> vt(static_cast<size_t>(hd * T)), dS(static_cast<size_t>(T * T));
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t base_in = b * T * ld_in + h * hd, base_out = b * T * ld_out + h * hd;
        const int64_t base_g = b * T * ld_grad + h * hd;
        const float* Pbh = P + (b * H + h) * T * T;
        gather_transposed(v + base_in, ld_in, T, hd, vt.data());
        for (int64_t t0 = 0; t0 < T; t0 += kRows) {
          const int R = static_cast<int>(std::min<int64_t>(kRows, T - t0));
          const int64_t n = std::min(T, t0 + R);
          float* dSr = dS.data() + t0 * T;
          mm(R, n, hd, dout + base_out + t0 * ld_out, ld_out, 1, vt.data(), T, dSr, T, false);  // dP
          for (int r = 0; r < R; ++r) {
            const int64_t t = t0 + r;
            float* row = dSr + r * T;
            const float* p = Pbh + t * T;
            float rs = 0.f;
#pragma omp simd reduction(+ : rs)
            for (int64_t s = 0; s <= t; ++s) rs += row[s] * p[s];
#pragma omp simd
            for (int64_t s = 0; s <= t; ++s) row[s] = p[s] * (row[s] - rs) * scale;
            if (t + 1 < n) std::memset(row + t + 1, 0, sizeof(float) * static_cast<size_t>(n - t - 1));
          }
          mm(R, hd, n, dSr, T, 1, k + base_in, ld_in, dq + base_g + t0 * ld_grad, ld_grad, false);  // dq = dS·k
        }
        for (int64_t s0 = 0; s0 < T; s0 += kRows) {
          const int R = static_cast<int>(std::min<int64_t>(kRows, T - s0));
          // dk[s] = Σ_{t >= s} dS[t, s]·q[t];  dv[s] = Σ_{t >= s} P[t, s]·dout[t]
          mm(R, hd, T - s0, dS.data() + s0 * T + s0, 1, T, q + base_in + s0 * ld_in, ld_in,
             dk + base_g + s0 * ld_grad, ld_grad, false);
          mm(R, hd, T - s0, Pbh + s0 * T + s0, 1, T, dout + base_out + s0 * ld_out, ld_out,
             dv + base_g + s0 * ld_grad, ld_grad, false);
        }
      }
  }
}

}  // namespace
}  // namespace sparsellm::trainops
