// Hybrid training step of a gated FFN on the GPU (CudaFfnTrainer): the TwELL gate GEMM gives the
// pattern; light rows run sparse kernels (a warp per row, any d), heavy rows ("tail") dense GEMMs
// on just those rows; weight gradients of the sparse part are accumulated per neuron after a
// counting sort of the pattern's entries by neuron, the tail's added by GEMMs.
//
// Shapes: M tokens, d = d_model, F = d_ff; dp, Fp: rows padded to multiples of 8. Per-entry
// arrays have the TwELL shape [M, tiles, cap].
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "common.cuh"
#include "sparsellm/cuda_ops.h"

namespace sparsellm::cuda {
namespace {

constexpr unsigned kFull = 0xffffffffu;

int64_t round8(int64_t v) { return (v + 7) / 8 * 8; }

// y[0..8) += a · w[0..8) (w: 8 bf16; y: 16-byte aligned f32).
__device__ __forceinline__ void axpy8(float a, const uint4& w, float* y) {
  float4* p = reinterpret_cast<float4*>(y);
  float4 lo = p[0], hi = p[1];
  lo.x = fmaf(a, bf16lo(w.x), lo.x);
  lo.y = fmaf(a, bf16hi(w.x), lo.y);
  lo.z = fmaf(a, bf16lo(w.y), lo.z);
  lo.w = fmaf(a, bf16hi(w.y), lo.w);
  hi.x = fmaf(a, bf16lo(w.z), hi.x);
  hi.y = fmaf(a, bf16hi(w.z), hi.y);
  hi.z = fmaf(a, bf16lo(w.w), hi.z);
  hi.w = fmaf(a, bf16hi(w.w), hi.w);
  p[0] = lo;
  p[1] = hi;
}

struct HybridDeviceStats {
  unsigned long long nnz, overflow_tiles, overflow_rows, max_row_nnz, tail_rows;
};

// Thread per row: counts, overflow, and the tail decision (an overflowing tile, or more than
// ell_width non-zeros); tail rows appended to `tail` (warp-aggregated), flagged in `is_tail`.
__global__ void classify_kernel(const int32_t* __restrict__ count, int64_t rows, int64_t tiles, int cap, int ell_width,
                                HybridDeviceStats* st, int32_t* tail, uint8_t* is_tail) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  unsigned rowsum = 0, oft = 0;
  if (r < rows) {
    for (int64_t t = 0; t < tiles; ++t) {
      const int c = count[r * tiles + t];
      rowsum += static_cast<unsigned>(c);
      oft += c > cap ? 1u : 0u;
    }
  }
  const bool tl = r < rows && (oft > 0 || rowsum > static_cast<unsigned>(ell_width));
  if (r < rows) is_tail[r] = tl ? 1 : 0;
  const unsigned wsum = __reduce_add_sync(kFull, rowsum), wmax = __reduce_max_sync(kFull, rowsum);
  const unsigned woft = __reduce_add_sync(kFull, oft);
  const unsigned ofrows = __popc(__ballot_sync(kFull, oft > 0));
  const unsigned ball = __ballot_sync(kFull, tl);
  unsigned long long base = 0;
  if (lane == 0) {
    if (wsum) atomicAdd(&st->nnz, static_cast<unsigned long long>(wsum));
    if (wmax) atomicMax(&st->max_row_nnz, static_cast<unsigned long long>(wmax));
    if (woft) atomicAdd(&st->overflow_tiles, static_cast<unsigned long long>(woft));
    if (ofrows) atomicAdd(&st->overflow_rows, static_cast<unsigned long long>(ofrows));
    if (ball) base = atomicAdd(&st->tail_rows, static_cast<unsigned long long>(__popc(ball)));
  }
  base = __shfl_sync(kFull, base, 0);
  if (tl) tail[base + __popc(ball & ((1u << lane) - 1u))] = static_cast<int32_t>(r);
}

// Forward, light rows: y[m] = Σ g·(x·up_j)·down_j; u kept per entry; l1_row[m] = Σ|h|.
__global__ void __launch_bounds__(128) hybrid_fwd_kernel(
    const uint16_t* __restrict__ x, int64_t ldx, int64_t M, const int32_t* __restrict__ count,
    const uint32_t* __restrict__ entries, const uint8_t* __restrict__ is_tail, int64_t tiles, int T, int cap,
    const uint16_t* __restrict__ ud, int64_t dp, int d, float* __restrict__ y, float* __restrict__ u_e,
    float* __restrict__ l1_row, int vec) {
  const int lane = threadIdx.x & 31;
  const int64_t m = static_cast<int64_t>(blockIdx.x) * 4 + (threadIdx.x >> 5);
  if (m >= M || is_tail[m]) return;  // tail rows: dense path
  float* yr = y + m * d;
  const uint16_t* xr = x + m * ldx;
  for (int k = lane; k < d; k += 32) yr[k] = 0.f;
  __syncwarp();  // the vector path updates elements another lane zeroed
  float l1 = 0.f;
  for (int64_t t = 0; t < tiles; ++t) {
    const int c = count[m * tiles + t];  // ≤ cap: rows with an overflowing tile are tail rows
    const int64_t base = (m * tiles + t) * cap;
    for (int e = 0; e < c; ++e) {
      const uint32_t w = entries[base + e];
      const int64_t j = t * T + (w & 0xffffu);
      const float g = __uint_as_float(w & 0xffff0000u);
      const uint16_t* ur = ud + j * 2 * dp;
      const uint16_t* dr = ur + dp;
      float s = 0.f;
      if (vec) {
        for (int k = lane * 8; k < d; k += 256)
          s = dot8(__ldg(reinterpret_cast<const uint4*>(ur + k)), *reinterpret_cast<const uint4*>(xr + k), s);
      } else {
        for (int k = lane; k < d; k += 32) s = fmaf(bf16_bits_to_f32(ur[k]), bf16_bits_to_f32(xr[k]), s);
      }
      const float u = warp_sum(s), h = g * u;
      if (lane == 0) u_e[base + e] = u;
      l1 += fabsf(h);
      if (vec) {
        for (int k = lane * 8; k < d; k += 256) axpy8(h, __ldg(reinterpret_cast<const uint4*>(dr + k)), yr + k);
      } else {
        for (int k = lane; k < d; k += 32) yr[k] = fmaf(h, bf16_bits_to_f32(dr[k]), yr[k]);
      }
    }
  }
  if (lane == 0) l1_row[m] = l1;
}

// Tail rows, elementwise: H = G ⊙ U (bf16, zero in the padding), l1_tail[i] = Σ_j |h|. Warp per row.
__global__ void tail_hidden_kernel(const uint16_t* __restrict__ G, const uint16_t* __restrict__ U, uint16_t* __restrict__ H,
                                   int64_t R, int64_t F, int64_t Fp, float* __restrict__ l1_tail) {
  const int lane = threadIdx.x & 31;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (i >= R) return;
  float l1 = 0.f;
  for (int64_t j = lane; j < Fp; j += 32) {
    float h = 0.f;
    if (j < F) h = bf16_bits_to_f32(G[i * Fp + j]) * bf16_bits_to_f32(U[i * Fp + j]);
    const uint32_t hb = f32_to_bf16_bits(h);
    H[i * Fp + j] = static_cast<uint16_t>(hb);
    l1 += fabsf(h);
  }
  l1 = warp_sum(l1);
  if (lane == 0) l1_tail[i] = l1;
}

// Backward, light rows: dh = dy·down_j + λ'·sign(h); du = dh·g; dg = dh·u;
// dx[m] = Σ du·up_j + dg·gate_j; per-entry du, dg kept for the weight gradients.
__global__ void __launch_bounds__(128) hybrid_bwd_kernel(
    const uint16_t* __restrict__ dy, int64_t lddy, int64_t M, const int32_t* __restrict__ count,
    const uint32_t* __restrict__ entries, const uint8_t* __restrict__ is_tail, int64_t tiles, int T, int cap,
    const uint16_t* __restrict__ gate, const uint16_t* __restrict__ ud, int64_t dp, int d, float l1_scale,
    const float* __restrict__ u_e, float* __restrict__ dx, float* __restrict__ du_e, float* __restrict__ dg_e, int vec) {
  const int lane = threadIdx.x & 31;
  const int64_t m = static_cast<int64_t>(blockIdx.x) * 4 + (threadIdx.x >> 5);
  if (m >= M || is_tail[m]) return;
  float* xr = dx + m * d;
  const uint16_t* dyr = dy + m * lddy;
  for (int k = lane; k < d; k += 32) xr[k] = 0.f;
  __syncwarp();  // the vector path updates elements another lane zeroed
  for (int64_t t = 0; t < tiles; ++t) {
    const int c = count[m * tiles + t];
    const int64_t base = (m * tiles + t) * cap;
    for (int e = 0; e < c; ++e) {
      const uint32_t w = entries[base + e];
      const int64_t j = t * T + (w & 0xffffu);
      const float g = __uint_as_float(w & 0xffff0000u);
      const float u = u_e[base + e];
      const uint16_t* ur = ud + j * 2 * dp;
      const uint16_t* dr = ur + dp;
      const uint16_t* gr = gate + j * dp;
      float s = 0.f;
      if (vec) {
        for (int k = lane * 8; k < d; k += 256)
          s = dot8(__ldg(reinterpret_cast<const uint4*>(dr + k)), *reinterpret_cast<const uint4*>(dyr + k), s);
      } else {
        for (int k = lane; k < d; k += 32) s = fmaf(bf16_bits_to_f32(dr[k]), bf16_bits_to_f32(dyr[k]), s);
      }
      const float h = g * u;
      const float dh = warp_sum(s) + (h > 0.f ? l1_scale : h < 0.f ? -l1_scale : 0.f);
      const float du = dh * g, dg = dh * u;
      if (lane == 0) {
        du_e[base + e] = du;
        dg_e[base + e] = dg;
      }
      if (vec) {
        for (int k = lane * 8; k < d; k += 256) {
          axpy8(du, __ldg(reinterpret_cast<const uint4*>(ur + k)), xr + k);
          axpy8(dg, __ldg(reinterpret_cast<const uint4*>(gr + k)), xr + k);
        }
      } else {
        for (int k = lane; k < d; k += 32)
          xr[k] = fmaf(du, bf16_bits_to_f32(ur[k]), fmaf(dg, bf16_bits_to_f32(gr[k]), xr[k]));
      }
    }
  }
}

// Counting sort of the light rows' entries by neuron: (1) per-neuron counts and each entry's
// rank among its neuron's entries; (2) exclusive scan; (3) scatter.
__global__ void entry_rank_kernel(int64_t M, const int32_t* __restrict__ count, const uint32_t* __restrict__ entries,
                                  const uint8_t* __restrict__ is_tail, int64_t tiles, int T, int cap,
                                  int32_t* __restrict__ hist, int32_t* __restrict__ rank) {
  const int lane = threadIdx.x & 31;
  const int64_t m = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (m >= M || is_tail[m]) return;
  for (int64_t t = 0; t < tiles; ++t) {
    const int c = count[m * tiles + t];
    const int64_t base = (m * tiles + t) * cap;
    for (int e = lane; e < c; e += 32) {
      const int64_t j = t * T + (entries[base + e] & 0xffffu);
      rank[base + e] = atomicAdd(hist + j, 1);
    }
  }
}

// Exclusive scan of n counts into offs[0..n] (one block of 1024 threads; n up to a few 10^5).
__global__ void scan_kernel(const int32_t* __restrict__ in, int64_t n, int32_t* __restrict__ offs) {
  __shared__ int32_t part[1024];
  const int tid = threadIdx.x;
  const int64_t per = (n + 1023) / 1024, lo = tid * per, hi = lo + per < n ? lo + per : n;
  int32_t s = 0;
  for (int64_t i = lo; i < hi; ++i) s += in[i];
  part[tid] = s;
  __syncthreads();
  for (int o = 1; o < 1024; o <<= 1) {
    const int32_t v = tid >= o ? part[tid - o] : 0;
    __syncthreads();
    part[tid] += v;
    __syncthreads();
  }
  int32_t run = part[tid] - s;  // exclusive prefix of this thread's chunk
  for (int64_t i = lo; i < hi; ++i) {
    offs[i] = run;
    run += in[i];
  }
  if (tid == 1023) offs[n] = part[1023];
}

__global__ void entry_scatter_kernel(int64_t M, const int32_t* __restrict__ count, const uint32_t* __restrict__ entries,
                                     const uint8_t* __restrict__ is_tail, int64_t tiles, int T, int cap,
                                     const int32_t* __restrict__ offs, const int32_t* __restrict__ rank,
                                     const float* __restrict__ u_e, const float* __restrict__ du_e,
                                     const float* __restrict__ dg_e, int32_t* __restrict__ list_m,
                                     float4* __restrict__ list_c) {
  const int lane = threadIdx.x & 31;
  const int64_t m = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (m >= M || is_tail[m]) return;
  for (int64_t t = 0; t < tiles; ++t) {
    const int c = count[m * tiles + t];
    const int64_t base = (m * tiles + t) * cap;
    for (int e = lane; e < c; e += 32) {
      const uint32_t w = entries[base + e];
      const int64_t j = t * T + (w & 0xffffu);
      const int64_t at = static_cast<int64_t>(offs[j]) + rank[base + e];
      const float g = __uint_as_float(w & 0xffff0000u);
      list_m[at] = static_cast<int32_t>(m);
      list_c[at] = make_float4(dg_e[base + e], du_e[base + e], g * u_e[base + e], 0.f);
    }
  }
}

// Weight gradients of the light rows, one warp per (neuron j, matrix w): w = 0: dW_gate[j] =
// Σ dg·x[m]; 1: dW_up[j] = Σ du·x[m]; 2: dW_down_t[j] = Σ h·dy[m]. Overwrites the rows. x and dy
// rows must be 16-byte aligned with ldx, lddy multiples of 8 (the trainer's padded buffers).
__global__ void __launch_bounds__(128) wgrad_kernel(int64_t F, int d, const int32_t* __restrict__ offs,
                                                    const int32_t* __restrict__ list_m, const float4* __restrict__ list_c,
                                                    const uint16_t* __restrict__ x, int64_t ldx,
                                                    const uint16_t* __restrict__ dy, int64_t lddy,
                                                    float* __restrict__ dgate, float* __restrict__ dup,
                                                    float* __restrict__ ddown_t) {
  const int lane = threadIdx.x & 31;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * 4 + (threadIdx.x >> 5);
  const int which = blockIdx.y;
  if (j >= F) return;
  const uint16_t* src = which == 2 ? dy : x;
  const int64_t lds = which == 2 ? lddy : ldx;
  float* out = (which == 0 ? dgate : which == 1 ? dup : ddown_t) + j * d;
  const int32_t b = offs[j], e = offs[j + 1];
  for (int k0 = 0; k0 < d; k0 += 256) {
    float acc[8];
#pragma unroll
    for (int c = 0; c < 8; ++c) acc[c] = 0.f;
    const int kb = k0 + lane * 8;
    for (int32_t i = b; i < e; ++i) {
      const float4 cf = list_c[i];
      const float coef = which == 0 ? cf.x : which == 1 ? cf.y : cf.z;
      const uint16_t* row = src + static_cast<int64_t>(list_m[i]) * lds;
      if (kb + 8 <= d) {  // lds % 8 == 0 and 16-byte aligned rows: one vector load
        const uint4 v = *reinterpret_cast<const uint4*>(row + kb);
        acc[0] = fmaf(coef, bf16lo(v.x), acc[0]);
        acc[1] = fmaf(coef, bf16hi(v.x), acc[1]);
        acc[2] = fmaf(coef, bf16lo(v.y), acc[2]);
        acc[3] = fmaf(coef, bf16hi(v.y), acc[3]);
        acc[4] = fmaf(coef, bf16lo(v.z), acc[4]);
        acc[5] = fmaf(coef, bf16hi(v.z), acc[5]);
        acc[6] = fmaf(coef, bf16lo(v.w), acc[6]);
        acc[7] = fmaf(coef, bf16hi(v.w), acc[7]);
      } else {
#pragma unroll
        for (int c = 0; c < 8; ++c)
          if (kb + c < d) acc[c] = fmaf(coef, bf16_bits_to_f32(row[kb + c]), acc[c]);
      }
    }
#pragma unroll
    for (int c = 0; c < 8; ++c)
      if (kb + c < d) out[kb + c] = acc[c];
  }
}

// Tail rows, backward elementwise: dh = dH + λ'·sign(h); dU = dh·g, dG = dh·u (g > 0), packed
// as bf16 [R, 2Fp] (dU in columns [0, Fp), dG in [Fp, 2Fp); padding zero).
__global__ void tail_grad_kernel(const float* __restrict__ dH, const uint16_t* __restrict__ G, const uint16_t* __restrict__ U,
                                 int64_t R, int64_t F, int64_t Fp, float l1_scale, uint16_t* __restrict__ dUG) {
  const int64_t total = R * Fp;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / Fp, j = i - r * Fp;
    float du = 0.f, dg = 0.f;
    if (j < F) {
      const float g = bf16_bits_to_f32(G[i]), u = bf16_bits_to_f32(U[i]), h = g * u;
      const float dh = dH[i] + (h > 0.f ? l1_scale : h < 0.f ? -l1_scale : 0.f);
      du = dh * g;
      dg = g > 0.f ? dh * u : 0.f;
    }
    dUG[r * 2 * Fp + j] = static_cast<uint16_t>(f32_to_bf16_bits(du));
    dUG[r * 2 * Fp + Fp + j] = static_cast<uint16_t>(f32_to_bf16_bits(dg));
  }
}

