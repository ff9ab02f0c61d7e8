// What the CUDA backend can do on this machine. A plain C++ header: no CUDA types, so that
// the Node-API code never goes through nvcc and builds without CUDA include the same file.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace sparsellm {

struct CudaDevice {
  int index = 0;
  std::string name;
  int cc_major = 0, cc_minor = 0;  // compute capability
  int64_t total_memory = 0;        // bytes
  int multiprocessors = 0;
};

struct CudaStatus {
  bool compiled = false;            // this build contains CUDA code
  std::vector<std::string> archs;   // the SM targets compiled in
  bool usable = false;              // a driver and at least one supported device are present
  std::string reason;               // why not usable (empty when usable)
  int runtime_version = 0;          // e.g. 13000
  int driver_version = 0;           // 0 when no driver
  std::vector<CudaDevice> devices;
};

// Never throws and never fails to load: cudart is linked statically, and a machine without a
// driver reports usable=false with the driver's own reason.
CudaStatus cuda_status();

}  // namespace sparsellm
