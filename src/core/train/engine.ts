// Typed wrapper of the native training engine (native/src/addon/train_binding.cpp).
import { engine, type NativeAddon } from '../native.js';
import { SparseLlmError } from '../errors.js';

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
}

type TrainAddon = NativeAddon & { Trainer: new (opts: TrainModelShape & TrainerHyper) => NativeTrainer };

/** The native trainer: f32 master weights, AdamW moments, the per-layer FFN path. */
export class ModelTrainer {
  private readonly t: NativeTrainer;
  constructor(readonly shape: TrainModelShape, readonly hyper: TrainerHyper) {
    const addon = engine() as TrainAddon;
    try {
      this.t = new addon.Trainer({ ...shape, ...hyper });
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
}
