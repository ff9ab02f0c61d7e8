// Dense GEMM on tensor cores, the GEMV kernel for a few rows, and the TwELL gate GEMM (the same
// tensor-core kernels with the packing epilogue). Kernels: gemm_wgmma.cu (Hopper, sm_90a) and
// gemm_kernel.cuh (mma.sync, any device of compute capability 8.0+), chosen at run time.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "gemm_kernel.cuh"
#include "gemm_wgmma.h"
#include "kernel_policy.h"
#include "sparsellm/cuda_ops.h"

namespace sparsellm::cuda {
namespace {

using detail::EpiParams;

int sm_count() {
  static const int n = [] {
    int dev = 0, v = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
      cudaGetLastError();
      return 100;
    }
    return v;
  }();
  return n;
}

bool aligned(const void* p, size_t a) { return (reinterpret_cast<uintptr_t>(p) % a) == 0; }

void check_operands(const char* who, const uint16_t* A, int64_t lda, const uint16_t* W, int64_t ldw, int64_t M,
                    int64_t N, int64_t K) {
  if (M < 0 || N < 0 || K < 0) throw std::invalid_argument(std::string(who) + ": negative dimension");
  if (M > int64_t(65535) * detail::kBM || N > (int64_t(1) << 30) || K > (int64_t(1) << 30))
    throw std::invalid_argument(std::string(who) + ": dimensions too large for one launch");
  if (lda < K || ldw < K) throw std::invalid_argument(std::string(who) + ": leading dimension smaller than K");
  if (lda % 8 || ldw % 8 || !aligned(A, 16) || !aligned(W, 16))
    throw std::invalid_argument(std::string(who) +
                                ": bf16 operands need leading dimensions that are multiples of 8 and 16-byte aligned "
                                "pointers (pad the rows)");
}

EpiParams plain_params(const Epilogue& e) {
  EpiParams p;
  p.op = static_cast<int>(e.op);
  p.bias = e.bias;
  p.aux = e.aux;
  p.ldaux = e.ldaux;
  p.out_bf16 = e.out_bf16 ? 1 : 0;
  p.out = e.out;
  p.ldo = e.ldo;
  const size_t pair = e.out_bf16 ? 4 : 8;
  p.vec2 = (e.ldo % 2 == 0 && aligned(e.out, pair)) ? 1 : 0;
  p.accumulate = e.accumulate ? 1 : 0;
  if (e.accumulate && e.out_bf16) throw std::invalid_argument("gemm: accumulation needs an f32 output");
  if (!e.out) throw std::invalid_argument("gemm: no output");
  if (e.op == EpiOp::MulAux && !e.aux) throw std::invalid_argument("gemm: MulAux needs aux");
  return p;
}

template <int BN>
void launch_gemm(const uint16_t* A, int64_t lda, const uint16_t* W, int64_t ldw, int64_t M, int64_t N, int64_t K,
                 const EpiParams& p) {
  constexpr int smem = detail::gemm_smem_bytes<BN>();
  static const bool configured = [] {
    SLLM_CUDA(cudaFuncSetAttribute(detail::gemm_bf16_kernel<BN>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    return true;
  }();
  (void)configured;
  dim3 grid(static_cast<unsigned>(ceil_div(N, BN)), static_cast<unsigned>(ceil_div(M, detail::kBM)));
  detail::gemm_bf16_kernel<BN><<<grid, detail::gemm_threads<BN>(), smem>>>(A, lda, W, ldw, static_cast<int>(M),
                                                                           static_cast<int>(N), static_cast<int>(K), p);
  SLLM_LAUNCHED("gemm_bf16_kernel");
}

void run_gemm(const uint16_t* A, int64_t lda, const uint16_t* W, int64_t ldw, int64_t M, int64_t N, int64_t K,
              const EpiParams& p, int bn) {
  if (bn == 256) launch_gemm<256>(A, lda, W, ldw, M, N, K, p);
  else launch_gemm<128>(A, lda, W, ldw, M, N, K, p);
}

// --- kernel choice ------------------------------------------------------------------------------

GemmKernel env_choice() {
  const char* v = std::getenv("SPARSELLM_CUDA_GEMM");
  if (!v) return GemmKernel::Auto;
  if (!std::strcmp(v, "mma")) return GemmKernel::MmaSync;
  if (!std::strcmp(v, "wgmma")) return GemmKernel::Wgmma;
  if (!std::strcmp(v, "wgmma2")) return GemmKernel::WgmmaCluster2;
  return GemmKernel::Auto;
}
GemmKernel g_choice = env_choice();
const char* g_last = "none";

// The Hopper kernel when chosen (explicitly, or by Auto once unverified kernels are allowed:
// kernel_policy.h) and the device and operands allow it; false: the caller runs mma.sync.
bool try_wgmma(const uint16_t* A, int64_t lda, const uint16_t* W, int64_t ldw, int64_t M, int64_t N, int64_t K,
               const EpiParams& p) {
  if (g_choice == GemmKernel::MmaSync || (g_choice == GemmKernel::Auto && !unverified_kernels()) ||
      !detail::wgmma_supported())
    return false;
  const int cluster = g_choice == GemmKernel::WgmmaCluster2 ? 2 : 1;
  if (!detail::wgmma_gemm(A, lda, W, ldw, M, N, K, p, cluster)) return false;
  g_last = cluster == 2 ? "wgmma-cluster2" : "wgmma";
  return true;
}

// --- GEMV: one warp per output column n, MT rows at once --------------------------------------

template <int MT>
__global__ void __launch_bounds__(256) gemv_bf16_kernel(const uint16_t* __restrict__ A, int64_t lda,
                                                        const uint16_t* __restrict__ W, int64_t ldw, int M, int N,
                                                        int K, EpiParams ep, int vec) {
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (n >= N) return;  // whole warps leave; no block-wide barrier below
  const uint16_t* w = W + n * ldw;
  float acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0.f;
  int kv = 0;
  if (vec) {
    kv = K & ~7;
#pragma unroll 4
    for (int k = lane * 8; k < kv; k += 256) {
      const uint4 wv = __ldg(reinterpret_cast<const uint4*>(w + k));
#pragma unroll
      for (int m = 0; m < MT; ++m)
        if (m < M) acc[m] = dot8(wv, *reinterpret_cast<const uint4*>(A + m * lda + k), acc[m]);
    }
  }
  for (int k = kv + lane; k < K; k += 32) {
    const float wf = bf16_bits_to_f32(w[k]);
#pragma unroll
    for (int m = 0; m < MT; ++m)
      if (m < M) acc[m] = fmaf(wf, bf16_bits_to_f32(A[m * lda + k]), acc[m]);
  }
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = warp_sum(acc[m]);
  if (lane == 0) {
#pragma unroll
    for (int m = 0; m < MT; ++m)
      if (m < M) detail::epi_store(ep, m, n, detail::epi_value(ep, m, n, acc[m]));
  }
}

}  // namespace

void gemm_bf16(const uint16_t* A, int64_t lda, const uint16_t* W, int64_t ldw, int64_t M, int64_t N, int64_t K,
               const Epilogue& epi) {
  check_operands("gemm_bf16", A, lda, W, ldw, M, N, K);
  if (M == 0 || N == 0) return;
  EpiParams p = plain_params(epi);
  if (try_wgmma(A, lda, W, ldw, M, N, K, p)) return;
  // 128 x 256 blocks unless that leaves most multiprocessors idle (few rows or columns).
  const int64_t blocks256 = ceil_div(M, detail::kBM) * ceil_div(N, 256);
  run_gemm(A, lda, W, ldw, M, N, K, p, blocks256 >= 2 * sm_count() ? 256 : 128);
  g_last = "mma.sync";
}

void set_gemm_kernel(GemmKernel k) { g_choice = k; }
const char* last_gemm_kernel() { return g_last; }

void gemv_bf16(const uint16_t* A, int64_t lda, const uint16_t* W, int64_t ldw, int64_t M, int64_t N, int64_t K,
               const Epilogue& epi) {
  if (M < 0 || N < 0 || K < 0 || lda < K || ldw < K) throw std::invalid_argument("gemv_bf16: bad dimensions");
  if (M > kGemvMaxRows) throw std::invalid_argument("gemv_bf16: at most 8 rows (use gemm_bf16)");
  if (M == 0 || N == 0) return;
  EpiParams p = plain_params(epi);
  const int vec = (lda % 8 == 0 && ldw % 8 == 0 && aligned(A, 16) && aligned(W, 16)) ? 1 : 0;
  const unsigned grid = static_cast<unsigned>(ceil_div(N, 8));
  const int m = static_cast<int>(M), n = static_cast<int>(N), k = static_cast<int>(K);
  if (M <= 1) gemv_bf16_kernel<1><<<grid, 256>>>(A, lda, W, ldw, m, n, k, p, vec);
  else if (M <= 2) gemv_bf16_kernel<2><<<grid, 256>>>(A, lda, W, ldw, m, n, k, p, vec);
  else if (M <= 4) gemv_bf16_kernel<4><<<grid, 256>>>(A, lda, W, ldw, m, n, k, p, vec);
  else gemv_bf16_kernel<8><<<grid, 256>>>(A, lda, W, ldw, m, n, k, p, vec);
  SLLM_LAUNCHED("gemv_bf16_kernel");
}

bool twell_tile_supported(int tile) { return tile == 32 || tile == 64 || tile == 128 || tile == 256; }

void twell_gate_bf16(const uint16_t* A, int64_t lda, const uint16_t* W, int64_t ldw, int64_t M, int64_t N, int64_t K,
                     const float* bias, const DeviceTwell& out) {
  check_operands("twell_gate_bf16", A, lda, W, ldw, M, N, K);
  if (!twell_tile_supported(out.tile))
    throw std::invalid_argument("twell_gate_bf16: the CUDA gate kernel packs tiles of 32, 64, 128 or 256 columns, not " +
                                std::to_string(out.tile));
  if (out.cap < 1) throw std::invalid_argument("twell_gate_bf16: capacity must be at least 1");
  if (out.rows != M || out.cols != N || out.tiles != ceil_div(N, out.tile))
    throw std::invalid_argument("twell_gate_bf16: TwELL shape does not match the product");
  if (N > 65536 * int64_t(1) * out.tiles) throw std::invalid_argument("twell_gate_bf16: bad tile count");
  if (M == 0 || N == 0) return;
  EpiParams p;
  p.twell = 1;
  p.bias = bias;
  p.tile = out.tile;
  p.cap = out.cap;
  p.tiles = out.tiles;
  p.count = out.count;
  p.entries = out.entries;
  if (try_wgmma(A, lda, W, ldw, M, N, K, p)) return;
  // The block's N range must hold whole tiles: 256-wide blocks for T = 256, else 128.
  run_gemm(A, lda, W, ldw, M, N, K, p, out.tile == 256 ? 256 : 128);
  g_last = "mma.sync";
}

}  // namespace sparsellm::cuda
