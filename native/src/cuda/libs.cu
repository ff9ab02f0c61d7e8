// cuBLAS and NVML loaded at run time (dlopen), so the addon has no link-time dependency on
// either: cuBLAS is the reference our GEMM is timed against, NVML the energy counter.
#include <cuda_runtime.h>
#include <dlfcn.h>
#include <library_types.h>

#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>

#include "common.cuh"
#include "sparsellm/cuda_ops.h"

namespace sparsellm::cuda {
namespace {

// --- cuBLAS (the few entry points we use, declared by their documented C signatures) ----------
using cublasHandle = void*;
using CublasCreate = int (*)(cublasHandle*);
using CublasSetStream = int (*)(cublasHandle, cudaStream_t);
using CublasGemmEx = int (*)(cublasHandle, int, int, int, int, int, const void*, const void*, cudaDataType, int,
                             const void*, cudaDataType, int, const void*, void*, cudaDataType, int, int, int);
constexpr int kCublasOpN = 0, kCublasOpT = 1, kCublasCompute32F = 68, kCublasCompute32FFast16BF = 75,
              kCublasGemmDefault = -1;

struct CublasLib {
  bool ok = false;
  std::string reason, path;
  CublasGemmEx gemm = nullptr;
  cublasHandle handle = nullptr;
};

CublasLib& cublas() {
  static CublasLib lib;
  static std::once_flag once;
  std::call_once(once, [] {
    const char* env = std::getenv("SPARSELLM_CUBLAS");
    const std::string names[] = {env ? env : "", "libcublas.so.13", "libcublas.so.12", "/usr/local/cuda/lib64/libcublas.so.13",
                                 "/usr/local/cuda/lib64/libcublas.so.12", "libcublas.so"};
    void* h = nullptr;
    std::string tried;
    for (const auto& n : names) {
      if (n.empty()) continue;
      h = dlopen(n.c_str(), RTLD_NOW | RTLD_LOCAL);
      if (h) {
        lib.path = n;
        break;
      }
      const char* e = dlerror();
      tried += (tried.empty() ? "" : "; ") + std::string(e ? e : n.c_str());
    }
    if (!h) {
      lib.reason = "libcublas not found (" + tried + "); set SPARSELLM_CUBLAS to its path";
      return;
    }
    auto create = reinterpret_cast<CublasCreate>(dlsym(h, "cublasCreate_v2"));
    auto set_stream = reinterpret_cast<CublasSetStream>(dlsym(h, "cublasSetStream_v2"));
    lib.gemm = reinterpret_cast<CublasGemmEx>(dlsym(h, "cublasGemmEx"));
    if (!create || !set_stream || !lib.gemm) {
      lib.reason = lib.path + " lacks cublasCreate_v2/cublasSetStream_v2/cublasGemmEx";
      return;
    }
    const int st = create(&lib.handle);
    if (st != 0) {
      lib.reason = "cublasCreate_v2 failed with status " + std::to_string(st);
      return;
    }
    set_stream(lib.handle, nullptr);
    lib.ok = true;
  });
  return lib;
}

// --- NVML --------------------------------------------------------------------------------------
using nvmlDevice = void*;
using NvmlInit = int (*)();
using NvmlByPci = int (*)(const char*, nvmlDevice*);
using NvmlEnergy = int (*)(nvmlDevice, unsigned long long*);
using NvmlDriver = int (*)(char*, unsigned int);

struct NvmlLib {
  bool ok = false;
  std::string reason, driver;
  nvmlDevice dev = nullptr;
  NvmlEnergy energy = nullptr;
};

NvmlLib& nvml() {
  static NvmlLib lib;
  static std::once_flag once;
  std::call_once(once, [] {
    void* h = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!h) {
      const char* e = dlerror();
      lib.reason = std::string("libnvidia-ml.so.1 not loadable: ") + (e ? e : "unknown error");
      return;
    }
    auto init = reinterpret_cast<NvmlInit>(dlsym(h, "nvmlInit_v2"));
    auto by_pci = reinterpret_cast<NvmlByPci>(dlsym(h, "nvmlDeviceGetHandleByPciBusId_v2"));
    lib.energy = reinterpret_cast<NvmlEnergy>(dlsym(h, "nvmlDeviceGetTotalEnergyConsumption"));
    auto driver = reinterpret_cast<NvmlDriver>(dlsym(h, "nvmlSystemGetDriverVersion"));
    if (!init || !by_pci || !lib.energy) {
      lib.reason = "libnvidia-ml.so.1 lacks the entry points used";
      return;
    }
    if (int st = init(); st != 0) {
      lib.reason = "nvmlInit_v2 failed with status " + std::to_string(st);
      return;
    }
    if (driver) {
      char buf[96] = {0};
      if (driver(buf, sizeof buf) == 0) lib.driver = buf;
    }
    int dev = 0;
    char pci[64] = {0};
    if (cudaGetDevice(&dev) != cudaSuccess || cudaDeviceGetPCIBusId(pci, sizeof pci, dev) != cudaSuccess) {
      cudaGetLastError();
      lib.reason = "cannot read the CUDA device's PCI bus id";
      return;
    }
    if (int st = by_pci(pci, &lib.dev); st != 0) {
      lib.reason = "nvmlDeviceGetHandleByPciBusId_v2(" + std::string(pci) + ") failed with status " + std::to_string(st);
      return;
    }
    unsigned long long mj = 0;
    if (int st = lib.energy(lib.dev, &mj); st != 0) {
      lib.reason = "nvmlDeviceGetTotalEnergyConsumption is not supported here (status " + std::to_string(st) + ")";
      return;
    }
    lib.ok = true;
  });
  return lib;
}

}  // namespace

