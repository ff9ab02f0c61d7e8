// AVX-512 kernels of the dense GEMM (compiled with AVX-512 flags; only called when the CPU has
// it). Register tile 14 x 32 f32: 28 zmm accumulators, two W vectors and a broadcast A element
// per k (the broadcast folds into the FMA). Packing transposes 16 x 16 blocks in registers and
// widens bf16 weights to f32. The small-M path streams W rows once.
//
// Nothing here uses a standard-library template: this file is built with different ISA flags
// from the rest, and a shared template instance could be picked by the linker for portable code.
#include <immintrin.h>

#include <cstdint>
#include <cstdlib>

#include "gemm_kernels.h"

namespace sparsellm::gemm_detail {
namespace {

constexpr int MR = 14;
constexpr int NR = 32;

inline int64_t lo(int64_t a, int64_t b) { return a < b ? a : b; }
inline __mmask16 mask16(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1); }
inline __mmask32 mask32(int64_t n) { return n >= 32 ? __mmask32(0xFFFFFFFFu) : n <= 0 ? __mmask32(0) : __mmask32((1u << n) - 1); }

// In-register transpose of a 16 x 16 f32 block: r[i] holds row i; afterwards r[j] holds column j.
inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int j = 0; j < 4; ++j) {
    __m512d a = _mm512_castps_pd(t[4 * j]), b = _mm512_castps_pd(t[4 * j + 1]);
    __m512d c = _mm512_castps_pd(t[4 * j + 2]), d = _mm512_castps_pd(t[4 * j + 3]);
    u[4 * j + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    u[4 * j + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    u[4 * j + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    u[4 * j + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  // u[4j + c] lane l holds rows 4j..4j+3 of column 4l + c: transpose the 128-bit lanes.
  for (int c = 0; c < 4; ++c) {
    __m512 x0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x44), y0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xEE);
    __m512 x1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x44), y1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xEE);
    r[c] = _mm512_shuffle_f32x4(x0, x1, 0x88);
    r[4 + c] = _mm512_shuffle_f32x4(x0, x1, 0xDD);
    r[8 + c] = _mm512_shuffle_f32x4(y0, y1, 0x88);
    r[12 + c] = _mm512_shuffle_f32x4(y0, y1, 0xDD);
  }
}

inline __m512 load_bf16x16(const uint16_t* p, __mmask16 m) {
  __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

void pack_a(const float* A, int64_t lda, int64_t rows, int64_t K, float* dst) {
  __m512 r[16];
  for (int64_t p0 = 0; p0 < rows; p0 += MR) {
    const int64_t pr = lo(MR, rows - p0);
    float* panel = dst + (p0 / MR) * K * MR;
    for (int64_t k0 = 0; k0 < K; k0 += 16) {
      const int64_t kn = lo(16, K - k0);
      const __mmask16 km = mask16(kn);
      for (int i = 0; i < 16; ++i)
        r[i] = i < pr ? _mm512_maskz_loadu_ps(km, A + (p0 + i) * lda + k0) : _mm512_setzero_ps();
      transpose16(r);
      for (int64_t kk = 0; kk < kn; ++kk) _mm512_mask_storeu_ps(panel + (k0 + kk) * MR, __mmask16(0x3FFF), r[kk]);
    }
  }
}

template <bool Bf16>
void pack_w(const void* Wv, int64_t ldw, int64_t cols, int64_t kc, float* dst) {
  __m512 r[16];
  for (int64_t q0 = 0; q0 < cols; q0 += NR) {
    float* panel = dst + (q0 / NR) * kc * NR;
    for (int h = 0; h < 2; ++h) {
      const int64_t c0 = q0 + 16 * h;
      const int64_t cn = lo(16, cols - c0);
      for (int64_t k0 = 0; k0 < kc; k0 += 16) {
        const int64_t kn = lo(16, kc - k0);
        const __mmask16 km = mask16(kn);
        for (int i = 0; i < 16; ++i) {
          if (i >= cn) {
            r[i] = _mm512_setzero_ps();
          } else if (Bf16) {
            r[i] = load_bf16x16(static_cast<const uint16_t*>(Wv) + (c0 + i) * ldw + k0, km);
          } else {
            r[i] = _mm512_maskz_loadu_ps(km, static_cast<const float*>(Wv) + (c0 + i) * ldw + k0);
          }
        }
        transpose16(r);
        for (int64_t kk = 0; kk < kn; ++kk) _mm512_store_ps(panel + (k0 + kk) * NR + 16 * h, r[kk]);
      }
    }
  }
}

void pack_w_f32(const float* W, int64_t ldw, int64_t cols, int64_t kc, float* dst) { pack_w<false>(W, ldw, cols, kc, dst); }
void pack_w_bf16(const uint16_t* W, int64_t ldw, int64_t cols, int64_t kc, float* dst) { pack_w<true>(W, ldw, cols, kc, dst); }

template <int R>
void micro_rows(int64_t kc, const float* a, const float* w, float* c, int64_t ldc, int cols, bool accumulate) {
  __m512 c0[R], c1[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    c0[r] = c1[r] = _mm512_setzero_ps();
    _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc + 16), _MM_HINT_T0);
  }
