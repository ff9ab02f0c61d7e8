// The training-only operations on the GPU (train_ops.h) other than the GEMM (train_gemm.cu):
// the projections, RMSNorm forward/backward, RoPE, causal attention forward/backward on top of
// the GEMM, cross-entropy, AdamW, the gradient's sum of squares, embeddings, the dense FFN's
// elementwise steps and the hybrid FFN. Each mirrors the CPU
// function of the same name (native/src/cpu/train_ops.cpp, train_norm.h, train_attention.h,
// hybrid.cpp's dense path): same formulas, float64 where the CPU reduces in float64.
// Correctness first: simple launch shapes, block reductions through shared memory only.
//
// UNVERIFIED: compile-checked and run through a host emulation of the kernels only (no GPU
// on the machine it was written on).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "attention_mma.h"
#include "common.cuh"
#include "sparsellm/cuda_ops.h"
#include "train_ops.h"

namespace sparsellm::cuda::train {
namespace {

constexpr int kThreads = 256;  // every reduction kernel: a power of two

unsigned grid1(int64_t n, int per_block) {
  const int64_t b = ceil_div(n, per_block);
  if (b > 0x7fffffffLL) throw std::invalid_argument("CUDA training operation: too many elements");
  return static_cast<unsigned>(b < 1 ? 1 : b);
}
unsigned grid_capped(int64_t n, int per_block, int64_t cap) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, per_block), cap)));
}
unsigned rows_grid(int64_t rows) {
  if (rows > 0x7fffffffLL) throw std::invalid_argument("CUDA training operation: too many rows");
  return static_cast<unsigned>(std::max<int64_t>(rows, 1));
}

// Tree sum / maximum over the block (blockDim.x = kThreads); every thread gets the result. `sh`
// holds kThreads values; the trailing barrier lets consecutive calls reuse it.
template <typename T>
__device__ T block_sum(T v, T* sh) {
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (static_cast<int>(threadIdx.x) < s) sh[threadIdx.x] += sh[threadIdx.x + s];
    __syncthreads();
  }
  const T r = sh[0];
  __syncthreads();
  return r;
}
__device__ float block_max(float v, float* sh) {
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (static_cast<int>(threadIdx.x) < s) sh[threadIdx.x] = fmaxf(sh[threadIdx.x], sh[threadIdx.x + s]);
    __syncthreads();
  }
  const float r = sh[0];
  __syncthreads();
  return r;
}

// A weight (or, in the weight gradients, an activation) read by the hybrid light-row kernels:
// f32, or its bf16 copy (LightRowWeights).
__device__ __forceinline__ float wval(const float* __restrict__ p, int64_t i) { return p[i]; }
__device__ __forceinline__ float wval(const uint16_t* __restrict__ p, int64_t i) { return bf16_bits_to_f32(p[i]); }

// Σ_{i < d} a[i]·b[i] by one warp (lanes stride 32), the sum in every lane: the hybrid rows'
// per-neuron dot products run a warp each, with no block barrier per neuron.
template <typename WT>
__device__ __forceinline__ float warp_dot(const float* __restrict__ a, const WT* __restrict__ b, int64_t d, int lane) {
  float s = 0.f;
  for (int64_t i = lane; i < d; i += 32) s += a[i] * wval(b, i);
  return warp_sum(s);
}

// ---- RMSNorm ----------------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads) rmsnorm_forward_kernel(const float* __restrict__ x,
                                                                   const float* __restrict__ add, float* __restrict__ sum,
                                                                   int64_t d, const float* __restrict__ w, float eps,
                                                                   float* __restrict__ y, float* __restrict__ rstd) {
  __shared__ double sh[kThreads];
  const int64_t t = blockIdx.x;
  const float* xt = x + t * d;
  double ss = 0;
  for (int64_t i = threadIdx.x; i < d; i += kThreads) {
    float v = xt[i];
    if (add) {
      v += add[t * d + i];
      sum[t * d + i] = v;
    }
    ss += static_cast<double>(v) * v;
  }
  ss = block_sum(ss, sh);
  const float r = static_cast<float>(1.0 / sqrt(ss / static_cast<double>(d) + static_cast<double>(eps)));
  if (threadIdx.x == 0) rstd[t] = r;
  const float* src = add ? sum + t * d : xt;  // this thread wrote the entries it reads back
  for (int64_t i = threadIdx.x; i < d; i += kThreads) y[t * d + i] = src[i] * r * w[i];
}

__global__ void __launch_bounds__(kThreads) rmsnorm_backward_rows_kernel(const float* __restrict__ x,
                                                                         const float* __restrict__ rstd,
                                                                         const float* __restrict__ w,
                                                                         const float* __restrict__ dy, int64_t d,
                                                                         float* __restrict__ dx, int accumulate) {
  __shared__ double sh[kThreads];
  const int64_t t = blockIdx.x;
  const float* xt = x + t * d;
  const float* gt = dy + t * d;
  const double r = rstd[t];
  double dot = 0;
  for (int64_t i = threadIdx.x; i < d; i += kThreads) dot += static_cast<double>(gt[i]) * w[i] * xt[i];
  dot = block_sum(dot, sh);
  const double cc = dot * r * r * r / static_cast<double>(d);
  float* dxt = dx + t * d;
  for (int64_t i = threadIdx.x; i < d; i += kThreads) {
    const float v = static_cast<float>(r * gt[i] * w[i] - xt[i] * cc);
    dxt[i] = accumulate ? dxt[i] + v : v;
  }
}

constexpr int64_t kNormChunk = 64;  // rows per partial sum of the weight gradient

// part[c, i] = Σ_{t in chunk c} dy[t, i]·x[t, i]·r[t] (float64).
__global__ void rmsnorm_dw_partial_kernel(const float* __restrict__ x, const float* __restrict__ rstd,
                                          const float* __restrict__ dy, int64_t M, int64_t d, double* __restrict__ part) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t c = blockIdx.y;
  if (i >= d) return;
  const int64_t t1 = (c + 1) * kNormChunk < M ? (c + 1) * kNormChunk : M;
  double s = 0;
  for (int64_t t = c * kNormChunk; t < t1; ++t) s += static_cast<double>(dy[t * d + i]) * x[t * d + i] * static_cast<double>(rstd[t]);
  part[c * d + i] = s;
}

