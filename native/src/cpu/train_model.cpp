// Trainer (sparsellm/train.h): forward and hand-written backward of the whole Llama-family
// model, the per-layer choice between the dense and Hybrid FFN kernels, dead-neuron tracking,
// gradient clipping and AdamW.
#include <malloc.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <random>
#include <stdexcept>
#include <string>

#include "sparsellm/cpu_info.h"
#include "sparsellm/train.h"
#include "train_ops.h"

namespace sparsellm {

using namespace trainops;

namespace {

size_t sz(int64_t n) { return static_cast<size_t>(n); }

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
long minor_faults() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return ru.ru_minflt;
}
// CPU seconds of the whole process (all threads): with a busy machine, the phase's own work.
double cpu_s() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}
bool profile_on() {
  static const bool on = [] {
    const char* e = std::getenv("SPARSELLM_TRAIN_PROFILE");
    return e && *e && *e != '0';
  }();
  return on;
}
// Adds the seconds `stmt` takes to prof_[i] (and, when profiling, its process CPU seconds to
// prof_cpu_[i]).
#define TIMED(i, stmt)                                  \
  do {                                                  \
    const double t0_ = now_s();                         \
    const double c0_ = profile_on() ? cpu_s() : 0.0;    \
    stmt;                                               \
    prof_[i] += now_s() - t0_;                          \
    if (profile_on()) prof_cpu_[i] += cpu_s() - c0_;    \
  } while (0)

uint64_t mix(uint64_t a, uint64_t b) {
  uint64_t z = a ^ (b + 0x9e3779b97f4a7c15ULL + (a << 6) + (a >> 2));
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

}  // namespace

Trainer::Trainer(const TrainModelConfig& c, const TrainHyper& h) : cfg_(c), hp_(h) {
  // The passes allocate and free activation-sized buffers (up to tens of MB) every micro-batch.
  // Keep them in the heap instead of fresh mmaps: otherwise every call pays page faults on
  // memory the kernel must zero again (measured: half the step time of a small model).
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, 512 << 20);
  if (c.vocab < 2 || c.d_model < 2 || c.n_layers < 1 || c.n_heads < 1 || c.d_ff < 1 || c.context < 2)
    throw std::invalid_argument("Trainer: vocab, d_model, layers, heads, d_ff and context must be positive");
  if (c.d_model % c.n_heads != 0 || (c.d_model / c.n_heads) % 2 != 0)
    throw std::invalid_argument("Trainer: d_model must be a multiple of heads with an even head width");
  if (c.vocab > (int64_t(1) << 31) - 1) throw std::invalid_argument("Trainer: vocabulary too large");
  const int64_t d = c.d_model, F = c.d_ff, V = c.vocab;
  int64_t off = 0;
  auto take = [&](int64_t n) { const int64_t o = off; off += n; return o; };
  off_embed_ = take(V * d);
  tensors_.push_back({"model.embed_tokens.weight", V, d});
  for (int64_t l = 0; l < c.n_layers; ++l) {
    LayerOffsets L{};
    const std::string p = "model.layers." + std::to_string(l) + ".";
    L.attn_norm = take(d);
    no_decay_.push_back({L.attn_norm, L.attn_norm + d});
    L.q = take(d * d);
    L.k = take(d * d);
    L.v = take(d * d);
    L.o = take(d * d);
    L.ffn_norm = take(d);
    no_decay_.push_back({L.ffn_norm, L.ffn_norm + d});
    L.gate = take(F * d);
    L.updown = take(2 * F * d);
    lo_.push_back(L);
    tensors_.push_back({p + "input_layernorm.weight", d, 1});
    tensors_.push_back({p + "self_attn.q_proj.weight", d, d});
    tensors_.push_back({p + "self_attn.k_proj.weight", d, d});
    tensors_.push_back({p + "self_attn.v_proj.weight", d, d});
    tensors_.push_back({p + "self_attn.o_proj.weight", d, d});
    tensors_.push_back({p + "post_attention_layernorm.weight", d, 1});
    tensors_.push_back({p + "mlp.gate_proj.weight", F, d});
    tensors_.push_back({p + "mlp.up_proj.weight", F, d});
    tensors_.push_back({p + "mlp.down_proj.weight", d, F});
  }
  off_final_norm_ = take(d);
  no_decay_.push_back({off_final_norm_, off_final_norm_ + d});
  tensors_.push_back({"model.norm.weight", d, 1});
  n_params_ = off;
  w_.assign(sz(n_params_), 0.f);
  g_.assign(sz(n_params_), 0.f);
  m_.assign(sz(n_params_), 0.f);
  v_.assign(sz(n_params_), 0.f);
  const size_t nl = sz(c.n_layers);
  st_.hybrid.assign(nl, hp_.ffn_path == FfnTrainPath::Hybrid ? 1 : 0);
  st_.last_nnz.assign(nl, 0.0);
  st_.fired.assign(nl * sz(F), 0);
  st_.dead.assign(nl, 0);
  acts_.resize(nl);
  dn_.resize(nl);
  gt_.resize(nl);
  ut_.resize(nl);
  dense_fresh_.assign(nl, 0);
  rope_tables(c.context, d / c.n_heads, c.rope_theta, cos_, sin_);
}

