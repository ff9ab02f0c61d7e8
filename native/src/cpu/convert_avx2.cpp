// F16C conversions for packing (compiled with -mavx2 -mf16c; called only when active_isa() >=
// Avx2). vcvtps2ph with imm 0 rounds to nearest even with IEEE subnormals and overflow to Inf,
// which is the reference rounding; NaNs are made quiet explicitly so the result never depends on
// the instruction's NaN handling.
#include <immintrin.h>

#include "sparsellm/convert.h"

namespace sparsellm::convert_detail {

void f32_to_f16_avx2(const uint32_t* src, uint16_t* dst, size_t n) {
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff);
  const __m256i inf = _mm256_set1_epi32(0x7f800000);
  const __m256i quiet = _mm256_set1_epi32(0x00400000);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(x, abs_mask), inf);
    x = _mm256_or_si256(x, _mm256_and_si256(nan, quiet));
    const __m128i h = _mm256_cvtps_ph(_mm256_castsi256_ps(x), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  for (; i < n; ++i) dst[i] = f32_to_f16_ref(src[i]);
}

void f16_to_f32_avx2(const uint16_t* src, uint32_t* dst, size_t n) {
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff);
  const __m256i inf = _mm256_set1_epi32(0x7f800000);
  const __m256i quiet = _mm256_set1_epi32(0x00400000);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    __m256i x = _mm256_castps_si256(_mm256_cvtph_ps(h));
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(x, abs_mask), inf);
    x = _mm256_or_si256(x, _mm256_and_si256(nan, quiet));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), x);
  }
  for (; i < n; ++i) dst[i] = f16_to_f32_ref(src[i]);
}

}  // namespace sparsellm::convert_detail
