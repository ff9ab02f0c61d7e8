// Decode GEMV driver (sparsellm/model.h, gemv / gemv_multi): y_i = x · W_iᵀ for 1 .. 4 tokens,
// several weight matrices sharing one input in a single parallel region. The rows of all the
// matrices are concatenated and cut into a few contiguous chunks per thread (chunk_count), so
// each thread streams long contiguous runs with no per-call allocation; the ISA row kernels
// (gemv_kernels.h) keep several rows in flight per thread.
#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>

#include "aligned_buffer.h"
#include "gemv_kernels.h"
#include "gemv_tasks.h"
#include "sparsellm/cpu_info.h"
#include "sparsellm/model.h"

namespace sparsellm {
namespace gemv_detail {
namespace {

// Portable kernels: one row at a time, four partial sums.
template <typename T, typename F>
void p_rows(const GemvArgs& a, const T* W, int64_t ldw, int64_t n0, int64_t n1, float* y, int64_t ldy, F widen) {
  for (int64_t i = n0; i < n1; ++i) {
    const int64_t n = a.rows ? a.rows[i] : i;
    const T* w = W + n * ldw;
    for (int m = 0; m < a.M; ++m) {
      const float* x = a.x + m * a.ldx;
      float s[4] = {0, 0, 0, 0};
      int64_t k = 0;
      for (; k + 4 <= a.K; k += 4)
        for (int j = 0; j < 4; ++j) s[j] += x[k + j] * widen(w[k + j]);
      for (; k < a.K; ++k) s[0] += x[k] * widen(w[k]);
      y[m * ldy + n] = (s[0] + s[1]) + (s[2] + s[3]);
    }
  }
}
void p_bf16(const GemvArgs& a, const uint16_t* W, int64_t ldw, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  p_rows(a, W, ldw, n0, n1, y, ldy, [](uint16_t h) { return bf16_to_f32(h); });
}
void p_f32(const GemvArgs& a, const float* W, int64_t ldw, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  p_rows(a, W, ldw, n0, n1, y, ldy, [](float v) { return v; });
}
const GemvKernels k_portable{"portable", false, p_bf16, p_f32, nullptr};

const GemvKernels& pick() {
  switch (active_isa()) {
    case Isa::Avx512: return gemv_kernels_avx512();
    case Isa::Avx2: return gemv_kernels_avx2();
    default: return k_portable;
  }
}

int64_t prefetch_bytes() {
  static const int64_t pf = [] {
    const char* v = std::getenv("SPARSELLM_GEMV_PF");
    const long long x = v && *v ? std::strtoll(v, nullptr, 10) : 0;
    return x >= 64 && x <= (1 << 16) ? static_cast<int64_t>(x) / 64 * 64 : int64_t(1024);
  }();
  return pf;
}

// The even/odd split of x, per calling thread, grown on demand.
using SplitBuffer = detail::AlignedBuffer;
thread_local SplitBuffer t_split;

// Work is cut into a few contiguous chunks per thread, handed out in order as threads come:
// on a quiet machine each thread streams about its static share, and a thread the OS delays
// holds the others up by one chunk at most. The result never depends on which thread ran a
// chunk (rows are independent; gemv_updown sums its per-chunk partials in chunk order).
int64_t chunk_count(int64_t units, int threads) {
  if (threads <= 1) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(4 * threads, units / 16));
}

// The arguments of tokens [g0, g0 + min(4, M - g0)): with the ISA's split layout, the even and
// odd elements of their x rows go into the calling thread's buffer (read by all threads).
GemvArgs token_group(const GemvKernels& kr, const float* x, int64_t ldx, int64_t K, int64_t M, int64_t g0) {
  GemvArgs a;
  a.K = K;
  a.ldx = ldx;
  a.pf = prefetch_bytes();
  a.K2 = gemv_k2(K);
  a.M = static_cast<int>(std::min<int64_t>(kMaxTokens, M - g0));
  a.x = x + g0 * ldx;
  if (kr.split && K > 0) {
    float* buf = t_split.get(static_cast<size_t>(2 * a.M * a.K2));
    a.xe = buf;
    a.xo = buf + a.M * a.K2;
    for (int m = 0; m < a.M; ++m) {
      const float* xr = a.x + m * ldx;
      float* e = buf + m * a.K2;
      float* o = buf + (a.M + m) * a.K2;
      for (int64_t j = 0; j < a.K2; ++j) {
        e[j] = 2 * j < K ? xr[2 * j] : 0.f;
        o[j] = 2 * j + 1 < K ? xr[2 * j + 1] : 0.f;
      }
    }
  }
  return a;
}

}  // namespace
}  // namespace gemv_detail

using namespace gemv_detail;

const char* gemv_kernel_name() { return pick().name; }

