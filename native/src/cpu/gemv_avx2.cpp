// AVX2 row kernels of the decode GEMV (gemv_kernels.h): as gemv_avx512.cpp with 256-bit
// vectors (16 bf16 weights or 8 f32 per row per step). Sixteen ymm registers: 4 rows in flight
// for 1-2 tokens, 2 for 3-4 tokens. The last partial step of a row goes through a zero-padded
// copy. No standard-library templates (different ISA flags from the rest).
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "gemv_kernels.h"
#include "row_streams.h"

namespace sparsellm::gemv_detail {
namespace {

constexpr int streams(int M) { return M <= 2 ? 4 : 2; }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int M_, int S_>
struct Bf16Tile {
  static void run(const GemvArgs& a, const uint16_t* const* w, const uint16_t* const* nx, float* const* yo, int64_t ldy) {
    __m256 acc[M_][S_];
    for (int m = 0; m < M_; ++m)
      for (int s = 0; s < S_; ++s) acc[m][s] = _mm256_setzero_ps();
    const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
    const int64_t K = a.K, K2 = a.K2, pfe = a.pf / 2;
    const bool contiguous = detail::rows_follow<S_>(w, nx, K);
    auto step = [&](int64_t k, const __m256i* v) {
      const int64_t j = k / 2;
      __m256 we[S_], wo[S_];
      for (int s = 0; s < S_; ++s) {
        we[s] = _mm256_castsi256_ps(_mm256_slli_epi32(v[s], 16));
        wo[s] = _mm256_castsi256_ps(_mm256_and_si256(v[s], hi));
      }
      for (int m = 0; m < M_; ++m) {
        const __m256 a0 = _mm256_load_ps(a.xe + m * K2 + j), a1 = _mm256_load_ps(a.xo + m * K2 + j);
        for (int s = 0; s < S_; ++s) acc[m][s] = _mm256_fmadd_ps(a1, wo[s], _mm256_fmadd_ps(a0, we[s], acc[m][s]));
      }
    };
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      const int64_t kp = k + pfe;
      __m256i v[S_];
      for (int s = 0; s < S_; ++s) {
        v[s] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[s] + k));
        if ((k & 31) == 0)
          _mm_prefetch(reinterpret_cast<const char*>(contiguous || kp < K ? w[s] + kp : nx[s] + (kp - K)), _MM_HINT_T0);
      }
      step(k, v);
    }
    if (k < K) {
      __m256i v[S_];
      for (int s = 0; s < S_; ++s) {
        alignas(32) uint16_t t[16] = {};
        std::memcpy(t, w[s] + k, sizeof(uint16_t) * static_cast<size_t>(K - k));
        v[s] = _mm256_load_si256(reinterpret_cast<const __m256i*>(t));
      }
      step(k, v);
    }
    for (int m = 0; m < M_; ++m)
      for (int s = 0; s < S_; ++s) yo[s][m * ldy] = hsum(acc[m][s]);
  }
};

template <int M_, int S_>
struct F32Tile {
  static void run(const GemvArgs& a, const float* const* w, const float* const* nx, float* const* yo, int64_t ldy) {
    __m256 acc[M_][S_];
    for (int m = 0; m < M_; ++m)
      for (int s = 0; s < S_; ++s) acc[m][s] = _mm256_setzero_ps();
    const int64_t K = a.K, pfe = a.pf / 4, ldx = a.ldx;
    const bool contiguous = detail::rows_follow<S_>(w, nx, K);
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      const int64_t kp = k + pfe;
      __m256 wv[S_];
      for (int s = 0; s < S_; ++s) {
        wv[s] = _mm256_loadu_ps(w[s] + k);
        if ((k & 15) == 0)
          _mm_prefetch(reinterpret_cast<const char*>(contiguous || kp < K ? w[s] + kp : nx[s] + (kp - K)), _MM_HINT_T0);
      }
      for (int m = 0; m < M_; ++m) {
        const __m256 xv = _mm256_loadu_ps(a.x + m * ldx + k);
        for (int s = 0; s < S_; ++s) acc[m][s] = _mm256_fmadd_ps(xv, wv[s], acc[m][s]);
      }
    }
    float tail[M_][S_] = {};
    for (; k < K; ++k)
      for (int m = 0; m < M_; ++m)
        for (int s = 0; s < S_; ++s) tail[m][s] += a.x[m * ldx + k] * w[s][k];
    for (int m = 0; m < M_; ++m)
      for (int s = 0; s < S_; ++s) yo[s][m * ldy] = hsum(acc[m][s]) + tail[m][s];
  }
};

template <template <int, int> class Tile, int M_, typename T>
inline void rows(const GemvArgs& a, const T* W, int64_t ldw, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  detail::walk_row_streams<streams(M_)>(W, ldw, a.rows, n0, n1, y,
                                 [&](auto s, const T* const* w, const T* const* nx, float* const* yo) {
                                   Tile<M_, decltype(s)::value>::run(a, w, nx, yo, ldy);
                                 });
}

void bf16_rows(const GemvArgs& a, const uint16_t* W, int64_t ldw, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  switch (a.M) {
    case 1: return rows<Bf16Tile, 1>(a, W, ldw, n0, n1, y, ldy);
    case 2: return rows<Bf16Tile, 2>(a, W, ldw, n0, n1, y, ldy);
    case 3: return rows<Bf16Tile, 3>(a, W, ldw, n0, n1, y, ldy);
    default: return rows<Bf16Tile, 4>(a, W, ldw, n0, n1, y, ldy);
  }
}
void f32_rows(const GemvArgs& a, const float* W, int64_t ldw, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  switch (a.M) {
    case 1: return rows<F32Tile, 1>(a, W, ldw, n0, n1, y, ldy);
    case 2: return rows<F32Tile, 2>(a, W, ldw, n0, n1, y, ldy);
    case 3: return rows<F32Tile, 3>(a, W, ldw, n0, n1, y, ldy);
    default: return rows<F32Tile, 4>(a, W, ldw, n0, n1, y, ldy);
  }
}

const GemvKernels k_avx2{"avx2 4/2 streams", true, bf16_rows, f32_rows, nullptr};

}  // namespace

const GemvKernels& gemv_kernels_avx2() { return k_avx2; }

}  // namespace sparsellm::gemv_detail
