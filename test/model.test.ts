// The native model runtime against the independent float64 reference (test/reference/forward64.ts)
// on every fixture architecture; sparse vs dense; KV-cache decode vs full recomputation; sampling.
//
// Tolerance: the packed model stores matrices in bf16, and the reference uses the very same
// bf16-rounded weights (1-D tensors stay f32, as in the file), so the only differences are the
// engine's f32 arithmetic (accumulation order, f32 softmax/norms) against float64. On these tiny
// models that measures ~2e-7 relative; we allow 1e-5 relative (Frobenius over all logits) and 1e-4
// of the largest logit elementwise. (Skipping the bf16 rounding in the reference gives ~1e-3: the
// test tells the two apart.)
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, writeFileSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { openCheckpoint } from '../src/core/checkpoint/dense.js';
import { bf16BitsToF32, f32ToBf16Bits } from '../src/core/dtype.js';
import { ModelRuntime } from '../src/core/model/runtime.js';
import { generate, perplexity, Sampler } from '../src/core/model/generate.js';
import { packInputFromCheckpoint } from '../src/core/format/source.js';
import { writePacked } from '../src/core/format/writer.js';
import { referenceForward, type RefTensor } from './reference/forward64.js';
import { FIXTURE_PATHS, copyFixture } from './helpers/fixtures.js';
import { makeTempDir } from './helpers/tmp.js';

const SEED = Number(process.env.SPARSELLM_TEST_SEED ?? Math.floor(Math.random() * 2 ** 31));
console.log(`# model.test seed ${SEED} (set SPARSELLM_TEST_SEED to replay)`);

function rng(seed: number) {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return s / 4294967296;
  };
}

const ARCHS = ['llama-relu-gqa', 'llama-silu', 'mistral-gqa', 'qwen2-bias', 'gpt2', 'opt'] as const;
const RELU = ['llama-relu-gqa', 'opt'] as const;

let tmp: string;
let cleanup: () => void = () => undefined;
const packed = new Map<string, string>();

before(async () => {
  ({ dir: tmp, cleanup } = makeTempDir('sllm-model-'));
  for (const name of ARCHS) {
    const ckpt = await openCheckpoint(FIXTURE_PATHS[name]!);
    const out = join(tmp, `${name}.sllm`);
    await writePacked(await packInputFromCheckpoint(ckpt), out, { dtype: 'BF16' });
    await ckpt.close();
    packed.set(name, out);
  }
});

async function referenceWeights(name: string) {
  const ckpt = await openCheckpoint(FIXTURE_PATHS[name]!);
  const map = new Map<string, RefTensor>();
  for (const n of ckpt.tensorNames()) {
    const e = ckpt.entry(n);
    const f = await ckpt.readF32(n);
    const data = new Float64Array(f.length);
    // Matrices are stored bf16 in the packed file (rounded once from the exact source value).
    for (let i = 0; i < f.length; i++) data[i] = e.shape.length >= 2 ? bf16BitsToF32(f32ToBf16Bits(f[i]!)) : f[i]!;
    map.set(n, { shape: e.shape, data });
  }
  const spec = ckpt.spec;
  await ckpt.close();
  return { spec, get: (n: string) => map.get(n) };
}

function compare(got: Float32Array, ref: Float64Array[], what: string) {
  const vocab = ref[0]!.length;
  let num = 0;
  let den = 0;
  let maxAbs = 0;
  let maxRef = 0;
  ref.forEach((row, t) => {
    for (let i = 0; i < vocab; i++) {
      const d = got[t * vocab + i]! - row[i]!;
      num += d * d;
      den += row[i]! * row[i]!;
      maxAbs = Math.max(maxAbs, Math.abs(d));
      maxRef = Math.max(maxRef, Math.abs(row[i]!));
    }
  });
  const rel = Math.sqrt(num / den);
  assert.ok(rel < 1e-5, `${what}: relative error ${rel} ≥ 1e-5`);
  assert.ok(maxAbs < 1e-4 * maxRef, `${what}: max abs error ${maxAbs} ≥ 1e-4 × ${maxRef}`);
  return rel;
}

function randomTokens(n: number, vocab: number, r: () => number): number[] {
  return Array.from({ length: n }, () => Math.floor(r() * vocab));
}

