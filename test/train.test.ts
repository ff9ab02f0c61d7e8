// `sparsellm train` end to end (spawns bin/sparsellm.js: needs `npm run build:ts` and the addon)
// on tiny models, plus the data pipeline and schedule. The engine's numerics (gradients vs
// float64 finite differences, hybrid == dense, AdamW) are tested in native/tests/test_train.cpp.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync, renameSync, truncateSync, writeFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { REPO_ROOT, copyFixture } from './helpers/fixtures.js';
import { makeTempDir } from './helpers/tmp.js';
import { openCheckpoint } from '../src/core/checkpoint/index.js';
import { SafetensorsFile } from '../src/core/checkpoint/safetensors.js';
import { ByteTokenizer } from '../src/core/tokenizer/index.js';
import { loadCorpus, trainBatch, validationBatches } from '../src/core/train/data.js';
import { learningRate } from '../src/core/train/schedule.js';
import { recoverCheckpoint } from '../src/core/train/checkpoint.js';

const BIN = join(REPO_ROOT, 'bin', 'sparsellm.js');
const MOBY = join(REPO_ROOT, 'fixtures', 'text', 'moby-dick.txt');
const TOKENIZER = join(REPO_ROOT, 'fixtures', 'tokenizer', 'tokenizer.json');
const ENV = { ...process.env, OMP_NUM_THREADS: '1' };

