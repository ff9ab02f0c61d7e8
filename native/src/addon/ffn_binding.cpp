// Bindings: one FFN layer on the CPU engine (sparsellm/ffn.h, sparsellm/hybrid.h), for the
// `bench` command and tests. No math here: argument checks, conversions and timing loops.
//
//   new FfnLayer({ dModel, dFF, gated, dtype: 'f32'|'bf16',
//                  gate?: Float32Array [dFF*dModel]   (gated only; W_gate [dFF, dModel])
//                  up: Float32Array [dFF*dModel]      (W_up [dFF, dModel])
//                  down: Float32Array [dModel*dFF]    (W_down [dModel, dFF], standard layout)
//                  upBias?: Float32Array [dFF]        (non-gated only)
//                  downBias?: Float32Array [dModel]
//                  tileWidth?: number = 256, compression?: number = 8 })
//     packs the weights into the kernel layout (rounding to bf16 when dtype is 'bf16').
//   layer.forward(x: Float32Array [M*dModel], M, { mode?: 'dense'|'sparse'|'auto' = 'auto',
//                 out?: Float32Array [M*dModel] })
//     → { y: Float32Array, stats: { path: 'dense'|'sparse', nnz, maxRowNnz, overflowTiles,
//                                   overflowRows } }
//   layer.decode(x: Float32Array [M*dModel] (M = x.length / dModel, a handful of tokens),
//                { mode?, out? }) → same as forward
//   layer.trainStep(x, dy: Float32Array [M*dModel], M, { mode?: 'dense'|'hybrid' = 'hybrid',
//                   ellWidth?: number = 128, l1?: number = 0 })
//     → { y, dx: Float32Array [M*dModel], dWgate, dWup: Float32Array [dFF*dModel],
//         dWdown: Float32Array [dModel*dFF] (standard layouts), loss: { l1 },
//         stats: { savedBytes, tailRows, nnz, maxRowNnz, overflowTiles, overflowRows } }
//     gated f32 layers only. loss.l1 = (1/M)·Σ|h| (before λ); λ = opts.l1 enters the gradient.
//   layer.time(kind: 'forward'|'decode'|'train', x, M, opts, repeats, warmup)
//     → { medianMs, minMs, maxMs }: runs the native call `warmup` times, then `repeats` times,
//     timing each call natively (no JS allocation inside the timed region). opts as for the
//     matching method; for 'train' also opts.dy (Float32Array [M*dModel]; default: a fixed
//     pseudo-random dy).
//   layer.config → { dModel, dFF, gated, dtype, tileWidth, compression, capacity }
//   layer.weightBytes → bytes of the packed weights (kernel layout)
#include <algorithm>
#include <chrono>
#include <functional>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "args.h"
#include "registry.h"
#include "sparsellm/ffn.h"
#include "sparsellm/hybrid.h"

