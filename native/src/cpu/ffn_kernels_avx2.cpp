// AVX2+FMA vector primitives of the sparse FFN kernels (see ffn_kernels.h). Compiled with
// -mavx2 -mfma; only reached through ffn_ops() when the CPU has AVX2 and FMA.
#include <immintrin.h>

#include "ffn_kernels.h"

namespace sparsellm::detail {
namespace {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline float wval(const float* w, int64_t k) { return w[k]; }
inline float wval(const uint16_t* w, int64_t k) { return bf16_to_f32(w[k]); }

template <typename W>
inline void prefetch32(const W* p) {
  const char* c = reinterpret_cast<const char*>(p);
  for (size_t o = 0; o < 32 * sizeof(W); o += 64) _mm_prefetch(c + o, _MM_HINT_T0);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <typename W>
inline float dot_t(const float* x, const W* w, int64_t n, const W* pf) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t k = 0;
  for (; k + 32 <= n; k += 32) {
    if (pf) prefetch32(pf + k);
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), load8(w + k), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), load8(w + k + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 16), load8(w + k + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 24), load8(w + k + 24), a3);
  }
  for (; k + 8 <= n; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), load8(w + k), a0);
  float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; k < n; ++k) s += x[k] * wval(w, k);
  return s;
}

template <typename W>
inline void axpy_t(float* y, float a, const W* w, int64_t n, const W* pf) {
  const __m256 va = _mm256_set1_ps(a);
  int64_t k = 0;
  for (; k + 32 <= n; k += 32) {
    if (pf) prefetch32(pf + k);
    for (int o = 0; o < 32; o += 8)
      _mm256_storeu_ps(y + k + o, _mm256_fmadd_ps(va, load8(w + k + o), _mm256_loadu_ps(y + k + o)));
  }
  for (; k + 8 <= n; k += 8)
    _mm256_storeu_ps(y + k, _mm256_fmadd_ps(va, load8(w + k), _mm256_loadu_ps(y + k)));
  for (; k < n; ++k) y[k] += a * wval(w, k);
}

float dot(const float* x, const void* w, DType dt, int64_t n) {
  return dt == DType::F32 ? dot_t(x, static_cast<const float*>(w), n, static_cast<const float*>(nullptr))
                          : dot_t(x, static_cast<const uint16_t*>(w), n, static_cast<const uint16_t*>(nullptr));
}

void axpy(float* y, float a, const void* w, DType dt, int64_t n) {
  if (dt == DType::F32) axpy_t(y, a, static_cast<const float*>(w), n, static_cast<const float*>(nullptr));
  else axpy_t(y, a, static_cast<const uint16_t*>(w), n, static_cast<const uint16_t*>(nullptr));
}

template <typename W>
void updown_t(const float* x, const int32_t* j, const float* g, int64_t cnt, const W* ud,
              int64_t ld, int64_t d, float* y, float* u_out) {
  for (int64_t i = 0; i < cnt; ++i) {
    const W* b = ud + static_cast<int64_t>(j[i]) * 2 * ld;
    const W* nb = i + 1 < cnt ? ud + static_cast<int64_t>(j[i + 1]) * 2 * ld : nullptr;
    const float u = dot_t(x, b, d, nb);
    if (u_out) u_out[i] = u;
    axpy_t(y, g[i] * u, b + ld, d, nb ? nb + ld : nullptr);
  }
}

void updown(const float* x, const int32_t* j, const float* g, int64_t cnt, const void* ud,
            DType dt, int64_t ld, int64_t d, float* y, float* u_out) {
  if (dt == DType::F32) updown_t(x, j, g, cnt, static_cast<const float*>(ud), ld, d, y, u_out);
  else updown_t(x, j, g, cnt, static_cast<const uint16_t*>(ud), ld, d, y, u_out);
}

template <typename W>
void down_t(const int32_t* j, const float* h, int64_t cnt, const W* w, int64_t ldw, int64_t d,
            float* y) {
  for (int64_t i = 0; i < cnt; ++i) {
    const W* b = w + static_cast<int64_t>(j[i]) * ldw;
    const W* nb = i + 1 < cnt ? w + static_cast<int64_t>(j[i + 1]) * ldw : nullptr;
    axpy_t(y, h[i], b, d, nb);
  }
}

