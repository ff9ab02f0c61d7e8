// The arguments of the model constructors (CPU Model, CudaModel): parsed and checked once, in
// model_binding.cpp, for both bindings.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

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

}  // namespace sparsellm::addon
