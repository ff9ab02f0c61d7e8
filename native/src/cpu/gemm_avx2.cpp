// AVX2 + FMA kernels of the dense GEMM (compiled with AVX2 flags; only called when the CPU has
// them). Register tile 6 x 16 f32: 12 ymm accumulators, two W vectors, one broadcast. W packing
// transposes 8 x 8 blocks in registers (A packing, done once per call, is a plain loop); the
// small-M path streams W rows once.
//
// Nothing here uses a standard-library template (see gemm_avx512.cpp for why).
#include <immintrin.h>

#include <cstdint>
#include <cstdlib>

#include "gemm_kernels.h"

namespace sparsellm::gemm_detail {
namespace {

constexpr int MR = 6;
constexpr int NR = 16;

inline int64_t lo(int64_t a, int64_t b) { return a < b ? a : b; }
inline float widen(uint16_t h) {
  union { uint32_t u; float f; } v{static_cast<uint32_t>(h) << 16};
  return v.f;
}

void pack_a(const float* A, int64_t lda, int64_t rows, int64_t K, float* dst) {
  for (int64_t p0 = 0; p0 < rows; p0 += MR) {
    const int64_t pr = lo(MR, rows - p0);
    float* panel = dst + (p0 / MR) * K * MR;
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t r = 0; r < pr; ++r) panel[k * MR + r] = A[(p0 + r) * lda + k];
      for (int64_t r = pr; r < MR; ++r) panel[k * MR + r] = 0.f;
    }
  }
}

// In-register transpose of an 8 x 8 f32 block: r[i] holds row i; afterwards r[j] holds column j.
inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h) {  // rows 0-3, then 4-7
    u[4 * h + 0] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0x44);
    u[4 * h + 1] = _mm256_shuffle_ps(t[4 * h], t[4 * h + 2], 0xEE);
    u[4 * h + 2] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0x44);
    u[4 * h + 3] = _mm256_shuffle_ps(t[4 * h + 1], t[4 * h + 3], 0xEE);
  }
  // u[c] (rows 0-3) and u[4 + c] (rows 4-7) hold columns c (low half) and 4 + c (high half).
  for (int c = 0; c < 4; ++c) {
    r[c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x20);
    r[4 + c] = _mm256_permute2f128_ps(u[c], u[4 + c], 0x31);
  }
}

template <bool Bf16>
void pack_w(const void* Wv, int64_t ldw, int64_t cols, int64_t kc, float* dst) {
  __m256 r[8];
  alignas(32) float tail[8];
  for (int64_t q0 = 0; q0 < cols; q0 += NR) {
    float* panel = dst + (q0 / NR) * kc * NR;
    for (int h = 0; h < 2; ++h) {
      const int64_t c0 = q0 + 8 * h;
      const int64_t cn = lo(8, cols - c0);
      for (int64_t k0 = 0; k0 < kc; k0 += 8) {
        const int64_t kn = lo(8, kc - k0);
        for (int i = 0; i < 8; ++i) {
          if (i >= cn) {
            r[i] = _mm256_setzero_ps();
          } else if (kn < 8) {
            for (int64_t kk = 0; kk < 8; ++kk) {
              if (kk >= kn) tail[kk] = 0.f;
              else if (Bf16) tail[kk] = widen(static_cast<const uint16_t*>(Wv)[(c0 + i) * ldw + k0 + kk]);
              else tail[kk] = static_cast<const float*>(Wv)[(c0 + i) * ldw + k0 + kk];
            }
            r[i] = _mm256_load_ps(tail);
          } else if (Bf16) {
            const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(Wv) + (c0 + i) * ldw + k0));
            r[i] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(x), 16));
          } else {
            r[i] = _mm256_loadu_ps(static_cast<const float*>(Wv) + (c0 + i) * ldw + k0);
          }
        }
        transpose8(r);
        for (int64_t kk = 0; kk < kn; ++kk) _mm256_store_ps(panel + (k0 + kk) * NR + 8 * h, r[kk]);
      }
    }
  }
}

void pack_w_f32(const float* W, int64_t ldw, int64_t cols, int64_t kc, float* dst) { pack_w<false>(W, ldw, cols, kc, dst); }
void pack_w_bf16(const uint16_t* W, int64_t ldw, int64_t cols, int64_t kc, float* dst) { pack_w<true>(W, ldw, cols, kc, dst); }

inline __m256i lane_mask(int64_t n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n < 0 ? 0 : n > 8 ? 8 : n)), idx);
}

