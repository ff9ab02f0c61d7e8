// The pieces of a decoder-only transformer other than its projections and FFN kernels:
// embeddings, learned positions, RMSNorm / LayerNorm, RoPE, activations, biases, and causal
// attention over an f32 KV cache. Activations are f32 row-major with an explicit leading
// dimension (elements between consecutive token rows). T = tokens in the call, d = width.
// Each function is the plain reference and the one that runs; OpenMP over rows or heads.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "sparsellm/ffn.h"
#include "sparsellm/tensor.h"

namespace sparsellm {

// ---- embeddings ----------------------------------------------------------------------------

// out[t, :] = table[tokens[t], :].  table [vocab, d] f32 or bf16; out [T, d] (ldo).
// Every token must be in [0, table.rows) (checked by the caller).
void embed_tokens(const WeightView& table, const int32_t* tokens, int64_t T, float* out, int64_t ldo);

// out[t, :] += table[pos0 + t + offset, :].  Learned positions (GPT-2: offset 0, OPT: 2);
// pos0 + T - 1 + offset < table.rows (checked by the caller).
void add_learned_positions(const WeightView& table, int64_t pos0, int64_t offset, int64_t T, float* out,
                           int64_t ldo);

// ---- norms ---------------------------------------------------------------------------------

// y[t, :] = x[t, :] / sqrt(mean(x[t, :]²) + eps) ⊙ w.  x, y [T, d]; w [d]. y may equal x.
void rms_norm(const float* x, int64_t ldx, int64_t T, int64_t d, const float* w, float eps, float* y,
              int64_t ldy);

// y[t, :] = (x[t, :] - mean) / sqrt(var + eps) ⊙ w + b (biased variance). b may be null.
void layer_norm(const float* x, int64_t ldx, int64_t T, int64_t d, const float* w, const float* b, float eps,
                float* y, int64_t ldy);

// ---- positions: rotary embedding --------------------------------------------------------------

// In place on x [T, n_heads * head_dim] (ldx): for token t at position pos0 + t, each head's
// pairs (i, i + head_dim/2), i < head_dim/2 ("rotate half", as Llama in Hugging Face) are
// rotated by the angle (pos0 + t) · theta^(-2i / head_dim). Angles are computed in float64.
void rope_rotate_half(float* x, int64_t ldx, int64_t T, int64_t n_heads, int64_t head_dim, int64_t pos0,
                      double theta);
// The same in two steps, so that one table serves q, k and every layer of a call:
// cs [T, head_dim / 2, 2] = (cos, sin) of the angles of positions pos0 .. pos0 + T − 1, then
// the rotation of x by that table.
void rope_table(int64_t T, int64_t head_dim, int64_t pos0, double theta, float* cs);
void rope_apply(float* x, int64_t ldx, int64_t T, int64_t n_heads, int64_t head_dim, const float* cs);

// ---- element-wise ----------------------------------------------------------------------------

enum class ActKind : int { Relu = 0, Silu = 1, GeluErf = 2, GeluTanh = 3, Identity = 4 };

// x[t, :n] += b for every row (b [n]).
void add_bias(float* x, int64_t ldx, int64_t T, int64_t n, const float* b);

// x = act(x) in place on [T, n].
void activate(float* x, int64_t ldx, int64_t T, int64_t n, ActKind act);

// x = act(x) ⊙ y on [T, n] (gated FFN with a dense up projection: act on the gate).
void activate_mul(float* x, int64_t ldx, const float* y, int64_t ldy, int64_t T, int64_t n, ActKind act);

// x += y on [T, n] (residual connection).
void add_inplace(float* x, int64_t ldx, const float* y, int64_t ldy, int64_t T, int64_t n);

// ---- attention -----------------------------------------------------------------------------

// Floats in anonymous memory (zero pages until touched), advised for transparent huge pages when
// `huge`: the decode's cache rows are scattered over n_kv_heads regions per layer, and with 4 KiB
// pages nearly every row read or written is a TLB miss.
class FloatRegion {
 public:
  FloatRegion() = default;
  ~FloatRegion();
  FloatRegion(const FloatRegion&) = delete;
  FloatRegion& operator=(const FloatRegion&) = delete;
  void allocate(size_t n, bool huge);  // throws std::bad_alloc
  float* get() const { return data_; }

