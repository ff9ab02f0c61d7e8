// Transformer pieces other than the projections and FFN kernels (see sparsellm/model.h).
// Portable code: the compiler vectorises the inner loops (omp simd); these are a small share
// of a forward pass next to the projections.
#include <omp.h>
#include <sys/mman.h>
#if defined(__x86_64__)
#include <emmintrin.h>  // SSE2 (x86-64 baseline): non-temporal stores
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <vector>

#include "model_kernels.h"
#include "sparsellm/cpu_info.h"
#include "sparsellm/gemm.h"
#include "sparsellm/model.h"

namespace sparsellm {
namespace {

// Reads row `r` of a weight table into f32 (widening bf16 / f16).
inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) bits = sign;
    else {
      // subnormal: normalise
      int e = -1;
      do { mant <<= 1; ++e; } while (!(mant & 0x400));
      bits = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (mant & 0x3ff) << 13;
    }
  } else if (exp == 0x1f) bits = sign | 0x7f800000u | mant << 13;
  else bits = sign | (exp + 112) << 23 | mant << 13;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

template <bool Accumulate>
inline void read_row(const WeightView& w, int64_t r, float* out) {
  const int64_t n = w.cols;
  if (w.dtype == DType::F32) {
    const float* src = static_cast<const float*>(w.data) + r * w.ld;
    if (Accumulate) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) out[i] += src[i];
    } else {
      std::memcpy(out, src, sizeof(float) * n);
    }
  } else if (w.dtype == DType::BF16) {
    const uint16_t* src = static_cast<const uint16_t*>(w.data) + r * w.ld;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float v = bf16_to_f32(src[i]);
      out[i] = Accumulate ? out[i] + v : v;
    }
  } else {
    const uint16_t* src = static_cast<const uint16_t*>(w.data) + r * w.ld;
    for (int64_t i = 0; i < n; ++i) {
      const float v = f16_to_f32(src[i]);
      out[i] = Accumulate ? out[i] + v : v;
    }
  }
}

inline bool parallel_rows(int64_t T, int64_t width) { return T > 1 && T * width >= 16384; }

}  // namespace

void embed_tokens(const WeightView& table, const int32_t* tokens, int64_t T, float* out, int64_t ldo) {
#pragma omp parallel for num_threads(num_threads()) if (parallel_rows(T, table.cols))
  for (int64_t t = 0; t < T; ++t) read_row<false>(table, tokens[t], out + t * ldo);
}

void add_learned_positions(const WeightView& table, int64_t pos0, int64_t offset, int64_t T, float* out,
                           int64_t ldo) {
#pragma omp parallel for num_threads(num_threads()) if (parallel_rows(T, table.cols))
  for (int64_t t = 0; t < T; ++t) read_row<true>(table, pos0 + t + offset, out + t * ldo);
}

void rms_norm(const float* x, int64_t ldx, int64_t T, int64_t d, const float* w, float eps, float* y,
              int64_t ldy) {
#pragma omp parallel for num_threads(num_threads()) if (parallel_rows(T, d))
  for (int64_t t = 0; t < T; ++t) {
    const float* xr = x + t * ldx;
    float* yr = y + t * ldy;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < d; ++i) ss += xr[i] * xr[i];
    const float r = 1.f / std::sqrt(ss / static_cast<float>(d) + eps);
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) yr[i] = xr[i] * r * w[i];
  }
}

void layer_norm(const float* x, int64_t ldx, int64_t T, int64_t d, const float* w, const float* b, float eps,
                float* y, int64_t ldy) {
#pragma omp parallel for num_threads(num_threads()) if (parallel_rows(T, d))
  for (int64_t t = 0; t < T; ++t) {
    const float* xr = x + t * ldx;
    float* yr = y + t * ldy;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < d; ++i) s += xr[i];
    const float mean = s / static_cast<float>(d);
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < d; ++i) ss += (xr[i] - mean) * (xr[i] - mean);
    const float r = 1.f / std::sqrt(ss / static_cast<float>(d) + eps);
    if (b) {
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) yr[i] = (xr[i] - mean) * r * w[i] + b[i];
    } else {
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) yr[i] = (xr[i] - mean) * r * w[i];
    }
  }
}

void rope_table(int64_t T, int64_t head_dim, int64_t pos0, double theta, float* cs) {
  const int64_t half = head_dim / 2;
  std::vector<double> inv_freq(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i)
    inv_freq[static_cast<size_t>(i)] = std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(head_dim));
#pragma omp parallel for num_threads(num_threads()) if (T * half >= 16384)
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t i = 0; i < half; ++i) {
      const double angle = static_cast<double>(pos0 + t) * inv_freq[static_cast<size_t>(i)];
      cs[(t * half + i) * 2] = static_cast<float>(std::cos(angle));
      cs[(t * half + i) * 2 + 1] = static_cast<float>(std::sin(angle));
    }
  }
}

