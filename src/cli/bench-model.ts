// `sparsellm bench --model <model>`: the model-level mode of `bench` (src/cli/bench.ts keeps the
// kernel mode). Prefill and decode throughput, dense against sparse FFNs in the same run, bytes
// per decoded token against the machine's measured bandwidth, peak memory, per-layer sparsity.
import type { Command } from 'commander';
import { setThreads, engine } from '../core/native.js';
import { UsageError } from '../core/errors.js';
import { benchModel, type ModelBenchResult } from '../core/model/bench.js';
import { resolveModelBackend, type KvCacheDtype } from '../core/model/runtime.js';
import { loadAverage1m, logicalCpus, sourceCommit } from '../core/bench/runinfo.js';
import { kvCacheOption, parseNumberInRange, parsePositiveInt } from './options.js';
import { Output, formatBytes } from './ui.js';
import { VERSION } from './version.js';
import { DEFAULT_MODEL, DEFAULT_MODEL_NOTE } from './default-model.js';

export interface ModelBenchFlags {
  model?: string | boolean;
  prefill?: number;
  decode?: number;
  decodePrompt: number;
  threads?: number;
  repeats: number;
  warmup: number;
  seed: number;
  backend: 'auto' | 'cpu' | 'cuda';
  bandwidth?: boolean;
  mmap?: boolean;
  kvCache: KvCacheDtype;
  profile?: boolean;
  energySeconds?: number;
  json?: boolean;
  csv?: boolean;
  markdown?: boolean;
  quiet?: boolean;
}

/** Adds the model-mode options to the bench command (they are ignored without --model). */
export function addModelBenchOptions(cmd: Command): Command {
  return cmd
    .option('--model [model]', `benchmark a whole model (a packed .sllm or a dense checkpoint) instead of the FFN kernels (default: ${DEFAULT_MODEL_NOTE})`)
    .option('--prefill <n>', 'with --model: prompt tokens of the timed prefill (default: 512, or the model context if shorter)', parsePositiveInt('--prefill'))
    .option('--decode <n>', 'with --model: tokens of the timed decode (default: 128, or what the model context leaves)', parsePositiveInt('--decode'))
    .option('--decode-prompt <n>', 'with --model: tokens in the cache before the timed decode', parsePositiveInt('--decode-prompt'), 16)
    .option('--no-bandwidth', 'with --model: skip measuring the machine memory bandwidth')
    .option('--mmap', 'with --model: ' + 'map the weights file instead of reading it into huge-page memory (opens faster and shares the page cache; decode is slower)')
    .addOption(kvCacheOption('with --model: '))
    .option('--energy-seconds <s>', 'with --model: energy per prefill token from the GPU\'s NVML counter, each path run back to back at least this long after the timed rounds (0 = off; default: 2 on the cuda backend, off on cpu, which has no counter)', parseNumberInRange('--energy-seconds', 0, 600))
    .option('--profile', 'with --model: time each step of a decoded token (projections, attention, FFN, head) and the GB/s of the weight-streaming ones (CPU)');
}

