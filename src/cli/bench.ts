// `sparsellm bench`: kernel-level benchmarks of the FFN (dense vs TwELL sparse forward, dense vs
// hybrid forward+backward) and of the dense GEMM (optionally against OpenBLAS), as one table of
// cases. Parses flags and renders; the work is in core/bench.
// (A model-level `bench --model <file>` will select a second runner here; the kernel runner,
// the renderers and the machine facts are shared.)
import { renameSync, writeFileSync } from 'node:fs';
import { type Command, InvalidArgumentError, Option } from 'commander';
import {
  type BenchCase,
  type BenchOp,
  type DensityTarget,
  type FfnShape,
  type WeightDType,
  DEFAULT_DENSITIES,
  DEFAULT_TOKENS,
  PAPER_SHAPE,
  buildCases,
  densityLabel,
  parseDensityList,
  parseOpList,
} from '../core/bench/cases.js';
import { createBenchEngine } from '../core/bench/engine.js';
import { cudaAvailability, cudaSupports } from '../core/engine/cuda.js';
import { speedupSeries, speedupSvg } from '../core/bench/plot.js';
import { type RunInfo, markdownTable, resultTables, toCsv, toJsonDocument } from '../core/bench/render.js';
import { cpuHasAvx512, loadAverage1m, logicalCpus, osText, sourceCommit } from '../core/bench/runinfo.js';
import { runCases } from '../core/bench/runner.js';
import type { CaseResult } from '../core/bench/types.js';
import { SparseLlmError, UsageError } from '../core/errors.js';
import { engine } from '../core/native.js';
import { parseIntList, parsePositiveInt } from './options.js';
import { Output } from './ui.js';
import { VERSION } from './version.js';
import { addModelBenchOptions, modelBenchCommand, type ModelBenchFlags } from './bench-model.js';

interface BenchFlags {
  dModel: number;
  dFf: number;
  nonGated?: boolean;
  densities: DensityTarget[];
  tokens: number[];
  ops?: BenchOp[];
  dtype?: WeightDType;
  backend: 'auto' | 'cpu' | 'cuda';
  threads?: number;
  repeats: number;
  warmup: number;
  seed: number;
  minTimeMs: number;
  baseline?: 'openblas';
  json?: boolean;
  csv?: boolean;
  markdown?: boolean;
  plot?: string;
  saveJson?: string;
  quiet?: boolean;
}

function listParser<T>(parse: (s: string) => T) {
  return (value: string): T => {
    try {
      return parse(value);
    } catch (e) {
      throw new InvalidArgumentError((e as Error).message);
    }
  };
}

function parseNonNegativeInt(name: string) {
  return (value: string): number => {
    const n = Number(value);
    if (!Number.isInteger(n) || n < 0) throw new InvalidArgumentError(`${name} must be a non-negative integer, got '${value}'`);
    return n;
  };
}

export function registerBench(program: Command): void {
  const bench = program
    .command('bench')
    .description(
      'benchmark the FFN kernels: dense vs TwELL sparse forward and dense vs hybrid forward+backward at several ' +
        'activation densities and token counts (default: the paper\'s shape, d_model 2048, d_ff 5632, gated)',
    )
    .option('--d-model <n>', 'model width', parsePositiveInt('--d-model'), PAPER_SHAPE.dModel)
    .option('--d-ff <n>', 'FFN hidden width', parsePositiveInt('--d-ff'), PAPER_SHAPE.dFF)
    .option('--non-gated', 'non-gated FFN (gpt2/opt style: relu(x·W_upᵀ + b)) instead of gated')
    .addOption(
      new Option('--densities <list>', 'activation densities: non-zeros per token (29nnz), percentages (5%), fractions (0.05) or dense')
        .argParser(listParser(parseDensityList))
        .default([...DEFAULT_DENSITIES], DEFAULT_DENSITIES.map(densityLabel).join(',')),
    )
    .addOption(
      new Option('--tokens <list>', 'token counts per call').argParser(parseIntList('--tokens')).default([...DEFAULT_TOKENS], DEFAULT_TOKENS.join(',')),
    )
    .option('--ops <list>', 'operations: forward, train (forward+backward), gemm [default: forward,train]', listParser(parseOpList))
    .addOption(
      new Option('--dtype <type>', 'weight dtype of the forward and gemm cases [default: bf16 forward, f32 gemm]; training runs f32 weights').choices(['bf16', 'f32']),
    )
    .addOption(new Option('--backend <name>', 'compute backend').choices(['auto', 'cpu', 'cuda']).default('auto'))
    .option('--threads <n>', 'CPU threads [default: all cores or OMP_NUM_THREADS]', parsePositiveInt('--threads'))
    .option('--repeats <n>', 'timed rounds per case, median reported (cut to no fewer than 3 when a case would take over 20 s)', parsePositiveInt('--repeats'), 5)
    .option('--warmup <n>', 'untimed calls of each implementation before timing (at least 1, which also sizes the samples)', parseNonNegativeInt('--warmup'), 1)
    .option('--min-time-ms <ms>', 'a sample repeats the call back to back until it lasts about this long', parsePositiveInt('--min-time-ms'), 20)
    .option('--seed <n>', 'seed of the generated weights and activations', parseNonNegativeInt('--seed'), 1)
    .addOption(new Option('--baseline <lib>', 'add gemm cases timing OpenBLAS sgemm next to our dense GEMM').choices(['openblas']))
    .option('--json', 'print one JSON document on stdout (build, machine, commit, every case)')
    .option('--csv', 'print CSV on stdout, one row per case and implementation')
    .option('--markdown', 'print the result tables as Markdown instead of boxed tables')
    .option('--plot <file.svg>', 'write an SVG chart of speedup against density')
    .option('--save-json <file>', 'also write the --json document to a file (whatever the output format)')
    .option('-q, --quiet', 'no progress or notices');
  // Model-level mode (src/cli/bench-model.ts): --model selects it.
  addModelBenchOptions(bench).action(async (flags: BenchFlags & ModelBenchFlags) => {
    if (flags.model !== undefined) return modelBenchCommand(flags);
    await benchCommand(flags);
  });
}

