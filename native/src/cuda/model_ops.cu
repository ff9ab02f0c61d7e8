// The transformer pieces other than the projections and the FFN, on the GPU (cuda_ops.h, "Model
// operations"): embedding gather, learned positions, RMSNorm / LayerNorm, RoPE, the KV-cache
// store, causal attention with GQA, the residual add and the generic FFN activation. Each is
// the counterpart of the CPU function of the same name in native/src/cpu/model_ops.cpp (same
// formulas, same order of the f32 operations where it matters); correctness first, simple
// launch shapes. Shapes: T tokens, d width, hd head_dim; activations f32 row-major (ld given).
#include <cuda_runtime.h>

#include <cmath>
#include <stdexcept>
#include <string>

#include "attention_mma.h"
#include "common.cuh"
#include "kernel_policy.h"
#include "sparsellm/cuda_ops.h"

namespace sparsellm::cuda {
namespace {

constexpr int kRowThreads = 256;

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the total.
// `sh` holds 32 floats; the leading barrier lets consecutive calls reuse it.
__device__ float block_sum(float v, float* sh) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) sh[w] = v;
  __syncthreads();
  const int nw = blockDim.x >> 5;
  v = lane < nw ? sh[lane] : 0.f;
  return warp_sum(v);
}

unsigned grid1(int64_t n, int threads) {
  const int64_t b = ceil_div(n, threads);
  if (b > 0x7fffffffLL) throw std::invalid_argument("CUDA model operation: too many elements");
  return static_cast<unsigned>(b < 1 ? 1 : b);
}

unsigned rows_grid(int64_t T) {
  if (T > 0x7fffffffLL) throw std::invalid_argument("CUDA model operation: too many rows");
  return static_cast<unsigned>(T);
}

// ---- embeddings -------------------------------------------------------------------------------

// out[t, :d] = table[rows[t], :d] (one block per token).
__global__ void embed_rows_kernel(const uint16_t* __restrict__ table, int64_t ldt, const int32_t* __restrict__ rows,
                                  int64_t d, float* __restrict__ out, int64_t ldo) {
  const int64_t t = blockIdx.x;
  const uint16_t* src = table + static_cast<int64_t>(rows[t]) * ldt;
  float* dst = out + t * ldo;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) dst[c] = bf16_bits_to_f32(src[c]);
}

// out[t, :d] += table[row0 + t, :d].
__global__ void add_rows_kernel(const uint16_t* __restrict__ table, int64_t ldt, int64_t row0, int64_t d,
                                float* __restrict__ out, int64_t ldo) {
  const int64_t t = blockIdx.x;
  const uint16_t* src = table + (row0 + t) * ldt;
  float* dst = out + t * ldo;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) dst[c] += bf16_bits_to_f32(src[c]);
}

// ---- norms ------------------------------------------------------------------------------------

// One block per row: y = x / sqrt(mean(x²) + eps) ⊙ w (rms) or (x − mean) / sqrt(var + eps) ⊙ w
// + b (LayerNorm, biased variance, two passes); bf16 out with columns d .. ldo − 1 zeroed.
__global__ void norm_rows_kernel(const float* __restrict__ x, int64_t ldx, int64_t d, const float* __restrict__ w,
                                 const float* __restrict__ b, float eps, int rms, uint16_t* __restrict__ out,
                                 int64_t ldo) {
  __shared__ float sh[32];
  const int64_t t = blockIdx.x;
  const float* xr = x + t * ldx;
  uint16_t* yr = out + t * ldo;
  const float fd = static_cast<float>(d);
  float mean = 0.f;
  if (!rms) {
    float s = 0.f;
    for (int64_t c = threadIdx.x; c < d; c += blockDim.x) s += xr[c];
    mean = block_sum(s, sh) / fd;
  }
  float ss = 0.f;
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    const float v = rms ? xr[c] : xr[c] - mean;
    ss = fmaf(v, v, ss);
  }
  ss = block_sum(ss, sh);
  const float r = 1.f / sqrtf(ss / fd + eps);
  for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
    float v = rms ? xr[c] * r * w[c] : (xr[c] - mean) * r * w[c];
    if (b) v += b[c];
    yr[c] = static_cast<uint16_t>(f32_to_bf16_bits(v));
  }
  for (int64_t c = d + threadIdx.x; c < ldo; c += blockDim.x) yr[c] = 0;
}

