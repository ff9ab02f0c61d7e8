// Training attention (train_attention.h): the portable build of the blocked loops and the run-time
// dispatch to the AVX2 / AVX-512 builds.
#include "train_attention.h"

#include "sparsellm/cpu_info.h"
#include "train_ops.h"

namespace sparsellm::trainops {

void attention_forward_avx2(const float* q, const float* k, const float* v, int64_t ld_in, int64_t B, int64_t T,
                            int64_t H, int64_t hd, float* P, float* out, int64_t ld_out);
void attention_backward_avx2(const float* q, const float* k, const float* v, int64_t ld_in, const float* P,
                             const float* dout, int64_t ld_out, int64_t B, int64_t T, int64_t H, int64_t hd, float* dq,
                             float* dk, float* dv, int64_t ld_grad);
void attention_forward_avx512(const float* q, const float* k, const float* v, int64_t ld_in, int64_t B, int64_t T,
                              int64_t H, int64_t hd, float* P, float* out, int64_t ld_out);
void attention_backward_avx512(const float* q, const float* k, const float* v, int64_t ld_in, const float* P,
                               const float* dout, int64_t ld_out, int64_t B, int64_t T, int64_t H, int64_t hd,
                               float* dq, float* dk, float* dv, int64_t ld_grad);

void attention_forward(const float* q, const float* k, const float* v, int64_t ld_in, int64_t B, int64_t T, int64_t H,
                       int64_t hd, float* P, float* out, int64_t ld_out) {
  switch (active_isa()) {
    case Isa::Avx512: return attention_forward_avx512(q, k, v, ld_in, B, T, H, hd, P, out, ld_out);
    case Isa::Avx2: return attention_forward_avx2(q, k, v, ld_in, B, T, H, hd, P, out, ld_out);
    default:
      return attention_forward_impl(block_product_loops, q, k, v, ld_in, B, T, H, hd, P, out, ld_out, num_threads());
  }
}

void attention_backward(const float* q, const float* k, const float* v, int64_t ld_in, const float* P,
                        const float* dout, int64_t ld_out, int64_t B, int64_t T, int64_t H, int64_t hd, float* dq,
                        float* dk, float* dv, int64_t ld_grad) {
  switch (active_isa()) {
    case Isa::Avx512:
      return attention_backward_avx512(q, k, v, ld_in, P, dout, ld_out, B, T, H, hd, dq, dk, dv, ld_grad);
    case Isa::Avx2: return attention_backward_avx2(q, k, v, ld_in, P, dout, ld_out, B, T, H, hd, dq, dk, dv, ld_grad);
    default:
      return attention_backward_impl(block_product_loops, q, k, v, ld_in, P, dout, ld_out, B, T, H, hd, dq, dk, dv,
                                     ld_grad, num_threads());
  }
}

}  // namespace sparsellm::trainops
