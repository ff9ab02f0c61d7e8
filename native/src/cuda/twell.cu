// TwELL consumers on the GPU: statistics/overflow list (finalize), the fused up+down kernel
// (a warp per token row, the hidden vector kept in registers), the decode kernel for a few
// tokens, and the row gather/scatter of the dense fallback.
#include <cuda_runtime.h>

#include <algorithm>
#include <map>
#include <utility>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "sparsellm/cuda_ops.h"
#include "twell_loads.cuh"
#include "kernel_policy.h"
#include "twell_updown.h"

namespace sparsellm::cuda {
namespace {

constexpr unsigned kFull = 0xffffffffu;

bool aligned(const void* p, size_t a) { return (reinterpret_cast<uintptr_t>(p) % a) == 0; }

// --- finalize ----------------------------------------------------------------------------------

// One thread per row: sums its tile counts; warp-aggregated atomics for the totals; overflowing
// rows appended to the list (one atomic per warp).
__global__ void twell_finalize_kernel(const int32_t* __restrict__ count, int64_t rows, int64_t tiles, int cap,
                                      TwellDeviceStats* st, int32_t* overflow_rows) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  unsigned rowsum = 0, oft = 0;
  if (r < rows) {
    const int32_t* c = count + r * tiles;
    for (int64_t t = 0; t < tiles; ++t) {
      const int v = c[t];
      rowsum += static_cast<unsigned>(v);
      oft += v > cap ? 1u : 0u;
    }
  }
  const unsigned wsum = __reduce_add_sync(kFull, rowsum);
  const unsigned wmax = __reduce_max_sync(kFull, rowsum);
  const unsigned woft = __reduce_add_sync(kFull, oft);
  const unsigned ball = __ballot_sync(kFull, oft > 0);
  unsigned long long base = 0;
  if (lane == 0) {
    if (wsum) atomicAdd(&st->nnz, static_cast<unsigned long long>(wsum));
    if (wmax) atomicMax(&st->max_row_nnz, static_cast<unsigned long long>(wmax));
    if (woft) atomicAdd(&st->overflow_tiles, static_cast<unsigned long long>(woft));
    if (ball) base = atomicAdd(&st->overflow_rows, static_cast<unsigned long long>(__popc(ball)));
  }
  base = __shfl_sync(kFull, base, 0);
  if (oft > 0) overflow_rows[base + __popc(ball & ((1u << lane) - 1u))] = static_cast<int32_t>(r);
}

// --- fused up+down: fast kernel (d % 8 == 0, d ≤ 32·8·VPL) ------------------------------------

// Lane l owns the 8-element chunks (i·32 + l)·8 of the row, i < VPL: x and the output
// accumulators stay in registers for the whole row; each active neuron costs two coalesced
// 16-byte-per-lane row reads (up and down), a warp reduction (gated) and 8·VPL FMAs per lane.
template <int VPL, bool GATED>
__global__ void __launch_bounds__(128) twell_updown_kernel(
    const uint16_t* __restrict__ x, int64_t ldx, int64_t M, const int32_t* __restrict__ count,
    const uint32_t* __restrict__ entries, int64_t tiles, int T, int cap, const uint16_t* __restrict__ up,
    const uint16_t* __restrict__ down_t, int64_t ldw, int d, const float* __restrict__ bias, float* __restrict__ y,
    int64_t ldy) {
  const int lane = threadIdx.x & 31;
  const int64_t m = static_cast<int64_t>(blockIdx.x) * 4 + (threadIdx.x >> 5);
  if (m >= M) return;  // whole warp; no block barrier in this kernel
  // Up to d = 2048 x stays in registers; wider rows re-read it (L1-resident) to stay unspilled.
  constexpr bool X_REGS = VPL <= 8;
  constexpr int XV = X_REGS ? VPL : 1;
  uint4 xv[XV];
  float acc[VPL * 8];
  const uint16_t* xr = x + m * ldx;
#pragma unroll
  for (int i = 0; i < VPL; ++i) {
    const int k = (i * 32 + lane) * 8;
    if (X_REGS) xv[i < XV ? i : 0] = (GATED && k < d) ? *reinterpret_cast<const uint4*>(xr + k) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[i * 8 + e] = 0.f;
  }
  const int32_t* crow = count + m * tiles;
  const uint32_t* erow = entries + m * tiles * cap;
  for (int64_t t0 = 0; t0 < tiles; t0 += 32) {
    // The counts of 32 tiles in one load; the non-empty tiles that fit their capacity as a mask
    // (an overflowing tile is skipped: the caller recomputes its row densely).
    const int cl = t0 + lane < tiles ? crow[t0 + lane] : 0;
    unsigned live = __ballot_sync(kFull, cl > 0 && cl <= cap);
    // Software pipeline: the first 32 entries of the next live tile are loaded while the current
    // tile's neurons are processed.
    uint32_t wnext = 0u;
    if (live) {
      const int tn = __ffs(live) - 1;
      const int cn = __shfl_sync(kFull, cl, tn);
      if (lane < min(32, cn)) wnext = erow[(t0 + tn) * cap + lane];
    }
    while (live) {
      const int tl = __ffs(live) - 1;
      live &= live - 1u;
      const int64_t t = t0 + tl;
      const int c = __shfl_sync(kFull, cl, tl);
      const uint32_t wcur = wnext;
      if (live) {
        const int tn = __ffs(live) - 1;
        const int cn = __shfl_sync(kFull, cl, tn);
        wnext = lane < min(32, cn) ? erow[(t0 + tn) * cap + lane] : 0u;
      }
      for (int e0 = 0; e0 < c; e0 += 32) {
        const int ne = min(32, c - e0);
        const uint32_t w = e0 == 0 ? wcur : (lane < ne ? erow[t * cap + e0 + lane] : 0u);
        for (int e = 0; e < ne; ++e) {
          const uint32_t we = __shfl_sync(kFull, w, e);
          const int64_t j = t * T + (we & 0xffffu);
          float h = __uint_as_float(we & 0xffff0000u);
          const uint16_t* dr = down_t + j * ldw;
          uint4 dv[VPL];
#pragma unroll
          for (int i = 0; i < VPL; ++i) {
            const int k = (i * 32 + lane) * 8;
            dv[i] = k < d ? __ldg(reinterpret_cast<const uint4*>(dr + k)) : make_uint4(0, 0, 0, 0);
          }
          if (GATED) {
            const uint16_t* ur = up + j * ldw;
            float s = 0.f;
#pragma unroll
            for (int i = 0; i < VPL; ++i) {
              const int k = (i * 32 + lane) * 8;
              if (k < d)
                s = dot8(__ldg(reinterpret_cast<const uint4*>(ur + k)),
                         X_REGS ? xv[i < XV ? i : 0] : *reinterpret_cast<const uint4*>(xr + k), s);
            }
            h *= warp_sum(s);
          }
#pragma unroll
          for (int i = 0; i < VPL; ++i) {
            acc[i * 8 + 0] = fmaf(h, bf16lo(dv[i].x), acc[i * 8 + 0]);
            acc[i * 8 + 1] = fmaf(h, bf16hi(dv[i].x), acc[i * 8 + 1]);
            acc[i * 8 + 2] = fmaf(h, bf16lo(dv[i].y), acc[i * 8 + 2]);
            acc[i * 8 + 3] = fmaf(h, bf16hi(dv[i].y), acc[i * 8 + 3]);
            acc[i * 8 + 4] = fmaf(h, bf16lo(dv[i].z), acc[i * 8 + 4]);
            acc[i * 8 + 5] = fmaf(h, bf16hi(dv[i].z), acc[i * 8 + 5]);
            acc[i * 8 + 6] = fmaf(h, bf16lo(dv[i].w), acc[i * 8 + 6]);
            acc[i * 8 + 7] = fmaf(h, bf16hi(dv[i].w), acc[i * 8 + 7]);
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
      dst[0] = make_float4(o[0], o[1], o[2], o[3]);
      dst[1] = make_float4(o[4], o[5], o[6], o[7]);
    }
  }
}

// --- fused up+down: any-shape kernel ------------------------------------------------------------

// A warp per row, scalar loads, the row of y itself as the accumulator (only this warp touches
// it, each lane its own elements).
template <bool GATED>
__global__ void __launch_bounds__(128) twell_updown_generic_kernel(
    const uint16_t* __restrict__ x, int64_t ldx, int64_t M, const int32_t* __restrict__ count,
    const uint32_t* __restrict__ entries, int64_t tiles, int T, int cap, const uint16_t* __restrict__ up,
    const uint16_t* __restrict__ down_t, int64_t ldw, int d, const float* __restrict__ bias, float* __restrict__ y,
    int64_t ldy) {
  const int lane = threadIdx.x & 31;
  const int64_t m = static_cast<int64_t>(blockIdx.x) * 4 + (threadIdx.x >> 5);
  if (m >= M) return;
  float* yr = y + m * ldy;
  const uint16_t* xr = x + m * ldx;
  for (int k = lane; k < d; k += 32) yr[k] = bias ? bias[k] : 0.f;
  const int32_t* crow = count + m * tiles;
  const uint32_t* erow = entries + m * tiles * cap;
  for (int64_t t = 0; t < tiles; ++t) {
    const int c = crow[t];
    if (c > cap) continue;
    for (int e0 = 0; e0 < c; e0 += 32) {
      const int ne = min(32, c - e0);
      const uint32_t w = lane < ne ? erow[t * cap + e0 + lane] : 0u;
      for (int e = 0; e < ne; ++e) {
        const uint32_t we = __shfl_sync(kFull, w, e);
        const int64_t j = t * T + (we & 0xffffu);
        float h = __uint_as_float(we & 0xffff0000u);
        if (GATED) {
          const uint16_t* ur = up + j * ldw;
          float s = 0.f;
          for (int k = lane; k < d; k += 32) s = fmaf(bf16_bits_to_f32(ur[k]), bf16_bits_to_f32(xr[k]), s);
          h *= warp_sum(s);
        }
        const uint16_t* dr = down_t + j * ldw;
        for (int k = lane; k < d; k += 32) yr[k] = fmaf(h, bf16_bits_to_f32(dr[k]), yr[k]);
      }
    }
  }
}

// The auto choice among the kernels that serve a shape (d ≤ 2048, aligned): at the first call
// with at least kTuneMinRows rows for a (d, gated) pair, each candidate (row, group2, group1s)
// runs twice and the fastest (device events, the second run of each) is kept for that pair.
// Every candidate sums the same terms in the same order (entries in row order, the same chunk
// layout and butterfly reduction), so the choice never changes results, only speed. Smaller
// calls use kUpdownDefault until a large one has tuned the shape.
constexpr int64_t kTuneMinRows = 8192;
std::map<std::pair<int64_t, int>, int>& tuned_updown() {
  static std::map<std::pair<int64_t, int>, int> m;
  return m;
}

template <bool GATED>
void launch_updown(const uint16_t* x, int64_t ldx, const DeviceTwell& g, const uint16_t* up, const uint16_t* down_t,
                   int64_t ldw, int64_t d, const float* bias, float* y, int64_t ldy, bool generic);

template <bool GATED>
void launch_updown_choice(const uint16_t* x, int64_t ldx, const DeviceTwell& g, const uint16_t* up,
                          const uint16_t* down_t, int64_t ldw, int64_t d, const float* bias, float* y, int64_t ldy,
                          bool generic) {
  const bool fast_ok = !generic && d % 8 == 0 && d <= 2048 && ldx % 8 == 0 && ldw % 8 == 0 && ldy % 4 == 0 &&
                       aligned(x, 16) && aligned(down_t, 16) && (!GATED || aligned(up, 16)) && aligned(y, 16);
  int variant = updown_variant();
  // Auto keeps the verified row kernel until unverified kernels are allowed (kernel_policy.h).
  if (variant == kUpdownAuto && !unverified_kernels()) variant = kUpdownRow;
  if (fast_ok && variant == kUpdownAuto) {
    const auto key = std::make_pair(d, GATED ? 1 : 0);
    auto it = tuned_updown().find(key);
    if (it != tuned_updown().end()) {
      variant = it->second;
    } else if (g.rows >= kTuneMinRows) {
      double best = 0;
      int pick = kUpdownDefault;
      for (int v : {kUpdownRow, kUpdownGroup2, kUpdownGroup1s}) {
        double ms = 0;
        for (int rep = 0; rep < 2; ++rep) {
          EventTimer t;
          t.start();
          if (v == kUpdownRow) launch_updown<GATED>(x, ldx, g, up, down_t, ldw, d, bias, y, ldy, generic);
          else twell_updown_grouped(v, x, ldx, g, up, down_t, ldw, d, bias, y, ldy);
          ms = t.stop_ms();
        }
        if (v == kUpdownRow || ms < best) {
          best = ms;
          pick = v;
        }
      }
      tuned_updown()[key] = pick;
      return;  // y holds the last candidate's (identical) result
    } else {
      variant = kUpdownDefault;
    }
  }
  if (fast_ok && variant != kUpdownRow) {
    twell_updown_grouped(variant, x, ldx, g, up, down_t, ldw, d, bias, y, ldy);
    return;
  }
  launch_updown<GATED>(x, ldx, g, up, down_t, ldw, d, bias, y, ldy, generic);
}

// The row kernel (any d ≤ 4096 with the alignment) or the any-shape kernel.
template <bool GATED>
void launch_updown(const uint16_t* x, int64_t ldx, const DeviceTwell& g, const uint16_t* up, const uint16_t* down_t,
                   int64_t ldw, int64_t d, const float* bias, float* y, int64_t ldy, bool generic) {
  const unsigned grid = static_cast<unsigned>(ceil_div(g.rows, 4));
  const int di = static_cast<int>(d);
  const bool fast_ok = !generic && d % 8 == 0 && d <= 4096 && ldx % 8 == 0 && ldw % 8 == 0 && ldy % 4 == 0 &&
                       aligned(x, 16) && aligned(down_t, 16) && (!GATED || aligned(up, 16)) && aligned(y, 16);
#define SLLM_UPDOWN(V) \
  twell_updown_kernel<V, GATED><<<grid, 128>>>(x, ldx, g.rows, g.count, g.entries, g.tiles, g.tile, g.cap, up, down_t, ldw, di, bias, y, ldy)
  if (!fast_ok) {
    twell_updown_generic_kernel<GATED><<<grid, 128>>>(x, ldx, g.rows, g.count, g.entries, g.tiles, g.tile, g.cap, up,
                                                      down_t, ldw, di, bias, y, ldy);
  } else if (d <= 256) {
    SLLM_UPDOWN(1);
  } else if (d <= 512) {
    SLLM_UPDOWN(2);
  } else if (d <= 1024) {
    SLLM_UPDOWN(4);
  } else if (d <= 2048) {
    SLLM_UPDOWN(8);
  } else {
    SLLM_UPDOWN(16);
  }
#undef SLLM_UPDOWN
  SLLM_LAUNCHED("twell_updown");
}

// --- decode -------------------------------------------------------------------------------------

__global__ void init_rows_kernel(float* y, int64_t ldy, int64_t M, int64_t d, const float* bias) {
  const int64_t total = M * d;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / d, k = i - r * d;
    y[r * ldy + k] = bias ? bias[k] : 0.f;
  }
}

// A warp per 32 consecutive neurons: a ballot over g finds the active ones; each active neuron's
// up row is dotted with x (gated) and h · down_t[j] is added to y with atomics (y pre-initialised).
template <bool GATED>
__global__ void __launch_bounds__(256) decode_sparse_kernel(const uint16_t* __restrict__ x, int64_t ldx, int M,
                                                            const float* __restrict__ g, int64_t ldg, int64_t F,
                                                            const uint16_t* __restrict__ up,
                                                            const uint16_t* __restrict__ down_t, int64_t ldw, int d,
                                                            float* y, int64_t ldy, int vec) {
  const int lane = threadIdx.x & 31;
  const int64_t j0 = (static_cast<int64_t>(blockIdx.x) * 8 + (threadIdx.x >> 5)) * 32;
  if (j0 >= F) return;
  for (int m = 0; m < M; ++m) {
    const float gv = j0 + lane < F ? g[m * ldg + j0 + lane] : 0.f;
    unsigned act = __ballot_sync(kFull, gv > 0.f);
    const uint16_t* xr = x + m * ldx;
    float* yr = y + m * ldy;
    while (act) {
      const int b = __ffs(act) - 1;
      act &= act - 1;
      const int64_t j = j0 + b;
      float h = __shfl_sync(kFull, gv, b);
      const uint16_t* dr = down_t + j * ldw;
      if (GATED) {
        const uint16_t* ur = up + j * ldw;
        float s = 0.f;
        if (vec) {
          for (int k = lane * 8; k < d; k += 256)
            s = dot8(__ldg(reinterpret_cast<const uint4*>(ur + k)), *reinterpret_cast<const uint4*>(xr + k), s);
        } else {
          for (int k = lane; k < d; k += 32) s = fmaf(bf16_bits_to_f32(ur[k]), bf16_bits_to_f32(xr[k]), s);
        }
        h *= warp_sum(s);
      }
      if (vec) {
        for (int k = lane * 8; k < d; k += 256) {
          const uint4 dv = __ldg(reinterpret_cast<const uint4*>(dr + k));
          atomicAdd(yr + k + 0, h * bf16lo(dv.x));
          atomicAdd(yr + k + 1, h * bf16hi(dv.x));
          atomicAdd(yr + k + 2, h * bf16lo(dv.y));
          atomicAdd(yr + k + 3, h * bf16hi(dv.y));
          atomicAdd(yr + k + 4, h * bf16lo(dv.z));
          atomicAdd(yr + k + 5, h * bf16hi(dv.z));
          atomicAdd(yr + k + 6, h * bf16lo(dv.w));
          atomicAdd(yr + k + 7, h * bf16hi(dv.w));
        }
      } else {
        for (int k = lane; k < d; k += 32) atomicAdd(yr + k, h * bf16_bits_to_f32(dr[k]));
      }
    }
  }
}

// Decode, vectorised (d % 8 == 0, aligned): two kernels with no atomics on the hidden values and
// few on y.
// 1. decode_hidden_kernel: a warp per (token, 32 consecutive neurons): a ballot over g finds the
//    active neurons; two at a time have their up rows loaded together (2048 columns per pass) and dotted
//    with x, and h = g·u is written to hbuf[m, j] (only at active positions). The warps of
//    neurons 0..31 also initialise y[m] with the bias (the next kernel adds to it).
// 2. decode_down_kernel: a warp per (token, 256 output columns, 256 neurons): the active
//    neurons of the chunk (ballots over g), eight at a time, add h·down_t[j][cols] into registers;
//    one atomic add per output element and chunk (ceil(F/256) adds per element in all).
template <bool GATED>
__global__ void __launch_bounds__(256, 2) decode_hidden_kernel(const uint16_t* __restrict__ x, int64_t ldx, int M,
                                                            const float* __restrict__ g, int64_t ldg, int64_t F,
                                                            const uint16_t* __restrict__ up, int64_t ldw, int d,
                                                            const float* __restrict__ bias, float* __restrict__ hbuf,
                                                            float* __restrict__ y, int64_t ldy) {
  const int lane = threadIdx.x & 31;
  const int64_t wid = static_cast<int64_t>(blockIdx.x) * 8 + (threadIdx.x >> 5);
  const int64_t groups = (F + 31) / 32;
  if (wid >= groups * M) return;
  const int m = static_cast<int>(wid / groups);
  const int64_t j0 = (wid - static_cast<int64_t>(m) * groups) * 32;
  if (j0 == 0)
    for (int k = lane; k < d; k += 32) y[m * ldy + k] = bias ? bias[k] : 0.f;
  if (!GATED) return;
  const float gv = j0 + lane < F ? g[m * ldg + j0 + lane] : 0.f;
  unsigned act = __ballot_sync(kFull, gv > 0.f);
  const uint16_t* xr = x + m * ldx;
  const uint64_t pol = policy_evict_normal();
  // Two active neurons at a time, 2048 columns per pass: the up-row chunks are loaded without
  // branches (clamped inside the row; x is zero past d) so the loads are issued together.
  while (act) {
    int b[2];
    bool ok[2];
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      ok[q] = act != 0;
      b[q] = ok[q] ? __ffs(act) - 1 : b[0];  // a missing second neuron re-reads the first's row
      if (ok[q]) act &= act - 1;
    }
    float s[2] = {0.f, 0.f};
    for (int kb = 0; kb < d; kb += 2048) {
      uint4 xv[8], uv[2][8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int k = kb + (i * 32 + lane) * 8;
        xv[i] = k < d ? ld_policy(xr + k, pol) : make_uint4(0, 0, 0, 0);
#pragma unroll
        for (int q = 0; q < 2; ++q)
          uv[q][i] = ld_policy(up + (j0 + b[q]) * ldw + min(k, d - 8), pol);  // unguarded: x is 0 past d
      }
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        s[0] = dot8(uv[0][i], xv[i], s[0]);
        s[1] = dot8(uv[1][i], xv[i], s[1]);
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      s[0] += __shfl_xor_sync(kFull, s[0], o);
      s[1] += __shfl_xor_sync(kFull, s[1], o);
    }
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const float gq = __shfl_sync(kFull, gv, b[q]);
      if (ok[q] && lane == 0) hbuf[m * F + j0 + b[q]] = gq * s[q];
    }
  }
}

template <bool GATED>
__global__ void __launch_bounds__(256, 2) decode_down_kernel(int M, const float* __restrict__ g, int64_t ldg, int64_t F,
                                                          const float* __restrict__ hbuf,
                                                          const uint16_t* __restrict__ down_t, int64_t ldw, int d,
                                                          float* __restrict__ y, int64_t ldy) {
  const int lane = threadIdx.x & 31;
  const int64_t wid = static_cast<int64_t>(blockIdx.x) * 8 + (threadIdx.x >> 5);
  const int64_t slices = (d + 255) / 256, chunks = (F + 255) / 256;
  if (wid >= static_cast<int64_t>(M) * slices * chunks) return;
  const int m = static_cast<int>(wid / (slices * chunks));
  const int64_t rem = wid - static_cast<int64_t>(m) * slices * chunks;
  const int64_t sl = rem / chunks, ch = rem - sl * chunks;
  const int col = static_cast<int>(sl * 256) + lane * 8;
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  bool any = false;
  for (int grp = 0; grp < 8; ++grp) {
    const int64_t j0 = ch * 256 + grp * 32;
    if (j0 >= F) break;
    const float gv = j0 + lane < F ? g[m * ldg + j0 + lane] : 0.f;
    unsigned act = __ballot_sync(kFull, gv > 0.f);
    any |= act != 0;
    while (act) {
      int b[8];
      bool ok[8];
      float h[8];
      uint4 dv[8];
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        ok[q] = act != 0;
        b[q] = ok[q] ? __ffs(act) - 1 : 0;
        if (ok[q]) act &= act - 1;
        const float gq = __shfl_sync(kFull, gv, b[q]);
        h[q] = ok[q] ? (GATED ? hbuf[m * F + j0 + b[q]] : gq) : 0.f;
        dv[q] = (ok[q] && col < d) ? __ldg(reinterpret_cast<const uint4*>(down_t + (j0 + b[q]) * ldw + col))
                                   : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        acc[0] = fmaf(h[q], bf16lo(dv[q].x), acc[0]);
        acc[1] = fmaf(h[q], bf16hi(dv[q].x), acc[1]);
        acc[2] = fmaf(h[q], bf16lo(dv[q].y), acc[2]);
        acc[3] = fmaf(h[q], bf16hi(dv[q].y), acc[3]);
        acc[4] = fmaf(h[q], bf16lo(dv[q].z), acc[4]);
        acc[5] = fmaf(h[q], bf16hi(dv[q].z), acc[5]);
        acc[6] = fmaf(h[q], bf16lo(dv[q].w), acc[6]);
        acc[7] = fmaf(h[q], bf16hi(dv[q].w), acc[7]);
      }
    }
  }
  if (!any || col >= d) return;
  float* yr = y + m * ldy + col;
#pragma unroll
  for (int e = 0; e < 8; ++e) atomicAdd(yr + e, acc[e]);
}

