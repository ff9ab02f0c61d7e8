// Typed wrapper of the native training engine (native/src/addon/train_binding.cpp).
import { engine, type NativeAddon } from '../native.js';
import { SparseLlmError, UsageError } from '../errors.js';

/** The shape of a Llama-family model as the trainer builds it (MHA, tied embeddings, no biases). */
export interface TrainModelShape {
  vocab: number;
  dModel: number;
  layers: number;
  heads: number;
  dFF: number;
  context: number;
  ropeTheta: number;
  normEps: number;
}

export type FfnTrainPath = 'auto' | 'dense' | 'hybrid';

export interface TrainerHyper {
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
  clip: number;
  l1: number;
  ffnPath: FfnTrainPath;
  /** Auto: a layer runs the hybrid kernels once its mean non-zeros per token is below this. */
  hybridCutoff: number;
  /** Auto: how often (steps) the per-layer choice is re-made. */
  recheckSteps: number;
  ellWidth: number;
  /** Tokens per dead-neuron window. */
  deadWindow: number;
  reinitDead: boolean;
  initStd: number;
  seed: number;
}

export interface LayerStep {
  tokens: number;
  nnz: number;
  maxRowNnz: number;
  tailRows: number;
  l1: number;
  hybrid: boolean;
  savedBytes: number;
  dead: number;
}

export interface StepResult {
  loss: number;
  ce: number;
  l1: number;
  gradNorm: number;
  tokens: number;
  reinitialised: number;
  layers: LayerStep[];
}

export interface EvalResult {
  ce: number;
  l1: number;
  tokens: number;
  nnz: number[];
}

export interface TrainerStateData {
  step: number;
  windowTokens: number;
  hybrid: number[];
  lastNnz: number[];
  dead: number[];
  fired: Uint8Array;
  m: Float32Array;
  v: Float32Array;
}

interface NativeTrainer {
  initWeights(): void;
  readonly tensors: { name: string; shape: number[] }[];
  getTensor(name: string): Float32Array;
  setTensor(name: string, data: Float32Array): void;
  step(tokens: Int32Array, nMicro: number, B: number, T: number, lr: number): StepResult;
  evaluate(tokens: Int32Array, B: number, T: number): EvalResult;
  getState(): TrainerStateData;
  setState(s: TrainerStateData): void;
  setL1(l: number): void;
  readonly paramCount: number;
  readonly savedBytes: number;
  readonly peakSavedBytes: number;
  /** The GPU trainer only: device memory held at the end of its largest pass. */
  readonly peakDeviceBytes?: number;
}

type TrainAddon = NativeAddon & {
  Trainer: new (opts: TrainModelShape & TrainerHyper) => NativeTrainer;
  /** Builds with the CUDA backend only (native/src/addon/cuda_train_binding.cpp). */
  CudaTrainer?: new (opts: TrainModelShape & TrainerHyper & { matmul: TrainMatmul }) => NativeTrainer;
};

/** Where training runs: the CPU Trainer or the GPU CudaTrainer (same model, same semantics). */
export type TrainBackend = 'cpu' | 'cuda';

/**
 * The arithmetic of the GPU trainer's matrix products: bf16 operands on the tensor cores with f32
 * accumulation (mixed precision, the default), or f32 on the CUDA cores (the CPU trainer's
 * arithmetic, to rounding; slow). Weights, gradients and AdamW moments are f32 either way; the
 * CPU trainer is always f32.
 */
export type TrainMatmul = 'bf16' | 'f32';

/** The matmul precision a backend runs unless told otherwise: bf16 on the GPU, f32 (its only one) on the CPU. */
export function defaultMatmul(backend: TrainBackend): TrainMatmul {
  return backend === 'cuda' ? 'bf16' : 'f32';
}

/**
 * The backend of `train --backend`: auto stays on the CPU (the GPU trainer has not yet run on a
 * GPU); cuda needs a usable GPU, a build with the CUDA backend and SPARSELLM_CUDA_UNVERIFIED=1,
 * else a UsageError saying why.
 */
export function resolveTrainBackend(asked: 'auto' | 'cpu' | 'cuda', env: NodeJS.ProcessEnv = process.env): TrainBackend {
  if (asked !== 'cuda') return 'cpu';
  const cuda = engine().buildInfo().cuda;
  if (!cuda.compiled || !cuda.usable || !(engine() as TrainAddon).CudaTrainer) {
    const why = cuda.compiled ? cuda.reason : `this build has no CUDA backend (${cuda.reason})`;
    throw new UsageError(`--backend cuda: the GPU trainer needs a usable GPU: ${why}; use --backend cpu`);
  }
  if (env.SPARSELLM_CUDA_UNVERIFIED !== '1') {
    throw new UsageError('--backend cuda: the GPU trainer has not yet been verified on a GPU; set SPARSELLM_CUDA_UNVERIFIED=1 to run it');
  }
  return 'cuda';
}

/** The native trainer: f32 master weights, AdamW moments, the per-layer FFN path. */
export class ModelTrainer {
  private readonly t: NativeTrainer;
  constructor(
    readonly shape: TrainModelShape,
    readonly hyper: TrainerHyper,
    readonly backend: TrainBackend = 'cpu',
    readonly matmul: TrainMatmul = defaultMatmul(backend),
  ) {
    const addon = engine() as TrainAddon;
    if (backend === 'cpu' && matmul !== 'f32') throw new UsageError('the CPU trainer multiplies in f32 only (bf16 matmuls need --backend cuda)');
    try {
      if (backend === 'cuda') {
        if (!addon.CudaTrainer) throw new Error('this build has no CUDA backend');
        this.t = new addon.CudaTrainer({ ...shape, ...hyper, matmul });
      } else {
        this.t = new addon.Trainer({ ...shape, ...hyper });
      }
    } catch (e) {
      throw new SparseLlmError(`cannot build the model: ${(e as Error).message}`);
    }
  }
  initWeights(): void {
    this.t.initWeights();
  }
  get tensors(): { name: string; shape: number[] }[] {
    return this.t.tensors;
  }
  getTensor(name: string): Float32Array {
    return this.t.getTensor(name);
  }
  setTensor(name: string, data: Float32Array): void {
    this.t.setTensor(name, data);
  }
  step(tokens: Int32Array, nMicro: number, B: number, T: number, lr: number): StepResult {
    return this.t.step(tokens, nMicro, B, T, lr);
  }
  evaluate(tokens: Int32Array, B: number, T: number): EvalResult {
    return this.t.evaluate(tokens, B, T);
  }
  getState(): TrainerStateData {
    return this.t.getState();
  }
  setState(s: TrainerStateData): void {
    this.t.setState(s);
  }
  get paramCount(): number {
    return this.t.paramCount;
  }
  get peakSavedBytes(): number {
    return this.t.peakSavedBytes;
  }
  /** GPU memory the trainer held at the end of its largest pass (cuda backend; undefined on the CPU). */
  get peakDeviceBytes(): number | undefined {
    return this.t.peakDeviceBytes;
  }
}