#pragma GCC unroll 2
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 w0 = _mm512_load_ps(w), w1 = _mm512_load_ps(w + 16);
    _mm_prefetch(reinterpret_cast<const char*>(w + 16 * NR), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(a + 32 * MR), _MM_HINT_T0);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512 ar = _mm512_set1_ps(a[r]);
      c0[r] = _mm512_fmadd_ps(ar, w0, c0[r]);
      c1[r] = _mm512_fmadd_ps(ar, w1, c1[r]);
    }
    a += MR;
    w += NR;
  }
  const __mmask16 m0 = mask16(cols), m1 = mask16(cols - 16);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    float* cr = c + r * ldc;
    if (accumulate) {
      c0[r] = _mm512_add_ps(c0[r], _mm512_maskz_loadu_ps(m0, cr));
      c1[r] = _mm512_add_ps(c1[r], _mm512_maskz_loadu_ps(m1, cr + 16));
    }
    _mm512_mask_storeu_ps(cr, m0, c0[r]);
    _mm512_mask_storeu_ps(cr + 16, m1, c1[r]);
  }
}

void micro(int64_t kc, const float* a, const float* w, float* c, int64_t ldc, int rows, int cols, bool accumulate) {
  switch (rows) {
    case 14: return micro_rows<14>(kc, a, w, c, ldc, cols, accumulate);
    case 13: return micro_rows<13>(kc, a, w, c, ldc, cols, accumulate);
    case 12: return micro_rows<12>(kc, a, w, c, ldc, cols, accumulate);
    case 11: return micro_rows<11>(kc, a, w, c, ldc, cols, accumulate);
    case 10: return micro_rows<10>(kc, a, w, c, ldc, cols, accumulate);
    case 9: return micro_rows<9>(kc, a, w, c, ldc, cols, accumulate);
    case 8: return micro_rows<8>(kc, a, w, c, ldc, cols, accumulate);
    case 7: return micro_rows<7>(kc, a, w, c, ldc, cols, accumulate);
    case 6: return micro_rows<6>(kc, a, w, c, ldc, cols, accumulate);
    case 5: return micro_rows<5>(kc, a, w, c, ldc, cols, accumulate);
    case 4: return micro_rows<4>(kc, a, w, c, ldc, cols, accumulate);
    case 3: return micro_rows<3>(kc, a, w, c, ldc, cols, accumulate);
    case 2: return micro_rows<2>(kc, a, w, c, ldc, cols, accumulate);
    case 1: return micro_rows<1>(kc, a, w, c, ldc, cols, accumulate);
    default: return;
  }
}

// ---- small M: stream W rows, RN rows in flight, up to MM rows of A per pass -----------------
constexpr int RN = 4;
constexpr int MM = 4;
constexpr int64_t PF = 1024;  // prefetch distance in bytes along each W row

