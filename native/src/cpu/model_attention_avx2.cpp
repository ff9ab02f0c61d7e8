// The attention row softmax and decode query (model_kernels.h) compiled for AVX2; called only when
// the CPU has it. The decode query is written with intrinsics, as the AVX-512 one: compiled from
// the generic loops, its exponentials stayed scalar and each key's dot product ended in a chain
// of scalar adds. No standard-library templates (different ISA flags from the rest).
#include <immintrin.h>

#include "model_kernels.h"
#include "sparsellm/cpu_info.h"

namespace sparsellm {
namespace {

// Lanes [0, n) of 8 (n clamped to 0 .. 8), as a mask for maskload / maskstore.
inline __m256i lanes8(int64_t n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const int c = n <= 0 ? 0 : n >= 8 ? 8 : static_cast<int>(n);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(c), idx);
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x) for x <= 0, 8 lanes: the same reduction and polynomial as exp_nonpositive.
inline __m256 exp_nonpositive8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  const __m256 r = _mm256_add_ps(_mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x),
                                 _mm256_mul_ps(n, _mm256_set1_ps(2.12194440e-4f)));
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
}

}  // namespace

void softmax_causal_rows_avx2(float* S, int64_t ldS, int64_t T, int64_t n_cols, int64_t pos0, float scale) {
  softmax_causal_rows_impl(S, ldS, T, n_cols, pos0, scale, num_threads());
}

namespace {

// 8 cached elements as f32 lanes: f32 as they are, bf16 widened (zero-extend, shift into the
// high half). Partial forms read lanes [0, n) only: f32 through the mask m (lanes8(n)), bf16
// through a zeroed copy (AVX2 has no 16-bit masked load).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const float* p, __m256i m, int64_t) { return _mm256_maskload_ps(p, m); }
inline __m256 widen8(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
inline __m256 load8(const uint16_t* p) { return widen8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256 load8(const uint16_t* p, __m256i, int64_t n) {
  if (n >= 8) return load8(p);
  alignas(16) uint16_t t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < n; ++i) t[i] = p[i];
  return widen8(_mm_load_si128(reinterpret_cast<const __m128i*>(t)));
}

template <typename T>
void attend_one(const float* q, const T* K, const T* V, int64_t hd, int64_t n_keys, float scale, float* scores,
                float* orow) {
  const int64_t pf = kAttendPrefetchRows;
  // Scores: each key's products in 8 lanes (masked last chunk), then a short reduction.
  const float mx = attend_scores(q, K, V, hd, n_keys, scale, scores, [](const float* x, const T* kr, int64_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), load8(kr + i), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), load8(kr + i + 8), a1);
    }
    for (; i < n; i += 8) {
      const __m256i m = lanes8(n - i);
      a0 = _mm256_fmadd_ps(_mm256_maskload_ps(x + i, m), load8(kr + i, m, n - i), a0);
    }
    return hsum8(_mm256_add_ps(a0, a1));
  });
  // Softmax: exponentials 8 at a time, their sum, then the normalisation.
  const __m256 vmx = _mm256_set1_ps(mx);
  __m256 sum = _mm256_setzero_ps();
  for (int64_t j = 0; j < n_keys; j += 8) {
    const __m256i m = lanes8(n_keys - j);
    const __m256 e = exp_nonpositive8(_mm256_sub_ps(_mm256_maskload_ps(scores + j, m), vmx));
    _mm256_maskstore_ps(scores + j, m, e);
    sum = _mm256_add_ps(sum, _mm256_and_ps(e, _mm256_castsi256_ps(m)));
  }
  const __m256 inv = _mm256_set1_ps(1.f / hsum8(sum));
  for (int64_t j = 0; j < n_keys; j += 8) {
    const __m256i m = lanes8(n_keys - j);
    _mm256_maskstore_ps(scores + j, m, _mm256_mul_ps(_mm256_maskload_ps(scores + j, m), inv));
  }
  // Output: 32 columns at a time in four registers across all keys, stored once.
  for (int64_t i0 = 0; i0 < hd; i0 += 32) {
    const __m256i m0 = lanes8(hd - i0), m1 = lanes8(hd - i0 - 8), m2 = lanes8(hd - i0 - 16), m3 = lanes8(hd - i0 - 24);
    __m256 o0 = _mm256_setzero_ps(), o1 = o0, o2 = o0, o3 = o0;
    for (int64_t j = 0; j < n_keys; ++j) {
      if (i0 == 0 && j + pf < n_keys) prefetch_rows(V, hd, j + pf, j + pf + 1);
      const __m256 p = _mm256_set1_ps(scores[j]);
      const T* vr = V + j * hd + i0;
      o0 = _mm256_fmadd_ps(p, load8(vr, m0, hd - i0), o0);
      if (hd - i0 > 8) o1 = _mm256_fmadd_ps(p, load8(vr + 8, m1, hd - i0 - 8), o1);
      if (hd - i0 > 16) o2 = _mm256_fmadd_ps(p, load8(vr + 16, m2, hd - i0 - 16), o2);
      if (hd - i0 > 24) o3 = _mm256_fmadd_ps(p, load8(vr + 24, m3, hd - i0 - 24), o3);
    }
    _mm256_maskstore_ps(orow + i0, m0, o0);
    if (hd - i0 > 8) _mm256_maskstore_ps(orow + i0 + 8, m1, o1);
    if (hd - i0 > 16) _mm256_maskstore_ps(orow + i0 + 16, m2, o2);
    if (hd - i0 > 24) _mm256_maskstore_ps(orow + i0 + 24, m3, o3);
  }
}

}  // namespace

void attend_one_avx2(const float* q, const float* K, const float* V, int64_t hd, int64_t n_keys, float scale,
                     float* scores, float* orow) {
  attend_one(q, K, V, hd, n_keys, scale, scores, orow);
}

void attend_one_bf16_avx2(const float* q, const uint16_t* K, const uint16_t* V, int64_t hd, int64_t n_keys, float scale,
                          float* scores, float* orow) {
  attend_one(q, K, V, hd, n_keys, scale, scores, orow);
}

}  // namespace sparsellm