export async function modelBenchCommand(flags: ModelBenchFlags): Promise<void> {
  if (flags.csv) throw new UsageError('--csv is not available with --model; use --json or --markdown');
  // auto: the CPU; cuda: only where allowed (resolveModelBackend says why not).
  const backend = resolveModelBackend(flags.backend);
  const out = new Output({ json: flags.json, quiet: flags.quiet });
  setThreads(flags.threads);
  const info = engine().buildInfo();
  const loadStart = loadAverage1m();
  const modelPath = typeof flags.model === 'string' ? flags.model : DEFAULT_MODEL;
  const gpu = info.cuda.devices[0]?.name ?? 'GPU';
  out.note(
    backend === 'cuda'
      ? `sparsellm ${VERSION} bench --model ${modelPath}: cuda (${gpu}; unverified CUDA model runtime), load ${loadStart}`
      : `sparsellm ${VERSION} bench --model ${modelPath}: cpu (${info.cpu.brand}, ${info.cpu.isa}, ${info.cpu.threads} threads), load ${loadStart}`,
  );
  // The bandwidth probe reads host memory: it says nothing about a GPU's decode.
  if (backend === 'cuda' && flags.bandwidth !== false) out.note('note: --backend cuda skips the host memory bandwidth probe (it measures CPU memory, not the GPU\'s)');
  const total = (flags.warmup + flags.repeats) * 2;
  const bar = out.progress('bench', total);
  let r: ModelBenchResult;
  try {
    r = await benchModel(modelPath, {
      prefillTokens: flags.prefill ?? 512,
      decodeTokens: flags.decode ?? 128,
      // Defaults shrink to fit a short-context model; explicit values are taken as asked.
      fitPrefill: flags.prefill === undefined,
      fitDecode: flags.decode === undefined,
      decodePrompt: flags.decodePrompt,
      repeats: flags.repeats,
      warmup: flags.warmup,
      seed: flags.seed,
      bandwidth: flags.bandwidth !== false && backend === 'cpu',
      backend,
      weights: flags.mmap ? 'mmap' : 'resident',
      kvCache: flags.kvCache,
      profile: !!flags.profile,
      energySeconds: flags.energySeconds ?? (backend === 'cuda' ? 2 : 0),
      onProgress: () => bar.tick(1),
      onNotice: (s) => out.note(s),
    });
    bar.finish();
  } catch (e) {
    bar.fail();
    throw e;
  }
  const loadEnd = loadAverage1m();
  const machine = { cpu: info.cpu.brand, isa: info.cpu.isa, threads: info.cpu.threads, cpus: logicalCpus(), loadAverage: { start: loadStart, end: loadEnd }, ...(backend === 'cuda' ? { gpu } : {}) };
  if (flags.json) {
    out.result({ tool: 'sparsellm bench --model', version: VERSION, commit: sourceCommit(), machine, ...r });
    return;
  }
  const head = ['path', `prefill ${r.options.prefillTokens} tok/s`, `decode tok/s`, 'decode bytes/token', 'decode GB/s'];
  const rows = [r.dense, r.sparse].map((p) => [p.mode, fmt(p.prefillTokensPerSecond), fmt(p.decodeTokensPerSecond), formatBytes(p.decodeBytesPerToken), fmt(p.decodeGBs)]);
  rows.push(['sparse/dense', `${r.speedup.prefill.toFixed(2)}×`, `${r.speedup.decode.toFixed(2)}×`, `${(r.sparse.decodeBytesPerToken / r.dense.decodeBytesPerToken).toFixed(2)}×`, '']);
  rows.push(['dense/sparse CPU time', `${r.cpuTimeRatio.prefill.toFixed(2)}×`, `${r.cpuTimeRatio.decode.toFixed(2)}×`, '', '']);
  // "gate rows read exactly": per sparse decode call, the rows the int8 screen could not rule out.
  const layerHead = ['layer', 'd_ff', 'nnz/token mean', 'max', 'overflow tiles', 'decode gate rows read exactly'];
  const layerRows = r.layers.map((l) => [
    l.layer,
    l.dFF,
    l.nnzMean === null ? '-' : l.nnzMean.toFixed(1),
    l.nnzMax,
    l.overflowTiles,
    l.gateCandidatesMean === null ? 'all (not screened)' : l.gateCandidatesMean.toFixed(1),
  ]);
  const summary =
    `${r.spec.modelType}, ${r.spec.nLayers} layers, d_model ${r.spec.dModel}, ${r.storageDtype} weights ${formatBytes(r.weightsBytes)} (${r.weights === 'mmap' ? 'memory-mapped' : 'resident, huge pages advised'}${r.kvCache === 'f32' ? '' : `, ${r.kvCache} KV cache`}); ` +
    `peak RSS ${formatBytes(r.peakRssBytes)}` +
    (r.memoryBandwidthGBs ? `; ${bandwidthSummary(r)}` : '') +
    (r.energy ? `; ${energySummary(r.energy)}` : '');
  const tables: [(string | number)[], (string | number)[][]][] = [[head, rows], [layerHead, layerRows]];
  if (r.dense.decodeSteps && r.sparse.decodeSteps) tables.push(stepTable(r));
  if (flags.markdown) {
    const md = (h: (string | number)[], rs: (string | number)[][]) =>
      [`| ${h.join(' | ')} |`, `|${h.map(() => ' --- ').join('|')}|`, ...rs.map((x) => `| ${x.join(' | ')} |`)].join('\n') + '\n';
    process.stdout.write(`${summary}\n\n${tables.map(([h, rs]) => md(h, rs)).join('\n')}`);
  } else {
    out.say(summary);
    for (const [h, rs] of tables) out.table(h.map(String), rs);
  }
  if (loadStart > 0.5 * logicalCpus()) {
    out.note(`note: the machine was busy (1-minute load ${loadStart} at start, ${loadEnd} at end, ${logicalCpus()} CPUs): absolute times are noisy; the same-run ratios are more reliable`);
  }
}

