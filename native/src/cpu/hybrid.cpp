// Hybrid (ELL + dense tail) training kernels of the gated FFN, the dense reference forward and
// backward, and FfnTrainer (sparsellm/hybrid.h). f32 weights and activations.
#include "sparsellm/hybrid.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>

#include "ffn_kernels.h"
#include "sparsellm/cpu_info.h"
#include "sparsellm/gemm.h"
#include "train_hybrid.h"
#include "train_ops.h"

namespace sparsellm {

int hybrid_neuron_pass_avx512(const HybridNeuronPass& a, int nthreads);
int hybrid_neuron_pass_avx2(const HybridNeuronPass& a, int nthreads);

namespace detail {
int64_t gather_row(const Twell& g, int64_t m, int32_t* js, float* vs);  // ffn.cpp
}

namespace {

inline float sgn(float v) { return v > 0.f ? 1.f : (v < 0.f ? -1.f : 0.f); }

// out [cols, rows] = in [rows, cols]ᵀ (ld_in >= cols): the training ops' transpose (16×16 register
// tiles on AVX-512), so the dense reference pays no more for its transposes than the rest of the step.
void transpose(const float* in, int64_t ld_in, int64_t rows, int64_t cols, float* out) {
  trainops::transpose(in, ld_in, rows, cols, out, rows);
}

void check_f32(const WeightView& gate, const UpDownView& ud, const char* who) {
  if (gate.dtype != DType::F32 || ud.dtype != DType::F32)
    throw std::invalid_argument(std::string(who) + ": training kernels need f32 weights");
  if (gate.rows != ud.rows || gate.cols != ud.cols)
    throw std::invalid_argument(std::string(who) + ": gate and updown shapes differ");
}

// Growable, uninitialised scratch that keeps its memory between calls (no page faults and no
// zero-filling per training step). Pointers are taken on the calling thread, before any
// parallel region.
template <typename T>
struct Scratch {
  std::unique_ptr<T[]> p;
  size_t n = 0;
  T* get(size_t need) {
    if (!p || need > n) {
      n = std::max<size_t>(need, 1);
      p.reset(new T[n]);
    }
    return p.get();
  }
};

Twell& hybrid_twell() {
  static thread_local Twell tw;
  return tw;
}

}  // namespace

int64_t HybridTape::saved_bytes() const {
  return static_cast<int64_t>(row_nnz.size() * 4 + col.size() * 4 + g.size() * 4 + u.size() * 4 +
                              tail_rows.size() * 4 + tail_g.size() * 4 + tail_u.size() * 4);
}

HybridForwardResult hybrid_forward(const float* x, int64_t M, const WeightView& gate,
                                   const UpDownView& ud, const HybridParams& p, HybridTape& tape,
                                   float* y) {
  check_f32(gate, ud, "hybrid_forward");
  if (p.ell_width < 1) throw std::invalid_argument("hybrid_forward: ELL width must be >= 1");
  const int64_t d = gate.cols, F = gate.rows;
  const int W = p.ell_width;
  const detail::FfnOps& ops = detail::ffn_ops();
  Twell& tw = hybrid_twell();
  HybridForwardResult res;
  res.stats = twell_gate(x, d, M, gate, nullptr, p.twell, tw);

  tape.M = M;
  tape.d = d;
  tape.F = F;
  tape.W = W;
  tape.row_nnz.assign(tw.row_nnz, tw.row_nnz + M);
  tape.col.resize(static_cast<size_t>(M * W));
  tape.g.resize(static_cast<size_t>(M * W));
  tape.u.resize(static_cast<size_t>(M * W));
  tape.tail_rows.clear();
  for (int64_t m = 0; m < M; ++m)
    if (tape.row_nnz[static_cast<size_t>(m)] > W) tape.tail_rows.push_back(static_cast<int32_t>(m));
  const int64_t nt = static_cast<int64_t>(tape.tail_rows.size());
  tape.tail_g.assign(static_cast<size_t>(nt * F), 0.f);
  tape.tail_u.resize(static_cast<size_t>(nt * F));

  // Tail rows: dense up GEMM on their gathered inputs.
  static thread_local Scratch<float> s_xt;
  static thread_local Scratch<int64_t> s_tail_of;
  float* xt = s_xt.get(static_cast<size_t>(nt * d));
  for (int64_t i = 0; i < nt; ++i)
    std::memcpy(xt + i * d, x + tape.tail_rows[static_cast<size_t>(i)] * d, sizeof(float) * d);
  if (nt) gemm(xt, d, nt, ud.up(), tape.tail_u.data(), F);

  int64_t* tail_of = s_tail_of.get(static_cast<size_t>(M));
  std::fill(tail_of, tail_of + M, int64_t{-1});
  for (int64_t i = 0; i < nt; ++i) tail_of[static_cast<size_t>(tape.tail_rows[static_cast<size_t>(i)])] = i;

  double l1 = 0;
  const WeightView down_t = ud.down_t();
#pragma omp parallel num_threads(num_threads()) reduction(+ : l1)
  {
    std::vector<int32_t> js(static_cast<size_t>(F) + 1);
    std::vector<float> vs(static_cast<size_t>(F) + 1), hs(static_cast<size_t>(F) + 1);
#pragma omp for schedule(dynamic, 1)
    for (int64_t m = 0; m < M; ++m) {
      float* ym = y + m * d;
      std::memset(ym, 0, sizeof(float) * d);
      const int64_t ti = tail_of[static_cast<size_t>(m)];
      if (ti < 0) {
        int32_t* cm = tape.col.data() + m * W;
        float* gm = tape.g.data() + m * W;
        float* um = tape.u.data() + m * W;
        const int64_t n = detail::gather_row(tw, m, cm, gm);
        ops.updown(x + m * d, cm, gm, n, ud.data, DType::F32, ud.ld, d, ym, um);
        for (int64_t k = 0; k < n; ++k) l1 += std::fabs(static_cast<double>(gm[k]) * um[k]);
      } else {
        const int64_t n = detail::gather_row(tw, m, js.data(), vs.data());
        float* tg = tape.tail_g.data() + ti * F;
        const float* tu = tape.tail_u.data() + ti * F;
        for (int64_t k = 0; k < n; ++k) {
          tg[js[static_cast<size_t>(k)]] = vs[static_cast<size_t>(k)];
          hs[static_cast<size_t>(k)] = vs[static_cast<size_t>(k)] * tu[js[static_cast<size_t>(k)]];
          l1 += std::fabs(static_cast<double>(hs[static_cast<size_t>(k)]));
        }
        ops.down(js.data(), hs.data(), n, down_t.data, DType::F32, down_t.ld, d, ym);
      }
    }
  }
  res.l1 = M ? l1 / static_cast<double>(M) : 0.0;
  return res;
}

void hybrid_backward(const float* x, const float* dy, const WeightView& gate, const UpDownView& ud,
                     const HybridTape& tape, float l1, float* dx, float* dgate, float* dupdown) {
  check_f32(gate, ud, "hybrid_backward");
  const int64_t M = tape.M, d = tape.d, F = tape.F;
  const int W = tape.W;
  if (gate.rows != F || gate.cols != d) throw std::invalid_argument("hybrid_backward: tape does not match the weights");
  const float lam = M ? l1 / static_cast<float>(M) : 0.f;
  const int64_t nt = static_cast<int64_t>(tape.tail_rows.size());
  const float* up = static_cast<const float*>(ud.data);
  const float* gw = static_cast<const float*>(gate.data);
  const float* dn = static_cast<const float*>(ud.down_t().data);
  const int64_t ldu = 2 * ud.ld, ldg = gate.ld;

  static thread_local Scratch<float> s_dyt, s_dht, s_eg, s_eu, s_dxp;
  static thread_local Scratch<int64_t> s_cs, s_fill;
  static thread_local Scratch<int32_t> s_erow, s_etail;

  // Tail rows: dh = dy · W_down by a dense GEMM over their gathered upstream gradients.
  float* dyt = s_dyt.get(static_cast<size_t>(nt * d));
  float* dht = s_dht.get(static_cast<size_t>(nt * F));
  for (int64_t i = 0; i < nt; ++i)
    std::memcpy(dyt + i * d, dy + tape.tail_rows[static_cast<size_t>(i)] * d, sizeof(float) * d);
  if (nt) gemm(dyt, d, nt, ud.down_t(), dht, F);

  // The pattern transposed (CSC, by a counting sort): for each neuron, its (row, g, u) entries,
  // and for tail entries the index of their dense dh.
  int64_t* cs = s_cs.get(static_cast<size_t>(F) + 1);
  std::fill(cs, cs + F + 1, int64_t{0});
  std::vector<int64_t> tail_of(static_cast<size_t>(M), -1);
  for (int64_t i = 0; i < nt; ++i) tail_of[static_cast<size_t>(tape.tail_rows[static_cast<size_t>(i)])] = i;
  for (int64_t m = 0; m < M; ++m) {
    const int64_t ti = tail_of[static_cast<size_t>(m)];
    if (ti < 0) {
      const int32_t* cm = tape.col.data() + m * W;
      for (int32_t k = 0; k < tape.row_nnz[static_cast<size_t>(m)]; ++k) ++cs[cm[k] + 1];
    } else {
      const float* tg = tape.tail_g.data() + ti * F;
      for (int64_t j = 0; j < F; ++j) cs[j + 1] += tg[j] > 0.f;
    }
  }
  for (int64_t j = 0; j < F; ++j) cs[j + 1] += cs[j];
  const int64_t E = cs[F];
  int64_t* fill = s_fill.get(static_cast<size_t>(F));
  std::copy(cs, cs + F, fill);
  int32_t* erow = s_erow.get(static_cast<size_t>(E));
  int32_t* etail = s_etail.get(static_cast<size_t>(E));
  float* eg = s_eg.get(static_cast<size_t>(E));
  float* eu = s_eu.get(static_cast<size_t>(E));
  for (int64_t m = 0; m < M; ++m) {
    const int64_t ti = tail_of[static_cast<size_t>(m)];
    if (ti < 0) {
      const int32_t* cm = tape.col.data() + m * W;
      const float* gm = tape.g.data() + m * W;
      const float* um = tape.u.data() + m * W;
      for (int32_t k = 0; k < tape.row_nnz[static_cast<size_t>(m)]; ++k) {
        const int64_t pos = fill[cm[k]]++;
        erow[pos] = static_cast<int32_t>(m);
        etail[pos] = -1;
        eg[pos] = gm[k];
        eu[pos] = um[k];
      }
    } else {
      const float* tg = tape.tail_g.data() + ti * F;
      const float* tu = tape.tail_u.data() + ti * F;
      for (int64_t j = 0; j < F; ++j) {
        if (!(tg[j] > 0.f)) continue;
        const int64_t pos = fill[j]++;
        erow[pos] = static_cast<int32_t>(m);
        etail[pos] = static_cast<int32_t>(ti);
        eg[pos] = tg[j];
        eu[pos] = tu[j];
      }
    }
  }

  // Neuron-major pass (train_hybrid.h): each neuron's three weight rows are read once, then the
  // partial dx of the threads are summed in thread order.
  const int nthreads = num_threads();
  float* dxp = s_dxp.get(static_cast<size_t>(nthreads) * M * d);
  HybridNeuronPass a;
  a.M = M;
  a.d = d;
  a.F = F;
  a.x = x;
  a.dy = dy;
  a.up = up;
  a.down_t = dn;
  a.ld_ud = ldu;
  a.gate = gw;
  a.ld_gate = ldg;
  a.cs = cs;
  a.erow = erow;
  a.etail = etail;
  a.eg = eg;
  a.eu = eu;
  a.dht = dht;
  a.lam = lam;
  a.dxp = dxp;
  a.dgate = dgate;
  a.dupdown = dupdown;
  int team = 1;
  switch (active_isa()) {
    case Isa::Avx512: team = hybrid_neuron_pass_avx512(a, nthreads); break;
    case Isa::Avx2: team = hybrid_neuron_pass_avx2(a, nthreads); break;
    default: team = hybrid_neuron_pass_impl(a, nthreads); break;
  }
  // dx = Σ partials (thread order)
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t i = 0; i < M * d; ++i) {
    float s = 0.f;
    for (int u = 0; u < team; ++u) s += dxp[static_cast<size_t>(u) * M * d + i];
    dx[i] = s;
  }
}