// --- gather / scatter / counting ----------------------------------------------------------------

__global__ void gather_rows_kernel(const uint16_t* __restrict__ src, int64_t lds, const int32_t* __restrict__ rows,
                                   int64_t n, int64_t cols, uint16_t* __restrict__ dst, int64_t ldd) {
  for (int64_t i = blockIdx.y; i < n; i += gridDim.y) {
    const uint16_t* s = src + static_cast<int64_t>(rows[i]) * lds;
    for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < cols;
         k += static_cast<int64_t>(gridDim.x) * blockDim.x)
      dst[i * ldd + k] = s[k];
  }
}

__global__ void scatter_rows_kernel(const float* __restrict__ src, int64_t lds, const int32_t* __restrict__ rows,
                                    int64_t n, int64_t cols, float* __restrict__ dst, int64_t ldd) {
  for (int64_t i = blockIdx.y; i < n; i += gridDim.y) {
    float* d = dst + static_cast<int64_t>(rows[i]) * ldd;
    for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < cols;
         k += static_cast<int64_t>(gridDim.x) * blockDim.x)
      d[k] = src[i * lds + k];
  }
}

// A warp per row.
__global__ void count_positive_kernel(const uint16_t* __restrict__ a, int64_t lda, int64_t rows, int64_t cols,
                                      TwellDeviceStats* st) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (r >= rows) return;
  unsigned n = 0;
  for (int64_t k = lane; k < cols; k += 32) n += bf16_bits_to_f32(a[r * lda + k]) > 0.f ? 1u : 0u;
  n = __reduce_add_sync(kFull, n);
  if (lane == 0 && n) {
    atomicAdd(&st->nnz, static_cast<unsigned long long>(n));
    atomicMax(&st->max_row_nnz, static_cast<unsigned long long>(n));
  }
}

