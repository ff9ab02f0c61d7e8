// Portable vector primitives of the sparse FFN kernels (see ffn_kernels.h) and the dispatcher.
#include "ffn_kernels.h"

#include "sparsellm/cpu_info.h"

namespace sparsellm::detail {
namespace {

template <typename W>
inline float wval(const W* w, int64_t k);
template <>
inline float wval<float>(const float* w, int64_t k) { return w[k]; }
template <>
inline float wval<uint16_t>(const uint16_t* w, int64_t k) { return bf16_to_f32(w[k]); }

template <typename W>
float dot_t(const float* x, const W* w, int64_t n) {
  // Four partial sums so the compiler can vectorise without reassociating one long chain.
  float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t k = 0;
  for (; k + 4 <= n; k += 4) {
    s0 += x[k] * wval(w, k);
    s1 += x[k + 1] * wval(w, k + 1);
    s2 += x[k + 2] * wval(w, k + 2);
    s3 += x[k + 3] * wval(w, k + 3);
  }
  for (; k < n; ++k) s0 += x[k] * wval(w, k);
  return (s0 + s1) + (s2 + s3);
}

template <typename W>
void axpy_t(float* y, float a, const W* w, int64_t n) {
  for (int64_t k = 0; k < n; ++k) y[k] += a * wval(w, k);
}

float dot(const float* x, const void* w, DType dt, int64_t n) {
  return dt == DType::F32 ? dot_t(x, static_cast<const float*>(w), n)
                          : dot_t(x, static_cast<const uint16_t*>(w), n);
}

void axpy(float* y, float a, const void* w, DType dt, int64_t n) {
  if (dt == DType::F32) axpy_t(y, a, static_cast<const float*>(w), n);
  else axpy_t(y, a, static_cast<const uint16_t*>(w), n);
}

template <typename W>
void updown_t(const float* x, const int32_t* j, const float* g, int64_t cnt, const W* ud,
              int64_t ld, int64_t d, float* y, float* u_out) {
  for (int64_t i = 0; i < cnt; ++i) {
    const W* b = ud + static_cast<int64_t>(j[i]) * 2 * ld;
    const float u = dot_t(x, b, d);
    if (u_out) u_out[i] = u;
    axpy_t(y, g[i] * u, b + ld, d);
  }
}

void updown(const float* x, const int32_t* j, const float* g, int64_t cnt, const void* ud,
            DType dt, int64_t ld, int64_t d, float* y, float* u_out) {
  if (dt == DType::F32) updown_t(x, j, g, cnt, static_cast<const float*>(ud), ld, d, y, u_out);
  else updown_t(x, j, g, cnt, static_cast<const uint16_t*>(ud), ld, d, y, u_out);
}

void down(const int32_t* j, const float* h, int64_t cnt, const void* w, DType dt, int64_t ldw,
          int64_t d, float* y) {
  const int64_t es = dtype_size(dt);
  for (int64_t i = 0; i < cnt; ++i)
    axpy(y, h[i], static_cast<const char*>(w) + static_cast<int64_t>(j[i]) * ldw * es, dt, d);
}

void updown_batch(const float* x, int64_t ldx, const int32_t* t, const float* g, int64_t n,
                  const void* b, DType dt, int64_t ld, int64_t d, float* y, int64_t ldy, const void*) {
  const int64_t es = dtype_size(dt);
  const void* dn = static_cast<const char*>(b) + ld * es;
  for (int64_t i = 0; i < n; ++i) {
    const float u = dot(x + static_cast<int64_t>(t[i]) * ldx, b, dt, d);
    axpy(y + static_cast<int64_t>(t[i]) * ldy, g[i] * u, dn, dt, d);
  }
}

void down_batch(const int32_t* t, const float* h, int64_t n, const void* w, DType dt, int64_t d,
                float* y, int64_t ldy, const void*) {
  for (int64_t i = 0; i < n; ++i) axpy(y + static_cast<int64_t>(t[i]) * ldy, h[i], w, dt, d);
}

int64_t nonzeros(const float* src, int64_t n, int32_t base, int32_t* js, float* vs) {
  int64_t c = 0;
  for (int64_t k = 0; k < n; ++k)
    if (src[k] != 0.f) {
      js[c] = base + static_cast<int32_t>(k);
      vs[c] = src[k];
      ++c;
    }
  return c;
}

void updot(const int64_t* ptr, int64_t m0, int64_t m1, const int32_t* j, const float* x, int64_t ldx,
           const void* w, DType dt, int64_t ldw, int64_t n, float* u, bool accumulate) {
  const int64_t es = dtype_size(dt);
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t i = ptr[m]; i < ptr[m + 1]; ++i) {
      const float s = dot(x + m * ldx, static_cast<const char*>(w) + static_cast<int64_t>(j[i]) * ldw * es, dt, n);
      u[i] = accumulate ? u[i] + s : s;
    }
}

template <typename W>
void spmm_t(const int64_t* ptr, int64_t m0, int64_t m1, const int32_t* j, const float* h, const W* w,
            int64_t ldw, int64_t n, const float* bias, float* y, int64_t ldy) {
  float acc[kSpmmCols];
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t c = 0; c < n; ++c) acc[c] = 0.f;
    for (int64_t i = ptr[m]; i < ptr[m + 1]; ++i) {
      const W* r = w + static_cast<int64_t>(j[i]) * ldw;
      const float hv = h[i];
      for (int64_t c = 0; c < n; ++c) acc[c] += hv * wval(r, c);
    }
    float* ym = y + m * ldy;
    for (int64_t c = 0; c < n; ++c) ym[c] = (bias ? bias[c] : 0.f) + acc[c];
  }
}

void spmm(const int64_t* ptr, int64_t m0, int64_t m1, const int32_t* j, const float* h, const void* w,
          DType dt, int64_t ldw, int64_t n, const float* bias, float* y, int64_t ldy) {
  if (dt == DType::F32) spmm_t(ptr, m0, m1, j, h, static_cast<const float*>(w), ldw, n, bias, y, ldy);
  else spmm_t(ptr, m0, m1, j, h, static_cast<const uint16_t*>(w), ldw, n, bias, y, ldy);
}

const FfnOps kPortable{dot, axpy, updown, down, updown_batch, down_batch, nonzeros, updot, spmm};

}  // namespace

const FfnOps& ffn_ops_portable() { return kPortable; }

const FfnOps& ffn_ops() {
  switch (active_isa()) {
    case Isa::Avx512: return ffn_ops_avx512();
    case Isa::Avx2: return ffn_ops_avx2();
    default: return ffn_ops_portable();
  }
}

}  // namespace sparsellm::detail