void down(const int32_t* j, const float* h, int64_t cnt, const void* w, DType dt, int64_t ldw,
          int64_t d, float* y) {
  if (dt == DType::F32) down_t(j, h, cnt, static_cast<const float*>(w), ldw, d, y);
  else down_t(j, h, cnt, static_cast<const uint16_t*>(w), ldw, d, y);
}

template <int R, typename W>
inline void dots_r(const float* const* xr, const W* w, int64_t d, float* u) {
  __m256 a[R][2];
  for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= d; k += 16) {
    const __m256 w0 = load8(w + k), w1 = load8(w + k + 8);
    for (int r = 0; r < R; ++r) {
      a[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xr[r] + k), w0, a[r][0]);
      a[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(xr[r] + k + 8), w1, a[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float s = hsum(_mm256_add_ps(a[r][0], a[r][1]));
    for (int64_t q = k; q < d; ++q) s += xr[r][q] * wval(w, q);
    u[r] = s;
  }
}

template <int R, typename W>
inline void axpys_r(float* const* yr, const float* h, const W* w, int64_t d) {
  __m256 hv[R];
  for (int r = 0; r < R; ++r) hv[r] = _mm256_set1_ps(h[r]);
  int64_t k = 0;
  for (; k + 8 <= d; k += 8) {
    const __m256 w0 = load8(w + k);
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(yr[r] + k, _mm256_fmadd_ps(hv[r], w0, _mm256_loadu_ps(yr[r] + k)));
  }
  for (; k < d; ++k) {
    const float wk = wval(w, k);
    for (int r = 0; r < R; ++r) yr[r][k] += h[r] * wk;
  }
}

template <typename W>
void dots(const float* x, int64_t ldx, const int32_t* t, int64_t n, const W* w, int64_t d, float* u) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const float* xr[4] = {x + t[i] * ldx, x + t[i + 1] * ldx, x + t[i + 2] * ldx, x + t[i + 3] * ldx};
    dots_r<4>(xr, w, d, u + i);
  }
  for (; i < n; ++i) {
    const float* xr[1] = {x + t[i] * ldx};
    dots_r<1>(xr, w, d, u + i);
  }
}

template <typename W>
void axpys(float* y, int64_t ldy, const int32_t* t, const float* h, int64_t n, const W* w, int64_t d) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    float* yr[4] = {y + t[i] * ldy, y + t[i + 1] * ldy, y + t[i + 2] * ldy, y + t[i + 3] * ldy};
    axpys_r<4>(yr, h + i, w, d);
  }
  for (; i < n; ++i) {
    float* yr[1] = {y + t[i] * ldy};
    axpys_r<1>(yr, h + i, w, d);
  }
}

// Prefetches d elements at p (one weight row) into L2, a line at a time.
template <typename W>
inline void prefetch_row(const W* p, int64_t d) {
  const char* c = reinterpret_cast<const char*>(p);
  const int64_t bytes = d * static_cast<int64_t>(sizeof(W));
  for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(c + o, _MM_HINT_T1);
}

template <typename W>
void updown_batch_t(const float* x, int64_t ldx, const int32_t* t, const float* g, int64_t n,
                    const W* b, int64_t ld, int64_t d, float* y, int64_t ldy, const W* next) {
  if (next) prefetch_row(next, d);
  float h[64];
  for (int64_t i0 = 0; i0 < n; i0 += 64) {
    const int64_t c = n - i0 < 64 ? n - i0 : 64;
    dots(x, ldx, t + i0, c, b, d, h);
    for (int64_t i = 0; i < c; ++i) h[i] *= g[i0 + i];
    if (next && i0 == 0) prefetch_row(next + ld, d);
    axpys(y, ldy, t + i0, h, c, b + ld, d);
  }
}

void updown_batch(const float* x, int64_t ldx, const int32_t* t, const float* g, int64_t n,
                  const void* b, DType dt, int64_t ld, int64_t d, float* y, int64_t ldy, const void* next) {
  if (dt == DType::F32)
    updown_batch_t(x, ldx, t, g, n, static_cast<const float*>(b), ld, d, y, ldy, static_cast<const float*>(next));
  else
    updown_batch_t(x, ldx, t, g, n, static_cast<const uint16_t*>(b), ld, d, y, ldy, static_cast<const uint16_t*>(next));
}

