// Internal interface between the portable GEMM driver (gemm.cpp) and the ISA-specific kernels
// (gemm_avx512.cpp, gemm_avx2.cpp, and the portable ones in gemm.cpp). Plain function pointers,
// so no template or inline function is shared between translation units built with different
// ISA flags.
//
// Packed layouts (all f32, 64-byte aligned buffers):
//  A block, rows [0, rows) × k [0, kc): micro-panels of MR rows. Panel p holds element (r, k) at
//    p * K_total * MR + k * MR + r (the driver packs the whole K for a panel, a k block starts at
//    k0 * MR); rows past `rows` are zero.
//  W block, columns n [0, cols) × k [0, kc): micro-panels of NR columns. Panel q holds element
//    (n, k) at q * kc * NR + k * NR + (n - q * NR); columns past `cols` are zero.
#pragma once
#include <cstdint>

namespace sparsellm::gemm_detail {

struct Kernels {
  const char* name;
  int mr;  // rows of the register tile
  int nr;  // columns of the register tile
  int gemv_max_m;  // default largest M for the small-M kernels (measured crossover)
  // Packs rows [0, rows) × k [0, K) of A into ceil(rows / mr) panels of K × mr floats.
  void (*pack_a)(const float* A, int64_t lda, int64_t rows, int64_t K, float* dst);
  // Packs columns [0, cols) × k [0, kc) of W (rows of the [N, K] matrix) into ceil(cols / nr)
  // panels of kc × nr floats, widening bf16.
  void (*pack_w_f32)(const float* W, int64_t ldw, int64_t cols, int64_t kc, float* dst);
  void (*pack_w_bf16)(const uint16_t* W, int64_t ldw, int64_t cols, int64_t kc, float* dst);
  // c[r, n] (=, or += when accumulate) sum_k a[k * mr + r] * w[k * nr + n] for r < rows <= mr,
  // n < cols <= nr.
  void (*micro)(int64_t kc, const float* a, const float* w, float* c, int64_t ldc, int rows, int cols,
                bool accumulate);
  // Small-M path, single-threaded over a range of W rows: c[m * ldc + (n - n0)] = A[m] · W[n]
  // for m < M, n in [n0, n1). Streams W once; the driver splits N over threads.
  void (*gemv_f32)(const float* A, int64_t lda, int64_t M, const float* W, int64_t ldw, int64_t K,
                   int64_t n0, int64_t n1, float* c, int64_t ldc);
  void (*gemv_bf16)(const float* A, int64_t lda, int64_t M, const uint16_t* W, int64_t ldw, int64_t K,
                    int64_t n0, int64_t n1, float* c, int64_t ldc);
};

const Kernels& kernels_portable();
const Kernels& kernels_avx2();
const Kernels& kernels_avx512();

}  // namespace sparsellm::gemm_detail