 private:
  float* data_ = nullptr;
  void* region_ = nullptr;
  size_t bytes_ = 0;
};

// Keys and values of every layer, f32 or bf16 (`dtype`: bf16 halves the cache's memory and the
// bytes attention reads; the rows are rounded to nearest even as they are stored), both laid
// out [layer][kv_head][position][head_dim] (one head's keys contiguous: the rows of Q·Kᵀ; a
// decoded token appends one contiguous row per head to each). `length` is the number of
// positions filled (the next position to write); the model advances it after all layers have
// stored a call's tokens.
struct KvCache {
  int64_t n_layers = 0, n_kv_heads = 0, head_dim = 0, capacity = 0;
  int64_t length = 0;
  DType dtype = DType::F32;
  // Positions >= length are never read. Caches of up to kKvHugePageMaxBytes (keys and values
  // together) are on huge pages; larger ones keep 4 KiB pages, so that a long context costs
  // memory only as it fills.
  FloatRegion k, v;
  static constexpr size_t kKvHugePageMaxBytes = size_t(1) << 30;

  // dtype F32 or BF16 (std::invalid_argument otherwise).
  void allocate(int64_t layers, int64_t kv_heads, int64_t hd, int64_t positions, DType dtype = DType::F32);
  // Key / value of `pos`: head_dim contiguous elements of T (float for F32, uint16_t bf16 bits
  // for BF16: the caller matches dtype).
  template <typename T>
  T* k_at(int64_t layer, int64_t head, int64_t pos) const {
    return reinterpret_cast<T*>(k.get()) + offset(layer, head, pos);
  }
  template <typename T>
  T* v_at(int64_t layer, int64_t head, int64_t pos) const {
    return reinterpret_cast<T*>(v.get()) + offset(layer, head, pos);
  }

 private:
  int64_t offset(int64_t layer, int64_t head, int64_t pos) const {
    return ((layer * n_kv_heads + head) * capacity + pos) * head_dim;
  }
};

// Writes k, v [T, n_kv_heads * head_dim] of `layer` at positions pos0 .. pos0 + T - 1.
// pos0 + T <= capacity (checked by the caller).
void kv_cache_store(KvCache& cache, int64_t layer, const float* k, int64_t ldk, const float* v, int64_t ldv,
                    int64_t T, int64_t pos0);

// Causal attention for T queries at positions pos0 .. pos0 + T - 1 over the cache of `layer`
// (keys 0 .. pos0 + t for query t, which must already be stored).
//   q [T, n_heads * head_dim] (ldq), out [T, n_heads * head_dim] (ldo).
// Query head h reads kv head h / (n_heads / n_kv_heads): multi-head when equal, grouped-query
// when n_kv_heads divides n_heads, multi-query when n_kv_heads = 1. Scores scaled by
// 1/sqrt(head_dim), softmax in f32 with the row maximum subtracted. Many queries: the threads
// share the heads in one parallel region; per head, the values are transposed once into
// scratch, then per block of queries two single-threaded GEMMs (Q·Kᵀ over the keys the block
// sees, then P·V) around a vectorised causal softmax. Few queries (decode): one pass per
// (query, head) over the cache.
void attention_causal(const float* q, int64_t ldq, int64_t T, int64_t n_heads, const KvCache& cache,
                      int64_t layer, int64_t pos0, float* out, int64_t ldo);
// Calls with at least this many queries take the GEMM path, in blocks of this many queries
// (each block reads only the keys it can see).
constexpr int64_t kAttentionGemmMinTokens = 8;
constexpr int64_t kAttentionQueryBlock = 64;

}  // namespace sparsellm