void down_batch(const int32_t* t, const float* h, int64_t n, const void* w, DType dt, int64_t d,
                float* y, int64_t ldy, const void* next) {
  if (dt == DType::F32) {
    if (next) prefetch_row(static_cast<const float*>(next), d);
    axpys(y, ldy, t, h, n, static_cast<const float*>(w), d);
  } else {
    if (next) prefetch_row(static_cast<const uint16_t*>(next), d);
    axpys(y, ldy, t, h, n, static_cast<const uint16_t*>(w), d);
  }
}

int64_t nonzeros(const float* src, int64_t n, int32_t base, int32_t* js, float* vs) {
  int64_t c = 0;
  for (int64_t k = 0; k < n; ++k)
    if (src[k] != 0.f) {
      js[c] = base + static_cast<int32_t>(k);
      vs[c] = src[k];
      ++c;
    }
  return c;
}

// Phase 1: the token's x chunk (≤ 64 columns) in G ymm registers, each pair's dot in two
// accumulators; the chunk's last n − 8·G columns (< 8) in scalars.
template <int G, typename W>
void updot_g(const int64_t* ptr, int64_t m0, int64_t m1, const int32_t* j, const float* x, int64_t ldx,
             const W* w, int64_t ldw, int64_t n, float* u, bool accumulate) {
  const int64_t rest = n - 8 * G;
  for (int64_t m = m0; m < m1; ++m) {
    const float* xm = x + m * ldx;
    __m256 xv[G > 0 ? G : 1];
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) xv[g] = _mm256_loadu_ps(xm + 8 * g);
    const int64_t e = ptr[m + 1];
    for (int64_t i = ptr[m]; i < e; ++i) {
      const W* r = w + static_cast<int64_t>(j[i]) * ldw;
      if (i + 8 < e) _mm_prefetch(reinterpret_cast<const char*>(w + static_cast<int64_t>(j[i + 8]) * ldw), _MM_HINT_T0);
      __m256 a0 = _mm256_setzero_ps(), a1 = a0;
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g) {
        if (g % 2 == 0) a0 = _mm256_fmadd_ps(xv[g], load8(r + 8 * g), a0);
        else a1 = _mm256_fmadd_ps(xv[g], load8(r + 8 * g), a1);
      }
      float s = hsum(_mm256_add_ps(a0, a1));
      for (int64_t q = 0; q < rest; ++q) s += xm[8 * G + q] * wval(r, 8 * G + q);
      u[i] = accumulate ? u[i] + s : s;
    }
  }
}

template <typename W>
void updot_t(const int64_t* ptr, int64_t m0, int64_t m1, const int32_t* j, const float* x, int64_t ldx,
             const W* w, int64_t ldw, int64_t n, float* u, bool accumulate) {
  for (int64_t c = 0; c < n; c += 64) {
    const int64_t k = n - c < 64 ? n - c : 64;
    const bool acc = accumulate || c > 0;
    switch (k / 8) {
      case 0: updot_g<0>(ptr, m0, m1, j, x + c, ldx, w + c, ldw, k, u, acc); break;
      case 1: updot_g<1>(ptr, m0, m1, j, x + c, ldx, w + c, ldw, k, u, acc); break;
      case 2: updot_g<2>(ptr, m0, m1, j, x + c, ldx, w + c, ldw, k, u, acc); break;
      case 3: updot_g<3>(ptr, m0, m1, j, x + c, ldx, w + c, ldw, k, u, acc); break;
      case 4: updot_g<4>(ptr, m0, m1, j, x + c, ldx, w + c, ldw, k, u, acc); break;
      case 5: updot_g<5>(ptr, m0, m1, j, x + c, ldx, w + c, ldw, k, u, acc); break;
      case 6: updot_g<6>(ptr, m0, m1, j, x + c, ldx, w + c, ldw, k, u, acc); break;
      case 7: updot_g<7>(ptr, m0, m1, j, x + c, ldx, w + c, ldw, k, u, acc); break;
      default: updot_g<8>(ptr, m0, m1, j, x + c, ldx, w + c, ldw, k, u, acc); break;
    }
  }
}

void updot(const int64_t* ptr, int64_t m0, int64_t m1, const int32_t* j, const float* x, int64_t ldx,
           const void* w, DType dt, int64_t ldw, int64_t n, float* u, bool accumulate) {
  if (dt == DType::F32) updot_t(ptr, m0, m1, j, x, ldx, static_cast<const float*>(w), ldw, n, u, accumulate);
  else updot_t(ptr, m0, m1, j, x, ldx, static_cast<const uint16_t*>(w), ldw, n, u, accumulate);
}