template <int R>
void micro_rows(int64_t kc, const float* a, const float* w, float* c, int64_t ldc, int cols, bool accumulate) {
  __m256 c0[R], c1[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    c0[r] = c1[r] = _mm256_setzero_ps();
    _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc + 15), _MM_HINT_T0);
  }
#pragma GCC unroll 2
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 w0 = _mm256_load_ps(w), w1 = _mm256_load_ps(w + 8);
    _mm_prefetch(reinterpret_cast<const char*>(w + 16 * NR), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(a + 32 * MR), _MM_HINT_T0);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 ar = _mm256_broadcast_ss(a + r);
      c0[r] = _mm256_fmadd_ps(ar, w0, c0[r]);
      c1[r] = _mm256_fmadd_ps(ar, w1, c1[r]);
    }
    a += MR;
    w += NR;
  }
  if (cols == NR) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      float* cr = c + r * ldc;
      if (accumulate) {
        c0[r] = _mm256_add_ps(c0[r], _mm256_loadu_ps(cr));
        c1[r] = _mm256_add_ps(c1[r], _mm256_loadu_ps(cr + 8));
      }
      _mm256_storeu_ps(cr, c0[r]);
      _mm256_storeu_ps(cr + 8, c1[r]);
    }
    return;
  }
  const __m256i m0 = lane_mask(cols), m1 = lane_mask(cols - 8);
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* cr = c + r * ldc;
    if (accumulate) {
      c0[r] = _mm256_add_ps(c0[r], _mm256_maskload_ps(cr, m0));
      c1[r] = _mm256_add_ps(c1[r], _mm256_maskload_ps(cr + 8, m1));
    }
    _mm256_maskstore_ps(cr, m0, c0[r]);
    _mm256_maskstore_ps(cr + 8, m1, c1[r]);
  }
}

void micro(int64_t kc, const float* a, const float* w, float* c, int64_t ldc, int rows, int cols, bool accumulate) {
  switch (rows) {
    case 6: return micro_rows<6>(kc, a, w, c, ldc, cols, accumulate);
    case 5: return micro_rows<5>(kc, a, w, c, ldc, cols, accumulate);
    case 4: return micro_rows<4>(kc, a, w, c, ldc, cols, accumulate);
    case 3: return micro_rows<3>(kc, a, w, c, ldc, cols, accumulate);
    case 2: return micro_rows<2>(kc, a, w, c, ldc, cols, accumulate);
    case 1: return micro_rows<1>(kc, a, w, c, ldc, cols, accumulate);
    default: return;
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

constexpr int RN = 4;
constexpr int MM = 2;
constexpr int64_t PF = 1024;

template <int M_, int R_>
void gemv_f32_tile(const float* A, int64_t lda, const float* W, int64_t ldw, int64_t K, float* c, int64_t ldc) {
  __m256 acc[M_][R_];
  for (int m = 0; m < M_; ++m)
    for (int r = 0; r < R_; ++r) acc[m][r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 w[R_];
    for (int r = 0; r < R_; ++r) {
      w[r] = _mm256_loadu_ps(W + r * ldw + k);
      _mm_prefetch(reinterpret_cast<const char*>(W + r * ldw + k) + PF, _MM_HINT_T0);
    }
    for (int m = 0; m < M_; ++m) {
      const __m256 a = _mm256_loadu_ps(A + m * lda + k);
      for (int r = 0; r < R_; ++r) acc[m][r] = _mm256_fmadd_ps(a, w[r], acc[m][r]);
    }
  }
  for (int m = 0; m < M_; ++m)
    for (int r = 0; r < R_; ++r) {
      float s = hsum(acc[m][r]);
      for (int64_t kk = k; kk < K; ++kk) s += A[m * lda + kk] * W[r * ldw + kk];
      c[m * ldc + r] = s;
    }
}

// bf16: a 256-bit load holds 16 weights; even k in the low halves of the 32-bit lanes, odd k in
// the high halves (see gemm_avx512.cpp). ae/ao: A split into even/odd elements, [M][K2].
template <int M_, int R_>
void gemv_bf16_tile(const float* ae, const float* ao, int64_t K2, const uint16_t* W, int64_t ldw, int64_t K, float* c,
                    int64_t ldc) {
  __m256 acc[M_][R_];
  for (int m = 0; m < M_; ++m)
    for (int r = 0; r < R_; ++r) acc[m][r] = _mm256_setzero_ps();
  const __m256i hi_mask = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  auto step = [&](int64_t k, const uint16_t* w, int64_t ldw_) {
    __m256 we[R_], wo[R_];
    for (int r = 0; r < R_; ++r) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * ldw_));
      _mm_prefetch(reinterpret_cast<const char*>(w + r * ldw_) + PF, _MM_HINT_T0);
      we[r] = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
      wo[r] = _mm256_castsi256_ps(_mm256_and_si256(x, hi_mask));
    }
    const int64_t j = k / 2;
    for (int m = 0; m < M_; ++m) {
      const __m256 a0 = _mm256_load_ps(ae + m * K2 + j), a1 = _mm256_load_ps(ao + m * K2 + j);
      for (int r = 0; r < R_; ++r) acc[m][r] = _mm256_fmadd_ps(a1, wo[r], _mm256_fmadd_ps(a0, we[r], acc[m][r]));
    }
  };
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) step(k, W + k, ldw);
  if (k < K) {  // the last partial chunk, zero-padded through a small buffer
    alignas(32) uint16_t tail[R_][16];
    for (int r = 0; r < R_; ++r)
      for (int64_t i = 0; i < 16; ++i) tail[r][i] = k + i < K ? W[r * ldw + k + i] : uint16_t(0);
    step(k, &tail[0][0], 16);
  }
  for (int m = 0; m < M_; ++m)
    for (int r = 0; r < R_; ++r) c[m * ldc + r] = hsum(acc[m][r]);
}

