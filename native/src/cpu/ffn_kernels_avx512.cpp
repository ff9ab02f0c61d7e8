// AVX-512 vector primitives of the sparse FFN kernels (see ffn_kernels.h). Compiled with
// -mavx512f/bw/vl; only reached through ffn_ops() when the CPU has AVX-512.
#include <immintrin.h>

#include <type_traits>
#include <utility>

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
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
    for (int q = 0; q < A; ++q) a[r][q] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 * A <= d; k += 16 * A) {
    __m512 wv[A];
#pragma GCC unroll 16
    for (int q = 0; q < A; ++q) wv[q] = load16(w + k + 16 * q);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
      for (int q = 0; q < A; ++q) a[r][q] = _mm512_fmadd_ps(_mm512_loadu_ps(xr[r] + k + 16 * q), wv[q], a[r][q]);
  }
  for (; k < d; k += 16) {
    const __mmask16 m = d - k >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(d - k);
    const __m512 w0 = load16m(w + k, m);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) a[r][0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, xr[r] + k), w0, a[r][0]);
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    __m512 t = a[r][0];
#pragma GCC unroll 16
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
  for (; i + 8 <= n; i += 8) {
    const float* xr[8];
    for (int r = 0; r < 8; ++r) xr[r] = x + t[i + r] * ldx;
    dots_r<8, 2>(xr, w, d, u + i);
  }
  for (; i + 4 <= n; i += 4) {
    const float* xr[4] = {x + t[i] * ldx, x + t[i + 1] * ldx, x + t[i + 2] * ldx, x + t[i + 3] * ldx};
    dots_r<4, 4>(xr, w, d, u + i);
  }
  const float* xr[3] = {nullptr, nullptr, nullptr};
  for (int64_t r = i; r < n; ++r) xr[r - i] = x + t[r] * ldx;
  switch (n - i) {
    case 3: dots_r<3, 4>(xr, w, d, u + i); break;
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

// 16 values at a time: compare, compress in registers, masked store of the kept ones.
int64_t nonzeros(const float* src, int64_t n, int32_t base, int32_t* js, float* vs) {
  int64_t c = 0;
  const __m512i step = _mm512_set1_epi32(16);
  __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(base), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 valid = n - k >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(n - k);
    const __m512 v = _mm512_maskz_loadu_ps(valid, src + k);
    const __mmask16 nz = _mm512_mask_cmp_ps_mask(valid, v, _mm512_setzero_ps(), _CMP_NEQ_UQ);
    const int cnt = __builtin_popcount(static_cast<unsigned>(nz));
    if (cnt) {
      const __mmask16 out = tail_mask(cnt);
      _mm512_mask_storeu_ps(vs + c, out, _mm512_maskz_compress_ps(nz, v));
      _mm512_mask_storeu_epi32(js + c, out, _mm512_maskz_compress_epi32(nz, idx));
      c += cnt;
    }
    idx = _mm512_add_epi32(idx, step);
  }
  return c;
}

