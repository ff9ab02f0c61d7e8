// Internal (plain C++, no CUDA types): the GPU trainer, CudaTrainer, the device counterpart of
// sparsellm::Trainer (sparsellm/train.h) with the same model, parameter names and layout, the
// same initialisation (the same host random draws, uploaded), the same loss (cross-entropy +
// λ·L1 on the FFN activations, L1 = mean over layers of (1/M)·Σ|h|), gradient accumulation over
// micro-batches, global-norm clipping, AdamW with no weight decay on the norms, and the same
// dead-neuron window. Weights, gradients and AdamW moments live on the device in f32; a step
// uploads the token ids and downloads the loss and the per-layer statistics (one small copy per
// micro-batch, one for the gradient norm).
//
// Matrix products in f32 (as Trainer) or bf16 on the tensor cores (the constructor's choice).
// FFN, per layer as Trainer chooses it (forced, or auto from the measured non-zeros per token):
// the dense f32 path (hybrid.h's dense reference: g = relu(x·W_gateᵀ), u = x·W_upᵀ, h = g ⊙ u,
// y = h·W_downᵀ, backward with λ·sign(h)/M) or the Hybrid path in f32 (train_ops.h
// hybrid_ffn_*: ELL rows of at most ell_width non-zeros through sparse kernels, the other rows
// through the dense path on gathered rows; the tail's size never leaves the device). Not
// hybrid.cu's CudaFfnTrainer: that runs forward and backward in one call on bf16 weights it
// owns and returns the weight gradients to the host.
//
// UNVERIFIED: written on a machine without a GPU; compile-checked and run through a host
// emulation of its kernels only, until scripts/gpu-check.sh passes on a GPU.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "sparsellm/train.h"
#include "train_ops.h"

namespace sparsellm::cuda {

class CudaTrainer {
 public:
  // Throws std::runtime_error when no usable GPU is present, std::invalid_argument on a bad
  // configuration (as Trainer, and an ELL width below 1). `matmul`: the arithmetic of every
  // matrix product (train_ops.h MatmulPrecision): F32 follows Trainer to rounding, Bf16 runs
  // them on the tensor cores with bf16 operands (mixed precision; weights, gradients and
  // moments stay f32 either way).
  CudaTrainer(const TrainModelConfig& cfg, const TrainHyper& hyper,
              train::MatmulPrecision matmul = train::MatmulPrecision::F32);
  ~CudaTrainer();
  CudaTrainer(const CudaTrainer&) = delete;
  CudaTrainer& operator=(const CudaTrainer&) = delete;

  const TrainModelConfig& config() const;
  train::MatmulPrecision matmul() const;
  TrainHyper& hyper();

  // The same draws as Trainer::init_weights with the same seed.
  void init_weights();

  const std::vector<TrainTensor>& tensors() const;
  void get_tensor(const std::string& name, float* out) const;
  void set_tensor(const std::string& name, const float* in);

  // Host copies of the flat f32 vectors, in Trainer::params()'s layout.
  int64_t param_count() const;
  std::vector<float> params() const;
  std::vector<float> grads() const;
  std::vector<float> moment1() const;
  std::vector<float> moment2() const;
  void set_moments(const float* m, const float* v);  // param_count() each

  // The resume state (fired flags downloaded / uploaded). set_state ignores `hybrid` (every
  // layer runs the dense path here).
  TrainerState state() const;
  void set_state(const TrainerState& s);

  StepStats step(const int32_t* tokens, int64_t n_micro, int64_t B, int64_t T, float lr);
  EvalStats evaluate(const int32_t* tokens, int64_t B, int64_t T);
  void zero_grad();
  StepStats accumulate(const int32_t* tokens, int64_t B, int64_t T, double scale);
  // The FFN path each layer will run (Auto re-decides in step()).
  bool layer_hybrid(int64_t layer) const;

  // Activation bytes kept between forward and backward: Trainer's accounting, except that the
  // attention keeps each row's log-sum-exp (B·H·T floats per layer) where Trainer keeps the
  // probabilities (B·H·T·T); the backward recomputes them (train_ops.h attention_backward).
  int64_t saved_bytes() const;
  int64_t peak_saved_bytes() const;
  // Device bytes held by the trainer (weights, gradients, moments, activations, scratch), now and
  // at the end of its largest forward/backward so far (allocations are made as a pass needs them).
  int64_t device_bytes() const;
  int64_t peak_device_bytes() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace sparsellm::cuda
