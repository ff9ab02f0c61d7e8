// AVX-512 read kernel of the memory-bandwidth probe: sums n floats as four concurrent streams
// (like the small-M GEMV's several weight rows in flight), with software prefetch 1 KiB ahead on
// each, so the probe is not weaker than the access pattern it is compared with.
#include <immintrin.h>

#include <cstdint>

namespace sparsellm::membw_detail {

float read_sum_avx512(const float* p, int64_t n) {
  constexpr int S = 4;
  const int64_t part = n / (S * 32) * 32;  // floats per stream, whole 128-byte steps
  __m512 s[S][2];
  for (int j = 0; j < S; ++j) s[j][0] = s[j][1] = _mm512_setzero_ps();
  for (int64_t i = 0; i < part; i += 32) {
    for (int j = 0; j < S; ++j) {
      const float* q = p + j * part + i;
      _mm_prefetch(reinterpret_cast<const char*>(q) + 1024, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(q) + 1088, _MM_HINT_T0);
      s[j][0] = _mm512_add_ps(s[j][0], _mm512_load_ps(q));
      s[j][1] = _mm512_add_ps(s[j][1], _mm512_load_ps(q + 16));
    }
  }
  __m512 t = _mm512_setzero_ps();
  for (int j = 0; j < S; ++j) t = _mm512_add_ps(t, _mm512_add_ps(s[j][0], s[j][1]));
  float r = _mm512_reduce_add_ps(t);
  for (int64_t i = S * part; i < n; ++i) r += p[i];
  return r;
}

}  // namespace sparsellm::membw_detail
