// Whole-model training engine (sparsellm/train.h) against a float64 forward written here from
// the definitions (independent of the engine's code): the engine's loss must match it, and the
// engine's f32 analytic gradient must match central finite differences of the float64 loss.
// Also: the Hybrid FFN path gives the same gradient as the dense path; a fixed batch is
// overfit; bad inputs are rejected.
//
// Tolerances. Loss: 1e-5 relative (f32 sums of a few hundred terms, eps_f32·sqrt(n) ≈ 1e-6).
// Gradient vs finite differences (float64 loss, central, step 1e-5): truncation error O(step²)
// ≈ 1e-10 and rounding ≈ 1e-16/1e-5, so the comparison measures the f32 gradient, whose
// relative error (Frobenius over the sampled coordinates) should be ~1e-6..1e-5; we require
// 2e-4. A wrong term (a missing backward path, a sign, a transposition) gives O(1e-1) or more.
// Hybrid vs dense gradient: same f32 math in a different order; we require 1e-5 relative.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

#include "../src/cpu/train_ops.h"
#include "check.h"
#include "sparsellm/cpu_info.h"
#include "sparsellm/train.h"

using namespace sparsellm;

namespace {

struct Tiny {
  TrainModelConfig cfg;
  int64_t B = 2, T = 7;
};

// float64 forward of the model over the engine's flat parameter layout (see train.h).
double ref_loss(const Tiny& tc, const std::vector<double>& w, const std::vector<int32_t>& tok, double lambda) {
  const TrainModelConfig& c = tc.cfg;
  const int64_t d = c.d_model, F = c.d_ff, V = c.vocab, H = c.n_heads, hd = d / H, B = tc.B, T = tc.T, M = B * T;
  int64_t off = 0;
  auto take = [&](int64_t n) { const int64_t o = off; off += n; return o; };
  const int64_t emb = take(V * d);
  std::vector<double> x(static_cast<size_t>(M * d));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t i = 0; i < d; ++i) x[(b * T + t) * d + i] = w[emb + tok[b * (T + 1) + t] * d + i];
  auto rms = [&](const std::vector<double>& in, int64_t wo) {
    std::vector<double> y(in.size());
    for (int64_t m = 0; m < M; ++m) {
      double ss = 0;
      for (int64_t i = 0; i < d; ++i) ss += in[m * d + i] * in[m * d + i];
      const double r = 1.0 / std::sqrt(ss / d + c.norm_eps);
      for (int64_t i = 0; i < d; ++i) y[m * d + i] = in[m * d + i] * r * w[wo + i];
    }
    return y;
  };
  auto lin = [&](const std::vector<double>& in, int64_t wo, int64_t dout, int64_t din) {
    std::vector<double> y(static_cast<size_t>(M * dout), 0.0);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t o = 0; o < dout; ++o) {
        double a = 0;
        for (int64_t i = 0; i < din; ++i) a += in[m * din + i] * w[wo + o * din + i];
        y[m * dout + o] = a;
      }
    return y;
  };
  auto rope = [&](std::vector<double>& q) {
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t h = 0; h < H; ++h)
          for (int64_t i = 0; i < hd / 2; ++i) {
            const double ang = t * std::pow(c.rope_theta, -2.0 * i / hd);
            double& a = q[(b * T + t) * d + h * hd + i];
            double& e = q[(b * T + t) * d + h * hd + i + hd / 2];
            const double a0 = a, e0 = e;
            a = a0 * std::cos(ang) - e0 * std::sin(ang);
            e = e0 * std::cos(ang) + a0 * std::sin(ang);
          }
  };
  double l1_total = 0;
  for (int64_t l = 0; l < c.n_layers; ++l) {
    const int64_t an = take(d), wq = take(d * d), wk = take(d * d), wv = take(d * d), wo = take(d * d);
    const int64_t fn = take(d), gate = take(F * d), ud = take(2 * F * d);
    std::vector<double> xn = rms(x, an);
    std::vector<double> q = lin(xn, wq, d, d), k = lin(xn, wk, d, d), v = lin(xn, wv, d, d);
    rope(q);
    rope(k);
    std::vector<double> att(static_cast<size_t>(M * d), 0.0);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t t = 0; t < T; ++t) {
          std::vector<double> s(static_cast<size_t>(t + 1));
          double mx = -1e300;
          for (int64_t u = 0; u <= t; ++u) {
            double a = 0;
            for (int64_t i = 0; i < hd; ++i) a += q[(b * T + t) * d + h * hd + i] * k[(b * T + u) * d + h * hd + i];
            s[u] = a / std::sqrt(static_cast<double>(hd));
            mx = std::max(mx, s[u]);
          }
          double sum = 0;
          for (auto& e : s) sum += (e = std::exp(e - mx));
          for (int64_t u = 0; u <= t; ++u)
            for (int64_t i = 0; i < hd; ++i) att[(b * T + t) * d + h * hd + i] += s[u] / sum * v[(b * T + u) * d + h * hd + i];
        }
    std::vector<double> o = lin(att, wo, d, d);
    for (size_t i = 0; i < x.size(); ++i) x[i] += o[i];
    xn = rms(x, fn);
    double l1 = 0;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < F; ++j) {
        double g = 0, u = 0;
        for (int64_t i = 0; i < d; ++i) {
          g += xn[m * d + i] * w[gate + j * d + i];
          u += xn[m * d + i] * w[ud + j * 2 * d + i];
        }
        const double h = (g > 0 ? g : 0) * u;
        l1 += std::fabs(h);
        for (int64_t i = 0; i < d; ++i) x[m * d + i] += h * w[ud + j * 2 * d + d + i];
      }
    l1_total += l1 / M;
  }
  const int64_t fnorm = take(d);
  std::vector<double> xf = rms(x, fnorm);
  std::vector<double> logits = lin(xf, emb, V, d);
  double ce = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const double* lg = logits.data() + (b * T + t) * V;
      double mx = *std::max_element(lg, lg + V), sum = 0;
      for (int64_t i = 0; i < V; ++i) sum += std::exp(lg[i] - mx);
      ce += std::log(sum) + mx - lg[tok[b * (T + 1) + t + 1]];
    }
  return ce / M + lambda * l1_total / c.n_layers;
}

