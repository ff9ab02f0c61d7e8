// The decode GEMV (gemv / gemv_multi in sparsellm/model.h) against a float64 reference on
// fresh random inputs of awkward sizes: rows not a multiple of the kernels' 4 streams, K not a
// multiple of the vector width (odd, below one vector, one above), 1 to 7 tokens (groups of 4
// plus a rest), a leading dimension larger than K, several matrices in one call, bf16 and f32
// weights, every ISA the CPU has, 1 and 2 threads.
//
// Tolerance: each output is a sum of K f32 products; the portable kernel keeps 4 partial sums
// of K/4 terms, the vector kernels 16 (or 8) lanes × even/odd of K/32 terms, then a short
// reduction. A sum of n terms in f32 is within (n + log2 16) · 2^-24 · Σ|terms| of the exact
// value, so |y − ref| ≤ (K/4 + 8) · 6e-8 · Σ_k |x_k w_k| bounds every order used. A wrong row,
// column, token or dropped tail is off by about Σ|x w| and fails. Results must also be
// bit-identical between 1 and 2 threads (each row is computed by the same code whichever
// thread takes it), and rows outside the outputs must stay untouched. Also listed rows only
// (gemv_rows) and the fused dense up+down of the FFN decode (gemv_updown), where the ISA has it.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "check.h"
#include "sparsellm/cpu_info.h"
#include "sparsellm/model.h"

using namespace sparsellm;

namespace {

std::mt19937_64& rng() {
  static std::mt19937_64 r(check::test_seed());
  return r;
}

std::vector<float> uniform(size_t n) {
  std::uniform_real_distribution<float> d(-1.f, 1.f);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng());
  return v;
}

struct Mat {
  int64_t N, K, ld;
  DType dt;
  std::vector<float> f;      // f32 storage (or the widened bf16 values)
  std::vector<uint16_t> h;   // bf16 storage
  WeightView view() const {
    return {dt == DType::BF16 ? static_cast<const void*>(h.data()) : static_cast<const void*>(f.data()), dt, N, K, ld};
  }
  double at(int64_t n, int64_t k) const { return f[static_cast<size_t>(n * ld + k)]; }
};

Mat make(int64_t N, int64_t K, int64_t ld, DType dt) {
  Mat m{N, K, ld, dt, uniform(static_cast<size_t>(N * ld)), {}};
  if (dt == DType::BF16) {
    m.h.resize(m.f.size());
    for (size_t i = 0; i < m.f.size(); ++i) {
      m.h[i] = f32_to_bf16(m.f[i]);
      m.f[i] = bf16_to_f32(m.h[i]);
    }
  }
  return m;
}

const float kSentinel = 12345.f;

// Runs gemv_multi over `mats` for M tokens and checks every output; returns the outputs.
std::vector<std::vector<float>> run_case(const std::vector<Mat>& mats, int64_t M, int64_t K, const char* what) {
  const int64_t ldx = K + 3;
  const std::vector<float> x = uniform(static_cast<size_t>(M * ldx));
  std::vector<std::vector<float>> ys;
  std::vector<GemvOutput> outs;
  for (const Mat& m : mats) {
    const int64_t ldy = m.N + 2;
    ys.emplace_back(static_cast<size_t>(M * ldy), kSentinel);
    outs.push_back({m.view(), ys.back().data(), ldy});
  }
  if (mats.size() == 1) gemv(x.data(), ldx, M, outs[0].w, outs[0].y, outs[0].ldy);
  else gemv_multi(x.data(), ldx, M, outs.data(), static_cast<int>(outs.size()));
  const double tol = (static_cast<double>(K) / 4 + 8) * 6e-8;
  for (size_t i = 0; i < mats.size(); ++i) {
    const Mat& w = mats[i];
    const int64_t ldy = outs[i].ldy;
    double worst = 0;
    bool untouched = true;
    for (int64_t t = 0; t < M; ++t) {
      for (int64_t n = 0; n < w.N; ++n) {
        double ref = 0, mag = 0;
        for (int64_t k = 0; k < K; ++k) {
          const double p = static_cast<double>(x[static_cast<size_t>(t * ldx + k)]) * w.at(n, k);
          ref += p;
          mag += std::fabs(p);
        }
        const double err = std::fabs(ys[i][static_cast<size_t>(t * ldy + n)] - ref) / (mag > 0 ? mag : 1);
        if (!(err <= worst)) worst = err;  // NaN propagates
      }
      for (int64_t n = w.N; n < ldy; ++n) untouched &= ys[i][static_cast<size_t>(t * ldy + n)] == kSentinel;
    }
    CHECK(worst <= tol, "%s: matrix %zu [%lld x %lld] M=%lld: error %.3g > %.3g of sum|x w|", what, i,
          (long long)w.N, (long long)K, (long long)M, worst, tol);
    CHECK(untouched, "%s: matrix %zu: wrote past its rows", what, i);
  }
  return ys;
}

