// Bindings: the CUDA backend (sparsellm/cuda_ops.h), registered only in builds that contain it
// (SPARSELLM_HAVE_CUDA); src/core/engine/cuda.ts reports the build's reason otherwise. No math
// here: argument checks, host/device copies and timing loops.
//
//   new CudaFfnLayer({ dModel, dFF, gated, dtype: 'bf16', gate?, up, down, upBias?, downBias?,
//                      tileWidth?: 256, compression?: 8 })      (as FfnLayer, ffn_binding.cpp)
//   layer.forward(x: Float32Array [M*dModel], M, { mode?, out?, generic? })
//     → { y, stats: { path, nnz, maxRowNnz, overflowTiles, overflowRows, fallbackRows } }
//   layer.decode(x: Float32Array [M*dModel], { mode?, out? }) → same (M ≤ 8 uses the GEMV path)
//   layer.time('forward'|'decode', x, M, { mode? }, repeats, warmup) → { medianMs, minMs, maxMs }
//     (x uploaded once; device-side timing with CUDA events around each call)
//   layer.trainStep(x, dy: Float32Array [M*dModel], M, { mode?: 'hybrid'|'dense', ellWidth?: 128,
//                   l1?: 0 })  (gated only)
//     → { y, dx, dWgate, dWup: [dFF*dModel], dWdown: [dModel*dFF] (standard layouts),
//         loss: { l1 }, stats: { savedBytes, tailRows, nnz, maxRowNnz, overflowTiles, overflowRows } }
//     the Hybrid step on the GPU (CudaFfnTrainer); loss.l1 = (1/M)·Σ|h| before λ.
//   layer.config, layer.weightBytes
//   cudaTimeGemm({ M, K, N, impl: 'ours'|'cublas', repeats, warmup }) → { medianMs, minMs, maxMs }
//     (random bf16 operands on the device, bf16 output)
//   cudaCublas() → { available, library?, reason? };  cudaNvml() → { available, driver?, reason? }
//   cudaEnergyMillijoules() → the GPU's NVML energy counter (mJ since the driver loaded)
//   cudaBench({ dModel?, dFF?, tokens?, gated?, nnzPerToken?, repeats?, warmup?, decodeTokens?,
//               energySeconds?, train?, trainRepeats?, tileWidth?, compression? }) → { device, driver, cublas,
//     measuredNnzPerToken, overflowRows, rows: [{ name, medianMs, minMs, maxMs, tflops,
//     mjPerToken, note }], log: string[] }
#ifdef SPARSELLM_HAVE_CUDA
#include <algorithm>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "args.h"
#include "registry.h"
#include "sparsellm/cuda_ops.h"