async function benchCommand(flags: BenchFlags): Promise<void> {
  if (flags.json && flags.csv) throw new UsageError('--json and --csv are exclusive: choose one output format');
  if (flags.markdown && (flags.json || flags.csv)) throw new UsageError('--markdown cannot be combined with --json or --csv');
  const shape: FfnShape = { dModel: flags.dModel, dFF: flags.dFf, gated: !flags.nonGated };
  if (shape.dModel < 2) throw new UsageError('--d-model must be at least 2 (the benchmark inputs use one constant feature)');
  for (const d of flags.densities) {
    if (d.kind === 'nnz' && d.nnz > shape.dFF) {
      throw new UsageError(`--densities: ${densityLabel(d)} is more than d_ff (${shape.dFF}) non-zeros per token`);
    }
  }
  let ops: BenchOp[] = flags.ops ?? ['ffn-forward', 'ffn-train'];
  if (flags.baseline === 'openblas' && !ops.includes('gemm')) ops = [...ops, 'gemm'];
  // Training always runs f32 weights (the training kernels' master weights).
  const dtype: Partial<Record<BenchOp, WeightDType>> = flags.dtype ? { 'ffn-forward': flags.dtype, gemm: flags.dtype } : {};
  let cases = buildCases({ shape, ops, densities: flags.densities, tokens: flags.tokens, dtype });
  if (!cases.length) {
    throw new UsageError('no cases to run: training needs token counts above 1 (add one to --tokens or other --ops)');
  }
  if (flags.plot && !cases.some((c) => c.op !== 'gemm')) throw new UsageError('--plot needs forward or train cases (see --ops)');
  if (flags.plot && !flags.plot.toLowerCase().endsWith('.svg')) throw new UsageError(`--plot writes SVG: give a file name ending in .svg, got '${flags.plot}'`);

  const out = new Output({ json: flags.json || flags.csv, quiet: flags.quiet });

  const { backend, why: backendWhy } = resolveBackend(flags.backend, cases);
  const eng = createBenchEngine(backend, flags.threads);
  if (flags.baseline === 'openblas') {
    const blas = eng.openblas();
    if (!blas.available) {
      throw new SparseLlmError(
        `--baseline openblas: OpenBLAS could not be loaded (${blas.reason ?? 'not found'}); install it (Debian/Ubuntu: apt-get install libopenblas-dev) or drop --baseline`,
      );
    }
    out.note(`OpenBLAS: ${blas.path ?? 'loaded'}, core ${blas.coreName ?? 'unknown'}${blas.config ? ` (${blas.config})` : ''}`);
    // The engine loads OpenBLAS with OPENBLAS_CORETYPE=SkylakeX on AVX-512 CPUs (the core the GEMM
    // floor is defined against), or SPARSELLM_OPENBLAS_CORETYPE when set; say so, and when that
    // differs from what the environment asked for.
    const env = process.env.OPENBLAS_CORETYPE;
    const chosen = process.env.SPARSELLM_OPENBLAS_CORETYPE || (cpuHasAvx512() ? 'SkylakeX' : undefined);
    if (chosen) {
      out.note(
        `OpenBLAS loaded with OPENBLAS_CORETYPE=${chosen}` +
          (process.env.SPARSELLM_OPENBLAS_CORETYPE ? ' (from SPARSELLM_OPENBLAS_CORETYPE)' : ' (AVX-512 CPU; SPARSELLM_OPENBLAS_CORETYPE chooses another)') +
          (env && env !== chosen ? `, not the environment's OPENBLAS_CORETYPE=${env}` : ''),
      );
    }
  }
  // Cases the engine cannot run: an error when asked for explicitly, skipped (and said) otherwise.
  const skipped = new Map<string, number>();
  cases = cases.filter((c) => {
    const ok = eng.supports(c);
    if (ok === true) return true;
    if (flags.ops) throw new UsageError(`--ops ${c.op === 'ffn-train' ? 'train' : c.op}: ${ok}`);
    skipped.set(ok, (skipped.get(ok) ?? 0) + 1);
    return false;
  });
  for (const [why, n] of skipped) out.note(`skipping ${n} case${n === 1 ? '' : 's'}: ${why}`);
  if (!cases.length) throw new UsageError('no cases left to run on this backend');

  const info = engine().buildInfo();
  const runInfo: RunInfo = {
    tool: 'sparsellm bench',
    version: VERSION,
    startedAt: new Date().toISOString(),
    commit: sourceCommit(),
    machine: {
      cpu: info.cpu.brand,
      isa: eng.isa,
      threads: eng.threads,
      cpus: logicalCpus(),
      os: osText(),
      node: process.version,
      loadAverage: { start: loadAverage1m() },
    },
    build: { compiler: info.compiler, cudaCompiled: info.cuda.compiled },
    options: {
      shape,
      ops,
      densities: flags.densities.map(densityLabel),
      tokens: flags.tokens,
      dtype: { forward: flags.dtype ?? 'bf16', train: 'f32', gemm: flags.dtype ?? 'f32' },
      backend,
      threads: eng.threads,
      repeats: flags.repeats,
      warmup: flags.warmup,
      minTimeMs: flags.minTimeMs,
      seed: flags.seed,
      baseline: flags.baseline ?? null,
    },
  };
  out.note(
    `sparsellm ${VERSION} bench: ${cases.length} cases on ${backend} (${info.cpu.brand}, ${eng.isa}, ${eng.threads} threads)` +
      `${runInfo.commit ? `, commit ${runInfo.commit}` : ''}, load ${runInfo.machine.loadAverage.start}`,
  );
  if (backendWhy) out.note(backendWhy);

  const progress = out.progress('bench', cases.length);
  let results: CaseResult[];
  let done = 0;
  try {
    results = await runCases(eng, cases, {
      repeats: flags.repeats,
      warmup: flags.warmup,
      seed: flags.seed,
      minSampleMs: flags.minTimeMs,
      baseline: flags.baseline,
      onCase: () => {
        if (done++ > 0) progress.tick(1);
      },
    });
    progress.tick(1);
    progress.finish();
  } catch (e) {
    progress.fail();
    throw e;
  }
  runInfo.finishedAt = new Date().toISOString();
  runInfo.machine.loadAverage.end = loadAverage1m();

  if (flags.plot) {
    const svg = speedupSvg(
      speedupSeries(results),
      `FFN speedup over dense: d_model ${shape.dModel}, d_ff ${shape.dFF}, ${shape.gated ? 'gated' : 'non-gated'}`,
      `${info.cpu.brand}, ${backend}/${eng.isa}, ${eng.threads} threads; forward: sparse vs dense, forward+backward: hybrid vs dense`,
    );
    const tmp = `${flags.plot}.${process.pid}.tmp`;
    writeFileSync(tmp, svg);
    renameSync(tmp, flags.plot);
    out.note(`wrote ${flags.plot}`);
  }

  if (flags.saveJson) {
    const tmp = `${flags.saveJson}.${process.pid}.tmp`;
    writeFileSync(tmp, JSON.stringify(toJsonDocument(results, runInfo), null, 2) + '\n');
    renameSync(tmp, flags.saveJson);
    out.note(`wrote ${flags.saveJson}`);
  }
  if (flags.json) {
    out.result(toJsonDocument(results, runInfo));
    return;
  }
  if (flags.csv) {
    process.stdout.write(toCsv(results, runInfo));
    return;
  }
  for (const t of resultTables(results)) {
    if (flags.markdown) {
      process.stdout.write(markdownTable(t) + '\n');
    } else {
      out.say(t.title);
      out.table(t.head, t.rows);
    }
  }
  // Before the run starts, a load above half the CPUs means other work was competing for them.
  if (runInfo.machine.loadAverage.start > 0.5 * logicalCpus()) {
    out.note(
      `note: the machine was busy (1-minute load ${runInfo.machine.loadAverage.start} at start, ${runInfo.machine.loadAverage.end} at end, ` +
        `${logicalCpus()} CPUs): absolute times are noisy; the same-run speedups are more reliable`,
    );
  }
}

/** auto → CUDA when a GPU is usable and runs every case, else the CPU (`why` says why); cuda is refused with the reason. */
function resolveBackend(name: 'auto' | 'cpu' | 'cuda', cases: BenchCase[]): { backend: 'cpu' | 'cuda'; why?: string } {
  if (name === 'cpu') return { backend: 'cpu' };
  const cuda = cudaAvailability();
  if (name === 'cuda') {
    if (!cuda.usable) throw new UsageError(`--backend cuda: ${cuda.reason}; use --backend cpu`);
    return { backend: 'cuda' };
  }
  const blocked = cases.map(cudaSupports).find((r) => r !== true);
  if (cuda.usable && blocked === undefined) return { backend: 'cuda' };
  return { backend: 'cpu', why: `backend auto: cpu (CUDA not used: ${cuda.usable ? blocked : cuda.reason})` };
}