__global__ void rmsnorm_dw_reduce_kernel(const double* __restrict__ part, int64_t chunks, int64_t d,
                                         float* __restrict__ dw, int first) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= d) return;
  double s = 0;
  for (int64_t c = 0; c < chunks; ++c) s += part[c * d + i];
  dw[i] = first ? static_cast<float>(s) : dw[i] + static_cast<float>(s);
}

// ---- RoPE -------------------------------------------------------------------------------------

__global__ void rope_kernel(float* __restrict__ x, int64_t ld, int64_t rows, int64_t T, int64_t H, int64_t half,
                            const float* __restrict__ cos_t, const float* __restrict__ sin_t, float sg) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * H * half) return;
  const int64_t i = idx % half, h = (idx / half) % H, r = idx / (half * H);
  const int64_t t = r % T;
  float* xh = x + r * ld + h * 2 * half;
  const float c = cos_t[t * half + i], s = sin_t[t * half + i];
  const float a = xh[i], b = xh[i + half];
  xh[i] = a * c - sg * b * s;
  xh[i + half] = b * c + sg * a * s;
}

// ---- attention rows ---------------------------------------------------------------------------

// Row (b, h, t) of P holds the scores q_t·k_s: becomes softmax over s ≤ t of scale·score, zeros after.
// Row lse_row(r) of a chunk of nb sequences × nh heads: the (b, h, t) index in lse [B, H, T].
__device__ __forceinline__ int64_t lse_row(int64_t r, int64_t T, int64_t nh, int64_t H) {
  const int64_t pair = r / T;
  return ((pair / nh) * H + pair % nh) * T + r % T;
}

// Row r of the chunk: scores S (t = r % T) become P = causal softmax(S·scale), zeros after t;
// lse (at lse_row) = the row's log Σ exp(S·scale), so that P = exp(S·scale − lse).
__global__ void __launch_bounds__(kThreads) causal_softmax_kernel(float* __restrict__ P, int64_t T, float scale,
                                                                  float* __restrict__ lse, int64_t nh, int64_t H) {
  __shared__ float sh[kThreads];
  const int64_t row = blockIdx.x, t = row % T;
  float* p = P + row * T;
  float mx = -INFINITY;
  for (int64_t s = threadIdx.x; s <= t; s += kThreads) mx = fmaxf(mx, p[s]);
  mx = block_max(mx, sh);
  const float mxs = mx * scale;
  float sum = 0.f;
  for (int64_t s = threadIdx.x; s <= t; s += kThreads) {
    const float e = expf(p[s] * scale - mxs);
    p[s] = e;
    sum += e;
  }
  sum = block_sum(sum, sh);
  const float inv = 1.f / sum;
  for (int64_t s = threadIdx.x; s < T; s += kThreads) p[s] = s <= t ? p[s] * inv : 0.f;
  if (threadIdx.x == 0) lse[lse_row(row, T, nh, H)] = mxs + logf(sum);
}

// The backward's recomputation: S → P = exp(S·scale − lse) over s ≤ t, zeros after.
__global__ void __launch_bounds__(kThreads) causal_probs_kernel(float* __restrict__ P, int64_t T, float scale,
                                                                const float* __restrict__ lse, int64_t nh, int64_t H) {
  const int64_t row = blockIdx.x, t = row % T;
  float* p = P + row * T;
  const float l = lse[lse_row(row, T, nh, H)];
  for (int64_t s = threadIdx.x; s < T; s += kThreads) p[s] = s <= t ? expf(p[s] * scale - l) : 0.f;
}

// Row (b, h, t): dS holds dP = dout·vᵀ; becomes P ⊙ (dP − Σ_s dP⊙P)·scale over s ≤ t, zeros after.
__global__ void __launch_bounds__(kThreads) softmax_backward_kernel(const float* __restrict__ P, float* __restrict__ dS,
                                                                    int64_t T, float scale) {
  __shared__ float sh[kThreads];
  const int64_t row = blockIdx.x, t = row % T;
  const float* p = P + row * T;
  float* g = dS + row * T;
  float rs = 0.f;
  for (int64_t s = threadIdx.x; s <= t; s += kThreads) rs += g[s] * p[s];
  rs = block_sum(rs, sh);
  for (int64_t s = threadIdx.x; s < T; s += kThreads) g[s] = s <= t ? p[s] * (g[s] - rs) * scale : 0.f;
}

// ---- loss, optimizer, reductions ---------------------------------------------------------------

__global__ void __launch_bounds__(kThreads) cross_entropy_kernel(float* __restrict__ logits,
                                                                 const int32_t* __restrict__ targets, int64_t V,
                                                                 float gscale, double* __restrict__ loss_sum) {
  __shared__ float shf[kThreads];
  __shared__ double shd[kThreads];
  const int64_t m = blockIdx.x;
  float* l = logits + m * V;
  const int32_t tg = targets[m];
  const float lt = l[tg];  // read by every thread before any row entry is overwritten
  float mx = -INFINITY;
  for (int64_t i = threadIdx.x; i < V; i += kThreads) mx = fmaxf(mx, l[i]);
  mx = block_max(mx, shf);
  float part = 0.f;
  for (int64_t i = threadIdx.x; i < V; i += kThreads) part += expf(l[i] - mx);
  const double sum = block_sum(static_cast<double>(part), shd);
  if (threadIdx.x == 0) atomicAdd(loss_sum, log(sum) - static_cast<double>(lt - mx));
  const double inv = 1.0 / sum;
  for (int64_t i = threadIdx.x; i < V; i += kThreads) {
    const double pr = static_cast<double>(expf(l[i] - mx)) * inv;
    l[i] = static_cast<float>((pr - (i == tg ? 1.0 : 0.0)) * gscale);
  }
}