for (const name of ARCHS) {
  test(`${name}: dense engine logits match the float64 reference`, async () => {
    const { spec, get } = await referenceWeights(name);
    const r = rng(SEED + name.length);
    const tokens = randomTokens(13, spec.vocabSize, r);
    const ref = referenceForward(spec, get, tokens);
    const rt = await ModelRuntime.load(packed.get(name)!, { context: 32 });
    try {
      const got = rt.forward(tokens, { allLogits: true, mode: 'dense' });
      assert.equal(got.length, tokens.length * spec.vocabSize);
      compare(got, ref.logits, `${name} dense`);
      // The last-token call gives the last row.
      rt.reset();
      const last = rt.forward(tokens, { mode: 'dense' });
      compare(last, [ref.logits[tokens.length - 1]!], `${name} last token`);
      // Measured FFN non-zeros equal the reference's count on ReLU models (exact zeros).
      if ((RELU as readonly string[]).includes(name)) {
        const act = rt.activity();
        const refMean = ref.ffnNonZeros[0]!.reduce((a, b) => a + b, 0) / tokens.length;
        const got0 = act[0]!;
        // Two calls of the same tokens: the mean is unchanged; allow a unit or two of boundary flips.
        assert.ok(Math.abs(got0.nnzMean! - refMean) <= 2, `${name} layer 0 nnz mean ${got0.nnzMean} vs reference ${refMean}`);
      }
    } finally {
      rt.close();
    }
  });
}

for (const name of RELU) {
  test(`${name}: sparse (TwELL) logits equal dense logits; decode with KV cache equals recomputation`, async () => {
    const rt = await ModelRuntime.load(packed.get(name)!, { context: 40 });
    try {
      const r = rng(SEED * 7 + name.length);
      const tokens = randomTokens(21, rt.spec.vocabSize, r);
      const dense = rt.forward(tokens, { allLogits: true, mode: 'dense' });
      rt.reset();
      rt.resetActivity();
      const sparse = rt.forward(tokens, { allLogits: true, mode: 'sparse' });
      const asRows = (a: Float32Array) => Array.from({ length: tokens.length }, (_, t) => Float64Array.from(a.subarray(t * rt.spec.vocabSize, (t + 1) * rt.spec.vocabSize)));
      compare(sparse, asRows(dense), `${name} sparse vs dense`);
      const act = rt.activity();
      assert.ok(act.every((a) => a.sparseCalls === 1 && a.tokens === tokens.length), JSON.stringify(act));
      // Prefill 9, then one token at a time through the decode kernels, sparse and dense.
      for (const mode of ['sparse', 'dense'] as const) {
        rt.reset();
        const rows: Float32Array[] = [rt.forward(tokens.slice(0, 9), { allLogits: true, mode })];
        for (let t = 9; t < tokens.length; t++) rows.push(rt.forward([tokens[t]!], { mode }));
        const joined = new Float32Array(dense.length);
        let off = 0;
        for (const row of rows) {
          joined.set(row, off);
          off += row.length;
        }
        compare(joined, asRows(dense), `${name} ${mode} decode vs full`);
      }
      assert.equal(rt.position, tokens.length);
    } finally {
      rt.close();
    }
  });
}

test('weights resident (huge-page memory, the default) or memory-mapped: the same logits, bit for bit', async () => {
  const path = packed.get('llama-relu-gqa')!;
  const runs: Float32Array[] = [];
  for (const weights of ['resident', 'mmap'] as const) {
    const rt = await ModelRuntime.load(path, { context: 32, weights });
    try {
      const tokens = randomTokens(13, rt.spec.vocabSize, rng(SEED * 11));
      const prefill = rt.forward(tokens.slice(0, 10), { allLogits: true, mode: 'sparse' });
      const step = rt.forward(tokens.slice(10), { allLogits: true, mode: 'sparse' });
      runs.push(Float32Array.from([...prefill, ...step]));
    } finally {
      rt.close();
    }
  }
  assert.ok(runs[0]!.every((v) => Number.isFinite(v)) && runs[0]!.some((v) => v !== 0));
  assert.deepEqual(Buffer.from(runs[0]!.buffer), Buffer.from(runs[1]!.buffer));
});

test('generation: greedy is deterministic, same seed gives the same sample, different seeds differ', async () => {
  const rt = await ModelRuntime.load(packed.get('llama-relu-gqa')!, { context: 64 });
  try {
    const prompt = [1, 17, 99, 4, 200];
    const base = { maxTokens: 12, topK: 0, topP: 1, seed: 1, mode: 'auto' as const };
    const g1 = generate(rt, prompt, { ...base, temperature: 0 });
    const g2 = generate(rt, prompt, { ...base, temperature: 0, seed: 99 });
    assert.deepEqual(g1.tokens, g2.tokens);
    assert.equal(g1.tokens.length, 12);
    // The greedy choice is the argmax of a fresh full recomputation.
    rt.reset();
    const logits = rt.forward([...prompt, ...g1.tokens.slice(0, 3)], { mode: 'dense' });
    let arg = 0;
    for (let i = 1; i < logits.length; i++) if (logits[i]! > logits[arg]!) arg = i;
    assert.equal(g1.tokens[3], arg);
    const s1 = generate(rt, prompt, { ...base, temperature: 1.5, seed: 42 });
    const s2 = generate(rt, prompt, { ...base, temperature: 1.5, seed: 42 });
    const s3 = generate(rt, prompt, { ...base, temperature: 1.5, seed: 43 });
    assert.deepEqual(s1.tokens, s2.tokens);
    assert.notDeepEqual(s1.tokens, s3.tokens);
    // Stops at end of text, which is not emitted.
    const eos = g1.tokens[2]!;
    const g3 = generate(rt, prompt, { ...base, temperature: 0, eosId: eos });
    assert.equal(g3.stoppedAt, 'eos');
    assert.ok(!g3.tokens.includes(eos));
  } finally {
    rt.close();
  }
});