// f32: acc[m][r] += A[m, k:k+16] * W[n+r, k:k+16].
template <int M_, int R_>
void gemv_f32_tile(const float* A, int64_t lda, const float* W, int64_t ldw, int64_t K, float* c, int64_t ldc) {
  __m512 acc[M_][R_];
  for (int m = 0; m < M_; ++m)
    for (int r = 0; r < R_; ++r) acc[m][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 w[R_];
    for (int r = 0; r < R_; ++r) {
      w[r] = _mm512_loadu_ps(W + r * ldw + k);
      _mm_prefetch(reinterpret_cast<const char*>(W + r * ldw + k) + PF, _MM_HINT_T0);
    }
    for (int m = 0; m < M_; ++m) {
      const __m512 a = _mm512_loadu_ps(A + m * lda + k);
      for (int r = 0; r < R_; ++r) acc[m][r] = _mm512_fmadd_ps(a, w[r], acc[m][r]);
    }
  }
  if (k < K) {
    const __mmask16 km = mask16(K - k);
    for (int m = 0; m < M_; ++m) {
      const __m512 a = _mm512_maskz_loadu_ps(km, A + m * lda + k);
      for (int r = 0; r < R_; ++r) acc[m][r] = _mm512_fmadd_ps(a, _mm512_maskz_loadu_ps(km, W + r * ldw + k), acc[m][r]);
    }
  }
  for (int m = 0; m < M_; ++m)
    for (int r = 0; r < R_; ++r) c[m * ldc + r] = _mm512_reduce_add_ps(acc[m][r]);
}

// bf16: a 512-bit load holds 32 weights; the low halves of its 32-bit lanes are the even k and
// the high halves the odd k, so they widen with one shift and one mask. A is split into its even
// and odd elements beforehand (ae, ao: [M][K2] with K2 = ceil(K / 32) * 16, zero-padded).
template <int M_, int R_>
void gemv_bf16_tile(const float* ae, const float* ao, int64_t K2, const uint16_t* W, int64_t ldw, int64_t K, float* c,
                    int64_t ldc) {
  __m512 acc[M_][R_];
  for (int m = 0; m < M_; ++m)
    for (int r = 0; r < R_; ++r) acc[m][r] = _mm512_setzero_ps();
  const __m512i hi_mask = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  auto step = [&](int64_t k, __mmask32 km, bool full) {
    __m512 we[R_], wo[R_];
    for (int r = 0; r < R_; ++r) {
      const __m512i x = full ? _mm512_loadu_si512(W + r * ldw + k) : _mm512_maskz_loadu_epi16(km, W + r * ldw + k);
      _mm_prefetch(reinterpret_cast<const char*>(W + r * ldw + k) + PF, _MM_HINT_T0);
      we[r] = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
      wo[r] = _mm512_castsi512_ps(_mm512_and_si512(x, hi_mask));
    }
    const int64_t j = k / 2;
    for (int m = 0; m < M_; ++m) {
      const __m512 a0 = _mm512_load_ps(ae + m * K2 + j), a1 = _mm512_load_ps(ao + m * K2 + j);
      for (int r = 0; r < R_; ++r) acc[m][r] = _mm512_fmadd_ps(a1, wo[r], _mm512_fmadd_ps(a0, we[r], acc[m][r]));
    }
  };
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) step(k, 0, true);
  if (k < K) step(k, mask32(K - k), false);
  for (int m = 0; m < M_; ++m)
    for (int r = 0; r < R_; ++r) c[m * ldc + r] = _mm512_reduce_add_ps(acc[m][r]);
}

template <int M_>
void gemv_f32_rows(const float* A, int64_t lda, const float* W, int64_t ldw, int64_t K, int64_t n0, int64_t n1,
                   float* c, int64_t ldc) {
  int64_t n = n0;
  for (; n + RN <= n1; n += RN) gemv_f32_tile<M_, RN>(A, lda, W + n * ldw, ldw, K, c + (n - n0), ldc);
  for (; n < n1; ++n) gemv_f32_tile<M_, 1>(A, lda, W + n * ldw, ldw, K, c + (n - n0), ldc);
}

