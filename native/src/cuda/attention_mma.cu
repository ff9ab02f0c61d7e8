// Causal attention on the tensor cores (attention_mma.h), flash-attention style: scores and
// probabilities never leave the chip. One block of 4 warps per (tile of 64 queries, head,
// sequence), the tiles with the most keys first. The query tile is staged once as bf16 and each
// warp keeps the A fragments of its 16 queries in registers; scores are scaled by scale·log2 e
// in f32 after the product (so that the softmax runs on exp2, and the scores are those of a
// bf16 GEMM of the same operands). The keys 0 .. the tile's last position are walked in tiles
// of 64: K and V are staged as bf16 (row-major, rows padded by 16 bytes so that ldmatrix's eight
// row addresses fall in distinct banks), S = Q·K^T comes from mma.sync m16n8k16 (16 × 64 per warp, f32), keys
// past a query's position are masked, and the online softmax (running maximum m and sum l per
// row, the accumulator rescaled when m grows) turns S into P, whose accumulator fragments are
// exactly the A fragments of P·V (rounded to bf16); V's B fragments come from ldmatrix.trans.
// A warp whose queries all precede the key tile skips it. Each thread sums l over its own
// columns; the quad's partial sums are added at the end.
#include <cmath>
#include <stdexcept>
#include <string>

#include "attention_mma.h"
#include "attention_mma.cuh"

namespace sparsellm::cuda {
namespace {

using namespace attn_mma;

// Where the kernel reads and writes (inference: one sequence, K and V from the cache; training:
// B sequences of packed q, k, v rows).
template <int HD>
__host__ __device__ constexpr size_t smem_bytes() {
  return static_cast<size_t>(kBlockQ + 2 * kBlockK) * pitch<HD>() * 2;
}

struct Args {
  const float* q;  // row (b, t) of head h: q + b·q_batch + t·ldq + h·HD
  int64_t ldq, q_batch;
  const float *k, *v;  // row (b, j) of key/value head kvh: k + b·kv_batch + kvh·kv_head + j·ldkv (16-byte aligned)
  int64_t ldkv, kv_batch, kv_head;
  int64_t T, pos0;  // queries per sequence at positions pos0 ..; keys 0 .. pos0 + t
  int n_heads, group;
  float smul;       // scale·log2 e
  void* out;        // row (b, t): out + b·o_batch + t·ldo + h·HD, bf16 or f32
  int64_t ldo, o_batch;
  float* lse;       // null, or [B, n_heads, T]: the rows' natural log-sum-exp of the scaled scores
};

// F32OUT: f32 output (training); else bf16, the padding columns n_heads·HD .. ldo − 1 zeroed.
template <int HD, bool F32OUT>
__global__ void __launch_bounds__(kWarps * 32) attention_mma_kernel(const Args a) {
  constexpr int P = pitch<HD>();
  constexpr int NT = HD / 8;   // 8-column tiles of the output
  extern __shared__ __align__(16) uint16_t attn_mma_smem[];
  uint16_t* sq = attn_mma_smem;       // [kBlockQ][P]
  uint16_t* sk = sq + kBlockQ * P;    // [kBlockK][P]
  uint16_t* sv = sk + kBlockK * P;    // [kBlockK][P]
  const int64_t T = a.T, pos0 = a.pos0;
  const int n_heads = a.n_heads;
  const BlockTile bt = block_tile(T, n_heads, true);  // the query tile with the most keys first
  const int64_t b = bt.b, t0 = bt.row0;
  const int h = bt.h, nq = bt.n;
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, g = lane >> 2, qd = lane & 3;

  // Q may sit at any float offset (ldq, h·HD): scalar loads, once per block.
  const float* qb = a.q + b * a.q_batch + static_cast<int64_t>(h) * HD;
  for (int i = threadIdx.x; i < kBlockQ * HD / 2; i += kWarps * 32) {
    const int r = i / (HD / 2), c = (i % (HD / 2)) * 2;
    float x0 = 0.f, x1 = 0.f;
    if (r < nq) {
      x0 = qb[(t0 + r) * a.ldq + c];
      x1 = qb[(t0 + r) * a.ldq + c + 1];
    }
    *reinterpret_cast<uint32_t*>(sq + r * P + c) = pack_bf16x2(x0, x1);
  }
  __syncthreads();
  uint32_t qa[HD / 16][4];
  load_a_frags<HD>(qa, sq, w * 16, lane);

  const int64_t qpos0 = pos0 + t0 + w * 16 + g, qpos1 = qpos0 + 8;  // this thread's two rows
  const int64_t warp_last = pos0 + t0 + w * 16 + 15;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
  float o[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.f;

  const int64_t kv_off = b * a.kv_batch + static_cast<int64_t>(h / a.group) * a.kv_head;
  const float* kb = a.k + kv_off;
  const float* vb = a.v + kv_off;
  const int64_t last = pos0 + t0 + nq - 1;  // the block's last position: keys 0 .. last
  for (int64_t k0 = 0; k0 <= last; k0 += kBlockK) {
    const int nk = static_cast<int>(last - k0 + 1 < kBlockK ? last - k0 + 1 : kBlockK);
    __syncthreads();  // the previous tile's readers are done
    stage_rows<HD>(kb + k0 * a.ldkv, a.ldkv, kBlockK, nk, sk);
    stage_rows<HD>(vb + k0 * a.ldkv, a.ldkv, kBlockK, nk, sv);
    __syncthreads();
    if (k0 > warp_last) continue;  // every key of the tile follows this warp's queries

    float s[8][4];
    mma_rows_t<HD>(s, qa, sk, lane);  // S = Q·Kᵀ
    // Scale; mask (keys past the row's position, which include the unstaged ones); row maxima.
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      const int64_t key = k0 + nt * 8 + 2 * qd;
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] *= a.smul;
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
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {  // S becomes P
      s[nt][0] = exp2f(s[nt][0] - ref0);
      s[nt][1] = exp2f(s[nt][1] - ref0);
      s[nt][2] = exp2f(s[nt][2] - ref1);
      s[nt][3] = exp2f(s[nt][3] - ref1);
      l0 += s[nt][0] + s[nt][1];
      l1 += s[nt][2] + s[nt][3];
    }
    mma_acc_rows<HD>(o, s, sv, lane);  // O += P·V
  }
#pragma unroll
  for (int off = 1; off < 4; off <<= 1) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, off);
    l1 += __shfl_xor_sync(0xffffffffu, l1, off);
  }
  const int r0 = w * 16 + g, r1 = r0 + 8;
  const float inv0 = 1.f / l0, inv1 = 1.f / l1;
  if (a.lse && qd == 0) {  // ln(Σ exp(s − m)) + m·ln 2 with s, m in base-2 units
    float* lr = a.lse + (b * n_heads + h) * T + t0;
    if (r0 < nq) lr[r0] = (m0 + log2f(l0)) * 0.6931471805599453f;
    if (r1 < nq) lr[r1] = (m1 + log2f(l1)) * 0.6931471805599453f;
  }
  const int64_t ob = b * a.o_batch + t0 * a.ldo;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    const int c = h * HD + nt * 8 + 2 * qd;
    if constexpr (F32OUT) {
      float* out = static_cast<float*>(a.out) + ob + c;
      if (r0 < nq) {
        out[r0 * a.ldo] = o[nt][0] * inv0;
        out[r0 * a.ldo + 1] = o[nt][1] * inv0;
      }
      if (r1 < nq) {
        out[r1 * a.ldo] = o[nt][2] * inv1;
        out[r1 * a.ldo + 1] = o[nt][3] * inv1;
      }
    } else {
      uint16_t* out = static_cast<uint16_t*>(a.out) + ob + c;
      if (r0 < nq) {
        out[r0 * a.ldo] = static_cast<uint16_t>(f32_to_bf16_bits(o[nt][0] * inv0));
        out[r0 * a.ldo + 1] = static_cast<uint16_t>(f32_to_bf16_bits(o[nt][1] * inv0));
      }
      if (r1 < nq) {
        out[r1 * a.ldo] = static_cast<uint16_t>(f32_to_bf16_bits(o[nt][2] * inv1));
        out[r1 * a.ldo + 1] = static_cast<uint16_t>(f32_to_bf16_bits(o[nt][3] * inv1));
      }
    }
  }
  if constexpr (!F32OUT) {
    if (h == 0) {  // padding columns of the output rows
      uint16_t* out = static_cast<uint16_t*>(a.out) + ob;
      for (int r = w; r < nq; r += kWarps)
        for (int64_t c = static_cast<int64_t>(n_heads) * HD + lane; c < a.ldo; c += 32) out[r * a.ldo + c] = 0;
    }
  }
}