// ---- the whole model -----------------------------------------------------------------------
namespace sparsellm {
// ---- decode GEMV ---------------------------------------------------------------------------

// One product of a decode GEMV: y [M, w.rows] (ldy) = x · wᵀ.
struct GemvOutput {
  WeightView w;
  float* y = nullptr;
  int64_t ldy = 0;
};

// y_i = x [M, K] (ldx) · W_iᵀ for every output i (all W_i [N_i, K], f32 or bf16 widened in
// registers, f32 sums), for few tokens (decode; M > 4 runs in groups of 4, each re-reading W).
// One parallel region: the rows of all the matrices are concatenated and each thread streams
// one contiguous share, several rows in flight, software-prefetched (SPARSELLM_GEMV_PF bytes
// ahead, default 1024). q/k/v (or gate/up) that read the same x go in one call.
void gemv_multi(const float* x, int64_t ldx, int64_t M, const GemvOutput* outs, int n_outs);
void gemv(const float* x, int64_t ldx, int64_t M, const WeightView& W, float* y, int64_t ldy);
// Listed rows only: y[m * ldy + rows[i]] = x[m] · W[rows[i]] for i < n (rows in any order; other
// entries of y untouched), each row computed exactly as gemv computes it (the same bits), several
// listed rows in flight per thread, each prefetching into the next listed row of its run.
void gemv_rows(const float* x, int64_t ldx, int64_t M, const WeightView& W, const int32_t* rows, int64_t n, float* y,
               int64_t ldy);
// Dense gated up+down for few tokens on the neuron-major updown layout (sparsellm/ffn.h):
// y[m] = Σ_j coef[m, j] · (x[m]·W_up[j]) · W_down[:, j] (+ bias), every neuron's 2·d block read
// once, in address order; the threads split the neurons and sum their partial outputs.
// x [M, d] (ldx), coef [M, F] (ldc), y [M, d] (ldy, overwritten). bf16 on AVX-512 only:
// returns false, writing nothing, where there is no such kernel (the caller runs GEMVs).
bool gemv_updown(const float* x, int64_t ldx, int64_t M, const float* coef, int64_t ldc, const UpDownView& ud,
                 const float* bias, float* y, int64_t ldy);
// The same over the n listed neurons rows[0 .. n) only (the sparse decode: the active ones, in
// any order; coef of the unlisted ones is ignored). Partial sums in chunks of the list, summed in
// chunk order: bit-identical for any thread count.
bool gemv_updown_rows(const float* x, int64_t ldx, int64_t M, const float* coef, int64_t ldc, const UpDownView& ud,
                      const int32_t* rows, int64_t n, const float* bias, float* y, int64_t ldy);
bool gemv_updown_available();  // the current ISA has the fused kernel
// The row kernel the current ISA dispatches to (e.g. "avx512 4 streams").
const char* gemv_kernel_name();


// A whole file (the packed model) in memory, read-only. Map: a memory map of the file (pages
// come from the page cache as they are touched; quick to open, shared between processes).
// Resident: read once into anonymous memory advised for transparent huge pages: 2 MiB pages
// spare the decode's scattered reads (active neurons, candidate gate rows) most TLB misses, and
// the streams a page-walk per 4 KiB (about 10% faster decode on the proxy model); costs one read
// of the file at load. Throws std::runtime_error naming the file when it cannot be opened,
// mapped or read.
enum class Residency { Map, Resident };
class MappedFile {
 public:
  explicit MappedFile(const std::string& path, Residency residency = Residency::Map);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  const uint8_t* data() const { return data_; }
  int64_t size() const { return size_; }
  const std::string& path() const { return path_; }
  Residency residency() const { return residency_; }