// --- Dense reference --------------------------------------------------------------------------

double dense_ffn_forward_train(const float* x, int64_t M, const DenseFfnWeights& w, DenseTape& tape,
                               float* y) {
  const int64_t F = w.gate.rows, d = w.gate.cols;
  tape.M = M;
  tape.F = F;
  tape.g.resize(static_cast<size_t>(M * F));
  tape.u.resize(static_cast<size_t>(M * F));
  float* G = tape.g.data();
  gemm_epilogue(x, d, M, w.gate, [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1, float* c, int64_t ldc, int) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t k = 0; k < n1 - n0; ++k) {
        const float v = c[(m - m0) * ldc + k];
        G[m * F + n0 + k] = v > 0.f ? v : 0.f;
      }
  });
  gemm(x, d, M, w.up, tape.u.data(), F);
  static thread_local Scratch<float> s_h;
  float* H = s_h.get(static_cast<size_t>(M * F));
  double l1 = 0;
#pragma omp parallel for schedule(static) reduction(+ : l1) num_threads(num_threads())
  for (int64_t i = 0; i < M * F; ++i) {
    H[static_cast<size_t>(i)] = G[i] * tape.u[static_cast<size_t>(i)];
    l1 += std::fabs(static_cast<double>(H[static_cast<size_t>(i)]));
  }
  gemm(H, F, M, w.down, y, d);
  return M ? l1 / static_cast<double>(M) : 0.0;
}

