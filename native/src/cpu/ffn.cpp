// Sparse FFN kernels over TwELL (fused gated up+down, non-gated sparse down) and the FfnLayer
// that owns the weights and chooses between the dense and the sparse path (sparsellm/ffn.h).
#include "sparsellm/ffn.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <stdexcept>
#include <string>

#include "ffn_kernels.h"
#include "huge_buffer.h"
#include "sparsellm/cpu_info.h"
#include "sparsellm/gemm.h"

namespace sparsellm {

namespace detail {

// The active neurons of row m of `g` (ascending), with their values. Returns the count.
int64_t gather_row(const Twell& g, int64_t m, int32_t* js, float* vs) {
  int64_t n = 0;
  for (int64_t t = 0; t < g.tiles; ++t) {
    const size_t slot = static_cast<size_t>(m * g.tiles + t);
    const int c = g.count[slot];
    const int32_t base = static_cast<int32_t>(t * g.tile);
    if (c <= g.cap) {
      const float* val = g.value + slot * g.cap;
      const uint16_t* idx = g.index + slot * g.cap;
      for (int i = 0; i < c; ++i) {
        js[n] = base + idx[i];
        vs[n] = val[i];
        ++n;
      }
    } else {
      // ReLU'd or thresholded: the kept entries are the non-zeros.
      n += ffn_ops().nonzeros(g.dense + m * g.cols + base, g.tile_width(t), base, js + n, vs + n);
    }
  }
  return n;
}

}  // namespace detail

namespace {

inline void init_row(float* y, const float* bias, int64_t d) {
  if (bias) std::memcpy(y, bias, sizeof(float) * d);
  else std::memset(y, 0, sizeof(float) * d);
}

// Shared driver of the gated and non-gated sparse kernels. `neuron(x_m, js, vs, n, y_m)`
// accumulates one token's (part of its) active list into y_m.
template <typename Fn>
void sparse_rows(const Twell& g, const float* bias, int64_t d, float* y, int64_t ldy, Fn neuron) {
  const int64_t M = g.rows, F = g.cols;
  const int nt = num_threads();
  if (M == 0) return;
  if (M >= nt || nt == 1) {
#pragma omp parallel num_threads(nt)
    {
      std::vector<int32_t> js(static_cast<size_t>(F) + 1);
      std::vector<float> vs(static_cast<size_t>(F) + 1);
#pragma omp for schedule(dynamic, 1)
      for (int64_t m = 0; m < M; ++m) {
        const int64_t n = detail::gather_row(g, m, js.data(), vs.data());
        float* ym = y + m * ldy;
        init_row(ym, bias, d);
        neuron(m, js.data(), vs.data(), n, ym);
      }
    }
    return;
  }
  // Few tokens: every thread takes a contiguous share of each token's active list into its own
  // partial output; the partials are summed in thread order (deterministic for a thread count).
  std::vector<int32_t> js(static_cast<size_t>(F) + 1);
  std::vector<float> vs(static_cast<size_t>(F) + 1);
  std::vector<float> part(static_cast<size_t>(nt * d));
  for (int64_t m = 0; m < M; ++m) {
    const int64_t n = detail::gather_row(g, m, js.data(), vs.data());
    float* ym = y + m * ldy;
#pragma omp parallel num_threads(nt)
    {
      const int t = omp_get_thread_num(), T = omp_get_num_threads();
      float* pt = part.data() + t * d;
      std::memset(pt, 0, sizeof(float) * d);
      const int64_t i0 = n * t / T, i1 = n * (t + 1) / T;
      if (i1 > i0) neuron(m, js.data() + i0, vs.data() + i0, i1 - i0, pt);
#pragma omp barrier
#pragma omp for schedule(static)
      for (int64_t k = 0; k < d; ++k) {
        float s = bias ? bias[k] : 0.f;
        for (int u = 0; u < T; ++u) s += part[static_cast<size_t>(u * d + k)];
        ym[k] = s;
      }
    }
  }
}

// Token-blocked, neuron-major variant for denser activations: the tokens are cut into blocks of
// B; within a block the active (token, neuron) pairs are sorted by neuron (counting sort), and
// each active neuron's weights are read ONCE for all the block's tokens that use it
// (`neuron(j, toks, vals, n, m0)`, tokens relative to m0). Blocks go to threads.
template <typename Fn>
void batched_rows(const Twell& g, const float* bias, int64_t d, float* y, int64_t ldy, int64_t B, Fn neuron) {
  const int64_t M = g.rows, F = g.cols;
  const int64_t nblocks = (M + B - 1) / B;
#pragma omp parallel num_threads(num_threads())
  {
    std::vector<int32_t> cnt(static_cast<size_t>(F) + 1), js, tok, ctok;
    std::vector<float> vs, cval;
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < nblocks; ++b) {
      const int64_t m0 = b * B, m1 = std::min(M, m0 + B);
      int64_t total = 0;
      for (int64_t m = m0; m < m1; ++m) total += g.row_nnz[m];
      if (static_cast<int64_t>(js.size()) < total + 1) {
        js.resize(static_cast<size_t>(total) + 1);
        tok.resize(static_cast<size_t>(total) + 1);
        vs.resize(static_cast<size_t>(total) + 1);
        ctok.resize(static_cast<size_t>(total) + 1);
        cval.resize(static_cast<size_t>(total) + 1);
      }
      int64_t off = 0;
      for (int64_t m = m0; m < m1; ++m) {
        const int64_t n = detail::gather_row(g, m, js.data() + off, vs.data() + off);
        for (int64_t i = off; i < off + n; ++i) tok[static_cast<size_t>(i)] = static_cast<int32_t>(m - m0);
        off += n;
        init_row(y + m * ldy, bias, d);
      }
      std::fill(cnt.begin(), cnt.end(), 0);
      for (int64_t i = 0; i < off; ++i) ++cnt[static_cast<size_t>(js[static_cast<size_t>(i)]) + 1];
      for (int64_t j = 0; j < F; ++j) cnt[static_cast<size_t>(j) + 1] += cnt[static_cast<size_t>(j)];
      for (int64_t i = 0; i < off; ++i) {
        const int32_t pos = cnt[static_cast<size_t>(js[static_cast<size_t>(i)])]++;
        ctok[static_cast<size_t>(pos)] = tok[static_cast<size_t>(i)];
        cval[static_cast<size_t>(pos)] = vs[static_cast<size_t>(i)];
      }
      // cnt[j] is now the end of neuron j's run (and the start of j+1's); `next` is the next
      // active neuron (-1: none), whose weights the kernel prefetches.
      int32_t start = 0;
      int64_t j = 0;
      while (j < F && cnt[static_cast<size_t>(j)] == 0) ++j;
      while (j < F) {
        const int32_t end = cnt[static_cast<size_t>(j)];
        int64_t next = j + 1;
        while (next < F && cnt[static_cast<size_t>(next)] == end) ++next;
        neuron(j, ctok.data() + start, cval.data() + start, static_cast<int64_t>(end - start), m0, next < F ? next : -1);
        start = end;
        j = next;
      }
    }
  }
}

// Tokens per block of the neuron-major variant, and the mean number of a block's tokens per
// neuron from which it is used (below it, the per-token kernel: little reuse to gain).
constexpr int64_t kBatchTokens = 128;
constexpr double kBatchMinReuse = 0.5;

int64_t batch_tokens(const Twell& g) {
  const int nt = num_threads();
  const int64_t M = g.rows;
  if (M < 2) return 0;
  const int64_t B = std::max<int64_t>(1, std::min<int64_t>(kBatchTokens, (M + nt - 1) / nt));
  int64_t nnz = 0;
  for (int64_t m = 0; m < M; ++m) nnz += g.row_nnz[m];
  const double reuse = static_cast<double>(nnz) / static_cast<double>(M) * static_cast<double>(B) / static_cast<double>(g.cols);
  return reuse >= kBatchMinReuse && B >= 2 ? B : 0;
}

// --- Two-phase path: sampled up product (SDDMM), then sparse × dense down (SpMM) -------------
//
// For moderate densities, instead of streaming each active neuron's 8 KiB block once per token
// (memory-bound), the (token, neuron) pairs of the call are listed token-major and d is cut into
// column chunks of kSpmmCols (256). Each chunk's rows of W_up and W_down form a panel (F × 256
// weights, packed contiguously by FfnLayer) that every token goes through while it is in the
// caches (the next panel is prefetched as one stream meanwhile); each row serves many tokens:
//  1. up: for each chunk, a token's x chunk is held in registers and dotted with the chunk rows of
//     its active neurons; the partial sums accumulate in u (one float per pair); h = g·u;
//  2. down: for each chunk, a token's output chunk is held in registers while its active neurons'
//     chunk rows are accumulated, h-weighted; every output element is written once.
// Threads split the chunks in both phases, so every panel is read once per call (phase 1 sums the
// threads' partial u in thread order: results depend on the thread count within f32 rounding).
struct TwoPhaseWork {
  std::vector<int64_t> tptr, bnd;
  std::vector<int32_t> tj;
  std::vector<float> tg, th, part;
};

int64_t env_int(const char* name, int64_t def) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoll(v) : def;
}

