// Internal (plain C++): which CUDA kernels run by default. Kernels written on a machine without a
// GPU and not yet through a passing run of scripts/gpu-check.sh ("unverified": the Hopper wgmma
// GEMM, the grouped fused up+down with its auto-tuning, the two-kernel sparse decode, the tiled
// and the tensor-core prefill attention) stay off by default; the verified kernels they would replace (mma.sync
// GEMM, row up+down, one-kernel decode, per-(query, head) attention) run instead.
// SPARSELLM_CUDA_UNVERIFIED=1 turns them on for a whole process; tests and benchmarks select
// them explicitly. Flip the default once a GPU run has passed with them.
#pragma once

namespace sparsellm::cuda {

bool unverified_kernels();
// Process-wide, not thread-safe: for tests and benchmarks.
void set_unverified_kernels(bool on);

// Causal attention of the model's forward (attention_device): Auto runs the per-(query, head)
// kernel, and once unverified kernels are allowed (compile-checked, emulated on the host only),
// for calls of at least one query tile (32), the tensor-core kernel (attention_mma.h) where it has
// the head_dim (64, 128) and the tiled SIMT prefill kernel elsewhere; PerQuery, Tiled and Mma force
// one kernel for every call (tests; Mma only for its head dims). Process-wide, not thread-safe.
enum class AttentionKernel : int { Auto = 0, PerQuery = 1, Tiled = 2, Mma = 3 };
AttentionKernel attention_kernel_choice();
void set_attention_kernel(AttentionKernel k);

}  // namespace sparsellm::cuda
