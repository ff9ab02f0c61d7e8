// Training attention (train_attention.h) compiled for AVX2; called only when the CPU has it.
#include "sparsellm/cpu_info.h"
#include "train_attention.h"

namespace sparsellm::trainops {

void attention_forward_avx2(const float* q, const float* k, const float* v, int64_t ld_in, int64_t B, int64_t T,
                            int64_t H, int64_t hd, float* P, float* out, int64_t ld_out) {
  attention_forward_impl(block_product_loops, q, k, v, ld_in, B, T, H, hd, P, out, ld_out, num_threads());
}

void attention_backward_avx2(const float* q, const float* k, const float* v, int64_t ld_in, const float* P,
                             const float* dout, int64_t ld_out, int64_t B, int64_t T, int64_t H, int64_t hd, float* dq,
                             float* dk, float* dv, int64_t ld_grad) {
  attention_backward_impl(block_product_loops, q, k, v, ld_in, P, dout, ld_out, B, T, H, hd, dq, dk, dv, ld_grad,
                          num_threads());
}

}  // namespace sparsellm::trainops
