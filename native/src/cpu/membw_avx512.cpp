// AVX-512 read kernel of the memory-bandwidth probe: sums n floats with 8 independent
// accumulators (enough loads in flight to saturate the memory system from one core).
#include <immintrin.h>

#include <cstdint>

namespace sparsellm::membw_detail {

float read_sum_avx512(const float* p, int64_t n) {
  __m512 s[8];
  for (int i = 0; i < 8; ++i) s[i] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 128 <= n; i += 128)
    for (int j = 0; j < 8; ++j) s[j] = _mm512_add_ps(s[j], _mm512_load_ps(p + i + 16 * j));
  for (int j = 1; j < 8; ++j) s[0] = _mm512_add_ps(s[0], s[j]);
  float r = _mm512_reduce_add_ps(s[0]);
  for (; i < n; ++i) r += p[i];
  return r;
}

}  // namespace sparsellm::membw_detail
