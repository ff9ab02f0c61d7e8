// Internal training ops (train_ops.cpp, train_norm.cpp, train_attention.cpp and their per-ISA
// builds); shapes and formulas are documented there.
#pragma once
#include <cstdint>
#include <vector>

namespace sparsellm::trainops {

// Buffers of linear_backward (Wᵀ, dyᵀ, xᵀ, and dyᵀ·x when it must be added): keep one alive
// between calls, or every call page-faults them in again.
struct Scratch {
  std::vector<float> wt, at, bt, out;
};

void transpose(const float* in, int64_t ld_in, int64_t rows, int64_t cols, float* out, int64_t ld_out);
void add_to(float* dst, const float* src, int64_t n);
void linear_forward(const float* x, int64_t M, int64_t din, const float* W, int64_t dout, float* y);
void linear_backward(const float* x, const float* dy, int64_t M, int64_t din, const float* W, int64_t dout,
                     float* dx, float* dW, bool first, Scratch& s);
// RMSNorm (train_norm.h).
void rmsnorm_forward(const float* x, const float* add, float* sum, int64_t M, int64_t d, const float* w, float eps,
                     float* y, float* rstd);
void rmsnorm_backward(const float* x, const float* rstd, const float* w, const float* dy, int64_t M, int64_t d,
                      float* dx, bool accumulate, float* dw, bool dw_first);
double sum_squares(const float* x, int64_t n);  // float64; independent of the thread count
void rope_tables(int64_t positions, int64_t hd, double theta, std::vector<float>& cos_t, std::vector<float>& sin_t);
void rope_apply(float* x, int64_t ld, int64_t B, int64_t T, int64_t H, int64_t hd, const float* cos_t,
                const float* sin_t, bool inverse);
// Causal attention (train_attention.h): q, k, v [B·T, ld_in]; out, dout [B·T, ld_out]; dq, dk, dv
// [B·T, ld_grad] (overwritten); P [B, H, T, T] (row t: the softmax over keys 0..t; later columns
// are scratch of the kernels, not all written).
void attention_forward(const float* q, const float* k, const float* v, int64_t ld_in, int64_t B, int64_t T, int64_t H,
                       int64_t hd, float* P, float* out, int64_t ld_out);
void attention_backward(const float* q, const float* k, const float* v, int64_t ld_in, const float* P,
                        const float* dout, int64_t ld_out, int64_t B, int64_t T, int64_t H, int64_t hd, float* dq,
                        float* dk, float* dv, int64_t ld_grad);
double cross_entropy(float* logits, const int32_t* targets, int64_t M, int64_t V, float gscale);
void adamw(float* w, const float* g, float* m, float* v, int64_t n, float lr, float b1, float b2, float eps, float wd,
           double c1, double c2, float gscale);

}  // namespace sparsellm::trainops
