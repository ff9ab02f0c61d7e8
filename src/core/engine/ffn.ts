// Typed wrapper of the native FFN layer (native/src/addon/ffn_binding.cpp): one feed-forward
// block on the CPU engine, run dense, sparse (TwELL) or automatically, plus its training step
// (dense or Hybrid) and native timing loops for benchmarks.
import { engine, type NativeAddon } from '../native.js';
import { SparseLlmError } from '../errors.js';

/** How the forward pass runs: three dense GEMMs, the TwELL sparse kernels, or the engine's
 *  per-call choice from the gate's non-zero counts (the gate GEMM is never run twice). */
export type FfnMode = 'dense' | 'sparse' | 'auto';
/** Training step: dense GEMMs, or the Hybrid (ELL + dense tail) sparse kernels. */
export type FfnTrainMode = 'dense' | 'hybrid';
export type FfnDType = 'f32' | 'bf16';

/** TwELL parameters: tile width T and compression factor C (capacity T/C − 1 per tile). */
export interface TwellParams {
  tileWidth: number;
  compression: number;
}

export interface FfnLayerOptions extends Partial<TwellParams> {
  dModel: number;
  dFF: number;
  gated: boolean;
  dtype: FfnDType;
  /** W_gate [dFF, dModel] (gated only). */
  gate?: Float32Array;
  /** W_up [dFF, dModel]. */
  up: Float32Array;
  /** W_down [dModel, dFF] (standard layout; the layer transposes it into its kernel layout). */
  down: Float32Array;
  /** b_up [dFF] (non-gated only). */
  upBias?: Float32Array;
  /** b_down [dModel]. */
  downBias?: Float32Array;
}

export interface SparsityStats {
  /** Positive hidden activations over all tokens. */
  nnz: number;
  maxRowNnz: number;
  /** TwELL tiles whose positives exceeded their capacity (computed exactly via the side buffer). */
  overflowTiles: number;
  /** Tokens with at least one overflowing tile. */
  overflowRows: number;
}

export interface FfnStats extends SparsityStats {
  /** The path that computed up+down. Dense-mode stats have overflow counts 0 (no TwELL built). */
  path: 'dense' | 'sparse';
}

export interface FfnResult {
  y: Float32Array;
  stats: FfnStats;
}

export interface FfnRunOptions {
  mode?: FfnMode;
  /** Output buffer [M*dModel] to reuse. */
  out?: Float32Array;
}

export interface TrainStepOptions {
  mode?: FfnTrainMode;
  /** ELL width W of the Hybrid format (rows with more non-zeros go to the dense tail). */
  ellWidth?: number;
  /** λ of the L1 penalty on the hidden activations (enters the gradient as λ·sign(h)/M). */
  l1?: number;
}

export interface TrainStepResult {
  y: Float32Array;
  dx: Float32Array;
  /** [dFF, dModel] */
  dWgate: Float32Array;
  /** [dFF, dModel] */
  dWup: Float32Array;
  /** [dModel, dFF] */
  dWdown: Float32Array;
  /** l1 = (1/M)·Σ|h| (not multiplied by λ). */
  loss: { l1: number };
  stats: SparsityStats & { savedBytes: number; tailRows: number };
}

export interface TimeOptions extends Omit<TrainStepOptions, 'mode'> {
  /** An FfnMode for 'forward'/'decode', an FfnTrainMode for 'train'. */
  mode?: FfnMode | FfnTrainMode;
  /** Upstream gradient for kind 'train' (default: a fixed pseudo-random one). */
  dy?: Float32Array;
}

export interface Timing {
  medianMs: number;
  minMs: number;
  maxMs: number;
}

export interface FfnLayerConfig extends TwellParams {
  dModel: number;
  dFF: number;
  gated: boolean;
  dtype: FfnDType;
  /** Entries per tile, T/C − 1. */
  capacity: number;
}

interface NativeFfnLayer {
  forward(x: Float32Array, M: number, opts?: FfnRunOptions): FfnResult;
  decode(x: Float32Array, opts?: FfnRunOptions): FfnResult;
  trainStep(x: Float32Array, dy: Float32Array, M: number, opts?: TrainStepOptions): TrainStepResult;
  time(kind: 'forward' | 'decode' | 'train', x: Float32Array, M: number, opts: TimeOptions, repeats: number, warmup: number): Timing;
  readonly config: FfnLayerConfig;
  readonly weightBytes: number;
}

type FfnAddon = NativeAddon & { FfnLayer: new (opts: FfnLayerOptions) => NativeFfnLayer };

function addon(): FfnAddon {
  const e = engine() as FfnAddon;
  if (typeof e.FfnLayer !== 'function') throw new SparseLlmError('native addon has no FfnLayer: rebuild it (`npm run build:native`)');
  return e;
}

/** One FFN block in the native engine (weights packed into the kernel layout at construction). */
export class FfnLayer {
  private readonly native: NativeFfnLayer;

  constructor(opts: FfnLayerOptions) {
    const FfnLayerNative = addon().FfnLayer;
    try {
      this.native = new FfnLayerNative(opts);
    } catch (e) {
      throw new SparseLlmError((e as Error).message);
    }
  }

  get config(): FfnLayerConfig {
    return this.native.config;
  }

  /** Bytes of the packed weights. */
  get weightBytes(): number {
    return this.native.weightBytes;
  }

  /** y [M, dModel] = FFN(x [M, dModel]). */
  forward(x: Float32Array, M: number, opts: FfnRunOptions = {}): FfnResult {
    return this.native.forward(x, M, opts);
  }

  /** Decode path for one token (or a handful): M = x.length / dModel. */
  decode(x: Float32Array, opts: FfnRunOptions = {}): FfnResult {
    return this.native.decode(x, opts);
  }

  /** Forward + backward of the gated f32 layer (gradients in standard layouts). */
  trainStep(x: Float32Array, dy: Float32Array, M: number, opts: TrainStepOptions = {}): TrainStepResult {
    return this.native.trainStep(x, dy, M, opts);
  }

  /** Times `repeats` native calls after `warmup` untimed ones (no JS allocation in the loop). */
  time(kind: 'forward' | 'decode' | 'train', x: Float32Array, M: number, opts: TimeOptions, repeats: number, warmup: number): Timing {
    return this.native.time(kind, x, M, opts, repeats, warmup);
  }
}
