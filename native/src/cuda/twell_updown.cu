// The grouped fused up+down kernels (twell_updown.h, variants 2-5) and the TwELL union
// statistics of the benchmark.
//
// A warp per token row, as the first kernel, but organised to keep the memory system busy:
//  - the row's entries are gathered in parallel: the warp loads 32 tile counts at once, an
//    inclusive scan over the lanes gives each tile's first slot in the row's compact list, and
//    each lane finds the tile of its list slot by a 5-step binary search over the lanes
//    (shuffles), then loads that entry: 32 entries per load instruction instead of a serial walk;
//  - NB active neurons are processed per step: the up and down rows of all NB neurons are loaded
//    (16-byte loads, lane l owns the 8-element chunks (i·32 + l)·8) before any is used, so
//    NB·2·d·2 bytes per warp are in flight, and the NB dot products are reduced together
//    (independent shuffle chains);
//  - x stays in registers (or, widened to f32 once, in shared memory: fewer registers and no
//    per-neuron widening), the output row in registers;
//  - x, counts, entries are loaded and y stored with evict-first hints so that the streaming
//    data does not push the weights (which nearly fit in L2) out; optionally (variant 5) the
//    weights themselves are loaded with an evict_last policy.
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "twell_loads.cuh"
#include "twell_updown.h"

