// Bindings: the training engine (sparsellm/train.h). No math here: argument checks and copies.
//
//   new Trainer({ vocab, dModel, layers, heads, dFF, context, ropeTheta?, normEps?,
//                 beta1?, beta2?, eps?, weightDecay?, clip?, l1?, ffnPath?: 'auto'|'dense'|'hybrid',
//                 hybridCutoff?, recheckSteps?, ellWidth?, deadWindow?, reinitDead?, initStd?, seed? })
//   t.initWeights()
//   t.tensors → [{ name, shape: [rows, cols] | [rows] }] (Hugging Face names, standard layouts)
//   t.getTensor(name) → Float32Array;  t.setTensor(name, Float32Array)
//   t.step(tokens: Int32Array [nMicro·B·(T+1)], nMicro, B, T, lr) → { loss, ce, l1, gradNorm, tokens,
//       reinitialised, layers: [{ tokens, nnz, maxRowNnz, tailRows, l1, hybrid, savedBytes, dead }] }
//   t.evaluate(tokens: Int32Array [B·(T+1)], B, T) → { ce, l1, tokens, nnz: number[] }
//   t.getState() → { step, windowTokens, hybrid: number[], lastNnz: number[], dead: number[],
//                    fired: Uint8Array [layers·dFF], m: Float32Array, v: Float32Array }
//   t.setState(sameShape)
//   t.setL1(λ); t.paramCount; t.savedBytes; t.peakSavedBytes
#include <memory>
#include <string>

#include "registry.h"
#include "sparsellm/train.h"
#include "train_args.h"