unsigned grid_for(int64_t n, int per_block) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, per_block), int64_t(1) << 30)));
}

}  // namespace

struct CudaFfnTrainer::Impl {
  CudaFfnLayer* layer = nullptr;
  CudaFfnLayer::Weights w;
  DeviceBuffer wcat;  // [d, 2Fp]: W_upᵀ | W_gateᵀ (zero padding), the tail's dX GEMM operand
  DeviceBuffer xf, xb, dyb, y, dx, count, entries, stats, tail, is_tail, u_e, du_e, dg_e, l1_row, rank, hist, offs, list_m,
      list_c, dgate, dup, ddown_t;
  DeviceBuffer xt, dyt, Gt, Ut, Ht, l1_tail, yt, dHt, dUGt, dxt, tT, xtT, dytT, HtT;
  bool have_grads = false;
  int64_t last_M = 0;
  double dense_rows(const uint16_t* xr, const uint16_t* dyr, int64_t R, float l1_scale, float* y, float* dx, bool accumulate);
};

CudaFfnTrainer::CudaFfnTrainer(CudaFfnLayer& layer) : impl_(std::make_unique<Impl>()) {
  Impl& I = *impl_;
  I.layer = &layer;
  I.w = layer.device_weights();
  if (!I.w.gated) throw std::invalid_argument("CudaFfnTrainer: the training kernels cover gated FFNs only");
  const int64_t d = I.w.d, F = I.w.F, dp = I.w.dp, Fp = I.w.Fp;
  I.wcat.reserve(static_cast<size_t>(d * 2 * Fp) * 2);
  memset_device(I.wcat.data(), 0, static_cast<size_t>(d * 2 * Fp) * 2);
  transpose_bf16_device(I.w.rows, 2 * dp, I.wcat.as<uint16_t>(), 2 * Fp, F, d);      // W_upᵀ
  transpose_bf16_device(I.w.act, dp, I.wcat.as<uint16_t>() + Fp, 2 * Fp, F, d);      // W_gateᵀ
  I.dgate.reserve(static_cast<size_t>(F * d) * 4);
  I.dup.reserve(static_cast<size_t>(F * d) * 4);
  I.ddown_t.reserve(static_cast<size_t>(F * d) * 4);
  I.stats.reserve(sizeof(HybridDeviceStats));
  I.offs.reserve(static_cast<size_t>(F + 1) * 4);
  I.hist.reserve(static_cast<size_t>(F) * 4);
  synchronize();
}

