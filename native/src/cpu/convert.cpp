// Element conversions for packing (sparsellm/convert.h): branch-free loops the compiler
// vectorises, F16C kernels for f16 where the CPU has them, and the neuron-major gather of W_down
// columns in cache-sized tiles.
#include "sparsellm/convert.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "sparsellm/cpu_info.h"

namespace sparsellm {

size_t elem_size(ElemType t) { return t == ElemType::F32 ? 4 : 2; }

uint16_t f32_to_bf16_ref(uint32_t bits) {
  if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu) != 0) return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  const uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

uint16_t f32_to_f16_ref(uint32_t bits) {
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const int exp = static_cast<int>((bits >> 23) & 0xffu);
  uint32_t mant = bits & 0x7fffffu;
  if (exp == 0xff) return static_cast<uint16_t>(sign | 0x7c00u | (mant ? 0x200u | (mant >> 13) : 0u));
  const int e = exp - 127 + 15;
  if (e >= 0x1f) return static_cast<uint16_t>(sign | 0x7c00u);
  if (e <= 0) {
    if (e < -10) return static_cast<uint16_t>(sign);
    mant |= 0x800000u;
    const int shift = 14 - e;
    const uint32_t half = 1u << (shift - 1);
    const uint32_t rem = mant & ((1u << shift) - 1u);
    uint32_t out = mant >> shift;
    if (rem > half || (rem == half && (out & 1u))) out++;
    return static_cast<uint16_t>(sign | out);
  }
  uint32_t out = (static_cast<uint32_t>(e) << 10) | (mant >> 13);
  const uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (out & 1u))) out++;
  return static_cast<uint16_t>(sign | out);
}

uint32_t f16_to_f32_ref(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return sign | 0x7f800000u | (mant ? 0x00400000u | (mant << 13) : 0u);
  if (exp == 0) {
    if (mant == 0) return sign;
    // Subnormal: mant · 2^-24, normalised.
    int e = 113;  // exponent field of 2^-14
    while (!(mant & 0x400u)) {
      mant <<= 1;
      --e;
    }
    return sign | (static_cast<uint32_t>(e) << 23) | ((mant & 0x3ffu) << 13);
  }
  return sign | ((exp + 112u) << 23) | (mant << 13);
}

namespace {

// --- contiguous spans ------------------------------------------------------------------------

void f32_to_bf16_span(const uint32_t* s, uint16_t* d, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    const uint32_t x = s[i];
    const uint32_t r = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
    const uint32_t q = (x >> 16) | 0x40u;
    d[i] = static_cast<uint16_t>((x & 0x7fffffffu) > 0x7f800000u ? q : r);
  }
}

void bf16_to_f32_span(const uint16_t* s, uint32_t* d, size_t n) {
  for (size_t i = 0; i < n; ++i) d[i] = static_cast<uint32_t>(s[i]) << 16;
}

void f32_to_f16_span(const uint32_t* s, uint16_t* d, size_t n) {
  if (active_isa() >= Isa::Avx2) return convert_detail::f32_to_f16_avx2(s, d, n);
  for (size_t i = 0; i < n; ++i) d[i] = f32_to_f16_ref(s[i]);
}

void f16_to_f32_span(const uint16_t* s, uint32_t* d, size_t n) {
  if (active_isa() >= Isa::Avx2) return convert_detail::f16_to_f32_avx2(s, d, n);
  for (size_t i = 0; i < n; ++i) d[i] = f16_to_f32_ref(s[i]);
}

// One span, any pair (16-bit to 16-bit goes through f32 in small stack blocks).
void convert_span(const void* src, ElemType from, void* dst, ElemType to, size_t n) {
  if (n == 0) return;
  if (from == to) {
    std::memcpy(dst, src, n * elem_size(from));
    return;
  }
  if (from == ElemType::F32) {
    const uint32_t* s = static_cast<const uint32_t*>(src);
    if (to == ElemType::BF16) f32_to_bf16_span(s, static_cast<uint16_t*>(dst), n);
    else f32_to_f16_span(s, static_cast<uint16_t*>(dst), n);
    return;
  }
  const uint16_t* s = static_cast<const uint16_t*>(src);
  if (to == ElemType::F32) {
    if (from == ElemType::BF16) bf16_to_f32_span(s, static_cast<uint32_t*>(dst), n);
    else f16_to_f32_span(s, static_cast<uint32_t*>(dst), n);
    return;
  }
  constexpr size_t B = 1024;
  alignas(64) uint32_t tmp[B];
  uint16_t* d = static_cast<uint16_t*>(dst);
  for (size_t i = 0; i < n; i += B) {
    const size_t m = std::min(B, n - i);
    if (from == ElemType::BF16) {
      bf16_to_f32_span(s + i, tmp, m);
      f32_to_f16_span(tmp, d + i, m);
    } else {
      f16_to_f32_span(s + i, tmp, m);
      f32_to_bf16_span(tmp, d + i, m);
    }
  }
}

