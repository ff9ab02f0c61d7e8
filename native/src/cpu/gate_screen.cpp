// Screened gate for the sparse decode (gate_screen.h; docs/runtime.md, "Screened gate
// (decode)"): the int8 copy of the gate is built once per layer; each decode call streams it
// (about half the bf16 gate's bytes), keeps the rows whose bound does not rule them out, and
// computes those rows exactly with the decode GEMV's row kernels (GemvRowsTask, chunk by chunk
// inside the screen's parallel region: the same kernels as the plain call, so the same bits).
#include "gate_screen.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <vector>

#include "gemv_tasks.h"
#include "huge_buffer.h"
#include "sparsellm/cpu_info.h"
#include "sparsellm/model.h"

namespace sparsellm {
namespace gate_screen_detail {
namespace {

// Portable kernel: one row at a time, four partial sums.
void p_rows(const ScreenArgs& a, const int8_t* Q, int64_t ldq, int64_t n0, int64_t n1, float* dot, int64_t ldd) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* q = Q + n * ldq;
    for (int m = 0; m < a.M; ++m) {
      const float* x = a.x + m * a.ldx;
      float s[4] = {0, 0, 0, 0};
      int64_t k = 0;
      for (; k + 4 <= a.K; k += 4)
        for (int j = 0; j < 4; ++j) s[j] += x[k + j] * static_cast<float>(q[k + j]);
      for (; k < a.K; ++k) s[0] += x[k] * static_cast<float>(q[k]);
      dot[m * ldd + n] = (s[0] + s[1]) + (s[2] + s[3]);
    }
  }
}

RowsI8 pick() {
  switch (active_isa()) {
    case Isa::Avx512: return screen_kernel_avx512();
    case Isa::Avx2: return screen_kernel_avx2();
    default: return p_rows;
  }
}

// The screen's row chunks, handed out in order to the threads as they come: a quarter of the
// rows left each (so the first ones are long contiguous streams), down to 64 rows, multiples of
// 16. The short chunks at the end even out the threads' finish: with 8 equal chunks a thread
// the host slowed held the other up by most of a chunk (the screen took ~4% longer). They
// depend on F only, never on the thread count.
std::vector<int64_t> screen_chunks(int64_t F) {
  std::vector<int64_t> b{0};
  for (int64_t r = 0; r < F;) {
    const int64_t size = (std::max<int64_t>(64, (F - r) / 4) + 15) / 16 * 16;
    r = std::min(F, r + size);
    b.push_back(r);
  }
  if (b.size() == 1) b.push_back(0);  // F = 0: one empty chunk
  return b;
}

std::atomic<double> g_bound_scale{1.0};
std::atomic<int64_t> g_calls{0}, g_fallbacks{0}, g_rows{0}, g_cands{0};

// SPARSELLM_GATE_SCREEN_STATS=1: one line on stderr at exit with the counters.
struct ExitReport {
  ~ExitReport() {
    const char* v = std::getenv("SPARSELLM_GATE_SCREEN_STATS");
    if (!v || std::strcmp(v, "1") != 0) return;
    const int64_t c = g_calls.load(), r = g_rows.load(), k = g_cands.load();
    std::fprintf(stderr, "gate screen: %lld calls, %lld fallbacks, candidate rows %lld of %lld screened (%.3f%%)\n",
                 (long long)c, (long long)g_fallbacks.load(), (long long)k, (long long)r,
                 r ? 100.0 * static_cast<double>(k) / static_cast<double>(r) : 0.0);
  }
} g_exit_report;

}  // namespace
}  // namespace gate_screen_detail

using namespace gate_screen_detail;

void gate_screen_set_bound_scale(double scale) { g_bound_scale.store(scale); }

GateScreenCounters gate_screen_counters() {
  GateScreenCounters c;
  c.calls = g_calls.load();
  c.fallbacks = g_fallbacks.load();
  c.rows = g_rows.load();
  c.candidates = g_cands.load();
  return c;
}

