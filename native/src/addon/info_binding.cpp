// Bindings: build and backend information, thread count, ISA limit.
#include "registry.h"
#include "sparsellm/cpu_info.h"
#include "sparsellm/cuda_status.h"

namespace sparsellm::addon {
namespace {

Napi::Value BuildInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object out = Napi::Object::New(env);
  const CpuInfo& cpu = cpu_info();
  Napi::Object c = Napi::Object::New(env);
  c.Set("brand", cpu.brand);
  c.Set("isa", isa_name(active_isa()));
  c.Set("avx2", cpu.avx2_fma);
  c.Set("avx512", cpu.avx512);
  c.Set("avx512bf16", cpu.avx512_bf16);
  c.Set("amx", cpu.amx);
  c.Set("threads", num_threads());
  out.Set("cpu", c);

  CudaStatus s = cuda_status();
  Napi::Object g = Napi::Object::New(env);
  g.Set("compiled", s.compiled);
  Napi::Array archs = Napi::Array::New(env, s.archs.size());
  for (size_t i = 0; i < s.archs.size(); ++i) archs.Set(i, s.archs[i]);
  g.Set("archs", archs);
  g.Set("usable", s.usable);
  g.Set("reason", s.reason);
  g.Set("runtimeVersion", s.runtime_version);
  g.Set("driverVersion", s.driver_version);
  Napi::Array devs = Napi::Array::New(env, s.devices.size());
  for (size_t i = 0; i < s.devices.size(); ++i) {
    const CudaDevice& d = s.devices[i];
    Napi::Object o = Napi::Object::New(env);
    o.Set("index", d.index);
    o.Set("name", d.name);
    o.Set("computeCapability", std::to_string(d.cc_major) + "." + std::to_string(d.cc_minor));
    o.Set("totalMemory", static_cast<double>(d.total_memory));
    o.Set("multiprocessors", d.multiprocessors);
    devs.Set(i, o);
  }
  g.Set("devices", devs);
  out.Set("cuda", g);
#ifdef __VERSION__
  out.Set("compiler", "gcc " __VERSION__);
#endif
  return out;
}

Napi::Value SetThreads(const Napi::CallbackInfo& info) {
  if (info.Length() != 1 || !info[0].IsNumber()) throw_js(info.Env(), "setThreads(n): n must be a number");
  int n = info[0].As<Napi::Number>().Int32Value();
  if (n < 1) throw_js(info.Env(), "setThreads(n): n must be at least 1");
  set_num_threads(n);
  return info.Env().Undefined();
}

Napi::Value SetIsa(const Napi::CallbackInfo& info) {
  if (info.Length() != 1 || !info[0].IsString()) throw_js(info.Env(), "setIsa(name): name must be a string");
  std::string name = info[0].As<Napi::String>().Utf8Value();
  if (name == "portable") set_isa_limit(Isa::Portable);
  else if (name == "avx2") set_isa_limit(Isa::Avx2);
  else if (name == "avx512") set_isa_limit(Isa::Avx512);
  else throw_js(info.Env(), "setIsa: unknown ISA '" + name + "' (portable, avx2, avx512)");
  return Napi::String::New(info.Env(), isa_name(active_isa()));
}

AddonRegistrar reg([](Napi::Env env, Napi::Object exports) {
  exports.Set("buildInfo", Napi::Function::New(env, BuildInfo));
  exports.Set("setThreads", Napi::Function::New(env, SetThreads));
  exports.Set("setIsa", Napi::Function::New(env, SetIsa));
});

}  // namespace
}  // namespace sparsellm::addon