void Trainer::init_weights() {
  const int64_t d = cfg_.d_model, F = cfg_.d_ff;
  std::mt19937_64 rng(mix(hp_.seed, 0x1417));
  std::normal_distribution<float> nd(0.f, hp_.init_std);
  const float out_scale = static_cast<float>(1.0 / std::sqrt(2.0 * static_cast<double>(cfg_.n_layers)));
  auto fill = [&](int64_t off, int64_t n, float s) {
    for (int64_t i = 0; i < n; ++i) w_[sz(off + i)] = nd(rng) * s;
  };
  fill(off_embed_, cfg_.vocab * d, 1.f);
  for (const LayerOffsets& L : lo_) {
    std::fill(w_.begin() + L.attn_norm, w_.begin() + L.attn_norm + d, 1.f);
    std::fill(w_.begin() + L.ffn_norm, w_.begin() + L.ffn_norm + d, 1.f);
    fill(L.q, d * d, 1.f);
    fill(L.k, d * d, 1.f);
    fill(L.v, d * d, 1.f);
    fill(L.o, d * d, out_scale);
    fill(L.gate, F * d, 1.f);
    for (int64_t j = 0; j < F; ++j) {
      fill(L.updown + j * 2 * d, d, 1.f);
      fill(L.updown + j * 2 * d + d, d, out_scale);
    }
  }
  std::fill(w_.begin() + off_final_norm_, w_.begin() + off_final_norm_ + d, 1.f);
  std::fill(dense_fresh_.begin(), dense_fresh_.end(), 0);
}

namespace {
// Which tensor a name is: returns the kind and the layer (or -1).
enum class Kind { Embed, AttnNorm, Q, K, V, O, FfnNorm, Gate, Up, Down, FinalNorm, Unknown };
Kind parse_name(const std::string& n, int64_t& layer) {
  layer = -1;
  if (n == "model.embed_tokens.weight") return Kind::Embed;
  if (n == "model.norm.weight") return Kind::FinalNorm;
  const std::string pre = "model.layers.";
  if (n.compare(0, pre.size(), pre) != 0) return Kind::Unknown;
  size_t i = pre.size(), j = i;
  while (j < n.size() && n[j] >= '0' && n[j] <= '9') ++j;
  if (j == i || j >= n.size() || n[j] != '.' || j - i > 9) return Kind::Unknown;
  layer = std::stoll(n.substr(i, j - i));
  const std::string rest = n.substr(j + 1);
  if (rest == "input_layernorm.weight") return Kind::AttnNorm;
  if (rest == "self_attn.q_proj.weight") return Kind::Q;
  if (rest == "self_attn.k_proj.weight") return Kind::K;
  if (rest == "self_attn.v_proj.weight") return Kind::V;
  if (rest == "self_attn.o_proj.weight") return Kind::O;
  if (rest == "post_attention_layernorm.weight") return Kind::FfnNorm;
  if (rest == "mlp.gate_proj.weight") return Kind::Gate;
  if (rest == "mlp.up_proj.weight") return Kind::Up;
  if (rest == "mlp.down_proj.weight") return Kind::Down;
  return Kind::Unknown;
}
}  // namespace

