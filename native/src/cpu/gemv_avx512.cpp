// AVX-512 row kernels of the decode GEMV (gemv_kernels.h): `S` weight rows in flight per
// thread, each from its own contiguous run of rows, 64 bytes per row per step, a prefetch
// `pf` bytes ahead on every run (into the run's next row near a row's end), bf16 widened in
// registers (low half of a 32-bit lane: shift left 16; high half: mask), f32 FMAs into
// M x S accumulators. No standard-library templates (different ISA flags from the rest).
#include <immintrin.h>

#include <cstdint>

#include "gemv_kernels.h"
#include "row_streams.h"

namespace sparsellm::gemv_detail {
namespace {

constexpr int S = 4;  // rows (independent memory streams) in flight per thread

inline __mmask32 mask32(int64_t n) { return n >= 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << n) - 1); }
inline __mmask16 mask16(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

template <int M_, int S_>
inline void bf16_tile(const GemvArgs& a, const uint16_t* const* w, const uint16_t* const* nx, float* const* yo,
                      int64_t ldy) {
  __m512 acc[M_][S_];
  for (int m = 0; m < M_; ++m)
    for (int s = 0; s < S_; ++s) acc[m][s] = _mm512_setzero_ps();
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const int64_t K = a.K, K2 = a.K2, pfe = a.pf / 2;
  const float* xe = a.xe;
  const float* xo = a.xo;
  // One 32-element step of every row, prefetching pf[s] + k + off. Rows that follow each other
  // in memory: one loop over the row, the prefetch running on into the next row. Otherwise
  // (strided or listed rows): into the row itself (pf = w, off = pfe) while that stays inside
  // it, then into the run's next row (pf = nx, off = pfe - K), in two loops so that the address
  // needs no per-step select. (A per-step select, or the two loops on contiguous rows, cost ~10%
  // of the streaming rate at 75+ GB/s: the mispredicted branch or the second loop exit per row.)
  const auto steps = [&](int64_t k, int64_t k_end, const uint16_t* const* pf, int64_t off) {
    for (; k < k_end; k += 32) {
      __m512i v[S_];
      for (int s = 0; s < S_; ++s) {
        v[s] = _mm512_loadu_si512(w[s] + k);
        _mm_prefetch(reinterpret_cast<const char*>(pf[s] + k + off), _MM_HINT_T0);
      }
      const int64_t j = k / 2;
      for (int m = 0; m < M_; ++m) {
        const __m512 a0 = _mm512_load_ps(xe + m * K2 + j), a1 = _mm512_load_ps(xo + m * K2 + j);
        for (int s = 0; s < S_; ++s)
          acc[m][s] = _mm512_fmadd_ps(a1, _mm512_castsi512_ps(_mm512_and_si512(v[s], hi)),
                                      _mm512_fmadd_ps(a0, _mm512_castsi512_ps(_mm512_slli_epi32(v[s], 16)), acc[m][s]));
      }
    }
  };
  const int64_t k_whole = K / 32 * 32;
  int64_t k_own = K - pfe <= 0 ? 0 : (K - pfe + 31) / 32 * 32;  // first step whose prefetch leaves the row
  if (k_own > k_whole) k_own = k_whole;
  if (detail::rows_follow<S_>(w, nx, K)) {
    steps(0, k_whole, w, pfe);
  } else {
    steps(0, k_own, w, pfe);
    steps(k_own, k_whole, nx, pfe - K);
  }
  int64_t k = k_whole;
  if (k < K) {
    const __mmask32 km = mask32(K - k);
    __m512 we[S_], wo[S_];
    for (int s = 0; s < S_; ++s) {
      const __m512i v = _mm512_maskz_loadu_epi16(km, w[s] + k);
      we[s] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      wo[s] = _mm512_castsi512_ps(_mm512_and_si512(v, hi));
    }
    const int64_t j = k / 2;
    for (int m = 0; m < M_; ++m) {
      const __m512 a0 = _mm512_load_ps(xe + m * K2 + j), a1 = _mm512_load_ps(xo + m * K2 + j);
      for (int s = 0; s < S_; ++s) acc[m][s] = _mm512_fmadd_ps(a1, wo[s], _mm512_fmadd_ps(a0, we[s], acc[m][s]));
    }
  }
  for (int m = 0; m < M_; ++m)
    for (int s = 0; s < S_; ++s) yo[s][m * ldy] = _mm512_reduce_add_ps(acc[m][s]);
}

template <int M_, int S_>
inline void f32_tile(const GemvArgs& a, const float* const* w, const float* const* nx, float* const* yo, int64_t ldy) {
  __m512 acc[M_][S_];
  for (int m = 0; m < M_; ++m)
    for (int s = 0; s < S_; ++s) acc[m][s] = _mm512_setzero_ps();
  const int64_t K = a.K, pfe = a.pf / 4, ldx = a.ldx;
  const float* x = a.x;
  const bool contiguous = detail::rows_follow<S_>(w, nx, K);
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const int64_t kp = k + pfe;
    __m512 wv[S_];
    for (int s = 0; s < S_; ++s) {
      wv[s] = _mm512_loadu_ps(w[s] + k);
      _mm_prefetch(reinterpret_cast<const char*>(contiguous || kp < K ? w[s] + kp : nx[s] + (kp - K)), _MM_HINT_T0);
    }
    for (int m = 0; m < M_; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * ldx + k);
      for (int s = 0; s < S_; ++s) acc[m][s] = _mm512_fmadd_ps(xv, wv[s], acc[m][s]);
    }
  }
  if (k < K) {
    const __mmask16 km = mask16(K - k);
    for (int m = 0; m < M_; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(km, x + m * ldx + k);
      for (int s = 0; s < S_; ++s) acc[m][s] = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(km, w[s] + k), acc[m][s]);
    }
  }
  for (int m = 0; m < M_; ++m)
    for (int s = 0; s < S_; ++s) yo[s][m * ldy] = _mm512_reduce_add_ps(acc[m][s]);
}

