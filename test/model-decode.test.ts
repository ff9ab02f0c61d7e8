// Decode steps of 1 to 4 tokens (the decode GEMV with M = 1..4, the FFN decode kernels) with the
// KV cache equal a full recomputation of the same tokens, on the sparse, dense and auto paths,
// for a ReLU model (TwELL decode) and a SiLU one (dense FFN). Tolerance as in model.test.ts:
// both sides compute in f32 from the same bf16 weights, only the summation order differs
// (measured ~1e-7 relative); 1e-5 relative (Frobenius) and 1e-4 of the largest logit. A
// misplaced token, row or cache position is off by O(1) and fails.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { openCheckpoint } from '../src/core/checkpoint/dense.js';
import { ModelRuntime } from '../src/core/model/runtime.js';
import { packInputFromCheckpoint } from '../src/core/format/source.js';
import { writePacked } from '../src/core/format/writer.js';
import { FIXTURE_PATHS } from './helpers/fixtures.js';
import { makeTempDir } from './helpers/tmp.js';

const SEED = Number(process.env.SPARSELLM_TEST_SEED ?? Math.floor(Math.random() * 2 ** 31));
console.log(`# model-decode.test seed ${SEED} (set SPARSELLM_TEST_SEED to replay)`);

const ARCHS = ['llama-relu-gqa', 'llama-silu'] as const;
let tmp: string;
let cleanup: () => void = () => undefined;
const packed = new Map<string, string>();

before(async () => {
  ({ dir: tmp, cleanup } = makeTempDir('sllm-decode-'));
  for (const name of ARCHS) {
    const ckpt = await openCheckpoint(FIXTURE_PATHS[name]!);
    const out = join(tmp, `${name}.sllm`);
    await writePacked(await packInputFromCheckpoint(ckpt), out, { dtype: 'BF16' });
    await ckpt.close();
    packed.set(name, out);
  }
});
after(() => cleanup());

function compareRows(got: Float32Array, want: Float32Array, what: string, tol = { rel: 1e-5, abs: 1e-4 }) {
  assert.equal(got.length, want.length, what);
  let num = 0, den = 0, maxAbs = 0, maxRef = 0;
  for (let i = 0; i < want.length; i++) {
    const d = got[i]! - want[i]!;
    num += d * d;
    den += want[i]! * want[i]!;
    maxAbs = Math.max(maxAbs, Math.abs(d));
    maxRef = Math.max(maxRef, Math.abs(want[i]!));
  }
  const rel = Math.sqrt(num / den);
  assert.ok(rel < tol.rel, `${what}: relative error ${rel} ≥ ${tol.rel}`);
  assert.ok(maxAbs < tol.abs * maxRef, `${what}: max abs error ${maxAbs} ≥ ${tol.abs} × ${maxRef}`);
}

for (const name of ARCHS) {
  test(`${name}: decode chunks of 1-4 tokens equal full recomputation (sparse, dense, auto)`, async () => {
    const rt = await ModelRuntime.load(packed.get(name)!, { context: 40 });
    try {
      let s = (SEED ^ name.length * 2654435761) >>> 0 || 1;
      const next = () => ((s = (Math.imul(s, 1664525) + 1013904223) >>> 0) / 2 ** 32);
      const tokens = Array.from({ length: 6 + 1 + 2 + 3 + 4 + 3 }, () => Math.floor(next() * rt.spec.vocabSize));
      const full = rt.forward(tokens, { allLogits: true, mode: 'dense' });
      const V = rt.spec.vocabSize;
      for (const mode of ['sparse', 'dense', 'auto'] as const) {
        rt.reset();
        let pos = 6;
        rt.forward(tokens.slice(0, pos), { mode });
        for (const n of [1, 2, 3, 4, 3]) {
          const got = rt.forward(tokens.slice(pos, pos + n), { allLogits: true, mode });
          compareRows(got, full.subarray(pos * V, (pos + n) * V), `${name} ${mode} tokens ${pos}..${pos + n - 1}`);
          pos += n;
        }
        assert.equal(rt.position, tokens.length);
      }
    } finally {
      rt.close();
    }
  });
}