 private:
  std::string path_;
  Residency residency_ = Residency::Map;
  const uint8_t* data_ = nullptr;
  int64_t size_ = 0;
  void* region_ = nullptr;  // the mapping to unmap (huge-page aligned inside it when resident)
  size_t region_bytes_ = 0;
};

struct ModelConfig {
  int64_t vocab = 0, d_model = 0, n_layers = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0;
  int64_t max_positions = 0;
  bool gated = true;
  bool rmsnorm = true;         // false: LayerNorm
  bool rope = true;            // false: learned positions
  int64_t position_offset = 0; // learned positions: index offset (OPT: 2)
  double rope_theta = 10000.0;
  float norm_eps = 1e-5f;
};

// One layer's weights, pointing into caller-owned memory (the mapped file). Biases and norm
// weights are f32; matrices f32 or bf16.
struct LayerWeights {
  const float* attn_norm_w = nullptr;
  const float* attn_norm_b = nullptr;
  WeightView q, k, v, o;
  const float* q_b = nullptr;
  const float* k_b = nullptr;
  const float* v_b = nullptr;
  const float* o_b = nullptr;
  const float* ffn_norm_w = nullptr;
  const float* ffn_norm_b = nullptr;
  int64_t d_ff = 0;
  DType ffn_dtype = DType::BF16;
  const void* ffn_a = nullptr;  // gated: W_gate [F, d]; non-gated: W_up [F, d]
  const void* ffn_b = nullptr;  // gated: updown [F, 2, d]; non-gated: down_t [F, d]
  const float* up_b = nullptr;
  const float* down_b = nullptr;
  ActKind act = ActKind::Relu;
  // Non-ReLU activations: a hidden unit is inactive when |act(pre)| <= threshold. < 0: none.
  float threshold = -1.f;
  TwellParams twell;
};

struct ModelWeights {
  WeightView embed;      // [vocab, d]
  WeightView pos_embed;  // [max_positions + offset, d] (learned positions)
  WeightView lm_head;    // [vocab, d] (= embed when tied)
  const float* final_norm_w = nullptr;
  const float* final_norm_b = nullptr;
  std::vector<LayerWeights> layers;
};

// How the FFN of ReLU layers, and of silu/gelu layers with a stored threshold, runs. Other
// non-ReLU layers always run the dense path.
enum class RunMode { Dense = 0, Sparse = 1, Auto = 2 };

// Per-layer FFN activity measured over the tokens run since the last reset_stats().
struct LayerActivity {
  int64_t tokens = 0;          // rows whose non-zeros were counted
  int64_t nnz = 0;             // non-zero hidden units summed over those rows
  int64_t max_row_nnz = 0;
  int64_t overflow_tiles = 0;  // TwELL tiles over capacity (recomputed exactly, never dropped)
  int64_t overflow_rows = 0;
  int64_t sparse_calls = 0, dense_calls = 0;
  // Decode calls whose gate was screened by its int8 copy (docs/runtime.md "Screened gate"), and
  // the gate rows those calls then read exactly (bf16/f32); the rest of the gate was read as int8.
  int64_t gate_screened_calls = 0, gate_candidate_rows = 0;

