// TwELL packing by the gate GEMM's epilogue, checked EXACTLY against a float64 reference: the
// inputs are small integers and the gate weights multiples of 1/8 (ffn_test_util.h "exact"
// mode), so every f32 pre-activation is exact and the packed structure (counts, values,
// columns, overflow tiles in the side buffer) must match bit for bit. Covers M = 1, 7, 33;
// d_ff not a multiple of T; odd d; densities from very sparse to fully dense, with heavy rows
// that overflow their tiles; bias (non-gated producer); bf16 weights (exact here too); threads
// 1 and 2; every ISA.
#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "check.h"
#include "ffn_test_util.h"
#include "sparsellm/cpu_info.h"
#include "sparsellm/twell.h"

using namespace sparsellm;

namespace {

struct Case {
  int64_t M, d, F;
  double density;
  int heavy_every;
  int T, C;
  bool bias;
  DType dtype;
};

void check_twell(const Twell& tw, const std::vector<double>& z, const Case& c, const char* what,
                 const SparsityStats& s) {
  const int cap = TwellParams{c.T, c.C}.capacity();
  CHECK(tw.rows == c.M && tw.cols == c.F && tw.tile == c.T && tw.cap == cap, "%s: shape", what);
  CHECK(tw.tiles == (c.F + c.T - 1) / c.T, "%s: tiles %lld", what, (long long)tw.tiles);
  int64_t nnz = 0, max_row = 0, ovf_tiles = 0, ovf_rows = 0;
  int bad = 0;
  for (int64_t m = 0; m < c.M; ++m) {
    int64_t row = 0;
    bool ovf = false;
    for (int64_t t = 0; t < tw.tiles; ++t) {
      const int64_t c0 = t * c.T, c1 = std::min(c.F, c0 + c.T);
      std::vector<int> cols;
      for (int64_t j = c0; j < c1; ++j)
        if (z[static_cast<size_t>(m * c.F + j)] > 0) cols.push_back(static_cast<int>(j - c0));
      const int n = static_cast<int>(cols.size());
      row += n;
      const size_t slot = static_cast<size_t>(m * tw.tiles + t);
      if (tw.count[slot] != n) { ++bad; continue; }
      if (n > cap) {
        ovf = true;
        ++ovf_tiles;
        for (int64_t j = c0; j < c1; ++j) {
          const double ref = std::max(0.0, z[static_cast<size_t>(m * c.F + j)]);
          if (tw.dense[m * c.F + j] != static_cast<float>(ref)) ++bad;
        }
      } else {
        for (int i = 0; i < n; ++i) {
          if (tw.index[slot * cap + i] != cols[static_cast<size_t>(i)]) ++bad;
          if (tw.value[slot * cap + i] != static_cast<float>(z[static_cast<size_t>(m * c.F + c0 + cols[static_cast<size_t>(i)])])) ++bad;
        }
      }
    }
    CHECK(tw.row_nnz[m] == row, "%s: row %lld nnz %d, reference %lld", what, (long long)m, tw.row_nnz[m], (long long)row);
    CHECK(tw.row_overflow[m] == (ovf ? 1 : 0), "%s: row %lld overflow flag", what, (long long)m);
    nnz += row;
    max_row = std::max(max_row, row);
    ovf_rows += ovf;
  }
  CHECK(bad == 0, "%s: %d packed entries/counts differ from the reference", what, bad);
  CHECK(s.nnz == nnz && s.max_row_nnz == max_row && s.overflow_tiles == ovf_tiles && s.overflow_rows == ovf_rows,
        "%s: stats nnz %lld/%lld max %lld/%lld overflow tiles %lld/%lld rows %lld/%lld", what, (long long)s.nnz,
        (long long)nnz, (long long)s.max_row_nnz, (long long)max_row, (long long)s.overflow_tiles, (long long)ovf_tiles,
        (long long)s.overflow_rows, (long long)ovf_rows);
  // to_dense reproduces relu(z) exactly
  std::vector<float> dense(static_cast<size_t>(c.M * c.F), NAN);
  tw.to_dense(dense.data(), c.F);
  int bad_dense = 0;
  for (size_t i = 0; i < dense.size(); ++i)
    if (dense[i] != static_cast<float>(std::max(0.0, z[i]))) ++bad_dense;
  CHECK(bad_dense == 0, "%s: to_dense differs in %d places", what, bad_dense);
}

}  // namespace

