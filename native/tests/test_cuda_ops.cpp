// CUDA backend vs the CPU engine and float64 references (native/include/sparsellm/cuda_ops.h).
// Fresh random inputs of awkward shapes every run (seed printed). Where no usable GPU is present
// (or the build has no CUDA backend) the test prints the reason and exits 77, which ctest
// reports as skipped.
//
// Tolerances (relative Frobenius error against float64 on the same bf16-rounded inputs):
//   f32 outputs of one GEMM: f32 accumulation of exact bf16 products, 1e-4 (K ≤ 2048 terms);
//   bf16 outputs: one rounding of 2^-9 relative, 8e-3;
//   FFN outputs: g and h are rounded to bf16 on the way (TwELL values, dense hidden), 2e-2.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "check.h"
#include "ffn_test_util.h"
#include "sparsellm/cuda_status.h"
#include "sparsellm/ffn.h"
#include "sparsellm/gemm.h"
#include "sparsellm/model.h"

#ifdef SPARSELLM_HAVE_CUDA
#include "sparsellm/cuda_ops.h"
#include "../src/cuda/attention_mma.h"
#include "../src/cuda/kernel_policy.h"
#include "../src/cuda/twell_updown.h"
#include "../src/cpu/train_ops.h"
#include "../src/cuda/train_model.h"
#include "../src/cuda/train_ops.h"
#include "sparsellm/train.h"
#endif

namespace {
constexpr int kSkip = 77;
}

#ifndef SPARSELLM_HAVE_CUDA
int main() {
  std::printf("test_cuda_ops: skipped: %s\n", sparsellm::cuda_status().reason.c_str());
  return kSkip;
}
#else

using namespace sparsellm;
using namespace sparsellm::cuda;
using ffntest::rng;

namespace {

uint16_t bf(float v) { return f32_to_bf16(v); }
float rb(float v) { return bf16_to_f32(f32_to_bf16(v)); }

std::vector<float> random_vec(size_t n, double scale) {
  std::normal_distribution<double> nd(0.0, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = rb(static_cast<float>(nd(rng())));
  return v;
}

// Host bf16 matrix [rows, ld] from f32 [rows, cols]; padding filled with a poison pattern that
// must never be read as data (a large value that would show in the results).
std::vector<uint16_t> to_bf16(const std::vector<float>& a, int64_t rows, int64_t cols, int64_t ld) {
  std::vector<uint16_t> out(static_cast<size_t>(rows * ld), bf(1e4f));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) out[r * ld + c] = bf(a[r * cols + c]);
  return out;
}

DeviceBuffer to_device(const void* p, size_t bytes) {
  DeviceBuffer b(bytes);
  upload(b.data(), p, bytes);
  return b;
}

int64_t pad8(int64_t v) { return (v + 7) / 8 * 8; }

// --- dense GEMM and GEMV ------------------------------------------------------------------------

// The GEMM kernels a test runs: every variant where this device has the Hopper kernel (the
// forced variants would silently fall back elsewhere: then mma.sync only).
struct KernelCase {
  GemmKernel k;
  const char* name;  // what last_gemm_kernel() must report
};
// SPARSELLM_TEST_GEMM_KERNELS (e.g. "mma,wgmma2") narrows the list.
std::vector<KernelCase> gemm_kernels() {
  const CudaStatus s = cuda_status();
  const bool hopper = !s.devices.empty() && s.devices[0].cc_major == 9 && s.devices[0].cc_minor == 0;
  std::vector<KernelCase> all = {{GemmKernel::MmaSync, "mma.sync"}};
  if (hopper) {
    all.push_back({GemmKernel::Wgmma, "wgmma"});
    all.push_back({GemmKernel::WgmmaCluster2, "wgmma-cluster2"});
  }
  const char* only = std::getenv("SPARSELLM_TEST_GEMM_KERNELS");
  if (!only) return all;
  const std::string list = std::string(",") + only + ",";
  const char* keys[] = {"mma", "wgmma", "wgmma2"};
  std::vector<KernelCase> v;
  for (const KernelCase& kc : all)
    if (list.find(std::string(",") + keys[static_cast<int>(kc.k) - 1] + ",") != std::string::npos) v.push_back(kc);
  return v;
}

// One shape through every epilogue (f32 + bias, bf16 ReLU, bf16 ⊙aux, f32 accumulate onto
// random values) on every kernel, against float64 and (f32 output) the CPU engine's gemm on the
// same bf16-exact values. lda has poisoned padding past K, ldo past N (must stay untouched).
void test_gemm_case(int64_t M, int64_t N, int64_t K, bool gemv) {
  const int64_t lda = pad8(K) + (gemv ? 0 : 8), ldw = pad8(K), ldo = N + 3;
  std::vector<float> A = random_vec(static_cast<size_t>(M * K), 1.0), W = random_vec(static_cast<size_t>(N * K), 0.5),
                     bias = random_vec(static_cast<size_t>(N), 1.0), aux = random_vec(static_cast<size_t>(M * N), 1.0),
                     init = random_vec(static_cast<size_t>(M * ldo), 1.0);
  std::vector<double> ref(static_cast<size_t>(M * N));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double s = 0;
      for (int64_t k = 0; k < K; ++k) s += static_cast<double>(A[m * K + k]) * W[n * K + k];
      ref[m * N + n] = s;
    }
  // The CPU engine on the same values (f32 weights: bf16-exact, so the products are exact).
  std::vector<double> cpu(static_cast<size_t>(M * N));
  {
    std::vector<float> c(static_cast<size_t>(M * N));
    WeightView wv;
    wv.data = W.data();
    wv.dtype = DType::F32;
    wv.rows = N;
    wv.cols = K;
    wv.ld = K;
    sparsellm::gemm(A.data(), K, M, wv, c.data(), N);
    cpu.assign(c.begin(), c.end());
  }
  auto Ab = to_bf16(A, M, K, lda), Wb = to_bf16(W, N, K, ldw), auxb = to_bf16(aux, M, N, N);
  DeviceBuffer dA = to_device(Ab.data(), Ab.size() * 2), dW = to_device(Wb.data(), Wb.size() * 2),
               dbias = to_device(bias.data(), bias.size() * 4), daux = to_device(auxb.data(), auxb.size() * 2);
  const std::vector<KernelCase> kernels = gemv ? std::vector<KernelCase>{{GemmKernel::Auto, "gemv"}} : gemm_kernels();
  for (const KernelCase& kc : kernels) {
    set_gemm_kernel(kc.k);
    auto run = gemv ? gemv_bf16 : gemm_bf16;
    const char* which = kc.name;
    for (int mode = 0; mode < 4; ++mode) {
      // mode 0: f32 out + bias; 1: bf16 relu; 2: bf16 mul aux; 3: f32 out += product
      const bool out_bf16 = mode == 1 || mode == 2;
      const size_t es = out_bf16 ? 2 : 4;
      DeviceBuffer dO(static_cast<size_t>(M * ldo) * es);
      memset_device(dO.data(), 0xff, static_cast<size_t>(M * ldo) * es);  // NaN poison
      if (mode == 3) {  // the initial values inside [M, N]; NaN poison kept in the padding
        std::vector<float> start(static_cast<size_t>(M * ldo), std::nanf(""));
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = 0; n < N; ++n) start[m * ldo + n] = init[m * ldo + n];
        upload(dO.data(), start.data(), start.size() * 4);
      }
      Epilogue e;
      e.op = mode == 1 ? EpiOp::Relu : mode == 2 ? EpiOp::MulAux : EpiOp::None;
      e.bias = mode == 0 ? dbias.as<float>() : nullptr;
      e.aux = mode == 2 ? daux.as<uint16_t>() : nullptr;
      e.ldaux = N;
      e.out_bf16 = out_bf16;
      e.out = dO.data();
      e.ldo = ldo;
      e.accumulate = mode == 3;
      run(dA.as<uint16_t>(), lda, dW.as<uint16_t>(), ldw, M, N, K, e);
      if (!gemv)
        CHECK(std::strcmp(last_gemm_kernel(), kc.name) == 0, "gemm M=%lld N=%lld K=%lld: ran %s, asked for %s",
              (long long)M, (long long)N, (long long)K, last_gemm_kernel(), kc.name);
      std::vector<uint8_t> raw(static_cast<size_t>(M * ldo) * es);
      download(raw.data(), dO.data(), raw.size());
      std::vector<float> got(static_cast<size_t>(M * N));
      std::vector<double> want(static_cast<size_t>(M * N)), want_cpu(static_cast<size_t>(M * N));
      int64_t pad_touched = 0;
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t n = 0; n < ldo; ++n) {
          float v;
          if (out_bf16) {
            uint16_t h;
            std::memcpy(&h, raw.data() + (m * ldo + n) * 2, 2);
            v = bf16_to_f32(h);
          } else {
            std::memcpy(&v, raw.data() + (m * ldo + n) * 4, 4);
          }
          if (n >= N) {
            pad_touched += !std::isnan(v);
            continue;
          }
          got[m * N + n] = v;
          double r = ref[m * N + n], c = cpu[m * N + n];
          if (mode == 0) r += bias[n], c += bias[n];
          if (mode == 1) r = r > 0 ? r : 0, c = c > 0 ? c : 0;
          if (mode == 2) r *= aux[m * N + n], c *= aux[m * N + n];
          if (mode == 3) r += init[m * ldo + n], c += init[m * ldo + n];
          want[m * N + n] = r;
          want_cpu[m * N + n] = c;
        }
      }
      const double err = check::rel_error(got.data(), want.data(), got.size());
      const double err_cpu = check::rel_error(got.data(), want_cpu.data(), got.size());
      const double tol = out_bf16 ? 8e-3 : 1e-4;
      if (!(err < tol && err_cpu < tol)) {  // where it goes wrong (a few elements)
        int shown = 0;
        for (int64_t i = 0; i < M * N && shown < 6; ++i)
          if (!(std::fabs(got[i] - want[i]) <= 0.05 * (1.0 + std::fabs(want[i])))) {
            std::fprintf(stderr, "    m=%lld n=%lld: got %.6g want %.6g\n", (long long)(i / N), (long long)(i % N), got[i],
                         want[i]);
            ++shown;
          }
      }
      CHECK(err < tol && err_cpu < tol, "%s M=%lld N=%lld K=%lld epilogue %d: rel error %.3g vs float64, %.3g vs CPU (tol %.1g)",
            which, (long long)M, (long long)N, (long long)K, mode, err, err_cpu, tol);
      CHECK(pad_touched == 0, "%s M=%lld N=%lld K=%lld: %lld elements outside [M, N] written", which, (long long)M,
            (long long)N, (long long)K, (long long)pad_touched);
    }
  }
  set_gemm_kernel(GemmKernel::Auto);
  if (!gemv) {
    std::string why;
    if (Cublas::available(&why)) {
      DeviceBuffer dO(static_cast<size_t>(M * ldo) * 4);
      Cublas::gemm_bf16(dA.as<uint16_t>(), lda, dW.as<uint16_t>(), ldw, M, N, K, dO.data(), ldo, false);
      std::vector<float> raw(static_cast<size_t>(M * ldo)), got(static_cast<size_t>(M * N));
      download(raw.data(), dO.data(), raw.size() * 4);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) got[m * N + n] = raw[m * ldo + n];
      const double err = check::rel_error(got.data(), ref.data(), got.size());
      CHECK(err < 1e-4, "cuBLAS M=%lld N=%lld K=%lld: rel error %.3g", (long long)M, (long long)N, (long long)K, err);
    }
  }
}

void test_gemm() {
  // M 1, 7, 300, 1000; N not a multiple of the 128/256 tiles; K 8, 13 (not 16-byte rows: the
  // padded lda still is), 40 and 72 (under one 64-wide K block, and a partial second), 2048.
  const int64_t shapes[][3] = {{1, 7, 13},     {7, 300, 100},   {300, 257, 72},  {130, 129, 40},  {257, 520, 2048},
                               {64, 64, 8},    {1, 300, 2048},  {7, 520, 72},    {1000, 600, 40}, {300, 777, 2048},
                               {1000, 260, 2048}, {129, 1, 64}};
  for (const auto& s : shapes) test_gemm_case(s[0], s[1], s[2], false);
  const int64_t vshapes[][3] = {{1, 300, 100}, {3, 77, 13}, {8, 520, 264}, {5, 33, 2048}};
  for (const auto& s : vshapes) test_gemm_case(s[0], s[1], s[2], true);
}

// --- GEMM benchmark (test_cuda_ops --bench-gemm): the FFN's GEMM shapes at the paper's size ---