// Tokens per kernel call inside a chunk, and the slice of the next panel prefetched (into L2)
// before each call: panel_bytes · (m1 − m0) / M, so that the whole next panel is requested by
// the end of the chunk as one sequential stream (with few tokens the panels come from memory, and
// the kernels' own prefetching of rows a few pairs ahead cannot hide its latency).
constexpr int64_t kPrefetchTokens = 8;

// Neuron ranges of a panel: a panel (F rows of kSpmmCols columns, 2.9 MB at F 5632 in bf16) does
// not fit a core's L2, so each token's pairs would fetch their rows from L3. The panel is walked
// as S consecutive ranges of F/S rows (at most kRangeBytes each), all tokens per range, so a
// range's rows are reused by the tokens from L2; the next range is prefetched meanwhile.
constexpr int64_t kRangeBytes = 512 << 10;

std::atomic<int64_t> g_range_bytes{0};  // ffn_set_two_phase_range_bytes (0: the default)

void prefetch_slice(const char* panel, int64_t bytes, int64_t m0, int64_t m1, int64_t M) {
  const int64_t b0 = (bytes * m0 / M) & ~int64_t(63), b1 = bytes * m1 / M;
  for (int64_t o = b0; o < b1; o += 64) __builtin_prefetch(panel + o, 0, 2);
}

