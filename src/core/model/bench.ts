// Model-level benchmark: prefill and decode throughput of one model, dense against sparse FFNs
// in the same run (alternating, median of the repeats), with the bytes each path reads per
// decoded token, the memory bandwidth they reach against the machine's measured bandwidth, peak
// memory and the FFN sparsity observed.
import { spawnSync } from 'node:child_process';
import { addonPath, engine } from '../native.js';
import { SparseLlmError, UsageError } from '../errors.js';
import { MODEL_STEPS, ModelRuntime, type FfnRunMode, type LayerActivity, type ModelBackend, type ModelStepName, type StepTimes, type WeightResidency, type KvCacheDtype } from './runtime.js';
import type { ModelSpec } from './spec.js';
import { energyCounterFor, measurePrefillEnergy, type EnergyCounter, type PrefillEnergy } from './energy.js';

export interface ModelBenchOptions {
  prefillTokens: number;
  decodeTokens: number;
  /** Shrink prefillTokens / decodeTokens to what the model's context holds (for defaults). */
  fitPrefill?: boolean;
  fitDecode?: boolean;
  /** Prompt length before the timed decode (the KV cache the decode attends to). */
  decodePrompt: number;
  repeats: number;
  warmup: number;
  seed: number;
  /** Measure the machine's read bandwidth before and after the rounds (about a second each). */
  bandwidth: boolean;
  /** Where the model runs (default cpu; the caller checks that cuda is allowed). */
  backend?: ModelBackend;
  /** Host residency of the weights (LoadOptions.weights; default resident). */
  weights?: WeightResidency;
  /** The KV cache's element (LoadOptions.kvCache; default f32). */
  kvCache?: KvCacheDtype;
  /** Time each step of the decode (CPU backend): ModelBenchResult.decodeSteps. */
  profile?: boolean;
  /**
   * Energy per prefill token: each path's prefill back to back for at least this many seconds
   * after the timed rounds, against the backend's energy counter (NVML on cuda); 0 or absent: off.
   */
  energySeconds?: number;
  /** Use this counter instead of the backend's (tests). */
  energyCounter?: EnergyCounter;
  onProgress?: (done: number, total: number) => void;
  onNotice?: (text: string) => void;
}

export interface PathResult {
  mode: FfnRunMode;
  prefillTokensPerSecond: number;
  prefillSeconds: number[];
  decodeTokensPerSecond: number;
  decodeSeconds: number[];
  /**
   * Process CPU time (user + system, all threads) per run, medians: less disturbed than wall time
   * when other work shares the machine (but OpenMP waiting threads count too).
   */
  prefillCpuSeconds: number;
  decodeCpuSeconds: number;
  /** Weight and KV-cache bytes one decoded token reads (estimate from the model shape and the measured non-zeros). */
  decodeBytesPerToken: number;
  /** decodeBytesPerToken × decode tokens/s. */
  decodeGBs: number;
  /** With `profile`: where a decoded token's wall time goes (median round), by step. */
  decodeSteps?: DecodeStep[];
}

/** One step of a decoded token: wall microseconds per token, and GB/s for the weight-streaming steps. */
export interface DecodeStep {
  step: ModelStepName;
  microsecondsPerToken: number;
  /** Weight bytes the step reads per token over its time (qkv, oProj, head; ffn on the dense path). */
  gbPerSecond: number | null;
}

export interface ModelBenchResult {
  model: string;
  backend: ModelBackend;
  /** How the weights sat in host memory (LoadOptions.weights; the CUDA backend maps them). */
  weights: WeightResidency;
  /** The KV cache's element. */
  kvCache: KvCacheDtype;
  spec: Pick<ModelSpec, 'modelType' | 'nLayers' | 'dModel' | 'nHeads' | 'nKvHeads' | 'vocabSize' | 'activation'> & { dFF: number[] };
  storageDtype: string;
  weightsBytes: number;
  peakRssBytes: number;
  options: Omit<ModelBenchOptions, 'onProgress' | 'onNotice' | 'energyCounter'>;
  /**
   * The machine's read bandwidth: the mean of two probes, before the first round and after the
   * last (the host's bandwidth drifts over minutes; the two show how much it moved meanwhile).
   */
  memoryBandwidthGBs: number | null;
  /** The probes: [before, after]. */
  memoryBandwidthSamplesGBs: number[];
  dense: PathResult;
  sparse: PathResult;
  speedup: { prefill: number; decode: number };
  /** Dense CPU time over sparse CPU time, prefill and decode. */
  cpuTimeRatio: { prefill: number; decode: number };
  /** Dense decode bandwidth over memoryBandwidthGBs. */
  denseDecodeBandwidthFraction: number | null;
  /** Energy per prefill token (with energySeconds), or why it was not measured. */
  energy: { source: string; dense: PrefillEnergy; sparse: PrefillEnergy; sparseOverDense: number } | { unavailable: string } | null;
  layers: LayerActivity[];
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : (s[m - 1]! + s[m]!) / 2;
}