namespace sparsellm::cuda {
namespace {

constexpr unsigned kFull = 0xffffffffu;

// dot8 with x already widened to f32 (xa: elements 0-3, xb: 4-7): the same products, in the
// same order, as dot8(x, w, acc).
__device__ __forceinline__ float dot8f(const float4& xa, const float4& xb, const uint4& w, float acc) {
  acc = fmaf(xa.x, bf16lo(w.x), acc);
  acc = fmaf(xa.y, bf16hi(w.x), acc);
  acc = fmaf(xa.z, bf16lo(w.y), acc);
  acc = fmaf(xa.w, bf16hi(w.y), acc);
  acc = fmaf(xb.x, bf16lo(w.z), acc);
  acc = fmaf(xb.y, bf16hi(w.z), acc);
  acc = fmaf(xb.z, bf16lo(w.w), acc);
  acc = fmaf(xb.w, bf16hi(w.w), acc);
  return acc;
}

// VPL: 8-element chunks per lane (d ≤ 256·VPL); NB: neurons per step; XS: x in shared memory
// (gated; otherwise registers); 4·MINB: warps per SM asked of the register allocator.
// A block is one warp and one token row: a heavy row (hundreds of entries, 3% of the rows in the
// benchmark) then holds only its own warp's slot while it finishes, not three idle partners'
// (with 4-warp blocks a block lives as long as its heaviest row).
template <int VPL, int NB, bool XS, bool GATED, int MINB>
__global__ void __launch_bounds__(32, 4 * MINB) updown_grouped_kernel(
    const uint16_t* __restrict__ x, int64_t ldx, int64_t M, const int32_t* __restrict__ count,
    const uint32_t* __restrict__ entries, int64_t tiles, int T, int cap, const uint16_t* __restrict__ up,
    const uint16_t* __restrict__ down_t, int64_t ldw, int d, const float* __restrict__ bias, float* __restrict__ y,
    int64_t ldy, int keep) {
  extern __shared__ float4 xs_all[];  // XS: x as f32, chunk c of the row at [2c, 2c + 1]
  const int lane = threadIdx.x;
  const uint64_t pol_w = keep ? policy_evict_last() : policy_evict_normal();
  const uint64_t pol_s = policy_evict_first();
  constexpr bool XR = GATED && !XS;
  float4* xsm = xs_all;
  for (int64_t m = blockIdx.x; m < M; m += gridDim.x) {  // one row per block in practice
  uint4 xr[XR ? VPL : 1];
  if (GATED) {
    const uint16_t* xrow = x + m * ldx;
#pragma unroll
    for (int i = 0; i < VPL; ++i) {
      const int k = (i * 32 + lane) * 8;
      const uint4 v = k < d ? ld_stream4(xrow + k, pol_s) : make_uint4(0, 0, 0, 0);
      if (XR) {
        xr[i] = v;
      } else {  // widened once here instead of per neuron; each lane reads back only its own chunks
        xsm[2 * (i * 32 + lane)] = make_float4(bf16lo(v.x), bf16hi(v.x), bf16lo(v.y), bf16hi(v.y));
        xsm[2 * (i * 32 + lane) + 1] = make_float4(bf16lo(v.z), bf16hi(v.z), bf16lo(v.w), bf16hi(v.w));
      }
    }
  }
  float acc[VPL * 8];
#pragma unroll
  for (int e = 0; e < VPL * 8; ++e) acc[e] = 0.f;
  const int32_t* crow = count + m * tiles;
  const uint32_t* erow = entries + m * tiles * cap;
  for (int64_t t0 = 0; t0 < tiles; t0 += 32) {
    // The counts of 32 tiles; an overflowing tile contributes nothing (the caller recomputes its
    // row densely).
    const int cl = t0 + lane < tiles ? static_cast<int>(ld_stream1(crow + t0 + lane, pol_s)) : 0;
    const int n = (cl > 0 && cl <= cap) ? cl : 0;
    int incl = n;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int v = __shfl_up_sync(kFull, incl, o);
      if (lane >= o) incl += v;
    }
    const int excl = incl - n;
    const int S = __shfl_sync(kFull, incl, 31);
    for (int k0 = 0; k0 < S; k0 += 32) {
      // Slot k of this window's compact list lives in the first tile whose inclusive sum exceeds k.
      const int k = k0 + lane;
      int pos = 0;
#pragma unroll
      for (int step = 16; step > 0; step >>= 1)
        if (__shfl_sync(kFull, incl, pos + step - 1) <= k) pos += step;
      const int base = __shfl_sync(kFull, excl, pos);
      const int tl = static_cast<int>(t0) + pos;
      const uint32_t w = k < S ? ld_stream1(erow + static_cast<int64_t>(tl) * cap + (k - base), pol_s) : 0u;
      const int nb = min(32, S - k0);
      for (int e0 = 0; e0 < nb; e0 += NB) {
        const uint16_t* dr[NB];
        const uint16_t* ur[NB];
        float h[NB];
        bool ok[NB];
#pragma unroll
        for (int q = 0; q < NB; ++q) {
          ok[q] = e0 + q < nb;  // warp-uniform
          const int src = (e0 + q) & 31;
          const uint32_t wq = __shfl_sync(kFull, w, src);
          const int tq = __shfl_sync(kFull, tl, src);
          const int64_t j = static_cast<int64_t>(tq) * T + (wq & 0xffffu);
          h[q] = ok[q] ? __uint_as_float(wq & 0xffff0000u) : 0.f;
          dr[q] = down_t + j * ldw;
          ur[q] = GATED ? up + j * ldw : nullptr;
        }
        uint4 dv[NB][VPL];
        uint4 uv[GATED ? NB : 1][VPL];
#pragma unroll
        for (int q = 0; q < NB; ++q) {
#pragma unroll
          for (int i = 0; i < VPL; ++i) {
            const int k8 = (i * 32 + lane) * 8;
            const bool in = ok[q] && k8 < d;
            if (GATED) uv[GATED ? q : 0][i] = in ? ld_policy(ur[q] + k8, pol_w) : make_uint4(0, 0, 0, 0);
            dv[q][i] = in ? ld_policy(dr[q] + k8, pol_w) : make_uint4(0, 0, 0, 0);
          }
        }
        if (GATED) {
          float s[NB];
#pragma unroll
          for (int q = 0; q < NB; ++q) {
            s[q] = 0.f;
#pragma unroll
            for (int i = 0; i < VPL; ++i) {
              if (XR) s[q] = dot8(xr[XR ? i : 0], uv[GATED ? q : 0][i], s[q]);
              else s[q] = dot8f(xsm[2 * (i * 32 + lane)], xsm[2 * (i * 32 + lane) + 1], uv[GATED ? q : 0][i], s[q]);
            }
          }
#pragma unroll
          for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
            for (int q = 0; q < NB; ++q) s[q] += __shfl_xor_sync(kFull, s[q], o);
          }
#pragma unroll
          for (int q = 0; q < NB; ++q) h[q] *= s[q];
        }
#pragma unroll
        for (int q = 0; q < NB; ++q) {
          if (!ok[q]) continue;  // warp-uniform
#pragma unroll
          for (int i = 0; i < VPL; ++i) {
            acc[i * 8 + 0] = fmaf(h[q], bf16lo(dv[q][i].x), acc[i * 8 + 0]);
            acc[i * 8 + 1] = fmaf(h[q], bf16hi(dv[q][i].x), acc[i * 8 + 1]);
            acc[i * 8 + 2] = fmaf(h[q], bf16lo(dv[q][i].y), acc[i * 8 + 2]);
            acc[i * 8 + 3] = fmaf(h[q], bf16hi(dv[q][i].y), acc[i * 8 + 3]);
            acc[i * 8 + 4] = fmaf(h[q], bf16lo(dv[q][i].z), acc[i * 8 + 4]);
            acc[i * 8 + 5] = fmaf(h[q], bf16hi(dv[q][i].z), acc[i * 8 + 5]);
            acc[i * 8 + 6] = fmaf(h[q], bf16lo(dv[q][i].w), acc[i * 8 + 6]);
            acc[i * 8 + 7] = fmaf(h[q], bf16hi(dv[q][i].w), acc[i * 8 + 7]);
          }
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    const int k = (i * 32 + lane) * 8;
    if (k < d) {
      float o[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) o[e] = acc[i * 8 + e] + (bias ? bias[k + e] : 0.f);
      float4* dst = reinterpret_cast<float4*>(y + m * ldy + k);
      __stcs(dst, make_float4(o[0], o[1], o[2], o[3]));
      __stcs(dst + 1, make_float4(o[4], o[5], o[6], o[7]));
    }
  }
  __syncwarp();  // the next row overwrites x in shared memory
  }
}

template <int VPL, int NB, bool XS, bool GATED, int MINB>
void launch_grouped(const uint16_t* x, int64_t ldx, const DeviceTwell& g, const uint16_t* up, const uint16_t* down_t,
                    int64_t ldw, int d, const float* bias, float* y, int64_t ldy, int keep) {
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(g.rows, int64_t(1) << 30));
  const size_t smem = (GATED && XS) ? static_cast<size_t>(VPL * 32) * 2 * sizeof(float4) : 0;
  auto k = updown_grouped_kernel<VPL, NB, XS, GATED, MINB>;
  if (smem > 48 * 1024) SLLM_CUDA(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  k<<<grid, 32, smem>>>(x, ldx, g.rows, g.count, g.entries, g.tiles, g.tile, g.cap, up, down_t, ldw, d, bias, y, ldy,
                         keep);
  SLLM_LAUNCHED("twell_updown (grouped)");
}

// Register budget per d (VPL) and variant: the accumulators take 8·VPL registers, x 4·VPL
// (registers) and each neuron in flight 4·VPL (down) + 4·VPL (up, gated) registers. Up to
// d = 1024 x stays in registers; at d = 2048 it goes to shared memory (x in registers plus two
// neurons in flight would spill). d > 2048 is served by the row kernel (twell.cu).
template <bool GATED>
void dispatch_grouped(int variant, const uint16_t* x, int64_t ldx, const DeviceTwell& g, const uint16_t* up,
                      const uint16_t* down_t, int64_t ldw, int d, const float* bias, float* y, int64_t ldy) {
  const int keep = (variant == kUpdownGroup2L || variant == kUpdownGroup1sL) ? 1 : 0;
  const bool one = variant == kUpdownGroup1s || variant == kUpdownGroup1sL;
#define SLLM_G(V, NB, XS, MINB) launch_grouped<V, NB, XS, GATED, MINB>(x, ldx, g, up, down_t, ldw, d, bias, y, ldy, keep)
  if (d <= 256) {
    if (one) SLLM_G(1, 2, true, 4);
    else SLLM_G(1, 8, false, 4);
  } else if (d <= 512) {
    if (one) SLLM_G(2, 2, true, 4);
    else SLLM_G(2, 4, false, 4);
  } else if (d <= 1024) {
    if (one) SLLM_G(4, GATED ? 1 : 2, true, 3);
    else SLLM_G(4, GATED ? 2 : 4, false, 2);
  } else if (d <= 2048) {
    if (one) SLLM_G(8, GATED ? 1 : 2, true, 3);
    else SLLM_G(8, GATED ? 2 : 4, true, 2);
  } else {
    throw std::invalid_argument("twell_updown_grouped: d > 2048 is served by the row kernel");
  }
#undef SLLM_G
}

// --- union statistics ---------------------------------------------------------------------------

// A block per tile of `bt` rows: a shared histogram of the active neurons (F counters), then the
// number of distinct neurons and of entries whose neuron occurs at least twice.
__global__ void union_stats_kernel(const int32_t* __restrict__ count, const uint32_t* __restrict__ entries, int64_t rows,
                                   int64_t tiles, int T, int cap, int64_t F, int bt, unsigned long long* out) {
  extern __shared__ unsigned hist[];
  for (int64_t j = threadIdx.x; j < F; j += blockDim.x) hist[j] = 0;
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * bt;
  const int64_t r1 = rows < r0 + bt ? rows : r0 + bt;
  for (int64_t r = r0 + warp; r < r1; r += nw) {
    for (int64_t t = 0; t < tiles; ++t) {
      const int c = count[r * tiles + t];
      if (c > cap) continue;
      for (int e = lane; e < c; e += 32) {
        const uint32_t w = entries[(r * tiles + t) * cap + e];
        atomicAdd(&hist[t * T + (w & 0xffffu)], 1u);
      }
    }
  }
  __syncthreads();
  unsigned long long u = 0, n = 0, mu = 0;
  for (int64_t j = threadIdx.x; j < F; j += blockDim.x) {
    const unsigned h = hist[j];
    u += h > 0;
    n += h;
    mu += h >= 2 ? h : 0;
  }
  for (int o = 16; o > 0; o >>= 1) {
    u += __shfl_xor_sync(kFull, u, o);
    n += __shfl_xor_sync(kFull, n, o);
    mu += __shfl_xor_sync(kFull, mu, o);
  }
  if (lane == 0) {
    atomicAdd(out + 0, u);
    atomicAdd(out + 1, n);
    atomicAdd(out + 2, mu);
  }
}

int g_variant = kUpdownAuto;

}  // namespace

const char* updown_variant_name(int v) {
  switch (v) {
    case kUpdownAuto: return "auto";
    case kUpdownRow: return "row";
    case kUpdownGroup2: return "group2";
    case kUpdownGroup1s: return "group1s";
    case kUpdownGroup1sL: return "group1sL";
    case kUpdownGroup2L: return "group2L";
    default: return "?";
  }
}

void set_updown_variant(int v) {
  if (v < 0 || v >= kUpdownVariants) throw std::invalid_argument("set_updown_variant: unknown variant");
  g_variant = v;
}
int updown_variant() { return g_variant; }

void twell_updown_grouped(int variant, const uint16_t* x, int64_t ldx, const DeviceTwell& g, const uint16_t* up,
                          const uint16_t* down_t, int64_t ldw, int64_t d, const float* bias, float* y, int64_t ldy) {
  if (variant < kUpdownGroup2 || variant >= kUpdownVariants)
    throw std::invalid_argument("twell_updown_grouped: not a grouped variant");
  if (g.tiles > (int64_t(1) << 30)) throw std::invalid_argument("twell_updown_grouped: too many tiles");
  if (up)
    dispatch_grouped<true>(variant, x, ldx, g, up, down_t, ldw, static_cast<int>(d), bias, y, ldy);
  else
    dispatch_grouped<false>(variant, x, ldx, g, up, down_t, ldw, static_cast<int>(d), bias, y, ldy);
}

TwellUnionStats twell_union_stats(const DeviceTwell& g, int tile_tokens) {
  TwellUnionStats s;
  if (g.rows <= 0 || tile_tokens <= 0) return s;
  const size_t smem = static_cast<size_t>(g.cols) * 4;
  if (smem > 200 * 1024) return s;  // measurement only; very wide layers are not measured
  SLLM_CUDA(cudaFuncSetAttribute(union_stats_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  DeviceBuffer out(3 * sizeof(unsigned long long));
  memset_device(out.data(), 0, out.bytes());
  const int64_t nt = g.rows / tile_tokens;  // whole tiles only
  if (nt == 0) return s;
  union_stats_kernel<<<static_cast<unsigned>(nt), 256, smem>>>(g.count, g.entries, nt * tile_tokens, g.tiles, g.tile,
                                                              g.cap, g.cols, tile_tokens, out.as<unsigned long long>());
  SLLM_LAUNCHED("union_stats_kernel");
  unsigned long long h[3];
  download(h, out.data(), sizeof h);
  s.tiles = nt;
  s.mean_union = static_cast<double>(h[0]) / static_cast<double>(nt);
  s.mean_entries = static_cast<double>(h[1]) / static_cast<double>(nt);
  s.mean_multi = static_cast<double>(h[2]) / static_cast<double>(nt);
  return s;
}

}  // namespace sparsellm::cuda