void gemv_multi(const float* x, int64_t ldx, int64_t M, const GemvOutput* outs, int n_outs) {
  if (M < 0 || n_outs < 0) throw std::invalid_argument("gemv: negative shape");
  if (M == 0 || n_outs == 0) return;
  const int64_t K = outs[0].w.cols;
  int64_t R = 0;
  for (int i = 0; i < n_outs; ++i) {
    const GemvOutput& o = outs[i];
    if (o.w.cols != K) throw std::invalid_argument("gemv: every matrix must have the same K");
    if (o.w.dtype != DType::F32 && o.w.dtype != DType::BF16) throw std::invalid_argument("gemv: W must be f32 or bf16");
    if (o.w.rows < 0 || (o.w.rows > 0 && o.w.ld < K)) throw std::invalid_argument("gemv: W.ld < K");
    if (o.w.rows > 0 && (!o.w.data || !o.y || (M > 1 && o.ldy < o.w.rows)))
      throw std::invalid_argument("gemv: null pointer or ldy < rows");
    R += o.w.rows;
  }
  if (ldx < K || !x) throw std::invalid_argument("gemv: ldx < K or null x");
  if (R == 0) return;
  const GemvKernels& kr = pick();
  // Small products are not worth waking the team: at least 256 KiB of weights per thread.
  int64_t bytes = 0;
  for (int i = 0; i < n_outs; ++i) bytes += outs[i].w.rows * K * dtype_size(outs[i].w.dtype);
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads(), bytes >> 18)));
  const int64_t chunks = chunk_count(R, threads);
  for (int64_t g0 = 0; g0 < M; g0 += kMaxTokens) {
    const GemvArgs a = token_group(kr, x, ldx, K, M, g0);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t r0 = R * c / chunks, r1 = R * (c + 1) / chunks;
      int64_t off = 0;
      for (int i = 0; i < n_outs && off < r1; ++i) {
        const GemvOutput& o = outs[i];
        const int64_t lo = std::max(r0, off), hi = std::min(r1, off + o.w.rows);
        if (lo < hi) {
          float* y = o.y + g0 * o.ldy;
          if (o.w.dtype == DType::BF16)
            kr.bf16(a, static_cast<const uint16_t*>(o.w.data), o.w.ld, lo - off, hi - off, y, o.ldy);
          else
            kr.f32(a, static_cast<const float*>(o.w.data), o.w.ld, lo - off, hi - off, y, o.ldy);
        }
        off += o.w.rows;
      }
    }
  }
}

GemvRowsTask::GemvRowsTask(const float* x, int64_t ldx, int64_t M, const WeightView& W) : k_(&pick()), w_(W) {
  if (M < 1 || M > kMaxTokens) throw std::invalid_argument("GemvRowsTask: 1 to 4 tokens");
  if (W.dtype != DType::F32 && W.dtype != DType::BF16) throw std::invalid_argument("GemvRowsTask: W must be f32 or bf16");
  if (!W.data || !x || W.ld < W.cols || ldx < W.cols) throw std::invalid_argument("GemvRowsTask: null pointer or bad leading dimension");
  a_ = token_group(*k_, x, ldx, W.cols, M, 0);
}

void GemvRowsTask::run(const int32_t* rows, int64_t n, float* y, int64_t ldy) const {
  if (n <= 0) return;
  GemvArgs a = a_;
  a.rows = rows;
  if (w_.dtype == DType::BF16) k_->bf16(a, static_cast<const uint16_t*>(w_.data), w_.ld, 0, n, y, ldy);
  else k_->f32(a, static_cast<const float*>(w_.data), w_.ld, 0, n, y, ldy);
}

void gemv_rows(const float* x, int64_t ldx, int64_t M, const WeightView& W, const int32_t* rows, int64_t n, float* y,
               int64_t ldy) {
  if (M < 0 || n < 0) throw std::invalid_argument("gemv_rows: negative shape");
  if (M == 0 || n == 0) return;
  if (W.dtype != DType::F32 && W.dtype != DType::BF16) throw std::invalid_argument("gemv_rows: W must be f32 or bf16");
  if (!W.data || !x || !y || !rows || W.ld < W.cols || ldx < W.cols || (M > 1 && ldy < W.rows))
    throw std::invalid_argument("gemv_rows: null pointer or bad leading dimension");
  for (int64_t i = 0; i < n; ++i)
    if (rows[i] < 0 || rows[i] >= W.rows) throw std::invalid_argument("gemv_rows: row index out of range");
  // Scattered rows are latency-bound, not bandwidth-bound: both threads from a few rows on.
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads(), n / 8)));
  const int64_t chunks = chunk_count(n * 16, threads);
  for (int64_t g0 = 0; g0 < M; g0 += kMaxTokens) {
    const GemvRowsTask task(x + g0 * ldx, ldx, std::min<int64_t>(kMaxTokens, M - g0), W);
    float* yg = y + g0 * ldy;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t i0 = n * c / chunks, i1 = n * (c + 1) / chunks;
      task.run(rows + i0, i1 - i0, yg, ldy);
    }
  }
}

bool gemv_updown_available() { return pick().updown_bf16 != nullptr; }

