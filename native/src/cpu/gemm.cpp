// Dense GEMM driver: C[M, N] = A[M, K] · Wᵀ (W [N, K], f32 or bf16).
//
// GotoBLAS/BLIS-style blocking, portable C++; the ISA-specific pieces (packing, register tile,
// small-M kernel) come from gemm_kernels.h, picked with active_isa() at run time.
//   - K is cut into blocks of ~kc; M into chunks of mb rows. A chunk of A is packed once (all of K,
//     in micro-panels of MR rows) into a buffer shared by the threads.
//   - Threads take blocks of nc columns of W (and, when there are too few, slices of the M chunk).
//     For each K block a thread packs its kc x nc slab of W (widening bf16) into a thread-local
//     buffer that stays in L2, then runs the register tile over every (A panel, W panel) pair,
//     A panel outermost so that it stays in L1 while the W panels stream from L2.
//   - gemm accumulates straight into C; gemm_epilogue accumulates into a thread-local mb x nc
//     block and hands it to the epilogue once its K loop is done (same kernels).
//   - M <= gemv_max_m (decode) goes to a streaming kernel instead: each thread reads its share of
//     W's rows exactly once, several rows in flight.
#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "aligned_buffer.h"
#include "gemm_kernels.h"
#include "sparsellm/cpu_info.h"
#include "sparsellm/gemm.h"

