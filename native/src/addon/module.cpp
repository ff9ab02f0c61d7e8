// Node-API module entry: runs every registered binding. No math here.
#include "registry.h"

namespace sparsellm::addon {

std::vector<RegisterFn>& registry() {
  static std::vector<RegisterFn> fns;
  return fns;
}

}  // namespace sparsellm::addon

static Napi::Object Init(Napi::Env env, Napi::Object exports) {
  for (auto& fn : sparsellm::addon::registry()) fn(env, exports);
  return exports;
}

NODE_API_MODULE(sparsellm, Init)
