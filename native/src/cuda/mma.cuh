// The warp-level tensor-core primitives (sm_80+) shared by the mma.sync GEMMs (gemm_kernel.cuh,
// train_gemm.cu): shared-memory addresses, ldmatrix, the m16n8k16 bf16 MMA and bf16 pair
// packing. Kept apart so that each kernel's indexing can be read (and emulated on a host)
// without the PTX.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace sparsellm::cuda::detail {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8 × 8 b16 matrices: lanes 8j..8j+7 give the row addresses of matrix j (16-byte rows);
// register j of lane l receives matrix j's row l/4, elements 2·(l%4) and 2·(l%4)+1.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// The same four matrices, each transposed: register j of lane l receives matrix j's elements
// (row 2·(l%4), column l/4) and (row 2·(l%4)+1, column l/4). Loads a B fragment from a tile staged
// with n contiguous (k rows), e.g. V in P·V.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// Where lane l points ldmatrix_x4 in a tile staged row-major with k contiguous, as (row, 8-element
// k chunk) within a 16 × 16 slice: for an A fragment (rows m) the matrices are (m 0-7 | 8-15) ×
// (k 0-7 | 8-15); for the B fragments of two 8-column tiles (rows n) they are (n 0-7, k 0-7),
// (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15).
__device__ __forceinline__ int ldsm_a_row(int lane) { return lane & 15; }
__device__ __forceinline__ int ldsm_a_chunk(int lane) { return lane >> 4; }
__device__ __forceinline__ int ldsm_b_row(int lane) { return ((lane >> 4) << 3) + (lane & 7); }
__device__ __forceinline__ int ldsm_b_chunk(int lane) { return (lane >> 3) & 1; }

// The B fragments of two adjacent 8-column tiles (b0: columns 0-7, b1: 8-15) from one
// ldmatrix_x4 at the lane's address above.
__device__ __forceinline__ void ldmatrix_b_pair(uint32_t (&b0)[2], uint32_t (&b1)[2], uint32_t addr) {
  uint32_t r[4];
  ldmatrix_x4(r, addr);
  b0[0] = r[0];
  b0[1] = r[1];
  b1[0] = r[2];
  b1[1] = r[3];
}

// c[16 × 8] += a[16 × 16]·b[16 × 8], bf16 operands, f32 accumulators. With g = lane/4, q = lane%4:
// a = {(g, 2q..), (g+8, 2q..), (g, 2q+8..), (g+8, 2q+8..)}, b = {(k 2q.., n g), (k 2q+8.., n g)},
// c = {(g, 2q), (g, 2q+1), (g+8, 2q), (g+8, 2q+1)} (row, column; ".." = that element and the next).
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats rounded to bf16 (nearest even) in one word, `lo` in the low half.
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  uint32_t r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

}  // namespace sparsellm::cuda::detail
