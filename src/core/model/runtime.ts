// The native model runtime: a packed model memory-mapped by the engine, its tokenizer, and a
// KV cache that persists across calls. Dense Hugging Face checkpoints are packed on the fly into
// a temporary file (removed as soon as the engine has mapped it).
import { mkdtemp, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { engine, type NativeAddon } from '../native.js';
import { SparseLlmError, UsageError } from '../errors.js';
import { openPacked, type PackedModel } from '../format/reader.js';
import type { PackedLayer, StorageDType } from '../format/metadata.js';
import { openCheckpoint } from '../checkpoint/dense.js';
import { packInputFromCheckpoint } from '../format/source.js';
import { writePacked } from '../format/writer.js';
import { ByteTokenizer, tokenizerFromJsonBytes, type Tokenizer } from '../tokenizer/index.js';
import type { ModelSpec } from './spec.js';

/** How ReLU FFNs run: dense GEMMs, TwELL sparse kernels, or the engine's per-call choice. */
export type FfnRunMode = 'dense' | 'sparse' | 'auto';

/** Where a whole model runs: the CPU runtime, or the CUDA one (CudaModel, docs/runtime.md). */
export type ModelBackend = 'cpu' | 'cuda';

/**
 * The backend a whole-model command runs on: `auto` and `cpu` run on the CPU; `cuda` only where
 * a GPU is usable and SPARSELLM_CUDA_UNVERIFIED=1 is set, since the CUDA model runtime has not
 * yet run on a GPU (the policy of native/src/cuda/kernel_policy.h). Throws a UsageError saying
 * why otherwise.
 */
export function resolveModelBackend(asked: 'auto' | 'cpu' | 'cuda', env: NodeJS.ProcessEnv = process.env): ModelBackend {
  if (asked !== 'cuda') return 'cpu';
  const cuda = engine().buildInfo().cuda;
  if (!cuda.compiled || !cuda.usable || !(engine() as ModelAddon).CudaModel) {
    const why = cuda.compiled ? cuda.reason : `this build has no CUDA backend (${cuda.reason})`;
    throw new UsageError(`--backend cuda: the CUDA model runtime needs a usable GPU: ${why}; use --backend cpu`);
  }
  if (env.SPARSELLM_CUDA_UNVERIFIED !== '1') {
    throw new UsageError('--backend cuda: the CUDA model runtime has not yet been verified on a GPU; set SPARSELLM_CUDA_UNVERIFIED=1 to run it');
  }
  return 'cuda';
}
/** FFN activity of one layer, measured over the tokens run since the last resetActivity(). */
export interface LayerActivity {
  layer: number;
  dFF: number;
  /** Tokens whose non-zeros were counted. */
  tokens: number;
  /** Mean non-zero hidden units per token (null when nothing was counted). */
  nnzMean: number | null;
  nnzMax: number;
  /** TwELL tiles over capacity (recomputed exactly through the dense fallback). */
  overflowTiles: number;
  overflowRows: number;
  sparseCalls: number;
  denseCalls: number;
  /** Decode calls whose ReLU gate was screened by its int8 copy (docs/runtime.md "Screened gate"). */
  gateScreenedCalls: number;
  /** Mean gate rows per screened call read exactly after the screen (null when none screened). */
  gateCandidatesMean: number | null;
}

/** Steps of a forward pass in the wall-time profile (ModelRuntime.setProfiling), in order. */
export const MODEL_STEPS = ['embed', 'norms', 'qkv', 'rope', 'kvStore', 'attention', 'oProj', 'residual', 'ffn', 'head'] as const;
export type ModelStepName = (typeof MODEL_STEPS)[number];

/** Wall seconds per step while profiling, over `tokens` tokens in `calls` forward calls. */
export interface StepTimes {
  seconds: Record<ModelStepName, number>;
  tokens: number;
  calls: number;
}

interface NativeModel {
  forward(tokens: Int32Array, allLogits: boolean, mode: FfnRunMode): Float32Array;
  /** CPU backend only. */
  setProfiling?(on: boolean): void;
  /** CPU backend only: the KV cache's element (empties the cache). */
  setKvCache?(dtype: KvCacheDtype): void;
  stepTimes?(): StepTimes;
  reset(): void;
  position(): number;
  activity(): { tokens: number; nnz: number; maxRowNnz: number; overflowTiles: number; overflowRows: number; sparseCalls: number; denseCalls: number; gateScreenedCalls: number; gateCandidateRows: number }[];
  resetActivity(): void;
  setFfnObserver(fn: FfnObserver | null): void;
  close(): void;
}

/**
 * Receives, after each layer's FFN, that call's activations: act [T, F] = act(pre) before any
 * threshold, and hidden [T, F] = the hidden units W_down consumes (row-major, fresh copies).
 */
export type FfnObserver = (layer: number, T: number, F: number, act: Float32Array, hidden: Float32Array) => void;

type NativeModelCtor = new (path: string, spec: ModelSpec, layers: readonly PackedLayer[], tensors: Record<string, { offset: number; bytes: number; dtype: string; shape: number[] }>, context: number, weights?: 'map' | 'resident') => NativeModel;
type ModelAddon = NativeAddon & {
  Model: NativeModelCtor;
  /** Builds with the CUDA backend only (native/src/addon/cuda_model_binding.cpp). */
  CudaModel?: NativeModelCtor;
};

export interface LoadOptions {
  /** KV-cache positions (default: `defaultContext` capped at the model's maximum, else the maximum). */
  context?: number;
  defaultContext?: number;
  /** Called with a one-line notice (e.g. when a dense checkpoint is packed on the fly). */
  onNotice?: (text: string) => void;
  /** Storage dtype when packing a dense checkpoint on the fly (default BF16). */
  dtype?: StorageDType;
  /** Where the model runs (default cpu); see resolveModelBackend for when cuda is allowed. */
  backend?: ModelBackend;
  /**
   * CPU backend: 'resident' (default) reads the weights once into memory advised for huge pages
   * (faster decode: scattered reads of the sparse path miss the TLB far less); 'mmap' maps the
   * file instead (quicker to open, pages shared with other processes). The CUDA backend always
   * maps (the weights are uploaded to the device).
   */
  weights?: WeightResidency;
  /**
   * The KV cache's element (CPU backend): 'f32' (default) or 'bf16' (half the cache's memory and
   * of the bytes attention reads; keys and values rounded to bf16 as they are stored).
   */
  kvCache?: KvCacheDtype;
}

/** The KV cache's element (LoadOptions.kvCache). */
export type KvCacheDtype = 'f32' | 'bf16';

/** How a model's weights sit in host memory (LoadOptions.weights). */
export type WeightResidency = 'resident' | 'mmap';

export class ModelRuntime {
  private closed = false;
  private constructor(
    private readonly native: NativeModel,
    readonly spec: ModelSpec,
    readonly layers: readonly PackedLayer[],
    readonly tokenizer: Tokenizer | undefined,
    readonly context: number,
    readonly path: string,
    /** Bytes of the mapped weights file. */
    readonly weightsBytes: number,
    readonly storageDtype: StorageDType,
    /** True when the model came from a dense checkpoint packed on the fly. */
    readonly packedOnTheFly: boolean,
    readonly backend: ModelBackend,
    /** The KV cache's element. */
    readonly kvCache: KvCacheDtype,
  ) {}

  /** Opens a packed .sllm file, or packs a dense checkpoint (directory or .safetensors) on the fly. */
  static async load(path: string, opts: LoadOptions = {}): Promise<ModelRuntime> {
    const st = await stat(path);
    if (st.isDirectory() || path.endsWith('.safetensors') || path.endsWith('.index.json')) {
      const ckpt = await openCheckpoint(path);
      const dir = await mkdtemp(join(tmpdir(), 'sparsellm-'));
      const tmp = join(dir, 'model.sllm');
      try {
        opts.onNotice?.(`packing dense checkpoint ${path} on the fly (not saved; \`sparsellm pack\` keeps a .sllm file)`);
        const input = await packInputFromCheckpoint(ckpt);
        await writePacked(input, tmp, { dtype: opts.dtype ?? 'BF16', force: true });
        await ckpt.close();
        // Once mapped, the file can go: the mapping keeps its pages.
        return await ModelRuntime.open(tmp, opts, true, path);
      } finally {
        await ckpt.close().catch(() => undefined);
        await rm(dir, { recursive: true, force: true });
      }
    }
    return ModelRuntime.open(path, opts, false, path);
  }

  private static async open(file: string, opts: LoadOptions, onTheFly: boolean, shownPath: string): Promise<ModelRuntime> {
    const pm = await openPacked(file);
    try {
      const spec = pm.spec;
      // Sliding-window attention (mistral) equals full attention while the context fits the
      // window; beyond it the runtime would be wrong, so the context is capped there.
      const limit = Math.min(spec.maxPositions, spec.slidingWindow ?? Infinity);
      const context = opts.context ?? Math.min(opts.defaultContext ?? limit, limit);
      if (spec.slidingWindow !== undefined && context > spec.slidingWindow) {
        throw new UsageError(`--context ${context} exceeds the model's sliding attention window (${spec.slidingWindow} tokens), which this runtime does not implement; use --context ${spec.slidingWindow} or less`);
      }
      if (!Number.isInteger(context) || context < 1 || context > spec.maxPositions) {
        throw new UsageError(`--context must be in [1, ${spec.maxPositions}] for this model (its maximum), got ${context}`);
      }
      const tokenizer = await loadPackedTokenizer(pm, shownPath);
      // A tokenizer with more ids than the model is allowed (ids past the model's vocabulary are
      // refused when fed, and never sampled).
      const tensors: Record<string, { offset: number; bytes: number; dtype: string; shape: number[] }> = {};
      for (const name of pm.tensorNames()) {
        const t = pm.tensor(name);
        tensors[name] = { offset: t.offset, bytes: t.bytes, dtype: t.dtype, shape: t.shape };
      }
      const addon = engine() as ModelAddon;
      const backend = opts.backend ?? 'cpu';
      const Ctor = backend === 'cuda' ? addon.CudaModel : addon.Model;
      if (!Ctor) throw new SparseLlmError('this build has no CUDA model runtime (the addon was built without nvcc); use the cpu backend');
      const kvCache = opts.kvCache ?? 'f32';
      if (kvCache !== 'f32' && backend !== 'cpu') throw new UsageError(`--kv-cache ${kvCache} is available on the cpu backend only (the ${backend} runtime keeps an f32 cache)`);
      let native: NativeModel;
      try {
        const weights = backend === 'cpu' && (opts.weights ?? 'resident') === 'resident' ? 'resident' : 'map';
        native = new Ctor(file, spec, pm.layers, tensors, context, weights);
        if (kvCache !== 'f32') native.setKvCache!(kvCache);
      } catch (e) {
        throw new SparseLlmError(onTheFly ? `${shownPath}: ${(e as Error).message}` : (e as Error).message);
      }
      return new ModelRuntime(native, spec, pm.layers, tokenizer, context, shownPath, pm.fileSize, pm.storageDtype, onTheFly, backend, kvCache);
    } finally {
      await pm.close();
    }
  }

  private live(): NativeModel {
    if (this.closed) throw new SparseLlmError('model runtime used after close()');
    return this.native;
  }

  /** Tokens already in the KV cache (the position of the next token). */
  get position(): number {
    return this.live().position();
  }

  /**
   * Runs `tokens` after what the cache holds and appends them to it. Returns the logits of the
   * last token ([vocab]) or, with allLogits, of every token ([T · vocab], row-major).
   */
  forward(tokens: readonly number[] | Int32Array, opts: { allLogits?: boolean; mode?: FfnRunMode } = {}): Float32Array {
    const ids = tokens instanceof Int32Array ? tokens : Int32Array.from(tokens);
    if (ids.length === 0) throw new UsageError('no tokens to run');
    const pos = this.position;
    if (pos + ids.length > this.context) {
      throw new UsageError(`${pos + ids.length} tokens do not fit the context of ${this.context} positions`);
    }
    for (const id of ids) {
      if (!(id >= 0 && id < this.spec.vocabSize)) throw new UsageError(`token id ${id} is outside the model's vocabulary (${this.spec.vocabSize})`);
    }
    return this.live().forward(ids, !!opts.allLogits, opts.mode ?? 'auto');
  }

  /** Empties the KV cache. */
  reset(): void {
    this.live().reset();
  }

  activity(): LayerActivity[] {
    return this.live()
      .activity()
      .map((a, i) => ({
        layer: i,
        dFF: this.spec.dFF[i]!,
        tokens: a.tokens,
        nnzMean: a.tokens > 0 ? a.nnz / a.tokens : null,
        nnzMax: a.maxRowNnz,
        overflowTiles: a.overflowTiles,
        overflowRows: a.overflowRows,
        sparseCalls: a.sparseCalls,
        denseCalls: a.denseCalls,
        gateScreenedCalls: a.gateScreenedCalls,
        gateCandidatesMean: a.gateScreenedCalls > 0 ? a.gateCandidateRows / a.gateScreenedCalls : null,
      }));
  }

  resetActivity(): void {
    this.live().resetActivity();
  }

  /** Whether this backend can time the steps of a forward (setProfiling). */
  get canProfile(): boolean {
    return typeof this.live().setProfiling === 'function';
  }

  /**
   * Times each step of every forward from now on (or stops): a clock read per step and layer.
   * The times accumulate until resetActivity(). CPU backend only.
   */
  setProfiling(on: boolean): void {
    const n = this.live();
    if (!n.setProfiling) throw new UsageError(`step timing is not available on the ${this.backend} backend`);
    n.setProfiling(on);
  }

  /** Wall seconds per step since the last resetActivity() while profiling (zeros when not). */
  stepTimes(): StepTimes {
    const n = this.live();
    if (!n.stepTimes) throw new UsageError(`step timing is not available on the ${this.backend} backend`);
    return n.stepTimes();
  }

  /**
   * Calibration hook: while set, every FFN runs its dense path and `fn` sees its activations
   * (see FfnObserver). An exception thrown by `fn` fails the forward. null removes it.
   */
  setFfnObserver(fn: FfnObserver | null): void {
    this.live().setFfnObserver(fn);
  }

  /** Unmaps the weights and frees the cache. */
  close(): void {
    if (this.closed) return;
    this.native.close();
    this.closed = true;
  }
}

async function loadPackedTokenizer(pm: PackedModel, shownPath: string): Promise<Tokenizer | undefined> {
  const info = pm.tokenizer;
  if (info.kind === 'byte') return new ByteTokenizer();
  if (info.kind === 'none') return undefined;
  const json = await pm.tokenizerJson();
  const cfgBytes = await pm.tokenizerConfigJson();
  let config: Record<string, unknown> = {};
  if (cfgBytes) {
    try {
      config = JSON.parse(Buffer.from(cfgBytes).toString('utf8')) as Record<string, unknown>;
    } catch {
      config = {};
    }
  }
  return tokenizerFromJsonBytes(json!, shownPath, config, pm.spec.eosTokenId);
}