function run(args: string[]) {
  const r = spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', env: ENV });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

let tmp: string;
let cleanup = () => undefined as void;
let text: string;
const TINY = ['--d-model', '32', '--layers', '2', '--heads', '2', '--d-ff', '64', '--context', '32', '--batch-tokens', '128',
  '--micro-batch-tokens', '64', '--lr', '3e-3', '--l1', '1e-3', '--eval-tokens', '256', '--threads', '1'];

before(() => {
  ({ dir: tmp, cleanup } = makeTempDir('sllm-train-'));
  text = join(tmp, 'text.txt');
  writeFileSync(text, readFileSync(MOBY, 'utf8').slice(0, 60000));
});
after(() => cleanup());

async function tensors(path: string): Promise<Map<string, Buffer>> {
  const f = await SafetensorsFile.open(path, { dtypes: ['F32', 'U8'] });
  const out = new Map<string, Buffer>();
  for (const n of f.names()) out.set(n, Buffer.from(await f.readTensorBytes(n)));
  await f.close();
  return out;
}

test('data: deterministic split and batches; empty and tiny corpora are refused', async () => {
  const tok = new ByteTokenizer();
  const c = await loadCorpus([text], tok, 32);
  assert.ok(c.val.length >= 33 && c.train.length > c.val.length);
  assert.equal(c.train.length + c.val.length, Buffer.byteLength(readFileSync(text, 'utf8')) + 1); // + end of text
  const a = trainBatch(c.train, 7, 3, 4, 32);
  assert.deepEqual(a, trainBatch(c.train, 7, 3, 4, 32));
  assert.notDeepEqual(a, trainBatch(c.train, 7, 4, 4, 32));
  const v = validationBatches(c.val, 32, 3, 1000);
  assert.ok(v.length >= 1 && v.every((b) => b.tokens.length === b.B * 33));
  const empty = join(tmp, 'empty');
  mkdirSync(empty, { recursive: true });
  writeFileSync(join(empty, 'a.txt'), '');
  await assert.rejects(loadCorpus([empty], tok, 32), /corpus is empty/);
  writeFileSync(join(empty, 'a.txt'), 'short');
  await assert.rejects(loadCorpus([empty], tok, 32), /too small/);
});

test('schedule: linear warm-up then cosine to minRatio', () => {
  const s = { lr: 1e-3, warmup: 10, steps: 110, minRatio: 0.1 };
  assert.ok(Math.abs(learningRate(s, 0) - 1e-4) < 1e-12);
  assert.ok(Math.abs(learningRate(s, 9) - 1e-3) < 1e-12);
  assert.ok(Math.abs(learningRate(s, 10) - 1e-3) < 1e-12);
  assert.ok(Math.abs(learningRate(s, 60) - 0.55e-3) < 1e-12);
  assert.ok(Math.abs(learningRate(s, 110) - 1e-4) < 1e-12);
});

test('train: JSON per step, loss falls, HF checkpoint reads back, packs and infers', async () => {
  const out = join(tmp, 'run1');
  const svg = join(tmp, 'run1.svg');
  const r = run(['train', text, '-o', out, ...TINY, '--steps', '30', '--eval-interval', '10', '--json', '--plot', svg]);
  assert.equal(r.code, 0, r.stderr);
  const lines = r.stdout.trim().split('\n').map((l) => JSON.parse(l));
  const steps = lines.filter((l) => l.type === 'step');
  assert.equal(steps.length, 30);
  for (const k of ['loss', 'ce', 'l1', 'lr', 'tokensPerSec', 'sparsity', 'nnzPerToken', 'dead']) assert.equal(typeof steps[0][k], 'number', k);
  assert.equal(steps.filter((s) => s.valCe !== undefined).length, 3);
  assert.ok(steps[29].ce < steps[0].ce - 1, `ce ${steps[0].ce} -> ${steps[29].ce}`);
  const summary = lines.at(-1);
  assert.equal(summary.type, 'summary');
  assert.equal(summary.steps, 30);
  assert.match(r.stderr, /step +30 +loss/);
  assert.match(readFileSync(svg, 'utf8'), /^<svg[^]*validation CE[^]*<\/svg>\n$/);
  const cfg = JSON.parse(readFileSync(join(out, 'config.json'), 'utf8'));
  assert.equal(cfg.model_type, 'llama');
  assert.equal(cfg.hidden_act, 'relu');
  assert.equal(cfg.tie_word_embeddings, true);
  const ck = await openCheckpoint(out);
  assert.equal(ck.spec.activation, 'relu');
  assert.equal(ck.spec.dModel, 32);
  assert.equal(ck.spec.vocabSize, 257);
  assert.equal(ck.spec.tiedEmbeddings, true);
  const emb = await ck.readF32('embed.weight');
  assert.equal(emb.length, 257 * 32);
  assert.ok(emb.every(Number.isFinite));
  await ck.close();
  const packed = join(tmp, 'run1.sllm');
  let p = run(['pack', out, '-o', packed, '-q']);
  assert.equal(p.code, 0, p.stderr);
  p = run(['infer', packed, '-p', 'Call me', '-n', '8', '-t', '0', '--json']);
  assert.equal(p.code, 0, p.stderr);
  const res = JSON.parse(p.stdout);
  assert.equal(typeof res.text, 'string');
  p = run(['infer', out, '--perplexity', text, '--context', '32', '--json']);
  assert.equal(p.code, 0, p.stderr);
});

test('resume: N steps + resume N steps gives the same weights and optimizer state as 2N straight', async () => {
  const extra = ['--recheck-steps', '2', '--hybrid-cutoff', '1e9', '--dead-window', '300', '--reinit-dead', '--seed', '5'];
  const a = join(tmp, 'straight');
  let r = run(['train', text, '-o', a, ...TINY, ...extra, '--steps', '8', '-q']);
  assert.equal(r.code, 0, r.stderr);
  const b = join(tmp, 'split');
  r = run(['train', text, '-o', b, ...TINY, ...extra, '--steps', '8', '--stop-at', '4', '-q']);
  assert.equal(r.code, 0, r.stderr);
  const meta = (await SafetensorsFile.open(join(b, 'training_state.safetensors'), { dtypes: ['F32', 'U8'] }));
  assert.equal(JSON.parse(meta.metadata['sparsellm.train']!).step, 4);
  await meta.close();
  r = run(['train', '--resume', b, '--json', '--threads', '1']);
  assert.equal(r.code, 0, r.stderr);
  const steps = r.stdout.trim().split('\n').map((l) => JSON.parse(l)).filter((l) => l.type === 'step');
  assert.deepEqual(steps.map((s) => s.step), [5, 6, 7, 8]);
  assert.ok(steps.some((s) => s.hybridLayers > 0), 'the resumed run must have crossed into the hybrid path');
  for (const f of ['model.safetensors', 'training_state.safetensors']) {
    const ta = await tensors(join(a, f));
    const tb = await tensors(join(b, f));
    assert.deepEqual([...ta.keys()], [...tb.keys()]);
    for (const [n, buf] of ta) assert.ok(buf.equals(tb.get(n)!), `${f}: ${n} differs after resume`);
  }
});

test('--init: fine-tunes a Hugging Face Llama checkpoint with its tokenizer, gate switched to ReLU', async () => {
  const src = copyFixture('llama-silu', tmp);
  copyFileSync(TOKENIZER, join(src, 'tokenizer.json'));
  const ascii = join(tmp, 'ascii.txt');
  writeFileSync(ascii, readFileSync(text, 'utf8').replace(/[^\x20-\x7e\n]/g, ' '));
  const out = join(tmp, 'ft');
  const r = run(['train', ascii, '--init', src, '-o', out, '--steps', '3', '--context', '32', '--batch-tokens', '64', '--micro-batch-tokens', '64', '--eval-tokens', '64', '--threads', '1']);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stderr + r.stdout, /switches it to ReLU/);
  const ck = await openCheckpoint(out);
  assert.equal(ck.spec.activation, 'relu');
  assert.equal(ck.spec.dModel, 64);
  assert.equal(ck.spec.vocabSize, 256);
  await ck.close();
  assert.ok(existsSync(join(out, 'tokenizer.json')));
  const bad = run(['train', ascii, '--init', src, '-o', join(tmp, 'ft2'), '--d-model', '128']);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /--d-model 128 contradicts the --init checkpoint/);
});