__global__ void adamw_kernel(float* __restrict__ w, const float* __restrict__ g, float* __restrict__ m,
                             float* __restrict__ v, int64_t n, float lr, float b1, float b2, float eps, float wd,
                             float ic1, float ic2, float gscale) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float gi = g[i] * gscale;
    const float mi = b1 * m[i] + (1.f - b1) * gi;
    const float vi = b2 * v[i] + (1.f - b2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    w[i] -= lr * ((mi * ic1) / (sqrtf(vi * ic2) + eps) + wd * w[i]);
  }
}

__global__ void __launch_bounds__(kThreads) sum_squares_kernel(const float* __restrict__ x, int64_t n,
                                                               double* __restrict__ out) {
  __shared__ double sh[kThreads];
  double s = 0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads)
    s += static_cast<double>(x[i]) * x[i];
  s = block_sum(s, sh);
  if (threadIdx.x == 0) atomicAdd(out, s);
}

__global__ void embedding_forward_kernel(const float* __restrict__ table, const int32_t* __restrict__ ids, int64_t M,
                                         int64_t d, float* __restrict__ out) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= M * d) return;
  const int64_t m = idx / d, i = idx % d;
  out[idx] = table[static_cast<int64_t>(ids[m]) * d + i];
}

__global__ void embedding_backward_kernel(const float* __restrict__ dx, const int32_t* __restrict__ ids, int64_t M,
                                          int64_t d, float* __restrict__ G) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= M * d) return;
  const int64_t m = idx / d, i = idx % d;
  atomicAdd(G + static_cast<int64_t>(ids[m]) * d + i, dx[idx]);
}

__global__ void add_to_kernel(float* __restrict__ dst, const float* __restrict__ src, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) dst[i] += src[i];
}

// ---- dense FFN elementwise ---------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads) ffn_hidden_kernel(float* __restrict__ G, const float* __restrict__ U,
                                                              float* __restrict__ H, int64_t F,
                                                              double* __restrict__ l1_sum,
                                                              unsigned long long* __restrict__ counts,
                                                              uint8_t* __restrict__ fired,
                                                              const int32_t* __restrict__ dyn_rows) {
  __shared__ double shd[kThreads];
  __shared__ float shf[kThreads];
  const int64_t m = blockIdx.x;
  if (dyn_rows && m >= *dyn_rows) return;  // the whole block
  double l1 = 0;
  float cnt = 0.f;  // exact: at most F / kThreads + 1 per thread, summed below 2^24
  for (int64_t j = threadIdx.x; j < F; j += kThreads) {
    const float v = G[m * F + j];
    const float g = v > 0.f ? v : 0.f;
    G[m * F + j] = g;
    const float h = g * U[m * F + j];
    H[m * F + j] = h;
    l1 += fabs(static_cast<double>(h));
    if (g > 0.f) {
      cnt += 1.f;
      if (fired) fired[j] = 1;
    }
  }
  l1 = block_sum(l1, shd);
  cnt = block_sum(cnt, shf);
  if (threadIdx.x == 0) {
    atomicAdd(l1_sum, l1);
    const unsigned long long c = static_cast<unsigned long long>(cnt);
    atomicAdd(counts, c);
    atomicMax(counts + 1, c);
  }
}

__global__ void ffn_hidden_backward_kernel(float* __restrict__ dH, const float* __restrict__ G,
                                           const float* __restrict__ U, float* __restrict__ dG, float* __restrict__ H,
                                           int64_t n, float lam, const int32_t* __restrict__ dyn_rows, int64_t F) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n || (dyn_rows && i >= static_cast<int64_t>(*dyn_rows) * F)) return;
  const float g = G[i], u = U[i];
  const float h = g * u;
  const float sg = h > 0.f ? 1.f : (h < 0.f ? -1.f : 0.f);
  const float dh = dH[i] + lam * sg;
  H[i] = h;
  dH[i] = dh * g;
  dG[i] = g > 0.f ? dh * u : 0.f;
}


// ---- Hybrid FFN ---------------------------------------------------------------------------------

// Inclusive prefix sum over the block; *total gets the block's sum.
__device__ int block_scan(int v, int* sh, int* total) {
  const int tid = threadIdx.x;
  sh[tid] = v;
  __syncthreads();
  for (int off = 1; off < kThreads; off <<= 1) {
    const int t = tid >= off ? sh[tid - off] : 0;
    __syncthreads();
    sh[tid] += t;
    __syncthreads();
  }
  const int r = sh[tid];
  *total = sh[kThreads - 1];
  __syncthreads();
  return r;
}

// Row m of Gpre = x·W_gateᵀ: its positives in ascending neuron order; the first W go to the ELL
// row (neuron, g); row_nnz[m] = their number; counts {nnz, max}; fired flags.
__global__ void __launch_bounds__(kThreads) hybrid_compact_kernel(const float* __restrict__ Gpre, int64_t F, int W,
                                                                  int32_t* __restrict__ row_nnz,
                                                                  int32_t* __restrict__ col, float* __restrict__ g,
                                                                  unsigned long long* __restrict__ counts,
                                                                  uint8_t* __restrict__ fired) {
  __shared__ int sh[kThreads];
  const int64_t m = blockIdx.x;
  const float* row = Gpre + m * F;
  int base = 0;
  for (int64_t j0 = 0; j0 < F; j0 += kThreads) {
    const int64_t j = j0 + threadIdx.x;
    const float v = j < F ? row[j] : 0.f;
    const int flag = v > 0.f ? 1 : 0;
    if (flag && fired) fired[j] = 1;
    int total = 0;
    const int pos = base + block_scan(flag, sh, &total) - flag;
    if (flag && pos < W) {
      col[m * W + pos] = static_cast<int32_t>(j);
      g[m * W + pos] = v;
    }
    base += total;
  }
  if (threadIdx.x == 0) {
    row_nnz[m] = base;
    atomicAdd(counts, static_cast<unsigned long long>(base));
    atomicMax(counts + 1, static_cast<unsigned long long>(base));
  }
}

