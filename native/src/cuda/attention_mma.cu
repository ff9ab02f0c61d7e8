// Causal prefill attention on the tensor cores (attention_mma.h), flash-attention style: scores
// and probabilities never leave the chip. One block of 4 warps per (tile of 64 queries, head),
// the tiles with the most keys first. The query tile is staged once as bf16 (pre-multiplied by
// scale·log2 e, so that the softmax runs on exp2) and each warp keeps the A fragments of its 16
// queries in registers. The keys 0 .. the tile's last position are walked in tiles of 64: K and V
// are staged as bf16 (row-major, rows padded by 16 bytes so that ldmatrix's eight row addresses
// fall in distinct banks), S = Q·K^T comes from mma.sync m16n8k16 (16 × 64 per warp, f32), keys
// past a query's position are masked, and the online softmax (running maximum m and sum l per
// row, the accumulator rescaled when m grows) turns S into P, whose accumulator fragments are
// exactly the A fragments of P·V (rounded to bf16); V's B fragments come from ldmatrix.trans.
// A warp whose queries all precede the key tile skips it. Each thread sums l over its own
// columns; the quad's partial sums are added at the end.
#include <cmath>
#include <stdexcept>
#include <string>

#include "attention_mma.h"
#include "common.cuh"
#include "mma.cuh"

