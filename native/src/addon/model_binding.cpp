// Bindings: the native Model over a memory-mapped packed file. The TypeScript side (which read
// and validated the header, src/core/format/reader.ts) passes the spec and each tensor's file
// offset; this file maps the file, checks every tensor lies inside it with the expected shape,
// and builds the engine's views. No math here.
#include <algorithm>
#include <memory>
#include <string>
#include <unordered_map>

#include "model_args.h"
#include "registry.h"
#include "sparsellm/model.h"

namespace sparsellm::addon {
namespace {

struct TensorLoc {
  int64_t offset = 0, bytes = 0;
  std::string dtype;
  std::vector<int64_t> shape;
};

int64_t get_int(Napi::Env env, const Napi::Object& o, const char* key) {
  Napi::Value v = o.Get(key);
  if (!v.IsNumber()) throw_js(env, std::string("Model: '") + key + "' must be a number");
  return v.As<Napi::Number>().Int64Value();
}

double get_num(Napi::Env env, const Napi::Object& o, const char* key) {
  Napi::Value v = o.Get(key);
  if (!v.IsNumber()) throw_js(env, std::string("Model: '") + key + "' must be a number");
  return v.As<Napi::Number>().DoubleValue();
}

bool get_bool(Napi::Env env, const Napi::Object& o, const char* key) {
  Napi::Value v = o.Get(key);
  if (!v.IsBoolean()) throw_js(env, std::string("Model: '") + key + "' must be a boolean");
  return v.As<Napi::Boolean>().Value();
}

std::string get_str(Napi::Env env, const Napi::Object& o, const char* key) {
  Napi::Value v = o.Get(key);
  if (!v.IsString()) throw_js(env, std::string("Model: '") + key + "' must be a string");
  return v.As<Napi::String>().Utf8Value();
}

ActKind parse_act(Napi::Env env, const std::string& s) {
  if (s == "relu") return ActKind::Relu;
  if (s == "silu") return ActKind::Silu;
  if (s == "gelu") return ActKind::GeluErf;
  if (s == "gelu_tanh") return ActKind::GeluTanh;
  throw_js(env, "Model: unknown activation '" + s + "'");
}

class Tensors {
 public:
  Tensors(Napi::Env env, const Napi::Object& o, const MappedFile& file) : env_(env), file_(file) {
    Napi::Array names = o.GetPropertyNames();
    for (uint32_t i = 0; i < names.Length(); ++i) {
      std::string name = names.Get(i).As<Napi::String>().Utf8Value();
      Napi::Object t = o.Get(name).As<Napi::Object>();
      TensorLoc loc;
      loc.offset = get_int(env, t, "offset");
      loc.bytes = get_int(env, t, "bytes");
      loc.dtype = get_str(env, t, "dtype");
      Napi::Array shape = t.Get("shape").As<Napi::Array>();
      for (uint32_t k = 0; k < shape.Length(); ++k) loc.shape.push_back(shape.Get(k).As<Napi::Number>().Int64Value());
      if (loc.offset < 0 || loc.bytes < 0 || loc.offset + loc.bytes > file.size())
        throw_js(env, file.path() + ": tensor '" + name + "' lies outside the file (truncated or corrupted?)");
      map_[name] = std::move(loc);
    }
  }
  bool has(const std::string& name) const { return map_.count(name) != 0; }

  const TensorLoc& get(const std::string& name, std::initializer_list<int64_t> shape) const {
    auto it = map_.find(name);
    if (it == map_.end()) throw_js(env_, file_.path() + ": tensor '" + name + "' is missing");
    const TensorLoc& t = it->second;
    if (t.shape != std::vector<int64_t>(shape)) throw_js(env_, file_.path() + ": tensor '" + name + "' has an unexpected shape");
    return t;
  }
  const float* f32(const std::string& name, int64_t n) const {
    const TensorLoc& t = get(name, {n});
    if (t.dtype != "F32") throw_js(env_, file_.path() + ": tensor '" + name + "' must be F32");
    return reinterpret_cast<const float*>(file_.data() + t.offset);
  }
  const float* f32_opt(const std::string& name, int64_t n) const { return has(name) ? f32(name, n) : nullptr; }
  DType matrix_dtype(const TensorLoc& t, const std::string& name) const {
    if (t.dtype == "F32") return DType::F32;
    if (t.dtype == "BF16") return DType::BF16;
    throw_js(env_, file_.path() + ": tensor '" + name + "' is " + t.dtype +
                       "; the CPU runtime reads BF16 or F32 matrices (repack with --dtype bf16)");
  }
  WeightView matrix(const std::string& name, int64_t rows, int64_t cols) const {
    const TensorLoc& t = get(name, {rows, cols});
    return WeightView{file_.data() + t.offset, matrix_dtype(t, name), rows, cols, cols};
  }
  const void* raw(const std::string& name, std::initializer_list<int64_t> shape, DType* dtype) const {
    const TensorLoc& t = get(name, shape);
    *dtype = matrix_dtype(t, name);
    return file_.data() + t.offset;
  }

