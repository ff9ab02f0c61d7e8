// prune as a library (src/core/prune) on tiny fixtures: dead-neuron removal exact on the
// calibration text, neuron maps composing across two prunes, SiLU thresholds reaching the target
// per layer and matching the float64 reference forward that applies the same cut-offs, bad inputs.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, existsSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { prune } from '../src/core/prune/index.js';
import { openPruneSource } from '../src/core/prune/source.js';
import { openPacked } from '../src/core/format/reader.js';
import { ModelRuntime } from '../src/core/model/runtime.js';
import { SparseLlmError, UsageError } from '../src/core/errors.js';
import { REPO_ROOT, copyFixture, rewriteSafetensors } from './helpers/fixtures.js';
import { makeTempDir } from './helpers/tmp.js';
import { Rng } from './helpers/rng.js';
import { referenceForward, type RefTensor } from './reference/forward64.js';

const SEED = Number(process.env.TEST_SEED ?? Date.now() % 1_000_000);
console.log(`prune.test seed ${SEED} (TEST_SEED=${SEED} to repeat)`);
const TOKENIZER = join(REPO_ROOT, 'fixtures', 'tokenizer', 'tokenizer.json');
const WORDS = 'the river town water stone light bridge market winter garden road morning evening north south field house window mountain small large old new quiet bright'.split(' ');

let tmp: string;
let cleanup = () => undefined as void;
let relu: string;
let silu: string;
let text: string;
let heldOut: string;
/** Per layer, the neurons whose gate rows were zeroed (dead by construction). */
const zeroed: number[][] = [];

/** Seeded English-like ASCII text (the fixture tokenizer covers ASCII). */
function makeText(rng: Rng, words: number): string {
  const out: string[] = [];
  for (let i = 0; i < words; i++) {
    let w = WORDS[rng.int(0, WORDS.length - 1)]!;
    if (i % 11 === 0) w = w[0]!.toUpperCase() + w.slice(1);
    out.push(w + (i % 11 === 10 ? '.' : ''));
  }
  return out.join(' ') + '\n';
}

/** Zeroes the gate rows of `neurons[layer]` in a llama checkpoint (F16/BF16/F32 all zero as 0 bytes). */
async function zeroGateRows(dir: string, neurons: number[][]): Promise<void> {
  const file = join(dir, 'model.safetensors');
  await rewriteSafetensors(file, file + '.new', (ts) =>
    ts.map((t) => {
      const m = /layers\.(\d+)\.mlp\.gate_proj\.weight$/.exec(t.name);
      if (!m) return t;
      const bytes = new Uint8Array(t.bytes);
      const rowBytes = t.bytes.byteLength / t.shape[0]!;
      for (const j of neurons[Number(m[1])]!) bytes.fill(0, j * rowBytes, (j + 1) * rowBytes);
      return { ...t, bytes };
    }),
  );
  renameSync(file + '.new', file);
}

before(async () => {
  ({ dir: tmp, cleanup } = makeTempDir('sllm-prune-'));
  const rng = new Rng(SEED);
  relu = copyFixture('llama-relu-gqa', tmp);
  copyFileSync(TOKENIZER, join(relu, 'tokenizer.json'));
  const F = JSON.parse(readFileSync(join(relu, 'config.json'), 'utf8')).intermediate_size as number;
  for (let l = 0; l < 2; l++) zeroed.push([...Array(F).keys()].filter(() => rng.uniform() < 0.3));
  await zeroGateRows(relu, zeroed);
  silu = copyFixture('llama-silu', tmp);
  copyFileSync(TOKENIZER, join(silu, 'tokenizer.json'));
  text = join(tmp, 'calib.txt');
  writeFileSync(text, makeText(rng, 1500));
  heldOut = join(tmp, 'heldout.txt');
  writeFileSync(heldOut, makeText(rng, 600));
});
after(() => cleanup());

const base = () => ({ text: [text], evalText: [heldOut], tokens: 2000, evalTokens: 1024, context: 128 });