// Phase 2: G groups of 8 columns in ymm accumulators (G ≤ 8: 64 columns), then the last
// n − 8·G columns (< 8) in scalars; wider chunks are done 64 columns at a time.
template <int G, typename W>
void spmm_g(const int64_t* ptr, int64_t m0, int64_t m1, const int32_t* j, const float* h, const W* w,
            int64_t ldw, int64_t n, const float* bias, float* y, int64_t ldy) {
  const int64_t rest = n - 8 * G;
  for (int64_t m = m0; m < m1; ++m) {
    __m256 a[G > 0 ? G : 1];
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) a[g] = _mm256_setzero_ps();
    float t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    const int64_t e = ptr[m + 1];
    for (int64_t i = ptr[m]; i < e; ++i) {
      const W* r = w + static_cast<int64_t>(j[i]) * ldw;
      if (i + 8 < e) _mm_prefetch(reinterpret_cast<const char*>(w + static_cast<int64_t>(j[i + 8]) * ldw), _MM_HINT_T0);
      const __m256 hv = _mm256_set1_ps(h[i]);
#pragma GCC unroll 8
      for (int g = 0; g < G; ++g) a[g] = _mm256_fmadd_ps(hv, load8(r + 8 * g), a[g]);
      for (int64_t q = 0; q < rest; ++q) t[q] += h[i] * wval(r, 8 * G + q);
    }
    float* ym = y + m * ldy;
#pragma GCC unroll 8
    for (int g = 0; g < G; ++g) {
      __m256 v = a[g];
      if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + 8 * g));
      _mm256_storeu_ps(ym + 8 * g, v);
    }
    for (int64_t q = 0; q < rest; ++q) ym[8 * G + q] = (bias ? bias[8 * G + q] : 0.f) + t[q];
  }
}

template <typename W>
void spmm_t(const int64_t* ptr, int64_t m0, int64_t m1, const int32_t* j, const float* h, const W* w,
            int64_t ldw, int64_t n, const float* bias, float* y, int64_t ldy) {
  for (int64_t c = 0; c < n; c += 64) {
    const int64_t k = n - c < 64 ? n - c : 64;
    const float* b = bias ? bias + c : nullptr;
    switch (k / 8) {
      case 0: spmm_g<0>(ptr, m0, m1, j, h, w + c, ldw, k, b, y + c, ldy); break;
      case 1: spmm_g<1>(ptr, m0, m1, j, h, w + c, ldw, k, b, y + c, ldy); break;
      case 2: spmm_g<2>(ptr, m0, m1, j, h, w + c, ldw, k, b, y + c, ldy); break;
      case 3: spmm_g<3>(ptr, m0, m1, j, h, w + c, ldw, k, b, y + c, ldy); break;
      case 4: spmm_g<4>(ptr, m0, m1, j, h, w + c, ldw, k, b, y + c, ldy); break;
      case 5: spmm_g<5>(ptr, m0, m1, j, h, w + c, ldw, k, b, y + c, ldy); break;
      case 6: spmm_g<6>(ptr, m0, m1, j, h, w + c, ldw, k, b, y + c, ldy); break;
      case 7: spmm_g<7>(ptr, m0, m1, j, h, w + c, ldw, k, b, y + c, ldy); break;
      default: spmm_g<8>(ptr, m0, m1, j, h, w + c, ldw, k, b, y + c, ldy); break;
    }
  }
}

void spmm(const int64_t* ptr, int64_t m0, int64_t m1, const int32_t* j, const float* h, const void* w,
          DType dt, int64_t ldw, int64_t n, const float* bias, float* y, int64_t ldy) {
  if (dt == DType::F32) spmm_t(ptr, m0, m1, j, h, static_cast<const float*>(w), ldw, n, bias, y, ldy);
  else spmm_t(ptr, m0, m1, j, h, static_cast<const uint16_t*>(w), ldw, n, bias, y, ldy);
}

const FfnOps kAvx2{dot, axpy, updown, down, updown_batch, down_batch, nonzeros, updot, spmm};

}  // namespace

const FfnOps& ffn_ops_avx2() { return kAvx2; }

}  // namespace sparsellm::detail
