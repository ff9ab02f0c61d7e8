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

const FfnOps kAvx512{dot, axpy, updown, down};

}  // namespace

const FfnOps& ffn_ops_avx512() { return kAvx512; }

}  // namespace sparsellm::detail
