// OpenBLAS as a reference library, loaded at run time with dlopen (never linked), so that the
// engine builds and runs without it. Used only to compare our dense GEMM against.
#pragma once
#include <cstdint>
#include <string>

namespace sparsellm {

struct OpenBlasInfo {
  bool available = false;
  std::string path;       // the library that was loaded (e.g. libopenblas.so.0)
  std::string core_name;  // openblas_get_corename(): the kernel set it dispatches to
  std::string config;     // openblas_get_config(): build options
  std::string reason;     // why it is unavailable (empty when available)
};

// Loads the library on first call. OpenBLAS picks its kernels when it is loaded, from
// OPENBLAS_CORETYPE or its own detection (which misdetects recent AMD CPUs and falls back to
// slower kernels). The reference we compare against is the SkylakeX core, so on CPUs with
// AVX-512 OPENBLAS_CORETYPE is set to SkylakeX for the duration of the load (overriding any
// value in the environment, which is restored afterwards); SPARSELLM_OPENBLAS_CORETYPE chooses
// another core. core_name reports what OpenBLAS actually uses.
const OpenBlasInfo& openblas_info();

// C[M, N] = A[M, K] · Wᵀ with cblas_sgemm (W [N, K] f32, row-major), using num_threads()
// OpenBLAS threads. Throws std::runtime_error with the reason when OpenBLAS is unavailable.
void openblas_sgemm(const float* A, int64_t lda, int64_t M, const float* W, int64_t ldw, int64_t N, int64_t K,
                    float* C, int64_t ldc);

}  // namespace sparsellm