// One block: the rows with row_nnz > W in ascending order; their number into *count and counts[2].
__global__ void __launch_bounds__(kThreads) hybrid_tail_list_kernel(const int32_t* __restrict__ row_nnz, int64_t M,
                                                                    int W, int32_t* __restrict__ tail,
                                                                    int32_t* __restrict__ count,
                                                                    unsigned long long* __restrict__ counts) {
  __shared__ int sh[kThreads];
  int base = 0;
  for (int64_t m0 = 0; m0 < M; m0 += kThreads) {
    const int64_t m = m0 + threadIdx.x;
    const int flag = m < M && row_nnz[m] > W ? 1 : 0;
    int total = 0;
    const int pos = base + block_scan(flag, sh, &total) - flag;
    if (flag) tail[pos] = static_cast<int32_t>(m);
    base += total;
  }
  if (threadIdx.x == 0) {
    *count = base;
    atomicAdd(counts + 2, static_cast<unsigned long long>(base));
  }
}

// Light row m: u at the pattern (kept), y[m] = Σ_e g_e·u_e·W_down[:, j_e], Σ|h| into l1_sum.
template <typename WT>
__global__ void __launch_bounds__(kThreads) hybrid_fwd_rows_kernel(const float* __restrict__ x, int64_t d,
                                                                   const WT* __restrict__ updown, int W,
                                                                   const int32_t* __restrict__ row_nnz,
                                                                   const int32_t* __restrict__ col,
                                                                   const float* __restrict__ g, float* __restrict__ u,
                                                                   float* __restrict__ y, double* __restrict__ l1_sum) {
  const int64_t m = blockIdx.x;
  const int n = row_nnz[m];
  if (n > W) return;  // a tail row (the whole block)
  const float* xm = x + m * d;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  double l1 = 0;
  for (int e = warp; e < n; e += kThreads / 32) {  // a warp per active neuron
    const float s = warp_dot(xm, updown + static_cast<int64_t>(col[m * W + e]) * 2 * d, d, lane);
    if (lane == 0) {
      u[m * W + e] = s;
      l1 += fabs(static_cast<double>(g[m * W + e]) * s);
    }
  }
  __syncthreads();  // u of the row visible to the whole block
  for (int64_t i = threadIdx.x; i < d; i += kThreads) {
    float acc = 0.f;
    for (int e = 0; e < n; ++e) {
      const int64_t j = col[m * W + e];
      acc += (g[m * W + e] * u[m * W + e]) * wval(updown, j * 2 * d + d + i);
    }
    y[m * d + i] = acc;
  }
  if (lane == 0 && warp < n) atomicAdd(l1_sum, l1);
}

// Light row m, backward: dh_e = dy_m·W_down[:, j] + lam·sign(u_e); du_e = dh·g, dg_e = dh·u (kept);
// dx[m] = Σ_e du_e·W_up[j] + dg_e·W_gate[j].
template <typename WT>
__global__ void __launch_bounds__(kThreads) hybrid_bwd_rows_kernel(const float* __restrict__ dy, int64_t d,
                                                                   const WT* __restrict__ gate,
                                                                   const WT* __restrict__ updown, int W,
                                                                   const int32_t* __restrict__ row_nnz,
                                                                   const int32_t* __restrict__ col,
                                                                   const float* __restrict__ g,
                                                                   const float* __restrict__ u, float lam,
                                                                   float* __restrict__ du, float* __restrict__ dg,
                                                                   float* __restrict__ dx) {
  const int64_t m = blockIdx.x;
  const int n = row_nnz[m];
  if (n > W) return;
  const float* dym = dy + m * d;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int e = warp; e < n; e += kThreads / 32) {  // a warp per active neuron
    const float s = warp_dot(dym, updown + static_cast<int64_t>(col[m * W + e]) * 2 * d + d, d, lane);
    if (lane == 0) {
      const float ue = u[m * W + e], ge = g[m * W + e];
      const float dh = s + lam * (ue > 0.f ? 1.f : (ue < 0.f ? -1.f : 0.f));
      du[m * W + e] = dh * ge;
      dg[m * W + e] = dh * ue;
    }
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < d; i += kThreads) {
    float acc = 0.f;
    for (int e = 0; e < n; ++e) {
      const int64_t j = col[m * W + e];
      acc += du[m * W + e] * wval(updown, j * 2 * d + i) + dg[m * W + e] * wval(gate, j * d + i);
    }
    dx[m * d + i] = acc;
  }
}

// Entries of the light rows counted per neuron; rank = the entry's place among its neuron's.
__global__ void hybrid_rank_kernel(int64_t M, int W, const int32_t* __restrict__ row_nnz, const int32_t* __restrict__ col,
                                   int32_t* __restrict__ hist, int32_t* __restrict__ rank) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= M * W) return;
  const int64_t m = idx / W;
  const int e = static_cast<int>(idx % W);
  const int n = row_nnz[m];
  if (n > W || e >= n) return;
  rank[idx] = atomicAdd(hist + col[idx], 1);
}

// One block: offs[0] = 0, offs[j + 1] = offs[j] + hist[j].
__global__ void __launch_bounds__(kThreads) hybrid_offsets_kernel(const int32_t* __restrict__ hist, int64_t F,
                                                                  int32_t* __restrict__ offs) {
  __shared__ int sh[kThreads];
  int base = 0;
  if (threadIdx.x == 0) offs[0] = 0;
  for (int64_t j0 = 0; j0 < F; j0 += kThreads) {
    const int64_t j = j0 + threadIdx.x;
    const int v = j < F ? hist[j] : 0;
    int total = 0;
    const int incl = base + block_scan(v, sh, &total);
    if (j < F) offs[j + 1] = incl;
    base += total;
  }
}

