// The attention row softmax and decode query (model_kernels.h) compiled for AVX512; called only
// when the CPU has it. The decode query is written with intrinsics: compiled from the generic
// loops, its exponentials stayed scalar and each key's dot product ended in a reduction through
// the stack. No standard-library templates (different ISA flags from the rest).
#include <immintrin.h>

#include "model_kernels.h"
#include "sparsellm/cpu_info.h"

namespace sparsellm {
namespace {

inline __mmask16 lanes(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1u); }

// exp(x) for x <= 0, 16 lanes: the same reduction and polynomial as exp_nonpositive.
inline __m512 exp_nonpositive16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_add_ps(_mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x),
                                 _mm512_mul_ps(n, _mm512_set1_ps(2.12194440e-4f)));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(bits));
}

}  // namespace

void softmax_causal_rows_avx512(float* S, int64_t ldS, int64_t T, int64_t n_cols, int64_t pos0, float scale) {
  softmax_causal_rows_impl(S, ldS, T, n_cols, pos0, scale, num_threads());
}

namespace {

// 16 cached elements as f32 lanes: f32 as they are, bf16 widened (zero-extend, shift into the
// high half). Masked forms read only the lanes of m.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline __m512 load16(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

template <typename T>
void attend_one(const float* q, const T* K, const T* V, int64_t hd, int64_t n_keys, float scale, float* scores,
                float* orow) {
  const int64_t pf = kAttendPrefetchRows;
  // Scores: each key's products in 16 lanes (masked last chunk), reduced by the tree reduction.
  const __m512 mx = _mm512_set1_ps(attend_scores(q, K, V, hd, n_keys, scale, scores, [](const float* x, const T* kr, int64_t n) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), load16(kr + i), a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 16), load16(kr + i + 16), a1);
    }
    for (; i < n; i += 16) {
      const __mmask16 m = lanes(n - i);
      a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + i), load16(kr + i, m), a0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
  }));
  // Softmax: exponentials 16 at a time, their sum, then the normalisation.
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n_keys; j += 16) {
    const __mmask16 m = lanes(n_keys - j);
    const __m512 e = exp_nonpositive16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, scores + j), mx));
    _mm512_mask_storeu_ps(scores + j, m, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, e));
  }
  const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(sum));
  for (int64_t j = 0; j < n_keys; j += 16) {
    const __mmask16 m = lanes(n_keys - j);
    _mm512_mask_storeu_ps(scores + j, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, scores + j), inv));
  }
  // Output: 64 columns at a time in four registers across all keys, stored once.
  for (int64_t i0 = 0; i0 < hd; i0 += 64) {
    const __mmask16 m0 = lanes(hd - i0), m1 = lanes(hd - i0 - 16), m2 = lanes(hd - i0 - 32), m3 = lanes(hd - i0 - 48);
    __m512 o0 = _mm512_setzero_ps(), o1 = o0, o2 = o0, o3 = o0;
    for (int64_t j = 0; j < n_keys; ++j) {
      if (i0 == 0 && j + pf < n_keys) prefetch_rows(V, hd, j + pf, j + pf + 1);
      const __m512 p = _mm512_set1_ps(scores[j]);
      const T* vr = V + j * hd + i0;
      o0 = _mm512_fmadd_ps(p, load16(vr, m0), o0);
      if (hd - i0 > 16) o1 = _mm512_fmadd_ps(p, load16(vr + 16, m1), o1);
      if (hd - i0 > 32) o2 = _mm512_fmadd_ps(p, load16(vr + 32, m2), o2);
      if (hd - i0 > 48) o3 = _mm512_fmadd_ps(p, load16(vr + 48, m3), o3);
    }
    _mm512_mask_storeu_ps(orow + i0, m0, o0);
    if (hd - i0 > 16) _mm512_mask_storeu_ps(orow + i0 + 16, m1, o1);
    if (hd - i0 > 32) _mm512_mask_storeu_ps(orow + i0 + 32, m2, o2);
    if (hd - i0 > 48) _mm512_mask_storeu_ps(orow + i0 + 48, m3, o3);
  }
}

}  // namespace

void attend_one_avx512(const float* q, const float* K, const float* V, int64_t hd, int64_t n_keys, float scale,
                       float* scores, float* orow) {
  attend_one(q, K, V, hd, n_keys, scale, scores, orow);
}

void attend_one_bf16_avx512(const float* q, const uint16_t* K, const uint16_t* V, int64_t hd, int64_t n_keys,
                            float scale, float* scores, float* orow) {
  attend_one(q, K, V, hd, n_keys, scale, scores, orow);
}

}  // namespace sparsellm
