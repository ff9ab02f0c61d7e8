// The GPU trainer (CudaTrainer) from the JS side: `train --backend cuda` is refused with a
// one-line reason (exit 2) where no GPU is usable or SPARSELLM_CUDA_UNVERIFIED=1 is not set.
// `--matmul bf16` without the GPU backend is refused the same way. Where a GPU is usable: the
// same seed gives the CPU trainer's initial weights exactly, a few steps (dense and hybrid FFN,
// f32 matmuls) give its losses (f32 on both sides, other summation orders: 1e-4 relative) and
// updates (1e-3, as test_cuda_ops), the resume state round-trips; with bf16 matmuls the losses
// stay within bf16 rounding of the CPU's and fall as fast on a repeated batch; and
// `train --backend cuda` runs end to end (dense and hybrid, both precisions) and writes a
// checkpoint.
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { REPO_ROOT } from './helpers/fixtures.js';
import { makeTempDir } from './helpers/tmp.js';
import { runCli } from './helpers/cli.js';
import { engine } from '../src/core/native.js';
import { UsageError } from '../src/core/errors.js';
import { ModelTrainer, resolveTrainBackend, type TrainModelShape, type TrainerHyper } from '../src/core/train/engine.js';

const MOBY = join(REPO_ROOT, 'fixtures', 'text', 'moby-dick.txt');
const cuda = engine().buildInfo().cuda;
const gpu = cuda.compiled && cuda.usable && typeof (engine() as { CudaTrainer?: unknown }).CudaTrainer === 'function';
const noGpu = gpu ? false : `no usable GPU: ${cuda.reason}`;
const TINY = ['--d-model', '32', '--layers', '2', '--heads', '2', '--d-ff', '64', '--context', '32', '--batch-tokens', '128',
  '--micro-batch-tokens', '64', '--lr', '3e-3', '--l1', '1e-3', '--eval-tokens', '256', '--threads', '1'];

let tmp: string;
let cleanup = () => undefined as void;
let text: string;
before(() => {
  ({ dir: tmp, cleanup } = makeTempDir('sllm-cuda-train-'));
  text = join(tmp, 'text.txt');
  writeFileSync(text, readFileSync(MOBY, 'utf8').slice(0, 20000));
});
after(() => cleanup());

const run = (args: string[], extraEnv: Record<string, string | undefined> = {}) => runCli(args, extraEnv, 1);

test('resolveTrainBackend: auto and cpu stay on the CPU; cuda says why not', () => {
  assert.equal(resolveTrainBackend('auto', {}), 'cpu');
  assert.equal(resolveTrainBackend('cpu', {}), 'cpu');
  assert.throws(() => resolveTrainBackend('cuda', {}), (e: unknown) => {
    assert.ok(e instanceof UsageError);
    const msg = (e as Error).message;
    if (gpu) assert.match(msg, /GPU trainer has not yet been verified on a GPU; set SPARSELLM_CUDA_UNVERIFIED=1/);
    else assert.match(msg, /GPU trainer needs a usable GPU: .+; use --backend cpu/);
    return true;
  });
  const allowed = { SPARSELLM_CUDA_UNVERIFIED: '1' };
  if (gpu) assert.equal(resolveTrainBackend('cuda', allowed), 'cuda');
  else assert.throws(() => resolveTrainBackend('cuda', allowed), /needs a usable GPU/);
});

test('train --backend cuda: one clear line and exit 2 unless allowed', () => {
  const args = ['train', text, '-o', join(tmp, 'refused'), ...TINY, '--steps', '1', '--backend', 'cuda'];
  const r = run(args, { SPARSELLM_CUDA_UNVERIFIED: undefined });
  assert.equal(r.code, 2, r.stderr);
  assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
  assert.match(r.stderr, gpu ? /SPARSELLM_CUDA_UNVERIFIED=1/ : /GPU trainer needs a usable GPU/);
  assert.equal(existsSync(join(tmp, 'refused')), false);
  if (!gpu) {
    const r2 = run(args, { SPARSELLM_CUDA_UNVERIFIED: '1' });
    assert.equal(r2.code, 2, r2.stderr);
    assert.equal(r2.stderr.trim().split('\n').length, 1, r2.stderr);
    assert.match(r2.stderr, /needs a usable GPU/);
  }
  const r3 = run([...args.slice(0, -1), 'tpu']);
  assert.equal(r3.code, 2, r3.stderr);
});

