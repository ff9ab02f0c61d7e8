// Runs the case table on an engine: builds the inputs, checks the kernels' own counts, times every
// implementation of a case in interleaved rounds, and derives speedups, GFLOP/s and byte counts.
import {
  type BenchCase,
  type FfnShape,
  type WeightDType,
  denseEquivalentFlops,
  matrixBytes,
  targetFraction,
  usefulFlops,
} from './cases.js';
import {
  type FfnWeights,
  generateActivations,
  generateFfnWeights,
  generateGradOutput,
  reluProjection,
  toBf16Weights,
  deriveSeed,
} from './inputs.js';
import { pairedSpeedup, summarize } from './stats.js';
import type { BenchEngine, BenchFfnLayer, CaseResult, ImplResult, NativeTiming, OpenBlasInfo } from './types.js';

export interface RunOptions {
  /** Timed rounds per case (each implementation gives one sample per round). */
  repeats: number;
  /** Untimed calls of each implementation before its first timed round (at least one is made). */
  warmup: number;
  /** Rounds are cut (to no fewer than 3) when a case would take longer than this (default 20 s). */
  caseBudgetMs?: number;
  seed: number;
  /** A sample repeats the call back to back until it lasts about this long (default 20 ms). */
  minSampleMs?: number;
  heavyFraction?: number;
  heavyScale?: number;
  /** Adds OpenBLAS sgemm next to our GEMM in the gemm cases (as their baseline). */
  baseline?: 'openblas';
  /** Called before each case (for progress). */
  onCase?: (c: BenchCase, index: number, total: number) => void;
}

/** Gives the event loop a turn (so a spinner can redraw between blocking native calls). */
const yieldToLoop = (): Promise<void> => new Promise((r) => setImmediate(r));

interface Timed {
  name: string;
  run: (repeats: number, warmup: number) => NativeTiming;
}

interface Measured {
  name: string;
  samples: number[];
  inner: number;
}

/**
 * Times implementations of one case in rounds. Each implementation first runs max(1, warmup)
 * untimed calls; the last of them (and, under 50 ms, the fastest of four more) is timed to size
 * the samples (how many back-to-back calls make one). Then `repeats` rounds each take one sample of every implementation, the order rotating so
 * that no implementation always runs right after the same one. A case whose rounds would take
 * longer than `budgetMs` in all gets fewer rounds (never under 3, never more than asked).
 */
async function measure(impls: Timed[], repeats: number, warmup: number, minSampleMs: number, budgetMs: number): Promise<Measured[]> {
  const inner: number[] = [];
  let roundMs = 0;
  for (const impl of impls) {
    let t = impl.run(1, Math.max(0, warmup - 1)).medianMs;
    // A short call is sized from the fastest of a few more, so that one call slowed down by a
    // busy machine does not leave its samples a single call long.
    if (t < 50) t = Math.min(t, impl.run(4, 0).minMs);
    t = Math.max(t, 1e-3);
    const k = Math.min(256, Math.max(1, Math.ceil(minSampleMs / t)));
    inner.push(k);
    roundMs += k * t;
    await yieldToLoop();
  }
  const rounds = Math.min(repeats, Math.max(3, Math.floor(budgetMs / roundMs)));
  const samples: number[][] = impls.map(() => []);
  for (let r = 0; r < rounds; r++) {
    for (let k = 0; k < impls.length; k++) {
      const i = (k + r) % impls.length;
      samples[i]!.push(impls[i]!.run(inner[i]!, 0).medianMs);
      await yieldToLoop();
    }
  }
  return impls.map((impl, i) => ({ name: impl.name, samples: samples[i]!, inner: inner[i]! }));
}

function implResults(ms: Measured[], baseline: string, flops: number): ImplResult[] {
  const base = ms.find((m) => m.name === baseline);
  if (!base) throw new Error(`baseline '${baseline}' was not measured`);
  return ms.map((m) => {
    const s = summarize(m.samples);
    return {
      impl: m.name,
      ms: s,
      samples: m.samples,
      inner: m.inner,
      gflops: flops / (s.median * 1e-3) / 1e9,
      speedup: m === base ? 1 : pairedSpeedup(base.samples, m.samples),
    };
  });
}