namespace sparsellm {
namespace gemm_detail {
namespace {

// ---- portable kernels: register tile 4 x 8, scalar loops -----------------------------------
constexpr int PMR = 4;
constexpr int PNR = 8;

void p_pack_a(const float* A, int64_t lda, int64_t rows, int64_t K, float* dst) {
  for (int64_t p0 = 0; p0 < rows; p0 += PMR) {
    float* panel = dst + (p0 / PMR) * K * PMR;
    for (int64_t k = 0; k < K; ++k)
      for (int64_t r = 0; r < PMR; ++r) panel[k * PMR + r] = p0 + r < rows ? A[(p0 + r) * lda + k] : 0.f;
  }
}

template <typename T, typename F>
void p_pack_w(const T* W, int64_t ldw, int64_t cols, int64_t kc, float* dst, F widen) {
  for (int64_t q0 = 0; q0 < cols; q0 += PNR) {
    float* panel = dst + (q0 / PNR) * kc * PNR;
    for (int64_t i = 0; i < PNR; ++i) {
      if (q0 + i < cols) {
        const T* w = W + (q0 + i) * ldw;
        for (int64_t k = 0; k < kc; ++k) panel[k * PNR + i] = widen(w[k]);
      } else {
        for (int64_t k = 0; k < kc; ++k) panel[k * PNR + i] = 0.f;
      }
    }
  }
}
void p_pack_w_f32(const float* W, int64_t ldw, int64_t cols, int64_t kc, float* dst) {
  p_pack_w(W, ldw, cols, kc, dst, [](float x) { return x; });
}
void p_pack_w_bf16(const uint16_t* W, int64_t ldw, int64_t cols, int64_t kc, float* dst) {
  p_pack_w(W, ldw, cols, kc, dst, [](uint16_t h) { return bf16_to_f32(h); });
}

void p_micro(int64_t kc, const float* a, const float* w, float* c, int64_t ldc, int rows, int cols, bool accumulate) {
  float acc[PMR][PNR] = {};
  for (int64_t k = 0; k < kc; ++k, a += PMR, w += PNR)
    for (int r = 0; r < PMR; ++r)
      for (int n = 0; n < PNR; ++n) acc[r][n] += a[r] * w[n];
  for (int r = 0; r < rows; ++r)
    for (int n = 0; n < cols; ++n) c[r * ldc + n] = accumulate ? c[r * ldc + n] + acc[r][n] : acc[r][n];
}

template <typename T, typename F>
void p_gemv(const float* A, int64_t lda, int64_t M, const T* W, int64_t ldw, int64_t K, int64_t n0, int64_t n1,
            float* c, int64_t ldc, F widen) {
  for (int64_t n = n0; n < n1; ++n) {
    const T* w = W + n * ldw;
    for (int64_t m = 0; m < M; ++m) {
      const float* a = A + m * lda;
      float s[4] = {0, 0, 0, 0};
      int64_t k = 0;
      for (; k + 4 <= K; k += 4)
        for (int j = 0; j < 4; ++j) s[j] += a[k + j] * widen(w[k + j]);
      for (; k < K; ++k) s[0] += a[k] * widen(w[k]);
      c[m * ldc + (n - n0)] = (s[0] + s[1]) + (s[2] + s[3]);
    }
  }
}
void p_gemv_f32(const float* A, int64_t lda, int64_t M, const float* W, int64_t ldw, int64_t K, int64_t n0, int64_t n1,
                float* c, int64_t ldc) {
  p_gemv(A, lda, M, W, ldw, K, n0, n1, c, ldc, [](float x) { return x; });
}
void p_gemv_bf16(const float* A, int64_t lda, int64_t M, const uint16_t* W, int64_t ldw, int64_t K, int64_t n0,
                 int64_t n1, float* c, int64_t ldc) {
  p_gemv(A, lda, M, W, ldw, K, n0, n1, c, ldc, [](uint16_t h) { return bf16_to_f32(h); });
}

const Kernels k_portable{"portable 4x8", PMR, PNR, 4, p_pack_a, p_pack_w_f32, p_pack_w_bf16, p_micro, p_gemv_f32, p_gemv_bf16};

}  // namespace

const Kernels& kernels_portable() { return k_portable; }

}  // namespace gemm_detail

namespace {

using gemm_detail::Kernels;

const Kernels& pick_kernels() {
  switch (active_isa()) {
    case Isa::Avx512: return gemm_detail::kernels_avx512();
    case Isa::Avx2: return gemm_detail::kernels_avx2();
    default: return gemm_detail::kernels_portable();
  }
}

int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  long long x = std::strtoll(v, &end, 10);
  return (end && *end == 0 && x > 0) ? x : fallback;
}

GemmTuning initial_tuning() {
  GemmTuning t;
  t.kc = env_int("SPARSELLM_GEMM_KC", t.kc);
  t.nc = env_int("SPARSELLM_GEMM_NC", t.nc);
  t.mc = env_int("SPARSELLM_GEMM_MC", t.mc);
  t.mc_epilogue = env_int("SPARSELLM_GEMM_MC_EPILOGUE", t.mc_epilogue);
  if (const char* v = std::getenv("SPARSELLM_GEMM_GEMV_MAX_M")) {
    char* end = nullptr;
    const long long x = std::strtoll(v, &end, 10);
    if (*v && end && *end == 0 && x >= -1) t.gemv_max_m = x;
  }
  return t;
}

GemmTuning& tuning_ref() {
  static GemmTuning t = initial_tuning();
  return t;
}

// Scratch, one per thread (the packed W slab, the epilogue C block) or per calling thread (the
// packed A chunk).
using Buffer = detail::AlignedBuffer;
thread_local Buffer t_apack, t_wpack, t_cblock;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
int64_t div_up(int64_t x, int64_t m) { return (x + m - 1) / m; }

void check_args(const float* A, int64_t lda, int64_t M, const WeightView& W) {
  if (M < 0 || W.rows < 0 || W.cols < 0) throw std::invalid_argument("gemm: negative shape");
  if (W.dtype != DType::F32 && W.dtype != DType::BF16) throw std::invalid_argument("gemm: W must be f32 or bf16");
  if (W.rows > 0 && W.ld < W.cols) throw std::invalid_argument("gemm: W.ld < W.cols");
  if (M > 0 && lda < W.cols) throw std::invalid_argument("gemm: lda < K");
  if (M > 0 && W.rows > 0 && W.cols > 0 && (!A || !W.data)) throw std::invalid_argument("gemm: null pointer");
}

// Collects the first exception thrown inside a parallel region (an epilogue may throw), so it can
// be rethrown on the calling thread instead of terminating the process.
struct ErrorSlot {
  std::mutex mu;
  std::exception_ptr first;
  bool failed = false;
  void capture() {
    std::lock_guard<std::mutex> lock(mu);
    if (!first) first = std::current_exception();
    failed = true;
  }
  void rethrow() {
    if (first) std::rethrow_exception(first);
  }
};

// Either C (gemm) or an epilogue (gemm_epilogue) receives the result.
struct Sink {
  float* C = nullptr;
  int64_t ldc = 0;
  const GemmEpilogue* epilogue = nullptr;
};

// Width of the column blocks: a multiple of the register tile width, or of n_align when set.
int64_t column_block(int64_t N, int64_t nc, int64_t nr, int64_t n_align, int threads, int64_t min_blocks_per_thread) {
  const int64_t unit = n_align > 0 ? n_align : nr;
  int64_t b = round_up(std::max<int64_t>(nc, 1), unit);
  // Enough blocks to keep every thread busy.
  while (b > unit && div_up(N, b) < threads * min_blocks_per_thread) b = round_up(b / 2, unit);
  return b;
}

void run_gemv(const Kernels& kr, const float* A, int64_t lda, int64_t M, const WeightView& W, const Sink& sink,
              int64_t n_align, int threads) {
  const int64_t N = W.rows, K = W.cols;
  const GemmTuning& t = tuning_ref();
  // Blocks of contiguous W rows (each streams contiguous memory), a few per thread and handed
  // out dynamically, so that a thread delayed by the OS does not hold the others up; for the
  // epilogue, blocks of about nc columns aligned to n_align.
  const int64_t nb = sink.epilogue ? column_block(N, t.nc, 16, n_align, threads, 1)
                                   : column_block(N, round_up(div_up(N, 4 * threads), 16), 16, 0, threads, 4);
  const int64_t blocks = div_up(N, nb);
  ErrorSlot err;
  threads = static_cast<int>(std::min<int64_t>(threads, blocks));
#pragma omp parallel num_threads(threads)
  {
    const int tid = omp_get_thread_num();
    float* buf = nullptr;
#pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < blocks; ++b) {
      if (err.failed) continue;
      try {
        const int64_t n0 = b * nb, n1 = std::min(N, n0 + nb);
        if (sink.epilogue && !buf) buf = t_cblock.get(static_cast<size_t>(M * nb));
        float* c = sink.epilogue ? buf : sink.C + n0;
        const int64_t ldc = sink.epilogue ? nb : sink.ldc;
        if (W.dtype == DType::BF16)
          kr.gemv_bf16(A, lda, M, static_cast<const uint16_t*>(W.data), W.ld, K, n0, n1, c, ldc);
        else
          kr.gemv_f32(A, lda, M, static_cast<const float*>(W.data), W.ld, K, n0, n1, c, ldc);
        if (sink.epilogue) (*sink.epilogue)(0, M, n0, n1, buf, nb, tid);
      } catch (...) {
        err.capture();
      }
    }
  }
  err.rethrow();
}

