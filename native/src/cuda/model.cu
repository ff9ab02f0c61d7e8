// CudaModel (cuda_ops.h): the whole forward pass on the GPU, mirroring Model::forward,
// attention_block and ffn_block of native/src/cpu/model_runtime.cpp step by step. Orchestration
// only: the kernels are in model_ops.cu, gemm.cu and the FFN layer's files.
//
// Per layer, for T tokens at positions pos0 ..:
//   hb = norm(x) (bf16 [T, dp]);  qkv = hb · [Wq; Wk; Wv]ᵀ + [bq; bk; bv]  (f32 [T, qd + 2·kd])
//   RoPE on q and k; k, v → cache;  ab = attention(q, cache) (bf16 [T, qdp])
//   x += ab · Woᵀ + bo  (GEMM epilogue accumulates into the residual stream)
//   hb = norm(x);  x += FFN(hb)
// then hb = final_norm(x rows), logits = hb · lm_headᵀ, downloaded.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "common.cuh"
#include "sparsellm/cuda_ops.h"

namespace sparsellm::cuda {
namespace {

int64_t round8(int64_t v) { return (v + 7) / 8 * 8; }

float host_elem(const void* p, DType dt, int64_t i) {
  if (dt == DType::F32) return static_cast<const float*>(p)[i];
  return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
}

void check_dtype(DType dt, const std::string& what) {
  if (dt != DType::F32 && dt != DType::BF16)
    throw std::invalid_argument("CUDA model: " + what + " must be stored as F32 or BF16");
}

// Rows of a weight view appended as bf16 [rows, ldp] (padding zero) to `out`.
void append_bf16(const WeightView& w, int64_t ldp, std::vector<uint16_t>& out, const std::string& what) {
  if (!w.data) throw std::invalid_argument("CUDA model: " + what + " is missing");
  check_dtype(w.dtype, what);
  const size_t base = out.size();
  out.resize(base + static_cast<size_t>(w.rows * ldp), 0);
  for (int64_t r = 0; r < w.rows; ++r) {
    uint16_t* dst = out.data() + base + r * ldp;
    if (w.dtype == DType::BF16) {
      const uint16_t* src = static_cast<const uint16_t*>(w.data) + r * w.ld;
      std::copy(src, src + w.cols, dst);
    } else {
      const float* src = static_cast<const float*>(w.data) + r * w.ld;
      for (int64_t c = 0; c < w.cols; ++c) dst[c] = f32_to_bf16(src[c]);
    }
  }
}

DeviceBuffer device_copy(const void* host, size_t bytes) {
  DeviceBuffer b;
  if (bytes) {
    b.reserve(bytes);
    upload(b.data(), host, bytes);
  }
  return b;
}

DeviceBuffer device_bf16(const WeightView& w, int64_t ldp, const std::string& what) {
  std::vector<uint16_t> h;
  append_bf16(w, ldp, h, what);
  return device_copy(h.data(), h.size() * 2);
}

DeviceBuffer device_f32(const float* p, int64_t n) {
  return p ? device_copy(p, static_cast<size_t>(n) * 4) : DeviceBuffer{};
}

const float* fptr(const DeviceBuffer& b) { return b.bytes() ? b.as<float>() : nullptr; }

FfnMode ffn_mode(RunMode m) {
  switch (m) {
    case RunMode::Dense: return FfnMode::Dense;
    case RunMode::Sparse: return FfnMode::Sparse;
    default: return FfnMode::Auto;
  }
}

using MatMul = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, int64_t, int64_t, int64_t,
                        const Epilogue&);
MatMul matmul_for(int64_t rows) { return rows <= kGemvMaxRows ? gemv_bf16 : gemm_bf16; }

}  // namespace

struct CudaModel::Impl {
  struct Layer {
    DeviceBuffer norm1_w, norm1_b, norm2_w, norm2_b;  // f32 [d]
    DeviceBuffer wqkv;                                // bf16 [qd + 2·kd, dp]
    DeviceBuffer bqkv;                                // f32 [qd + 2·kd] (zeros where absent) or none
    DeviceBuffer wo;                                  // bf16 [d, qdp]
    DeviceBuffer bo;                                  // f32 [d] or none
    std::unique_ptr<CudaFfnLayer> ffn;
    DeviceBuffer up_b, down_b;  // f32, for the decode and generic paths (up_b as the CPU uses it)
    bool plain_relu = true;
    ActKind act = ActKind::Relu;
    float threshold = -1.f;
    int64_t F = 0, Fp = 0;
  };

