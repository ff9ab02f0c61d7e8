// Internal: a 64-byte aligned, grow-only float scratch buffer (typically thread_local: the GEMM's
// packed panels, the decode GEMV's split x).
#pragma once
#include <cstdlib>
#include <new>

namespace sparsellm::detail {

struct AlignedBuffer {
  float* p = nullptr;
  size_t n = 0;
  AlignedBuffer() = default;
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  ~AlignedBuffer() { std::free(p); }
  // At least `count` floats; the contents are not kept when it grows.
  float* get(size_t count) {
    if (count > n) {
      std::free(p);
      p = static_cast<float*>(std::aligned_alloc(64, (count * sizeof(float) + 63) / 64 * 64));
      if (!p) {
        n = 0;
        throw std::bad_alloc();
      }
      n = count;
    }
    return p;
  }
};

}  // namespace sparsellm::detail
