// Decode (one token, or a handful): gate GEMV, then only the active neurons' weight blocks are
// read, the threads splitting the active list (sparsellm/ffn.h, FfnLayer::decode). The GEMVs
// are the decode GEMV of sparsellm/model.h (gemv.cpp): dense mode runs gate and up in one pass
// over their rows, then down on W_down [d, F].
#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>

#include "ffn_kernels.h"
#include "gate_screen.h"
#include "sparsellm/cpu_info.h"
#include "sparsellm/ffn.h"
#include "sparsellm/gemm.h"
#include "sparsellm/model.h"

namespace sparsellm {

namespace {

// y [M, d] = h [M, F] · W_downᵀ (+ bias), through the decode GEMV on W_down [d, F].
void down_gemv(const float* h, int64_t F, int64_t M, const WeightView& down, const float* bias, float* y, int64_t d) {
  gemv(h, F, M, down, y, d);
  if (bias)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < d; ++k) y[m * d + k] += bias[k];
}

// SPARSELLM_GATE_SCREEN=0 turns the screened gate off (A/B measurement); on by default.
bool gate_screen_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("SPARSELLM_GATE_SCREEN");
    return !(v && std::strcmp(v, "0") == 0);
  }();
  return on;
}

}  // namespace

FfnStats FfnLayer::decode(const float* x, int64_t M, float* y, FfnMode mode) {
  if (M < 0) throw std::invalid_argument("FfnLayer.decode: negative token count");
  if (M == 0) return FfnStats{};
  const int64_t d = cfg_.d_model, F = cfg_.d_ff;
  const int T = cfg_.twell.tile, cap = cfg_.twell.capacity();
  const float* ub = up_bias();
  const GateAct act = cfg_.act;  // plain ReLU: keep v > 0; thresholded: keep |act(v)| > c

  if (mode == FfnMode::Dense) {
    // Gated bf16 with a fused kernel (AVX-512): gate GEMV, act(g), then one pass over the
    // neuron-major up/down blocks (every weight read once, contiguous). Otherwise three dense
    // GEMVs: gate (and up, same x, one pass), then down on the hidden vector.
    if (work_.size() < static_cast<size_t>(2 * M * F)) work_.resize(static_cast<size_t>(2 * M * F));
    float* G = work_.data();
    float* U = G + M * F;
    if (cfg_.gated && cfg_.dtype == DType::BF16 && gemv_updown_available()) {
      gemv(x, d, M, gate_view(), G, F);
      FfnStats st;
      st.path = FfnPath::Dense;
      st.rows = M;
      for (int64_t m = 0; m < M; ++m) {
        float* g = G + m * F;
        int64_t n = 0;
        for (int64_t j = 0; j < F; ++j) {
          g[j] = act.apply(g[j]);
          n += g[j] != 0.f;
        }
        st.nnz += n;
        st.max_row_nnz = std::max(st.max_row_nnz, n);
      }
      gemv_updown(x, d, M, G, F, updown_view(), down_bias(), y, d);
      return st;
    }
    if (cfg_.gated) {
      const GemvOutput gu[2] = {{gate_view(), G, F}, {up_view(), U, F}};
      gemv_multi(x, d, M, gu, 2);
    } else {
      gemv(x, d, M, gate_view(), G, F);
    }
    FfnStats st;
    st.path = FfnPath::Dense;
    st.rows = M;
    for (int64_t m = 0; m < M; ++m) {
      float* g = G + m * F;
      const float* u = U + m * F;
      int64_t n = 0;
      for (int64_t j = 0; j < F; ++j) {
        float v = act.apply(g[j] + (ub ? ub[j] : 0.f));
        n += v != 0.f;
        g[j] = cfg_.gated ? v * u[j] : v;
      }
      st.nnz += n;
      st.max_row_nnz = std::max(st.max_row_nnz, n);
    }
    down_gemv(G, F, M, down_standard(), down_bias(), y, d);
    return st;
  }

  // Gate GEMV (+ bias for non-gated); the pre-activations stay in work_ [M, F]. Plain-ReLU
  // gated layers screen the gate with its int8 copy first (gate_screen.h): only the rows the
  // bound cannot rule out are computed, exactly as the GEMV computes them, so the active set
  // and values are the same bits.
  if (work_.size() < static_cast<size_t>(M * F)) work_.resize(static_cast<size_t>(M * F));
  float* G = work_.data();
  int64_t gate_candidates = -1;
  if (cfg_.gated && !ub && act.plain_relu() && M <= 4 && gate_screen_enabled()) {
    if (!screen_) screen_ = std::make_shared<GateScreen>(gate_view());
    gate_candidates = screen_->gate(gate_view(), x, d, M, G, F);
  } else {
    gemv(x, d, M, gate_view(), G, F);
  }

  // Activate the gate in place and count. A screened gate leaves only its candidate rows
  // non-zero, so only those are visited (in ascending order, as a full scan would); else all F.
  // Per token: non-zeros, tiles over capacity; all tokens: the active lists, flattened as
  // (token, neuron, value) in token order, and the union of the active neurons.
  const int32_t* visit = gate_candidates >= 0 ? screen_->candidates() : nullptr;
  const int64_t n_visit = gate_candidates >= 0 ? gate_candidates : F;
  std::vector<int32_t> tok, js, active;
  std::vector<float> vs;
  tok.reserve(static_cast<size_t>(M) * 64);
  js.reserve(static_cast<size_t>(M) * 64);
  vs.reserve(static_cast<size_t>(M) * 64);
  FfnStats st;
  st.rows = M;
  st.gate_candidates = gate_candidates;
  for (int64_t m = 0; m < M; ++m) {
    float* g = G + m * F;
    int64_t row = 0, in_tile = 0, tile = -1;
    bool row_ovf = false;
    for (int64_t i = 0; i < n_visit; ++i) {
      const int64_t j = visit ? visit[i] : i;
      const float v = act.apply(g[j] + (ub ? ub[j] : 0.f));
      g[j] = v;
      if (v == 0.f) continue;
      if (j / T != tile) {
        tile = j / T;
        in_tile = 0;
      }
      if (++in_tile == cap + 1) {
        ++st.overflow_tiles;
        row_ovf = true;
      }
      tok.push_back(static_cast<int32_t>(m));
      js.push_back(static_cast<int32_t>(j));
      vs.push_back(v);
      ++row;
    }
    st.nnz += row;
    st.max_row_nnz = std::max(st.max_row_nnz, row);
    st.overflow_rows += row_ovf;
  }

  if (mode == FfnMode::Auto && prefer_dense(st, M)) {
    // Dense up+down from the gate already computed (activated in place above): the same fused
    // pass over the neuron-major blocks as dense mode where it exists, else up GEMV then down.
    st.path = FfnPath::Dense;
    if (cfg_.gated && !ub && cfg_.dtype == DType::BF16 && gemv_updown_available()) {
      gemv_updown(x, d, M, G, F, updown_view(), down_bias(), y, d);
      return st;
    }
    if (cfg_.gated) {
      if (work_.size() < static_cast<size_t>(2 * M * F)) {
        work_.resize(static_cast<size_t>(2 * M * F));
        G = work_.data();
      }
      float* U = G + M * F;
      gemv(x, d, M, up_view(), U, F);
      for (int64_t k = 0; k < M * F; ++k) G[k] *= U[k];
    }
    down_gemv(G, F, M, down_standard(), down_bias(), y, d);
    st.path = FfnPath::Dense;
    return st;
  }

  st.path = FfnPath::Sparse;
  // Gated bf16 with the fused kernel (AVX-512): one pass over the union of the active neurons'
  // blocks, several in flight per thread (gemv_updown_rows); a neuron inactive for some of the
  // tokens has coefficient 0 there (G holds the activated gate, 0 where inactive).
  if (cfg_.gated && !ub && cfg_.dtype == DType::BF16 && gemv_updown_available()) {
    active = js;
    if (M > 1) {
      std::sort(active.begin(), active.end());
      active.erase(std::unique(active.begin(), active.end()), active.end());
    }
    gemv_updown_rows(x, d, M, G, F, updown_view(), active.data(), static_cast<int64_t>(active.size()), down_bias(), y,
                     d);
    return st;
  }
  // Otherwise thread t takes entries [L·t/nt, L·(t+1)/nt) of the flattened list into its own
  // partial outputs [M, d]; partials are then summed in thread order.
  const detail::FfnOps& ops = detail::ffn_ops();
  const int64_t L = static_cast<int64_t>(js.size());
  const int nt = num_threads();
  std::vector<float> part(static_cast<size_t>(nt) * M * d);
  const bool gated = cfg_.gated;
  const UpDownView ud = gated ? updown_view() : UpDownView{};
  const WeightView dt = down_t_view();
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), TT = omp_get_num_threads();
    float* pt = part.data() + static_cast<size_t>(t) * M * d;
    std::memset(pt, 0, sizeof(float) * M * d);
    int64_t i = L * t / TT;
    const int64_t i1 = L * (t + 1) / TT;
    while (i < i1) {
      const int32_t m = tok[static_cast<size_t>(i)];
      int64_t e = i;
      while (e < i1 && tok[static_cast<size_t>(e)] == m) ++e;
      if (gated)
        ops.updown(x + m * d, js.data() + i, vs.data() + i, e - i, ud.data, ud.dtype, ud.ld, d, pt + m * d, nullptr);
      else
        ops.down(js.data() + i, vs.data() + i, e - i, dt.data, dt.dtype, dt.ld, d, pt + m * d);
      i = e;
    }
#pragma omp barrier
    const float* b = down_bias();
#pragma omp for schedule(static)
    for (int64_t k = 0; k < M * d; ++k) {
      float s = b ? b[k % d] : 0.f;
      for (int u = 0; u < TT; ++u) s += part[static_cast<size_t>(u) * M * d + k];
      y[k] = s;
    }
  }
  return st;
}

}  // namespace sparsellm
