// The attention row softmax and decode query (model_kernels.h) compiled for AVX512; called only when the CPU has it.
#include "model_kernels.h"
#include "sparsellm/cpu_info.h"

namespace sparsellm {

void softmax_causal_rows_avx512(float* S, int64_t ldS, int64_t T, int64_t n_cols, int64_t pos0, float scale) {
  softmax_causal_rows_impl(S, ldS, T, n_cols, pos0, scale, num_threads());
}

void attend_one_avx512(const float* q, const float* K, const float* V, int64_t hd, int64_t n_keys, float scale,
                       float* scores, float* orow) {
  attend_one_impl(q, K, V, hd, n_keys, scale, scores, orow);
}

}  // namespace sparsellm
