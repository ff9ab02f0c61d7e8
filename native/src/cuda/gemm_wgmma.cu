// The Hopper (sm_90a) GEMM: wgmma.mma_async on operands that TMA copies into a multi-stage
// shared-memory pipeline, with the same epilogues as the mma.sync kernel (gemm_kernel.cuh):
// plain (bias, ReLU / ⊙aux, f32 or bf16 out, accumulate) and the TwELL packing of the gate GEMM.
//
//   C[M, N] = A[M, K] · W[N, K]ᵀ   (both operands K-major: wgmma's "TN" form, no transposes)
//
// Block tile 128 x 256 x 64, persistent: one block per multiprocessor walks the output tiles
// (N fastest within a row of tiles, so the blocks running at once share A rows and the whole W
// stays in L2). Three warpgroups: warpgroup 0 is the producer (one thread issues the TMA copies
// of a stage: A 128 x 64 and W 256 x 64, 128-byte swizzled, K tail and rows beyond M or N
// zero-filled by the TMA unit), warpgroups 1 and 2 the consumers, each computing 64 x 256 of the
// tile with m64n256k16 wgmma (128 f32 accumulators per thread). Stages are handed over with
// mbarriers: full[s] (the producer's expected byte count, completed by TMA), empty[s] (one
// arrival per consumer warp once its wgmma reading the stage has retired). The producer runs
// ahead into the next tile while the consumers run the epilogue.
//
// CLUSTER = 2: two blocks (vertically adjacent tiles, same W columns) form a cluster; each loads
// half of the W stage and multicasts it to both, so a block reads 32 KiB instead of 48 KiB per
// stage from L2; empty[s] then waits for the consumer warps of both blocks.
//
// Compiled for sm_90a only (wgmma and setmaxnreg need the arch-specific target); in other
// targets the kernel body is a trap and the host never launches it (wgmma_supported()).
#include <cuda.h>  // CUtensorMap and its enums only: the encoder comes from the driver at run time
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common.cuh"
#include "gemm_kernel.cuh"
#include "gemm_wgmma.h"

namespace sparsellm::cuda::detail {
namespace {

constexpr int kWBM = 128, kWBN = 256, kWBK = 64;
constexpr int kWThreads = 384;  // producer warpgroup + 2 consumer warpgroups
constexpr int kABytes = kWBM * kWBK * 2, kBBytes = kWBN * kWBK * 2, kStageBytes = kABytes + kBBytes;
constexpr int kStLd = kWBN + 8;              // TwELL staging row (bf16), padded against bank conflicts
constexpr int kStBytes = kWBM * kStLd * 2;   // TwELL staging block (both consumers)
constexpr int kPlainStages = 4, kTwellStages = 3;

template <int STAGES, bool TWELL>
constexpr int wg_smem_bytes() {
  return 1024 /* alignment slack: swizzled stages start on 1 KiB */ + STAGES * kStageBytes + (TWELL ? kStBytes : 0) +
         2 * STAGES * 8;
}
static_assert(wg_smem_bytes<kPlainStages, false>() <= 227 * 1024, "plain pipeline exceeds shared memory");
static_assert(wg_smem_bytes<kTwellStages, true>() <= 227 * 1024, "TwELL pipeline exceeds shared memory");

struct WgArgs {
  int M, N, K;
  int n_blocks;  // column tiles
  int units;     // (row-tile groups of CLUSTER) x n_blocks
};

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SLLM_WGMMA_DEVICE 1

__device__ __forceinline__ uint32_t s_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ bool mbar_try_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
  return done != 0;
}
// Waits for the phase of parity `parity` to complete. A wait of 2^34 cycles (seconds; a stage
// takes microseconds) can only be a pipeline bug: trap, so the launch fails instead of hanging.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  if (mbar_try_wait(bar, parity)) return;
  const long long t0 = clock64();
  while (!mbar_try_wait(bar, parity))
    if (clock64() - t0 > (1ll << 34)) __trap();
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Arrive on the barrier at the same offset in block `cta` of the cluster.
__device__ __forceinline__ void mbar_arrive_cluster(uint32_t bar, uint32_t cta) {
  asm volatile(
      "{\n.reg .b32 ra;\nmapa.shared::cluster.u32 ra, %0, %1;\nmbarrier.arrive.release.cluster.shared::cluster.b64 _, [ra];\n}\n" ::"r"(
          bar),
      "r"(cta)
      : "memory");
}
__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.aligned;\nbarrier.cluster.wait.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void named_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// TMA: box (64 K-elements x rows) at (k, row) of the tensor map into shared memory, completing
// `bytes` on the mbarrier; the multicast form writes the same offset in every block of `mask`.
__device__ __forceinline__ void tma_load(const CUtensorMap* map, uint32_t dst, uint32_t bar, int k, int row) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n" ::"r"(
          dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(k), "r"(row)
      : "memory");
}
__device__ __forceinline__ void tma_load_multicast(const CUtensorMap* map, uint32_t dst, uint32_t bar, int k, int row,
                                                   uint16_t mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1, {%3, "
      "%4}], [%2], %5;\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(k), "r"(row), "h"(mask)
      : "memory");
}