GateScreen::GateScreen(const WeightView& w) : F_(w.rows), K_(w.cols) {
  if (w.dtype != DType::F32 && w.dtype != DType::BF16) throw std::invalid_argument("GateScreen: W must be f32 or bf16");
  if (F_ < 0 || K_ < 1 || w.ld < K_ || (F_ > 0 && !w.data)) throw std::invalid_argument("GateScreen: bad shape");
  ldq_ = (K_ + 63) / 64 * 64;
  const size_t qbytes = static_cast<size_t>(std::max<int64_t>(1, F_ + 1) * ldq_);  // + one row: prefetch target
  q_mem_ = detail::huge_buffer(qbytes);
  q_ = reinterpret_cast<int8_t*>(q_mem_.get());
  std::memset(q_ + F_ * ldq_, 0, static_cast<size_t>(ldq_));
  bounds_ = screen_chunks(F_);
  chunk_cands_.assign(bounds_.size() - 1, 0);
  scale_.reset(new float[static_cast<size_t>(std::max<int64_t>(1, F_))]);
  resid_.reset(new float[static_cast<size_t>(std::max<int64_t>(1, F_))]);
  dot_.reset(new float[static_cast<size_t>(std::max<int64_t>(1, 4 * F_))]);
  flag_.reset(new uint8_t[static_cast<size_t>(std::max<int64_t>(1, F_))]);
  cand_.reset(new int32_t[static_cast<size_t>(std::max<int64_t>(1, F_))]);
  const bool bf = w.dtype == DType::BF16;
  double mx = 0;
#pragma omp parallel num_threads(num_threads()) reduction(max : mx)
  {
    std::vector<double> row(static_cast<size_t>(K_));
#pragma omp for schedule(static)
    for (int64_t j = 0; j < F_; ++j) {
      int8_t* q = q_ + j * ldq_;
      std::memset(q, 0, static_cast<size_t>(ldq_));
      // Straight-line loops the compiler vectorises (this runs once per layer at the first
      // decode call: with a libm call per weight it took ~60 ms per layer of the proxy).
      double a = 0, z = 0;  // z = Σ v·0 is 0 unless some weight is inf or NaN
      double* rw = row.data();
      if (bf) {
        const uint16_t* src = static_cast<const uint16_t*>(w.data) + j * w.ld;
#pragma omp simd reduction(max : a) reduction(+ : z)
        for (int64_t k = 0; k < K_; ++k) {
          const double v = bf16_to_f32(src[k]);
          rw[k] = v;
          z += v * 0.0;
          a = std::max(a, std::fabs(v));
        }
      } else {
        const float* src = static_cast<const float*>(w.data) + j * w.ld;
#pragma omp simd reduction(max : a) reduction(+ : z)
        for (int64_t k = 0; k < K_; ++k) {
          const double v = src[k];
          rw[k] = v;
          z += v * 0.0;
          a = std::max(a, std::fabs(v));
        }
      }
      if (z != 0.0 || !std::isfinite(a)) {  // never screened out (the bound is infinite)
        scale_[j] = 0.f;
        resid_[j] = INFINITY;
        continue;
      }
      const float s = static_cast<float>(a / 127.0);
      // q_k = round(v_k / s) by the 1.5·2^52 addend (ties to even, exact for |v_k / s| < 2^51),
      // clamped to ±127. Any integer q would do: the residual below is computed from the q chosen,
      // in double, where s·q and v − s·q are exact; the sum of squares is rounded up after.
      const double inv = s > 0.f ? 1.0 / static_cast<double>(s) : 0.0, sd = s;
      constexpr double kRound = 6755399441055744.0;
      double r2 = 0;
#pragma omp simd reduction(+ : r2)
      for (int64_t k = 0; k < K_; ++k) {
        const double v = rw[k];
        double t = (v * inv + kRound) - kRound;
        t = t > 127.0 ? 127.0 : t < -127.0 ? -127.0 : t;
        q[k] = static_cast<int8_t>(t);
        const double e = v - sd * t;
        r2 += e * e;
      }
      const double r = std::sqrt(r2) * (1 + 1e-12);
      float rf = static_cast<float>(r);
      if (static_cast<double>(rf) < r) rf = std::nextafter(rf, INFINITY);
      scale_[j] = s;
      resid_[j] = rf;
      mx = std::max(mx, 127.0 * static_cast<double>(s));
    }
  }
  max_abs_ = mx;
}

GateScreen::~GateScreen() = default;

size_t GateScreen::bytes() const { return static_cast<size_t>((F_ + 1) * ldq_ + 8 * F_); }

