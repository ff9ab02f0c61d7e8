// Hybrid (ELL + dense tail) training kernels of the gated FFN, the dense reference forward and
// backward, and FfnTrainer (sparsellm/hybrid.h). f32 weights and activations.
#include "sparsellm/hybrid.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "ffn_kernels.h"
#include "sparsellm/cpu_info.h"
#include "sparsellm/gemm.h"

namespace sparsellm {

namespace detail {
int64_t gather_row(const Twell& g, int64_t m, int32_t* js, float* vs);  // ffn.cpp
}

namespace {

inline float sgn(float v) { return v > 0.f ? 1.f : (v < 0.f ? -1.f : 0.f); }

// out [cols, rows] = in [rows, cols]ᵀ (ld_in >= cols), blocked for the caches.
void transpose(const float* in, int64_t ld_in, int64_t rows, int64_t cols, float* out) {
  const int64_t B = 64;
#pragma omp parallel for collapse(2) schedule(static) num_threads(num_threads())
  for (int64_t r0 = 0; r0 < rows; r0 += B)
    for (int64_t c0 = 0; c0 < cols; c0 += B)
      for (int64_t c = c0; c < std::min(cols, c0 + B); ++c)
        for (int64_t r = r0; r < std::min(rows, r0 + B); ++r) out[c * rows + r] = in[r * ld_in + c];
}

void check_f32(const WeightView& gate, const UpDownView& ud, const char* who) {
  if (gate.dtype != DType::F32 || ud.dtype != DType::F32)
    throw std::invalid_argument(std::string(who) + ": training kernels need f32 weights");
  if (gate.rows != ud.rows || gate.cols != ud.cols)
    throw std::invalid_argument(std::string(who) + ": gate and updown shapes differ");
}

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
  std::vector<float> xt(static_cast<size_t>(nt * d));
  for (int64_t i = 0; i < nt; ++i)
    std::memcpy(xt.data() + i * d, x + tape.tail_rows[static_cast<size_t>(i)] * d, sizeof(float) * d);
  if (nt) gemm(xt.data(), d, nt, ud.up(), tape.tail_u.data(), F);

  std::vector<int64_t> tail_of(static_cast<size_t>(M), -1);
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
  const detail::FfnOps& ops = detail::ffn_ops();
  const float lam = M ? l1 / static_cast<float>(M) : 0.f;
  const int64_t nt = static_cast<int64_t>(tape.tail_rows.size());
  const float* up = static_cast<const float*>(ud.data);
  const float* gw = static_cast<const float*>(gate.data);
  const WeightView down_t = ud.down_t();

  // Tail rows: dh = dy · W_down by a dense GEMM over their gathered upstream gradients.
  std::vector<float> dyt(static_cast<size_t>(nt * d)), dht(static_cast<size_t>(nt * F));
  for (int64_t i = 0; i < nt; ++i)
    std::memcpy(dyt.data() + i * d, dy + tape.tail_rows[static_cast<size_t>(i)] * d, sizeof(float) * d);
  if (nt) gemm(dyt.data(), d, nt, down_t, dht.data(), F);

  // Entry lists: ELL rows use their slots; tail rows get compact lists after the ELL block.
  std::vector<int64_t> start(static_cast<size_t>(M) + 1);
  std::vector<int64_t> tail_of(static_cast<size_t>(M), -1);
  for (int64_t i = 0; i < nt; ++i) tail_of[static_cast<size_t>(tape.tail_rows[static_cast<size_t>(i)])] = i;
  start[0] = 0;
  for (int64_t m = 0; m < M; ++m) start[static_cast<size_t>(m) + 1] = start[static_cast<size_t>(m)] + tape.row_nnz[static_cast<size_t>(m)];
  const int64_t E = start[static_cast<size_t>(M)];
  std::vector<int32_t> ej(static_cast<size_t>(E));
  std::vector<float> edu(static_cast<size_t>(E)), edg(static_cast<size_t>(E)), eh(static_cast<size_t>(E));

#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads())
  for (int64_t m = 0; m < M; ++m) {
    const float* dym = dy + m * d;
    float* dxm = dx + m * d;
    std::memset(dxm, 0, sizeof(float) * d);
    const int64_t s = start[static_cast<size_t>(m)];
    const int64_t ti = tail_of[static_cast<size_t>(m)];
    int64_t n = 0;
    if (ti < 0) {
      const int32_t* cm = tape.col.data() + m * W;
      const float* gm = tape.g.data() + m * W;
      const float* um = tape.u.data() + m * W;
      n = tape.row_nnz[static_cast<size_t>(m)];
      for (int64_t k = 0; k < n; ++k) {
        const int64_t j = cm[k];
        const float dh = ops.dot(dym, static_cast<const float*>(down_t.data) + j * down_t.ld, DType::F32, d) + lam * sgn(um[k]);
        ej[static_cast<size_t>(s + k)] = static_cast<int32_t>(j);
        edu[static_cast<size_t>(s + k)] = dh * gm[k];
        edg[static_cast<size_t>(s + k)] = dh * um[k];
        eh[static_cast<size_t>(s + k)] = gm[k] * um[k];
      }
    } else {
      const float* tg = tape.tail_g.data() + ti * F;
      const float* tu = tape.tail_u.data() + ti * F;
      const float* th = dht.data() + ti * F;
      for (int64_t j = 0; j < F; ++j) {
        if (!(tg[j] > 0.f)) continue;
        const float dh = th[j] + lam * sgn(tu[j]);
        ej[static_cast<size_t>(s + n)] = static_cast<int32_t>(j);
        edu[static_cast<size_t>(s + n)] = dh * tg[j];
        edg[static_cast<size_t>(s + n)] = dh * tu[j];
        eh[static_cast<size_t>(s + n)] = tg[j] * tu[j];
        ++n;
      }
    }
    // dx = du · W_up + dg · W_gate over the row's entries.
    for (int64_t k = 0; k < n; ++k) {
      const int64_t j = ej[static_cast<size_t>(s + k)];
      ops.axpy(dxm, edu[static_cast<size_t>(s + k)], up + j * 2 * ud.ld, DType::F32, d);
      ops.axpy(dxm, edg[static_cast<size_t>(s + k)], gw + j * gate.ld, DType::F32, d);
    }
  }