test('sampler: top-k 1 is greedy; top-p keeps only the head of the distribution', () => {
  const logits = Float32Array.from([0.1, 3, 2.9, -1, 0]);
  const k1 = new Sampler({ temperature: 1, topK: 1, topP: 1, seed: 5 });
  for (let i = 0; i < 20; i++) assert.equal(k1.sample(logits), 1);
  // softmax ≈ [0.027, 0.493, 0.446, 0.009, 0.025]: top-p 0.4 keeps {1}, top-p 0.5 keeps {1, 2}.
  const p4 = new Sampler({ temperature: 1, topK: 0, topP: 0.4, seed: 5 });
  for (let i = 0; i < 50; i++) assert.equal(p4.sample(logits), 1);
  const p5 = new Sampler({ temperature: 1, topK: 0, topP: 0.5, seed: 5 });
  const seen = new Set<number>();
  for (let i = 0; i < 200; i++) seen.add(p5.sample(logits));
  assert.deepEqual([...seen].sort(), [1, 2]);
  const greedy = new Sampler({ temperature: 0, topK: 0, topP: 1, seed: 5 });
  assert.equal(greedy.sample(Float32Array.from([1, 5, 5, 2])), 1, 'ties go to the lowest id');
  assert.equal(greedy.sample(Float32Array.from([1, 2, 9, 2]), 2), 1, 'limit excludes ids past the tokenizer');
});

test('perplexity: identical between sparse and dense paths; windows respect the context', async () => {
  const rt = await ModelRuntime.load(packed.get('opt')!, { context: 32 });
  try {
    const r = rng(SEED + 3);
    const ids = randomTokens(70, rt.spec.vocabSize, r);
    const d = perplexity(rt, ids, 32, 'dense');
    const s = perplexity(rt, ids, 32, 'sparse');
    assert.equal(d.windows, 3);
    assert.equal(d.tokens, 31 + 31 + 5);
    assert.ok(Math.abs(d.perplexity - s.perplexity) < 1e-4 * d.perplexity, `${d.perplexity} vs ${s.perplexity}`);
    assert.ok(d.perplexity > 1 && isFinite(d.perplexity));
  } finally {
    rt.close();
  }
});

