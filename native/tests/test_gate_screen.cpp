// The screened gate of the sparse decode (cpu/gate_screen.h) against the plain decode GEMV:
// for every (token, neuron) relu(screened G) must equal relu(GEMV G) bit for bit, since the
// screen only drops rows whose exact gate it proves ≤ 0 and computes every other row with the
// GEMV itself. Fresh random inputs of awkward sizes (K odd, below one vector, not a multiple
// of 16/32/64; F not a multiple of the 4 streams; 1 to 4 tokens), bf16 and f32 weights, every
// ISA the CPU has, 1 and 2 threads, with adversarial cases:
//   - rows whose exact gate is within ~1e-6 of 0 for a token (x made orthogonal to the row,
//     then nudged), and their negations (one of the pair is a tiny positive);
//   - a token aligned with a row's quantization residual, so the screened value is off by
//     nearly the whole Cauchy–Schwarz bound (this is what makes a 10x smaller bound fail);
//   - rows with one huge weight, tokens with huge and tiny (subnormal) entries.
// Sensitivity: the same cases run with the bound scaled by 0.1 must produce a mismatch (the
// test would catch a bound 10x too small). Also FfnLayer::decode in sparse mode, screened, vs
// a full float64 recomputation, and the candidate counts (≥ the active counts).
#include <cmath>
#include <cstring>
#include <vector>

#include "../src/cpu/gate_screen.h"
#include "check.h"
#include "sparsellm/cpu_info.h"
#include "sparsellm/ffn.h"
#include "sparsellm/model.h"

using namespace sparsellm;

