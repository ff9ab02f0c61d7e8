// The whole-model forward pass (sparsellm/model.h): embeddings → pre-norm blocks (attention
// with a KV cache, FFN) → final norm → LM head. Projections go through gemm(); ReLU FFNs, and
// silu/gelu FFNs with a stored threshold (auto/sparse modes), through the TwELL kernels of ffn.h
// (prefill: gate GEMM + fused up/down; few tokens: decode kernels); other activations (and
// thresholded layers under --dense or an observer) through a dense path here.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "sparsellm/cpu_info.h"
#include "sparsellm/gemm.h"
#include "sparsellm/model.h"

namespace sparsellm {

// ---- MappedFile ------------------------------------------------------------------------------

namespace {

[[noreturn]] void fail(const std::string& path, const char* what, int err) {
  throw std::runtime_error(path + ": " + what + ": " + std::strerror(err));
}

}  // namespace

MappedFile::MappedFile(const std::string& path, Residency residency) : path_(path), residency_(residency) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(path, "cannot open", errno);
  struct stat st{};
  if (::fstat(fd, &st) != 0) {
    const int e = errno;
    ::close(fd);
    fail(path, "cannot stat", e);
  }
  size_ = static_cast<int64_t>(st.st_size);
  if (size_ > 0 && residency_ == Residency::Map) {
    void* p = ::mmap(nullptr, static_cast<size_t>(size_), PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      const int e = errno;
      ::close(fd);
      fail(path, "cannot memory-map", e);
    }
    region_ = p;
    region_bytes_ = static_cast<size_t>(size_);
    data_ = static_cast<const uint8_t*>(p);
  } else if (size_ > 0) {
    // A 2 MiB-aligned stretch of anonymous memory (over-allocated by one huge page to align),
    // advised for huge pages before the first touch, then filled from the file.
    constexpr size_t kHuge = size_t(2) << 20;
    const size_t bytes = (static_cast<size_t>(size_) + kHuge - 1) / kHuge * kHuge;
    void* p = ::mmap(nullptr, bytes + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      const int e = errno;
      ::close(fd);
      fail(path, "cannot allocate memory for the weights", e);
    }
    region_ = p;
    region_bytes_ = bytes + kHuge;
    uint8_t* base = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(p) + kHuge - 1) / kHuge * kHuge);
    ::madvise(base, bytes, MADV_HUGEPAGE);  // advice only: without THP the copy still works
    size_t got = 0;
    while (got < static_cast<size_t>(size_)) {
      const size_t want = std::min(static_cast<size_t>(size_) - got, size_t(16) << 20);
      const ssize_t r = ::pread(fd, base + got, want, static_cast<off_t>(got));
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) {
        const int e = r < 0 ? errno : EIO;
        ::munmap(region_, region_bytes_);
        region_ = nullptr;
        ::close(fd);
        if (r == 0) throw std::runtime_error(path + ": the file ended early while being read");
        fail(path, "cannot read", e);
      }
      got += static_cast<size_t>(r);
    }
    ::mprotect(base, bytes, PROT_READ);  // the weights are read-only from here on
    data_ = base;
  }
  ::close(fd);  // a mapping stays valid
}

MappedFile::~MappedFile() {
  if (region_) ::munmap(region_, region_bytes_);
}

// ---- Model -----------------------------------------------------------------------------------

namespace {

void grow(std::vector<float>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
}

FfnMode ffn_mode(RunMode m) {
  switch (m) {
    case RunMode::Dense: return FfnMode::Dense;
    case RunMode::Sparse: return FfnMode::Sparse;
    default: return FfnMode::Auto;
  }
}

// The same activation functions as the TwELL gate epilogue (twell.h), so the dense and sparse
// paths of a thresholded layer keep the same units.
float act_value(float v, ActKind act) {
  switch (act) {
    case ActKind::Relu:
    case ActKind::Silu:
    case ActKind::GeluErf:
    case ActKind::GeluTanh: return gate_fn_value(v, static_cast<GateFn>(static_cast<int>(act)));
    default: return v;
  }
}

// Layers the TwELL kernels run: plain ReLU, or a supported activation with a stored cut-off.
bool twell_capable(const LayerWeights& L) {
  if (L.act == ActKind::Relu) return true;
  const bool fn = L.act == ActKind::Silu || L.act == ActKind::GeluErf || L.act == ActKind::GeluTanh;
  return fn && L.threshold >= 0.f;
}

}  // namespace

