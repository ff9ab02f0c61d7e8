// Screened gate for the sparse decode (internal; docs/runtime.md, "Screened gate (decode)").
//
// A plain-ReLU layer keeps neuron j for token x iff g_j = fl(x · w_j) > 0. The screen holds an
// int8 copy of the gate, q_j = round(w_j / s_j) with s_j = max_k |w_jk| / 127, and the exact
// residual norm r_j ≥ ||w_j − s_j q_j||_2 (float64, rounded up). For a token x it computes
// g̃_j = s_j · fl(q_j · x) and a bound on |g_j − g̃_j|:
//   r_j ||x||_2                               (quantization, Cauchy–Schwarz)
//   + γ · 127 s_j ||x||_1 · 2 (1 + 2^-20)     (f32 rounding of both products: each is a sum of
//                                               K products in some order, error ≤ γ_{K+16} Σ|x_k w_k|
//                                               with Σ|x_k w_k| ≤ ||x||_1 max|w_j| ≤ ||x||_1 · 127 s_j (1 + u),
//                                               γ = 2 (K + 16) 2^-24)
//   + a tiny absolute term for underflow / flushed subnormals,
// all evaluated in float64 and inflated by 1e-12. A neuron with g̃_j + bound_j ≤ 0 has g_j ≤ 0,
// so ReLU gives exactly 0 on the exact path too; every other (candidate) neuron's gate is
// computed exactly by the decode GEMV itself (same kernel, same row, so the same bits).
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "row_streams.h"
#include "sparsellm/tensor.h"

namespace sparsellm::gate_screen_detail {

struct ScreenArgs {
  const float* x = nullptr;  // [M][ldx]
  int64_t ldx = 0;
  int M = 1;                 // 1 .. 4
  int64_t K = 0;
  int64_t pf = 1024;         // prefetch distance in bytes
};

// dot[m * ldd + n] = fl(Σ_k q[n][k] · x[m][k]) for n in [n0, n1), m < M (int8 widened to f32).
// Rows are ldq bytes apart, zero padded from K to ldq (ldq a multiple of 64).
using RowsI8 = void (*)(const ScreenArgs& a, const int8_t* Q, int64_t ldq, int64_t n0, int64_t n1, float* dot,
                        int64_t ldd);

RowsI8 screen_kernel_avx512();
RowsI8 screen_kernel_avx2();

// The row walk the ISA kernels share (a RowsI8; row_streams.h): for M_ = a.M tokens, rows
// [n0, n1) in S_ = Kernel::streams(M_) runs side by side. Kernel supplies `static constexpr int
// streams(int M)` and `template <int M_, int S_> static void tile(a, q, next, out, ldd)` (S_ rows
// q[s] into out[s][m * ldd]). Each ISA file passes a Kernel type of its own anonymous namespace,
// so every instantiation stays in the file compiled for its ISA.
template <typename Kernel, int M_>
void walk_rows_m(const ScreenArgs& a, const int8_t* Q, int64_t ldq, int64_t n0, int64_t n1, float* dot, int64_t ldd) {
  detail::walk_row_streams<Kernel::streams(M_)>(
      Q, ldq, nullptr, n0, n1, dot, [&](auto s, const int8_t* const* q, const int8_t* const* nx, float* const* out) {
        Kernel::template tile<M_, decltype(s)::value>(a, q, nx, out, ldd);
      });
}

template <typename Kernel>
void walk_rows(const ScreenArgs& a, const int8_t* Q, int64_t ldq, int64_t n0, int64_t n1, float* dot, int64_t ldd) {
  switch (a.M) {
    case 1: walk_rows_m<Kernel, 1>(a, Q, ldq, n0, n1, dot, ldd); break;
    case 2: walk_rows_m<Kernel, 2>(a, Q, ldq, n0, n1, dot, ldd); break;
    case 3: walk_rows_m<Kernel, 3>(a, Q, ldq, n0, n1, dot, ldd); break;
    default: walk_rows_m<Kernel, 4>(a, Q, ldq, n0, n1, dot, ldd); break;
  }
}

}  // namespace sparsellm::gate_screen_detail

namespace sparsellm {

class GateScreen {
 public:
  // Quantizes W [F, K] (f32 or bf16). Threads split the rows.
  explicit GateScreen(const WeightView& w);
  ~GateScreen();
  GateScreen(const GateScreen&) = delete;
  GateScreen& operator=(const GateScreen&) = delete;

  int64_t rows() const { return F_; }
  int64_t cols() const { return K_; }
  size_t bytes() const;  // memory held (int8 rows + per-row scale and residual)

  // Pre-activations of the plain-ReLU gate for M (1 .. 4) tokens x [M, K] (ldx): writes
  // G [M, F] (ldg) such that relu(G) equals, bit for bit, relu of the plain decode GEMV of W.
  // Rows screened out get 0; candidate rows (union over the tokens) get the GEMV's value for
  // every token. Falls back to the full GEMV when more than max_fraction of the rows are
  // candidates or x is not finite / too large for the bound (and skips the screen for a while
  // after repeated fallbacks). Returns the number of candidate rows, or -1 when the call ran
  // the full GEMV.
  int64_t gate(const WeightView& w, const float* x, int64_t ldx, int64_t M, float* G, int64_t ldg,
               double max_fraction = 0.25);
  // After a gate() call that returned n >= 0: its n candidate rows, ascending (every other row of
  // G is 0 for every token).
  const int32_t* candidates() const { return cand_.get(); }

  // Back-off: after kMaxMisses fallbacks in a row (the layer's candidates keep exceeding the
  // threshold) the next kSkip calls run the plain GEMV without screening, then it tries again.
  static constexpr int kMaxMisses = 4, kSkip = 64;
 private:
  int64_t F_ = 0, K_ = 0, ldq_ = 0;
  std::shared_ptr<uint8_t> q_mem_;   // huge pages where the system allows (huge_buffer.h)
  int8_t* q_ = nullptr;              // [F][ldq] in q_mem_, 2 MiB aligned
  std::vector<int64_t> bounds_;      // the screen's row chunks: [bounds_[c], bounds_[c + 1])
  std::vector<int64_t> chunk_cands_; // candidates found in each chunk (last call)
  std::unique_ptr<float[]> scale_;   // s_j
  std::unique_ptr<float[]> resid_;   // r_j (rounded up)
  double max_abs_ = 0;               // max_j 127 s_j (overflow guard)
  std::unique_ptr<float[]> dot_;     // [4][F] screened dots
  std::unique_ptr<uint8_t[]> flag_;  // [F]
  std::unique_ptr<int32_t[]> cand_;  // [F]
  int misses_ = 0, skip_ = 0;
};

// Test hooks: the bound is multiplied by `scale` (1 in production; tests show that 0.1 breaks
// exactness). Process-wide counters of the screened calls.
void gate_screen_set_bound_scale(double scale);
struct GateScreenCounters {
  int64_t calls = 0, fallbacks = 0, rows = 0, candidates = 0;
};
GateScreenCounters gate_screen_counters();

}  // namespace sparsellm
