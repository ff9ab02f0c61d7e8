// CudaTrainer (train_model.h): Trainer::forward_backward, step and the dead-neuron window of
// native/src/cpu/train_model.cpp, line for line, on device buffers through train_ops.h. Host
// code only (the kernels are in train_ops.cu).
//
// UNVERIFIED: compile-checked and run through a host emulation of its kernels only.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>

#include "sparsellm/cuda_ops.h"
#include "train_model.h"
#include "train_ops.h"

namespace sparsellm::cuda {

using train::MatRef;

namespace {

size_t sz(int64_t n) { return static_cast<size_t>(n); }

// The CPU trainer's seed mixer (train_model.cpp), so that the same seed gives the same draws.
uint64_t mix(uint64_t a, uint64_t b) {
  uint64_t z = a ^ (b + 0x9e3779b97f4a7c15ULL + (a << 6) + (a >> 2));
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Per-call statistics on the device: doubles {ce, grad ss, l1[layers]}, then u64 {nnz, max,
// tail rows}[layers], then u64 scratch [2].
struct StatsLayout {
  int64_t layers = 0;
  size_t bytes() const { return sz(2 + layers) * 8 + sz(3 * layers + 2) * 8; }
};

}  // namespace

struct CudaTrainer::Impl {
  struct LayerOffsets {
    int64_t attn_norm, q, k, v, o, ffn_norm, gate, updown;
  };
  struct LayerActs {
    // G, U: the dense tape, or the hybrid tail rows' (first rows); the rest of the hybrid tape:
    DeviceBuffer x_in, xn1, rstd1, qkv, lse, att, x_mid, xn2, rstd2, G, U;
    DeviceBuffer row_nnz, col, hg, hu, tail;  // tail: [M] rows then the count
    bool hybrid = false;
  };
  TrainModelConfig cfg;
  TrainHyper hp;
  train::MatmulPrecision matmul = train::MatmulPrecision::F32;
  std::vector<TrainTensor> tensors;
  std::vector<LayerOffsets> lo;
  int64_t off_embed = 0, off_final_norm = 0, n_params = 0;
  std::vector<std::pair<int64_t, int64_t>> no_decay;
  DeviceBuffer w, g, m, v, fired, cos_t, sin_t;
  TrainerState st;  // `fired` lives on the device
  std::vector<LayerActs> acts;
  DeviceBuffer ids, xf, xnf, rstdf, logits, tmp, dx, dxn, datt, dqkv, scores, H, dH, dG, norm_part, stats;
  DeviceBuffer hx, hy, hz, hdu, hdg, hrank, hlist, hhist, hoffs;  // hybrid scratch
  // MatmulPrecision::Bf16: each hybrid layer's gate and updown weights as bf16 for the light rows
  // (train_ops.h LightRowWeights), made when the layer first runs hybrid and refreshed when the
  // weights have changed since (w_stamp counts the changes: init, set_tensor, every step).
  std::vector<DeviceBuffer> w16;
  std::vector<int64_t> w16_stamp;
  int64_t w_stamp = 1;
  bool grads_zero = true;
  int64_t saved_bytes = 0, peak_saved_bytes = 0, peak_device_bytes = 0;
  int64_t device_bytes() const;
  int64_t cap_M = 0, cap_L = 0, cap_S = 0;  // capacity: tokens, B·H·T (lse), attention scores per buffer
  int64_t attn_scratch = 0;                 // this micro-batch's score buffer (elements; `scores` holds two)

  float* W() const { return w.as<float>(); }
  float* Gr() const { return g.as<float>(); }
  void grow(int64_t B, int64_t T);
  void check_tokens(const int32_t* tokens, int64_t n, int64_t T) const;
  int64_t index_of(const std::string& name) const;
  StepStats forward_backward(const int32_t* tokens, int64_t B, int64_t T, double scale, bool backward, EvalStats* eval);
  void end_of_step(int64_t tokens, StepStats& s);
  train::HybridBuffers hybrid_buffers(LayerActs& a, int64_t M);
  void fit_tail_tape(LayerActs& a, int64_t rows);
  train::LightRowWeights light_weights(int64_t l);
};

CudaTrainer::CudaTrainer(const TrainModelConfig& c, const TrainHyper& h, train::MatmulPrecision matmul)
    : impl_(std::make_unique<Impl>()) {
  Impl& I = *impl_;
  I.cfg = c;
  I.hp = h;
  I.matmul = matmul;
  if (c.vocab < 2 || c.d_model < 2 || c.n_layers < 1 || c.n_heads < 1 || c.d_ff < 1 || c.context < 2)
    throw std::invalid_argument("CudaTrainer: vocab, d_model, layers, heads, d_ff and context must be positive");
  if (c.d_model % c.n_heads != 0 || (c.d_model / c.n_heads) % 2 != 0)
    throw std::invalid_argument("CudaTrainer: d_model must be a multiple of heads with an even head width");
  if (c.vocab > (int64_t(1) << 31) - 1) throw std::invalid_argument("CudaTrainer: vocabulary too large");
  if (h.ell_width < 1) throw std::invalid_argument("CudaTrainer: ELL width must be >= 1");
  require_device();
  const int64_t d = c.d_model, F = c.d_ff, V = c.vocab;
  int64_t off = 0;
  auto take = [&](int64_t n) { const int64_t o = off; off += n; return o; };
  I.off_embed = take(V * d);
  I.tensors.push_back({"model.embed_tokens.weight", V, d});
  for (int64_t l = 0; l < c.n_layers; ++l) {
    Impl::LayerOffsets L{};
    const std::string p = "model.layers." + std::to_string(l) + ".";
    L.attn_norm = take(d);
    I.no_decay.push_back({L.attn_norm, L.attn_norm + d});
    L.q = take(d * d);
    L.k = take(d * d);
    L.v = take(d * d);
    L.o = take(d * d);
    L.ffn_norm = take(d);
    I.no_decay.push_back({L.ffn_norm, L.ffn_norm + d});
    L.gate = take(F * d);
    L.updown = take(2 * F * d);
    I.lo.push_back(L);
    I.tensors.push_back({p + "input_layernorm.weight", d, 1});
    I.tensors.push_back({p + "self_attn.q_proj.weight", d, d});
    I.tensors.push_back({p + "self_attn.k_proj.weight", d, d});
    I.tensors.push_back({p + "self_attn.v_proj.weight", d, d});
    I.tensors.push_back({p + "self_attn.o_proj.weight", d, d});
    I.tensors.push_back({p + "post_attention_layernorm.weight", d, 1});
    I.tensors.push_back({p + "mlp.gate_proj.weight", F, d});
    I.tensors.push_back({p + "mlp.up_proj.weight", F, d});
    I.tensors.push_back({p + "mlp.down_proj.weight", d, F});
  }
  I.off_final_norm = take(d);
  I.no_decay.push_back({I.off_final_norm, I.off_final_norm + d});
  I.tensors.push_back({"model.norm.weight", d, 1});
  I.n_params = off;
  const size_t pb = sz(I.n_params) * 4;
  for (DeviceBuffer* b : {&I.w, &I.g, &I.m, &I.v}) {
    b->reserve(pb);
    memset_device(b->data(), 0, pb);
  }
  const size_t nl = sz(c.n_layers);
  I.st.hybrid.assign(nl, h.ffn_path == FfnTrainPath::Hybrid ? 1 : 0);
  I.st.last_nnz.assign(nl, 0.0);
  I.st.fired.assign(nl * sz(F), 0);
  I.st.dead.assign(nl, 0);
  I.fired.reserve(nl * sz(F));
  memset_device(I.fired.data(), 0, nl * sz(F));
  I.acts.resize(nl);
  I.w16.resize(nl);
  I.w16_stamp.assign(nl, 0);
  // RoPE tables as the CPU rope_tables computes them (float64 angles, rounded once).
  const int64_t hd = d / c.n_heads, half = hd / 2;
  std::vector<float> ct(sz(c.context * half)), stb(sz(c.context * half));
  for (int64_t p = 0; p < c.context; ++p)
    for (int64_t i = 0; i < half; ++i) {
      const double a = static_cast<double>(p) * std::pow(c.rope_theta, -2.0 * static_cast<double>(i) / static_cast<double>(hd));
      ct[sz(p * half + i)] = static_cast<float>(std::cos(a));
      stb[sz(p * half + i)] = static_cast<float>(std::sin(a));
    }
  I.cos_t.reserve(ct.size() * 4);
  I.sin_t.reserve(stb.size() * 4);
  upload(I.cos_t.data(), ct.data(), ct.size() * 4);
  upload(I.sin_t.data(), stb.data(), stb.size() * 4);
  I.stats.reserve(StatsLayout{c.n_layers}.bytes());
  synchronize();
}

CudaTrainer::~CudaTrainer() = default;

const TrainModelConfig& CudaTrainer::config() const { return impl_->cfg; }
train::MatmulPrecision CudaTrainer::matmul() const { return impl_->matmul; }
TrainHyper& CudaTrainer::hyper() { return impl_->hp; }
const std::vector<TrainTensor>& CudaTrainer::tensors() const { return impl_->tensors; }
int64_t CudaTrainer::param_count() const { return impl_->n_params; }
int64_t CudaTrainer::saved_bytes() const { return impl_->saved_bytes; }
int64_t CudaTrainer::peak_saved_bytes() const { return impl_->peak_saved_bytes; }

// Same draws, in the same order, as Trainer::init_weights: the embedding, then each layer's
// span in layout order (norms set to 1 without draws; o and down scaled), then the final norm.
void CudaTrainer::init_weights() {
  Impl& I = *impl_;
  ++I.w_stamp;
  const int64_t d = I.cfg.d_model, F = I.cfg.d_ff;
  std::mt19937_64 rng(mix(I.hp.seed, 0x1417));
  std::normal_distribution<float> nd(0.f, I.hp.init_std);
  const float out_scale = static_cast<float>(1.0 / std::sqrt(2.0 * static_cast<double>(I.cfg.n_layers)));
  std::vector<float> h(sz(std::max(I.cfg.vocab * d, 2 * d + 4 * d * d + 3 * F * d)));
  for (int64_t i = 0; i < I.cfg.vocab * d; ++i) h[sz(i)] = nd(rng);
  upload(I.W() + I.off_embed, h.data(), sz(I.cfg.vocab * d) * 4);
  for (const Impl::LayerOffsets& L : I.lo) {
    const int64_t base = L.attn_norm, span = L.updown + 2 * F * d - base;
    float* s = h.data();  // s[offset - base] for offsets in the layer's span
    std::fill(s + (L.attn_norm - base), s + (L.attn_norm - base) + d, 1.f);
    std::fill(s + (L.ffn_norm - base), s + (L.ffn_norm - base) + d, 1.f);
    auto fill = [&](int64_t off, int64_t n, float sc) {
      for (int64_t i = 0; i < n; ++i) s[off - base + i] = nd(rng) * sc;
    };
    fill(L.q, d * d, 1.f);
    fill(L.k, d * d, 1.f);
    fill(L.v, d * d, 1.f);
    fill(L.o, d * d, out_scale);
    fill(L.gate, F * d, 1.f);
    for (int64_t j = 0; j < F; ++j) {
      fill(L.updown + j * 2 * d, d, 1.f);
      fill(L.updown + j * 2 * d + d, d, out_scale);
    }
    upload(I.W() + base, h.data(), sz(span) * 4);
  }
  std::fill(h.begin(), h.begin() + d, 1.f);
  upload(I.W() + I.off_final_norm, h.data(), sz(d) * 4);
  synchronize();
}

// The tensor list's order is fixed: embed, then 9 per layer, then the final norm.
int64_t CudaTrainer::Impl::index_of(const std::string& name) const {
  for (size_t i = 0; i < tensors.size(); ++i)
    if (tensors[i].name == name) return static_cast<int64_t>(i);
  throw std::invalid_argument("CudaTrainer: unknown tensor " + name);
}

void CudaTrainer::get_tensor(const std::string& name, float* out) const {
  const Impl& I = *impl_;
  const int64_t idx = I.index_of(name), d = I.cfg.d_model, F = I.cfg.d_ff;
  if (idx == 0) return download(out, I.W() + I.off_embed, sz(I.cfg.vocab * d) * 4);
  if (idx == static_cast<int64_t>(I.tensors.size()) - 1) return download(out, I.W() + I.off_final_norm, sz(d) * 4);
  const Impl::LayerOffsets& L = I.lo[sz((idx - 1) / 9)];
  switch ((idx - 1) % 9) {
    case 0: return download(out, I.W() + L.attn_norm, sz(d) * 4);
    case 1: return download(out, I.W() + L.q, sz(d * d) * 4);
    case 2: return download(out, I.W() + L.k, sz(d * d) * 4);
    case 3: return download(out, I.W() + L.v, sz(d * d) * 4);
    case 4: return download(out, I.W() + L.o, sz(d * d) * 4);
    case 5: return download(out, I.W() + L.ffn_norm, sz(d) * 4);
    case 6: return download(out, I.W() + L.gate, sz(F * d) * 4);
    default: break;
  }
  std::vector<float> ud(sz(2 * F * d));
  download(ud.data(), I.W() + L.updown, ud.size() * 4);
  if ((idx - 1) % 9 == 7) {
    for (int64_t j = 0; j < F; ++j) std::memcpy(out + j * d, ud.data() + j * 2 * d, sz(d) * 4);
  } else {
    for (int64_t j = 0; j < F; ++j)
      for (int64_t i = 0; i < d; ++i) out[i * F + j] = ud[sz(j * 2 * d + d + i)];
  }
}

void CudaTrainer::set_tensor(const std::string& name, const float* in) {
  Impl& I = *impl_;
  ++I.w_stamp;
  const int64_t idx = I.index_of(name), d = I.cfg.d_model, F = I.cfg.d_ff;
  if (idx == 0) return upload(I.W() + I.off_embed, in, sz(I.cfg.vocab * d) * 4);
  if (idx == static_cast<int64_t>(I.tensors.size()) - 1) return upload(I.W() + I.off_final_norm, in, sz(d) * 4);
  const Impl::LayerOffsets& L = I.lo[sz((idx - 1) / 9)];
  switch ((idx - 1) % 9) {
    case 0: return upload(I.W() + L.attn_norm, in, sz(d) * 4);
    case 1: return upload(I.W() + L.q, in, sz(d * d) * 4);
    case 2: return upload(I.W() + L.k, in, sz(d * d) * 4);
    case 3: return upload(I.W() + L.v, in, sz(d * d) * 4);
    case 4: return upload(I.W() + L.o, in, sz(d * d) * 4);
    case 5: return upload(I.W() + L.ffn_norm, in, sz(d) * 4);
    case 6: return upload(I.W() + L.gate, in, sz(F * d) * 4);
    default: break;
  }
  std::vector<float> ud(sz(2 * F * d));
  download(ud.data(), I.W() + L.updown, ud.size() * 4);
  if ((idx - 1) % 9 == 7) {
    for (int64_t j = 0; j < F; ++j) std::memcpy(ud.data() + j * 2 * d, in + j * d, sz(d) * 4);
  } else {
    for (int64_t j = 0; j < F; ++j)
      for (int64_t i = 0; i < d; ++i) ud[sz(j * 2 * d + d + i)] = in[i * F + j];
  }
  upload(I.W() + L.updown, ud.data(), ud.size() * 4);
}

namespace {
std::vector<float> host_copy(const DeviceBuffer& b, int64_t n) {
  std::vector<float> h(sz(n));
  download(h.data(), b.data(), h.size() * 4);
  return h;
}
}  // namespace

std::vector<float> CudaTrainer::params() const { return host_copy(impl_->w, impl_->n_params); }
std::vector<float> CudaTrainer::grads() const { return host_copy(impl_->g, impl_->n_params); }
std::vector<float> CudaTrainer::moment1() const { return host_copy(impl_->m, impl_->n_params); }
std::vector<float> CudaTrainer::moment2() const { return host_copy(impl_->v, impl_->n_params); }

void CudaTrainer::set_moments(const float* m, const float* v) {
  upload(impl_->m.data(), m, sz(impl_->n_params) * 4);
  upload(impl_->v.data(), v, sz(impl_->n_params) * 4);
}

TrainerState CudaTrainer::state() const {
  TrainerState s = impl_->st;
  download(s.fired.data(), impl_->fired.data(), s.fired.size());
  return s;
}

void CudaTrainer::set_state(const TrainerState& s) {
  Impl& I = *impl_;
  if (s.last_nnz.size() != I.st.last_nnz.size() || s.fired.size() != I.st.fired.size() ||
      s.dead.size() != I.st.dead.size())
    throw std::invalid_argument("CudaTrainer: the state's shapes do not match the model");
  I.st.step = s.step;
  I.st.window_tokens = s.window_tokens;
  if (s.hybrid.size() == I.st.hybrid.size()) I.st.hybrid = s.hybrid;
  I.st.last_nnz = s.last_nnz;
  I.st.dead = s.dead;
  upload(I.fired.data(), s.fired.data(), s.fired.size());
}

void CudaTrainer::zero_grad() {
  memset_device(impl_->g.data(), 0, sz(impl_->n_params) * 4);
  impl_->grads_zero = true;
}

void CudaTrainer::Impl::check_tokens(const int32_t* tokens, int64_t n, int64_t T) const {
  if (T < 1 || T > cfg.context)
    throw std::invalid_argument("CudaTrainer: sequence length " + std::to_string(T) + " outside 1.." +
                                std::to_string(cfg.context));
  for (int64_t i = 0; i < n; ++i)
    if (tokens[i] < 0 || tokens[i] >= cfg.vocab)
      throw std::invalid_argument("CudaTrainer: token " + std::to_string(tokens[i]) + " outside the vocabulary (" +
                                  std::to_string(cfg.vocab) + ")");
}

// Buffers for micro-batches of B·T tokens (grow-only; contents are rewritten by every pass).
void CudaTrainer::Impl::grow(int64_t B, int64_t T) {
  const int64_t d = cfg.d_model, F = cfg.d_ff, V = cfg.vocab, NH = cfg.n_heads, M = B * T, L = B * NH * T;
  attn_scratch = train::attention_scratch(B, T, NH, d / NH, matmul);
  if (M <= cap_M && L <= cap_L && attn_scratch <= cap_S) return;
  cap_M = std::max(cap_M, M);
  cap_L = std::max(cap_L, L);
  cap_S = std::max(cap_S, attn_scratch);
  const size_t Md = sz(cap_M * d) * 4, Mf = sz(cap_M * F) * 4, Mr = sz(cap_M) * 4;
  for (LayerActs& a : acts) {
    for (DeviceBuffer* b : {&a.x_in, &a.xn1, &a.att, &a.x_mid, &a.xn2}) b->reserve(Md);
    a.qkv.reserve(3 * Md);
    a.rstd1.reserve(Mr);
    a.rstd2.reserve(Mr);
    a.lse.reserve(sz(cap_L) * 4);
  }
  for (DeviceBuffer* b : {&xf, &xnf, &tmp, &dx, &dxn, &datt}) b->reserve(Md);
  dqkv.reserve(3 * Md);
  rstdf.reserve(Mr);
  ids.reserve(2 * Mr);
  logits.reserve(sz(cap_M * V) * 4);
  scores.reserve(sz(2 * cap_S) * 4);
  for (DeviceBuffer* b : {&H, &dH, &dG}) b->reserve(Mf);
  norm_part.reserve(sz(train::rmsnorm_backward_scratch(cap_M, d)) * 8);
}

StepStats CudaTrainer::Impl::forward_backward(const int32_t* tokens, int64_t B, int64_t T, double scale, bool backward,
                                              EvalStats* eval) {
  const int64_t d = cfg.d_model, F = cfg.d_ff, V = cfg.vocab, NH = cfg.n_heads, hd = d / NH;
  const int64_t NL = cfg.n_layers, M = B * T;
  if (B < 1) throw std::invalid_argument("CudaTrainer: need at least one sequence");
  check_tokens(tokens, B * (T + 1), T);
  grow(B, T);
  const train::MatmulScope precision(matmul);
  std::vector<int32_t> io(sz(2 * M));  // inputs, then targets
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      io[sz(b * T + t)] = tokens[b * (T + 1) + t];
      io[sz(M + b * T + t)] = tokens[b * (T + 1) + t + 1];
    }
  upload(ids.data(), io.data(), io.size() * 4);
  const int32_t* inp = ids.as<int32_t>();
  const int32_t* tgt = inp + M;
  const StatsLayout sl{NL};
  memset_device(stats.data(), 0, sl.bytes());
  double* st_ce = stats.as<double>();
  double* st_l1 = st_ce + 2;
  unsigned long long* st_cnt = reinterpret_cast<unsigned long long*>(st_ce + 2 + NL);
  unsigned long long* st_scratch = st_cnt + 3 * NL;
  StepStats s;
  s.layers.resize(sz(NL));
  const float* Wp = W();
  const bool first = grads_zero;
  float* tmpb = tmp.as<float>();
  train::embedding_forward(Wp + off_embed, inp, M, d, acts[0].x_in.as<float>());
  for (int64_t l = 0; l < NL; ++l) {
    LayerActs& a = acts[sz(l)];
    const LayerOffsets& L = lo[sz(l)];
    float* q = a.qkv.as<float>();
    if (l == 0)
      train::rmsnorm_forward(a.x_in.as<float>(), nullptr, nullptr, M, d, Wp + L.attn_norm, cfg.norm_eps,
                             a.xn1.as<float>(), a.rstd1.as<float>());
    else
      train::rmsnorm_forward(acts[sz(l - 1)].x_mid.as<float>(), tmpb, a.x_in.as<float>(), M, d, Wp + L.attn_norm,
                             cfg.norm_eps, a.xn1.as<float>(), a.rstd1.as<float>());
    train::linear_forward(a.xn1.as<float>(), M, d, Wp + L.q, 3 * d, q);
    train::rope_apply(q, 3 * d, B, T, NH, hd, cos_t.as<float>(), sin_t.as<float>(), false);
    train::rope_apply(q + d, 3 * d, B, T, NH, hd, cos_t.as<float>(), sin_t.as<float>(), false);
    train::attention_forward(q, q + d, q + 2 * d, 3 * d, B, T, NH, hd, a.lse.as<float>(), a.att.as<float>(), d,
                             scores.as<float>(), attn_scratch);
    train::linear_forward(a.att.as<float>(), M, d, Wp + L.o, d, tmpb);
    train::rmsnorm_forward(a.x_in.as<float>(), tmpb, a.x_mid.as<float>(), M, d, Wp + L.ffn_norm, cfg.norm_eps,
                           a.xn2.as<float>(), a.rstd2.as<float>());
    const float* x2 = a.xn2.as<float>();
    uint8_t* fl = backward ? fired.as<uint8_t>() + l * F : nullptr;
    a.hybrid = st.hybrid[sz(l)] != 0;
    if (a.hybrid) {
      train::HybridBuffers hb = hybrid_buffers(a, M);
      train::hybrid_ffn_forward_rows(x2, Wp + L.gate, Wp + L.updown, hb, tmpb, st_l1 + l, st_cnt + 3 * l, fl,
                                     light_weights(l));
      // The layer's one synchronisation: the tail's size, so that its tape holds just those rows.
      int32_t tail_rows = 0;
      download(&tail_rows, hb.tail_count, 4);
      fit_tail_tape(a, tail_rows);
      hb.Gt = a.G.as<float>();
      hb.Ut = a.U.as<float>();
      train::hybrid_ffn_forward_tail(x2, Wp + L.gate, Wp + L.updown, hb, tmpb, st_l1 + l, st_scratch);
    } else {
      // Dense FFN: G = relu(x·W_gateᵀ), U = x·W_upᵀ (W_up rows inside updown), H = G ⊙ U, y = H·W_downᵀ.
      a.G.reserve(sz(cap_M * F) * 4);
      a.U.reserve(sz(cap_M * F) * 4);
      train::linear_forward(x2, M, d, Wp + L.gate, F, a.G.as<float>());
      train::gemm_f32(M, F, d, MatRef{x2, d, 1}, MatRef{Wp + L.updown, 1, 2 * d}, a.U.as<float>(), F);
      train::ffn_hidden(a.G.as<float>(), a.U.as<float>(), H.as<float>(), M, F, st_l1 + l, st_cnt + 3 * l, fl);
      train::gemm_f32(M, d, F, MatRef{H.as<float>(), F, 1}, MatRef{Wp + L.updown + d, 2 * d, 1}, tmpb, d);
    }
  }
  float* xfp = xf.as<float>();
  train::rmsnorm_forward(acts[sz(NL - 1)].x_mid.as<float>(), tmpb, xfp, M, d, Wp + off_final_norm, cfg.norm_eps,
                         xnf.as<float>(), rstdf.as<float>());
  train::linear_forward(xnf.as<float>(), M, d, Wp + off_embed, V, logits.as<float>());
  train::cross_entropy(logits.as<float>(), tgt, M, V, static_cast<float>(scale / static_cast<double>(M)), st_ce);

  if (backward) {
    float* G = Gr();
    float *dxnf = datt.as<float>(), *dxp = dx.as<float>(), *dxnp = dxn.as<float>(), *dattp = datt.as<float>();
    float* dq = dqkv.as<float>();
    double* part = norm_part.as<double>();
    train::linear_backward(xnf.as<float>(), logits.as<float>(), M, d, Wp + off_embed, V, dxnf, G + off_embed, first);
    train::rmsnorm_backward(xfp, rstdf.as<float>(), Wp + off_final_norm, dxnf, M, d, dxp, false, G + off_final_norm,
                            first, part);
    const float lam = static_cast<float>(hp.l1 * scale / static_cast<double>(NL));
    const float lam_m = M ? lam / static_cast<float>(M) : 0.f;  // as dense_ffn_backward
    for (int64_t l = NL - 1; l >= 0; --l) {
      LayerActs& a = acts[sz(l)];
      const LayerOffsets& L = lo[sz(l)];
      const float* x2 = a.xn2.as<float>();
      float *Gp = a.G.as<float>(), *Up = a.U.as<float>(), *dHp = dH.as<float>(), *dGp = dG.as<float>(), *Hp = H.as<float>();
      if (a.hybrid) {
        train::hybrid_ffn_backward(x2, dxp, Wp + L.gate, Wp + L.updown, hybrid_buffers(a, M), lam_m, dxnp, G + L.gate,
                                   G + L.updown, first, light_weights(l));
      } else {
        // FFN backward: dH = dy·W_down; dU (in dH's place), dG, H; dx = dU·W_up + dG·W_gate; weight gradients.
        train::gemm_f32(M, F, d, MatRef{dxp, d, 1}, MatRef{Wp + L.updown + d, 1, 2 * d}, dHp, F);
        train::ffn_hidden_backward(dHp, Gp, Up, dGp, Hp, M * F, lam_m);
        train::gemm_f32(M, d, F, MatRef{dHp, F, 1}, MatRef{Wp + L.updown, 2 * d, 1}, dxnp, d);
        train::gemm_f32(M, d, F, MatRef{dGp, F, 1}, MatRef{Wp + L.gate, d, 1}, dxnp, d, 0, 0, 1, 1, true);
        train::gemm_f32(F, d, M, MatRef{dGp, 1, F}, MatRef{x2, d, 1}, G + L.gate, d, 0, 0, 1, 1, !first);
        train::gemm_f32(F, d, M, MatRef{dHp, 1, F}, MatRef{x2, d, 1}, G + L.updown, 2 * d, 0, 0, 1, 1, !first);
        train::gemm_f32(F, d, M, MatRef{Hp, 1, F}, MatRef{dxp, d, 1}, G + L.updown + d, 2 * d, 0, 0, 1, 1, !first);
      }
      train::rmsnorm_backward(a.x_mid.as<float>(), a.rstd2.as<float>(), Wp + L.ffn_norm, dxnp, M, d, dxp, true,
                              G + L.ffn_norm, first, part);
      train::linear_backward(a.att.as<float>(), dxp, M, d, Wp + L.o, d, dattp, G + L.o, first);
      const float* q = a.qkv.as<float>();
      train::attention_backward(q, q + d, q + 2 * d, 3 * d, a.lse.as<float>(), a.att.as<float>(), dattp, d, B, T, NH,
                                hd, dq, dq + d, dq + 2 * d, 3 * d, scores.as<float>(), attn_scratch);
      train::rope_apply(dq, 3 * d, B, T, NH, hd, cos_t.as<float>(), sin_t.as<float>(), true);
      train::rope_apply(dq + d, 3 * d, B, T, NH, hd, cos_t.as<float>(), sin_t.as<float>(), true);
      train::linear_backward(a.xn1.as<float>(), dq, M, d, Wp + L.q, 3 * d, dxnp, G + L.q, first);
      train::rmsnorm_backward(a.x_in.as<float>(), a.rstd1.as<float>(), Wp + L.attn_norm, dxnp, M, d, dxp, true,
                              G + L.attn_norm, first, part);
    }
    train::embedding_backward(dxp, inp, M, d, G + off_embed);
  }

  // The call's statistics: one copy back.
  std::vector<uint8_t> hs(sl.bytes());
  download(hs.data(), stats.data(), hs.size());
  const double* hd_ = reinterpret_cast<const double*>(hs.data());
  const unsigned long long* hc = reinterpret_cast<const unsigned long long*>(hd_ + 2 + NL);
  double l1 = 0;
  int64_t kept = 0;
  for (int64_t l = 0; l < NL; ++l) {
    LayerStepStats& ls = s.layers[sz(l)];
    ls.l1 = M ? hd_[2 + l] / static_cast<double>(M) : 0.0;
    ls.nnz = static_cast<int64_t>(hc[3 * l]);
    ls.max_row_nnz = static_cast<int64_t>(hc[3 * l + 1]);
    ls.tokens = M;
    ls.hybrid = acts[sz(l)].hybrid;
    const int64_t nt = static_cast<int64_t>(hc[3 * l + 2]);
    ls.tail_rows = ls.hybrid ? nt : 0;
    // The CPU tapes' bytes: dense G and U; hybrid row counts, ELL (neuron, g, u), tail rows and their G, U.
    ls.saved_bytes = ls.hybrid ? 4 * (M + 3 * M * hp.ell_width + nt + 2 * nt * F) : 2 * M * F * 4;
    // Attention keeps each row's log-sum-exp, not the CPU trainer's B·H·T·T probabilities.
    kept += static_cast<int64_t>(sizeof(float)) * (8 * M * d + 2 * M + B * NH * T) + ls.saved_bytes;
    l1 += ls.l1;
  }
  kept += static_cast<int64_t>(sizeof(float)) * (3 * M * d + M + M * V);
  saved_bytes = kept;
  peak_saved_bytes = std::max(peak_saved_bytes, kept);
  peak_device_bytes = std::max(peak_device_bytes, device_bytes());
  l1 /= static_cast<double>(NL);
  const double ce_sum = hd_[0];
  s.ce = ce_sum / static_cast<double>(M);
  s.l1 = l1;
  s.loss = s.ce + hp.l1 * l1;
  s.tokens = M;
  if (eval) {
    eval->ce += ce_sum;
    eval->l1 += l1 * static_cast<double>(M);
    eval->tokens += M;
    for (int64_t l = 0; l < NL; ++l) eval->nnz[sz(l)] += s.layers[sz(l)].nnz;
  }
  return s;
}

// Layer l's bf16 light-row weights (null with f32 matmuls), converted again when stale.
train::LightRowWeights CudaTrainer::Impl::light_weights(int64_t l) {
  if (matmul != train::MatmulPrecision::Bf16) return {};
  const int64_t d = cfg.d_model, F = cfg.d_ff;
  DeviceBuffer& b = w16[sz(l)];
  if (w16_stamp[sz(l)] != w_stamp) {
    if (b.bytes() == 0) b.reserve(sz(3 * F * d) * 2);
    f32_to_bf16_device(W() + lo[sz(l)].gate, d, b.as<uint16_t>(), d, 3 * F, d);  // gate then updown: adjacent
    w16_stamp[sz(l)] = w_stamp;
  }
  return {b.as<uint16_t>(), b.as<uint16_t>() + F * d};
}

// A hybrid layer's tail tape (G and U of its tail rows, forward to backward) sized by need: grown
// with a quarter of headroom, shrunk when over four times too large (after the layer ran dense,
// say), so that a sparse layer holds a few rows where a dense one holds 2·M·F floats.
void CudaTrainer::Impl::fit_tail_tape(LayerActs& a, int64_t rows) {
  const size_t need = sz(std::max<int64_t>(rows, 1) * cfg.d_ff) * 4;
  if (a.G.bytes() >= need && a.G.bytes() <= 4 * need) return;
  a.G = DeviceBuffer(need + need / 4);
  a.U = DeviceBuffer(need + need / 4);
}

// The hybrid kernels' buffers for M rows: layer a's tape (grown on first use; G and U as
// fit_tail_tape last sized them) and the shared scratch.
train::HybridBuffers CudaTrainer::Impl::hybrid_buffers(LayerActs& a, int64_t M) {
  const int64_t d = cfg.d_model, F = cfg.d_ff, W = hp.ell_width;
  const size_t MW = sz(cap_M * W) * 4;
  a.row_nnz.reserve(sz(cap_M) * 4);
  a.col.reserve(MW);
  a.hg.reserve(MW);
  a.hu.reserve(MW);
  a.tail.reserve(sz(cap_M + 1) * 4);
  for (DeviceBuffer* b : {&hdu, &hdg, &hrank, &hlist}) b->reserve(MW);
  for (DeviceBuffer* b : {&hx, &hy, &hz}) b->reserve(sz(cap_M * d) * 4);
  hhist.reserve(sz(F) * 4);
  hoffs.reserve(sz(F + 1) * 4);
  train::HybridBuffers h;
  h.M = M;
  h.d = d;
  h.F = F;
  h.W = static_cast<int>(W);
  h.row_nnz = a.row_nnz.as<int32_t>();
  h.col = a.col.as<int32_t>();
  h.g = a.hg.as<float>();
  h.u = a.hu.as<float>();
  h.tail = a.tail.as<int32_t>();
  h.tail_count = a.tail.as<int32_t>() + cap_M;
  h.Gt = a.G.as<float>();
  h.Ut = a.U.as<float>();
  h.Gpre = dG.as<float>();  // forward only; dG is backward scratch
  h.Ht = H.as<float>();
  h.dHt = dH.as<float>();
  h.dGt = dG.as<float>();
  h.xt = hx.as<float>();
  h.yt = hy.as<float>();
  h.zt = hz.as<float>();
  h.du = hdu.as<float>();
  h.dg = hdg.as<float>();
  h.rank = hrank.as<int32_t>();
  h.list = hlist.as<int32_t>();
  h.hist = hhist.as<int32_t>();
  h.offs = hoffs.as<int32_t>();
  return h;
}

bool CudaTrainer::layer_hybrid(int64_t layer) const { return impl_->st.hybrid[sz(layer)] != 0; }

StepStats CudaTrainer::accumulate(const int32_t* tokens, int64_t B, int64_t T, double scale) {
  StepStats s = impl_->forward_backward(tokens, B, T, scale, true, nullptr);
  impl_->grads_zero = false;
  return s;
}

EvalStats CudaTrainer::evaluate(const int32_t* tokens, int64_t B, int64_t T) {
  EvalStats e;
  e.nnz.assign(sz(impl_->cfg.n_layers), 0);
  impl_->forward_backward(tokens, B, T, 1.0, false, &e);
  e.ce /= static_cast<double>(e.tokens);
  e.l1 /= static_cast<double>(e.tokens);
  return e;
}

StepStats CudaTrainer::step(const int32_t* tokens, int64_t n_micro, int64_t B, int64_t T, float lr) {
  Impl& I = *impl_;
  if (n_micro < 1) throw std::invalid_argument("CudaTrainer.step: need at least one micro-batch");
  if (!(lr >= 0.f) || !std::isfinite(lr)) throw std::invalid_argument("CudaTrainer.step: learning rate must be >= 0");
  const int64_t NL = I.cfg.n_layers;
  I.check_tokens(tokens, n_micro * B * (T + 1), T);
  // Per-layer path, as Trainer::step: forced, or (Auto) re-decided every recheck_steps.
  for (int64_t l = 0; l < NL; ++l) {
    if (I.hp.ffn_path == FfnTrainPath::Dense) I.st.hybrid[sz(l)] = 0;
    else if (I.hp.ffn_path == FfnTrainPath::Hybrid) I.st.hybrid[sz(l)] = 1;
    else if (I.st.step > 0 && I.hp.recheck_steps > 0 && I.st.step % I.hp.recheck_steps == 0)
      I.st.hybrid[sz(l)] = I.st.last_nnz[sz(l)] < I.hp.hybrid_cutoff ? 1 : 0;
  }
  I.grads_zero = true;  // the first micro-batch overwrites every gradient
  StepStats total;
  total.layers.resize(sz(NL));
  const double scale = 1.0 / static_cast<double>(n_micro);
  for (int64_t i = 0; i < n_micro; ++i) {
    const StepStats s = accumulate(tokens + i * B * (T + 1), B, T, scale);
    total.loss += s.loss * scale;
    total.ce += s.ce * scale;
    total.l1 += s.l1 * scale;
    total.tokens += s.tokens;
    for (int64_t l = 0; l < NL; ++l) {
      LayerStepStats& t = total.layers[sz(l)];
      const LayerStepStats& u = s.layers[sz(l)];
      t.tokens += u.tokens;
      t.nnz += u.nnz;
      t.max_row_nnz = std::max(t.max_row_nnz, u.max_row_nnz);
      t.tail_rows += u.tail_rows;
      t.l1 += u.l1 * scale;
      t.hybrid = u.hybrid;
      t.saved_bytes = std::max(t.saved_bytes, u.saved_bytes);
    }
  }
  // Global gradient norm (float64 on the device), clipping, AdamW.
  double* ss_dev = I.stats.as<double>() + 1;
  memset_device(ss_dev, 0, 8);
  train::sum_squares(I.Gr(), I.n_params, ss_dev);
  double ss = 0;
  download(&ss, ss_dev, 8);
  total.grad_norm = std::sqrt(ss);
  if (!std::isfinite(total.grad_norm))
    throw std::runtime_error("CudaTrainer.step: the gradient is not finite (loss diverged; lower the learning rate)");
  const float gscale =
      (I.hp.clip > 0.f && total.grad_norm > I.hp.clip) ? static_cast<float>(I.hp.clip / total.grad_norm) : 1.f;
  I.st.step += 1;
  const double c1 = 1.0 - std::pow(static_cast<double>(I.hp.beta1), static_cast<double>(I.st.step));
  const double c2 = 1.0 - std::pow(static_cast<double>(I.hp.beta2), static_cast<double>(I.st.step));
  int64_t pos = 0;
  auto run = [&](int64_t b, int64_t e, float wd) {
    if (e > b)
      train::adamw(I.W() + b, I.Gr() + b, I.m.as<float>() + b, I.v.as<float>() + b, e - b, lr, I.hp.beta1, I.hp.beta2,
                   I.hp.eps, wd, c1, c2, gscale);
  };
  for (const auto& r : I.no_decay) {
    run(pos, r.first, I.hp.weight_decay);
    run(r.first, r.second, 0.f);
    pos = r.second;
  }
  run(pos, I.n_params, I.hp.weight_decay);
  for (int64_t l = 0; l < NL; ++l)
    I.st.last_nnz[sz(l)] = static_cast<double>(total.layers[sz(l)].nnz) / static_cast<double>(total.layers[sz(l)].tokens);
  I.end_of_step(total.tokens, total);
  ++I.w_stamp;  // AdamW (and any re-drawn gate rows) changed the weights
  return total;
}

// Trainer::end_of_step: at the end of a window, count the neurons that never fired and
// (optionally) re-draw their gate rows with the CPU's generator, zeroing their moments.
void CudaTrainer::Impl::end_of_step(int64_t tokens, StepStats& s) {
  const int64_t NL = cfg.n_layers, F = cfg.d_ff, d = cfg.d_model;
  st.window_tokens += tokens;
  if (hp.dead_window > 0 && st.window_tokens >= hp.dead_window) {
    std::vector<uint8_t> fh(sz(NL * F));
    download(fh.data(), fired.data(), fh.size());
    std::vector<float> row(sz(d));
    for (int64_t l = 0; l < NL; ++l) {
      const uint8_t* fl = fh.data() + l * F;
      int64_t dead = 0;
      std::mt19937_64 rng(mix(mix(hp.seed, static_cast<uint64_t>(st.step)), static_cast<uint64_t>(l) + 77));
      std::normal_distribution<float> nd(0.f, hp.init_std);
      for (int64_t j = 0; j < F; ++j) {
        if (fl[j]) continue;
        ++dead;
        if (!hp.reinit_dead) continue;
        const int64_t off = lo[sz(l)].gate + j * d;
        for (int64_t i = 0; i < d; ++i) row[sz(i)] = nd(rng);
        upload(W() + off, row.data(), row.size() * 4);
        memset_device(m.as<float>() + off, 0, sz(d) * 4);
        memset_device(v.as<float>() + off, 0, sz(d) * 4);
        ++s.reinitialised;
      }
      st.dead[sz(l)] = dead;
    }
    memset_device(fired.data(), 0, fh.size());
    st.window_tokens = 0;
  }
  for (int64_t l = 0; l < NL; ++l) s.layers[sz(l)].dead = st.dead[sz(l)];
}

int64_t CudaTrainer::device_bytes() const { return impl_->device_bytes(); }
int64_t CudaTrainer::peak_device_bytes() const { return impl_->peak_device_bytes; }

int64_t CudaTrainer::Impl::device_bytes() const {
  const Impl& I = *this;
  int64_t b = static_cast<int64_t>(I.w.bytes() + I.g.bytes() + I.m.bytes() + I.v.bytes() + I.fired.bytes() +
                                   I.cos_t.bytes() + I.sin_t.bytes() + I.stats.bytes());
  for (const Impl::LayerActs& a : I.acts)
    for (const DeviceBuffer* x : {&a.x_in, &a.xn1, &a.rstd1, &a.qkv, &a.lse, &a.att, &a.x_mid, &a.xn2, &a.rstd2, &a.G, &a.U,
                                  &a.row_nnz, &a.col, &a.hg, &a.hu, &a.tail})
      b += static_cast<int64_t>(x->bytes());
  for (const DeviceBuffer* x : {&I.ids, &I.xf, &I.xnf, &I.rstdf, &I.logits, &I.tmp, &I.dx, &I.dxn, &I.datt, &I.dqkv,
                                &I.scores, &I.H, &I.dH, &I.dG, &I.norm_part, &I.hx, &I.hy, &I.hz, &I.hdu, &I.hdg,
                                &I.hrank, &I.hlist, &I.hhist, &I.hoffs})
    b += static_cast<int64_t>(x->bytes());
  for (const DeviceBuffer& x : I.w16) b += static_cast<int64_t>(x.bytes());
  return b;
}

}  // namespace sparsellm::cuda