void run_packed(const Kernels& kr, const float* A, int64_t lda, int64_t M, const WeightView& W, const Sink& sink,
                int64_t n_align, int threads) {
  const int64_t N = W.rows, K = W.cols;
  const GemmTuning& t = tuning_ref();
  const int64_t mr = kr.mr, nr = kr.nr;
  const int64_t nk = std::max<int64_t>(1, div_up(K, std::max<int64_t>(16, t.kc)));
  const int64_t kc_max = div_up(K, nk);
  // Work items are nc columns wide (a multiple of n_align for the epilogue); W is packed in
  // slabs of at most ns columns inside an item, so a wide n_align does not push the slab out of L2.
  const int64_t nc = column_block(N, t.nc, nr, n_align, threads, 2);
  const int64_t ns = std::min(round_up(nc, nr), round_up(std::max<int64_t>(t.nc, 1), nr));
  const int64_t nblocks = div_up(N, nc);
  // Rows per M chunk: the epilogue's C block (rows x nc) must stay in cache (<= 1 MiB); the
  // packed A chunk (rows x K) is bounded to 32 MiB.
  int64_t mc = std::max<int64_t>(t.mc, 1);
  if (sink.epilogue) mc = std::min<int64_t>(t.mc_epilogue, (int64_t(1) << 18) / nc);
  mc = std::min<int64_t>(mc, (int64_t(1) << 23) / std::max<int64_t>(K, 1));
  mc = std::max<int64_t>(mr, round_up(std::min(mc, M), mr));
  const int64_t wpack_floats = ns * kc_max;
  float* apack = t_apack.get(static_cast<size_t>(round_up(std::min(mc, round_up(M, mr)), mr) * std::max<int64_t>(K, 1)));
  ErrorSlot err;

  for (int64_t mc0 = 0; mc0 < M && !err.failed; mc0 += mc) {
    const int64_t rows = std::min(mc, M - mc0);
    const int64_t panels = div_up(rows, mr);
    // Too few column blocks for the threads: also split the chunk's panels between them.
    const int64_t msplit = nblocks >= threads ? 1 : std::min<int64_t>(panels, div_up(threads, nblocks));
    const int64_t items = nblocks * msplit;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(dynamic, 4)
      for (int64_t p = 0; p < panels; ++p)
        kr.pack_a(A + (mc0 + p * mr) * lda, lda, std::min<int64_t>(mr, rows - p * mr), K, apack + p * mr * K);
      const int tid = omp_get_thread_num();
#pragma omp for schedule(dynamic, 1)
      for (int64_t item = 0; item < items; ++item) {
        if (err.failed) continue;
        try {
          const int64_t jb = item / msplit, ms = item % msplit;
          const int64_t n0 = jb * nc, n1 = std::min(N, n0 + nc), cols = n1 - n0;
          const int64_t p0 = panels * ms / msplit, p1 = panels * (ms + 1) / msplit;
          if (p0 == p1) continue;
          const int64_t r0 = p0 * mr, r1 = std::min(rows, p1 * mr);  // rows within the chunk
          float* wpack = t_wpack.get(static_cast<size_t>(wpack_floats));
          float* c;
          int64_t ldc;
          if (sink.epilogue) {
            c = t_cblock.get(static_cast<size_t>((r1 - r0) * nc));
            ldc = nc;
          } else {
            c = sink.C + (mc0 + r0) * sink.ldc + n0;
            ldc = sink.ldc;
          }
          for (int64_t kb = 0; kb < nk; ++kb) {
            const int64_t k0 = kb * kc_max, kc = std::min(kc_max, K - k0);
            for (int64_t s0 = 0; s0 < cols; s0 += ns) {
              const int64_t sn = std::min(ns, cols - s0);
              if (W.dtype == DType::BF16)
                kr.pack_w_bf16(static_cast<const uint16_t*>(W.data) + (n0 + s0) * W.ld + k0, W.ld, sn, kc, wpack);
              else
                kr.pack_w_f32(static_cast<const float*>(W.data) + (n0 + s0) * W.ld + k0, W.ld, sn, kc, wpack);
              for (int64_t p = p0; p < p1; ++p) {
                const float* a = apack + p * mr * K + k0 * mr;
                const int pr = static_cast<int>(std::min<int64_t>(mr, rows - p * mr));
                float* crow = c + (p * mr - r0) * ldc + s0;
                for (int64_t q = 0; q < sn; q += nr)
                  kr.micro(kc, a, wpack + (q / nr) * kc * nr, crow + q, ldc, pr, static_cast<int>(std::min(nr, sn - q)),
                           kb > 0);
              }
            }
          }
          if (sink.epilogue) (*sink.epilogue)(mc0 + r0, mc0 + r1, n0, n1, c, ldc, tid);
        } catch (...) {
          err.capture();
        }
      }
    }
  }
  err.rethrow();
}

