// `sparsellm prune` end to end: spawns bin/sparsellm.js (needs `npm run build:ts`) on fixture
// checkpoints with the fixture tokenizer: table / --json / --csv output, packed and dense outputs
// (the dense one packs and runs with its thresholds), usage errors (exit 2), warnings, --force.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { REPO_ROOT, copyFixture } from './helpers/fixtures.js';
import { makeTempDir } from './helpers/tmp.js';
import { openPacked } from '../src/core/format/reader.js';

const BIN = join(REPO_ROOT, 'bin', 'sparsellm.js');
const TOKENIZER = join(REPO_ROOT, 'fixtures', 'tokenizer', 'tokenizer.json');

function run(args: string[]) {
  const r = spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', env: { ...process.env, OMP_NUM_THREADS: '2' } });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

let tmp: string;
let cleanup = () => undefined as void;
let relu: string;
let silu: string;
let textDir: string;

before(() => {
  ({ dir: tmp, cleanup } = makeTempDir('sllm-prune-cli-'));
  relu = copyFixture('llama-relu-gqa', tmp);
  copyFileSync(TOKENIZER, join(relu, 'tokenizer.json'));
  silu = copyFixture('llama-silu', tmp);
  copyFileSync(TOKENIZER, join(silu, 'tokenizer.json'));
  textDir = join(tmp, 'text');
  const words = 'the river and the town the water under the old stone bridge light in the window of a small house'.split(' ');
  const mk = (n: number, k: number) => Array.from({ length: n }, (_, i) => words[(i * k + (i >> 3)) % words.length]).join(' ') + '.\n';
  spawnSync('mkdir', ['-p', join(textDir, 'sub')]);
  writeFileSync(join(textDir, 'a.txt'), mk(700, 7));
  writeFileSync(join(textDir, 'sub', 'b.md'), mk(700, 5));
  writeFileSync(join(textDir, 'ignored.bin'), 'not text');
});
after(() => cleanup());

const common = () => ['--text', textDir, '--tokens', '1500', '--eval-tokens', '600', '--context', '96'];

test('calibration only: per-layer table, --json report, --csv table, --neuron-stats file', () => {
  const t = run(['prune', relu, ...common()]);
  assert.equal(t.code, 0, t.stderr);
  assert.match(t.stdout, /nnz mean/);
  assert.match(t.stdout, /held-out perplexity/);
  assert.match(t.stderr, /under 2048 the statistics are thin/);
  const stats = join(tmp, 'neurons.csv');
  const j = run(['prune', relu, ...common(), '--json', '--neuron-stats', stats]);
  assert.equal(j.code, 0, j.stderr);
  const r = JSON.parse(j.stdout);
  assert.equal(r.calibration.tokens, 1500);
  assert.deepEqual(r.calibration.files.map((f: string) => f.slice(textDir.length + 1)), ['a.txt', 'sub/b.md']);
  assert.equal(r.layers.length, 2);
  assert.equal(r.output, null);
  assert.ok(r.layers[0].before.nnzMean > 0 && r.layers[0].before.nnzMean < 300);
  assert.equal(r.layers[0].before.tileMax['64'].length, 5);
  const rows = readFileSync(stats, 'utf8').trim().split('\n');
  assert.equal(rows.length, 1 + 600);
  assert.match(rows[0]!, /^layer,neuron,source_neuron,fires/);
  const c = run(['prune', relu, ...common(), '--csv']);
  assert.equal(c.code, 0, c.stderr);
  const lines = c.stdout.trim().split('\n');
  assert.equal(lines.length, 3);
  assert.match(lines[0]!, /^layer,dFF,kept,threshold,nnz mean/);
});

test('SiLU thresholds to a dense directory: pack keeps them; infer on the packed and the directory agree', () => {
  const dir = join(tmp, 'silu-thr');
  const r = run(['prune', silu, ...common(), '--target-sparsity', '0.4', '-o', dir, '--json']);
  assert.equal(r.code, 0, r.stderr);
  const rep = JSON.parse(r.stdout);
  for (const l of rep.layers) assert.ok(Math.abs(l.sparsityReached - 0.4) <= 0.02, `layer ${l.layer}: ${l.sparsityReached}`);
  assert.equal(rep.output.format, 'dense');
  assert.ok(existsSync(join(dir, 'sparsellm_prune.json')));
  assert.ok(!readdirSync(tmp).some((n) => n.includes('.tmp-')), 'no temporary left');
  const packed = join(tmp, 'silu-thr.sllm');
  const p = run(['pack', dir, '-o', packed, '--dtype', 'f32', '-q']);
  assert.equal(p.code, 0, p.stderr);
  return openPacked(packed).then(async (pm) => {
    try {
      assert.deepEqual(pm.layers.map((l) => l.threshold), rep.layers.map((l: { threshold: number }) => l.threshold));
    } finally {
      await pm.close();
    }
    const a = run(['infer', packed, '--perplexity', join(textDir, 'a.txt'), '--context', '96', '--json']);
    const b = run(['infer', dir, '--perplexity', join(textDir, 'a.txt'), '--context', '96', '--json']);
    assert.equal(a.code, 0, a.stderr);
    assert.equal(b.code, 0, b.stderr);
    const la = JSON.parse(a.stdout).layers;
    // Thresholds applied from both: 40% of the units are zero.
    assert.ok(Math.abs(1 - la[0].nnzMean / la[0].dFF - 0.4) < 0.05, `sparsity ${1 - la[0].nnzMean / la[0].dFF}`);
    assert.ok(Math.abs(JSON.parse(b.stdout).layers[0].nnzMean - la[0].nnzMean) < 1, 'directory packed on the fly keeps the thresholds');
  });
});

test('packed output, --force, and a packed model pruned again', () => {
  const out = join(tmp, 'relu.sllm');
  let r = run(['prune', relu, ...common(), '--drop-dead', '-o', out, '-q']);
  assert.equal(r.code, 0, r.stderr);
  r = run(['prune', relu, ...common(), '--drop-dead', '-o', out]);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /already exists \(use --force/);
  r = run(['prune', relu, ...common(), '--drop-dead', '-o', out, '--force', '-q']);
  assert.equal(r.code, 0, r.stderr);
  r = run(['prune', out, ...common(), '--drop-dead', '-o', join(tmp, 'relu2.sllm'), '--json']);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(JSON.parse(r.stdout).kind, 'packed');
});

test('usage errors exit 2; other failures exit 1 with one line', () => {
  for (const bad of ['1.5', '0', '-0.2', 'x']) {
    const r = run(['prune', silu, ...common(), '--target-sparsity', bad]);
    assert.equal(r.code, 2, `--target-sparsity ${bad}: ${r.stderr}`);
    assert.match(r.stderr, /--target-sparsity must be a fraction in \(0, 1\)/);
  }
  let r = run(['prune', silu, ...common(), '--target-sparsity', '0.5', '--thresholds', '0.1']);
  assert.equal(r.code, 2);
  r = run(['prune', relu, ...common(), '--target-sparsity', '0.5']);
  assert.equal(r.code, 2);
  assert.match(r.stderr, /ReLU/);
  r = run(['prune', relu, '--text', join(tmp, 'missing.txt')]);
  assert.equal(r.code, 2);
  assert.match(r.stderr, /no such file/);
  r = run(['prune', relu, ...common(), '--tokenizer', 'byte']);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /not this model's tokenizer/);
  assert.equal(r.stderr.trim().split('\n').filter((l) => /error/.test(l)).length, 1);
  r = run(['prune', relu]);
  assert.equal(r.code, 2);
});
