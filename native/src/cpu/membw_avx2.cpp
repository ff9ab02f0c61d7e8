// AVX2 read kernel of the memory-bandwidth probe (see membw_avx512.cpp).
#include <immintrin.h>

#include <cstdint>

namespace sparsellm::membw_detail {

float read_sum_avx2(const float* p, int64_t n) {
  __m256 s[8];
  for (int i = 0; i < 8; ++i) s[i] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 64 <= n; i += 64)
    for (int j = 0; j < 8; ++j) s[j] = _mm256_add_ps(s[j], _mm256_load_ps(p + i + 8 * j));
  for (int j = 1; j < 8; ++j) s[0] = _mm256_add_ps(s[0], s[j]);
  alignas(32) float t[8];
  _mm256_store_ps(t, s[0]);
  float r = 0;
  for (int j = 0; j < 8; ++j) r += t[j];
  for (; i < n; ++i) r += p[i];
  return r;
}

}  // namespace sparsellm::membw_detail
