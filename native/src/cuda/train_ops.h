// Internal (plain C++, no CUDA types): the training-only operations of the GPU trainer
// (train_ops.cu), the device counterparts of native/src/cpu/train_ops.h with the same formulas.
// Everything is f32 on the device (the CPU trainer's master precision); pointers are device
// pointers; work runs on the legacy default stream, in order. Defined only in builds with the
// CUDA backend (SPARSELLM_HAVE_CUDA).
//
// UNVERIFIED: written on a machine without a GPU; compile-checked and run through a host
// emulation of the kernels only, until scripts/gpu-check.sh passes on a GPU.
#pragma once
#include <cstdint>

namespace sparsellm::cuda::train {

// A strided (batched) f32 matrix operand: element (r, c) of batch (zo, zi) is
// p[zo·so + zi·si + r·rs + c·cs].
struct MatRef {
  const float* p = nullptr;
  int64_t rs = 0, cs = 0, so = 0, si = 0;
};

// The arithmetic of gemm_f32's products on the calling host thread: F32 (SIMT FMAs, the CPU
// trainer's f32; the default) or Bf16 (operands rounded to bf16, tensor cores, f32 accumulation).
// A MatmulScope sets it until the scope ends (the trainer wraps each step in one).
enum class MatmulPrecision : int { F32 = 0, Bf16 = 1 };
MatmulPrecision matmul_precision();
class MatmulScope {
 public:
  explicit MatmulScope(MatmulPrecision p);
  ~MatmulScope();
  MatmulScope(const MatmulScope&) = delete;
  MatmulScope& operator=(const MatmulScope&) = delete;

