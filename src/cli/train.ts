// `sparsellm train <text...> -o <dir>`: the paper's recipe (ReLU gate, CE + λ·L1) on the native
// engine, dense FFN kernels per layer until the layer is sparse enough for the Hybrid ones.
// Options come from defaults < --config (JSON or YAML) < flags. Rendering only: the work is in
// core/train.
import { readFile, rename, writeFile } from 'node:fs/promises';
import { extname } from 'node:path';
import { Option, type Command } from 'commander';
import { parse as parseYaml } from 'yaml';
import { SparseLlmError, UsageError } from '../core/errors.js';
import { DEFAULTS, resolveRun, runTraining, type StepRecord, type TrainOptions } from '../core/train/run.js';
import { defaultMatmul, resolveTrainBackend, type TrainMatmul } from '../core/train/engine.js';
import { trainingSvg } from '../core/train/plot.js';
import { Output, formatBytes, formatDuration } from './ui.js';

interface CliOptions {
  config?: string;
  init?: string;
  resume?: string;
  output?: string;
  dModel?: string;
  layers?: string;
  heads?: string;
  dFf?: string;
  context?: string;
  steps?: string;
  stopAt?: string;
  batchTokens?: string;
  microBatchTokens?: string;
  lr?: string;
  minLrRatio?: string;
  warmup?: string;
  l1?: string;
  weightDecay?: string;
  clip?: string;
  seed?: string;
  evalInterval?: string;
  evalTokens?: string;
  saveInterval?: string;
  save?: boolean;
  deadWindow?: string;
  reinitDead?: boolean;
  ffnPath?: string;
  hybridCutoff?: string;
  recheckSteps?: string;
  ellWidth?: string;
  threads?: string;
  backend?: 'auto' | 'cpu' | 'cuda';
  matmul?: TrainMatmul;
  json?: boolean;
  plot?: string;
  quiet?: boolean;
}

const NUMERIC: [keyof CliOptions, keyof TrainOptions][] = [
  ['dModel', 'dModel'], ['layers', 'layers'], ['heads', 'heads'], ['dFf', 'dFF'], ['context', 'context'], ['steps', 'steps'],
  ['stopAt', 'stopAt'], ['batchTokens', 'batchTokens'], ['microBatchTokens', 'microBatchTokens'], ['lr', 'lr'],
  ['minLrRatio', 'minLrRatio'], ['warmup', 'warmup'], ['l1', 'l1'], ['weightDecay', 'weightDecay'], ['clip', 'clip'],
  ['seed', 'seed'], ['evalInterval', 'evalInterval'], ['evalTokens', 'evalTokens'], ['saveInterval', 'saveInterval'],
  ['deadWindow', 'deadWindow'], ['hybridCutoff', 'hybridCutoff'], ['recheckSteps', 'recheckSteps'], ['ellWidth', 'ellWidth'],
];

function num(flag: string, v: string): number {
  const n = Number(v);
  if (v.trim() === '' || !Number.isFinite(n)) throw new UsageError(`--${flag} must be a number, got '${v}'`);
  return n;
}

/** Reads a --config file (JSON, or YAML by extension .yaml/.yml); keys as in TrainOptions or kebab-case flags. */
async function readConfig(path: string): Promise<Partial<TrainOptions>> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (e) {
    throw new UsageError(`--config: cannot read ${path}: ${(e as Error).message}`);
  }
  let raw: unknown;
  try {
    raw = ['.yaml', '.yml'].includes(extname(path).toLowerCase()) ? parseYaml(text) : JSON.parse(text);
  } catch (e) {
    throw new UsageError(`--config: ${path} is not valid ${extname(path).match(/ya?ml/i) ? 'YAML' : 'JSON'}: ${(e as Error).message.split('\n')[0]}`);
  }
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) throw new UsageError(`--config: ${path} must hold an object of options`);
  const out: Record<string, unknown> = {};
  for (const [k0, v] of Object.entries(raw as Record<string, unknown>)) {
    let k = k0.replace(/-([a-z])/g, (_, c: string) => c.toUpperCase());
    if (k === 'dFf') k = 'dFF';
    if (k === 'output' || k === 'o') k = 'out';
    if (!(k in DEFAULTS)) throw new UsageError(`--config: ${path}: unknown option '${k0}'`);
    const want = typeof DEFAULTS[k as keyof TrainOptions];
    const ok = k === 'init' ? v === null || typeof v === 'string' : k === 'data' ? Array.isArray(v) && v.every((x) => typeof x === 'string') : typeof v === want;
    if (!ok) throw new UsageError(`--config: ${path}: option '${k0}' must be ${k === 'data' ? 'a list of paths' : `a ${want}`}`);
    out[k] = v;
  }
  return out as Partial<TrainOptions>;
}

