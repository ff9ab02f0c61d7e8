// Bindings: the GPU trainer (CudaTrainer, native/src/cuda/train_model.h) with the same
// constructor options and methods as the CPU Trainer binding (train_binding.cpp), plus
// deviceBytes and peakDeviceBytes. Exported only by builds with the CUDA backend. No math here.
//
//   new CudaTrainer(options)   (the Trainer's options, and matmul: 'bf16' (default: tensor
//                              cores, bf16 operands) or 'f32' (as the CPU Trainer))
//   initWeights, tensors, getTensor, setTensor, step, evaluate, getState, setState, setL1,
//   paramCount, savedBytes, peakSavedBytes, deviceBytes, peakDeviceBytes
#ifdef SPARSELLM_HAVE_CUDA
#include <memory>
#include <string>

#include "../cuda/train_model.h"
#include "registry.h"
#include "sparsellm/train.h"
#include "train_args.h"

namespace sparsellm::addon {
namespace {

class CudaTrainerWrap : public Napi::ObjectWrap<CudaTrainerWrap> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "CudaTrainer",
                       {InstanceMethod("initWeights", &CudaTrainerWrap::InitWeights),
                        InstanceMethod("getTensor", &CudaTrainerWrap::GetTensor),
                        InstanceMethod("setTensor", &CudaTrainerWrap::SetTensor),
                        InstanceMethod("step", &CudaTrainerWrap::Step),
                        InstanceMethod("evaluate", &CudaTrainerWrap::Evaluate),
                        InstanceMethod("getState", &CudaTrainerWrap::GetState),
                        InstanceMethod("setState", &CudaTrainerWrap::SetState),
                        InstanceMethod("setL1", &CudaTrainerWrap::SetL1),
                        InstanceAccessor("tensors", &CudaTrainerWrap::Tensors, nullptr),
                        InstanceAccessor("paramCount", &CudaTrainerWrap::ParamCount, nullptr),
                        InstanceAccessor("savedBytes", &CudaTrainerWrap::SavedBytes, nullptr),
                        InstanceAccessor("peakSavedBytes", &CudaTrainerWrap::PeakSavedBytes, nullptr),
                        InstanceAccessor("deviceBytes", &CudaTrainerWrap::DeviceBytes, nullptr),
                        InstanceAccessor("peakDeviceBytes", &CudaTrainerWrap::PeakDeviceBytes, nullptr)});
  }

  explicit CudaTrainerWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<CudaTrainerWrap>(info) {
    Napi::Env env = info.Env();
    const TrainOptions opt = parse_train_options(info, "CudaTrainer");
    const cuda::train::MatmulPrecision matmul = parse_matmul(env, info[0].As<Napi::Object>());
    try {
      t_ = std::make_unique<cuda::CudaTrainer>(opt.cfg, opt.hyper, matmul);
    } catch (const std::exception& e) {
      throw_js(env, e.what());
    }
  }

 private:
  static cuda::train::MatmulPrecision parse_matmul(Napi::Env env, const Napi::Object& o) {
    const Napi::Value v = o.Get("matmul");
    if (v.IsUndefined()) return cuda::train::MatmulPrecision::Bf16;
    const std::string s = v.IsString() ? v.As<Napi::String>().Utf8Value() : "";
    if (s == "bf16") return cuda::train::MatmulPrecision::Bf16;
    if (s == "f32") return cuda::train::MatmulPrecision::F32;
    throw_js(env, "CudaTrainer: matmul must be 'bf16' or 'f32'");
  }

  Napi::Value InitWeights(const Napi::CallbackInfo& info) {
    try {
      t_->init_weights();
    } catch (const std::exception& e) {
      throw_js(info.Env(), e.what());
    }
    return info.Env().Undefined();
  }

  const TrainTensor& find(Napi::Env env, const std::string& name) {
    for (const TrainTensor& t : t_->tensors())
      if (t.name == name) return t;
    throw_js(env, "CudaTrainer: unknown tensor " + name);
  }

  Napi::Value GetTensor(const Napi::CallbackInfo& info) {
    if (info.Length() < 1 || !info[0].IsString()) throw_js(info.Env(), "CudaTrainer.getTensor(name)");
    const TrainTensor& t = find(info.Env(), info[0].As<Napi::String>().Utf8Value());
    Napi::Float32Array out = Napi::Float32Array::New(info.Env(), static_cast<size_t>(t.rows * t.cols));
    try {
      t_->get_tensor(t.name, out.Data());
    } catch (const std::exception& e) {
      throw_js(info.Env(), e.what());
    }
    return out;
  }

  Napi::Value SetTensor(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (info.Length() < 2 || !info[0].IsString()) throw_js(env, "CudaTrainer.setTensor(name, data)");
    const TrainTensor& t = find(env, info[0].As<Napi::String>().Utf8Value());
    if (!info[1].IsTypedArray() || info[1].As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
      throw_js(env, "CudaTrainer.setTensor: data must be a Float32Array");
    Napi::Float32Array a = info[1].As<Napi::Float32Array>();
    if (a.ElementLength() != static_cast<size_t>(t.rows * t.cols))
      throw_js(env, "CudaTrainer.setTensor: " + t.name + " has " + std::to_string(t.rows * t.cols) + " elements, got " +
                        std::to_string(a.ElementLength()));
    try {
      t_->set_tensor(t.name, a.Data());
    } catch (const std::exception& e) {
      throw_js(env, e.what());
    }
    return env.Undefined();
  }

  Napi::Value Step(const Napi::CallbackInfo& info) { return train_step_js(info, *t_, "CudaTrainer"); }

  Napi::Value Evaluate(const Napi::CallbackInfo& info) { return train_evaluate_js(info, *t_, "CudaTrainer"); }

  Napi::Value GetState(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    TrainerState s;
    std::vector<float> m, v;
    try {
      s = t_->state();
      m = t_->moment1();
      v = t_->moment2();
    } catch (const std::exception& e) {
      throw_js(env, e.what());
    }
    Napi::Object o = Napi::Object::New(env);
    o.Set("step", static_cast<double>(s.step));
    o.Set("windowTokens", static_cast<double>(s.window_tokens));
    o.Set("hybrid", num_array(env, s.hybrid));
    o.Set("lastNnz", num_array(env, s.last_nnz));
    o.Set("dead", num_array(env, s.dead));
    Napi::Uint8Array fired = Napi::Uint8Array::New(env, s.fired.size());
    std::copy(s.fired.begin(), s.fired.end(), fired.Data());
    o.Set("fired", fired);
    for (const std::vector<float>* src : {&m, &v}) {
      Napi::Float32Array a = Napi::Float32Array::New(env, src->size());
      std::copy(src->begin(), src->end(), a.Data());
      o.Set(src == &m ? "m" : "v", a);
    }
    return o;
  }

  Napi::Value SetState(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (info.Length() < 1 || !info[0].IsObject()) throw_js(env, "CudaTrainer.setState(state)");
    Napi::Object o = info[0].As<Napi::Object>();
    TrainerState s = t_->state();
    const size_t L = s.hybrid.size();
    const size_t n = static_cast<size_t>(t_->param_count());
    auto arr = [&](const char* k) {
      Napi::Value v = o.Get(k);
      if (!v.IsArray() || v.As<Napi::Array>().Length() != L)
        throw_js(env, std::string("CudaTrainer.setState: ") + k + " must be an array of " + std::to_string(L));
      return v.As<Napi::Array>();
    };
    Napi::Array ln = arr("lastNnz"), dd = arr("dead");
    arr("hybrid");
    Napi::Value fv = o.Get("fired");
    if (!fv.IsTypedArray() || fv.As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array ||
        fv.As<Napi::Uint8Array>().ElementLength() != s.fired.size())
      throw_js(env, "CudaTrainer.setState: fired must be a Uint8Array of " + std::to_string(s.fired.size()));
    for (const char* k : {"m", "v"}) {
      Napi::Value v = o.Get(k);
      if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array ||
          v.As<Napi::Float32Array>().ElementLength() != n)
        throw_js(env, std::string("CudaTrainer.setState: ") + k + " must be a Float32Array of " + std::to_string(n));
    }
    s.step = train_int_option(env, o, "step", 0, "CudaTrainer");
    s.window_tokens = train_int_option(env, o, "windowTokens", 0, "CudaTrainer");
    for (size_t i = 0; i < L; ++i) {
      s.last_nnz[i] = ln.Get(static_cast<uint32_t>(i)).ToNumber().DoubleValue();
      s.dead[i] = static_cast<int64_t>(dd.Get(static_cast<uint32_t>(i)).ToNumber().DoubleValue());
    }
    Napi::Uint8Array f = fv.As<Napi::Uint8Array>();
    std::copy(f.Data(), f.Data() + s.fired.size(), s.fired.begin());
    Napi::Float32Array m = o.Get("m").As<Napi::Float32Array>(), v = o.Get("v").As<Napi::Float32Array>();
    try {
      t_->set_state(s);
      t_->set_moments(m.Data(), v.Data());
    } catch (const std::exception& e) {
      throw_js(env, e.what());
    }
    return env.Undefined();
  }

  Napi::Value SetL1(const Napi::CallbackInfo& info) {
    if (info.Length() < 1 || !info[0].IsNumber()) throw_js(info.Env(), "CudaTrainer.setL1(lambda)");
    t_->hyper().l1 = static_cast<float>(info[0].As<Napi::Number>().DoubleValue());
    return info.Env().Undefined();
  }

  Napi::Value Tensors(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Napi::Array a = Napi::Array::New(env, t_->tensors().size());
    for (size_t i = 0; i < t_->tensors().size(); ++i) {
      const TrainTensor& t = t_->tensors()[i];
      Napi::Object o = Napi::Object::New(env);
      o.Set("name", t.name);
      Napi::Array shape = Napi::Array::New(env, t.cols == 1 ? 1 : 2);
      shape.Set(0u, static_cast<double>(t.rows));
      if (t.cols != 1) shape.Set(1u, static_cast<double>(t.cols));
      o.Set("shape", shape);
      a.Set(static_cast<uint32_t>(i), o);
    }
    return a;
  }
  Napi::Value ParamCount(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), static_cast<double>(t_->param_count()));
  }
  Napi::Value SavedBytes(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), static_cast<double>(t_->saved_bytes()));
  }
  Napi::Value PeakSavedBytes(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), static_cast<double>(t_->peak_saved_bytes()));
  }
  Napi::Value DeviceBytes(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), static_cast<double>(t_->device_bytes()));
  }
  Napi::Value PeakDeviceBytes(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), static_cast<double>(t_->peak_device_bytes()));
  }

  std::unique_ptr<cuda::CudaTrainer> t_;
};

const AddonRegistrar reg([](Napi::Env env, Napi::Object exports) {
  exports.Set("CudaTrainer", CudaTrainerWrap::Define(env));
});

}  // namespace
}  // namespace sparsellm::addon
#endif