namespace sparsellm::cuda {
namespace {

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

template <int HD>
__host__ __device__ constexpr int pitch() {
  return HD + 8;  // bf16 elements per staged row: +16 bytes
}

template <int HD>
__host__ __device__ constexpr size_t smem_bytes() {
  return static_cast<size_t>(kBlockQ + 2 * kBlockK) * pitch<HD>() * 2;
}

// rows × HD floats from src (HD floats per row, 16-byte aligned) into dst as bf16 (pitch<HD>());
// rows ≥ n are zero.
template <int HD>
__device__ __forceinline__ void stage_rows(const float* __restrict__ src, int rows, int n, uint16_t* dst) {
  constexpr int kVec = HD / 4;  // float4 per row
  for (int i = threadIdx.x; i < rows * kVec; i += kWarps * 32) {
    const int r = i / kVec, c = (i % kVec) * 4;
    float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
    if (r < n) v = *reinterpret_cast<const float4*>(src + static_cast<int64_t>(r) * HD + c);
    *reinterpret_cast<uint2*>(dst + r * pitch<HD>() + c) = make_uint2(pack_bf16x2(v.x, v.y), pack_bf16x2(v.z, v.w));
  }
}

template <int HD>
__global__ void __launch_bounds__(kWarps * 32) attention_mma_kernel(const float* __restrict__ q, int64_t ldq, int64_t T,
                                                                    int n_heads, int group, const float* __restrict__ ck,
                                                                    const float* __restrict__ cv, int64_t cap,
                                                                    int64_t pos0, float qmul,
                                                                    uint16_t* __restrict__ out, int64_t ldo) {
  constexpr int P = pitch<HD>();
  constexpr int KS = HD / 16;  // k-steps of Q·K^T
  constexpr int NT = HD / 8;   // 8-column tiles of the output
  extern __shared__ __align__(16) uint16_t attn_mma_smem[];
  uint16_t* sq = attn_mma_smem;       // [kBlockQ][P]
  uint16_t* sk = sq + kBlockQ * P;    // [kBlockK][P]
  uint16_t* sv = sk + kBlockK * P;    // [kBlockK][P]
  const int64_t n_tiles = (T + kBlockQ - 1) / kBlockQ;
  const int64_t tile = n_tiles - 1 - static_cast<int64_t>(blockIdx.x) / n_heads;
  const int h = static_cast<int>(blockIdx.x % n_heads);
  const int64_t t0 = tile * kBlockQ;
  const int nq = static_cast<int>(T - t0 < kBlockQ ? T - t0 : kBlockQ);
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, qd = lane & 3;

  // Q may sit at any float offset (ldq, h·HD): scalar loads, once per block.
  for (int i = threadIdx.x; i < kBlockQ * HD / 2; i += kWarps * 32) {
    const int r = i / (HD / 2), c = (i % (HD / 2)) * 2;
    float a = 0.f, b = 0.f;
    if (r < nq) {
      const float* src = q + (t0 + r) * ldq + static_cast<int64_t>(h) * HD + c;
      a = src[0] * qmul;
      b = src[1] * qmul;
    }
    *reinterpret_cast<uint32_t*>(sq + r * P + c) = pack_bf16x2(a, b);
  }
  __syncthreads();
  uint32_t qa[KS][4];
#pragma unroll
  for (int kk = 0; kk < KS; ++kk)
    ldmatrix_x4(qa[kk], smem_addr(sq + (w * 16 + ldsm_a_row(lane)) * P + kk * 16 + ldsm_a_chunk(lane) * 8));

  const int64_t qpos0 = pos0 + t0 + w * 16 + g, qpos1 = qpos0 + 8;  // this thread's two rows
  const int64_t warp_last = pos0 + t0 + w * 16 + 15;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
  float o[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.f;

  const float* kb = ck + static_cast<int64_t>(h / group) * cap * HD;
  const float* vb = cv + static_cast<int64_t>(h / group) * cap * HD;
  const int64_t last = pos0 + t0 + nq - 1;  // the block's last position: keys 0 .. last
  for (int64_t k0 = 0; k0 <= last; k0 += kBlockK) {
    const int nk = static_cast<int>(last - k0 + 1 < kBlockK ? last - k0 + 1 : kBlockK);
    __syncthreads();  // the previous tile's readers are done
    stage_rows<HD>(kb + k0 * HD, kBlockK, nk, sk);
    stage_rows<HD>(vb + k0 * HD, kBlockK, nk, sv);
    __syncthreads();
    if (k0 > warp_last) continue;  // every key of the tile follows this warp's queries

    float s[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t b0[2], b1[2];
        ldmatrix_b_pair(b0, b1, smem_addr(sk + (np * 16 + ldsm_b_row(lane)) * P + kk * 16 + ldsm_b_chunk(lane) * 8));
        mma_bf16(s[2 * np], qa[kk], b0[0], b0[1]);
        mma_bf16(s[2 * np + 1], qa[kk], b1[0], b1[1]);
      }
    }
    // Mask (keys past the row's position, which include the unstaged ones), then the row maxima.
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      const int64_t key = k0 + nt * 8 + 2 * qd;
      if (key > qpos0) s[nt][0] = -INFINITY;
      if (key + 1 > qpos0) s[nt][1] = -INFINITY;
      if (key > qpos1) s[nt][2] = -INFINITY;
      if (key + 1 > qpos1) s[nt][3] = -INFINITY;
      mx0 = fmaxf(mx0, fmaxf(s[nt][0], s[nt][1]));
      mx1 = fmaxf(mx1, fmaxf(s[nt][2], s[nt][3]));
    }
#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {  // the quad holds the row
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
    }
    const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
    // A row with no visible key yet keeps m = −inf: exponentials against 0 then give p = 0.
    const float ref0 = mn0 == -INFINITY ? 0.f : mn0, ref1 = mn1 == -INFINITY ? 0.f : mn1;
    const float corr0 = exp2f(m0 - ref0), corr1 = exp2f(m1 - ref1);
    m0 = mn0;
    m1 = mn1;
    l0 *= corr0;
    l1 *= corr1;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      o[nt][0] *= corr0;
      o[nt][1] *= corr0;
      o[nt][2] *= corr1;
      o[nt][3] *= corr1;
    }
    uint32_t pa[4][4];  // P as the A fragments of the 4 k-steps (16 keys each) of P·V
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      const float p0 = exp2f(s[nt][0] - ref0), p1 = exp2f(s[nt][1] - ref0);
      const float p2 = exp2f(s[nt][2] - ref1), p3 = exp2f(s[nt][3] - ref1);
      l0 += p0 + p1;
      l1 += p2 + p3;
      pa[nt >> 1][(nt & 1) * 2] = pack_bf16x2(p0, p1);
      pa[nt >> 1][(nt & 1) * 2 + 1] = pack_bf16x2(p2, p3);
    }
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
      for (int nd = 0; nd < NT / 2; ++nd) {
        uint32_t b[4];  // (keys 0-7 | 8-15) × (dims 0-7 | 8-15) of this 16 × 16 slice of V
        ldmatrix_x4_trans(b, smem_addr(sv + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * P + nd * 16 +
                                       (lane >> 4) * 8));
        mma_bf16(o[2 * nd], pa[kk], b[0], b[1]);
        mma_bf16(o[2 * nd + 1], pa[kk], b[2], b[3]);
      }
    }
  }