const char* model_step_name(ModelStep s) {
  static const char* const names[kModelSteps] = {"embed", "norms", "qkv", "rope", "kvStore",
                                                  "attention", "oProj", "residual", "ffn", "head"};
  const int i = static_cast<int>(s);
  return i >= 0 && i < kModelSteps ? names[i] : "?";
}

// Adds the wall time since the previous lap to a step, when profiling.
class Model::StepClock {
 public:
  StepClock(bool on, StepTimes& times) : on_(on), times_(times), last_(on ? now() : 0.0) {}
  void lap(ModelStep step) {
    if (!on_) return;
    const double t = now();
    times_.seconds[static_cast<int>(step)] += t - last_;
    last_ = t;
  }

 private:
  static double now() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
  }
  bool on_;
  StepTimes& times_;
  double last_;
};

Model::Model(const ModelConfig& cfg, ModelWeights weights, int64_t context, std::shared_ptr<void> keep_alive)
    : cfg_(cfg), w_(std::move(weights)), keep_alive_(std::move(keep_alive)) {
  if (cfg_.n_layers != static_cast<int64_t>(w_.layers.size())) throw std::invalid_argument("model: layer count mismatch");
  if (cfg_.n_kv_heads < 1 || cfg_.n_heads % cfg_.n_kv_heads != 0)
    throw std::invalid_argument("model: n_heads must be a multiple of n_kv_heads");
  if (cfg_.rope && cfg_.head_dim % 2 != 0) throw std::invalid_argument("model: RoPE needs an even head_dim");
  if (context < 1 || context > cfg_.max_positions)
    throw std::invalid_argument("model: context must be in [1, " + std::to_string(cfg_.max_positions) + "]");
  for (const LayerWeights& L : w_.layers) {
    FfnLayerConfig fc;
    fc.d_model = cfg_.d_model;
    fc.d_ff = L.d_ff;
    fc.gated = cfg_.gated;
    fc.dtype = L.ffn_dtype;
    fc.twell = L.twell;
    if (twell_capable(L) && !(L.act == ActKind::Relu && L.threshold <= 0.f))
      fc.act = GateAct{static_cast<GateFn>(static_cast<int>(L.act)), L.threshold};
    ffn_.push_back(std::make_unique<FfnLayer>(fc, L.ffn_a, L.ffn_b, L.up_b, L.down_b));
  }
  cache_.allocate(cfg_.n_layers, cfg_.n_kv_heads, cfg_.head_dim, context);
  activity_.assign(static_cast<size_t>(cfg_.n_layers), LayerActivity{});
}

void Model::set_kv_dtype(DType t) { cache_.allocate(cfg_.n_layers, cfg_.n_kv_heads, cfg_.head_dim, cache_.capacity, t); }

void Model::reset_stats() {
  activity_.assign(static_cast<size_t>(cfg_.n_layers), LayerActivity{});
  step_times_ = StepTimes{};
}

void Model::forward(const int32_t* tokens, int64_t T, bool all_logits, RunMode mode, float* logits) {
  const int64_t pos0 = cache_.length;
  check_forward_call(tokens, T, pos0, cache_.capacity, cfg_.vocab);
  const int64_t d = cfg_.d_model;
  grow(x_, T * d);
  grow(h_, T * d);
  grow(y_, T * d);
  StepClock clock(profiling_, step_times_);
  if (cfg_.rope) {
    grow(rope_cs_, T * cfg_.head_dim);
    rope_table(T, cfg_.head_dim, pos0, cfg_.rope_theta, rope_cs_.data());
    clock.lap(ModelStep::Rope);
  }
  embed_tokens(w_.embed, tokens, T, x_.data(), d);
  if (!cfg_.rope) add_learned_positions(w_.pos_embed, pos0, cfg_.position_offset, T, x_.data(), d);
  clock.lap(ModelStep::Embed);
  for (int64_t l = 0; l < cfg_.n_layers; ++l) {
    attention_block(l, T, pos0, clock);
    ffn_block(l, T, mode, clock);
  }
  cache_.length = pos0 + T;
  const int64_t rows = all_logits ? T : 1;
  const float* src = x_.data() + (all_logits ? 0 : (T - 1) * d);
  if (cfg_.rmsnorm) rms_norm(src, d, rows, d, w_.final_norm_w, cfg_.norm_eps, h_.data(), d);
  else layer_norm(src, d, rows, d, w_.final_norm_w, w_.final_norm_b, cfg_.norm_eps, h_.data(), d);
  clock.lap(ModelStep::Norms);
  if (rows <= kDecodeMaxTokens) gemv(h_.data(), d, rows, w_.lm_head, logits, cfg_.vocab);
  else gemm(h_.data(), d, rows, w_.lm_head, logits, cfg_.vocab);
  clock.lap(ModelStep::Head);
  if (profiling_) {
    step_times_.tokens += T;
    step_times_.calls += 1;
  }
}