template <int HD, bool F32OUT>
void launch_hd(const Args& a, int64_t B) {
  constexpr size_t smem = smem_bytes<HD>();
  if (smem > 48 * 1024)
    SLLM_CUDA(cudaFuncSetAttribute(attention_mma_kernel<HD, F32OUT>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   static_cast<int>(smem)));
  const int64_t blocks = ceil_div(a.T, kBlockQ) * a.n_heads;
  if (blocks > 0x7fffffff || B > 65535) throw std::invalid_argument("attention: too many query tiles or sequences");
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(B));
  attention_mma_kernel<HD, F32OUT><<<grid, kWarps * 32, smem>>>(a);
  SLLM_LAUNCHED("attention_mma_kernel");
}

template <bool F32OUT>
void launch(const Args& a, int hd, int64_t B) {
  if (a.T <= 0 || B <= 0) return;
  if (hd == 64) launch_hd<64, F32OUT>(a, B);
  else if (hd == 128) launch_hd<128, F32OUT>(a, B);
  else throw std::invalid_argument("attention_mma: head_dim " + std::to_string(hd) + " has no tensor-core kernel");
}

}  // namespace

bool attention_mma_supported(int64_t head_dim) { return head_dim == 64 || head_dim == 128; }

void attention_mma(const float* q, int64_t ldq, int64_t T, int n_heads, int group, int hd, const float* ck,
                   const float* cv, int64_t cap, int64_t pos0, float scale, uint16_t* out, int64_t ldo) {
  Args a{};
  a.q = q;
  a.ldq = ldq;
  a.k = ck;
  a.v = cv;
  a.ldkv = hd;
  a.kv_head = cap * hd;
  a.T = T;
  a.pos0 = pos0;
  a.n_heads = n_heads;
  a.group = group;
  a.smul = scale * kLog2e;
  a.out = out;
  a.ldo = ldo;
  launch<false>(a, hd, 1);
}

void attention_mma_train(const float* q, const float* k, const float* v, int64_t ld_in, int64_t B, int64_t T,
                         int64_t H, int hd, float* lse, float* out, int64_t ld_out) {
  Args a{};
  a.q = q;
  a.ldq = ld_in;
  a.q_batch = T * ld_in;
  a.k = k;
  a.v = v;
  a.ldkv = ld_in;
  a.kv_batch = T * ld_in;
  a.kv_head = hd;
  a.T = T;
  a.n_heads = static_cast<int>(H);
  a.group = 1;
  a.smul = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd))) * kLog2e;
  a.out = out;
  a.ldo = ld_out;
  a.o_batch = T * ld_out;
  a.lse = lse;
  launch<true>(a, hd, B);
}

}  // namespace sparsellm::cuda
