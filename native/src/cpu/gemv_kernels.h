// Internal interface between the decode GEMV driver (gemv.cpp) and its per-ISA row kernels
// (gemv_avx512.cpp, gemv_avx2.cpp, portable ones in gemv.cpp). Plain function pointers and no
// shared templates, since the files are compiled with different ISA flags.
//
// A row kernel computes, single-threaded, y[m * ldy + n] = x[m] · W[n] for m < M (1 .. 4) and
// n in [n0, n1). The rows are read as `streams` contiguous runs at once (the range is cut into
// that many equal parts walked side by side, a software prefetch `pf` bytes ahead on each run,
// continuing into the run's next row), so every thread keeps several independent memory streams
// in flight, like the bandwidth probe. bf16 weights are widened in registers; the even and odd
// elements of each x row are split beforehand (xe, xo: [M][K2], K2 = ceil(K / 32) * 16, zero
// padded), so that a 32-bit lane of loaded bf16 pairs widens with one shift or one mask.
#pragma once
#include <cstdint>

namespace sparsellm::gemv_detail {

constexpr int kMaxTokens = 4;

struct GemvArgs {
  const float* x = nullptr;  // natural rows [M][ldx] (f32 weights, portable bf16)
  int64_t ldx = 0;
  const float* xe = nullptr;  // even / odd split [M][K2] (bf16 on AVX2 / AVX-512)
  const float* xo = nullptr;
  int64_t K2 = 0;
  int M = 1;
  int64_t K = 0;
  int64_t pf = 1024;  // prefetch distance in bytes
  // Null: positions [n0, n1) are rows n0 .. n1 - 1. Else position n is row rows[n] (gathered
  // rows; y of row r still lands at y[m * ldy + r]). A row's value is the same either way.
  const int32_t* rows = nullptr;
};

using RowsBf16 = void (*)(const GemvArgs& a, const uint16_t* W, int64_t ldw, int64_t n0, int64_t n1, float* y,
                          int64_t ldy);
using RowsF32 = void (*)(const GemvArgs& a, const float* W, int64_t ldw, int64_t n0, int64_t n1, float* y,
                         int64_t ldy);

// Dense gated up+down over neurons [j0, j1) (the dense decode FFN on the neuron-major updown
// layout, one contiguous 2·d block per neuron): for each token m and neuron j,
//   u = x[m] · U_j,  y[m] += (coef[m · ldc + j] · u) · D_j
// with U_j = W + j · ld and D_j = U_j + ld / 2 (bf16, d = a.K <= ld / 2). y is accumulated in the even/odd
// split layout of x: ye / yo [M][K2] (y[2i] in ye[i], y[2i + 1] in yo[i]). Null when the ISA
// has none (the caller falls back to separate GEMVs).
using UpDownBf16 = void (*)(const GemvArgs& a, const float* coef, int64_t ldc, const uint16_t* W, int64_t ld,
                            int64_t j0, int64_t j1, float* ye, float* yo);

struct GemvKernels {
  const char* name;
  bool split;  // bf16 kernel reads xe / xo
  RowsBf16 bf16;
  RowsF32 f32;
  UpDownBf16 updown_bf16;
};

const GemvKernels& gemv_kernels_avx512();
const GemvKernels& gemv_kernels_avx2();

inline int64_t gemv_k2(int64_t K) { return (K + 31) / 32 * 16; }

}  // namespace sparsellm::gemv_detail