void Trainer::get_tensor(const std::string& name, float* out) const {
  int64_t l = -1;
  const Kind k = parse_name(name, l);
  const int64_t d = cfg_.d_model, F = cfg_.d_ff;
  if (k == Kind::Unknown || (l >= cfg_.n_layers)) throw std::invalid_argument("Trainer: unknown tensor " + name);
  auto copy = [&](int64_t off, int64_t n) { std::memcpy(out, w_.data() + off, sizeof(float) * sz(n)); };
  const LayerOffsets* L = l >= 0 ? &lo_[sz(l)] : nullptr;
  switch (k) {
    case Kind::Embed: copy(off_embed_, cfg_.vocab * d); break;
    case Kind::FinalNorm: copy(off_final_norm_, d); break;
    case Kind::AttnNorm: copy(L->attn_norm, d); break;
    case Kind::FfnNorm: copy(L->ffn_norm, d); break;
    case Kind::Q: copy(L->q, d * d); break;
    case Kind::K: copy(L->k, d * d); break;
    case Kind::V: copy(L->v, d * d); break;
    case Kind::O: copy(L->o, d * d); break;
    case Kind::Gate: copy(L->gate, F * d); break;
    case Kind::Up:
      for (int64_t j = 0; j < F; ++j) std::memcpy(out + j * d, w_.data() + L->updown + j * 2 * d, sizeof(float) * sz(d));
      break;
    case Kind::Down:
      transpose(w_.data() + L->updown + d, 2 * d, F, d, out, F);
      break;
    default: break;
  }
}

void Trainer::set_tensor(const std::string& name, const float* in) {
  int64_t l = -1;
  const Kind k = parse_name(name, l);
  const int64_t d = cfg_.d_model, F = cfg_.d_ff;
  if (k == Kind::Unknown || (l >= cfg_.n_layers)) throw std::invalid_argument("Trainer: unknown tensor " + name);
  auto copy = [&](int64_t off, int64_t n) { std::memcpy(w_.data() + off, in, sizeof(float) * sz(n)); };
  const LayerOffsets* L = l >= 0 ? &lo_[sz(l)] : nullptr;
  switch (k) {
    case Kind::Embed: copy(off_embed_, cfg_.vocab * d); break;
    case Kind::FinalNorm: copy(off_final_norm_, d); break;
    case Kind::AttnNorm: copy(L->attn_norm, d); break;
    case Kind::FfnNorm: copy(L->ffn_norm, d); break;
    case Kind::Q: copy(L->q, d * d); break;
    case Kind::K: copy(L->k, d * d); break;
    case Kind::V: copy(L->v, d * d); break;
    case Kind::O: copy(L->o, d * d); break;
    case Kind::Gate: copy(L->gate, F * d); break;
    case Kind::Up:
      for (int64_t j = 0; j < F; ++j) std::memcpy(w_.data() + L->updown + j * 2 * d, in + j * d, sizeof(float) * sz(d));
      break;
    case Kind::Down:
      transpose(in, F, d, F, w_.data() + L->updown + d, 2 * d);
      break;
    default: break;
  }
  std::fill(dense_fresh_.begin(), dense_fresh_.end(), 0);
}

void Trainer::zero_grad() {
  std::fill(g_.begin(), g_.end(), 0.f);
  grads_zero_ = true;
}

void Trainer::check_tokens(const int32_t* tokens, int64_t n, int64_t T) const {
  if (T < 1 || T > cfg_.context)
    throw std::invalid_argument("Trainer: sequence length " + std::to_string(T) + " outside 1.." +
                                std::to_string(cfg_.context));
  for (int64_t i = 0; i < n; ++i)
    if (tokens[i] < 0 || tokens[i] >= cfg_.vocab)
      throw std::invalid_argument("Trainer: token " + std::to_string(tokens[i]) + " outside the vocabulary (" +
                                  std::to_string(cfg_.vocab) + ")");
}

// Dense-path copies of layer l's FFN weights in the layouts the dense kernels read.
void Trainer::dense_copies(int64_t l) {
  if (dense_fresh_[sz(l)]) return;
  const int64_t d = cfg_.d_model, F = cfg_.d_ff;
  const LayerOffsets& L = lo_[sz(l)];
  dn_[sz(l)].resize(sz(d * F));
  gt_[sz(l)].resize(sz(d * F));
  ut_[sz(l)].resize(sz(d * F));
  transpose(w_.data() + L.updown + d, 2 * d, F, d, dn_[sz(l)].data(), F);
  transpose(w_.data() + L.gate, d, F, d, gt_[sz(l)].data(), F);
  transpose(w_.data() + L.updown, 2 * d, F, d, ut_[sz(l)].data(), F);
  dense_fresh_[sz(l)] = 1;
}

