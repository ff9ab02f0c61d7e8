// Typed wrapper of the CUDA backend's bindings (native/src/addon/cuda_binding.cpp): the FFN layer
// on the GPU (dense, TwELL sparse with exact row fallback, auto; decode), GEMM timing against
// cuBLAS, NVML and the GPU benchmark suite; plus the backend choice (`cudaAvailability`) that
// `--backend auto` uses, and the BenchEngine adapter that lets `sparsellm bench` run on CUDA.
import { engine, type NativeAddon } from '../native.js';
import { SparseLlmError } from '../errors.js';
import type { BenchCase } from '../bench/cases.js';
import type { FfnWeights } from '../bench/inputs.js';
import type { BenchEngine, BenchFfnLayer, NativeTiming, OpenBlasInfo } from '../bench/types.js';
import type { FfnLayerConfig, FfnMode, FfnStats, Timing, TrainStepResult } from './ffn.js';

export interface CudaFfnLayerOptions {
  dModel: number;
  dFF: number;
  gated: boolean;
  /** The CUDA kernels keep bf16 weights (f32 values are rounded on upload). */
  dtype?: 'bf16';
  /** W_gate [dFF, dModel] (gated only). */
  gate?: Float32Array;
  /** W_up [dFF, dModel]. */
  up: Float32Array;
  /** W_down [dModel, dFF] (standard layout). */
  down: Float32Array;
  /** b_up [dFF] (non-gated only). */
  upBias?: Float32Array;
  /** b_down [dModel]. */
  downBias?: Float32Array;
  /** TwELL tile width: 32, 64, 128 or 256 on CUDA. */
  tileWidth?: number;
  compression?: number;
}

export interface CudaFfnStats extends FfnStats {
  /** Rows with an overflowing TwELL tile, recomputed exactly by dense GEMMs on just those rows. */
  fallbackRows: number;
}

export interface CudaFfnResult {
  y: Float32Array;
  stats: CudaFfnStats;
}

export interface CudaRunOptions {
  mode?: FfnMode;
  out?: Float32Array;
  /** Force the any-shape fused kernel (tests). */
  generic?: boolean;
}

export interface CudaTrainOptions {
  /** hybrid (sparse kernels + dense tail) or dense (the GEMM baseline). */
  mode?: 'hybrid' | 'dense';
  ellWidth?: number;
  l1?: number;
}

export interface GpuBenchOptions {
  dModel?: number;
  dFF?: number;
  tokens?: number;
  gated?: boolean;
  nnzPerToken?: number;
  repeats?: number;
  warmup?: number;
  decodeTokens?: number;
  energySeconds?: number;
  /** Time the dense and hybrid training steps too (gated shapes). */
  train?: boolean;
  trainRepeats?: number;
  tileWidth?: number;
  compression?: number;
}

export interface GpuBenchRow {
  name: string;
  medianMs: number;
  minMs: number;
  maxMs: number;
  /** Dense-equivalent TFLOP/s (the FFN's dense FLOPs over the measured time). */
  tflops: number;
  /** NVML energy per token in millijoules, when NVML is available. */
  mjPerToken?: number;
  note: string;
}

export interface GpuBenchResult {
  device: string;
  driver: string;
  /** The cuBLAS library loaded, or `absent: <reason>`. */
  cublas: string;
  measuredNnzPerToken: number;
  overflowRows: number;
  rows: GpuBenchRow[];
  log: string[];
}

interface NativeCudaFfnLayer {
  forward(x: Float32Array, M: number, opts?: CudaRunOptions): CudaFfnResult;
  decode(x: Float32Array, opts?: CudaRunOptions): CudaFfnResult;
  time(kind: 'forward' | 'decode', x: Float32Array, M: number, opts: { mode?: FfnMode }, repeats: number, warmup: number): Timing;
  trainStep(x: Float32Array, dy: Float32Array, M: number, opts?: CudaTrainOptions): TrainStepResult;
  readonly config: FfnLayerConfig;
  readonly weightBytes: number;
}