dim3 rows_grid(int64_t n, int64_t cols) {
  const int64_t bx = std::min<int64_t>(ceil_div(cols, 256), 64);
  const int64_t by = std::min<int64_t>(n, 65535);
  return dim3(static_cast<unsigned>(std::max<int64_t>(bx, 1)), static_cast<unsigned>(std::max<int64_t>(by, 1)));
}

}  // namespace

int updown_auto_choice(int64_t d, bool gated) {
  auto it = tuned_updown().find(std::make_pair(d, gated ? 1 : 0));
  return it == tuned_updown().end() ? kUpdownAuto : it->second;
}

void twell_finalize(const DeviceTwell& g, TwellDeviceStats* stats, int32_t* overflow_rows) {
  SLLM_CUDA(cudaMemsetAsync(stats, 0, sizeof(TwellDeviceStats), 0));
  if (g.rows == 0) return;
  twell_finalize_kernel<<<static_cast<unsigned>(ceil_div(g.rows, 256)), 256>>>(g.count, g.rows, g.tiles, g.cap, stats,
                                                                                overflow_rows);
  SLLM_LAUNCHED("twell_finalize_kernel");
}

void twell_updown_bf16(const uint16_t* x, int64_t ldx, const DeviceTwell& g, const uint16_t* up, const uint16_t* down_t,
                       int64_t ldw, int64_t d, const float* down_bias, float* y, int64_t ldy, bool generic) {
  if (g.rows == 0 || d == 0) return;
  if (d > (int64_t(1) << 30) || g.tile > 65536 || ldy < d || ldw < d || (up && ldx < d))
    throw std::invalid_argument("twell_updown_bf16: bad dimensions");
  if (g.rows > int64_t(65535) * 65535 * 4) throw std::invalid_argument("twell_updown_bf16: too many rows");
  if (up) launch_updown_choice<true>(x, ldx, g, up, down_t, ldw, d, down_bias, y, ldy, generic);
  else launch_updown_choice<false>(x, ldx, g, up, down_t, ldw, d, down_bias, y, ldy, generic);
}

