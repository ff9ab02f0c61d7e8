// Dense GEMM against a float64 reference: C[M, N] = A[M, K] · Wᵀ, W [N, K] f32 or bf16.
//
// Tolerance: each output is an f32 sum of K products, so its rounding error grows like
// eps_f32 · sqrt(K) for random-sign data (eps_f32 ≈ 6e-8); we allow a relative Frobenius error of
// 2e-6 · sqrt(K) (~30x headroom over the typical error, far below any indexing bug, which gives O(1)).
// With bf16 weights the reference is computed on the SAME bf16-rounded weights (widened exactly), so
// the tolerance stays the f32 one. Every ISA path the CPU has is forced in turn via set_isa_limit.
#include <algorithm>
#include <cstring>
#include <mutex>

#include "check.h"
#include "sparsellm/cpu_info.h"
#include "sparsellm/gemm.h"

using namespace sparsellm;

namespace {

std::mt19937_64 rng(check::test_seed());

struct Case {
  int64_t M, K, N;
  DType dtype;
  int64_t pad_a, pad_w, pad_c;  // extra leading-dimension padding
};

struct Data {
  std::vector<float> A;
  std::vector<float> Wf;      // f32 weights (or the widened bf16 ones)
  std::vector<uint16_t> Wh;   // bf16 bits
  std::vector<double> ref;    // [M, N]
  std::vector<double> mag;    // [M, N]: Σ_k |A[m,k]·W[n,k]|, the scale f32 rounding errors follow
  int64_t lda, ldw;
  WeightView view() const;
  DType dtype;
  int64_t M, K, N;
};

WeightView Data::view() const {
  WeightView w;
  w.dtype = dtype;
  w.data = dtype == DType::F32 ? static_cast<const void*>(Wf.data()) : static_cast<const void*>(Wh.data());
  w.rows = N;
  w.cols = K;
  w.ld = ldw;
  return w;
}

Data make(const Case& c) {
  Data d;
  d.M = c.M; d.K = c.K; d.N = c.N; d.dtype = c.dtype;
  d.lda = c.K + c.pad_a;
  d.ldw = c.K + c.pad_w;
  std::normal_distribution<float> nd(0.f, 1.f);
  d.A.resize(static_cast<size_t>(std::max<int64_t>(1, c.M * d.lda)));
  for (auto& x : d.A) x = nd(rng);
  d.Wf.resize(static_cast<size_t>(std::max<int64_t>(1, c.N * d.ldw)));
  for (auto& x : d.Wf) x = nd(rng);
  if (c.dtype == DType::BF16) {
    d.Wh.resize(d.Wf.size());
    for (size_t i = 0; i < d.Wf.size(); ++i) {
      d.Wh[i] = f32_to_bf16(d.Wf[i]);
      d.Wf[i] = bf16_to_f32(d.Wh[i]);  // the reference uses exactly the rounded weights
    }
  }
  d.ref.assign(static_cast<size_t>(c.M * c.N), 0.0);
  d.mag.assign(static_cast<size_t>(c.M * c.N), 0.0);
  for (int64_t m = 0; m < c.M; ++m)
    for (int64_t n = 0; n < c.N; ++n) {
      double s = 0, a = 0;
      for (int64_t k = 0; k < c.K; ++k) {
        const double p = static_cast<double>(d.A[m * d.lda + k]) * d.Wf[n * d.ldw + k];
        s += p;
        a += std::fabs(p);
      }
      d.ref[m * c.N + n] = s;
      d.mag[m * c.N + n] = a;
    }
  return d;
}

// Error measured against Σ|a·w| rather than |Σ a·w|: a dot product that cancels to near zero
// (likely for a single element, M = N = 1) has an ill-conditioned relative error, while f32
// accumulation error scales with the magnitudes summed: typically ~6e-8·sqrt(K)·Σ|a·w|. A missing
// or doubled term moves the result by ~Σ|a·w|/K, far above this bound.
double tolerance(int64_t K) { return 1e-6 * std::sqrt(static_cast<double>(std::max<int64_t>(K, 1))); }

double gemm_error(const std::vector<float>& C, const Data& d) {
  double num = 0, den = 0;
  for (size_t i = 0; i < C.size(); ++i) {
    if (std::isnan(C[i])) return INFINITY;
    const double e = static_cast<double>(C[i]) - d.ref[i];
    num += e * e;
    den += d.mag[i] * d.mag[i];
  }
  return den == 0 ? std::sqrt(num) : std::sqrt(num / den);
}

// Runs gemm and returns C [M, N] (packed), checking that the padding of C is untouched.
std::vector<float> run_gemm(const Data& d, int64_t pad_c, bool* pad_ok) {
  const int64_t ldc = d.N + pad_c;
  const float sentinel = 12345.f;
  std::vector<float> C(static_cast<size_t>(std::max<int64_t>(1, d.M * ldc)), sentinel);
  gemm(d.A.data(), d.lda, d.M, d.view(), C.data(), ldc);
  std::vector<float> out(static_cast<size_t>(d.M * d.N));
  *pad_ok = true;
  for (int64_t m = 0; m < d.M; ++m) {
    for (int64_t n = 0; n < d.N; ++n) out[m * d.N + n] = C[m * ldc + n];
    for (int64_t n = d.N; n < ldc; ++n)
      if (C[m * ldc + n] != sentinel) *pad_ok = false;
  }
  return out;
}

// Runs gemm_epilogue, copying every block into C and counting how often each element is written.
std::vector<float> run_epilogue(const Data& d, int64_t n_align, bool* cover_ok, bool* align_ok) {
  std::vector<float> C(static_cast<size_t>(d.M * d.N), 0.f);
  std::vector<int> hits(static_cast<size_t>(d.M * d.N), 0);
  std::mutex mu;
  bool aligned = true;
  GemmOptions opt;
  opt.n_align = n_align;
  gemm_epilogue(d.A.data(), d.lda, d.M, d.view(),
                [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1, float* c, int64_t ldc, int) {
                  std::lock_guard<std::mutex> lock(mu);
                  if (m0 < 0 || m1 > d.M || m0 >= m1 || n0 < 0 || n1 > d.N || n0 >= n1 || ldc < n1 - n0) {
                    aligned = false;
                    return;
                  }
                  if (n_align > 0 && (n0 % n_align != 0 || (n1 != d.N && n1 % n_align != 0))) aligned = false;
                  for (int64_t m = m0; m < m1; ++m)
                    for (int64_t n = n0; n < n1; ++n) {
                      C[m * d.N + n] = c[(m - m0) * ldc + (n - n0)];
                      ++hits[m * d.N + n];
                    }
                },
                opt);
  *cover_ok = std::all_of(hits.begin(), hits.end(), [](int h) { return h == 1; });
  *align_ok = aligned;
  return C;
}

void check_case(const Case& c, const Data& d, const char* isa) {
  const double tol = tolerance(c.K);
  const char* dt = c.dtype == DType::F32 ? "f32" : "bf16";
  bool pad_ok = false;
  std::vector<float> C = run_gemm(d, c.pad_c, &pad_ok);
  double err = gemm_error(C, d);
  CHECK(err <= tol, "%s gemm M=%lld K=%lld N=%lld %s: err/Σ|a·w| %.3g > %.3g", isa, (long long)c.M, (long long)c.K,
        (long long)c.N, dt, err, tol);
  CHECK(pad_ok, "%s gemm M=%lld N=%lld: wrote into the padding of C (ldc > N)", isa, (long long)c.M, (long long)c.N);

  for (int64_t n_align : {int64_t(0), int64_t(16), int64_t(96)}) {
    bool cover_ok = false, align_ok = false;
    std::vector<float> E = run_epilogue(d, n_align, &cover_ok, &align_ok);
    double e = gemm_error(E, d);
    CHECK(cover_ok, "%s epilogue M=%lld N=%lld n_align=%lld: blocks do not cover C exactly once", isa,
          (long long)c.M, (long long)c.N, (long long)n_align);
    CHECK(align_ok, "%s epilogue M=%lld N=%lld n_align=%lld: a block is out of range or misaligned", isa,
          (long long)c.M, (long long)c.N, (long long)n_align);
    CHECK(e <= tol, "%s epilogue M=%lld K=%lld N=%lld %s: err/Σ|a·w| %.3g > %.3g", isa, (long long)c.M,
          (long long)c.K, (long long)c.N, dt, e, tol);
  }
}

std::vector<Case> cases() {
  std::vector<Case> out;
  for (DType dt : {DType::F32, DType::BF16}) {
    for (int64_t M : {1, 2, 7, 33, 130})
      for (int64_t K : {1, 37, 255})
        for (int64_t N : {1, 17, 300}) out.push_back({M, K, N, dt, 0, 0, 0});
    // Leading dimensions larger than the widths.
    out.push_back({5, 64, 40, dt, 3, 5, 7});
    out.push_back({33, 129, 65, dt, 16, 1, 9});
    // Shapes crossing the cache blocks in K and N, and a decode row over a wide K.
    out.push_back({45, 1100, 530, dt, 0, 0, 0});
    out.push_back({3, 2048, 333, dt, 0, 8, 0});
    out.push_back({8, 700, 1000, dt, 1, 0, 3});
  }
  return out;
}

}  // namespace