  ModelConfig cfg;
  int64_t context = 0, length = 0;
  int64_t d = 0, dp = 0, qd = 0, kd = 0, qdp = 0, nqkv = 0, half = 0, Fmax = 0, Fpmax = 0;
  std::vector<Layer> layers;
  DeviceBuffer embed, pos_embed, lm_head_own, final_w, final_b, inv_freq;
  const uint16_t* lm_head = nullptr;  // embed (tied) or lm_head_own
  int64_t pos_rows = 0;
  DeviceBuffer cache_k, cache_v;
  int64_t layer_cache = 0;  // floats per layer in each of cache_k / cache_v
  // Work buffers, grown on demand.
  DeviceBuffer tok, x, hb, qkv, ab, y, cs, logits, G, U, H, gdec;
  DeviceBuffer counters;  // unsigned long long [layers][2]: {nnz, max_row_nnz} of device-counted calls
  std::vector<LayerActivity> activity;  // host-counted part
  int64_t weight_bytes = 0;

  void attention_block(int64_t l, int64_t T, int64_t pos0);
  void ffn_block(int64_t l, int64_t T, RunMode mode);
  unsigned long long* layer_counters(int64_t l) const { return counters.as<unsigned long long>() + 2 * l; }
};

CudaModel::CudaModel(const ModelConfig& cfg, const ModelWeights& w, int64_t context) : impl_(std::make_unique<Impl>()) {
  require_device();
  Impl& M = *impl_;
  M.cfg = cfg;
  if (cfg.n_layers != static_cast<int64_t>(w.layers.size())) throw std::invalid_argument("model: layer count mismatch");
  if (cfg.n_kv_heads < 1 || cfg.n_heads % cfg.n_kv_heads != 0)
    throw std::invalid_argument("model: n_heads must be a multiple of n_kv_heads");
  if (cfg.rope && cfg.head_dim % 2 != 0) throw std::invalid_argument("model: RoPE needs an even head_dim");
  if (cfg.head_dim < 1 || cfg.head_dim > 256)
    throw std::invalid_argument("model: head_dim " + std::to_string(cfg.head_dim) +
                                " is not supported by the CUDA attention (at most 256)");
  if (context < 1 || context > cfg.max_positions)
    throw std::invalid_argument("model: context must be in [1, " + std::to_string(cfg.max_positions) + "]");
  M.context = context;
  M.d = cfg.d_model;
  M.dp = round8(M.d);
  M.qd = cfg.n_heads * cfg.head_dim;
  M.kd = cfg.n_kv_heads * cfg.head_dim;
  M.qdp = round8(M.qd);
  M.nqkv = M.qd + 2 * M.kd;
  M.half = cfg.head_dim / 2;
  const int64_t d = M.d, dp = M.dp;

  // Tables: embeddings bf16 [vocab, dp] (the LM head's GEMM reads them when tied).
  if (w.embed.rows != cfg.vocab || w.embed.cols != d) throw std::invalid_argument("model: embedding shape mismatch");
  M.embed = device_bf16(w.embed, dp, "the embedding table");
  M.weight_bytes += static_cast<int64_t>(M.embed.bytes());
  const bool tied = w.lm_head.data == w.embed.data && w.lm_head.dtype == w.embed.dtype && w.lm_head.ld == w.embed.ld &&
                    w.lm_head.rows == w.embed.rows && w.lm_head.cols == w.embed.cols;
  if (tied) {
    M.lm_head = M.embed.as<uint16_t>();
  } else {
    if (w.lm_head.rows != cfg.vocab || w.lm_head.cols != d) throw std::invalid_argument("model: LM head shape mismatch");
    M.lm_head_own = device_bf16(w.lm_head, dp, "the LM head");
    M.lm_head = M.lm_head_own.as<uint16_t>();
    M.weight_bytes += static_cast<int64_t>(M.lm_head_own.bytes());
  }
  if (!cfg.rope) {
    if (w.pos_embed.cols != d || w.pos_embed.rows < context + cfg.position_offset)
      throw std::invalid_argument("model: the position table is smaller than the context");
    M.pos_rows = w.pos_embed.rows;
    M.pos_embed = device_bf16(w.pos_embed, d, "the position table");
    M.weight_bytes += static_cast<int64_t>(M.pos_embed.bytes());
  } else {
    std::vector<double> inv(static_cast<size_t>(M.half));
    for (int64_t i = 0; i < M.half; ++i)
      inv[static_cast<size_t>(i)] =
          std::pow(cfg.rope_theta, -2.0 * static_cast<double>(i) / static_cast<double>(cfg.head_dim));
    M.inv_freq = device_copy(inv.data(), inv.size() * sizeof(double));
  }
  if (!w.final_norm_w) throw std::invalid_argument("model: the final norm weight is missing");
  M.final_w = device_f32(w.final_norm_w, d);
  if (!cfg.rmsnorm) M.final_b = device_f32(w.final_norm_b, d);

  for (int64_t l = 0; l < cfg.n_layers; ++l) {
    const LayerWeights& L = w.layers[static_cast<size_t>(l)];
    const std::string at = "layer " + std::to_string(l) + ": ";
    Impl::Layer D;
    if (!L.attn_norm_w || !L.ffn_norm_w) throw std::invalid_argument("model: " + at + "a norm weight is missing");
    D.norm1_w = device_f32(L.attn_norm_w, d);
    D.norm2_w = device_f32(L.ffn_norm_w, d);
    if (!cfg.rmsnorm) {
      D.norm1_b = device_f32(L.attn_norm_b, d);
      D.norm2_b = device_f32(L.ffn_norm_b, d);
    }
    // q, k, v stacked into one matrix: one GEMM per layer reads the normed activations once.
    if (L.q.rows != M.qd || L.k.rows != M.kd || L.v.rows != M.kd || L.q.cols != d || L.k.cols != d || L.v.cols != d ||
        L.o.rows != d || L.o.cols != M.qd)
      throw std::invalid_argument("model: " + at + "attention projection shapes mismatch");
    {
      std::vector<uint16_t> h;
      h.reserve(static_cast<size_t>(M.nqkv * dp));
      append_bf16(L.q, dp, h, at + "W_q");
      append_bf16(L.k, dp, h, at + "W_k");
      append_bf16(L.v, dp, h, at + "W_v");
      D.wqkv = device_copy(h.data(), h.size() * 2);
    }
    if (L.q_b || L.k_b || L.v_b) {
      std::vector<float> b(static_cast<size_t>(M.nqkv), 0.f);
      if (L.q_b) std::copy(L.q_b, L.q_b + M.qd, b.begin());
      if (L.k_b) std::copy(L.k_b, L.k_b + M.kd, b.begin() + M.qd);
      if (L.v_b) std::copy(L.v_b, L.v_b + M.kd, b.begin() + M.qd + M.kd);
      D.bqkv = device_copy(b.data(), b.size() * 4);
    }
    D.wo = device_bf16(L.o, M.qdp, at + "W_o");
    D.bo = device_f32(L.o_b, d);
    M.weight_bytes += static_cast<int64_t>(D.wqkv.bytes() + D.wo.bytes());

    // The FFN: the CudaFfnLayer holds the bf16 kernel-layout weights (and W_down standard); it
    // takes standard f32 layouts, rebuilt here from the packed kernel layout.
    const int64_t F = L.d_ff;
    if (F < 1 || !L.ffn_a || !L.ffn_b) throw std::invalid_argument("model: " + at + "FFN weights are missing");
    check_dtype(L.ffn_dtype, at + "the FFN weights");
    D.F = F;
    D.Fp = round8(F);
    D.act = L.act;
    D.threshold = L.threshold;
    D.plain_relu = L.act == ActKind::Relu && L.threshold <= 0.f;
    if (L.act == ActKind::Identity)
      throw std::invalid_argument("model: " + at + "the CUDA runtime has no FFN with the identity activation");
    std::vector<float> gate, up(static_cast<size_t>(F * d)), down(static_cast<size_t>(d * F));
    const void* A = L.ffn_a;
    const void* B = L.ffn_b;
    const DType dt = L.ffn_dtype;
    if (cfg.gated) {
      gate.resize(static_cast<size_t>(F * d));
      for (int64_t j = 0; j < F; ++j)
        for (int64_t k = 0; k < d; ++k) {
          gate[j * d + k] = host_elem(A, dt, j * d + k);
          up[j * d + k] = host_elem(B, dt, j * 2 * d + k);
          down[k * F + j] = host_elem(B, dt, j * 2 * d + d + k);
        }
    } else {
      for (int64_t j = 0; j < F; ++j)
        for (int64_t k = 0; k < d; ++k) {
          up[j * d + k] = host_elem(A, dt, j * d + k);
          down[k * F + j] = host_elem(B, dt, j * d + k);
        }
    }
    FfnLayerConfig fc;
    fc.d_model = d;
    fc.d_ff = F;
    fc.gated = cfg.gated;
    fc.dtype = DType::BF16;
    fc.twell = L.twell;
    // A layer that never runs the TwELL kernels here (the generic path) needs no TwELL shape
    // the device supports.
    if (!D.plain_relu && !twell_tile_supported(fc.twell.tile)) fc.twell = TwellParams{};
    if (D.plain_relu && !twell_tile_supported(fc.twell.tile))
      throw std::invalid_argument("model: " + at + "TwELL tile width " + std::to_string(fc.twell.tile) +
                                  " is not supported on CUDA (32, 64, 128 or 256)");
    // The CPU FfnLayer reads the up bias of non-gated layers only (as CudaFfnLayer does).
    D.ffn = std::make_unique<CudaFfnLayer>(fc, cfg.gated ? gate.data() : nullptr, up.data(), down.data(),
                                           cfg.gated ? nullptr : L.up_b, L.down_b);
    D.up_b = device_f32(L.up_b, F);
    D.down_b = device_f32(L.down_b, d);
    M.weight_bytes += D.ffn->device_bytes();
    M.Fmax = std::max(M.Fmax, F);
    M.Fpmax = std::max(M.Fpmax, D.Fp);
    M.layers.push_back(std::move(D));
  }

  M.layer_cache = cfg.n_kv_heads * context * cfg.head_dim;
  const size_t cache_bytes = static_cast<size_t>(cfg.n_layers * M.layer_cache) * 4;
  M.cache_k.reserve(cache_bytes);
  M.cache_v.reserve(cache_bytes);
  memset_device(M.cache_k.data(), 0, cache_bytes);
  memset_device(M.cache_v.data(), 0, cache_bytes);
  M.counters.reserve(static_cast<size_t>(std::max<int64_t>(cfg.n_layers, 1)) * 2 * sizeof(unsigned long long));
  reset_stats();
  synchronize();
}