namespace sparsellm::addon {
namespace {

constexpr const char* kWho = "cuda";  // prefixes argument errors (args.h)

using cuda::CudaFfnLayer;

Napi::Object timing_object(Napi::Env env, std::vector<double> ms) {
  std::sort(ms.begin(), ms.end());
  const size_t k = ms.size();
  Napi::Object r = Napi::Object::New(env);
  r.Set("medianMs", k % 2 ? ms[k / 2] : 0.5 * (ms[k / 2 - 1] + ms[k / 2]));
  r.Set("minMs", ms.front());
  r.Set("maxMs", ms.back());
  return r;
}

class CudaFfnLayerWrap : public Napi::ObjectWrap<CudaFfnLayerWrap> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "CudaFfnLayer",
                       {InstanceMethod("forward", &CudaFfnLayerWrap::Forward),
                        InstanceMethod("decode", &CudaFfnLayerWrap::Decode),
                        InstanceMethod("time", &CudaFfnLayerWrap::Time),
                        InstanceMethod("trainStep", &CudaFfnLayerWrap::TrainStep),
                        InstanceAccessor("config", &CudaFfnLayerWrap::Config, nullptr),
                        InstanceAccessor("weightBytes", &CudaFfnLayerWrap::WeightBytes, nullptr)});
  }

  explicit CudaFfnLayerWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<CudaFfnLayerWrap>(info) {
    Napi::Env env = info.Env();
    if (info.Length() != 1 || !info[0].IsObject()) throw_js(env, "new CudaFfnLayer(options): options object required");
    Napi::Object o = info[0].As<Napi::Object>();
    FfnLayerArgs a = read_ffn_layer_args(env, o, "CudaFfnLayer");
    Napi::Value dt = o.Get("dtype");
    const std::string dts = dt.IsString() ? dt.As<Napi::String>().Utf8Value() : "bf16";
    if (dts != "bf16") throw_js(env, "CudaFfnLayer: the CUDA kernels keep bf16 weights: dtype must be 'bf16'");
    a.config.dtype = DType::BF16;
    try {
      layer_ = std::make_unique<CudaFfnLayer>(a.config, a.gate, a.up, a.down, a.up_bias, a.down_bias);
    } catch (const std::exception& e) {
      throw_js(env, e.what());
    }
  }

 private:
  int64_t d() const { return layer_->config().d_model; }

  int64_t tokens(Napi::Env env, const Napi::Value& v) {
    if (!v.IsNumber()) throw_js(env, "CudaFfnLayer: M (token count) must be a number");
    const double m = v.As<Napi::Number>().DoubleValue();
    if (m < 1 || m != static_cast<double>(static_cast<int64_t>(m))) throw_js(env, "CudaFfnLayer: M must be a positive integer");
    return static_cast<int64_t>(m);
  }

  Napi::Value Run(const Napi::CallbackInfo& info, bool decode) {
    Napi::Env env = info.Env();
    if (info.Length() < 1) throw_js(env, "CudaFfnLayer: x required");
    int64_t M;
    size_t opt_index;
    if (decode) {
      if (!info[0].IsTypedArray()) throw_js(env, "CudaFfnLayer.decode: x must be a Float32Array");
      const size_t len = info[0].As<Napi::TypedArray>().ElementLength();
      if (len == 0 || len % static_cast<size_t>(d())) throw_js(env, "CudaFfnLayer.decode: x length must be a positive multiple of dModel");
      M = static_cast<int64_t>(len) / d();
      opt_index = 1;
    } else {
      M = tokens(env, info.Length() > 1 ? info[1] : env.Undefined());
      opt_index = 2;
    }
    const float* x = f32_array(env, info[0], static_cast<size_t>(M * d()), "x", kWho);
    Napi::Object o = opts_of(info, opt_index, kWho);
    const FfnMode mode = parse_mode(env, o, kWho);
    Napi::Value outv = o.Get("out");
    Napi::Float32Array y;
    if (outv.IsUndefined() || outv.IsNull()) {
      y = Napi::Float32Array::New(env, static_cast<size_t>(M * d()));
    } else {
      f32_array(env, outv, static_cast<size_t>(M * d()), "out", kWho);
      y = outv.As<Napi::Float32Array>();
    }
    Napi::Value gen = o.Get("generic");
    FfnStats s;
    int64_t fallback = 0;
    try {
      layer_->set_generic_kernels(gen.IsBoolean() && gen.As<Napi::Boolean>().Value());
      s = decode ? layer_->decode(x, M, y.Data(), mode) : layer_->forward(x, M, y.Data(), mode);
      fallback = layer_->last_fallback_rows();
      layer_->set_generic_kernels(false);
    } catch (const std::exception& e) {
      throw_js(env, e.what());
    }
    Napi::Object r = Napi::Object::New(env);
    r.Set("y", y);
    Napi::Object st = Napi::Object::New(env);
    st.Set("path", s.path == FfnPath::Dense ? "dense" : "sparse");
    st.Set("nnz", static_cast<double>(s.nnz));
    st.Set("maxRowNnz", static_cast<double>(s.max_row_nnz));
    st.Set("overflowTiles", static_cast<double>(s.overflow_tiles));
    st.Set("overflowRows", static_cast<double>(s.overflow_rows));
    st.Set("fallbackRows", static_cast<double>(fallback));
    r.Set("stats", st);
    return r;
  }

  Napi::Value Forward(const Napi::CallbackInfo& info) { return Run(info, false); }
  Napi::Value Decode(const Napi::CallbackInfo& info) { return Run(info, true); }

  Napi::Value Time(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (info.Length() != 6 || !info[0].IsString()) throw_js(env, "CudaFfnLayer.time(kind, x, M, opts, repeats, warmup)");
    const std::string kind = info[0].As<Napi::String>().Utf8Value();
    if (kind != "forward" && kind != "decode")
      throw_js(env, "CudaFfnLayer.time: kind must be 'forward' or 'decode' (the CUDA backend has no training kernels yet)");
    const int64_t M = tokens(env, info[2]);
    const float* x = f32_array(env, info[1], static_cast<size_t>(M * d()), "x", kWho);
    const FfnMode mode = parse_mode(env, opts_of(info, 3, kWho), kWho);
    const int64_t repeats = tokens(env, info[4]);
    if (!info[5].IsNumber() || info[5].As<Napi::Number>().Int64Value() < 0) throw_js(env, "CudaFfnLayer.time: warmup must be >= 0");
    const int64_t warmup = info[5].As<Napi::Number>().Int64Value();
    std::vector<double> ms;
    try {
      const int64_t dp = layer_->d_padded();
      cuda::DeviceBuffer xf(static_cast<size_t>(M * d()) * 4), xb(static_cast<size_t>(M * dp) * 2),
          yb(static_cast<size_t>(M * d()) * 4);
      cuda::upload(xf.data(), x, static_cast<size_t>(M * d()) * 4);
      cuda::memset_device(xb.data(), 0, xb.bytes());
      cuda::f32_to_bf16_device(xf.as<float>(), d(), xb.as<uint16_t>(), dp, M, d());
      const bool dec = kind == "decode";
      auto call = [&] {
        if (dec) layer_->decode_device(xb.as<uint16_t>(), M, yb.as<float>(), mode);
        else layer_->forward_device(xb.as<uint16_t>(), M, yb.as<float>(), mode, false);
      };
      for (int64_t i = 0; i < warmup; ++i) call();
      cuda::synchronize();
      cuda::EventTimer t;
      for (int64_t i = 0; i < repeats; ++i) {
        t.start();
        call();
        ms.push_back(t.stop_ms());
      }
    } catch (const std::exception& e) {
      throw_js(env, e.what());
    }
    return timing_object(env, ms);
  }

  Napi::Value TrainStep(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (info.Length() < 3) throw_js(env, "CudaFfnLayer.trainStep(x, dy, M, opts?)");
    const int64_t M = tokens(env, info[2]);
    const size_t n = static_cast<size_t>(M * d());
    const float* x = f32_array(env, info[0], n, "x", kWho);
    const float* dy = f32_array(env, info[1], n, "dy", kWho);
    Napi::Object o = opts_of(info, 3, kWho);
    Napi::Value mv = o.Get("mode");
    const std::string ms = mv.IsString() ? mv.As<Napi::String>().Utf8Value() : "hybrid";
    if (ms != "dense" && ms != "hybrid") throw_js(env, "CudaFfnLayer.trainStep: mode must be 'dense' or 'hybrid'");
    const TrainMode mode = ms == "dense" ? TrainMode::Dense : TrainMode::Hybrid;
    HybridParams p;
    p.ell_width = static_cast<int>(int_opt(env, o, "ellWidth", 128, 1, kWho));
    p.l1 = static_cast<float>(num_opt(env, o, "l1", 0.0, kWho));
    p.twell = layer_->config().twell;
    const size_t wn = static_cast<size_t>(d() * layer_->config().d_ff);
    Napi::Float32Array y = Napi::Float32Array::New(env, n), dx = Napi::Float32Array::New(env, n);
    Napi::Float32Array dg = Napi::Float32Array::New(env, wn), du = Napi::Float32Array::New(env, wn),
                       dd = Napi::Float32Array::New(env, wn);
    TrainStepStats s;
    try {
      if (!trainer_) trainer_ = std::make_unique<cuda::CudaFfnTrainer>(*layer_);
      s = trainer_->step(x, dy, M, mode, p, y.Data(), dx.Data());
      trainer_->export_grads(dg.Data(), du.Data(), dd.Data());
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
    Napi::Object st = Napi::Object::New(env);
    st.Set("savedBytes", static_cast<double>(s.saved_bytes));
    st.Set("tailRows", static_cast<double>(s.tail_rows));
    st.Set("nnz", static_cast<double>(s.sparsity.nnz));
    st.Set("maxRowNnz", static_cast<double>(s.sparsity.max_row_nnz));
    st.Set("overflowTiles", static_cast<double>(s.sparsity.overflow_tiles));
    st.Set("overflowRows", static_cast<double>(s.sparsity.overflow_rows));
    r.Set("stats", st);
    return r;
  }

  Napi::Value Config(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const FfnLayerConfig& c = layer_->config();
    Napi::Object o = Napi::Object::New(env);
    o.Set("dModel", static_cast<double>(c.d_model));
    o.Set("dFF", static_cast<double>(c.d_ff));
    o.Set("gated", c.gated);
    o.Set("dtype", "bf16");
    o.Set("tileWidth", c.twell.tile);
    o.Set("compression", c.twell.compression);
    o.Set("capacity", c.twell.capacity());
    return o;
  }

  Napi::Value WeightBytes(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), static_cast<double>(layer_->weight_bytes()));
  }

  std::unique_ptr<CudaFfnLayer> layer_;
  std::unique_ptr<cuda::CudaFfnTrainer> trainer_;  // declared after layer_: destroyed first
};

