// Dense GEMM: C[M, N] = A[M, K] · Wᵀ, with A f32 row-major and W [N, K] f32 or bf16 (bf16
// widened in registers). This is the baseline every sparse kernel is compared with, and the
// engine of the gate GEMM, whose TwELL packing runs as an epilogue on each finished block.
#pragma once
#include <cstdint>
#include <functional>

#include "sparsellm/tensor.h"

namespace sparsellm {

// Called once per finished output block C[m0:m1, n0:n1] with every K summed. `c` points at
// element (m0, n0) of a cache-resident buffer with leading dimension `ldc`; the epilogue may
// modify it in place. `thread` is the OpenMP thread index (for per-thread scratch). Blocks
// are disjoint and cover C exactly once; called concurrently from different threads.
using GemmEpilogue = std::function<void(int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                                        float* c, int64_t ldc, int thread)>;

struct GemmOptions {
  // Epilogue blocks start at multiples of n_align and span whole multiples of it (the last
  // block ends at N). 0 = any. The TwELL gate GEMM sets this to its tile width.
  int64_t n_align = 0;
};

// C = A · Wᵀ.  A [M, K] (lda), W [N, K], C [M, N] (ldc). Multi-threaded (OpenMP).
void gemm(const float* A, int64_t lda, int64_t M, const WeightView& W, float* C, int64_t ldc);

// Same product, but C is never written to memory by the GEMM: each finished block goes to
// `epilogue` instead (e.g. ReLU + TwELL packing).
void gemm_epilogue(const float* A, int64_t lda, int64_t M, const WeightView& W,
                   const GemmEpilogue& epilogue, const GemmOptions& options = {});

}  // namespace sparsellm

namespace sparsellm {

// The same product through the portable scalar kernel, one thread per block of columns: the
// slow, simple reference that the fast paths are checked against (never used by the engine).
void gemm_reference(const float* A, int64_t lda, int64_t M, const WeightView& W, float* C, int64_t ldc);

// Name of the register tile the current ISA dispatches to (e.g. "avx512 14x32").
const char* gemm_kernel_name();
// The largest M that goes to the small-M (streaming) kernel under the current ISA and tuning.
int64_t gemm_gemv_max_m();

// Blocking parameters (process-wide). Defaults suit a core with 48 KiB L1 and 1 MiB L2; each
// can also be set by an environment variable read once at start-up (SPARSELLM_GEMM_KC, _NC,
// _MC, _MC_EPILOGUE, _GEMV_MAX_M).
struct GemmTuning {
  int64_t kc = 512;           // K block: one packed W slab is kc x nc floats (kept in L2)
  int64_t nc = 256;           // columns per thread work item (rounded to the tile / n_align)
  int64_t mc = 1024;          // rows of A packed at once by gemm (bounds the packed-A buffer)
  int64_t mc_epilogue = 280;  // rows of an epilogue block (its C block is mc_epilogue x nc)
  int64_t gemv_max_m = -1;    // M up to this goes to the streaming small-M kernel; -1: the
                              // measured crossover of the dispatched ISA (avx512 16, avx2 6,
                              // portable 4); 0 disables it
};
GemmTuning gemm_tuning();
void set_gemm_tuning(const GemmTuning& tuning);

// Sustained read bandwidth of main memory in GB/s (1e9 bytes/s): all threads sum a buffer of
// `bytes` (default 1 GiB, far larger than the caches) several times; the best pass is returned.
double memory_bandwidth_gbs(int64_t bytes = int64_t(1) << 30);

}  // namespace sparsellm

namespace sparsellm {

// Native timing of one GEMM shape, so benchmarks are not distorted by the caller's language:
// fresh random non-zero inputs (uniform in [-1, 1]) are allocated here, `warmup` untimed runs,
// then `repeats` runs timed with a steady clock. impl "ours" is gemm(); "openblas" is
// openblas_sgemm() (f32 weights only). `cold_bytes` > 0 cycles through enough copies of W to
// span that many bytes, so each run streams W from memory rather than the caches.
struct GemmTimingRequest {
  int64_t M = 1, K = 1, N = 1;
  DType dtype = DType::F32;
  bool openblas = false;
  int repeats = 10;
  int warmup = 2;
  int64_t cold_bytes = 0;
  // Time the calling thread's CPU time instead of wall time (CLOCK_THREAD_CPUTIME_ID): immune
  // to other processes taking the CPU, so comparisons stay meaningful on a busy machine. Only
  // with one thread (num_threads() == 1), since other threads' work would not be counted.
  bool thread_cpu_clock = false;
};
struct GemmTiming {
  double median_ms = 0, min_ms = 0, max_ms = 0;
  int repeats = 0;
  int64_t weight_copies = 1;
};
GemmTiming time_gemm(const GemmTimingRequest& request);

}  // namespace sparsellm