// With a bf16 cache the two sides round slightly different f32 keys and values (GEMM against
// GEMV sums), so an element near a rounding boundary can land one bf16 step (2^-8 relative)
// apart: measured up to 1.3e-5 relative in the logits, so 2e-4 here, still far below a
// misplaced token or cache position (O(1)).
test('bf16 KV cache: decode chunks equal full recomputation on it; logits within bf16 rounding of the f32 cache', async () => {
  const path = packed.get('llama-relu-gqa')!;
  const rt = await ModelRuntime.load(path, { context: 40, kvCache: 'bf16' });
  const rf = await ModelRuntime.load(path, { context: 40 });
  try {
    assert.equal(rt.kvCache, 'bf16');
    assert.equal(rf.kvCache, 'f32');
    let s = (SEED ^ 0x9e3779b9) >>> 0 || 1;
    const next = () => ((s = (Math.imul(s, 1664525) + 1013904223) >>> 0) / 2 ** 32);
    const tokens = Array.from({ length: 5 + 1 + 3 + 4 }, () => Math.floor(next() * rt.spec.vocabSize));
    const V = rt.spec.vocabSize;
    const full = rt.forward(tokens, { allLogits: true, mode: 'dense' });
    for (const mode of ['sparse', 'dense'] as const) {
      rt.reset();
      let pos = 5;
      rt.forward(tokens.slice(0, pos), { mode });
      for (const n of [1, 3, 4]) {
        const got = rt.forward(tokens.slice(pos, pos + n), { allLogits: true, mode });
        compareRows(got, full.subarray(pos * V, (pos + n) * V), `bf16 cache ${mode} tokens ${pos}..${pos + n - 1}`, { rel: 2e-4, abs: 1e-3 });
        pos += n;
      }
    }
    // Against the f32 cache: rounded keys and values move the logits a little (~2^-9 relative
    // per element), never by O(1), and never not at all (the option is not a no-op).
    const ref = rf.forward(tokens, { allLogits: true, mode: 'dense' });
    let num = 0, den = 0;
    for (let i = 0; i < ref.length; i++) {
      num += (full[i]! - ref[i]!) ** 2;
      den += ref[i]! ** 2;
    }
    const rel = Math.sqrt(num / den);
    assert.ok(rel > 1e-7 && rel < 2e-2, `bf16 against f32 cache: relative difference ${rel}`);
  } finally {
    rt.close();
    rf.close();
  }
});

test('bf16 KV cache: refused on the cuda backend (its runtime keeps an f32 cache)', async () => {
  await assert.rejects(
    ModelRuntime.load(packed.get('llama-relu-gqa')!, { context: 40, kvCache: 'bf16', backend: 'cuda' }),
    /--kv-cache bf16 is available on the cpu backend only|no CUDA model runtime/,
  );
});

test('step timing: off by default, counts the tokens and calls it covers, same logits, cleared by resetActivity', async () => {
  const rt = await ModelRuntime.load(packed.get('llama-relu-gqa')!, { context: 40 });
  try {
    assert.ok(rt.canProfile);
    const tokens = Array.from({ length: 9 }, (_, i) => (i * 7 + 3) % rt.spec.vocabSize);
    const run = () => {
      rt.reset();
      rt.forward(tokens.slice(0, 6), { mode: 'sparse' });
      rt.forward(tokens.slice(6, 7), { mode: 'sparse' });
      return rt.forward(tokens.slice(7), { mode: 'sparse' });
    };
    const plain = run();
    const off = rt.stepTimes();
    assert.equal(off.calls, 0);
    assert.ok(Object.values(off.seconds).every((x) => x === 0));
    rt.setProfiling(true);
    const last = run();
    assert.deepEqual(Array.from(last), Array.from(plain), 'timing changed the logits');
    const t = rt.stepTimes();
    assert.equal(t.calls, 3);
    assert.equal(t.tokens, 9);
    for (const step of ['embed', 'norms', 'qkv', 'rope', 'kvStore', 'attention', 'oProj', 'residual', 'ffn', 'head'] as const) {
      assert.ok(t.seconds[step] > 0, `${step} not timed`);
    }
    rt.resetActivity();
    assert.equal(rt.stepTimes().calls, 0);
    rt.setProfiling(false);
    rt.forward(tokens.slice(0, 1), { mode: 'dense' });
    assert.equal(rt.stepTimes().calls, 0);
  } finally {
    rt.close();
  }
});
