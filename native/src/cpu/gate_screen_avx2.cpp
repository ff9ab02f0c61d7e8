// AVX2 int8 row kernel of the screened gate (gate_screen.h): as gate_screen_avx512.cpp with
// 8-lane widenings (int8 → int32 → f32), 4 rows in flight for 1-2 tokens, 2 for 3-4 tokens;
// the last K mod 8 elements are added in scalar code.
#include <immintrin.h>

#include <cstdint>

#include "gate_screen.h"

namespace sparsellm::gate_screen_detail {
namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int M_, int S_>
inline void avx2_tile(const ScreenArgs& a, const int8_t* const* q, const int8_t* const* nx, float* const* out,
                 int64_t ldd) {
  __m256 acc[M_][S_];
  for (int m = 0; m < M_; ++m)
    for (int s = 0; s < S_; ++s) acc[m][s] = _mm256_setzero_ps();
  const int64_t K = a.K, ldx = a.ldx, pf = a.pf;
  const float* x = a.x;
  const bool contiguous = detail::rows_follow<S_>(q, nx, K);  // prefetch past the row's end
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    if ((k & 63) == 0) {
      const int64_t kp = k + pf;
      for (int s = 0; s < S_; ++s)
        _mm_prefetch(reinterpret_cast<const char*>(contiguous || kp < K ? q[s] + kp : nx[s] + (kp - K)), _MM_HINT_T0);
    }
    __m256 wv[S_];
    for (int s = 0; s < S_; ++s)
      wv[s] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q[s] + k))));
    for (int m = 0; m < M_; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * ldx + k);
      for (int s = 0; s < S_; ++s) acc[m][s] = _mm256_fmadd_ps(xv, wv[s], acc[m][s]);
    }
  }
  for (int m = 0; m < M_; ++m)
    for (int s = 0; s < S_; ++s) {
      float t = hsum(acc[m][s]);
      for (int64_t j = k; j < K; ++j) t += x[m * ldx + j] * static_cast<float>(q[s][j]);
      out[s][m * ldd] = t;
    }
}

struct Kernel {
  static constexpr int streams(int M) { return M <= 2 ? 4 : 2; }  // rows in flight
  template <int M_, int S_>
  static void tile(const ScreenArgs& a, const int8_t* const* q, const int8_t* const* nx, float* const* out, int64_t ldd) {
    avx2_tile<M_, S_>(a, q, nx, out, ldd);
  }
};

}  // namespace

RowsI8 screen_kernel_avx2() { return walk_rows<Kernel>; }

}  // namespace sparsellm::gate_screen_detail