// Median milliseconds of `repeats` timed calls after `warmup` (device events).
double median_ms(int warmup, int repeats, const std::function<void()>& f) {
  for (int i = 0; i < warmup; ++i) f();
  synchronize();
  EventTimer t;
  std::vector<double> ms;
  for (int r = 0; r < repeats; ++r) {
    t.start();
    f();
    ms.push_back(t.stop_ms());
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

// bf16 [rows, ld] on the device, N(0, scale²) values (a host block of random rows repeated).
DeviceBuffer random_device_bf16(int64_t rows, int64_t cols, int64_t ld, double scale) {
  DeviceBuffer out(static_cast<size_t>(rows * ld) * 2);
  memset_device(out.data(), 0, out.bytes());
  const int64_t block = std::max<int64_t>(1, std::min<int64_t>(rows, (int64_t(1) << 22) / cols));
  std::vector<float> h = random_vec(static_cast<size_t>(block * cols), scale);
  DeviceBuffer f(h.size() * 4);
  upload(f.data(), h.data(), h.size() * 4);
  for (int64_t r0 = 0; r0 < rows; r0 += block)
    f32_to_bf16_device(f.as<float>(), cols, out.as<uint16_t>() + r0 * ld, ld, std::min(block, rows - r0), cols);
  synchronize();
  return out;
}

int bench_gemm(int64_t M) {
  std::string why;
  const bool cublas = Cublas::available(&why);
  std::printf("bench-gemm: %s; cuBLAS %s\n", cuda_status().devices[0].name.c_str(),
              cublas ? Cublas::library().c_str() : ("absent: " + why).c_str());
  const int warmup = 3, repeats = 10;
  struct Shape {
    const char* name;
    int64_t N, K;
    bool out_bf16;
  };
  const Shape shapes[] = {{"gate/up  [M,2048]x[5632,2048]^T bf16 out", 5632, 2048, true},
                          {"down     [M,5632]x[2048,5632]^T bf16 out", 2048, 5632, true},
                          {"down     [M,5632]x[2048,5632]^T f32 out ", 2048, 5632, false}};
  for (const Shape& sh : shapes) {
    const int64_t N = sh.N, K = sh.K, ld = pad8(K), ldo = pad8(N);
    DeviceBuffer A = random_device_bf16(M, K, ld, 1.0), W = random_device_bf16(N, K, ld, 1.0);
    DeviceBuffer C(static_cast<size_t>(M * ldo) * (sh.out_bf16 ? 2 : 4));
    const double tflop = 2.0 * M * N * K / 1e12;
    double ref = 0;
    if (cublas) {
      ref = median_ms(warmup, repeats, [&] {
        Cublas::gemm_bf16(A.as<uint16_t>(), ld, W.as<uint16_t>(), ld, M, N, K, C.data(), ldo, sh.out_bf16);
      });
      std::printf("  %s M=%lld  cuBLAS          %8.3f ms  %6.1f TFLOP/s\n", sh.name, (long long)M, ref, tflop / ref * 1e3);
    }
    for (const KernelCase& kc : gemm_kernels()) {
      set_gemm_kernel(kc.k);
      Epilogue e;
      e.out_bf16 = sh.out_bf16;
      e.out = C.data();
      e.ldo = ldo;
      const double ms = median_ms(warmup, repeats, [&] { gemm_bf16(A.as<uint16_t>(), ld, W.as<uint16_t>(), ld, M, N, K, e); });
      std::printf("  %s M=%lld  %-15s %8.3f ms  %6.1f TFLOP/s  %.3fx cuBLAS\n", sh.name, (long long)M, last_gemm_kernel(), ms,
                  tflop / ms * 1e3, ref > 0 ? ref / ms : 0.0);
    }
    set_gemm_kernel(GemmKernel::Auto);
    if (sh.N == 5632) {
      // The TwELL gate GEMM (T 256, capacity 31): a bias of -2.58σ keeps ~0.5% of the outputs
      // positive (σ² = K for these inputs), about the paper's 29 per token.
      std::vector<float> b(static_cast<size_t>(N), static_cast<float>(-2.58 * std::sqrt(static_cast<double>(K))));
      DeviceBuffer db = to_device(b.data(), b.size() * 4);
      DeviceTwell t;
      t.rows = M;
      t.cols = N;
      t.tile = 256;
      t.cap = 31;
      t.tiles = (N + 255) / 256;
      DeviceBuffer dc(static_cast<size_t>(M * t.tiles) * 4), de(static_cast<size_t>(M * t.tiles * t.cap) * 4);
      t.count = dc.as<int32_t>();
      t.entries = de.as<uint32_t>();
      for (const KernelCase& kc : gemm_kernels()) {
        set_gemm_kernel(kc.k);
        const double ms = median_ms(warmup, repeats, [&] {
          twell_gate_bf16(A.as<uint16_t>(), ld, W.as<uint16_t>(), ld, M, N, K, db.as<float>(), t);
        });
        DeviceBuffer ds(sizeof(TwellDeviceStats)), dr(static_cast<size_t>(M) * 4);
        twell_finalize(t, ds.as<TwellDeviceStats>(), dr.as<int32_t>());
        TwellDeviceStats st{};
        download(&st, ds.data(), sizeof st);
        std::printf("  twell gate T=256 cap=31 M=%lld  %-15s %8.3f ms  %6.1f TFLOP/s  %.3fx cuBLAS plain; %.1f nnz/row, %llu overflowing rows\n",
                    (long long)M, last_gemm_kernel(), ms, tflop / ms * 1e3, ref > 0 ? ref / ms : 0.0,
                    static_cast<double>(st.nnz) / static_cast<double>(M), st.overflow_rows);
      }
      set_gemm_kernel(GemmKernel::Auto);
    }
  }
  return 0;
}

// --- TwELL gate ---------------------------------------------------------------------------------

// Exact inputs (small integers, weights and bias in 1/8): the f32 gate equals the float64 one, so
// the pattern, counts and overflow must match the reference exactly. Every GEMM kernel.
void test_twell_gate(int64_t M, int64_t d, int64_t F, int tile, int compression, double density, int heavy_every,
                     bool with_bias = false) {
  ffntest::Problem p = ffntest::make_problem(M, d, F, density, heavy_every, 3.0, true, with_bias);
  const std::vector<float>* bias = with_bias ? &p.up_bias : nullptr;
  std::vector<double> z = ffntest::ref_linear(p.x, M, d, p.gate, F, bias);
  const int64_t ld = pad8(d);
  auto xb = to_bf16(p.x, M, d, ld), wb = to_bf16(p.gate, F, d, ld);
  DeviceBuffer dx = to_device(xb.data(), xb.size() * 2), dw = to_device(wb.data(), wb.size() * 2);
  DeviceBuffer db = to_device(with_bias ? p.up_bias.data() : p.x.data(), static_cast<size_t>(with_bias ? F : 1) * 4);
  DeviceTwell t;
  t.rows = M;
  t.cols = F;
  t.tile = tile;
  t.cap = tile / compression - 1;
  t.tiles = (F + tile - 1) / tile;
  DeviceBuffer dc(static_cast<size_t>(M * t.tiles) * 4), de(static_cast<size_t>(M * t.tiles * t.cap) * 4);
  t.count = dc.as<int32_t>();
  t.entries = de.as<uint32_t>();
  for (const KernelCase& kc : gemm_kernels()) {
  set_gemm_kernel(kc.k);
  memset_device(dc.data(), 0xff, dc.bytes());
  memset_device(de.data(), 0xff, de.bytes());
  twell_gate_bf16(dx.as<uint16_t>(), ld, dw.as<uint16_t>(), ld, M, F, d, with_bias ? db.as<float>() : nullptr, t);
  CHECK(std::strcmp(last_gemm_kernel(), kc.name) == 0, "twell gate: ran %s, asked for %s", last_gemm_kernel(), kc.name);
  std::vector<int32_t> cnt(static_cast<size_t>(M * t.tiles));
  std::vector<uint32_t> ent(static_cast<size_t>(M * t.tiles * t.cap));
  download(cnt.data(), dc.data(), cnt.size() * 4);
  download(ent.data(), de.data(), ent.size() * 4);
  int64_t bad_count = 0, bad_entry = 0, overflow = 0, ref_overflow_rows = 0;
  for (int64_t m = 0; m < M; ++m) {
    bool row_of = false;
    for (int64_t tt = 0; tt < t.tiles; ++tt) {
      std::vector<std::pair<int, double>> pos;
      for (int64_t j = tt * tile; j < std::min<int64_t>(F, (tt + 1) * tile); ++j)
        if (z[m * F + j] > 0) pos.push_back({static_cast<int>(j - tt * tile), z[m * F + j]});
      const int c = cnt[m * t.tiles + tt];
      bad_count += c != static_cast<int>(pos.size());
      if (c > t.cap) {
        ++overflow;
        row_of = true;
      }
      for (int e = 0; e < std::min<int>(t.cap, static_cast<int>(pos.size())); ++e) {
        const uint32_t w = ent[(m * t.tiles + tt) * t.cap + e];
        const float v = bf16_to_f32(static_cast<uint16_t>(w >> 16));
        const int idx = static_cast<int>(w & 0xffff);
        if (idx != pos[e].first || std::fabs(v - pos[e].second) > 4e-3 * std::fabs(pos[e].second)) ++bad_entry;
      }
    }
    ref_overflow_rows += row_of;
  }
  CHECK(bad_count == 0, "twell gate %s M=%lld d=%lld F=%lld T=%d: %lld wrong tile counts", kc.name, (long long)M,
        (long long)d, (long long)F, tile, (long long)bad_count);
  CHECK(bad_entry == 0, "twell gate %s M=%lld d=%lld F=%lld T=%d: %lld wrong entries", kc.name, (long long)M,
        (long long)d, (long long)F, tile, (long long)bad_entry);
  // finalize: statistics and the overflow row list
  DeviceBuffer ds(sizeof(TwellDeviceStats)), dr(static_cast<size_t>(M) * 4);
  twell_finalize(t, ds.as<TwellDeviceStats>(), dr.as<int32_t>());
  TwellDeviceStats st{};
  download(&st, ds.data(), sizeof st);
  int64_t nnz = 0;
  for (double v : z) nnz += v > 0;
  CHECK(static_cast<int64_t>(st.nnz) == nnz, "finalize nnz %llu vs %lld", st.nnz, (long long)nnz);
  CHECK(static_cast<int64_t>(st.overflow_tiles) == overflow, "finalize overflow tiles %llu vs %lld", st.overflow_tiles,
        (long long)overflow);
  CHECK(static_cast<int64_t>(st.overflow_rows) == ref_overflow_rows, "finalize overflow rows %llu vs %lld",
        st.overflow_rows, (long long)ref_overflow_rows);
  std::printf("  twell gate %s M=%lld d=%lld F=%lld T=%d cap=%d%s: nnz %lld, overflowing tiles %lld in %lld rows\n",
              kc.name, (long long)M, (long long)d, (long long)F, tile, t.cap, with_bias ? " bias" : "", (long long)nnz,
              (long long)overflow, (long long)ref_overflow_rows);
  }
  set_gemm_kernel(GemmKernel::Auto);
}

// --- the FFN layer: sparse / dense / auto / decode vs CPU and float64 ------------------------------

void test_layer_case(int64_t M, int64_t d, int64_t F, bool gated, double density, int heavy_every, int tile,
                     bool generic, bool expect_fallback, int compression = 8) {
  ffntest::Problem p = ffntest::make_problem(M, d, F, density, heavy_every, 3.0, true, !gated);
  if (!gated) p.up = p.gate;  // the TwELL producer is the up projection (exact biases kept)
  // The GPU keeps bf16 weights and activations: round them so every path sees the same values.
  ffntest::round_bf16(p.x);
  ffntest::round_bf16(p.gate);
  ffntest::round_bf16(p.up);
  ffntest::round_bf16(p.down);
  const std::vector<double> ref = ffntest::ref_ffn(p, gated);
  FfnLayerConfig cfg;
  cfg.d_model = d;
  cfg.d_ff = F;
  cfg.gated = gated;
  cfg.dtype = DType::BF16;
  cfg.twell.tile = tile;
  cfg.twell.compression = compression;
  const float* ub = p.up_bias.empty() ? nullptr : p.up_bias.data();
  const float* db = p.down_bias.empty() ? nullptr : p.down_bias.data();
  FfnLayer cpu(cfg, gated ? p.gate.data() : nullptr, p.up.data(), p.down.data(), ub, db);
  CudaFfnLayer gpu(cfg, gated ? p.gate.data() : nullptr, p.up.data(), p.down.data(), ub, db);
  gpu.set_generic_kernels(generic);
  std::vector<float> yc(static_cast<size_t>(M * d)), yg(static_cast<size_t>(M * d));
  const FfnStats sc = cpu.forward(p.x.data(), M, yc.data(), FfnMode::Sparse);
  const char* kind = gated ? "gated" : "non-gated";
  for (FfnMode mode : {FfnMode::Sparse, FfnMode::Dense, FfnMode::Auto}) {
    std::fill(yg.begin(), yg.end(), std::nanf(""));
    const FfnStats sg = gpu.forward(p.x.data(), M, yg.data(), mode);
    const double e_ref = check::rel_error(yg.data(), ref.data(), yg.size());
    std::vector<double> cpu_d(yc.begin(), yc.end());
    const double e_cpu = check::rel_error(yg.data(), cpu_d.data(), yg.size());
    CHECK(e_ref < 2e-2 && e_cpu < 2e-2, "layer %s M=%lld d=%lld F=%lld T=%d%s mode %d: rel error %.3g vs float64, %.3g vs CPU",
          kind, (long long)M, (long long)d, (long long)F, tile, generic ? " generic" : "", static_cast<int>(mode), e_ref,
          e_cpu);
    CHECK(sg.nnz == sc.nnz, "layer %s M=%lld mode %d: nnz %lld (GPU) vs %lld (CPU)", kind, (long long)M,
          static_cast<int>(mode), (long long)sg.nnz, (long long)sc.nnz);
    if (mode == FfnMode::Sparse) {
      CHECK(sg.overflow_tiles == sc.overflow_tiles && sg.overflow_rows == sc.overflow_rows,
            "layer %s M=%lld: overflow %lld tiles / %lld rows (GPU) vs %lld / %lld (CPU)", kind, (long long)M,
            (long long)sg.overflow_tiles, (long long)sg.overflow_rows, (long long)sc.overflow_tiles,
            (long long)sc.overflow_rows);
      CHECK(gpu.last_fallback_rows() == sg.overflow_rows, "fallback rows %lld vs overflow rows %lld",
            (long long)gpu.last_fallback_rows(), (long long)sg.overflow_rows);
      if (expect_fallback)
        CHECK(sg.overflow_rows > 0, "layer %s M=%lld: the case was built to overflow, but no tile did", kind, (long long)M);
      std::printf("  layer %s M=%lld d=%lld F=%lld T=%d%s: nnz/token %.1f, overflow rows %lld, err %.2e (f64) %.2e (CPU)\n",
                  kind, (long long)M, (long long)d, (long long)F, tile, generic ? " generic" : "",
                  static_cast<double>(sg.nnz) / static_cast<double>(M), (long long)sg.overflow_rows, e_ref, e_cpu);
    }
  }
  if (M <= kGemvMaxRows) {
    for (FfnMode mode : {FfnMode::Sparse, FfnMode::Dense}) {
      std::fill(yg.begin(), yg.end(), std::nanf(""));
      const FfnStats sg = gpu.decode(p.x.data(), M, yg.data(), mode);
      const double e_ref = check::rel_error(yg.data(), ref.data(), yg.size());
      CHECK(e_ref < 2e-2, "decode %s M=%lld d=%lld F=%lld mode %d: rel error %.3g", kind, (long long)M, (long long)d,
            (long long)F, static_cast<int>(mode), e_ref);
      if (mode == FfnMode::Sparse)
        CHECK(sg.nnz == sc.nnz, "decode %s M=%lld: nnz %lld vs CPU %lld", kind, (long long)M, (long long)sg.nnz,
              (long long)sc.nnz);
    }
  }
}

void test_layers() {
  // tokens 1, 7, 300; d_ff not a multiple of the tile; overflowing tiles (every 5th token heavy).
  for (bool gated : {true, false}) {
    test_layer_case(1, 64, 1000, gated, 0.03, 0, 256, false, false);
    test_layer_case(7, 72, 300, gated, 0.05, 3, 256, false, false);
    test_layer_case(300, 64, 1000, gated, 0.03, 5, 256, false, true);
    test_layer_case(300, 100, 520, gated, 0.03, 5, 128, false, true);  // d % 8 != 0: any-shape kernel
    test_layer_case(77, 64, 1000, gated, 0.03, 5, 64, true, true);     // forced any-shape kernel, T = 64
    test_layer_case(5, 2560, 700, gated, 0.02, 0, 32, false, false);   // d > 2048 (16 chunks per lane)
    test_layer_case(40, 64, 700, gated, 0.15, 0, 256, false, false, 4);  // capacity 63: tiles of > 32 entries
    test_layer_case(20, 64, 1500, gated, 0.01, 4, 32, false, true);      // 47 tiles: more than 32 per row
    test_layer_case(6, 264, 700, gated, 0.5, 0, 256, false, false, 1);   // decode, half the neurons active
  }
  // Every fused up+down kernel variant (twell_updown.h) on the shapes that select its register
  // layouts: d = 2048 (8 chunks per lane, x in shared memory), 1000 and 520 (4 chunks per lane,
  // multiples of 8 but not of 64: the last chunk row partly or barely used), 200 (1 partial chunk);
  // one token; heavy rows that overflow; tiles with many entries (capacity 63, more than one
  // 32-entry batch per window); more than 32 tiles per row (T = 32).
  for (int v = 1; v < kUpdownVariants; ++v) {
    set_updown_variant(v);
    std::printf("  fused up+down variant %s\n", updown_variant_name(v));
    for (bool gated : {true, false}) {
      test_layer_case(45, 2048, 600, gated, 0.03, 5, 256, false, true);
      test_layer_case(1, 2048, 1000, gated, 0.02, 0, 256, false, false);
      test_layer_case(33, 1000, 600, gated, 0.15, 0, 256, false, false, 4);
      test_layer_case(9, 520, 1500, gated, 0.02, 3, 32, false, true);
      test_layer_case(12, 200, 300, gated, 0.05, 0, 64, false, false);
    }
  }
  set_updown_variant(kUpdownAuto);
  // Auto tunes the kernel at the first call with >= 8192 rows (each candidate timed, the
  // fastest kept): that call's result must be exact too, and the choice must be recorded.
  // (Auto tunes only once unverified kernels are allowed: kernel_policy.h.)
  const bool unverified = unverified_kernels();
  set_unverified_kernels(true);
  for (bool gated : {true, false}) {
    test_layer_case(8200, 64, 300, gated, 0.03, 7, 256, false, true);
    const int pick = updown_auto_choice(64, gated);
    CHECK(pick != kUpdownAuto, "auto up+down: no kernel kept after a %s call with 8200 rows", gated ? "gated" : "non-gated");
    std::printf("  auto up+down (%s, d=64): kept %s\n", gated ? "gated" : "non-gated", updown_variant_name(pick));
  }
  set_unverified_kernels(unverified);
}

// --- hybrid training step vs float64 and the CPU trainer -----------------------------------------

void test_hybrid_case(int64_t M, int64_t d, int64_t F, double density, int heavy_every, int tile, int ell_width,
                      float l1) {
  ffntest::Problem p = ffntest::make_problem(M, d, F, density, heavy_every, 3.0, true, false);
  ffntest::round_bf16(p.x);
  ffntest::round_bf16(p.gate);
  ffntest::round_bf16(p.up);
  ffntest::round_bf16(p.down);
  std::vector<float> dy = random_vec(static_cast<size_t>(M * d), 1.0);  // bf16-exact
  // float64 reference of forward and backward
  const std::vector<double> z = ffntest::ref_linear(p.x, M, d, p.gate, F, nullptr);
  const std::vector<double> u = ffntest::ref_linear(p.x, M, d, p.up, F, nullptr);
  std::vector<double> h(z.size()), y(static_cast<size_t>(M * d), 0.0), dx(static_cast<size_t>(M * d), 0.0),
      dWg(static_cast<size_t>(F * d), 0.0), dWu(static_cast<size_t>(F * d), 0.0), dWd(static_cast<size_t>(d * F), 0.0);
  double l1ref = 0;
  for (size_t i = 0; i < z.size(); ++i) {
    h[i] = (z[i] > 0 ? z[i] : 0.0) * u[i];
    l1ref += std::fabs(h[i]);
  }
  l1ref /= static_cast<double>(M);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t j = 0; j < F; ++j) {
      const double hv = h[m * F + j];
      for (int64_t i = 0; i < d; ++i) y[m * d + i] += hv * p.down[i * F + j];
      if (!(z[m * F + j] > 0)) continue;
      double dh = 0;
      for (int64_t i = 0; i < d; ++i) dh += static_cast<double>(dy[m * d + i]) * p.down[i * F + j];
      dh += (hv > 0 ? 1.0 : hv < 0 ? -1.0 : 0.0) * l1 / static_cast<double>(M);
      const double g = z[m * F + j], du = dh * g, dg = dh * u[m * F + j];
      for (int64_t k = 0; k < d; ++k) {
        dx[m * d + k] += du * p.up[j * d + k] + dg * p.gate[j * d + k];
        dWu[j * d + k] += du * p.x[m * d + k];
        dWg[j * d + k] += dg * p.x[m * d + k];
      }
      for (int64_t i = 0; i < d; ++i) dWd[i * F + j] += hv * dy[m * d + i];
    }
  }
  FfnLayerConfig cfg;
  cfg.d_model = d;
  cfg.d_ff = F;
  cfg.gated = true;
  cfg.dtype = DType::F32;
  cfg.twell.tile = tile;
  cfg.twell.compression = 8;
  CudaFfnLayer layer(cfg, p.gate.data(), p.up.data(), p.down.data(), nullptr, nullptr);
  CudaFfnTrainer tr(layer);
  HybridParams hp;
  hp.ell_width = ell_width;
  hp.l1 = l1;
  hp.twell = cfg.twell;
  const double tol = 2e-2;
  for (TrainMode mode : {TrainMode::Dense, TrainMode::Hybrid}) {
  std::vector<float> gy(static_cast<size_t>(M * d), std::nanf("")), gdx(gy.size(), std::nanf(""));
  const TrainStepStats st = tr.step(p.x.data(), dy.data(), M, mode, hp, gy.data(), gdx.data());
  std::vector<float> gg(static_cast<size_t>(F * d), std::nanf("")), gu(gg.size(), std::nanf("")), gd(gg.size(), std::nanf(""));
  tr.export_grads(gg.data(), gu.data(), gd.data());
  const char* mname = mode == TrainMode::Dense ? "dense" : "hybrid";
  const double ey = check::rel_error(gy.data(), y.data(), y.size()), edx = check::rel_error(gdx.data(), dx.data(), dx.size()),
               eg = check::rel_error(gg.data(), dWg.data(), dWg.size()), eu = check::rel_error(gu.data(), dWu.data(), dWu.size()),
               ed = check::rel_error(gd.data(), dWd.data(), dWd.size());
  CHECK(ey < tol && edx < tol && eg < tol && eu < tol && ed < tol,
        "%s step M=%lld d=%lld F=%lld T=%d W=%d: rel errors y %.3g dx %.3g dWgate %.3g dWup %.3g dWdown %.3g", mname,
        (long long)M, (long long)d, (long long)F, tile, ell_width, ey, edx, eg, eu, ed);
  CHECK(std::fabs(st.l1 - l1ref) <= 1e-2 * std::max(1e-12, std::fabs(l1ref)), "%s l1 %.6g vs %.6g", mname, st.l1, l1ref);
  int64_t nnz = 0;
  for (double v : z) nnz += v > 0;
  CHECK(st.sparsity.nnz == nnz, "%s nnz %lld vs %lld", mname, (long long)st.sparsity.nnz, (long long)nnz);
  if (mode == TrainMode::Dense) {
    std::printf("  dense step M=%lld d=%lld F=%lld: errors y %.2e dx %.2e dW %.2e/%.2e/%.2e\n", (long long)M, (long long)d,
                (long long)F, ey, edx, eg, eu, ed);
    continue;
  }
  // The CPU trainer on the same (bf16-exact) values.
  FfnLayer cpu(cfg, p.gate.data(), p.up.data(), p.down.data(), nullptr, nullptr);
  FfnTrainer ct(cpu);
  std::vector<float> cy(gy.size()), cdx(gy.size());
  ct.step(p.x.data(), dy.data(), M, TrainMode::Hybrid, hp, cy.data(), cdx.data());
  std::vector<double> cyd(cy.begin(), cy.end()), cdxd(cdx.begin(), cdx.end());
  const double ecy = check::rel_error(gy.data(), cyd.data(), cyd.size()), ecdx = check::rel_error(gdx.data(), cdxd.data(), cdxd.size());
  CHECK(ecy < tol && ecdx < tol, "hybrid vs CPU trainer: y %.3g dx %.3g", ecy, ecdx);
  std::printf("  hybrid M=%lld d=%lld F=%lld T=%d W=%d: tail rows %lld, errors y %.2e dx %.2e dW %.2e/%.2e/%.2e\n",
              (long long)M, (long long)d, (long long)F, tile, ell_width, (long long)st.tail_rows, ey, edx, eg, eu, ed);
  }
}

