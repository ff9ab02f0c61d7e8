// Dense GEMM driver: C[M, N] = A[M, K] · Wᵀ (W [N, K], f32 or bf16).
// First version: a plain, correct, OpenMP-threaded implementation (blocks of N per thread,
// f32 accumulation). The blocked/packed fast path replaces the inner loops later; this one
// stays as the portable reference.
#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <stdexcept>
#include <vector>

#include "sparsellm/cpu_info.h"
#include "sparsellm/gemm.h"

namespace sparsellm {
namespace {

void check_args(const float* A, int64_t lda, int64_t M, const WeightView& W) {
  if (M < 0 || W.rows < 0 || W.cols < 0) throw std::invalid_argument("gemm: negative shape");
  if (W.ld < W.cols) throw std::invalid_argument("gemm: W.ld < W.cols");
  if (M > 0 && lda < W.cols) throw std::invalid_argument("gemm: lda < K");
  if (M > 0 && W.rows > 0 && W.cols > 0 && (!A || !W.data)) throw std::invalid_argument("gemm: null pointer");
  if (W.dtype != DType::F32 && W.dtype != DType::BF16) throw std::invalid_argument("gemm: W must be f32 or bf16");
}

// c[m, n] = sum_k A[m0+m, k] * W[n0+n, k] for m in [0, m1-m0), n in [0, n1-n0).
void block_portable(const float* A, int64_t lda, const WeightView& W, int64_t m0, int64_t m1,
                    int64_t n0, int64_t n1, float* c, int64_t ldc) {
  const int64_t K = W.cols;
  for (int64_t n = n0; n < n1; ++n) {
    if (W.dtype == DType::F32) {
      const float* w = static_cast<const float*>(W.data) + n * W.ld;
      for (int64_t m = m0; m < m1; ++m) {
        const float* a = A + m * lda;
        float s = 0;
        for (int64_t k = 0; k < K; ++k) s += a[k] * w[k];
        c[(m - m0) * ldc + (n - n0)] = s;
      }
    } else {
      const uint16_t* w = static_cast<const uint16_t*>(W.data) + n * W.ld;
      for (int64_t m = m0; m < m1; ++m) {
        const float* a = A + m * lda;
        float s = 0;
        for (int64_t k = 0; k < K; ++k) s += a[k] * bf16_to_f32(w[k]);
        c[(m - m0) * ldc + (n - n0)] = s;
      }
    }
  }
}

}  // namespace

void gemm(const float* A, int64_t lda, int64_t M, const WeightView& W, float* C, int64_t ldc) {
  check_args(A, lda, M, W);
  const int64_t N = W.rows;
  if (M == 0 || N == 0) return;
  if (ldc < N) throw std::invalid_argument("gemm: ldc < N");
  const int64_t nb = 64;
  const int64_t blocks = (N + nb - 1) / nb;
#pragma omp parallel for schedule(static) num_threads(num_threads())
  for (int64_t b = 0; b < blocks; ++b) {
    int64_t n0 = b * nb, n1 = std::min(N, n0 + nb);
    block_portable(A, lda, W, 0, M, n0, n1, C + n0, ldc);
  }
}

void gemm_epilogue(const float* A, int64_t lda, int64_t M, const WeightView& W,
                   const GemmEpilogue& epilogue, const GemmOptions& options) {
  check_args(A, lda, M, W);
  const int64_t N = W.rows;
  if (M == 0 || N == 0) return;
  int64_t nb = 64;
  if (options.n_align > 0) nb = (std::max<int64_t>(nb, options.n_align) + options.n_align - 1) / options.n_align * options.n_align;
  const int64_t mb = 64;
  const int64_t nblocks = (N + nb - 1) / nb, mblocks = (M + mb - 1) / mb;
#pragma omp parallel num_threads(num_threads())
  {
    std::vector<float> buf(static_cast<size_t>(mb * nb));
    const int thread = omp_get_thread_num();
#pragma omp for schedule(static) collapse(2)
    for (int64_t bn = 0; bn < nblocks; ++bn)
      for (int64_t bm = 0; bm < mblocks; ++bm) {
        int64_t n0 = bn * nb, n1 = std::min(N, n0 + nb);
        int64_t m0 = bm * mb, m1 = std::min(M, m0 + mb);
        block_portable(A, lda, W, m0, m1, n0, n1, buf.data(), nb);
        epilogue(m0, m1, n0, n1, buf.data(), nb, thread);
      }
  }
}

}  // namespace sparsellm
