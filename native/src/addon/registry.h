// Each binding file registers its exports with a static AddonRegistrar, so adding a binding
// never touches module initialisation.
#pragma once
#include <napi.h>

#include <functional>
#include <vector>

namespace sparsellm::addon {

using RegisterFn = std::function<void(Napi::Env, Napi::Object)>;

std::vector<RegisterFn>& registry();

struct AddonRegistrar {
  explicit AddonRegistrar(RegisterFn fn) { registry().push_back(std::move(fn)); }
};

// Throws a JS Error with a message; for argument validation in bindings.
[[noreturn]] inline void throw_js(Napi::Env env, const std::string& message) {
  throw Napi::Error::New(env, message);
}

}  // namespace sparsellm::addon