double prof_clock() {  // SPARSELLM_FFN_PROFILE: the calling thread's CPU time (one thread)
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

// up / down: the weight rows (column 0), rows ld_up / ld_down elements apart; up_panels /
// down_panels (may be null): the same rows packed in chunk panels [chunks][F][kSpmmCols].
void two_phase(const float* x, int64_t ldx, const Twell& g, const char* up, int64_t ld_up, const char* down,
               int64_t ld_down, const char* up_panels, const char* down_panels, DType dt, int64_t d,
               const float* bias, float* y, int64_t ldy) {
  const detail::FfnOps& ops = detail::ffn_ops();
  const int64_t M = g.rows, F = g.cols;
  const int64_t es = dtype_size(dt);
  static thread_local TwoPhaseWork w;
  w.tptr.resize(static_cast<size_t>(M) + 1);
  w.tptr[0] = 0;
  for (int64_t m = 0; m < M; ++m) w.tptr[static_cast<size_t>(m) + 1] = w.tptr[static_cast<size_t>(m)] + g.row_nnz[m];
  const int64_t nnz = w.tptr[static_cast<size_t>(M)];
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads(), M)));
  w.tj.resize(static_cast<size_t>(nnz) + 1);
  w.tg.resize(static_cast<size_t>(nnz) + 1);
  if (up) {
    w.th.resize(static_cast<size_t>(nnz) + 1);
    w.part.resize(static_cast<size_t>(nnz) * static_cast<size_t>(nt - 1) + 1);
  }
  const int64_t P = detail::kSpmmCols, nchunks = (d + P - 1) / P;
  const int64_t* tptr = w.tptr.data();
  int32_t* tj = w.tj.data();
  float *tg = w.tg.data(), *th = w.th.data(), *part = w.part.data();
  const int64_t panel_bytes = F * P * es;
  static const int64_t range_env = env_int("SPARSELLM_FFN_RANGE_KB", kRangeBytes >> 10) << 10;
  const int64_t range_set = g_range_bytes.load(std::memory_order_relaxed);
  const int64_t range_cap = range_set > 0 ? range_set : range_env;
  const int64_t S0 = std::max<int64_t>(1, std::min<int64_t>(F, (panel_bytes + range_cap - 1) / std::max<int64_t>(1, range_cap)));
  const int64_t FR = (F + S0 - 1) / S0;  // neurons per range (the last may be shorter)
  const int64_t S = (F + FR - 1) / FR;   // ranges, none empty
  w.bnd.resize(static_cast<size_t>((S + 1) * (M + 1)));
  int64_t* bnd = w.bnd.data();
  static const bool prof = std::getenv("SPARSELLM_FFN_PROFILE") != nullptr;
  double tp0 = prof_clock(), tpl = tp0, tp1 = 0, tp2 = 0;
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num();
    // This thread's tokens: a contiguous range holding about nnz / nt pairs.
    auto split = [&](int u) -> int64_t {
      if (u >= nt) return M;
      return std::min<int64_t>(M, std::lower_bound(tptr, tptr + M + 1, nnz * u / nt) - tptr);
    };
    const int64_t r0 = split(t), r1 = std::max(r0, split(t + 1));
    const int64_t db = nchunks * t / nt, de = nchunks * (t + 1) / nt;  // this thread's down chunks
    for (int64_t m = r0; m < r1; ++m) detail::gather_row(g, m, tj + tptr[m], tg + tptr[m]);
    // Range bounds: bnd[s·(M+1) + m] = the first pair of token m whose neuron is ≥ s·FR.
    for (int64_t m = r0; m < r1; ++m)
      for (int64_t s = 0; s <= S; ++s)
        bnd[s * (M + 1) + m] = s == 0 ? tptr[m]
                                      : s == S ? tptr[m + 1]
                                               : std::lower_bound(tj + tptr[m], tj + tptr[m + 1], static_cast<int32_t>(s * FR)) - tj;
    // The blocks (panel c, range s) of a phase in this thread's order; `next_of` is the block
    // read after block k (the first block of `then` after the last one), prefetched meanwhile.
    const int64_t range_bytes = FR * P * es;
    auto block = [&](const char* panels, int64_t c, int64_t s) { return panels + c * panel_bytes + s * range_bytes; };
    auto range_len = [&](int64_t s) { return (std::min(F, (s + 1) * FR) - s * FR) * P * es; };
    int64_t pb[2];
    if (up) {
      // Phase 1: the threads split the chunks (so each panel is read once in all), each summing
      // its chunks into its own u; the partial u are then added in thread order.
#pragma omp barrier
      if (prof && t == 0) tpl = prof_clock();
      float* ut = t == 0 ? th : part + static_cast<int64_t>(t - 1) * nnz;
      const int64_t cb = nchunks * t / nt, ce = nchunks * (t + 1) / nt;
      if (cb == ce) std::fill(ut, ut + nnz, 0.f);
      for (int64_t c = cb; c < ce; ++c) {
        const int64_t c0 = c * P, n = std::min(P, d - c0);
        if (!up_panels) {
          ops.updot(tptr, 0, M, tj, x + c0, ldx, up + c0 * es, dt, ld_up, n, ut, c > cb);
          continue;
        }
        for (int64_t s = 0; s < S; ++s) {
          // The next block this thread reads (the next range, its next up chunk, or its first
          // down chunk) is prefetched in step with the tokens, a slice per group of tokens.
          const char* next = s + 1 < S ? block(up_panels, c, s + 1)
                             : c + 1 < ce ? block(up_panels, c + 1, 0)
                             : (down_panels && db < de ? block(down_panels, db, 0) : nullptr);
          const int64_t nb = s + 1 < S ? range_len(s + 1) : range_len(0);
          const int64_t* bs = bnd + s * (M + 1);
          const int64_t* be = bnd + (s + 1) * (M + 1);
          for (int64_t m = 0; m < M; m += kPrefetchTokens) {
            const int64_t m1 = std::min(M, m + kPrefetchTokens);
            if (next) prefetch_slice(next, nb, m, m1, M);
            if (S == 1) {
              ops.updot(tptr, m, m1, tj, x + c0, ldx, up_panels + c * panel_bytes, dt, P, n, ut, c > cb);
              continue;
            }
            for (int64_t q = m; q < m1; ++q) {
              pb[0] = bs[q];
              pb[1] = be[q];
              ops.updot(pb, 0, 1, tj, x + q * ldx + c0, ldx, up_panels + c * panel_bytes, dt, P, n, ut, c > cb);
            }
          }
        }
      }
#pragma omp barrier
#pragma omp for schedule(static)
      for (int64_t i = 0; i < nnz; ++i) {
        float u = th[i];
        for (int q = 1; q < nt; ++q) u += part[static_cast<int64_t>(q - 1) * nnz + i];
        th[i] = u * tg[i];
      }
    }