// Phase 1 (sampled up product), one chunk of at most 256 columns: the token's x chunk sits in
// registers while its active neurons are walked, each costing one load of its chunk row (from cache:
// the chunk's rows are shared by all tokens). bf16 rows are split into even / odd columns without
// shuffles (see spmm_bf16), so x is split the same way once per token and chunk. G groups of 32
// columns, the last with `last` (1..32) valid ones.
template <int G>
void updot_bf16(const int64_t* ptr, int64_t m0, int64_t m1, const int32_t* j, const float* x, int64_t ldx,
                const uint16_t* w, int64_t ldw, int64_t n, float* u, bool accumulate) {
  const int last = static_cast<int>(n - 32 * (G - 1));
  const __mmask32 lmask = last >= 32 ? static_cast<__mmask32>(0xffffffffu) : static_cast<__mmask32>((1u << last) - 1u);
  const __mmask16 slo = last >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(last);
  const __mmask16 shi = last > 16 ? (last >= 32 ? static_cast<__mmask16>(0xffff) : tail_mask(last - 16)) : static_cast<__mmask16>(0);
  const __m512i odd = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  const __m512i ie = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i io = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  for (int64_t m = m0; m < m1; ++m) {
    const float* xm = x + m * ldx;
    __m512 xe[G], xo[G];
#pragma GCC unroll 16
    for (int g = 0; g < G; ++g) {
      const __mmask16 ml = g == G - 1 ? slo : static_cast<__mmask16>(0xffff);
      const __mmask16 mh = g == G - 1 ? shi : static_cast<__mmask16>(0xffff);
      const __m512 lo = _mm512_maskz_loadu_ps(ml, xm + 32 * g), hi = _mm512_maskz_loadu_ps(mh, xm + 32 * g + 16);
      xe[g] = _mm512_permutex2var_ps(lo, ie, hi);
      xo[g] = _mm512_permutex2var_ps(lo, io, hi);
    }
    const int64_t end = ptr[m + 1];
    for (int64_t i = ptr[m]; i < end; ++i) {
      const uint16_t* r = w + static_cast<int64_t>(j[i]) * ldw;
      if (i + 8 < end) {
        const char* p = reinterpret_cast<const char*>(w + static_cast<int64_t>(j[i + 8]) * ldw);
#pragma GCC unroll 16
        for (int g = 0; g < G; ++g) _mm_prefetch(p + 64 * g, _MM_HINT_T0);
      }
      // Four accumulators (chains of G/2 FMAs); plain loads but for the last group.
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
#pragma GCC unroll 16
      for (int g = 0; g < G; ++g) {
        const __m512i v = g == G - 1 ? _mm512_maskz_loadu_epi16(lmask, r + 32 * g) : _mm512_loadu_si512(r + 32 * g);
        const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
        const __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(v, odd));
        if (g % 2 == 0) {
          a0 = _mm512_fmadd_ps(xe[g], we, a0);
          a1 = _mm512_fmadd_ps(xo[g], wo, a1);
        } else {
          a2 = _mm512_fmadd_ps(xe[g], we, a2);
          a3 = _mm512_fmadd_ps(xo[g], wo, a3);
        }
      }
      const float sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
      u[i] = accumulate ? u[i] + sum : sum;
    }
  }
}

// f32 weights: G groups of 16 columns, the last with `last` (1..16) valid ones.
template <int G>
void updot_f32(const int64_t* ptr, int64_t m0, int64_t m1, const int32_t* j, const float* x, int64_t ldx,
               const float* w, int64_t ldw, int64_t n, float* u, bool accumulate) {
  const int last = static_cast<int>(n - 16 * (G - 1));
  const __mmask16 lm = last >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(last);
  for (int64_t m = m0; m < m1; ++m) {
    const float* xm = x + m * ldx;
    __m512 xv[G];
#pragma GCC unroll 16
    for (int g = 0; g < G; ++g) xv[g] = _mm512_maskz_loadu_ps(g == G - 1 ? lm : static_cast<__mmask16>(0xffff), xm + 16 * g);
    const int64_t end = ptr[m + 1];
    for (int64_t i = ptr[m]; i < end; ++i) {
      const float* r = w + static_cast<int64_t>(j[i]) * ldw;
      if (i + 8 < end) {
        const char* p = reinterpret_cast<const char*>(w + static_cast<int64_t>(j[i + 8]) * ldw);
#pragma GCC unroll 16
        for (int g = 0; g < G; ++g) _mm_prefetch(p + 64 * g, _MM_HINT_T0);
      }
      __m512 a0 = _mm512_setzero_ps(), a1 = a0;
#pragma GCC unroll 16
      for (int g = 0; g < G; ++g) {
        const __m512 wv = _mm512_maskz_loadu_ps(g == G - 1 ? lm : static_cast<__mmask16>(0xffff), r + 16 * g);
        if (g % 2 == 0) a0 = _mm512_fmadd_ps(xv[g], wv, a0);
        else a1 = _mm512_fmadd_ps(xv[g], wv, a1);
      }
      const float sum = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
      u[i] = accumulate ? u[i] + sum : sum;
    }
  }
}