test('bad inputs: context overflow, out-of-range ids, empty prompt, context too large', async () => {
  const rt = await ModelRuntime.load(packed.get('gpt2')!, { context: 8 });
  try {
    assert.throws(() => rt.forward([]), /no tokens/);
    assert.throws(() => rt.forward([1, 2, 3, 4, 5, 6, 7, 8, 9]), /do not fit the context of 8/);
    assert.throws(() => rt.forward([256]), /outside the model's vocabulary/);
    assert.throws(() => rt.forward([-1]), /outside the model's vocabulary/);
    assert.throws(() => generate(rt, Array(9).fill(3), { maxTokens: 1, temperature: 0, topK: 0, topP: 1, seed: 0, mode: 'auto' }), /context holds 8/);
    assert.throws(() => generate(rt, [], { maxTokens: 1, temperature: 0, topK: 0, topP: 1, seed: 0, mode: 'auto' }), /empty/);
  } finally {
    rt.close();
  }
  await assert.rejects(ModelRuntime.load(packed.get('gpt2')!, { context: 100000 }), /--context must be in \[1, 128\]/);
});

test('dense checkpoint directory is packed on the fly with a notice; tokenizer found', async () => {
  const dir = copyFixture('llama-relu-gqa', tmp);
  copyFileSync(join(import.meta.dirname, '..', 'fixtures', 'tokenizer', 'tokenizer.json'), join(dir, 'tokenizer.json'));
  const notes: string[] = [];
  const rt = await ModelRuntime.load(dir, { context: 16, onNotice: (s) => notes.push(s) });
  try {
    assert.equal(notes.length, 1);
    assert.match(notes[0]!, /on the fly/);
    assert.equal(rt.tokenizer?.kind, 'huggingface');
    assert.equal(rt.tokenizer?.eosId, 2, 'the model config eos_token_id wins');
    const ids = rt.tokenizer!.encode('the river');
    assert.ok(rt.forward(ids).length === 256);
  } finally {
    rt.close();
  }
});

test('mistral sliding window: the context is capped at the window (exact there), larger is refused', async () => {
  const dir = copyFixture('mistral-gqa', tmp);
  const cfgPath = join(dir, 'config.json');
  const cfg = JSON.parse(readFileSync(cfgPath, 'utf8'));
  cfg.sliding_window = 16;
  writeFileSync(cfgPath, JSON.stringify(cfg));
  const rt = await ModelRuntime.load(dir);
  try {
    assert.equal(rt.context, 16);
  } finally {
    rt.close();
  }
  await assert.rejects(ModelRuntime.load(dir, { context: 17 }), /sliding attention window \(16 tokens\)/);
});

test('a packed model recording the byte tokenizer: ids are bytes, end of text past a 256-id vocabulary is never fed', async () => {
  const ckpt = await openCheckpoint(FIXTURE_PATHS['llama-relu-gqa']!);
  const input = await packInputFromCheckpoint(ckpt);
  input.tokenizer = { kind: 'byte' };
  const file = join(tmp, 'byte.sllm');
  await writePacked(input, file);
  await ckpt.close();
  const rt = await ModelRuntime.load(file, { context: 32 });
  try {
    assert.equal(rt.tokenizer?.kind, 'byte');
    assert.equal(rt.tokenizer?.eosId, 256);
    const ids = rt.tokenizer!.encode('héllo');
    assert.deepEqual(ids, [...Buffer.from('héllo')]);
    const g = generate(rt, ids, { maxTokens: 5, temperature: 0, topK: 0, topP: 1, seed: 0, mode: 'auto', sampleLimit: 256 });
    assert.equal(g.tokens.length, 5);
    assert.throws(() => rt.forward([256]), /outside the model's vocabulary/);
  } finally {
    rt.close();
  }
});

test('a gated FFN with an up-projection bias (only a hand-made file can hold one) is refused, naming the file', async () => {
  const ckpt = await openCheckpoint(FIXTURE_PATHS['llama-relu-gqa']!);
  const input = await packInputFromCheckpoint(ckpt);
  const spec = { ...input.spec, linearBias: true };
  const layerOf = (name: string) => Number(/^layers\.(\d+)\./.exec(name)?.[1] ?? -1);
  const biasShape = (name: string): number[] | undefined =>
    name.endsWith('ffn.up.bias') ? [spec.dFF[layerOf(name)]!] : /\.(attn\.o|ffn\.down)\.bias$/.test(name) ? [spec.dModel] : undefined;
  const describe = input.describe.bind(input);
  const rowChunks = input.rowChunks.bind(input);
  const biased: typeof input = {
    ...input,
    spec,
    describe: (name) => describe(name) ?? (biasShape(name) ? { dtype: 'F32', shape: biasShape(name)! } : undefined),
    rowChunks: (name, rows) => {
      if (describe(name)) return rowChunks(name, rows);
      const n = biasShape(name)![0]!;
      return (async function* () {
        yield { dtype: 'F32' as const, bytes: new Uint8Array(new Float32Array(n).fill(0.01).buffer) };
      })();
    },
  };
  const file = join(tmp, 'gated-up-bias.sllm');
  await writePacked(biased, file);
  await ckpt.close();
  await assert.rejects(ModelRuntime.load(file, { context: 16 }), (e: Error) => {
    assert.match(e.message, /gated-up-bias\.sllm: layer 0: ffn\.up\.bias on a gated FFN is not supported/);
    return true;
  });
});

test('corrupted and newer-version packed files are clear errors', async () => {
  const good = packed.get('llama-silu')!;
  const bytes = readFileSync(good);
  const truncated = join(tmp, 'truncated.sllm');
  writeFileSync(truncated, bytes.subarray(0, bytes.length - 100));
  await assert.rejects(ModelRuntime.load(truncated), (e: Error) => e.message.includes(truncated));
  const hdrLen = Number(bytes.readBigUInt64LE(0));
  const header = bytes.subarray(8, 8 + hdrLen).toString('utf8');
  const newer = header.replace('"format_version":"1"', '"format_version":"2"');
  assert.notEqual(newer, header);
  const f2 = join(tmp, 'newer.sllm');
  writeFileSync(f2, Buffer.concat([bytes.subarray(0, 8), Buffer.from(newer), bytes.subarray(8 + hdrLen)]));
  await assert.rejects(ModelRuntime.load(f2), /newer sparsellm/);
});

after(() => cleanup());