void Trainer::ffn_forward(int64_t l, LayerActs& a, const float* x, int64_t M, float* y, LayerStepStats& ls) {
  const int64_t d = cfg_.d_model, F = cfg_.d_ff;
  const LayerOffsets& L = lo_[sz(l)];
  const WeightView gate{w_.data() + L.gate, DType::F32, F, d, d};
  const UpDownView ud{w_.data() + L.updown, DType::F32, F, d, d};
  a.hybrid = st_.hybrid[sz(l)] != 0;
  if (a.hybrid) {
    HybridParams p;
    p.ell_width = hp_.ell_width;
    const HybridForwardResult r = hybrid_forward(x, M, gate, ud, p, a.htape, y);
    ls.nnz += r.stats.nnz;
    ls.max_row_nnz = std::max(ls.max_row_nnz, r.stats.max_row_nnz);
    ls.tail_rows += static_cast<int64_t>(a.htape.tail_rows.size());
    ls.l1 += r.l1;
    ls.saved_bytes = std::max(ls.saved_bytes, a.htape.saved_bytes());
  } else {
    dense_copies(l);
    DenseFfnWeights w;
    w.gate = gate;
    w.up = ud.up();
    w.down = {dn_[sz(l)].data(), DType::F32, d, F, F};
    w.gate_t = {gt_[sz(l)].data(), DType::F32, d, F, F};
    w.up_t = {ut_[sz(l)].data(), DType::F32, d, F, F};
    w.down_t = ud.down_t();
    ls.l1 += dense_ffn_forward_train(x, M, w, a.dtape, y);
    int64_t nnz = 0, mx = 0;
#pragma omp parallel for schedule(static) reduction(+ : nnz) reduction(max : mx) num_threads(num_threads())
    for (int64_t m = 0; m < M; ++m) {
      int64_t n = 0;
      const float* gm = a.dtape.g.data() + m * F;
      for (int64_t j = 0; j < F; ++j) n += gm[j] > 0.f;
      nnz += n;
      mx = std::max(mx, n);
    }
    ls.nnz += nnz;
    ls.max_row_nnz = std::max(ls.max_row_nnz, mx);
    ls.saved_bytes = std::max(ls.saved_bytes, a.dtape.saved_bytes());
  }
  ls.hybrid = a.hybrid;
  ls.tokens += M;
}

void Trainer::ffn_backward(int64_t l, LayerActs& a, const float* x, const float* dy, int64_t M, float lam, float* dx) {
  const int64_t d = cfg_.d_model, F = cfg_.d_ff;
  const LayerOffsets& L = lo_[sz(l)];
  const WeightView gate{w_.data() + L.gate, DType::F32, F, d, d};
  const UpDownView ud{w_.data() + L.updown, DType::F32, F, d, d};
  ffn_dgate_.resize(sz(F * d));
  ffn_dud_.resize(sz(2 * F * d));
  std::vector<float>& dgate = ffn_dgate_;
  std::vector<float>& dud = ffn_dud_;
  if (a.hybrid) {
    if (grads_zero_) {
      // First micro-batch of the step: the kernel's overwrite is the sum.
      hybrid_backward(x, dy, gate, ud, a.htape, lam, dx, g_.data() + L.gate, g_.data() + L.updown);
    } else {
      hybrid_backward(x, dy, gate, ud, a.htape, lam, dx, dgate.data(), dud.data());
      add_to(g_.data() + L.gate, dgate.data(), F * d);
      add_to(g_.data() + L.updown, dud.data(), 2 * F * d);
    }
  } else {
    DenseFfnWeights w;
    w.gate = gate;
    w.up = ud.up();
    w.down = {dn_[sz(l)].data(), DType::F32, d, F, F};
    w.gate_t = {gt_[sz(l)].data(), DType::F32, d, F, F};
    w.up_t = {ut_[sz(l)].data(), DType::F32, d, F, F};
    w.down_t = ud.down_t();
    float* dup = dud.data();
    float* ddown = dud.data() + F * d;  // [d, F]
    const bool first = grads_zero_;
    dense_ffn_backward(x, dy, M, w, a.dtape, lam, dx, first ? g_.data() + L.gate : dgate.data(), dup, ddown);
    if (!first) add_to(g_.data() + L.gate, dgate.data(), F * d);
    float* gu = g_.data() + L.updown;
#pragma omp parallel for schedule(static) num_threads(num_threads())
    for (int64_t j = 0; j < F; ++j) {
      float* row = gu + j * 2 * d;
      if (first) {
        for (int64_t i = 0; i < d; ++i) row[i] = dup[j * d + i];
        for (int64_t i = 0; i < d; ++i) row[d + i] = ddown[i * F + j];
      } else {
        for (int64_t i = 0; i < d; ++i) row[i] += dup[j * d + i];
        for (int64_t i = 0; i < d; ++i) row[d + i] += ddown[i * F + j];
      }
    }
  }
}

