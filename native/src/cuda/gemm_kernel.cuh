// The mma.sync tensor-core GEMM kernel (bf16 in, f32 accumulate), shared by the plain GEMM and the
// TwELL gate GEMM (epilogue chosen at run time, so each block width is compiled once). It runs on
// every device of compute capability 8.0+; on 9.0 the Hopper kernel (gemm_wgmma.cu) replaces it
// and shares its epilogue pieces (EpiParams, epi_value/epi_store, twell_pack_row) from here.
//
//   C[M, N] = A[M, K] · W[N, K]ᵀ   (both operands K-contiguous: "row.col" mma operands)
//
// Block tile BM x BN x BK = 128 x {128, 256} x 32, warp tile 64 x 64 (2 x BN/64 warps),
// mma.sync.m16n8k16 bf16 → f32, operands through ldmatrix from an XOR-swizzled shared layout
// fed by a STAGES-deep cp.async pipeline. Out-of-range rows/columns and the K tail are
// zero-filled by cp.async's src-size operand, so any M, N, K works (lda, ldw multiples of 8).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "mma.cuh"

namespace sparsellm::cuda::detail {

constexpr int kBM = 128, kBK = 32, kStages = 4;

struct EpiParams {
  int op = 0;  // EpiOp
  const float* bias = nullptr;
  const uint16_t* aux = nullptr;
  int64_t ldaux = 0;
  int out_bf16 = 0;
  void* out = nullptr;
  int64_t ldo = 0;
  int vec2 = 0;  // pairs (n, n+1) may be stored/loaded as one aligned access
  int accumulate = 0;  // f32 out only: out += v
  // TwELL packing (gate GEMM)
  int twell = 0;
  int tile = 0, cap = 0;
  int64_t tiles = 0;
  int32_t* count = nullptr;
  uint32_t* entries = nullptr;
};

template <int BN>
__host__ __device__ constexpr int gemm_threads() { return 2 * (BN / 64) * 32; }

template <int BN>
constexpr int gemm_smem_bytes() {
  constexpr int pipe = kStages * (kBM + BN) * kBK * 2;
  constexpr int stage_out = kBM * (BN + 8) * 2;
  return pipe > stage_out ? pipe : stage_out;
}

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Element offset of 16-byte chunk `c` (0..3) of smem row `row` (BK = 32 bf16 = 64 bytes per
// row). XOR with (row/2)%4 spreads the 8 rows an ldmatrix phase reads over all 32 banks.
__device__ __forceinline__ int swz(int row, int c) { return row * kBK + ((c ^ ((row >> 1) & 3)) << 3); }

// One output value v at (m, n) through the plain epilogue (n < N, m < M checked by the caller).
__device__ __forceinline__ float epi_value(const EpiParams& ep, int64_t m, int64_t n, float v) {
  if (ep.bias) v += ep.bias[n];
  if (ep.op == 1) v = fmaxf(v, 0.f);
  else if (ep.op == 2) v *= bf16_bits_to_f32(ep.aux[m * ep.ldaux + n]);
  return v;
}
__device__ __forceinline__ void epi_store(const EpiParams& ep, int64_t m, int64_t n, float v) {
  if (ep.out_bf16) static_cast<uint16_t*>(ep.out)[m * ep.ldo + n] = static_cast<uint16_t>(f32_to_bf16_bits(v));
  else if (ep.accumulate) static_cast<float*>(ep.out)[m * ep.ldo + n] += v;
  else static_cast<float*>(ep.out)[m * ep.ldo + n] = v;
}

// TwELL packing of one staged row (one warp, all lanes): srow holds the ReLU'd bf16 values of
// output row m, columns n0 .. n0 + bn - 1 (bn a multiple of the tile T). Per tile the lanes own
// T/32 consecutive columns, count their positives, and a warp scan gives each lane its first
// slot, so entries land in increasing column order; the tile's count is the true number of
// positives (it may exceed cap: only the first cap entries are written).
__device__ __forceinline__ void twell_pack_row(const EpiParams& ep, const uint16_t* srow_all, int64_t m, int n0, int bn,
                                               int N, int lane) {
  const int T = ep.tile, per = T / 32, cap = ep.cap;
  for (int tt = 0; tt < bn / T; ++tt) {
    const int cbase = n0 + tt * T;
    if (cbase >= N) break;
    const int64_t tile_idx = cbase / T;
    const uint16_t* srow = srow_all + tt * T + lane * per;
    int cnt = 0;
    for (int e = 0; e < per; ++e) {
      const int n = cbase + lane * per + e;
      cnt += (n < N && bf16_bits_to_f32(srow[e]) > 0.f) ? 1 : 0;
    }
    int incl = cnt;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int t = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += t;
    }
    const int total = __shfl_sync(0xffffffffu, incl, 31);
    int pos = incl - cnt;
    uint32_t* ent = ep.entries + (m * ep.tiles + tile_idx) * cap;
    for (int e = 0; e < per && pos < cap; ++e) {
      const int n = cbase + lane * per + e;
      const uint32_t b = srow[e];
      if (n < N && bf16_bits_to_f32(b) > 0.f) {
        ent[pos] = (b << 16) | static_cast<uint32_t>(lane * per + e);
        ++pos;
      }
    }
    if (lane == 0) ep.count[m * ep.tiles + tile_idx] = total;
  }
}

template <int BN>
__global__ void __launch_bounds__(gemm_threads<BN>(), 1)
    gemm_bf16_kernel(const uint16_t* __restrict__ A, int64_t lda, const uint16_t* __restrict__ W, int64_t ldw,
                     int M, int N, int K, EpiParams ep) {
  constexpr int WARPS_N = BN / 64;
  constexpr int THREADS = gemm_threads<BN>();
  constexpr int NWARPS = THREADS / 32;
  extern __shared__ __align__(128) uint16_t smem[];
  uint16_t* As = smem;                        // [kStages][kBM * kBK]
  uint16_t* Bs = smem + kStages * kBM * kBK;  // [kStages][BN * kBK]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp / WARPS_N, wn = warp % WARPS_N;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM;
  const int n0 = blockIdx.x * BN;
  const int KT = (K + kBK - 1) / kBK;

  auto load_stage = [&](int stage, int kt) {
    const int k0 = kt * kBK;
    uint16_t* as = As + stage * kBM * kBK;
    uint16_t* bs = Bs + stage * BN * kBK;
#pragma unroll
    for (int i = 0; i < (kBM * 4) / THREADS; ++i) {
      const int id = tid + i * THREADS, row = id >> 2, c = id & 3;
      const int64_t gm = m0 + row;
      const int gk = k0 + c * 8;
      int bytes = 0;
      const uint16_t* src = A;
      if (gm < M && gk < K) {
        bytes = min(16, (K - gk) * 2);
        src = A + gm * lda + gk;
      }
      cp_async16(smem_addr(as + swz(row, c)), src, bytes);
    }
#pragma unroll
    for (int i = 0; i < (BN * 4) / THREADS; ++i) {
      const int id = tid + i * THREADS, row = id >> 2, c = id & 3;
      const int gn = n0 + row;
      const int gk = k0 + c * 8;
      int bytes = 0;
      const uint16_t* src = W;
      if (gn < N && gk < K) {
        bytes = min(16, (K - gk) * 2);
        src = W + static_cast<int64_t>(gn) * ldw + gk;
      }
      cp_async16(smem_addr(bs + swz(row, c)), src, bytes);
    }
  };

  float acc[4][8][4];
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 8; ++b)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[a][b][c] = 0.f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < KT) load_stage(s, s);
    cp_async_commit();
  }

  for (int kt = 0; kt < KT; ++kt) {
    // Tile kt has landed (this thread's copies), and every thread finished computing tile kt-1,
    // whose stage the prefetch below overwrites.
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int nk = kt + kStages - 1;
    if (nk < KT) load_stage(nk % kStages, nk);
    cp_async_commit();

    const uint16_t* as = As + (kt % kStages) * kBM * kBK;
    const uint16_t* bs = Bs + (kt % kStages) * BN * kBK;
#pragma unroll
    for (int ks = 0; ks < kBK / 16; ++ks) {
      uint32_t af[4][4], bfr[8][2];
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) {
        const int row = wm * 64 + mt * 16 + ldsm_a_row(lane);
        ldmatrix_x4(af[mt], smem_addr(as + swz(row, ks * 2 + ldsm_a_chunk(lane))));
      }
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        const int row = wn * 64 + np * 16 + ldsm_b_row(lane);
        ldmatrix_b_pair(bfr[2 * np], bfr[2 * np + 1], smem_addr(bs + swz(row, ks * 2 + ldsm_b_chunk(lane))));
      }