 private:
  Napi::Env env_;
  const MappedFile& file_;
  std::unordered_map<std::string, TensorLoc> map_;
};

}  // namespace

ForwardArgs parse_forward_args(const Napi::CallbackInfo& info, int64_t vocab) {
  Napi::Env env = info.Env();
  if (info.Length() != 3 || !info[0].IsTypedArray() || !info[1].IsBoolean() || !info[2].IsString())
    throw_js(env, "forward(tokens: Int32Array, allLogits: boolean, mode: string): bad arguments");
  if (info[0].As<Napi::TypedArray>().TypedArrayType() != napi_int32_array)
    throw_js(env, "forward: tokens must be an Int32Array");
  ForwardArgs f;
  f.tokens = info[0].As<Napi::Int32Array>();
  f.all_logits = info[1].As<Napi::Boolean>().Value();
  const std::string ms = info[2].As<Napi::String>().Utf8Value();
  if (ms == "dense") f.mode = RunMode::Dense;
  else if (ms == "sparse") f.mode = RunMode::Sparse;
  else if (ms == "auto") f.mode = RunMode::Auto;
  else throw_js(env, "forward: mode must be dense, sparse or auto");
  const int64_t rows = f.all_logits ? static_cast<int64_t>(f.tokens.ElementLength()) : 1;
  f.logits = Napi::Float32Array::New(env, static_cast<size_t>(rows * vocab));
  return f;
}

Napi::Array activity_to_js(Napi::Env env, const std::vector<LayerActivity>& act) {
  Napi::Array out = Napi::Array::New(env, act.size());
  for (size_t i = 0; i < act.size(); ++i) {
    const LayerActivity& a = act[i];
    Napi::Object o = Napi::Object::New(env);
    o.Set("tokens", static_cast<double>(a.tokens));
    o.Set("nnz", static_cast<double>(a.nnz));
    o.Set("maxRowNnz", static_cast<double>(a.max_row_nnz));
    o.Set("overflowTiles", static_cast<double>(a.overflow_tiles));
    o.Set("overflowRows", static_cast<double>(a.overflow_rows));
    o.Set("sparseCalls", static_cast<double>(a.sparse_calls));
    o.Set("denseCalls", static_cast<double>(a.dense_calls));
    o.Set("gateScreenedCalls", static_cast<double>(a.gate_screened_calls));
    o.Set("gateCandidateRows", static_cast<double>(a.gate_candidate_rows));
    out.Set(static_cast<uint32_t>(i), o);
  }
  return out;
}

// new Model / CudaModel(path, spec, layers, tensors, context[, weights]): see model_args.h.
ModelArgs parse_model_args(const Napi::CallbackInfo& info, const char* cls) {
  Napi::Env env = info.Env();
  const bool weights_arg = info.Length() == 6 && info[5].IsString();
  if ((info.Length() != 5 && !weights_arg) || !info[0].IsString() || !info[1].IsObject() || !info[2].IsArray() ||
      !info[3].IsObject() || !info[4].IsNumber())
    throw_js(env, std::string("new ") + cls + "(path, spec, layers, tensors, context[, 'map' | 'resident']): bad arguments");
  const std::string path = info[0].As<Napi::String>().Utf8Value();
  Residency residency = Residency::Map;
  if (weights_arg) {
    const std::string w = info[5].As<Napi::String>().Utf8Value();
    if (w != "map" && w != "resident") throw_js(env, std::string("new ") + cls + ": weights must be 'map' or 'resident'");
    residency = w == "resident" ? Residency::Resident : Residency::Map;
  }
  std::shared_ptr<MappedFile> file;
  try {
    file = std::make_shared<MappedFile>(path, residency);
  } catch (const std::exception& e) {
    throw_js(env, e.what());
  }
  Napi::Object spec = info[1].As<Napi::Object>();
  Napi::Array layers = info[2].As<Napi::Array>();
  Tensors T(env, info[3].As<Napi::Object>(), *file);

  ModelConfig c;
  c.vocab = get_int(env, spec, "vocabSize");
  c.d_model = get_int(env, spec, "dModel");
  c.n_layers = get_int(env, spec, "nLayers");
  c.n_heads = get_int(env, spec, "nHeads");
  c.n_kv_heads = get_int(env, spec, "nKvHeads");
  c.head_dim = get_int(env, spec, "headDim");
  c.max_positions = get_int(env, spec, "maxPositions");
  c.gated = get_bool(env, spec, "gated");
  c.rmsnorm = get_str(env, spec, "norm") == "rmsnorm";
  c.rope = get_str(env, spec, "positions") == "rope";
  c.position_offset = get_int(env, spec, "positionOffset");
  c.rope_theta = get_num(env, spec, "ropeTheta");
  c.norm_eps = static_cast<float>(get_num(env, spec, "normEps"));
  const bool tied = get_bool(env, spec, "tiedEmbeddings");
  if (static_cast<int64_t>(layers.Length()) != c.n_layers) throw_js(env, "Model: layers length ≠ nLayers");

  const int64_t d = c.d_model, qd = c.n_heads * c.head_dim, kd = c.n_kv_heads * c.head_dim;
  ModelWeights w;
  w.embed = T.matrix("embed.weight", c.vocab, d);
  if (!c.rope) w.pos_embed = T.matrix("pos_embed.weight", c.max_positions + c.position_offset, d);
  w.lm_head = tied ? w.embed : T.matrix("lm_head.weight", c.vocab, d);
  w.final_norm_w = T.f32("final_norm.weight", d);
  w.final_norm_b = T.f32_opt("final_norm.bias", d);
  for (int64_t i = 0; i < c.n_layers; ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    Napi::Object lo = layers.Get(static_cast<uint32_t>(i)).As<Napi::Object>();
    LayerWeights L;
    L.attn_norm_w = T.f32(p + "attn_norm.weight", d);
    L.attn_norm_b = T.f32_opt(p + "attn_norm.bias", d);
    L.q = T.matrix(p + "attn.q.weight", qd, d);
    L.k = T.matrix(p + "attn.k.weight", kd, d);
    L.v = T.matrix(p + "attn.v.weight", kd, d);
    L.o = T.matrix(p + "attn.o.weight", d, qd);
    L.q_b = T.f32_opt(p + "attn.q.bias", qd);
    L.k_b = T.f32_opt(p + "attn.k.bias", kd);
    L.v_b = T.f32_opt(p + "attn.v.bias", kd);
    L.o_b = T.f32_opt(p + "attn.o.bias", d);
    L.ffn_norm_w = T.f32(p + "ffn_norm.weight", d);
    L.ffn_norm_b = T.f32_opt(p + "ffn_norm.bias", d);
    const int64_t F = get_int(env, lo, "dFF");
    L.d_ff = F;
    L.act = parse_act(env, get_str(env, lo, "activation"));
    Napi::Value thr = lo.Get("threshold");
    L.threshold = thr.IsNumber() ? thr.As<Napi::Number>().FloatValue() : -1.f;
    Napi::Value tw = lo.Get("twell");
    if (tw.IsObject()) {
      Napi::Object two = tw.As<Napi::Object>();
      L.twell.tile = static_cast<int>(get_int(env, two, "tileWidth"));
      L.twell.compression = static_cast<int>(get_int(env, two, "compression"));
    }
    DType da, db;
    if (c.gated) {
      L.ffn_a = T.raw(p + "ffn.gate", {F, d}, &da);
      L.ffn_b = T.raw(p + "ffn.updown", {F, 2, d}, &db);
    } else {
      L.ffn_a = T.raw(p + "ffn.up", {F, d}, &da);
      L.ffn_b = T.raw(p + "ffn.down_t", {F, d}, &db);
    }
    if (da != db) throw_js(env, path + ": layer " + std::to_string(i) + " FFN tensors differ in dtype");
    L.ffn_dtype = da;
    L.up_b = T.f32_opt(p + "ffn.up.bias", F);
    // The gated FFN kernels have no up-projection bias (checkpoints with one are refused at
    // packing; a hand-made file must not run the paths that would ignore it).
    if (c.gated && L.up_b)
      throw_js(env, path + ": layer " + std::to_string(i) + ": ffn.up.bias on a gated FFN is not supported");
    L.down_b = T.f32_opt(p + "ffn.down.bias", d);
    w.layers.push_back(L);
  }
  ModelArgs a;
  a.path = path;
  a.file = std::move(file);
  a.cfg = c;
  a.weights = std::move(w);
  a.context = info[4].As<Napi::Number>().Int64Value();
  return a;
}

namespace {

class ModelWrap : public Napi::ObjectWrap<ModelWrap> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "Model",
                       {InstanceMethod("forward", &ModelWrap::Forward), InstanceMethod("reset", &ModelWrap::Reset),
                        InstanceMethod("position", &ModelWrap::Position),
                        InstanceMethod("activity", &ModelWrap::Activity),
                        InstanceMethod("resetActivity", &ModelWrap::ResetActivity),
                        InstanceMethod("setProfiling", &ModelWrap::SetProfiling),
                        InstanceMethod("setKvCache", &ModelWrap::SetKvCache),
                        InstanceMethod("stepTimes", &ModelWrap::StepTimesJs),
                        InstanceMethod("setFfnObserver", &ModelWrap::SetFfnObserver),
                        InstanceMethod("close", &ModelWrap::Close)});
  }

  // new Model(path, spec, layers, tensors, context)
  explicit ModelWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<ModelWrap>(info) {
    ModelArgs a = parse_model_args(info, "Model");
    try {
      model_ = std::make_unique<Model>(a.cfg, std::move(a.weights), a.context, a.file);
    } catch (const std::exception& e) {
      throw_js(info.Env(), a.path + ": " + e.what());
    }
  }

 private:
  Model& model(Napi::Env env) {
    if (!model_) throw_js(env, "Model: closed");
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

  // setKvCache('f32' | 'bf16'): the KV cache's element; empties the cache.
  Napi::Value SetKvCache(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const std::string t = info.Length() == 1 && info[0].IsString() ? info[0].As<Napi::String>().Utf8Value() : "";
    if (t != "f32" && t != "bf16") throw_js(env, "setKvCache('f32' | 'bf16'): bad arguments");
    model(env).set_kv_dtype(t == "bf16" ? DType::BF16 : DType::F32);
    return env.Undefined();
  }

  Napi::Value Position(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), static_cast<double>(model(info.Env()).position()));
  }

  Napi::Value Activity(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return activity_to_js(env, model(env).activity());
  }

  Napi::Value ResetActivity(const Napi::CallbackInfo& info) {
    model(info.Env()).reset_stats();
    return info.Env().Undefined();
  }

  // setProfiling(on: boolean): time each step of every forward (Model::set_profiling).
  Napi::Value SetProfiling(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (info.Length() != 1 || !info[0].IsBoolean()) throw_js(env, "setProfiling(on: boolean): bad arguments");
    model(env).set_profiling(info[0].As<Napi::Boolean>().Value());
    return env.Undefined();
  }

  // stepTimes() → { seconds: { embed, norms, ... }, tokens, calls } since the last resetActivity().
  Napi::Value StepTimesJs(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const StepTimes& t = model(env).step_times();
    Napi::Object seconds = Napi::Object::New(env);
    for (int i = 0; i < kModelSteps; ++i) seconds.Set(model_step_name(static_cast<ModelStep>(i)), t.seconds[i]);
    Napi::Object out = Napi::Object::New(env);
    out.Set("seconds", seconds);
    out.Set("tokens", static_cast<double>(t.tokens));
    out.Set("calls", static_cast<double>(t.calls));
    return out;
  }

  // setFfnObserver(fn | null): fn(layer, T, F, act: Float32Array, hidden: Float32Array) after every
  // FFN of every forward (copies; see Model::set_ffn_observer). An exception in fn fails forward.
  Napi::Value SetFfnObserver(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Model& m = model(env);
    if (info.Length() != 1 || !(info[0].IsFunction() || info[0].IsNull()))
      throw_js(env, "setFfnObserver(fn: function | null): bad arguments");
    if (info[0].IsNull()) {
      m.set_ffn_observer(nullptr);
      observer_.Reset();
      return env.Undefined();
    }
    observer_ = Napi::Persistent(info[0].As<Napi::Function>());
    m.set_ffn_observer([this, env](int64_t layer, int64_t T, int64_t F, const float* act, const float* hidden) {
      const size_t n = static_cast<size_t>(T * F);
      Napi::Float32Array a = Napi::Float32Array::New(env, n);
      Napi::Float32Array h = Napi::Float32Array::New(env, n);
      std::copy(act, act + n, a.Data());
      std::copy(hidden, hidden + n, h.Data());
      observer_.Call({Napi::Number::New(env, static_cast<double>(layer)), Napi::Number::New(env, static_cast<double>(T)),
                      Napi::Number::New(env, static_cast<double>(F)), a, h});
    });
    return env.Undefined();
  }

  Napi::Value Close(const Napi::CallbackInfo& info) {
    model_.reset();
    return info.Env().Undefined();
  }

  std::unique_ptr<Model> model_;
  Napi::FunctionReference observer_;
};

AddonRegistrar reg([](Napi::Env env, Napi::Object exports) { exports.Set("Model", ModelWrap::Define(env)); });

}  // namespace
}  // namespace sparsellm::addon
