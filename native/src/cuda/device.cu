// Device discovery for the CUDA backend. cudart is static, so this runs (and reports the
// reason) on machines with no NVIDIA driver at all.
#include <cuda_runtime.h>

#include "sparsellm/cuda_status.h"

namespace sparsellm {

CudaStatus cuda_query() {
  CudaStatus s;
  s.compiled = true;
  s.archs = {"sm_80", "sm_90a"};  // CMAKE_CUDA_ARCHITECTURES (native/CMakeLists.txt)
  cudaRuntimeGetVersion(&s.runtime_version);
  if (cudaDriverGetVersion(&s.driver_version) != cudaSuccess) s.driver_version = 0;
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    s.reason = s.driver_version == 0
                   ? std::string("no NVIDIA driver found (libcuda.so is not loadable here)")
                   : std::string("no usable CUDA device: ") + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
    cudaGetLastError();
    return s;
  }
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp p{};
    if (cudaGetDeviceProperties(&p, i) != cudaSuccess) continue;
    CudaDevice d;
    d.index = i;
    d.name = p.name;
    d.cc_major = p.major;
    d.cc_minor = p.minor;
    d.total_memory = static_cast<int64_t>(p.totalGlobalMem);
    d.multiprocessors = p.multiProcessorCount;
    s.devices.push_back(d);
  }
  bool supported = false;
  for (const auto& d : s.devices) supported |= d.cc_major >= 8;
  s.usable = supported;
  if (!supported) s.reason = s.devices.empty() ? "no CUDA device found" : "no device of compute capability 8.0 or newer";
  return s;
}

}  // namespace sparsellm