#pragma unroll
      for (int mt = 0; mt < 4; ++mt)
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) mma_bf16(acc[mt][nt], af[mt], bfr[nt][0], bfr[nt][1]);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline buffers may now be reused by the TwELL epilogue

  const int g = lane >> 2, tq = lane & 3;
  if (!ep.twell) {
    // Plain epilogue: each warp stages 16 rows x 64 columns of its tile at a time in shared
    // memory (constant register indices only), then writes whole rows: lane l owns columns
    // 2l, 2l+1, so a warp stores 64 consecutive outputs per row.
    constexpr int WLD = 72;  // padded row of the per-warp staging area (floats)
    float* wst = reinterpret_cast<float*>(smem) + warp * (16 * WLD);
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        const int c = nt * 8 + tq * 2;
        *reinterpret_cast<float2*>(wst + g * WLD + c) = make_float2(acc[mt][nt][0], acc[mt][nt][1]);
        *reinterpret_cast<float2*>(wst + (g + 8) * WLD + c) = make_float2(acc[mt][nt][2], acc[mt][nt][3]);
      }
      __syncwarp();
      const int64_t n = n0 + wn * 64 + lane * 2;
      for (int r = 0; r < 16; ++r) {
        const int64_t m = m0 + wm * 64 + mt * 16 + r;
        if (m >= M || n >= N) continue;
        const float2 a = *reinterpret_cast<const float2*>(wst + r * WLD + lane * 2);
        const float v0 = epi_value(ep, m, n, a.x);
        if (n + 1 < N) {
          const float v1 = epi_value(ep, m, n + 1, a.y);
          if (ep.vec2) {
            if (ep.out_bf16)
              *reinterpret_cast<uint32_t*>(static_cast<uint16_t*>(ep.out) + m * ep.ldo + n) =
                  f32_to_bf16_bits(v0) | (f32_to_bf16_bits(v1) << 16);
            else {
              float2* o = reinterpret_cast<float2*>(static_cast<float*>(ep.out) + m * ep.ldo + n);
              if (ep.accumulate) {
                const float2 p = *o;
                *o = make_float2(p.x + v0, p.y + v1);
              } else {
                *o = make_float2(v0, v1);
              }
            }
          } else {
            epi_store(ep, m, n, v0);
            epi_store(ep, m, n + 1, v1);
          }
        } else {
          epi_store(ep, m, n, v0);
        }
      }
      __syncwarp();
    }
    return;
  }

  // TwELL epilogue: ReLU'd bf16 block staged in shared memory, then each warp packs rows
  // (twell_pack_row).
  constexpr int SLD = BN + 8;  // padded row (bank spread for the staging stores)
  uint16_t* st = smem;
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int rl = wm * 64 + mt * 16 + g + half * 8;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        const int cl = wn * 64 + nt * 8 + tq * 2;
        const int n = n0 + cl;
        float v0 = 0.f, v1 = 0.f;
        if (n < N) v0 = fmaxf(acc[mt][nt][half * 2] + (ep.bias ? ep.bias[n] : 0.f), 0.f);
        if (n + 1 < N) v1 = fmaxf(acc[mt][nt][half * 2 + 1] + (ep.bias ? ep.bias[n + 1] : 0.f), 0.f);
        *reinterpret_cast<uint32_t*>(st + rl * SLD + cl) = f32_to_bf16_bits(v0) | (f32_to_bf16_bits(v1) << 16);
      }
    }
  __syncthreads();
  for (int r = warp; r < kBM; r += NWARPS) {
    const int64_t m = m0 + r;
    if (m >= M) break;
    twell_pack_row(ep, st + r * SLD, m, n0, BN, N, lane);
  }
}

}  // namespace sparsellm::cuda::detail
