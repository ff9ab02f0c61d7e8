// Internal: the neuron-major pass of the Hybrid FFN backward (hybrid.cpp), written once as plain
// loops and compiled per ISA (train_hybrid*.cpp; the compiler vectorises the fused loops). Internal
// linkage so that the AVX-512 build never leaks into portable code.
//
// For neuron j and each of its entries (token m, gate value g > 0, up value u):
//   dh = dy_m·W_down[:, j] (or the tail row's dense dh) + λ·sign(u)/M;  du = dh·g, dg = dh·u, h = g·u
//   dx_m += du·W_up[j] + dg·W_gate[j]          (into the thread's partial dx)
//   dW_gate[j] += dg·x_m, dW_up[j] += du·x_m, dW_down[:, j] += h·dy_m   (= for the first entry)
// One fused loop per entry: x_m, dy_m and the partial dx_m row are each read once (they are the
// randomly addressed, cache-missing rows), the neuron's weight and gradient rows stay in L1.
#pragma once
#include <omp.h>

#include <cstdint>
#include <cstring>

namespace sparsellm {

struct HybridNeuronPass {
  int64_t M = 0, d = 0, F = 0;
  const float *x = nullptr, *dy = nullptr;        // [M, d]
  const float *up = nullptr, *down_t = nullptr;   // updown rows: W_up[j] at up + j·ld_ud, W_down[:, j] at down_t + j·ld_ud
  int64_t ld_ud = 0;
  const float* gate = nullptr;                    // [F, ld_gate]
  int64_t ld_gate = 0;
  const int64_t* cs = nullptr;                    // [F + 1] entry ranges per neuron
  const int32_t *erow = nullptr, *etail = nullptr;  // [E] token; index of the tail row or -1
  const float *eg = nullptr, *eu = nullptr;       // [E] gate and up values
  const float* dht = nullptr;                     // [tail, F] dense dh of the tail rows
  float lam = 0.f;                                // λ/M
  float* dxp = nullptr;                           // [threads, M, d] partial dx (zeroed here)
  float *dgate = nullptr, *dupdown = nullptr;     // [F, d], [F, 2, d] (overwritten)
};

namespace {

// Returns the number of threads that ran (the partials 0 .. team − 1 are valid).
inline int hybrid_neuron_pass_impl(const HybridNeuronPass& a, int nthreads) {
  const int64_t M = a.M, d = a.d, F = a.F;
  int team = 1;
#pragma omp parallel num_threads(nthreads)
  {
    const int t = omp_get_thread_num();
#pragma omp single
    team = omp_get_num_threads();
    float* mine = a.dxp + static_cast<size_t>(t) * M * d;
    std::memset(mine, 0, sizeof(float) * static_cast<size_t>(M * d));
    // Static schedule: the partials, summed in thread order by the caller, are deterministic for a thread count.
#pragma omp for schedule(static, 16)
    for (int64_t j = 0; j < F; ++j) {
      float* gj = a.dgate + j * d;
      float* uj = a.dupdown + j * 2 * d;
      float* dj = uj + d;
      const int64_t q0 = a.cs[j], q1 = a.cs[j + 1];
      if (q0 == q1) {  // never active: zero gradient
        std::memset(gj, 0, sizeof(float) * static_cast<size_t>(d));
        std::memset(uj, 0, sizeof(float) * static_cast<size_t>(2 * d));
        continue;
      }
      const float* upj = a.up + j * a.ld_ud;
      const float* gwj = a.gate + j * a.ld_gate;
      const float* dnj = a.down_t + j * a.ld_ud;
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t m = a.erow[q];
        const float* dym = a.dy + m * d;
        const float* xm = a.x + m * d;
        float* dxm = mine + m * d;
        const float g = a.eg[q], u = a.eu[q];
        float dh0;
        if (a.etail[q] < 0) {
          float s = 0.f;
#pragma omp simd reduction(+ : s)
          for (int64_t k = 0; k < d; ++k) s += dym[k] * dnj[k];
          dh0 = s;
        } else {
          dh0 = a.dht[static_cast<int64_t>(a.etail[q]) * F + j];
        }
        const float dh = dh0 + a.lam * (u > 0.f ? 1.f : (u < 0.f ? -1.f : 0.f));
        const float du = dh * g, dg = dh * u, h = g * u;
        if (q == q0) {  // the first entry writes the gradient rows (no zeroing pass)
#pragma omp simd
          for (int64_t k = 0; k < d; ++k) {
            const float xk = xm[k];
            dxm[k] += du * upj[k] + dg * gwj[k];
            gj[k] = dg * xk;
            uj[k] = du * xk;
            dj[k] = h * dym[k];
          }
        } else {
#pragma omp simd
          for (int64_t k = 0; k < d; ++k) {
            const float xk = xm[k];
            dxm[k] += du * upj[k] + dg * gwj[k];
            gj[k] += dg * xk;
            uj[k] += du * xk;
            dj[k] += h * dym[k];
          }
        }
      }
    }
  }
  return team;
}

}  // namespace
}  // namespace sparsellm