function tokens(n: number, vocab: number, seed: number): number[] {
  let s = seed >>> 0 || 1;
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    out.push(s % vocab);
  }
  return out;
}

/** Weight bytes per decoded token of the steps that stream whole matrices (the dense FFN: all of it). */
export function stepWeightBytes(spec: ModelSpec, elem: number): Partial<Record<ModelStepName, number>> {
  const d = spec.dModel;
  const qd = spec.nHeads * spec.headDim;
  const kd = spec.nKvHeads * spec.headDim;
  const ffn = spec.dFF.reduce((a, F) => a + (spec.gated ? 3 : 2) * F * d * elem, 0);
  return { qkv: spec.nLayers * (qd + 2 * kd) * d * elem, oProj: spec.nLayers * d * qd * elem, ffn, head: spec.vocabSize * d * elem };
}

function stepDifference(after: StepTimes, before: StepTimes): Record<ModelStepName, number> {
  const out = {} as Record<ModelStepName, number>;
  for (const k of MODEL_STEPS) out[k] = after.seconds[k] - before.seconds[k];
  return out;
}

/**
 * Bytes of weights (and KV cache, `kvElem` bytes per element) one decoded token reads, dense or
 * with `nnz[i]` active neurons.
 * `gateCandidates[i]`, when a number: layer i's gate was screened by its int8 copy (one byte per
 * weight plus 8 bytes per row) and that many rows were then read exactly.
 */
export function decodeBytes(spec: ModelSpec, elem: number, kvPositions: number, nnz?: (number | null)[], gateCandidates?: (number | null)[], kvElem = 4): number {
  const d = spec.dModel;
  const qd = spec.nHeads * spec.headDim;
  const kd = spec.nKvHeads * spec.headDim;
  let bytes = 0;
  for (let i = 0; i < spec.nLayers; i++) {
    const F = spec.dFF[i]!;
    bytes += (qd * d + 2 * kd * d + d * qd) * elem; // q, k, v, o
    bytes += 2 * kvPositions * kd * kvElem; // K and V cache
    const active = nnz?.[i] ?? null;
    // gated: gate + up + down; non-gated: up + down. Sparse: the gate (or up) stays dense.
    const perNeuron = spec.gated ? 2 * d : d;
    const screened = gateCandidates?.[i] ?? null;
    const gateBytes = screened === null ? F * d * elem : F * d + 8 * F + Math.min(F, screened) * d * elem;
    bytes += gateBytes + (active === null ? F : Math.min(F, active)) * perNeuron * elem;
  }
  bytes += spec.vocabSize * d * elem; // LM head
  return bytes;
}

/**
 * The machine's read bandwidth (memoryBandwidth(), GB/s) with `threads` threads, measured in a
 * child process, so that its gigabyte buffer never counts in this process's peak RSS.
 */
function probeBandwidth(threads: number): number {
  const code = `const a = require(${JSON.stringify(addonPath)}); a.setThreads(${threads}); process.stdout.write(String(a.memoryBandwidth()));`;
  const r = spawnSync(process.execPath, ['-e', code], { encoding: 'utf8' });
  const gbs = Number(r.stdout);
  if (r.status !== 0 || !(gbs > 0)) {
    throw new SparseLlmError(`memory bandwidth probe failed: ${(r.stderr || r.error?.message || 'no output').trim().split('\n').pop()}`);
  }
  return gbs;
}