test('--config: YAML and JSON files set options; flags override them; unknown keys are refused', () => {
  const yml = join(tmp, 'cfg.yaml');
  writeFileSync(yml, `d-model: 32\nlayers: 1\nheads: 2\ndFF: 48\ncontext: 32\nbatch-tokens: 64\nmicro-batch-tokens: 64\nsteps: 2\nl1: 0.001\neval-tokens: 64\ndata: [${JSON.stringify(text)}]\n`);
  const out = join(tmp, 'cfgrun');
  const r = run(['train', '--config', yml, '-o', out, '--steps', '3', '--json', '--threads', '1']);
  assert.equal(r.code, 0, r.stderr);
  const steps = r.stdout.trim().split('\n').map((l) => JSON.parse(l)).filter((l) => l.type === 'step');
  assert.equal(steps.length, 3);
  const cfg = JSON.parse(readFileSync(join(out, 'config.json'), 'utf8'));
  assert.equal(cfg.intermediate_size, 48);
  assert.equal(cfg.num_hidden_layers, 1);
  const js = join(tmp, 'cfg.json');
  writeFileSync(js, JSON.stringify({ 'd-model': 32, bogus: 1 }));
  const bad = run(['train', text, '--config', js, '-o', join(tmp, 'cfgbad')]);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /unknown option 'bogus'/);
});

test('--no-save: trains without -o and writes nothing; the summary names no checkpoint', () => {
  const cwd = join(tmp, 'nosave-cwd');
  mkdirSync(cwd, { recursive: true });
  const r = spawnSync(process.execPath, [BIN, 'train', text, ...TINY, '--steps', '3', '--save-interval', '1', '--no-save', '--json'], { encoding: 'utf8', env: ENV, cwd });
  assert.equal(r.status, 0, r.stderr);
  const lines = r.stdout.trim().split('\n').map((l) => JSON.parse(l));
  assert.equal(lines.filter((l) => l.type === 'step').length, 3);
  const summary = lines.find((l) => l.type === 'summary');
  assert.equal(summary.checkpoint, null);
  assert.ok(Number.isFinite(summary.valCe) && summary.valCe > 0);
  assert.deepEqual(readdirSync(cwd), []);
  assert.doesNotMatch(r.stderr, /^\s+saved /m);
});

