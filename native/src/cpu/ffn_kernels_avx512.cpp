// AVX-512 vector primitives of the sparse FFN kernels (see ffn_kernels.h). Compiled with
// -mavx512f/bw/vl; only reached through ffn_ops() when the CPU has AVX-512.
#include <immintrin.h>

#include "ffn_kernels.h"

namespace sparsellm::detail {
namespace {

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16m(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16m(const uint16_t* p, __mmask16 m) {
  __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __mmask16 tail_mask(int64_t r) { return static_cast<__mmask16>((1u << r) - 1u); }

// Prefetch the 64 elements at p (one iteration of the main loops) into L1/L2.
template <typename W>
inline void prefetch64(const W* p) {
  const char* c = reinterpret_cast<const char*>(p);
  for (size_t o = 0; o < 64 * sizeof(W); o += 64) _mm_prefetch(c + o, _MM_HINT_T0);
}

template <typename W>
inline float dot_t(const float* x, const W* w, int64_t n, const W* pf) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t k = 0;
  for (; k + 64 <= n; k += 64) {
    if (pf) prefetch64(pf + k);
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), load16(w + k), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), load16(w + k + 16), a1);
    a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 32), load16(w + k + 32), a2);
    a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 48), load16(w + k + 48), a3);
  }
  for (; k + 16 <= n; k += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), load16(w + k), a0);
  if (k < n) {
    __mmask16 m = tail_mask(n - k);
    a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + k), load16m(w + k, m), a1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

template <typename W>
inline void axpy_t(float* y, float a, const W* w, int64_t n, const W* pf) {
  const __m512 va = _mm512_set1_ps(a);
  int64_t k = 0;
  for (; k + 64 <= n; k += 64) {
    if (pf) prefetch64(pf + k);
    _mm512_storeu_ps(y + k, _mm512_fmadd_ps(va, load16(w + k), _mm512_loadu_ps(y + k)));
    _mm512_storeu_ps(y + k + 16, _mm512_fmadd_ps(va, load16(w + k + 16), _mm512_loadu_ps(y + k + 16)));
    _mm512_storeu_ps(y + k + 32, _mm512_fmadd_ps(va, load16(w + k + 32), _mm512_loadu_ps(y + k + 32)));
    _mm512_storeu_ps(y + k + 48, _mm512_fmadd_ps(va, load16(w + k + 48), _mm512_loadu_ps(y + k + 48)));
  }
  for (; k + 16 <= n; k += 16)
    _mm512_storeu_ps(y + k, _mm512_fmadd_ps(va, load16(w + k), _mm512_loadu_ps(y + k)));
  if (k < n) {
    __mmask16 m = tail_mask(n - k);
    _mm512_mask_storeu_ps(y + k, m, _mm512_fmadd_ps(va, load16m(w + k, m), _mm512_maskz_loadu_ps(m, y + k)));
  }
}

float dot(const float* x, const void* w, DType dt, int64_t n) {
  return dt == DType::F32 ? dot_t(x, static_cast<const float*>(w), n, static_cast<const float*>(nullptr))
                          : dot_t(x, static_cast<const uint16_t*>(w), n, static_cast<const uint16_t*>(nullptr));
}

void axpy(float* y, float a, const void* w, DType dt, int64_t n) {
  if (dt == DType::F32) axpy_t(y, a, static_cast<const float*>(w), n, static_cast<const float*>(nullptr));
  else axpy_t(y, a, static_cast<const uint16_t*>(w), n, static_cast<const uint16_t*>(nullptr));
}

// Each neuron's block is read once, front to back; the next neuron's block is prefetched
// while this one is consumed (the reads are the cost: the kernel is memory-bound).
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

// R tokens against one weight row: u[r] = x_r · w, with A accumulators per token so that R·A
// independent FMA chains (8 for every R) hide the FMA latency even for a single token.
template <int R, int A, typename W>
inline void dots_r(const float* const* xr, const W* w, int64_t d, float* u) {
  __m512 a[R][A];
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < A; ++q) a[r][q] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 * A <= d; k += 16 * A) {
    __m512 wv[A];
    for (int q = 0; q < A; ++q) wv[q] = load16(w + k + 16 * q);
    for (int r = 0; r < R; ++r)
      for (int q = 0; q < A; ++q) a[r][q] = _mm512_fmadd_ps(_mm512_loadu_ps(xr[r] + k + 16 * q), wv[q], a[r][q]);
  }
  for (; k < d; k += 16) {
    const __mmask16 m = d - k >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(d - k);
    const __m512 w0 = load16m(w + k, m);
    for (int r = 0; r < R; ++r) a[r][0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, xr[r] + k), w0, a[r][0]);
  }
  for (int r = 0; r < R; ++r) {
    __m512 t = a[r][0];
    for (int q = 1; q < A; ++q) t = _mm512_add_ps(t, a[r][q]);
    u[r] = _mm512_reduce_add_ps(t);
  }
}

// R tokens: y_r += h[r] · w
template <int R, typename W>
inline void axpys_r(float* const* yr, const float* h, const W* w, int64_t d) {
  __m512 hv[R];
  for (int r = 0; r < R; ++r) hv[r] = _mm512_set1_ps(h[r]);
  int64_t k = 0;
  for (; k + 16 <= d; k += 16) {
    const __m512 w0 = load16(w + k);
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(yr[r] + k, _mm512_fmadd_ps(hv[r], w0, _mm512_loadu_ps(yr[r] + k)));
  }
  if (k < d) {
    const __mmask16 m = tail_mask(d - k);
    const __m512 w0 = load16m(w + k, m);
    for (int r = 0; r < R; ++r)
      _mm512_mask_storeu_ps(yr[r] + k, m, _mm512_fmadd_ps(hv[r], w0, _mm512_maskz_loadu_ps(m, yr[r] + k)));
  }
}

template <typename W>
void dots(const float* x, int64_t ldx, const int32_t* t, int64_t n, const W* w, int64_t d, float* u) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const float* xr[4] = {x + t[i] * ldx, x + t[i + 1] * ldx, x + t[i + 2] * ldx, x + t[i + 3] * ldx};
    dots_r<4, 2>(xr, w, d, u + i);
  }
  const float* xr[3] = {nullptr, nullptr, nullptr};
  for (int64_t r = i; r < n; ++r) xr[r - i] = x + t[r] * ldx;
  switch (n - i) {
    case 3: dots_r<3, 2>(xr, w, d, u + i); break;
    case 2: dots_r<2, 4>(xr, w, d, u + i); break;
    case 1: dots_r<1, 8>(xr, w, d, u + i); break;
    default: break;
  }
}

template <typename W>
void axpys(float* y, int64_t ldy, const int32_t* t, const float* h, int64_t n, const W* w, int64_t d) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    float* yr[4] = {y + t[i] * ldy, y + t[i + 1] * ldy, y + t[i + 2] * ldy, y + t[i + 3] * ldy};
    axpys_r<4>(yr, h + i, w, d);
  }
  float* yr[3] = {nullptr, nullptr, nullptr};
  for (int64_t r = i; r < n; ++r) yr[r - i] = y + t[r] * ldy;
  switch (n - i) {
    case 3: axpys_r<3>(yr, h + i, w, d); break;
    case 2: axpys_r<2>(yr, h + i, w, d); break;
    case 1: axpys_r<1>(yr, h + i, w, d); break;
    default: break;
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

const FfnOps kAvx512{dot, axpy, updown, down, updown_batch, down_batch};

}  // namespace

const FfnOps& ffn_ops_avx512() { return kAvx512; }

}  // namespace sparsellm::detail
