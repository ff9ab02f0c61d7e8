// RMSNorm of training and the gradient's sum of squares (train_norm.h): the portable build and the
// run-time dispatch to the AVX-512 build.
#include "train_norm.h"

#include "sparsellm/cpu_info.h"
#include "train_ops.h"

namespace sparsellm::trainops {

void rmsnorm_forward_avx512(const float* x, const float* add, float* sum, int64_t M, int64_t d, const float* w,
                            float eps, float* y, float* rstd);
void rmsnorm_backward_avx512(const float* x, const float* rstd, const float* w, const float* dy, int64_t M, int64_t d,
                             float* dx, bool accumulate, float* dw, bool dw_first);
double sum_squares_avx512(const float* x, int64_t n);

void rmsnorm_forward(const float* x, const float* add, float* sum, int64_t M, int64_t d, const float* w, float eps,
                     float* y, float* rstd) {
  if (active_isa() == Isa::Avx512) return rmsnorm_forward_avx512(x, add, sum, M, d, w, eps, y, rstd);
  rmsnorm_forward_impl(x, add, sum, M, d, w, eps, y, rstd, num_threads());
}

void rmsnorm_backward(const float* x, const float* rstd, const float* w, const float* dy, int64_t M, int64_t d,
                      float* dx, bool accumulate, float* dw, bool dw_first) {
  if (active_isa() == Isa::Avx512) return rmsnorm_backward_avx512(x, rstd, w, dy, M, d, dx, accumulate, dw, dw_first);
  rmsnorm_backward_impl(x, rstd, w, dy, M, d, dx, accumulate, dw, dw_first, num_threads());
}

double sum_squares(const float* x, int64_t n) {
  if (active_isa() == Isa::Avx512) return sum_squares_avx512(x, n);
  return sum_squares_impl(x, n, num_threads());
}

}  // namespace sparsellm::trainops
