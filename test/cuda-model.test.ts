// The CUDA model runtime from the JS side: `--backend cuda` is refused with a one-line reason
// (exit 2) where no GPU is usable or SPARSELLM_CUDA_UNVERIFIED=1 is not set; where a GPU is
// usable, ModelRuntime on 'cuda' gives the CPU runtime's logits (bf16 activations on the GPU:
// relative error < 2e-2, as test_cuda_ops) and bench --model runs end to end with the variable set.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { FIXTURE_PATHS } from './helpers/fixtures.js';
import { runCli } from './helpers/cli.js';
import { engine } from '../src/core/native.js';
import { ModelRuntime, resolveModelBackend } from '../src/core/model/runtime.js';
import { UsageError } from '../src/core/errors.js';

const cuda = engine().buildInfo().cuda;
const gpu = cuda.compiled && cuda.usable && typeof engine().CudaModel === 'function';
const noGpu = gpu ? false : `no usable GPU: ${cuda.reason}`;

const run = (args: string[], extraEnv: Record<string, string | undefined> = {}) => runCli(args, extraEnv);

test('resolveModelBackend: auto and cpu stay on the CPU; cuda says why not', () => {
  assert.equal(resolveModelBackend('auto', {}), 'cpu');
  assert.equal(resolveModelBackend('cpu', {}), 'cpu');
  assert.throws(() => resolveModelBackend('cuda', {}), (e: unknown) => {
    assert.ok(e instanceof UsageError);
    const msg = (e as Error).message;
    if (gpu) assert.match(msg, /not yet been verified on a GPU; set SPARSELLM_CUDA_UNVERIFIED=1 to run it/);
    else assert.match(msg, /CUDA model runtime needs a usable GPU: .+; use --backend cpu/);
    return true;
  });
  if (gpu) assert.equal(resolveModelBackend('cuda', { SPARSELLM_CUDA_UNVERIFIED: '1' }), 'cuda');
  else assert.throws(() => resolveModelBackend('cuda', { SPARSELLM_CUDA_UNVERIFIED: '1' }), /needs a usable GPU/);
});

test('infer and bench --model with --backend cuda: one clear line and exit 2 unless allowed', () => {
  const model = FIXTURE_PATHS['llama-relu-gqa']!;
  const cases = [
    ['infer', model, '--prompt', 'x', '--backend', 'cuda'],
    ['bench', '--model', model, '--backend', 'cuda', '--prefill', '8', '--decode', '2', '--repeats', '1', '--warmup', '0', '--json', '-q'],
  ];
  for (const args of cases) {
    const r = run(args, { SPARSELLM_CUDA_UNVERIFIED: undefined });
    assert.equal(r.code, 2, r.stderr);
    assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
    assert.match(r.stderr, gpu ? /SPARSELLM_CUDA_UNVERIFIED=1/ : /CUDA model runtime needs a usable GPU/);
    if (!gpu) {
      const r2 = run(args, { SPARSELLM_CUDA_UNVERIFIED: '1' });
      assert.equal(r2.code, 2, r2.stderr);
      assert.match(r2.stderr, /needs a usable GPU/);
    }
  }
});

test('ModelRuntime on cuda gives the CPU logits (prefill, decode, reset)', { skip: noGpu }, async () => {
  const path = FIXTURE_PATHS['llama-relu-gqa']!;
  const cpu = await ModelRuntime.load(path, { context: 64 });
  const dev = await ModelRuntime.load(path, { context: 64, backend: 'cuda' });
  try {
    assert.equal(dev.backend, 'cuda');
    const ids = Array.from({ length: 21 }, (_, i) => (i * 37 + 5) % cpu.spec.vocabSize);
    const rel = (a: Float32Array, b: Float32Array) => {
      let num = 0;
      let den = 0;
      for (let i = 0; i < a.length; i++) {
        num += (a[i]! - b[i]!) ** 2;
        den += b[i]! ** 2;
      }
      return Math.sqrt(num / den);
    };
    for (const mode of ['dense', 'sparse', 'auto'] as const) {
      cpu.reset();
      dev.reset();
      const a = cpu.forward(ids, { allLogits: true, mode });
      const b = dev.forward(ids, { allLogits: true, mode });
      assert.ok(rel(b, a) < 2e-2, `${mode} prefill rel err ${rel(b, a)}`);
      for (const id of [3, 9, 27]) {
        const c = cpu.forward([id], { mode });
        const d = dev.forward([id], { mode });
        assert.ok(rel(d, c) < 2e-2, `${mode} decode rel err ${rel(d, c)}`);
      }
      assert.equal(dev.position, 24);
    }
    const act = dev.activity();
    assert.equal(act.length, cpu.spec.nLayers);
    assert.ok(act.every((l) => l.sparseCalls + l.denseCalls > 0));
    assert.throws(() => dev.setFfnObserver(() => undefined), /CPU runtime only/);
  } finally {
    cpu.close();
    dev.close();
  }
});

test('bench --model runs on cuda with SPARSELLM_CUDA_UNVERIFIED=1', { skip: noGpu }, () => {
  const model = FIXTURE_PATHS['llama-relu-gqa']!;
  const env = { SPARSELLM_CUDA_UNVERIFIED: '1' };
  const b = run(['bench', '--model', model, '--backend', 'cuda', '--prefill', '16', '--decode', '4', '--repeats', '2', '--warmup', '1', '--json', '-q'], env);
  assert.equal(b.code, 0, b.stderr);
  const j = JSON.parse(b.stdout);
  assert.equal(j.backend, 'cuda');
  assert.equal(j.memoryBandwidthGBs, null);
  assert.ok(j.dense.decodeTokensPerSecond > 0 && j.sparse.decodeTokensPerSecond > 0);
  assert.equal(j.layers.length, 2);
});
