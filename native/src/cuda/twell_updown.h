// Internal (not part of the public API): the kernel variants of the fused TwELL up+down
// (twell_updown_bf16) and of sparse decode, selectable for tests and the benchmark. Plain C++:
// included by the CUDA sources, bench.cu and native/tests/test_cuda_ops.cpp.
#pragma once
#include <cstdint>

#include "sparsellm/cuda_ops.h"

namespace sparsellm::cuda {

// Fused up+down kernels (all exact, same sums up to f32 summation order):
//   0 auto     the default choice below (kUpdownDefault)
//   1 row      a warp per token row, one active neuron at a time (the first kernel)
//   2 group2   a warp per row, the row's entries gathered in parallel (scan + search), two
//              neurons' rows in flight per step, batched reductions, x in registers
//   3 group1s  the same, one neuron per step, x in shared memory (fewer registers, more warps)
//   4 group1sL as group1s with the weight rows loaded with an L2 evict_last policy
//   5 group2L  as group2 with the weight rows loaded with an L2 evict_last policy
// (At d = 2048 group2 keeps x in shared memory too: in registers it would spill. The grouped
// kernels serve d ≤ 2048; wider rows always take the row kernel.)
// Streaming data (x, counts, entries, y) is loaded/stored evict-first in variants 2-5.
enum UpdownVariant : int {
  kUpdownAuto = 0,
  kUpdownRow = 1,
  kUpdownGroup2 = 2,
  kUpdownGroup1s = 3,
  kUpdownGroup1sL = 4,
  kUpdownGroup2L = 5,
};
constexpr int kUpdownVariants = 6;
constexpr int kUpdownDefault = kUpdownGroup2;
// Auto (variant 0) tunes per (d, gated) at the first call with ≥ 8192 rows: row, group2 and
// group1s each run twice and the fastest is kept (twell.cu); they compute identical results.
// The kept choice for a shape, or kUpdownAuto when none has been tuned yet.
int updown_auto_choice(int64_t d, bool gated);
const char* updown_variant_name(int v);
// Process-wide choice for twell_updown_bf16 (0 = default). Not thread-safe; for tests/benchmarks.
void set_updown_variant(int v);
int updown_variant();

// The grouped kernels (variants 2-5); `variant` must be one of them. Same contract as
// twell_updown_bf16 with d % 8 == 0, d ≤ 2048, aligned operands (checked by the caller).
void twell_updown_grouped(int variant, const uint16_t* x, int64_t ldx, const DeviceTwell& g, const uint16_t* up,
                          const uint16_t* down_t, int64_t ldw, int64_t d, const float* bias, float* y, int64_t ldy);

// Per-tile union statistics of a TwELL (benchmark measurement): for tiles of `tile_tokens`
// consecutive rows, the mean number of distinct active neurons (non-overflowing tiles' entries)
// and the mean number of (row, neuron) entries; `multi` = mean number of entries whose neuron
// occurs at least twice in the tile. Host results; synchronises.
struct TwellUnionStats {
  double mean_union = 0, mean_entries = 0, mean_multi = 0;
  int64_t tiles = 0;
};
TwellUnionStats twell_union_stats(const DeviceTwell& g, int tile_tokens);

}  // namespace sparsellm::cuda