#pragma omp barrier
    if (prof && t == 0) tp1 = prof_clock();
    const float* hv = up ? th : tg;
    // Phase 2: the threads split the chunks (equal work: every chunk holds all the pairs).
    for (int64_t c = db; c < de; ++c) {
      const int64_t c0 = c * P, n = std::min(P, d - c0);
      const float* b = bias ? bias + c0 : nullptr;
      if (!down_panels) {
        ops.spmm(tptr, 0, M, tj, hv, down + c0 * es, dt, ld_down, n, b, y + c0, ldy);
        continue;
      }
      for (int64_t s = 0; s < S; ++s) {
        const char* next = s + 1 < S ? block(down_panels, c, s + 1) : c + 1 < de ? block(down_panels, c + 1, 0) : nullptr;
        const int64_t nb = s + 1 < S ? range_len(s + 1) : range_len(0);
        const int64_t* bs = bnd + s * (M + 1);
        const int64_t* be = bnd + (s + 1) * (M + 1);
        for (int64_t m = 0; m < M; m += kPrefetchTokens) {
          const int64_t m1 = std::min(M, m + kPrefetchTokens);
          if (next) prefetch_slice(next, nb, m, m1, M);
          if (S == 1) {
            ops.spmm(tptr, m, m1, tj, hv, down_panels + c * panel_bytes, dt, P, n, b, y + c0, ldy);
            continue;
          }
          for (int64_t q = m; q < m1; ++q) {
            // Ranges after the first add to the token's partial output (spmm's bias may be y).
            float* yq = y + q * ldy + c0;
            pb[0] = bs[q];
            pb[1] = be[q];
            ops.spmm(pb, 0, 1, tj, hv, down_panels + c * panel_bytes, dt, P, n, s == 0 ? b : yq, yq, ldy);
          }
        }
      }
    }
  }
  if (prof) {
    tp2 = prof_clock();
    std::fprintf(stderr, "two_phase M=%lld nnz=%lld: lists %.2f up %.2f down %.2f ms\n", (long long)M, (long long)nnz,
                 (tpl - tp0) * 1e3, (tp1 - tpl) * 1e3, (tp2 - tp1) * 1e3);
  }
}

