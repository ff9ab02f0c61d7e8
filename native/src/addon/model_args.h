// The arguments of the model constructors (CPU Model, CudaModel): parsed and checked once, in
// model_binding.cpp, for both bindings.
#pragma once
#include <cstdint>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "registry.h"
#include "sparsellm/model.h"

namespace sparsellm::addon {

struct ModelArgs {
  std::string path;
  std::shared_ptr<MappedFile> file;  // the mapping the weight views point into
  ModelConfig cfg;
  ModelWeights weights;
  int64_t context = 0;
};

// new <cls>(path, spec, layers, tensors, context[, weights]): maps the packed file (or reads it
// into huge-page memory when weights is 'resident'; sparsellm/model.h, Residency), checks that every tensor
// lies inside it with the expected shape and dtype, and builds the engine's config and views.
// Throws a JS error naming the file on any problem.
ModelArgs parse_model_args(const Napi::CallbackInfo& info, const char* cls);

// forward(tokens: Int32Array, allLogits: boolean, mode: 'dense'|'sparse'|'auto'): the checked
// arguments and the logits array to fill ([tokens or 1, vocab]). Throws a JS error when malformed.
struct ForwardArgs {
  Napi::Int32Array tokens;
  bool all_logits = false;
  RunMode mode = RunMode::Auto;
  Napi::Float32Array logits;
};
ForwardArgs parse_forward_args(const Napi::CallbackInfo& info, int64_t vocab);

// The forward() method of either model class: parse, run, return the logits.
template <typename ModelT>
Napi::Value run_forward(const Napi::CallbackInfo& info, ModelT& m) {
  ForwardArgs f = parse_forward_args(info, m.config().vocab);
  try {
    m.forward(f.tokens.Data(), static_cast<int64_t>(f.tokens.ElementLength()), f.all_logits, f.mode, f.logits.Data());
  } catch (const std::exception& e) {
    throw_js(info.Env(), e.what());
  }
  return f.logits;
}

// activity() of either model as the JS array of LayerActivity objects.
Napi::Array activity_to_js(Napi::Env env, const std::vector<LayerActivity>& act);

}  // namespace sparsellm::addon