const SHAPE: TrainModelShape = { vocab: 61, dModel: 24, layers: 2, heads: 3, dFF: 40, context: 16, ropeTheta: 10000, normEps: 1e-5 };
const HYPER: TrainerHyper = {
  beta1: 0.9, beta2: 0.95, eps: 1e-8, weightDecay: 0.1, clip: 0.5, l1: 0.02, ffnPath: 'dense', hybridCutoff: 50,
  recheckSteps: 20, ellWidth: 128, deadWindow: 1000, reinitDead: false, initStd: 0.02, seed: 7,
};

function rel(a: Float32Array, b: Float32Array): number {
  let num = 0;
  let den = 0;
  for (let i = 0; i < a.length; i++) {
    num += (a[i]! - b[i]!) ** 2;
    den += b[i]! ** 2;
  }
  return Math.sqrt(num / den);
}

for (const ffnPath of ['dense', 'hybrid'] as const) test(`CudaTrainer follows the CPU Trainer (${ffnPath} FFN): init, steps, state`, { skip: noGpu }, () => {
  const hyper = { ...HYPER, ffnPath, ellWidth: 20 };
  const cpu = new ModelTrainer(SHAPE, hyper, 'cpu');
  const dev = new ModelTrainer(SHAPE, hyper, 'cuda', 'f32');
  cpu.initWeights();
  dev.initWeights();
  assert.deepEqual(dev.tensors, cpu.tensors);
  const w0 = new Map<string, Float32Array>();
  for (const { name } of cpu.tensors) {
    const a = cpu.getTensor(name);
    assert.deepEqual(dev.getTensor(name), a, `${name}: the same seed gives other weights`);
    w0.set(name, a);
  }
  const nMicro = 2;
  const B = 2;
  const T = 9;
  for (let s = 0; s < 3; s++) {
    const tok = Int32Array.from({ length: nMicro * B * (T + 1) }, (_, i) => (i * 31 + s * 7 + 3) % SHAPE.vocab);
    const a = cpu.step(tok, nMicro, B, T, 3e-3);
    const b = dev.step(tok, nMicro, B, T, 3e-3);
    assert.ok(Math.abs(a.loss - b.loss) <= 1e-4 * Math.abs(a.loss), `step ${s}: loss ${b.loss} vs ${a.loss}`);
    assert.ok(Math.abs(a.gradNorm - b.gradNorm) <= 1e-3 * a.gradNorm, `step ${s}: grad norm ${b.gradNorm} vs ${a.gradNorm}`);
    assert.deepEqual(b.layers.map((l) => l.hybrid), a.layers.map((l) => l.hybrid));
    assert.deepEqual(b.layers.map((l) => l.hybrid), [ffnPath === 'hybrid', ffnPath === 'hybrid']);
  }
  for (const { name } of cpu.tensors) {
    const start = w0.get(name)!;
    const ua = cpu.getTensor(name).map((v, i) => v - start[i]!);
    const ub = dev.getTensor(name).map((v, i) => v - start[i]!);
    assert.ok(rel(ub, ua) < 1e-3, `${name}: update rel error ${rel(ub, ua)}`);
  }
  const st = dev.getState();
  assert.equal(st.step, 3);
  assert.equal(st.m.length, dev.paramCount);
  const m2 = Float32Array.from(st.m, (x) => x * 0.5);
  dev.setState({ ...st, m: m2 });
  assert.deepEqual(dev.getState().m, m2);
  const e1 = cpu.evaluate(Int32Array.from({ length: 2 * (T + 1) }, (_, i) => (i * 5 + 1) % SHAPE.vocab), 2, T);
  const e2 = dev.evaluate(Int32Array.from({ length: 2 * (T + 1) }, (_, i) => (i * 5 + 1) % SHAPE.vocab), 2, T);
  assert.ok(Math.abs(e1.ce - e2.ce) <= 1e-3 * e1.ce, `evaluate ce ${e2.ce} vs ${e1.ce}`);
});