void decode_sparse_bf16(const uint16_t* x, int64_t ldx, int64_t M, const float* g, int64_t ldg, int64_t F,
                        const uint16_t* up, const uint16_t* down_t, int64_t ldw, int64_t d, const float* down_bias,
                        float* y, int64_t ldy) {
  if (M <= 0 || d <= 0) return;
  if (M > kGemvMaxRows) throw std::invalid_argument("decode_sparse_bf16: at most 8 tokens");
  const int vec = (d % 8 == 0 && ldw % 8 == 0 && ldx % 8 == 0 && aligned(down_t, 16) && (!up || aligned(up, 16)) &&
                   aligned(x, 16))
                      ? 1
                      : 0;
  // The two-kernel decode (hidden, then down) once unverified kernels are allowed
  // (kernel_policy.h); the one-kernel decode otherwise.
  if (vec && F > 0 && d <= (int64_t(1) << 30) && unverified_kernels()) {
    const int Mi = static_cast<int>(M), di = static_cast<int>(d);
    // Work buffer for h (gated): process-wide, grow-only, deliberately never freed (no teardown
    // order issue with the CUDA runtime at exit). All work is on the default stream, in order.
    static DeviceBuffer* hwork = new DeviceBuffer();
    float* hbuf = nullptr;
    if (up) {
      hwork->reserve(static_cast<size_t>(M * F) * 4);
      hbuf = hwork->as<float>();
    }
    const unsigned g1 = static_cast<unsigned>(ceil_div(ceil_div(F, 32) * M, 8));
    if (up)
      decode_hidden_kernel<true><<<g1, 256>>>(x, ldx, Mi, g, ldg, F, up, ldw, di, down_bias, hbuf, y, ldy);
    else
      decode_hidden_kernel<false><<<g1, 256>>>(x, ldx, Mi, g, ldg, F, up, ldw, di, down_bias, hbuf, y, ldy);
    SLLM_LAUNCHED("decode_hidden_kernel");
    const unsigned g2 = static_cast<unsigned>(ceil_div(M * ceil_div(d, 256) * ceil_div(F, 256), 8));
    if (up)
      decode_down_kernel<true><<<g2, 256>>>(Mi, g, ldg, F, hbuf, down_t, ldw, di, y, ldy);
    else
      decode_down_kernel<false><<<g2, 256>>>(Mi, g, ldg, F, hbuf, down_t, ldw, di, y, ldy);
    SLLM_LAUNCHED("decode_down_kernel");
    return;
  }
  init_rows_kernel<<<static_cast<unsigned>(std::min<int64_t>(ceil_div(M * d, 256), 1024)), 256>>>(y, ldy, M, d,
                                                                                                 down_bias);
  SLLM_LAUNCHED("init_rows_kernel");
  if (F <= 0) return;
  const unsigned grid = static_cast<unsigned>(ceil_div(F, 256));
  if (up)
    decode_sparse_kernel<true><<<grid, 256>>>(x, ldx, static_cast<int>(M), g, ldg, F, up, down_t, ldw,
                                              static_cast<int>(d), y, ldy, vec);
  else
    decode_sparse_kernel<false><<<grid, 256>>>(x, ldx, static_cast<int>(M), g, ldg, F, up, down_t, ldw,
                                               static_cast<int>(d), y, ldy, vec);
  SLLM_LAUNCHED("decode_sparse_kernel");
}

