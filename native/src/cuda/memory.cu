// Device memory, copies, conversions and event timing for the CUDA backend.
#include <cuda_runtime.h>

#include "common.cuh"
#include "sparsellm/cuda_ops.h"
#include "sparsellm/cuda_status.h"

namespace sparsellm::cuda {

void require_device() {
  static const std::string reason = [] {
    CudaStatus s = cuda_status();
    if (!s.usable) return s.reason.empty() ? std::string("no usable CUDA device") : s.reason;
    for (const auto& d : s.devices)
      if (d.cc_major >= 8) {
        if (cudaSetDevice(d.index) != cudaSuccess) return std::string("cudaSetDevice failed");
        return std::string();
      }
    return std::string("no device of compute capability 8.0 or newer");
  }();
  if (!reason.empty()) throw std::runtime_error("CUDA backend unavailable: " + reason);
}

DeviceBuffer::~DeviceBuffer() {
  if (ptr_) cudaFree(ptr_);
}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    if (ptr_) cudaFree(ptr_);
    ptr_ = o.ptr_;
    bytes_ = o.bytes_;
    o.ptr_ = nullptr;
    o.bytes_ = 0;
  }
  return *this;
}

void DeviceBuffer::reserve(size_t bytes) {
  if (bytes <= bytes_ && ptr_) return;
  if (ptr_) {
    cudaFree(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
  }
  if (bytes == 0) bytes = 16;
  void* p = nullptr;
  cudaError_t e = cudaMalloc(&p, bytes);
  if (e != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error("CUDA: cannot allocate " + std::to_string(bytes) + " bytes of device memory: " +
                             cudaGetErrorString(e));
  }
  ptr_ = p;
  bytes_ = bytes;
}

void upload(void* dst, const void* src, size_t bytes) {
  if (bytes) SLLM_CUDA(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
}
void download(void* dst, const void* src, size_t bytes) {
  if (bytes) SLLM_CUDA(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
}
void memset_device(void* dst, int value, size_t bytes) {
  if (bytes) SLLM_CUDA(cudaMemsetAsync(dst, value, bytes, 0));
}
void synchronize() { SLLM_CUDA(cudaDeviceSynchronize()); }

namespace {

__global__ void f32_to_bf16_kernel(const float* src, int64_t lds, uint16_t* dst, int64_t ldd, int64_t rows,
                                   int64_t cols) {
  const int64_t total = rows * cols;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i - r * cols;
    dst[r * ldd + c] = static_cast<uint16_t>(f32_to_bf16_bits(src[r * lds + c]));
  }
}

__global__ void bf16_to_f32_kernel(const uint16_t* src, int64_t lds, float* dst, int64_t ldd, int64_t rows,
                                   int64_t cols) {
  const int64_t total = rows * cols;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i - r * cols;
    dst[r * ldd + c] = bf16_bits_to_f32(src[r * lds + c]);
  }
}

// 32x32 tiles through shared memory (padded against bank conflicts); block 32x8.
__global__ void transpose_bf16_kernel(const uint16_t* src, int64_t lds, uint16_t* dst, int64_t ldd, int64_t rows,
                                      int64_t cols) {
  __shared__ uint16_t t[32][33];
  const int64_t r0 = int64_t(blockIdx.y) * 32, c0 = int64_t(blockIdx.x) * 32;
  for (int i = threadIdx.y; i < 32; i += 8) {
    const int64_t r = r0 + i, c = c0 + threadIdx.x;
    if (r < rows && c < cols) t[i][threadIdx.x] = src[r * lds + c];
  }
  __syncthreads();
  for (int i = threadIdx.y; i < 32; i += 8) {
    const int64_t c = c0 + i, r = r0 + threadIdx.x;  // dst row c, column r
    if (r < rows && c < cols) dst[c * ldd + r] = t[threadIdx.x][i];
  }
}

int grid_for(int64_t n) {
  const int64_t b = ceil_div(n, 256);
  return static_cast<int>(b < 65535 * 4 ? (b < 1 ? 1 : b) : 65535 * 4);
}

}  // namespace

void f32_to_bf16_device(const float* src, int64_t lds, uint16_t* dst, int64_t ldd, int64_t rows, int64_t cols) {
  if (rows <= 0 || cols <= 0) return;
  f32_to_bf16_kernel<<<grid_for(rows * cols), 256>>>(src, lds, dst, ldd, rows, cols);
  SLLM_LAUNCHED("f32_to_bf16");
}

void bf16_to_f32_device(const uint16_t* src, int64_t lds, float* dst, int64_t ldd, int64_t rows, int64_t cols) {
  if (rows <= 0 || cols <= 0) return;
  bf16_to_f32_kernel<<<grid_for(rows * cols), 256>>>(src, lds, dst, ldd, rows, cols);
  SLLM_LAUNCHED("bf16_to_f32");
}

void transpose_bf16_device(const uint16_t* src, int64_t lds, uint16_t* dst, int64_t ldd, int64_t rows, int64_t cols) {
  if (rows <= 0 || cols <= 0) return;
  if (ceil_div(rows, 32) > 65535) throw std::runtime_error("transpose_bf16_device: too many rows");
  dim3 grid(static_cast<unsigned>(ceil_div(cols, 32)), static_cast<unsigned>(ceil_div(rows, 32)));
  transpose_bf16_kernel<<<grid, dim3(32, 8)>>>(src, lds, dst, ldd, rows, cols);
  SLLM_LAUNCHED("transpose_bf16");
}

EventTimer::EventTimer() {
  cudaEvent_t a, b;
  SLLM_CUDA(cudaEventCreate(&a));
  SLLM_CUDA(cudaEventCreate(&b));
  a_ = a;
  b_ = b;
}
EventTimer::~EventTimer() {
  cudaEventDestroy(static_cast<cudaEvent_t>(a_));
  cudaEventDestroy(static_cast<cudaEvent_t>(b_));
}
void EventTimer::start() { SLLM_CUDA(cudaEventRecord(static_cast<cudaEvent_t>(a_), 0)); }
double EventTimer::stop_ms() {
  SLLM_CUDA(cudaEventRecord(static_cast<cudaEvent_t>(b_), 0));
  SLLM_CUDA(cudaEventSynchronize(static_cast<cudaEvent_t>(b_)));
  float ms = 0;
  SLLM_CUDA(cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(a_), static_cast<cudaEvent_t>(b_)));
  return ms;
}

}  // namespace sparsellm::cuda