// Rows [n0, n1): S runs of q = count / S rows walked side by side, then the last rows one by one.
template <int M_, int S_>
struct Bf16Tile {
  static void run(const GemvArgs& a, const uint16_t* const* w, const uint16_t* const* nx, float* const* yo, int64_t ldy) {
    bf16_tile<M_, S_>(a, w, nx, yo, ldy);
  }
};
template <int M_, int S_>
struct F32Tile {
  static void run(const GemvArgs& a, const float* const* w, const float* const* nx, float* const* yo, int64_t ldy) {
    f32_tile<M_, S_>(a, w, nx, yo, ldy);
  }
};

template <template <int, int> class Tile, int M_, typename T>
inline void rows(const GemvArgs& a, const T* W, int64_t ldw, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  detail::walk_row_streams<S>(W, ldw, a.rows, n0, n1, y,
                                 [&](auto s, const T* const* w, const T* const* nx, float* const* yo) {
                                   Tile<M_, decltype(s)::value>::run(a, w, nx, yo, ldy);
                                 });
}

template <int M_>
void bf16_rows_m(const GemvArgs& a, const uint16_t* W, int64_t ldw, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  rows<Bf16Tile, M_>(a, W, ldw, n0, n1, y, ldy);
}
template <int M_>
void f32_rows_m(const GemvArgs& a, const float* W, int64_t ldw, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  rows<F32Tile, M_>(a, W, ldw, n0, n1, y, ldy);
}

void bf16_rows(const GemvArgs& a, const uint16_t* W, int64_t ldw, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  switch (a.M) {
    case 1: return bf16_rows_m<1>(a, W, ldw, n0, n1, y, ldy);
    case 2: return bf16_rows_m<2>(a, W, ldw, n0, n1, y, ldy);
    case 3: return bf16_rows_m<3>(a, W, ldw, n0, n1, y, ldy);
    default: return bf16_rows_m<4>(a, W, ldw, n0, n1, y, ldy);
  }
}
void f32_rows(const GemvArgs& a, const float* W, int64_t ldw, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  switch (a.M) {
    case 1: return f32_rows_m<1>(a, W, ldw, n0, n1, y, ldy);
    case 2: return f32_rows_m<2>(a, W, ldw, n0, n1, y, ldy);
    case 3: return f32_rows_m<3>(a, W, ldw, n0, n1, y, ldy);
    default: return f32_rows_m<4>(a, W, ldw, n0, n1, y, ldy);
  }
}