/** Max |a − b| over every logit of every window of `ids`, for two runtimes. */
function maxLogitDiff(a: ModelRuntime, b: ModelRuntime, ids: number[], window: number): { diff: number; scale: number } {
  let diff = 0;
  let scale = 0;
  for (let s = 0; s < ids.length; s += window) {
    const win = ids.slice(s, s + window);
    a.reset();
    b.reset();
    const la = a.forward(win, { allLogits: true, mode: 'dense' });
    const lb = b.forward(win, { allLogits: true, mode: 'dense' });
    for (let k = 0; k < la.length; k++) {
      diff = Math.max(diff, Math.abs(la[k]! - lb[k]!));
      scale = Math.max(scale, Math.abs(la[k]!));
    }
  }
  return { diff, scale };
}

test('ReLU --drop-dead: removes exactly the dead neurons; logits equal on the calibration text; held-out perplexity within 0.1%', async () => {
  const out = join(tmp, 'relu-pruned.sllm');
  const r = await prune(relu, { ...base(), dropDead: true, output: out, dtype: 'F32' });
  for (let l = 0; l < 2; l++) {
    const L = r.layers[l]!;
    assert.equal(L.removed, zeroed[l]!.length, `layer ${l}: removed ${L.removed}, zeroed ${zeroed[l]!.length}`);
    assert.equal(L.before.dead, zeroed[l]!.length);
    assert.equal(L.after!.nnzMean, L.before.nnzMean, 'the same units fire');
  }
  const pm = await openPacked(out);
  try {
    for (let l = 0; l < 2; l++) {
      const map = Array.from((await pm.neuronMap(l))!);
      const dead = new Set(zeroed[l]);
      assert.deepEqual(map, [...Array(300).keys()].filter((j) => !dead.has(j)), `layer ${l} neuron map`);
      const L = pm.layers[l]!;
      assert.equal(L.sourceDFF, 300);
      assert.ok(L.twell && L.calibration, 'TwELL parameters and calibration recorded');
      assert.equal(L.twell!.tileWidth, L.calibration!.tileWidth);
      assert.equal(L.twell!.tileWidth, r.layers[l]!.twell.tileWidth);
      assert.equal(Math.floor(L.twell!.tileWidth / L.twell!.compression) - 1, r.layers[l]!.twell.capacity);
      assert.ok(r.layers[l]!.twell.overflowRate <= 1e-3, 'overflow stays rare on the calibration text');
    }
  } finally {
    await pm.close();
  }
  // Logits, every calibration window, input (f32) vs output (f32).
  const a = await ModelRuntime.load(relu, { context: 128, dtype: 'F32' });
  const b = await ModelRuntime.load(out, { context: 128 });
  try {
    const ids = a.tokenizer!.encode(readFileSync(text, 'utf8')).slice(0, 2000);
    const { diff, scale } = maxLogitDiff(a, b, ids, 128);
    // f32 GEMMs over 300 vs the kept columns: only the summation order differs (zeros removed).
    assert.ok(diff <= 1e-5 * Math.max(1, scale), `max logit difference ${diff} (scale ${scale})`);
  } finally {
    a.close();
    b.close();
  }
  const pb = r.perplexityBefore!.perplexity;
  const pa = r.perplexityAfter!.perplexity;
  assert.ok(Math.abs(pa - pb) / pb <= 1e-3, `held-out perplexity ${pb} → ${pa}`);
  assert.equal(r.heldOut.source, 'eval');
});