void test_hybrid() {
  test_hybrid_case(7, 40, 300, 0.05, 3, 64, 128, 0.f);
  test_hybrid_case(300, 37, 520, 0.03, 5, 128, 24, 0.5f);   // tail rows over W and by overflow, d odd
  test_hybrid_case(33, 64, 1000, 0.03, 4, 256, 8, 0.1f);    // most heavy rows in the tail
}

// --- the whole model (CudaModel) and its attention ------------------------------------------------

// The tiled kernel, the per-(query, head) kernel and, for head_dim 64 and 128, the tensor-core
// kernel, each forced, against the CPU attention_causal (f32, itself tested against float64 in
// test_model_ops; bf16 output: one rounding of at most 2^-8 relative, RMS about 2e-3: 8e-3; the
// tensor-core kernel also rounds q, k, v and the probabilities to bf16: 2e-2) on the same cache,
// filled by kv_store_device in two calls (0 .. pos0 − 1, then the T new); padding columns must be
// zeroed. Then the Auto choice must give the per-query kernel's bits with unverified kernels off
// and, from one query tile (32) up, the tensor-core kernel's bits (the tiled kernel's without its
// head_dim) with them on (every kernel is deterministic).
void test_attention_case(int64_t T, int64_t pos0, int64_t n_heads, int64_t n_kv, int64_t hd) {
  const int64_t cap = pos0 + T + 5, qd = n_heads * hd, kd = n_kv * hd, ldo = pad8(qd) + 8;
  KvCache cache;
  cache.allocate(1, n_kv, hd, cap);
  std::vector<float> q = random_vec(static_cast<size_t>(T * qd), 1.0);
  std::vector<float> k = random_vec(static_cast<size_t>((pos0 + T) * kd), 1.0);
  std::vector<float> v = random_vec(static_cast<size_t>((pos0 + T) * kd), 1.0);
  kv_cache_store(cache, 0, k.data(), kd, v.data(), kd, pos0 + T, 0);
  std::vector<float> ref(static_cast<size_t>(T * qd));
  attention_causal(q.data(), qd, T, n_heads, cache, 0, pos0, ref.data(), qd);
  std::vector<double> r(ref.begin(), ref.end());
  const size_t cbytes = static_cast<size_t>(n_kv * cap * hd) * 4;
  DeviceBuffer ck(cbytes), cv(cbytes), dk = to_device(k.data(), k.size() * 4), dv = to_device(v.data(), v.size() * 4);
  memset_device(ck.data(), 0xff, cbytes);  // NaN past the stored keys: reading them would show
  memset_device(cv.data(), 0xff, cbytes);
  DeviceBuffer dq = to_device(q.data(), q.size() * 4), out(static_cast<size_t>(T * ldo) * 2);
  if (pos0 > 0) kv_store_device(ck.as<float>(), cv.as<float>(), n_kv, cap, hd, dk.as<float>(), kd, dv.as<float>(), kd, pos0, 0);
  kv_store_device(ck.as<float>(), cv.as<float>(), n_kv, cap, hd, dk.as<float>() + pos0 * kd, kd,
                  dv.as<float>() + pos0 * kd, kd, T, pos0);
  const AttentionKernel saved_choice = attention_kernel_choice();
  const bool saved_unverified = unverified_kernels();
  auto run = [&](AttentionKernel kern, bool unverified) {
    set_attention_kernel(kern);
    set_unverified_kernels(unverified);
    memset_device(out.data(), 0xff, out.bytes());  // NaN pattern: every column must be written
    attention_device(dq.as<float>(), qd, T, n_heads, n_kv, hd, ck.as<float>(), cv.as<float>(), cap, pos0,
                     out.as<uint16_t>(), ldo);
    std::vector<uint16_t> o(static_cast<size_t>(T * ldo));
    download(o.data(), out.data(), o.size() * 2);
    return o;
  };
  const bool has_mma = attention_mma_supported(hd);
  const std::vector<uint16_t> tiled = run(AttentionKernel::Tiled, false);
  const std::vector<uint16_t> perq = run(AttentionKernel::PerQuery, false);
  const std::vector<uint16_t> mma = has_mma ? run(AttentionKernel::Mma, false) : std::vector<uint16_t>();
  const std::vector<uint16_t> auto_off = run(AttentionKernel::Auto, false);
  const std::vector<uint16_t> auto_on = run(AttentionKernel::Auto, true);
  set_attention_kernel(saved_choice);
  set_unverified_kernels(saved_unverified);
  const char* names[3] = {"tiled", "per-query", "tensor-core"};
  double errs[3] = {0, 0, 0};
  int idx = 0;
  for (const std::vector<uint16_t>* o : {&tiled, &perq, &mma}) {
    if (o->empty()) {
      ++idx;
      continue;
    }
    std::vector<float> got(static_cast<size_t>(T * qd));
    bool pad_ok = true;
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t c = 0; c < qd; ++c) got[t * qd + c] = bf16_to_f32((*o)[t * ldo + c]);
      for (int64_t c = qd; c < ldo; ++c) pad_ok &= (*o)[t * ldo + c] == 0;
    }
    const double e = check::rel_error(got.data(), r.data(), r.size());
    errs[idx] = e;
    CHECK(e < (idx == 2 ? 2e-2 : 8e-3), "attention %s T %lld pos0 %lld heads %lld/%lld hd %lld: rel err %.3g",
          names[idx], (long long)T, (long long)pos0, (long long)n_heads, (long long)n_kv, (long long)hd, e);
    CHECK(pad_ok, "attention %s: padding columns not zeroed", names[idx]);
    ++idx;
  }
  CHECK(auto_off == perq, "attention T %lld: Auto with unverified kernels off must run the per-query kernel",
        (long long)T);
  CHECK(auto_on == (T >= 32 ? (has_mma ? mma : tiled) : perq),
        "attention T %lld: Auto with unverified kernels on ran the wrong kernel", (long long)T);
  std::printf("  attention T %3lld pos0 %3lld heads %lld/%lld hd %3lld: rel err tiled %.2e, per-query %.2e%s",
              (long long)T, (long long)pos0, (long long)n_heads, (long long)n_kv, (long long)hd, errs[0], errs[1],
              has_mma ? "" : "\n");
  if (has_mma) std::printf(", tensor-core %.2e\n", errs[2]);
}

