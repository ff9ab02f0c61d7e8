// Training kernels of the gated FFN (f32 weights and activations): the Hybrid sparse format
// (ELL of width W for the rows that fit, a dense tail for the heavy rows) with a sparse forward
// and backward, and the dense reference forward/backward (the honest baseline).
//
//   forward:  g = relu(x·W_gateᵀ), u = x·W_upᵀ (only where g > 0), h = g ⊙ u, y = h·W_downᵀ
//   loss term: λ·L1 with L1 = (1/M)·Σ_m Σ_j |h[m,j]|
//   backward: dh = dy·W_down (at the pattern) + λ·sign(h)/M; du = dh ⊙ g; dg = dh ⊙ u (g > 0);
//             dx = du·W_up + dg·W_gate; dW_up = duᵀx; dW_gate = dgᵀx; dW_down = dyᵀh
// Shapes: M tokens, d = d_model, F = d_ff.
#pragma once
#include <cstdint>
#include <vector>

#include "sparsellm/ffn.h"
#include "sparsellm/twell.h"

namespace sparsellm {

struct HybridParams {
  int ell_width = 128;  // W: rows with more non-zeros go to the dense tail
  float l1 = 0.f;       // λ
  TwellParams twell;    // of the gate GEMM that produces the pattern
};

// What the hybrid forward keeps for backward: only sparse tensors, plus the tail rows.
struct HybridTape {
  int64_t M = 0, d = 0, F = 0;
  int W = 0;
  std::vector<int32_t> row_nnz;   // [M] non-zeros of each row; rows with row_nnz > W are tail rows
  std::vector<int32_t> col;       // [M, W] neuron of each entry (ELL rows; padding unused)
  std::vector<float> g, u;        // [M, W] gate value (> 0) and up value of each entry
  std::vector<int32_t> tail_rows;  // ascending row indices of the tail rows
  std::vector<float> tail_g, tail_u;  // [tail, F] dense (g is ReLU'd: zero off the pattern)
  // Bytes of the arrays above (what a training framework would keep between the passes).
  int64_t saved_bytes() const;
};

struct HybridForwardResult {
  SparsityStats stats;
  double l1 = 0;  // (1/M)·Σ|h| (not multiplied by λ)
};

// y [M, d] (overwritten). `w`: kernel layout, f32 only. Fills `tape`.
HybridForwardResult hybrid_forward(const float* x, int64_t M, const WeightView& gate,
                                   const UpDownView& updown, const HybridParams& p,
                                   HybridTape& tape, float* y);

// Overwrites dx [M, d], dgate [F, d] and dupdown [F, 2, d] (the gradient in the same kernel
// layout as the weights: dupdown[j,0,:] = dW_up[j,:], dupdown[j,1,:] = dW_down[:,j]).
void hybrid_backward(const float* x, const float* dy, const WeightView& gate,
                     const UpDownView& updown, const HybridTape& tape, float l1, float* dx,
                     float* dgate, float* dupdown);

// --- Dense reference (standard layouts, C's GEMM; transposed weight copies supplied) ---------

struct DenseFfnWeights {
  WeightView gate;    // [F, d]
  WeightView up;      // [F, d]
  WeightView down;    // [d, F]
  WeightView gate_t;  // [d, F] = W_gateᵀ
  WeightView up_t;    // [d, F] = W_upᵀ
  WeightView down_t;  // [F, d] = W_downᵀ
};

struct DenseTape {
  int64_t M = 0, F = 0;
  std::vector<float> g, u;  // [M, F]: relu(gate) and up (h = g ⊙ u is recomputed)
  int64_t saved_bytes() const { return static_cast<int64_t>((g.size() + u.size()) * sizeof(float)); }
};

// y [M, d] (overwritten); returns (1/M)·Σ|h|.
double dense_ffn_forward_train(const float* x, int64_t M, const DenseFfnWeights& w,
                               DenseTape& tape, float* y);
// Overwrites dx [M, d], dgate [F, d], dup [F, d], ddown [d, F] (standard layouts).
void dense_ffn_backward(const float* x, const float* dy, int64_t M, const DenseFfnWeights& w,
                        const DenseTape& tape, float l1, float* dx, float* dgate, float* dup,
                        float* ddown);

// --- One training step of a layer (what the binding and the benchmarks run) -----------------

enum class TrainMode { Dense = 0, Hybrid = 1 };

struct TrainStepStats {
  SparsityStats sparsity;
  int64_t saved_bytes = 0;  // activation memory kept between forward and backward
  int64_t tail_rows = 0;    // hybrid: rows routed to the dense tail
  double l1 = 0;            // (1/M)·Σ|h|
};

// Forward + backward of a gated f32 FfnLayer. The dense mode keeps the transposed weight
// copies the dense backward GEMMs need (built on first use, as a framework's GEMM would read
// them transposed for free). Gradients stay inside until exported.
class FfnTrainer {
 public:
  explicit FfnTrainer(FfnLayer& layer);
  // y [M, d], dx [M, d] overwritten; weight gradients kept (see export_grads).
  TrainStepStats step(const float* x, const float* dy, int64_t M, TrainMode mode,
                      const HybridParams& p, float* y, float* dx);
  // The last step's weight gradients in standard layouts: dgate [F, d], dup [F, d], ddown [d, F].
  void export_grads(float* dgate, float* dup, float* ddown) const;

 private:
  DenseFfnWeights dense_weights();
  FfnLayer& layer_;
  TrainMode last_ = TrainMode::Dense;
  bool have_grads_ = false;
  std::vector<float> gate_t_, up_t_;
  std::vector<float> dgate_, dup_, ddown_;  // dense: [F,d], [F,d], [d,F]; hybrid: dgate_ too
  std::vector<float> dupdown_;              // hybrid: [F,2,d]
  HybridTape htape_;
  DenseTape dtape_;
};

}  // namespace sparsellm
