// `prune` as a library: calibrate a model on text, then (optionally) drop the neurons that never
// fire, set per-layer activation thresholds for non-ReLU models, choose TwELL parameters from the
// measured per-tile maxima, and write the result as a packed model or a dense checkpoint. The
// pruned model is measured before it is written: a second calibration pass on it gives the
// sparsity reached and the tile maxima of its final layout, and held-out perplexity is taken on
// the model before and after.
import { mkdtemp, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { calibrate } from '../calibrate/run.js';
import { LayerStats, type LayerSummary, type TileWidth } from '../calibrate/stats.js';
import { tokenizeText } from '../calibrate/text.js';
import { chooseTwell, DEFAULT_COVERAGE, DEFAULT_HEADROOM, type TwellChoice } from '../calibrate/twell.js';
import { SparseLlmError, UsageError } from '../errors.js';
import { checkOutputPath } from '../format/writer.js';
import { FILE_EXTENSION, type LayerCalibration, type StorageDType } from '../format/metadata.js';
import { perplexity, type PerplexityResult } from '../model/generate.js';
import { ModelRuntime } from '../model/runtime.js';
import { ByteTokenizer, loadTokenizerDir, tokenizerFromJsonBytes, type Tokenizer } from '../tokenizer/index.js';
import { planLayer, type LayerPlan } from './plan.js';
import { checkOutputDir, prunedLayers, writePrunedDense, writePrunedPacked } from './output.js';
import { openPruneSource, type PruneSource } from './source.js';

export { openPruneSource, readPruneSidecar, PRUNE_SIDECAR } from './source.js';
export type { PruneSource, LayerState, PruneSidecar } from './source.js';
export { composeNeuronMap, planLayer, prunedSpec } from './plan.js';
export type { LayerPlan } from './plan.js';

/** Below this many calibration tokens the statistics are flagged as thin. */
export const MIN_MEANINGFUL_TOKENS = 2048;
export const DEFAULT_CALIBRATION_TOKENS = 16384;
export const DEFAULT_EVAL_TOKENS = 4096;

export interface PruneOptions {
  /** Calibration text: files or directories. */
  text: string[];
  /** Calibration tokens (the first N of the text). */
  tokens?: number;
  /** Tokens per calibration / evaluation window (default min(512, the model's maximum)). */
  context?: number;
  /** Held-out text; default: the text that follows the calibration tokens. */
  evalText?: string[];
  evalTokens?: number;
  dropDead?: boolean;
  targetSparsity?: number;
  /** One cut-off for every layer, or one per layer. */
  thresholds?: number[];
  twellHeadroom?: number;
  /** Fraction of (token, tile) pairs the TwELL capacity must hold before headroom (default 0.999; 1 = the maximum). */
  twellCoverage?: number;
  /** A .sllm file (packed) or a directory (dense Hugging Face checkpoint). */
  output?: string;
  /** Storage dtype of a packed output (default: BF16, or the packed source's). */
  dtype?: StorageDType;
  force?: boolean;
  /** A tokenizer.json file, a directory holding one, or "byte"; default: the model's own. */
  tokenizer?: string;
  /** Write per-neuron statistics of the input model to this CSV file. */
  neuronStats?: string;
  toolVersion?: string;
  onNotice?: (text: string) => void;
  onWarning?: (text: string) => void;
  /** A progress sink: returns a ticker for `total` items. */
  onProgress?: (label: string, total: number) => { tick(n: number): void; finish(summary?: string): void };
}

export interface LayerReport {
  layer: number;
  activation: string;
  /** Width before → after. */
  dFFIn: number;
  dFFOut: number;
  sourceDFF: number;
  /** Neurons removed in this run. */
  removed: number;
  thresholdIn: number | null;
  threshold: number | null;
  /** Calibration statistics of the input model (at its own threshold). */
  before: LayerSummary;
  /** Statistics of the output model on the same text (null when nothing changed and no output). */
  after: LayerSummary | null;
  /** Sparsity reached relative to the input width: 1 − nnzMean(after) / dFFIn. */
  sparsityReached: number | null;
  twell: TwellChoice;
}

export interface PruneReport {
  model: string;
  kind: 'dense' | 'packed';
  architecture: string;
  activation: string;
  calibration: { files: string[]; tokens: number; requested: number; context: number; windows: number; seconds: number };
  heldOut: { source: 'eval' | 'tail' | 'none'; tokens: number };
  perplexityBefore: PerplexityResult | null;
  perplexityAfter: PerplexityResult | null;
  /** Largest |logit difference| between input and output on the first calibration window. */
  calibrationLogitMaxDiff: number | null;
  /** The same, relative to the largest |logit| of that window. */
  calibrationLogitRelDiff: number | null;
  dropDead: boolean;
  targetSparsity: number | null;
  layers: LayerReport[];
  totals: { dFFIn: number; dFFOut: number; removed: number; sparsityBefore: number; sparsityAfter: number | null };
  output: { path: string; format: 'packed' | 'dense'; bytes: number; dtype: string | null } | null;
  warnings: string[];
}

async function resolveTokenizer(arg: string | undefined, rt: ModelRuntime, eosId: number | undefined): Promise<Tokenizer> {
  if (arg === undefined) {
    if (!rt.tokenizer) {
      throw new UsageError(`${rt.path}: the model has no tokenizer; give one with --tokenizer <tokenizer.json | directory | byte>`);
    }
    return rt.tokenizer;
  }
  if (arg === 'byte') return new ByteTokenizer();
  let st;
  try {
    st = await stat(arg);
  } catch {
    throw new UsageError(`--tokenizer: ${arg}: no such file or directory`);
  }
  if (st.isDirectory()) {
    const t = loadTokenizerDir(arg, eosId);
    if (!t) throw new UsageError(`--tokenizer: ${arg} has no tokenizer.json`);
    return t;
  }
  return tokenizerFromJsonBytes(new Uint8Array(await readFile(arg)), arg, {}, eosId);
}

function checkOptions(o: PruneOptions): void {
  if (o.targetSparsity !== undefined && o.thresholds !== undefined) throw new UsageError('--target-sparsity and --thresholds are exclusive');
  if (o.targetSparsity !== undefined && !(o.targetSparsity > 0 && o.targetSparsity < 1)) {
    throw new UsageError(`--target-sparsity must be in (0, 1), got ${o.targetSparsity}`);
  }
  if (o.thresholds?.some((t) => !(Number.isFinite(t) && t >= 0))) throw new UsageError('--thresholds must be numbers >= 0');
  if (o.tokens !== undefined && !(Number.isInteger(o.tokens) && o.tokens >= 1)) throw new UsageError('--tokens must be a positive integer');
  if (o.twellHeadroom !== undefined && !(o.twellHeadroom >= 1)) throw new UsageError('--twell-headroom must be >= 1');
  if (o.twellCoverage !== undefined && !(o.twellCoverage > 0 && o.twellCoverage <= 1)) throw new UsageError('--twell-coverage must be in (0, 1]');
}

/** Whether `out` names a packed file (by extension) rather than a checkpoint directory. */
export const isPackedOutput = (out: string): boolean => out.endsWith(FILE_EXTENSION);

export async function prune(modelPath: string, o: PruneOptions): Promise<PruneReport> {
  checkOptions(o);
  const warnings: string[] = [];
  const warn = (s: string) => {
    warnings.push(s);
    o.onWarning?.(s);
  };
  if (o.output) {
    if (isPackedOutput(o.output)) await checkOutputPath(o.output, !!o.force);
    else await checkOutputDir(o.output, !!o.force);
  }
  const src = await openPruneSource(modelPath);
  const tmpDir = await mkdtemp(join(tmpdir(), 'sparsellm-prune-'));
  let before: ModelRuntime | undefined;
  let after: ModelRuntime | undefined;
  try {
    const spec = src.spec;
    if (o.output && !isPackedOutput(o.output) && src.kind === 'packed') {
      throw new UsageError(`${modelPath}: a packed model can only be pruned into a packed model (-o name${FILE_EXTENSION})`);
    }
    const isRelu = spec.activation === 'relu';
    const wantThresholds = o.targetSparsity !== undefined || o.thresholds !== undefined;
    if (wantThresholds && isRelu) {
      throw new UsageError(`${modelPath}: the FFN activation is ReLU, already exactly sparse; thresholds are for silu/gelu models (use --drop-dead to remove dead neurons)`);
    }
    if (o.thresholds && o.thresholds.length !== 1 && o.thresholds.length !== spec.nLayers) {
      throw new UsageError(`--thresholds: give one value or ${spec.nLayers} (one per layer), got ${o.thresholds.length}`);
    }
    if (o.dropDead && !isRelu && !wantThresholds && src.layers.every((l) => l.threshold === null)) {
      warn(`the ${spec.activation} activation is never exactly zero: without thresholds no neuron is dead (add --target-sparsity or --thresholds)`);
    }
    const window = o.context ?? Math.min(512, spec.maxPositions);
    if (!(Number.isInteger(window) && window >= 2 && window <= spec.maxPositions)) {
      throw new UsageError(`--context must be in [2, ${spec.maxPositions}] for this model, got ${window}`);
    }

    // The input model, exact: dense checkpoints are packed on the fly in f32.
    before = await ModelRuntime.load(modelPath, { context: window, dtype: 'F32' });
    const tok = await resolveTokenizer(o.tokenizer, before, spec.eosTokenId);
    if (tok.vocabSize > spec.vocabSize) {
      throw new SparseLlmError(`the tokenizer has ${tok.vocabSize} ids but the model only ${spec.vocabSize}: it is not this model's tokenizer`);
    }
    if (o.tokenizer !== undefined && before.tokenizer) warn(`--tokenizer overrides the tokenizer stored with the model`);
    if (tok.vocabSize < spec.vocabSize / 2) {
      warn(`the tokenizer covers only ${tok.vocabSize} of the model's ${spec.vocabSize} ids: check that it is the model's tokenizer`);
    }

    // Text.
    const requested = o.tokens ?? DEFAULT_CALIBRATION_TOKENS;
    const evalTokens = o.evalTokens ?? DEFAULT_EVAL_TOKENS;
    const calibText = await tokenizeText(o.text, tok, '--text', o.evalText ? requested : requested + evalTokens);
    const calibIds = calibText.ids.slice(0, requested);
    if (calibIds.length < 2) throw new UsageError(`the calibration text has ${calibIds.length} token(s); at least 2 are needed`);
    if (calibIds.length < requested || calibIds.length < MIN_MEANINGFUL_TOKENS) {
      warn(
        `the calibration text has only ${calibIds.length} tokens` +
          (calibIds.length < requested ? ` (--tokens ${requested} requested)` : '') +
          (calibIds.length < MIN_MEANINGFUL_TOKENS ? `; under ${MIN_MEANINGFUL_TOKENS} the statistics are thin (rarely firing neurons may look dead)` : ''),
      );
    }
    let evalIds: number[] = [];
    let heldOutSource: 'eval' | 'tail' | 'none' = 'none';
    if (o.evalText) {
      evalIds = (await tokenizeText(o.evalText, tok, '--eval', evalTokens)).ids.slice(0, evalTokens);
      heldOutSource = 'eval';
    } else if (calibText.ids.length > requested + 1) {
      evalIds = calibText.ids.slice(requested, requested + evalTokens);
      heldOutSource = 'tail';
    }
    if (evalIds.length < 2) {
      heldOutSource = 'none';
      evalIds = [];
      o.onNotice?.('no held-out text (give --eval, or more text than --tokens): perplexity is not measured');
    }

    // Pass 1: the input model.
    const t0 = performance.now();
    const bar1 = o.onProgress?.('calibrating', calibIds.length);
    const stats1 = calibrate(before, calibIds, { context: window, onWindow: (n) => bar1?.tick(n) });
    const calSeconds = (performance.now() - t0) / 1000;
    bar1?.finish(`calibrated on ${calibIds.length} tokens in ${calSeconds.toFixed(1)}s`);
    const sum1 = stats1.map((s, i) => s.summary(i));
    if (o.neuronStats) await writeNeuronStats(o.neuronStats, stats1, src);

    let pplBefore: PerplexityResult | null = null;
    if (evalIds.length) {
      const bar = o.onProgress?.('perplexity (input)', evalIds.length);
      pplBefore = perplexity(before, evalIds, Math.min(window, before.context), 'auto', (n) => bar?.tick(n));
      bar?.finish(`held-out perplexity of the input ${pplBefore.perplexity.toFixed(4)} over ${pplBefore.tokens} tokens`);
    }

    // Thresholds.
    const thrOut: (number | null)[] = src.layers.map((l, i) => {
      if (o.thresholds) return o.thresholds.length === 1 ? o.thresholds[0]! : o.thresholds[i]!;
      if (o.targetSparsity !== undefined) return stats1[i]!.thresholdFor(o.targetSparsity);
      return l.threshold;
    });

    // Keep lists.
    const plans: LayerPlan[] = src.layers.map((l, i) => {
      const s = stats1[i]!;
      let keep: Int32Array;
      if (o.dropDead) {
        const thr = thrOut[i] ?? 0;
        const kept: number[] = [];
        for (let j = 0; j < s.F; j++) if (s.maxAbsAct[j]! > thr) kept.push(j);
        if (!kept.length) {
          // Every neuron is dead: keep the strongest one (a layer needs dFF >= 1; it stays silent).
          let best = 0;
          for (let j = 1; j < s.F; j++) if (s.maxAbsAct[j]! > s.maxAbsAct[best]!) best = j;
          kept.push(best);
          warn(`layer ${i}: no neuron fires on the calibration text; one (silent) neuron is kept`);
        }
        keep = Int32Array.from(kept);
      } else keep = Int32Array.from({ length: s.F }, (_, j) => j);
      return planLayer(l, keep, thrOut[i]!);
    });
    const changed = plans.some((p, i) => p.keep.length !== p.inDFF || p.threshold !== src.layers[i]!.threshold);

    // The output model, measured: an exact (f32 / source dtype) packed copy in a temp directory.
    let stats2: LayerStats[] | null = null;
    let pplAfter: PerplexityResult | null = null;
    let logitDiff: number | null = null;
    let logitRel: number | null = null;
    if (changed || o.output) {
      const firstWin = calibIds.slice(0, Math.min(window, calibIds.length));
      before.reset();
      const logitsBefore = before.forward(firstWin, { allLogits: true, mode: 'dense' });
      before.close();
      before = undefined;
      const measureDtype: StorageDType = src.storageDtype ?? 'F32';
      const tmpModel = join(tmpDir, 'measure.sllm');
      const layersTmp = prunedLayers(src, plans, plans.map(() => null), plans.map(() => null));
      await writePrunedPacked(src, plans, layersTmp, tmpModel, { dtype: measureDtype, force: true, toolVersion: o.toolVersion });
      after = await ModelRuntime.load(tmpModel, { context: window });
      await rm(tmpModel, { force: true });
      const bar2 = o.onProgress?.('measuring the pruned model', calibIds.length);
      stats2 = calibrate(after, calibIds, { context: window, thresholds: plans.map((p) => p.threshold ?? 0), onWindow: (n) => bar2?.tick(n) });
      bar2?.finish();
      after.reset();
      const logitsAfter = after.forward(firstWin, { allLogits: true, mode: 'dense' });
      let md = 0;
      let mx = 0;
      for (let k = 0; k < logitsBefore.length; k++) {
        md = Math.max(md, Math.abs(logitsBefore[k]! - logitsAfter[k]!));
        mx = Math.max(mx, Math.abs(logitsBefore[k]!));
      }
      logitDiff = md;
      logitRel = mx > 0 ? md / mx : 0;
      if (evalIds.length) {
        after.resetActivity();
        const bar = o.onProgress?.('perplexity (output)', evalIds.length);
        pplAfter = perplexity(after, evalIds, Math.min(window, after.context), 'auto', (n) => bar?.tick(n));
        bar?.finish(`held-out perplexity of the output ${pplAfter.perplexity.toFixed(4)} over ${pplAfter.tokens} tokens`);
      }
    }

    // TwELL parameters and the per-layer report.
    const headroom = o.twellHeadroom ?? DEFAULT_HEADROOM;
    const coverage = o.twellCoverage ?? DEFAULT_COVERAGE;
    const layers: LayerReport[] = plans.map((p, i) => {
      const a = stats2 ? stats2[i]!.summary(i) : null;
      const basis = a ?? sum1[i]!;
      return {
        layer: i,
        activation: spec.activation,
        dFFIn: p.inDFF,
        dFFOut: p.keep.length,
        sourceDFF: p.sourceDFF,
        removed: p.inDFF - p.keep.length,
        thresholdIn: src.layers[i]!.threshold,
        threshold: p.threshold,
        before: sum1[i]!,
        after: a,
        sparsityReached: a ? 1 - a.nnzMean / p.inDFF : null,
        twell: chooseTwell(basis.dFF, basis.tileMax, basis.tileCounts, headroom, coverage),
      };
    });

    // Output.
    let output: PruneReport['output'] = null;
    if (o.output) {
      if (isPackedOutput(o.output)) {
        const dtype = o.dtype ?? src.storageDtype ?? 'BF16';
        const calib: LayerCalibration[] = layers.map((l) => {
          const s = l.after!;
          const T = l.twell.tileWidth as TileWidth;
          return { tokens: s.tokens, nnzMean: s.nnzMean, nnzP99: s.nnzP99, nnzMax: s.nnzMax, tileWidth: T, tileMax: s.tileMax[T] };
        });
        const table = prunedLayers(src, plans, layers.map((l) => ({ tileWidth: l.twell.tileWidth, compression: l.twell.compression })), calib);
        const r = await writePrunedPacked(src, plans, table, o.output, { dtype, force: !!o.force, toolVersion: o.toolVersion });
        output = { path: o.output, format: 'packed', bytes: r.bytesOut, dtype };
      } else {
        const r = await writePrunedDense(src, plans, o.output, !!o.force);
        output = { path: o.output, format: 'dense', bytes: r.bytesOut, dtype: null };
      }
    }

    const dIn = plans.reduce((a, p) => a + p.inDFF, 0);
    const dOut = plans.reduce((a, p) => a + p.keep.length, 0);
    const nnz1 = sum1.reduce((a, s) => a + s.nnzMean, 0);
    const nnz2 = stats2 ? layers.reduce((a, l) => a + l.after!.nnzMean, 0) : null;
    return {
      model: modelPath,
      kind: src.kind,
      architecture: spec.modelType,
      activation: spec.activation,
      calibration: { files: calibText.files, tokens: calibIds.length, requested, context: window, windows: Math.ceil(calibIds.length / window), seconds: calSeconds },
      heldOut: { source: heldOutSource, tokens: evalIds.length },
      perplexityBefore: pplBefore,
      perplexityAfter: pplAfter,
      calibrationLogitMaxDiff: logitDiff,
      calibrationLogitRelDiff: logitRel,
      dropDead: !!o.dropDead,
      targetSparsity: o.targetSparsity ?? null,
      layers,
      totals: { dFFIn: dIn, dFFOut: dOut, removed: dIn - dOut, sparsityBefore: 1 - nnz1 / dIn, sparsityAfter: nnz2 === null ? null : 1 - nnz2 / dIn },
      output,
      warnings,
    };
  } finally {
    before?.close();
    after?.close();
    await src.close();
    await rm(tmpDir, { recursive: true, force: true });
  }
}

/** Per-neuron CSV: one row per (layer, neuron) of the input model, written to a temp name then renamed. */
async function writeNeuronStats(path: string, stats: readonly LayerStats[], src: PruneSource): Promise<void> {
  const lines = ['layer,neuron,source_neuron,fires,fire_rate,mean_abs_act,max_abs_act,mean_abs_hidden,max_abs_hidden'];
  stats.forEach((s, i) => {
    const map = src.layers[i]!.neuronMap;
    const n = Math.max(1, s.tokens);
    for (let j = 0; j < s.F; j++) {
      lines.push(
        [i, j, map ? map[j]! : j, s.fires[j]!, (s.fires[j]! / n).toPrecision(6), (s.sumAbsAct[j]! / n).toPrecision(6), s.maxAbsAct[j]!.toPrecision(6), (s.sumAbsHidden[j]! / n).toPrecision(6), s.maxAbsHidden[j]!.toPrecision(6)].join(','),
      );
    }
  });
  const tmp = `${path}.tmp-${process.pid}`;
  try {
    await writeFile(tmp, lines.join('\n') + '\n');
    await rename(tmp, path);
  } catch (e) {
    await rm(tmp, { force: true });
    throw new SparseLlmError(`--neuron-stats: cannot write ${path}: ${(e as Error).message}`);
  }
}
