// Bindings: dense GEMM, the OpenBLAS reference, the memory-bandwidth probe and native timing.
// No math here: argument checks and conversions only.
//
//   gemm(A: Float32Array [M*K], M, K, W: Float32Array | Uint16Array (bf16 bits) [N*K], N,
//        out?: Float32Array [M*N]) → Float32Array [M*N]          C = A · Wᵀ
//   openblasInfo() → { available, path, coreName, config, reason }
//   openblasSgemm(A, M, K, W: Float32Array, N, out?) → Float32Array   (throws when absent)
//   memoryBandwidth(bytes?: number = 1 GiB) → GB/s
//   timeGemm({ M, K, N, dtype?: 'f32'|'bf16', impl?: 'ours'|'openblas', repeats?, warmup?,
//              coldBytes?, clock?: 'wall'|'thread-cpu' }) → { medianMs, minMs, maxMs, repeats,
//              weightCopies }
//   gemmInfo() → { kernel, tuning: { kc, nc, mc, mcEpilogue, gemvMaxM } } (gemvMaxM effective)
#include <cmath>
#include <string>

#include "registry.h"
#include "sparsellm/gemm.h"
#include "sparsellm/openblas.h"

namespace sparsellm::addon {
namespace {

int64_t dim(Napi::Env env, const Napi::Value& v, const char* fn, const char* name, int64_t lo) {
  if (!v.IsNumber()) throw_js(env, std::string(fn) + ": " + name + " must be a number");
  const double d = v.As<Napi::Number>().DoubleValue();
  if (!std::isfinite(d) || d != std::floor(d) || d < static_cast<double>(lo) || d > 9.0e15)
    throw_js(env, std::string(fn) + ": " + name + " must be an integer >= " + std::to_string(lo));
  return static_cast<int64_t>(d);
}

const float* f32_in(Napi::Env env, const Napi::Value& v, size_t n, const char* fn, const char* name) {
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
    throw_js(env, std::string(fn) + ": " + name + " must be a Float32Array");
  Napi::Float32Array a = v.As<Napi::Float32Array>();
  if (a.ElementLength() < n)
    throw_js(env, std::string(fn) + ": " + name + " has " + std::to_string(a.ElementLength()) +
                      " elements, needs " + std::to_string(n));
  return a.Data();
}

// The output array: `out` when given (checked), else a new one.
Napi::Float32Array output(const Napi::CallbackInfo& info, size_t i, size_t n, const char* fn) {
  if (info.Length() > i && !info[i].IsUndefined() && !info[i].IsNull()) {
    const Napi::Value& v = info[i];
    if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
      throw_js(info.Env(), std::string(fn) + ": out must be a Float32Array");
    Napi::Float32Array a = v.As<Napi::Float32Array>();
    if (a.ElementLength() < n)
      throw_js(info.Env(), std::string(fn) + ": out has " + std::to_string(a.ElementLength()) + " elements, needs " +
                               std::to_string(n));
    return a;
  }
  return Napi::Float32Array::New(info.Env(), n);
}

Napi::Value Gemm(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* fn = "gemm";
  if (info.Length() < 5) throw_js(env, "gemm(A, M, K, W, N, out?): too few arguments");
  const int64_t M = dim(env, info[1], fn, "M", 0), K = dim(env, info[2], fn, "K", 0), N = dim(env, info[4], fn, "N", 0);
  const float* A = f32_in(env, info[0], static_cast<size_t>(M * K), fn, "A");
  WeightView w;
  w.rows = N;
  w.cols = K;
  w.ld = K;
  const Napi::Value& wv = info[3];
  if (wv.IsTypedArray() && wv.As<Napi::TypedArray>().TypedArrayType() == napi_uint16_array) {
    Napi::Uint16Array a = wv.As<Napi::Uint16Array>();
    if (a.ElementLength() < static_cast<size_t>(N * K))
      throw_js(env, "gemm: W has " + std::to_string(a.ElementLength()) + " elements, needs " + std::to_string(N * K));
    w.data = a.Data();
    w.dtype = DType::BF16;
  } else if (wv.IsTypedArray() && wv.As<Napi::TypedArray>().TypedArrayType() == napi_float32_array) {
    w.data = f32_in(env, wv, static_cast<size_t>(N * K), fn, "W");
    w.dtype = DType::F32;
  } else {
    throw_js(env, "gemm: W must be a Float32Array (f32) or a Uint16Array (bf16 bits)");
  }
  Napi::Float32Array out = output(info, 5, static_cast<size_t>(M * N), fn);
  try {
    gemm(A, K, M, w, out.Data(), N);
  } catch (const std::exception& e) {
    throw_js(env, e.what());
  }
  return out;
}

Napi::Value OpenblasInfo(const Napi::CallbackInfo& info) {
  const OpenBlasInfo& o = openblas_info();
  Napi::Object r = Napi::Object::New(info.Env());
  r.Set("available", o.available);
  r.Set("path", o.path);
  r.Set("coreName", o.core_name);
  r.Set("config", o.config);
  r.Set("reason", o.reason);
  return r;
}

Napi::Value OpenblasSgemm(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* fn = "openblasSgemm";
  if (info.Length() < 5) throw_js(env, "openblasSgemm(A, M, K, W, N, out?): too few arguments");
  const int64_t M = dim(env, info[1], fn, "M", 0), K = dim(env, info[2], fn, "K", 0), N = dim(env, info[4], fn, "N", 0);
  const float* A = f32_in(env, info[0], static_cast<size_t>(M * K), fn, "A");
  const float* W = f32_in(env, info[3], static_cast<size_t>(N * K), fn, "W");
  Napi::Float32Array out = output(info, 5, static_cast<size_t>(M * N), fn);
  try {
    openblas_sgemm(A, K > 0 ? K : 1, M, W, K > 0 ? K : 1, N, K, out.Data(), N > 0 ? N : 1);
  } catch (const std::exception& e) {
    throw_js(env, std::string("openblasSgemm: ") + e.what());
  }
  return out;
}

Napi::Value MemoryBandwidth(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int64_t bytes = int64_t(1) << 30;
  if (info.Length() > 0 && !info[0].IsUndefined()) bytes = dim(env, info[0], "memoryBandwidth", "bytes", 1 << 20);
  try {
    return Napi::Number::New(env, memory_bandwidth_gbs(bytes));
  } catch (const std::exception& e) {
    throw_js(env, std::string("memoryBandwidth: ") + e.what());
  }
}

Napi::Value TimeGemm(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const char* fn = "timeGemm";
  if (info.Length() < 1 || !info[0].IsObject()) throw_js(env, "timeGemm(options): options must be an object");
  Napi::Object o = info[0].As<Napi::Object>();
  GemmTimingRequest r;
  r.M = dim(env, o.Get("M"), fn, "M", 1);
  r.K = dim(env, o.Get("K"), fn, "K", 1);
  r.N = dim(env, o.Get("N"), fn, "N", 1);
  if (o.Has("dtype") && !o.Get("dtype").IsUndefined()) {
    const std::string d = o.Get("dtype").ToString().Utf8Value();
    if (d == "bf16") r.dtype = DType::BF16;
    else if (d != "f32") throw_js(env, "timeGemm: dtype must be 'f32' or 'bf16'");
  }
  if (o.Has("impl") && !o.Get("impl").IsUndefined()) {
    const std::string s = o.Get("impl").ToString().Utf8Value();
    if (s == "openblas") r.openblas = true;
    else if (s != "ours") throw_js(env, "timeGemm: impl must be 'ours' or 'openblas'");
  }
  if (o.Has("repeats") && !o.Get("repeats").IsUndefined()) r.repeats = static_cast<int>(dim(env, o.Get("repeats"), fn, "repeats", 1));
  if (o.Has("warmup") && !o.Get("warmup").IsUndefined()) r.warmup = static_cast<int>(dim(env, o.Get("warmup"), fn, "warmup", 0));
  if (o.Has("coldBytes") && !o.Get("coldBytes").IsUndefined()) r.cold_bytes = dim(env, o.Get("coldBytes"), fn, "coldBytes", 0);
  if (o.Has("clock") && !o.Get("clock").IsUndefined()) {
    const std::string c = o.Get("clock").ToString().Utf8Value();
    if (c == "thread-cpu") r.thread_cpu_clock = true;
    else if (c != "wall") throw_js(env, "timeGemm: clock must be 'wall' or 'thread-cpu'");
  }
  GemmTiming t;
  try {
    t = time_gemm(r);
  } catch (const std::exception& e) {
    throw_js(env, std::string("timeGemm: ") + e.what());
  }
  Napi::Object out = Napi::Object::New(env);
  out.Set("medianMs", t.median_ms);
  out.Set("minMs", t.min_ms);
  out.Set("maxMs", t.max_ms);
  out.Set("repeats", t.repeats);
  out.Set("weightCopies", static_cast<double>(t.weight_copies));
  return out;
}

Napi::Value GemmInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const GemmTuning t = gemm_tuning();
  Napi::Object tuning = Napi::Object::New(env);
  tuning.Set("kc", static_cast<double>(t.kc));
  tuning.Set("nc", static_cast<double>(t.nc));
  tuning.Set("mc", static_cast<double>(t.mc));
  tuning.Set("mcEpilogue", static_cast<double>(t.mc_epilogue));
  tuning.Set("gemvMaxM", static_cast<double>(gemm_gemv_max_m()));
  Napi::Object out = Napi::Object::New(env);
  out.Set("kernel", gemm_kernel_name());
  out.Set("tuning", tuning);
  return out;
}

AddonRegistrar reg([](Napi::Env env, Napi::Object exports) {
  exports.Set("gemm", Napi::Function::New(env, Gemm));
  exports.Set("openblasInfo", Napi::Function::New(env, OpenblasInfo));
  exports.Set("openblasSgemm", Napi::Function::New(env, OpenblasSgemm));
  exports.Set("memoryBandwidth", Napi::Function::New(env, MemoryBandwidth));
  exports.Set("timeGemm", Napi::Function::New(env, TimeGemm));
  exports.Set("gemmInfo", Napi::Function::New(env, GemmInfo));
});

}  // namespace
}  // namespace sparsellm::addon
