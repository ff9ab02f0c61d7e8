// Minimal test harness for the C++ tests (no dependency): CHECK macros, a float64 comparison
// helper and a seeded RNG. Each test binary returns non-zero on the first failed group.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

namespace check {

inline int& failures() { static int n = 0; return n; }

#define CHECK(cond, ...)                                                   \
  do {                                                                     \
    if (!(cond)) {                                                         \
      std::fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                   \
      std::fprintf(stderr, "\n");                                          \
      ++check::failures();                                                 \
    }                                                                      \
  } while (0)

// Relative error ||a - ref|| / ||ref|| (Frobenius), computed in float64.
template <typename T>
double rel_error(const T* a, const double* ref, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; ++i) {
    double d = static_cast<double>(a[i]) - ref[i];
    if (std::isnan(static_cast<double>(a[i]))) return INFINITY;
    num += d * d;
    den += ref[i] * ref[i];
  }
  return den == 0 ? std::sqrt(num) : std::sqrt(num / den);
}

// Fresh seed per run unless SPARSELLM_TEST_SEED is set; printed so a failure can be replayed.
inline uint64_t test_seed() {
  static uint64_t seed = [] {
    const char* env = std::getenv("SPARSELLM_TEST_SEED");
    uint64_t s = env ? std::strtoull(env, nullptr, 10) : std::random_device{}();
    std::fprintf(stderr, "seed %llu (set SPARSELLM_TEST_SEED to replay)\n", static_cast<unsigned long long>(s));
    return s;
  }();
  return seed;
}

inline int finish(const char* name) {
  if (failures()) {
    std::fprintf(stderr, "%s: %d check(s) failed\n", name, failures());
    return 1;
  }
  std::fprintf(stderr, "%s: all checks passed\n", name);
  return 0;
}

}  // namespace check