namespace sparsellm::addon {

namespace {

double num_opt(Napi::Env env, const Napi::Object& o, const char* key, double def, const char* cls) {
  Napi::Value v = o.Get(key);
  if (v.IsUndefined() || v.IsNull()) return def;
  if (!v.IsNumber()) throw_js(env, std::string(cls) + ": " + key + " must be a number");
  return v.As<Napi::Number>().DoubleValue();
}


}  // namespace

int64_t train_int_option(Napi::Env env, const Napi::Object& o, const char* key, int64_t lo, const char* cls) {
  Napi::Value v = o.Get(key);
  if (!v.IsNumber()) throw_js(env, std::string(cls) + ": " + key + " is required (an integer)");
  const double d = v.As<Napi::Number>().DoubleValue();
  if (d != static_cast<double>(static_cast<int64_t>(d)) || d < static_cast<double>(lo))
    throw_js(env, std::string(cls) + ": " + key + " must be an integer >= " + std::to_string(lo));
  return static_cast<int64_t>(d);
}

TrainOptions parse_train_options(const Napi::CallbackInfo& info, const char* cls) {
  Napi::Env env = info.Env();
  if (info.Length() != 1 || !info[0].IsObject())
    throw_js(env, std::string("new ") + cls + "(options): options object required");
  Napi::Object o = info[0].As<Napi::Object>();
  TrainOptions r;
  TrainModelConfig& c = r.cfg;
  c.vocab = train_int_option(env, o, "vocab", 2, cls);
  c.d_model = train_int_option(env, o, "dModel", 2, cls);
  c.n_layers = train_int_option(env, o, "layers", 1, cls);
  c.n_heads = train_int_option(env, o, "heads", 1, cls);
  c.d_ff = train_int_option(env, o, "dFF", 1, cls);
  c.context = train_int_option(env, o, "context", 2, cls);
  c.rope_theta = num_opt(env, o, "ropeTheta", c.rope_theta, cls);
  c.norm_eps = static_cast<float>(num_opt(env, o, "normEps", c.norm_eps, cls));
  TrainHyper& h = r.hyper;
  h.beta1 = static_cast<float>(num_opt(env, o, "beta1", h.beta1, cls));
  h.beta2 = static_cast<float>(num_opt(env, o, "beta2", h.beta2, cls));
  h.eps = static_cast<float>(num_opt(env, o, "eps", h.eps, cls));
  h.weight_decay = static_cast<float>(num_opt(env, o, "weightDecay", h.weight_decay, cls));
  h.clip = static_cast<float>(num_opt(env, o, "clip", h.clip, cls));
  h.l1 = static_cast<float>(num_opt(env, o, "l1", h.l1, cls));
  h.hybrid_cutoff = num_opt(env, o, "hybridCutoff", h.hybrid_cutoff, cls);
  h.recheck_steps = static_cast<int64_t>(num_opt(env, o, "recheckSteps", static_cast<double>(h.recheck_steps), cls));
  h.ell_width = static_cast<int>(num_opt(env, o, "ellWidth", h.ell_width, cls));
  h.dead_window = static_cast<int64_t>(num_opt(env, o, "deadWindow", static_cast<double>(h.dead_window), cls));
  h.init_std = static_cast<float>(num_opt(env, o, "initStd", h.init_std, cls));
  h.seed = static_cast<uint64_t>(num_opt(env, o, "seed", 0, cls));
  Napi::Value rd = o.Get("reinitDead");
  h.reinit_dead = rd.IsBoolean() && rd.As<Napi::Boolean>().Value();
  Napi::Value p = o.Get("ffnPath");
  if (!p.IsUndefined()) {
    const std::string s = p.IsString() ? p.As<Napi::String>().Utf8Value() : "";
    if (s == "auto") h.ffn_path = FfnTrainPath::Auto;
    else if (s == "dense") h.ffn_path = FfnTrainPath::Dense;
    else if (s == "hybrid") h.ffn_path = FfnTrainPath::Hybrid;
    else throw_js(env, std::string(cls) + ": ffnPath must be 'auto', 'dense' or 'hybrid'");
  }
  if (h.ell_width < 1) throw_js(env, std::string(cls) + ": ellWidth must be >= 1");
  return r;
}

int64_t train_int_arg(const Napi::CallbackInfo& info, size_t i, const char* what, int64_t lo, const char* cls) {
  if (info.Length() <= i || !info[i].IsNumber())
    throw_js(info.Env(), std::string(cls) + ": " + what + " must be a number");
  const double d = info[i].As<Napi::Number>().DoubleValue();
  if (d != static_cast<double>(static_cast<int64_t>(d)) || d < static_cast<double>(lo))
    throw_js(info.Env(), std::string(cls) + ": " + what + " must be an integer >= " + std::to_string(lo));
  return static_cast<int64_t>(d);
}

Napi::Int32Array train_tokens_arg(const Napi::CallbackInfo& info, size_t i, size_t n, const char* cls) {
  if (info.Length() <= i || !info[i].IsTypedArray() ||
      info[i].As<Napi::TypedArray>().TypedArrayType() != napi_int32_array)
    throw_js(info.Env(), std::string(cls) + ": tokens must be an Int32Array");
  Napi::Int32Array a = info[i].As<Napi::Int32Array>();
  if (a.ElementLength() != n)
    throw_js(info.Env(), std::string(cls) + ": tokens has " + std::to_string(a.ElementLength()) +
                             " elements, expected " + std::to_string(n));
  return a;
}

Napi::Object step_stats_to_js(Napi::Env env, const StepStats& s) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("loss", s.loss);
  o.Set("ce", s.ce);
  o.Set("l1", s.l1);
  o.Set("gradNorm", s.grad_norm);
  o.Set("tokens", static_cast<double>(s.tokens));
  o.Set("reinitialised", static_cast<double>(s.reinitialised));
  Napi::Array layers = Napi::Array::New(env, s.layers.size());
  for (size_t i = 0; i < s.layers.size(); ++i) {
    const LayerStepStats& l = s.layers[i];
    Napi::Object lo = Napi::Object::New(env);
    lo.Set("tokens", static_cast<double>(l.tokens));
    lo.Set("nnz", static_cast<double>(l.nnz));
    lo.Set("maxRowNnz", static_cast<double>(l.max_row_nnz));
    lo.Set("tailRows", static_cast<double>(l.tail_rows));
    lo.Set("l1", l.l1);
    lo.Set("hybrid", l.hybrid);
    lo.Set("savedBytes", static_cast<double>(l.saved_bytes));
    lo.Set("dead", static_cast<double>(l.dead));
    layers.Set(static_cast<uint32_t>(i), lo);
  }
  o.Set("layers", layers);
  return o;
}