/** Weights (f32 values, generated once per shape) and layers (built once per shape and dtype). */
class Fixtures {
  private readonly weights = new Map<string, FfnWeights>();
  private readonly layers = new Map<string, { layer: BenchFfnLayer; weights: FfnWeights }>();
  constructor(private readonly engine: BenchEngine, private readonly seed: number) {}

  private shapeKey(s: FfnShape): string {
    return `${s.dModel}x${s.dFF}${s.gated ? 'g' : 'p'}`;
  }

  weightsFor(shape: FfnShape, dtype: WeightDType): FfnWeights {
    const key = this.shapeKey(shape);
    let w = this.weights.get(key);
    if (!w) {
      w = generateFfnWeights(shape, 'f32', { seed: this.seed });
      this.weights.set(key, w);
    }
    return dtype === 'bf16' ? toBf16Weights(w) : w;
  }

  layerFor(shape: FfnShape, dtype: WeightDType): { layer: BenchFfnLayer; weights: FfnWeights } {
    const key = `${this.shapeKey(shape)} ${dtype}`;
    let l = this.layers.get(key);
    if (!l) {
      const weights = this.weightsFor(shape, dtype);
      l = { layer: this.engine.createFfn(weights), weights };
      this.layers.set(key, l);
    }
    return l;
  }
}

/**
 * Neurons active in at least one row, from the engine's dense product of the ReLU'd projection
 * (undefined when the engine has no plain GEMM entry point).
 */
function unionActive(engine: BenchEngine, w: FfnWeights, x: Float32Array, tokens: number): number | undefined {
  if (!engine.gemmProduct) return undefined;
  const { dModel: d, dFF: F } = w.shape;
  const pre = engine.gemmProduct(x, tokens, reluProjection(w), F, d, w.dtype);
  const active = new Uint8Array(F);
  for (let t = 0; t < tokens; t++) {
    const row = t * F;
    for (let j = 0; j < F; j++) if (pre[row + j]! > 0) active[j] = 1;
  }
  let n = 0;
  for (let j = 0; j < F; j++) n += active[j]!;
  return n;
}