type CudaAddon = NativeAddon & {
  CudaFfnLayer?: new (opts: CudaFfnLayerOptions) => NativeCudaFfnLayer;
  cudaTimeGemm?: (o: { M: number; K: number; N: number; impl: 'ours' | 'cublas'; repeats: number; warmup: number }) => Timing;
  cudaCublas?: () => { available: boolean; library?: string; reason?: string };
  cudaNvml?: () => { available: boolean; driver?: string; reason?: string };
  cudaEnergyMillijoules?: () => number;
  cudaBench?: (o: GpuBenchOptions) => GpuBenchResult;
};

export interface CudaAvailability {
  usable: boolean;
  /** Why the CUDA backend cannot run here (absent when usable). */
  reason?: string;
  /** The first device, e.g. "NVIDIA H200 (cc 9.0)". */
  device?: string;
}

/** Whether the CUDA backend can run here, and why not. Never throws for a missing GPU. */
export function cudaAvailability(): CudaAvailability {
  const e = engine() as CudaAddon;
  const c = e.buildInfo().cuda;
  if (!c.compiled) return { usable: false, reason: `this build has no CUDA backend (${c.reason})` };
  if (typeof e.CudaFfnLayer !== 'function') return { usable: false, reason: 'the native addon lacks the CUDA bindings: rebuild it (`npm run build:native`)' };
  if (!c.usable) return { usable: false, reason: c.reason || 'no usable CUDA device' };
  const d = c.devices.find((x) => Number(x.computeCapability.split('.')[0]) >= 8) ?? c.devices[0];
  return { usable: true, device: d ? `${d.name} (cc ${d.computeCapability})` : undefined };
}

function addon(): Required<Pick<CudaAddon, 'CudaFfnLayer' | 'cudaTimeGemm' | 'cudaCublas' | 'cudaNvml' | 'cudaEnergyMillijoules' | 'cudaBench'>> {
  const a = cudaAvailability();
  if (!a.usable) throw new SparseLlmError(`CUDA backend unavailable: ${a.reason}`);
  return engine() as never;
}

function wrap<T>(f: () => T): T {
  try {
    return f();
  } catch (e) {
    throw new SparseLlmError((e as Error).message);
  }
}

/** One FFN block on the GPU (bf16 weights in kernel layout, bf16 activations, f32 outputs). */
export class CudaFfnLayer {
  private readonly native: NativeCudaFfnLayer;

  constructor(opts: CudaFfnLayerOptions) {
    const Native = addon().CudaFfnLayer;
    this.native = wrap(() => new Native({ dtype: 'bf16', ...opts }));
  }

  get config(): FfnLayerConfig {
    return this.native.config;
  }

  get weightBytes(): number {
    return this.native.weightBytes;
  }

  /** y [M, dModel] = FFN(x [M, dModel]) (x rounded to bf16 on the device). */
  forward(x: Float32Array, M: number, opts: CudaRunOptions = {}): CudaFfnResult {
    return wrap(() => this.native.forward(x, M, opts));
  }

  /** A few tokens (M = x.length / dModel ≤ 8: GEMV gate, then only the active neurons' rows). */
  decode(x: Float32Array, opts: CudaRunOptions = {}): CudaFfnResult {
    return wrap(() => this.native.decode(x, opts));
  }

  /**
   * One Hybrid training step on the GPU (gated layers): forward and backward of the sparse
   * kernels with dense tail rows; gradients in standard layouts, as FfnLayer.trainStep.
   */
  trainStep(x: Float32Array, dy: Float32Array, M: number, opts: CudaTrainOptions = {}): TrainStepResult {
    return wrap(() => this.native.trainStep(x, dy, M, opts));
  }

  /** Device-side timing (CUDA events) of `repeats` calls after `warmup`; x uploaded once. */
  time(kind: 'forward' | 'decode', x: Float32Array, M: number, opts: { mode?: FfnMode }, repeats: number, warmup: number): Timing {
    return wrap(() => this.native.time(kind, x, M, opts, repeats, warmup));
  }
}