 private:
  MatmulPrecision prev_;
};

// Causal structure gemm_f32 may skip work on (the attention products, square in r and k):
// LowerA: A(r, k) = 0 for k > r (P·v, dS·k); UpperA: A(r, k) = 0 for k < r (Pᵀ·dout, dSᵀ·q):
// the zero products are not computed (the result is the same); LowerC: only C(r, n) with n ≤ r
// is wanted (q·kᵀ, dout·vᵀ): tiles wholly above the diagonal are not computed and keep what C
// held.
enum class Causal : int { None = 0, LowerA = 1, UpperA = 2, LowerC = 3 };

// C[r, n] (+)= Σ_{k < K} A(r, k)·B(k, n) for r < M, n < N, per batch (zo < nzo, zi < nzi); C of
// batch (zo, zi) at C + zo·cso + zi·csi, row-major with ldc. Overwrites unless `accumulate`.
// F32: accumulation in ascending k per element; Bf16: in the tensor cores' order (train_gemm.cu).
void gemm_f32(int64_t M, int64_t N, int64_t K, const MatRef& A, const MatRef& B, float* C, int64_t ldc, int64_t cso = 0,
              int64_t csi = 0, int64_t nzo = 1, int64_t nzi = 1, bool accumulate = false, Causal causal = Causal::None);
// One unbatched product whose row count M or depth K is capped by a device int32 (dynM / dynK,
// either may be null): the hybrid tail, whose size never leaves the device. The launch covers
// the host M (the capacity).
void gemm_f32_dyn(int64_t M, int64_t N, int64_t K, const MatRef& A, const MatRef& B, float* C, int64_t ldc,
                  bool accumulate, const int32_t* dynM, const int32_t* dynK);

// y [M, dout] = x [M, din]·Wᵀ, W [dout, din] (ldw = din unless given).
void linear_forward(const float* x, int64_t M, int64_t din, const float* W, int64_t dout, float* y);
// dx [M, din] = dy·W (skipped when dx is null); dW [dout, din] = dyᵀ·x, added when !first.
void linear_backward(const float* x, const float* dy, int64_t M, int64_t din, const float* W, int64_t dout, float* dx,
                     float* dW, bool first);

// RMSNorm (the CPU rmsnorm_forward / rmsnorm_backward): y = x·r ⊙ w, r = 1/sqrt(mean(x²) + eps)
// (sum of squares in float64); with `add`, x + add is normed and stored in `sum`.
void rmsnorm_forward(const float* x, const float* add, float* sum, int64_t M, int64_t d, const float* w, float eps,
                     float* y, float* rstd);
// dx (+)= r·(dy ⊙ w) − x·r³/d·Σ dy⊙w⊙x (float64 row sums); dw (+)= Σ_rows dy ⊙ x·r (float64,
// by fixed row chunks). `part` is device scratch of rmsnorm_backward_scratch(M, d) doubles.
void rmsnorm_backward(const float* x, const float* rstd, const float* w, const float* dy, int64_t M, int64_t d,
                      float* dx, bool accumulate, float* dw, bool dw_first, double* part);
int64_t rmsnorm_backward_scratch(int64_t M, int64_t d);

// Rotate-half RoPE in place on x [B·T, ld] (H heads of hd at columns 0..H·hd), tables cos, sin
// [context, hd/2] (device f32, the CPU rope_tables); inverse rotates by −angle.
void rope_apply(float* x, int64_t ld, int64_t B, int64_t T, int64_t H, int64_t hd, const float* cos_t,
                const float* sin_t, bool inverse);

// Causal attention of training (the CPU attention_forward/backward's results and layouts) that
// keeps no probabilities between the passes: forward stores each row's log-sum-exp, lse
// [B, H, T]; backward recomputes P = exp(q·kᵀ·scale − lse) (bit-for-bit the same scores: the
// same GEMM on the same operands). Both work through (sequence, head) chunks whose T × T scores
// fit `scratch_elems` (≥ T·T): forward needs one such buffer, backward two (2·scratch_elems).
// With MatmulPrecision::Bf16 and head_dim 64 or 128 the forward runs the flash kernel of
// attention_mma.h instead (no scratch): its scores are the same bf16 products, so a GEMM-path
// backward's recomputed P rows sum to 1 within f32 rounding (its lse takes exp2, not exp).
// q, k, v [B·T, ld_in]; out [B·T, ld_out]; dq, dk, dv [B·T, ld_grad] overwritten.
void attention_forward(const float* q, const float* k, const float* v, int64_t ld_in, int64_t B, int64_t T, int64_t H,
                       int64_t hd, float* lse, float* out, int64_t ld_out, float* scratch, int64_t scratch_elems);
// The elements per scratch buffer the trainer uses: the D rows of the flash backward where both
// passes run the flash kernels (bf16, head_dim 64 or 128), else (sequence, head) chunks of scores.
int64_t attention_scratch(int64_t B, int64_t T, int64_t H, int64_t hd, MatmulPrecision p);
// backward's `out` is the forward's output: with MatmulPrecision::Bf16 and head_dim 64 or 128 the flash
// backward (attention_mma.h) runs from it and the lse when the scratch holds its B·H·T floats.
void attention_backward(const float* q, const float* k, const float* v, int64_t ld_in, const float* lse,
                        const float* out, const float* dout, int64_t ld_out, int64_t B, int64_t T, int64_t H,
                        int64_t hd, float* dq, float* dk, float* dv, int64_t ld_grad, float* scratch,
                        int64_t scratch_elems);

// Row-wise softmax cross-entropy: logits [M, V] become (softmax − onehot)·gscale; Σ_rows
// −log softmax[target] is added to *loss_sum (device double). targets: device int32 [M].
void cross_entropy(float* logits, const int32_t* targets, int64_t M, int64_t V, float gscale, double* loss_sum);

// AdamW on n elements (the CPU adamw): g·gscale; m, v updated; w −= lr·(m·ic1/(sqrt(v·ic2) + eps)
// + wd·w) with ic1 = (float)(1/c1), ic2 = (float)(1/c2).
void adamw(float* w, const float* g, float* m, float* v, int64_t n, float lr, float b1, float b2, float eps, float wd,
           double c1, double c2, float gscale);

// *out += Σ x² (float64).
void sum_squares(const float* x, int64_t n, double* out);

// out[m, :d] = table[ids[m], :d]; and its backward G[ids[m], :d] += dx[m, :d] (atomic adds).
void embedding_forward(const float* table, const int32_t* ids, int64_t M, int64_t d, float* out);
void embedding_backward(const float* dx, const int32_t* ids, int64_t M, int64_t d, float* G);

// dst[i] += src[i].
void add_to(float* dst, const float* src, int64_t n);

// Dense FFN elementwise steps (the CPU dense_ffn_forward_train / dense_ffn_backward):
// forward: G = relu(G) in place, H = G ⊙ U; stats[0] (double) += Σ|H|, counts[0] += nnz
// (G > 0), counts[1] = max(counts[1], row nnz); fired[j] = 1 where a row has G[·, j] > 0
// (fired may be null). G, U, H [M, F].
void ffn_hidden(float* G, const float* U, float* H, int64_t M, int64_t F, double* l1_sum,
                unsigned long long* counts, uint8_t* fired);
// backward: h = G·U, dh = dH + lam·sgn(h); H = h, dU = dh·G, dG = G > 0 ? dh·U : 0 (dU in place
// of dH).
void ffn_hidden_backward(float* dH, const float* G, const float* U, float* dG, float* H, int64_t n, float lam);

// ---- Hybrid FFN (hybrid.h's math in f32: the CPU hybrid_forward / hybrid_backward) ----------
// Rows with at most W non-zeros of g = relu(x·W_gateᵀ) keep an ELL row (neuron, g, u at the
// pattern) and run sparse kernels; the others ("tail", ascending) run the dense path on gathered
// rows. The tail's size stays on the device (GEMMs and kernels read it): no host round trip.
// Buffers are device memory sized for M rows (capacity); the kept ones are the tape.
struct HybridBuffers {
  int64_t M = 0, d = 0, F = 0;
  int W = 0;
  // tape (kept between forward and backward)
  int32_t* row_nnz = nullptr;            // [M]
  int32_t* col = nullptr;                // [M, W]
  float *g = nullptr, *u = nullptr;      // [M, W]
  int32_t* tail = nullptr;               // [M] ascending tail rows
  int32_t* tail_count = nullptr;         // [1]
  float *Gt = nullptr, *Ut = nullptr;    // [≥ tail rows, F] the tail rows' relu'd gate and up values
  // scratch
  float* Gpre = nullptr;                 // [M, F] x·W_gateᵀ (forward)
  float *Ht = nullptr, *dHt = nullptr, *dGt = nullptr;  // [M, F]
  float *xt = nullptr, *yt = nullptr, *zt = nullptr;    // [M, d] gathered rows
  float *du = nullptr, *dg = nullptr;    // [M, W]
  int32_t *rank = nullptr, *list = nullptr;  // [M, W]
  int32_t *hist = nullptr, *offs = nullptr;  // [F], [F + 1]
};
// bf16 copies of the gate [F, d] and updown [F, 2, d] weights for the light rows' kernels (the
// per-row dot products and sums, which read 2·d weights per active neuron per row: half the
// bytes, and half the footprint in L2); null: they read the f32 weights. The gate GEMM and the
// tail's dense path always take the f32 weights (with MatmulPrecision::Bf16 they round them to
// the same bf16 values as they stage them). Given, the backward's light-row weight gradients
// also read x and dy rounded to bf16 (copies made in the xt and yt scratch), as those GEMMs do.
struct LightRowWeights {
  const uint16_t* gate = nullptr;
  const uint16_t* updown = nullptr;
};
// y [M, d] overwritten. l1_sum (double) += Σ|h|; counts (u64 [3]) += {nnz, max row nnz, tail
// rows}; fired[j] = 1 where g[·, j] > 0 (may be null); scratch_counts: u64 [2] device scratch.
// Gt and Ut must hold M rows (the tail's largest size).
void hybrid_ffn_forward(const float* x, const float* gate, const float* updown, const HybridBuffers& h, float* y,
                        double* l1_sum, unsigned long long* counts, uint8_t* fired, unsigned long long* scratch_counts,
                        const LightRowWeights& lw = {});
// The same forward in two calls, for a caller that sizes the tail's tape by need: _rows (the gate
// GEMM, the ELL rows, the tail list, the light rows' y) leaves the tail's row count at
// h.tail_count on the device; the caller reads it and points Gt and Ut at that many rows; _tail
// runs the dense path on the tail rows and scatters them into y.
void hybrid_ffn_forward_rows(const float* x, const float* gate, const float* updown, const HybridBuffers& h, float* y,
                             double* l1_sum, unsigned long long* counts, uint8_t* fired,
                             const LightRowWeights& lw = {});
void hybrid_ffn_forward_tail(const float* x, const float* gate, const float* updown, const HybridBuffers& h, float* y,
                             double* l1_sum, unsigned long long* scratch_counts);
// dx [M, d] overwritten; weight gradients dgate [F, d], dupdown [F, 2, d] (the weights' layout)
// overwritten when `first`, else added to. lam_m = λ/M.
void hybrid_ffn_backward(const float* x, const float* dy, const float* gate, const float* updown,
                         const HybridBuffers& h, float lam_m, float* dx, float* dgate, float* dupdown, bool first,
                         const LightRowWeights& lw = {});

}  // namespace sparsellm::cuda::train
