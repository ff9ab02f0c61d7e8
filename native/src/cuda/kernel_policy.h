// Internal (plain C++): which CUDA kernels run by default. Kernels written on a machine without a
// GPU and not yet through a passing run of scripts/gpu-check.sh ("unverified": the Hopper wgmma
// GEMM, the grouped fused up+down with its auto-tuning, the two-kernel sparse decode) stay off
// by default; the verified kernels they would replace (mma.sync GEMM, row up+down, one-kernel
// decode) run instead. SPARSELLM_CUDA_UNVERIFIED=1 turns them on for a whole process; tests and
// benchmarks select them explicitly. Flip the default once a GPU run has passed with them.
#pragma once

namespace sparsellm::cuda {

bool unverified_kernels();
// Process-wide, not thread-safe: for tests and benchmarks.
void set_unverified_kernels(bool on);

}  // namespace sparsellm::cuda
