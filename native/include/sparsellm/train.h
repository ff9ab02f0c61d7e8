// Training of a Llama-family decoder (tied embeddings, RMSNorm, RoPE "rotate half", causal
// multi-head attention, gated FFN with a ReLU gate, no biases) with a hand-written backward
// pass, f32 master weights and AdamW state. The FFN of each layer runs the dense training
// kernels or the Hybrid sparse kernels of hybrid.h, chosen per layer from its measured
// non-zeros per token. Loss = cross-entropy + λ·L1, L1 = mean over layers of (1/M)·Σ|h|.
//
// Shapes: B sequences of T tokens per micro-batch, M = B·T rows; d = d_model, F = d_ff,
// H heads of width hd = d / H, V = vocabulary.
//
// Parameter layout (one flat f32 vector; the optimizer moments use the same layout):
//   embed [V, d]; per layer: attn_norm [d], q, k, v, o [d, d] (nn.Linear: [out, in]),
//   ffn_norm [d], gate [F, d], updown [F, 2, d] (kernel layout of ffn.h: updown[j,0,:] = W_up[j,:],
//   updown[j,1,:] = W_down[:,j]); final_norm [d].
// tensors() lists the Hugging Face names and standard shapes; get_tensor/set_tensor convert.
#pragma once
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "sparsellm/hybrid.h"

namespace sparsellm {

struct TrainModelConfig {
  int64_t vocab = 256, d_model = 128, n_layers = 4, n_heads = 4, d_ff = 512, context = 256;
  double rope_theta = 10000.0;
  float norm_eps = 1e-5f;
};

enum class FfnTrainPath { Auto = 0, Dense = 1, Hybrid = 2 };

struct TrainHyper {
  float beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f;
  float weight_decay = 0.1f;  // decoupled (AdamW); never applied to the norm weights
  float clip = 1.0f;          // global gradient-norm clip; 0 = off
  float l1 = 0.f;             // λ
  FfnTrainPath ffn_path = FfnTrainPath::Auto;
  double hybrid_cutoff = 50;   // Auto: a layer runs hybrid once its mean nnz/token is below this
  int64_t recheck_steps = 20;  // Auto: the choice is re-made every this many steps
  int ell_width = 128;         // Hybrid ELL width W (heavier rows go to the dense tail)
  int64_t dead_window = 100000;  // tokens: a neuron that never fires over a window is dead
  bool reinit_dead = false;      // re-initialise the gate rows of dead neurons at each window end
  float init_std = 0.02f;
  uint64_t seed = 0;             // weight init and re-initialisation
};

// One Hugging Face tensor of the model (standard layout [rows, cols]; cols = 1 for vectors).
struct TrainTensor {
  std::string name;
  int64_t rows = 0, cols = 0;
};

struct LayerStepStats {
  int64_t tokens = 0, nnz = 0, max_row_nnz = 0, tail_rows = 0;
  double l1 = 0;            // (1/M)·Σ|h| averaged over the step's micro-batches
  bool hybrid = false;      // the path this step ran
  int64_t saved_bytes = 0;  // FFN activation bytes kept between forward and backward (max over micro-batches)
  int64_t dead = 0;         // neurons dead at the end of the last complete window
};

struct StepStats {
  double loss = 0, ce = 0, l1 = 0;  // loss = ce + λ·l1 (means over the step's micro-batches)
  double grad_norm = 0;             // before clipping
  int64_t tokens = 0;
  int64_t reinitialised = 0;        // gate rows re-initialised at the end of this step
  std::vector<LayerStepStats> layers;
};

struct EvalStats {
  double ce = 0, l1 = 0;
  int64_t tokens = 0;
  std::vector<int64_t> nnz;  // per layer, over all evaluated tokens
};

// Everything besides weights and moments that an exact resume needs.
struct TrainerState {
  int64_t step = 0;                 // optimizer steps taken
  std::vector<uint8_t> hybrid;      // [layers] current FFN path (1 = hybrid)
  std::vector<double> last_nnz;     // [layers] mean nnz/token of the last step
  std::vector<uint8_t> fired;       // [layers, F] fired in the current dead-neuron window
  std::vector<int64_t> dead;        // [layers] dead neurons at the end of the last window
  int64_t window_tokens = 0;        // tokens seen in the current window
};

class Trainer {
 public:
  Trainer(const TrainModelConfig& cfg, const TrainHyper& hyper);

  const TrainModelConfig& config() const { return cfg_; }
  TrainHyper& hyper() { return hp_; }

  // Normal(0, init_std) matrices (o and down scaled by 1/sqrt(2·layers)), norms 1.
  void init_weights();

  const std::vector<TrainTensor>& tensors() const { return tensors_; }
  // Copy a tensor out of / into the master weights in its standard layout. Throws on an
  // unknown name.
  void get_tensor(const std::string& name, float* out) const;
  void set_tensor(const std::string& name, const float* in);