int main() {
  const CpuInfo& info = cpu_info();
  const std::vector<Case> all = cases();
  std::vector<Data> data;
  for (const Case& c : all) data.push_back(make(c));
  const Isa best = active_isa();
  for (Isa isa : {Isa::Portable, Isa::Avx2, Isa::Avx512}) {
    if ((isa == Isa::Avx2 && !info.avx2_fma) || (isa == Isa::Avx512 && !info.avx512)) {
      std::fprintf(stderr, "skip %s path: this CPU lacks it\n", isa_name(isa));
      continue;
    }
    if (static_cast<int>(isa) > static_cast<int>(best)) {
      std::fprintf(stderr, "skip %s path: limited by SPARSELLM_ISA\n", isa_name(isa));
      continue;
    }
    set_isa_limit(isa);
    std::fprintf(stderr, "checking the %s path (kernel %s)\n", isa_name(isa), gemm_kernel_name());
    for (size_t i = 0; i < all.size(); ++i) check_case(all[i], data[i], isa_name(isa));
    // The same cases once more with the small-M kernel disabled and tiny blocks, so that the
    // packed path also sees M = 1..4 and every K/N/M block edge.
    const GemmTuning saved = gemm_tuning();
    GemmTuning tiny = saved;
    tiny.kc = 48;
    tiny.nc = 40;
    tiny.mc = 20;
    tiny.mc_epilogue = 9;
    tiny.gemv_max_m = 0;
    set_gemm_tuning(tiny);
    for (size_t i = 0; i < all.size(); ++i) check_case(all[i], data[i], isa_name(isa));
    // And the small-M kernel forced up to M = 40 (all row-group remainders).
    GemmTuning wide = saved;
    wide.gemv_max_m = 40;
    set_gemm_tuning(wide);
    for (size_t i = 0; i < all.size(); ++i)
      if (all[i].M <= 40) check_case(all[i], data[i], isa_name(isa));
    set_gemm_tuning(saved);
  }
  set_isa_limit(best);

  // Threads: 1 vs 2 give the same result within rounding (each output's K order may not differ by
  // more than f32 rounding; we require the tolerance of the reference comparison).
  for (DType dt : {DType::F32, DType::BF16}) {
    for (int64_t M : {1, 4, 70}) {
      Data d = make({M, 300, 513, dt, 0, 0, 0});
      bool ok = false;
      set_num_threads(1);
      std::vector<float> c1 = run_gemm(d, 0, &ok);
      set_num_threads(2);
      std::vector<float> c2 = run_gemm(d, 0, &ok);
      std::vector<double> r1(c1.begin(), c1.end());
      double e = check::rel_error(c2.data(), r1.data(), c2.size());
      CHECK(e <= tolerance(300), "threads 1 vs 2 M=%lld: rel diff %.3g", (long long)M, e);
    }
  }

  // Empty shapes are no-ops.
  {
    std::vector<float> A(4, 1.f), Wf(4, 1.f), C(4, 7.f);
    WeightView w{Wf.data(), DType::F32, 0, 4, 4};
    gemm(A.data(), 4, 1, w, C.data(), 4);
    CHECK(C[0] == 7.f, "N=0 wrote to C");
  }
  return check::finish("test_gemm");
}