namespace {

std::mt19937_64& rng() {
  static std::mt19937_64 r(check::test_seed());
  return r;
}
double unif(double a, double b) { return std::uniform_real_distribution<double>(a, b)(rng()); }
double gauss() { return std::normal_distribution<double>(0, 1)(rng()); }

struct Gate {
  int64_t F, K, ld;
  DType dt;
  std::vector<float> f;     // values (bf16-rounded when dt is BF16)
  std::vector<uint16_t> h;  // bf16 storage
  WeightView view() const {
    return {dt == DType::BF16 ? static_cast<const void*>(h.data()) : static_cast<const void*>(f.data()), dt, F, K, ld};
  }
  void set(int64_t j, int64_t k, double v) {
    const size_t i = static_cast<size_t>(j * ld + k);
    if (dt == DType::BF16) {
      h[i] = f32_to_bf16(static_cast<float>(v));
      f[i] = bf16_to_f32(h[i]);
    } else {
      f[i] = static_cast<float>(v);
    }
  }
  double at(int64_t j, int64_t k) const { return f[static_cast<size_t>(j * ld + k)]; }
};

double dot_row(const Gate& g, int64_t j, const float* x) {
  double s = 0;
  for (int64_t k = 0; k < g.K; ++k) s += g.at(j, k) * x[k];
  return s;
}

// The quantization residual e = w − s q of row j (the screen's rule: s = max|w| / 127 in f32).
std::vector<double> residual(const Gate& g, int64_t j) {
  double a = 0;
  for (int64_t k = 0; k < g.K; ++k) a = std::max(a, std::fabs(g.at(j, k)));
  const double s = static_cast<float>(a / 127.0);
  std::vector<double> e(static_cast<size_t>(g.K), 0.0);
  for (int64_t k = 0; k < g.K && s > 0; ++k) {
    const double q = std::min(127.0, std::max(-127.0, std::nearbyint(g.at(j, k) / s)));
    e[static_cast<size_t>(k)] = g.at(j, k) - s * q;
  }
  return e;
}

// Random gate and tokens with a low active rate (rows lean negative against a positive-leaning
// x) plus the adversarial rows and tokens. Returns x [M][ldx].
std::vector<float> make_case(Gate& g, int64_t M, int64_t ldx) {
  const int64_t F = g.F, K = g.K;
  g.f.assign(static_cast<size_t>(F * g.ld), 0.f);
  g.h.assign(static_cast<size_t>(F * g.ld), 0);
  for (int64_t j = 0; j < F; ++j) {
    const double bias = unif(-0.6, 0.1), scale = std::exp(unif(-3, 1));
    for (int64_t k = 0; k < K; ++k) g.set(j, k, scale * (bias + gauss()));
  }
  if (F > 2 && K > 1) g.set(1, K / 2, 1e3 * g.at(1, K / 2) + 1.0);  // one huge weight
  std::vector<float> x(static_cast<size_t>(M * ldx), 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < ldx; ++k) x[static_cast<size_t>(m * ldx + k)] = static_cast<float>(0.5 + gauss());
  if (M > 1 && K > 2) {  // huge and tiny entries
    x[static_cast<size_t>(ldx + 0)] = 3e4f;
    x[static_cast<size_t>(ldx + 1)] = 1e-40f;
    x[static_cast<size_t>(ldx + K - 1)] = -2e-38f;
  }
  if (K < 4 || F < 4) return x;
  // Token 0 aligned with row 0's quantization residual (unit norm) with its component along
  // row 0 set so the exact gate is 0.05 r_0: the screened value is about −0.95 r_0 ||x||, kept
  // only by a bound close to the Cauchy–Schwarz one (a 10x smaller bound drops an active row).
  {
    const std::vector<double> e = residual(g, 0);
    double ee = 0, ww = 0, ew = 0;
    for (int64_t k = 0; k < K; ++k) {
      ee += e[static_cast<size_t>(k)] * e[static_cast<size_t>(k)];
      ww += g.at(0, k) * g.at(0, k);
      ew += e[static_cast<size_t>(k)] * g.at(0, k);
    }
    if (ee > 0 && ww > 0) {
      float* x0 = x.data();
      const double c = 1.0 / std::sqrt(ee);
      for (int64_t k = 0; k < K; ++k) x0[k] = static_cast<float>(e[static_cast<size_t>(k)] * c);
      // Remove the component along w so the exact gate is tiny, then add a small positive one.
      const double gg = dot_row(g, 0, x0);
      for (int64_t k = 0; k < K; ++k) x0[k] = static_cast<float>(x0[k] - (gg - 0.05 * std::sqrt(ee)) * g.at(0, k) / ww);
      (void)ew;
    }
  }
  // Rows 2 and 3: row 2 random, token M-1 made orthogonal to it (exact gate ~1e-6 of 0); row
  // 3 = −row 2, so one of the two is a tiny positive.
  {
    float* xm = x.data() + (M - 1) * ldx;
    int64_t kb = 0;
    for (int64_t k = 0; k < K; ++k)
      if (std::fabs(g.at(2, k)) > std::fabs(g.at(2, kb))) kb = k;
    const double gg = dot_row(g, 2, xm);
    xm[kb] = static_cast<float>(xm[kb] - gg / g.at(2, kb));
    for (int64_t k = 0; k < K; ++k) g.set(3, k, -g.at(2, k));
  }
  return x;
}

float relu(float v) { return v > 0.f ? v : 0.f; }

struct Tally {
  int64_t mismatches = 0, cases = 0, rows = 0, cands = 0, active = 0;
};

// One case: screened gate vs GEMV, relu'd, bit for bit.
void run_case(int64_t F, int64_t K, int64_t M, DType dt, double max_fraction, Tally& t, const char* what, bool report) {
  Gate g{F, K, K + (K % 3), dt, {}, {}};
  const int64_t ldx = K + 1;
  const std::vector<float> x = make_case(g, M, ldx);
  const int64_t ldg = F + 2;
  std::vector<float> ref(static_cast<size_t>(M * ldg), 7.f), got(static_cast<size_t>(M * ldg), 7.f);
  gemv(x.data(), ldx, M, g.view(), ref.data(), ldg);
  GateScreen screen(g.view());
  const int64_t nc = screen.gate(g.view(), x.data(), ldx, M, got.data(), ldg, max_fraction);
  int64_t bad = 0, active = 0;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < F; ++j) {
      const float a = relu(ref[static_cast<size_t>(m * ldg + j)]), b = relu(got[static_cast<size_t>(m * ldg + j)]);
      if (std::memcmp(&a, &b, 4) != 0) {
        if (report && bad < 3)
          std::fprintf(stderr, "  %s F=%lld K=%lld M=%lld: token %lld row %lld: screened %a, exact %a\n", what,
                       (long long)F, (long long)K, (long long)M, (long long)m, (long long)j, b, a);
        ++bad;
      }
      active += a != 0.f;
    }
  int64_t union_active = 0;
  for (int64_t j = 0; j < F; ++j) {
    bool any = false;
    for (int64_t m = 0; m < M; ++m) any = any || relu(ref[static_cast<size_t>(m * ldg + j)]) != 0.f;
    union_active += any;
  }
  if (report) {
    CHECK(bad == 0, "%s F=%lld K=%lld M=%lld: %lld (token, neuron) pairs differ", what, (long long)F, (long long)K,
          (long long)M, (long long)bad);
    CHECK(nc < 0 || nc >= union_active, "%s: %lld candidates < %lld active rows", what, (long long)nc,
          (long long)union_active);
    CHECK(nc < 0 || static_cast<double>(nc) <= max_fraction * static_cast<double>(F),
          "%s: %lld candidates above the fallback threshold", what, (long long)nc);
  }
  t.mismatches += bad;
  ++t.cases;
  if (nc >= 0) {
    t.rows += F;
    t.cands += nc;
    t.active += union_active;
  }
}

