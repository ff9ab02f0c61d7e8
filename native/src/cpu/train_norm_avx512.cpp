// RMSNorm of training and the gradient's sum of squares (train_norm.h) compiled for AVX-512;
// called only when the CPU has it.
#include "sparsellm/cpu_info.h"
#include "train_norm.h"

namespace sparsellm::trainops {

void rmsnorm_forward_avx512(const float* x, const float* add, float* sum, int64_t M, int64_t d, const float* w,
                            float eps, float* y, float* rstd) {
  rmsnorm_forward_impl(x, add, sum, M, d, w, eps, y, rstd, num_threads());
}

void rmsnorm_backward_avx512(const float* x, const float* rstd, const float* w, const float* dy, int64_t M, int64_t d,
                             float* dx, bool accumulate, float* dw, bool dw_first) {
  rmsnorm_backward_impl(x, rstd, w, dy, M, d, dx, accumulate, dw, dw_first, num_threads());
}

double sum_squares_avx512(const float* x, int64_t n) { return sum_squares_impl(x, n, num_threads()); }

}  // namespace sparsellm::trainops
