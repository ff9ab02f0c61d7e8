// FFN forward (dense, sparse TwELL, auto) and decode against a float64 reference.
//
// Inputs: the gate is built in "exact" mode (ffn_test_util.h), so the sparsity pattern of the
// f32 kernels equals the float64 one and the statistics (nnz, max row, overflow tiles/rows) are
// compared exactly. The up/down weights are ordinary Gaussians, so the outputs carry genuine
// f32 rounding: each output is a sum over ≤ F hidden units of products of a d-term dot product,
// whose relative error is of order eps_f32·sqrt(d + F) ≈ 6e-8·18 ≈ 1e-6 on the shapes below;
// we allow 2e-5 (≥ 10x headroom, far below the O(1) error of any indexing or pattern bug).
// bf16 weights: the reference uses the SAME bf16-rounded weights (widened exactly), so the
// same tolerance holds. Threads 1 vs 2, every ISA the CPU has and every sparse kernel (per-token,
// two-phase) are forced in turn.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "check.h"
#include "ffn_test_util.h"
#include "../src/cpu/ffn_kernels.h"
#include "sparsellm/cpu_info.h"
#include "sparsellm/ffn.h"

using namespace sparsellm;
using ffntest::Problem;

namespace {

const double kTol = 2e-5;

struct RefStats {
  int64_t nnz = 0, max_row = 0, ovf_tiles = 0, ovf_rows = 0;
};

RefStats ref_stats(const std::vector<double>& z, int64_t M, int64_t F, int T, int cap) {
  RefStats s;
  for (int64_t m = 0; m < M; ++m) {
    int64_t row = 0;
    bool ovf = false;
    for (int64_t t0 = 0; t0 < F; t0 += T) {
      int64_t n = 0;
      for (int64_t j = t0; j < std::min(F, t0 + T); ++j) n += z[static_cast<size_t>(m * F + j)] > 0;
      row += n;
      if (n > cap) { ++s.ovf_tiles; ovf = true; }
    }
    s.nnz += row;
    s.max_row = std::max(s.max_row, row);
    s.ovf_rows += ovf;
  }
  return s;
}

struct Case {
  int64_t M, d, F;
  double density;
  int heavy_every;
  int T, C;
  bool gated, biases;
  DType dtype;
  // Token pairs (2k, 2k+1): 1 = the same x (they share every active neuron); -1 = the second
  // one's x negated (a plain-ReLU gate then activates complementary sets: they share none).
  int pairs = 0;
};

std::string describe(const Case& c) {
  char buf[200];
  std::snprintf(buf, sizeof buf, "M=%lld d=%lld F=%lld rho=%.3f heavy=%d T=%d C=%d %s%s %s",
                (long long)c.M, (long long)c.d, (long long)c.F, c.density, c.heavy_every, c.T, c.C,
                c.gated ? "gated" : "plain", c.biases ? "+bias" : "", c.dtype == DType::F32 ? "f32" : "bf16");
  return buf;
}

void run_case(const Case& c, bool* saw_overflow, bool* saw_dense_auto, bool* saw_sparse_auto, bool* saw_two_phase) {
  Problem p = ffntest::make_problem(c.M, c.d, c.F, c.density, c.heavy_every, 4.0, true, c.biases);
  if (!c.gated) p.up = p.gate;  // the TwELL producer is the up projection
  if (!c.gated || !c.biases) p.up_bias.clear();
  if (!c.gated && c.biases) {   // exact biases keep the non-gated pattern exact
    p.up_bias.assign(static_cast<size_t>(c.F), 0.f);
    std::uniform_int_distribution<int> wi(-8, 8);
    for (auto& v : p.up_bias) v = wi(ffntest::rng()) / 8.0f;
  }
  if (c.gated) p.up_bias.clear();
  if (c.pairs != 0)
    for (int64_t m = 1; m < c.M; m += 2)
      for (int64_t k = 0; k < c.d; ++k)
        p.x[static_cast<size_t>(m * c.d + k)] = static_cast<float>(c.pairs) * p.x[static_cast<size_t>((m - 1) * c.d + k)];
  if (c.dtype == DType::BF16) {
    ffntest::round_bf16(p.gate);  // multiples of 1/8 in [-1, 1]: exact in bf16
    ffntest::round_bf16(p.up);
    ffntest::round_bf16(p.down);
  }
  const std::vector<double> yref = ffntest::ref_ffn(p, c.gated);
  const std::vector<double> z = ffntest::ref_linear(p.x, c.M, c.d, c.gated ? p.gate : p.up, c.F, c.gated ? nullptr : &p.up_bias);
  if (c.pairs != 0) {  // the pairs share all (1) or none (-1) of their active neurons
    int64_t shared = 0, active = 0;
    for (int64_t m = 1; m < c.M; m += 2)
      for (int64_t j = 0; j < c.F; ++j) {
        const bool a = z[static_cast<size_t>((m - 1) * c.F + j)] > 0, b = z[static_cast<size_t>(m * c.F + j)] > 0;
        shared += a && b;
        active += a || b;
      }
    CHECK(active > 0 && shared == (c.pairs > 0 ? active : 0), "pairs %d: %lld of %lld active neurons shared", c.pairs,
          (long long)shared, (long long)active);
  }
  TwellParams tp{c.T, c.C};
  const RefStats rs = ref_stats(z, c.M, c.F, c.T, tp.capacity());
  if (rs.ovf_tiles) *saw_overflow = true;

  FfnLayerConfig cfg;
  cfg.d_model = c.d;
  cfg.d_ff = c.F;
  cfg.gated = c.gated;
  cfg.dtype = c.dtype;
  cfg.twell = tp;
  FfnLayer layer(cfg, c.gated ? p.gate.data() : nullptr, p.up.data(), p.down.data(),
                 p.up_bias.empty() ? nullptr : p.up_bias.data(), p.down_bias.empty() ? nullptr : p.down_bias.data());
  const std::string what = describe(c);
  std::vector<float> y(static_cast<size_t>(c.M * c.d));
  std::vector<float> first[3];
  // Every sparse kernel is forced in turn (auto choice, per-token, two-phase); the two-phase one
  // runs for M ≥ 2 tokens only.
  const SparseKernel kernels[3] = {SparseKernel::Auto, SparseKernel::PerToken, SparseKernel::TwoPhase};
  for (int threads : {1, 2}) {
    set_num_threads(threads);
    for (int which = 0; which < 2; ++which) {
      for (int kern = 0; kern < 3; ++kern)
      for (FfnMode mode : {FfnMode::Dense, FfnMode::Sparse, FfnMode::Auto}) {
        if (kern > 0 && (which == 1 || mode != FfnMode::Sparse)) continue;
        set_sparse_kernel(kernels[kern]);
        std::fill(y.begin(), y.end(), NAN);
        const FfnStats s = which == 0 ? layer.forward(p.x.data(), c.M, y.data(), mode)
                                      : layer.decode(p.x.data(), c.M, y.data(), mode);
        set_sparse_kernel(SparseKernel::Auto);
        if (kern == 1) CHECK(!s.two_phase, "%s: per-token kernel forced, two-phase ran", what.c_str());
        if (kern == 2) CHECK(s.two_phase == (c.M >= 2), "%s: two-phase kernel forced, ran %d", what.c_str(), (int)s.two_phase);
        if (s.two_phase) *saw_two_phase = true;
        const char* op = which == 0 ? "forward" : "decode";
        const double err = check::rel_error(y.data(), yref.data(), y.size());
        CHECK(err <= kTol, "%s %s mode %d threads %d: rel error %.3g > %.1g", what.c_str(), op, (int)mode, threads, err, kTol);
        CHECK(s.nnz == rs.nnz, "%s %s mode %d: nnz %lld, reference %lld", what.c_str(), op, (int)mode, (long long)s.nnz, (long long)rs.nnz);
        CHECK(s.max_row_nnz == rs.max_row, "%s %s mode %d: max row nnz %lld, reference %lld", what.c_str(), op, (int)mode,
              (long long)s.max_row_nnz, (long long)rs.max_row);
        if (mode == FfnMode::Sparse) {
          CHECK(s.path == FfnPath::Sparse, "%s %s: sparse mode ran the dense path", what.c_str(), op);
          CHECK(s.overflow_tiles == rs.ovf_tiles && s.overflow_rows == rs.ovf_rows,
                "%s %s: overflow tiles/rows %lld/%lld, reference %lld/%lld", what.c_str(), op, (long long)s.overflow_tiles,
                (long long)s.overflow_rows, (long long)rs.ovf_tiles, (long long)rs.ovf_rows);
        }
        if (mode == FfnMode::Dense) CHECK(s.path == FfnPath::Dense, "%s %s: dense mode ran the sparse path", what.c_str(), op);
        if (mode == FfnMode::Auto) (s.path == FfnPath::Dense ? *saw_dense_auto : *saw_sparse_auto) = true;
        if (mode == FfnMode::Sparse && which == 0) {
          if (first[kern].empty()) first[kern] = y;
          else {
            // the thread count changes the token blocking (and with fewer tokens than threads the
            // split of each token's active list; two-phase: the order in which the threads'
            // partial up products are added), so results agree within f32 rounding only
            std::vector<double> f64(first[kern].begin(), first[kern].end());
            const double e = check::rel_error(y.data(), f64.data(), y.size());
            CHECK(e <= 1e-6, "%s kernel %d: threads 1 vs 2 differ by %.3g", what.c_str(), kern, e);
          }
        }
      }
    }
  }
}

// Thresholded silu / gelu_tanh layers (a per-layer cut-off c from `prune --target-sparsity`):
// the kept units are |act(z)| > c, with their (possibly negative) activation values. The gate is
// exact (multiples of 1/8), so act(z) takes discrete values; c is placed halfway between two
// consecutive distinct |act| values of the float64 reference, so f32 rounding of act (~1e-7
// relative) cannot flip a unit and nnz / overflow statistics compare exactly. Same 2e-5
// tolerance on y as above.
double ref_act(double v, GateFn f) {
  if (f == GateFn::Silu) return v / (1.0 + std::exp(-v));
  const double k = 0.79788456080286536;
  return 0.5 * v * (1.0 + std::tanh(k * (v + 0.044715 * v * v * v)));
}

void run_thr_case(const Case& c, GateFn fn, double c0, bool* saw_overflow, bool* saw_negative) {
  Problem p = ffntest::make_problem(c.M, c.d, c.F, c.density, c.heavy_every, 4.0, true, c.biases);
  if (!c.gated) p.up = p.gate;
  if (c.gated) p.up_bias.clear();
  if (c.pairs != 0)
    for (int64_t m = 1; m < c.M; m += 2)
      for (int64_t k = 0; k < c.d; ++k)
        p.x[static_cast<size_t>(m * c.d + k)] = static_cast<float>(c.pairs) * p.x[static_cast<size_t>((m - 1) * c.d + k)];
  if (c.dtype == DType::BF16) {  // the reference uses the same bf16-rounded weights
    ffntest::round_bf16(p.gate);
    ffntest::round_bf16(p.up);
    ffntest::round_bf16(p.down);
  }
  const std::vector<double> z = ffntest::ref_linear(p.x, c.M, c.d, c.gated ? p.gate : p.up, c.F, c.gated ? nullptr : &p.up_bias);
  std::vector<double> mags;
  for (double v : z) mags.push_back(std::fabs(ref_act(v, fn)));
  std::sort(mags.begin(), mags.end());
  mags.erase(std::unique(mags.begin(), mags.end()), mags.end());
  const auto it = std::upper_bound(mags.begin(), mags.end(), c0);
  CHECK(it != mags.begin() && it != mags.end(), "cut-off %.3f outside the activation range", c0);
  const double thr = 0.5 * (*(it - 1) + *it);
  CHECK(*it - thr > 1e-5 * thr, "cut-off too close to an activation value (gap %.3g)", *it - thr);
  // float64 reference: a = act(z) kept where |a| > thr; h = a·u (gated) or a; y = h·W_downᵀ + b.
  const std::vector<double> u = c.gated ? ffntest::ref_linear(p.x, c.M, c.d, p.up, c.F, nullptr) : std::vector<double>();
  std::vector<double> keep(z.size(), 0.0), h(z.size(), 0.0);
  for (size_t i = 0; i < z.size(); ++i) {
    const double a = ref_act(z[i], fn);
    if (std::fabs(a) > thr) {
      keep[i] = 1.0;
      h[i] = c.gated ? a * u[i] : a;
      if (a < 0) *saw_negative = true;
    }
  }
  std::vector<double> yref(static_cast<size_t>(c.M * c.d));
  for (int64_t m = 0; m < c.M; ++m)
    for (int64_t i = 0; i < c.d; ++i) {
      double s = p.down_bias.empty() ? 0.0 : p.down_bias[static_cast<size_t>(i)];
      for (int64_t j = 0; j < c.F; ++j) s += h[static_cast<size_t>(m * c.F + j)] * p.down[static_cast<size_t>(i * c.F + j)];
      yref[static_cast<size_t>(m * c.d + i)] = s;
    }
  if (c.pairs != 0) {  // the pairs share all (1) or none (-1) of their active neurons
    int64_t shared = 0, active = 0;
    for (int64_t m = 1; m < c.M; m += 2)
      for (int64_t j = 0; j < c.F; ++j) {
        const bool a = z[static_cast<size_t>((m - 1) * c.F + j)] > 0, b = z[static_cast<size_t>(m * c.F + j)] > 0;
        shared += a && b;
        active += a || b;
      }
    CHECK(active > 0 && shared == (c.pairs > 0 ? active : 0), "pairs %d: %lld of %lld active neurons shared", c.pairs,
          (long long)shared, (long long)active);
  }
  TwellParams tp{c.T, c.C};
  const RefStats rs = ref_stats(keep, c.M, c.F, c.T, tp.capacity());
  if (rs.ovf_tiles) *saw_overflow = true;
  FfnLayerConfig cfg;
  cfg.d_model = c.d;
  cfg.d_ff = c.F;
  cfg.gated = c.gated;
  cfg.dtype = c.dtype;
  cfg.twell = tp;
  cfg.act = GateAct{fn, static_cast<float>(thr)};
  FfnLayer layer(cfg, c.gated ? p.gate.data() : nullptr, p.up.data(), p.down.data(),
                 p.up_bias.empty() ? nullptr : p.up_bias.data(), p.down_bias.empty() ? nullptr : p.down_bias.data());
  const std::string what = describe(c) + (fn == GateFn::Silu ? " silu" : " gelu_tanh") + " c=" + std::to_string(thr);
  std::vector<float> y(static_cast<size_t>(c.M * c.d));
  for (int threads : {1, 2}) {
    set_num_threads(threads);
    for (int which = 0; which < 2; ++which)
      for (FfnMode mode : {FfnMode::Dense, FfnMode::Sparse, FfnMode::Auto, FfnMode::Auto}) {
        std::fill(y.begin(), y.end(), NAN);
        const FfnStats s = which == 0 ? layer.forward(p.x.data(), c.M, y.data(), mode)
                                      : layer.decode(p.x.data(), c.M, y.data(), mode);
        const char* op = which == 0 ? "forward" : "decode";
        const double err = check::rel_error(y.data(), yref.data(), y.size());
        CHECK(err <= kTol, "%s %s mode %d threads %d: rel error %.3g > %.1g", what.c_str(), op, (int)mode, threads, err, kTol);
        CHECK(s.nnz == rs.nnz && s.max_row_nnz == rs.max_row, "%s %s mode %d: nnz %lld max row %lld, reference %lld %lld",
              what.c_str(), op, (int)mode, (long long)s.nnz, (long long)s.max_row_nnz, (long long)rs.nnz, (long long)rs.max_row);
        if (mode == FfnMode::Sparse) {
          CHECK(s.path == FfnPath::Sparse, "%s %s: sparse mode ran the dense path", what.c_str(), op);
          CHECK(s.overflow_tiles == rs.ovf_tiles && s.overflow_rows == rs.ovf_rows,
                "%s %s: overflow tiles/rows %lld/%lld, reference %lld/%lld", what.c_str(), op, (long long)s.overflow_tiles,
                (long long)s.overflow_rows, (long long)rs.ovf_tiles, (long long)rs.ovf_rows);
        }
      }
  }
}

}  // namespace

