// Hybrid (ELL + dense tail) training kernels and the dense reference forward/backward, against
// a float64 implementation of the same math; that float64 implementation is itself checked
// against central finite differences of the loss  L = Σ y·R + λ·(1/M)·Σ|h|  (R = dy).
//
// Tolerances: kernels vs float64: 2e-5 relative (Frobenius). Every gradient is an f32 sum of at
// most max(M, d, F) ≈ 300 products of values that are themselves f32 sums of ≤ 300 terms, so the
// expected relative error is a few eps_f32·sqrt(300) ≈ 1e-6; an indexing or pattern error is O(1).
// The gate is built exactly (ffn_test_util.h) so the f32 and float64 patterns agree.
// Finite differences (float64, step 1e-6, central): truncation error O(step²) on this piecewise
// cubic loss, rounding ~1e-16/1e-6; we require 1e-6 relative agreement on a tiny Gaussian problem
// (no pre-activation within 1e-3 of a ReLU kink, checked).
#include <algorithm>
#include <cstring>

#include "check.h"
#include "ffn_test_util.h"
#include "sparsellm/cpu_info.h"
#include "sparsellm/hybrid.h"

using namespace sparsellm;
using ffntest::Problem;

namespace {

const double kTol = 2e-5;

struct Grads {
  std::vector<double> y, dx, dgate, dup, ddown;  // standard layouts
  double l1 = 0;
};

// float64 forward + backward of the gated FFN with the L1 term.
Grads ref_train(const Problem& p, const std::vector<float>& dy, double lambda) {
  const int64_t M = p.M, d = p.d, F = p.F;
  Grads r;
  std::vector<double> g = ffntest::ref_linear(p.x, M, d, p.gate, F, nullptr);
  std::vector<double> u = ffntest::ref_linear(p.x, M, d, p.up, F, nullptr);
  std::vector<double> h(g.size());
  for (size_t i = 0; i < g.size(); ++i) {
    g[i] = g[i] > 0 ? g[i] : 0.0;
    h[i] = g[i] * u[i];
    r.l1 += std::fabs(h[i]);
  }
  r.l1 /= static_cast<double>(M);
  r.y.assign(static_cast<size_t>(M * d), 0.0);
  r.dx.assign(static_cast<size_t>(M * d), 0.0);
  r.dgate.assign(static_cast<size_t>(F * d), 0.0);
  r.dup.assign(static_cast<size_t>(F * d), 0.0);
  r.ddown.assign(static_cast<size_t>(d * F), 0.0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t j = 0; j < F; ++j) {
      const double hv = h[static_cast<size_t>(m * F + j)];
      const double gv = g[static_cast<size_t>(m * F + j)], uv = u[static_cast<size_t>(m * F + j)];
      double dh = 0;
      for (int64_t i = 0; i < d; ++i) {
        r.y[static_cast<size_t>(m * d + i)] += hv * p.down[static_cast<size_t>(i * F + j)];
        dh += static_cast<double>(dy[static_cast<size_t>(m * d + i)]) * p.down[static_cast<size_t>(i * F + j)];
        r.ddown[static_cast<size_t>(i * F + j)] += hv * dy[static_cast<size_t>(m * d + i)];
      }
      if (!(gv > 0)) continue;
      dh += lambda * (hv > 0 ? 1.0 : hv < 0 ? -1.0 : 0.0) / static_cast<double>(M);
      const double du = dh * gv, dg = dh * uv;
      for (int64_t k = 0; k < d; ++k) {
        const double xv = p.x[static_cast<size_t>(m * d + k)];
        r.dx[static_cast<size_t>(m * d + k)] += du * p.up[static_cast<size_t>(j * d + k)] + dg * p.gate[static_cast<size_t>(j * d + k)];
        r.dup[static_cast<size_t>(j * d + k)] += du * xv;
        r.dgate[static_cast<size_t>(j * d + k)] += dg * xv;
      }
    }
  return r;
}

// L = Σ y·R + λ·L1 in float64 (for finite differences).
double ref_loss(const Problem& p, const std::vector<float>& R, double lambda) {
  std::vector<double> h;
  std::vector<double> y = ffntest::ref_ffn(p, true, &h);
  double L = 0, l1 = 0;
  for (size_t i = 0; i < y.size(); ++i) L += y[i] * R[i];
  for (double v : h) l1 += std::fabs(v);
  return L + lambda * l1 / static_cast<double>(p.M);
}

void finite_difference_check() {
  Problem p = ffntest::make_problem(3, 5, 12, 0.5, 0, 1.0, false, false);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (auto& v : p.x) v = nd(ffntest::rng());  // Gaussian everywhere (no constant feature needed)
  std::vector<float> R(static_cast<size_t>(p.M * p.d));
  for (auto& v : R) v = nd(ffntest::rng());
  const double lambda = 0.3;
  // keep away from the kinks of ReLU and |h|
  const std::vector<double> z = ffntest::ref_linear(p.x, p.M, p.d, p.gate, p.F, nullptr);
  const std::vector<double> u = ffntest::ref_linear(p.x, p.M, p.d, p.up, p.F, nullptr);
  double closest = 1e9;
  for (size_t i = 0; i < z.size(); ++i) closest = std::min({closest, std::fabs(z[i]), std::fabs(u[i])});
  if (closest < 1e-3) {
    std::fprintf(stderr, "finite differences: a pre-activation is %.2g from a kink; skipped this draw\n", closest);
    return;
  }
  const Grads a = ref_train(p, R, lambda);
  const double step = 1e-6;
  auto fd = [&](std::vector<float>& v, size_t i) {
    // perturb in float64 by re-deriving from a double copy: store the base, use exact offsets
    const float base = v[i];
    const double hstep = std::max(step, std::fabs(static_cast<double>(base)) * step);
    v[i] = static_cast<float>(base + hstep);
    const double hp = static_cast<double>(v[i]) - base;
    const double lp = ref_loss(p, R, lambda);
    v[i] = static_cast<float>(base - hstep);
    const double hm = base - static_cast<double>(v[i]);
    const double lm = ref_loss(p, R, lambda);
    v[i] = base;
    return (lp - lm) / (hp + hm);
  };
  // The parameters are f32, so the perturbation is the f32-representable one (hp, hm exact).
  struct Item { const char* name; std::vector<float>* v; const std::vector<double>* g; bool transpose; };
  const Item items[] = {{"x", &p.x, &a.dx, false}, {"W_gate", &p.gate, &a.dgate, false},
                        {"W_up", &p.up, &a.dup, false}, {"W_down", &p.down, &a.ddown, false}};
  for (const Item& it : items) {
    double num = 0, den = 0;
    for (size_t i = 0; i < it.v->size(); ++i) {
      const double n = fd(*it.v, i), an = (*it.g)[i];
      num += (n - an) * (n - an);
      den += an * an;
    }
    const double err = std::sqrt(num / std::max(den, 1e-300));
    CHECK(err <= 1e-6, "finite differences vs float64 backward, d/d%s: rel error %.3g", it.name, err);
  }
}

struct Case {
  int64_t M, d, F;
  double density;
  int heavy_every;
  int W, T, C;
};

void run_case(const Case& c, bool* saw_tail) {
  Problem p = ffntest::make_problem(c.M, c.d, c.F, c.density, c.heavy_every, 4.0, true, false);
  std::vector<float> dy(static_cast<size_t>(c.M * c.d));
  std::normal_distribution<float> nd(0.f, 1.f);
  for (auto& v : dy) v = nd(ffntest::rng());
  const float lambda = 0.05f;
  const Grads ref = ref_train(p, dy, lambda);

  FfnLayerConfig cfg;
  cfg.d_model = c.d;
  cfg.d_ff = c.F;
  cfg.gated = true;
  cfg.dtype = DType::F32;
  cfg.twell = {c.T, c.C};
  FfnLayer layer(cfg, p.gate.data(), p.up.data(), p.down.data(), nullptr, nullptr);
  FfnTrainer trainer(layer);
  HybridParams hp;
  hp.ell_width = c.W;
  hp.l1 = lambda;
  hp.twell = cfg.twell;
  char what[160];
  std::snprintf(what, sizeof what, "M=%lld d=%lld F=%lld rho=%.3f heavy=%d W=%d T=%d C=%d", (long long)c.M,
                (long long)c.d, (long long)c.F, c.density, c.heavy_every, c.W, c.T, c.C);
  const size_t n = static_cast<size_t>(c.M * c.d), wn = static_cast<size_t>(c.F * c.d);
  std::vector<float> y(n), dx(n), dg(wn), du(wn), dd(wn);
  int64_t dense_saved = 0;
  std::vector<float> first_dx;
  for (int threads : {1, 2}) {
    set_num_threads(threads);
    for (TrainMode mode : {TrainMode::Dense, TrainMode::Hybrid}) {
      std::fill(y.begin(), y.end(), NAN);
      std::fill(dx.begin(), dx.end(), NAN);
      std::fill(dg.begin(), dg.end(), NAN);
      const TrainStepStats s = trainer.step(p.x.data(), dy.data(), c.M, mode, hp, y.data(), dx.data());
      trainer.export_grads(dg.data(), du.data(), dd.data());
      const char* mname = mode == TrainMode::Dense ? "dense" : "hybrid";
      const struct { const char* name; const std::vector<float>* got; const std::vector<double>* want; } outs[] = {
          {"y", &y, &ref.y}, {"dx", &dx, &ref.dx}, {"dW_gate", &dg, &ref.dgate}, {"dW_up", &du, &ref.dup}, {"dW_down", &dd, &ref.ddown}};
      for (const auto& o : outs) {
        const double err = check::rel_error(o.got->data(), o.want->data(), o.got->size());
        CHECK(err <= kTol, "%s %s threads %d: %s rel error %.3g", what, mname, threads, o.name, err);
      }
      CHECK(std::fabs(s.l1 - ref.l1) <= 1e-5 * std::max(ref.l1, 1e-30), "%s %s: l1 %.9g vs %.9g", what, mname, s.l1, ref.l1);
      if (mode == TrainMode::Dense) dense_saved = s.saved_bytes;
      else {
        int64_t tails = 0, nnz = 0;
        std::vector<double> z = ffntest::ref_linear(p.x, c.M, c.d, p.gate, c.F, nullptr);
        for (int64_t m = 0; m < c.M; ++m) {
          int64_t r = 0;
          for (int64_t j = 0; j < c.F; ++j) r += z[static_cast<size_t>(m * c.F + j)] > 0;
          tails += r > c.W;
          nnz += r;
        }
        CHECK(s.tail_rows == tails, "%s: %lld tail rows, expected %lld", what, (long long)s.tail_rows, (long long)tails);
        CHECK(s.sparsity.nnz == nnz, "%s: nnz %lld, expected %lld", what, (long long)s.sparsity.nnz, (long long)nnz);
        if (tails) *saw_tail = true;
        // A tail row keeps as much as a dense row, so the 4x saving is claimed only without tails.
        if (c.density <= 0.05 && c.W <= 32 && !c.heavy_every && tails == 0)
          CHECK(s.saved_bytes * 4 < dense_saved, "%s: hybrid keeps %lld bytes, dense %lld", what, (long long)s.saved_bytes,
                (long long)dense_saved);
        if (first_dx.empty()) first_dx = dx;
        else {
          std::vector<double> f(first_dx.begin(), first_dx.end());
          const double e = check::rel_error(dx.data(), f.data(), dx.size());
          // Per-thread dx partials are summed in another order: f32 rounding over F terms, ~1e-7·sqrt(F).
          CHECK(e <= 1e-5, "%s: hybrid dx threads 1 vs 2 differ by %.3g", what, e);
        }
      }
    }
  }
}

}  // namespace

int main() {
  finite_difference_check();
  const Isa best = active_isa();
  bool saw_tail = false;
  const Case cases[] = {
      {1, 37, 300, 0.05, 0, 128, 64, 8},   {7, 37, 300, 0.005, 3, 8, 64, 8},  {33, 37, 300, 0.05, 5, 16, 64, 8},
      {33, 48, 300, 0.2, 4, 128, 256, 8},  {7, 37, 300, 1.0, 0, 128, 64, 8},  {12, 16, 130, 0.05, 0, 16, 16, 4},
      {33, 37, 300, 0.05, 0, 32, 64, 8},
  };
  for (int isa = static_cast<int>(best); isa >= 0; --isa) {
    set_isa_limit(static_cast<Isa>(isa));
    std::fprintf(stderr, "isa %s\n", isa_name(active_isa()));
    for (const Case& c : cases) run_case(c, &saw_tail);
  }
  set_isa_limit(best);
  CHECK(saw_tail, "no row exceeded the ELL width: the tail path went untested");
  return check::finish("test_hybrid");
}