namespace {

// gemv_updown over neurons [0, F), or over the n listed neurons rows[0 .. n) (gemv_updown_rows).
bool updown_driver(const float* x, int64_t ldx, int64_t M, const float* coef, int64_t ldc, const UpDownView& ud,
                   const int32_t* rows, int64_t n, const float* bias, float* y, int64_t ldy) {
  const GemvKernels& kr = pick();
  if (!kr.updown_bf16 || ud.dtype != DType::BF16) return false;
  const int64_t d = ud.cols, F = ud.rows;
  if (M < 0 || F < 0 || n < 0 || d < 1 || ud.ld < d || ldx < d || ldy < d || ldc < F)
    throw std::invalid_argument("gemv_updown: bad shape");
  if (M == 0) return true;
  GemvArgs base;
  base.K = d;
  base.ldx = ldx;
  base.pf = prefetch_bytes();
  base.K2 = gemv_k2(d);
  base.rows = rows;
  // Fixed chunking (independent of the thread count), so the partial sums and their order are
  // the same however many threads run. Listed neurons are scattered (latency-bound): each chunk
  // prefetches a tile of blocks ahead, so a few tiles per chunk; both threads from 24 neurons on.
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(8, rows ? n / 12 : n / 16));
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads(), chunks)));
  for (int64_t g0 = 0; g0 < M; g0 += kMaxTokens) {
    GemvArgs a = base;
    a.M = static_cast<int>(std::min<int64_t>(kMaxTokens, M - g0));
    a.x = x + g0 * ldx;
    const size_t part = static_cast<size_t>(2 * a.M * a.K2);  // one thread's split y
    float* buf = t_split.get(part * static_cast<size_t>(chunks + 1));
    a.xe = buf;
    a.xo = buf + a.M * a.K2;
    for (int m = 0; m < a.M; ++m) {
      const float* xr = a.x + m * ldx;
      for (int64_t j = 0; j < a.K2; ++j) {
        buf[m * a.K2 + j] = 2 * j < d ? xr[2 * j] : 0.f;
        buf[(a.M + m) * a.K2 + j] = 2 * j + 1 < d ? xr[2 * j + 1] : 0.f;
      }
    }
    float* parts = buf + part;
    const float* cg = coef + g0 * ldc;
    float* yg = y + g0 * ldy;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(dynamic, 1)
      for (int64_t c = 0; c < chunks; ++c) {
        float* ye = parts + part * static_cast<size_t>(c);
        float* yo = ye + a.M * a.K2;
        std::memset(ye, 0, part * sizeof(float));
        kr.updown_bf16(a, cg, ldc, static_cast<const uint16_t*>(ud.data), 2 * ud.ld, n * c / chunks,
                       n * (c + 1) / chunks, ye, yo);
      }
      // y = bias, plus the chunks' partials in chunk order, back from the even/odd split; each
      // thread takes a range of split positions i (outputs 2i and 2i + 1).
#pragma omp for schedule(static)
      for (int64_t i = 0; i < a.K2; ++i) {
        for (int m = 0; m < a.M; ++m) {
          const size_t ae = static_cast<size_t>(m * a.K2 + i), ao = ae + static_cast<size_t>(a.M * a.K2);
          float se = bias && 2 * i < d ? bias[2 * i] : 0.f, so = bias && 2 * i + 1 < d ? bias[2 * i + 1] : 0.f;
          for (int64_t u = 0; u < chunks; ++u) {
            se += parts[part * static_cast<size_t>(u) + ae];
            so += parts[part * static_cast<size_t>(u) + ao];
          }
          if (2 * i < d) yg[m * ldy + 2 * i] = se;
          if (2 * i + 1 < d) yg[m * ldy + 2 * i + 1] = so;
        }
      }
    }
  }
  return true;
}

}  // namespace

bool gemv_updown(const float* x, int64_t ldx, int64_t M, const float* coef, int64_t ldc, const UpDownView& ud,
                 const float* bias, float* y, int64_t ldy) {
  return updown_driver(x, ldx, M, coef, ldc, ud, nullptr, ud.rows, bias, y, ldy);
}

bool gemv_updown_rows(const float* x, int64_t ldx, int64_t M, const float* coef, int64_t ldc, const UpDownView& ud,
                      const int32_t* rows, int64_t n, const float* bias, float* y, int64_t ldy) {
  if (n > 0 && !rows) throw std::invalid_argument("gemv_updown_rows: null list");
  for (int64_t i = 0; i < n; ++i)
    if (rows[i] < 0 || rows[i] >= ud.rows) throw std::invalid_argument("gemv_updown_rows: neuron index out of range");
  return updown_driver(x, ldx, M, coef, ldc, ud, rows, n, bias, y, ldy);
}

void gemv(const float* x, int64_t ldx, int64_t M, const WeightView& W, float* y, int64_t ldy) {
  const GemvOutput o{W, y, ldy};
  gemv_multi(x, ldx, M, &o, 1);
}

}  // namespace sparsellm