int main() {
  const Isa best = active_isa();
  bool saw_overflow = false, saw_dense_auto = false, saw_sparse_auto = false, saw_two_phase = false;
  std::vector<Case> cases;
  for (bool gated : {true, false})
    for (DType dt : {DType::F32, DType::BF16}) {
      cases.push_back({1, 37, 300, 0.05, 0, 64, 8, gated, !gated, dt});
      cases.push_back({7, 37, 300, 0.005, 3, 64, 8, gated, false, dt});
      cases.push_back({33, 37, 300, 0.05, 5, 64, 8, gated, true, dt});
      cases.push_back({33, 48, 300, 0.2, 4, 256, 8, gated, false, dt});
      cases.push_back({7, 37, 300, 1.0, 0, 64, 8, gated, true, dt});
      cases.push_back({33, 16, 130, 0.05, 2, 16, 4, gated, false, dt});
      cases.push_back({2, 65, 257, 0.2, 2, 32, 2, gated, false, dt});
      // Two-phase shapes: d not a multiple of its 128-column chunks (a 2-column last chunk; an
      // odd d, so bf16 rows end mid-pair), F not a multiple of the tile, heavy rows, overflowing
      // tiles; 77 tokens (threads split the chunks; the u partials of both are summed).
      cases.push_back({77, 130, 300, 0.2, 4, 64, 8, gated, false, dt});
      cases.push_back({7, 257, 301, 0.3, 2, 64, 4, gated, true, dt});
      cases.push_back({77, 31, 190, 0.1, 3, 32, 4, gated, !gated, dt});
    }
  for (int isa = static_cast<int>(best); isa >= 0; --isa) {
    set_isa_limit(static_cast<Isa>(isa));
    std::fprintf(stderr, "isa %s\n", isa_name(active_isa()));
    for (const Case& c : cases) run_case(c, &saw_overflow, &saw_dense_auto, &saw_sparse_auto, &saw_two_phase);
  }
  // The two-phase path walks each panel in neuron ranges (about 512 KiB each, so one range at
  // these shapes): tiny ranges (1 and 3 KiB: 2 and 6 rows of 256 bf16 columns, 1 and 3 of f32)
  // make every panel span many, the last one short. Token pairs sharing all or none of their
  // neurons (a plain-ReLU gate: negated inputs activate complementary sets).
  std::vector<Case> range_cases;
  for (bool gated : {true, false})
    for (DType dt : {DType::F32, DType::BF16}) {
      range_cases.push_back({77, 130, 300, 0.2, 4, 64, 8, gated, false, dt});
      range_cases.push_back({33, 48, 300, 0.2, 4, 256, 8, gated, true, dt, 1});
      range_cases.push_back({34, 37, 301, 0.3, 0, 64, 4, gated, false, dt, -1});
      range_cases.push_back({7, 257, 301, 0.3, 2, 64, 4, gated, true, dt});
    }
  for (int64_t rb : {1 << 10, 3 << 10}) {
    detail::ffn_set_two_phase_range_bytes(rb);
    for (int isa = static_cast<int>(best); isa >= 0; --isa) {
      set_isa_limit(static_cast<Isa>(isa));
      std::fprintf(stderr, "isa %s, two-phase ranges of %lld bytes\n", isa_name(active_isa()), (long long)rb);
      for (const Case& c : range_cases) run_case(c, &saw_overflow, &saw_dense_auto, &saw_sparse_auto, &saw_two_phase);
    }
  }
  detail::ffn_set_two_phase_range_bytes(0);
  bool thr_overflow = false, thr_negative = false;
  for (int isa = static_cast<int>(best); isa >= 0; --isa) {
    set_isa_limit(static_cast<Isa>(isa));
    for (bool gated : {true, false})
      for (DType dt : {DType::F32, DType::BF16}) {
        run_thr_case({7, 37, 300, 0.05, 3, 64, 8, gated, !gated, dt}, GateFn::Silu, 0.1, &thr_overflow, &thr_negative);
        run_thr_case({33, 21, 130, 0.2, 4, 16, 4, gated, false, dt}, GateFn::Silu, 0.05, &thr_overflow, &thr_negative);
        run_thr_case({5, 37, 257, 0.05, 2, 32, 2, gated, true, dt}, GateFn::GeluTanh, 0.08, &thr_overflow, &thr_negative);
      }
  }
  CHECK(thr_overflow, "no thresholded case overflowed a tile");
  CHECK(thr_negative, "no thresholded case kept a negative activation");
  set_isa_limit(best);
  CHECK(saw_overflow, "no case produced an overflowing tile: the overflow path went untested");
  CHECK(saw_dense_auto && saw_sparse_auto, "auto mode never chose %s", saw_dense_auto ? "sparse" : "dense");
  CHECK(saw_two_phase, "the two-phase kernels never ran");
  return check::finish("test_ffn");
}