test('already-pruned model: a second prune (dense directory in, packed out) composes the neuron maps', async () => {
  const dir = join(tmp, 'relu-pruned-dir');
  const r1 = await prune(relu, { ...base(), dropDead: true, output: dir });
  assert.ok(existsSync(join(dir, 'sparsellm_prune.json')) && existsSync(join(dir, 'tokenizer.json')));
  const cfg = JSON.parse(readFileSync(join(dir, 'config.json'), 'utf8'));
  assert.deepEqual(cfg.sparsellm_intermediate_sizes, r1.layers.map((l) => l.dFFOut));
  // Kill more neurons in the pruned layout, then prune again.
  const rng = new Rng(SEED + 7);
  const more = r1.layers.map((l) => [...Array(l.dFFOut).keys()].filter(() => rng.uniform() < 0.25));
  await zeroGateRows(dir, more);
  const out = join(tmp, 'relu-twice.sllm');
  const r2 = await prune(dir, { ...base(), dropDead: true, output: out });
  const pm = await openPacked(out);
  try {
    for (let l = 0; l < 2; l++) {
      assert.equal(r2.layers[l]!.sourceDFF, 300);
      const dead1 = new Set(zeroed[l]);
      const keep1 = [...Array(300).keys()].filter((j) => !dead1.has(j));
      const dead2 = new Set(more[l]);
      const expected = keep1.filter((_, k) => !dead2.has(k));
      assert.deepEqual(Array.from((await pm.neuronMap(l))!), expected, `layer ${l}: composed map back to the original neurons`);
    }
  } finally {
    await pm.close();
  }
  // The twice-pruned packed model computes what the once-pruned dense one (with its extra zeros) does.
  const a = await ModelRuntime.load(dir, { context: 128, dtype: 'F32' });
  const b = await ModelRuntime.load(out, { context: 128 });
  try {
    const ids = a.tokenizer!.encode(readFileSync(text, 'utf8')).slice(0, 256);
    const { diff, scale } = maxLogitDiff(a, b, ids, 128);
    // The output is BF16 (default): within bf16 rounding of the weights.
    assert.ok(diff <= 0.05 * Math.max(1, scale), `logits differ by ${diff} (scale ${scale})`);
  } finally {
    a.close();
    b.close();
  }
});

test('SiLU --target-sparsity 0.5: each layer within ±2%; logits match the float64 reference with the same thresholds', async () => {
  const out = join(tmp, 'silu-50.sllm');
  const r = await prune(silu, { ...base(), targetSparsity: 0.5, output: out, dtype: 'F32' });
  for (const L of r.layers) {
    assert.ok(L.threshold !== null && L.threshold > 0);
    assert.ok(Math.abs(L.sparsityReached! - 0.5) <= 0.02, `layer ${L.layer}: sparsity ${L.sparsityReached}`);
  }
  const src = await openPruneSource(out);
  const rt = await ModelRuntime.load(out, { context: 128 });
  try {
    assert.deepEqual(src.layers.map((l) => l.threshold), r.layers.map((l) => l.threshold), 'thresholds stored in the packed metadata');
    const weights = new Map<string, RefTensor>();
    for (const n of src.names) weights.set(n, { shape: [...src.shape(n)], data: Float64Array.from(await src.readF32(n)) });
    const rng = new Rng(SEED + 3);
    const tokens = Array.from({ length: 37 }, () => rng.int(0, src.spec.vocabSize - 1));
    const ref = referenceForward(src.spec, (n) => weights.get(n), tokens, { thresholds: r.layers.map((l) => l.threshold) });
    const got = rt.forward(tokens, { allLogits: true, mode: 'auto' });
    let diff = 0;
    let scale = 0;
    const V = src.spec.vocabSize;
    ref.logits.forEach((row, t) => {
      for (let v = 0; v < V; v++) {
        diff = Math.max(diff, Math.abs(row[v]! - got[t * V + v]!));
        scale = Math.max(scale, Math.abs(row[v]!));
      }
    });
    // f32 engine vs f64: ~1e-6 relative per op; a unit within that of its cut-off could flip, so 1e-4.
    assert.ok(diff <= 1e-4 * Math.max(1, scale), `max logit difference ${diff} (scale ${scale}), seed ${SEED}`);
    // The engine's count of active units matches the reference's.
    const act = rt.activity();
    for (let l = 0; l < 2; l++) {
      const refMean = ref.ffnNonZeros[l]!.reduce((a, b) => a + b, 0) / tokens.length;
      assert.ok(Math.abs(act[l]!.nnzMean! - refMean) <= 0.5, `layer ${l}: engine ${act[l]!.nnzMean} vs reference ${refMean}`);
    }
    // The thresholded layers run on the TwELL kernels (sparse mode): same logits, same counts,
    // every layer's call on the sparse path; --dense keeps them on the dense path.
    for (const mode of ['sparse', 'dense'] as const) {
      rt.reset();
      rt.resetActivity();
      const out = rt.forward(tokens, { allLogits: true, mode });
      let d2 = 0;
      ref.logits.forEach((row, t) => {
        for (let v = 0; v < V; v++) d2 = Math.max(d2, Math.abs(row[v]! - out[t * V + v]!));
      });
      assert.ok(d2 <= 1e-4 * Math.max(1, scale), `${mode}: max logit difference ${d2} (scale ${scale}), seed ${SEED}`);
      const a2 = rt.activity();
      for (let l = 0; l < 2; l++) {
        const refMean = ref.ffnNonZeros[l]!.reduce((a, b) => a + b, 0) / tokens.length;
        assert.ok(Math.abs(a2[l]!.nnzMean! - refMean) <= 0.5, `${mode} layer ${l}: engine ${a2[l]!.nnzMean} vs reference ${refMean}`);
        if (mode === 'sparse') assert.ok(a2[l]!.sparseCalls === 1 && a2[l]!.denseCalls === 0, `layer ${l}: ${JSON.stringify(a2[l])}`);
        else assert.ok(a2[l]!.sparseCalls === 0 && a2[l]!.denseCalls === 1, `layer ${l}: ${JSON.stringify(a2[l])}`);
      }
    }
  } finally {
    rt.close();
    await src.close();
  }
  // Thresholds change the model a little: held-out perplexity is reported both ways.
  assert.ok(r.perplexityBefore && r.perplexityAfter);
});

