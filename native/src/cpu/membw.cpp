// Memory-bandwidth probe: every thread reads its share of a buffer far larger than the caches;
// the best of several passes gives the sustained read bandwidth (GB/s, 1e9 bytes per second)
// that memory-bound kernels (the decode GEMV) are compared with.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <new>
#include <stdexcept>

#include "sparsellm/cpu_info.h"
#include "sparsellm/gemm.h"

namespace sparsellm {
namespace membw_detail {
float read_sum_avx512(const float* p, int64_t n);
float read_sum_avx2(const float* p, int64_t n);
}  // namespace membw_detail

namespace {

float read_sum_portable(const float* p, int64_t n) {
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) s[j] += p[i + j];
  for (; i < n; ++i) s[0] += p[i];
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

}  // namespace

double memory_bandwidth_gbs(int64_t bytes) {
  if (bytes < (int64_t(1) << 20)) throw std::invalid_argument("memoryBandwidth: buffer must be at least 1 MiB");
  const int64_t n = bytes / 64 * 16;  // whole cache lines of floats
  float* buf = static_cast<float*>(std::aligned_alloc(64, static_cast<size_t>(n) * sizeof(float)));
  if (!buf) throw std::bad_alloc();
  const Isa isa = active_isa();
  float (*sum)(const float*, int64_t) = isa == Isa::Avx512 ? membw_detail::read_sum_avx512
                                        : isa == Isa::Avx2 ? membw_detail::read_sum_avx2
                                                           : read_sum_portable;
  const int threads = std::max(1, num_threads());
  // First touch from the threads that will read (pages land where they are used).
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(i & 1023) * 1e-3f;
  volatile float sink = 0;
  double best = 0;
  for (int pass = 0; pass < 5; ++pass) {
    float total = 0;
    const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
      const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
      const int64_t lines = n / 16;
      const int64_t a = lines * tid / nt * 16, b = lines * (tid + 1) / nt * 16;
      total += sum(buf + a, b - a);
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    sink = sink + total;
    if (pass > 0) best = std::max(best, static_cast<double>(n) * sizeof(float) / s / 1e9);
  }
  std::free(buf);
  (void)sink;
  return best;
}

}  // namespace sparsellm
