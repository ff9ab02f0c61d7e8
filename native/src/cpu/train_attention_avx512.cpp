// Training attention (train_attention.h) compiled for AVX-512, with a register-tiled product
// kernel: up to kRows rows by 32 columns of C in 2·R zmm accumulators, B rows loaded under a
// mask (no reads past the matrix), A broadcast element by element. Called only when the CPU has
// AVX-512.
#include <immintrin.h>

#include "sparsellm/cpu_info.h"
#include "train_attention.h"

namespace sparsellm::trainops {
namespace {

inline __mmask16 lanes(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1); }

template <int R, int NV>
inline void tile(int64_t n_left, int64_t K, const float* A, int64_t ars, int64_t aks, const float* B, int64_t ldb,
                 float* C, int64_t ldc, bool acc) {
  const __mmask16 m0 = lanes(n_left), m1 = lanes(n_left - 16);
  __m512 c0[R], c1[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) c0[r] = c1[r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m512 b0 = _mm512_maskz_loadu_ps(m0, B);
    const __m512 b1 = NV == 2 ? _mm512_maskz_loadu_ps(m1, B + 16) : _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(A[r * ars]);
      c0[r] = _mm512_fmadd_ps(a, b0, c0[r]);
      if (NV == 2) c1[r] = _mm512_fmadd_ps(a, b1, c1[r]);
    }
    A += aks;
    B += ldb;
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* c = C + r * ldc;
    if (acc) c0[r] = _mm512_add_ps(c0[r], _mm512_maskz_loadu_ps(m0, c));
    _mm512_mask_storeu_ps(c, m0, c0[r]);
    if (NV == 2) {
      if (acc) c1[r] = _mm512_add_ps(c1[r], _mm512_maskz_loadu_ps(m1, c + 16));
      _mm512_mask_storeu_ps(c + 16, m1, c1[r]);
    }
  }
}

template <int R>
void rows(int64_t N, int64_t K, const float* A, int64_t ars, int64_t aks, const float* B, int64_t ldb, float* C,
          int64_t ldc, bool acc) {
  for (int64_t n0 = 0; n0 < N; n0 += 32) {
    if (N - n0 > 16) tile<R, 2>(N - n0, K, A, ars, aks, B + n0, ldb, C + n0, ldc, acc);
    else tile<R, 1>(N - n0, K, A, ars, aks, B + n0, ldb, C + n0, ldc, acc);
  }
}

void block_product_avx512(int R, int64_t N, int64_t K, const float* A, int64_t ars, int64_t aks, const float* B,
                          int64_t ldb, float* C, int64_t ldc, bool acc) {
  switch (R) {
    case 1: return rows<1>(N, K, A, ars, aks, B, ldb, C, ldc, acc);
    case 2: return rows<2>(N, K, A, ars, aks, B, ldb, C, ldc, acc);
    case 3: return rows<3>(N, K, A, ars, aks, B, ldb, C, ldc, acc);
    case 4: return rows<4>(N, K, A, ars, aks, B, ldb, C, ldc, acc);
    case 5: return rows<5>(N, K, A, ars, aks, B, ldb, C, ldc, acc);
    case 6: return rows<6>(N, K, A, ars, aks, B, ldb, C, ldc, acc);
    case 7: return rows<7>(N, K, A, ars, aks, B, ldb, C, ldc, acc);
    default: return rows<8>(N, K, A, ars, aks, B, ldb, C, ldc, acc);
  }
}
static_assert(kRows == 8, "block_product_avx512 unrolls up to 8 rows");

}  // namespace

void attention_forward_avx512(const float* q, const float* k, const float* v, int64_t ld_in, int64_t B, int64_t T,
                              int64_t H, int64_t hd, float* P, float* out, int64_t ld_out) {
  attention_forward_impl(block_product_avx512, q, k, v, ld_in, B, T, H, hd, P, out, ld_out, num_threads());
}

void attention_backward_avx512(const float* q, const float* k, const float* v, int64_t ld_in, const float* P,
                               const float* dout, int64_t ld_out, int64_t B, int64_t T, int64_t H, int64_t hd,
                               float* dq, float* dk, float* dv, int64_t ld_grad) {
  attention_backward_impl(block_product_avx512, q, k, v, ld_in, P, dout, ld_out, B, T, H, hd, dq, dk, dv, ld_grad,
                          num_threads());
}

}  // namespace sparsellm::trainops
