// Internal: RMSNorm forward/backward and the gradient's sum of squares, written once as plain
// loops and compiled per ISA (train_norm*.cpp; the compiler vectorises them). Internal linkage so
// that the AVX-512 build never leaks into portable code.
#pragma once
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace sparsellm::trainops {
namespace {

// y[t] = x[t] · r[t] ⊙ w, r[t] = 1/sqrt(mean(x[t]²) + eps). x, y [M, d]; rstd [M].
// With `add`: the norm of the residual sum x + add, which is also stored in `sum` [M, d].
inline void rmsnorm_forward_impl(const float* x, const float* add, float* sum, int64_t M, int64_t d, const float* w,
                                 float eps, float* y, float* rstd, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t t = 0; t < M; ++t) {
    const float* xt = x + t * d;
    if (add) {
      const float* at = add + t * d;
      float* st = sum + t * d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) st[i] = xt[i] + at[i];
      xt = st;
    }
    double ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < d; ++i) ss += static_cast<double>(xt[i]) * xt[i];
    const float r = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(d) + eps));
    rstd[t] = r;
    float* yt = y + t * d;
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) yt[i] = xt[i] * r * w[i];
  }
}

// dx [M, d] (+= when accumulate, else overwritten) and dw [d] += Σ_t dy ⊙ x·r (= when dw_first).
//   dx = r·(dy ⊙ w) − x · r³/d · Σ_i dy_i w_i x_i
inline void rmsnorm_backward_impl(const float* x, const float* rstd, const float* w, const float* dy, int64_t M,
                                  int64_t d, float* dx, bool accumulate, float* dw, bool dw_first, int nt) {
  std::vector<double> part(static_cast<size_t>(nt * d), 0.0);
#pragma omp parallel num_threads(nt)
  {
    double* pw = part.data() + static_cast<int64_t>(omp_get_thread_num()) * d;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < M; ++t) {
      const float* xt = x + t * d;
      const float* gt = dy + t * d;
      const double r = rstd[t];
      double dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t i = 0; i < d; ++i) {
        dot += static_cast<double>(gt[i]) * w[i] * xt[i];
        pw[i] += static_cast<double>(gt[i]) * xt[i] * r;
      }
      const double c = dot * r * r * r / static_cast<double>(d);
      float* dxt = dx + t * d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) {
        const float v = static_cast<float>(r * gt[i] * w[i] - xt[i] * c);
        dxt[i] = accumulate ? dxt[i] + v : v;
      }
    }
  }
  for (int64_t i = 0; i < d; ++i) {
    double s = 0;
    for (int k = 0; k < nt; ++k) s += part[static_cast<size_t>(k * d + i)];
    dw[i] = dw_first ? static_cast<float>(s) : dw[i] + static_cast<float>(s);
  }
}

// Σ x² in float64, by fixed chunks of 2^16 summed in chunk order: the result does not depend on
// the thread count.
inline double sum_squares_impl(const float* x, int64_t n, int nt) {
  const int64_t chunk = int64_t(1) << 16;
  const int64_t nc = (n + chunk - 1) / chunk;
  std::vector<double> part(static_cast<size_t>(nc), 0.0);
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t c = 0; c < nc; ++c) {
    double a = 0;
    const int64_t e = std::min(n, (c + 1) * chunk);
#pragma omp simd reduction(+ : a)
    for (int64_t i = c * chunk; i < e; ++i) a += static_cast<double>(x[i]) * x[i];
    part[static_cast<size_t>(c)] = a;
  }
  double s = 0;
  for (double p : part) s += p;
  return s;
}

}  // namespace
}  // namespace sparsellm::trainops