/** Kills `neurons` of every layer of a gpt2 / opt checkpoint: up weights and bias of the neuron set so it never activates. */
async function killNonGated(dir: string, neurons: number[]): Promise<void> {
  const file = join(dir, 'model.safetensors');
  const set = new Set(neurons);
  await rewriteSafetensors(file, file + '.new', (ts) =>
    ts.map((t) => {
      const bytes = new Uint8Array(t.bytes);
      const elem = t.dtype === 'F32' ? 4 : 2;
      const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
      if (/mlp\.c_fc\.weight$/.test(t.name)) {
        // GPT-2 Conv1D: stored [d, F]; neuron j is column j.
        const [rows, cols] = t.shape as [number, number];
        for (let r = 0; r < rows; r++) for (const j of set) bytes.fill(0, (r * cols + j) * elem, (r * cols + j + 1) * elem);
      } else if (/fc1\.weight$/.test(t.name)) {
        const cols = t.shape[1]!;
        for (const j of set) bytes.fill(0, j * cols * elem, (j + 1) * cols * elem);
      } else if (/(mlp\.c_fc|fc1)\.bias$/.test(t.name)) {
        // gelu(0) = 0 (GPT-2); relu(−1) = 0 (OPT, F16 −1 = 0xBC00).
        for (const j of set) {
          if (elem === 4) view.setFloat32(j * 4, 0, true);
          else view.setUint16(j * 2, 0xbc00, true);
        }
      } else return t;
      return { ...t, bytes };
    }),
  );
  renameSync(file + '.new', file);
}