void Model::attention_block(int64_t l, int64_t T, int64_t pos0, StepClock& clock) {
  const LayerWeights& L = w_.layers[static_cast<size_t>(l)];
  const int64_t d = cfg_.d_model, qd = cfg_.n_heads * cfg_.head_dim, kd = cfg_.n_kv_heads * cfg_.head_dim;
  grow(q_, T * qd);
  grow(k_, T * kd);
  grow(v_, T * kd);
  grow(att_, T * qd);
  if (cfg_.rmsnorm) rms_norm(x_.data(), d, T, d, L.attn_norm_w, cfg_.norm_eps, h_.data(), d);
  else layer_norm(x_.data(), d, T, d, L.attn_norm_w, L.attn_norm_b, cfg_.norm_eps, h_.data(), d);
  clock.lap(ModelStep::Norms);
  if (T <= kDecodeMaxTokens) {
    // Decode: the three projections read the same x, one GEMV pass over their rows.
    const GemvOutput qkv[3] = {{L.q, q_.data(), qd}, {L.k, k_.data(), kd}, {L.v, v_.data(), kd}};
    gemv_multi(h_.data(), d, T, qkv, 3);
  } else {
    gemm(h_.data(), d, T, L.q, q_.data(), qd);
    gemm(h_.data(), d, T, L.k, k_.data(), kd);
    gemm(h_.data(), d, T, L.v, v_.data(), kd);
  }
  if (L.q_b) add_bias(q_.data(), qd, T, qd, L.q_b);
  if (L.k_b) add_bias(k_.data(), kd, T, kd, L.k_b);
  if (L.v_b) add_bias(v_.data(), kd, T, kd, L.v_b);
  clock.lap(ModelStep::Qkv);
  if (cfg_.rope) {
    rope_apply(q_.data(), qd, T, cfg_.n_heads, cfg_.head_dim, rope_cs_.data());
    rope_apply(k_.data(), kd, T, cfg_.n_kv_heads, cfg_.head_dim, rope_cs_.data());
    clock.lap(ModelStep::Rope);
  }
  kv_cache_store(cache_, l, k_.data(), kd, v_.data(), kd, T, pos0);
  clock.lap(ModelStep::KvStore);
  attention_causal(q_.data(), qd, T, cfg_.n_heads, cache_, l, pos0, att_.data(), qd);
  clock.lap(ModelStep::Attention);
  if (T <= kDecodeMaxTokens) gemv(att_.data(), qd, T, L.o, y_.data(), d);
  else gemm(att_.data(), qd, T, L.o, y_.data(), d);
  if (L.o_b) add_bias(y_.data(), d, T, d, L.o_b);
  clock.lap(ModelStep::OProj);
  add_inplace(x_.data(), d, y_.data(), d, T, d);
  clock.lap(ModelStep::Residual);
}