/** Times our tensor-core GEMM or cuBLAS on random bf16 operands [M, K] · [N, K]ᵀ (device timing). */
export function timeCudaGemm(M: number, K: number, N: number, impl: 'ours' | 'cublas', repeats: number, warmup: number): Timing {
  const a = addon();
  return wrap(() => a.cudaTimeGemm({ M, K, N, impl, repeats, warmup }));
}

export function cublasInfo(): { available: boolean; library?: string; reason?: string } {
  return wrap(() => addon().cudaCublas());
}

export function nvmlInfo(): { available: boolean; driver?: string; reason?: string } {
  return wrap(() => addon().cudaNvml());
}

/** The GPU's NVML energy counter in millijoules (throws when NVML or the counter is unavailable). */
export function nvmlEnergyMillijoules(): number {
  return wrap(() => addon().cudaEnergyMillijoules());
}

/** The GPU benchmark suite (scripts/gpu-bench.ts): paper-shaped FFN, GEMM vs cuBLAS, decode, energy. */
export function runGpuBenchmarks(opts: GpuBenchOptions = {}): GpuBenchResult {
  const a = addon();
  return wrap(() => a.cudaBench(opts));
}

// ---- sparsellm bench on CUDA ----------------------------------------------------------------

function forwardEntry(tokens: number): 'decode' | 'forward' {
  return tokens === 1 ? 'decode' : 'forward';
}

/** Whether the CUDA bench engine runs a case; the reason when it cannot. */
export function cudaSupports(c: BenchCase): true | string {
  if (c.op === 'ffn-train') return 'the CUDA backend has a hybrid training step but no dense GPU training baseline to time it against yet (train cases run on --backend cpu)';
  if (c.dtype !== 'bf16') return `the CUDA kernels take bf16 operands, this ${c.op} case is ${c.dtype} (--dtype bf16)`;
  return true;
}

/** The CUDA backend as `sparsellm bench` drives it (forward and GEMM cases; no training yet). */
export function createCudaBenchEngine(): BenchEngine {
  const a = cudaAvailability();
  if (!a.usable) throw new SparseLlmError(`CUDA backend unavailable: ${a.reason}`);
  return {
    backend: 'cuda',
    isa: a.device ?? 'cuda',
    threads: 1,
    supports: cudaSupports,
    createFfn(w: FfnWeights): BenchFfnLayer {
      const layer = new CudaFfnLayer({
        dModel: w.shape.dModel,
        dFF: w.shape.dFF,
        gated: w.shape.gated,
        ...(w.gate ? { gate: w.gate } : {}),
        up: w.up,
        down: w.down,
      });
      return {
        forwardStats(x, tokens, mode) {
          const r = forwardEntry(tokens) === 'decode' ? layer.decode(x, { mode }) : layer.forward(x, tokens, { mode });
          return r.stats;
        },
        timeForward(x, tokens, mode, repeats, warmup): NativeTiming {
          return layer.time(forwardEntry(tokens), x, tokens, { mode }, repeats, warmup);
        },
        trainStats() {
          throw new SparseLlmError('train cases are not benchmarked on CUDA yet (no dense GPU training baseline)');
        },
        timeTrain() {
          throw new SparseLlmError('train cases are not benchmarked on CUDA yet (no dense GPU training baseline)');
        },
      };
    },
    timeGemm(M, K, N, _dtype, impl, repeats, warmup) {
      if (impl !== 'ours') throw new SparseLlmError('OpenBLAS is a CPU baseline; on CUDA the GEMM reference is cuBLAS (scripts/gpu-check.sh)');
      return timeCudaGemm(M, K, N, 'ours', repeats, warmup);
    },
    openblas(): OpenBlasInfo {
      return { available: false, reason: 'OpenBLAS is a CPU library; the CUDA backend is compared with cuBLAS' };
    },
  };
}
