// Causal attention backward on the tensor cores (attention_mma.h attention_mma_train_backward),
// flash-attention style: P, dP and dS are recomputed tile by tile from q, k, v, dout, the
// forward's lse and D = rowsum(dout ⊙ out), and never leave the chip. Two kernels, each shaped
// like the forward so that every operand is an A fragment kept in registers or a staged tile
// read by ldmatrix (no atomics, no transposes through shared memory):
//   dq: a block per (tile of 64 queries, head, sequence), the key tiles 0 .. the tile's last:
//       S = Q·Kᵀ, P = exp(S·scale − lse), dP = dO·Vᵀ, dS = P ⊙ (dP − D), dQ += dS·K;
//   dk, dv: a block per (tile of 64 keys, head, sequence), the query tiles from its own on:
//       Sᵀ = K·Qᵀ, Pᵀ, dPᵀ = V·dOᵀ, dSᵀ = Pᵀ ⊙ (dPᵀ − D), dV += Pᵀ·dO, dK += dSᵀ·Q.
// dQ and dK are scaled by `scale` at the end. Products in bf16 (operands rounded as staged, and
// P, dS rounded as A fragments), accumulation and the elementwise math in f32. head_dim 64, or
// 128, where a thread's registers hold two accumulators of 16 × 128 but not four: the dk/dv
// kernel then runs twice, once for dV and once for dK (S recomputed).
#include <cmath>
#include <stdexcept>

#include "attention_mma.h"
#include "attention_mma.cuh"

