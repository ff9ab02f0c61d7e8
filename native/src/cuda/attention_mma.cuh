// Shared by the tensor-core attention kernels (attention_mma.cu forward, attention_mma_bwd.cu
// backward): tile sizes, the staged-row layout and the staging loop.
#pragma once
#include "common.cuh"
#include "mma.cuh"

namespace sparsellm::cuda::attn_mma {

using detail::ldmatrix_b_pair;
using detail::ldmatrix_x4;
using detail::ldmatrix_x4_trans;
using detail::ldsm_a_chunk;
using detail::ldsm_a_row;
using detail::ldsm_b_chunk;
using detail::ldsm_b_row;
using detail::mma_bf16;
using detail::pack_bf16x2;
using detail::smem_addr;

constexpr int kWarps = 4;
constexpr int kBlockQ = 16 * kWarps;  // queries per block, 16 per warp
constexpr int kBlockK = 64;           // keys per staged tile
constexpr float kLog2e = 1.4426950408889634f;

template <int HD>
__host__ __device__ constexpr int pitch() {
  return HD + 8;  // bf16 elements per staged row: +16 bytes, so ldmatrix's eight rows hit distinct banks
}

// rows × HD floats from src (row stride ld floats, rows 16-byte aligned) into dst as bf16
// (pitch<HD>()); rows ≥ n are zero.
template <int HD>
__device__ __forceinline__ void stage_rows(const float* __restrict__ src, int64_t ld, int rows, int n, uint16_t* dst) {
  constexpr int kVec = HD / 4;  // float4 per row
  for (int i = threadIdx.x; i < rows * kVec; i += kWarps * 32) {
    const int r = i / kVec, c = (i % kVec) * 4;
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
    if (r < n) v = *reinterpret_cast<const float4*>(src + r * ld + c);
    *reinterpret_cast<uint2*>(dst + r * pitch<HD>() + c) = make_uint2(pack_bf16x2(v.x, v.y), pack_bf16x2(v.z, v.w));
  }
}


// The block's tile: rows row0 .. row0 + n − 1 (n ≤ 64) of head h of sequence b = blockIdx.y, for
// a grid of tiles × heads in blockIdx.x; last_first: the last tile (the most keys) first.
struct BlockTile {
  int64_t b, row0;
  int h, n;
};
__device__ __forceinline__ BlockTile block_tile(int64_t T, int n_heads, bool last_first) {
  const int64_t n_tiles = (T + kBlockQ - 1) / kBlockQ, i = static_cast<int64_t>(blockIdx.x) / n_heads;
  const int64_t row0 = (last_first ? n_tiles - 1 - i : i) * kBlockQ;
  return {static_cast<int64_t>(blockIdx.y), row0, static_cast<int>(blockIdx.x % n_heads),
          static_cast<int>(T - row0 < kBlockQ ? T - row0 : kBlockQ)};
}

// The A fragments of a 16-row slice of a staged tile (rows row0 .., all HD columns).
template <int HD>
__device__ __forceinline__ void load_a_frags(uint32_t (&fr)[HD / 16][4], const uint16_t* tile, int row0, int lane) {
#pragma unroll
  for (int kk = 0; kk < HD / 16; ++kk)
    ldmatrix_x4(fr[kk], smem_addr(tile + (row0 + ldsm_a_row(lane)) * pitch<HD>() + kk * 16 + ldsm_a_chunk(lane) * 8));
}

// c[8][4] = a (16 × HD, A fragments) · rowsᵀ for the 64 staged rows of `tile` (the 8 n-tiles of
// 8 columns: column n = row n of the tile).
template <int HD>
__device__ __forceinline__ void mma_rows_t(float (&c)[8][4], const uint32_t (&a)[HD / 16][4], const uint16_t* tile,
                                           int lane) {
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) c[nt][0] = c[nt][1] = c[nt][2] = c[nt][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < HD / 16; ++kk) {
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      uint32_t b0[2], b1[2];
      ldmatrix_b_pair(b0, b1,
                      smem_addr(tile + (np * 16 + ldsm_b_row(lane)) * pitch<HD>() + kk * 16 + ldsm_b_chunk(lane) * 8));
      mma_bf16(c[2 * np], a[kk], b0[0], b0[1]);
      mma_bf16(c[2 * np + 1], a[kk], b1[0], b1[1]);
    }
  }
}

// acc[HD / 8][4] += p (16 × 64, accumulator layout, rounded to bf16 as A fragments) · tile
// (64 staged rows × HD: the rows are the product's depth, read through ldmatrix.trans).
template <int HD>
__device__ __forceinline__ void mma_acc_rows(float (&acc)[HD / 8][4], const float (&p)[8][4], const uint16_t* tile,
                                             int lane) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const uint32_t pa[4] = {pack_bf16x2(p[2 * kk][0], p[2 * kk][1]), pack_bf16x2(p[2 * kk][2], p[2 * kk][3]),
                            pack_bf16x2(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                            pack_bf16x2(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
    for (int nd = 0; nd < HD / 16; ++nd) {
      uint32_t b[4];  // (rows 0-7 | 8-15) × (columns 0-7 | 8-15) of this 16 × 16 slice
      ldmatrix_x4_trans(b, smem_addr(tile + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * pitch<HD>() + nd * 16 +
                                     (lane >> 4) * 8));
      mma_bf16(acc[2 * nd], pa, b[0], b[1]);
      mma_bf16(acc[2 * nd + 1], pa, b[2], b[3]);
    }
  }
}

}  // namespace sparsellm::cuda::attn_mma
