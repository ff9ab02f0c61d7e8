// Internal (plain C++): causal attention on the tensor cores (attention_mma.cu; unverified): one
// of the kernels behind the model's attention_device (kernel_policy.h AttentionKernel::Mma) and
// the GPU trainer's forward attention with bf16 matmuls (train_ops.h attention_forward).
#pragma once
#include <cstdint>

namespace sparsellm::cuda {

// Head dims with a tensor-core kernel; attention_device uses another kernel for the rest.
bool attention_mma_supported(int64_t head_dim);

// out[t, h·hd ..] (bf16) = softmax(q_t·K^T·scale, keys 0 .. pos0 + t)·V for the T queries at
// positions pos0 .. pos0 + T − 1; head h reads cache head h / group ([kv_head][cap][hd], f32);
// columns n_heads·hd .. ldo − 1 zeroed. q, K, V and the probabilities are rounded to bf16 for the
// products, scores and sums are f32. hd must be supported.
void attention_mma(const float* q, int64_t ldq, int64_t T, int n_heads, int group, int hd, const float* ck,
                   const float* cv, int64_t cap, int64_t pos0, float scale, uint16_t* out, int64_t ldo);

// Training's forward (train_ops.h attention_forward's layout: B sequences of T rows of q, k and v
// with ld_in, head h at columns h·hd, no grouping): out [B·T, ld_out] f32 and lse [B, H, T] (the
// natural log-sum-exp of each row's scaled scores). The scores are those of a bf16 GEMM of the
// same operands, so that the backward's bf16 recomputation of P matches the lse.
void attention_mma_train(const float* q, const float* k, const float* v, int64_t ld_in, int64_t B, int64_t T,
                         int64_t H, int hd, float* lse, float* out, int64_t ld_out);

// Training's backward for head_dim 64 and 128 (attention_mma_bwd.cu): from the forward's lse and output
// `out` ([B·T, ld_out], as dout), dq, dk, dv [B·T, ld_grad] overwritten; delta: device scratch of
// attention_mma_backward_scratch(B, T, H) floats (D = rowsum(dout ⊙ out) per row and head).
bool attention_mma_backward_supported(int64_t head_dim);
int64_t attention_mma_backward_scratch(int64_t B, int64_t T, int64_t H);
void attention_mma_train_backward(const float* q, const float* k, const float* v, int64_t ld_in, const float* lse,
                                  const float* out, const float* dout, int64_t ld_out, int64_t B, int64_t T, int64_t H,
                                  int hd, float* dq, float* dk, float* dv, int64_t ld_grad, float* delta);

}  // namespace sparsellm::cuda