CudaModel::~CudaModel() = default;

const ModelConfig& CudaModel::config() const { return impl_->cfg; }
int64_t CudaModel::context() const { return impl_->context; }
int64_t CudaModel::position() const { return impl_->length; }
void CudaModel::reset() { impl_->length = 0; }

int64_t CudaModel::bytes() const {
  return impl_->weight_bytes + static_cast<int64_t>(impl_->cache_k.bytes() + impl_->cache_v.bytes());
}

void CudaModel::reset_stats() {
  Impl& M = *impl_;
  M.activity.assign(static_cast<size_t>(M.cfg.n_layers), LayerActivity{});
  memset_device(M.counters.data(), 0, M.counters.bytes());
}

std::vector<LayerActivity> CudaModel::activity() const {
  const Impl& M = *impl_;
  std::vector<unsigned long long> c(static_cast<size_t>(2 * M.cfg.n_layers), 0);
  if (!c.empty()) download(c.data(), M.counters.data(), c.size() * sizeof(unsigned long long));
  std::vector<LayerActivity> out = M.activity;
  for (size_t l = 0; l < out.size(); ++l) {
    out[l].nnz += static_cast<int64_t>(c[2 * l]);
    out[l].max_row_nnz = std::max(out[l].max_row_nnz, static_cast<int64_t>(c[2 * l + 1]));
  }
  return out;
}