void test_shapes(const char* isa) {
  const int64_t Ks[] = {1, 7, 31, 33, 64, 100, 257, 2061};
  const int64_t Ns[] = {1, 3, 5, 13, 37, 130};
  const int64_t Ms[] = {1, 2, 3, 4, 5, 7};
  for (DType dt : {DType::BF16, DType::F32}) {
    for (int64_t K : Ks) {
      for (int64_t N : Ns) {
        if (K * N > 70000) continue;  // keeps the float64 reference quick
        const Mat w = make(N, K, K + (N % 2 ? 5 : 0), dt);
        for (int64_t M : Ms) {
          char what[96];
          std::snprintf(what, sizeof what, "%s %s N=%lld K=%lld", isa, dt == DType::BF16 ? "bf16" : "f32", (long long)N,
                        (long long)K);
          run_case({w}, M, K, what);
        }
      }
    }
  }
  // Large enough that two threads share the rows, several matrices of different heights
  // (q/k/v-like), M = 1 and 3, both dtypes; then 1 vs 2 threads bit for bit.
  for (DType dt : {DType::BF16, DType::F32}) {
    const int64_t K = 515;
    const std::vector<Mat> mats = {make(517, K, K, dt), make(130, K, K + 16, dt), make(259, K, K, dt)};
    for (int64_t M : {1, 3}) {
      char what[96];
      std::snprintf(what, sizeof what, "%s %s multi", isa, dt == DType::BF16 ? "bf16" : "f32");
      const uint64_t state = rng()();
      set_num_threads(1);
      rng().seed(state);
      const auto one = run_case(mats, M, K, what);
      set_num_threads(2);
      rng().seed(state);
      const auto two = run_case(mats, M, K, what);
      bool same = true;
      for (size_t i = 0; i < one.size(); ++i) same &= std::memcmp(one[i].data(), two[i].data(), one[i].size() * 4) == 0;
      CHECK(same, "%s M=%lld: 1 and 2 threads differ", what, (long long)M);
    }
  }
}

// gemv_rows: listed rows (random subsets in random order, gaps, neighbours, the last row; a
// list shorter and longer than the kernels' streams) equal gemv's values bit for bit (the same
// row kernels), unlisted entries keep their sentinel; a bad index is refused.
void test_rows(const char* isa) {
  std::uniform_int_distribution<int> coin(0, 3);
  for (DType dt : {DType::BF16, DType::F32}) {
    for (int64_t K : {7, 100, 515}) {
      const int64_t N = 301, ldy = N + 3;
      const Mat w = make(N, K, K + 2, dt);
      for (int64_t M : {1, 2, 5}) {
        const int64_t ldx = K + 1;
        const std::vector<float> x = uniform(static_cast<size_t>(M * ldx));
        std::vector<float> full(static_cast<size_t>(M * ldy));
        gemv(x.data(), ldx, M, w.view(), full.data(), ldy);
        for (int trial = 0; trial < 4; ++trial) {
          std::vector<int32_t> rows;
          for (int32_t r = 0; r < N; ++r)
            if (trial == 0 ? r % 97 == 3 : coin(rng()) == 0) rows.push_back(r);
          if (trial == 3) rows.push_back(static_cast<int32_t>(N - 1));
          std::shuffle(rows.begin(), rows.end(), rng());
          std::vector<float> y(full.size(), kSentinel);
          gemv_rows(x.data(), ldx, M, w.view(), rows.data(), static_cast<int64_t>(rows.size()), y.data(), ldy);
          std::vector<char> listed(static_cast<size_t>(N), 0);
          for (int32_t r : rows) listed[static_cast<size_t>(r)] = 1;
          bool same = true, untouched = true;
          for (int64_t t = 0; t < M; ++t)
            for (int64_t n = 0; n < ldy; ++n) {
              const size_t at = static_cast<size_t>(t * ldy + n);
              if (n < N && listed[static_cast<size_t>(n)]) same &= std::memcmp(&y[at], &full[at], 4) == 0;
              else untouched &= y[at] == kSentinel;
            }
          CHECK(same, "%s gemv_rows %s K=%lld M=%lld trial %d (%zu rows): differs from gemv", isa,
                dt == DType::BF16 ? "bf16" : "f32", (long long)K, (long long)M, trial, rows.size());
          CHECK(untouched, "%s gemv_rows K=%lld M=%lld: wrote an unlisted row", isa, (long long)K, (long long)M);
        }
      }
    }
  }
  const Mat w = make(5, 8, 8, DType::BF16);
  float x[8] = {1, 2, 3, 4, 5, 6, 7, 8}, y[5];
  const int32_t bad[2] = {1, 5};
  bool threw = false;
  try {
    gemv_rows(x, 8, 1, w.view(), bad, 2, y, 5);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw, "%s gemv_rows: row index past the matrix accepted", isa);
}

