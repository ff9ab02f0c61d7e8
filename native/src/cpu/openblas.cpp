// Run-time loading of OpenBLAS (see openblas.h). Only the four symbols we need are resolved.
#include "sparsellm/openblas.h"

#include <dlfcn.h>

#include <cstdlib>
#include <mutex>
#include <stdexcept>

#include "sparsellm/cpu_info.h"

namespace sparsellm {
namespace {

// cblas enum values (fixed by the CBLAS standard).
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

using SgemmFn = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int, float, float*, int);
using CharFn = char* (*)();
using SetThreadsFn = void (*)(int);

struct Library {
  OpenBlasInfo info;
  SgemmFn sgemm = nullptr;
  SetThreadsFn set_threads = nullptr;
  int threads = -1;
  std::mutex mu;  // serialises calls: OpenBLAS's thread count is global
};

Library& load() {
  static Library lib;
  static std::once_flag once;
  std::call_once(once, [] {
    // OpenBLAS reads OPENBLAS_CORETYPE once, when it is loaded. Force the core we compare
    // against (SPARSELLM_OPENBLAS_CORETYPE, else SkylakeX on AVX-512 CPUs) for the load only,
    // then restore the caller's environment.
    const char* prev = std::getenv("OPENBLAS_CORETYPE");
    const std::string saved = prev ? prev : "";
    const char* wanted = std::getenv("SPARSELLM_OPENBLAS_CORETYPE");
    if (!wanted && cpu_info().avx512) wanted = "SkylakeX";
    if (wanted && *wanted) setenv("OPENBLAS_CORETYPE", wanted, 1);
    std::string errors;
    void* h = nullptr;
    for (const char* name : {"libopenblas.so.0", "libopenblas.so"}) {
      h = dlopen(name, RTLD_NOW | RTLD_LOCAL);
      if (h) {
        lib.info.path = name;
        break;
      }
      const char* e = dlerror();
      errors += std::string(errors.empty() ? "" : "; ") + (e ? e : name);
    }
    if (wanted && *wanted) {
      if (prev) setenv("OPENBLAS_CORETYPE", saved.c_str(), 1);
      else unsetenv("OPENBLAS_CORETYPE");
    }
    if (!h) {
      lib.info.reason = "OpenBLAS not found (" + errors + "); install it with: apt-get install libopenblas-dev";
      return;
    }
    lib.sgemm = reinterpret_cast<SgemmFn>(dlsym(h, "cblas_sgemm"));
    auto corename = reinterpret_cast<CharFn>(dlsym(h, "openblas_get_corename"));
    auto config = reinterpret_cast<CharFn>(dlsym(h, "openblas_get_config"));
    lib.set_threads = reinterpret_cast<SetThreadsFn>(dlsym(h, "openblas_set_num_threads"));
    if (!lib.sgemm || !corename || !config || !lib.set_threads) {
      lib.info.reason = lib.info.path + " lacks cblas_sgemm/openblas_get_corename/openblas_get_config/openblas_set_num_threads";
      return;
    }
    if (const char* c = corename()) lib.info.core_name = c;
    if (const char* c = config()) lib.info.config = c;
    // Report the path the dynamic loader actually resolved.
    Dl_info dl;
    if (dladdr(reinterpret_cast<void*>(lib.sgemm), &dl) && dl.dli_fname) lib.info.path = dl.dli_fname;
    lib.info.available = true;
  });
  return lib;
}

}  // namespace

const OpenBlasInfo& openblas_info() { return load().info; }

void openblas_sgemm(const float* A, int64_t lda, int64_t M, const float* W, int64_t ldw, int64_t N, int64_t K,
                    float* C, int64_t ldc) {
  Library& lib = load();
  if (!lib.info.available) throw std::runtime_error(lib.info.reason);
  const int64_t limit = 0x7fffffff;
  if (M > limit || N > limit || K > limit || lda > limit || ldw > limit || ldc > limit)
    throw std::invalid_argument("openblas_sgemm: dimensions exceed 32-bit BLAS integers");
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {  // an empty sum; BLAS would reject lda = 0
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) C[m * ldc + n] = 0.f;
    return;
  }
  std::lock_guard<std::mutex> lock(lib.mu);
  const int t = num_threads();
  if (t != lib.threads) {
    lib.set_threads(t);
    lib.threads = t;
  }
  lib.sgemm(kRowMajor, kNoTrans, kTrans, static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), 1.0f, A,
            static_cast<int>(lda), W, static_cast<int>(ldw), 0.0f, C, static_cast<int>(ldc));
}

}  // namespace sparsellm