void rope_apply(float* x, int64_t ldx, int64_t T, int64_t n_heads, int64_t head_dim, const float* cs) {
  const int64_t half = head_dim / 2;
#pragma omp parallel for num_threads(num_threads()) if (parallel_rows(T, n_heads * head_dim))
  for (int64_t t = 0; t < T; ++t) {
    const float* c = cs + t * half * 2;
    for (int64_t h = 0; h < n_heads; ++h) {
      float* xh = x + t * ldx + h * head_dim;
      for (int64_t i = 0; i < half; ++i) {
        const float a = xh[i], b = xh[i + half];
        const float co = c[2 * i], si = c[2 * i + 1];
        xh[i] = a * co - b * si;
        xh[i + half] = b * co + a * si;
      }
    }
  }
}

void rope_rotate_half(float* x, int64_t ldx, int64_t T, int64_t n_heads, int64_t head_dim, int64_t pos0,
                      double theta) {
  std::vector<float> cs(static_cast<size_t>(T * head_dim));
  rope_table(T, head_dim, pos0, theta, cs.data());
  rope_apply(x, ldx, T, n_heads, head_dim, cs.data());
}

void add_bias(float* x, int64_t ldx, int64_t T, int64_t n, const float* b) {
#pragma omp parallel for num_threads(num_threads()) if (parallel_rows(T, n))
  for (int64_t t = 0; t < T; ++t) {
    float* xr = x + t * ldx;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) xr[i] += b[i];
  }
}

namespace {

inline float act_one(float v, ActKind act) {
  switch (act) {
    case ActKind::Relu: return v > 0.f ? v : 0.f;
    case ActKind::Silu: return v / (1.f + std::exp(-v));
    case ActKind::GeluErf: return 0.5f * v * (1.f + std::erf(v * 0.70710678118654752f));
    case ActKind::GeluTanh: {
      const float k = 0.79788456080286536f;  // sqrt(2 / pi)
      return 0.5f * v * (1.f + std::tanh(k * (v + 0.044715f * v * v * v)));
    }
    default: return v;
  }
}

}  // namespace

void activate(float* x, int64_t ldx, int64_t T, int64_t n, ActKind act) {
  if (act == ActKind::Identity) return;
#pragma omp parallel for num_threads(num_threads()) if (parallel_rows(T, n))
  for (int64_t t = 0; t < T; ++t) {
    float* xr = x + t * ldx;
    for (int64_t i = 0; i < n; ++i) xr[i] = act_one(xr[i], act);
  }
}

void activate_mul(float* x, int64_t ldx, const float* y, int64_t ldy, int64_t T, int64_t n, ActKind act) {
#pragma omp parallel for num_threads(num_threads()) if (parallel_rows(T, n))
  for (int64_t t = 0; t < T; ++t) {
    float* xr = x + t * ldx;
    const float* yr = y + t * ldy;
    for (int64_t i = 0; i < n; ++i) xr[i] = act_one(xr[i], act) * yr[i];
  }
}

void add_inplace(float* x, int64_t ldx, const float* y, int64_t ldy, int64_t T, int64_t n) {
#pragma omp parallel for num_threads(num_threads()) if (parallel_rows(T, n))
  for (int64_t t = 0; t < T; ++t) {
    float* xr = x + t * ldx;
    const float* yr = y + t * ldy;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) xr[i] += yr[i];
  }
}

FloatRegion::~FloatRegion() {
  if (region_) ::munmap(region_, bytes_);
}

void FloatRegion::allocate(size_t n, bool huge) {
  if (region_) ::munmap(region_, bytes_);
  region_ = nullptr;
  data_ = nullptr;
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t need = std::max<size_t>(1, n) * sizeof(float);
  bytes_ = huge ? (need + kHuge - 1) / kHuge * kHuge + kHuge : need;
  void* p = ::mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  region_ = p;
  if (huge) {
    float* base = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(p) + kHuge - 1) / kHuge * kHuge);
    ::madvise(base, bytes_ - kHuge, MADV_HUGEPAGE);  // advice: without THP it is plain memory
    data_ = base;
  } else {
    data_ = static_cast<float*>(p);
  }
}