CudaFfnTrainer::~CudaFfnTrainer() = default;

// The dense training step of R rows: x, dy bf16 [R, dp] (ld dp); y, dx f32 [R, d] overwritten;
// the weight gradients overwritten (accumulate = false) or added to (the hybrid tail). Returns
// Σ|h| of the rows. G and U are kept in Gt, Ut (bf16 [R, Fp]).
double CudaFfnTrainer::Impl::dense_rows(const uint16_t* xr, const uint16_t* dyr, int64_t R, float l1_scale, float* y,
                                        float* dx, bool accumulate) {
  const int64_t d = w.d, F = w.F, dp = w.dp, Fp = w.Fp;
  if (R <= 0) return 0.0;
  const int64_t Rp = round8(R);
  Gt.reserve(static_cast<size_t>(R * Fp) * 2);
  Ut.reserve(static_cast<size_t>(R * Fp) * 2);
  Ht.reserve(static_cast<size_t>(R * Fp) * 2);
  l1_tail.reserve(static_cast<size_t>(R) * 4);
  dHt.reserve(static_cast<size_t>(R * Fp) * 4);
  dUGt.reserve(static_cast<size_t>(R * 2 * Fp) * 2);
  auto mm = R <= kGemvMaxRows ? gemv_bf16 : gemm_bf16;
  // Forward: G = relu(x·W_gateᵀ), U = x·W_upᵀ, H = G ⊙ U, y = H·W_downᵀ.
  Epilogue e;
  e.out_bf16 = true;
  e.ldo = Fp;
  e.op = EpiOp::Relu;
  e.out = Gt.data();
  mm(xr, dp, w.act, dp, R, F, d, e);
  e.op = EpiOp::None;
  e.out = Ut.data();
  mm(xr, dp, w.rows, 2 * dp, R, F, d, e);
  tail_hidden_kernel<<<grid_for(R, 8), 256>>>(Gt.as<uint16_t>(), Ut.as<uint16_t>(), Ht.as<uint16_t>(), R, F, Fp,
                                              l1_tail.as<float>());
  SLLM_LAUNCHED("tail_hidden_kernel");
  Epilogue o;
  o.out = y;
  o.ldo = d;
  mm(Ht.as<uint16_t>(), Fp, w.down_std, Fp, R, d, F, o);
  // Backward: dH = dY·W_down (W_downᵀ rows are the down part of updown), elementwise dU, dG,
  // dX = [dU | dG]·[W_upᵀ | W_gateᵀ]ᵀ (one GEMM, K = 2Fp).
  Epilogue h;
  h.out = dHt.data();
  h.ldo = Fp;
  mm(dyr, dp, w.rows + dp, 2 * dp, R, F, d, h);
  tail_grad_kernel<<<grid_for(R * Fp, 256), 256>>>(dHt.as<float>(), Gt.as<uint16_t>(), Ut.as<uint16_t>(), R, F, Fp,
                                                   l1_scale, dUGt.as<uint16_t>());
  SLLM_LAUNCHED("tail_grad_kernel");
  Epilogue x;
  x.out = dx;
  x.ldo = d;
  mm(dUGt.as<uint16_t>(), 2 * Fp, wcat.as<uint16_t>(), 2 * Fp, R, d, 2 * Fp, x);
  // Weight gradients (K = R contiguous: the operands transposed).
  tT.reserve(static_cast<size_t>(2 * Fp * Rp) * 2);
  HtT.reserve(static_cast<size_t>(Fp * Rp) * 2);
  xtT.reserve(static_cast<size_t>(d * Rp) * 2);
  dytT.reserve(static_cast<size_t>(d * Rp) * 2);
  transpose_bf16_device(dUGt.as<uint16_t>(), 2 * Fp, tT.as<uint16_t>(), Rp, R, 2 * Fp);
  transpose_bf16_device(Ht.as<uint16_t>(), Fp, HtT.as<uint16_t>(), Rp, R, Fp);
  transpose_bf16_device(xr, dp, xtT.as<uint16_t>(), Rp, R, d);
  transpose_bf16_device(dyr, dp, dytT.as<uint16_t>(), Rp, R, d);
  Epilogue a;
  a.accumulate = accumulate;
  a.ldo = d;
  a.out = dup.data();
  gemm_bf16(tT.as<uint16_t>(), Rp, xtT.as<uint16_t>(), Rp, F, d, R, a);  // dW_up (+)= dUᵀ·X
  a.out = dgate.data();
  gemm_bf16(tT.as<uint16_t>() + Fp * Rp, Rp, xtT.as<uint16_t>(), Rp, F, d, R, a);  // dW_gate (+)= dGᵀ·X
  a.out = ddown_t.data();
  gemm_bf16(HtT.as<uint16_t>(), Rp, dytT.as<uint16_t>(), Rp, F, d, R, a);  // dW_downᵀ (+)= Hᵀ·dY
  std::vector<float> l1(static_cast<size_t>(R));
  download(l1.data(), l1_tail.data(), l1.size() * 4);
  double s = 0;
  for (float v : l1) s += v;
  return s;
}