int main() {
  const Isa best = active_isa();
  bool saw_overflow = false, saw_clean = false;
  std::vector<Case> cases;
  for (DType dt : {DType::F32, DType::BF16}) {
    cases.push_back({1, 37, 300, 0.05, 0, 64, 8, false, dt});
    cases.push_back({7, 37, 300, 0.005, 3, 64, 8, true, dt});
    cases.push_back({33, 37, 300, 0.05, 5, 256, 8, false, dt});
    cases.push_back({33, 37, 300, 0.2, 4, 64, 4, true, dt});
    cases.push_back({7, 16, 300, 1.0, 0, 64, 8, false, dt});
    cases.push_back({33, 37, 257, 0.05, 2, 16, 2, false, dt});
    cases.push_back({5, 9, 70, 0.3, 0, 70, 7, true, dt});
  }
  for (int isa = static_cast<int>(best); isa >= 0; --isa) {
    set_isa_limit(static_cast<Isa>(isa));
    for (const Case& c : cases) {
      ffntest::Problem p = ffntest::make_problem(c.M, c.d, c.F, c.density, c.heavy_every, 4.0, true, c.bias);
      if (c.dtype == DType::BF16) ffntest::round_bf16(p.gate);  // exact already (multiples of 1/8)
      std::vector<uint16_t> wb;
      WeightView W{p.gate.data(), DType::F32, c.F, c.d, c.d};
      if (c.dtype == DType::BF16) {
        wb.resize(p.gate.size());
        for (size_t i = 0; i < wb.size(); ++i) wb[i] = f32_to_bf16(p.gate[i]);
        W = WeightView{wb.data(), DType::BF16, c.F, c.d, c.d};
      }
      const std::vector<double> z = ffntest::ref_linear(p.x, c.M, c.d, p.gate, c.F, c.bias ? &p.up_bias : nullptr);
      char what[200];
      std::snprintf(what, sizeof what, "%s M=%lld d=%lld F=%lld rho=%.3f (got %.3f) heavy=%d T=%d C=%d%s %s",
                    isa_name(active_isa()), (long long)c.M, (long long)c.d, (long long)c.F, c.density,
                    ffntest::density_of(z), c.heavy_every, c.T, c.C, c.bias ? " +bias" : "",
                    c.dtype == DType::F32 ? "f32" : "bf16");
      for (int threads : {1, 2}) {
        set_num_threads(threads);
        Twell tw;
        const SparsityStats s = twell_gate(p.x.data(), c.d, c.M, W, c.bias ? p.up_bias.data() : nullptr, {c.T, c.C}, tw);
        check_twell(tw, z, c, what, s);
        if (s.overflow_tiles) saw_overflow = true;
        else saw_clean = true;
        // the same packing from a dense matrix, reusing (and shrinking into) the same buffers
        std::vector<float> zf(z.size());
        for (size_t i = 0; i < z.size(); ++i) zf[i] = static_cast<float>(z[i]);
        const SparsityStats s2 = twell_pack_dense(zf.data(), c.F, c.M, c.F, {c.T, c.C}, tw);
        check_twell(tw, z, c, what, s2);
      }
    }
  }
  set_isa_limit(best);
  CHECK(saw_overflow && saw_clean, "cases must include tiles that overflow and rows that do not");
  // parameter validation
  Twell tw;
  bool threw = false;
  try { tw.reset(1, 10, {8, 8}); } catch (const std::invalid_argument&) { threw = true; }
  CHECK(threw, "T/C - 1 = 0 must be rejected");
  return check::finish("test_twell");
}