std::vector<int32_t> random_tokens(std::mt19937_64& rng, int64_t n, int64_t V) {
  std::uniform_int_distribution<int32_t> u(0, static_cast<int32_t>(V - 1));
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = u(rng);
  return t;
}

// Makes the weights less uniform than the init: random norms and a larger scale so that the
// attention, the norms and the FFN all carry gradient of comparable size.
void perturb(Trainer& tr, std::mt19937_64& rng) {
  std::normal_distribution<float> nd(0.f, 0.3f);
  for (auto& w : tr.params()) w += nd(rng);
}

void gradient_check(FfnTrainPath path, double lambda) {
  std::mt19937_64 rng(check::test_seed() + static_cast<uint64_t>(path) * 31);
  Tiny tc;
  tc.cfg.vocab = 37;
  tc.cfg.d_model = 16;
  tc.cfg.n_layers = 2;
  tc.cfg.n_heads = 2;
  tc.cfg.d_ff = 40;
  tc.cfg.context = 9;
  TrainHyper hp;
  hp.l1 = static_cast<float>(lambda);
  hp.ffn_path = path;
  hp.ell_width = 9;  // some rows overflow into the hybrid tail
  hp.seed = rng();
  Trainer tr(tc.cfg, hp);
  tr.init_weights();
  perturb(tr, rng);
  const std::vector<int32_t> tok = random_tokens(rng, tc.B * (tc.T + 1), tc.cfg.vocab);
  // Hybrid is applied by step(); for accumulate() set the state directly.
  for (auto& h : tr.state().hybrid) h = path == FfnTrainPath::Hybrid;
  tr.zero_grad();
  const StepStats s = tr.accumulate(tok.data(), tc.B, tc.T, 1.0);
  std::vector<double> w(tr.params().begin(), tr.params().end());
  const double ref = ref_loss(tc, w, tok, lambda);
  CHECK(std::fabs(s.loss - ref) <= 1e-5 * std::fabs(ref), "path %d: loss %.9g vs float64 %.9g", int(path), s.loss, ref);
  // Sample coordinates from every parameter region.
  const size_t n = w.size();
  std::vector<size_t> idx;
  for (size_t i = 0; i < 400; ++i) idx.push_back(static_cast<size_t>(rng() % n));
  // Central differences at h and h/10: where they disagree, a ReLU or |h| kink lies within h of
  // the point (the loss is not differentiable across it; smooth points agree to ~1e-9), and the
  // coordinate is left out. At most a tenth of them may be.
  std::vector<double> fd, an;
  const double hstep = 1e-5;
  auto central = [&](size_t i, double h) {
    const double w0 = w[i];
    w[i] = w0 + h;
    const double lp = ref_loss(tc, w, tok, lambda);
    w[i] = w0 - h;
    const double lm = ref_loss(tc, w, tok, lambda);
    w[i] = w0;
    return (lp - lm) / (2 * h);
  };
  size_t kinks = 0;
  for (size_t i : idx) {
    const double d1 = central(i, hstep), d2 = central(i, hstep / 10);
    if (std::fabs(d1 - d2) > 1e-6 * (1 + std::fabs(d2))) {
      ++kinks;
      continue;
    }
    fd.push_back(d2);
    an.push_back(tr.grads()[i]);
  }
  CHECK(kinks * 10 <= idx.size(), "path %d: %zu of %zu sampled coordinates straddle a kink", int(path), kinks, idx.size());
  const double err = check::rel_error(an.data(), fd.data(), fd.size());
  double nrm = 0;
  for (double v : fd) nrm += v * v;
  std::fprintf(stderr, "  path %d λ=%g: loss %.6f, gradient rel. error %.2e (|fd| %.3e, %zu kinks left out)\n", int(path),
               lambda, s.loss, err, std::sqrt(nrm), kinks);
  CHECK(err <= 2e-4, "path %d: gradient vs finite differences rel. error %.3e", int(path), err);
}