// gemv_updown (dense gated up+down on the neuron-major layout) against float64, where the ISA
// has it. Error bound: u_j sums d products (≤ (d/4 + 8)·eps relative to Σ|x·U_j|), each output
// then sums F terms (≤ (F + 8)·eps): |y − ref| ≤ (d/4 + F + 16)·6e-8·Σ_j |c_j|·Σ_k|x_k U_jk|·|D_j|.
void test_updown(const char* isa) {
  if (!gemv_updown_available()) {
    UpDownView none{nullptr, DType::BF16, 4, 4, 4};
    float x[4] = {}, c[4] = {}, y[4] = {};
    CHECK(!gemv_updown(x, 4, 1, c, 4, none, nullptr, y, 4), "%s: gemv_updown claims a kernel it does not have", isa);
    return;
  }
  for (int64_t d : {1, 33, 100, 257}) {
    for (int64_t F : {1, 5, 37, 130}) {
      const int64_t ld = d + (F % 2 ? 7 : 0);
      Mat ud = make(F, 2 * ld, 2 * ld, DType::BF16);  // row j: up (ld), down (ld)
      const UpDownView view{ud.h.data(), DType::BF16, F, d, ld};
      const std::vector<float> bias = uniform(static_cast<size_t>(d));
      // listed: gemv_updown_rows over a random subset in random order (the sparse decode), with
      // a poisonous coefficient on every unlisted neuron (it must not be read).
      for (int64_t M : {1, 3, 4, 6})
        for (bool listed : {false, true}) {
        const int64_t ldx = d + 1, ldc = F + 2, ldy = d + 3;
        const std::vector<float> x = uniform(static_cast<size_t>(M * ldx));
        std::vector<float> coef = uniform(static_cast<size_t>(M * ldc));
        for (size_t i = 0; i < coef.size(); i += 3) coef[i] = 0.f;  // ReLU-like zeros
        std::vector<char> in(static_cast<size_t>(F), 1);
        std::vector<int32_t> rows;
        if (listed) {
          std::uniform_int_distribution<int> coin(0, 2);
          for (int32_t j = 0; j < F; ++j) {
            in[static_cast<size_t>(j)] = coin(rng()) == 0;
            if (in[static_cast<size_t>(j)]) rows.push_back(j);
            else
              for (int64_t m = 0; m < M; ++m) coef[static_cast<size_t>(m * ldc + j)] = 1e30f;
          }
          std::shuffle(rows.begin(), rows.end(), rng());
        }
        std::vector<float> y(static_cast<size_t>(M * ldy), kSentinel);
        const bool with_bias = M % 2 == 1;
        const float* b = with_bias ? bias.data() : nullptr;
        CHECK(listed ? gemv_updown_rows(x.data(), ldx, M, coef.data(), ldc, view, rows.data(),
                                        static_cast<int64_t>(rows.size()), b, y.data(), ldy)
                     : gemv_updown(x.data(), ldx, M, coef.data(), ldc, view, b, y.data(), ldy),
              "%s: gemv_updown refused", isa);
        const double tol = (static_cast<double>(d) / 4 + static_cast<double>(F) + 16) * 6e-8;
        double worst = 0;
        bool untouched = true;
        for (int64_t m = 0; m < M; ++m) {
          std::vector<double> u(static_cast<size_t>(F)), umag(static_cast<size_t>(F));
          for (int64_t j = 0; j < F; ++j)
            for (int64_t k = 0; k < d; ++k) {
              const double p = static_cast<double>(x[static_cast<size_t>(m * ldx + k)]) * ud.at(j, k);
              u[static_cast<size_t>(j)] += p;
              umag[static_cast<size_t>(j)] += std::fabs(p);
            }
          for (int64_t k = 0; k < d; ++k) {
            double ref = with_bias ? bias[static_cast<size_t>(k)] : 0.0, mag = std::fabs(ref);
            for (int64_t j = 0; j < F; ++j) {
              if (!in[static_cast<size_t>(j)]) continue;
              const double c = coef[static_cast<size_t>(m * ldc + j)];
              ref += c * u[static_cast<size_t>(j)] * ud.at(j, ld + k);
              mag += std::fabs(c) * umag[static_cast<size_t>(j)] * std::fabs(ud.at(j, ld + k));
            }
            const double err = std::fabs(y[static_cast<size_t>(m * ldy + k)] - ref) / (mag > 0 ? mag : 1);
            if (!(err <= worst)) worst = err;
          }
          for (int64_t k = d; k < ldy; ++k) untouched &= y[static_cast<size_t>(m * ldy + k)] == kSentinel;
        }
        CHECK(worst <= tol, "%s updown%s d=%lld F=%lld M=%lld: error %.3g > %.3g", isa, listed ? " (listed)" : "",
              (long long)d, (long long)F, (long long)M, worst, tol);
        CHECK(untouched, "%s updown: wrote past d", isa);
        }
    }
  }
  // The same inputs on 1 and 2 threads give bit-identical outputs (fixed chunks summed in order).
  {
    const int64_t d = 300, F = 517, ld = d;
    Mat ud = make(F, 2 * ld, 2 * ld, DType::BF16);
    const UpDownView view{ud.h.data(), DType::BF16, F, d, ld};
    const std::vector<float> x = uniform(static_cast<size_t>(2 * d)), coef = uniform(static_cast<size_t>(2 * F));
    std::vector<float> y1(static_cast<size_t>(2 * d)), y2(y1.size());
    const int keep = num_threads();
    set_num_threads(1);
    gemv_updown(x.data(), d, 2, coef.data(), F, view, nullptr, y1.data(), d);
    set_num_threads(2);
    gemv_updown(x.data(), d, 2, coef.data(), F, view, nullptr, y2.data(), d);
    CHECK(std::memcmp(y1.data(), y2.data(), y1.size() * 4) == 0, "%s updown: 1 and 2 threads differ", isa);
    std::vector<int32_t> rows;
    for (int32_t j = F - 1; j >= 0; j -= 7) rows.push_back(j);  // 74 scattered neurons, descending
    const int64_t n = static_cast<int64_t>(rows.size());
    set_num_threads(1);
    gemv_updown_rows(x.data(), d, 2, coef.data(), F, view, rows.data(), n, nullptr, y1.data(), d);
    set_num_threads(2);
    gemv_updown_rows(x.data(), d, 2, coef.data(), F, view, rows.data(), n, nullptr, y2.data(), d);
    set_num_threads(keep);
    CHECK(std::memcmp(y1.data(), y2.data(), y1.size() * 4) == 0, "%s updown (listed): 1 and 2 threads differ", isa);
  }
}

}  // namespace

int main() {
  const Isa best = active_isa();
  for (Isa isa : {Isa::Portable, Isa::Avx2, Isa::Avx512}) {
    if (static_cast<int>(isa) > static_cast<int>(best)) continue;
    set_isa_limit(isa);
    for (int threads : {1, 2}) {
      set_num_threads(threads);
      test_shapes(isa_name(isa));
      test_rows(isa_name(isa));
      test_updown(isa_name(isa));
    }
    std::fprintf(stderr, "%s (%s): done\n", isa_name(isa), gemv_kernel_name());
  }
  set_isa_limit(best);
  // Bad arguments are refused.
  const Mat w = make(4, 8, 8, DType::BF16);
  float x[16] = {}, y[16];
  bool threw = false;
  try {
    gemv(x, 4, 1, w.view(), y, 4);  // ldx < K
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw, "ldx < K accepted");
  return check::finish("test_gemv");
}
