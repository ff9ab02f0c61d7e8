// The FFN block on the CPU: dense path, TwELL sparse path (gate GEMM → fused up+down), decode,
// and the automatic choice between them. Shapes: M tokens, d = d_model, F = d_ff.
//
//   gated:      y = (relu(x·W_gateᵀ) ⊙ (x·W_upᵀ)) · W_downᵀ (+ b_down)
//   non-gated:  y = relu(x·W_upᵀ + b_up) · W_downᵀ (+ b_down)
//
// Kernel layout of the weights (docs/format.md §5): gated: W_gate [F, d] row-major and
// `updown` [F, 2, d] neuron-major (updown[j,0,:] = W_up[j,:], updown[j,1,:] = W_down[:,j]);
// non-gated: W_up [F, d] and down_t [F, d] = W_downᵀ. Weights f32 or bf16 (widened in
// registers), activations and biases f32.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "sparsellm/tensor.h"
#include "sparsellm/twell.h"

namespace sparsellm {

// updown [rows = F, 2, ld]: neuron j's up row at element j·2·ld, its down column at j·2·ld + ld.
struct UpDownView {
  const void* data = nullptr;
  DType dtype = DType::F32;
  int64_t rows = 0;  // F
  int64_t cols = 0;  // d
  int64_t ld = 0;    // >= d
  WeightView up() const { return {data, dtype, rows, cols, 2 * ld}; }         // W_up [F, d]
  WeightView down_t() const {                                                 // W_downᵀ [F, d]
    return {static_cast<const char*>(data) + ld * dtype_size(dtype), dtype, rows, cols, 2 * ld};
  }
};

// --- Sparse kernels -------------------------------------------------------------------------

// Fused gated up+down: y[m] = Σ_j g[m,j] · (x[m]·W_up[j]) · W_down[:, j] (+ bias) over the active
// neurons of each row of `g` (TwELL, overflowing tiles read from its dense side buffer).
// x [M, d] (ldx), y [M, d] (ldy, overwritten). The hidden vector never goes to memory. Threads
// split the tokens; with fewer tokens than threads they split each token's active list.
void twell_updown(const float* x, int64_t ldx, const Twell& g, const UpDownView& ud,
                  const float* down_bias, float* y, int64_t ldy);

// Non-gated sparse down: y[m] = Σ_j h[m,j] · down_t[j] (+ bias). y [M, d] (ldy, overwritten).
void twell_down(const Twell& h, const WeightView& down_t, const float* down_bias, float* y,
                int64_t ldy);

// Which kernel the sparse up+down (twell_updown, twell_down, FfnLayer's sparse path) uses for
// M ≥ 2 tokens: Auto picks the two-phase kernels once the mean number of tokens per neuron
// (nnz / d_ff) reaches 3, the per-token / token-blocked ones below (docs/kernels.md).
// Process-wide; for tests and measurement. Also SPARSELLM_FFN_KERNEL=auto|per-token|two-phase.
enum class SparseKernel { Auto = 0, PerToken = 1, TwoPhase = 2 };
void set_sparse_kernel(SparseKernel k);
SparseKernel sparse_kernel();

// --- The layer ------------------------------------------------------------------------------

class GateScreen;  // int8 screen of a ReLU gate for the sparse decode (cpu/gate_screen.h)

enum class FfnMode { Dense = 0, Sparse = 1, Auto = 2 };
enum class FfnPath { Dense = 0, Sparse = 1 };

struct FfnStats : SparsityStats {
  FfnPath path = FfnPath::Dense;
  bool two_phase = false;  // sparse path: the two-phase up+down kernels ran (docs/kernels.md)
  // Decode with the screened gate (docs/runtime.md): gate rows computed exactly (the union of
  // the tokens' candidates); -1 when the gate was not screened (or the call fell back to the
  // full gate GEMV).
  int64_t gate_candidates = -1;
};

struct FfnLayerConfig {
  int64_t d_model = 0;
  int64_t d_ff = 0;
  bool gated = true;
  DType dtype = DType::F32;  // weight storage: F32 or BF16
  TwellParams twell;
  // The gate's activation and keep rule (twell.h): plain ReLU by default; a thresholded
  // silu/gelu layer keeps |act(g)| > c and every path (sparse, dense, decode) applies it.
  GateAct act;
  // Auto mode runs the dense path when the estimated cost of the sparse up+down exceeds
  // auto_crossover × the estimated dense up+down (docs/kernels.md, "Dense fallback"). The
  // estimates use these machine rates (defaults measured on the 2-core development machine).
  double auto_crossover = 0.9;
  double sparse_bytes_per_s = 45e9;  // weight bytes/s the sparse kernels stream (active blocks)
  double gemm_flops_per_s = 150e9;   // dense GEMM rate (compute-bound, many tokens)
  double dense_bytes_per_s = 60e9;   // dense decode GEMV rate (memory-bound, few tokens)
  double twophase_flops_per_s = 64e9;  // useful FLOP rate of the two-phase up+down (bf16;
                                       // the model takes 2/3 of it for f32 weights)
};

// Owns the weights in kernel layout (plus the dense-layout copies the dense path needs, built
// on first use) and the work buffers. Not reentrant: one call at a time per layer.
class FfnLayer {
 public:
  // Standard layouts in (nn.Linear): gate [F, d] (gated only), up [F, d], down [d, F], up_bias
  // [F] (non-gated only, may be null), down_bias [d] (may be null). Packs into kernel layout,
  // rounding to bf16 when cfg.dtype is BF16.
  FfnLayer(const FfnLayerConfig& cfg, const float* gate, const float* up, const float* down,
           const float* up_bias, const float* down_bias);
  // Wraps weights already in kernel layout (e.g. an mmapped packed file), without copying.
  // Gated: `a` = W_gate [F, d], `b` = updown [F, 2, d]; non-gated: `a` = W_up, `b` = down_t.
  FfnLayer(const FfnLayerConfig& cfg, const void* a, const void* b, const float* up_bias,
           const float* down_bias);