Napi::Object eval_stats_to_js(Napi::Env env, const EvalStats& e) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("ce", e.ce);
  o.Set("l1", e.l1);
  o.Set("tokens", static_cast<double>(e.tokens));
  o.Set("nnz", num_array(env, e.nnz));
  return o;
}

namespace {

class TrainerWrap : public Napi::ObjectWrap<TrainerWrap> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "Trainer",
                       {InstanceMethod("initWeights", &TrainerWrap::InitWeights),
                        InstanceMethod("getTensor", &TrainerWrap::GetTensor),
                        InstanceMethod("setTensor", &TrainerWrap::SetTensor),
                        InstanceMethod("step", &TrainerWrap::Step),
                        InstanceMethod("evaluate", &TrainerWrap::Evaluate),
                        InstanceMethod("getState", &TrainerWrap::GetState),
                        InstanceMethod("setState", &TrainerWrap::SetState),
                        InstanceMethod("setL1", &TrainerWrap::SetL1),
                        InstanceAccessor("tensors", &TrainerWrap::Tensors, nullptr),
                        InstanceAccessor("paramCount", &TrainerWrap::ParamCount, nullptr),
                        InstanceAccessor("savedBytes", &TrainerWrap::SavedBytes, nullptr),
                        InstanceAccessor("peakSavedBytes", &TrainerWrap::PeakSavedBytes, nullptr)});
  }

  explicit TrainerWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<TrainerWrap>(info) {
    Napi::Env env = info.Env();
    const TrainOptions opt = parse_train_options(info, "Trainer");
    try {
      t_ = std::make_unique<Trainer>(opt.cfg, opt.hyper);
    } catch (const std::exception& e) {
      throw_js(env, e.what());
    }
  }

 private:
  Napi::Value InitWeights(const Napi::CallbackInfo& info) {
    t_->init_weights();
    return info.Env().Undefined();
  }

  const TrainTensor& find(Napi::Env env, const std::string& name) {
    for (const TrainTensor& t : t_->tensors())
      if (t.name == name) return t;
    throw_js(env, "Trainer: unknown tensor " + name);
  }

  Napi::Value GetTensor(const Napi::CallbackInfo& info) {
    if (info.Length() < 1 || !info[0].IsString()) throw_js(info.Env(), "Trainer.getTensor(name)");
    const TrainTensor& t = find(info.Env(), info[0].As<Napi::String>().Utf8Value());
    Napi::Float32Array out = Napi::Float32Array::New(info.Env(), static_cast<size_t>(t.rows * t.cols));
    t_->get_tensor(t.name, out.Data());
    return out;
  }

  Napi::Value SetTensor(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (info.Length() < 2 || !info[0].IsString()) throw_js(env, "Trainer.setTensor(name, data)");
    const TrainTensor& t = find(env, info[0].As<Napi::String>().Utf8Value());
    if (!info[1].IsTypedArray() || info[1].As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
      throw_js(env, "Trainer.setTensor: data must be a Float32Array");
    Napi::Float32Array a = info[1].As<Napi::Float32Array>();
    if (a.ElementLength() != static_cast<size_t>(t.rows * t.cols))
      throw_js(env, "Trainer.setTensor: " + t.name + " has " + std::to_string(t.rows * t.cols) + " elements, got " +
                        std::to_string(a.ElementLength()));
    t_->set_tensor(t.name, a.Data());
    return env.Undefined();
  }

  Napi::Value Step(const Napi::CallbackInfo& info) { return train_step_js(info, *t_, "Trainer"); }

  Napi::Value Evaluate(const Napi::CallbackInfo& info) { return train_evaluate_js(info, *t_, "Trainer"); }

  Napi::Value GetState(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const TrainerState& s = t_->state();
    Napi::Object o = Napi::Object::New(env);
    o.Set("step", static_cast<double>(s.step));
    o.Set("windowTokens", static_cast<double>(s.window_tokens));
    o.Set("hybrid", num_array(env, s.hybrid));
    o.Set("lastNnz", num_array(env, s.last_nnz));
    o.Set("dead", num_array(env, s.dead));
    Napi::Uint8Array fired = Napi::Uint8Array::New(env, s.fired.size());
    std::copy(s.fired.begin(), s.fired.end(), fired.Data());
    o.Set("fired", fired);
    for (const char* k : {"m", "v"}) {
      const std::vector<float>& src = k[0] == 'm' ? t_->moment1() : t_->moment2();
      Napi::Float32Array a = Napi::Float32Array::New(env, src.size());
      std::copy(src.begin(), src.end(), a.Data());
      o.Set(k, a);
    }
    return o;
  }

  Napi::Value SetState(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (info.Length() < 1 || !info[0].IsObject()) throw_js(env, "Trainer.setState(state)");
    Napi::Object o = info[0].As<Napi::Object>();
    TrainerState& s = t_->state();
    const size_t L = s.hybrid.size();
    auto arr = [&](const char* k) {
      Napi::Value v = o.Get(k);
      if (!v.IsArray() || v.As<Napi::Array>().Length() != L)
        throw_js(env, std::string("Trainer.setState: ") + k + " must be an array of " + std::to_string(L));
      return v.As<Napi::Array>();
    };
    Napi::Array hy = arr("hybrid"), ln = arr("lastNnz"), dd = arr("dead");
    Napi::Value fv = o.Get("fired");
    if (!fv.IsTypedArray() || fv.As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array ||
        fv.As<Napi::Uint8Array>().ElementLength() != s.fired.size())
      throw_js(env, "Trainer.setState: fired must be a Uint8Array of " + std::to_string(s.fired.size()));
    for (const char* k : {"m", "v"}) {
      Napi::Value v = o.Get(k);
      if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array ||
          v.As<Napi::Float32Array>().ElementLength() != t_->moment1().size())
        throw_js(env, std::string("Trainer.setState: ") + k + " must be a Float32Array of " +
                          std::to_string(t_->moment1().size()));
    }
    s.step = train_int_option(env, o, "step", 0, "Trainer");
    s.window_tokens = train_int_option(env, o, "windowTokens", 0, "Trainer");
    for (size_t i = 0; i < L; ++i) {
      s.hybrid[i] = hy.Get(static_cast<uint32_t>(i)).ToNumber().DoubleValue() != 0;
      s.last_nnz[i] = ln.Get(static_cast<uint32_t>(i)).ToNumber().DoubleValue();
      s.dead[i] = static_cast<int64_t>(dd.Get(static_cast<uint32_t>(i)).ToNumber().DoubleValue());
    }
    Napi::Uint8Array f = fv.As<Napi::Uint8Array>();
    std::copy(f.Data(), f.Data() + s.fired.size(), s.fired.begin());
    Napi::Float32Array m = o.Get("m").As<Napi::Float32Array>(), v = o.Get("v").As<Napi::Float32Array>();
    std::copy(m.Data(), m.Data() + m.ElementLength(), t_->moment1().begin());
    std::copy(v.Data(), v.Data() + v.ElementLength(), t_->moment2().begin());
    return env.Undefined();
  }

  Napi::Value SetL1(const Napi::CallbackInfo& info) {
    if (info.Length() < 1 || !info[0].IsNumber()) throw_js(info.Env(), "Trainer.setL1(lambda)");
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
    return Napi::Number::New(info.Env(), static_cast<double>(t_->moment1().size()));
  }
  Napi::Value SavedBytes(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), static_cast<double>(t_->saved_bytes()));
  }
  Napi::Value PeakSavedBytes(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), static_cast<double>(t_->peak_saved_bytes()));
  }

  std::unique_ptr<Trainer> t_;
};

const AddonRegistrar reg([](Napi::Env env, Napi::Object exports) { exports.Set("Trainer", TrainerWrap::Define(env)); });

}  // namespace
}  // namespace sparsellm::addon