TrainStepStats CudaFfnTrainer::step_device(const uint16_t* xb, const uint16_t* dyb, int64_t M, TrainMode mode,
                                           const HybridParams& p) {
  Impl& I = *impl_;
  const int64_t d = I.w.d, F = I.w.F, dp = I.w.dp, Fp = I.w.Fp;
  TrainStepStats out;
  I.last_M = M;
  if (M <= 0) return out;
  I.y.reserve(static_cast<size_t>(M * d) * 4);
  I.dx.reserve(static_cast<size_t>(M * d) * 4);
  const float l1_scale = static_cast<float>(p.l1 / static_cast<double>(M));
  out.sparsity.rows = M;
  if (mode == TrainMode::Dense) {
    const double l1 = I.dense_rows(xb, dyb, M, l1_scale, I.y.as<float>(), I.dx.as<float>(), false);
    count_positive_bf16(I.Gt.as<uint16_t>(), Fp, M, F, I.stats.as<TwellDeviceStats>());
    TwellDeviceStats ts{};
    download(&ts, I.stats.data(), sizeof ts);
    out.sparsity.nnz = static_cast<int64_t>(ts.nnz);
    out.sparsity.max_row_nnz = static_cast<int64_t>(ts.max_row_nnz);
    out.l1 = l1 / static_cast<double>(M);
    out.saved_bytes = M * Fp * 4;  // G and U (bf16)
    I.have_grads = true;
    return out;
  }
  const TwellParams& tp = I.layer->config().twell;
  const int64_t tiles = ceil_div(F, tp.tile);
  const int cap = tp.capacity();
  const size_t ne = static_cast<size_t>(M * tiles * cap);

  // Pattern: the TwELL gate GEMM, then the row classification.
  I.count.reserve(static_cast<size_t>(M * tiles) * 4);
  I.entries.reserve(ne * 4);
  DeviceTwell tw;
  tw.rows = M;
  tw.cols = F;
  tw.tiles = tiles;
  tw.tile = tp.tile;
  tw.cap = cap;
  tw.count = I.count.as<int32_t>();
  tw.entries = I.entries.as<uint32_t>();
  twell_gate_bf16(xb, dp, I.w.act, dp, M, F, d, nullptr, tw);
  I.tail.reserve(static_cast<size_t>(M) * 4);
  I.is_tail.reserve(static_cast<size_t>(M));
  memset_device(I.stats.data(), 0, sizeof(HybridDeviceStats));
  classify_kernel<<<grid_for(M, 256), 256>>>(tw.count, M, tiles, cap, p.ell_width, I.stats.as<HybridDeviceStats>(),
                                             I.tail.as<int32_t>(), I.is_tail.as<uint8_t>());
  SLLM_LAUNCHED("classify_kernel");
  HybridDeviceStats hs{};
  download(&hs, I.stats.data(), sizeof hs);
  const int64_t R = static_cast<int64_t>(hs.tail_rows);

  // Forward, light rows. Vector loads when d % 8 == 0 (rows of x, dy, weights 16-byte aligned,
  // y and dx rows of d floats 16-byte aligned).
  const int vec = d % 8 == 0 ? 1 : 0;
  I.u_e.reserve(ne * 4);
  I.l1_row.reserve(static_cast<size_t>(M) * 4);
  memset_device(I.l1_row.data(), 0, static_cast<size_t>(M) * 4);
  hybrid_fwd_kernel<<<grid_for(M, 4), 128>>>(xb, dp, M, tw.count, tw.entries, I.is_tail.as<uint8_t>(), tiles, tp.tile, cap,
                                             I.w.rows, dp, static_cast<int>(d), I.y.as<float>(), I.u_e.as<float>(),
                                             I.l1_row.as<float>(), vec);
  SLLM_LAUNCHED("hybrid_fwd_kernel");
  // Backward, light rows (dx and the per-entry du, dg).
  I.du_e.reserve(ne * 4);
  I.dg_e.reserve(ne * 4);
  hybrid_bwd_kernel<<<grid_for(M, 4), 128>>>(dyb, dp, M, tw.count, tw.entries, I.is_tail.as<uint8_t>(), tiles, tp.tile, cap,
                                             I.w.act, I.w.rows, dp, static_cast<int>(d), l1_scale, I.u_e.as<float>(),
                                             I.dx.as<float>(), I.du_e.as<float>(), I.dg_e.as<float>(), vec);
  SLLM_LAUNCHED("hybrid_bwd_kernel");
  // Weight gradients, light rows: entries sorted by neuron, then a warp per (neuron, matrix).
  const int64_t nnz_bound = std::max<int64_t>(static_cast<int64_t>(hs.nnz), 1);  // tail rows included: a bound
  I.rank.reserve(ne * 4);
  I.list_m.reserve(static_cast<size_t>(nnz_bound) * 4);
  I.list_c.reserve(static_cast<size_t>(nnz_bound) * 16);
  memset_device(I.hist.data(), 0, static_cast<size_t>(F) * 4);
  entry_rank_kernel<<<grid_for(M, 8), 256>>>(M, tw.count, tw.entries, I.is_tail.as<uint8_t>(), tiles, tp.tile, cap,
                                             I.hist.as<int32_t>(), I.rank.as<int32_t>());
  SLLM_LAUNCHED("entry_rank_kernel");
  scan_kernel<<<1, 1024>>>(I.hist.as<int32_t>(), F, I.offs.as<int32_t>());
  SLLM_LAUNCHED("scan_kernel");
  entry_scatter_kernel<<<grid_for(M, 8), 256>>>(M, tw.count, tw.entries, I.is_tail.as<uint8_t>(), tiles, tp.tile, cap,
                                                I.offs.as<int32_t>(), I.rank.as<int32_t>(), I.u_e.as<float>(),
                                                I.du_e.as<float>(), I.dg_e.as<float>(), I.list_m.as<int32_t>(),
                                                I.list_c.as<float4>());
  SLLM_LAUNCHED("entry_scatter_kernel");
  wgrad_kernel<<<dim3(grid_for(F, 4), 3), 128>>>(F, static_cast<int>(d), I.offs.as<int32_t>(), I.list_m.as<int32_t>(),
                                                 I.list_c.as<float4>(), xb, dp, dyb, dp, I.dgate.as<float>(),
                                                 I.dup.as<float>(), I.ddown_t.as<float>());
  SLLM_LAUNCHED("wgrad_kernel");

  // Tail rows: the dense step on just those rows (gathered), gradients added, outputs scattered.
  double l1_tail = 0;
  if (R > 0) {
    I.xt.reserve(static_cast<size_t>(R * dp) * 2);
    I.dyt.reserve(static_cast<size_t>(R * dp) * 2);
    I.yt.reserve(static_cast<size_t>(R * d) * 4);
    I.dxt.reserve(static_cast<size_t>(R * d) * 4);
    const int32_t* rows = I.tail.as<int32_t>();
    gather_rows_bf16(xb, dp, rows, R, dp, I.xt.as<uint16_t>(), dp);
    gather_rows_bf16(dyb, dp, rows, R, dp, I.dyt.as<uint16_t>(), dp);
    l1_tail = I.dense_rows(I.xt.as<uint16_t>(), I.dyt.as<uint16_t>(), R, l1_scale, I.yt.as<float>(), I.dxt.as<float>(), true);
    scatter_rows_f32(I.yt.as<float>(), d, rows, R, d, I.y.as<float>(), d);
    scatter_rows_f32(I.dxt.as<float>(), d, rows, R, d, I.dx.as<float>(), d);
  }

  std::vector<float> l1r(static_cast<size_t>(M));
  download(l1r.data(), I.l1_row.data(), l1r.size() * 4);
  double l1 = l1_tail;
  for (float v : l1r) l1 += v;
  out.l1 = l1 / static_cast<double>(M);
  out.sparsity.nnz = static_cast<int64_t>(hs.nnz);
  out.sparsity.max_row_nnz = static_cast<int64_t>(hs.max_row_nnz);
  out.sparsity.overflow_tiles = static_cast<int64_t>(hs.overflow_tiles);
  out.sparsity.overflow_rows = static_cast<int64_t>(hs.overflow_rows);
  out.tail_rows = R;
  // Kept between the passes: counts, entries and u per entry, plus the tail rows' G and U.
  out.saved_bytes = M * tiles * 4 + static_cast<int64_t>(ne) * 8 + R * (4 + Fp * 4);
  I.have_grads = true;
  return out;
}