// A random model in host memory, laid out as the packed file (FFN in kernel layout, bf16).
struct RandomModel {
  ModelConfig cfg;
  ModelWeights w;
  std::deque<std::vector<uint16_t>> mats;
  std::deque<std::vector<float>> vecs;

  WeightView matrix(int64_t rows, int64_t cols, double scale) {
    std::vector<float> f = random_vec(static_cast<size_t>(rows * cols), scale);
    std::vector<uint16_t> b(f.size());
    for (size_t i = 0; i < f.size(); ++i) b[i] = bf(f[i]);
    mats.push_back(std::move(b));
    return WeightView{mats.back().data(), DType::BF16, rows, cols, cols};
  }
  const float* vec(int64_t n, double mean, double scale) {
    std::vector<float> f = random_vec(static_cast<size_t>(n), scale);
    for (auto& x : f) x += static_cast<float>(mean);
    vecs.push_back(std::move(f));
    return vecs.back().data();
  }
};

// llama: RMSNorm, RoPE, gated, no biases, separate LM head; else GPT-2 style: LayerNorm with
// biases, learned positions (offset 2), non-gated with biases everywhere, tied embeddings.
std::unique_ptr<RandomModel> random_model(bool llama, ActKind act, float threshold) {
  auto m = std::make_unique<RandomModel>();
  ModelConfig& c = m->cfg;
  c.vocab = 50;
  c.n_layers = 2;
  c.max_positions = 64;
  c.gated = c.rmsnorm = c.rope = llama;
  if (llama) {
    c.d_model = 72, c.n_heads = 4, c.n_kv_heads = 2, c.head_dim = 18;
  } else {
    c.d_model = 60, c.n_heads = 3, c.n_kv_heads = 3, c.head_dim = 20, c.position_offset = 2;
  }
  const int64_t d = c.d_model, qd = c.n_heads * c.head_dim, kd = c.n_kv_heads * c.head_dim;
  const int64_t F = llama ? 200 : 150;
  const double ws = 1.0 / std::sqrt(static_cast<double>(d));
  ModelWeights& w = m->w;
  w.embed = m->matrix(c.vocab, d, 1.0);
  w.lm_head = llama ? m->matrix(c.vocab, d, ws) : w.embed;
  if (!llama) w.pos_embed = m->matrix(c.max_positions + c.position_offset, d, 0.5);
  w.final_norm_w = m->vec(d, 1.0, 0.1);
  if (!llama) w.final_norm_b = m->vec(d, 0.0, 0.1);
  for (int64_t l = 0; l < c.n_layers; ++l) {
    LayerWeights L;
    L.attn_norm_w = m->vec(d, 1.0, 0.1);
    L.ffn_norm_w = m->vec(d, 1.0, 0.1);
    L.q = m->matrix(qd, d, ws);
    L.k = m->matrix(kd, d, ws);
    L.v = m->matrix(kd, d, ws);
    L.o = m->matrix(d, qd, 1.0 / std::sqrt(static_cast<double>(qd)));
    if (!llama) {
      L.attn_norm_b = m->vec(d, 0.0, 0.1);
      L.ffn_norm_b = m->vec(d, 0.0, 0.1);
      L.q_b = m->vec(qd, 0.0, 0.1);
      L.k_b = m->vec(kd, 0.0, 0.1);
      L.v_b = m->vec(kd, 0.0, 0.1);
      L.o_b = m->vec(d, 0.0, 0.1);
      L.up_b = m->vec(F, -0.3, 0.1);  // shifts the ReLU towards sparsity
      L.down_b = m->vec(d, 0.0, 0.1);
    }
    L.d_ff = F;
    L.ffn_dtype = DType::BF16;
    L.act = act;
    L.threshold = threshold;
    L.twell.tile = 64;
    L.twell.compression = 2;  // capacity 31: some tiles overflow (exact fallback), most do not
    L.ffn_a = m->matrix(F, d, ws).data;
    L.ffn_b = m->matrix(F, (c.gated ? 2 : 1) * d, c.gated ? ws : 1.0 / std::sqrt(static_cast<double>(F))).data;
    w.layers.push_back(L);
  }
  return m;
}

int64_t argmax(const float* v, int64_t n) { return std::max_element(v, v + n) - v; }

// The CPU Model and the CudaModel on the same random model: prefill of 37 tokens (all logits),
// then 5 single-token decodes fed the CPU's greedy choice. Logits: relative error < 2e-2 (the
// GPU rounds the activations that enter each projection to bf16, <= 2^-8 relative per rounding,
// about ten roundings in series through two layers and the head; the CPU keeps them f32), and
// the GPU's greedy token equals the CPU's wherever the CPU's top two logits are apart by more
// than 5% of their spread. The KV cache: the 42 tokens in one call on the GPU give the same
// logits as prefill + decodes (1e-2: GEMM vs GEMV summation order, bf16 roundings flipping).
// A thresholded layer's activation jumps between 0 and ±threshold: a unit whose |act| lies
// within the GPU's bf16 noise of the cut-off flips, moving one token's logits by a few percent
// (a CPU emulation of CudaModel, 1830 decode steps of the silu model: median 0.004, max 0.032;
// prefill rows average it out: max 0.012). Its decode steps get 8e-2; its prefill keeps 2e-2,
// which an ignored threshold fails (0.036 in that emulation), as does the nnz check.
void test_model_case(const char* name, bool llama, ActKind act, float threshold, RunMode mode) {
  auto hm = random_model(llama, act, threshold);
  const ModelConfig& c = hm->cfg;
  const int64_t context = 48, P = 37, S = 5, V = c.vocab;
  const char* mname = mode == RunMode::Dense ? "dense" : mode == RunMode::Sparse ? "sparse" : "auto";
  Model cpu(c, hm->w, context, nullptr);
  CudaModel gpu(c, hm->w, context);
  CHECK(gpu.bytes() > 0 && gpu.context() == context, "%s: bytes/context", name);
  std::uniform_int_distribution<int> tok(0, static_cast<int>(V) - 1);
  std::vector<int32_t> seq(static_cast<size_t>(P));
  for (auto& t : seq) t = tok(rng());
  std::vector<float> lc(static_cast<size_t>(P * V)), lg(static_cast<size_t>(P * V));
  cpu.forward(seq.data(), P, true, mode, lc.data());
  gpu.forward(seq.data(), P, true, mode, lg.data());
  std::vector<double> ref(lc.begin(), lc.end());
  double e = check::rel_error(lg.data(), ref.data(), ref.size());
  CHECK(e < 2e-2, "%s %s: prefill logits rel err %.3g", name, mname, e);
  std::vector<float> steps_gpu;  // last-token logits of the prefill, then of each decode
  steps_gpu.insert(steps_gpu.end(), lg.end() - V, lg.end());
  int decisive = 0, agree = 0;
  auto compare_choice = [&](const float* c_logits, const float* g_logits) {
    std::vector<float> s(c_logits, c_logits + V);
    std::sort(s.begin(), s.end());
    const float spread = s.back() - s.front();
    if (s[static_cast<size_t>(V - 1)] - s[static_cast<size_t>(V - 2)] > 0.05f * spread) {
      ++decisive;
      agree += argmax(c_logits, V) == argmax(g_logits, V);
    }
  };
  compare_choice(lc.data() + (P - 1) * V, lg.data() + (P - 1) * V);
  int32_t next = static_cast<int32_t>(argmax(lc.data() + (P - 1) * V, V));
  std::vector<float> c1(static_cast<size_t>(V)), g1(static_cast<size_t>(V));
  const double step_tol = threshold >= 0.f ? 8e-2 : 2e-2;
  for (int64_t s = 0; s < S; ++s) {
    seq.push_back(next);
    cpu.forward(&next, 1, false, mode, c1.data());
    gpu.forward(&next, 1, false, mode, g1.data());
    std::vector<double> r1(c1.begin(), c1.end());
    e = check::rel_error(g1.data(), r1.data(), r1.size());
    CHECK(e < step_tol, "%s %s: decode step %lld logits rel err %.3g", name, mname, (long long)s, e);
    compare_choice(c1.data(), g1.data());
    steps_gpu.insert(steps_gpu.end(), g1.begin(), g1.end());
    next = static_cast<int32_t>(argmax(c1.data(), V));
  }
  CHECK(agree == decisive, "%s %s: greedy tokens agree on %d of %d decisive steps", name, mname, agree, decisive);
  CHECK(gpu.position() == P + S, "%s: position %lld", name, (long long)gpu.position());
  if (mode == RunMode::Sparse) {
    const std::vector<LayerActivity> ag = gpu.activity();
    const std::vector<LayerActivity>& ac = cpu.activity();
    for (size_t l = 0; l < ag.size(); ++l) {
      CHECK(ag[l].tokens == ac[l].tokens, "%s: layer %zu counted %lld tokens, the CPU %lld", name, l,
            (long long)ag[l].tokens, (long long)ac[l].tokens);
      const double rel = std::fabs(static_cast<double>(ag[l].nnz - ac[l].nnz)) / std::max<double>(1.0, ac[l].nnz);
      CHECK(ag[l].nnz > 0 && rel < 0.05, "%s: layer %zu nnz %lld vs CPU %lld", name, l, (long long)ag[l].nnz,
            (long long)ac[l].nnz);
      CHECK(ag[l].sparse_calls + ag[l].dense_calls == 1 + S, "%s: layer %zu calls", name, l);
    }
    gpu.reset_stats();
    CHECK(gpu.activity()[0].tokens == 0 && gpu.activity()[0].nnz == 0, "%s: reset_stats", name);
  }
  // KV cache: the whole sequence in one call on the GPU.
  gpu.reset();
  const int64_t N = P + S;
  std::vector<float> all(static_cast<size_t>(N * V));
  gpu.forward(seq.data(), N, true, mode, all.data());
  std::vector<double> st(steps_gpu.begin(), steps_gpu.end());
  e = check::rel_error(all.data() + (P - 1) * V, st.data(), st.size());
  CHECK(e < 1e-2, "%s %s: cached decode vs one call rel err %.3g", name, mname, e);
  // The same sequence in chunks of 30, 7 and 5 tokens: several queries after a cached prefix
  // (pos0 > 0), the last row only of a call of many tokens, and 5..8 tokens (GEMV projections,
  // the FFN layer's forward path, every logits row through the GEMV LM head for the 7). Each
  // chunk's logits against the one call's rows (1e-2, as above).
  gpu.reset();
  const int64_t chunks[3] = {30, 7, 5};
  int64_t at = 0;
  for (int64_t n : chunks) {
    const bool every = n == 7;
    const int64_t rows = every ? n : 1;
    std::vector<float> lk(static_cast<size_t>(rows * V));
    gpu.forward(seq.data() + at, n, every, mode, lk.data());
    at += n;
    std::vector<double> r(all.begin() + (at - rows) * V, all.begin() + at * V);
    e = check::rel_error(lk.data(), r.data(), r.size());
    CHECK(e < 1e-2, "%s %s: chunk of %lld at %lld vs one call rel err %.3g", name, mname, (long long)n,
          (long long)(at - n), e);
  }
  CHECK(at == N && gpu.position() == N, "%s: chunks end at %lld, position %lld", name, (long long)at,
        (long long)gpu.position());
  // Context and vocabulary checks throw and leave the cache as it was.
  std::vector<int32_t> more(static_cast<size_t>(context - N + 1), 1);
  bool threw = false;
  try {
    gpu.forward(more.data(), static_cast<int64_t>(more.size()), false, mode, g1.data());
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw && gpu.position() == N, "%s: a call past the context must throw", name);
  gpu.reset();
  std::vector<int32_t> longp(static_cast<size_t>(context + 1), 2);
  threw = false;
  try {
    gpu.forward(longp.data(), context + 1, false, mode, g1.data());
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw && gpu.position() == 0, "%s: a prompt longer than the context must throw", name);
  int32_t bad = static_cast<int32_t>(V);
  threw = false;
  try {
    gpu.forward(&bad, 1, false, mode, g1.data());
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw, "%s: a token outside the vocabulary must throw", name);
  std::printf("    model %-22s %-6s prefill ok, %d/%d decisive greedy steps agree\n", name, mname, agree, decisive);
}

void test_models() {
  for (RunMode mode : {RunMode::Dense, RunMode::Sparse, RunMode::Auto}) {
    test_model_case("llama relu", true, ActKind::Relu, -1.f, mode);
    test_model_case("gpt2 relu", false, ActKind::Relu, -1.f, mode);
    test_model_case("llama silu thresholded", true, ActKind::Silu, 0.1f, mode);
    test_model_case("gpt2 gelu_tanh", false, ActKind::GeluTanh, -1.f, mode);
  }
}

}  // namespace