// Which sparse kernel: the two-phase path once the mean number of tokens per neuron, nnz / F,
// reaches kTwoPhaseMinReuse (each panel row then serves several tokens from cache); below it the
// per-token (or token-blocked) kernels, which read only what each token needs and need no
// panels. Measured at d 2048, F 5632, bf16, 2 threads: about equal at 2.6 (29 nnz/token, 512
// tokens), two-phase ahead from 3.3 (5%, 64 tokens) up; 3 keeps very sparse layers at usual
// batch sizes off the panels (and their memory).
constexpr double kTwoPhaseMinReuse = 3.0;

SparseKernel kernel_from_env() {
  const char* v = std::getenv("SPARSELLM_FFN_KERNEL");
  if (!v) return SparseKernel::Auto;
  const std::string s(v);
  if (s == "per-token") return SparseKernel::PerToken;
  if (s == "two-phase") return SparseKernel::TwoPhase;
  return SparseKernel::Auto;
}

std::atomic<int> g_kernel{static_cast<int>(kernel_from_env())};

}  // namespace

void set_sparse_kernel(SparseKernel k) { g_kernel.store(static_cast<int>(k), std::memory_order_relaxed); }
SparseKernel sparse_kernel() { return static_cast<SparseKernel>(g_kernel.load(std::memory_order_relaxed)); }

void detail::ffn_set_two_phase_range_bytes(int64_t bytes) { g_range_bytes.store(std::max<int64_t>(0, bytes)); }

bool detail::ffn_use_two_phase(int64_t M, int64_t nnz, int64_t F) {
  if (M < 2) return false;
  switch (sparse_kernel()) {
    case SparseKernel::PerToken: return false;
    case SparseKernel::TwoPhase: return true;
    default: return static_cast<double>(nnz) >= kTwoPhaseMinReuse * static_cast<double>(F);
  }
}

namespace {

int64_t twell_nnz(const Twell& g) {
  int64_t n = 0;
  for (int64_t m = 0; m < g.rows; ++m) n += g.row_nnz[m];
  return n;
}

void updown_impl(const float* x, int64_t ldx, const Twell& g, const UpDownView& ud, const float* down_bias,
                 float* y, int64_t ldy, const char* panels) {
  if (g.cols != ud.rows) throw std::invalid_argument("twell_updown: activations have " + std::to_string(g.cols) +
                                                     " columns but the weights " + std::to_string(ud.rows) + " neurons");
  if (ud.dtype != DType::F32 && ud.dtype != DType::BF16) throw std::invalid_argument("twell_updown: weights must be f32 or bf16");
  const detail::FfnOps& ops = detail::ffn_ops();
  const int64_t d = ud.cols;
  const int64_t es = dtype_size(ud.dtype);
  const char* base = static_cast<const char*>(ud.data);
  if (detail::ffn_use_two_phase(g.rows, twell_nnz(g), g.cols)) {
    two_phase(x, ldx, g, base, 2 * ud.ld, base + ud.ld * es, 2 * ud.ld, panels,
              panels ? panels + ((d + detail::kSpmmCols - 1) / detail::kSpmmCols) * g.cols * detail::kSpmmCols * es : nullptr,
              ud.dtype, d, down_bias, y, ldy);
    return;
  }
  if (const int64_t B = batch_tokens(g)) {
    batched_rows(g, down_bias, d, y, ldy, B, [&](int64_t j, const int32_t* toks, const float* vals, int64_t n, int64_t m0, int64_t next) {
      ops.updown_batch(x + m0 * ldx, ldx, toks, vals, n, base + j * 2 * ud.ld * es, ud.dtype, ud.ld, d, y + m0 * ldy, ldy,
                       next >= 0 ? base + next * 2 * ud.ld * es : nullptr);
    });
    return;
  }
  sparse_rows(g, down_bias, d, y, ldy, [&](int64_t m, const int32_t* js, const float* vs, int64_t n, float* ym) {
    ops.updown(x + m * ldx, js, vs, n, ud.data, ud.dtype, ud.ld, d, ym, nullptr);
  });
}

void down_impl(const Twell& h, const WeightView& down_t, const float* down_bias, float* y, int64_t ldy,
               const char* panels) {
  if (h.cols != down_t.rows) throw std::invalid_argument("twell_down: activations have " + std::to_string(h.cols) +
                                                        " columns but the weights " + std::to_string(down_t.rows) + " rows");
  if (down_t.dtype != DType::F32 && down_t.dtype != DType::BF16) throw std::invalid_argument("twell_down: weights must be f32 or bf16");
  const detail::FfnOps& ops = detail::ffn_ops();
  const int64_t d = down_t.cols;
  if (detail::ffn_use_two_phase(h.rows, twell_nnz(h), h.cols)) {
    two_phase(nullptr, 0, h, nullptr, 0, static_cast<const char*>(down_t.data), down_t.ld, nullptr, panels, down_t.dtype, d,
              down_bias, y, ldy);
    return;
  }
  if (const int64_t B = batch_tokens(h)) {
    const int64_t es = dtype_size(down_t.dtype);
    const char* base = static_cast<const char*>(down_t.data);
    batched_rows(h, down_bias, d, y, ldy, B, [&](int64_t j, const int32_t* toks, const float* vals, int64_t n, int64_t m0, int64_t next) {
      ops.down_batch(toks, vals, n, base + j * down_t.ld * es, down_t.dtype, d, y + m0 * ldy, ldy,
                     next >= 0 ? base + next * down_t.ld * es : nullptr);
    });
    return;
  }
  sparse_rows(h, down_bias, d, y, ldy, [&](int64_t, const int32_t* js, const float* vs, int64_t n, float* ym) {
    ops.down(js, vs, n, down_t.data, down_t.dtype, down_t.ld, d, ym);
  });
}

}  // namespace