test('non-gated models (GPT-2 Conv1D layout, OPT): dead neurons removed from weights and biases, packed and dense outputs agree and are exact', async () => {
  for (const [name, opts] of [['opt', {}], ['gpt2', { thresholds: [0.02] }]] as const) {
    const dir = copyFixture(name, join(tmp, 'ng'));
    copyFileSync(TOKENIZER, join(dir, 'tokenizer.json'));
    const F = (JSON.parse(readFileSync(join(dir, 'config.json'), 'utf8')).ffn_dim as number | undefined) ?? 4 * (JSON.parse(readFileSync(join(dir, 'config.json'), 'utf8')).n_embd as number);
    const rng = new Rng(SEED + 11);
    const dead = [...Array(F).keys()].filter(() => rng.uniform() < 0.3);
    await killNonGated(dir, dead);
    // Reference: the same thresholds, nothing removed, f32.
    const ref = join(tmp, 'ng', `${name}-ref.sllm`);
    const packedOut = join(tmp, 'ng', `${name}-pruned.sllm`);
    const denseOut = join(tmp, 'ng', `${name}-pruned`);
    await prune(dir, { ...base(), ...opts, output: ref, dtype: 'F32' });
    const r = await prune(dir, { ...base(), ...opts, dropDead: true, output: packedOut, dtype: 'F32' });
    await prune(dir, { ...base(), ...opts, dropDead: true, output: denseOut });
    for (const L of r.layers) assert.ok(L.removed >= dead.length, `${name} layer ${L.layer}: removed ${L.removed} < ${dead.length}`);
    const cfg = JSON.parse(readFileSync(join(denseOut, 'config.json'), 'utf8'));
    assert.deepEqual(cfg.sparsellm_intermediate_sizes, r.layers.map((l) => l.dFFOut));
    const a = await ModelRuntime.load(ref, { context: 128 });
    const b = await ModelRuntime.load(packedOut, { context: 128 });
    const c = await ModelRuntime.load(denseOut, { context: 128, dtype: 'F32' });
    try {
      const ids = a.tokenizer!.encode(readFileSync(text, 'utf8')).slice(0, 640);
      const ab = maxLogitDiff(a, b, ids, 128);
      assert.ok(ab.diff <= 1e-5 * Math.max(1, ab.scale), `${name}: pruned vs unpruned ${ab.diff} (scale ${ab.scale})`);
      const bc = maxLogitDiff(b, c, ids, 128);
      assert.ok(bc.diff <= 1e-5 * Math.max(1, bc.scale), `${name}: dense directory vs packed ${bc.diff} (scale ${bc.scale})`);
    } finally {
      a.close();
      b.close();
      c.close();
    }
  }
});

test('bad inputs: clear errors and warnings', async () => {
  await assert.rejects(prune(silu, { ...base(), targetSparsity: 1.5 }), (e: unknown) => e instanceof UsageError && /\(0, 1\)/.test((e as Error).message));
  await assert.rejects(prune(relu, { ...base(), targetSparsity: 0.5 }), (e: unknown) => e instanceof UsageError && /ReLU/.test((e as Error).message));
  await assert.rejects(prune(silu, { ...base(), thresholds: [0.1, 0.2, 0.3] }), /one value or 2/);
  // Too little text: a warning that gives the count.
  const short = join(tmp, 'short.txt');
  writeFileSync(short, 'The river and the town.');
  const warnings: string[] = [];
  const r = await prune(relu, { text: [short], tokens: 2000, context: 128, onWarning: (s) => warnings.push(s) });
  assert.ok(warnings.some((w) => new RegExp(`only ${r.calibration.tokens} tokens`).test(w)), warnings.join('\n'));
  assert.equal(r.heldOut.source, 'none');
  // A tokenizer with more ids than the model: refused.
  await assert.rejects(prune(relu, { ...base(), tokenizer: 'byte' }), (e: unknown) => e instanceof SparseLlmError && /257 ids but the model only 256/.test((e as Error).message));
  // A packed model cannot become a dense checkpoint directory.
  await assert.rejects(prune(join(tmp, 'relu-pruned.sllm'), { ...base(), dropDead: true, output: join(tmp, 'nope') }), /packed model can only be pruned into a packed model/);
  assert.ok(!existsSync(join(tmp, 'nope')));
  // Existing output without force.
  await assert.rejects(prune(relu, { ...base(), dropDead: true, output: join(tmp, 'relu-pruned.sllm') }), /already exists/);
});