  // Counts one FfnLayer call (either backend).
  void add(const FfnStats& s) {
    if (s.rows > 0) {
      tokens += s.rows;
      nnz += s.nnz;
      max_row_nnz = max_row_nnz > s.max_row_nnz ? max_row_nnz : s.max_row_nnz;
      overflow_tiles += s.overflow_tiles;
      overflow_rows += s.overflow_rows;
    }
    (s.path == FfnPath::Sparse ? sparse_calls : dense_calls) += 1;
    if (s.gate_candidates >= 0) {
      gate_screened_calls += 1;
      gate_candidate_rows += s.gate_candidates;
    }
  }
};

// A decoder-only transformer over mapped weights, with its KV cache. Not reentrant.
// The checks every model forward makes (CPU Model, CudaModel): at least one token, the cache
// holds pos0 + T positions, every id inside the vocabulary. Throws std::invalid_argument.
inline void check_forward_call(const int32_t* tokens, int64_t T, int64_t pos0, int64_t capacity, int64_t vocab) {
  if (T < 1) throw std::invalid_argument("forward: no tokens");
  if (pos0 + T > capacity)
    throw std::invalid_argument("forward: " + std::to_string(pos0 + T) + " positions exceed the context of " +
                                std::to_string(capacity));
  for (int64_t t = 0; t < T; ++t)
    if (tokens[t] < 0 || tokens[t] >= vocab)
      throw std::invalid_argument("forward: token id " + std::to_string(tokens[t]) + " is outside the vocabulary of " +
                                  std::to_string(vocab));
}

// Steps of a forward pass, for the wall-time profile (Model::set_profiling).
enum class ModelStep : int { Embed, Norms, Qkv, Rope, KvStore, Attention, OProj, Residual, Ffn, Head, Count };
constexpr int kModelSteps = static_cast<int>(ModelStep::Count);
const char* model_step_name(ModelStep s);

// Wall seconds spent in each step while profiling, and the tokens and calls they cover.
struct StepTimes {
  double seconds[kModelSteps] = {};
  int64_t tokens = 0;
  int64_t calls = 0;
};

class Model {
 public:
  // `context`: KV-cache positions (<= max_positions). `keep_alive` holds the mapping.
  Model(const ModelConfig& cfg, ModelWeights weights, int64_t context, std::shared_ptr<void> keep_alive);

  const ModelConfig& config() const { return cfg_; }
  int64_t context() const { return cache_.capacity; }
  // The KV cache's element, F32 (the default) or BF16; setting it empties the cache (position 0).
  DType kv_dtype() const { return cache_.dtype; }
  void set_kv_dtype(DType t);
  // Positions already in the cache (the next token's position).
  int64_t position() const { return cache_.length; }
  void reset() { cache_.length = 0; }

  // Runs T tokens at positions position() .. position() + T − 1 and appends them to the cache.
  // logits: [vocab] for the last token, or [T, vocab] when all_logits. Throws
  // std::invalid_argument when a token is out of range or the context would overflow.
  void forward(const int32_t* tokens, int64_t T, bool all_logits, RunMode mode, float* logits);

  const std::vector<LayerActivity>& activity() const { return activity_; }
  void reset_stats();

  // Wall-time profile by step (off by default: one clock read per step and layer when on).
  // reset_stats() clears it too.
  void set_profiling(bool on) { profiling_ = on; }
  const StepTimes& step_times() const { return step_times_; }

  // Calibration hook (sparsellm prune): when set, every FFN runs the dense path and, after each
  // layer, the observer gets that layer's activations for the call: act [T, F] = act(pre), before
  // any threshold, and hidden [T, F] = the hidden units h that W_down consumes (act ⊙ up when
  // gated, after the threshold). Both buffers are only valid during the call. Empty: none.
  using FfnObserver = std::function<void(int64_t layer, int64_t T, int64_t F, const float* act, const float* hidden)>;
  void set_ffn_observer(FfnObserver observer) { observer_ = std::move(observer); }
  // Calls with at most this many tokens use the decode kernels.
  static constexpr int64_t kDecodeMaxTokens = 4;

 private:
  class StepClock;
  void attention_block(int64_t layer, int64_t T, int64_t pos0, StepClock& clock);
  void ffn_block(int64_t layer, int64_t T, RunMode mode, StepClock& clock);
  void ffn_dense_generic(int64_t layer, int64_t T);

  ModelConfig cfg_;
  ModelWeights w_;
  std::shared_ptr<void> keep_alive_;
  std::vector<std::unique_ptr<FfnLayer>> ffn_;
  KvCache cache_;
  std::vector<LayerActivity> activity_;
  FfnObserver observer_;
  bool profiling_ = false;
  StepTimes step_times_;
  // Work buffers [T, ·], grown on demand.
  std::vector<float> x_, h_, q_, k_, v_, att_, y_, g_, u_, obs_act_, rope_cs_;
};

}  // namespace sparsellm