void Model::ffn_block(int64_t l, int64_t T, RunMode mode, StepClock& clock) {
  const LayerWeights& L = w_.layers[static_cast<size_t>(l)];
  const int64_t d = cfg_.d_model;
  if (cfg_.rmsnorm) rms_norm(x_.data(), d, T, d, L.ffn_norm_w, cfg_.norm_eps, h_.data(), d);
  else layer_norm(x_.data(), d, T, d, L.ffn_norm_w, L.ffn_norm_b, cfg_.norm_eps, h_.data(), d);
  clock.lap(ModelStep::Norms);
  LayerActivity& a = activity_[static_cast<size_t>(l)];
  // Plain ReLU layers take the FfnLayer in every mode (as before); thresholded layers take it in
  // auto/sparse modes, and keep the generic dense path under --dense.
  const bool plain_relu = L.act == ActKind::Relu && L.threshold <= 0.f;
  if (!observer_ && (plain_relu || (twell_capable(L) && mode != RunMode::Dense))) {
    FfnLayer& f = *ffn_[static_cast<size_t>(l)];
    const FfnStats s = T <= kDecodeMaxTokens ? f.decode(h_.data(), T, y_.data(), ffn_mode(mode))
                                             : f.forward(h_.data(), T, y_.data(), ffn_mode(mode));
    a.add(s);
  } else {
    ffn_dense_generic(l, T);
    a.dense_calls += 1;
  }
  clock.lap(ModelStep::Ffn);
  add_inplace(x_.data(), d, y_.data(), d, T, d);
  clock.lap(ModelStep::Residual);
}

// Dense FFN for any activation: g = act(x·W_gateᵀ) (⊙ x·W_upᵀ when gated), with hidden units
// whose |act| <= threshold zeroed when the layer stores a threshold; y = h·W_downᵀ (+ b).
// Counts the non-zero hidden units per token.
void Model::ffn_dense_generic(int64_t l, int64_t T) {
  const LayerWeights& L = w_.layers[static_cast<size_t>(l)];
  FfnLayer& f = *ffn_[static_cast<size_t>(l)];
  const int64_t d = cfg_.d_model, F = L.d_ff;
  grow(g_, T * F);
  if (cfg_.gated) grow(u_, T * F);
  if (T <= kDecodeMaxTokens) {
    const GemvOutput gu[2] = {{f.gate_view(), g_.data(), F}, {f.up_view(), u_.data(), F}};
    gemv_multi(h_.data(), d, T, gu, cfg_.gated ? 2 : 1);
  } else {
    gemm(h_.data(), d, T, f.gate_view(), g_.data(), F);
    if (cfg_.gated) gemm(h_.data(), d, T, f.up_view(), u_.data(), F);
  }
  const float* up_b = L.up_b;
  const float thr = L.threshold;
  const bool gated = cfg_.gated;
  float* obs = nullptr;  // act(pre) before the threshold, for the observer
  if (observer_) {
    grow(obs_act_, T * F);
    obs = obs_act_.data();
  }
  std::vector<int64_t> nnz(static_cast<size_t>(T), 0);
#pragma omp parallel for num_threads(num_threads()) if (T * F >= 16384)
  for (int64_t t = 0; t < T; ++t) {
    float* gr = g_.data() + t * F;
    const float* ur = gated ? u_.data() + t * F : nullptr;
    int64_t n = 0;
    for (int64_t j = 0; j < F; ++j) {
      float pre = gr[j];
      if (!gated && up_b) pre += up_b[j];
      float av = act_value(pre, L.act);
      if (obs) obs[t * F + j] = av;
      if (thr >= 0.f && std::fabs(av) <= thr) av = 0.f;
      n += av != 0.f;  // active units of the activation (as the TwELL path counts them)
      if (gated) {
        float up = ur[j] + (up_b ? up_b[j] : 0.f);
        av *= up;
      }
      gr[j] = av;
    }
    nnz[static_cast<size_t>(t)] = n;
  }
  if (observer_) observer_(l, T, F, obs, g_.data());
  if (T <= kDecodeMaxTokens) gemv(g_.data(), F, T, f.down_standard(), y_.data(), d);
  else gemm(g_.data(), F, T, f.down_standard(), y_.data(), d);
  if (L.down_b) add_bias(y_.data(), d, T, d, L.down_b);
  LayerActivity& a = activity_[static_cast<size_t>(l)];
  for (int64_t n : nnz) {
    a.nnz += n;
    a.max_row_nnz = std::max(a.max_row_nnz, n);
  }
  a.tokens += T;
}

}  // namespace sparsellm