// ---- RoPE -------------------------------------------------------------------------------------

// cs[t, i] = (cos, sin) of (pos0 + t) · inv_freq[i], in float64 as the CPU rope_table.
__global__ void rope_table_kernel(int64_t T, int64_t half, int64_t pos0, const double* __restrict__ inv_freq,
                                  float* __restrict__ cs) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= T * half) return;
  const int64_t t = k / half, i = k % half;
  const double angle = static_cast<double>(pos0 + t) * inv_freq[i];
  double s, c;
  sincos(angle, &s, &c);
  cs[k * 2] = static_cast<float>(c);
  cs[k * 2 + 1] = static_cast<float>(s);
}

// Rotate-half: pairs (i, i + hd/2) of every head of token t rotated by cs[t, i].
__global__ void rope_apply_kernel(float* __restrict__ x, int64_t ldx, int64_t T, int64_t n_heads, int64_t hd,
                                  const float* __restrict__ cs) {
  const int64_t half = hd / 2;
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= T * n_heads * half) return;
  const int64_t i = k % half, h = (k / half) % n_heads, t = k / (half * n_heads);
  float* xh = x + t * ldx + h * hd;
  const float co = cs[(t * half + i) * 2], si = cs[(t * half + i) * 2 + 1];
  const float a = xh[i], bv = xh[i + half];
  xh[i] = a * co - bv * si;
  xh[i + half] = bv * co + a * si;
}

// ---- KV cache ---------------------------------------------------------------------------------

// cache [kv_head][capacity][hd] (one layer's block) at positions pos0 .. pos0 + T − 1.
__global__ void kv_store_kernel(float* __restrict__ ck, float* __restrict__ cv, int64_t n_kv, int64_t cap,
                                int64_t hd, const float* __restrict__ k, int64_t ldk, const float* __restrict__ v,
                                int64_t ldv, int64_t T, int64_t pos0) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= T * n_kv * hd) return;
  const int64_t e = idx % hd, h = (idx / hd) % n_kv, t = idx / (hd * n_kv);
  const int64_t dst = (h * cap + pos0 + t) * hd + e;
  ck[dst] = k[t * ldk + h * hd + e];
  cv[dst] = v[t * ldv + h * hd + e];
}

// ---- attention --------------------------------------------------------------------------------

constexpr int kMaxHeadDim = 256;
constexpr int kLaneDims = kMaxHeadDim / 32;

// One block of NW warps per (query t, head h); grid T · n_heads. The warps take the visible keys
// 0 .. pos0 + t in turn (warp w: keys w, w + NW, ...), each with an online softmax (running
// maximum m, running sum l, output accumulator rescaled when m grows); lane L holds the
// dimensions L, L + 32, ... of q and of the accumulator. The warps' partial results are then
// combined with their maxima. Scores are q·k / sqrt(hd) in f32. Output bf16 (head h at columns
// h·hd ..), columns n_heads·hd .. ldo − 1 zeroed by the head-0 blocks.
template <int NW>
__global__ void __launch_bounds__(NW * 32) attention_kernel(const float* __restrict__ q, int64_t ldq, int n_heads,
                                                            int group, int hd, const float* __restrict__ ck,
                                                            const float* __restrict__ cv, int64_t cap, int64_t pos0,
                                                            float scale, uint16_t* __restrict__ out, int64_t ldo) {
  __shared__ float s_m[NW], s_l[NW];
  __shared__ float s_acc[NW][kMaxHeadDim];
  const int64_t bid = blockIdx.x;
  const int64_t t = bid / n_heads;
  const int h = static_cast<int>(bid % n_heads);
  const int kvh = h / group;
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const float* qr = q + t * ldq + static_cast<int64_t>(h) * hd;
  float qv[kLaneDims], acc[kLaneDims];
#pragma unroll
  for (int i = 0; i < kLaneDims; ++i) {
    const int e = lane + 32 * i;
    qv[i] = e < hd ? qr[e] : 0.f;
    acc[i] = 0.f;
  }
  const float* kb = ck + static_cast<int64_t>(kvh) * cap * hd;
  const float* vb = cv + static_cast<int64_t>(kvh) * cap * hd;
  const int64_t n_keys = pos0 + t + 1;
  float m = -INFINITY, l = 0.f;
  for (int64_t j = w; j < n_keys; j += NW) {
    const float* kr = kb + j * hd;
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < kLaneDims; ++i) {
      const int e = lane + 32 * i;
      if (e < hd) s = fmaf(qv[i], kr[e], s);
    }
    s = warp_sum(s) * scale;
    const float mn = fmaxf(m, s);
    const float corr = expf(m - mn);  // 0 for the first key (m = −inf)
    const float p = expf(s - mn);
    l = l * corr + p;
    const float* vr = vb + j * hd;
#pragma unroll
    for (int i = 0; i < kLaneDims; ++i) {
      const int e = lane + 32 * i;
      if (e < hd) acc[i] = fmaf(p, vr[e], acc[i] * corr);
    }
    m = mn;
  }
  if (lane == 0) {
    s_m[w] = m;
    s_l[w] = l;
  }