// ===== Training on the GPU (train_ops.h, train_model.h) ==========================================
// BEGIN TRAIN TESTS (compared with the CPU trainer's own functions, native/src/cpu/train_ops.h,
// and with sparsellm::Trainer; f32 on both sides, so the tolerances are f32 accumulation-order
// bounds, not bf16 ones: see each check).
namespace traintest {

std::vector<float> rvec(size_t n, double scale) {
  std::normal_distribution<double> nd(0.0, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = static_cast<float>(nd(rng()));
  return v;
}

struct Dev {
  DeviceBuffer b;
  size_t n = 0;
  explicit Dev(const std::vector<float>& h) : b(std::max<size_t>(h.size(), 1) * 4), n(h.size()) {
    upload(b.data(), h.data(), h.size() * 4);
  }
  explicit Dev(size_t count) : b(std::max<size_t>(count, 1) * 4), n(count) { memset_device(b.data(), 0, count * 4); }
  float* p() const { return b.as<float>(); }
  std::vector<float> get() const {
    std::vector<float> h(n);
    download(h.data(), b.data(), n * 4);
    return h;
  }
};

// ||a − ref|| / ||ref|| in float64.
double rel(const std::vector<float>& a, const std::vector<float>& ref) {
  std::vector<double> r(ref.begin(), ref.end());
  return check::rel_error(a.data(), r.data(), std::min(a.size(), r.size()));
}

// The strided GEMM against float64, in both precisions: all four layouts, batches, the
// accumulate flag, sizes off both kernels' tiles (64 × 64 × 16 SIMT, 128 × 128 × 32 tensor
// cores; 1 × 1 × 1 included), odd strides (scalar loads) and even ones (paired loads). The Bf16
// reference multiplies the operands rounded to bf16 in float64, so both bounds are f32
// accumulation-order bounds: K ≤ 129 products, relative error ~sqrt(K)·2^-24; bound 2e-5. The
// rounding itself is checked too: Bf16 against the unrounded product must be off by ~2^-9
// (a kernel that skipped the rounding would pass the first check only by accident, never this).
void test_gemm_f32(train::MatmulPrecision prec) {
  const bool bf = prec == train::MatmulPrecision::Bf16;
  train::MatmulScope scope(prec);
  struct Case { int64_t M, N, K, zo, zi; };
  for (const Case c : {Case{1, 1, 1, 1, 1}, Case{65, 67, 17, 1, 1}, Case{130, 3, 129, 2, 3}, Case{7, 200, 64, 1, 2},
                       Case{257, 131, 70, 1, 1}})
    for (int layout = 0; layout < 4; ++layout)
      for (bool acc : {false, true}) {
        const bool at = layout & 1, bt = layout & 2;
        const int64_t nb = c.zo * c.zi, asz = c.M * c.K, bsz = c.K * c.N, csz = c.M * c.N;
        const std::vector<float> A = rvec(static_cast<size_t>(nb * asz), 1.0), B = rvec(static_cast<size_t>(nb * bsz), 1.0);
        const std::vector<float> C0 = rvec(static_cast<size_t>(nb * csz), 1.0);
        // A(r, k) at r·rs + k·cs (at: stored transposed, [K, M]); B likewise ([N, K] when bt).
        const int64_t ars = at ? 1 : c.K, acs = at ? c.M : 1, brs = bt ? 1 : c.N, bcs = bt ? c.K : 1;
        std::vector<double> ref(static_cast<size_t>(nb * csz)), exact(ref.size());
        for (int64_t z = 0; z < nb; ++z)
          for (int64_t r = 0; r < c.M; ++r)
            for (int64_t n = 0; n < c.N; ++n) {
              const size_t o = static_cast<size_t>(z * csz + r * c.N + n);
              double s = acc ? C0[o] : 0.0, x = s;
              for (int64_t k = 0; k < c.K; ++k) {
                const float av = A[static_cast<size_t>(z * asz + r * ars + k * acs)];
                const float bv = B[static_cast<size_t>(z * bsz + k * brs + n * bcs)];
                s += bf ? static_cast<double>(rb(av)) * rb(bv) : static_cast<double>(av) * bv;
                x += static_cast<double>(av) * bv;
              }
              ref[o] = s;
              exact[o] = x;
            }
        Dev a(A), b(B), cc(C0);
        // Batch (zo, zi): operands at z·size with z = zo·zi_count + zi.
        train::gemm_f32(c.M, c.N, c.K, train::MatRef{a.p(), ars, acs, c.zi * asz, asz},
                        train::MatRef{b.p(), brs, bcs, c.zi * bsz, bsz}, cc.p(), c.N, c.zi * csz, csz, c.zo, c.zi, acc);
        const std::vector<float> got = cc.get();
        const double e = check::rel_error(got.data(), ref.data(), ref.size());
        CHECK(e < 2e-5, "gemm_f32 (%s) %lldx%lldx%lld batches %lldx%lld layout %d acc %d: rel error %.3g",
              bf ? "bf16" : "f32", (long long)c.M, (long long)c.N, (long long)c.K, (long long)c.zo, (long long)c.zi,
              layout, acc ? 1 : 0, e);
        if (bf && c.K >= 17 && !acc) {
          const double ex = check::rel_error(got.data(), exact.data(), exact.size());
          CHECK(ex > 3e-4 && ex < 1e-2, "gemm_f32 (bf16) %lldx%lldx%lld: rel error %.3g against the unrounded product",
                (long long)c.M, (long long)c.N, (long long)c.K, ex);
        }
      }
  // gemm_f32_dyn: the row count (then the depth) capped on the device below the launch's
  // capacity; rows past the cap keep their values.
  for (const bool dyn_rows : {true, false}) {
    const int64_t M = 150, N = 70, K = 90, cap = dyn_rows ? 37 : 41;
    const std::vector<float> A = rvec(static_cast<size_t>(M * K), 1.0), B = rvec(static_cast<size_t>(K * N), 1.0);
    const std::vector<float> C0 = rvec(static_cast<size_t>(M * N), 1.0);
    std::vector<double> ref(C0.begin(), C0.end());
    const int64_t rows = dyn_rows ? cap : M, depth = dyn_rows ? K : cap;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t n = 0; n < N; ++n) {
        double s = 0;
        for (int64_t k = 0; k < depth; ++k) {
          const float av = A[static_cast<size_t>(r * K + k)], bv = B[static_cast<size_t>(k * N + n)];
          s += bf ? static_cast<double>(rb(av)) * rb(bv) : static_cast<double>(av) * bv;
        }
        ref[static_cast<size_t>(r * N + n)] += s;
      }
    const int32_t cap32 = static_cast<int32_t>(cap);
    DeviceBuffer dcap(4);
    upload(dcap.data(), &cap32, 4);
    Dev a(A), b(B), cc(C0);
    train::gemm_f32_dyn(M, N, K, train::MatRef{a.p(), K, 1}, train::MatRef{b.p(), N, 1}, cc.p(), N, true,
                        dyn_rows ? dcap.as<int32_t>() : nullptr, dyn_rows ? nullptr : dcap.as<int32_t>());
    const std::vector<float> got = cc.get();
    const double e = check::rel_error(got.data(), ref.data(), ref.size());
    CHECK(e < 2e-5, "gemm_f32_dyn (%s) %s capped at %lld: rel error %.3g", bf ? "bf16" : "f32",
          dyn_rows ? "rows" : "depth", (long long)cap, e);
  }
  // Causal modes on two batches of square products (T = 150: off both kernels' tiles): LowerA on a
  // lower-triangular A (as P·v) and UpperA on the transpose of one (as Pᵀ·dout, read through
  // strides) give the full product; LowerC (as q·kᵀ) gives C(r, n) for n ≤ r and leaves the tile
  // wholly above the diagonal that holds (0, T − 1) as it was (NaN).
  for (const train::Causal mode : {train::Causal::LowerA, train::Causal::UpperA, train::Causal::LowerC}) {
    const bool lowc = mode == train::Causal::LowerC;
    const int64_t T = 150, hd = 37, N = lowc ? T : hd, K = lowc ? hd : T, asz = T * K, bsz = K * N, csz = T * N;
    std::vector<float> A = rvec(static_cast<size_t>(2 * asz), 1.0);
    const std::vector<float> B = rvec(static_cast<size_t>(2 * bsz), 1.0);
    if (!lowc)  // X lower-triangular (X(r, k) = 0 for k > r), stored row-major
      for (int64_t z = 0; z < 2; ++z)
        for (int64_t r = 0; r < T; ++r)
          for (int64_t k = r + 1; k < T; ++k) A[static_cast<size_t>(z * asz + r * T + k)] = 0.f;
    // LowerA: A = X; UpperA: A(r, k) = X(k, r) (strides swapped).
    const int64_t ars = mode == train::Causal::UpperA ? 1 : K, acs = mode == train::Causal::UpperA ? T : 1;
    std::vector<double> ref(static_cast<size_t>(2 * csz));
    for (int64_t z = 0; z < 2; ++z)
      for (int64_t r = 0; r < T; ++r)
        for (int64_t n = 0; n < N; ++n) {
          double acc = 0;
          for (int64_t k = 0; k < K; ++k) {
            const float av = A[static_cast<size_t>(z * asz + r * ars + k * acs)], bv = B[static_cast<size_t>(z * bsz + k * N + n)];
            acc += bf ? static_cast<double>(rb(av)) * rb(bv) : static_cast<double>(av) * bv;
          }
          ref[static_cast<size_t>(z * csz + r * N + n)] = acc;
        }
    Dev a(A), b(B), cc(std::vector<float>(ref.size(), std::nanf("")));
    train::gemm_f32(T, N, K, train::MatRef{a.p(), ars, acs, 0, asz}, train::MatRef{b.p(), N, 1, 0, bsz}, cc.p(), N, 0, csz,
                    1, 2, false, mode);
    const std::vector<float> got = cc.get();
    std::vector<float> g2;
    std::vector<double> r2;
    for (int64_t z = 0; z < 2; ++z)
      for (int64_t r = 0; r < T; ++r)
        for (int64_t n = 0; n < (lowc ? r + 1 : N); ++n) {
          g2.push_back(got[static_cast<size_t>(z * csz + r * N + n)]);
          r2.push_back(ref[static_cast<size_t>(z * csz + r * N + n)]);
        }
    const double e = check::rel_error(g2.data(), r2.data(), r2.size());
    CHECK(e < 2e-5 && (!lowc || std::isnan(got[static_cast<size_t>(T - 1)])),
          "gemm_f32 (%s) causal mode %d: rel error %.3g, C(0, T-1) = %g", bf ? "bf16" : "f32", static_cast<int>(mode), e,
          got[static_cast<size_t>(T - 1)]);
  }
}

// RMSNorm forward/backward against the CPU functions (both reduce in float64 and round once):
// 1e-6. Single row, d off every block size.
void test_train_norm(int64_t M, int64_t d) {
  const std::vector<float> x = rvec(static_cast<size_t>(M * d), 1.5), add = rvec(static_cast<size_t>(M * d), 0.7);
  const std::vector<float> w = rvec(static_cast<size_t>(d), 1.0), dy = rvec(static_cast<size_t>(M * d), 1.0);
  const std::vector<float> dx0 = rvec(static_cast<size_t>(M * d), 1.0), dw0 = rvec(static_cast<size_t>(d), 1.0);
  const float eps = 1e-5f;
  std::vector<float> sum(x.size()), y(x.size()), rstd(static_cast<size_t>(M));
  trainops::rmsnorm_forward(x.data(), add.data(), sum.data(), M, d, w.data(), eps, y.data(), rstd.data());
  Dev gx(x), ga(add), gs(x.size()), gw(w), gy(x.size()), gr(static_cast<size_t>(M));
  train::rmsnorm_forward(gx.p(), ga.p(), gs.p(), M, d, gw.p(), eps, gy.p(), gr.p());
  CHECK(rel(gs.get(), sum) < 1e-7, "rmsnorm sum %lldx%lld", (long long)M, (long long)d);
  CHECK(rel(gy.get(), y) < 1e-6, "rmsnorm forward %lldx%lld: %.3g", (long long)M, (long long)d, rel(gy.get(), y));
  CHECK(rel(gr.get(), rstd) < 1e-6, "rmsnorm rstd %lldx%lld", (long long)M, (long long)d);
  for (bool accumulate : {false, true}) {
    std::vector<float> dx = dx0, dw = dw0;
    trainops::rmsnorm_backward(sum.data(), rstd.data(), w.data(), dy.data(), M, d, dx.data(), accumulate, dw.data(),
                               !accumulate);
    Dev gdy(dy), gdx(dx0), gdw(dw0);
    DeviceBuffer part(static_cast<size_t>(train::rmsnorm_backward_scratch(M, d)) * 8);
    train::rmsnorm_backward(gs.p(), gr.p(), gw.p(), gdy.p(), M, d, gdx.p(), accumulate, gdw.p(), !accumulate,
                            part.as<double>());
    const double ex = rel(gdx.get(), dx), ew = rel(gdw.get(), dw);
    CHECK(ex < 1e-6 && ew < 1e-6, "rmsnorm backward %lldx%lld acc %d: dx %.3g dw %.3g", (long long)M, (long long)d,
          accumulate ? 1 : 0, ex, ew);
  }
}

// RoPE (same f32 operations as the CPU, up to fused multiply-adds): 1e-6.
void test_train_rope(int64_t B, int64_t T, int64_t H, int64_t hd) {
  const int64_t ld = 3 * H * hd + 5;
  std::vector<float> cs, sn;
  trainops::rope_tables(T + 3, hd, 10000.0, cs, sn);
  for (bool inverse : {false, true}) {
    std::vector<float> x = rvec(static_cast<size_t>(B * T * ld), 1.0);
    Dev gx(x), gc(cs), gsn(sn);
    trainops::rope_apply(x.data(), ld, B, T, H, hd, cs.data(), sn.data(), inverse);
    train::rope_apply(gx.p(), ld, B, T, H, hd, gc.p(), gsn.p(), inverse);
    CHECK(rel(gx.get(), x) < 1e-6, "rope B%lld T%lld H%lld hd%lld inverse %d", (long long)B, (long long)T, (long long)H,
          (long long)hd, inverse ? 1 : 0);
  }
}

// Causal attention forward/backward against the CPU kernels. Both take exponentials in f32
// (the CPU a degree-7 polynomial, < 1e-7 relative; the GPU expf) and sum in different orders:
// 2e-5. P is compared on its causal part only (the CPU leaves the rest as scratch).
// Attention against the CPU trainer's (which keeps P): out and dq, dk, dv within f32 rounding
// (2e-5); lse against float64 (1e-5 relative to max(1, |lse|)). The GPU keeps only lse and
// recomputes P in backward, through chunks of (sequence, head) pairs sized by the scratch:
// `scratch` 0 = the trainer's size, else that many T × T score matrices (1: a pair at a time;
// not a divisor of H: a short last chunk). The scratch starts as NaNs.
// bf16: under MatmulScope(Bf16) (head_dim 64 or 128: the flash forward and backward; other head
// dims: the bf16 GEMMs, P recomputed from the lse), against the same f32 CPU results:
// q, k, v, P, dout and dS rounded to bf16 for the products give about 2^-9 relative per product:
// lse within 1e-2, out and the gradients within 3e-2.
void test_train_attention(int64_t B, int64_t T, int64_t H, int64_t hd, int64_t scratch = 0, bool bf16 = false) {
  const int64_t d = H * hd, ld_in = 3 * d, M = B * T;
  const std::vector<float> qkv = rvec(static_cast<size_t>(M * ld_in), 1.0), dout = rvec(static_cast<size_t>(M * d), 1.0);
  std::vector<float> P(static_cast<size_t>(B * H * T * T)), out(static_cast<size_t>(M * d));
  std::vector<float> dqkv(static_cast<size_t>(M * ld_in));
  trainops::attention_forward(qkv.data(), qkv.data() + d, qkv.data() + 2 * d, ld_in, B, T, H, hd, P.data(), out.data(), d);
  trainops::attention_backward(qkv.data(), qkv.data() + d, qkv.data() + 2 * d, ld_in, P.data(), dout.data(), d, B, T, H,
                               hd, dqkv.data(), dqkv.data() + d, dqkv.data() + 2 * d, ld_in);
  std::vector<double> lse_ref(static_cast<size_t>(B * H * T));
  const double sc = 1.0 / std::sqrt(static_cast<double>(hd));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < T; ++t) {
        std::vector<double> e(static_cast<size_t>(t + 1));
        double mx = -1e300, sum = 0;
        for (int64_t u = 0; u <= t; ++u) {
          double dot = 0;
          for (int64_t i = 0; i < hd; ++i)
            dot += static_cast<double>(qkv[static_cast<size_t>((b * T + t) * ld_in + h * hd + i)]) *
                   qkv[static_cast<size_t>((b * T + u) * ld_in + d + h * hd + i)];
          e[static_cast<size_t>(u)] = dot * sc;
          mx = std::max(mx, dot * sc);
        }
        for (double x : e) sum += std::exp(x - mx);
        lse_ref[static_cast<size_t>((b * H + h) * T + t)] = mx + std::log(sum);
      }
  const int64_t elems = scratch ? scratch * T * T
                                : train::attention_scratch(B, T, H, hd,
                                                           bf16 ? train::MatmulPrecision::Bf16 : train::MatmulPrecision::F32);
  Dev gq(qkv), glse(lse_ref.size()), go(out.size()), gdo(dout), gdq(dqkv.size()),
      gs(std::vector<float>(static_cast<size_t>(2 * elems), std::nanf("")));
  {
    train::MatmulScope scope(bf16 ? train::MatmulPrecision::Bf16 : train::MatmulPrecision::F32);
    train::attention_forward(gq.p(), gq.p() + d, gq.p() + 2 * d, ld_in, B, T, H, hd, glse.p(), go.p(), d, gs.p(), elems);
    train::attention_backward(gq.p(), gq.p() + d, gq.p() + 2 * d, ld_in, glse.p(), go.p(), gdo.p(), d, B, T, H, hd,
                              gdq.p(), gdq.p() + d, gdq.p() + 2 * d, ld_in, gs.p(), elems);
  }
  double el = 0;
  const std::vector<float> lse = glse.get();
  for (size_t i = 0; i < lse.size(); ++i)
    el = std::max(el, std::fabs(lse[i] - lse_ref[i]) / std::max(1.0, std::fabs(lse_ref[i])));
  const double eo = rel(go.get(), out), eg = rel(gdq.get(), dqkv);
  const double tl = bf16 ? 1e-2 : 1e-5, to = bf16 ? 3e-2 : 2e-5;
  CHECK(el < tl && eo < to && eg < to, "attention%s B%lld T%lld H%lld hd%lld scratch %lld: lse %.3g out %.3g dqkv %.3g",
        bf16 ? " (bf16)" : "", (long long)B, (long long)T, (long long)H, (long long)hd, (long long)scratch, el, eo, eg);
  if (bf16)
    std::printf("    attention (bf16) B%lld T%lld H%lld hd%lld: lse %.2e out %.2e dqkv %.2e\n", (long long)B,
                (long long)T, (long long)H, (long long)hd, el, eo, eg);
}

