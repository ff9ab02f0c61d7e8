// The arguments and results of the trainer bindings (CPU Trainer, CudaTrainer): parsed, checked
// and converted once, in train_binding.cpp, for both. `cls` names the class in error messages.
#pragma once
#include <cstdint>
#include <exception>
#include <string>
#include <vector>

#include "registry.h"
#include "sparsellm/train.h"

namespace sparsellm::addon {

struct TrainOptions {
  TrainModelConfig cfg;
  TrainHyper hyper;
};

// new <cls>({ vocab, dModel, layers, heads, dFF, context, ropeTheta?, normEps?, beta1?, beta2?,
// eps?, weightDecay?, clip?, l1?, ffnPath?, hybridCutoff?, recheckSteps?, ellWidth?, deadWindow?,
// reinitDead?, initStd?, seed? }). Throws a JS error on a missing or malformed option.
TrainOptions parse_train_options(const Napi::CallbackInfo& info, const char* cls);

// Option `key` of o as an integer >= lo (required), or a JS error "<cls>: <key> ...".
int64_t train_int_option(Napi::Env env, const Napi::Object& o, const char* key, int64_t lo, const char* cls);

// Argument i as an integer >= lo, or a JS error "<cls>: <what> must be ...".
int64_t train_int_arg(const Napi::CallbackInfo& info, size_t i, const char* what, int64_t lo, const char* cls);

// Argument i as an Int32Array of exactly n tokens, or a JS error.
Napi::Int32Array train_tokens_arg(const Napi::CallbackInfo& info, size_t i, size_t n, const char* cls);

// step() and evaluate() results as JS objects (the shapes documented in train_binding.cpp).
Napi::Object step_stats_to_js(Napi::Env env, const StepStats& s);
Napi::Object eval_stats_to_js(Napi::Env env, const EvalStats& e);

// step(tokens, nMicro, B, T, lr) and evaluate(tokens, B, T) of either trainer: arguments checked,
// the trainer's exceptions turned into JS errors, the results converted.
template <typename Trainer>
Napi::Value train_step_js(const Napi::CallbackInfo& info, Trainer& t, const char* cls) {
  Napi::Env env = info.Env();
  const int64_t nm = train_int_arg(info, 1, "nMicro", 1, cls), B = train_int_arg(info, 2, "B", 1, cls),
                T = train_int_arg(info, 3, "T", 1, cls);
  Napi::Int32Array tok = train_tokens_arg(info, 0, static_cast<size_t>(nm * B * (T + 1)), cls);
  if (info.Length() < 5 || !info[4].IsNumber()) throw_js(env, std::string(cls) + ".step: lr must be a number");
  const float lr = static_cast<float>(info[4].As<Napi::Number>().DoubleValue());
  StepStats s;
  try {
    s = t.step(tok.Data(), nm, B, T, lr);
  } catch (const std::exception& e) {
    throw_js(env, e.what());
  }
  return step_stats_to_js(env, s);
}

template <typename Trainer>
Napi::Value train_evaluate_js(const Napi::CallbackInfo& info, Trainer& t, const char* cls) {
  Napi::Env env = info.Env();
  const int64_t B = train_int_arg(info, 1, "B", 1, cls), T = train_int_arg(info, 2, "T", 1, cls);
  Napi::Int32Array tok = train_tokens_arg(info, 0, static_cast<size_t>(B * (T + 1)), cls);
  EvalStats e;
  try {
    e = t.evaluate(tok.Data(), B, T);
  } catch (const std::exception& ex) {
    throw_js(env, ex.what());
  }
  return eval_stats_to_js(env, e);
}

template <typename T>
Napi::Array num_array(Napi::Env env, const std::vector<T>& v) {
  Napi::Array a = Napi::Array::New(env, v.size());
  for (size_t i = 0; i < v.size(); ++i) a.Set(static_cast<uint32_t>(i), static_cast<double>(v[i]));
  return a;
}

}  // namespace sparsellm::addon
