// Internal: the decode GEMV's row kernels prepared once and run piecewise, single-threaded,
// from inside a caller's parallel region (the screened gate runs each chunk's candidate rows as
// soon as it has them).
// Only the portable driver files include this (the ISA files stay free of shared inline code).
#pragma once
#include <cstdint>

#include "gemv_kernels.h"
#include "sparsellm/tensor.h"

namespace sparsellm::gemv_detail {

// gemv_rows for M <= kMaxTokens tokens. The split x lives in the constructing thread's buffer
// until that thread's next GEMV call. Rows get the same bits as from gemv / gemv_rows.
class GemvRowsTask {
 public:
  GemvRowsTask(const float* x, int64_t ldx, int64_t M, const sparsellm::WeightView& W);
  // y[m * ldy + rows[i]] for i < n; rows in range (not checked here).
  void run(const int32_t* rows, int64_t n, float* y, int64_t ldy) const;

 private:
  GemvArgs a_;
  const GemvKernels* k_;
  sparsellm::WeightView w_;
};

}  // namespace sparsellm::gemv_detail