namespace sparsellm::cuda {
namespace {

using namespace attn_mma;

static_assert(kBlockQ == kBlockK, "the resident and the streamed tiles have the same number of rows");

struct BwdArgs {
  const float *q, *k, *v, *dout, *lse, *delta;  // q, k, v [B·T, ld_in]; dout [B·T, ld_out]; lse, delta [B, H, T]
  int64_t ld_in, ld_out, T;
  int n_heads;
  float scale, smul;  // smul = scale·log2 e
  float *dq, *dk, *dv;  // [B·T, ld_grad], head h at columns h·hd
  int64_t ld_grad;
};

// D[b, h, t] = Σ_e dout[t, h·hd + e]·out[t, h·hd + e]: a warp per (row, head).
__global__ void attention_delta_kernel(const float* __restrict__ dout, const float* __restrict__ out, int64_t ld,
                                       int64_t rows, int64_t T, int n_heads, int hd, float* __restrict__ delta) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (item >= rows * n_heads) return;
  const int64_t row = item / n_heads;
  const int h = static_cast<int>(item % n_heads);
  const int lane = threadIdx.x & 31;
  const float* a = dout + row * ld + static_cast<int64_t>(h) * hd;
  const float* b = out + row * ld + static_cast<int64_t>(h) * hd;
  float s = 0.f;
  for (int e = lane; e < hd; e += 32) s += a[e] * b[e];
  s = warp_sum(s);
  if (lane == 0) delta[(row / T * n_heads + h) * T + row % T] = s;
}

// The sequence's rows n0 .. of one head, from a [B·T, ld] matrix.
template <int HD>
__device__ __forceinline__ const float* head_rows(const float* base, int64_t b, int64_t T, int64_t n0, int64_t ld,
                                                  int h) {
  return base + (b * T + n0) * ld + static_cast<int64_t>(h) * HD;
}

// The block's resident pair of tiles (q and dout, or k and v: rows n0 .. n0 + n − 1 of head h
// of sequence b, zeros past n) and this warp's A fragments of both.
template <int HD>
__device__ __forceinline__ void resident_tiles(const float* m0, int64_t ld0, const float* m1, int64_t ld1, int64_t b,
                                               int64_t T, int64_t n0, int n, int h, uint16_t* s0, uint16_t* s1,
                                               uint32_t (&f0)[HD / 16][4], uint32_t (&f1)[HD / 16][4]) {
  stage_rows<HD>(head_rows<HD>(m0, b, T, n0, ld0, h), ld0, kBlockQ, n, s0);
  stage_rows<HD>(head_rows<HD>(m1, b, T, n0, ld1, h), ld1, kBlockQ, n, s1);
  __syncthreads();
  const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
  load_a_frags<HD>(f0, s0, w * 16, lane);
  load_a_frags<HD>(f1, s1, w * 16, lane);
}

// Writes a warp's 16 × HD accumulator rows (row0 + g, + 8) times `mul` for the rows below n.
template <int HD>
__device__ __forceinline__ void store_rows(float* dst, int64_t ld, const float (&acc)[HD / 8][4], int row0, int n,
                                           float mul, int lane) {
  const int g = lane >> 2, qd = lane & 3, r0 = row0 + g, r1 = r0 + 8;
#pragma unroll
  for (int nt = 0; nt < HD / 8; ++nt) {
    const int c = nt * 8 + 2 * qd;
    if (r0 < n) {
      dst[r0 * ld + c] = acc[nt][0] * mul;
      dst[r0 * ld + c + 1] = acc[nt][1] * mul;
    }
    if (r1 < n) {
      dst[r1 * ld + c] = acc[nt][2] * mul;
      dst[r1 * ld + c + 1] = acc[nt][3] * mul;
    }
  }
}

template <int HD>
__global__ void __launch_bounds__(kWarps * 32) attention_bwd_dq_kernel(const BwdArgs a) {
  constexpr int kP = pitch<HD>();
  extern __shared__ __align__(16) uint16_t attn_bwd_smem[];
  uint16_t* sq = attn_bwd_smem;     // [64][kP] queries
  uint16_t* sdo = sq + kBlockQ * kP;  // [64][kP] their output gradients
  uint16_t* sk = sdo + kBlockQ * kP;  // [64][kP] keys
  uint16_t* sv = sk + kBlockK * kP;   // [64][kP] values
  const int64_t T = a.T;
  const BlockTile bt = block_tile(T, a.n_heads, true);  // the query tile with the most keys first
  const int64_t b = bt.b, t0 = bt.row0;
  const int h = bt.h, nq = bt.n;
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, qd = lane & 3;
  uint32_t qa[HD / 16][4], da[HD / 16][4];
  resident_tiles<HD>(a.q, a.ld_in, a.dout, a.ld_out, b, T, t0, nq, h, sq, sdo, qa, da);
  // This thread's two rows: position, lse in base-2 units (+inf past the sequence: P = 0), D.
  const int r0 = w * 16 + g, r1 = r0 + 8;
  const int64_t stat = (b * a.n_heads + h) * T + t0;
  const float lse0 = r0 < nq ? a.lse[stat + r0] * kLog2e : INFINITY, lse1 = r1 < nq ? a.lse[stat + r1] * kLog2e : INFINITY;
  const float d0 = r0 < nq ? a.delta[stat + r0] : 0.f, d1 = r1 < nq ? a.delta[stat + r1] : 0.f;
  const int64_t qpos0 = t0 + r0, qpos1 = t0 + r1, warp_last = t0 + w * 16 + 15;
  float dq[HD / 8][4];
#pragma unroll
  for (int nt = 0; nt < HD / 8; ++nt) dq[nt][0] = dq[nt][1] = dq[nt][2] = dq[nt][3] = 0.f;
  const int64_t last = t0 + nq - 1;
  for (int64_t k0 = 0; k0 <= last; k0 += kBlockK) {
    const int nk = static_cast<int>(last - k0 + 1 < kBlockK ? last - k0 + 1 : kBlockK);
    __syncthreads();
    stage_rows<HD>(head_rows<HD>(a.k, b, T, k0, a.ld_in, h), a.ld_in, kBlockK, nk, sk);
    stage_rows<HD>(head_rows<HD>(a.v, b, T, k0, a.ld_in, h), a.ld_in, kBlockK, nk, sv);
    __syncthreads();
    if (k0 > warp_last) continue;
    float s[8][4], dp[8][4];
    mma_rows_t<HD>(s, qa, sk, lane);   // S = Q·Kᵀ
    mma_rows_t<HD>(dp, da, sv, lane);  // dP = dO·Vᵀ
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {  // s becomes dS = P ⊙ (dP − D)
      const int64_t key = k0 + nt * 8 + 2 * qd;
      const float p0 = key <= qpos0 ? exp2f(s[nt][0] * a.smul - lse0) : 0.f;
      const float p1 = key + 1 <= qpos0 ? exp2f(s[nt][1] * a.smul - lse0) : 0.f;
      const float p2 = key <= qpos1 ? exp2f(s[nt][2] * a.smul - lse1) : 0.f;
      const float p3 = key + 1 <= qpos1 ? exp2f(s[nt][3] * a.smul - lse1) : 0.f;
      s[nt][0] = p0 * (dp[nt][0] - d0);
      s[nt][1] = p1 * (dp[nt][1] - d0);
      s[nt][2] = p2 * (dp[nt][2] - d1);
      s[nt][3] = p3 * (dp[nt][3] - d1);
    }
    mma_acc_rows<HD>(dq, s, sk, lane);  // dQ += dS·K
  }
  store_rows<HD>(a.dq + (b * T + t0) * a.ld_grad + static_cast<int64_t>(h) * HD, a.ld_grad, dq, w * 16, nq, a.scale,
                 lane);
}

// DV, DK: which gradients this launch accumulates and stores (both at head_dim 64; one each in two
// launches at 128, where four 16 × 128 accumulators and the fragments would not fit registers).
template <int HD, bool DV, bool DK>
__global__ void __launch_bounds__(kWarps * 32) attention_bwd_dkdv_kernel(const BwdArgs a) {
  constexpr int kP = pitch<HD>();
  extern __shared__ __align__(16) uint16_t attn_bwd_smem[];
  uint16_t* sk = attn_bwd_smem;       // [64][kP] keys
  uint16_t* sv = sk + kBlockK * kP;   // [64][kP] values
  uint16_t* sq = sv + kBlockK * kP;   // [64][kP] queries
  uint16_t* sdo = sq + kBlockQ * kP;  // [64][kP] their output gradients
  float* slse = reinterpret_cast<float*>(sdo + kBlockQ * kP);  // [64] base-2 lse (+inf past the sequence)
  float* sdel = slse + kBlockQ;                               // [64] D
  const int64_t T = a.T;
  const BlockTile bt = block_tile(T, a.n_heads, false);  // the key tile with the most queries first
  const int64_t b = bt.b, j0 = bt.row0;
  const int h = bt.h, nk = bt.n;
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, qd = lane & 3;
  uint32_t ka[HD / 16][4], va[HD / 16][4];  // va is not used without DK
  resident_tiles<HD>(a.k, a.ld_in, a.v, a.ld_in, b, T, j0, nk, h, sk, sv, ka, va);
  const int64_t kpos0 = j0 + w * 16 + g, kpos1 = kpos0 + 8;  // this thread's two keys
  float dk[DK ? HD / 8 : 1][4], dv[DV ? HD / 8 : 1][4];
#pragma unroll
  for (int nt = 0; nt < HD / 8; ++nt) {
    if (DK) dk[nt][0] = dk[nt][1] = dk[nt][2] = dk[nt][3] = 0.f;
    if (DV) dv[nt][0] = dv[nt][1] = dv[nt][2] = dv[nt][3] = 0.f;
  }
  const int64_t stat = (b * a.n_heads + h) * T;
  for (int64_t i0 = j0; i0 < T; i0 += kBlockQ) {  // queries before j0 see none of these keys
    const int nq = static_cast<int>(T - i0 < kBlockQ ? T - i0 : kBlockQ);
    __syncthreads();
    stage_rows<HD>(head_rows<HD>(a.q, b, T, i0, a.ld_in, h), a.ld_in, kBlockQ, nq, sq);
    stage_rows<HD>(head_rows<HD>(a.dout, b, T, i0, a.ld_out, h), a.ld_out, kBlockQ, nq, sdo);
    for (int r = threadIdx.x; r < kBlockQ; r += kWarps * 32) {
      slse[r] = r < nq ? a.lse[stat + i0 + r] * kLog2e : INFINITY;
      sdel[r] = r < nq ? a.delta[stat + i0 + r] : 0.f;
    }
    __syncthreads();
    float s[8][4], dp[8][4];
    mma_rows_t<HD>(s, ka, sq, lane);                // Sᵀ = K·Qᵀ
    if (DK) mma_rows_t<HD>(dp, va, sdo, lane);  // dPᵀ = V·dOᵀ
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {  // s becomes Pᵀ, dp becomes dSᵀ = Pᵀ ⊙ (dPᵀ − D)
      const int c = nt * 8 + 2 * qd;
      const int64_t q = i0 + c;
      const float l0 = slse[c], l1 = slse[c + 1], e0 = sdel[c], e1 = sdel[c + 1];
      s[nt][0] = kpos0 <= q ? exp2f(s[nt][0] * a.smul - l0) : 0.f;
      s[nt][1] = kpos0 <= q + 1 ? exp2f(s[nt][1] * a.smul - l1) : 0.f;
      s[nt][2] = kpos1 <= q ? exp2f(s[nt][2] * a.smul - l0) : 0.f;
      s[nt][3] = kpos1 <= q + 1 ? exp2f(s[nt][3] * a.smul - l1) : 0.f;
      if (DK) {
        dp[nt][0] = s[nt][0] * (dp[nt][0] - e0);
        dp[nt][1] = s[nt][1] * (dp[nt][1] - e1);
        dp[nt][2] = s[nt][2] * (dp[nt][2] - e0);
        dp[nt][3] = s[nt][3] * (dp[nt][3] - e1);
      }
    }
    if constexpr (DV) mma_acc_rows<HD>(dv, s, sdo, lane);  // dV += Pᵀ·dO
    if constexpr (DK) mma_acc_rows<HD>(dk, dp, sq, lane);  // dK += dSᵀ·Q
  }
  const int64_t out = (b * T + j0) * a.ld_grad + static_cast<int64_t>(h) * HD;
  if constexpr (DK) store_rows<HD>(a.dk + out, a.ld_grad, dk, w * 16, nk, a.scale, lane);
  if constexpr (DV) store_rows<HD>(a.dv + out, a.ld_grad, dv, w * 16, nk, 1.f, lane);
}

template <typename K>
void set_smem(K kernel, size_t smem) {
  if (smem > 48 * 1024)
    SLLM_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
}

// The kernels of one head width: dq, then dk and dv in one launch (64) or two (128).
template <int HD>
void backward_launch(const BwdArgs& a, const dim3& grid) {
  constexpr int kP = pitch<HD>();
  const size_t smem_dq = static_cast<size_t>(kBlockQ + kBlockQ + 2 * kBlockK) * kP * 2;
  const size_t smem_dkdv = smem_dq + 2 * kBlockQ * 4;
  set_smem(attention_bwd_dq_kernel<HD>, smem_dq);
  attention_bwd_dq_kernel<HD><<<grid, kWarps * 32, smem_dq>>>(a);
  SLLM_LAUNCHED("attention_bwd_dq_kernel");
  if constexpr (HD <= 64) {
    set_smem(attention_bwd_dkdv_kernel<HD, true, true>, smem_dkdv);
    attention_bwd_dkdv_kernel<HD, true, true><<<grid, kWarps * 32, smem_dkdv>>>(a);
  } else {
    set_smem(attention_bwd_dkdv_kernel<HD, true, false>, smem_dkdv);
    set_smem(attention_bwd_dkdv_kernel<HD, false, true>, smem_dkdv);
    attention_bwd_dkdv_kernel<HD, true, false><<<grid, kWarps * 32, smem_dkdv>>>(a);
    SLLM_LAUNCHED("attention_bwd_dkdv_kernel");
    attention_bwd_dkdv_kernel<HD, false, true><<<grid, kWarps * 32, smem_dkdv>>>(a);
  }
  SLLM_LAUNCHED("attention_bwd_dkdv_kernel");
}

}  // namespace