void run(const float* A, int64_t lda, int64_t M, const WeightView& W, const Sink& sink, int64_t n_align) {
  check_args(A, lda, M, W);
  if (n_align < 0) throw std::invalid_argument("gemm_epilogue: n_align must be >= 0");
  const int64_t N = W.rows;
  if (M == 0 || N == 0) return;
  if (!sink.epilogue && sink.ldc < N) throw std::invalid_argument("gemm: ldc < N");
  const Kernels& kr = pick_kernels();
  const int threads = std::max(1, num_threads());
  const int64_t gemv_max_m = tuning_ref().gemv_max_m >= 0 ? tuning_ref().gemv_max_m : kr.gemv_max_m;
  if (M <= gemv_max_m)
    run_gemv(kr, A, lda, M, W, sink, n_align, threads);
  else
    run_packed(kr, A, lda, M, W, sink, n_align, threads);
}

}  // namespace

void gemm(const float* A, int64_t lda, int64_t M, const WeightView& W, float* C, int64_t ldc) {
  Sink s;
  s.C = C;
  s.ldc = ldc;
  run(A, lda, M, W, s, 0);
}

void gemm_epilogue(const float* A, int64_t lda, int64_t M, const WeightView& W, const GemmEpilogue& epilogue,
                   const GemmOptions& options) {
  if (!epilogue) throw std::invalid_argument("gemm_epilogue: empty epilogue");
  Sink s;
  s.epilogue = &epilogue;
  run(A, lda, M, W, s, options.n_align);
}

void gemm_reference(const float* A, int64_t lda, int64_t M, const WeightView& W, float* C, int64_t ldc) {
  check_args(A, lda, M, W);
  const int64_t N = W.rows;
  if (M == 0 || N == 0) return;
  if (ldc < N) throw std::invalid_argument("gemm_reference: ldc < N");
  const Kernels& kr = gemm_detail::kernels_portable();
  const int threads = std::max(1, num_threads());
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t n0 = 0; n0 < N; n0 += 64) {
    const int64_t n1 = std::min(N, n0 + 64);
    if (W.dtype == DType::BF16)
      kr.gemv_bf16(A, lda, M, static_cast<const uint16_t*>(W.data), W.ld, W.cols, n0, n1, C + n0, ldc);
    else
      kr.gemv_f32(A, lda, M, static_cast<const float*>(W.data), W.ld, W.cols, n0, n1, C + n0, ldc);
  }
}

const char* gemm_kernel_name() { return pick_kernels().name; }

int64_t gemm_gemv_max_m() {
  return tuning_ref().gemv_max_m >= 0 ? tuning_ref().gemv_max_m : pick_kernels().gemv_max_m;
}

GemmTuning gemm_tuning() { return tuning_ref(); }

void set_gemm_tuning(const GemmTuning& t) {
  if (t.kc < 16 || t.nc < 1 || t.mc < 1 || t.mc_epilogue < 1 || t.gemv_max_m < -1)
    throw std::invalid_argument("set_gemm_tuning: kc >= 16, nc, mc, mc_epilogue >= 1, gemv_max_m >= -1");
  tuning_ref() = t;
}

}  // namespace sparsellm
