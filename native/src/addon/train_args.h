// The arguments and results of the trainer bindings (CPU Trainer, CudaTrainer): parsed, checked
// and converted once, in train_binding.cpp, for both. `cls` names the class in error messages.
#pragma once
#include <cstdint>
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

template <typename T>
Napi::Array num_array(Napi::Env env, const std::vector<T>& v) {
  Napi::Array a = Napi::Array::New(env, v.size());
  for (size_t i = 0; i < v.size(); ++i) a.Set(static_cast<uint32_t>(i), static_cast<double>(v[i]));
  return a;
}

}  // namespace sparsellm::addon