__global__ void hybrid_scatter_kernel(int64_t M, int W, const int32_t* __restrict__ row_nnz,
                                      const int32_t* __restrict__ col, const int32_t* __restrict__ offs,
                                      const int32_t* __restrict__ rank, int32_t* __restrict__ list) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= M * W) return;
  const int64_t m = idx / W;
  const int e = static_cast<int>(idx % W);
  const int n = row_nnz[m];
  if (n > W || e >= n) return;
  list[offs[col[idx]] + rank[idx]] = static_cast<int32_t>(idx);
}

// Neuron j (a block): dW_gate[j] (+)= Σ dg·x_m, dW_up[j] (+)= Σ du·x_m, dW_down[:, j] (+)= Σ h·dy_m
// over the light rows' entries of j (zero when it has none). Each entry reads a whole x row and
// dy row (random tokens, mostly from L2 or DRAM): AT = uint16_t reads their bf16 copies, half
// the bytes of the kernel's traffic.
template <typename AT>
__global__ void __launch_bounds__(kThreads) hybrid_wgrad_kernel(int64_t d, int W, const int32_t* __restrict__ offs,
                                                                const int32_t* __restrict__ list,
                                                                const float* __restrict__ g, const float* __restrict__ u,
                                                                const float* __restrict__ du,
                                                                const float* __restrict__ dg,
                                                                const AT* __restrict__ x,
                                                                const AT* __restrict__ dy, float* __restrict__ dgate,
                                                                float* __restrict__ dupdown, int first) {
  const int64_t j = blockIdx.x;
  const int q0 = offs[j], q1 = offs[j + 1];
  if (q0 == q1 && !first) return;
  for (int64_t i = threadIdx.x; i < d; i += kThreads) {
    float ag = 0.f, au = 0.f, ad = 0.f;
    for (int q = q0; q < q1; ++q) {
      const int idx = list[q];
      const int64_t m = idx / W;
      const float xi = wval(x, m * d + i);
      ag += dg[idx] * xi;
      au += du[idx] * xi;
      ad += (g[idx] * u[idx]) * wval(dy, m * d + i);
    }
    float* pg = dgate + j * d + i;
    float* pu = dupdown + j * 2 * d + i;
    float* pd = pu + d;
    if (first) {
      *pg = ag;
      *pu = au;
      *pd = ad;
    } else {
      *pg += ag;
      *pu += au;
      *pd += ad;
    }
  }
}

// dst[t] = src[rows[t]] (gather) or dst[rows[t]] = src[t] (scatter) for t < *count; a block per t.
__global__ void gather_rows_kernel(const float* __restrict__ src, const int32_t* __restrict__ rows,
                                   const int32_t* __restrict__ count, int64_t d, float* __restrict__ dst, int scatter) {
  const int64_t t = blockIdx.x;
  if (t >= *count) return;
  const int64_t r = rows[t];
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    if (scatter) dst[r * d + i] = src[t * d + i];
    else dst[t * d + i] = src[r * d + i];
  }
}

}  // namespace

void linear_forward(const float* x, int64_t M, int64_t din, const float* W, int64_t dout, float* y) {
  gemm_f32(M, dout, din, MatRef{x, din, 1}, MatRef{W, 1, din}, y, dout);
}

void linear_backward(const float* x, const float* dy, int64_t M, int64_t din, const float* W, int64_t dout, float* dx,
                     float* dW, bool first) {
  if (dx) gemm_f32(M, din, dout, MatRef{dy, dout, 1}, MatRef{W, din, 1}, dx, din);  // dy·W
  // dW[o, i] = Σ_t dy[t, o]·x[t, i]
  gemm_f32(dout, din, M, MatRef{dy, 1, dout}, MatRef{x, din, 1}, dW, din, 0, 0, 1, 1, !first);
}

void rmsnorm_forward(const float* x, const float* add, float* sum, int64_t M, int64_t d, const float* w, float eps,
                     float* y, float* rstd) {
  if (M <= 0) return;
  rmsnorm_forward_kernel<<<rows_grid(M), kThreads>>>(x, add, sum, d, w, eps, y, rstd);
  SLLM_LAUNCHED("rmsnorm_forward_kernel");
}

int64_t rmsnorm_backward_scratch(int64_t M, int64_t d) { return std::max<int64_t>(1, ceil_div(M, kNormChunk)) * d; }

void rmsnorm_backward(const float* x, const float* rstd, const float* w, const float* dy, int64_t M, int64_t d,
                      float* dx, bool accumulate, float* dw, bool dw_first, double* part) {
  if (M <= 0) return;
  rmsnorm_backward_rows_kernel<<<rows_grid(M), kThreads>>>(x, rstd, w, dy, d, dx, accumulate ? 1 : 0);
  SLLM_LAUNCHED("rmsnorm_backward_rows_kernel");
  const int64_t chunks = ceil_div(M, kNormChunk);
  if (chunks > 65535) throw std::invalid_argument("rmsnorm_backward: too many rows");
  rmsnorm_dw_partial_kernel<<<dim3(grid1(d, 128), static_cast<unsigned>(chunks)), 128>>>(x, rstd, dy, M, d, part);
  SLLM_LAUNCHED("rmsnorm_dw_partial_kernel");
  rmsnorm_dw_reduce_kernel<<<grid1(d, 128), 128>>>(part, chunks, d, dw, dw_first ? 1 : 0);
  SLLM_LAUNCHED("rmsnorm_dw_reduce_kernel");
}

void rope_apply(float* x, int64_t ld, int64_t B, int64_t T, int64_t H, int64_t hd, const float* cos_t,
                const float* sin_t, bool inverse) {
  const int64_t half = hd / 2, n = B * T * H * half;
  if (n <= 0) return;
  rope_kernel<<<grid1(n, 256), 256>>>(x, ld, B * T, T, H, half, cos_t, sin_t, inverse ? -1.f : 1.f);
  SLLM_LAUNCHED("rope_kernel");
}

