// AVX-512 builds of the memory-bound training ops (train_ops.cpp dispatches here when the CPU
// has AVX-512): the blocked transpose (16×16 tiles transposed in registers) and AdamW (one pass,
// 16 parameters per instruction).
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>

#include "sparsellm/cpu_info.h"
#include "train_ops.h"

namespace sparsellm::trainops {
namespace {

// out[c·ldo + r] = in[r·ldi + c] for a full 16×16 tile.
inline void tile16(const float* in, int64_t ldi, float* out, int64_t ldo) {
  __m512 r[16], t[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(in + i * ldi);
  // Pairs of rows interleaved, then pairs of pairs: within each 128-bit lane L, t[4g + j]
  // holds column 4L + j of rows 4g .. 4g + 3.
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g) {
    const __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * g + 2]), e = _mm512_castps_pd(t[4 * g + 3]);
    r[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, e));
    r[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, e));
  }
  // Gather lane L of the four groups: output row 4L + j.
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    const __m512 v0 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88), v1 = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xdd);
    const __m512 w0 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88), w1 = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xdd);
    _mm512_storeu_ps(out + (0 + j) * ldo, _mm512_shuffle_f32x4(v0, w0, 0x88));
    _mm512_storeu_ps(out + (8 + j) * ldo, _mm512_shuffle_f32x4(v0, w0, 0xdd));
    _mm512_storeu_ps(out + (4 + j) * ldo, _mm512_shuffle_f32x4(v1, w1, 0x88));
    _mm512_storeu_ps(out + (12 + j) * ldo, _mm512_shuffle_f32x4(v1, w1, 0xdd));
  }
}

}  // namespace

void transpose_avx512(const float* in, int64_t ld_in, int64_t rows, int64_t cols, float* out, int64_t ld_out) {
  // 64×64 blocks (16 KiB in, 16 KiB out: both stay in L1), 16×16 tiles inside.
  const int64_t Bk = 64;
  const int64_t nrb = (rows + Bk - 1) / Bk, ncb = (cols + Bk - 1) / Bk;
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (rows * cols >= 65536)
  for (int64_t blk = 0; blk < nrb * ncb; ++blk) {
    const int64_t r0 = (blk / ncb) * Bk, c0 = (blk % ncb) * Bk;
    const int64_t r1 = std::min(rows, r0 + Bk), c1 = std::min(cols, c0 + Bk);
    int64_t r = r0;
    for (; r + 16 <= r1; r += 16) {
      int64_t c = c0;
      for (; c + 16 <= c1; c += 16) tile16(in + r * ld_in + c, ld_in, out + c * ld_out + r, ld_out);
      for (; c < c1; ++c)
        for (int64_t i = r; i < r + 16; ++i) out[c * ld_out + i] = in[i * ld_in + c];
    }
    for (; r < r1; ++r)
      for (int64_t c = c0; c < c1; ++c) out[c * ld_out + r] = in[r * ld_in + c];
  }
}

void adamw_avx512(float* w, const float* g, float* m, float* v, int64_t n, float lr, float b1, float b2, float eps,
                  float wd, double c1, double c2, float gscale) {
  const float ic1 = static_cast<float>(1.0 / c1), ic2 = static_cast<float>(1.0 / c2);
  const __m512 vb1 = _mm512_set1_ps(b1), vb2 = _mm512_set1_ps(b2), va1 = _mm512_set1_ps(1.f - b1),
               va2 = _mm512_set1_ps(1.f - b2), vic1 = _mm512_set1_ps(ic1), vic2 = _mm512_set1_ps(ic2),
               veps = _mm512_set1_ps(eps), vwd = _mm512_set1_ps(wd), vlr = _mm512_set1_ps(lr),
               vgs = _mm512_set1_ps(gscale);
  const int64_t chunk = 4096;
  const int64_t nc = (n + chunk - 1) / chunk;
#pragma omp parallel for schedule(static) num_threads(num_threads()) if (n >= 65536)
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t e = std::min(n, (c + 1) * chunk);
    for (int64_t i = c * chunk; i < e; i += 16) {
      const __mmask16 k = e - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (e - i)) - 1);
      const __m512 gi = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, g + i), vgs);
      const __m512 mi = _mm512_add_ps(_mm512_mul_ps(vb1, _mm512_maskz_loadu_ps(k, m + i)), _mm512_mul_ps(va1, gi));
      const __m512 vi =
          _mm512_add_ps(_mm512_mul_ps(vb2, _mm512_maskz_loadu_ps(k, v + i)), _mm512_mul_ps(_mm512_mul_ps(va2, gi), gi));
      _mm512_mask_storeu_ps(m + i, k, mi);
      _mm512_mask_storeu_ps(v + i, k, vi);
      const __m512 wi = _mm512_maskz_loadu_ps(k, w + i);
      const __m512 upd = _mm512_add_ps(
          _mm512_div_ps(_mm512_mul_ps(mi, vic1), _mm512_add_ps(_mm512_sqrt_ps(_mm512_mul_ps(vi, vic2)), veps)),
          _mm512_mul_ps(vwd, wi));
      _mm512_mask_storeu_ps(w + i, k, _mm512_sub_ps(wi, _mm512_mul_ps(vlr, upd)));
    }
  }
}

}  // namespace sparsellm::trainops
