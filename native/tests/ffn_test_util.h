// Shared by test_twell / test_ffn / test_hybrid: inputs whose gate sparsity is controlled, and
// float64 references of the FFN computations.
//
// Sparsity: feature 0 of every token is the constant 1 and W_gate[j, 0] = −θ_j acts as a
// per-neuron threshold, θ_j = σ_j·Φ⁻¹(1 − ρ) for a target density ρ, with σ_j the standard
// deviation of the rest of the pre-activation. "Heavy" tokens have their other features scaled,
// which pushes many more neurons over their threshold (rows that overflow their tiles and the
// ELL width). In "exact" mode inputs are small integers and gate weights multiples of 1/8, so
// the f32 gate equals the float64 one bit for bit and the sparsity pattern can be compared
// exactly.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "check.h"
#include "sparsellm/tensor.h"

namespace ffntest {

inline std::mt19937_64& rng() {
  static std::mt19937_64 r(check::test_seed());
  return r;
}

// Φ⁻¹(p) by bisection on erfc (accurate enough to pick thresholds).
inline double inv_normal(double p) {
  double lo = -10, hi = 10;
  for (int i = 0; i < 100; ++i) {
    double mid = 0.5 * (lo + hi);
    double cdf = 0.5 * std::erfc(-mid / std::sqrt(2.0));
    (cdf < p ? lo : hi) = mid;
  }
  return 0.5 * (lo + hi);
}

struct Problem {
  int64_t M = 0, d = 0, F = 0;
  std::vector<float> x;                    // [M, d]
  std::vector<float> gate, up, down;       // [F, d], [F, d], [d, F] (standard layouts)
  std::vector<float> up_bias, down_bias;   // [F], [d] (may be empty)
  std::vector<char> heavy;                 // [M]
};

// density: target fraction of positive gate values for ordinary tokens (>= 1: all positive).
// heavy_every: every k-th token is heavy (0: none), its features scaled by heavy_scale.
inline Problem make_problem(int64_t M, int64_t d, int64_t F, double density, int heavy_every,
                            double heavy_scale, bool exact, bool biases) {
  Problem p;
  p.M = M; p.d = d; p.F = F;
  std::normal_distribution<double> nd(0.0, 1.0);
  std::uniform_int_distribution<int> xi(-3, 3), wi(-8, 8);
  p.x.resize(static_cast<size_t>(M * d));
  p.heavy.assign(static_cast<size_t>(M), 0);
  for (int64_t m = 0; m < M; ++m) {
    const bool heavy = heavy_every > 0 && (m % heavy_every) == heavy_every - 1;
    p.heavy[static_cast<size_t>(m)] = heavy;
    p.x[static_cast<size_t>(m * d)] = 1.f;
    for (int64_t k = 1; k < d; ++k) {
      double v = exact ? xi(rng()) : nd(rng());
      if (heavy) v = exact ? v * std::round(heavy_scale) : v * heavy_scale;
      p.x[static_cast<size_t>(m * d + k)] = static_cast<float>(v);
    }
  }
  const double xvar = exact ? 4.0 : 1.0;  // variance of the integer features (-3..3 uniform)
  p.gate.resize(static_cast<size_t>(F * d));
  for (int64_t j = 0; j < F; ++j) {
    double ss = 0;
    for (int64_t k = 1; k < d; ++k) {
      double w = exact ? wi(rng()) / 8.0 : nd(rng()) / std::sqrt(static_cast<double>(d));
      p.gate[static_cast<size_t>(j * d + k)] = static_cast<float>(w);
      ss += w * w;
    }
    const double sigma = std::sqrt(ss * xvar);
    double theta = density >= 1.0 ? -(6.0 * sigma + 1.0) : sigma * inv_normal(1.0 - density);
    if (exact) theta = std::round(theta * 8.0) / 8.0;
    p.gate[static_cast<size_t>(j * d)] = static_cast<float>(-theta);
  }
  p.up.resize(static_cast<size_t>(F * d));
  for (auto& v : p.up) v = static_cast<float>(nd(rng()) / std::sqrt(static_cast<double>(d)));
  p.down.resize(static_cast<size_t>(d * F));
  for (auto& v : p.down) v = static_cast<float>(nd(rng()) / std::sqrt(static_cast<double>(F) * std::max(density, 0.01)));
  if (biases) {
    p.up_bias.resize(static_cast<size_t>(F));
    // exact mode: multiples of 1/8 so the biased pre-activation stays exact
    for (auto& v : p.up_bias) v = static_cast<float>(exact ? wi(rng()) / 8.0 : 0.3 * nd(rng()));
    p.down_bias.resize(static_cast<size_t>(d));
    for (auto& v : p.down_bias) v = static_cast<float>(nd(rng()));
  }
  return p;
}

inline void round_bf16(std::vector<float>& v) {
  for (auto& x : v) x = sparsellm::bf16_to_f32(sparsellm::f32_to_bf16(x));
}

// float64 pre-activations z [M, F] = x · Wᵀ (+ bias).
inline std::vector<double> ref_linear(const std::vector<float>& x, int64_t M, int64_t d,
                                      const std::vector<float>& W, int64_t F,
                                      const std::vector<float>* bias) {
  std::vector<double> z(static_cast<size_t>(M * F));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < F; ++j) {
      double s = bias && !bias->empty() ? (*bias)[static_cast<size_t>(j)] : 0.0;
      for (int64_t k = 0; k < d; ++k) s += static_cast<double>(x[static_cast<size_t>(m * d + k)]) * W[static_cast<size_t>(j * d + k)];
      z[static_cast<size_t>(m * F + j)] = s;
    }
  return z;
}

// float64 FFN forward: y [M, d]; also returns the hidden h [M, F] when asked.
inline std::vector<double> ref_ffn(const Problem& p, bool gated, std::vector<double>* h_out = nullptr) {
  const int64_t M = p.M, d = p.d, F = p.F;
  std::vector<double> h;
  if (gated) {
    std::vector<double> g = ref_linear(p.x, M, d, p.gate, F, nullptr);
    std::vector<double> u = ref_linear(p.x, M, d, p.up, F, nullptr);
    h.resize(g.size());
    for (size_t i = 0; i < g.size(); ++i) h[i] = (g[i] > 0 ? g[i] : 0.0) * u[i];
  } else {
    h = ref_linear(p.x, M, d, p.up, F, &p.up_bias);
    for (auto& v : h) v = v > 0 ? v : 0.0;
  }
  std::vector<double> y(static_cast<size_t>(M * d));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < d; ++i) {
      double s = p.down_bias.empty() ? 0.0 : p.down_bias[static_cast<size_t>(i)];
      for (int64_t j = 0; j < F; ++j) s += h[static_cast<size_t>(m * F + j)] * p.down[static_cast<size_t>(i * F + j)];
      y[static_cast<size_t>(m * d + i)] = s;
    }
  if (h_out) *h_out = std::move(h);
  return y;
}

inline double density_of(const std::vector<double>& z) {
  int64_t n = 0;
  for (double v : z) n += v > 0;
  return z.empty() ? 0 : static_cast<double>(n) / static_cast<double>(z.size());
}

}  // namespace ffntest