void test_exact(const char* isa, Tally& t) {
  const int64_t Ks[] = {1, 3, 15, 33, 63, 100, 257, 517};
  const int64_t Fs[] = {1, 6, 37, 130};
  for (DType dt : {DType::BF16, DType::F32})
    for (int64_t K : Ks)
      for (int64_t F : Fs)
        for (int64_t M = 1; M <= 4; ++M) {
          char what[96];
          std::snprintf(what, sizeof what, "%s %s", isa, dt == DType::BF16 ? "bf16" : "f32");
          run_case(F, K, M, dt, 1.0, t, what, true);
          if (M == 2 && F == 130) run_case(F, K, M, dt, 0.25, t, what, true);  // may fall back
        }
  // Many screen chunks (a quarter of the rows left each, down to 64; the last one partial),
  // every chunk computing its own candidates' exact gates.
  for (DType dt : {DType::BF16, DType::F32})
    for (int64_t M = 1; M <= 4; ++M) {
      char what[96];
      std::snprintf(what, sizeof what, "%s %s chunks", isa, dt == DType::BF16 ? "bf16" : "f32");
      run_case(1111, 300, M, dt, 1.0, t, what, true);
    }
}

// FfnLayer::decode, sparse mode (screened), against a float64 recomputation of the FFN.
void test_layer(const char* isa) {
  const int64_t d = 75, F = 203;
  for (DType dt : {DType::BF16, DType::F32}) {
    FfnLayerConfig cfg;
    cfg.d_model = d;
    cfg.d_ff = F;
    cfg.gated = true;
    cfg.dtype = dt;
    std::vector<float> gate(static_cast<size_t>(F * d)), up(static_cast<size_t>(F * d)), down(static_cast<size_t>(d * F));
    for (auto& v : gate) v = static_cast<float>(0.2 * (gauss() - 0.4));
    for (auto& v : up) v = static_cast<float>(0.2 * gauss());
    for (auto& v : down) v = static_cast<float>(0.2 * gauss());
    FfnLayer layer(cfg, gate.data(), up.data(), down.data(), nullptr, nullptr);
    auto rd = [&](const std::vector<float>& w, size_t i) {
      return dt == DType::BF16 ? static_cast<double>(bf16_to_f32(f32_to_bf16(w[i]))) : static_cast<double>(w[i]);
    };
    for (int64_t M = 1; M <= 4; ++M) {
      std::vector<float> x(static_cast<size_t>(M * d)), y(static_cast<size_t>(M * d));
      for (auto& v : x) v = static_cast<float>(0.5 + gauss());
      const GateScreenCounters c0 = gate_screen_counters();
      const FfnStats st = layer.decode(x.data(), M, y.data(), FfnMode::Sparse);
      const GateScreenCounters c1 = gate_screen_counters();
      CHECK(c1.calls == c0.calls + 1, "%s layer: the sparse decode did not use the screen", isa);
      double num = 0, den = 0;
      for (int64_t m = 0; m < M; ++m)
        for (int64_t k = 0; k < d; ++k) {
          double ref = 0;
          for (int64_t j = 0; j < F; ++j) {
            double g = 0, u = 0;
            for (int64_t i = 0; i < d; ++i) {
              g += rd(gate, static_cast<size_t>(j * d + i)) * x[static_cast<size_t>(m * d + i)];
              u += rd(up, static_cast<size_t>(j * d + i)) * x[static_cast<size_t>(m * d + i)];
            }
            if (g > 0) ref += g * u * rd(down, static_cast<size_t>(k * F + j));
          }
          const double e = y[static_cast<size_t>(m * d + k)] - ref;
          num += e * e;
          den += ref * ref;
        }
      // f32 sums of ~d·F terms vs float64; a neuron whose gate is within rounding of 0 may be
      // kept by one and not the other, contributing ~1e-6 relative: 1e-4 is far from any wrong
      // neuron or token (relative error ~ 1e-1).
      const double rel = std::sqrt(num / (den > 0 ? den : 1));
      CHECK(rel <= 1e-4, "%s layer %s M=%lld: relative error %.3g", isa, dt == DType::BF16 ? "bf16" : "f32",
            (long long)M, rel);
      CHECK(st.gate_candidates < 0 || st.gate_candidates >= st.max_row_nnz, "%s layer: candidates %lld < active %lld",
            isa, (long long)st.gate_candidates, (long long)st.max_row_nnz);
    }
  }
}

