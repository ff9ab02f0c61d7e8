// The pieces of a decoder-only transformer other than its projections and FFN kernels:
// embeddings, learned positions, RMSNorm / LayerNorm, RoPE, activations, biases, and causal
// attention over an f32 KV cache. Activations are f32 row-major with an explicit leading
// dimension (elements between consecutive token rows). T = tokens in the call, d = width.
// Each function is the plain reference and the one that runs; OpenMP over rows or heads.
#pragma once
#include <cstdint>
#include <vector>

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

// Keys and values of every layer, f32, laid out [layer][kv_head][position][head_dim] so that
// one head's keys are contiguous. `length` is the number of positions filled (the next
// position to write); the model advances it after all layers have stored a call's tokens.
struct KvCache {
  int64_t n_layers = 0, n_kv_heads = 0, head_dim = 0, capacity = 0;
  int64_t length = 0;
  std::vector<float> k, v;

  void allocate(int64_t layers, int64_t kv_heads, int64_t hd, int64_t positions);
  float* k_at(int64_t layer, int64_t head, int64_t pos) {
    return k.data() + ((layer * n_kv_heads + head) * capacity + pos) * head_dim;
  }
  float* v_at(int64_t layer, int64_t head, int64_t pos) {
    return v.data() + ((layer * n_kv_heads + head) * capacity + pos) * head_dim;
  }
  const float* k_at(int64_t layer, int64_t head, int64_t pos) const {
    return k.data() + ((layer * n_kv_heads + head) * capacity + pos) * head_dim;
  }
  const float* v_at(int64_t layer, int64_t head, int64_t pos) const {
    return v.data() + ((layer * n_kv_heads + head) * capacity + pos) * head_dim;
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
// 1/sqrt(head_dim), softmax in f32 with the running maximum subtracted.
void attention_causal(const float* q, int64_t ldq, int64_t T, int64_t n_heads, const KvCache& cache,
                      int64_t layer, int64_t pos0, float* out, int64_t ldo);

}  // namespace sparsellm