bool Cublas::available(std::string* reason) {
  require_device();
  CublasLib& l = cublas();
  if (!l.ok && reason) *reason = l.reason;
  return l.ok;
}

std::string Cublas::library() { return cublas().path; }

void Cublas::gemm_bf16(const uint16_t* A, int64_t lda, const uint16_t* W, int64_t ldw, int64_t M, int64_t N, int64_t K,
                       void* out, int64_t ldo, bool out_bf16) {
  CublasLib& l = cublas();
  if (!l.ok) throw std::runtime_error("cuBLAS unavailable: " + l.reason);
  // Row-major out[M, N] = A · Wᵀ is column-major outᵀ[N, M] = W(ᵀ as stored) · Aᵀ: op(W) = T.
  const float alpha = 1.f, beta = 0.f;
  const int st = l.gemm(l.handle, kCublasOpT, kCublasOpN, static_cast<int>(N), static_cast<int>(M), static_cast<int>(K),
                        &alpha, W, CUDA_R_16BF, static_cast<int>(ldw), A, CUDA_R_16BF, static_cast<int>(lda), &beta, out,
                        out_bf16 ? CUDA_R_16BF : CUDA_R_32F, static_cast<int>(ldo), kCublasCompute32F, kCublasGemmDefault);
  if (st != 0) throw std::runtime_error("cublasGemmEx failed with status " + std::to_string(st));
}

void Cublas::gemm_f32_fast_bf16(const float* A, int64_t lda, bool ta, const float* B, int64_t ldb, bool tb, int64_t M,
                                int64_t N, int64_t K, float* out, int64_t ldo) {
  CublasLib& l = cublas();
  if (!l.ok) throw std::runtime_error("cuBLAS unavailable: " + l.reason);
  // Row-major out[M, N] = op(A)·op(B) is column-major outᵀ[N, M] = op(B)ᵀ·op(A)ᵀ; a row-major
  // matrix is its column-major transpose, so an operand stored as needed takes op N, else T.
  const float alpha = 1.f, beta = 0.f;
  const int st = l.gemm(l.handle, tb ? kCublasOpT : kCublasOpN, ta ? kCublasOpT : kCublasOpN, static_cast<int>(N),
                        static_cast<int>(M), static_cast<int>(K), &alpha, B, CUDA_R_32F, static_cast<int>(ldb), A,
                        CUDA_R_32F, static_cast<int>(lda), &beta, out, CUDA_R_32F, static_cast<int>(ldo),
                        kCublasCompute32FFast16BF, kCublasGemmDefault);
  if (st != 0) throw std::runtime_error("cublasGemmEx (f32, fast bf16) failed with status " + std::to_string(st));
}

bool Nvml::available(std::string* reason) {
  require_device();
  NvmlLib& l = nvml();
  if (!l.ok && reason) *reason = l.reason;
  return l.ok;
}

uint64_t Nvml::energy_mj() {
  NvmlLib& l = nvml();
  if (!l.ok) throw std::runtime_error("NVML unavailable: " + l.reason);
  unsigned long long mj = 0;
  if (int st = l.energy(l.dev, &mj); st != 0)
    throw std::runtime_error("nvmlDeviceGetTotalEnergyConsumption failed with status " + std::to_string(st));
  return mj;
}

std::string Nvml::driver_version() { return nvml().driver; }

}  // namespace sparsellm::cuda