void gemv_f32(const float* A, int64_t lda, int64_t M, const float* W, int64_t ldw, int64_t K, int64_t n0, int64_t n1,
              float* c, int64_t ldc) {
  // Walk N in slices so that a slice of W (<= 64 KiB) stays in cache while all M row groups use it.
  const int64_t slice = lo(n1 - n0, 64 * 1024 / (4 * (K > 0 ? K : 1)) / RN * RN + RN);
  for (int64_t s0 = n0; s0 < n1; s0 += slice) {
    const int64_t s1 = lo(n1, s0 + slice);
    for (int64_t m = 0; m < M; m += MM) {
      const float* a = A + m * lda;
      float* cm = c + m * ldc + (s0 - n0);
      switch (lo(MM, M - m)) {
        case 4: gemv_f32_rows<4>(a, lda, W, ldw, K, s0, s1, cm, ldc); break;
        case 3: gemv_f32_rows<3>(a, lda, W, ldw, K, s0, s1, cm, ldc); break;
        case 2: gemv_f32_rows<2>(a, lda, W, ldw, K, s0, s1, cm, ldc); break;
        default: gemv_f32_rows<1>(a, lda, W, ldw, K, s0, s1, cm, ldc); break;
      }
    }
  }
}

template <int M_>
void gemv_bf16_rows(const float* ae, const float* ao, int64_t K2, const uint16_t* W, int64_t ldw, int64_t K, int64_t n0,
                    int64_t n1, float* c, int64_t ldc) {
  int64_t n = n0;
  for (; n + RN <= n1; n += RN) gemv_bf16_tile<M_, RN>(ae, ao, K2, W + n * ldw, ldw, K, c + (n - n0), ldc);
  for (; n < n1; ++n) gemv_bf16_tile<M_, 1>(ae, ao, K2, W + n * ldw, ldw, K, c + (n - n0), ldc);
}

// Per-thread scratch for the even/odd split of A (raw memory: no std containers in this file).
struct Scratch {
  float* p = nullptr;
  int64_t n = 0;
  ~Scratch() { std::free(p); }
  float* get(int64_t count) {
    if (count > n) {
      std::free(p);
      n = count;
      p = static_cast<float*>(std::aligned_alloc(64, static_cast<size_t>((count * 4 + 63) / 64 * 64)));
    }
    return p;
  }
};
thread_local Scratch t_split;

void gemv_bf16(const float* A, int64_t lda, int64_t M, const uint16_t* W, int64_t ldw, int64_t K, int64_t n0,
               int64_t n1, float* c, int64_t ldc) {
  const int64_t K2 = (K + 31) / 32 * 16;
  float* ae = t_split.get(2 * M * K2);
  float* ao = ae + M * K2;
  for (int64_t m = 0; m < M; ++m) {
    const float* a = A + m * lda;
    for (int64_t j = 0; j < K2; ++j) {
      ae[m * K2 + j] = 2 * j < K ? a[2 * j] : 0.f;
      ao[m * K2 + j] = 2 * j + 1 < K ? a[2 * j + 1] : 0.f;
    }
  }
  const int64_t slice = lo(n1 - n0, 64 * 1024 / (2 * (K > 0 ? K : 1)) / RN * RN + RN);
  for (int64_t s0 = n0; s0 < n1; s0 += slice) {
    const int64_t s1 = lo(n1, s0 + slice);
    for (int64_t m = 0; m < M; m += MM) {
      const float* e = ae + m * K2;
      const float* o = ao + m * K2;
      float* cm = c + m * ldc + (s0 - n0);
      switch (lo(MM, M - m)) {
        case 4: gemv_bf16_rows<4>(e, o, K2, W, ldw, K, s0, s1, cm, ldc); break;
        case 3: gemv_bf16_rows<3>(e, o, K2, W, ldw, K, s0, s1, cm, ldc); break;
        case 2: gemv_bf16_rows<2>(e, o, K2, W, ldw, K, s0, s1, cm, ldc); break;
        default: gemv_bf16_rows<1>(e, o, K2, W, ldw, K, s0, s1, cm, ldc); break;
      }
    }
  }
}

const Kernels k_avx512{"avx512 14x32", MR, NR, 16, pack_a, pack_w_f32, pack_w_bf16, micro, gemv_f32, gemv_bf16};

}  // namespace

const Kernels& kernels_avx512() { return k_avx512; }

}  // namespace sparsellm::gemm_detail