void twell_updown(const float* x, int64_t ldx, const Twell& g, const UpDownView& ud,
                  const float* down_bias, float* y, int64_t ldy) {
  updown_impl(x, ldx, g, ud, down_bias, y, ldy, nullptr);
}

void twell_down(const Twell& h, const WeightView& down_t, const float* down_bias, float* y,
                int64_t ldy) {
  down_impl(h, down_t, down_bias, y, ldy, nullptr);
}

// --- FfnLayer ---------------------------------------------------------------------------------

namespace {

void store(uint8_t* base, DType dt, int64_t i, float v) {
  if (dt == DType::F32) reinterpret_cast<float*>(base)[i] = v;
  else reinterpret_cast<uint16_t*>(base)[i] = f32_to_bf16(v);
}

void check_config(const FfnLayerConfig& c) {
  if (c.d_model < 1 || c.d_ff < 1) throw std::invalid_argument("FfnLayer: dModel and dFF must be positive");
  if (c.dtype != DType::F32 && c.dtype != DType::BF16) throw std::invalid_argument("FfnLayer: dtype must be f32 or bf16");
  Twell probe;
  probe.reset(0, 0, c.twell);  // validates tile / compression
}

}  // namespace

FfnLayer::FfnLayer(const FfnLayerConfig& cfg, const float* gate, const float* up, const float* down,
                   const float* up_bias, const float* down_bias)
    : cfg_(cfg) {
  check_config(cfg);
  const int64_t d = cfg.d_model, F = cfg.d_ff;
  const int es = dtype_size(cfg.dtype);
  if (!up || !down || (cfg.gated && !gate)) throw std::invalid_argument("FfnLayer: missing weights");
  if (cfg.gated) {
    a_own_.resize(static_cast<size_t>(F * d * es));
    b_own_.resize(static_cast<size_t>(F * 2 * d * es));
#pragma omp parallel for schedule(static) num_threads(num_threads())
    for (int64_t j = 0; j < F; ++j)
      for (int64_t k = 0; k < d; ++k) {
        store(a_own_.data(), cfg.dtype, j * d + k, gate[j * d + k]);
        store(b_own_.data(), cfg.dtype, j * 2 * d + k, up[j * d + k]);
        store(b_own_.data(), cfg.dtype, j * 2 * d + d + k, down[k * F + j]);
      }
  } else {
    a_own_.resize(static_cast<size_t>(F * d * es));
    b_own_.resize(static_cast<size_t>(F * d * es));
#pragma omp parallel for schedule(static) num_threads(num_threads())
    for (int64_t j = 0; j < F; ++j)
      for (int64_t k = 0; k < d; ++k) {
        store(a_own_.data(), cfg.dtype, j * d + k, up[j * d + k]);
        store(b_own_.data(), cfg.dtype, j * d + k, down[k * F + j]);
      }
    if (up_bias) up_bias_.assign(up_bias, up_bias + F);
  }
  if (down_bias) down_bias_.assign(down_bias, down_bias + d);
  a_ = a_own_.data();
  b_ = b_own_.data();
}

FfnLayer::FfnLayer(const FfnLayerConfig& cfg, const void* a, const void* b, const float* up_bias,
                   const float* down_bias)
    : cfg_(cfg), a_(a), b_(b) {
  check_config(cfg);
  if (!a || !b) throw std::invalid_argument("FfnLayer: missing weights");
  if (!cfg.gated && up_bias) up_bias_.assign(up_bias, up_bias + cfg.d_ff);
  if (down_bias) down_bias_.assign(down_bias, down_bias + cfg.d_model);
}