export function registerTrain(program: Command): void {
  program
    .command('train')
    .description('train a ReLU-sparse Llama-family model (CE + λ·L1) on text; Hybrid sparse kernels once layers are sparse')
    .argument('[data...]', 'text files or directories (read recursively)')
    .option('--config <file>', 'options from a JSON or YAML file (flags override it)')
    .option('--init <checkpoint>', 'start from a Hugging Face Llama checkpoint (its gate is switched to ReLU)')
    .option('--resume <dir>', 'continue a run from its checkpoint directory exactly')
    .option('-o, --output <dir>', 'checkpoint directory (Hugging Face layout + training state)')
    .option('--d-model <n>', `model width (default ${DEFAULTS.dModel})`)
    .option('--layers <n>', `layers (default ${DEFAULTS.layers})`)
    .option('--heads <n>', `attention heads (default ${DEFAULTS.heads})`)
    .option('--d-ff <n>', `FFN width (default ${DEFAULTS.dFF})`)
    .option('--context <n>', `sequence length (default ${DEFAULTS.context})`)
    .option('--steps <n>', `optimizer steps (default ${DEFAULTS.steps})`)
    .option('--stop-at <n>', 'save and stop after this step, keeping the schedule of --steps')
    .option('--batch-tokens <n>', `tokens per optimizer step (default ${DEFAULTS.batchTokens})`)
    .option('--micro-batch-tokens <n>', `tokens per forward/backward pass; gradients accumulate (default ${DEFAULTS.microBatchTokens})`)
    .option('--lr <x>', `peak learning rate (default ${DEFAULTS.lr})`)
    .option('--min-lr-ratio <x>', `final learning rate / peak, cosine schedule (default ${DEFAULTS.minLrRatio})`)
    .option('--warmup <n>', `linear warm-up steps (default ${DEFAULTS.warmup})`)
    .option('--l1 <x>', `λ of the L1 penalty on FFN activations (default ${DEFAULTS.l1})`)
    .option('--weight-decay <x>', `AdamW weight decay, not applied to norms (default ${DEFAULTS.weightDecay})`)
    .option('--clip <x>', `global gradient-norm clip, 0 = off (default ${DEFAULTS.clip})`)
    .option('--seed <n>', `seed of the weights and the batch order (default ${DEFAULTS.seed})`)
    .option('--eval-interval <n>', `validation every n steps, 0 = only at the end (default ${DEFAULTS.evalInterval})`)
    .option('--eval-tokens <n>', `validation tokens per evaluation (default ${DEFAULTS.evalTokens})`)
    .option('--save-interval <n>', `checkpoint every n steps, 0 = only at the end (default ${DEFAULTS.saveInterval})`)
    .option('--no-save', 'write no checkpoint at all (timing and smoke runs; no -o); an interrupt then loses the run')
    .option('--dead-window <n>', `tokens over which a never-firing neuron counts as dead (default ${DEFAULTS.deadWindow})`)
    .option('--reinit-dead', 're-initialise the gate rows of dead neurons at the end of each window')
    .addOption(new Option('--ffn-path <path>', 'FFN kernels: auto (hybrid once sparse), dense or hybrid').choices(['auto', 'dense', 'hybrid']))
    .option('--hybrid-cutoff <x>', `auto: hybrid once mean non-zeros per token < x (default ${DEFAULTS.hybridCutoff})`)
    .option('--recheck-steps <n>', `auto: re-decide each layer's path every n steps (default ${DEFAULTS.recheckSteps})`)
    .option('--ell-width <n>', `Hybrid ELL width; heavier tokens go to the dense tail (default ${DEFAULTS.ellWidth})`)
    .option('--threads <n>', 'CPU threads (default: all cores)')
    .addOption(new Option('--backend <backend>', 'compute backend: cpu, cuda (the GPU trainer; unverified: needs SPARSELLM_CUDA_UNVERIFIED=1) or auto (= cpu)').choices(['auto', 'cpu', 'cuda']).default('auto'))
    .addOption(new Option('--matmul <precision>', 'GPU matrix products: bf16 (tensor cores, f32 accumulation; default on cuda) or f32 (the CPU trainer\'s arithmetic, slow); the CPU trainer is f32 only').choices(['bf16', 'f32']))
    .option('--json', 'one JSON object per step on stdout, then a summary object')
    .option('--plot <file.svg>', 'write an SVG of loss and sparsity over steps')
    .option('-q, --quiet', 'no live lines or human text')
    .action(async (data: string[], opts: CliOptions) => runTrain(data, opts));
}

