// `sparsellm prune <model> --text <files|dirs>`: calibration statistics per layer, and with
// --drop-dead / --target-sparsity / --thresholds a pruned model written to -o (a .sllm packed
// model, or a dense Hugging Face checkpoint directory). The work is in src/core/prune.
import { InvalidArgumentError, Option, type Command } from 'commander';
import { UsageError } from '../core/errors.js';
import { setThreads } from '../core/native.js';
import type { StorageDType } from '../core/format/metadata.js';
import { prune, isPackedOutput, type PruneReport } from '../core/prune/index.js';
import { parsePositiveInt } from './options.js';
import { Output, formatBytes } from './ui.js';
import { VERSION } from './version.js';

interface PruneCliOptions {
  text: string[];
  tokens?: number;
  context?: number;
  eval?: string[];
  evalTokens?: number;
  dropDead?: boolean;
  targetSparsity?: number;
  thresholds?: number[];
  twellHeadroom?: number;
  twellCoverage?: number;
  output?: string;
  dtype?: 'bf16' | 'f16' | 'f32';
  force?: boolean;
  tokenizer?: string;
  neuronStats?: string;
  threads?: number;
  json?: boolean;
  csv?: boolean;
  quiet?: boolean;
}

function parseSparsity(value: string): number {
  const n = Number(value);
  if (!Number.isFinite(n) || !(n > 0 && n < 1)) throw new InvalidArgumentError(`--target-sparsity must be a fraction in (0, 1), e.g. 0.5; got '${value}'`);
  return n;
}

function parseThresholds(value: string): number[] {
  const parts = value.split(',').map((s) => s.trim());
  const out = parts.map(Number);
  if (!parts.length || parts.some((p) => p === '') || out.some((x) => !Number.isFinite(x) || x < 0)) {
    throw new InvalidArgumentError(`--thresholds must be one number >= 0, or one per layer separated by commas; got '${value}'`);
  }
  return out;
}

function parseCoverage(value: string): number {
  const n = Number(value);
  if (!Number.isFinite(n) || !(n > 0 && n <= 1)) throw new InvalidArgumentError(`--twell-coverage must be a fraction in (0, 1], got '${value}'`);
  return n;
}

function parseHeadroom(value: string): number {
  const n = Number(value);
  if (!Number.isFinite(n) || n < 1) throw new InvalidArgumentError(`--twell-headroom must be a number >= 1, got '${value}'`);
  return n;
}

export function registerPrune(program: Command): void {
  program
    .command('prune')
    .description('calibrate on text; drop neurons that never fire, set activation thresholds (silu/gelu), choose TwELL parameters; write a pruned model')
    .argument('<model>', 'a Hugging Face checkpoint (directory or .safetensors) or a packed .sllm model')
    .requiredOption('--text <paths...>', 'calibration text: files, or directories of .txt/.md files')
    .option('--tokens <n>', 'calibration tokens (the first n of the text; default 16384)', parsePositiveInt('--tokens'))
    .option('--context <n>', 'tokens per calibration window (default: 512 or the model maximum)', parsePositiveInt('--context'))
    .option('--eval <paths...>', 'held-out text for perplexity before/after (default: the text after the calibration tokens)')
    .option('--eval-tokens <n>', 'held-out tokens at most (default 4096)', parsePositiveInt('--eval-tokens'))
    .option('--drop-dead', 'remove neurons that never fire on the calibration text (exact there for ReLU and thresholded models)')
    .option('--target-sparsity <s>', 'silu/gelu models: per-layer activation cut-offs so that a fraction s of the hidden units is zero', parseSparsity)
    .option('--thresholds <a,b,...>', 'silu/gelu models: explicit cut-offs, one for all layers or one per layer', parseThresholds)
    .option('--twell-coverage <q>', 'TwELL: fraction of (token, tile) pairs whose count the capacity must hold (default 0.999; 1 = the largest seen)', parseCoverage)
    .option('--twell-headroom <h>', 'TwELL capacity = that count × h (default 1.5)', parseHeadroom)
    .option('-o, --output <path>', 'write the result: a packed model (name ending in .sllm) or a dense checkpoint directory')
    .addOption(new Option('--dtype <dtype>', 'storage dtype of a packed output (default bf16, or the packed input\'s)').choices(['bf16', 'f16', 'f32']))
    .option('--force', 'overwrite the output if it exists')
    .option('--tokenizer <path>', 'tokenizer.json (or a directory holding one, or "byte") when the model has none or to override it')
    .option('--neuron-stats <file.csv>', 'write per-neuron statistics of the input model (firing counts, |act| and |h| mean/max) as CSV')
    .option('--threads <n>', 'CPU threads (default: all cores)', parsePositiveInt('--threads'))
    .option('--json', 'print the full report as JSON on stdout (human text goes to stderr)')
    .option('--csv', 'print the per-layer table as CSV on stdout')
    .option('-q, --quiet', 'no progress or human text')
    .action(async (model: string, opts: PruneCliOptions) => runPrune(model, opts));
}