void dense_ffn_backward(const float* x, const float* dy, int64_t M, const DenseFfnWeights& w,
                        const DenseTape& tape, float l1, float* dx, float* dgate, float* dup,
                        float* ddown) {
  const int64_t F = w.gate.rows, d = w.gate.cols;
  const float lam = M ? l1 / static_cast<float>(M) : 0.f;
  static thread_local Scratch<float> s_du, s_dg, s_h, s_tmp, s_dut, s_dgt, s_ht, s_xt, s_dyt;
  float* dU = s_du.get(static_cast<size_t>(M * F));
  float* dG = s_dg.get(static_cast<size_t>(M * F));
  float* H = s_h.get(static_cast<size_t>(M * F));
  gemm(dy, d, M, w.down_t, dU, F);  // dh
  const float* G = tape.g.data();
  const float* U = tape.u.data();
#pragma omp parallel for schedule(static) num_threads(num_threads())
  for (int64_t i = 0; i < M * F; ++i) {
    const float h = G[i] * U[i];
    const float dh = dU[static_cast<size_t>(i)] + lam * sgn(h);
    H[static_cast<size_t>(i)] = h;
    dU[static_cast<size_t>(i)] = dh * G[i];
    dG[static_cast<size_t>(i)] = G[i] > 0.f ? dh * U[i] : 0.f;
  }
  // dx = dU · W_up + dG · W_gate
  float* tmp = s_tmp.get(static_cast<size_t>(M * d));
  gemm(dU, F, M, w.up_t, dx, d);
  gemm(dG, F, M, w.gate_t, tmp, d);
#pragma omp parallel for schedule(static) num_threads(num_threads())
  for (int64_t i = 0; i < M * d; ++i) dx[i] += tmp[i];
  // Weight gradients as GEMMs over the token dimension (K = M), on transposed operands.
  float* dUt = s_dut.get(static_cast<size_t>(F * M));
  float* dGt = s_dgt.get(static_cast<size_t>(F * M));
  float* Ht = s_ht.get(static_cast<size_t>(F * M));
  float* xt = s_xt.get(static_cast<size_t>(d * M));
  float* dyt = s_dyt.get(static_cast<size_t>(d * M));
  transpose(dU, F, M, F, dUt);
  transpose(dG, F, M, F, dGt);
  transpose(H, F, M, F, Ht);
  transpose(x, d, M, d, xt);
  transpose(dy, d, M, d, dyt);
  const WeightView xT{xt, DType::F32, d, M, M};
  const WeightView hT{Ht, DType::F32, F, M, M};
  gemm(dUt, M, F, xT, dup, d);
  gemm(dGt, M, F, xT, dgate, d);
  gemm(dyt, M, d, hT, ddown, F);
}