// Calls f(std::integral_constant<int, G>{}) with G = min(max(groups, 1), Max): the kernels keep
// one set of accumulators per group in registers, so the group count is a template parameter.
template <int Max, int G = 1, typename F>
inline void with_groups(int64_t groups, F&& f) {
  if constexpr (G == Max) {
    f(std::integral_constant<int, G>{});
  } else {
    if (groups <= G) f(std::integral_constant<int, G>{});
    else with_groups<Max, G + 1>(groups, std::forward<F>(f));
  }
}

void updot(const int64_t* ptr, int64_t m0, int64_t m1, const int32_t* j, const float* x, int64_t ldx,
           const void* w, DType dt, int64_t ldw, int64_t n, float* u, bool accumulate) {
  if (n <= 0) return;
  if (dt == DType::BF16) {
    const uint16_t* wb = static_cast<const uint16_t*>(w);
    with_groups<8>((n + 31) / 32, [&](auto g) {
      updot_bf16<decltype(g)::value>(ptr, m0, m1, j, x, ldx, wb, ldw, n, u, accumulate);
    });
    return;
  }
  const float* wf = static_cast<const float*>(w);
  with_groups<16>((n + 15) / 16, [&](auto g) {
    updot_f32<decltype(g)::value>(ptr, m0, m1, j, x, ldx, wf, ldw, n, u, accumulate);
  });
}

// Phase 2 (sparse down), one chunk of at most 256 columns whose outputs stay in 16 zmm
// accumulators while the token's active neurons are walked; each neuron costs one load of its
// chunk row (from cache: the chunk's rows are shared by all tokens) and one FMA per 16 columns.
// bf16 without shuffles: a 512-bit load holds 32 weights; the low halves of its 32-bit lanes
// (shifted left 16) are the even columns and the high halves (masked) the odd ones, so the
// accumulators hold a group's even and odd columns apart and are interleaved once at the store.
// G groups of 32 columns; the last one has `last` (1..32) valid columns.
template <int G>
void spmm_bf16(const int64_t* ptr, int64_t m0, int64_t m1, const int32_t* j, const float* h, const uint16_t* w,
               int64_t ldw, int64_t n, const float* bias, float* y, int64_t ldy) {
  const int last = static_cast<int>(n - 32 * (G - 1));
  const __mmask32 lmask = last >= 32 ? static_cast<__mmask32>(0xffffffffu) : static_cast<__mmask32>((1u << last) - 1u);
  const __mmask16 slo = last >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(last);
  const __mmask16 shi = last > 16 ? (last >= 32 ? static_cast<__mmask16>(0xffff) : tail_mask(last - 16)) : static_cast<__mmask16>(0);
  const __m512i odd = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  const __m512i ilo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i ihi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const uint16_t* wc = w;
  for (int64_t m = m0; m < m1; ++m) {
    // 2·G accumulators: independent FMA chains (16 for a full 256-column chunk).
    __m512 e[G], o[G];
#pragma GCC unroll 16
    for (int g = 0; g < G; ++g) e[g] = o[g] = _mm512_setzero_ps();
    const int64_t end = ptr[m + 1];
    for (int64_t i = ptr[m]; i < end; ++i) {
      const uint16_t* r = wc + static_cast<int64_t>(j[i]) * ldw;
      if (i + 8 < end) {
        const char* p = reinterpret_cast<const char*>(wc + static_cast<int64_t>(j[i + 8]) * ldw);
#pragma GCC unroll 16
        for (int g = 0; g < G; ++g) _mm_prefetch(p + 64 * g, _MM_HINT_T0);
      }
      const __m512 hv = _mm512_set1_ps(h[i]);
#pragma GCC unroll 16
      for (int g = 0; g < G; ++g) {
        const __m512i v = g == G - 1 ? _mm512_maskz_loadu_epi16(lmask, r + 32 * g) : _mm512_loadu_si512(r + 32 * g);
        e[g] = _mm512_fmadd_ps(hv, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), e[g]);
        o[g] = _mm512_fmadd_ps(hv, _mm512_castsi512_ps(_mm512_and_si512(v, odd)), o[g]);
      }
    }
    float* ym = y + m * ldy;
#pragma GCC unroll 16
    for (int g = 0; g < G; ++g) {
      __m512 lo = _mm512_permutex2var_ps(e[g], ilo, o[g]);
      __m512 hi = _mm512_permutex2var_ps(e[g], ihi, o[g]);
      const __mmask16 ml = g == G - 1 ? slo : static_cast<__mmask16>(0xffff);
      const __mmask16 mh = g == G - 1 ? shi : static_cast<__mmask16>(0xffff);
      if (bias) {
        lo = _mm512_add_ps(lo, _mm512_maskz_loadu_ps(ml, bias + 32 * g));
        hi = _mm512_add_ps(hi, _mm512_maskz_loadu_ps(mh, bias + 32 * g + 16));
      }
      _mm512_mask_storeu_ps(ym + 32 * g, ml, lo);
      _mm512_mask_storeu_ps(ym + 32 * g + 16, mh, hi);
    }
  }
}