void Trainer::track_firing(int64_t l, const LayerActs& a, int64_t M) {
  const int64_t F = cfg_.d_ff;
  uint8_t* fired = st_.fired.data() + l * F;
  if (a.hybrid) {
    const HybridTape& t = a.htape;
    size_t ti = 0;
    for (int64_t m = 0; m < M; ++m) {
      if (ti < t.tail_rows.size() && t.tail_rows[ti] == m) {
        const float* tg = t.tail_g.data() + static_cast<int64_t>(ti) * F;
        for (int64_t j = 0; j < F; ++j) fired[j] |= tg[j] > 0.f;
        ++ti;
        continue;
      }
      const int32_t* c = t.col.data() + m * t.W;
      for (int32_t k = 0; k < t.row_nnz[sz(m)]; ++k) fired[c[k]] = 1;
    }
  } else {
#pragma omp parallel for schedule(static) num_threads(num_threads())
    for (int64_t j = 0; j < F; ++j) {
      if (fired[j]) continue;
      for (int64_t m = 0; m < M; ++m)
        if (a.dtape.g[sz(m * F + j)] > 0.f) {
          fired[j] = 1;
          break;
        }
    }
  }
}

StepStats Trainer::forward_backward(const int32_t* tokens, int64_t B, int64_t T, double scale, bool backward,
                                    EvalStats* eval) {
  const int64_t d = cfg_.d_model, F = cfg_.d_ff, V = cfg_.vocab, H = cfg_.n_heads, hd = d / H;
  const int64_t NL = cfg_.n_layers, M = B * T;
  (void)F;
  if (B < 1) throw std::invalid_argument("Trainer: need at least one sequence");
  check_tokens(tokens, B * (T + 1), T);
  std::vector<int32_t> inp(sz(M)), tgt(sz(M));
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      inp[sz(b * T + t)] = tokens[b * (T + 1) + t];
      tgt[sz(b * T + t)] = tokens[b * (T + 1) + t + 1];
    }
  StepStats s;
  s.layers.resize(sz(NL));
  const float* W = w_.data();
  const bool first = grads_zero_;  // gradients are overwritten, not added to
  auto grow = [&](std::vector<float>& v, int64_t n) {
    if (v.size() < sz(n)) v.resize(sz(n));
  };
  for (auto* v : {&xf_, &tmp_, &dx_, &dxn_, &datt_}) grow(*v, M * d);
  grow(dqkv_, 3 * M * d);
  for (LayerActs& a : acts_) {
    for (auto* v : {&a.x_in, &a.xn1, &a.att, &a.x_mid, &a.xn2}) grow(*v, M * d);
    grow(a.qkv, 3 * M * d);
    grow(a.rstd1, M);
    grow(a.rstd2, M);
    grow(a.P, B * H * T * T);
  }
  float* tmp = tmp_.data();
  TIMED(8, for (int64_t m = 0; m < M; ++m)
               std::memcpy(acts_[0].x_in.data() + m * d, W + off_embed_ + inp[sz(m)] * d, sizeof(float) * sz(d)));
  int64_t kept = 0;
  for (int64_t l = 0; l < NL; ++l) {
    LayerActs& a = acts_[sz(l)];
    const LayerOffsets& L = lo_[sz(l)];
    float* q = a.qkv.data();
    // x_in: the embeddings, or the previous layer's x_mid + FFN output (summed by the norm pass).
    TIMED(8, if (l == 0) rmsnorm_forward(a.x_in.data(), nullptr, nullptr, M, d, W + L.attn_norm, cfg_.norm_eps,
                                         a.xn1.data(), a.rstd1.data());
             else rmsnorm_forward(acts_[sz(l - 1)].x_mid.data(), tmp, a.x_in.data(), M, d, W + L.attn_norm, cfg_.norm_eps,
                                  a.xn1.data(), a.rstd1.data()));
    // q, k, v in one GEMM: their weights are adjacent, [3d, d].
    TIMED(0, linear_forward(a.xn1.data(), M, d, W + L.q, 3 * d, q));
    TIMED(8, rope_apply(q, 3 * d, B, T, H, hd, cos_.data(), sin_.data(), false);
             rope_apply(q + d, 3 * d, B, T, H, hd, cos_.data(), sin_.data(), false));
    TIMED(1, attention_forward(q, q + d, q + 2 * d, 3 * d, B, T, H, hd, a.P.data(), a.att.data(), d));
    TIMED(0, linear_forward(a.att.data(), M, d, W + L.o, d, tmp));
    TIMED(8, rmsnorm_forward(a.x_in.data(), tmp, a.x_mid.data(), M, d, W + L.ffn_norm, cfg_.norm_eps, a.xn2.data(),
                             a.rstd2.data()));
    TIMED(2, ffn_forward(l, a, a.xn2.data(), M, tmp, s.layers[sz(l)]));
    if (backward) track_firing(l, a, M);
    kept += static_cast<int64_t>(sizeof(float)) * (8 * M * d + 2 * M + B * H * T * T) + s.layers[sz(l)].saved_bytes;
  }
  float* xf = xf_.data();
  std::vector<float> xnf(sz(M * d)), rstdf(sz(M)), logits(sz(M * V));
  TIMED(8, rmsnorm_forward(acts_[sz(NL - 1)].x_mid.data(), tmp, xf, M, d, W + off_final_norm_, cfg_.norm_eps,
                           xnf.data(), rstdf.data()));
  TIMED(0, linear_forward(xnf.data(), M, d, W + off_embed_, V, logits.data()));
  double ce_sum = 0;
  TIMED(8, ce_sum = cross_entropy(logits.data(), tgt.data(), M, V, static_cast<float>(scale / static_cast<double>(M))));
  double l1 = 0;
  for (auto& ls : s.layers) l1 += ls.l1;
  l1 /= static_cast<double>(NL);
  s.ce = ce_sum / static_cast<double>(M);
  s.l1 = l1;
  s.loss = s.ce + hp_.l1 * l1;
  s.tokens = M;
  kept += static_cast<int64_t>(sizeof(float)) * (3 * M * d + M + M * V);
  saved_bytes_ = kept;
  peak_saved_bytes_ = std::max(peak_saved_bytes_, kept);
  if (eval) {
    eval->ce += ce_sum;
    eval->l1 += l1 * static_cast<double>(M);
    eval->tokens += M;
    for (int64_t l = 0; l < NL; ++l) eval->nnz[sz(l)] += s.layers[sz(l)].nnz;
  }
  if (!backward) return s;

  // ---- backward ----  (every gradient region is written with `first`: overwritten, else added to)
  // Kept between calls: a fresh 48 MB transposed-weight buffer would be page-faulted in every step.
  static thread_local Scratch sc;
  float* G = g_.data();
  float *dxnf = datt_.data(), *dx = dx_.data(), *dxn = dxn_.data(), *datt = datt_.data(), *dqkv = dqkv_.data();
  TIMED(3, linear_backward(xnf.data(), logits.data(), M, d, W + off_embed_, V, dxnf, G + off_embed_, first, sc));
  TIMED(8, rmsnorm_backward(xf, rstdf.data(), W + off_final_norm_, dxnf, M, d, dx, false, G + off_final_norm_, first));
  const float lam = static_cast<float>(hp_.l1 * scale / static_cast<double>(NL));
  for (int64_t l = NL - 1; l >= 0; --l) {
    LayerActs& a = acts_[sz(l)];
    const LayerOffsets& L = lo_[sz(l)];
    // x_out = x_mid + ffn(rmsnorm(x_mid))
    TIMED(5, ffn_backward(l, a, a.xn2.data(), dx, M, lam, dxn));
    TIMED(8, rmsnorm_backward(a.x_mid.data(), a.rstd2.data(), W + L.ffn_norm, dxn, M, d, dx, true, G + L.ffn_norm, first));
    // x_mid = x_in + o(attention(rope(q), rope(k), v))
    TIMED(3, linear_backward(a.att.data(), dx, M, d, W + L.o, d, datt, G + L.o, first, sc));
    TIMED(4, attention_backward(a.qkv.data(), a.qkv.data() + d, a.qkv.data() + 2 * d, 3 * d, a.P.data(), datt, d, B, T,
                                H, hd, dqkv, dqkv + d, dqkv + 2 * d, 3 * d));
    TIMED(8, rope_apply(dqkv, 3 * d, B, T, H, hd, cos_.data(), sin_.data(), true);
             rope_apply(dqkv + d, 3 * d, B, T, H, hd, cos_.data(), sin_.data(), true));
    TIMED(3, linear_backward(a.xn1.data(), dqkv, M, d, W + L.q, 3 * d, dxn, G + L.q, first, sc));
    TIMED(8, rmsnorm_backward(a.x_in.data(), a.rstd1.data(), W + L.attn_norm, dxn, M, d, dx, true, G + L.attn_norm, first));
  }
  TIMED(8, for (int64_t m = 0; m < M; ++m) {
    float* ge = G + off_embed_ + inp[sz(m)] * d;
    const float* dm = dx + m * d;
    for (int64_t i = 0; i < d; ++i) ge[i] += dm[i];
  });
  return s;
}