const pct = (x: number | null | undefined): string => (x === null || x === undefined ? '-' : `${(100 * x).toFixed(1)}%`);
const num = (x: number, digits = 1): string => x.toFixed(digits);
const fmtThr = (t: number | null): string => (t === null ? '-' : t === 0 ? '0' : t.toPrecision(4));

function layerRows(r: PruneReport): { head: string[]; rows: (string | number)[][] } {
  const head = ['layer', 'dFF', 'kept', 'threshold', 'nnz mean', 'nnz p99', 'nnz max', 'sparsity', 'dead', 'tile T', 'C', 'cap', 'tile max', 'overflow'];
  const rows = r.layers.map((l) => {
    const s = l.after ?? l.before;
    return [
      l.layer,
      l.dFFIn,
      l.dFFOut,
      fmtThr(l.threshold),
      num(s.nnzMean),
      s.nnzP99,
      s.nnzMax,
      pct(l.sparsityReached ?? l.before.sparsity),
      l.before.dead,
      l.twell.tileWidth,
      l.twell.compression,
      l.twell.capacity,
      l.twell.observedTileMax,
      l.twell.overflowRate === 0 ? '0' : `${(100 * l.twell.overflowRate).toPrecision(2)}%`,
    ];
  });
  return { head, rows };
}

function csvCell(v: string | number): string {
  const s = String(v);
  return /[",\n]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}

async function runPrune(model: string, opts: PruneCliOptions): Promise<void> {
  if (opts.json && opts.csv) throw new UsageError('--json and --csv are exclusive');
  if (opts.targetSparsity !== undefined && opts.thresholds !== undefined) throw new UsageError('--target-sparsity and --thresholds are exclusive');
  if (opts.dtype && opts.output && !isPackedOutput(opts.output)) throw new UsageError('--dtype applies to a packed output (-o name.sllm)');
  // With --csv, stdout carries the table: human text goes to stderr as with --json.
  const out = new Output({ json: opts.json || opts.csv, quiet: opts.quiet });
  setThreads(opts.threads);
  const report = await prune(model, {
    text: opts.text,
    tokens: opts.tokens,
    context: opts.context,
    evalText: opts.eval,
    evalTokens: opts.evalTokens,
    dropDead: opts.dropDead,
    targetSparsity: opts.targetSparsity,
    thresholds: opts.thresholds,
    twellHeadroom: opts.twellHeadroom,
    twellCoverage: opts.twellCoverage,
    output: opts.output,
    dtype: opts.dtype ? (opts.dtype.toUpperCase() as StorageDType) : undefined,
    force: opts.force,
    tokenizer: opts.tokenizer,
    neuronStats: opts.neuronStats,
    toolVersion: VERSION,
    onNotice: (s) => out.note(s),
    onWarning: (s) => out.warn(s),
    onProgress: (label, total) => out.progress(label, total, 'items'),
  });
  if (opts.json) {
    out.result(report);
    return;
  }
  const { head, rows } = layerRows(report);
  if (opts.csv) {
    const lines = [head, ...rows].map((r) => r.map(csvCell).join(','));
    process.stdout.write(lines.join('\n') + '\n');
    return;
  }
  out.say(
    `${report.model}: ${report.architecture}, ${report.activation} FFN, ${report.layers.length} layers; calibration ${report.calibration.tokens} tokens in windows of ${report.calibration.context}`,
  );
  out.table(head, rows);
  const t = report.totals;
  out.say(`FFN width ${t.dFFIn} → ${t.dFFOut} (${t.removed} neurons removed); sparsity ${pct(t.sparsityBefore)} → ${pct(t.sparsityAfter ?? t.sparsityBefore)}`);
  if (report.perplexityBefore) {
    const b = report.perplexityBefore.perplexity;
    const a = report.perplexityAfter?.perplexity;
    const where = `held-out perplexity (${report.heldOut.tokens} tokens, ${report.heldOut.source === 'eval' ? '--eval' : 'text after the calibration tokens'})`;
    if (!Number.isFinite(b) || (a !== undefined && !Number.isFinite(a))) {
      // A model that gives some held-out token zero probability in f32 (e.g. synthetic weights).
      out.say(`${where}: not finite (mean NLL ${report.perplexityBefore.nll.toFixed(3)}` + (a !== undefined ? ` → ${report.perplexityAfter!.nll.toFixed(3)}` : '') + ' nats)');
    } else {
      out.say(`${where}: ${b.toFixed(4)}` + (a !== undefined ? ` → ${a.toFixed(4)} (${a >= b ? '+' : ''}${((100 * (a - b)) / b).toFixed(3)}%)` : ''));
    }
  }
  if (report.calibrationLogitMaxDiff !== null) {
    out.say(`logits on the first calibration window: max |difference| ${report.calibrationLogitMaxDiff.toExponential(2)} (relative ${report.calibrationLogitRelDiff!.toExponential(2)})`);
  }
  if (report.output) {
    out.say(`wrote ${report.output.path} (${report.output.format === 'packed' ? `packed, ${report.output.dtype}` : 'dense checkpoint'}, ${formatBytes(report.output.bytes)})`);
  } else if (report.layers.some((l) => l.removed > 0 || l.threshold !== l.thresholdIn)) {
    out.note('nothing written (give -o model.sllm or -o directory to keep the result)');
  }
}