namespace {

// The attention's (sequence, head) pairs in chunks whose T × T score matrices fit `budget`
// elements: whole sequences (every head) at a time, or, when one sequence's heads do not fit,
// heads of one sequence.
struct AttnChunk {
  int64_t b0, nb, h0, nh;
};
template <typename Fn>
void for_each_attn_chunk(int64_t B, int64_t T, int64_t H, int64_t budget, Fn fn) {
  const int64_t tt = T * T;
  if (budget < tt) throw std::invalid_argument("attention: scratch smaller than one T x T score matrix");
  if (H * tt <= budget) {
    const int64_t nb = std::min(B, budget / (H * tt));
    for (int64_t b0 = 0; b0 < B; b0 += nb) fn(AttnChunk{b0, std::min(nb, B - b0), 0, H});
  } else {
    const int64_t nh = budget / tt;
    for (int64_t b0 = 0; b0 < B; ++b0)
      for (int64_t h0 = 0; h0 < H; h0 += nh) fn(AttnChunk{b0, 1, h0, std::min(nh, H - h0)});
  }
}

// Element offset of the chunk's first (sequence, head) in a [B·T, ld] activation.
int64_t chunk_offset(const AttnChunk& c, int64_t T, int64_t ld, int64_t hd) { return c.b0 * T * ld + c.h0 * hd; }

}  // namespace

int64_t attention_scratch(int64_t B, int64_t T, int64_t H, int64_t hd, MatmulPrecision p) {
  if (p == MatmulPrecision::Bf16 && attention_mma_supported(hd) && attention_mma_backward_supported(hd))
    return std::max<int64_t>(1, (attention_mma_backward_scratch(B, T, H) + 1) / 2);  // two buffers hold D
  constexpr int64_t kBudget = int64_t{32} << 20;  // elements (128 MiB) per score buffer
  return std::min(B * H * T * T, std::max(T * T, kBudget));
}

void attention_forward(const float* q, const float* k, const float* v, int64_t ld_in, int64_t B, int64_t T, int64_t H,
                       int64_t hd, float* lse, float* out, int64_t ld_out, float* scratch, int64_t scratch_elems) {
  // bf16 products: the flash kernel keeps the scores on chip (the same scores and P·v rounding).
  if (matmul_precision() == MatmulPrecision::Bf16 && attention_mma_supported(hd))
    return attention_mma_train(q, k, v, ld_in, B, T, H, static_cast<int>(hd), lse, out, ld_out);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
  float* S = scratch;
  for_each_attn_chunk(B, T, H, scratch_elems, [&](const AttnChunk& c) {
    const int64_t oi = chunk_offset(c, T, ld_in, hd), pst = c.nh * T * T;
    // S = q·kᵀ per (b, h): tiles wholly above the diagonal are skipped, the softmax zeroes the rest.
    gemm_f32(T, T, hd, MatRef{q + oi, ld_in, 1, T * ld_in, hd}, MatRef{k + oi, 1, ld_in, T * ld_in, hd}, S, T, pst,
             T * T, c.nb, c.nh, false, Causal::LowerC);
    causal_softmax_kernel<<<rows_grid(c.nb * c.nh * T), kThreads>>>(S, T, scale, lse + (c.b0 * H + c.h0) * T, c.nh, H);
    SLLM_LAUNCHED("causal_softmax_kernel");
    // out = P·v (P lower-triangular)
    gemm_f32(T, hd, T, MatRef{S, T, 1, pst, T * T}, MatRef{v + oi, ld_in, 1, T * ld_in, hd},
             out + chunk_offset(c, T, ld_out, hd), ld_out, T * ld_out, hd, c.nb, c.nh, false, Causal::LowerA);
  });
}

void attention_backward(const float* q, const float* k, const float* v, int64_t ld_in, const float* lse,
                        const float* out, const float* dout, int64_t ld_out, int64_t B, int64_t T, int64_t H,
                        int64_t hd, float* dq, float* dk, float* dv, int64_t ld_grad, float* scratch,
                        int64_t scratch_elems) {
  if (matmul_precision() == MatmulPrecision::Bf16 && attention_mma_backward_supported(hd) &&
      attention_mma_backward_scratch(B, T, H) <= 2 * scratch_elems)
    return attention_mma_train_backward(q, k, v, ld_in, lse, out, dout, ld_out, B, T, H, static_cast<int>(hd), dq, dk,
                                        dv, ld_grad, scratch);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(hd)));
  float *P = scratch, *dS = scratch + scratch_elems;
  for_each_attn_chunk(B, T, H, scratch_elems, [&](const AttnChunk& c) {
    const int64_t oi = chunk_offset(c, T, ld_in, hd), oo = chunk_offset(c, T, ld_out, hd),
                  og = chunk_offset(c, T, ld_grad, hd), pst = c.nh * T * T;
    const int64_t rows = c.nb * c.nh * T;
    // P again from S = q·kᵀ and the forward's lse.
    gemm_f32(T, T, hd, MatRef{q + oi, ld_in, 1, T * ld_in, hd}, MatRef{k + oi, 1, ld_in, T * ld_in, hd}, P, T, pst,
             T * T, c.nb, c.nh, false, Causal::LowerC);
    causal_probs_kernel<<<rows_grid(rows), kThreads>>>(P, T, scale, lse + (c.b0 * H + c.h0) * T, c.nh, H);
    SLLM_LAUNCHED("causal_probs_kernel");
    // dP = dout·vᵀ, then dS in place.
    gemm_f32(T, T, hd, MatRef{dout + oo, ld_out, 1, T * ld_out, hd}, MatRef{v + oi, 1, ld_in, T * ld_in, hd}, dS, T,
             pst, T * T, c.nb, c.nh, false, Causal::LowerC);
    softmax_backward_kernel<<<rows_grid(rows), kThreads>>>(P, dS, T, scale);
    SLLM_LAUNCHED("softmax_backward_kernel");
    const MatRef dSm{dS, T, 1, pst, T * T}, dSt{dS, 1, T, pst, T * T}, Pt{P, 1, T, pst, T * T};
    // dS and P are lower-triangular: dS·k skips k > t, dSᵀ·q and Pᵀ·dout skip k < t.
    gemm_f32(T, hd, T, dSm, MatRef{k + oi, ld_in, 1, T * ld_in, hd}, dq + og, ld_grad, T * ld_grad, hd, c.nb, c.nh,
             false, Causal::LowerA);
    gemm_f32(T, hd, T, dSt, MatRef{q + oi, ld_in, 1, T * ld_in, hd}, dk + og, ld_grad, T * ld_grad, hd, c.nb, c.nh,
             false, Causal::UpperA);
    gemm_f32(T, hd, T, Pt, MatRef{dout + oo, ld_out, 1, T * ld_out, hd}, dv + og, ld_grad, T * ld_grad, hd, c.nb,
             c.nh, false, Causal::UpperA);
  });
}