  // Mutable access marks the dense-path weight copies stale (rebuilt at the next forward).
  std::vector<float>& params() {
    std::fill(dense_fresh_.begin(), dense_fresh_.end(), 0);
    return w_;
  }
  // The gradient summed by the last step() (before clipping) or by accumulate() since zero_grad().
  // step() does not zero it first: its first micro-batch overwrites every element.
  std::vector<float>& grads() { return g_; }
  std::vector<float>& moment1() { return m_; }
  std::vector<float>& moment2() { return v_; }
  TrainerState& state() { return st_; }

  // One optimizer step: `tokens` holds n_micro micro-batches of B sequences of T + 1 tokens
  // (inputs t[0..T), targets t[1..T]). Gradients are averaged over the micro-batches, clipped,
  // then AdamW with learning rate `lr`. Throws std::invalid_argument on bad shapes or tokens.
  StepStats step(const int32_t* tokens, int64_t n_micro, int64_t B, int64_t T, float lr);

  // Cross-entropy (and L1, nnz) without gradients, on B sequences of T + 1 tokens.
  EvalStats evaluate(const int32_t* tokens, int64_t B, int64_t T);

  // Lower-level pieces (tests): zero the gradients; forward + backward of one micro-batch,
  // adding scale·∂loss/∂w to grads(); returns the micro-batch's stats (loss = ce + λ·l1).
  void zero_grad();
  StepStats accumulate(const int32_t* tokens, int64_t B, int64_t T, double scale);
  // The FFN path each layer will run (Auto re-decides in step()).
  bool layer_hybrid(int64_t layer) const { return st_.hybrid[static_cast<size_t>(layer)] != 0; }

  // Bytes of activations kept between forward and backward by the last micro-batch (all
  // layers, FFN tapes included) and the largest such figure since construction.
  int64_t saved_bytes() const { return saved_bytes_; }
  int64_t peak_saved_bytes() const { return peak_saved_bytes_; }

 private:
  struct LayerOffsets {
    int64_t attn_norm, q, k, v, o, ffn_norm, gate, updown;
  };
  struct LayerActs {
    // x_in: the residual stream entering the layer; qkv [M, 3d]: q, k (after RoPE) and v side by side.
    std::vector<float> x_in, xn1, rstd1, qkv, P, att, x_mid, xn2, rstd2;
    HybridTape htape;
    DenseTape dtape;
    bool hybrid = false;
  };
  StepStats forward_backward(const int32_t* tokens, int64_t B, int64_t T, double scale, bool backward,
                             EvalStats* eval);
  void check_tokens(const int32_t* tokens, int64_t n, int64_t T) const;
  void ffn_forward(int64_t l, LayerActs& a, const float* x, int64_t M, float* y, LayerStepStats& ls);
  void ffn_backward(int64_t l, LayerActs& a, const float* x, const float* dy, int64_t M, float lam, float* dx);
  void dense_copies(int64_t l);
  void track_firing(int64_t l, const LayerActs& a, int64_t M);
  void end_of_step(int64_t tokens, StepStats& s);

  TrainModelConfig cfg_;
  TrainHyper hp_;
  std::vector<TrainTensor> tensors_;
  std::vector<LayerOffsets> lo_;
  int64_t off_embed_ = 0, off_final_norm_ = 0, n_params_ = 0;
  std::vector<std::pair<int64_t, int64_t>> no_decay_;  // [begin, end) ranges of the norm weights
  std::vector<float> w_, g_, m_, v_;
  TrainerState st_;
  std::vector<LayerActs> acts_;
  // Dense-path weight copies of each layer (rebuilt after every update): down [d, F],
  // gate_t [d, F], up_t [d, F].
  std::vector<std::vector<float>> dn_, gt_, ut_;
  std::vector<uint8_t> dense_fresh_;
  std::vector<float> cos_, sin_;  // RoPE tables [context, hd/2]
  std::vector<float> ffn_dgate_, ffn_dud_;  // FFN gradient scratch [F, d], [F, 2, d] (kept: no page faults per call)
  // No micro-batch has written grads() since zero_grad() or the start of step(): the next one
  // overwrites every gradient instead of adding (step() does not zero them first).
  bool grads_zero_ = true;
  std::vector<float> xf_, tmp_, dx_, dxn_, datt_, dqkv_;  // pass scratch [M, d] ([M, 3d] for dqkv_), kept
  int64_t saved_bytes_ = 0, peak_saved_bytes_ = 0;
  // Seconds per phase of the last step (SPARSELLM_TRAIN_PROFILE=1 prints them to stderr):
  // projections fwd, attention fwd, FFN fwd, projections bwd, attention bwd, FFN bwd, optimizer, total,
  // norms/RoPE/residual/embedding/loss, gradient norm (part of the optimizer).
  double prof_[10] = {}, prof_cpu_[10] = {};
};

}  // namespace sparsellm
