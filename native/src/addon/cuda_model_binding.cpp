// Bindings: the CUDA model runtime (CudaModel, cuda_ops.h) over a packed file, with the same
// methods as the CPU Model binding (model_binding.cpp) except the calibration observer, which
// runs on the CPU only. The weights are copied to the device in the constructor; the mapping is
// released after it. Exported only by builds with the CUDA backend. No math here.
#ifdef SPARSELLM_HAVE_CUDA
#include <memory>
#include <string>

#include "model_args.h"
#include "registry.h"
#include "sparsellm/cuda_ops.h"

namespace sparsellm::addon {
namespace {

class CudaModelWrap : public Napi::ObjectWrap<CudaModelWrap> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "CudaModel",
                       {InstanceMethod("forward", &CudaModelWrap::Forward),
                        InstanceMethod("reset", &CudaModelWrap::Reset),
                        InstanceMethod("position", &CudaModelWrap::Position),
                        InstanceMethod("activity", &CudaModelWrap::Activity),
                        InstanceMethod("resetActivity", &CudaModelWrap::ResetActivity),
                        InstanceMethod("setFfnObserver", &CudaModelWrap::SetFfnObserver),
                        InstanceMethod("bytes", &CudaModelWrap::Bytes),
                        InstanceMethod("close", &CudaModelWrap::Close)});
  }

  // new CudaModel(path, spec, layers, tensors, context)
  explicit CudaModelWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<CudaModelWrap>(info) {
    ModelArgs a = parse_model_args(info, "CudaModel");
    try {
      model_ = std::make_unique<cuda::CudaModel>(a.cfg, a.weights, a.context);
    } catch (const std::exception& e) {
      throw_js(info.Env(), a.path + ": " + e.what());
    }
  }

 private:
  cuda::CudaModel& model(Napi::Env env) {
    if (!model_) throw_js(env, "CudaModel: closed");
    return *model_;
  }

  // forward(tokens: Int32Array, allLogits: boolean, mode: 'dense'|'sparse'|'auto') → Float32Array
  Napi::Value Forward(const Napi::CallbackInfo& info) {
    return run_forward(info, model(info.Env()));
  }

  Napi::Value Reset(const Napi::CallbackInfo& info) {
    model(info.Env()).reset();
    return info.Env().Undefined();
  }

  Napi::Value Position(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), static_cast<double>(model(info.Env()).position()));
  }

  Napi::Value Activity(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    std::vector<LayerActivity> act;
    try {
      act = model(env).activity();
    } catch (const std::exception& e) {
      throw_js(env, e.what());
    }
    return activity_to_js(env, act);
  }

  Napi::Value ResetActivity(const Napi::CallbackInfo& info) {
    try {
      model(info.Env()).reset_stats();
    } catch (const std::exception& e) {
      throw_js(info.Env(), e.what());
    }
    return info.Env().Undefined();
  }

  Napi::Value SetFfnObserver(const Napi::CallbackInfo& info) {
    throw_js(info.Env(), "CudaModel: the FFN observer (calibration) runs on the CPU runtime only");
  }

  Napi::Value Bytes(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), static_cast<double>(model(info.Env()).bytes()));
  }

  Napi::Value Close(const Napi::CallbackInfo& info) {
    model_.reset();
    return info.Env().Undefined();
  }

  std::unique_ptr<cuda::CudaModel> model_;
};

AddonRegistrar reg([](Napi::Env env, Napi::Object exports) { exports.Set("CudaModel", CudaModelWrap::Define(env)); });

}  // namespace
}  // namespace sparsellm::addon
#endif  // SPARSELLM_HAVE_CUDA