test('bad inputs: one-line errors', () => {
  const cases: [string[], number, RegExp][] = [
    [['train', text, '-o', join(tmp, 'x'), '--lr', '-1'], 2, /--lr must be a number in \[0, 1\]/],
    [['train', text, '-o', join(tmp, 'x'), '--l1', '5'], 2, /--l1 must be a number in \[0, 1\]/],
    [['train', text, '-o', join(tmp, 'x'), '--micro-batch-tokens', '100'], 2, /multiple of --context/],
    [['train', text, '-o', join(tmp, 'x'), '--d-model', '30', '--heads', '4'], 2, /multiple of --heads/],
    [['train', text, '-o', join(tmp, 'x'), '--no-save'], 2, /--no-save writes no checkpoint, so -o .*x has nothing to hold/],
    [['train', text], 2, /output directory is required/],
    [['train', join(tmp, 'nope.txt'), '-o', join(tmp, 'x')], 2, /no such file or directory/],
    [['train', '--resume', join(tmp, 'run1'), '--d-model', '64'], 2, /--d-model 64 contradicts the checkpoint/],
    [['train', '--resume', join(tmp, 'nope')], 1, /nope/],
  ];
  const emptyDir = join(tmp, 'emptycorpus');
  mkdirSync(emptyDir, { recursive: true });
  writeFileSync(join(emptyDir, 'e.txt'), '');
  cases.push([['train', emptyDir, '-o', join(tmp, 'x')], 1, /corpus is empty/]);
  for (const [args, code, re] of cases) {
    const r = run(args);
    assert.equal(r.code, code, `${args.join(' ')}: ${r.stderr}`);
    assert.match(r.stderr, re, args.join(' '));
    assert.equal(r.stderr.trim().split('\n').length, 1, `${args.join(' ')}: more than one line:\n${r.stderr}`);
  }
  assert.ok(!existsSync(join(tmp, 'x')));
});

test('corrupted checkpoint: resume refuses it with a one-line error naming the file', () => {
  const a = join(tmp, 'straight');
  const c = join(tmp, 'corrupt');
  mkdirSync(c);
  for (const f of ['config.json', 'model.safetensors', 'training_state.safetensors', 'tokenizer.json', 'tokenizer_config.json']) copyFileSync(join(a, f), join(c, f));
  truncateSync(join(c, 'training_state.safetensors'), statSync(join(c, 'training_state.safetensors')).size - 100);
  let r = run(['train', '--resume', c]);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /training_state\.safetensors/);
  assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
  copyFileSync(join(a, 'training_state.safetensors'), join(c, 'training_state.safetensors'));
  truncateSync(join(c, 'model.safetensors'), 1000);
  r = run(['train', '--resume', c]);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /model\.safetensors/);
  assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
});

test('interrupted save: the previous checkpoint is restored; Ctrl-C saves and exits cleanly', async () => {
  const d = join(tmp, 'swap');
  mkdirSync(`${d}.old`, { recursive: true });
  writeFileSync(join(`${d}.old`, 'config.json'), '{}');
  assert.equal(await recoverCheckpoint(d), true);
  assert.ok(existsSync(join(d, 'config.json')) && !existsSync(`${d}.old`));
  renameSync(d, join(tmp, 'swap-moved'));

  const out = join(tmp, 'sigint');
  const child = spawn(process.execPath, [BIN, 'train', text, '-o', out, ...TINY, '--steps', '100000', '--json'], { env: ENV });
  let stdout = '';
  let stderr = '';
  child.stderr.on('data', (b) => (stderr += b));
  const code = await new Promise<number | null>((resolve) => {
    child.stdout.on('data', (b) => {
      stdout += b;
      if (stdout.split('\n').length > 3 && !child.killed) child.kill('SIGINT');
    });
    child.on('exit', (c) => resolve(c));
  });
  assert.equal(code, 0, stderr);
  const lines = stdout.trim().split('\n').map((l) => JSON.parse(l));
  const summary = lines.at(-1);
  assert.equal(summary.type, 'summary');
  assert.equal(summary.stoppedEarly, true);
  const f = await SafetensorsFile.open(join(out, 'training_state.safetensors'), { dtypes: ['F32', 'U8'] });
  assert.equal(JSON.parse(f.metadata['sparsellm.train']!).step, summary.steps);
  await f.close();
});