// wgmma shared-memory descriptor of a K-major operand in the 128-byte swizzled layout TMA writes:
// rows of 128 bytes, 8-row atoms of 1 KiB (stride byte offset 1024), start address >> 4 in bits
// 0-13, leading byte offset (unused for this layout) 16 >> 4, layout type 1 (128B swizzle) in
// bits 62-63. Advancing K by 16 elements adds 32 bytes (2 in the encoded address).
__device__ __forceinline__ uint64_t sw128_desc(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3ffffu) >> 4) | (static_cast<uint64_t>(1) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (static_cast<uint64_t>(1) << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accumulator reads/writes across the asynchronous wgmma.
__device__ __forceinline__ void fence_acc(float (&d)[128]) {
#pragma unroll
  for (int i = 0; i < 128; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}

// D[64 x 256] (+)= A[64 x 16] · B[256 x 16]ᵀ, bf16 operands from shared memory, f32 accumulators in
// the m64nNk16 fragment layout: d[4i + {0,1}] = row 16·warp + lane/4, columns 8i + 2·(lane%4) + {0,1};
// d[4i + {2,3}] the same columns 8 rows below.
__device__ __forceinline__ void wgmma_m64n256k16(float (&d)[128], uint64_t da, uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"
      "}, %128, %129, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
        "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
        "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
        "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
        "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
        "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
        "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
        "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
        "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
      : "l"(da), "l"(db), "r"(1));
}

// One output pair (m, n), (m, n + 1) of the plain epilogue (n < N checked by the caller).
__device__ __forceinline__ void store_pair(const EpiParams& ep, int64_t m, int n, int M, int N, float a, float b) {
  if (m >= M) return;
  const float v0 = epi_value(ep, m, n, a);
  if (n + 1 < N) {
    const float v1 = epi_value(ep, m, n + 1, b);
    if (ep.vec2) {
      if (ep.out_bf16) {
        *reinterpret_cast<uint32_t*>(static_cast<uint16_t*>(ep.out) + m * ep.ldo + n) =
            f32_to_bf16_bits(v0) | (f32_to_bf16_bits(v1) << 16);
      } else {
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

#endif  // sm_90a

template <int STAGES, int CLUSTER, bool TWELL>
__global__ void __launch_bounds__(kWThreads, 1)
    wgmma_gemm_kernel(const __grid_constant__ CUtensorMap tmA, const __grid_constant__ CUtensorMap tmB, WgArgs a,
                      EpiParams ep) {
#ifdef SLLM_WGMMA_DEVICE
  extern __shared__ uint8_t wg_smem[];
  const uint32_t raw = s_addr(wg_smem);
  const uint32_t base = (raw + 1023u) & ~1023u;
  const uint32_t sA = base, sB = base + STAGES * kABytes;
  uint16_t* stage_out = reinterpret_cast<uint16_t*>(wg_smem + (base - raw) + STAGES * kStageBytes);
  const uint32_t bars = base + STAGES * kStageBytes + (TWELL ? kStBytes : 0);
  auto full = [&](int s) { return bars + 8u * s; };
  auto empty = [&](int s) { return bars + 8u * (STAGES + s); };

  const int tid = threadIdx.x, wgi = tid >> 7, lane = tid & 31, warp = tid >> 5;
  const uint32_t rank = CLUSTER > 1 ? cluster_rank() : 0u;
  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(full(s), 1);
      mbar_init(empty(s), 8 * CLUSTER);  // every consumer warp of every block of the cluster
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  // Barriers initialised before any block of the cluster copies into or arrives on them.
  if (CLUSTER > 1) cluster_sync();
  else __syncthreads();

  const int KT = (a.K + kWBK - 1) / kWBK;
  const int cid = static_cast<int>(blockIdx.x) / CLUSTER, ncl = static_cast<int>(gridDim.x) / CLUSTER;

  if (wgi == 0) {
    setmaxnreg_dec<40>();
    if (tid == 0) {
      int s = 0;
      uint32_t ph = 0;
      for (int u = cid; u < a.units; u += ncl) {
        const int mb = (u / a.n_blocks) * CLUSTER + static_cast<int>(rank), nb = u % a.n_blocks;
        // Boxes wholly outside the matrix (a cluster's spare row tile, a W half past N) read
        // row 0 instead: their results are never stored, only the K tail must be zero.
        int m0 = mb * kWBM;
        if (m0 >= a.M) m0 = 0;
        int nw = nb * kWBN + static_cast<int>(rank) * (kWBN / CLUSTER);
        if (nw >= a.N) nw = 0;
        for (int kb = 0; kb < KT; ++kb) {
          mbar_wait(empty(s), ph ^ 1u);
          mbar_expect_tx(full(s), kStageBytes);
          tma_load(&tmA, sA + s * kABytes, full(s), kb * kWBK, m0);
          if (CLUSTER == 1)
            tma_load(&tmB, sB + s * kBBytes, full(s), kb * kWBK, nw);
          else
            tma_load_multicast(&tmB, sB + s * kBBytes + rank * (kBBytes / CLUSTER), full(s), kb * kWBK, nw,
                               static_cast<uint16_t>((1u << CLUSTER) - 1u));
          if (++s == STAGES) {
            s = 0;
            ph ^= 1u;
          }
        }
      }
    }
  } else {
    setmaxnreg_inc<232>();
    const int cw = wgi - 1;  // this consumer's rows: 64·cw .. 64·cw + 63 of the tile
    const int wq = warp & 3, g = lane >> 2, tq = lane & 3;
    float acc[128];
    int s = 0;
    uint32_t ph = 0;
    auto release = [&](int st) {
      __syncwarp();
      if (lane == 0) {
        if (CLUSTER == 1) {
          mbar_arrive(empty(st));
        } else {
#pragma unroll
          for (int c = 0; c < CLUSTER; ++c) mbar_arrive_cluster(empty(st), static_cast<uint32_t>(c));
        }
      }
    };
    for (int u = cid; u < a.units; u += ncl) {
      const int mb = (u / a.n_blocks) * CLUSTER + static_cast<int>(rank), nb = u % a.n_blocks;
      const int64_t m0 = static_cast<int64_t>(mb) * kWBM;
      const int n0 = nb * kWBN;
#pragma unroll
      for (int i = 0; i < 128; ++i) acc[i] = 0.f;
      int prev = -1;
      for (int kb = 0; kb < KT; ++kb) {
        mbar_wait(full(s), ph);
        fence_acc(acc);
        wgmma_fence();
        const uint64_t da = sw128_desc(sA + s * kABytes + cw * 64 * 128), db = sw128_desc(sB + s * kBBytes);
#pragma unroll
        for (int k = 0; k < kWBK / 16; ++k) wgmma_m64n256k16(acc, da + 2 * k, db + 2 * k);
        wgmma_commit();
        // Keep this k-block's wgmma in flight; the previous one has retired: free its stage.
        wgmma_wait<1>();
        fence_acc(acc);
        if (prev >= 0) release(prev);
        prev = s;
        if (++s == STAGES) {
          s = 0;
          ph ^= 1u;
        }
      }
      wgmma_wait<0>();
      fence_acc(acc);
      if (prev >= 0) release(prev);

      const int64_t rbase = m0 + cw * 64 + wq * 16 + g;
      if (!TWELL) {
#pragma unroll
        for (int i = 0; i < 32; ++i) {
          const int n = n0 + i * 8 + tq * 2;
          if (n < a.N) {
            store_pair(ep, rbase, n, a.M, a.N, acc[4 * i], acc[4 * i + 1]);
            store_pair(ep, rbase + 8, n, a.M, a.N, acc[4 * i + 2], acc[4 * i + 3]);
          }
        }
      } else {
        // ReLU'd bf16 rows of this consumer staged in shared memory, then packed a warp per row.
        uint16_t* st = stage_out + cw * 64 * kStLd;
        named_sync(1 + cw, 128);  // the previous tile's packing has finished reading st
        const int rl = wq * 16 + g;
#pragma unroll
        for (int i = 0; i < 32; ++i) {
          const int cl = i * 8 + tq * 2, n = n0 + cl;
          const float b0 = (ep.bias && n < a.N) ? ep.bias[n] : 0.f;
          const float b1 = (ep.bias && n + 1 < a.N) ? ep.bias[n + 1] : 0.f;
          const float v0 = n < a.N ? fmaxf(acc[4 * i] + b0, 0.f) : 0.f;
          const float v1 = n + 1 < a.N ? fmaxf(acc[4 * i + 1] + b1, 0.f) : 0.f;
          const float v2 = n < a.N ? fmaxf(acc[4 * i + 2] + b0, 0.f) : 0.f;
          const float v3 = n + 1 < a.N ? fmaxf(acc[4 * i + 3] + b1, 0.f) : 0.f;
          *reinterpret_cast<uint32_t*>(st + rl * kStLd + cl) = f32_to_bf16_bits(v0) | (f32_to_bf16_bits(v1) << 16);
          *reinterpret_cast<uint32_t*>(st + (rl + 8) * kStLd + cl) =
              f32_to_bf16_bits(v2) | (f32_to_bf16_bits(v3) << 16);
        }
        named_sync(1 + cw, 128);
        for (int r = wq; r < 64; r += 4) {
          const int64_t m = m0 + cw * 64 + r;
          if (m >= a.M) break;
          twell_pack_row(ep, st + r * kStLd, m, n0, kWBN, a.N, lane);
        }
      }
    }
  }
  // No block of the cluster leaves while another may still multicast into it or arrive on it.
  if (CLUSTER > 1) cluster_sync();
#else
  asm volatile("trap;");
#endif
}

}  // namespace

// --- host ---------------------------------------------------------------------------------------

namespace {

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// cuTensorMapEncodeTiled from the driver (cudart is static and we do not link libcuda).
EncodeTiled encoder() {
  static const EncodeTiled fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      return static_cast<EncodeTiled>(nullptr);
    }
    return reinterpret_cast<EncodeTiled>(p);
  }();
  return fn;
}

// 2-D bf16 tensor [rows, cols] (row stride ld elements), boxes of 64 columns x box_rows rows,
// 128-byte swizzle, zero fill outside.
bool make_map(CUtensorMap* map, const uint16_t* p, int64_t rows, int64_t cols, int64_t ld, int box_rows) {
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(ld) * 2};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(kWBK), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t elem[2] = {1, 1};
  return encoder()(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<uint16_t*>(p), dims, strides, box, elem,
                   CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                   CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

int device_sms() {
  static const int n = [] {
    int dev = 0, v = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
      cudaGetLastError();
      return 1;
    }
    return std::max(v, 1);
  }();
  return n;
}

// Blocks resident at once for one variant (one per multiprocessor; for clusters, what the
// GPCs hold), after raising the kernel's shared-memory limit.
template <int STAGES, int CLUSTER, bool TWELL>
int resident_blocks() {
  static const int n = [] {
    auto kern = wgmma_gemm_kernel<STAGES, CLUSTER, TWELL>;
    constexpr int smem = wg_smem_bytes<STAGES, TWELL>();
    SLLM_CUDA(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    if (CLUSTER == 1) return device_sms();
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = CLUSTER;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.gridDim = dim3(static_cast<unsigned>(device_sms() / CLUSTER * CLUSTER), 1, 1);
    cfg.blockDim = dim3(kWThreads, 1, 1);
    cfg.dynamicSmemBytes = smem;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, kern, &cfg) != cudaSuccess || clusters < 1) {
      cudaGetLastError();
      clusters = device_sms() / CLUSTER;
    }
    return std::max(clusters, 1) * CLUSTER;
  }();
  return n;
}

template <int STAGES, int CLUSTER, bool TWELL>
void launch(const CUtensorMap& ma, const CUtensorMap& mb, int M, int N, int K, const EpiParams& p) {
  WgArgs a;
  a.M = M;
  a.N = N;
  a.K = K;
  a.n_blocks = static_cast<int>(ceil_div(N, kWBN));
  const int64_t row_groups = ceil_div(ceil_div(M, kWBM), CLUSTER);
  a.units = static_cast<int>(row_groups * a.n_blocks);
  const int clusters = static_cast<int>(std::min<int64_t>(a.units, resident_blocks<STAGES, CLUSTER, TWELL>() / CLUSTER));
  constexpr int smem = wg_smem_bytes<STAGES, TWELL>();
  auto kern = wgmma_gemm_kernel<STAGES, CLUSTER, TWELL>;
  if (CLUSTER == 1) {
    kern<<<static_cast<unsigned>(clusters), kWThreads, smem>>>(ma, mb, a, p);
  } else {
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = CLUSTER;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.gridDim = dim3(static_cast<unsigned>(clusters * CLUSTER), 1, 1);
    cfg.blockDim = dim3(kWThreads, 1, 1);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = 0;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    SLLM_CUDA(cudaLaunchKernelEx(&cfg, kern, ma, mb, a, p));
  }
  SLLM_LAUNCHED("wgmma_gemm_kernel");
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

bool wgmma_supported() {
  static const bool ok = [] {
    int dev = 0, major = 0, minor = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    if (major != 9 || minor != 0 || !encoder()) return false;
    // The kernel must come from sm_90a code (elsewhere its body is a trap).
    cudaFuncAttributes fa{};
    if (cudaFuncGetAttributes(&fa, wgmma_gemm_kernel<kPlainStages, 1, false>) != cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    return fa.binaryVersion == 90 && fa.ptxVersion >= 90;
  }();
  return ok;
}

bool wgmma_gemm(const uint16_t* A, int64_t lda, const uint16_t* W, int64_t ldw, int64_t M, int64_t N, int64_t K,
                const EpiParams& p, int cluster) {
  if (M <= 0 || N <= 0 || K <= 0 || M > (int64_t(1) << 30) || N > (int64_t(1) << 30) || K > (int64_t(1) << 30))
    return false;
  if (lda % 8 || ldw % 8 || !aligned16(A) || !aligned16(W)) return false;
  if (p.twell && kWBN % p.tile) return false;
  const int c = cluster == 2 ? 2 : 1;
  CUtensorMap ma, mb;
  if (!make_map(&ma, A, M, K, lda, kWBM) || !make_map(&mb, W, N, K, ldw, kWBN / c)) return false;
  const int m = static_cast<int>(M), n = static_cast<int>(N), k = static_cast<int>(K);
  if (p.twell) {
    if (c == 2) launch<kTwellStages, 2, true>(ma, mb, m, n, k, p);
    else launch<kTwellStages, 1, true>(ma, mb, m, n, k, p);
  } else {
    if (c == 2) launch<kPlainStages, 2, false>(ma, mb, m, n, k, p);
    else launch<kPlainStages, 1, false>(ma, mb, m, n, k, p);
  }
  return true;
}

}  // namespace sparsellm::cuda::detail