// --profile: microseconds per decoded token by step, both paths, with the GB/s (and the share of
// the probe) of the steps that stream whole weight matrices.
function stepTable(r: ModelBenchResult): [(string | number)[], (string | number)[][]] {
  const dense = r.dense.decodeSteps!;
  const sparse = r.sparse.decodeSteps!;
  const bw = r.memoryBandwidthGBs;
  const rate = (g: number | null) => (g === null ? '' : bw ? `${fmt(g)} (${((100 * g) / bw).toFixed(0)}%)` : fmt(g));
  const head = ['decode step', 'dense µs/token', `dense GB/s${bw ? ' (of probe)' : ''}`, 'sparse µs/token', 'sparse GB/s'];
  const rows = dense.map((d, i) => [d.step, fmt(d.microsecondsPerToken), rate(d.gbPerSecond), fmt(sparse[i]!.microsecondsPerToken), rate(sparse[i]!.gbPerSecond)]);
  const sum = (xs: typeof dense) => xs.reduce((a, x) => a + x.microsecondsPerToken, 0);
  rows.push(['all steps', fmt(sum(dense)), '', fmt(sum(sparse)), '']);
  return [head, rows];
}

const fmt = (x: number) => (x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toFixed(2));

// "machine read bandwidth 72.1 GB/s (probes before and after the rounds: 70.3, 73.9), dense decode reaches 71%"
function energySummary(e: NonNullable<ModelBenchResult['energy']>): string {
  if ('unavailable' in e) return `energy not measured (${e.unavailable})`;
  const mj = (x: number) => (x >= 10 ? x.toFixed(1) : x.toPrecision(3));
  return (
    `energy per prefill token (${e.source}): dense ${mj(e.dense.millijoulesPerToken)} mJ, sparse ${mj(e.sparse.millijoulesPerToken)} mJ ` +
    `(${(100 * (1 - e.sparseOverDense)).toFixed(1)}% less; ${e.dense.seconds.toFixed(1)} s and ${e.sparse.seconds.toFixed(1)} s of prefills)`
  );
}

function bandwidthSummary(r: ModelBenchResult): string {
  const xs = r.memoryBandwidthSamplesGBs;
  const drift = xs.length === 2 && Math.abs(xs[0]! - xs[1]!) > 0.15 * Math.max(xs[0]!, xs[1]!) ? '; the host\'s bandwidth moved during the run' : '';
  return (
    `machine read bandwidth ${fmt(r.memoryBandwidthGBs!)} GB/s (probes before and after the rounds: ${xs.map(fmt).join(', ')}${drift}), ` +
    `dense decode reaches ${(100 * r.denseDecodeBandwidthFraction!).toFixed(0)}%`
  );
}