void gather_rows_bf16(const uint16_t* src, int64_t lds, const int32_t* rows, int64_t n, int64_t cols, uint16_t* dst,
                      int64_t ldd) {
  if (n <= 0 || cols <= 0) return;
  gather_rows_kernel<<<rows_grid(n, cols), 256>>>(src, lds, rows, n, cols, dst, ldd);
  SLLM_LAUNCHED("gather_rows_kernel");
}

void scatter_rows_f32(const float* src, int64_t lds, const int32_t* rows, int64_t n, int64_t cols, float* dst,
                      int64_t ldd) {
  if (n <= 0 || cols <= 0) return;
  scatter_rows_kernel<<<rows_grid(n, cols), 256>>>(src, lds, rows, n, cols, dst, ldd);
  SLLM_LAUNCHED("scatter_rows_kernel");
}

void count_positive_bf16(const uint16_t* a, int64_t lda, int64_t rows, int64_t cols, TwellDeviceStats* stats) {
  SLLM_CUDA(cudaMemsetAsync(stats, 0, sizeof(TwellDeviceStats), 0));
  if (rows <= 0 || cols <= 0) return;
  count_positive_kernel<<<static_cast<unsigned>(ceil_div(rows, 8)), 256>>>(a, lda, rows, cols, stats);
  SLLM_LAUNCHED("count_positive_kernel");
}

}  // namespace sparsellm::cuda
