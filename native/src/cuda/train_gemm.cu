// The trainer's strided GEMM (train_ops.h gemm_f32, gemm_f32_dyn): f32 operands of any row and
// column strides, batched, f32 output (overwrite or accumulate), the row or depth count
// optionally read from the device. Two kernels, chosen by the calling thread's MatmulScope:
//  - F32: SIMT FMAs in ascending k per output (the CPU trainer's f32 arithmetic, to rounding);
//  - Bf16: each operand rounded to bf16 (nearest even) as it is staged in shared memory, the
//    products on the tensor cores (mma.sync m16n8k16, f32 accumulators): bf16 mixed precision,
//    the usual arithmetic of LLM training, at tensor-core rather than CUDA-core rate.
//
// UNVERIFIED: compile-checked and run through a host emulation of the kernels only (no GPU on
// the machine it was written on).
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "mma.cuh"
#include "train_ops.h"

namespace sparsellm::cuda::train {
namespace {

thread_local MatmulPrecision t_precision = MatmulPrecision::F32;

// The depth range [kb, ke) that a block of rows m0 .. m0+bm-1 (columns from n0) needs under
// `causal` (train_ops.h Causal); false: the block computes nothing (LowerC, wholly above the
// diagonal). m0 is a multiple of the depth tile in both kernels, so kb stays tile-aligned.
__device__ __forceinline__ bool causal_range(int causal, int64_t m0, int bm, int64_t n0, int64_t K, int64_t& kb,
                                             int64_t& ke) {
  kb = 0;
  ke = K;
  if (causal == static_cast<int>(Causal::LowerA)) ke = m0 + bm < K ? m0 + bm : K;
  else if (causal == static_cast<int>(Causal::UpperA)) kb = m0 < K ? m0 : K;
  else if (causal == static_cast<int>(Causal::LowerC)) return n0 <= m0 + bm - 1;
  return true;
}

// ---- F32: SIMT ----------------------------------------------------------------------------------

constexpr int kBM = 64, kBN = 64, kBK = 16;  // 256 threads, 4 × 4 outputs each

// One 64 × 64 tile of C per block (batch = blockIdx.z). The operand tiles are loaded with the
// contiguous index fastest (A: k when acs == 1, else m; B: n when bcs == 1, else k), zero
// outside the matrices; each output accumulates k in ascending order.
__global__ void __launch_bounds__(256) gemm_f32_kernel(int64_t M, int64_t N, int64_t K, const float* __restrict__ A,
                                                      int64_t ars, int64_t acs, int64_t aso, int64_t asi,
                                                      const float* __restrict__ B, int64_t brs, int64_t bcs,
                                                      int64_t bso, int64_t bsi, float* __restrict__ C, int64_t ldc,
                                                      int64_t cso, int64_t csi, int64_t nzi,
                                                      const int32_t* __restrict__ dynM, const int32_t* __restrict__ dynK,
                                                      int accumulate, int causal) {
  __shared__ float As[kBK][kBM + 4];
  __shared__ float Bs[kBK][kBN + 4];
  const int64_t z = blockIdx.z, zo = z / nzi, zi = z % nzi;
  const float* a = A + zo * aso + zi * asi;
  const float* b = B + zo * bso + zi * bsi;
  float* c = C + zo * cso + zi * csi;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM, n0 = static_cast<int64_t>(blockIdx.x) * kBN;
  // Row or depth counts known only on the device (the hybrid tail): the grid covers the capacity.
  if (dynM && static_cast<int64_t>(*dynM) < M) M = *dynM;
  if (dynK && static_cast<int64_t>(*dynK) < K) K = *dynK;
  int64_t kb, ke;
  // Whole blocks only: no barrier is skipped by part of one.
  if (m0 >= M || !causal_range(causal, m0, kBM, n0, K, kb, ke)) return;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const bool a_kfast = acs == 1, b_nfast = bcs == 1;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  for (int64_t k0 = kb; k0 < ke; k0 += kBK) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int idx = tid + 256 * r;
      const int mm = a_kfast ? idx / kBK : idx % kBM;
      const int kk = a_kfast ? idx % kBK : idx / kBM;
      const int64_t gm = m0 + mm, gk = k0 + kk;
      As[kk][mm] = (gm < M && gk < K) ? a[gm * ars + gk * acs] : 0.f;
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int idx = tid + 256 * r;
      const int nn = b_nfast ? idx % kBN : idx / kBK;
      const int kk = b_nfast ? idx / kBN : idx % kBK;
      const int64_t gn = n0 + nn, gk = k0 + kk;
      Bs[kk][nn] = (gn < N && gk < K) ? b[gk * brs + gn * bcs] : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; ++kk) {
      float av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = As[kk][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = Bs[kk][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t gm = m0 + ty * 4 + i;
    if (gm >= M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t gn = n0 + tx * 4 + j;
      if (gn >= N) continue;
      float* o = c + gm * ldc + gn;
      *o = accumulate ? *o + acc[i][j] : acc[i][j];
    }
  }
}

// ---- Bf16: tensor cores -----------------------------------------------------------------------

// Block tile 128 × 128 × 32, 256 threads = 8 warps as 2 (M) × 4 (N), warp tile 64 × 32 (4 × 4
// mma tiles of 16 × 8). The operand tiles are staged as bf16 pairs, row-major in the row index
// (m for A, n for B) with k contiguous: 16 words of pairs + 4 of padding per row, so that the 16-
// byte rows ldmatrix reads (80 bytes apart) fall in distinct bank groups. Two shared buffers and
// a register prefetch: the next tile's global loads are in flight while the current one
// multiplies; one barrier per k step.
constexpr int kTcBM = 128, kTcBN = 128, kTcBK = 32;
constexpr int kTcRow = kTcBK / 2 + 4;                 // 32-bit words per staged row
constexpr int kTcPairs = kTcBM * (kTcBK / 2) / 256;  // k pairs per thread per operand tile (8)

// One operand viewed as rows × depth: element (r, k) at p[r·rs + k·cs]. Loads run along k when
// cs == 1 (a warp reads two rows' 32 consecutive k), else along r; `vec2`: (k, k+1) pairs may be
// read as one aligned float2 (cs == 1, even rs and batch strides, 8-byte aligned base).
struct TcOperand {
  const float* p;
  int64_t rs, cs;
  int64_t rows;
  bool kfast, vec2;
};

// Which pairs of a tile this thread moves: slot i (0..kTcPairs-1) is row r + i·dr, depth k + i·dk
// (elements; k even). Along k: a warp covers two rows' 32 consecutive k; along r: 32 consecutive
// rows of one pair of k.
struct TcSlots {
  int r, k, dr, dk;
};
__device__ __forceinline__ TcSlots tc_slots(bool kfast, int tid) {
  return kfast ? TcSlots{tid / (kTcBK / 2), 2 * (tid % (kTcBK / 2)), 256 / (kTcBK / 2), 0}
               : TcSlots{tid % kTcBM, 2 * (tid / kTcBM), 0, 2 * (256 / kTcBM)};
}

// This thread's pairs of the tile at rows r0.., depth k0.. into registers (zeros outside).
__device__ __forceinline__ void tc_fetch(const TcOperand& o, int64_t r0, int64_t k0, int64_t K, const TcSlots& sl,
                                         float (&v)[2 * kTcPairs]) {
  const int64_t gr0 = r0 + sl.r, gk0 = k0 + sl.k;
  const float* src = o.p + gr0 * o.rs + gk0 * o.cs;
  const int64_t step = sl.dr * o.rs + sl.dk * o.cs;
#pragma unroll
  for (int i = 0; i < kTcPairs; ++i, src += step) {
    const int64_t gr = gr0 + i * sl.dr, gk = gk0 + i * sl.dk;
    float x = 0.f, y = 0.f;
    if (gr < o.rows) {
      if (o.vec2 && gk + 1 < K) {
        const float2 t = *reinterpret_cast<const float2*>(src);
        x = t.x;
        y = t.y;
      } else {
        if (gk < K) x = src[0];
        if (gk + 1 < K) y = src[o.cs];
      }
    }
    v[2 * i] = x;
    v[2 * i + 1] = y;
  }
}

__device__ __forceinline__ void tc_stash(const TcSlots& sl, const float (&v)[2 * kTcPairs], uint32_t* s) {
  uint32_t* dst = s + sl.r * kTcRow + sl.k / 2;
#pragma unroll
  for (int i = 0; i < kTcPairs; ++i)
    dst[i * (sl.dr * kTcRow + sl.dk / 2)] = detail::pack_bf16x2(v[2 * i], v[2 * i + 1]);
}

__global__ void __launch_bounds__(256, 1) gemm_tc_kernel(int64_t M, int64_t N, int64_t K, TcOperand a, int64_t aso,
                                                         int64_t asi, TcOperand b, int64_t bso, int64_t bsi,
                                                         float* __restrict__ C, int64_t ldc, int64_t cso, int64_t csi,
                                                         int64_t nzi, const int32_t* __restrict__ dynM,
                                                         const int32_t* __restrict__ dynK, int accumulate,
                                                         int causal) {
  __shared__ __align__(16) uint32_t As[2][kTcBM * kTcRow];
  __shared__ __align__(16) uint32_t Bs[2][kTcBN * kTcRow];
  const int64_t z = blockIdx.z, zo = z / nzi, zi = z % nzi;
  a.p += zo * aso + zi * asi;
  b.p += zo * bso + zi * bsi;
  float* c = C + zo * cso + zi * csi;
  if (dynM && static_cast<int64_t>(*dynM) < M) M = *dynM;
  if (dynK && static_cast<int64_t>(*dynK) < K) K = *dynK;
  a.rows = M;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTcBM, n0 = static_cast<int64_t>(blockIdx.x) * kTcBN;
  int64_t kb, ke;
  // Whole blocks only: no barrier is skipped by part of one.
  if (m0 >= M || !causal_range(causal, m0, kTcBM, n0, K, kb, ke)) return;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wm = warp >> 2, wn = warp & 3;
  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
  const TcSlots sa = tc_slots(a.kfast, tid), sb = tc_slots(b.kfast, tid);
  float va[2 * kTcPairs], vb[2 * kTcPairs];
  const int64_t KT = (ke - kb + kTcBK - 1) / kTcBK;
  if (KT > 0) {
    tc_fetch(a, m0, kb, K, sa, va);
    tc_fetch(b, n0, kb, K, sb, vb);
    tc_stash(sa, va, As[0]);
    tc_stash(sb, vb, Bs[0]);
  }
  __syncthreads();
  for (int64_t kt = 0; kt < KT; ++kt) {
    const int buf = static_cast<int>(kt & 1);
    const bool more = kt + 1 < KT;
    if (more) {
      tc_fetch(a, m0, kb + (kt + 1) * kTcBK, K, sa, va);
      tc_fetch(b, n0, kb + (kt + 1) * kTcBK, K, sb, vb);
    }
#pragma unroll
    for (int ks = 0; ks < kTcBK / 16; ++ks) {
      uint32_t af[4][4], bfr[4][2];
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) {
        const int row = wm * 64 + mt * 16 + detail::ldsm_a_row(lane);
        detail::ldmatrix_x4(af[mt],
                            detail::smem_addr(&As[buf][row * kTcRow + ks * 8 + detail::ldsm_a_chunk(lane) * 4]));
      }
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        const int row = wn * 32 + np * 16 + detail::ldsm_b_row(lane);
        detail::ldmatrix_b_pair(bfr[2 * np], bfr[2 * np + 1],
                                detail::smem_addr(&Bs[buf][row * kTcRow + ks * 8 + detail::ldsm_b_chunk(lane) * 4]));
      }
#pragma unroll
      for (int mt = 0; mt < 4; ++mt)
#pragma unroll
        for (int nt = 0; nt < 4; ++nt) detail::mma_bf16(acc[mt][nt], af[mt], bfr[nt][0], bfr[nt][1]);
    }
    // The other buffer was last read in step kt - 1, before the barrier that ended it.
    if (more) {
      tc_stash(sa, va, As[buf ^ 1]);
      tc_stash(sb, vb, Bs[buf ^ 1]);
    }
    __syncthreads();
  }
  const int g = lane >> 2, q = lane & 3;
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t m = m0 + wm * 64 + mt * 16 + g + half * 8;
      if (m >= M) continue;
#pragma unroll
      for (int nt = 0; nt < 4; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int64_t n = n0 + wn * 32 + nt * 8 + 2 * q + e;
          if (n >= N) continue;
          float* o = c + m * ldc + n;
          const float v = acc[mt][nt][half * 2 + e];
          *o = accumulate ? *o + v : v;
        }
    }
}

