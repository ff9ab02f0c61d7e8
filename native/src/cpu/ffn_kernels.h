// Internal: the vector primitives of the sparse FFN kernels, one table per ISA (portable,
// AVX2+FMA, AVX-512), chosen at run time by ffn_ops() from active_isa(). Weights are f32 or
// bf16 (widened in registers); everything accumulates in f32.
#pragma once
#include <cstdint>

#include "sparsellm/tensor.h"

namespace sparsellm::detail {

struct FfnOps {
  // Σ_k x[k]·w[k]
  float (*dot)(const float* x, const void* w, DType dt, int64_t n);
  // y[k] += a·w[k]
  void (*axpy)(float* y, float a, const void* w, DType dt, int64_t n);
  // Gated fused neuron loop for one token: for i < cnt, with block b = ud + j[i]·2·ld:
  //   u = x·b[0:d];  y += (g[i]·u)·b[ld:ld+d].  If `u_out` is not null it receives u.
  void (*updown)(const float* x, const int32_t* j, const float* g, int64_t cnt, const void* ud,
                 DType dt, int64_t ld, int64_t d, float* y, float* u_out);
  // Sparse down for one token: y += Σ_i h[i]·w[j[i]·ldw : +d]
  void (*down)(const int32_t* j, const float* h, int64_t cnt, const void* w, DType dt,
               int64_t ldw, int64_t d, float* y);
  // One neuron applied to several tokens of a block (the weights are read once for all):
  //   for i < n: u = x[t[i]·ldx]·b[0:d];  y[t[i]·ldy] += (g[i]·u)·b[ld:ld+d]
  // `next` (may be null): the next neuron's block, prefetched meanwhile.
  void (*updown_batch)(const float* x, int64_t ldx, const int32_t* t, const float* g, int64_t n,
                       const void* b, DType dt, int64_t ld, int64_t d, float* y, int64_t ldy,
                       const void* next);
  //   for i < n: y[t[i]·ldy] += h[i]·w[0:d]
  void (*down_batch)(const int32_t* t, const float* h, int64_t n, const void* w, DType dt,
                     int64_t d, float* y, int64_t ldy, const void* next);
  // The non-zero entries of src[0:n] in order: js[k] = base + position, vs[k] = value (NaN counts
  // as non-zero). Returns their number.
  int64_t (*nonzeros)(const float* src, int64_t n, int32_t base, int32_t* js, float* vs);
  // --- Two-phase path (docs/kernels.md "Two-phase up+down") ---
  // Phase 1 (sampled up product), one chunk of n ≤ kSpmmCols columns for tokens m0 ≤ m < m1, the
  // token's x chunk held in registers while its pairs are walked. `x` and `w` point at the chunk's
  // first column of row 0 (rows ldx / ldw apart):
  //   u[i] = (accumulate ? u[i] : 0) + x[m·ldx : +n] · w[j[i]·ldw : +n],  ptr[m] ≤ i < ptr[m+1]
  void (*updot)(const int64_t* ptr, int64_t m0, int64_t m1, const int32_t* j, const float* x,
                int64_t ldx, const void* w, DType dt, int64_t ldw, int64_t n, float* u,
                bool accumulate);
  // Phase 2 (sparse × dense down), one chunk of n ≤ kSpmmCols columns for tokens m0 ≤ m < m1, the
  // chunk's outputs held in registers while the token's pairs are walked. `w` points at the chunk's
  // first column of row 0 (rows ldw apart), `bias` (may be null) and `y` at the chunk's first column:
  //   y[m·ldy + c] = bias[c] + Σ_{ptr[m] ≤ i < ptr[m+1]} h[i] · w[j[i]·ldw + c],  c < n
  void (*spmm)(const int64_t* ptr, int64_t m0, int64_t m1, const int32_t* j, const float* h,
               const void* w, DType dt, int64_t ldw, int64_t n, const float* bias, float* y,
               int64_t ldy);
};

// Widest chunk of FfnOps::spmm (every ISA), and the width of the packed down panels.
constexpr int64_t kSpmmCols = 256;

// Whether the sparse up+down of M tokens with nnz active pairs over F neurons takes the two-phase
// path (ffn.cpp; see set_sparse_kernel in sparsellm/ffn.h).
bool ffn_use_two_phase(int64_t M, int64_t nnz, int64_t F);

// Bytes of a panel's neuron range in the two-phase path (ffn.cpp, kRangeBytes): 0 restores the
// default (or SPARSELLM_FFN_RANGE_KB). Tests set tiny ranges so that small shapes span several.
void ffn_set_two_phase_range_bytes(int64_t bytes);

const FfnOps& ffn_ops();  // for the active ISA

const FfnOps& ffn_ops_portable();
const FfnOps& ffn_ops_avx2();    // only call when the CPU has AVX2+FMA
const FfnOps& ffn_ops_avx512();  // only call when the CPU has AVX-512

}  // namespace sparsellm::detail