#pragma unroll
  for (int i = 0; i < kLaneDims; ++i) {
    const int e = lane + 32 * i;
    if (e < hd) s_acc[w][e] = acc[i];
  }
  __syncthreads();
  // Warp 0 saw key 0, so the maximum is finite; warps without keys have m = −inf, l = 0, acc = 0.
  float M = -INFINITY;
#pragma unroll
  for (int ww = 0; ww < NW; ++ww) M = fmaxf(M, s_m[ww]);
  float f[NW];
  float L = 0.f;
#pragma unroll
  for (int ww = 0; ww < NW; ++ww) {
    f[ww] = expf(s_m[ww] - M);
    L += s_l[ww] * f[ww];
  }
  const float inv = 1.f / L;
  uint16_t* orow = out + t * ldo;
  for (int e = threadIdx.x; e < hd; e += NW * 32) {
    float o = 0.f;
#pragma unroll
    for (int ww = 0; ww < NW; ++ww) o = fmaf(s_acc[ww][e], f[ww], o);
    orow[static_cast<int64_t>(h) * hd + e] = static_cast<uint16_t>(f32_to_bf16_bits(o * inv));
  }
  if (h == 0)
    for (int64_t c = static_cast<int64_t>(n_heads) * hd + threadIdx.x; c < ldo; c += NW * 32) orow[c] = 0;
}

// Tiled causal attention for prefill (many queries; unverified: kernel_policy.h). One block of
// kTileWarps warps per (tile of kTileQ queries, head h); grid n_tiles · n_heads, the last tiles
// (most keys) first. The tile's queries sit in shared memory; the keys 0 .. the tile's last
// position are walked in tiles of kTileK rows of K and V, each loaded into shared memory once
// for the whole query tile (coalesced rows; pitch hd | 1, odd, so the 32 lanes reading 32 key
// rows hit 32 banks). Warp w owns the queries w·QW .. w·QW + QW − 1 of the tile; per query and
// key tile, lane j scores key j (q·k over hd, f32, then scaled), the tile's maximum and the
// probabilities' sum go through warp shuffles into the query's running maximum m and sum l (the
// same online softmax as attention_kernel, f32), and the accumulator (lane L: dimensions
// L, L + 32, .., LD of them) is rescaled and gets Σ_j p_j · v_j with p_j from the warp's shared
// row. Keys past a query's position get p = 0; a key tile with none visible is skipped. Output
// as attention_kernel: bf16, head h at columns h·hd, padding columns zeroed by the head-0 blocks.
constexpr int kTileWarps = 4;
constexpr int kTileQ = 32;                  // queries per block
constexpr int kTileQW = kTileQ / kTileWarps;  // queries per warp
constexpr int kTileK = 32;                  // keys per shared tile (one per lane)
// Auto picks the tiled kernel from this many queries (one tile); fewer stay on attention_kernel.
constexpr int64_t kAttentionTiledMinTokens = kTileQ;

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