StepStats Trainer::accumulate(const int32_t* tokens, int64_t B, int64_t T, double scale) {
  StepStats s = forward_backward(tokens, B, T, scale, true, nullptr);
  grads_zero_ = false;
  return s;
}

EvalStats Trainer::evaluate(const int32_t* tokens, int64_t B, int64_t T) {
  EvalStats e;
  e.nnz.assign(sz(cfg_.n_layers), 0);
  forward_backward(tokens, B, T, 1.0, false, &e);
  e.ce /= static_cast<double>(e.tokens);
  e.l1 /= static_cast<double>(e.tokens);
  return e;
}

StepStats Trainer::step(const int32_t* tokens, int64_t n_micro, int64_t B, int64_t T, float lr) {
  if (n_micro < 1) throw std::invalid_argument("Trainer.step: need at least one micro-batch");
  if (!(lr >= 0.f) || !std::isfinite(lr)) throw std::invalid_argument("Trainer.step: learning rate must be >= 0");
  const int64_t NL = cfg_.n_layers;
  check_tokens(tokens, n_micro * B * (T + 1), T);
  // Per-layer path: forced, or (Auto) re-decided every recheck_steps from the last measurement.
  for (int64_t l = 0; l < NL; ++l) {
    if (hp_.ffn_path == FfnTrainPath::Dense) st_.hybrid[sz(l)] = 0;
    else if (hp_.ffn_path == FfnTrainPath::Hybrid) st_.hybrid[sz(l)] = 1;
    else if (st_.step > 0 && hp_.recheck_steps > 0 && st_.step % hp_.recheck_steps == 0)
      st_.hybrid[sz(l)] = st_.last_nnz[sz(l)] < hp_.hybrid_cutoff ? 1 : 0;
  }
  const double step_t0 = now_s(), step_c0 = cpu_s();
  const long faults0 = profile_on() ? minor_faults() : 0;
  for (double& t : prof_) t = 0;
  for (double& t : prof_cpu_) t = 0;
  grads_zero_ = true;  // the first micro-batch overwrites every gradient: no zeroing pass
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
  // Global gradient norm (float64, fixed order) and clipping.
  const double opt_t0 = now_s(), opt_c0 = cpu_s();
  double ss = 0;
  const double norm_t0 = now_s();
  ss = sum_squares(g_.data(), n_params_);
  prof_[9] = now_s() - norm_t0;
  total.grad_norm = std::sqrt(ss);
  if (!std::isfinite(total.grad_norm))
    throw std::runtime_error("Trainer.step: the gradient is not finite (loss diverged; lower the learning rate)");
  const float gscale = (hp_.clip > 0.f && total.grad_norm > hp_.clip) ? static_cast<float>(hp_.clip / total.grad_norm) : 1.f;
  st_.step += 1;
  const double c1 = 1.0 - std::pow(static_cast<double>(hp_.beta1), static_cast<double>(st_.step));
  const double c2 = 1.0 - std::pow(static_cast<double>(hp_.beta2), static_cast<double>(st_.step));
  int64_t pos = 0;
  auto run = [&](int64_t b, int64_t e, float wd) {
    if (e > b)
      adamw(w_.data() + b, g_.data() + b, m_.data() + b, v_.data() + b, e - b, lr, hp_.beta1, hp_.beta2, hp_.eps, wd,
            c1, c2, gscale);
  };
  for (const auto& r : no_decay_) {
    run(pos, r.first, hp_.weight_decay);
    run(r.first, r.second, 0.f);
    pos = r.second;
  }
  run(pos, n_params_, hp_.weight_decay);
  std::fill(dense_fresh_.begin(), dense_fresh_.end(), 0);
  prof_[6] += now_s() - opt_t0;
  prof_cpu_[6] += cpu_s() - opt_c0;
  prof_[7] = now_s() - step_t0;
  prof_cpu_[7] = cpu_s() - step_c0;
  if (profile_on()) {
    double rest = prof_[7];
    for (int i : {0, 1, 2, 3, 4, 5, 6, 8}) rest -= prof_[i];
    std::fprintf(stderr,
                 "train step %lld: total %.3fs = proj fwd %.3f, attn fwd %.3f, ffn fwd %.3f, proj bwd %.3f, attn bwd %.3f, "
                 "ffn bwd %.3f, optimizer %.3f (grad norm %.3f), norms/rope/residual/embed/loss %.3f, other %.3f\n",
                 static_cast<long long>(st_.step), prof_[7], prof_[0], prof_[1], prof_[2], prof_[3], prof_[4], prof_[5],
                 prof_[6], prof_[9], prof_[8], rest);
    double crest = prof_cpu_[7];
    for (int i : {0, 1, 2, 3, 4, 5, 6, 8}) crest -= prof_cpu_[i];
    std::fprintf(stderr,
                 "  cpu seconds (all threads): total %.3f = proj fwd %.3f, attn fwd %.3f, ffn fwd %.3f, proj bwd %.3f, "
                 "attn bwd %.3f, ffn bwd %.3f, optimizer %.3f, norms/rope/residual/embed/loss %.3f, other %.3f; "
                 "page faults %ld\n",
                 prof_cpu_[7], prof_cpu_[0], prof_cpu_[1], prof_cpu_[2], prof_cpu_[3], prof_cpu_[4], prof_cpu_[5],
                 prof_cpu_[6], prof_cpu_[8], crest, minor_faults() - faults0);
  }
  for (int64_t l = 0; l < NL; ++l)
    st_.last_nnz[sz(l)] = static_cast<double>(total.layers[sz(l)].nnz) / static_cast<double>(total.layers[sz(l)].tokens);
  end_of_step(total.tokens, total);
  return total;
}