// Cross-entropy: the loss sum within 1e-6 (float64 on both sides after f32 exponentials);
// dlogits within 1e-5 (expf vs exp in float64, then one f32 rounding).
void test_train_ce(int64_t M, int64_t V) {
  std::vector<float> logits = rvec(static_cast<size_t>(M * V), 3.0);
  std::vector<int32_t> tg(static_cast<size_t>(M));
  std::uniform_int_distribution<int32_t> ud(0, static_cast<int32_t>(V - 1));
  for (auto& t : tg) t = ud(rng());
  Dev gl(logits);
  DeviceBuffer gt(tg.size() * 4), gsum(8);
  upload(gt.data(), tg.data(), tg.size() * 4);
  memset_device(gsum.data(), 0, 8);
  const float gscale = 0.37f;
  const double cpu = trainops::cross_entropy(logits.data(), tg.data(), M, V, gscale);
  train::cross_entropy(gl.p(), gt.as<int32_t>(), M, V, gscale, gsum.as<double>());
  double gpu = 0;
  download(&gpu, gsum.data(), 8);
  CHECK(std::fabs(gpu - cpu) <= 1e-6 * std::fabs(cpu), "cross-entropy %lldx%lld: loss %.9g vs %.9g", (long long)M,
        (long long)V, gpu, cpu);
  CHECK(rel(gl.get(), logits) < 1e-5, "cross-entropy %lldx%lld: dlogits %.3g", (long long)M, (long long)V,
        rel(gl.get(), logits));
}

// AdamW (the same f32 formula; fused multiply-adds may differ by an ulp): 1e-6 on w, m, v.
// Sum of squares (float64 sums of exact squares, different order): 1e-12. Embeddings: the
// gather exact, the scatter (atomic adds in any order, repeated ids) 1e-6 against float64.
void test_train_misc(int64_t n) {
  std::vector<float> w = rvec(static_cast<size_t>(n), 1.0), g = rvec(static_cast<size_t>(n), 0.1);
  std::vector<float> m = rvec(static_cast<size_t>(n), 0.01), v = rvec(static_cast<size_t>(n), 0.001);
  for (auto& x : v) x = x * x;
  Dev gw(w), gg(g), gm(m), gv(v);
  const double c1 = 1.0 - std::pow(0.9, 3.0), c2 = 1.0 - std::pow(0.95, 3.0);
  trainops::adamw(w.data(), g.data(), m.data(), v.data(), n, 3e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, c1, c2, 0.7f);
  train::adamw(gw.p(), gg.p(), gm.p(), gv.p(), n, 3e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, c1, c2, 0.7f);
  CHECK(rel(gw.get(), w) < 1e-6 && rel(gm.get(), m) < 1e-6 && rel(gv.get(), v) < 1e-6, "adamw n=%lld: w %.3g m %.3g v %.3g",
        (long long)n, rel(gw.get(), w), rel(gm.get(), m), rel(gv.get(), v));
  DeviceBuffer ss(8);
  memset_device(ss.data(), 0, 8);
  train::sum_squares(gg.p(), n, ss.as<double>());
  double s = 0;
  download(&s, ss.data(), 8);
  const double sc = trainops::sum_squares(g.data(), n);
  CHECK(std::fabs(s - sc) <= 1e-12 * sc, "sum_squares n=%lld: %.17g vs %.17g", (long long)n, s, sc);
  const int64_t V = 11, d = 13, M = 40;
  const std::vector<float> table = rvec(static_cast<size_t>(V * d), 1.0), dx = rvec(static_cast<size_t>(M * d), 1.0);
  const std::vector<float> G0 = rvec(static_cast<size_t>(V * d), 1.0);
  std::vector<int32_t> ids(static_cast<size_t>(M));
  std::uniform_int_distribution<int32_t> ud(0, static_cast<int32_t>(V - 1));
  for (auto& t : ids) t = ud(rng());
  DeviceBuffer gid(ids.size() * 4);
  upload(gid.data(), ids.data(), ids.size() * 4);
  Dev gt(table), gout(static_cast<size_t>(M * d)), gdx(dx), gG(G0);
  train::embedding_forward(gt.p(), gid.as<int32_t>(), M, d, gout.p());
  train::embedding_backward(gdx.p(), gid.as<int32_t>(), M, d, gG.p());
  const std::vector<float> out = gout.get();
  bool same = true;
  std::vector<double> ref(G0.begin(), G0.end());
  for (int64_t r = 0; r < M; ++r)
    for (int64_t i = 0; i < d; ++i) {
      same = same && out[static_cast<size_t>(r * d + i)] == table[static_cast<size_t>(ids[static_cast<size_t>(r)] * d + i)];
      ref[static_cast<size_t>(ids[static_cast<size_t>(r)] * d + i)] += dx[static_cast<size_t>(r * d + i)];
    }
  const std::vector<float> Gg = gG.get();
  CHECK(same, "embedding forward: not the table's rows");
  CHECK(check::rel_error(Gg.data(), ref.data(), ref.size()) < 1e-6, "embedding backward");
}

// The hybrid FFN operations against the CPU hybrid_forward / hybrid_backward (the same f32 math
// in other summation orders; the gradients of the light rows are summed per neuron on both
// sides): 1e-5 relative. Shapes cross the 256-wide scans (F, M > 256), a single token, every row
// in the tail (W = 1 with a dense gate), none in the tail (W ≥ F), and accumulation into
// existing gradients. `density` sets the gate's mean so that about that share of units fires.
// bf16_light: the weights, x and dy are bf16 values and the light rows' kernels read bf16 copies
// (LightRowWeights; the backward copies x and dy); the CPU reference runs on the same values, so
// the tolerances do not change.
void test_train_hybrid(int64_t M, int64_t d, int64_t F, int W, double density, bool bf16_light = false) {
  // x ~ N(0.5, 1), gate ~ N(−a, 1)/sqrt(d): g has mean −0.5·a·sqrt(d), std ≈ 1.1 → P(g > 0) ≈ density.
  double lo = -10, hi = 10;  // solve Φ(t) = density by bisection on erfc
  for (int i = 0; i < 60; ++i) {
    const double mid = 0.5 * (lo + hi);
    if (0.5 * std::erfc(-mid / std::sqrt(2.0)) < density) lo = mid;
    else hi = mid;
  }
  const double a = -lo * 1.1 / (0.5 * std::sqrt(static_cast<double>(d)));
  std::vector<float> x = rvec(static_cast<size_t>(M * d), 1.0);
  for (auto& v : x) v += 0.5f;
  std::vector<float> gate = rvec(static_cast<size_t>(F * d), 1.0 / std::sqrt(static_cast<double>(d)));
  for (auto& v : gate) v -= static_cast<float>(a / std::sqrt(static_cast<double>(d)));
  std::vector<float> ud = rvec(static_cast<size_t>(F * 2 * d), 1.0 / std::sqrt(static_cast<double>(d)));
  std::vector<float> dy = rvec(static_cast<size_t>(M * d), 1.0);
  const float lam = 0.3f;
  std::vector<uint16_t> gate16, ud16;
  if (bf16_light) {  // bf16-representable operands: the light rows' bf16 copies are then exact
    for (auto* wv : {&gate, &ud, &x, &dy})
      for (auto& v : *wv) v = bf16_to_f32(f32_to_bf16(v));
    for (float v : gate) gate16.push_back(f32_to_bf16(v));
    for (float v : ud) ud16.push_back(f32_to_bf16(v));
  }
  // CPU
  HybridParams p;
  p.ell_width = W;
  HybridTape tape;
  std::vector<float> y(static_cast<size_t>(M * d)), dx(y.size()), dgate(gate.size()), dud(ud.size());
  const WeightView gv{gate.data(), DType::F32, F, d, d};
  const UpDownView uv{ud.data(), DType::F32, F, d, d};
  const HybridForwardResult r = hybrid_forward(x.data(), M, gv, uv, p, tape, y.data());
  hybrid_backward(x.data(), dy.data(), gv, uv, tape, lam, dx.data(), dgate.data(), dud.data());
  // GPU
  const size_t MW = static_cast<size_t>(M * W), MF = static_cast<size_t>(M * F), Md = static_cast<size_t>(M * d);
  DeviceBuffer b_rn(M * 4), b_col(MW * 4), b_g(MW * 4), b_u(MW * 4), b_tail((M + 1) * 4), b_Gt(MF * 4), b_Ut(MF * 4),
      b_pre(MF * 4), b_Ht(MF * 4), b_dHt(MF * 4), b_dGt(MF * 4), b_xt(Md * 4), b_yt(Md * 4), b_zt(Md * 4), b_du(MW * 4),
      b_dg(MW * 4), b_rank(MW * 4), b_list(MW * 4), b_hist(F * 4), b_offs((F + 1) * 4), b_stats(8 + 5 * 8);
  train::HybridBuffers h;
  h.M = M;
  h.d = d;
  h.F = F;
  h.W = W;
  h.row_nnz = b_rn.as<int32_t>();
  h.col = b_col.as<int32_t>();
  h.g = b_g.as<float>();
  h.u = b_u.as<float>();
  h.tail = b_tail.as<int32_t>();
  h.tail_count = b_tail.as<int32_t>() + M;
  h.Gt = b_Gt.as<float>();
  h.Ut = b_Ut.as<float>();
  h.Gpre = b_pre.as<float>();
  h.Ht = b_Ht.as<float>();
  h.dHt = b_dHt.as<float>();
  h.dGt = b_dGt.as<float>();
  h.xt = b_xt.as<float>();
  h.yt = b_yt.as<float>();
  h.zt = b_zt.as<float>();
  h.du = b_du.as<float>();
  h.dg = b_dg.as<float>();
  h.rank = b_rank.as<int32_t>();
  h.list = b_list.as<int32_t>();
  h.hist = b_hist.as<int32_t>();
  h.offs = b_offs.as<int32_t>();
  memset_device(b_stats.data(), 0, 8 + 5 * 8);
  Dev gx(x), gg(gate), gu(ud), gdy(dy), gy(Md), gdx(Md);
  DeviceBuffer fired(static_cast<size_t>(F));
  memset_device(fired.data(), 0, static_cast<size_t>(F));
  double* l1 = b_stats.as<double>();
  unsigned long long* cnt = reinterpret_cast<unsigned long long*>(l1 + 1);
  DeviceBuffer g16(gate16.size() * 2 + 2), u16(ud16.size() * 2 + 2);
  train::LightRowWeights lw;
  if (bf16_light) {
    upload(g16.data(), gate16.data(), gate16.size() * 2);
    upload(u16.data(), ud16.data(), ud16.size() * 2);
    lw.gate = g16.as<uint16_t>();
    lw.updown = u16.as<uint16_t>();
  }
  train::hybrid_ffn_forward(gx.p(), gg.p(), gu.p(), h, gy.p(), l1, cnt, fired.as<uint8_t>(), cnt + 3, lw);
  const float lam_m = lam / static_cast<float>(M);
  for (bool first : {true, false}) {
    const std::vector<float> g0 = rvec(gate.size(), 0.1), u0 = rvec(ud.size(), 0.1);
    Dev gdg(first ? std::vector<float>(gate.size(), 7.f) : g0), gdu(first ? std::vector<float>(ud.size(), 7.f) : u0);
    train::hybrid_ffn_backward(gx.p(), gdy.p(), gg.p(), gu.p(), h, lam_m, gdx.p(), gdg.p(), gdu.p(), first, lw);
    std::vector<float> eg = dgate, eu = dud;
    if (!first) {
      for (size_t i = 0; i < eg.size(); ++i) eg[i] += g0[i];
      for (size_t i = 0; i < eu.size(); ++i) eu[i] += u0[i];
    }
    const double e1 = rel(gdx.get(), dx), e2 = rel(gdg.get(), eg), e3 = rel(gdu.get(), eu);
    CHECK(e1 < 1e-5 && e2 < 1e-5 && e3 < 1e-5,
          "hybrid %lldx%lldx%lld W%d%s first %d: dx %.3g dgate %.3g dupdown %.3g", (long long)M, (long long)d,
          (long long)F, W, bf16_light ? " bf16 light rows" : "", first ? 1 : 0, e1, e2, e3);
  }
  double sl1 = 0;
  unsigned long long hc[5];
  download(&sl1, l1, 8);
  download(hc, cnt, sizeof hc);
  const double ey = rel(gy.get(), y);
  const int64_t nt = static_cast<int64_t>(tape.tail_rows.size());
  CHECK(ey < 1e-5 && std::fabs(sl1 / static_cast<double>(M) - r.l1) <= 1e-5 * r.l1 + 1e-12,
        "hybrid %lldx%lldx%lld W%d: y %.3g, l1 %.9g vs %.9g", (long long)M, (long long)d, (long long)F, W, ey,
        sl1 / static_cast<double>(M), r.l1);
  CHECK(static_cast<int64_t>(hc[0]) == r.stats.nnz && static_cast<int64_t>(hc[1]) == r.stats.max_row_nnz &&
            static_cast<int64_t>(hc[2]) == nt,
        "hybrid %lldx%lldx%lld W%d: nnz %llu/%lld max %llu/%lld tail %llu/%lld", (long long)M, (long long)d, (long long)F,
        W, hc[0], (long long)r.stats.nnz, hc[1], (long long)r.stats.max_row_nnz, hc[2], (long long)nt);
  std::printf("    hybrid %lldx%lldx%lld W%d%s: %.1f non-zeros per row, %lld of %lld rows in the tail\n", (long long)M,
              (long long)d, (long long)F, W, bf16_light ? " (bf16 light rows)" : "",
              static_cast<double>(r.stats.nnz) / static_cast<double>(M), (long long)nt, (long long)M);
}