// Back-off: after repeated fallbacks the screen is skipped (plain GEMV, still exact).
void test_backoff(const char* isa) {
  Gate g{64, 40, 40, DType::BF16, {}, {}};
  const std::vector<float> x = make_case(g, 1, 41);
  std::vector<float> ref(64), got(64);
  gemv(x.data(), 41, 1, g.view(), ref.data(), 64);
  GateScreen screen(g.view());
  for (int i = 0; i < GateScreen::kMaxMisses + 2; ++i) {
    const GateScreenCounters c0 = gate_screen_counters();
    const int64_t nc = screen.gate(g.view(), x.data(), 41, 1, got.data(), 64, 0.0);
    const GateScreenCounters c1 = gate_screen_counters();
    CHECK(nc == -1 && std::memcmp(ref.data(), got.data(), 64 * 4) == 0, "%s backoff call %d: not the GEMV", isa, i);
    const bool screened = c1.rows > c0.rows;
    CHECK(screened == (i < GateScreen::kMaxMisses), "%s backoff call %d: screened %d", isa, i, (int)screened);
  }
}

}  // namespace

// Rows holding an inf or a NaN weight are never ruled out (their bound is infinite): they are
// candidates, and their gate is the GEMV's, bit for bit after the ReLU.
void test_nonfinite(const char* isa) {
  for (DType dt : {DType::BF16, DType::F32}) {
    const int64_t F = 40, K = 70, M = 2;
    Gate g{F, K, K + 1, dt, {}, {}};
    const int64_t ldx = K + 1, ldg = F;
    const std::vector<float> x = make_case(g, M, ldx);
    g.set(5, 3, INFINITY);
    g.set(9, 60, NAN);
    std::vector<float> ref(static_cast<size_t>(M * ldg)), got(ref.size());
    gemv(x.data(), ldx, M, g.view(), ref.data(), ldg);
    GateScreen screen(g.view());
    const int64_t nc = screen.gate(g.view(), x.data(), ldx, M, got.data(), ldg, 1.0);
    bool has5 = false, has9 = false;
    for (int64_t i = 0; i < nc; ++i) {
      has5 |= screen.candidates()[i] == 5;
      has9 |= screen.candidates()[i] == 9;
    }
    CHECK(nc >= 0 && has5 && has9, "%s %s: rows with inf / NaN weights were screened out (%lld candidates)", isa,
          dt == DType::BF16 ? "bf16" : "f32", (long long)nc);
    int64_t bad = 0;
    for (size_t i = 0; i < ref.size(); ++i) {
      const float a = relu(ref[i]), b = relu(got[i]);
      bad += std::memcmp(&a, &b, 4) != 0;
    }
    CHECK(bad == 0, "%s: %lld gates differ from the GEMV with non-finite weights", isa, (long long)bad);
  }
}

int main() {
  const Isa best = active_isa();
  for (Isa isa : {Isa::Portable, Isa::Avx2, Isa::Avx512}) {
    if (static_cast<int>(isa) > static_cast<int>(best)) continue;
    set_isa_limit(isa);
    for (int threads : {1, 2}) {
      set_num_threads(threads);
      Tally t;
      test_exact(isa_name(isa), t);
      test_layer(isa_name(isa));
      test_backoff(isa_name(isa));
      test_nonfinite(isa_name(isa));
      std::fprintf(stderr, "%s, %d thread(s): %lld cases, candidates %lld of %lld rows (active %lld)\n",
                   isa_name(isa), threads, (long long)t.cases, (long long)t.cands, (long long)t.rows,
                   (long long)t.active);
    }
    // Sensitivity: a bound 10x too small must be caught by the same cases.
    gate_screen_set_bound_scale(0.1);
    Tally s;
    for (DType dt : {DType::BF16, DType::F32})
      for (int64_t K : {33, 100, 257, 517})
        for (int64_t M = 1; M <= 4; ++M) run_case(37, K, M, dt, 1.0, s, "scaled", false);
    gate_screen_set_bound_scale(1.0);
    CHECK(s.mismatches > 0, "%s: a bound 10x too small went unnoticed (%lld cases)", isa_name(isa), (long long)s.cases);
    std::fprintf(stderr, "%s: bound x0.1 -> %lld mismatches in %lld cases (expected > 0)\n", isa_name(isa),
                 (long long)s.mismatches, (long long)s.cases);
  }
  set_isa_limit(best);
  return check::finish("test_gate_screen");
}
