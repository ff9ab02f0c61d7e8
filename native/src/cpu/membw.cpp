// Memory-bandwidth probe: every thread reads its share of a buffer far larger than the caches;
// the best of several passes gives the sustained read bandwidth (GB/s, 1e9 bytes per second)
// that memory-bound kernels (the decode GEMV) are compared with. The buffer is advised for
// transparent huge pages, as the model runtime's resident weights are, so that the probe is not
// weaker than what it is compared with (4 KiB pages read ~15% slower here).
#include <omp.h>
#include <sys/mman.h>

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
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t region = (static_cast<size_t>(n) * sizeof(float) + kHuge - 1) / kHuge * kHuge + kHuge;
  void* mem = ::mmap(nullptr, region, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) throw std::bad_alloc();
  float* buf = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(mem) + kHuge - 1) / kHuge * kHuge);
  ::madvise(buf, region - kHuge, MADV_HUGEPAGE);
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
  ::munmap(mem, region);
  (void)sink;
  return best;
}

}  // namespace sparsellm
