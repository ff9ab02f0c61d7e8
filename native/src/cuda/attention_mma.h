// Internal (plain C++): causal prefill attention on the tensor cores (attention_mma.cu), one of
// the kernels behind attention_device (kernel_policy.h AttentionKernel::Mma; unverified).
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

}  // namespace sparsellm::cuda
