// TwELL storage and the gate GEMM whose epilogue packs it (see sparsellm/twell.h).
#include "sparsellm/twell.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#include "sparsellm/cpu_info.h"
#include "sparsellm/gemm.h"

namespace sparsellm {
namespace {

template <typename T>
void grow(std::unique_ptr<T[]>& p, int64_t& cap, int64_t need) {
  if (need <= cap && p) return;
  p.reset(new T[static_cast<size_t>(std::max<int64_t>(need, 1))]);  // uninitialised
  cap = std::max<int64_t>(need, 1);
}

// ReLU (+ bias) and packing of the block c[m0:m1, n0:n1] (ldc) into `out`. n0 is a multiple
// of the tile width. Overflowing tiles are copied, ReLU'd, into out.dense. Thr: the layer keeps
// |act(v)| > c instead (act.apply, computed in place on the tile first), and "kept" is != 0.
template <bool Thr>
void pack_block(Twell& out, const float* bias, int64_t m0, int64_t m1, int64_t n0, int64_t n1,
                float* c, int64_t ldc, const GateAct& act) {
  const int T = out.tile, cap = out.cap;
  for (int64_t m = m0; m < m1; ++m) {
    float* crow = c + (m - m0) * ldc;
    for (int64_t t0 = n0; t0 < n1; t0 += T) {
      const int64_t t = t0 / T;
      const int w = static_cast<int>(std::min<int64_t>(T, n1 - t0));
      float* ct = crow + (t0 - n0);
      const size_t slot = static_cast<size_t>(m * out.tiles + t);
      float* val = out.value + slot * cap;
      uint16_t* idx = out.index + slot * cap;
      if (bias) {
        const float* b = bias + t0;
        for (int k = 0; k < w; ++k) ct[k] += b[k];
      }
      if constexpr (Thr)
        for (int k = 0; k < w; ++k) ct[k] = act.apply(ct[k]);
      // Count first (a vectorisable, branch-free pass over the cache-resident tile), then either
      // pack the few positives or, for an overflowing tile, copy it ReLU'd: a dense gate costs a
      // count and a copy, with no data-dependent branch per element.
      int n = 0;
      for (int k = 0; k < w; ++k) n += (Thr ? ct[k] != 0.f : ct[k] > 0.f) ? 1 : 0;
      if (n <= cap) {
        int q = 0;
        for (int k = 0; k < w && q < n; ++k) {
          const float v = ct[k];
          if (Thr ? v != 0.f : v > 0.f) {
            val[q] = v;
            idx[q] = static_cast<uint16_t>(k);
            ++q;
          }
        }
      }
      out.count[slot] = n;
      if (n > cap) {
        float* dst = out.dense + m * out.cols + t0;
        if constexpr (Thr) std::memcpy(dst, ct, sizeof(float) * w);
        else
          for (int k = 0; k < w; ++k) dst[k] = ct[k] > 0.f ? ct[k] : 0.f;
      }
    }
  }
}

}  // namespace

void Twell::reset(int64_t r, int64_t c, const TwellParams& p) {
  if (r < 0 || c < 0) throw std::invalid_argument("twell: negative shape");
  if (p.tile < 1 || p.tile > 65536) throw std::invalid_argument("twell: tile width must be in 1..65536");
  if (p.compression < 1 || p.capacity() < 1)
    throw std::invalid_argument("twell: tile " + std::to_string(p.tile) + " / compression " +
                                std::to_string(p.compression) + " leaves no room (T/C - 1 must be >= 1)");
  rows = r;
  cols = c;
  tile = p.tile;
  cap = p.capacity();
  tiles = (c + tile - 1) / tile;
  grow(count_, count_cap_, rows * tiles);
  grow(value_, value_cap_, rows * tiles * cap);
  grow(index_, index_cap_, rows * tiles * cap);
  grow(dense_, dense_cap_, rows * cols);
  if (rows > rows_cap_ || !row_nnz_) {
    row_nnz_.reset(new int32_t[static_cast<size_t>(std::max<int64_t>(rows, 1))]);
    row_overflow_.reset(new uint8_t[static_cast<size_t>(std::max<int64_t>(rows, 1))]);
    rows_cap_ = std::max<int64_t>(rows, 1);
  }
  count = count_.get();
  value = value_.get();
  index = index_.get();
  dense = dense_.get();
  row_nnz = row_nnz_.get();
  row_overflow = row_overflow_.get();
}

SparsityStats Twell::finalize() {
  SparsityStats s;
  s.rows = rows;
  for (int64_t r = 0; r < rows; ++r) {
    int64_t n = 0, ovf = 0;
    const int32_t* c = count + r * tiles;
    for (int64_t t = 0; t < tiles; ++t) {
      n += c[t];
      ovf += c[t] > cap;
    }
    row_nnz[r] = static_cast<int32_t>(n);
    row_overflow[r] = ovf > 0;
    s.nnz += n;
    s.max_row_nnz = std::max(s.max_row_nnz, n);
    s.overflow_tiles += ovf;
    s.overflow_rows += ovf > 0;
  }
  return s;
}

void Twell::to_dense(float* out, int64_t ldo) const {
#pragma omp parallel for schedule(static) num_threads(num_threads())
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t c0 = t * tile;
      const int w = tile_width(t);
      float* o = out + r * ldo + c0;
      if (overflows(r, t)) {
        const float* src = dense + r * cols + c0;
        if (src != o) std::memcpy(o, src, sizeof(float) * w);
        continue;
      }
      std::memset(o, 0, sizeof(float) * w);
      const size_t slot = static_cast<size_t>(r * tiles + t);
      const int n = count[slot];
      for (int i = 0; i < n; ++i) o[index[slot * cap + i]] = value[slot * cap + i];
    }
  }
}

int64_t Twell::packed_bytes() const {
  return rows * tiles * (4 + cap * (4 + 2));
}

SparsityStats twell_gate(const float* x, int64_t ldx, int64_t M, const WeightView& W,
                         const float* bias, const TwellParams& p, Twell& out, const GateAct& act) {
  out.reset(M, W.rows, p);
  if (M == 0 || W.rows == 0) return out.finalize();
  GemmOptions opt;
  opt.n_align = p.tile;
  if (act.plain_relu())
    gemm_epilogue(
        x, ldx, M, W,
        [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1, float* c, int64_t ldc, int) {
          pack_block<false>(out, bias, m0, m1, n0, n1, c, ldc, act);
        },
        opt);
  else
    gemm_epilogue(
        x, ldx, M, W,
        [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1, float* c, int64_t ldc, int) {
          pack_block<true>(out, bias, m0, m1, n0, n1, c, ldc, act);
        },
        opt);
  return out.finalize();
}

SparsityStats twell_pack_dense(const float* a, int64_t lda, int64_t rows, int64_t cols,
                               const TwellParams& p, Twell& out) {
  out.reset(rows, cols, p);
#pragma omp parallel num_threads(num_threads())
  {
    std::vector<float> row(static_cast<size_t>(std::max<int64_t>(cols, 1)));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      std::memcpy(row.data(), a + r * lda, sizeof(float) * cols);
      pack_block<false>(out, nullptr, r, r + 1, 0, cols, row.data(), cols, GateAct{});
    }
  }
  return out.finalize();
}

}  // namespace sparsellm