std::vector<int32_t> random_tokens(int64_t n, int64_t V) {
  std::uniform_int_distribution<int32_t> ud(0, static_cast<int32_t>(V - 1));
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = ud(rng());
  return t;
}

// The trainer tests' model: 2 layers of width 24 with 3 heads, a vocabulary of 37.
TrainModelConfig small_model(int64_t d_ff = 40, int64_t context = 16) {
  TrainModelConfig cfg;
  cfg.vocab = 37;
  cfg.d_model = 24;
  cfg.n_layers = 2;
  cfg.n_heads = 3;
  cfg.d_ff = d_ff;
  cfg.context = context;
  return cfg;
}

// CudaTrainer against Trainer (the same FFN path on both: dense, hybrid with an ELL width that
// sends about half the rows to the tail, or auto switching every layer to hybrid after two
// steps) on a small random model: the same initial weights from the same seed (bit-identical),
// set_tensor/get_tensor round trips, then steps with micro-batches, clipping, L1, a single-token
// sequence and a dead-neuron window with re-initialisation. Tolerances: the GPU sums in other orders (f32 GEMMs of K ≤ 64), so losses
// agree to ~1e-6 (bound 1e-5), gradients to ~1e-5 (bound 1e-4); after AdamW the weight updates
// (w − w0) to 1e-3: an element whose gradient is within rounding of zero can take a different
// sign of m/sqrt(v) at step 1, so the bound is looser than the gradients' own.
void test_cuda_trainer(FfnTrainPath path) {
  std::printf("    CudaTrainer vs Trainer, FFN path %d (0 auto, 1 dense, 2 hybrid)\n", static_cast<int>(path));
  const TrainModelConfig cfg = small_model();
  TrainHyper hp;
  hp.ffn_path = path;
  hp.ell_width = 20;  // about half of the 40 units fire per token at initialisation
  hp.recheck_steps = 2;
  hp.hybrid_cutoff = 1000;  // auto: every layer hybrid from step 3
  hp.l1 = 0.05f;
  hp.clip = 0.5f;
  hp.dead_window = 2;
  hp.reinit_dead = true;
  hp.seed = rng()() % 1000;
  Trainer cpu(cfg, hp);
  CudaTrainer gpu(cfg, hp);
  cpu.init_weights();
  gpu.init_weights();
  CHECK(cpu.tensors().size() == gpu.tensors().size(), "trainer: tensor lists differ");
  bool init_same = true;
  for (const TrainTensor& t : cpu.tensors()) {
    std::vector<float> a(static_cast<size_t>(t.rows * t.cols)), b(a.size());
    cpu.get_tensor(t.name, a.data());
    gpu.get_tensor(t.name, b.data());
    init_same = init_same && a == b;
  }
  CHECK(init_same, "trainer: init_weights differs from the CPU's with the same seed");
  // Fresh random weights through set_tensor on both (a layout error in get/set would show).
  for (const TrainTensor& t : cpu.tensors()) {
    const std::vector<float> x = rvec(static_cast<size_t>(t.rows * t.cols), t.cols == 1 ? 0.2 : 0.15);
    std::vector<float> y = x;
    if (t.cols == 1)
      for (auto& v : y) v += 1.f;
    cpu.set_tensor(t.name, y.data());
    gpu.set_tensor(t.name, y.data());
    std::vector<float> back(y.size());
    gpu.get_tensor(t.name, back.data());
    CHECK(back == y, "trainer: get_tensor(%s) after set_tensor", t.name.c_str());
  }
  CHECK(gpu.params() == cpu.params(), "trainer: flat parameters differ after set_tensor");
  // One micro-batch's gradient.
  {
    const std::vector<int32_t> tok = random_tokens(2 * 8, cfg.vocab);
    cpu.zero_grad();
    gpu.zero_grad();
    const StepStats a = cpu.accumulate(tok.data(), 2, 7, 0.5);
    const StepStats b = gpu.accumulate(tok.data(), 2, 7, 0.5);
    const double eg = rel(gpu.grads(), cpu.grads());
    CHECK(std::fabs(a.loss - b.loss) <= 1e-5 * std::fabs(a.loss) && eg < 1e-4,
          "trainer accumulate (path %d): loss %.9g vs %.9g, gradient rel error %.3g", static_cast<int>(path), b.loss, a.loss,
          eg);
  }
  const std::vector<float> w0 = cpu.params();
  struct StepShape { int64_t n_micro, B, T; };
  int s_i = 0;
  for (const StepShape sh : {StepShape{2, 2, 7}, StepShape{1, 1, 1}, StepShape{1, 1, 1}, StepShape{3, 1, 16}}) {
    const std::vector<int32_t> tok = random_tokens(sh.n_micro * sh.B * (sh.T + 1), cfg.vocab);
    const StepStats a = cpu.step(tok.data(), sh.n_micro, sh.B, sh.T, 3e-3f);
    const StepStats b = gpu.step(tok.data(), sh.n_micro, sh.B, sh.T, 3e-3f);
    ++s_i;
    CHECK(std::fabs(a.loss - b.loss) <= 1e-5 * std::fabs(a.loss) && std::fabs(a.ce - b.ce) <= 1e-5 * std::fabs(a.ce) &&
              std::fabs(a.l1 - b.l1) <= 1e-5 * std::fabs(a.l1) + 1e-12,
          "trainer step %d: loss %.9g vs %.9g, ce %.9g vs %.9g, l1 %.9g vs %.9g", s_i, b.loss, a.loss, b.ce, a.ce, b.l1, a.l1);
    CHECK(std::fabs(a.grad_norm - b.grad_norm) <= 1e-4 * a.grad_norm, "trainer step %d: grad norm %.9g vs %.9g", s_i,
          b.grad_norm, a.grad_norm);
    CHECK(a.tokens == b.tokens && a.reinitialised == b.reinitialised, "trainer step %d: tokens %lld/%lld reinit %lld/%lld",
          s_i, (long long)b.tokens, (long long)a.tokens, (long long)b.reinitialised, (long long)a.reinitialised);
    for (int64_t l = 0; l < cfg.n_layers; ++l)
      CHECK(a.layers[static_cast<size_t>(l)].hybrid == b.layers[static_cast<size_t>(l)].hybrid &&
                a.layers[static_cast<size_t>(l)].tail_rows == b.layers[static_cast<size_t>(l)].tail_rows,
            "trainer step %d layer %lld: hybrid %d/%d tail rows %lld/%lld", s_i, (long long)l,
            b.layers[static_cast<size_t>(l)].hybrid ? 1 : 0, a.layers[static_cast<size_t>(l)].hybrid ? 1 : 0,
            (long long)b.layers[static_cast<size_t>(l)].tail_rows, (long long)a.layers[static_cast<size_t>(l)].tail_rows);
    for (size_t l = 0; l < a.layers.size(); ++l) {
      const LayerStepStats &x = a.layers[l], &y = b.layers[l];
      // nnz: a unit within rounding of zero could flip; none is expected on random data (allow 1).
      CHECK(std::llabs(x.nnz - y.nnz) <= 1 && std::llabs(x.max_row_nnz - y.max_row_nnz) <= 1 && x.dead == y.dead &&
                x.saved_bytes == y.saved_bytes && x.tokens == y.tokens,
            "trainer step %d layer %zu: nnz %lld/%lld max %lld/%lld dead %lld/%lld saved %lld/%lld", s_i, l,
            (long long)y.nnz, (long long)x.nnz, (long long)y.max_row_nnz, (long long)x.max_row_nnz, (long long)y.dead,
            (long long)x.dead, (long long)y.saved_bytes, (long long)x.saved_bytes);
    }
  }
  // The GPU keeps each attention row's log-sum-exp where the CPU keeps its probabilities: the
  // last call (3 micro-batches of B = 1, T = 16) saved B·H·(T·T − T) floats per layer less.
  const int64_t attn_saved = cfg.n_layers * cfg.n_heads * (16 * 16 - 16) * 4;
  CHECK(gpu.saved_bytes() == cpu.saved_bytes() - attn_saved && gpu.peak_saved_bytes() <= cpu.peak_saved_bytes() &&
            gpu.peak_saved_bytes() >= gpu.saved_bytes(),
        "trainer: saved bytes %lld vs %lld (CPU, less %lld), peak %lld vs %lld", (long long)gpu.saved_bytes(),
        (long long)cpu.saved_bytes(), (long long)attn_saved, (long long)gpu.peak_saved_bytes(),
        (long long)cpu.peak_saved_bytes());
  std::vector<float> ua = cpu.params(), ub = gpu.params();
  for (size_t i = 0; i < ua.size(); ++i) {
    ua[i] -= w0[i];
    ub[i] -= w0[i];
  }
  const double eu = rel(ub, ua), em = rel(gpu.moment1(), cpu.moment1()), ev = rel(gpu.moment2(), cpu.moment2());
  CHECK(eu < 1e-3 && em < 1e-3 && ev < 1e-3, "trainer: after 4 steps, updates %.3g, m %.3g, v %.3g", eu, em, ev);
  const TrainerState sa = cpu.state(), sb = gpu.state();
  CHECK(sa.step == sb.step && sa.window_tokens == sb.window_tokens && sa.dead == sb.dead && sa.fired == sb.fired &&
            sa.hybrid == sb.hybrid,
        "trainer: state differs (step %lld/%lld, window %lld/%lld)", (long long)sb.step, (long long)sa.step,
        (long long)sb.window_tokens, (long long)sa.window_tokens);
  const std::vector<int32_t> tok = random_tokens(3 * 10, cfg.vocab);
  const EvalStats ea = cpu.evaluate(tok.data(), 3, 9), eb = gpu.evaluate(tok.data(), 3, 9);
  CHECK(std::fabs(ea.ce - eb.ce) <= 1e-5 * ea.ce && std::fabs(ea.l1 - eb.l1) <= 1e-5 * ea.l1 + 1e-12 && ea.tokens == eb.tokens,
        "trainer evaluate: ce %.9g vs %.9g, l1 %.9g vs %.9g", eb.ce, ea.ce, eb.l1, ea.l1);
  // Errors: a token outside the vocabulary, an ELL width below 1.
  bool threw = false;
  std::vector<int32_t> bad = random_tokens(9, cfg.vocab);
  bad[4] = static_cast<int32_t>(cfg.vocab);
  try {
    gpu.step(bad.data(), 1, 1, 8, 1e-3f);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw, "trainer: a token outside the vocabulary was accepted");
  threw = false;
  try {
    TrainHyper h2 = hp;
    h2.ell_width = 0;
    CudaTrainer t(cfg, h2);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw, "trainer: ELL width 0 was accepted");
}