void hybrid_equals_dense() {
  std::mt19937_64 rng(check::test_seed() + 5);
  TrainModelConfig c;
  c.vocab = 51;
  c.d_model = 24;
  c.n_layers = 2;
  c.n_heads = 3;
  c.d_ff = 300;
  c.context = 13;
  TrainHyper hp;
  hp.l1 = 0.05f;
  hp.ell_width = 150;  // about half of the 300 neurons fire: rows on both sides of W
  hp.seed = rng();
  Trainer dense(c, hp), hyb(c, hp);
  dense.init_weights();
  perturb(dense, rng);
  hyb.params() = dense.params();
  const std::vector<int32_t> tok = random_tokens(rng, 3 * 14, c.vocab);
  for (auto& h : hyb.state().hybrid) h = 1;
  dense.zero_grad();
  hyb.zero_grad();
  const StepStats sd = dense.accumulate(tok.data(), 3, 13, 0.5);
  const StepStats sh = hyb.accumulate(tok.data(), 3, 13, 0.5);
  std::vector<double> ref(dense.grads().begin(), dense.grads().end());
  const double err = check::rel_error(hyb.grads().data(), ref.data(), ref.size());
  int64_t tail = 0;
  for (auto& l : sh.layers) tail += l.tail_rows;
  std::fprintf(stderr, "  hybrid vs dense gradient rel. error %.2e (tail rows %lld, nnz/token %.1f)\n", err,
               static_cast<long long>(tail), double(sh.layers[0].nnz) / sh.layers[0].tokens);
  CHECK(err <= 1e-5, "hybrid vs dense gradient rel. error %.3e", err);
  CHECK(std::fabs(sd.loss - sh.loss) <= 1e-6 * std::fabs(sd.loss), "loss %.9g vs %.9g", sd.loss, sh.loss);
  CHECK(tail > 0 && tail < 3 * 13 * 2, "the test must exercise both ELL and tail rows (tail %lld)", static_cast<long long>(tail));
}