size_t attention_tiled_smem(int hd) {
  const int pitch = hd | 1;
  return (static_cast<size_t>(kTileQ) * hd + 2 * static_cast<size_t>(kTileK) * pitch + kTileWarps * kTileK) * 4;
}

template <int LD>
__global__ void __launch_bounds__(kTileWarps * 32, 4)  // 4 blocks per SM: no spills on sm_80
    attention_tiled_kernel(const float* __restrict__ q, int64_t ldq, int64_t T, int n_heads, int group, int hd,
                           const float* __restrict__ ck, const float* __restrict__ cv, int64_t cap, int64_t pos0,
                           float scale, uint16_t* __restrict__ out, int64_t ldo) {
  extern __shared__ float attn_smem[];
  const int pitch = hd | 1;
  float* sq = attn_smem;                   // [kTileQ][hd]
  float* sk = sq + kTileQ * hd;            // [kTileK][pitch]
  float* sv = sk + kTileK * pitch;         // [kTileK][pitch]
  float* sp = sv + kTileK * pitch;         // [kTileWarps][kTileK]
  const int64_t n_tiles = (T + kTileQ - 1) / kTileQ;
  const int64_t tile = n_tiles - 1 - static_cast<int64_t>(blockIdx.x) / n_heads;
  const int h = static_cast<int>(blockIdx.x % n_heads);
  const int kvh = h / group;
  const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5;
  const int64_t t0 = tile * kTileQ;
  const int nq = static_cast<int>(T - t0 < kTileQ ? T - t0 : kTileQ);
  for (int i = tid; i < kTileQ * hd; i += kTileWarps * 32) {
    const int qi = i / hd, e = i % hd;
    sq[i] = qi < nq ? q[(t0 + qi) * ldq + static_cast<int64_t>(h) * hd + e] : 0.f;
  }
  const float* kb = ck + static_cast<int64_t>(kvh) * cap * hd;
  const float* vb = cv + static_cast<int64_t>(kvh) * cap * hd;
  float m[kTileQW], l[kTileQW], acc[kTileQW][LD];
#pragma unroll
  for (int qq = 0; qq < kTileQW; ++qq) {
    m[qq] = -INFINITY;
    l[qq] = 0.f;
#pragma unroll
    for (int i = 0; i < LD; ++i) acc[qq][i] = 0.f;
  }
  const int64_t last = pos0 + t0 + nq - 1;  // the tile's last position: keys 0 .. last
  for (int64_t k0 = 0; k0 <= last; k0 += kTileK) {
    const int nk = static_cast<int>(last - k0 + 1 < kTileK ? last - k0 + 1 : kTileK);
    __syncthreads();  // the previous tile's readers are done
    for (int i = tid; i < kTileK * hd; i += kTileWarps * 32) {
      const int j = i / hd, e = i % hd;
      const int64_t src = (k0 + j) * hd + e;
      sk[j * pitch + e] = j < nk ? kb[src] : 0.f;
      sv[j * pitch + e] = j < nk ? vb[src] : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int qq = 0; qq < kTileQW; ++qq) {
      const int qi = w * kTileQW + qq;
      if (qi >= nq) break;  // warp-uniform
      const int64_t qpos = pos0 + t0 + qi;
      if (k0 > qpos) continue;  // none of this tile is visible yet (the warp's later queries see more)
      const bool vis = k0 + lane <= qpos && lane < nk;
      float s = -INFINITY;
      if (vis) {
        const float* qr = sq + qi * hd;
        const float* kr = sk + lane * pitch;
        float d = 0.f;
        for (int e = 0; e < hd; ++e) d = fmaf(qr[e], kr[e], d);
        s = d * scale;
      }
      const float mt = warp_max(s);  // finite: key k0 ≤ qpos is visible
      const float mn = fmaxf(m[qq], mt);
      const float corr = expf(m[qq] - mn);  // 0 on the first tile (m = −inf)
      const float p = vis ? expf(s - mn) : 0.f;
      l[qq] = l[qq] * corr + warp_sum(p);
      m[qq] = mn;
      sp[w * kTileK + lane] = p;
      __syncwarp();
#pragma unroll
      for (int i = 0; i < LD; ++i) acc[qq][i] *= corr;
      const int jn = static_cast<int>(qpos - k0 + 1 < nk ? qpos - k0 + 1 : nk);
      for (int j = 0; j < jn; ++j) {
        const float pj = sp[w * kTileK + j];
        const float* vr = sv + j * pitch;
#pragma unroll
        for (int i = 0; i < LD; ++i) {
          const int e = lane + 32 * i;
          if (e < hd) acc[qq][i] = fmaf(pj, vr[e], acc[qq][i]);
        }
      }
      __syncwarp();  // sp is rewritten by the next query
    }
  }
#pragma unroll
  for (int qq = 0; qq < kTileQW; ++qq) {
    const int qi = w * kTileQW + qq;
    if (qi >= nq) break;
    uint16_t* orow = out + (t0 + qi) * ldo;
    const float inv = 1.f / l[qq];
#pragma unroll
    for (int i = 0; i < LD; ++i) {
      const int e = lane + 32 * i;
      if (e < hd) orow[static_cast<int64_t>(h) * hd + e] = static_cast<uint16_t>(f32_to_bf16_bits(acc[qq][i] * inv));
    }
    if (h == 0)
      for (int64_t c = static_cast<int64_t>(n_heads) * hd + lane; c < ldo; c += 32) orow[c] = 0;
  }
}