void cross_entropy(float* logits, const int32_t* targets, int64_t M, int64_t V, float gscale, double* loss_sum) {
  if (M <= 0) return;
  cross_entropy_kernel<<<rows_grid(M), kThreads>>>(logits, targets, V, gscale, loss_sum);
  SLLM_LAUNCHED("cross_entropy_kernel");
}

void adamw(float* w, const float* g, float* m, float* v, int64_t n, float lr, float b1, float b2, float eps, float wd,
           double c1, double c2, float gscale) {
  if (n <= 0) return;
  const float ic1 = static_cast<float>(1.0 / c1), ic2 = static_cast<float>(1.0 / c2);
  adamw_kernel<<<grid_capped(n, 256, 8192), 256>>>(w, g, m, v, n, lr, b1, b2, eps, wd, ic1, ic2, gscale);
  SLLM_LAUNCHED("adamw_kernel");
}

void sum_squares(const float* x, int64_t n, double* out) {
  if (n <= 0) return;
  sum_squares_kernel<<<grid_capped(n, kThreads * 8, 2048), kThreads>>>(x, n, out);
  SLLM_LAUNCHED("sum_squares_kernel");
}

void embedding_forward(const float* table, const int32_t* ids, int64_t M, int64_t d, float* out) {
  if (M * d <= 0) return;
  embedding_forward_kernel<<<grid1(M * d, 256), 256>>>(table, ids, M, d, out);
  SLLM_LAUNCHED("embedding_forward_kernel");
}

void embedding_backward(const float* dx, const int32_t* ids, int64_t M, int64_t d, float* G) {
  if (M * d <= 0) return;
  embedding_backward_kernel<<<grid1(M * d, 256), 256>>>(dx, ids, M, d, G);
  SLLM_LAUNCHED("embedding_backward_kernel");
}

void add_to(float* dst, const float* src, int64_t n) {
  if (n <= 0) return;
  add_to_kernel<<<grid1(n, 256), 256>>>(dst, src, n);
  SLLM_LAUNCHED("add_to_kernel");
}

void ffn_hidden(float* G, const float* U, float* H, int64_t M, int64_t F, double* l1_sum, unsigned long long* counts,
                uint8_t* fired) {
  if (M <= 0) return;
  ffn_hidden_kernel<<<rows_grid(M), kThreads>>>(G, U, H, F, l1_sum, counts, fired, nullptr);
  SLLM_LAUNCHED("ffn_hidden_kernel");
}

void ffn_hidden_backward(float* dH, const float* G, const float* U, float* dG, float* H, int64_t n, float lam) {
  if (n <= 0) return;
  ffn_hidden_backward_kernel<<<grid1(n, 256), 256>>>(dH, G, U, dG, H, n, lam, nullptr, 0);
  SLLM_LAUNCHED("ffn_hidden_backward_kernel");
}


namespace {

void rows_copy(const float* src, const int32_t* rows, const int32_t* count, int64_t cap, int64_t d, float* dst,
               bool scatter) {
  gather_rows_kernel<<<rows_grid(cap), 128>>>(src, rows, count, d, dst, scatter ? 1 : 0);
  SLLM_LAUNCHED("gather_rows_kernel");
}

}  // namespace

void hybrid_ffn_forward_rows(const float* x, const float* gate, const float* updown, const HybridBuffers& h, float* y,
                             double* l1_sum, unsigned long long* counts, uint8_t* fired, const LightRowWeights& lw) {
  const int64_t M = h.M, d = h.d, F = h.F;
  const int W = h.W;
  if (M <= 0) return;
  gemm_f32(M, F, d, MatRef{x, d, 1}, MatRef{gate, 1, d}, h.Gpre, F);  // x·W_gateᵀ
  hybrid_compact_kernel<<<rows_grid(M), kThreads>>>(h.Gpre, F, W, h.row_nnz, h.col, h.g, counts, fired);
  SLLM_LAUNCHED("hybrid_compact_kernel");
  hybrid_tail_list_kernel<<<1, kThreads>>>(h.row_nnz, M, W, h.tail, h.tail_count, counts);
  SLLM_LAUNCHED("hybrid_tail_list_kernel");
  if (lw.updown)
    hybrid_fwd_rows_kernel<uint16_t><<<rows_grid(M), kThreads>>>(x, d, lw.updown, W, h.row_nnz, h.col, h.g, h.u, y,
                                                                 l1_sum);
  else
    hybrid_fwd_rows_kernel<float><<<rows_grid(M), kThreads>>>(x, d, updown, W, h.row_nnz, h.col, h.g, h.u, y, l1_sum);
  SLLM_LAUNCHED("hybrid_fwd_rows_kernel");
}

