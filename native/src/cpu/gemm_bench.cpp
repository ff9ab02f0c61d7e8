// Native timing helper for the dense GEMM and the OpenBLAS reference (see gemm.h).
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "sparsellm/cpu_info.h"
#include "sparsellm/gemm.h"
#include "sparsellm/openblas.h"

namespace sparsellm {
namespace {

// Uniform in [-1, 1), never exactly zero (splitmix64 per element index, so the fill can be
// parallel and still deterministic for a given seed).
float uniform(uint64_t seed, uint64_t i) {
  uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  const float u = static_cast<float>((z >> 40) + 0.5) * (2.0f / 16777216.0f) - 1.0f;  // 24 random bits, offset half a step
  return u;
}

double thread_cpu_ms() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) * 1e3 + static_cast<double>(t.tv_nsec) * 1e-6;
}

}  // namespace

GemmTiming time_gemm(const GemmTimingRequest& r) {
  if (r.M < 1 || r.K < 1 || r.N < 1) throw std::invalid_argument("timeGemm: M, K, N must be >= 1");
  if (r.repeats < 1 || r.warmup < 0) throw std::invalid_argument("timeGemm: repeats >= 1, warmup >= 0");
  if (r.openblas && r.dtype != DType::F32) throw std::invalid_argument("timeGemm: OpenBLAS sgemm takes f32 weights only");
  if (r.dtype != DType::F32 && r.dtype != DType::BF16) throw std::invalid_argument("timeGemm: dtype must be f32 or bf16");
  if (r.openblas && !openblas_info().available) throw std::runtime_error(openblas_info().reason);
  if (r.thread_cpu_clock && num_threads() != 1)
    throw std::invalid_argument("timeGemm: the thread CPU-time clock needs one thread (setThreads(1))");
  const int64_t w_elems = r.N * r.K;
  const int64_t w_bytes = w_elems * dtype_size(r.dtype);
  const int64_t copies = r.cold_bytes > 0 ? std::max<int64_t>(1, (r.cold_bytes + w_bytes - 1) / w_bytes) : 1;
  std::vector<float> A(static_cast<size_t>(r.M * r.K)), C(static_cast<size_t>(r.M * r.N));
  std::vector<float> Wf;
  std::vector<uint16_t> Wh;
  const uint64_t seed = static_cast<uint64_t>(std::chrono::steady_clock::now().time_since_epoch().count());
  const int threads = std::max(1, num_threads());
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < r.M * r.K; ++i) A[i] = uniform(seed, i);
  if (r.dtype == DType::F32) {
    Wf.resize(static_cast<size_t>(w_elems * copies));
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < w_elems * copies; ++i) Wf[i] = uniform(seed ^ 0x5555, i);
  } else {
    Wh.resize(static_cast<size_t>(w_elems * copies));
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < w_elems * copies; ++i) Wh[i] = f32_to_bf16(uniform(seed ^ 0x5555, i));
  }
  auto run = [&](int64_t copy) {
    if (r.openblas) {
      openblas_sgemm(A.data(), r.K, r.M, Wf.data() + copy * w_elems, r.K, r.N, r.K, C.data(), r.N);
    } else {
      WeightView w;
      w.dtype = r.dtype;
      w.data = r.dtype == DType::F32 ? static_cast<const void*>(Wf.data() + copy * w_elems)
                                     : static_cast<const void*>(Wh.data() + copy * w_elems);
      w.rows = r.N;
      w.cols = r.K;
      w.ld = r.K;
      gemm(A.data(), r.K, r.M, w, C.data(), r.N);
    }
  };
  int64_t next = 0;
  for (int i = 0; i < r.warmup; ++i) run(next++ % copies);
  std::vector<double> ms;
  for (int i = 0; i < r.repeats; ++i) {
    if (r.thread_cpu_clock) {
      const double t0 = thread_cpu_ms();
      run(next++ % copies);
      ms.push_back(thread_cpu_ms() - t0);
    } else {
      const auto t0 = std::chrono::steady_clock::now();
      run(next++ % copies);
      ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
  }
  std::sort(ms.begin(), ms.end());
  GemmTiming t;
  t.repeats = r.repeats;
  t.min_ms = ms.front();
  t.max_ms = ms.back();
  t.median_ms = ms.size() % 2 ? ms[ms.size() / 2] : 0.5 * (ms[ms.size() / 2 - 1] + ms[ms.size() / 2]);
  t.weight_copies = copies;
  return t;
}

}  // namespace sparsellm