void CudaModel::forward(const int32_t* tokens, int64_t T, bool all_logits, RunMode mode, float* logits) {
  Impl& M = *impl_;
  const ModelConfig& cfg = M.cfg;
  const int64_t pos0 = M.length;
  check_forward_call(tokens, T, pos0, M.context, cfg.vocab);
  const int64_t d = M.d, dp = M.dp;
  M.tok.reserve(static_cast<size_t>(T) * 4);
  M.x.reserve(static_cast<size_t>(T * d) * 4);
  M.hb.reserve(static_cast<size_t>(T * dp) * 2);
  M.y.reserve(static_cast<size_t>(T * d) * 4);
  upload(M.tok.data(), tokens, static_cast<size_t>(T) * 4);
  float* x = M.x.as<float>();
  embed_rows_bf16(M.embed.as<uint16_t>(), dp, M.tok.as<int32_t>(), T, d, x, d);
  if (!cfg.rope) {
    add_rows_bf16(M.pos_embed.as<uint16_t>(), d, pos0 + cfg.position_offset, T, d, x, d);
  } else {
    M.cs.reserve(static_cast<size_t>(T * M.half * 2) * 4);
    rope_table_device(T, M.half, pos0, M.inv_freq.as<double>(), M.cs.as<float>());
  }
  for (int64_t l = 0; l < cfg.n_layers; ++l) {
    M.attention_block(l, T, pos0);
    M.ffn_block(l, T, mode);
  }
  M.length = pos0 + T;
  const int64_t rows = all_logits ? T : 1;
  const float* src = x + (all_logits ? 0 : (T - 1) * d);
  norm_rows(src, d, rows, d, M.final_w.as<float>(), fptr(M.final_b), cfg.norm_eps, cfg.rmsnorm, M.hb.as<uint16_t>(),
            dp);
  M.logits.reserve(static_cast<size_t>(rows * cfg.vocab) * 4);
  Epilogue e;
  e.out = M.logits.data();
  e.ldo = cfg.vocab;
  matmul_for(rows)(M.hb.as<uint16_t>(), dp, M.lm_head, dp, rows, cfg.vocab, d, e);
  download(logits, M.logits.data(), static_cast<size_t>(rows * cfg.vocab) * 4);
}

