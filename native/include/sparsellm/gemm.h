// Dense GEMM: C[M, N] = A[M, K] · Wᵀ, with A f32 row-major and W [N, K] f32 or bf16 (bf16
// widened in registers). This is the baseline every sparse kernel is compared with, and the
// engine of the gate GEMM, whose TwELL packing runs as an epilogue on each finished block.
#pragma once
#include <cstdint>
#include <functional>

#include "sparsellm/tensor.h"

namespace sparsellm {

// Called once per finished output block C[m0:m1, n0:n1] with every K summed. `c` points at
// element (m0, n0) of a cache-resident buffer with leading dimension `ldc`; the epilogue may
// modify it in place. `thread` is the OpenMP thread index (for per-thread scratch). Blocks
// are disjoint and cover C exactly once; called concurrently from different threads.
using GemmEpilogue = std::function<void(int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                                        float* c, int64_t ldc, int thread)>;

struct GemmOptions {
  // Epilogue blocks start at multiples of n_align and span whole multiples of it (the last
  // block ends at N). 0 = any. The TwELL gate GEMM sets this to its tile width.
  int64_t n_align = 0;
};

// C = A · Wᵀ.  A [M, K] (lda), W [N, K], C [M, N] (ldc). Multi-threaded (OpenMP).
void gemm(const float* A, int64_t lda, int64_t M, const WeightView& W, float* C, int64_t ldc);

// Same product, but C is never written to memory by the GEMM: each finished block goes to
// `epilogue` instead (e.g. ReLU + TwELL packing).
void gemm_epilogue(const float* A, int64_t lda, int64_t M, const WeightView& W,
                   const GemmEpilogue& epilogue, const GemmOptions& options = {});

}  // namespace sparsellm