void overfit() {
  std::mt19937_64 rng(check::test_seed() + 9);
  TrainModelConfig c;
  c.vocab = 29;
  c.d_model = 32;
  c.n_layers = 2;
  c.n_heads = 4;
  c.d_ff = 96;
  c.context = 16;
  TrainHyper hp;
  hp.seed = rng();
  hp.l1 = 1e-3f;
  hp.recheck_steps = 5;
  hp.hybrid_cutoff = 1e9;  // switch to hybrid at step 5: the run crosses both paths
  hp.dead_window = 64;
  Trainer tr(c, hp);
  tr.init_weights();
  const std::vector<int32_t> tok = random_tokens(rng, 2 * 2 * 17, c.vocab);
  double first = 0, last = 0;
  bool saw_hybrid = false;
  for (int i = 0; i < 60; ++i) {
    const StepStats s = tr.step(tok.data(), 2, 2, 16, 1e-2f);
    if (i == 0) first = s.ce;
    last = s.ce;
    saw_hybrid = saw_hybrid || s.layers[0].hybrid;
  }
  std::fprintf(stderr, "  overfit: ce %.4f -> %.4f\n", first, last);
  CHECK(last < 0.2 * first, "fixed batch not overfit: %.4f -> %.4f", first, last);
  CHECK(saw_hybrid, "auto path never switched to hybrid");
}

// One step() against AdamW written here in float64 from the gradient of accumulate(): clipping
// to the global norm, bias corrections, decoupled decay on every tensor but the norms.
// Tolerance 1e-6 absolute on weights of size ~0.3 after an update of size lr (f32 rounding).
void adamw_step() {
  std::mt19937_64 rng(check::test_seed() + 13);
  TrainModelConfig c;
  c.vocab = 19;
  c.d_model = 8;
  c.n_layers = 1;
  c.n_heads = 2;
  c.d_ff = 12;
  c.context = 6;
  TrainHyper hp;
  hp.seed = rng();
  hp.clip = 0.5f;
  hp.weight_decay = 0.1f;
  hp.ffn_path = FfnTrainPath::Dense;
  Trainer a(c, hp), b(c, hp);
  a.init_weights();
  perturb(a, rng);
  b.params() = a.params();
  const std::vector<int32_t> tok = random_tokens(rng, 2 * 7, c.vocab);
  const float lr = 0.01f;
  for (int it = 0; it < 2; ++it) {
    b.zero_grad();
    b.accumulate(tok.data(), 2, 6, 1.0);
    std::vector<double> g(b.grads().begin(), b.grads().end());
    double nrm = 0;
    for (double v : g) nrm += v * v;
    nrm = std::sqrt(nrm);
    const double sc = nrm > hp.clip ? hp.clip / nrm : 1.0;
    const double t = it + 1;
    const double c1 = 1 - std::pow(0.9, t), c2 = 1 - std::pow(0.95, t);
    const int64_t d = c.d_model;
    const int64_t attn_norm = c.vocab * d, ffn_norm = attn_norm + d + 4 * d * d;
    const int64_t final_norm = static_cast<int64_t>(g.size()) - d;
    std::vector<double> expect(g.size());
    for (size_t i = 0; i < g.size(); ++i) {
      const int64_t ii = static_cast<int64_t>(i);
      const bool norm = (ii >= attn_norm && ii < attn_norm + d) || (ii >= ffn_norm && ii < ffn_norm + d) || ii >= final_norm;
      const double gi = g[i] * sc;
      const double m = 0.9 * b.moment1()[i] + 0.1 * gi;
      const double v = 0.95 * b.moment2()[i] + 0.05 * gi * gi;
      b.moment1()[i] = static_cast<float>(m);
      b.moment2()[i] = static_cast<float>(v);
      expect[i] = b.params()[i] - lr * ((m / c1) / (std::sqrt(v / c2) + 1e-8) + (norm ? 0.0 : 0.1 * b.params()[i]));
      b.params()[i] = static_cast<float>(expect[i]);
    }
    const StepStats s = a.step(tok.data(), 1, 2, 6, lr);
    CHECK(std::fabs(s.grad_norm - nrm) <= 1e-5 * nrm, "grad norm %.8g vs %.8g", s.grad_norm, nrm);
    double worst = 0;
    for (size_t i = 0; i < g.size(); ++i) worst = std::max(worst, std::fabs(a.params()[i] - expect[i]));
    CHECK(worst <= 1e-6, "AdamW step %d: max weight difference %.3e", it, worst);
  }
}