void check_type(ElemType t) {
  if (t != ElemType::F32 && t != ElemType::F16 && t != ElemType::BF16) throw std::invalid_argument("convert: unknown element type");
}

// Gathers columns [c0, c0 + nc) × rows [r0, r0 + nr) of a row-major [*, F] matrix into tile
// rows of length `ld` (tile[j][r - r0] = m[r][c0 + j]), bit exact.
template <typename T>
void gather_tile(const T* m, size_t F, size_t r0, size_t nr, size_t c0, size_t nc, T* tile, size_t ld) {
  for (size_t r = 0; r < nr; ++r) {
    const T* row = m + (r0 + r) * F + c0;
    for (size_t j = 0; j < nc; ++j) tile[j * ld + r] = row[j];
  }
}

}  // namespace

void convert_elems(const void* src, ElemType from, void* dst, ElemType to, size_t n, int threads) {
  check_type(from);
  check_type(to);
  constexpr size_t BLOCK = size_t(1) << 16;
  const size_t blocks = (n + BLOCK - 1) / BLOCK;
  const char* s = static_cast<const char*>(src);
  char* d = static_cast<char*>(dst);
  const size_t es = elem_size(from), ed = elem_size(to);
  threads = blocks >= 8 ? std::max(1, threads) : 1;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t b = 0; b < static_cast<int64_t>(blocks); ++b) {
    const size_t i = static_cast<size_t>(b) * BLOCK;
    convert_span(s + i * es, from, d + i * ed, to, std::min(BLOCK, n - i));
  }
}

void pack_neuron_block(const void* down, ElemType down_type, size_t d, size_t F, size_t j0, size_t n,
                       const void* up, ElemType up_type, void* out, ElemType to, int threads) {
  check_type(down_type);
  check_type(to);
  if (up) check_type(up_type);
  if (j0 > F || n > F - j0) throw std::invalid_argument("pack_neuron_block: neurons out of range");
  const size_t per = (up ? 2 : 1) * d;  // output elements per neuron
  const size_t eo = elem_size(to), ein = elem_size(down_type), eu = elem_size(up_type);
  constexpr size_t JB = 32;   // neurons per tile
  constexpr size_t RB = 256;  // rows of W_down per tile
  const size_t tiles = (n + JB - 1) / JB;
  threads = tiles >= 2 && n * per >= (size_t(1) << 18) ? std::max(1, threads) : 1;
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    alignas(64) uint32_t tile[JB * RB];  // source-dtype elements, JB rows of RB
#pragma omp for schedule(static)
    for (int64_t t = 0; t < static_cast<int64_t>(tiles); ++t) {
      const size_t a = static_cast<size_t>(t) * JB;
      const size_t nc = std::min(JB, n - a);
      char* o = static_cast<char*>(out);
      if (up) {
        const char* u = static_cast<const char*>(up);
        for (size_t j = 0; j < nc; ++j) convert_span(u + (a + j) * d * eu, up_type, o + ((a + j) * per) * eo, to, d);
      }
      const size_t colOff = up ? d : 0;
      for (size_t r0 = 0; r0 < d; r0 += RB) {
        const size_t nr = std::min(RB, d - r0);
        if (ein == 2) gather_tile(static_cast<const uint16_t*>(down), F, r0, nr, j0 + a, nc, reinterpret_cast<uint16_t*>(tile), RB);
        else gather_tile(static_cast<const uint32_t*>(down), F, r0, nr, j0 + a, nc, tile, RB);
        for (size_t j = 0; j < nc; ++j) {
          convert_span(reinterpret_cast<const char*>(tile) + j * RB * ein, down_type, o + ((a + j) * per + colOff + r0) * eo, to, nr);
        }
      }
    }
  }
}

}  // namespace sparsellm