void KvCache::allocate(int64_t layers, int64_t kv_heads, int64_t hd, int64_t positions, DType type) {
  if (type != DType::F32 && type != DType::BF16) throw std::invalid_argument("KV cache: dtype must be f32 or bf16");
  n_layers = layers;
  n_kv_heads = kv_heads;
  head_dim = hd;
  capacity = positions;
  length = 0;
  dtype = type;
  const size_t n = static_cast<size_t>(layers * kv_heads * positions * hd);
  const size_t floats = type == DType::F32 ? n : (n + 1) / 2;  // bf16: two elements per float
  const bool huge = 2 * floats * sizeof(float) <= kKvHugePageMaxBytes;
  k.allocate(floats, huge);
  v.allocate(floats, huge);
}

namespace {

// One cached row. The rows of a decode step land in 2·n_kv_heads places far apart, each cold:
// plain stores first read every line from memory (a write-allocate, ~29 us per layer for 64
// rows of 256 B on the proxy); non-temporal stores write whole lines without reading them.
// (The attention that follows reads the cache from memory anyway.)
inline void store_row(float* dst, const float* src, int64_t n) {
#if defined(__x86_64__)
  int64_t i = 0;
  if ((reinterpret_cast<uintptr_t>(dst) & 15) == 0) {
    for (; i + 4 <= n; i += 4) _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
  }
  for (; i < n; ++i) dst[i] = src[i];
#else
  std::memcpy(dst, src, sizeof(float) * static_cast<size_t>(n));
#endif
}

// One bf16 row, rounded to nearest even (plain stores: a row is half as many lines).
inline void store_row(uint16_t* dst, const float* src, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
}

template <typename E>
void store_rows(KvCache& cache, int64_t layer, const float* k, int64_t ldk, const float* v, int64_t ldv, int64_t T,
                int64_t pos0) {
  const int64_t hd = cache.head_dim;
#pragma omp parallel for num_threads(num_threads()) if (cache.n_kv_heads > 1 && T * cache.n_kv_heads * hd >= 65536)
  for (int64_t h = 0; h < cache.n_kv_heads; ++h) {
    for (int64_t t = 0; t < T; ++t) store_row(cache.k_at<E>(layer, h, pos0 + t), k + t * ldk + h * hd, hd);
    for (int64_t t = 0; t < T; ++t) store_row(cache.v_at<E>(layer, h, pos0 + t), v + t * ldv + h * hd, hd);
  }
}

}  // namespace

void kv_cache_store(KvCache& cache, int64_t layer, const float* k, int64_t ldk, const float* v, int64_t ldv,
                    int64_t T, int64_t pos0) {
  if (cache.dtype == DType::BF16) store_rows<uint16_t>(cache, layer, k, ldk, v, ldv, T, pos0);
  else store_rows<float>(cache, layer, k, ldk, v, ldv, T, pos0);
#if defined(__x86_64__)
  _mm_sfence();  // the streamed rows are visible to every thread before they are read
#endif
}

void softmax_causal_rows(float* S, int64_t ldS, int64_t T, int64_t n_cols, int64_t pos0, float scale) {
  switch (active_isa()) {
    case Isa::Avx512: return softmax_causal_rows_avx512(S, ldS, T, n_cols, pos0, scale);
    case Isa::Avx2: return softmax_causal_rows_avx2(S, ldS, T, n_cols, pos0, scale);
    default: return softmax_causal_rows_impl(S, ldS, T, n_cols, pos0, scale, num_threads());
  }
}

namespace {

// Vᵀ [hd, keys] (f32) from one head's value rows V [keys, hd] (f32 or bf16), 16 keys at a time.
template <typename T>
void transpose_values(const T* V, int64_t hd, int64_t keys, float* Vt) {
  for (int64_t j0 = 0; j0 < keys; j0 += 16) {
    const int64_t j1 = std::min(keys, j0 + 16);
    for (int64_t i = 0; i < hd; ++i)
      for (int64_t j = j0; j < j1; ++j) Vt[i * keys + j] = widen(V[j * hd + i]);
  }
}

// Few queries: one pass per (query, head) over the cache; threads split the (query, head) pairs
// when there is enough work to pay for waking them. The exponentials use the same polynomial
// as the prefill softmax (relative error < 2e-7).
constexpr int64_t kParallelAttentionWork = int64_t(1) << 16;
void attention_rows(const float* q, int64_t ldq, int64_t T, int64_t n_heads, const KvCache& cache, int64_t layer,
                    int64_t pos0, float* out, int64_t ldo) {
  const int64_t hd = cache.head_dim;
  const int64_t group = n_heads / cache.n_kv_heads;
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  const int64_t max_keys = pos0 + T;
  const int threads = num_threads();
  std::vector<float> scratch(static_cast<size_t>(threads) * static_cast<size_t>(max_keys));
  const int64_t work = n_heads * T;
  const Isa isa = active_isa();
  const bool bf = cache.dtype == DType::BF16;
  const AttendOneFn attend = isa == Isa::Avx512 ? attend_one_avx512 : isa == Isa::Avx2 ? attend_one_avx2 : attend_one_impl<float>;
  const AttendOneBf16Fn attend_bf16 = isa == Isa::Avx512 ? attend_one_bf16_avx512
                                      : isa == Isa::Avx2 ? attend_one_bf16_avx2
                                                         : attend_one_impl<uint16_t>;
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1) if (work > 1 && max_keys * hd * work >= kParallelAttentionWork)
  for (int64_t item = 0; item < work; ++item) {
    const int64_t t = T - 1 - item / n_heads;
    const int64_t h = item % n_heads;
    const int64_t kvh = h / group;
    float* scores = scratch.data() + static_cast<size_t>(omp_get_thread_num()) * static_cast<size_t>(max_keys);
    const float* qr = q + t * ldq + h * hd;
    const int64_t n_keys = pos0 + t + 1;
    float* orow = out + t * ldo + h * hd;
    if (bf)
      attend_bf16(qr, cache.k_at<uint16_t>(layer, kvh, 0), cache.v_at<uint16_t>(layer, kvh, 0), hd, n_keys, scale, scores,
                  orow);
    else
      attend(qr, cache.k_at<float>(layer, kvh, 0), cache.v_at<float>(layer, kvh, 0), hd, n_keys, scale, scores, orow);
  }
}

}  // namespace

