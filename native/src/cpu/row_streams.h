// Internal: the row walk of the memory-bound row kernels (decode GEMV, screened gate). Rows
// [n0, n1) of W (ld elements apart) are cut into S contiguous runs read side by side: each step
// hands the tile one row of every run (S independent streams for the prefetchers, each tile
// prefetching into its rows' successors), then the rows left over go one at a time. With an
// index list `idx`, position n stands for row idx[n] (gathered rows, e.g. the screened gate's
// candidates): the runs are runs of the list, and a row's successor is the next listed row.
// tile(std::integral_constant<int, S'>{}, rows, next, out) with S' = S or 1: rows[s] the rows,
// next[s] the row after each, out[s] = y + row index. Pass a lambda of the calling ISA file, so
// that every instantiation stays in the file compiled for its ISA.
#pragma once
#include <cstdint>
#include <type_traits>

namespace sparsellm::detail {

template <int S, typename T, typename Tile>
inline void walk_row_streams(const T* W, int64_t ld, const int32_t* idx, int64_t n0, int64_t n1, float* y,
                             Tile&& tile) {
  const auto row = [idx](int64_t n) -> int64_t { return idx ? idx[n] : n; };
  // The row after position n: the next listed row (the row below for the last one).
  const auto next = [&](int64_t n, int64_t r) -> const T* { return W + (idx && n + 1 < n1 ? row(n + 1) : r + 1) * ld; };
  const int64_t q = (n1 - n0) / S;
  for (int64_t i = 0; i < q; ++i) {
    const T* w[S];
    const T* nx[S];
    float* out[S];
    for (int s = 0; s < S; ++s) {
      const int64_t n = n0 + s * q + i, r = row(n);
      w[s] = W + r * ld;
      nx[s] = next(n, r);
      out[s] = y + r;
    }
    tile(std::integral_constant<int, S>{}, w, nx, out);
  }
  for (int64_t n = n0 + S * q; n < n1; ++n) {
    const int64_t r = row(n);
    const T* w[1] = {W + r * ld};
    const T* nx[1] = {next(n, r)};
    float* out[1] = {y + r};
    tile(std::integral_constant<int, 1>{}, w, nx, out);
  }
}

namespace {  // internal linkage: each ISA file compiles its own copy

// True when every run's next row directly follows its row (K elements on): the kernels then let
// a prefetch run past the row's end, with no per-step choice between the row and its successor
// (that choice's branch, mispredicted once per row, cost ~10% of the streaming rate).
template <int S, typename T>
inline bool rows_follow(const T* const* w, const T* const* nx, int64_t K) {
  bool follow = true;
  for (int s = 0; s < S; ++s) follow = follow && nx[s] == w[s] + K;
  return follow;
}

}  // namespace

}  // namespace sparsellm::detail