// Dead neurons: gate rows set to zero never fire (relu(0) = 0 is inactive); after a window they
// are counted dead, and with reinit_dead their gate rows are redrawn and their moments zeroed.
void dead_neurons() {
  std::mt19937_64 rng(check::test_seed() + 17);
  TrainModelConfig c;
  c.vocab = 23;
  c.d_model = 16;
  c.n_layers = 2;
  c.n_heads = 2;
  c.d_ff = 24;
  c.context = 8;
  for (int reinit = 0; reinit < 2; ++reinit) {
    TrainHyper hp;
    hp.seed = rng();
    hp.dead_window = 3 * 2 * 8;  // three steps of 2 sequences of 8
    hp.reinit_dead = reinit != 0;
    hp.weight_decay = 0.f;
    Trainer tr(c, hp);
    tr.init_weights();
    std::vector<float> zero(static_cast<size_t>(c.d_ff * c.d_model));
    tr.get_tensor("model.layers.1.mlp.gate_proj.weight", zero.data());
    for (int j : {3, 11, 20})
      for (int64_t i = 0; i < c.d_model; ++i) zero[static_cast<size_t>(j * c.d_model + i)] = 0.f;
    tr.set_tensor("model.layers.1.mlp.gate_proj.weight", zero.data());
    const std::vector<int32_t> tok = random_tokens(rng, 2 * 9, c.vocab);
    StepStats s;
    int64_t reinitialised = 0;
    for (int i = 0; i < 3; ++i) {
      s = tr.step(tok.data(), 1, 2, 8, 1e-3f);
      reinitialised += s.reinitialised;
    }
    CHECK(s.layers[1].dead >= 3, "layer 1: %lld dead, expected the 3 zeroed neurons at least", static_cast<long long>(s.layers[1].dead));
    std::vector<float> g(zero.size());
    tr.get_tensor("model.layers.1.mlp.gate_proj.weight", g.data());
    double row = 0;
    for (int64_t i = 0; i < c.d_model; ++i) row += std::fabs(g[static_cast<size_t>(11 * c.d_model + i)]);
    if (reinit) {
      CHECK(reinitialised >= 3 && row > 0, "reinit_dead: %lld rows re-initialised, |row 11| = %g", static_cast<long long>(reinitialised), row);
    } else {
      CHECK(reinitialised == 0 && row == 0, "without reinit_dead: row 11 changed (|row| %g)", row);
    }
  }
}

void bad_inputs() {
  TrainModelConfig c;
  c.vocab = 10;
  c.d_model = 8;
  c.n_layers = 1;
  c.n_heads = 2;
  c.d_ff = 8;
  c.context = 4;
  TrainHyper hp;
  Trainer tr(c, hp);
  tr.init_weights();
  std::vector<int32_t> tok(5, 3);
  bool threw = false;
  try {
    tr.step(tok.data(), 1, 1, 5, 1e-3f);  // T > context
  } catch (const std::invalid_argument&) { threw = true; }
  CHECK(threw, "sequence longer than the context accepted");
  tok[2] = 10;
  threw = false;
  try {
    tr.step(tok.data(), 1, 1, 4, 1e-3f);
  } catch (const std::invalid_argument&) { threw = true; }
  CHECK(threw, "token outside the vocabulary accepted");
  threw = false;
  try {
    TrainModelConfig bad = c;
    bad.n_heads = 3;
    Trainer t2(bad, hp);
  } catch (const std::invalid_argument&) { threw = true; }
  CHECK(threw, "d_model not a multiple of heads accepted");
  // tensor round trip through the standard layouts
  std::vector<float> down(8 * 8), back(8 * 8);
  tr.get_tensor("model.layers.0.mlp.down_proj.weight", down.data());
  for (auto& v : down) v += 1.f;
  tr.set_tensor("model.layers.0.mlp.down_proj.weight", down.data());
  tr.get_tensor("model.layers.0.mlp.down_proj.weight", back.data());
  CHECK(down == back, "down_proj round trip differs");
  threw = false;
  try {
    tr.get_tensor("model.layers.1.mlp.up_proj.weight", back.data());
  } catch (const std::invalid_argument&) { threw = true; }
  CHECK(threw, "tensor of a missing layer accepted");
}