bool attention_mma_backward_supported(int64_t head_dim) { return head_dim == 64 || head_dim == 128; }

int64_t attention_mma_backward_scratch(int64_t B, int64_t T, int64_t H) { return B * H * T; }

void attention_mma_train_backward(const float* q, const float* k, const float* v, int64_t ld_in, const float* lse,
                                  const float* out, const float* dout, int64_t ld_out, int64_t B, int64_t T, int64_t H,
                                  int hd, float* dq, float* dk, float* dv, int64_t ld_grad, float* delta) {
  if (!attention_mma_backward_supported(hd))
    throw std::invalid_argument("attention_mma_train_backward: head_dim must be 64 or 128");
  if (B <= 0 || T <= 0) return;
  const int64_t rows = B * T, items = rows * H, blocks = ceil_div(T, kBlockQ) * H;
  if (blocks > 0x7fffffff || B > 65535) throw std::invalid_argument("attention: too many tiles or sequences");
  attention_delta_kernel<<<static_cast<unsigned>(ceil_div(items, 8)), 256>>>(dout, out, ld_out, rows, T,
                                                                            static_cast<int>(H), hd, delta);
  SLLM_LAUNCHED("attention_delta_kernel");
  BwdArgs a{q, k, v, dout, lse, delta, ld_in, ld_out, T, static_cast<int>(H), 0.f, 0.f, dq, dk, dv, ld_grad};
  a.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
  a.smul = a.scale * kLog2e;
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(B));
  if (hd == 64) backward_launch<64>(a, grid);
  else backward_launch<128>(a, grid);
}

}  // namespace sparsellm::cuda
