// Internal: the row softmax of causal attention, compiled once per ISA (model_attention_*.cpp)
// from the same plain loops, and dispatched at run time. Everything here has internal linkage
// so that the AVX-512 / AVX2 builds of these inline functions never leak into portable code.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace sparsellm {

// S [T, n_cols] (ldS): row t keeps columns 0 .. pos0 + t (clamped to n_cols) and becomes
// softmax(scale · S[t, :n]) there, zeros after. Threads split the rows.
void softmax_causal_rows(float* S, int64_t ldS, int64_t T, int64_t n_cols, int64_t pos0, float scale);
void softmax_causal_rows_avx2(float* S, int64_t ldS, int64_t T, int64_t n_cols, int64_t pos0, float scale);
void softmax_causal_rows_avx512(float* S, int64_t ldS, int64_t T, int64_t n_cols, int64_t pos0, float scale);

// One decode query of one head over n_keys cached keys: orow = Σ_j softmax(scale · q·K_j)_j · V_j.
// K, V [n_keys, hd] contiguous rows; scores: n_keys floats of scratch. AVX2 and AVX-512 have
// intrinsic kernels (model_attention_*.cpp); attend_one_impl below is the portable one.
using AttendOneFn = void (*)(const float* q, const float* K, const float* V, int64_t hd, int64_t n_keys, float scale,
                             float* scores, float* orow);
void attend_one_avx2(const float* q, const float* K, const float* V, int64_t hd, int64_t n_keys, float scale,
                     float* scores, float* orow);
void attend_one_avx512(const float* q, const float* K, const float* V, int64_t hd, int64_t n_keys, float scale,
                       float* scores, float* orow);
// The same over a bf16 cache (K, V as bf16 bits, widened in registers; f32 arithmetic).
using AttendOneBf16Fn = void (*)(const float* q, const uint16_t* K, const uint16_t* V, int64_t hd, int64_t n_keys,
                                 float scale, float* scores, float* orow);
void attend_one_bf16_avx2(const float* q, const uint16_t* K, const uint16_t* V, int64_t hd, int64_t n_keys, float scale,
                          float* scores, float* orow);
void attend_one_bf16_avx512(const float* q, const uint16_t* K, const uint16_t* V, int64_t hd, int64_t n_keys,
                            float scale, float* scores, float* orow);

namespace {

// exp(x) for x <= 0 (inputs after subtracting the row maximum), relative error < 2e-7, as
// straight-line code the compiler vectorises: Cody-Waite reduction by ln 2 and a degree-6
// polynomial (the Cephes expf coefficients), scaled by 2^n through the exponent bits.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return y * __builtin_bit_cast(float, bits);
}

inline void softmax_causal_rows_impl(float* S, int64_t ldS, int64_t T, int64_t n_cols, int64_t pos0, float scale,
                                     int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (T * n_cols >= 16384)
  for (int64_t t = 0; t < T; ++t) {
    float* row = S + t * ldS;
    const int64_t n = pos0 + t + 1 < n_cols ? pos0 + t + 1 : n_cols;
    float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < n; ++j) mx = row[j] > mx ? row[j] : mx;
    mx *= scale;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) {
      const float e = exp_nonpositive(row[j] * scale - mx);
      row[j] = e;
      sum += e;
    }
    const float inv = 1.f / sum;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) row[j] *= inv;
    if (n < n_cols) std::memset(row + n, 0, sizeof(float) * static_cast<size_t>(n_cols - n));
  }
}

// A cached element as f32 (bf16 bits widen exactly).
inline float widen(float v) { return v; }
inline float widen(uint16_t h) { return __builtin_bit_cast(float, static_cast<uint32_t>(h) << 16); }

// Prefetch the cache lines of rows [j0, j1) of a [*, hd] block of T.
template <typename T>
inline void prefetch_rows(const T* X, int64_t hd, int64_t j0, int64_t j1) {
  const char* p = reinterpret_cast<const char*>(X + j0 * hd);
  const char* e = reinterpret_cast<const char*>(X + j1 * hd);
  for (; p < e; p += 64) __builtin_prefetch(p, 0, 3);
}

