// The attention row softmax (model_kernels.h) compiled for AVX2; called only when the CPU has it.
#include "model_kernels.h"
#include "sparsellm/cpu_info.h"

namespace sparsellm {

void softmax_causal_rows_avx2(float* S, int64_t ldS, int64_t T, int64_t n_cols, int64_t pos0, float scale) {
  softmax_causal_rows_impl(S, ldS, T, n_cols, pos0, scale, num_threads());
}

}  // namespace sparsellm