// Device memory follows sparsity: on a gate that fires for 5 of 400 units (the others' rows
// are zero), the hybrid path's tail tape shrinks to a row per layer and the trainer holds less
// GPU memory than on the dense path, whose G and U tapes are 2·M·F floats per layer; a dense
// layer that turns hybrid gives its tape back. Losses agree (the same model either way).
void test_cuda_trainer_memory() {
  std::printf("    CudaTrainer device memory, dense vs hybrid\n");
  const TrainModelConfig cfg = small_model(400, 32);
  int64_t peak[2] = {0, 0};
  double loss[2] = {0, 0};
  const std::vector<int32_t> tok = random_tokens(4 * 33, cfg.vocab);
  // Rows 0..4 of every layer's gate fire, the rest stay at zero (the same weights on both paths).
  const std::vector<float> live = rvec(static_cast<size_t>(5 * cfg.d_model), 0.3);
  std::vector<float> gate(static_cast<size_t>(cfg.d_ff * cfg.d_model), 0.f);
  std::copy(live.begin(), live.end(), gate.begin());
  for (int hybrid = 0; hybrid < 2; ++hybrid) {
    TrainHyper hp;
    hp.ffn_path = hybrid ? FfnTrainPath::Hybrid : FfnTrainPath::Dense;
    hp.ell_width = 16;
    hp.seed = 5;
    CudaTrainer t(cfg, hp);
    t.init_weights();
    for (const TrainTensor& tt : t.tensors())
      if (tt.name.find("gate_proj") != std::string::npos) t.set_tensor(tt.name, gate.data());
    const StepStats s = t.step(tok.data(), 1, 4, 32, 1e-3f);
    for (const LayerStepStats& l : s.layers)
      CHECK(l.nnz <= 5 * l.tokens && l.tail_rows == 0, "trainer memory: nnz %lld over %lld tokens, tail %lld",
            (long long)l.nnz, (long long)l.tokens, (long long)l.tail_rows);
    peak[hybrid] = t.peak_device_bytes();
    loss[hybrid] = s.loss;
    CHECK(t.device_bytes() <= t.peak_device_bytes(), "trainer memory: device %lld above peak %lld",
          (long long)t.device_bytes(), (long long)t.peak_device_bytes());
  }
  const int64_t tapes = 2 * cfg.n_layers * 4 * 32 * cfg.d_ff * 4;  // the dense G and U tapes
  CHECK(peak[1] + tapes / 2 < peak[0], "trainer memory: hybrid peak %lld vs dense %lld (dense tapes %lld)",
        (long long)peak[1], (long long)peak[0], (long long)tapes);
  CHECK(std::fabs(loss[0] - loss[1]) <= 1e-5 * loss[0], "trainer memory: loss dense %.9g vs hybrid %.9g", loss[0],
        loss[1]);
}

// With bf16 matmuls the hybrid layers' light rows read bf16 copies of the gate and updown
// weights; the copies must follow the weights. After two steps (AdamW changed every weight) the
// trainer evaluates a batch as a fresh trainer given its weights through set_tensor does; had
// the copies kept the weights of the first evaluation, the CE and the L1 would differ.
void test_cuda_trainer_light_weights() {
  const TrainModelConfig cfg = small_model();
  TrainHyper hp;
  hp.ffn_path = FfnTrainPath::Hybrid;
  hp.ell_width = 12;  // some rows in the tail too
  hp.seed = 9;
  const std::vector<int32_t> tok = random_tokens(2 * 17, cfg.vocab);
  CudaTrainer a(cfg, hp, train::MatmulPrecision::Bf16);
  a.init_weights();
  const EvalStats e0 = a.evaluate(tok.data(), 2, 16);  // makes the copies
  a.step(tok.data(), 1, 2, 16, 5e-2f);
  a.step(tok.data(), 1, 2, 16, 5e-2f);
  const EvalStats ea = a.evaluate(tok.data(), 2, 16);
  CudaTrainer b(cfg, hp, train::MatmulPrecision::Bf16);
  b.init_weights();
  for (const TrainTensor& t : a.tensors()) {
    std::vector<float> w(static_cast<size_t>(t.rows * t.cols));
    a.get_tensor(t.name, w.data());
    b.set_tensor(t.name, w.data());
  }
  const EvalStats eb = b.evaluate(tok.data(), 2, 16);
  CHECK(std::fabs(ea.ce - e0.ce) > 1e-3, "light weights: two steps left the CE at %.9g", ea.ce);
  CHECK(std::fabs(ea.ce - eb.ce) <= 1e-9 * eb.ce && std::fabs(ea.l1 - eb.l1) <= 1e-9 * eb.l1,
        "light weights: ce %.12g / l1 %.12g after steps vs %.12g / %.12g from the same weights (stale bf16 copies?)",
        ea.ce, ea.l1, eb.ce, eb.l1);
  std::printf("    CudaTrainer bf16 light-row weights follow the steps: ce %.6f -> %.6f\n", e0.ce, ea.ce);
}

void test_training() {
  std::printf("  training operations and CudaTrainer\n");
  test_gemm_f32(train::MatmulPrecision::F32);
  test_gemm_f32(train::MatmulPrecision::Bf16);
  test_train_norm(1, 7);
  test_train_norm(37, 300);
  test_train_norm(130, 24);
  test_train_rope(2, 7, 3, 10);
  test_train_rope(1, 1, 1, 2);
  test_train_attention(1, 1, 1, 2);
  test_train_attention(2, 37, 3, 10);
  test_train_attention(1, 70, 2, 16);
  test_train_attention(3, 19, 3, 8, 1);  // one (sequence, head) per chunk
  test_train_attention(3, 19, 3, 8, 2);  // heads in chunks of 2 and 1
  test_train_attention(5, 9, 2, 4, 4);   // whole sequences, two per chunk, a short last one
  test_train_attention(2, 70, 2, 64, 0, true);  // bf16: flash forward and backward (a ragged second tile)
  test_train_attention(1, 130, 1, 128, 0, true);  // head_dim 128: dk and dv in two launches
  test_train_attention(2, 37, 2, 128, 0, true);   // one ragged tile per sequence
  test_train_attention(1, 200, 3, 64, 0, true);   // four tiles each way
  test_train_attention(2, 9, 2, 16, 0, true);   // bf16 without a flash kernel for the head_dim
  test_train_ce(1, 2);
  test_train_ce(37, 300);
  test_train_ce(5, 1000);
  test_train_misc(1);
  test_train_misc(100003);
  test_train_hybrid(300, 40, 700, 40, 0.03);  // scans over several 256-wide chunks, some tail rows
  test_train_hybrid(1, 13, 50, 50, 0.1);      // one token (light: W = F)
  test_train_hybrid(70, 24, 300, 1, 0.5);     // every row in the tail
  test_train_hybrid(33, 260, 90, 90, 0.3);    // no tail; d over one block's width
  test_train_hybrid(300, 40, 700, 40, 0.03, true);  // the light rows on bf16 copies of the weights
  test_train_hybrid(33, 260, 90, 20, 0.3, true);
  for (FfnTrainPath path : {FfnTrainPath::Dense, FfnTrainPath::Hybrid, FfnTrainPath::Auto}) test_cuda_trainer(path);
  test_cuda_trainer_memory();
  test_cuda_trainer_light_weights();
}

}  // namespace traintest
// END TRAIN TESTS

namespace {

// --- trainer GEMM benchmark (test_cuda_ops --bench-train-gemm [M]): the GPU trainer's bf16
// tensor-core GEMM (f32 operands rounded as staged) against cuBLAS on the same f32 operands with
// CUBLAS_COMPUTE_32F_FAST_16BF, and the f32 SIMT kernel, on the 2B model's FFN products for a
// micro-batch of M tokens: forward, input gradient and weight gradient (operands transposed).
// Timing, plus each result's relative difference from cuBLAS's.
int bench_train_gemm(int64_t M) {
  std::string why;
  const bool cublas = Cublas::available(&why);
  std::printf("bench-train-gemm: %s; cuBLAS %s\n", cuda_status().devices[0].name.c_str(),
              cublas ? Cublas::library().c_str() : ("absent: " + why).c_str());
  struct Shape {
    const char* name;
    int64_t M, N, K;
    bool ta, tb;  // A stored [K, M]; B stored [N, K]
  };
  const Shape shapes[] = {{"gate fwd   x[M,2048] . Wg[5632,2048]^T", M, 5632, 2048, false, true},
                          {"down fwd   h[M,5632] . Wd[2048,5632]^T", M, 2048, 5632, false, true},
                          {"input grad dG[M,5632] . Wg[5632,2048] ", M, 2048, 5632, false, false},
                          {"weight grad dG^T[5632,M] . x[M,2048]  ", 5632, 2048, M, true, false}};
  for (const Shape& sh : shapes) {
    const std::vector<float> ha = random_vec(static_cast<size_t>(sh.M * sh.K), 1.0),
                             hb = random_vec(static_cast<size_t>(sh.K * sh.N), 1.0);
    DeviceBuffer A = to_device(ha.data(), ha.size() * 4), B = to_device(hb.data(), hb.size() * 4);
    DeviceBuffer C(static_cast<size_t>(sh.M * sh.N) * 4), R(static_cast<size_t>(sh.M * sh.N) * 4);
    const int64_t lda = sh.ta ? sh.M : sh.K, ldb = sh.tb ? sh.K : sh.N;
    const train::MatRef a = sh.ta ? train::MatRef{A.as<float>(), 1, lda} : train::MatRef{A.as<float>(), lda, 1};
    const train::MatRef b = sh.tb ? train::MatRef{B.as<float>(), 1, ldb} : train::MatRef{B.as<float>(), ldb, 1};
    const double tflop = 2.0 * sh.M * sh.N * sh.K / 1e12;
    double ref = 0;
    if (cublas) {
      ref = median_ms(2, 5, [&] {
        Cublas::gemm_f32_fast_bf16(A.as<float>(), lda, sh.ta, B.as<float>(), ldb, sh.tb, sh.M, sh.N, sh.K, R.as<float>(), sh.N);
      });
      std::printf("  %s M=%lld  cuBLAS fast-bf16 %8.3f ms  %6.1f TFLOP/s\n", sh.name, (long long)M, ref, tflop / ref * 1e3);
    }
    for (const train::MatmulPrecision p : {train::MatmulPrecision::Bf16, train::MatmulPrecision::F32}) {
      const train::MatmulScope scope(p);
      const double ms = median_ms(p == train::MatmulPrecision::F32 ? 1 : 2, p == train::MatmulPrecision::F32 ? 2 : 5,
                                  [&] { train::gemm_f32(sh.M, sh.N, sh.K, a, b, C.as<float>(), sh.N); });
      double diff = -1;
      if (cublas) {
        std::vector<float> got(static_cast<size_t>(sh.M * sh.N)), want(got.size());
        download(got.data(), C.data(), got.size() * 4);
        download(want.data(), R.data(), want.size() * 4);
        const std::vector<double> w(want.begin(), want.end());
        diff = check::rel_error(got.data(), w.data(), w.size());
      }
      std::printf("  %s M=%lld  ours %-11s %8.3f ms  %6.1f TFLOP/s  %.3fx cuBLAS  (rel diff %.2e)\n", sh.name,
                  (long long)M, p == train::MatmulPrecision::Bf16 ? "bf16 mma" : "f32 simt", ms, tflop / ms * 1e3,
                  ref > 0 ? ref / ms : 0.0, diff);
    }
  }
  return 0;
}

// --- attention (kernel_policy.h AttentionKernel: the tiled prefill kernel is unverified) ----------

void test_attention() {
  const int64_t shapes[][5] = {
      // T, pos0, n_heads, n_kv_heads, head_dim
      {1, 0, 2, 1, 64},     {1, 45, 4, 2, 37},    {7, 0, 4, 2, 64},     {7, 40, 3, 1, 37},
      {33, 0, 4, 2, 64},    {33, 29, 6, 3, 37},   {300, 0, 4, 2, 64},   {300, 70, 2, 1, 37},
      {40, 5, 2, 2, 256},   {65, 0, 2, 1, 130},   {33, 3, 2, 2, 1},
      {1, 0, 2, 1, 8},      {3, 290, 4, 1, 256},  // decode, MQA, the widest head, a long context
      {70, 0, 6, 3, 130},   {9, 40, 4, 4, 64},    // prefill, GQA, head_dim with a tail; a chunk after a prefix
      // the tensor-core kernel: several query and key tiles, ragged ends, a prefix, GQA, hd 128
      {200, 0, 4, 2, 64},   {130, 77, 2, 1, 128}, {64, 0, 2, 2, 128},   {1, 0, 2, 2, 128},
  };
  for (const auto& s : shapes) test_attention_case(s[0], s[1], s[2], s[3], s[4]);
}

}  // namespace

int main(int argc, char** argv) {
  const CudaStatus s = cuda_status();
  if (!s.usable) {
    std::printf("test_cuda_ops: skipped: %s\n", s.reason.c_str());
    return kSkip;
  }
  check::test_seed();
  if (argc > 1 && std::strcmp(argv[1], "--bench-train-gemm") == 0) {  // [M]: timing and differences only
    try {
      require_device();
      return bench_train_gemm(argc > 2 ? std::atoll(argv[2]) : 8192);
    } catch (const std::exception& e) {
      std::printf("bench-train-gemm: %s\n", e.what());
      return 1;
    }
  }
  if (argc > 1 && std::strcmp(argv[1], "--bench-gemm") == 0) {  // [M]: timing only, no checks
    try {
      require_device();
      return bench_gemm(argc > 2 ? std::atoll(argv[2]) : 131072);
    } catch (const std::exception& e) {
      std::printf("bench-gemm: %s\n", e.what());
      return 1;
    }
  }
  try {
    require_device();
    std::printf("test_cuda_ops: %s\n", s.devices.empty() ? "?" : s.devices[0].name.c_str());
    std::string why;
    if (!Cublas::available(&why)) std::printf("  cuBLAS comparison skipped: %s\n", why.c_str());
    test_gemm();
    test_twell_gate(300, 64, 1000, 256, 8, 0.03, 5);
    test_twell_gate(7, 40, 300, 128, 8, 0.05, 3);
    test_twell_gate(130, 72, 700, 64, 4, 0.05, 4);
    test_twell_gate(1, 16, 100, 32, 2, 0.2, 0);
    // The paper's K = 2048 with M and F off the tiles, bias, overflowing tiles; every tile width.
    test_twell_gate(1000, 2048, 700, 256, 8, 0.03, 5, true);
    test_twell_gate(300, 2048, 600, 128, 8, 0.05, 3, true);
    test_twell_gate(257, 72, 1000, 64, 8, 0.05, 4, true);
    test_twell_gate(7, 40, 300, 32, 4, 0.1, 2, true);
    // The layers and the trainer with the default (verified) kernels, then with the unverified
    // ones allowed (wgmma GEMM inside the layers, auto-tuned up+down, two-kernel decode).
    for (bool unverified : {false, true}) {
      set_unverified_kernels(unverified);
      std::printf("  layers and trainer, unverified kernels %s\n", unverified ? "on" : "off");
      test_layers();
      test_hybrid();
      test_models();
    }
    set_unverified_kernels(false);
    test_attention();
    traintest::test_training();
  } catch (const std::exception& e) {
    CHECK(false, "exception: %s", e.what());
  }
  return check::finish("test_cuda_ops");
}
#endif
