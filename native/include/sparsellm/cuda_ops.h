// The CUDA backend's operations, behind a plain C++ header: no CUDA types here, so the Node-API
// bindings and the C++ tests include it without going through nvcc. Everything declared here is
// defined only in builds with the CUDA backend (SPARSELLM_HAVE_CUDA); callers test that macro.
//
// Conventions: device pointers are plain pointers; bf16 values are uint16_t bit patterns
// (round to nearest even, as sparsellm::f32_to_bf16); matrices are row-major with an explicit
// leading dimension in elements. Tensor-core kernels need bf16 leading dimensions that are
// multiples of 8 and 16-byte aligned base pointers (the layer pads its buffers so); M, N and K
// are otherwise arbitrary. All work runs on the legacy default stream, in order. Errors throw
// std::runtime_error naming the CUDA call and the reason.
//
// Semantics mirror the CPU engine (gemm.h, twell.h, ffn.h) with bf16 operands and activations
// and f32 accumulation; docs/kernels.md ("CUDA") describes the kernels.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "sparsellm/ffn.h"
#include "sparsellm/hybrid.h"
#include "sparsellm/model.h"
#include "sparsellm/twell.h"

namespace sparsellm::cuda {

// Throws std::runtime_error with the reason (sparsellm::cuda_status().reason) unless a device
// of compute capability 8.0 or newer is usable; selects device 0.
void require_device();

// --- Device memory --------------------------------------------------------------------------

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes) { reserve(bytes); }
  ~DeviceBuffer();
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) { o.ptr_ = nullptr; o.bytes_ = 0; }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
  // Grow-only: when `bytes` exceeds the capacity the old memory is freed (contents lost).
  void reserve(size_t bytes);
  void* data() const { return ptr_; }
  size_t bytes() const { return bytes_; }
  template <typename T> T* as() const { return static_cast<T*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

void upload(void* dst_device, const void* src_host, size_t bytes);
void download(void* dst_host, const void* src_device, size_t bytes);
void memset_device(void* dst_device, int value, size_t bytes);
void synchronize();
// Device-side conversions of a [rows, cols] matrix (leading dimensions in elements).
void f32_to_bf16_device(const float* src, int64_t lds, uint16_t* dst, int64_t ldd, int64_t rows, int64_t cols);
void bf16_to_f32_device(const uint16_t* src, int64_t lds, float* dst, int64_t ldd, int64_t rows, int64_t cols);
// dst [cols, rows] = srcᵀ for bf16 src [rows, cols].
void transpose_bf16_device(const uint16_t* src, int64_t lds, uint16_t* dst, int64_t ldd, int64_t rows, int64_t cols);

// Device-side timing: milliseconds between two points of the stream (cudaEvent pairs).
class EventTimer {
 public:
  EventTimer();
  ~EventTimer();
  EventTimer(const EventTimer&) = delete;
  EventTimer& operator=(const EventTimer&) = delete;
  void start();
  double stop_ms();  // waits for the stop event

 private:
  void* a_ = nullptr;
  void* b_ = nullptr;
};

// --- Dense GEMM -----------------------------------------------------------------------------

enum class EpiOp : int { None = 0, Relu = 1, MulAux = 2 };

// What happens to each finished accumulator v = (A·Wᵀ)[m, n]:
//   v += bias[n] (when bias); then Relu: v = max(v, 0); MulAux: v *= aux[m, n] (bf16);
//   then out[m, n] = v as f32 or bf16 (or out[m, n] += v with accumulate, f32 only).
struct Epilogue {
  EpiOp op = EpiOp::None;
  const float* bias = nullptr;     // [N] f32 or null
  const uint16_t* aux = nullptr;   // MulAux: bf16 [M, N] (ldaux)
  int64_t ldaux = 0;
  bool out_bf16 = false;
  void* out = nullptr;             // f32 or bf16 [M, N] (ldo)
  int64_t ldo = 0;
  bool accumulate = false;         // f32 out only: out[m, n] += v instead of =
};

// out = epi(A · Wᵀ): A bf16 [M, K] (lda), W bf16 [N, K] (ldw), f32 accumulation on tensor cores
// (Hopper: wgmma with a TMA/mbarrier pipeline; else mma.sync m16n8k16 with a cp.async pipeline;
// see GemmKernel below).
void gemm_bf16(const uint16_t* A, int64_t lda, const uint16_t* W, int64_t ldw, int64_t M,
               int64_t N, int64_t K, const Epilogue& epi);
// The same product for a few rows (M ≤ 8): memory-bound, one warp per output column.
void gemv_bf16(const uint16_t* A, int64_t lda, const uint16_t* W, int64_t ldw, int64_t M,
               int64_t N, int64_t K, const Epilogue& epi);
constexpr int64_t kGemvMaxRows = 8;

// The kernel behind gemm_bf16 and twell_gate_bf16 (for tests and benchmarks). Auto: on compute
// capability 9.0 the Hopper kernel (wgmma on TMA-fed shared memory, sm_90a code), else, or where
// the operands do not allow TMA (K = 0), the mma.sync kernel; a forced Hopper variant falls back
// the same way. The environment variable SPARSELLM_CUDA_GEMM = mma | wgmma | wgmma2 sets the
// initial choice. last_gemm_kernel() names the kernel of the last call: "mma.sync", "wgmma" or
// "wgmma-cluster2" (W stages shared by two blocks through TMA multicast).
enum class GemmKernel : int { Auto = 0, MmaSync = 1, Wgmma = 2, WgmmaCluster2 = 3 };
void set_gemm_kernel(GemmKernel k);
const char* last_gemm_kernel();

// cuBLAS, loaded at run time (libcublas.so.13 or .so.12; SPARSELLM_CUBLAS names a file), as
// the reference our GEMM is compared with. available() says why not when absent.
struct Cublas {
  static bool available(std::string* reason = nullptr);
  static std::string library();  // the file that was loaded
  // out f32 or bf16 [M, N] = A · Wᵀ (cublasGemmEx, bf16 inputs, f32 compute).
  static void gemm_bf16(const uint16_t* A, int64_t lda, const uint16_t* W, int64_t ldw, int64_t M,
                        int64_t N, int64_t K, void* out, int64_t ldo, bool out_bf16);
  // out f32 [M, N] = op(A)·op(B) on f32 operands with CUBLAS_COMPUTE_32F_FAST_16BF (operands
  // rounded to bf16, tensor cores: the GPU trainer's bf16 matmuls). op(A) is A [M, K], or A
  // stored [K, M] when ta; op(B) is B [K, N], or B stored [N, K] when tb (row-major, leading
  // dimensions in elements).
  static void gemm_f32_fast_bf16(const float* A, int64_t lda, bool ta, const float* B, int64_t ldb, bool tb, int64_t M,
                                 int64_t N, int64_t K, float* out, int64_t ldo);
};

// NVML, loaded at run time (libnvidia-ml.so.1): the GPU's energy counter.
struct Nvml {
  static bool available(std::string* reason = nullptr);
  // Total energy consumed by the current device since the driver loaded, in millijoules.
  static uint64_t energy_mj();
  static std::string driver_version();
};

// --- TwELL on the device ----------------------------------------------------------------------

// The CPU layout (twell.h) with each entry in one 32-bit word: high 16 bits the value's bf16
// bits, low 16 bits its column within the tile. count is the true number of positives (it may
// exceed cap: the tile overflows and its entries are incomplete; the consumer then recomputes
// the row densely). Only the first min(count, cap) entries of a tile are written.
struct DeviceTwell {
  int64_t rows = 0, cols = 0, tiles = 0;
  int tile = 0, cap = 0;
  int32_t* count = nullptr;     // [rows, tiles]
  uint32_t* entries = nullptr;  // [rows, tiles, cap]
};

// Tile widths the gate kernel packs (the GEMM's N block must hold whole tiles).
bool twell_tile_supported(int tile);

// g = relu(A · Wᵀ + bias) packed as TwELL in the epilogue of the tensor-core GEMM (no dense
// [M, N] buffer is written). `out` must have rows = M, cols = N and buffers of that shape.
void twell_gate_bf16(const uint16_t* A, int64_t lda, const uint16_t* W, int64_t ldw, int64_t M,
                     int64_t N, int64_t K, const float* bias, const DeviceTwell& out);

// Device-side statistics of a TwELL (filled by twell_finalize).
struct TwellDeviceStats {
  unsigned long long nnz, overflow_tiles, overflow_rows, max_row_nnz;
};
// Sums the counts: statistics into `stats` (device), and the overflowing rows' indices into
// `overflow_rows` (device int32 [rows], in no particular order; their number is
// stats->overflow_rows). `stats` is zeroed first.
void twell_finalize(const DeviceTwell& g, TwellDeviceStats* stats, int32_t* overflow_rows);

// Fused up+down over the TwELL rows: y[m] = Σ_j g[m,j] · (x[m]·up[j]) · down_t[j] (+ bias)
// (gated: up != null), or y[m] = Σ_j h[m,j] · down_t[j] (+ bias) (non-gated: up == null).
// Neuron j's rows are up + j·ldw and down_t + j·ldw (the interleaved updown layout passes
// up = updown, down_t = updown + ld, ldw = 2·ld). x bf16 [M, d] (ldx), y f32 [M, d] (ldy).
// Rows with an overflowing tile get the contributions of their other tiles only: the caller
// recomputes them (overflow_rows). A warp per row; the hidden vector never leaves registers.
// `generic` forces the any-shape kernel (used by tests; otherwise chosen when d % 8 or d > 4096).
void twell_updown_bf16(const uint16_t* x, int64_t ldx, const DeviceTwell& g, const uint16_t* up,
                       const uint16_t* down_t, int64_t ldw, int64_t d, const float* down_bias,
                       float* y, int64_t ldy, bool generic = false);

// Decode (few tokens): g = relu'd gate (gated) or relu'd up+bias (non-gated), f32 [M, F] (ldg).
// y[m] = Σ_{j: g>0} g[m,j]·(x[m]·up[j])·down_t[j] (+ bias), reading only the active neurons'
// rows. y f32 [M, d] (ldy) is overwritten.
void decode_sparse_bf16(const uint16_t* x, int64_t ldx, int64_t M, const float* g, int64_t ldg,
                        int64_t F, const uint16_t* up, const uint16_t* down_t, int64_t ldw,
                        int64_t d, const float* down_bias, float* y, int64_t ldy);

// Row gather/scatter for the dense fallback of overflowing rows (rows: device int32 [n]).
void gather_rows_bf16(const uint16_t* src, int64_t lds, const int32_t* rows, int64_t n,
                      int64_t cols, uint16_t* dst, int64_t ldd);
void scatter_rows_f32(const float* src, int64_t lds, const int32_t* rows, int64_t n, int64_t cols,
                      float* dst, int64_t ldd);
// Per-row count of strictly positive values of a bf16 [rows, cols] matrix into stats (nnz and
// max_row_nnz; the other fields zeroed).
void count_positive_bf16(const uint16_t* a, int64_t lda, int64_t rows, int64_t cols,
                         TwellDeviceStats* stats);

// --- The FFN layer ----------------------------------------------------------------------------

// One FFN block on the GPU, the counterpart of sparsellm::FfnLayer (ffn.h): weights are rounded
// to bf16 and kept in the kernel layout (gated: W_gate [F, d] and updown [F, 2, d]; non-gated:
// W_up and down_t) plus the standard W_down [d, F] the dense path's GEMM reads. Activations are
// bf16 on the device, outputs f32. Not reentrant.
//
//   dense:  three tensor-core GEMMs (ReLU, g ⊙ u fused in epilogues)
//   sparse: TwELL gate GEMM → fused up+down; rows with an overflowing tile are recomputed by
//           dense GEMMs on just those rows (exact, never silently dropped)
//   auto:   TwELL gate GEMM, then sparse, or dense when the counts say the dense GEMMs would be
//           cheaper (cost model in docs/kernels.md, "CUDA")
class CudaFfnLayer {
 public:
  // Standard layouts (nn.Linear), host f32: gate [F, d] (gated only), up [F, d], down [d, F],
  // up_bias [F] (non-gated only, may be null), down_bias [d] (may be null). cfg.dtype is
  // ignored: the device copy is bf16.
  CudaFfnLayer(const FfnLayerConfig& cfg, const float* gate, const float* up, const float* down,
               const float* up_bias, const float* down_bias);
  ~CudaFfnLayer();
  CudaFfnLayer(const CudaFfnLayer&) = delete;
  CudaFfnLayer& operator=(const CudaFfnLayer&) = delete;

  const FfnLayerConfig& config() const;
  // Bytes of the layer's matrices in bf16 (gate, up, down; as the CPU FfnLayer counts them).
  int64_t weight_bytes() const;
  // Device bytes the layer holds: its kernel layouts (the up/down rows and W_down stored twice:
  // neuron-major for the sparse kernels and [d, F] for the dense GEMM), padding and biases.
  int64_t device_bytes() const;
  int64_t d_padded() const;      // leading dimension of device activations x (multiple of 8)

  // Host f32 in and out (x rounded to bf16 on the device).
  FfnStats forward(const float* x, int64_t M, float* y, FfnMode mode);
  FfnStats decode(const float* x, int64_t M, float* y, FfnMode mode);

  // Device in and out: x bf16 [M, d_padded()], y f32 [M, d] (ld d). With stats = false the
  // call needs no host round trip unless rows overflow (the statistics read-back is skipped
  // where possible; sparse mode still reads the overflow count).
  FfnStats forward_device(const uint16_t* x, int64_t M, float* y, FfnMode mode, bool stats = true);
  FfnStats decode_device(const uint16_t* x, int64_t M, float* y, FfnMode mode);

  // For tests: force the any-shape fused kernel.
  void set_generic_kernels(bool on);

  // The device weights (bf16, kernel layout, rows padded to dp / Fp elements).
  struct Weights {
    const uint16_t* act = nullptr;       // gated: W_gate [F, dp]; non-gated: W_up [F, dp]
    const uint16_t* rows = nullptr;      // gated: updown [F, 2, dp]; non-gated: down_t [F, dp]
    const uint16_t* down_std = nullptr;  // W_down [d, Fp]
    int64_t d = 0, F = 0, dp = 0, Fp = 0;
    bool gated = true;
  };
  Weights device_weights() const;
  // The TwELL of the last sparse/auto forward (device), and the rows the fallback recomputed.
  DeviceTwell last_twell() const;
  int64_t last_fallback_rows() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// --- Hybrid training (gated layers) -----------------------------------------------------------

// One training step of a gated CudaFfnLayer with the sparse Hybrid kernels (hybrid.h's math):
//   forward: TwELL gate GEMM; rows with at most ell_width non-zeros and no overflowing tile go
//            through the sparse kernels (u evaluated only at the pattern and kept for backward);
//            the other rows ("tail") through dense GEMMs on just those rows;
//   backward: dh = dy·W_down at the pattern + λ·sign(h)/M, du = dh·g, dg = dh·u, dx = du·W_up +
//            dg·W_gate (sparse, a warp per row); weight gradients by neuron (the pattern's
//            entries sorted by neuron, a warp per neuron and matrix), tail rows by GEMMs.
// Everything stays on the device until export_grads. Tail rows here also include rows with an
// overflowing TwELL tile (the CPU only routes rows over ell_width), so tail_rows may differ from
// the CPU's while every result is exact.
class CudaFfnTrainer {
 public:
  explicit CudaFfnTrainer(CudaFfnLayer& layer);
  ~CudaFfnTrainer();
  CudaFfnTrainer(const CudaFfnTrainer&) = delete;
  CudaFfnTrainer& operator=(const CudaFfnTrainer&) = delete;
  // Host f32 x, dy [M, d] (rounded to bf16 on the device); y, dx [M, d] overwritten. Dense mode
  // is the baseline: the same step with dense GEMMs on every row (the weight-gradient GEMMs read
  // explicitly transposed operands: our GEMM is A·Wᵀ only).
  TrainStepStats step(const float* x, const float* dy, int64_t M, TrainMode mode, const HybridParams& p, float* y,
                      float* dx);
  // Device in: x, dy bf16 [M, d_padded] (ld d_padded, 16-byte aligned, padding columns zero);
  // y and dx stay on the device.
  TrainStepStats step_device(const uint16_t* x, const uint16_t* dy, int64_t M, TrainMode mode, const HybridParams& p);
  // The last step's weight gradients in standard layouts: dgate [F, d], dup [F, d], ddown [d, F].
  void export_grads(float* dgate, float* dup, float* ddown) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// ===== Model operations (model_ops.cu, model.cu) ===============================================
// The rest of a decoder-only transformer on the device, the counterparts of sparsellm/model.h's
// CPU functions (same formulas). T tokens, d width, hd head_dim; activations f32 row-major with
// an explicit leading dimension; bf16 outputs [T, ldo] feed the projections' GEMMs, so their
// columns d .. ldo − 1 are written as zero. Tables and weights are bf16 on the device.

// out[t, :d] = table[rows[t], :d] (rows: device int32 [T], in range; checked by the caller).
void embed_rows_bf16(const uint16_t* table, int64_t ldt, const int32_t* rows, int64_t T, int64_t d, float* out,
                     int64_t ldo);
// out[t, :d] += table[row0 + t, :d] (learned positions: row0 = pos0 + offset).
void add_rows_bf16(const uint16_t* table, int64_t ldt, int64_t row0, int64_t T, int64_t d, float* out, int64_t ldo);
// out = RMSNorm(x) ⊙ w (rms), or LayerNorm(x) ⊙ w + b (b may be null), as bf16 [T, ldo].
void norm_rows(const float* x, int64_t ldx, int64_t T, int64_t d, const float* w, const float* b, float eps,
               bool rms, uint16_t* out, int64_t ldo);
// cs [T, half, 2] = (cos, sin) of (pos0 + t) · inv_freq[i], computed in float64 (inv_freq: device
// double [half] = theta^(−2i/hd), as the CPU rope_table computes it).
void rope_table_device(int64_t T, int64_t half, int64_t pos0, const double* inv_freq, float* cs);
// Rotate-half RoPE in place on x [T, n_heads · head_dim] (ldx) with the table cs.
void rope_apply_device(float* x, int64_t ldx, int64_t T, int64_t n_heads, int64_t head_dim, const float* cs);
// One layer's block of the KV cache, cache_k / cache_v [n_kv_heads][capacity][head_dim] f32 (the
// CPU KvCache layout), gets k, v [T, n_kv_heads · head_dim] at positions pos0 .. pos0 + T − 1.
void kv_store_device(float* cache_k, float* cache_v, int64_t n_kv_heads, int64_t capacity, int64_t head_dim,
                     const float* k, int64_t ldk, const float* v, int64_t ldv, int64_t T, int64_t pos0);
// Causal attention of T queries at positions pos0 .. over one layer's cache (keys 0 .. pos0 + t
// already stored): q [T, n_heads · hd] (ldq) f32, out bf16 [T, ldo]. Query head h reads kv head
// h / (n_heads / n_kv_heads); scores scaled by 1/sqrt(hd); softmax in f32 (online, maximum
// subtracted). head_dim ≤ 256; any T and context.
void attention_device(const float* q, int64_t ldq, int64_t T, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
                      const float* cache_k, const float* cache_v, int64_t capacity, int64_t pos0, uint16_t* out,
                      int64_t ldo);
// x[t, :n] += y[t, :n] (residual).
void add_rows_f32(float* x, int64_t ldx, const float* y, int64_t ldy, int64_t T, int64_t n);
// Generic FFN activation (the CPU Model's dense path for any activation): a = act(g) (g already
// holds its bias), zeroed where |a| <= threshold when threshold >= 0, times u (gated, u may be
// null: non-gated); h = bf16 [T, ldh]. g, u f32 [T, F] (ldg). Adds each row's non-zero count to
// counters (device, {nnz, max_row_nnz}).
void ffn_activate_device(const float* g, const float* u, int64_t ldg, int64_t T, int64_t F, ActKind act,
                         float threshold, uint16_t* h, int64_t ldh, unsigned long long* counters);
// Adds each row's count of g > 0 (f32 [T, F], ldg) to counters {nnz, max_row_nnz}.
void count_positive_rows_f32(const float* g, int64_t ldg, int64_t T, int64_t F, unsigned long long* counters);

// The whole forward pass on the device, the counterpart of sparsellm::Model (model.h) with the
// same semantics: embeddings (+ learned positions) → pre-norm blocks (attention with a KV cache
// on the device, FFN) → final norm → LM head; only the logits come back to the host. Weights are
// uploaded once as bf16 (f32 stored matrices rounded); activations between the operations are f32
// (residual stream, q/k/v, scores) and bf16 where a projection reads them. Projections:
// gemm_bf16, or gemv_bf16 for at most kGemvMaxRows tokens. FFN: plain-ReLU layers run on a
// CudaFfnLayer (dense / TwELL sparse / auto; calls of at most kDecodeMaxTokens tokens take the
// sparse decode kernels unless dense); every other layer (silu / gelu, thresholded or not, or a
// ReLU with a threshold) runs the generic dense path with its activation and threshold (the same
// function the CPU computes, counted as a dense call). Not reentrant.
class CudaModel {
 public:
  // `weights` point into host memory (the mapped file) only during the constructor.
  CudaModel(const ModelConfig& cfg, const ModelWeights& weights, int64_t context);
  ~CudaModel();
  CudaModel(const CudaModel&) = delete;
  CudaModel& operator=(const CudaModel&) = delete;

  const ModelConfig& config() const;
  int64_t context() const;
  int64_t position() const;  // positions in the cache (the next token's position)
  void reset();              // empties the cache

  // As Model::forward: T tokens at position() .., appended to the cache; logits (host) [vocab]
  // for the last token or [T, vocab] when all_logits. Throws std::invalid_argument when a token
  // is out of range or the context would overflow (nothing runs then).
  void forward(const int32_t* tokens, int64_t T, bool all_logits, RunMode mode, float* logits);

  // Per-layer FFN activity since the last reset_stats(). Decode calls in dense mode count no
  // tokens (their gate stays inside the layer).
  std::vector<LayerActivity> activity() const;
  void reset_stats();
  // Device bytes held: weights (attention, FFN kernel layout, tables) and the KV cache.
  int64_t bytes() const;

  static constexpr int64_t kDecodeMaxTokens = 4;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// --- Benchmarks (device-side timing after warm-up; used by scripts/gpu-check.sh) ---------------

struct GpuBenchOptions {
  int64_t d_model = 2048, d_ff = 5632, tokens = 131072;
  bool gated = true;
  double nnz_per_token = 29;  // target mean non-zeros per token (the gate bias is calibrated)
  int repeats = 20, warmup = 3;
  int decode_tokens = 1;
  double energy_seconds = 2.0;  // minimum run time of each energy measurement
  bool train = true;            // gated only: dense vs hybrid training step
  int train_repeats = 5;
  TwellParams twell;
};

struct GpuBenchRow {
  std::string name;       // e.g. "ffn forward dense"
  double median_ms = 0, min_ms = 0, max_ms = 0;
  double tflops = 0;      // useful or dense-equivalent, see `note`
  double mj_per_token = -1;  // energy per token (NVML) or -1
  std::string note;
};

struct GpuBenchResult {
  std::string device, driver, cublas;  // cublas: library file or "absent: <reason>"
  double measured_nnz_per_token = 0;
  int64_t overflow_rows = 0;
  std::vector<GpuBenchRow> rows;
  std::vector<std::string> log;  // lines of detail
};

GpuBenchResult run_gpu_benchmarks(const GpuBenchOptions& options);

}  // namespace sparsellm::cuda