void CudaModel::Impl::attention_block(int64_t l, int64_t T, int64_t pos0) {
  Layer& L = layers[static_cast<size_t>(l)];
  qkv.reserve(static_cast<size_t>(T * nqkv) * 4);
  ab.reserve(static_cast<size_t>(T * qdp) * 2);
  norm_rows(x.as<float>(), d, T, d, L.norm1_w.as<float>(), fptr(L.norm1_b), cfg.norm_eps, cfg.rmsnorm,
            hb.as<uint16_t>(), dp);
  const MatMul mm = matmul_for(T);
  Epilogue e;
  e.bias = fptr(L.bqkv);
  e.out = qkv.data();
  e.ldo = nqkv;
  mm(hb.as<uint16_t>(), dp, L.wqkv.as<uint16_t>(), dp, T, nqkv, d, e);
  float* q = qkv.as<float>();
  float* k = q + qd;
  float* v = q + qd + kd;
  if (cfg.rope) {
    rope_apply_device(q, nqkv, T, cfg.n_heads, cfg.head_dim, cs.as<float>());
    rope_apply_device(k, nqkv, T, cfg.n_kv_heads, cfg.head_dim, cs.as<float>());
  }
  float* ck = cache_k.as<float>() + l * layer_cache;
  float* cv = cache_v.as<float>() + l * layer_cache;
  kv_store_device(ck, cv, cfg.n_kv_heads, context, cfg.head_dim, k, nqkv, v, nqkv, T, pos0);
  attention_device(q, nqkv, T, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, ck, cv, context, pos0, ab.as<uint16_t>(),
                   qdp);
  // x += ab · Woᵀ + bo, accumulated by the GEMM's epilogue.
  Epilogue o;
  o.bias = fptr(L.bo);
  o.out = x.data();
  o.ldo = d;
  o.accumulate = true;
  mm(ab.as<uint16_t>(), qdp, L.wo.as<uint16_t>(), qdp, T, d, qd, o);
}