namespace sparsellm::addon {
namespace {

constexpr const char* kWho = "FfnLayer";  // prefixes argument errors (args.h)

TrainMode parse_train_mode(Napi::Env env, const Napi::Object& o) {
  Napi::Value v = o.Get("mode");
  if (v.IsUndefined()) return TrainMode::Hybrid;
  const std::string s = v.IsString() ? v.As<Napi::String>().Utf8Value() : "";
  if (s == "dense") return TrainMode::Dense;
  if (s == "hybrid") return TrainMode::Hybrid;
  throw_js(env, "FfnLayer.trainStep: mode must be 'dense' or 'hybrid'");
}

Napi::Object stats_object(Napi::Env env, const SparsityStats& s) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("nnz", static_cast<double>(s.nnz));
  o.Set("maxRowNnz", static_cast<double>(s.max_row_nnz));
  o.Set("overflowTiles", static_cast<double>(s.overflow_tiles));
  o.Set("overflowRows", static_cast<double>(s.overflow_rows));
  return o;
}

class FfnLayerWrap : public Napi::ObjectWrap<FfnLayerWrap> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "FfnLayer",
                       {InstanceMethod("forward", &FfnLayerWrap::Forward),
                        InstanceMethod("decode", &FfnLayerWrap::Decode),
                        InstanceMethod("trainStep", &FfnLayerWrap::TrainStep),
                        InstanceMethod("time", &FfnLayerWrap::Time),
                        InstanceAccessor("config", &FfnLayerWrap::Config, nullptr),
                        InstanceAccessor("weightBytes", &FfnLayerWrap::WeightBytes, nullptr)});
  }

  explicit FfnLayerWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<FfnLayerWrap>(info) {
    Napi::Env env = info.Env();
    if (info.Length() != 1 || !info[0].IsObject()) throw_js(env, "new FfnLayer(options): options object required");
    Napi::Object o = info[0].As<Napi::Object>();
    FfnLayerArgs a = read_ffn_layer_args(env, o, "FfnLayer");
    Napi::Value dt = o.Get("dtype");
    const std::string dts = dt.IsString() ? dt.As<Napi::String>().Utf8Value() : "";
    if (dts == "f32") a.config.dtype = DType::F32;
    else if (dts == "bf16") a.config.dtype = DType::BF16;
    else throw_js(env, "FfnLayer: dtype must be 'f32' or 'bf16'");
    try {
      layer_ = std::make_unique<FfnLayer>(a.config, a.gate, a.up, a.down, a.up_bias, a.down_bias);
    } catch (const std::exception& e) {
      throw_js(env, e.what());
    }
  }

 private:
  int64_t d() const { return layer_->config().d_model; }
  int64_t F() const { return layer_->config().d_ff; }

  int64_t tokens(Napi::Env env, const Napi::Value& v) {
    if (!v.IsNumber()) throw_js(env, "FfnLayer: M (token count) must be a number");
    const double m = v.As<Napi::Number>().DoubleValue();
    if (m < 1 || m != static_cast<double>(static_cast<int64_t>(m))) throw_js(env, "FfnLayer: M must be a positive integer");
    return static_cast<int64_t>(m);
  }

  Napi::Float32Array out_array(Napi::Env env, const Napi::Object& o, size_t n) {
    Napi::Value v = o.Get("out");
    if (v.IsUndefined() || v.IsNull()) return Napi::Float32Array::New(env, n);
    f32_array(env, v, n, "out", kWho);
    return v.As<Napi::Float32Array>();
  }

  Napi::Value Run(const Napi::CallbackInfo& info, bool decode) {
    Napi::Env env = info.Env();
    if (info.Length() < 1) throw_js(env, "FfnLayer: x required");
    int64_t M;
    size_t opt_index;
    if (decode) {
      if (!info[0].IsTypedArray()) throw_js(env, "FfnLayer.decode: x must be a Float32Array");
      const size_t len = info[0].As<Napi::TypedArray>().ElementLength();
      if (len == 0 || len % static_cast<size_t>(d())) throw_js(env, "FfnLayer.decode: x length must be a positive multiple of dModel");
      M = static_cast<int64_t>(len) / d();
      opt_index = 1;
    } else {
      M = tokens(env, info.Length() > 1 ? info[1] : env.Undefined());
      opt_index = 2;
    }
    const float* x = f32_array(env, info[0], static_cast<size_t>(M * d()), "x", kWho);
    Napi::Object o = opts_of(info, opt_index, kWho);
    const FfnMode mode = parse_mode(env, o, kWho);
    Napi::Float32Array y = out_array(env, o, static_cast<size_t>(M * d()));
    FfnStats s;
    try {
      s = decode ? layer_->decode(x, M, y.Data(), mode) : layer_->forward(x, M, y.Data(), mode);
    } catch (const std::exception& e) {
      throw_js(env, e.what());
    }
    Napi::Object r = Napi::Object::New(env);
    r.Set("y", y);
    Napi::Object st = stats_object(env, s);
    st.Set("path", s.path == FfnPath::Dense ? "dense" : "sparse");
    r.Set("stats", st);
    return r;
  }

  Napi::Value Forward(const Napi::CallbackInfo& info) { return Run(info, false); }
  Napi::Value Decode(const Napi::CallbackInfo& info) { return Run(info, true); }

  FfnTrainer& trainer(Napi::Env env) {
    if (!trainer_) {
      try {
        trainer_ = std::make_unique<FfnTrainer>(*layer_);
      } catch (const std::exception& e) {
        throw_js(env, e.what());
      }
    }
    return *trainer_;
  }

  HybridParams hybrid_params(Napi::Env env, const Napi::Object& o) {
    HybridParams p;
    p.ell_width = static_cast<int>(int_opt(env, o, "ellWidth", 128, 1, kWho));
    Napi::Value l1 = o.Get("l1");
    if (!l1.IsUndefined()) {
      if (!l1.IsNumber()) throw_js(env, "FfnLayer.trainStep: l1 must be a number");
      p.l1 = l1.As<Napi::Number>().FloatValue();
    }
    p.twell = layer_->config().twell;
    return p;
  }

  Napi::Value TrainStep(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (info.Length() < 3) throw_js(env, "FfnLayer.trainStep(x, dy, M, opts?)");
    const int64_t M = tokens(env, info[2]);
    const size_t n = static_cast<size_t>(M * d());
    const float* x = f32_array(env, info[0], n, "x", kWho);
    const float* dy = f32_array(env, info[1], n, "dy", kWho);
    Napi::Object o = opts_of(info, 3, kWho);
    const TrainMode mode = parse_train_mode(env, o);
    const HybridParams p = hybrid_params(env, o);
    FfnTrainer& tr = trainer(env);
    Napi::Float32Array y = Napi::Float32Array::New(env, n), dx = Napi::Float32Array::New(env, n);
    const size_t wn = static_cast<size_t>(d() * F());
    Napi::Float32Array dg = Napi::Float32Array::New(env, wn), du = Napi::Float32Array::New(env, wn),
                       dd = Napi::Float32Array::New(env, wn);
    TrainStepStats s;
    try {
      s = tr.step(x, dy, M, mode, p, y.Data(), dx.Data());
      tr.export_grads(dg.Data(), du.Data(), dd.Data());
    } catch (const std::exception& e) {
      throw_js(env, e.what());
    }
    Napi::Object r = Napi::Object::New(env);
    r.Set("y", y);
    r.Set("dx", dx);
    r.Set("dWgate", dg);
    r.Set("dWup", du);
    r.Set("dWdown", dd);
    Napi::Object loss = Napi::Object::New(env);
    loss.Set("l1", s.l1);
    r.Set("loss", loss);
    Napi::Object st = stats_object(env, s.sparsity);
    st.Set("savedBytes", static_cast<double>(s.saved_bytes));
    st.Set("tailRows", static_cast<double>(s.tail_rows));
    r.Set("stats", st);
    return r;
  }

  Napi::Value Time(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (info.Length() != 6 || !info[0].IsString())
      throw_js(env, "FfnLayer.time(kind, x, M, opts, repeats, warmup)");
    const std::string kind = info[0].As<Napi::String>().Utf8Value();
    const int64_t M = tokens(env, info[2]);
    const size_t n = static_cast<size_t>(M * d());
    const float* x = f32_array(env, info[1], n, "x", kWho);
    Napi::Object o = opts_of(info, 3, kWho);
    const int64_t repeats = tokens(env, info[4]);
    if (!info[5].IsNumber() || info[5].As<Napi::Number>().Int64Value() < 0) throw_js(env, "FfnLayer.time: warmup must be >= 0");
    const int64_t warmup = info[5].As<Napi::Number>().Int64Value();
    std::vector<float> y(n), dx(n), dy_own;
    std::function<void()> call;
    if (kind == "forward" || kind == "decode") {
      const FfnMode mode = parse_mode(env, o, kWho);
      const bool dec = kind == "decode";
      call = [&, mode, dec] {
        if (dec) layer_->decode(x, M, y.data(), mode);
        else layer_->forward(x, M, y.data(), mode);
      };
    } else if (kind == "train") {
      const TrainMode mode = parse_train_mode(env, o);
      const HybridParams p = hybrid_params(env, o);
      const float* dy = f32_opt(env, o, "dy", n, kWho);
      if (!dy) {
        dy_own.resize(n);
        uint32_t s = 12345u;
        for (auto& v : dy_own) {
          s = s * 1664525u + 1013904223u;
          v = static_cast<float>(static_cast<int32_t>(s >> 8) - (1 << 23)) / static_cast<float>(1 << 23);
        }
        dy = dy_own.data();
      }
      FfnTrainer& tr = trainer(env);
      call = [&, mode, p, dy] { tr.step(x, dy, M, mode, p, y.data(), dx.data()); };
    } else {
      throw_js(env, "FfnLayer.time: kind must be 'forward', 'decode' or 'train'");
    }
    std::vector<double> ms;
    try {
      for (int64_t i = 0; i < warmup; ++i) call();
      for (int64_t i = 0; i < repeats; ++i) {
        const auto t0 = std::chrono::steady_clock::now();
        call();
        const auto t1 = std::chrono::steady_clock::now();
        ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
      }
    } catch (const std::exception& e) {
      throw_js(env, e.what());
    }
    std::sort(ms.begin(), ms.end());
    const size_t k = ms.size();
    const double median = k % 2 ? ms[k / 2] : 0.5 * (ms[k / 2 - 1] + ms[k / 2]);
    Napi::Object r = Napi::Object::New(env);
    r.Set("medianMs", median);
    r.Set("minMs", ms.front());
    r.Set("maxMs", ms.back());
    return r;
  }

  Napi::Value Config(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const FfnLayerConfig& c = layer_->config();
    Napi::Object o = Napi::Object::New(env);
    o.Set("dModel", static_cast<double>(c.d_model));
    o.Set("dFF", static_cast<double>(c.d_ff));
    o.Set("gated", c.gated);
    o.Set("dtype", c.dtype == DType::F32 ? "f32" : "bf16");
    o.Set("tileWidth", c.twell.tile);
    o.Set("compression", c.twell.compression);
    o.Set("capacity", c.twell.capacity());
    return o;
  }

  Napi::Value WeightBytes(const Napi::CallbackInfo& info) {
    const FfnLayerConfig& c = layer_->config();
    const double mats = c.gated ? 3.0 : 2.0;
    return Napi::Number::New(info.Env(), mats * static_cast<double>(c.d_model * c.d_ff) * dtype_size(c.dtype));
  }

  std::unique_ptr<FfnLayer> layer_;
  std::unique_ptr<FfnTrainer> trainer_;
};

AddonRegistrar reg([](Napi::Env env, Napi::Object exports) {
  exports.Set("FfnLayer", FfnLayerWrap::Define(env));
});

}  // namespace
}  // namespace sparsellm::addon
