#include "sparsellm/cpu_info.h"

#include <omp.h>

#include <cpuid.h>
#include <cstdlib>
#include <cstring>
#include <algorithm>

namespace sparsellm {
namespace {

std::string read_brand() {
  unsigned int regs[12] = {0};
  unsigned int max_ext = __get_cpuid_max(0x80000000u, nullptr);
  if (max_ext < 0x80000004u) return "unknown";
  for (unsigned int i = 0; i < 3; ++i)
    __get_cpuid(0x80000002u + i, &regs[i * 4], &regs[i * 4 + 1], &regs[i * 4 + 2], &regs[i * 4 + 3]);
  std::string s(reinterpret_cast<const char*>(regs), 48);
  s = s.c_str();
  while (!s.empty() && s.back() == ' ') s.pop_back();
  return s.empty() ? "unknown" : s;
}

CpuInfo detect() {
  CpuInfo info;
  __builtin_cpu_init();
  info.avx2_fma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  info.avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  // AVX512_BF16 is CPUID.(EAX=7,ECX=1):EAX[5]; AMX-TILE is CPUID.(EAX=7,ECX=0):EDX[24].
  unsigned int a, b, c, d;
  if (__get_cpuid_count(7, 1, &a, &b, &c, &d)) info.avx512_bf16 = info.avx512 && (a & (1u << 5));
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) info.amx = (d & (1u << 24)) != 0;
  info.brand = read_brand();
  return info;
}

Isa g_limit = Isa::Avx512;
bool g_limit_from_env = false;

}  // namespace

const CpuInfo& cpu_info() {
  static const CpuInfo info = detect();
  return info;
}

Isa active_isa() {
  if (!g_limit_from_env) {
    g_limit_from_env = true;
    if (const char* env = std::getenv("SPARSELLM_ISA")) {
      if (!std::strcmp(env, "portable")) g_limit = Isa::Portable;
      else if (!std::strcmp(env, "avx2")) g_limit = Isa::Avx2;
    }
  }
  const CpuInfo& info = cpu_info();
  Isa best = info.avx512 ? Isa::Avx512 : info.avx2_fma ? Isa::Avx2 : Isa::Portable;
  return static_cast<Isa>(std::min(static_cast<int>(best), static_cast<int>(g_limit)));
}

void set_isa_limit(Isa limit) {
  g_limit_from_env = true;
  g_limit = limit;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "portable";
  }
}

int num_threads() { return omp_get_max_threads(); }

void set_num_threads(int n) { omp_set_num_threads(std::max(1, n)); }

}  // namespace sparsellm