// The training attention kernels (train_attention*.cpp) against float64 loops written here, on
// awkward shapes (sequence lengths not multiples of the 8-row blocks or 16-lane vectors, head
// widths 6, 18, 64, row strides wider than H·hd as in a fused q/k/v buffer), for every ISA the
// CPU has, and with 1 and 2 threads (each (sequence, head) is computed by one thread in a fixed
// order, so the results must be bitwise equal).
// Tolerance 2e-6 relative (Frobenius) per output: every value is an f32 dot product of at most
// T ≤ 70 or hd ≤ 64 terms of O(1) inputs (eps_f32·sqrt(70) ≈ 1e-6 at worst, typically less), and
// the exponential is accurate to a few 1e-8; a wrong causal bound or index gives O(1e-1).
void attention_kernels() {
  struct Shape { int64_t B, T, H, hd, pad; };
  const Shape shapes[] = {{2, 13, 3, 6, 0}, {1, 37, 2, 18, 5}, {1, 70, 2, 64, 16}, {3, 1, 2, 4, 0}, {1, 9, 1, 2, 3}};
  std::mt19937_64 rng(check::test_seed() + 41);
  std::normal_distribution<float> nd(0.f, 1.f);
  const Isa best = active_isa();
  const int threads0 = num_threads();
  double worst = 0;
  for (const Shape& sh : shapes) {
    const int64_t B = sh.B, T = sh.T, H = sh.H, hd = sh.hd, D = H * hd, M = B * T;
    const int64_t ld_in = 3 * D + sh.pad, ld_out = D + sh.pad, ld_grad = 3 * D + 1;
    std::vector<float> qkv(static_cast<size_t>(M * ld_in)), dout(static_cast<size_t>(M * ld_out));
    for (auto& x : qkv) x = nd(rng);
    for (auto& x : dout) x = nd(rng);
    const float *q = qkv.data(), *k = qkv.data() + D, *v = qkv.data() + 2 * D;
    // float64 reference
    std::vector<double> P(static_cast<size_t>(B * H * T * T), 0.0), out(static_cast<size_t>(M * D), 0.0),
        dq(static_cast<size_t>(M * D), 0.0), dk(dq.size(), 0.0), dv(dq.size(), 0.0);
    const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) {
        auto at = [&](const float* x, int64_t ld, int64_t t, int64_t i) { return static_cast<double>(x[(b * T + t) * ld + h * hd + i]); };
        double* Pb = P.data() + (b * H + h) * T * T;
        for (int64_t t = 0; t < T; ++t) {
          double mx = -1e300;
          for (int64_t s = 0; s <= t; ++s) {
            double a = 0;
            for (int64_t i = 0; i < hd; ++i) a += at(q, ld_in, t, i) * at(k, ld_in, s, i);
            Pb[t * T + s] = a * scale;
            mx = std::max(mx, Pb[t * T + s]);
          }
          double sum = 0;
          for (int64_t s = 0; s <= t; ++s) sum += (Pb[t * T + s] = std::exp(Pb[t * T + s] - mx));
          for (int64_t s = 0; s <= t; ++s) Pb[t * T + s] /= sum;
          for (int64_t s = 0; s <= t; ++s)
            for (int64_t i = 0; i < hd; ++i) out[(b * T + t) * D + h * hd + i] += Pb[t * T + s] * at(v, ld_in, s, i);
          std::vector<double> dS(static_cast<size_t>(t + 1));
          double rs = 0;
          for (int64_t s = 0; s <= t; ++s) {
            double a = 0;
            for (int64_t i = 0; i < hd; ++i) a += at(dout.data(), ld_out, t, i) * at(v, ld_in, s, i);
            dS[static_cast<size_t>(s)] = a;
            rs += a * Pb[t * T + s];
          }
          for (int64_t s = 0; s <= t; ++s) {
            const double g = Pb[t * T + s] * (dS[static_cast<size_t>(s)] - rs) * scale;
            for (int64_t i = 0; i < hd; ++i) {
              dq[(b * T + t) * D + h * hd + i] += g * at(k, ld_in, s, i);
              dk[(b * T + s) * D + h * hd + i] += g * at(q, ld_in, t, i);
              dv[(b * T + s) * D + h * hd + i] += Pb[t * T + s] * at(dout.data(), ld_out, t, i);
            }
          }
        }
      }
    std::vector<float> first;
    for (Isa isa : {Isa::Portable, Isa::Avx2, Isa::Avx512}) {
      if (static_cast<int>(isa) > static_cast<int>(best)) continue;
      set_isa_limit(isa);
      for (int threads : {1, 2}) {
        set_num_threads(threads);
        std::vector<float> Pk(P.size(), 7.f), outk(static_cast<size_t>(M * ld_out), 7.f), grads(static_cast<size_t>(M * ld_grad), 7.f);
        float *dqk = grads.data(), *dkk = grads.data() + D, *dvk = grads.data() + 2 * D;
        trainops::attention_forward(q, k, v, ld_in, B, T, H, hd, Pk.data(), outk.data(), ld_out);
        trainops::attention_backward(q, k, v, ld_in, Pk.data(), dout.data(), ld_out, B, T, H, hd, dqk, dkk, dvk, ld_grad);
        auto strided = [&](const float* x, int64_t ld) {
          std::vector<float> c(static_cast<size_t>(M * D));
          for (int64_t m = 0; m < M; ++m) std::memcpy(c.data() + m * D, x + m * ld, sizeof(float) * static_cast<size_t>(D));
          return c;
        };
        const std::vector<float> o = strided(outk.data(), ld_out), gq = strided(dqk, ld_grad), gk = strided(dkk, ld_grad),
                                 gv = strided(dvk, ld_grad);
        // Only the causal part of P is specified (the kernels zero what they read above the diagonal).
        for (int64_t bh = 0; bh < B * H; ++bh)
          for (int64_t t = 0; t < T; ++t)
            for (int64_t s2 = t + 1; s2 < T; ++s2) Pk[static_cast<size_t>((bh * T + t) * T + s2)] = 0.f;
        const double e[5] = {check::rel_error(Pk.data(), P.data(), P.size()), check::rel_error(o.data(), out.data(), out.size()),
                             check::rel_error(gq.data(), dq.data(), dq.size()), check::rel_error(gk.data(), dk.data(), dk.size()),
                             check::rel_error(gv.data(), dv.data(), dv.size())};
        const char* names[5] = {"P", "out", "dq", "dk", "dv"};
        for (int i = 0; i < 5; ++i) worst = std::max(worst, e[i]);
        for (int i = 0; i < 5; ++i)
          CHECK(e[i] <= 2e-6, "attention %s (B %lld T %lld H %lld hd %lld, %s, %d threads): rel. error %.3e", names[i],
                static_cast<long long>(B), static_cast<long long>(T), static_cast<long long>(H), static_cast<long long>(hd),
                isa_name(isa), threads, e[i]);
        // Columns outside the heads must be untouched (strided outputs).
        bool untouched = true;
        for (int64_t m = 0; m < M; ++m) {
          for (int64_t c = D; c < ld_out; ++c) untouched = untouched && outk[static_cast<size_t>(m * ld_out + c)] == 7.f;
          for (int64_t c = 3 * D; c < ld_grad; ++c) untouched = untouched && grads[static_cast<size_t>(m * ld_grad + c)] == 7.f;
        }
        CHECK(untouched, "attention wrote outside its heads (%s)", isa_name(isa));
        std::vector<float> all = o;
        for (const auto* g : {&gq, &gk, &gv}) all.insert(all.end(), g->begin(), g->end());
        if (threads == 1) first = all;
        else CHECK(all == first, "attention: 1 and 2 threads differ (%s)", isa_name(isa));
      }
    }
    set_isa_limit(best);
    set_num_threads(threads0);
  }
  std::fprintf(stderr, "  attention kernels: worst rel. error %.2e (up to %s)\n", worst, isa_name(best));
}