TcOperand tc_operand(const float* p, int64_t rs, int64_t cs, int64_t rows, int64_t so, int64_t si) {
  const bool vec2 = cs == 1 && rs % 2 == 0 && so % 2 == 0 && si % 2 == 0 && reinterpret_cast<uintptr_t>(p) % 8 == 0;
  return TcOperand{p, rs, cs, rows, cs == 1, vec2};
}

unsigned grid_dim(int64_t n, const char* what) {
  if (n > 65535) throw std::invalid_argument(std::string("gemm_f32: too many ") + what);
  return static_cast<unsigned>(n);
}

// Both public entry points: batches (nzo, nzi) of C[M, N] (+)= A·B, M or K capped by the device
// values dynM / dynK when given (the grid covers the host values: the capacity).
void launch(int64_t M, int64_t N, int64_t K, const MatRef& A, const MatRef& B, float* C, int64_t ldc, int64_t cso,
            int64_t csi, int64_t nzo, int64_t nzi, bool accumulate, Causal causal, const int32_t* dynM,
            const int32_t* dynK) {
  if (M <= 0 || N <= 0 || nzo <= 0 || nzi <= 0) return;
  const unsigned gz = grid_dim(nzo * nzi, "batches");
  if (t_precision == MatmulPrecision::Bf16) {
    const dim3 grid(static_cast<unsigned>(ceil_div(N, kTcBN)), grid_dim(ceil_div(M, kTcBM), "row tiles"), gz);
    // B(k, n) = b[k·rs + n·cs]: as rows n × depth k its strides swap.
    gemm_tc_kernel<<<grid, 256>>>(M, N, K, tc_operand(A.p, A.rs, A.cs, M, A.so, A.si), A.so, A.si,
                                  tc_operand(B.p, B.cs, B.rs, N, B.so, B.si), B.so, B.si, C, ldc, cso, csi, nzi, dynM,
                                  dynK, accumulate ? 1 : 0, static_cast<int>(causal));
    SLLM_LAUNCHED("gemm_tc_kernel");
    return;
  }
  const dim3 grid(static_cast<unsigned>(ceil_div(N, kBN)), grid_dim(ceil_div(M, kBM), "row tiles"), gz);
  gemm_f32_kernel<<<grid, 256>>>(M, N, K, A.p, A.rs, A.cs, A.so, A.si, B.p, B.rs, B.cs, B.so, B.si, C, ldc, cso, csi,
                                 nzi, dynM, dynK, accumulate ? 1 : 0, static_cast<int>(causal));
  SLLM_LAUNCHED("gemm_f32_kernel");
}

}  // namespace

MatmulPrecision matmul_precision() { return t_precision; }
MatmulScope::MatmulScope(MatmulPrecision p) : prev_(t_precision) { t_precision = p; }
MatmulScope::~MatmulScope() { t_precision = prev_; }

void gemm_f32(int64_t M, int64_t N, int64_t K, const MatRef& A, const MatRef& B, float* C, int64_t ldc, int64_t cso,
              int64_t csi, int64_t nzo, int64_t nzi, bool accumulate, Causal causal) {
  launch(M, N, K, A, B, C, ldc, cso, csi, nzo, nzi, accumulate, causal, nullptr, nullptr);
}

void gemm_f32_dyn(int64_t M, int64_t N, int64_t K, const MatRef& A, const MatRef& B, float* C, int64_t ldc,
                  bool accumulate, const int32_t* dynM, const int32_t* dynK) {
  launch(M, N, K, MatRef{A.p, A.rs, A.cs}, MatRef{B.p, B.rs, B.cs}, C, ldc, 0, 0, 1, 1, accumulate, Causal::None, dynM,
         dynK);
}

}  // namespace sparsellm::cuda::train
