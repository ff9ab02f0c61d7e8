// Host entry points of the Hopper wgmma/TMA GEMM (gemm_wgmma.cu), used by gemm.cu's dispatch.
#pragma once
#include <cstdint>

#include "gemm_kernel.cuh"

namespace sparsellm::cuda::detail {

// True when the current device has compute capability 9.0, this build carries the sm_90a
// kernels and the driver exports the TMA descriptor encoder (checked once per process).
bool wgmma_supported();

// out = epi(A · Wᵀ) on the wgmma kernel; `cluster` 1 or 2 (blocks sharing W stages by TMA
// multicast). Returns false, launching nothing, when the operands do not meet TMA's
// requirements (K = 0, strides or pointers not 16-byte aligned): the caller falls back.
// The TwELL epilogue (p.twell) needs tile widths dividing 256.
bool wgmma_gemm(const uint16_t* A, int64_t lda, const uint16_t* W, int64_t ldw, int64_t M, int64_t N, int64_t K,
                const EpiParams& p, int cluster);

}  // namespace sparsellm::cuda::detail
