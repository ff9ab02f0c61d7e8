// Bridges to the CUDA backend when it is compiled in; otherwise says why it is absent.
#include "sparsellm/cuda_status.h"

namespace sparsellm {

#ifdef SPARSELLM_HAVE_CUDA
CudaStatus cuda_query();  // native/src/cuda/device.cu
CudaStatus cuda_status() { return cuda_query(); }
#else
CudaStatus cuda_status() {
  CudaStatus s;
  s.compiled = false;
  s.reason = "this build has no CUDA backend (nvcc was not found at install time, or SPARSELLM_CUDA=0)";
  return s;
}
#endif

}  // namespace sparsellm