void CudaModel::Impl::ffn_block(int64_t l, int64_t T, RunMode mode) {
  Layer& L = layers[static_cast<size_t>(l)];
  norm_rows(x.as<float>(), d, T, d, L.norm2_w.as<float>(), fptr(L.norm2_b), cfg.norm_eps, cfg.rmsnorm,
            hb.as<uint16_t>(), dp);
  LayerActivity& a = activity[static_cast<size_t>(l)];
  const CudaFfnLayer::Weights W = L.ffn->device_weights();
  const uint16_t* xin = hb.as<uint16_t>();
  if (L.plain_relu) {
    float* yv = y.as<float>();
    if (T <= kDecodeMaxTokens && mode == RunMode::Dense) {
      L.ffn->decode_device(xin, T, yv, FfnMode::Dense);
      a.dense_calls += 1;
    } else if (T <= kDecodeMaxTokens) {
      // Sparse decode (auto and sparse modes, as CudaFfnLayer::decode_device): the ReLU'd gate
      // by a GEMV, its positives counted on the device, then only the active neurons' rows.
      gdec.reserve(static_cast<size_t>(T * L.F) * 4);
      Epilogue e;
      e.op = EpiOp::Relu;
      e.bias = cfg.gated ? nullptr : fptr(L.up_b);
      e.out = gdec.data();
      e.ldo = L.F;
      gemv_bf16(xin, dp, W.act, W.dp, T, L.F, d, e);
      count_positive_rows_f32(gdec.as<float>(), L.F, T, L.F, layer_counters(l));
      const uint16_t* up = cfg.gated ? W.rows : nullptr;
      const uint16_t* down_t = cfg.gated ? W.rows + W.dp : W.rows;
      const int64_t ldw = cfg.gated ? 2 * W.dp : W.dp;
      decode_sparse_bf16(xin, dp, T, gdec.as<float>(), L.F, L.F, up, down_t, ldw, d, fptr(L.down_b), yv, d);
      a.tokens += T;
      a.sparse_calls += 1;
    } else {
      const FfnStats s = L.ffn->forward_device(xin, T, yv, ffn_mode(mode), true);
      a.add(s);
    }
    add_rows_f32(x.as<float>(), d, yv, d, T, d);
    return;
  }
  // Generic dense path (Model::ffn_dense_generic): g = x·W_gateᵀ (non-gated: x·W_upᵀ + b_up),
  // u = x·W_upᵀ + b_up (gated), h = act(g) thresholded (⊙ u), x += h·W_downᵀ + b_down.
  const int64_t F = L.F;
  G.reserve(static_cast<size_t>(T * Fmax) * 4);
  if (cfg.gated) U.reserve(static_cast<size_t>(T * Fmax) * 4);
  H.reserve(static_cast<size_t>(T * Fpmax) * 2);
  const MatMul mm = matmul_for(T);
  Epilogue e;
  e.bias = cfg.gated ? nullptr : fptr(L.up_b);
  e.out = G.data();
  e.ldo = F;
  mm(xin, dp, W.act, W.dp, T, F, d, e);
  if (cfg.gated) {
    Epilogue eu;
    eu.bias = fptr(L.up_b);
    eu.out = U.data();
    eu.ldo = F;
    mm(xin, dp, W.rows, 2 * W.dp, T, F, d, eu);
  }
  ffn_activate_device(G.as<float>(), cfg.gated ? U.as<float>() : nullptr, F, T, F, L.act, L.threshold,
                      H.as<uint16_t>(), L.Fp, layer_counters(l));
  Epilogue o;
  o.bias = fptr(L.down_b);
  o.out = x.data();
  o.ldo = d;
  o.accumulate = true;
  mm(H.as<uint16_t>(), L.Fp, W.down_std, W.Fp, T, d, F, o);
  a.tokens += T;
  a.dense_calls += 1;
}

}  // namespace sparsellm::cuda