// f32 weights: G groups of 16 columns, the last with `last` (1..16) valid ones.
template <int G>
void spmm_f32(const int64_t* ptr, int64_t m0, int64_t m1, const int32_t* j, const float* h, const float* w,
              int64_t ldw, int64_t n, const float* bias, float* y, int64_t ldy) {
  const int last = static_cast<int>(n - 16 * (G - 1));
  const __mmask16 lm = last >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(last);
  const float* wc = w;
  for (int64_t m = m0; m < m1; ++m) {
    __m512 a[G];
#pragma GCC unroll 16
    for (int g = 0; g < G; ++g) a[g] = _mm512_setzero_ps();
    const int64_t end = ptr[m + 1];
    for (int64_t i = ptr[m]; i < end; ++i) {
      const float* r = wc + static_cast<int64_t>(j[i]) * ldw;
      if (i + 8 < end) {
        const char* p = reinterpret_cast<const char*>(wc + static_cast<int64_t>(j[i + 8]) * ldw);
#pragma GCC unroll 16
        for (int g = 0; g < G; ++g) _mm_prefetch(p + 64 * g, _MM_HINT_T0);
      }
      const __m512 hv = _mm512_set1_ps(h[i]);
#pragma GCC unroll 16
      for (int g = 0; g < G - 1; ++g) a[g] = _mm512_fmadd_ps(hv, _mm512_loadu_ps(r + 16 * g), a[g]);
      a[G - 1] = _mm512_fmadd_ps(hv, _mm512_maskz_loadu_ps(lm, r + 16 * (G - 1)), a[G - 1]);
    }
    float* ym = y + m * ldy;
#pragma GCC unroll 16
    for (int g = 0; g < G; ++g) {
      const __mmask16 mk = g == G - 1 ? lm : static_cast<__mmask16>(0xffff);
      __m512 v = a[g];
      if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, bias + 16 * g));
      _mm512_mask_storeu_ps(ym + 16 * g, mk, v);
    }
  }
}

void spmm(const int64_t* ptr, int64_t m0, int64_t m1, const int32_t* j, const float* h, const void* w,
          DType dt, int64_t ldw, int64_t n, const float* bias, float* y, int64_t ldy) {
  if (n <= 0) return;
  if (dt == DType::BF16) {
    const uint16_t* wb = static_cast<const uint16_t*>(w);
    with_groups<8>((n + 31) / 32, [&](auto g) {
      spmm_bf16<decltype(g)::value>(ptr, m0, m1, j, h, wb, ldw, n, bias, y, ldy);
    });
    return;
  }
  const float* wf = static_cast<const float*>(w);
  with_groups<16>((n + 15) / 16, [&](auto g) {
    spmm_f32<decltype(g)::value>(ptr, m0, m1, j, h, wf, ldw, n, bias, y, ldy);
  });
}

const FfnOps kAvx512{dot, axpy, updown, down, updown_batch, down_batch, nonzeros, updot, spmm};

}  // namespace

const FfnOps& ffn_ops_avx512() { return kAvx512; }

}  // namespace sparsellm::detail
