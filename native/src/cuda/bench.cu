// GPU benchmarks of the FFN at a chosen shape (scripts/gpu-check.sh runs them through the addon):
// dense vs sparse forward, our GEMM vs cuBLAS, decode, energy per token. Device-side timing
// (events) after warm-up; medians of `repeats`. Inputs follow src/core/bench/inputs.ts: the
// sparsity comes from a real gate projection whose constant feature c is calibrated (bisection
// on the model's expected density) to the target non-zeros per token; the density the kernels
// see is measured and reported.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "common.cuh"
#include "sparsellm/cuda_ops.h"
#include "twell_updown.h"

namespace sparsellm::cuda {
namespace {

__device__ __forceinline__ uint32_t mix(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// x[t] = [c, s_t · ξ_t], ξ ~ N(0, 1) from a counter hash (Box-Muller), bf16 [M, ldx].
__global__ void bench_x_kernel(uint16_t* x, int64_t ldx, int64_t M, int64_t d, const float* s, float c, uint32_t seed) {
  const int64_t total = M * d;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / d, k = i - t * d;
    float v;
    if (k == 0) {
      v = c;
    } else {
      const uint32_t a = mix(static_cast<uint32_t>(i) ^ mix(seed ^ static_cast<uint32_t>(i >> 32)));
      const uint32_t b = mix(a ^ 0x9e3779b9u);
      const float u1 = (static_cast<float>(a >> 8) + 0.5f) * (1.f / 16777216.f);
      const float u2 = (static_cast<float>(b >> 8) + 0.5f) * (1.f / 16777216.f);
      v = s[t] * sqrtf(-2.f * logf(u1)) * cospif(2.f * u2);
    }
    x[t * ldx + k] = static_cast<uint16_t>(f32_to_bf16_bits(v));
  }
}

double phi(double z) { return 0.5 * std::erfc(-z / std::sqrt(2.0)); }

struct Stat {
  double median = 0, min = 0, max = 0;
};

Stat time_it(int warmup, int repeats, int inner, const std::function<void()>& f) {
  for (int i = 0; i < warmup; ++i) f();
  synchronize();
  EventTimer t;
  std::vector<double> ms;
  for (int r = 0; r < repeats; ++r) {
    t.start();
    for (int i = 0; i < inner; ++i) f();
    ms.push_back(t.stop_ms() / inner);
  }
  std::sort(ms.begin(), ms.end());
  Stat s;
  s.min = ms.front();
  s.max = ms.back();
  const size_t n = ms.size();
  s.median = n % 2 ? ms[n / 2] : 0.5 * (ms[n / 2 - 1] + ms[n / 2]);
  return s;
}

// Energy per call (mJ) over at least `seconds` of back-to-back calls, or -1 without NVML.
double energy_per_call(double seconds, const std::function<void()>& f) {
  if (!Nvml::available()) return -1;
  synchronize();
  const uint64_t e0 = Nvml::energy_mj();
  const auto t0 = std::chrono::steady_clock::now();
  int64_t calls = 0;
  do {
    for (int i = 0; i < 4; ++i, ++calls) f();
    synchronize();
  } while (std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() < seconds);
  const uint64_t e1 = Nvml::energy_mj();
  return static_cast<double>(e1 - e0) / static_cast<double>(calls);
}

}  // namespace

GpuBenchResult run_gpu_benchmarks(const GpuBenchOptions& o) {
  require_device();
  GpuBenchResult R;
  auto log = [&](const std::string& s) {
    R.log.push_back(s);
    std::fprintf(stderr, "gpu-bench: %s\n", s.c_str());
  };
  int dev = 0;
  SLLM_CUDA(cudaGetDevice(&dev));
  cudaDeviceProp prop{};
  SLLM_CUDA(cudaGetDeviceProperties(&prop, dev));
  R.device = std::string(prop.name) + " (sm_" + std::to_string(prop.major) + std::to_string(prop.minor) + ", " +
             std::to_string(prop.multiProcessorCount) + " SMs)";
  int drv = 0;
  cudaDriverGetVersion(&drv);
  std::string why;
  R.driver = Nvml::available(&why) ? Nvml::driver_version() : ("CUDA driver API " + std::to_string(drv));
  if (!why.empty()) log("NVML: " + why);
  std::string cub;
  R.cublas = Cublas::available(&cub) ? Cublas::library() : ("absent: " + cub);

  const int64_t d = o.d_model, F = o.d_ff, M = o.tokens;
  std::mt19937_64 rng(12345);
  std::normal_distribution<double> nd(0.0, 1.0);
  // Weights: W_act rows [-b_j, σ·η_j], W_other N(0, 1/d), W_down N(0, 1/F).
  const double sigma = 1.0 / std::sqrt(static_cast<double>(d - 1));
  std::vector<float> act(static_cast<size_t>(F * d)), other(static_cast<size_t>(F * d)), down(static_cast<size_t>(d * F));
  std::vector<double> b(static_cast<size_t>(F));
  for (int64_t j = 0; j < F; ++j) {
    b[j] = std::min(1.5, std::max(0.5, 1 + 0.15 * nd(rng)));
    act[j * d] = static_cast<float>(-b[j]);
    for (int64_t k = 1; k < d; ++k) act[j * d + k] = static_cast<float>(sigma * nd(rng));
  }
  for (auto& v : other) v = static_cast<float>(nd(rng) / std::sqrt(static_cast<double>(d)));
  for (auto& v : down) v = static_cast<float>(nd(rng) / std::sqrt(static_cast<double>(F)));
  // Token scales: exp(0.1·N), ×1.6 for 3% heavy tokens.
  std::vector<float> s(static_cast<size_t>(M));
  std::uniform_real_distribution<double> ud(0, 1);
  for (auto& v : s) v = static_cast<float>(std::exp(0.1 * nd(rng)) * (ud(rng) < 0.03 ? 1.6 : 1.0));
  // Calibrate c: mean over (sampled tokens, all neurons) of Φ(−c·b_j / s_t) = target density.
  const double target = std::min(1.0, o.nnz_per_token / static_cast<double>(F));
  std::vector<float> sample;
  for (int64_t t = 0; t < std::min<int64_t>(M, 512); ++t) sample.push_back(s[(t * 7919) % M]);
  double lo = 0, hi = 20;
  for (int it = 0; it < 40; ++it) {
    const double c = 0.5 * (lo + hi);
    double p = 0;
    for (float st : sample)
      for (int64_t j = 0; j < F; j += 4) p += phi(-c * b[j] / st);
    p /= static_cast<double>(sample.size()) * static_cast<double>((F + 3) / 4);
    (p > target ? lo : hi) = c;
  }
  const float c = static_cast<float>(0.5 * (lo + hi));
  log("constant feature c = " + std::to_string(c) + " for a target of " + std::to_string(o.nnz_per_token) + " nnz/token");

  FfnLayerConfig cfg;
  cfg.d_model = d;
  cfg.d_ff = F;
  cfg.gated = o.gated;
  cfg.dtype = DType::BF16;
  cfg.twell = o.twell;
  CudaFfnLayer layer(cfg, o.gated ? act.data() : nullptr, o.gated ? other.data() : act.data(), down.data(), nullptr,
                     nullptr);
  act.clear();
  other.clear();
  down.clear();
  const int64_t dp = layer.d_padded();
  DeviceBuffer xs(static_cast<size_t>(M) * 4), x(static_cast<size_t>(M * dp) * 2), y1(static_cast<size_t>(M * d) * 4),
      y2(static_cast<size_t>(M * d) * 4);
  upload(xs.data(), s.data(), s.size() * 4);
  memset_device(x.data(), 0, static_cast<size_t>(M * dp) * 2);
  bench_x_kernel<<<4096, 256>>>(x.as<uint16_t>(), dp, M, d, xs.as<float>(), c, 777u);
  SLLM_LAUNCHED("bench_x_kernel");
  synchronize();

  // Correctness on the benchmark shape itself: sparse vs dense outputs.
  const FfnStats sst = layer.forward_device(x.as<uint16_t>(), M, y1.as<float>(), FfnMode::Sparse, true);
  layer.forward_device(x.as<uint16_t>(), M, y2.as<float>(), FfnMode::Dense, false);
  {
    const int64_t n = std::min<int64_t>(M, 4096) * d;  // first rows
    std::vector<float> a(static_cast<size_t>(n)), r(static_cast<size_t>(n));
    download(a.data(), y1.data(), a.size() * 4);
    download(r.data(), y2.data(), r.size() * 4);
    double num = 0, den = 0;
    for (int64_t i = 0; i < n; ++i) {
      num += (static_cast<double>(a[i]) - r[i]) * (static_cast<double>(a[i]) - r[i]);
      den += static_cast<double>(r[i]) * r[i];
    }
    log("sparse vs dense output, first " + std::to_string(n / d) + " rows: relative error " +
        std::to_string(std::sqrt(num / std::max(den, 1e-300))));
  }
  R.measured_nnz_per_token = static_cast<double>(sst.nnz) / static_cast<double>(M);
  R.overflow_rows = sst.overflow_rows;
  log("measured " + std::to_string(R.measured_nnz_per_token) + " nnz/token, max row " + std::to_string(sst.max_row_nnz) +
      ", overflowing tiles " + std::to_string(sst.overflow_tiles) + " in " + std::to_string(sst.overflow_rows) + " rows");

  const double ffn_flops = (o.gated ? 3.0 : 2.0) * 2.0 * M * d * F;
  auto add = [&](const std::string& name, const Stat& st, double flops, double mj_call, int64_t tokens,
                 const std::string& note) {
    GpuBenchRow row;
    row.name = name;
    row.median_ms = st.median;
    row.min_ms = st.min;
    row.max_ms = st.max;
    row.tflops = flops > 0 ? flops / (st.median * 1e-3) / 1e12 : 0;
    row.mj_per_token = mj_call >= 0 ? mj_call / static_cast<double>(tokens) : -1;
    row.note = note;
    R.rows.push_back(row);
    log(name + ": median " + std::to_string(st.median) + " ms (min " + std::to_string(st.min) + ", max " +
        std::to_string(st.max) + ")" + (row.mj_per_token >= 0 ? ", " + std::to_string(row.mj_per_token) + " mJ/token" : ""));
  };

  auto dense_fwd = [&] { layer.forward_device(x.as<uint16_t>(), M, y2.as<float>(), FfnMode::Dense, false); };
  auto sparse_fwd = [&] { layer.forward_device(x.as<uint16_t>(), M, y1.as<float>(), FfnMode::Sparse, false); };
  const Stat sd = time_it(o.warmup, o.repeats, 1, dense_fwd);
  add("ffn forward dense", sd, ffn_flops, energy_per_call(o.energy_seconds, dense_fwd), M, "3 tensor-core GEMMs; TFLOP/s dense");
  const Stat ss = time_it(o.warmup, o.repeats, 1, sparse_fwd);
  add("ffn forward sparse", ss, ffn_flops, energy_per_call(o.energy_seconds, sparse_fwd), M,
      "TwELL gate GEMM + fused up/down; TFLOP/s dense-equivalent");

  // The sparse path's pieces alone: the TwELL gate GEMM (+ finalize), and every fused up+down
  // kernel variant (twell_updown.h) on the same TwELL; then the union of active neurons per tile
  // of consecutive tokens (what a token-tiled kernel could share).
  {
    const CudaFfnLayer::Weights w = layer.device_weights();
    DeviceTwell tw = layer.last_twell();
    DeviceBuffer gst(sizeof(TwellDeviceStats)), grows(static_cast<size_t>(M) * 4);
    const Stat sg = time_it(o.warmup, o.repeats, 1, [&] {
      twell_gate_bf16(x.as<uint16_t>(), dp, w.act, dp, M, F, d, nullptr, tw);
      twell_finalize(tw, gst.as<TwellDeviceStats>(), grows.as<int32_t>());
    });
    add("sparse part: TwELL gate GEMM + finalize", sg, 2.0 * M * d * F, -1, M, "TFLOP/s of the gate GEMM");
    const uint16_t* upw = o.gated ? w.rows : nullptr;
    const uint16_t* downw = o.gated ? w.rows + w.dp : w.rows;
    const int64_t ldw = o.gated ? 2 * w.dp : w.dp;
    const double bytes = static_cast<double>(sst.nnz) * (o.gated ? 2.0 : 1.0) * static_cast<double>(d) * 2.0;
    const int before = updown_variant();
    for (int v = 1; v < kUpdownVariants; ++v) {
      set_updown_variant(v);
      const Stat su = time_it(o.warmup, o.repeats, 1, [&] {
        twell_updown_bf16(x.as<uint16_t>(), dp, tw, upw, downw, ldw, d, nullptr, y1.as<float>(), d);
      });
      add(std::string("sparse part: up+down ") + updown_variant_name(v), su, 0, -1, M,
          "active rows' weight bytes / time: " + std::to_string(bytes / (su.median * 1e-3) / 1e12) + " TB/s");
    }
    set_updown_variant(before);
    // Variants 4-5 load the weights with an evict_last policy: return those lines to normal
    // priority so that the measurements after this one see an ordinary L2.
    SLLM_CUDA(cudaCtxResetPersistingL2Cache());
    log(std::string("up+down kernel kept by auto for this shape: ") + updown_variant_name(updown_auto_choice(d, o.gated)));
    for (int bt : {16, 64, 128, 256, 1024}) {
      const TwellUnionStats us = twell_union_stats(tw, bt);
      if (us.tiles == 0) continue;
      log("union per tile of " + std::to_string(bt) + " tokens: " + std::to_string(us.mean_union) +
          " distinct neurons for " + std::to_string(us.mean_entries) + " entries (" +
          std::to_string(us.mean_entries / std::max(us.mean_union, 1.0)) + " per neuron); entries of neurons seen >= 2x: " +
          std::to_string(us.mean_multi / std::max(us.mean_entries, 1.0)));
    }
  }

  // The gate GEMM alone, ours vs cuBLAS, bf16 out [M, F].
  DeviceBuffer c1(static_cast<size_t>(M * ((F + 7) / 8 * 8)) * 2);
  const int64_t Fp = (F + 7) / 8 * 8;
  // A plain random weight for the GEMM comparison (reuse x as A).
  DeviceBuffer w(static_cast<size_t>(F * dp) * 2);
  {
    std::vector<float> sc(static_cast<size_t>(F), static_cast<float>(1.0 / std::sqrt(static_cast<double>(d))));
    DeviceBuffer scd(sc.size() * 4);
    upload(scd.data(), sc.data(), sc.size() * 4);
    memset_device(w.data(), 0, static_cast<size_t>(F * dp) * 2);
    bench_x_kernel<<<1024, 256>>>(w.as<uint16_t>(), dp, F, d, scd.as<float>(), 0.5f, 4242u);
    SLLM_LAUNCHED("bench_x_kernel");
    synchronize();
  }
  Epilogue e;
  e.out_bf16 = true;
  e.out = c1.data();
  e.ldo = Fp;
  const double gflops = 2.0 * M * d * F;
  const Stat go = time_it(o.warmup, o.repeats, 1, [&] { gemm_bf16(x.as<uint16_t>(), dp, w.as<uint16_t>(), dp, M, F, d, e); });
  add("gemm ours", go, gflops, -1, M, "[tokens x d] . [dFF x d]^T, bf16 out");
  if (Cublas::available()) {
    const Stat gc = time_it(o.warmup, o.repeats, 1, [&] {
      Cublas::gemm_bf16(x.as<uint16_t>(), dp, w.as<uint16_t>(), dp, M, F, d, c1.data(), Fp, true);
    });
    add("gemm cublas", gc, gflops, -1, M, R.cublas);
  } else {
    log("cuBLAS " + R.cublas);
  }

  // Decode: a handful of tokens, many calls per timing sample (launch-bound regime).
  const int64_t dt = std::max<int64_t>(1, std::min<int64_t>(o.decode_tokens, kGemvMaxRows));
  DeviceBuffer yd(static_cast<size_t>(dt * d) * 4);
  auto dec_dense = [&] { layer.decode_device(x.as<uint16_t>(), dt, yd.as<float>(), FfnMode::Dense); };
  auto dec_sparse = [&] { layer.decode_device(x.as<uint16_t>(), dt, yd.as<float>(), FfnMode::Sparse); };
  const double dec_flops = (o.gated ? 3.0 : 2.0) * 2.0 * dt * d * F;
  add("decode dense (batch " + std::to_string(dt) + ")", time_it(o.warmup * 10, o.repeats, 50, dec_dense), dec_flops, -1, dt,
      "3 GEMVs");
  add("decode sparse (batch " + std::to_string(dt) + ")", time_it(o.warmup * 10, o.repeats, 50, dec_sparse), dec_flops, -1, dt,
      "gate GEMV + active rows only");

  // Training step (gated): dense GEMM baseline vs hybrid, same inputs, λ = 2e-5, ELL width 128.
  if (o.gated && o.train) {
    DeviceBuffer dyb(static_cast<size_t>(M * dp) * 2);
    memset_device(dyb.data(), 0, dyb.bytes());
    bench_x_kernel<<<4096, 256>>>(dyb.as<uint16_t>(), dp, M, d, xs.as<float>(), 0.f, 999u);
    SLLM_LAUNCHED("bench_x_kernel");
    CudaFfnTrainer tr(layer);
    HybridParams hp;
    hp.ell_width = 128;
    hp.l1 = 2e-5f;
    hp.twell = o.twell;
    TrainStepStats ts_d, ts_h;
    auto tdense = [&] { ts_d = tr.step_device(x.as<uint16_t>(), dyb.as<uint16_t>(), M, TrainMode::Dense, hp); };
    auto thyb = [&] { ts_h = tr.step_device(x.as<uint16_t>(), dyb.as<uint16_t>(), M, TrainMode::Hybrid, hp); };
    const double train_flops = 9.0 * 2.0 * M * d * F;
    const Stat td = time_it(1, o.train_repeats, 1, tdense);
    add("train step dense", td, train_flops, -1, M,
        "9 GEMM-sized products (weight-gradient operands transposed explicitly); saved " +
            std::to_string(ts_d.saved_bytes >> 20) + " MiB");
    const Stat th = time_it(1, o.train_repeats, 1, thyb);
    add("train step hybrid", th, train_flops, -1, M,
        "tail rows " + std::to_string(ts_h.tail_rows) + "; saved " + std::to_string(ts_h.saved_bytes >> 20) + " MiB");
  }
  return R;
}

}  // namespace sparsellm::cuda