void hybrid_ffn_forward_tail(const float* x, const float* gate, const float* updown, const HybridBuffers& h, float* y,
                             double* l1_sum, unsigned long long* scratch_counts) {
  const int64_t M = h.M, d = h.d, F = h.F;
  if (M <= 0) return;
  // The dense path on the gathered rows (launched for M rows; the count is on the device).
  const int32_t* nt = h.tail_count;
  rows_copy(x, h.tail, nt, M, d, h.xt, false);
  gemm_f32_dyn(M, F, d, MatRef{h.xt, d, 1}, MatRef{gate, 1, d}, h.Gt, F, false, nt, nullptr);
  gemm_f32_dyn(M, F, d, MatRef{h.xt, d, 1}, MatRef{updown, 1, 2 * d}, h.Ut, F, false, nt, nullptr);
  ffn_hidden_kernel<<<rows_grid(M), kThreads>>>(h.Gt, h.Ut, h.Ht, F, l1_sum, scratch_counts, nullptr, nt);
  SLLM_LAUNCHED("ffn_hidden_kernel");
  gemm_f32_dyn(M, d, F, MatRef{h.Ht, F, 1}, MatRef{updown + d, 2 * d, 1}, h.yt, d, false, nt, nullptr);
  rows_copy(h.yt, h.tail, nt, M, d, y, true);
}

void hybrid_ffn_forward(const float* x, const float* gate, const float* updown, const HybridBuffers& h, float* y,
                        double* l1_sum, unsigned long long* counts, uint8_t* fired, unsigned long long* scratch_counts,
                        const LightRowWeights& lw) {
  hybrid_ffn_forward_rows(x, gate, updown, h, y, l1_sum, counts, fired, lw);
  hybrid_ffn_forward_tail(x, gate, updown, h, y, l1_sum, scratch_counts);
}

void hybrid_ffn_backward(const float* x, const float* dy, const float* gate, const float* updown,
                         const HybridBuffers& h, float lam_m, float* dx, float* dgate, float* dupdown, bool first,
                         const LightRowWeights& lw) {
  const int64_t M = h.M, d = h.d, F = h.F;
  const int W = h.W;
  if (M <= 0) return;
  if (lw.gate && lw.updown)
    hybrid_bwd_rows_kernel<uint16_t><<<rows_grid(M), kThreads>>>(dy, d, lw.gate, lw.updown, W, h.row_nnz, h.col, h.g,
                                                                 h.u, lam_m, h.du, h.dg, dx);
  else
    hybrid_bwd_rows_kernel<float><<<rows_grid(M), kThreads>>>(dy, d, gate, updown, W, h.row_nnz, h.col, h.g, h.u,
                                                              lam_m, h.du, h.dg, dx);
  SLLM_LAUNCHED("hybrid_bwd_rows_kernel");
  // Light rows' weight gradients: entries grouped by neuron (counting sort), a block per neuron.
  SLLM_CUDA(cudaMemsetAsync(h.hist, 0, static_cast<size_t>(F) * 4));
  hybrid_rank_kernel<<<grid1(M * W, 256), 256>>>(M, W, h.row_nnz, h.col, h.hist, h.rank);
  SLLM_LAUNCHED("hybrid_rank_kernel");
  hybrid_offsets_kernel<<<1, kThreads>>>(h.hist, F, h.offs);
  SLLM_LAUNCHED("hybrid_offsets_kernel");
  hybrid_scatter_kernel<<<grid1(M * W, 256), 256>>>(M, W, h.row_nnz, h.col, h.offs, h.rank, h.list);
  SLLM_LAUNCHED("hybrid_scatter_kernel");
  if (lw.gate && lw.updown) {
    // bf16 light rows: x and dy rounded as the tail's (and the dense path's) bf16 GEMMs round
    // them, into the gathered-row scratch (2·M·d bytes each of its 4·M·d) that the tail reuses next.
    uint16_t* x16 = reinterpret_cast<uint16_t*>(h.xt);
    uint16_t* dy16 = reinterpret_cast<uint16_t*>(h.yt);
    f32_to_bf16_device(x, d, x16, d, M, d);
    f32_to_bf16_device(dy, d, dy16, d, M, d);
    hybrid_wgrad_kernel<uint16_t><<<rows_grid(F), kThreads>>>(d, W, h.offs, h.list, h.g, h.u, h.du, h.dg, x16, dy16,
                                                              dgate, dupdown, first ? 1 : 0);
  } else {
    hybrid_wgrad_kernel<float><<<rows_grid(F), kThreads>>>(d, W, h.offs, h.list, h.g, h.u, h.du, h.dg, x, dy, dgate,
                                                           dupdown, first ? 1 : 0);
  }
  SLLM_LAUNCHED("hybrid_wgrad_kernel");
  // Tail rows: dense backward on the gathered rows; dx scattered, weight gradients added.
  const int32_t* nt = h.tail_count;
  rows_copy(x, h.tail, nt, M, d, h.xt, false);
  rows_copy(dy, h.tail, nt, M, d, h.yt, false);
  gemm_f32_dyn(M, F, d, MatRef{h.yt, d, 1}, MatRef{updown + d, 1, 2 * d}, h.dHt, F, false, nt, nullptr);  // dH = dy·W_down
  ffn_hidden_backward_kernel<<<grid1(M * F, 256), 256>>>(h.dHt, h.Gt, h.Ut, h.dGt, h.Ht, M * F, lam_m, nt, F);
  SLLM_LAUNCHED("ffn_hidden_backward_kernel");
  gemm_f32_dyn(M, d, F, MatRef{h.dHt, F, 1}, MatRef{updown, 2 * d, 1}, h.zt, d, false, nt, nullptr);   // dU·W_up
  gemm_f32_dyn(M, d, F, MatRef{h.dGt, F, 1}, MatRef{gate, d, 1}, h.zt, d, true, nt, nullptr);          // + dG·W_gate
  rows_copy(h.zt, h.tail, nt, M, d, dx, true);
  gemm_f32_dyn(F, d, M, MatRef{h.dGt, 1, F}, MatRef{h.xt, d, 1}, dgate, d, true, nullptr, nt);
  gemm_f32_dyn(F, d, M, MatRef{h.dHt, 1, F}, MatRef{h.xt, d, 1}, dupdown, 2 * d, true, nullptr, nt);
  gemm_f32_dyn(F, d, M, MatRef{h.Ht, 1, F}, MatRef{h.yt, d, 1}, dupdown + d, 2 * d, true, nullptr, nt);
}

}  // namespace sparsellm::cuda::train