template <int LD>
void launch_attention_tiled(const float* q, int64_t ldq, int64_t T, int n_heads, int group, int hd, const float* ck,
                            const float* cv, int64_t cap, int64_t pos0, float scale, uint16_t* out, int64_t ldo) {
  const size_t smem = attention_tiled_smem(hd);
  if (smem > 48 * 1024)
    SLLM_CUDA(cudaFuncSetAttribute(attention_tiled_kernel<LD>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   static_cast<int>(smem)));
  const unsigned grid = grid1(ceil_div(T, kTileQ) * n_heads, 1);
  attention_tiled_kernel<LD><<<grid, kTileWarps * 32, smem>>>(q, ldq, T, n_heads, group, hd, ck, cv, cap, pos0,
                                                               scale, out, ldo);
}

// ---- element-wise -----------------------------------------------------------------------------

__global__ void add_rows_f32_kernel(float* __restrict__ x, int64_t ldx, const float* __restrict__ y, int64_t ldy,
                                    int64_t T, int64_t n) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= T * n) return;
  const int64_t t = k / n, c = k % n;
  x[t * ldx + c] += y[t * ldy + c];
}

// The activation functions of the TwELL gate epilogue (twell.h gate_fn_value), f32.
__device__ __forceinline__ float act_fn(float v, int act) {
  switch (act) {
    case static_cast<int>(ActKind::Relu): return v > 0.f ? v : 0.f;
    case static_cast<int>(ActKind::Silu): return v / (1.f + expf(-v));
    case static_cast<int>(ActKind::GeluErf): return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
    case static_cast<int>(ActKind::GeluTanh): {
      const float k = 0.79788456080286536f;
      return 0.5f * v * (1.f + tanhf(k * (v + 0.044715f * v * v * v)));
    }
    default: return v;
  }
}

// Adds one row's count of non-zeros to counters {nnz, max_row_nnz}.
__device__ void count_row(int n, unsigned long long* counters) {
  __shared__ int total;
  if (threadIdx.x == 0) total = 0;
  __syncthreads();
  if (n) atomicAdd(&total, n);
  __syncthreads();
  if (threadIdx.x == 0) {
    atomicAdd(&counters[0], static_cast<unsigned long long>(total));
    atomicMax(&counters[1], static_cast<unsigned long long>(total));
  }
}