// --- FfnTrainer -------------------------------------------------------------------------------

FfnTrainer::FfnTrainer(FfnLayer& layer) : layer_(layer) {
  const FfnLayerConfig& c = layer.config();
  if (!c.gated) throw std::invalid_argument("FfnTrainer: training kernels cover gated FFNs only");
  if (c.dtype != DType::F32) throw std::invalid_argument("FfnTrainer: training needs an f32 layer (dtype 'f32')");
}

DenseFfnWeights FfnTrainer::dense_weights() {
  const int64_t d = layer_.config().d_model, F = layer_.config().d_ff;
  if (gate_t_.empty()) {
    gate_t_.resize(static_cast<size_t>(d * F));
    up_t_.resize(static_cast<size_t>(d * F));
    const WeightView g = layer_.gate_view(), u = layer_.up_view();
    transpose(static_cast<const float*>(g.data), g.ld, F, d, gate_t_.data());
    transpose(static_cast<const float*>(u.data), u.ld, F, d, up_t_.data());
  }
  DenseFfnWeights w;
  w.gate = layer_.gate_view();
  w.up = layer_.up_view();
  w.down = layer_.down_standard();
  w.gate_t = {gate_t_.data(), DType::F32, d, F, F};
  w.up_t = {up_t_.data(), DType::F32, d, F, F};
  w.down_t = layer_.down_t_view();
  return w;
}