// q · k over hd elements as 16 lane sums added in a tree (depth 4), not one serial chain: the
// plain `omp simd` reduction became 16 dependent scalar adds per key.
template <typename T>
inline float dot_lanes16(const float* q, const T* k, int64_t hd) {
  float acc[16] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 16 <= hd; i += 16)
#pragma omp simd
    for (int l = 0; l < 16; ++l) acc[l] += q[i + l] * widen(k[i + l]);
  for (int l = 0; i + l < hd; ++l) acc[l] += q[i + l] * widen(k[i + l]);
  for (int w = 8; w >= 1; w /= 2)
#pragma omp simd
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

// The cached keys and values are cold (the layer's weights streamed through the caches since
// this head was last read) and one (query, head) walks them as two short streams: prefetching
// a few rows ahead, and the first rows of both up front, keeps more misses in flight.
constexpr int64_t kAttendPrefetchRows = 8;
// Output columns accumulated in registers across all keys (then stored once).
constexpr int64_t kAttendOutBlock = 64;

// The first pass of a decode query, shared by every ISA's kernel: scores[j] = scale · dot(q, K_j)
// with `dot` the ISA's product, key rows prefetched kAttendPrefetchRows ahead and the first value
// rows up front; returns the largest score.
template <typename T, typename Dot>
inline float attend_scores(const float* q, const T* K, const T* V, int64_t hd, int64_t n_keys, float scale,
                           float* scores, Dot&& dot) {
  const int64_t pf = kAttendPrefetchRows;
  prefetch_rows(K, hd, 0, n_keys < pf ? n_keys : pf);
  prefetch_rows(V, hd, 0, n_keys < pf ? n_keys : pf);
  float mx = -INFINITY;
  for (int64_t j = 0; j < n_keys; ++j) {
    if (j + pf < n_keys) prefetch_rows(K, hd, j + pf, j + pf + 1);
    const float s = dot(q, K + j * hd, hd) * scale;
    scores[j] = s;
    mx = s > mx ? s : mx;
  }
  return mx;
}

template <typename T>
inline void attend_one_impl(const float* q, const T* K, const T* V, int64_t hd, int64_t n_keys, float scale,
                            float* scores, float* orow) {
  const int64_t pf = kAttendPrefetchRows;
  const float mx = attend_scores(q, K, V, hd, n_keys, scale, scores, dot_lanes16<T>);
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n_keys; ++j) {
    const float e = exp_nonpositive(scores[j] - mx);
    scores[j] = e;
    sum += e;
  }
  const float inv = 1.f / sum;
#pragma omp simd
  for (int64_t j = 0; j < n_keys; ++j) scores[j] *= inv;
  for (int64_t i0 = 0; i0 < hd; i0 += kAttendOutBlock) {
    const int64_t w = hd - i0 < kAttendOutBlock ? hd - i0 : kAttendOutBlock;
    float acc[kAttendOutBlock] = {};
    if (w == kAttendOutBlock) {
      for (int64_t j = 0; j < n_keys; ++j) {
        if (i0 == 0 && j + pf < n_keys) prefetch_rows(V, hd, j + pf, j + pf + 1);
        const float p = scores[j];
        const T* vr = V + j * hd + i0;
#pragma omp simd
        for (int64_t l = 0; l < kAttendOutBlock; ++l) acc[l] += p * widen(vr[l]);
      }
    } else {
      for (int64_t j = 0; j < n_keys; ++j) {
        if (i0 == 0 && j + pf < n_keys) prefetch_rows(V, hd, j + pf, j + pf + 1);
        const float p = scores[j];
        const T* vr = V + j * hd + i0;
        for (int64_t l = 0; l < w; ++l) acc[l] += p * widen(vr[l]);
      }
    }
    for (int64_t l = 0; l < w; ++l) orow[i0 + l] = acc[l];
  }
}

}  // namespace
}  // namespace sparsellm
