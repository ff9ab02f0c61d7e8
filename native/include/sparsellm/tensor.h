// Plain views over caller-owned memory. Shapes are written [rows, cols], row-major, with an
// explicit leading dimension (elements between consecutive rows).
#pragma once
#include <cstdint>

namespace sparsellm {

enum class DType : int { F32 = 0, BF16 = 1, F16 = 2 };

inline int dtype_size(DType t) { return t == DType::F32 ? 4 : 2; }

// A weight matrix W [rows, cols] (nn.Linear layout: rows = out_features, cols = in_features).
struct WeightView {
  const void* data = nullptr;
  DType dtype = DType::F32;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t ld = 0;  // elements between rows (>= cols)
};

// bf16 <-> f32 (round to nearest even; NaN kept quiet), scalar helpers for references and tails.
inline float bf16_to_f32(uint16_t h) {
  union { uint32_t u; float f; } v{static_cast<uint32_t>(h) << 16};
  return v.f;
}
inline uint16_t f32_to_bf16(float x) {
  union { float f; uint32_t u; } v{x};
  if ((v.u & 0x7f800000u) == 0x7f800000u && (v.u & 0x007fffffu)) return static_cast<uint16_t>((v.u >> 16) | 0x40u);
  return static_cast<uint16_t>((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

}  // namespace sparsellm