// One block per row: a = act(g); zeroed where |a| <= threshold (threshold >= 0); h = a (⊙ u when
// gated) as bf16 (columns F .. ldh − 1 zeroed); the row's non-zero activations counted.
__global__ void ffn_activate_kernel(const float* __restrict__ g, const float* __restrict__ u, int64_t ldg, int64_t F,
                                    int act, float threshold, uint16_t* __restrict__ h, int64_t ldh,
                                    unsigned long long* counters) {
  const int64_t t = blockIdx.x;
  const float* gr = g + t * ldg;
  const float* ur = u ? u + t * ldg : nullptr;
  uint16_t* hr = h + t * ldh;
  int n = 0;
  for (int64_t j = threadIdx.x; j < F; j += blockDim.x) {
    float a = act_fn(gr[j], act);
    if (threshold >= 0.f && fabsf(a) <= threshold) a = 0.f;
    n += a != 0.f;
    if (ur) a *= ur[j];
    hr[j] = static_cast<uint16_t>(f32_to_bf16_bits(a));
  }
  for (int64_t j = F + threadIdx.x; j < ldh; j += blockDim.x) hr[j] = 0;
  count_row(n, counters);
}

__global__ void count_positive_rows_kernel(const float* __restrict__ g, int64_t ldg, int64_t F,
                                           unsigned long long* counters) {
  const float* gr = g + static_cast<int64_t>(blockIdx.x) * ldg;
  int n = 0;
  for (int64_t j = threadIdx.x; j < F; j += blockDim.x) n += gr[j] > 0.f;
  count_row(n, counters);
}

}  // namespace

void embed_rows_bf16(const uint16_t* table, int64_t ldt, const int32_t* rows, int64_t T, int64_t d, float* out,
                     int64_t ldo) {
  if (T <= 0) return;
  embed_rows_kernel<<<rows_grid(T), kRowThreads>>>(table, ldt, rows, d, out, ldo);
  SLLM_LAUNCHED("embed_rows");
}

void add_rows_bf16(const uint16_t* table, int64_t ldt, int64_t row0, int64_t T, int64_t d, float* out, int64_t ldo) {
  if (T <= 0) return;
  add_rows_kernel<<<rows_grid(T), kRowThreads>>>(table, ldt, row0, d, out, ldo);
  SLLM_LAUNCHED("add_rows");
}

void norm_rows(const float* x, int64_t ldx, int64_t T, int64_t d, const float* w, const float* b, float eps,
               bool rms, uint16_t* out, int64_t ldo) {
  if (T <= 0) return;
  if (ldo < d) throw std::invalid_argument("norm_rows: ldo < d");
  norm_rows_kernel<<<rows_grid(T), kRowThreads>>>(x, ldx, d, w, rms ? nullptr : b, eps, rms ? 1 : 0, out, ldo);
  SLLM_LAUNCHED("norm_rows");
}

void rope_table_device(int64_t T, int64_t half, int64_t pos0, const double* inv_freq, float* cs) {
  if (T <= 0 || half <= 0) return;
  rope_table_kernel<<<grid1(T * half, 256), 256>>>(T, half, pos0, inv_freq, cs);
  SLLM_LAUNCHED("rope_table");
}

void rope_apply_device(float* x, int64_t ldx, int64_t T, int64_t n_heads, int64_t head_dim, const float* cs) {
  if (T <= 0 || head_dim < 2) return;
  rope_apply_kernel<<<grid1(T * n_heads * (head_dim / 2), 256), 256>>>(x, ldx, T, n_heads, head_dim, cs);
  SLLM_LAUNCHED("rope_apply");
}

void kv_store_device(float* cache_k, float* cache_v, int64_t n_kv_heads, int64_t capacity, int64_t head_dim,
                     const float* k, int64_t ldk, const float* v, int64_t ldv, int64_t T, int64_t pos0) {
  if (T <= 0) return;
  if (pos0 < 0 || pos0 + T > capacity) throw std::invalid_argument("kv_store: positions exceed the cache");
  kv_store_kernel<<<grid1(T * n_kv_heads * head_dim, 256), 256>>>(cache_k, cache_v, n_kv_heads, capacity, head_dim,
                                                                  k, ldk, v, ldv, T, pos0);
  SLLM_LAUNCHED("kv_store");
}