  const FfnLayerConfig& config() const { return cfg_; }

  // y [M, d] = FFN(x [M, d]). Dense: three GEMMs (ReLU and g ⊙ u fused in epilogues).
  // Sparse: TwELL gate GEMM then the fused kernel. Auto: TwELL gate GEMM, then sparse or dense
  // up+down depending on the counts (the gate is never computed twice); once a call has chosen
  // dense, the next calls run the plain dense path (its gate epilogue still counts the
  // non-zeros) until the counts favour the sparse path again.
  FfnStats forward(const float* x, int64_t M, float* y, FfnMode mode);
  // Few tokens (1 to a handful): gate GEMV, then only the active neurons' blocks are read,
  // threads splitting the active list. Dense mode: three GEMVs.
  FfnStats decode(const float* x, int64_t M, float* y, FfnMode mode);

  // Weight views in kernel layout.
  WeightView gate_view() const;     // gated: W_gate; non-gated: W_up
  UpDownView updown_view() const;   // gated only
  WeightView down_t_view() const;   // W_downᵀ [F, d] (both kinds)
  WeightView up_view() const;       // W_up [F, d] (both kinds)
  const float* up_bias() const { return up_bias_.empty() ? nullptr : up_bias_.data(); }
  const float* down_bias() const { return down_bias_.empty() ? nullptr : down_bias_.data(); }
  // W_down [d, F] (standard layout), built on first use from the kernel layout.
  WeightView down_standard();

 private:
  FfnStats dense_forward(const float* x, int64_t M, float* y, const Twell* gate_done);
  FfnStats sparse_forward(const float* x, int64_t M, float* y);
  bool prefer_dense(const SparsityStats& s, int64_t M) const;
  const char* panels();  // builds panels_ on first use

  FfnLayerConfig cfg_;
  std::vector<uint8_t> a_own_, b_own_, down_std_;
  const void* a_ = nullptr;  // gate (gated) or up (non-gated)
  const void* b_ = nullptr;  // updown (gated) or down_t (non-gated)
  std::vector<float> up_bias_, down_bias_;
  Twell twell_;
  std::vector<float> work_;  // dense activations [M, F] for the dense path
  bool auto_dense_ = false;  // Auto forward: the last call's counts chose the dense path
  // W_up (gated) and W_downᵀ cut into column panels [d/256][F][256] for the two-phase sparse
  // path (each phase reads one panel for all tokens), built on first use (docs/kernels.md), in
  // memory advised for huge pages (a token's pairs touch hundreds of 4 KiB pages per panel).
  std::shared_ptr<uint8_t> panels_;
  // The screened gate of the sparse decode (plain-ReLU gated layers), built on first use.
  std::shared_ptr<GateScreen> screen_;
};

}  // namespace sparsellm