void gemv_f32(const float* A, int64_t lda, int64_t M, const float* W, int64_t ldw, int64_t K, int64_t n0, int64_t n1,
              float* c, int64_t ldc) {
  const int64_t slice = lo(n1 - n0, 32 * 1024 / (4 * (K > 0 ? K : 1)) / RN * RN + RN);
  for (int64_t s0 = n0; s0 < n1; s0 += slice) {
    const int64_t s1 = lo(n1, s0 + slice);
    for (int64_t m = 0; m < M; m += MM) {
      const float* a = A + m * lda;
      float* cm = c + m * ldc + (s0 - n0);
      int64_t n = s0;
      if (M - m >= 2) {
        for (; n + RN <= s1; n += RN) gemv_f32_tile<2, RN>(a, lda, W + n * ldw, ldw, K, cm + (n - s0), ldc);
        for (; n < s1; ++n) gemv_f32_tile<2, 1>(a, lda, W + n * ldw, ldw, K, cm + (n - s0), ldc);
      } else {
        for (; n + RN <= s1; n += RN) gemv_f32_tile<1, RN>(a, lda, W + n * ldw, ldw, K, cm + (n - s0), ldc);
        for (; n < s1; ++n) gemv_f32_tile<1, 1>(a, lda, W + n * ldw, ldw, K, cm + (n - s0), ldc);
      }
    }
  }
}

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
  const int64_t K2 = (K + 15) / 16 * 8;
  float* ae = t_split.get(2 * M * K2);
  float* ao = ae + M * K2;
  for (int64_t m = 0; m < M; ++m) {
    const float* a = A + m * lda;
    for (int64_t j = 0; j < K2; ++j) {
      ae[m * K2 + j] = 2 * j < K ? a[2 * j] : 0.f;
      ao[m * K2 + j] = 2 * j + 1 < K ? a[2 * j + 1] : 0.f;
    }
  }
  const int64_t slice = lo(n1 - n0, 32 * 1024 / (2 * (K > 0 ? K : 1)) / RN * RN + RN);
  for (int64_t s0 = n0; s0 < n1; s0 += slice) {
    const int64_t s1 = lo(n1, s0 + slice);
    for (int64_t m = 0; m < M; m += MM) {
      const float* e = ae + m * K2;
      const float* o = ao + m * K2;
      float* cm = c + m * ldc + (s0 - n0);
      int64_t n = s0;
      if (M - m >= 2) {
        for (; n + RN <= s1; n += RN) gemv_bf16_tile<2, RN>(e, o, K2, W + n * ldw, ldw, K, cm + (n - s0), ldc);
        for (; n < s1; ++n) gemv_bf16_tile<2, 1>(e, o, K2, W + n * ldw, ldw, K, cm + (n - s0), ldc);
      } else {
        for (; n + RN <= s1; n += RN) gemv_bf16_tile<1, RN>(e, o, K2, W + n * ldw, ldw, K, cm + (n - s0), ldc);
        for (; n < s1; ++n) gemv_bf16_tile<1, 1>(e, o, K2, W + n * ldw, ldw, K, cm + (n - s0), ldc);
      }
    }
  }
}

const Kernels k_avx2{"avx2 6x16", MR, NR, 6, pack_a, pack_w_f32, pack_w_bf16, micro, gemv_f32, gemv_bf16};

}  // namespace

const Kernels& kernels_avx2() { return k_avx2; }

}  // namespace sparsellm::gemm_detail