  // Weight gradients, neuron by neuron (no write conflicts): the pattern transposed (CSC).
  std::vector<int64_t> cs(static_cast<size_t>(F) + 1, 0);
  for (int64_t e = 0; e < E; ++e) ++cs[static_cast<size_t>(ej[static_cast<size_t>(e)]) + 1];
  for (int64_t j = 0; j < F; ++j) cs[static_cast<size_t>(j) + 1] += cs[static_cast<size_t>(j)];
  std::vector<int64_t> fill(cs.begin(), cs.end() - 1);
  std::vector<int32_t> erow(static_cast<size_t>(E));
  std::vector<int64_t> eidx(static_cast<size_t>(E));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t e = start[static_cast<size_t>(m)]; e < start[static_cast<size_t>(m) + 1]; ++e) {
      const int64_t pos = fill[static_cast<size_t>(ej[static_cast<size_t>(e)])]++;
      erow[static_cast<size_t>(pos)] = static_cast<int32_t>(m);
      eidx[static_cast<size_t>(pos)] = e;
    }
#pragma omp parallel for schedule(dynamic, 16) num_threads(num_threads())
  for (int64_t j = 0; j < F; ++j) {
    float* gj = dgate + j * d;
    float* uj = dupdown + j * 2 * d;
    float* dj = uj + d;
    std::memset(gj, 0, sizeof(float) * d);
    std::memset(uj, 0, sizeof(float) * 2 * d);
    for (int64_t q = cs[static_cast<size_t>(j)]; q < cs[static_cast<size_t>(j) + 1]; ++q) {
      const int64_t m = erow[static_cast<size_t>(q)], e = eidx[static_cast<size_t>(q)];
      ops.axpy(gj, edg[static_cast<size_t>(e)], x + m * d, DType::F32, d);
      ops.axpy(uj, edu[static_cast<size_t>(e)], x + m * d, DType::F32, d);
      ops.axpy(dj, eh[static_cast<size_t>(e)], dy + m * d, DType::F32, d);
    }
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
  std::vector<float> H(static_cast<size_t>(M * F));
  double l1 = 0;
#pragma omp parallel for schedule(static) reduction(+ : l1) num_threads(num_threads())
  for (int64_t i = 0; i < M * F; ++i) {
    H[static_cast<size_t>(i)] = G[i] * tape.u[static_cast<size_t>(i)];
    l1 += std::fabs(static_cast<double>(H[static_cast<size_t>(i)]));
  }
  gemm(H.data(), F, M, w.down, y, d);
  return M ? l1 / static_cast<double>(M) : 0.0;
}

void dense_ffn_backward(const float* x, const float* dy, int64_t M, const DenseFfnWeights& w,
                        const DenseTape& tape, float l1, float* dx, float* dgate, float* dup,
                        float* ddown) {
  const int64_t F = w.gate.rows, d = w.gate.cols;
  const float lam = M ? l1 / static_cast<float>(M) : 0.f;
  std::vector<float> dU(static_cast<size_t>(M * F)), dG(static_cast<size_t>(M * F)), H(static_cast<size_t>(M * F));
  gemm(dy, d, M, w.down_t, dU.data(), F);  // dh
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
  std::vector<float> tmp(static_cast<size_t>(M * d));
  gemm(dU.data(), F, M, w.up_t, dx, d);
  gemm(dG.data(), F, M, w.gate_t, tmp.data(), d);
  for (int64_t i = 0; i < M * d; ++i) dx[i] += tmp[static_cast<size_t>(i)];
  // Weight gradients as GEMMs over the token dimension (K = M), on transposed operands.
  std::vector<float> dUt(static_cast<size_t>(F * M)), dGt(static_cast<size_t>(F * M)), Ht(static_cast<size_t>(F * M));
  std::vector<float> xt(static_cast<size_t>(d * M)), dyt(static_cast<size_t>(d * M));
  transpose(dU.data(), F, M, F, dUt.data());
  transpose(dG.data(), F, M, F, dGt.data());
  transpose(H.data(), F, M, F, Ht.data());
  transpose(x, d, M, d, xt.data());
  transpose(dy, d, M, d, dyt.data());
  const WeightView xT{xt.data(), DType::F32, d, M, M};
  const WeightView hT{Ht.data(), DType::F32, F, M, M};
  gemm(dUt.data(), M, F, xT, dup, d);
  gemm(dGt.data(), M, F, xT, dgate, d);
  gemm(dyt.data(), M, d, hT, ddown, F);
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
    dup_.resize(static_cast<size_t>(F * 2 * d));
    const HybridForwardResult r = hybrid_forward(x, M, layer_.gate_view(), layer_.updown_view(), p, htape_, y);
    hybrid_backward(x, dy, layer_.gate_view(), layer_.updown_view(), htape_, p.l1, dx, dgate_.data(), dup_.data());
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
    std::memcpy(dup + j * d, dup_.data() + j * 2 * d, sizeof(float) * d);
    for (int64_t i = 0; i < d; ++i) ddown[i * F + j] = dup_[static_cast<size_t>(j * 2 * d + d + i)];
  }
}

}  // namespace sparsellm
