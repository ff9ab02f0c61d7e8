// Element conversions between the stored dtypes (f32, f16, bf16) and the neuron-major FFN block
// gather used by `sparsellm pack`. Results are bit-identical to the scalar references below, which
// mirror src/core/dtype.ts: narrowing rounds to nearest, ties to even, from the exact f32 value;
// NaN stays NaN (quiet, sign and top payload bits kept); ±Inf stays ±Inf; f16 subnormals exact.
// The same dtype on both sides is a plain byte copy (NaN payloads untouched).
#pragma once
#include <cstddef>
#include <cstdint>

namespace sparsellm {

enum class ElemType : int { F32 = 0, F16 = 1, BF16 = 2 };

size_t elem_size(ElemType t);

// Scalar references (one element; little-endian bit patterns).
uint16_t f32_to_bf16_ref(uint32_t bits);
uint16_t f32_to_f16_ref(uint32_t bits);
// f16 bits → f32 bits, exact; a NaN comes back quiet with its sign and payload.
uint32_t f16_to_f32_ref(uint16_t h);
// bf16 bits → f32 bits (exact, bits unchanged: a shift).
inline uint32_t bf16_to_f32_ref(uint16_t h) { return static_cast<uint32_t>(h) << 16; }

// Converts n elements of `from` at src into `to` at dst (buffers must not overlap), on up to
// `threads` OpenMP threads for large n. Packing passes 1: one core converts several GB/s, far
// above the disk, and on a shared machine a second thread waiting at a barrier costs more than it
// gives (measured: 2 threads 5x slower than 1 at load 7 on 2 cores).
void convert_elems(const void* src, ElemType from, void* dst, ElemType to, size_t n, int threads = 1);

// The neuron-major block of neurons [j0, j0 + n) of one FFN layer, in `to`:
//   with up:    for each neuron j, W_up[j, :] (row j - j0 of `up`, [n, d]) then W_down[:, j];
//   without up: W_down[:, j] only.
// `down` is the whole W_down [d, F] row-major in `down_type`; `up` is [n, d] in `up_type`.
// out receives n * (up ? 2 : 1) * d elements. Threads as for convert_elems.
void pack_neuron_block(const void* down, ElemType down_type, size_t d, size_t F, size_t j0, size_t n,
                       const void* up, ElemType up_type, void* out, ElemType to, int threads = 1);

namespace convert_detail {
// F16C kernels (convert_avx2.cpp; call only when active_isa() >= Avx2).
void f32_to_f16_avx2(const uint32_t* src, uint16_t* dst, size_t n);
void f16_to_f32_avx2(const uint16_t* src, uint32_t* dst, size_t n);
}  // namespace convert_detail

}  // namespace sparsellm