// Dead-neuron window: when it completes, count the neurons that never fired and (optionally)
// re-initialise their gate rows (fresh Normal(0, init_std) draws, moments zeroed).
void Trainer::end_of_step(int64_t tokens, StepStats& s) {
  const int64_t NL = cfg_.n_layers, F = cfg_.d_ff, d = cfg_.d_model;
  st_.window_tokens += tokens;
  if (hp_.dead_window > 0 && st_.window_tokens >= hp_.dead_window) {
    for (int64_t l = 0; l < NL; ++l) {
      const uint8_t* fired = st_.fired.data() + l * F;
      int64_t dead = 0;
      std::mt19937_64 rng(mix(mix(hp_.seed, static_cast<uint64_t>(st_.step)), static_cast<uint64_t>(l) + 77));
      std::normal_distribution<float> nd(0.f, hp_.init_std);
      for (int64_t j = 0; j < F; ++j) {
        if (fired[j]) continue;
        ++dead;
        if (!hp_.reinit_dead) continue;
        const int64_t off = lo_[sz(l)].gate + j * d;
        for (int64_t i = 0; i < d; ++i) {
          w_[sz(off + i)] = nd(rng);
          m_[sz(off + i)] = 0.f;
          v_[sz(off + i)] = 0.f;
        }
        ++s.reinitialised;
      }
      st_.dead[sz(l)] = dead;
    }
    std::fill(st_.fired.begin(), st_.fired.end(), 0);
    st_.window_tokens = 0;
    if (s.reinitialised) std::fill(dense_fresh_.begin(), dense_fresh_.end(), 0);
  }
  for (int64_t l = 0; l < NL; ++l) s.layers[sz(l)].dead = st_.dead[sz(l)];
}

}  // namespace sparsellm
