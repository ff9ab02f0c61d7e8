// Markdown table of an L1 sweep made by scripts/l1-sweep.sh: per λ, the final validation
// cross-entropy (and its change relative to λ = 0), validation non-zeros per token per layer,
// sparsity, dead neurons and training tokens/s, read from each run's --json log, human log and config.
//   node --import tsx scripts/sweep-table.ts OUTDIR λ...
import { readFileSync } from 'node:fs';
import { join } from 'node:path';

const [dir, ...lambdas] = process.argv.slice(2);
if (!dir || !lambdas.length) throw new Error('usage: sweep-table.ts OUTDIR λ...');
const rows: string[] = [];
let base: number | null = null;
for (const l of lambdas) {
  const lines = readFileSync(join(dir!, `l${l}.jsonl`), 'utf8').trim().split('\n').map((s) => JSON.parse(s));
  const summary = lines.at(-1);
  const steps = lines.filter((x) => x.type === 'step');
  const last = steps.at(-1);
  // validation non-zeros per layer: the last "validation at step" line of the human log
  const val = readFileSync(join(dir!, `l${l}.err`), 'utf8').split('\n').filter((s) => s.includes('validation at step')).at(-1)!;
  const perLayer = val.replace(/.*per layer /, '').trim().split(/\s+/).map(Number);
  const mean = perLayer.reduce((a, b) => a + b, 0) / perLayer.length;
  const dFF = JSON.parse(readFileSync(join(dir!, `l${l}`, 'config.json'), 'utf8')).intermediate_size as number;
  if (Number(l) === 0) base = summary.valCe;
  const rel = base ? ((summary.valCe / base - 1) * 100).toFixed(1) + '%' : '–';
  rows.push(
    `| ${l} | ${summary.valCe.toFixed(4)} | ${rel} | ${last.ce.toFixed(4)} | ${perLayer.map((x) => x.toFixed(1)).join(' / ')} | ${mean.toFixed(1)} | ${(100 * (1 - mean / dFF)).toFixed(2)}% | ${summary.dead} | ${Math.round(summary.tokensPerSec)} |`,
  );
}
process.stdout.write(
  '| λ | val CE | vs λ=0 | train CE (last step) | val nnz/token per layer (of 512) | mean | sparsity | dead | train tok/s |\n' +
    '| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n' +
    rows.join('\n') +
    '\n',
);