TrainStepStats CudaFfnTrainer::step(const float* x, const float* dy, int64_t M, TrainMode mode, const HybridParams& p,
                                    float* y, float* dx) {
  Impl& I = *impl_;
  const int64_t d = I.w.d, dp = I.w.dp;
  if (M <= 0) return TrainStepStats{};
  I.xf.reserve(static_cast<size_t>(M * d) * 4);
  I.xb.reserve(static_cast<size_t>(M * dp) * 2);
  I.dyb.reserve(static_cast<size_t>(M * dp) * 2);
  memset_device(I.xb.data(), 0, static_cast<size_t>(M * dp) * 2);
  memset_device(I.dyb.data(), 0, static_cast<size_t>(M * dp) * 2);
  upload(I.xf.data(), x, static_cast<size_t>(M * d) * 4);
  f32_to_bf16_device(I.xf.as<float>(), d, I.xb.as<uint16_t>(), dp, M, d);
  upload(I.xf.data(), dy, static_cast<size_t>(M * d) * 4);
  f32_to_bf16_device(I.xf.as<float>(), d, I.dyb.as<uint16_t>(), dp, M, d);
  const TrainStepStats st = step_device(I.xb.as<uint16_t>(), I.dyb.as<uint16_t>(), M, mode, p);
  download(y, I.y.data(), static_cast<size_t>(M * d) * 4);
  download(dx, I.dx.data(), static_cast<size_t>(M * d) * 4);
  return st;
}

void CudaFfnTrainer::export_grads(float* dgate, float* dup, float* ddown) const {
  const Impl& I = *impl_;
  if (!I.have_grads) throw std::runtime_error("CudaFfnTrainer.export_grads: no step has run");
  const int64_t d = I.w.d, F = I.w.F;
  download(dgate, I.dgate.data(), static_cast<size_t>(F * d) * 4);
  download(dup, I.dup.data(), static_cast<size_t>(F * d) * 4);
  std::vector<float> t(static_cast<size_t>(F * d));
  download(t.data(), I.ddown_t.data(), t.size() * 4);
  for (int64_t j = 0; j < F; ++j)
    for (int64_t k = 0; k < d; ++k) ddown[k * F + j] = t[j * d + k];
}

}  // namespace sparsellm::cuda
