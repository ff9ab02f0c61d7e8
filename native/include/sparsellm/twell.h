// TwELL (tile-wise ELLPACK): the inference format of the FFN's sparse hidden activations, and
// the gate GEMM that produces it in its epilogue (ReLU + packing on each finished block; no
// second pass over a dense [tokens, d_ff] buffer).
//
// Layout of a Twell holding a [rows, cols] activation matrix (cols = d_ff), tile width T,
// compression factor C, capacity cap = T/C − 1 entries per tile, tiles = ceil(cols / T):
//   count [rows, tiles]        int32: the number of strictly positive values in the tile (the
//                               true number, which may exceed cap: the tile then "overflows")
//   value [rows, tiles, cap]   f32: the positive values, in increasing column order
//   index [rows, tiles, cap]   uint16: their column within the tile (global = tile·T + index)
//   dense [rows, cols]         f32 side buffer: for an OVERFLOWING tile (count > cap), the tile's
//                               ReLU'd values, dense, at their natural place; value/index of that
//                               tile are then unused. Only overflowing tiles' ranges are valid.
// Overflow is therefore exact: consumers read an overflowing tile from `dense`. Nothing is ever
// dropped. A fully dense gate makes every tile overflow, so `dense` becomes relu(gate) — exactly
// what the dense fallback needs, at the price of counting the positives (see ffn.h).
#pragma once
#include <cmath>
#include <cstdint>
#include <memory>

#include "sparsellm/tensor.h"

namespace sparsellm {

struct TwellParams {
  int tile = 256;        // T: columns per tile (1..65536)
  int compression = 8;   // C: capacity per tile is T/C − 1 entries (must be ≥ 1)
  int capacity() const { return tile / compression - 1; }
};

// The gate's activation and keep rule. Plain ReLU (threshold < 0): keep v > 0, store v (the fast
// path). Otherwise (a per-layer cut-off c >= 0, e.g. from `sparsellm prune --target-sparsity`):
// a = act(v), keep |a| > c (a may be negative), store a. Kinds match ActKind (model.h).
enum class GateFn : int { Relu = 0, Silu = 1, GeluErf = 2, GeluTanh = 3 };

inline float gate_fn_value(float v, GateFn f) {
  switch (f) {
    case GateFn::Relu: return v > 0.f ? v : 0.f;
    case GateFn::Silu: return v / (1.f + std::exp(-v));
    case GateFn::GeluErf: return 0.5f * v * (1.f + std::erf(v * 0.70710678118654752f));
    case GateFn::GeluTanh: {
      const float k = 0.79788456080286536f;
      return 0.5f * v * (1.f + std::tanh(k * (v + 0.044715f * v * v * v)));
    }
  }
  return v;
}

struct GateAct {
  GateFn fn = GateFn::Relu;
  float threshold = -1.f;  // < 0: plain ReLU
  bool plain_relu() const { return fn == GateFn::Relu && threshold <= 0.f; }
  // The stored activation of pre-activation v (0: the unit is inactive).
  float apply(float v) const {
    if (plain_relu()) return v > 0.f ? v : 0.f;
    const float a = gate_fn_value(v, fn);
    return std::fabs(a) > threshold ? a : 0.f;
  }
};

// Sparsity statistics of one activation matrix (also returned by the FFN entry points).
struct SparsityStats {
  int64_t rows = 0;
  int64_t nnz = 0;             // kept (non-zero) activations over all rows
  int64_t max_row_nnz = 0;
  int64_t overflow_tiles = 0;  // tiles with more positives than their capacity
  int64_t overflow_rows = 0;   // rows with at least one overflowing tile
};

class Twell {
 public:
  // Shapes the buffers for [rows, cols] with `p`; reuses memory when it is large enough
  // (contents are undefined until a producer fills them). Throws on invalid parameters.
  void reset(int64_t rows, int64_t cols, const TwellParams& p);

  int64_t rows = 0, cols = 0, tiles = 0;
  int tile = 0, cap = 0;
  int32_t* count = nullptr;       // [rows, tiles]
  float* value = nullptr;         // [rows, tiles, cap]
  uint16_t* index = nullptr;      // [rows, tiles, cap]
  float* dense = nullptr;         // [rows, cols] (overflowing tiles only)
  int32_t* row_nnz = nullptr;     // [rows] sum of the row's counts (filled by finalize())
  uint8_t* row_overflow = nullptr;  // [rows] 1 when the row has an overflowing tile

  bool overflows(int64_t r, int64_t t) const { return count[r * tiles + t] > cap; }
  int tile_width(int64_t t) const {
    return static_cast<int>(t + 1 < tiles ? tile : cols - t * static_cast<int64_t>(tile));
  }
  // Computes row_nnz, row_overflow and the statistics from `count` (after a producer ran).
  SparsityStats finalize();
  // Writes the activations back as a dense [rows, cols] matrix (zeros elsewhere); for tests
  // and for the dense fallback (`out` may be `dense` itself: overflowing tiles stay in place).
  void to_dense(float* out, int64_t ldo) const;
  // Bytes of the TwELL arrays (count + value + index), the size of the compact format.
  int64_t packed_bytes() const;

 private:
  std::unique_ptr<int32_t[]> count_;
  std::unique_ptr<float[]> value_;
  std::unique_ptr<uint16_t[]> index_;
  std::unique_ptr<float[]> dense_;
  std::unique_ptr<int32_t[]> row_nnz_;
  std::unique_ptr<uint8_t[]> row_overflow_;
  int64_t count_cap_ = 0, value_cap_ = 0, index_cap_ = 0, dense_cap_ = 0, rows_cap_ = 0;
};

// g = relu(x · Wᵀ + bias), packed into `out` as TwELL by the GEMM epilogue.
//   x [M, d] f32 (ldx), W [d_ff, d] f32 or bf16 (the gate; the up projection for non-gated
//   FFNs), bias [d_ff] f32 or null. Returns the statistics (out is finalized).
// With a thresholded `act` the epilogue stores act.apply(v) instead (values may be negative;
// count/value/index/dense then hold the kept, non-zero entries).
SparsityStats twell_gate(const float* x, int64_t ldx, int64_t M, const WeightView& W,
                         const float* bias, const TwellParams& p, Twell& out,
                         const GateAct& act = GateAct{});

// Packs an existing dense matrix a [rows, cols] (lda) the same way (ReLU folded in). Used by
// tests and by callers that already hold the dense gate.
SparsityStats twell_pack_dense(const float* a, int64_t lda, int64_t rows, int64_t cols,
                               const TwellParams& p, Twell& out);

}  // namespace sparsellm