Napi::Value TimeGemm(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = opts_of(info, 0, kWho);
  const int64_t M = int_opt(env, o, "M", -1, 1, kWho), K = int_opt(env, o, "K", -1, 1, kWho), N = int_opt(env, o, "N", -1, 1, kWho);
  if (M < 1 || K < 1 || N < 1) throw_js(env, "cudaTimeGemm: M, K and N are required");
  const int64_t repeats = int_opt(env, o, "repeats", 10, 1, kWho), warmup = int_opt(env, o, "warmup", 2, 0, kWho);
  Napi::Value iv = o.Get("impl");
  const std::string impl = iv.IsString() ? iv.As<Napi::String>().Utf8Value() : "ours";
  if (impl != "ours" && impl != "cublas") throw_js(env, "cudaTimeGemm: impl must be 'ours' or 'cublas'");
  std::vector<double> ms;
  try {
    cuda::require_device();
    if (impl == "cublas") {
      std::string why;
      if (!cuda::Cublas::available(&why)) throw std::runtime_error("cuBLAS unavailable: " + why);
    }
    const int64_t ld = (K + 7) / 8 * 8, ldo = (N + 7) / 8 * 8;
    std::mt19937 rng(1234);
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    std::vector<float> a(static_cast<size_t>(std::max(M, N) * K));
    for (auto& v : a) v = u(rng);
    cuda::DeviceBuffer tmp(a.size() * 4), A(static_cast<size_t>(M * ld) * 2), W(static_cast<size_t>(N * ld) * 2),
        C(static_cast<size_t>(M * ldo) * 2);
    cuda::upload(tmp.data(), a.data(), a.size() * 4);
    cuda::f32_to_bf16_device(tmp.as<float>(), K, A.as<uint16_t>(), ld, M, K);
    cuda::f32_to_bf16_device(tmp.as<float>(), K, W.as<uint16_t>(), ld, N, K);
    cuda::Epilogue e;
    e.out_bf16 = true;
    e.out = C.data();
    e.ldo = ldo;
    auto call = [&] {
      if (impl == "ours") cuda::gemm_bf16(A.as<uint16_t>(), ld, W.as<uint16_t>(), ld, M, N, K, e);
      else cuda::Cublas::gemm_bf16(A.as<uint16_t>(), ld, W.as<uint16_t>(), ld, M, N, K, C.data(), ldo, true);
    };
    for (int64_t i = 0; i < warmup; ++i) call();
    cuda::synchronize();
    cuda::EventTimer t;
    for (int64_t i = 0; i < repeats; ++i) {
      t.start();
      call();
      ms.push_back(t.stop_ms());
    }
  } catch (const std::exception& ex) {
    throw_js(env, ex.what());
  }
  return timing_object(env, ms);
}