int64_t GateScreen::gate(const WeightView& w, const float* x, int64_t ldx, int64_t M, float* G, int64_t ldg,
                         double max_fraction) {
  g_calls.fetch_add(1, std::memory_order_relaxed);
  auto full = [&]() -> int64_t {
    g_fallbacks.fetch_add(1, std::memory_order_relaxed);
    gemv(x, ldx, M, w, G, ldg);
    return -1;
  };
  if (M < 1 || M > 4 || w.rows != F_ || w.cols != K_ || ldx < K_ || (M > 1 && ldg < F_)) return full();
  if (F_ == 0) return 0;
  if (skip_ > 0) {
    --skip_;
    gemv(x, ldx, M, w, G, ldg);
    return -1;
  }
  // Per-token norms (float64) and the bound's coefficients.
  const double u23 = std::ldexp(1.0, -23);
  const double gam = static_cast<double>(K_ + 16) * u23;  // γ_{K+16} with slack
  const double tiny = static_cast<double>(K_ + 16) * std::ldexp(1.0, -100);  // underflow / flushed subnormals
  const double bs = g_bound_scale.load(std::memory_order_relaxed);
  double c2[4], cs[4], c0[4];
  for (int64_t m = 0; m < M; ++m) {
    double n1 = 0, n2 = 0;
    for (int64_t k = 0; k < K_; ++k) {
      const double v = x[m * ldx + k];
      n1 += std::fabs(v);
      n2 += v * v;
    }
    if (!std::isfinite(n1) || n1 > 1e30 || n1 * std::max(1.0, max_abs_) > 1e35) return full();
    c2[m] = std::sqrt(n2) * (1 + 1e-12) * bs;
    cs[m] = 2 * 127 * gam * n1 * (1 + 1e-6) * bs + 128 * tiny * bs;
    c0[m] = tiny * bs;
  }
  // One parallel region: each chunk of rows gets its int8 dots, the per-row test, and its
  // candidates' exact gates (the GEMV's own row kernels on the chunk's candidate list, so the
  // latency-bound scattered rows of one thread overlap the other thread's streaming, with no
  // second region to wait for). A chunk's candidates go to cand[bounds_[c] ..], ascending.
  const RowsI8 kern = pick();
  ScreenArgs a;
  a.x = x;
  a.ldx = ldx;
  a.M = static_cast<int>(M);
  a.K = K_;
  a.pf = 1024;
  const gemv_detail::GemvRowsTask exact(x, ldx, M, w);
  const int threads = std::max(1, num_threads());
  const int64_t chunks = static_cast<int64_t>(bounds_.size()) - 1;
  float* dot = dot_.get();
  uint8_t* flag = flag_.get();
  int32_t* cand = cand_.get();
  const float* sc = scale_.get();
  const float* rs = resid_.get();
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t r0 = bounds_[static_cast<size_t>(c)], r1 = bounds_[static_cast<size_t>(c) + 1];
    kern(a, q_, ldq_, r0, r1, dot, F_);
    // Kept unless g̃ + bound <= 0 for every token (NaN or inf: kept). Token-major loops the
    // compiler vectorises.
    for (int64_t m = 0; m < M; ++m) {
      const double c2m = c2[m], csm = cs[m], c0m = c0[m];
      const float* dm = dot + m * F_;
#pragma omp simd
      for (int64_t j = r0; j < r1; ++j) {
        const double s = sc[j];
        const double bound = (static_cast<double>(rs[j]) * c2m + s * csm + c0m) * (1 + 1e-12);
        const uint8_t keep = !(s * static_cast<double>(dm[j]) + bound <= 0);
        flag[j] = m == 0 ? keep : static_cast<uint8_t>(flag[j] | keep);
      }
    }
    int64_t n = 0;
    for (int64_t j = r0; j < r1; ++j)
      if (flag[j]) cand[r0 + n++] = static_cast<int32_t>(j);
    chunk_cands_[static_cast<size_t>(c)] = n;
    // Rows ruled out: 0 (ReLU of the exact value is 0 as well); candidates: exact.
    for (int64_t m = 0; m < M; ++m) std::memset(G + m * ldg + r0, 0, sizeof(float) * static_cast<size_t>(r1 - r0));
    exact.run(cand + r0, n, G, ldg);
  }
  int64_t nc = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t n = chunk_cands_[static_cast<size_t>(c)];
    std::memmove(cand + nc, cand + bounds_[static_cast<size_t>(c)], sizeof(int32_t) * static_cast<size_t>(n));
    nc += n;
  }
  g_rows.fetch_add(F_, std::memory_order_relaxed);
  g_cands.fetch_add(nc, std::memory_order_relaxed);
  if (static_cast<double>(nc) > max_fraction * static_cast<double>(F_)) {
    // Too many candidates for the screen to pay (their exact gates are already in G; the plain
    // GEMV replaces them, as the contract says): back off after repeated misses.
    if (++misses_ >= kMaxMisses) {
      misses_ = 0;
      skip_ = kSkip;
    }
    return full();
  }
  misses_ = 0;
  return nc;
}

}  // namespace sparsellm
