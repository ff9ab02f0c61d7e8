// CPU capabilities detected at run time, and the thread count the engine uses.
#pragma once
#include <string>

namespace sparsellm {

enum class Isa { Portable = 0, Avx2 = 1, Avx512 = 2 };

struct CpuInfo {
  bool avx2_fma = false;     // AVX2 + FMA + F16C
  bool avx512 = false;       // AVX-512 F/BW/VL/DQ
  bool avx512_bf16 = false;  // AVX512_BF16 (vdpbf16ps, vcvtne2ps2bf16)
  bool amx = false;          // AMX tiles (reported only; not used yet)
  std::string brand;         // CPU model string
};

const CpuInfo& cpu_info();

// The ISA the kernels dispatch to: the best one detected, unless lowered by
// set_isa_limit() or the SPARSELLM_ISA environment variable (portable|avx2|avx512).
Isa active_isa();
void set_isa_limit(Isa limit);
const char* isa_name(Isa isa);

// Threads used by the OpenMP kernels (defaults to OMP_NUM_THREADS or the core count).
int num_threads();
void set_num_threads(int n);

}  // namespace sparsellm