Napi::Value CublasInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object r = Napi::Object::New(env);
  std::string why;
  bool ok = false;
  try {
    ok = cuda::Cublas::available(&why);
  } catch (const std::exception& e) {
    why = e.what();
  }
  r.Set("available", ok);
  if (ok) r.Set("library", cuda::Cublas::library());
  else r.Set("reason", why);
  return r;
}

Napi::Value NvmlInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object r = Napi::Object::New(env);
  std::string why;
  bool ok = false;
  try {
    ok = cuda::Nvml::available(&why);
  } catch (const std::exception& e) {
    why = e.what();
  }
  r.Set("available", ok);
  if (ok) r.Set("driver", cuda::Nvml::driver_version());
  else r.Set("reason", why);
  return r;
}

Napi::Value EnergyMillijoules(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  try {
    return Napi::Number::New(env, static_cast<double>(cuda::Nvml::energy_mj()));
  } catch (const std::exception& e) {
    throw_js(env, e.what());
  }
  return env.Undefined();
}

Napi::Value Bench(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = opts_of(info, 0, kWho);
  cuda::GpuBenchOptions b;
  b.d_model = int_opt(env, o, "dModel", b.d_model, 2, kWho);
  b.d_ff = int_opt(env, o, "dFF", b.d_ff, 1, kWho);
  b.tokens = int_opt(env, o, "tokens", b.tokens, 1, kWho);
  Napi::Value g = o.Get("gated");
  if (g.IsBoolean()) b.gated = g.As<Napi::Boolean>().Value();
  b.nnz_per_token = num_opt(env, o, "nnzPerToken", b.nnz_per_token, kWho);
  b.repeats = static_cast<int>(int_opt(env, o, "repeats", b.repeats, 1, kWho));
  b.warmup = static_cast<int>(int_opt(env, o, "warmup", b.warmup, 0, kWho));
  b.decode_tokens = static_cast<int>(int_opt(env, o, "decodeTokens", b.decode_tokens, 1, kWho));
  b.energy_seconds = num_opt(env, o, "energySeconds", b.energy_seconds, kWho);
  Napi::Value tr = o.Get("train");
  if (tr.IsBoolean()) b.train = tr.As<Napi::Boolean>().Value();
  b.train_repeats = static_cast<int>(int_opt(env, o, "trainRepeats", b.train_repeats, 1, kWho));
  b.twell.tile = static_cast<int>(int_opt(env, o, "tileWidth", 256, 1, kWho));
  b.twell.compression = static_cast<int>(int_opt(env, o, "compression", 8, 1, kWho));
  cuda::GpuBenchResult res;
  try {
    res = cuda::run_gpu_benchmarks(b);
  } catch (const std::exception& e) {
    throw_js(env, e.what());
  }
  Napi::Object r = Napi::Object::New(env);
  r.Set("device", res.device);
  r.Set("driver", res.driver);
  r.Set("cublas", res.cublas);
  r.Set("measuredNnzPerToken", res.measured_nnz_per_token);
  r.Set("overflowRows", static_cast<double>(res.overflow_rows));
  Napi::Array rows = Napi::Array::New(env, res.rows.size());
  for (size_t i = 0; i < res.rows.size(); ++i) {
    const auto& x = res.rows[i];
    Napi::Object ro = Napi::Object::New(env);
    ro.Set("name", x.name);
    ro.Set("medianMs", x.median_ms);
    ro.Set("minMs", x.min_ms);
    ro.Set("maxMs", x.max_ms);
    ro.Set("tflops", x.tflops);
    if (x.mj_per_token >= 0) ro.Set("mjPerToken", x.mj_per_token);
    ro.Set("note", x.note);
    rows.Set(i, ro);
  }
  r.Set("rows", rows);
  Napi::Array log = Napi::Array::New(env, res.log.size());
  for (size_t i = 0; i < res.log.size(); ++i) log.Set(i, res.log[i]);
  r.Set("log", log);
  return r;
}

AddonRegistrar reg([](Napi::Env env, Napi::Object exports) {
  exports.Set("CudaFfnLayer", CudaFfnLayerWrap::Define(env));
  exports.Set("cudaTimeGemm", Napi::Function::New(env, TimeGemm));
  exports.Set("cudaCublas", Napi::Function::New(env, CublasInfo));
  exports.Set("cudaNvml", Napi::Function::New(env, NvmlInfo));
  exports.Set("cudaEnergyMillijoules", Napi::Function::New(env, EnergyMillijoules));
  exports.Set("cudaBench", Napi::Function::New(env, Bench));
});

}  // namespace
}  // namespace sparsellm::addon
#endif  // SPARSELLM_HAVE_CUDA