// Dense gated up+down (gemv_kernels.h, UpDownBf16): S neurons from S contiguous runs of the
// neuron range at once; their up rows are dotted with x (as bf16_tile), then their down rows are
// added, scaled, into the split accumulators ye / yo (one load and store of y per S rows). Each
// run reads its neurons' 2·d blocks in address order. Contiguous neurons: prefetched pf bytes
// ahead (past a down row's end, into nxt[s], the run's next block). Listed (gathered) neurons:
// the run's next block nxt[s] is scattered, so it is prefetched whole, at the offset being read
// in this one (a block ahead, as the per-entry sparse kernel does).
template <int M_, int S_>
inline void updown_tile(const GemvArgs& a, const float* coef, int64_t ldc, const uint16_t* const* blk,
                        const uint16_t* const* nxt, const int64_t* js, int64_t doff, float* ye, float* yo) {
  const int64_t d = a.K, K2 = a.K2;
  const bool listed = a.rows != nullptr;
  const int64_t pfe = listed ? 0 : a.pf / 2;
  const uint16_t* const* up_pf = listed ? nxt : blk;  // up rows: prefetch up_pf[s] + k + pfe
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const int64_t d_whole = d / 32 * 32;
  // A row's 32 bf16 at k: a plain load on whole steps, masked on the last partial one (a
  // per-step mask cost ~15% of the rate).
  const auto load = [&](const uint16_t* p, int64_t k, bool whole) {
    return whole ? _mm512_loadu_si512(p + k) : _mm512_maskz_loadu_epi16(mask32(d - k), p + k);
  };
  __m512 hv[M_][S_];  // coef · (x · up_j), broadcast once for the down rows
  {
    __m512 acc[M_][S_];
    for (int m = 0; m < M_; ++m)
      for (int s = 0; s < S_; ++s) acc[m][s] = _mm512_setzero_ps();
    const auto up_step = [&](int64_t k, bool whole) {
      __m512i v[S_];
      for (int s = 0; s < S_; ++s) {
        v[s] = load(blk[s], k, whole);
        _mm_prefetch(reinterpret_cast<const char*>(up_pf[s] + k + pfe), _MM_HINT_T0);
      }
      const int64_t j = k / 2;
      for (int m = 0; m < M_; ++m) {
        const __m512 a0 = _mm512_load_ps(a.xe + m * K2 + j), a1 = _mm512_load_ps(a.xo + m * K2 + j);
        for (int s = 0; s < S_; ++s)
          acc[m][s] = _mm512_fmadd_ps(a1, _mm512_castsi512_ps(_mm512_and_si512(v[s], hi)),
                                      _mm512_fmadd_ps(a0, _mm512_castsi512_ps(_mm512_slli_epi32(v[s], 16)), acc[m][s]));
      }
    };
    for (int64_t k = 0; k < d_whole; k += 32) up_step(k, true);
    if (d_whole < d) up_step(d_whole, false);
    for (int m = 0; m < M_; ++m)
      for (int s = 0; s < S_; ++s) hv[m][s] = _mm512_set1_ps(coef[m * ldc + js[s]] * _mm512_reduce_add_ps(acc[m][s]));
  }
  // Down rows: prefetch pf[s] + k + off. Contiguous: into the row itself while that stays
  // inside the block (pf = down row, off = pfe), then into the next block (pf = nxt, off =
  // pfe - doff). Listed: the next block's down row (pf = nxt, off = doff) throughout.
  const auto down_step = [&](int64_t k, bool whole, const uint16_t* const* pf, int64_t off) {
    __m512i v[S_];
    for (int s = 0; s < S_; ++s) {
      v[s] = load(blk[s] + doff, k, whole);
      _mm_prefetch(reinterpret_cast<const char*>(pf[s] + k + off), _MM_HINT_T0);
    }
    const int64_t j = k / 2;
    for (int m = 0; m < M_; ++m) {
      __m512 e = _mm512_load_ps(ye + m * K2 + j), o = _mm512_load_ps(yo + m * K2 + j);
      for (int s = 0; s < S_; ++s) {
        e = _mm512_fmadd_ps(hv[m][s], _mm512_castsi512_ps(_mm512_slli_epi32(v[s], 16)), e);
        o = _mm512_fmadd_ps(hv[m][s], _mm512_castsi512_ps(_mm512_and_si512(v[s], hi)), o);
      }
      _mm512_store_ps(ye + m * K2 + j, e);
      _mm512_store_ps(yo + m * K2 + j, o);
    }
  };
  const auto down_steps = [&](int64_t k, int64_t k_end, const uint16_t* const* pf, int64_t off) {
    for (; k < k_end; k += 32) {
      if (k < d_whole) down_step(k, true, pf, off);
      else down_step(k, false, pf, off);
    }
  };
  const int64_t k_steps = (d + 31) / 32 * 32;
  if (listed) {
    down_steps(0, k_steps, nxt, doff);
    return;
  }
  bool contiguous = true;  // the next block follows: one loop, the prefetch running on into it
  for (int s = 0; s < S_; ++s) contiguous = contiguous && nxt[s] == blk[s] + 2 * doff;
  if (contiguous) {
    const uint16_t* dn[S_];
    for (int s = 0; s < S_; ++s) dn[s] = blk[s] + doff;
    down_steps(0, k_steps, dn, pfe);
    return;
  }
  const uint16_t* dn[S_];
  for (int s = 0; s < S_; ++s) dn[s] = blk[s] + doff;
  int64_t k_own = doff - pfe <= 0 ? 0 : (doff - pfe + 31) / 32 * 32;  // first step prefetching past the block
  if (k_own > k_steps) k_own = k_steps;
  down_steps(0, k_own, dn, pfe);
  down_steps(k_own, k_steps, nxt, pfe - doff);
}