#pragma unroll
  for (int off = 1; off < 4; off <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, off);
    l1 += __shfl_xor_sync(0xffffffffu, l1, off);
  }
  const int r0 = w * 16 + g, r1 = r0 + 8;
  const float inv0 = 1.f / l0, inv1 = 1.f / l1;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int c = h * HD + nt * 8 + 2 * qd;
    if (r0 < nq) {
      uint16_t* row = out + (t0 + r0) * ldo + c;
      row[0] = static_cast<uint16_t>(f32_to_bf16_bits(o[nt][0] * inv0));
      row[1] = static_cast<uint16_t>(f32_to_bf16_bits(o[nt][1] * inv0));
    }
    if (r1 < nq) {
      uint16_t* row = out + (t0 + r1) * ldo + c;
      row[0] = static_cast<uint16_t>(f32_to_bf16_bits(o[nt][2] * inv1));
      row[1] = static_cast<uint16_t>(f32_to_bf16_bits(o[nt][3] * inv1));
    }
  }
  if (h == 0)  // padding columns of the output rows
    for (int r = w; r < nq; r += kWarps)
      for (int64_t c = static_cast<int64_t>(n_heads) * HD + lane; c < ldo; c += 32) out[(t0 + r) * ldo + c] = 0;
}

template <int HD>
void launch(const float* q, int64_t ldq, int64_t T, int n_heads, int group, const float* ck, const float* cv,
            int64_t cap, int64_t pos0, float scale, uint16_t* out, int64_t ldo) {
  constexpr size_t smem = smem_bytes<HD>();
  if (smem > 48 * 1024)
    SLLM_CUDA(cudaFuncSetAttribute(attention_mma_kernel<HD>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   static_cast<int>(smem)));
  const int64_t blocks = ceil_div(T, kBlockQ) * n_heads;
  if (blocks > 0x7fffffff) throw std::invalid_argument("attention: too many query tiles");
  const float qmul = scale * 1.4426950408889634f;  // log2 e: the softmax runs on exp2
  attention_mma_kernel<HD><<<static_cast<unsigned>(blocks), kWarps * 32, smem>>>(q, ldq, T, n_heads, group, ck, cv,
                                                                                  cap, pos0, qmul, out, ldo);
  SLLM_LAUNCHED("attention_mma_kernel");
}

}  // namespace

bool attention_mma_supported(int64_t head_dim) { return head_dim == 64 || head_dim == 128; }

void attention_mma(const float* q, int64_t ldq, int64_t T, int n_heads, int group, int hd, const float* ck,
                   const float* cv, int64_t cap, int64_t pos0, float scale, uint16_t* out, int64_t ldo) {
  if (T <= 0) return;
  if (hd == 64) launch<64>(q, ldq, T, n_heads, group, ck, cv, cap, pos0, scale, out, ldo);
  else if (hd == 128) launch<128>(q, ldq, T, n_heads, group, ck, cv, cap, pos0, scale, out, ldo);
  else throw std::invalid_argument("attention_mma: head_dim " + std::to_string(hd) + " has no tensor-core kernel");
}

}  // namespace sparsellm::cuda