void attention_device(const float* q, int64_t ldq, int64_t T, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
                      const float* cache_k, const float* cache_v, int64_t capacity, int64_t pos0, uint16_t* out,
                      int64_t ldo) {
  if (T <= 0) return;
  if (head_dim < 1 || head_dim > kMaxHeadDim)
    throw std::invalid_argument("attention: head_dim " + std::to_string(head_dim) + " is not in [1, " +
                                std::to_string(kMaxHeadDim) + "] on CUDA");
  if (n_kv_heads < 1 || n_heads % n_kv_heads != 0)
    throw std::invalid_argument("attention: n_heads must be a multiple of n_kv_heads");
  if (pos0 < 0 || pos0 + T > capacity) throw std::invalid_argument("attention: positions exceed the cache");
  if (ldo < n_heads * head_dim) throw std::invalid_argument("attention: ldo < n_heads * head_dim");
  const unsigned grid = grid1(T * n_heads, 1);
  const int group = static_cast<int>(n_heads / n_kv_heads);
  const float scale = 1.f / std::sqrt(static_cast<float>(head_dim));
  // Prefill: the tensor-core or the tiled kernel where chosen (kernel_policy.h: forced, or Auto
  // once unverified kernels are allowed and T reaches kAttentionTiledMinTokens).
  const AttentionKernel choice = attention_kernel_choice();
  const bool prefill = choice == AttentionKernel::Auto && unverified_kernels() && T >= kAttentionTiledMinTokens;
  if (choice == AttentionKernel::Mma || (prefill && attention_mma_supported(head_dim))) {
    attention_mma(q, ldq, T, static_cast<int>(n_heads), group, static_cast<int>(head_dim), cache_k, cache_v, capacity,
                  pos0, scale, out, ldo);
    return;
  }
  if (choice == AttentionKernel::Tiled || prefill) {
    const int hd = static_cast<int>(head_dim), nh = static_cast<int>(n_heads);
    if (hd <= 32)
      launch_attention_tiled<1>(q, ldq, T, nh, group, hd, cache_k, cache_v, capacity, pos0, scale, out, ldo);
    else if (hd <= 64)
      launch_attention_tiled<2>(q, ldq, T, nh, group, hd, cache_k, cache_v, capacity, pos0, scale, out, ldo);
    else if (hd <= 128)
      launch_attention_tiled<4>(q, ldq, T, nh, group, hd, cache_k, cache_v, capacity, pos0, scale, out, ldo);
    else
      launch_attention_tiled<8>(q, ldq, T, nh, group, hd, cache_k, cache_v, capacity, pos0, scale, out, ldo);
    SLLM_LAUNCHED("attention (tiled)");
    return;
  }
  // Few queries (decode): more warps per (query, head) to spread a long context.
  if (T <= 4) {
    attention_kernel<8><<<grid, 8 * 32>>>(q, ldq, static_cast<int>(n_heads), group, static_cast<int>(head_dim),
                                          cache_k, cache_v, capacity, pos0, scale, out, ldo);
  } else {
    attention_kernel<4><<<grid, 4 * 32>>>(q, ldq, static_cast<int>(n_heads), group, static_cast<int>(head_dim),
                                          cache_k, cache_v, capacity, pos0, scale, out, ldo);
  }
  SLLM_LAUNCHED("attention");
}

void add_rows_f32(float* x, int64_t ldx, const float* y, int64_t ldy, int64_t T, int64_t n) {
  if (T <= 0 || n <= 0) return;
  add_rows_f32_kernel<<<grid1(T * n, 256), 256>>>(x, ldx, y, ldy, T, n);
  SLLM_LAUNCHED("add_rows_f32");
}

void ffn_activate_device(const float* g, const float* u, int64_t ldg, int64_t T, int64_t F, ActKind act,
                         float threshold, uint16_t* h, int64_t ldh, unsigned long long* counters) {
  if (T <= 0) return;
  if (ldh < F) throw std::invalid_argument("ffn_activate: ldh < F");
  ffn_activate_kernel<<<rows_grid(T), kRowThreads>>>(g, u, ldg, F, static_cast<int>(act), threshold, h, ldh,
                                                     counters);
  SLLM_LAUNCHED("ffn_activate");
}

void count_positive_rows_f32(const float* g, int64_t ldg, int64_t T, int64_t F, unsigned long long* counters) {
  if (T <= 0) return;
  count_positive_rows_kernel<<<rows_grid(T), kRowThreads>>>(g, ldg, F, counters);
  SLLM_LAUNCHED("count_positive_rows");
}

}  // namespace sparsellm::cuda