// The blocked transposes (portable loops and 16×16 register tiles) must be exact copies, on shapes
// with and without 16-multiples and with leading dimensions wider than the rows.
void transposes() {
  std::mt19937_64 rng(check::test_seed() + 43);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  const Isa best = active_isa();
  const int64_t shapes[][2] = {{1, 1}, {16, 16}, {17, 33}, {64, 64}, {100, 37}, {130, 200}, {3, 300}, {300, 5}};
  for (Isa isa : {Isa::Portable, Isa::Avx512}) {
    if (static_cast<int>(isa) > static_cast<int>(best)) continue;
    set_isa_limit(isa);
    for (const auto& sh : shapes) {
      const int64_t R = sh[0], C = sh[1], ldi = C + 3, ldo = R + 2;
      std::vector<float> in(static_cast<size_t>(R * ldi)), out(static_cast<size_t>(C * ldo), 9.f);
      for (auto& x : in) x = u(rng);
      trainops::transpose(in.data(), ldi, R, C, out.data(), ldo);
      bool ok = true;
      for (int64_t r = 0; r < R; ++r)
        for (int64_t c = 0; c < C; ++c) ok = ok && out[static_cast<size_t>(c * ldo + r)] == in[static_cast<size_t>(r * ldi + c)];
      for (int64_t c = 0; c < C; ++c)
        for (int64_t r = R; r < ldo; ++r) ok = ok && out[static_cast<size_t>(c * ldo + r)] == 9.f;
      CHECK(ok, "transpose %lldx%lld (%s) differs from the element copy", static_cast<long long>(R), static_cast<long long>(C),
            isa_name(isa));
    }
  }
  set_isa_limit(best);
}