test('bf16 matmuls are for the GPU trainer only: the CPU one refuses them', () => {
  assert.throws(() => new ModelTrainer(SHAPE, HYPER, 'cpu', 'bf16'), (e: unknown) => e instanceof UsageError && /f32 only/.test((e as Error).message));
  const out = join(tmp, 'refused-bf16');
  const r = run(['train', text, '-o', out, ...TINY, '--steps', '1', '--matmul', 'bf16']);
  assert.equal(r.code, 2, r.stderr);
  assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
  assert.match(r.stderr, /--matmul bf16 needs --backend cuda/);
  assert.equal(existsSync(out), false);
});

// bf16 operands: each product is off by ~2^-9 relative, so the losses by ~1e-3; 2e-2 leaves room
// for the units that flip sign near zero. Eight steps on one batch must lower the loss about as
// much as the CPU's f32 steps do (a wrong gradient would not). Heads of 64 (WIDE) take the flash
// forward attention (two query tiles of 64, the second ragged).
const WIDE: TrainModelShape = { ...SHAPE, dModel: 128, heads: 2, dFF: 96, context: 80 };
for (const [ffnPath, shape, T] of [['dense', SHAPE, 12], ['hybrid', SHAPE, 12], ['hybrid', WIDE, 70]] as const) test(`CudaTrainer with bf16 matmuls tracks the CPU Trainer (${ffnPath} FFN, heads of ${shape.dModel / shape.heads})`, { skip: noGpu }, () => {
  const hyper = { ...HYPER, ffnPath, ellWidth: 20 };
  const cpu = new ModelTrainer(shape, hyper, 'cpu');
  const dev = new ModelTrainer(shape, hyper, 'cuda');
  assert.equal(dev.matmul, 'bf16');
  cpu.initWeights();
  dev.initWeights();
  const B = 2;
  const tok = Int32Array.from({ length: B * (T + 1) }, (_, i) => (i * 17 + 5) % shape.vocab);
  const first = { cpu: 0, dev: 0 };
  const last = { cpu: 0, dev: 0 };
  for (let s = 0; s < 8; s++) {
    const a = cpu.step(tok, 1, B, T, 1e-2);
    const b = dev.step(tok, 1, B, T, 1e-2);
    if (s === 0) Object.assign(first, { cpu: a.loss, dev: b.loss });
    Object.assign(last, { cpu: a.loss, dev: b.loss });
    if (s < 3) assert.ok(Math.abs(a.loss - b.loss) <= 2e-2 * a.loss, `step ${s}: loss ${b.loss} vs ${a.loss}`);
  }
  const dropCpu = first.cpu - last.cpu;
  const dropDev = first.dev - last.dev;
  assert.ok(dropCpu > 0.05 * first.cpu, `the CPU trainer did not learn the batch: ${first.cpu} -> ${last.cpu}`);
  assert.ok(Math.abs(dropDev - dropCpu) <= 0.2 * dropCpu, `loss drop over 8 steps: ${dropDev} (bf16 GPU) vs ${dropCpu} (CPU)`);
});

for (const [ffnPath, matmul] of [['dense', 'f32'], ['hybrid', 'bf16']] as const) test(`train --backend cuda end to end (${ffnPath} FFN, ${matmul} matmuls)`, { skip: noGpu }, () => {
  const out = join(tmp, `gpu-run-${ffnPath}`);
  const r = run(['train', text, '-o', out, ...TINY, '--steps', '3', '--ffn-path', ffnPath, '--backend', 'cuda', '--matmul', matmul, '--json'], { SPARSELLM_CUDA_UNVERIFIED: '1' });
  assert.equal(r.code, 0, r.stderr);
  const lines = r.stdout.trim().split('\n').map((l) => JSON.parse(l) as { type: string; finalLoss?: number; peakDeviceBytes?: number });
  assert.equal(lines.filter((l) => l.type === 'step').length, 3);
  const summary = lines.find((l) => l.type === 'summary');
  assert.ok(summary && Number.isFinite(summary.finalLoss), r.stdout);
  assert.ok((summary.peakDeviceBytes ?? 0) > 0, `peakDeviceBytes ${summary.peakDeviceBytes}`);
  assert.ok(existsSync(join(out, 'config.json')) && existsSync(join(out, 'model.safetensors')));
});