TrainStepStats FfnTrainer::step(const float* x, const float* dy, int64_t M, TrainMode mode,
                                const HybridParams& p, float* y, float* dx) {
  const int64_t d = layer_.config().d_model, F = layer_.config().d_ff;
  TrainStepStats st;
  if (M < 1) throw std::invalid_argument("FfnTrainer.step: need at least one token");
  if (mode == TrainMode::Dense) {
    const DenseFfnWeights w = dense_weights();
    dgate_.resize(static_cast<size_t>(F * d));
    dup_.resize(static_cast<size_t>(F * d));
    ddown_.resize(static_cast<size_t>(d * F));
    st.l1 = dense_ffn_forward_train(x, M, w, dtape_, y);
    dense_ffn_backward(x, dy, M, w, dtape_, p.l1, dx, dgate_.data(), dup_.data(), ddown_.data());
    st.saved_bytes = dtape_.saved_bytes();
    int64_t nnz = 0, mx = 0;
    for (int64_t m = 0; m < M; ++m) {
      int64_t n = 0;
      for (int64_t j = 0; j < F; ++j) n += dtape_.g[static_cast<size_t>(m * F + j)] > 0.f;
      nnz += n;
      mx = std::max(mx, n);
    }
    st.sparsity.rows = M;
    st.sparsity.nnz = nnz;
    st.sparsity.max_row_nnz = mx;
  } else {
    dgate_.resize(static_cast<size_t>(F * d));
    dupdown_.resize(static_cast<size_t>(F * 2 * d));
    const HybridForwardResult r = hybrid_forward(x, M, layer_.gate_view(), layer_.updown_view(), p, htape_, y);
    hybrid_backward(x, dy, layer_.gate_view(), layer_.updown_view(), htape_, p.l1, dx, dgate_.data(), dupdown_.data());
    st.sparsity = r.stats;
    st.l1 = r.l1;
    st.saved_bytes = htape_.saved_bytes();
    st.tail_rows = static_cast<int64_t>(htape_.tail_rows.size());
  }
  last_ = mode;
  have_grads_ = true;
  return st;
}

void FfnTrainer::export_grads(float* dgate, float* dup, float* ddown) const {
  if (!have_grads_) throw std::logic_error("FfnTrainer: no step has run");
  const int64_t d = layer_.config().d_model, F = layer_.config().d_ff;
  std::memcpy(dgate, dgate_.data(), sizeof(float) * F * d);
  if (last_ == TrainMode::Dense) {
    std::memcpy(dup, dup_.data(), sizeof(float) * F * d);
    std::memcpy(ddown, ddown_.data(), sizeof(float) * d * F);
    return;
  }
  for (int64_t j = 0; j < F; ++j) {
    std::memcpy(dup + j * d, dupdown_.data() + j * 2 * d, sizeof(float) * d);
    for (int64_t i = 0; i < d; ++i) ddown[i * F + j] = dupdown_[static_cast<size_t>(j * 2 * d + d + i)];
  }
}

}  // namespace sparsellm