// step() does not zero the gradients first: the first micro-batch of a step overwrites every
// gradient. Garbage (NaN) left in grads() before a step must therefore change nothing: two
// trainers, one poisoned before each step, stay bitwise equal over steps of 1 and 2 micro-batches
// on both FFN paths (a region the first micro-batch only added to would turn the weights NaN).
void step_overwrites_gradients() {
  std::mt19937_64 rng(check::test_seed() + 47);
  TrainModelConfig c;
  c.vocab = 31;
  c.d_model = 24;
  c.n_layers = 2;
  c.n_heads = 3;
  c.d_ff = 40;
  c.context = 10;
  for (FfnTrainPath path : {FfnTrainPath::Dense, FfnTrainPath::Hybrid}) {
    TrainHyper hp;
    hp.seed = rng();
    hp.ffn_path = path;
    hp.l1 = 0.01f;
    hp.ell_width = 12;
    Trainer a(c, hp), b(c, hp);
    a.init_weights();
    perturb(a, rng);
    b.params() = a.params();
    for (int it = 0; it < 3; ++it) {
      const int64_t micro = 1 + it % 2;
      const std::vector<int32_t> tok = random_tokens(rng, micro * 2 * 11, c.vocab);
      std::fill(b.grads().begin(), b.grads().end(), NAN);
      const StepStats sa = a.step(tok.data(), micro, 2, 10, 1e-2f);
      const StepStats sb = b.step(tok.data(), micro, 2, 10, 1e-2f);
      CHECK(sa.grad_norm == sb.grad_norm && std::isfinite(sb.grad_norm), "path %d step %d: grad norm %.9g vs %.9g",
            int(path), it, sa.grad_norm, sb.grad_norm);
      CHECK(a.params() == b.params(), "path %d step %d: weights differ after a step from poisoned gradients", int(path), it);
    }
  }
}

}  // namespace

int main() {
  attention_kernels();
  transposes();
  step_overwrites_gradients();
  gradient_check(FfnTrainPath::Dense, 0.0);
  gradient_check(FfnTrainPath::Dense, 0.03);
  gradient_check(FfnTrainPath::Hybrid, 0.03);
  hybrid_equals_dense();
  adamw_step();
  dead_neurons();
  overfit();
  bad_inputs();
  // The norms, the sum of squares, AdamW and the transposes have per-ISA builds: the whole-model
  // checks again under each lower ISA the CPU has.
  const Isa best = active_isa();
  for (Isa isa : {Isa::Portable, Isa::Avx2}) {
    if (static_cast<int>(isa) >= static_cast<int>(best)) continue;
    set_isa_limit(isa);
    std::fprintf(stderr, "  under %s:\n", isa_name(isa));
    gradient_check(FfnTrainPath::Dense, 0.03);
    gradient_check(FfnTrainPath::Hybrid, 0.03);
    adamw_step();
  }
  set_isa_limit(best);
  return check::finish("test_train");
}