void attention_causal(const float* q, int64_t ldq, int64_t T, int64_t n_heads, const KvCache& cache,
                      int64_t layer, int64_t pos0, float* out, int64_t ldo) {
  if (T < kAttentionGemmMinTokens) return attention_rows(q, ldq, T, n_heads, cache, layer, pos0, out, ldo);
  // Many queries: per head, Vᵀ [hd, keys] into scratch (the weight of P·V = S·(Vᵀ)ᵀ); then per
  // block of queries, S = Q_blk·K_hᵀ over the keys the block can see (causal: keys 0 .. pos0 +
  // last query of the block), causal softmax in place, O_blk = S·V_h. Keys past a row's
  // position are zeroed by the softmax, so the second product adds nothing for them. One
  // parallel region: the threads take whole heads (query heads of a group transpose the same
  // values; that copy is ~1/(2·block) of the head's products), each running its GEMMs alone.
  const int64_t hd = cache.head_dim;
  const int64_t group = n_heads / cache.n_kv_heads;
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  const int64_t nqb = (T + kAttentionQueryBlock - 1) / kAttentionQueryBlock;
  const int64_t keys_all = pos0 + T;
  const int threads = static_cast<int>(std::min<int64_t>(num_threads(), n_heads));
  std::exception_ptr error;
#pragma omp parallel num_threads(threads)
  {
    omp_set_num_threads(1);  // this thread's GEMMs and softmax run on it alone
    std::vector<float> S, Vt;
#pragma omp for schedule(dynamic, 1)
    for (int64_t h = 0; h < n_heads; ++h) {
      try {
        const int64_t kvh = h / group;
        if (static_cast<int64_t>(Vt.size()) < hd * keys_all) Vt.resize(static_cast<size_t>(hd * keys_all));
        if (cache.dtype == DType::BF16) transpose_values(cache.v_at<uint16_t>(layer, kvh, 0), hd, keys_all, Vt.data());
        else transpose_values(cache.v_at<float>(layer, kvh, 0), hd, keys_all, Vt.data());
        for (int64_t qb = nqb - 1; qb >= 0; --qb) {
          const int64_t t0 = qb * kAttentionQueryBlock, t1 = std::min(T, t0 + kAttentionQueryBlock);
          const int64_t keys = pos0 + t1, rows = t1 - t0;
          if (static_cast<int64_t>(S.size()) < rows * keys) S.resize(static_cast<size_t>(rows * keys));
          const void* kp = cache.dtype == DType::BF16 ? static_cast<const void*>(cache.k_at<uint16_t>(layer, kvh, 0))
                                                       : static_cast<const void*>(cache.k_at<float>(layer, kvh, 0));
          const WeightView K{kp, cache.dtype, keys, hd, hd};
          gemm(q + t0 * ldq + h * hd, ldq, rows, K, S.data(), keys);
          softmax_causal_rows(S.data(), keys, rows, keys, pos0 + t0, scale);
          const WeightView VtW{Vt.data(), DType::F32, hd, keys, keys_all};
          gemm(S.data(), keys, rows, VtW, out + t0 * ldo + h * hd, ldo);
        }
      } catch (...) {
#pragma omp critical(sparsellm_attention_error)
        if (!error) error = std::current_exception();
      }
    }
  }
  if (error) std::rethrow_exception(error);
}

}  // namespace sparsellm
