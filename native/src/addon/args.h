// Argument readers shared by the FFN bindings (CPU and CUDA). `who` prefixes every message
// ("FfnLayer: gate must be a Float32Array"), so each binding names itself.
#pragma once
#include <napi.h>

#include <cstdint>
#include <string>

#include "registry.h"
#include "sparsellm/ffn.h"

namespace sparsellm::addon {

inline const float* f32_array(Napi::Env env, const Napi::Value& v, size_t n, const char* what, const char* who) {
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
    throw_js(env, std::string(who) + ": " + what + " must be a Float32Array");
  Napi::Float32Array a = v.As<Napi::Float32Array>();
  if (a.ElementLength() != n)
    throw_js(env, std::string(who) + ": " + what + " has " + std::to_string(a.ElementLength()) +
                      " elements, expected " + std::to_string(n));
  return a.Data();
}

// An optional Float32Array property (nullptr when absent).
inline const float* f32_opt(Napi::Env env, const Napi::Object& o, const char* key, size_t n, const char* who) {
  Napi::Value v = o.Get(key);
  if (v.IsUndefined() || v.IsNull()) return nullptr;
  return f32_array(env, v, n, key, who);
}

// An optional integer property >= lo (def when absent).
inline int64_t int_opt(Napi::Env env, const Napi::Object& o, const char* key, int64_t def, int64_t lo, const char* who) {
  Napi::Value v = o.Get(key);
  if (v.IsUndefined() || v.IsNull()) return def;
  if (!v.IsNumber()) throw_js(env, std::string(who) + ": " + key + " must be a number");
  const double d = v.As<Napi::Number>().DoubleValue();
  if (d != static_cast<double>(static_cast<int64_t>(d)) || d < static_cast<double>(lo))
    throw_js(env, std::string(who) + ": " + key + " must be an integer >= " + std::to_string(lo));
  return static_cast<int64_t>(d);
}

inline double num_opt(Napi::Env env, const Napi::Object& o, const char* key, double def, const char* who) {
  Napi::Value v = o.Get(key);
  if (v.IsUndefined() || v.IsNull()) return def;
  if (!v.IsNumber()) throw_js(env, std::string(who) + ": " + key + " must be a number");
  return v.As<Napi::Number>().DoubleValue();
}

// Argument i as an options object (an empty one when absent).
inline Napi::Object opts_of(const Napi::CallbackInfo& info, size_t i, const char* who) {
  if (info.Length() > i && info[i].IsObject()) return info[i].As<Napi::Object>();
  if (info.Length() > i && !info[i].IsUndefined() && !info[i].IsNull())
    throw_js(info.Env(), std::string(who) + ": options must be an object");
  return Napi::Object::New(info.Env());
}

inline FfnMode parse_mode(Napi::Env env, const Napi::Object& o, const char* who) {
  Napi::Value v = o.Get("mode");
  if (v.IsUndefined()) return FfnMode::Auto;
  const std::string s = v.IsString() ? v.As<Napi::String>().Utf8Value() : "";
  if (s == "dense") return FfnMode::Dense;
  if (s == "sparse") return FfnMode::Sparse;
  if (s == "auto") return FfnMode::Auto;
  throw_js(env, std::string(who) + ": mode must be 'dense', 'sparse' or 'auto'");
}

// What both FFN layer constructors take (everything but the dtype, whose rule each backend sets):
// { dModel, dFF, gated, tileWidth?, compression?, gate? (gated only), up, down (standard W_down
// [d, dFF]), upBias? (non-gated only), downBias? }. The arrays stay owned by JavaScript.
struct FfnLayerArgs {
  FfnLayerConfig config;
  const float* gate = nullptr;
  const float* up = nullptr;
  const float* down = nullptr;
  const float* up_bias = nullptr;
  const float* down_bias = nullptr;
};

inline FfnLayerArgs read_ffn_layer_args(Napi::Env env, const Napi::Object& o, const char* who) {
  const std::string w(who);
  FfnLayerArgs a;
  FfnLayerConfig& c = a.config;
  c.d_model = int_opt(env, o, "dModel", -1, 1, who);
  c.d_ff = int_opt(env, o, "dFF", -1, 1, who);
  if (c.d_model < 1 || c.d_ff < 1) throw_js(env, w + ": dModel and dFF are required");
  Napi::Value g = o.Get("gated");
  if (!g.IsBoolean()) throw_js(env, w + ": gated must be a boolean");
  c.gated = g.As<Napi::Boolean>().Value();
  c.twell.tile = static_cast<int>(int_opt(env, o, "tileWidth", 256, 1, who));
  c.twell.compression = static_cast<int>(int_opt(env, o, "compression", 8, 1, who));
  const size_t n = static_cast<size_t>(c.d_model * c.d_ff);
  if (c.gated) a.gate = f32_array(env, o.Get("gate"), n, "gate", who);
  else if (!o.Get("gate").IsUndefined()) throw_js(env, w + ": a non-gated layer takes no gate");
  a.up = f32_array(env, o.Get("up"), n, "up", who);
  a.down = f32_array(env, o.Get("down"), n, "down", who);
  a.up_bias = f32_opt(env, o, "upBias", static_cast<size_t>(c.d_ff), who);
  if (c.gated && a.up_bias) throw_js(env, w + ": upBias is for non-gated layers");
  a.down_bias = f32_opt(env, o, "downBias", static_cast<size_t>(c.d_model), who);
  return a;
}

}  // namespace sparsellm::addon
