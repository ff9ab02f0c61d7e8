// AVX-512 int8 row kernel of the screened gate (gate_screen.h): S rows in flight per thread,
// each from its own contiguous run of rows, 64 bytes per row per step (four 16-lane widenings
// int8 → int32 → f32), a prefetch `pf` bytes ahead on every run, f32 FMAs into M x S
// accumulators. Rows are zero padded to ldq; x is read with a mask past K.
#include <immintrin.h>

#include <cstdint>

#include "gate_screen.h"

namespace sparsellm::gate_screen_detail {
namespace {

constexpr int S = 4;

template <int M_, int S_>
inline void avx512_tile(const ScreenArgs& a, const int8_t* const* q, const int8_t* const* nx, float* const* out,
                 int64_t ldd) {
  __m512 acc[M_][S_];
  for (int m = 0; m < M_; ++m)
    for (int s = 0; s < S_; ++s) acc[m][s] = _mm512_setzero_ps();
  const int64_t K = a.K, ldx = a.ldx, pf = a.pf;
  const float* x = a.x;
  // Rows that follow each other (K a multiple of 64): the prefetch runs on into the next row
  // without a per-step select (the select's mispredicted branch cost ~10% of the rate).
  const bool contiguous = detail::rows_follow<S_>(q, nx, K);
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) {
    const int64_t kp = k + pf;
    for (int s = 0; s < S_; ++s)
      _mm_prefetch(reinterpret_cast<const char*>(contiguous || kp < K ? q[s] + kp : nx[s] + (kp - K)), _MM_HINT_T0);
    for (int c = 0; c < 4; ++c) {
      __m512 wv[S_];
      for (int s = 0; s < S_; ++s)
        wv[s] = _mm512_cvtepi32_ps(
            _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q[s] + k + 16 * c))));
      for (int m = 0; m < M_; ++m) {
        const __m512 xv = _mm512_loadu_ps(x + m * ldx + k + 16 * c);
        for (int s = 0; s < S_; ++s) acc[m][s] = _mm512_fmadd_ps(xv, wv[s], acc[m][s]);
      }
    }
  }
  for (; k < K; k += 16) {
    const __mmask16 km = K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
    __m512 wv[S_];
    for (int s = 0; s < S_; ++s)  // rows are zero padded to a multiple of 64 bytes
      wv[s] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q[s] + k))));
    for (int m = 0; m < M_; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(km, x + m * ldx + k);
      for (int s = 0; s < S_; ++s) acc[m][s] = _mm512_fmadd_ps(xv, wv[s], acc[m][s]);
    }
  }
  for (int m = 0; m < M_; ++m)
    for (int s = 0; s < S_; ++s) out[s][m * ldd] = _mm512_reduce_add_ps(acc[m][s]);
}

struct Kernel {
  static constexpr int streams(int) { return S; }
  template <int M_, int S_>
  static void tile(const ScreenArgs& a, const int8_t* const* q, const int8_t* const* nx, float* const* out, int64_t ldd) {
    avx512_tile<M_, S_>(a, q, nx, out, ldd);
  }
};

}  // namespace

RowsI8 screen_kernel_avx512() { return walk_rows<Kernel>; }

}  // namespace sparsellm::gate_screen_detail
