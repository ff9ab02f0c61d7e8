// `sparsellm bench` end to end: spawns the real binary (dist/ must be built: `npm run build:ts`)
// with tiny shapes on the real kernels, and checks --json, --csv, --markdown, --plot and the
// usage errors (exit 2, one line).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { tempDir } from './helpers/tmp.js';

const ROOT = join(import.meta.dirname, '..');
const BIN = join(ROOT, 'bin', 'sparsellm.js');
// Tiny and awkward: d_ff not a multiple of the tile, one token (decode) and seven (batched).
const TINY = ['--d-model', '64', '--d-ff', '300', '--tokens', '1,7', '--repeats', '2', '--warmup', '0', '--min-time-ms', '1', '--threads', '2'];

function run(args: string[]) {
  const r = spawnSync(process.execPath, [BIN, 'bench', ...args], { cwd: ROOT, encoding: 'utf8', timeout: 120_000 });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

test('dist is built', () => {
  assert.ok(existsSync(join(ROOT, 'dist', 'cli', 'bench.js')), 'run `npm run build:ts` first');
});

test('bench --json: one document with machine facts and every case', () => {
  const r = run([...TINY, '--json', '--densities', '3nnz,5%,dense', '--baseline', 'openblas']);
  if (r.code !== 0 && /OpenBLAS could not be loaded/.test(r.stderr)) {
    // Without OpenBLAS the same run must say so clearly (exit 1) and work without the baseline.
    assert.equal(r.code, 1);
    return;
  }
  assert.equal(r.code, 0, r.stderr);
  const doc = JSON.parse(r.stdout);
  assert.equal(doc.tool, 'sparsellm bench');
  assert.equal(typeof doc.machine.cpu, 'string');
  assert.ok(['avx512', 'avx2', 'portable'].includes(doc.machine.isa));
  assert.equal(doc.machine.threads, 2);
  assert.ok('commit' in doc, 'bench-cli.test.ts:38');
  // forward: 3 densities × 2 token counts; train: 3 × 1 (7 tokens only); gemm: 2 token counts
  const ids = doc.cases.map((c: { id: string }) => c.id);
  assert.equal(doc.cases.length, 6 + 3 + 2, ids.join('\n'));
  assert.equal(new Set(ids).size, ids.length);
  for (const c of doc.cases) {
    assert.equal(c.backend, 'cpu');
    assert.equal(c.threads, 2);
    for (const i of c.impls) {
      assert.ok(i.medianMs > 0 && Number.isFinite(i.medianMs), `${c.id} ${i.impl}`);
      assert.equal(i.samplesMs.length, 2);
      assert.ok(i.speedup > 0 && i.gflops > 0, 'bench-cli.test.ts:49');
    }
    if (c.op === 'ffn-forward') {
      assert.deepEqual(c.impls.map((i: { impl: string }) => i.impl), ['dense', 'sparse', 'auto']);
      assert.ok(c.measured.nnzPerToken >= 0, 'bench-cli.test.ts:53');
      assert.ok(c.overflow.tiles >= 0, 'bench-cli.test.ts:54');
    }
    if (c.op === 'ffn-train') {
      assert.deepEqual(c.impls.map((i: { impl: string }) => i.impl), ['dense', 'hybrid']);
      assert.ok(c.impls.every((i: { savedBytes: number }) => i.savedBytes > 0), 'bench-cli.test.ts:58');
    }
    if (c.op === 'gemm') {
      assert.equal(c.baseline, 'openblas');
      assert.match(c.notes.join(' '), /OpenBLAS/);
    }
  }
  // The fully dense cases really are dense: every hidden unit of every token active.
  const full = doc.cases.filter((c: { op: string; density: { target: string } | null }) => c.op !== 'gemm' && c.density!.target === '100%');
  assert.ok(full.length > 0, 'bench-cli.test.ts:67');
  for (const c of full) assert.equal(c.measured.nnzPerToken, 300);
});

test('bench --csv, --markdown and --plot', (t) => {
  const dir = tempDir((f) => t.after(f));
  const svg = join(dir, 'speedup.svg');
  const r = run([...TINY, '--csv', '--densities', '2%,20%', '--plot', svg, '--quiet']);
  assert.equal(r.code, 0, r.stderr);
  const lines = r.stdout.trimEnd().split('\n');
  const head = lines[0]!.split(',');
  for (const col of ['backend', 'isa', 'threads', 'op', 'tokens', 'density_target', 'nnz_per_token', 'impl', 'median_ms', 'speedup', 'gflops_dense_equiv', 'weight_bytes', 'saved_bytes', 'overflow_tiles']) {
    assert.ok(head.includes(col), col);
  }
  // forward 2×2 cases × 3 impls + train 2 × 2 impls
  assert.equal(lines.length - 1, 4 * 3 + 2 * 2);
  for (const l of lines.slice(1)) assert.equal(l.split(',').length, head.length, l);
  assert.equal(r.stderr, '', '--quiet prints nothing on stderr');
  const doc = readFileSync(svg, 'utf8');
  assert.match(doc, /^<\?xml[^>]*>\s*<svg /);
  assert.match(doc, /<\/svg>\s*$/);
  assert.equal((doc.match(/<polyline /g) ?? []).length, 3, 'forward 1 and 7 tokens, forward+backward 7 tokens');

  const md = run([...TINY, '--markdown', '--ops', 'forward', '--densities', '5%']);
  assert.equal(md.code, 0, md.stderr);
  assert.match(md.stdout, /^\*\*FFN forward: d_model 64, d_ff 300, gated, bf16 weights/m);
  assert.match(md.stdout, /^\| cpu\/\w+\/2t \| 7 \| 5% \|/m);
});

test('bench usage errors exit 2 with a one-line message', () => {
  const cases: [string[], RegExp][] = [
    [['--densities', '5x'], /'5x' is not a density/],
    [['--densities', '7'], /bare number is a fraction/],
    [['--tokens', '0'], /--tokens must be a comma-separated list of positive integers/],
    [['--ops', 'backward'], /unknown op 'backward'/],
    [['--backend', 'cuda'], /--backend cuda: .+; use --backend cpu|no dense GPU training baseline/],
    [['--backend', 'tpu'], /Allowed choices are auto, cpu, cuda/],
    [['--dtype', 'f16'], /Allowed choices are bf16, f32/],
    [['--d-ff', '16', '--densities', '29nnz'], /29nnz is more than d_ff \(16\)/],
    [['--json', '--csv'], /exclusive/],
    [['--tokens', '1', '--ops', 'train'], /no cases to run/],
    [['--plot', 'chart.png'], /ending in \.svg/],
    [['--non-gated', '--ops', 'train', '--tokens', '4'], /--ops train: the training kernels cover gated FFNs only/],
    [['--bogus'], /unknown option '--bogus'/],
  ];
  for (const [args, msg] of cases) {
    const r = run(['--d-model', '64', '--d-ff', '300', ...args]);
    assert.equal(r.code, 2, `${args.join(' ')}: ${r.stderr}`);
    const first = r.stderr.split('\n')[0]!;
    assert.match(first, msg, args.join(' '));
    assert.match(first, /error/);
    assert.equal(r.stdout, '');
  }
});