WeightView FfnLayer::gate_view() const { return {a_, cfg_.dtype, cfg_.d_ff, cfg_.d_model, cfg_.d_model}; }

UpDownView FfnLayer::updown_view() const {
  if (!cfg_.gated) throw std::logic_error("FfnLayer: updown_view of a non-gated layer");
  return {b_, cfg_.dtype, cfg_.d_ff, cfg_.d_model, cfg_.d_model};
}

WeightView FfnLayer::down_t_view() const {
  if (cfg_.gated) return updown_view().down_t();
  return {b_, cfg_.dtype, cfg_.d_ff, cfg_.d_model, cfg_.d_model};
}

WeightView FfnLayer::up_view() const {
  if (cfg_.gated) return updown_view().up();
  return gate_view();
}

WeightView FfnLayer::down_standard() {
  const int64_t d = cfg_.d_model, F = cfg_.d_ff;
  const int es = dtype_size(cfg_.dtype);
  if (down_std_.empty()) {
    down_std_.resize(static_cast<size_t>(d * F * es));
    const WeightView src = down_t_view();
    const char* s = static_cast<const char*>(src.data);
    char* o = reinterpret_cast<char*>(down_std_.data());
#pragma omp parallel for schedule(static) num_threads(num_threads())
    for (int64_t i = 0; i < d; ++i)
      for (int64_t j = 0; j < F; ++j) std::memcpy(o + (i * F + j) * es, s + (j * src.ld + i) * es, es);
  }
  return {down_std_.data(), cfg_.dtype, d, F, F};
}


const char* FfnLayer::panels() {
  const int64_t d = cfg_.d_model, F = cfg_.d_ff, P = detail::kSpmmCols;
  const int64_t es = dtype_size(cfg_.dtype), chunks = (d + P - 1) / P;
  if (!panels_) {
    // Gated: the up panels, then the down panels; non-gated: the down panels.
    const int mats = cfg_.gated ? 2 : 1;
    panels_ = detail::huge_buffer(static_cast<size_t>(mats * chunks * F * P * es));
    char* o = reinterpret_cast<char*>(panels_.get());
    for (int q = 0; q < mats; ++q) {
      const WeightView src = mats == 2 && q == 0 ? up_view() : down_t_view();
      const char* s = static_cast<const char*>(src.data);
      char* oq = o + q * chunks * F * P * es;
#pragma omp parallel for schedule(static) num_threads(num_threads())
      for (int64_t j = 0; j < F; ++j)
        for (int64_t c = 0; c < chunks; ++c) {
          const int64_t n = std::min(P, d - c * P);
          char* dst = oq + ((c * F + j) * P) * es;
          std::memcpy(dst, s + (j * src.ld + c * P) * es, static_cast<size_t>(n * es));
          if (n < P) std::memset(dst + n * es, 0, static_cast<size_t>((P - n) * es));
        }
    }
  }
  return reinterpret_cast<const char*>(panels_.get());
}

bool FfnLayer::prefer_dense(const SparsityStats& s, int64_t M) const {
  // Cost model of the up+down work (docs/kernels.md "Dense fallback"): the sparse kernel reads
  // each active neuron's weights once per token (memory-bound); the dense GEMMs are compute-bound
  // for many tokens and read every weight once for few.
  const double d = static_cast<double>(cfg_.d_model), F = static_cast<double>(cfg_.d_ff);
  const double mats = cfg_.gated ? 2.0 : 1.0, wb = dtype_size(cfg_.dtype);
  // Two-phase path (many tokens per neuron): at its own FLOP rate, 2/3 of it with f32 weights
  // (twice the panel bytes per pair: measured about equal to dense at 20% density, 512 tokens).
  const double tp_rate = cfg_.twophase_flops_per_s * (cfg_.dtype == DType::F32 ? 2.0 / 3.0 : 1.0);
  const double sparse = detail::ffn_use_two_phase(M, s.nnz, cfg_.d_ff)
                            ? static_cast<double>(s.nnz) * mats * 2.0 * d / tp_rate
                            : static_cast<double>(s.nnz) * mats * d * wb / cfg_.sparse_bytes_per_s;
  const double dense = mats * std::max(2.0 * static_cast<double>(M) * d * F / cfg_.gemm_flops_per_s,
                                       d * F * wb / cfg_.dense_bytes_per_s);
  return sparse > cfg_.auto_crossover * dense;
}

