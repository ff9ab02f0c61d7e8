// What the kernel benchmark measures and reports: the engine it drives (an interface, so the
// runner knows nothing of the addon) and the result records the renderers print.
import type { BenchCase, WeightDType } from './cases.js';
import type { FfnWeights } from './inputs.js';
import type { Summary } from './stats.js';

/** One native timing call: `repeats` timed calls after `warmup` untimed ones. */
export interface NativeTiming {
  medianMs: number;
  minMs: number;
  maxMs: number;
}

export type FfnForwardMode = 'dense' | 'sparse' | 'auto';
export type FfnTrainMode = 'dense' | 'hybrid';

export interface ForwardStats {
  /** The path that ran: 'dense' or 'sparse'. */
  path: string;
  /** Non-zeros over all tokens (strictly positive ReLU outputs). */
  nnz: number;
  maxRowNnz: number;
  overflowTiles: number;
  overflowRows: number;
}

export interface TrainStats {
  /** Bytes of activations kept between forward and backward. */
  savedBytes: number;
  /** Rows that overflowed the ELL width and went through the dense tail. */
  tailRows: number;
  nnz: number;
}

/** One FFN layer built from benchmark weights, as the benchmark drives it. */
export interface BenchFfnLayer {
  forwardStats(x: Float32Array, tokens: number, mode: FfnForwardMode): ForwardStats;
  timeForward(x: Float32Array, tokens: number, mode: FfnForwardMode, repeats: number, warmup: number): NativeTiming;
  trainStats(x: Float32Array, dy: Float32Array, tokens: number, mode: FfnTrainMode): TrainStats;
  timeTrain(x: Float32Array, dy: Float32Array, tokens: number, mode: FfnTrainMode, repeats: number, warmup: number): NativeTiming;
}

export type GemmImpl = 'ours' | 'openblas';

export interface OpenBlasInfo {
  available: boolean;
  path?: string;
  coreName?: string;
  config?: string;
  reason?: string;
}

/** The compute backend under test. */
export interface BenchEngine {
  backend: string;
  /** The ISA the kernels dispatch to (avx512, avx2, portable). */
  isa: string;
  threads: number;
  /** Whether the engine can run this case; the reason when it cannot. */
  supports(c: BenchCase): true | string;
  createFfn(weights: FfnWeights): BenchFfnLayer;
  timeGemm(M: number, K: number, N: number, dtype: WeightDType, impl: GemmImpl, repeats: number, warmup: number): NativeTiming;
  openblas(): OpenBlasInfo;
  /**
   * C [M, N] = x [M, K] · Wᵀ (W [N, K], values exactly representable in `dtype`) through the
   * engine's dense GEMM; used to count the neurons a batch activates. Optional.
   */
  gemmProduct?(x: Float32Array, M: number, w: Float32Array, N: number, K: number, dtype: WeightDType): Float32Array;
}

// ---- Results -----------------------------------------------------------------------------

/** One implementation of a case, timed in rounds interleaved with the case's other impls. */
export interface ImplResult {
  /** dense | sparse | auto (forward); dense | hybrid (train); ours | openblas (gemm). */
  impl: string;
  /** The path that actually ran (auto picks one), when the kernel reports it. */
  path?: string;
  /** Statistics over the rounds' samples, in milliseconds per call. */
  ms: Summary;
  /** Per-round samples (each the median of `inner` back-to-back calls), ms. */
  samples: number[];
  /** Calls per sample. */
  inner: number;
  /** Dense-equivalent FLOPs over the median time, in GFLOP/s. */
  gflops: number;
  /** Speedup over the case's baseline: the median of the per-round ratios baseline / this (1 for the baseline). */
  speedup: number;
  /** Bytes of weights this implementation must read at least once per call. */
  weightBytes?: number;
  /** Activation bytes kept for backward (training). */
  savedBytes?: number;
}

export interface CaseResult {
  case: BenchCase;
  backend: string;
  isa: string;
  threads: number;
  /** The implementation speedups are measured against (dense, or OpenBLAS for the GEMM). */
  baseline: string;
  impls: ImplResult[];
  /** Measured activation sparsity (FFN cases), from the kernels' own counts. */
  measured?: {
    nnzPerToken: number;
    maxRowNnz: number;
    density: number;
    /** Distinct neurons active in at least one token of the batch (when the engine can tell). */
    unionActive?: number;
  };
  overflow?: { tiles: number; rows: number };
  tailRows?: number;
  flops: { denseEquivalent: number; useful?: number };
  /** Free-form facts about the case (e.g. "OpenBLAS core SkylakeX"). */
  notes?: string[];
}