export async function benchModel(path: string, asked: ModelBenchOptions): Promise<ModelBenchResult> {
  const askedNeed = Math.max(asked.prefillTokens, asked.decodePrompt + asked.decodeTokens);
  const rt = await ModelRuntime.load(path, { context: undefined, defaultContext: askedNeed, onNotice: asked.onNotice, backend: asked.backend, weights: asked.weights, kvCache: asked.kvCache });
  const opts = { ...asked };
  if (opts.fitPrefill) opts.prefillTokens = Math.min(opts.prefillTokens, rt.context);
  if (opts.fitDecode) opts.decodeTokens = Math.max(1, Math.min(opts.decodeTokens, rt.context - opts.decodePrompt));
  const need = Math.max(opts.prefillTokens, opts.decodePrompt + opts.decodeTokens);
  try {
    if (need > rt.context) {
      throw new UsageError(`the benchmark needs ${need} positions but the model holds ${rt.context}; lower --prefill or --decode`);
    }
    const spec = rt.spec;
    const prefill = tokens(opts.prefillTokens, spec.vocabSize, opts.seed);
    const prompt = tokens(opts.decodePrompt, spec.vocabSize, opts.seed + 1);
    const next = tokens(opts.decodeTokens, spec.vocabSize, opts.seed + 2);
    const modes: FfnRunMode[] = ['dense', 'sparse'];
    const times: Record<string, { prefill: number[]; decode: number[]; prefillCpu: number[]; decodeCpu: number[]; steps: Record<ModelStepName, number>[] }> = {
      dense: { prefill: [], decode: [], prefillCpu: [], decodeCpu: [], steps: [] },
      sparse: { prefill: [], decode: [], prefillCpu: [], decodeCpu: [], steps: [] },
    };
    if (opts.profile) {
      if (!rt.canProfile) throw new UsageError(`--profile: step timing is not available on the ${rt.backend} backend`);
      rt.setProfiling(true);
    }
    const cpu = (u: NodeJS.CpuUsage) => (u.user + u.system) / 1e6;
    const total = (opts.warmup + opts.repeats) * modes.length;
    let done = 0;
    let sparseActivity: LayerActivity[] = [];
    const threads = engine().buildInfo().cpu.threads;
    const bandwidthSamples: number[] = [];
    // The bandwidth is probed before the first round and after the last, not between rounds:
    // runs that followed a probe at once were up to 1.5x slower (prefill most, dense more than
    // sparse) even half a second later, which biased the ratios.
    if (opts.bandwidth) bandwidthSamples.push(probeBandwidth(threads));
    for (let r = 0; r < opts.warmup + opts.repeats; r++) {
      // Alternate the order so that neither path always runs first after the other.
      const order = r % 2 ? [...modes].reverse() : modes;
      for (const mode of order) {
        if (mode === 'sparse') rt.resetActivity();
        rt.reset();
        const c0 = process.cpuUsage();
        const t0 = performance.now();
        rt.forward(prefill, { mode });
        const t1 = performance.now();
        const c1 = process.cpuUsage(c0);
        rt.reset();
        if (prompt.length) rt.forward(prompt, { mode });
        const s2 = opts.profile ? rt.stepTimes() : null;
        const c2 = process.cpuUsage();
        const t2 = performance.now();
        for (const id of next) rt.forward([id], { mode });
        const t3 = performance.now();
        const c3 = process.cpuUsage(c2);
        if (r >= opts.warmup) {
          times[mode]!.prefill.push((t1 - t0) / 1000);
          times[mode]!.decode.push((t3 - t2) / 1000);
          times[mode]!.prefillCpu.push(cpu(c1));
          times[mode]!.decodeCpu.push(cpu(c3));
          if (s2) times[mode]!.steps.push(stepDifference(rt.stepTimes(), s2));
        }
        if (mode === 'sparse') sparseActivity = rt.activity();
        opts.onProgress?.(++done, total);
      }
      if (opts.bandwidth && r === opts.warmup + opts.repeats - 1) bandwidthSamples.push(probeBandwidth(threads));
    }
    // Energy: after the timed rounds (the activity they recorded is kept), each path's prefill
    // back to back; the order alternates as in the rounds.
    let energy: ModelBenchResult['energy'] = null;
    if (opts.energySeconds && opts.energySeconds > 0) {
      const found = opts.energyCounter ? { counter: opts.energyCounter, source: 'injected counter' } : energyCounterFor(rt.backend);
      if (!found.counter) {
        energy = { unavailable: (found as { reason: string }).reason };
      } else {
        const per = {} as Record<'dense' | 'sparse', PrefillEnergy>;
        for (const mode of ['dense', 'sparse'] as const) {
          per[mode] = measurePrefillEnergy(found.counter, () => {
            rt.reset();
            rt.forward(prefill, { mode });
          }, prefill.length, opts.energySeconds);
        }
        energy = { source: (found as { source: string }).source, dense: per.dense, sparse: per.sparse, sparseOverDense: per.sparse.millijoulesPerToken / per.dense.millijoulesPerToken };
      }
    }
    const peakRssBytes = process.resourceUsage().maxRSS * 1024;
    const bandwidth = bandwidthSamples.length ? bandwidthSamples.reduce((a, b) => a + b, 0) / bandwidthSamples.length : null;
    // The CUDA runtime holds every matrix as bf16 on the device.
    const elem = rt.storageDtype === 'F32' && rt.backend === 'cpu' ? 4 : 2;
    const kvAvg = opts.decodePrompt + opts.decodeTokens / 2;
    const weightBytes = stepWeightBytes(spec, elem);
    // Per step, the median over the rounds, per decoded token.
    const decodeSteps = (mode: FfnRunMode): DecodeStep[] =>
      MODEL_STEPS.map((step) => {
        const us = (median(times[mode]!.steps.map((x) => x[step])) / opts.decodeTokens) * 1e6;
        const bytes = step === 'ffn' && mode !== 'dense' ? undefined : weightBytes[step];
        return { step, microsecondsPerToken: us, gbPerSecond: bytes !== undefined && us > 0 ? bytes / (us * 1e3) : null };
      });
    const result = (mode: FfnRunMode): PathResult => {
      const t = times[mode]!;
      const dec = opts.decodeTokens / median(t.decode);
      const sparseMode = mode !== 'dense';
      const bytes = decodeBytes(
        spec,
        elem,
        kvAvg,
        sparseMode ? sparseActivity.map((a) => (a.sparseCalls > 0 ? a.nnzMean : null)) : undefined,
        sparseMode ? sparseActivity.map((a) => a.gateCandidatesMean) : undefined,
        rt.kvCache === 'bf16' ? 2 : 4,
      );
      return {
        mode,
        prefillTokensPerSecond: opts.prefillTokens / median(t.prefill),
        prefillSeconds: t.prefill,
        decodeTokensPerSecond: dec,
        decodeSeconds: t.decode,
        prefillCpuSeconds: median(t.prefillCpu),
        decodeCpuSeconds: median(t.decodeCpu),
        decodeBytesPerToken: bytes,
        decodeGBs: (bytes * dec) / 1e9,
        ...(opts.profile ? { decodeSteps: decodeSteps(mode) } : {}),
      };
    };
    const dense = result('dense');
    const sparse = result('sparse');
    const denseFraction = bandwidth ? dense.decodeGBs / bandwidth : null;
    return {
      model: path,
      backend: rt.backend,
      weights: rt.backend === 'cpu' ? (opts.weights ?? 'resident') : 'mmap',
      kvCache: rt.kvCache,
      spec: { modelType: spec.modelType, nLayers: spec.nLayers, dModel: spec.dModel, nHeads: spec.nHeads, nKvHeads: spec.nKvHeads, vocabSize: spec.vocabSize, activation: spec.activation, dFF: spec.dFF },
      storageDtype: rt.storageDtype,
      weightsBytes: rt.weightsBytes,
      peakRssBytes,
      options: { prefillTokens: opts.prefillTokens, decodeTokens: opts.decodeTokens, decodePrompt: opts.decodePrompt, repeats: opts.repeats, warmup: opts.warmup, seed: opts.seed, bandwidth: opts.bandwidth, ...(opts.profile ? { profile: true } : {}), ...(opts.energySeconds ? { energySeconds: opts.energySeconds } : {}) },
      memoryBandwidthGBs: bandwidth,
      memoryBandwidthSamplesGBs: bandwidthSamples,
      dense,
      sparse,
      speedup: { prefill: sparse.prefillTokensPerSecond / dense.prefillTokensPerSecond, decode: sparse.decodeTokensPerSecond / dense.decodeTokensPerSecond },
      cpuTimeRatio: { prefill: dense.prefillCpuSeconds / sparse.prefillCpuSeconds, decode: dense.decodeCpuSeconds / sparse.decodeCpuSeconds },
      denseDecodeBandwidthFraction: denseFraction,
      energy,
      layers: sparseActivity,
    };
  } finally {
    rt.close();
  }
}