/** Runs every case in order; throws on the first engine error. */
export async function runCases(engine: BenchEngine, cases: readonly BenchCase[], opts: RunOptions): Promise<CaseResult[]> {
  const fixtures = new Fixtures(engine, opts.seed);
  const minSampleMs = opts.minSampleMs ?? 20;
  const budgetMs = opts.caseBudgetMs ?? 20_000;
  const results: CaseResult[] = [];
  for (let i = 0; i < cases.length; i++) {
    const c = cases[i]!;
    opts.onCase?.(c, i, cases.length);
    await yieldToLoop();
    const common = { case: c, backend: engine.backend, isa: engine.isa, threads: engine.threads };
    if (c.op === 'gemm') {
      results.push(await runGemm(engine, c, common, opts, minSampleMs));
      continue;
    }
    const { layer, weights } = fixtures.layerFor(c.shape, c.dtype);
    const target = targetFraction(c.density!, c.shape.dFF);
    const act = generateActivations(weights, c.tokens, target, {
      seed: deriveSeed(opts.seed, c.id),
      heavyFraction: opts.heavyFraction,
      heavyScale: opts.heavyScale,
    });
    const M = c.tokens;
    const { x } = act;
    const nMat = c.shape.gated ? 3 : 2;
    const dense = nMat * matrixBytes(c.shape, c.dtype);
    const rowBytes = (c.dtype === 'bf16' ? 2 : 4) * c.shape.dModel * (c.shape.gated ? 2 : 1);
    const union = unionActive(engine, weights, x, M);
    const sparseBytes = (tail: boolean): number | undefined =>
      tail ? dense : union === undefined ? undefined : matrixBytes(c.shape, c.dtype) + union * rowBytes;

    if (c.op === 'ffn-forward') {
      const sparse = layer.forwardStats(x, M, 'sparse');
      const ms = await measure(
        (['dense', 'sparse', 'auto'] as const).map((mode) => ({
          name: mode,
          run: (rep: number, warm: number) => layer.timeForward(x, M, mode, rep, warm),
        })),
        opts.repeats,
        opts.warmup,
        minSampleMs,
        budgetMs,
      );
      // Auto remembers its last decision per layer: report the path it takes after the timed
      // calls, which is the one they ran (a call before timing can still be deciding).
      const auto = layer.forwardStats(x, M, 'auto');
      const impls = implResults(ms, 'dense', denseEquivalentFlops(c));
      for (const r of impls) {
        const path = r.impl === 'auto' ? auto.path : r.impl;
        r.path = path;
        r.weightBytes = path === 'dense' ? dense : sparseBytes(false);
      }
      results.push({
        ...common,
        baseline: 'dense',
        impls,
        measured: {
          nnzPerToken: sparse.nnz / M,
          maxRowNnz: sparse.maxRowNnz,
          density: sparse.nnz / (M * c.shape.dFF),
          unionActive: union,
        },
        overflow: { tiles: sparse.overflowTiles, rows: sparse.overflowRows },
        flops: { denseEquivalent: denseEquivalentFlops(c), useful: usefulFlops(c, sparse.nnz) },
      });
    } else {
      const dy = generateGradOutput(M, c.shape.dModel, deriveSeed(opts.seed, `dy ${c.id}`));
      const hybrid = layer.trainStats(x, dy, M, 'hybrid');
      const denseStats = layer.trainStats(x, dy, M, 'dense');
      const ms = await measure(
        (['dense', 'hybrid'] as const).map((mode) => ({
          name: mode,
          run: (rep: number, warm: number) => layer.timeTrain(x, dy, M, mode, rep, warm),
        })),
        opts.repeats,
        opts.warmup,
        minSampleMs,
        budgetMs,
      );
      const impls = implResults(ms, 'dense', denseEquivalentFlops(c));
      for (const r of impls) {
        r.path = r.impl;
        r.savedBytes = r.impl === 'dense' ? denseStats.savedBytes : hybrid.savedBytes;
        r.weightBytes = r.impl === 'dense' ? dense : sparseBytes(hybrid.tailRows > 0);
      }
      results.push({
        ...common,
        baseline: 'dense',
        impls,
        measured: {
          nnzPerToken: hybrid.nnz / M,
          maxRowNnz: Number.NaN,
          density: hybrid.nnz / (M * c.shape.dFF),
          unionActive: union,
        },
        tailRows: hybrid.tailRows,
        flops: { denseEquivalent: denseEquivalentFlops(c), useful: usefulFlops(c, hybrid.nnz) },
      });
    }
  }
  return results;
}

async function runGemm(
  engine: BenchEngine,
  c: BenchCase,
  common: Pick<CaseResult, 'case' | 'backend' | 'isa' | 'threads'>,
  opts: RunOptions,
  minSampleMs: number,
): Promise<CaseResult> {
  const M = c.tokens, K = c.shape.dModel, N = c.shape.dFF;
  const blas: OpenBlasInfo = opts.baseline === 'openblas' ? engine.openblas() : { available: false };
  if (opts.baseline === 'openblas' && !blas.available) throw new Error('OpenBLAS is not available');
  const names = blas.available ? (['openblas', 'ours'] as const) : (['ours'] as const);
  const ms = await measure(
    names.map((impl) => ({ name: impl, run: (rep: number, warm: number) => engine.timeGemm(M, K, N, c.dtype, impl, rep, warm) })),
    opts.repeats,
    opts.warmup,
    minSampleMs,
    opts.caseBudgetMs ?? 20_000,
  );
  const baseline = blas.available ? 'openblas' : 'ours';
  const impls = implResults(ms, baseline, denseEquivalentFlops(c));
  for (const r of impls) {
    r.path = r.impl;
    r.weightBytes = r.impl === 'openblas' ? matrixBytes(c.shape, 'f32') : matrixBytes(c.shape, c.dtype);
  }
  const notes: string[] = [];
  if (blas.available) notes.push(`OpenBLAS ${blas.coreName ?? 'core unknown'}`);
  return { ...common, baseline, impls, flops: { denseEquivalent: denseEquivalentFlops(c) }, notes };
}