FfnStats FfnLayer::dense_forward(const float* x, int64_t M, float* y, const Twell* gate_done) {
  const int64_t d = cfg_.d_model, F = cfg_.d_ff;
  FfnStats st;
  st.path = FfnPath::Dense;
  st.rows = M;
  float* G;
  if (gate_done) {
    // Overflowing tiles are already in place in the side buffer; scatter the packed ones.
    twell_.to_dense(twell_.dense, F);
    G = twell_.dense;
    static_cast<SparsityStats&>(st) = twell_.finalize();
    st.path = FfnPath::Dense;
  } else {
    if (work_.size() < static_cast<size_t>(M * F)) work_.resize(static_cast<size_t>(M * F));
    G = work_.data();
    std::vector<std::atomic<int64_t>> row_nnz(static_cast<size_t>(M));
    for (auto& r : row_nnz) r.store(0, std::memory_order_relaxed);
    const float* bias = up_bias();
    const GateAct act = cfg_.act;
    gemm_epilogue(x, d, M, gate_view(),
                  [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1, float* c, int64_t ldc, int) {
                    const bool plain = act.plain_relu();
                    for (int64_t m = m0; m < m1; ++m) {
                      const float* cr = c + (m - m0) * ldc;
                      float* gr = G + m * F + n0;
                      int64_t n = 0;
                      if (plain)
                        for (int64_t k = 0; k < n1 - n0; ++k) {
                          float v = cr[k] + (bias ? bias[n0 + k] : 0.f);
                          v = v > 0.f ? v : 0.f;
                          n += v > 0.f;
                          gr[k] = v;
                        }
                      else
                        for (int64_t k = 0; k < n1 - n0; ++k) {
                          const float v = act.apply(cr[k] + (bias ? bias[n0 + k] : 0.f));
                          n += v != 0.f;
                          gr[k] = v;
                        }
                      row_nnz[static_cast<size_t>(m)].fetch_add(n, std::memory_order_relaxed);
                    }
                  });
    for (int64_t m = 0; m < M; ++m) {
      const int64_t n = row_nnz[static_cast<size_t>(m)].load();
      st.nnz += n;
      st.max_row_nnz = std::max(st.max_row_nnz, n);
    }
  }
  if (cfg_.gated) {
    gemm_epilogue(x, d, M, up_view(),
                  [&](int64_t m0, int64_t m1, int64_t n0, int64_t n1, float* c, int64_t ldc, int) {
                    for (int64_t m = m0; m < m1; ++m) {
                      const float* cr = c + (m - m0) * ldc;
                      float* gr = G + m * F + n0;
                      for (int64_t k = 0; k < n1 - n0; ++k) gr[k] *= cr[k];
                    }
                  });
  }
  gemm(G, F, M, down_standard(), y, d);
  if (const float* b = down_bias()) {
#pragma omp parallel for schedule(static) num_threads(num_threads())
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < d; ++k) y[m * d + k] += b[k];
  }
  return st;
}

FfnStats FfnLayer::sparse_forward(const float* x, int64_t M, float* y) {
  const int64_t d = cfg_.d_model;
  FfnStats st;
  static_cast<SparsityStats&>(st) = twell_gate(x, d, M, gate_view(), up_bias(), cfg_.twell, twell_, cfg_.act);
  st.path = FfnPath::Sparse;
  st.two_phase = detail::ffn_use_two_phase(M, st.nnz, cfg_.d_ff);
  const char* panels = st.two_phase ? this->panels() : nullptr;
  if (cfg_.gated) updown_impl(x, d, twell_, updown_view(), down_bias(), y, d, panels);
  else down_impl(twell_, down_t_view(), down_bias(), y, d, panels);
  return st;
}

FfnStats FfnLayer::forward(const float* x, int64_t M, float* y, FfnMode mode) {
  if (M < 0) throw std::invalid_argument("FfnLayer.forward: negative token count");
  if (M == 0) return FfnStats{};
  if (mode == FfnMode::Dense) return dense_forward(x, M, y, nullptr);
  if (mode == FfnMode::Sparse) return sparse_forward(x, M, y);
  const int64_t d = cfg_.d_model;
  if (auto_dense_) {
    // The previous call found the activations too dense: run the plain dense path (whose gate
    // epilogue counts the non-zeros anyway) and re-decide from this call's counts.
    FfnStats st = dense_forward(x, M, y, nullptr);
    auto_dense_ = prefer_dense(st, M);
    return st;
  }
  const SparsityStats s = twell_gate(x, d, M, gate_view(), up_bias(), cfg_.twell, twell_, cfg_.act);
  if (prefer_dense(s, M)) {
    auto_dense_ = true;
    return dense_forward(x, M, y, &twell_);
  }
  FfnStats st;
  static_cast<SparsityStats&>(st) = s;
  st.path = FfnPath::Sparse;
  st.two_phase = detail::ffn_use_two_phase(M, st.nnz, cfg_.d_ff);
  const char* panels = st.two_phase ? this->panels() : nullptr;
  if (cfg_.gated) updown_impl(x, d, twell_, updown_view(), down_bias(), y, d, panels);
  else down_impl(twell_, down_t_view(), down_bias(), y, d, panels);
  return st;
}

}  // namespace sparsellm