template <int M_>
void updown_m(const GemvArgs& a, const float* coef, int64_t ldc, const uint16_t* W, int64_t ld, int64_t j0, int64_t j1,
              float* ye, float* yo) {
  // Position p is neuron p, or a.rows[p] when the neurons are listed (gathered).
  const auto neuron = [&a](int64_t p) -> int64_t { return a.rows ? a.rows[p] : p; };
  const auto next_block = [&](int64_t p, int64_t j) { return W + (a.rows && p + 1 < j1 ? neuron(p + 1) : j + 1) * ld; };
  const int64_t q = (j1 - j0) / S;
  for (int64_t i = 0; i < q; ++i) {
    const uint16_t* blk[S];
    const uint16_t* nxt[S];
    int64_t js[S];
    for (int s = 0; s < S; ++s) {
      const int64_t p = j0 + s * q + i;
      js[s] = neuron(p);
      blk[s] = W + js[s] * ld;
      nxt[s] = next_block(p, js[s]);
    }
    updown_tile<M_, S>(a, coef, ldc, blk, nxt, js, ld / 2, ye, yo);
  }
  for (int64_t p = j0 + S * q; p < j1; ++p) {
    const int64_t js[1] = {neuron(p)};
    const uint16_t* blk[1] = {W + js[0] * ld};
    const uint16_t* nxt[1] = {next_block(p, js[0])};
    updown_tile<M_, 1>(a, coef, ldc, blk, nxt, js, ld / 2, ye, yo);
  }
}

void updown_bf16(const GemvArgs& a, const float* coef, int64_t ldc, const uint16_t* W, int64_t ld, int64_t j0,
                 int64_t j1, float* ye, float* yo) {
  switch (a.M) {
    case 1: return updown_m<1>(a, coef, ldc, W, ld, j0, j1, ye, yo);
    case 2: return updown_m<2>(a, coef, ldc, W, ld, j0, j1, ye, yo);
    case 3: return updown_m<3>(a, coef, ldc, W, ld, j0, j1, ye, yo);
    default: return updown_m<4>(a, coef, ldc, W, ld, j0, j1, ye, yo);
  }
}

const GemvKernels k_avx512{"avx512 4 streams", true, bf16_rows, f32_rows, updown_bf16};

}  // namespace

const GemvKernels& gemv_kernels_avx512() { return k_avx512; }

}  // namespace sparsellm::gemv_detail