async function writeAtomic(path: string, text: string): Promise<void> {
  const tmp = `${path}.tmp-${process.pid}`;
  await writeFile(tmp, text);
  await rename(tmp, path);
}

async function runTrain(data: string[], opts: CliOptions): Promise<void> {
  const out = new Output(opts);
  const given: Partial<TrainOptions> = opts.config ? await readConfig(opts.config) : {};
  for (const [cli, key] of NUMERIC) {
    const v = opts[cli];
    if (typeof v === 'string') (given as Record<string, unknown>)[key] = num(cli.replace(/[A-Z]/g, (c) => '-' + c.toLowerCase()), v);
  }
  if (opts.reinitDead) given.reinitDead = true;
  if (opts.ffnPath) given.ffnPath = opts.ffnPath as TrainOptions['ffnPath'];
  if (opts.init) given.init = opts.init;
  if (opts.output) given.out = opts.output;
  if (opts.save === false) given.save = false;
  if (data.length) given.data = data;
  let threads: number | undefined;
  if (opts.threads !== undefined) {
    threads = num('threads', opts.threads);
    if (!Number.isInteger(threads) || threads < 1 || threads > 4096) throw new UsageError(`--threads must be a positive integer, got '${opts.threads}'`);
  }
  const resumeDir = opts.resume ?? null;
  if (resumeDir && opts.init) throw new UsageError('--init and --resume cannot be combined (a resumed run keeps its own starting point)');
  const backend = resolveTrainBackend(opts.backend ?? 'auto'); // before the data are read
  if (opts.matmul === 'bf16' && backend !== 'cuda') throw new UsageError('--matmul bf16 needs --backend cuda (the CPU trainer multiplies in f32)');
  const matmul: TrainMatmul = opts.matmul ?? defaultMatmul(backend);
  const setup = await resolveRun(given, resumeDir, (s) => out.warn(s));

  let stopRequested = false;
  const onSigint = (): void => {
    if (stopRequested) {
      process.stderr.write('\ninterrupted again: exiting without saving (the last checkpoint is intact)\n');
      process.exit(130);
    }
    stopRequested = true;
    out.note(`\ninterrupt: finishing this step, ${setup.options.save ? 'saving, ' : ''}then exiting (Ctrl-C again to exit at once)`);
  };
  process.on('SIGINT', onSigint);
  process.on('SIGTERM', onSigint);

  const history: StepRecord[] = [];
  const plot = async (): Promise<void> => {
    if (!opts.plot) return;
    await writeAtomic(opts.plot, trainingSvg(history, `sparsellm train: λ = ${setup.options.l1}, ${setup.shape.layers}×${setup.shape.dModel} (d_ff ${setup.shape.dFF})`));
  };
  const pad = (s: string, n: number): string => s.padStart(n);
  try {
    const summary = await runTraining(
      setup,
      {
        onStart(info) {
          const o = info.options;
          history.push(...info.history);
          out.say(
            `${info.resumedFrom ? `resuming ${info.resumedFrom} at step ${info.startStep}` : o.init ? `fine-tuning ${o.init}` : 'training a new model'}: ` +
              `${info.shape.layers} layers, d_model ${info.shape.dModel}, ${info.shape.heads} heads, d_ff ${info.shape.dFF}, context ${info.shape.context}, ` +
              `vocab ${info.shape.vocab} (${info.tokenizer}), ${(info.params / 1e6).toFixed(2)}M parameters` +
              (backend === 'cuda' ? `; on the GPU, ${matmul} matmuls` : ''),
          );
          out.say(
            `data: ${info.files} file(s), ${info.trainTokens} train / ${info.valTokens} validation tokens; ` +
              `${o.steps} steps × ${o.batchTokens} tokens (${o.batchTokens / o.microBatchTokens} micro-batch(es) of ${o.microBatchTokens}), ` +
              `lr ${o.lr} (warm-up ${o.warmup}, cosine), λ ${o.l1}, seed ${o.seed} → ${o.save ? o.out : 'no checkpoint (--no-save)'}`,
          );
          if (info.recovered) out.warn(`${o.out}: restored the previous checkpoint left by an interrupted save`);
        },
        onStep(r) {
          history.splice(0, history.length, ...history.filter((h) => h.step < r.step));
          history.push(r);
          if (opts.json) process.stdout.write(JSON.stringify({ type: 'step', ...r }) + '\n');
          out.say(
            `step ${pad(String(r.step), 5)}  loss ${r.loss.toFixed(4)}  ce ${r.ce.toFixed(4)}  L1 ${r.l1.toExponential(2)}  ` +
              `lr ${r.lr.toExponential(2)}  ${pad(Math.round(r.tokensPerSec).toString(), 6)} tok/s  ` +
              `sparsity ${r.sparsity.toFixed(2)}% (${r.nnzPerToken.toFixed(1)} nnz/token)  dead ${r.dead}` +
              (r.hybridLayers ? `  hybrid ${r.hybridLayers}/${r.layerNnz.length}` : '') +
              (r.reinitialised ? `  reinit ${r.reinitialised}` : ''),
          );
        },
        onEval(step, ce, nnz) {
          out.say(`  validation at step ${step}: ce ${ce.toFixed(4)} (ppl ${Math.exp(ce).toFixed(2)}), nnz/token per layer ${nnz.map((x) => x.toFixed(1)).join(' ')}`);
        },
        async onSave(dir, step) {
          out.note(`  saved ${dir} (step ${step})`);
        },
        shouldStop: () => stopRequested,
      },
      (s) => out.warn(s),
      { threads, backend, matmul },
    );
    await plot();
    if (opts.json) process.stdout.write(JSON.stringify({ type: 'summary', ...summary }) + '\n');
    out.say(
      `${summary.stoppedEarly ? 'stopped' : 'done'} at step ${summary.steps} in ${formatDuration(summary.seconds)}: ` +
        `validation ce ${summary.valCe?.toFixed(4)}, sparsity ${summary.sparsity.toFixed(2)}% (${summary.nnzPerToken.toFixed(1)} nnz/token; ` +
        `per layer ${summary.layerNnz.map((x) => x.toFixed(1)).join(' ')}), dead ${summary.dead}, ${Math.round(summary.tokensPerSec)} tok/s, ` +
        `peak activations ${formatBytes(summary.peakActivationBytes)}` +
        (summary.peakDeviceBytes !== undefined ? `, GPU memory ${formatBytes(summary.peakDeviceBytes)}` : '') +
        ` → ${summary.checkpoint ?? 'not saved (--no-save)'}`,
    );
  } catch (e) {
    if (e instanceof SparseLlmError) throw e;
    throw new SparseLlmError((e as Error).message);
  } finally {
    process.off('SIGINT', onSigint);
    process.off('SIGTERM', onSigint);
  }
}
