// See kernel_policy.h.
#include <cstdlib>
#include <cstring>

#include "kernel_policy.h"

namespace sparsellm::cuda {
namespace {

bool from_env() {
  const char* v = std::getenv("SPARSELLM_CUDA_UNVERIFIED");
  return v && std::strcmp(v, "1") == 0;
}

bool g_unverified = from_env();
AttentionKernel g_attention = AttentionKernel::Auto;

}  // namespace

bool unverified_kernels() { return g_unverified; }
void set_unverified_kernels(bool on) { g_unverified = on; }
AttentionKernel attention_kernel_choice() { return g_attention; }
void set_attention_kernel(AttentionKernel k) { g_attention = k; }

}  // namespace sparsellm::cuda
