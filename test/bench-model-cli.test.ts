// `sparsellm bench --model`: the model-level mode of bench, on a small fixture (spawns the CLI).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { REPO_ROOT, FIXTURE_PATHS } from './helpers/fixtures.js';
import { benchModel, decodeBytes } from '../src/core/model/bench.js';
import type { ModelSpec } from '../src/core/model/spec.js';

const BIN = join(REPO_ROOT, 'bin', 'sparsellm.js');
const run = (args: string[]) => spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', env: { ...process.env, OMP_NUM_THREADS: '2' } });

test('bench --model --json: dense and sparse paths, ratios, sparsity per layer', () => {
  const r = run(['bench', '--model', FIXTURE_PATHS.opt!, '--prefill', '24', '--decode', '6', '--repeats', '2', '--warmup', '0', '--no-bandwidth', '--json', '-q']);
  assert.equal(r.status, 0, r.stderr);
  const j = JSON.parse(r.stdout);
  assert.equal(j.dense.mode, 'dense');
  assert.equal(j.sparse.mode, 'sparse');
  assert.equal(j.dense.prefillSeconds.length, 2);
  assert.ok(j.dense.prefillTokensPerSecond > 0 && j.sparse.decodeTokensPerSecond > 0);
  assert.ok(Math.abs(j.speedup.decode - j.sparse.decodeTokensPerSecond / j.dense.decodeTokensPerSecond) < 1e-9);
  assert.equal(j.layers.length, 2);
  assert.ok(j.layers[0].nnzMean > 0 && j.layers[0].nnzMean < 80);
  assert.equal(j.memoryBandwidthGBs, null);
  assert.ok(j.peakRssBytes > 0);
  assert.ok(j.sparse.decodeBytesPerToken < j.dense.decodeBytesPerToken);
});

test('bench --model --json: bandwidth probed before and after the rounds, the dense share against their mean', () => {
  const r = run(['bench', '--model', FIXTURE_PATHS.opt!, '--prefill', '16', '--decode', '4', '--repeats', '3', '--warmup', '0', '--json', '-q']);
  assert.equal(r.status, 0, r.stderr);
  const j = JSON.parse(r.stdout);
  const bw: number[] = j.memoryBandwidthSamplesGBs;
  assert.equal(bw.length, 2);
  assert.ok(bw.every((x) => x > 0.5 && x < 5000), `probes ${bw}`);
  assert.ok(Math.abs(j.memoryBandwidthGBs - (bw[0]! + bw[1]!) / 2) < 1e-9);
  assert.ok(Math.abs(j.denseDecodeBandwidthFraction - j.dense.decodeGBs / j.memoryBandwidthGBs) < 1e-12);
  // The probe's buffer (1 GiB) is allocated in a child process, not counted in this peak.
  assert.ok(j.peakRssBytes < 900 * 2 ** 20, `peak RSS ${j.peakRssBytes}`);
});

test('bench --model --kv-cache bf16: reported, and the cache counted at 2 bytes per element', () => {
  const args = ['bench', '--model', FIXTURE_PATHS.opt!, '--prefill', '8', '--decode', '4', '--decode-prompt', '40', '--repeats', '1', '--warmup', '0', '--no-bandwidth', '--json', '-q'];
  const f = run(args);
  const b = run([...args, '--kv-cache', 'bf16']);
  assert.equal(f.status, 0, f.stderr);
  assert.equal(b.status, 0, b.stderr);
  const jf = JSON.parse(f.stdout), jb = JSON.parse(b.stdout);
  assert.equal(jf.kvCache, 'f32');
  assert.equal(jb.kvCache, 'bf16');
  assert.ok(jb.dense.decodeBytesPerToken < jf.dense.decodeBytesPerToken, `${jb.dense.decodeBytesPerToken} vs ${jf.dense.decodeBytesPerToken}`);
});

test('energy per prefill token: the counter\'s rise over back-to-back prefills of each path, or why not measured', async () => {
  const base = { prefillTokens: 12, decodeTokens: 2, decodePrompt: 4, repeats: 1, warmup: 0, seed: 3, bandwidth: false };
  // A stand-in counter at "3 W" (3 mJ per ms of wall time): the result is 3 mJ per ms of
  // measured prefill divided by the tokens run.
  const r = await benchModel(FIXTURE_PATHS['llama-relu-gqa']!, { ...base, energySeconds: 0.3, energyCounter: () => 3 * performance.now() });
  const e = r.energy;
  assert.ok(e && !('unavailable' in e), JSON.stringify(e));
  for (const p of [e.dense, e.sparse]) {
    assert.ok(p.calls >= 2 && p.seconds >= 0.3, JSON.stringify(p));
    const expect = (3 * p.seconds * 1000) / (p.calls * 12);
    assert.ok(Math.abs(p.millijoulesPerToken - expect) < 0.05 * expect, `${p.millijoulesPerToken} vs ${expect}`);
  }
  assert.ok(Math.abs(e.sparseOverDense - e.sparse.millijoulesPerToken / e.dense.millijoulesPerToken) < 1e-12);
  assert.equal(e.source, 'injected counter');
  // The cpu backend has no counter: said so; without energySeconds, not attempted.
  const c = await benchModel(FIXTURE_PATHS['llama-relu-gqa']!, { ...base, energySeconds: 0.1 });
  assert.deepEqual(c.energy, { unavailable: 'no energy counter on the cpu backend' });
  assert.equal((await benchModel(FIXTURE_PATHS['llama-relu-gqa']!, base)).energy, null);
});

test('bench --model: usage errors', () => {
  let r = run(['bench', '--model', FIXTURE_PATHS.opt!, '--csv']);
  assert.equal(r.status, 2, r.stderr);
  r = run(['bench', '--model', FIXTURE_PATHS.opt!, '--kv-cache', 'f16']);
  assert.equal(r.status, 2, r.stderr);
  assert.match(r.stderr, /--kv-cache/);
  r = run(['bench', '--model', FIXTURE_PATHS.opt!, '--energy-seconds', '-1']);
  assert.equal(r.status, 2, r.stderr);
  assert.match(r.stderr, /--energy-seconds must be a number in \[0, 600\]/);
  r = run(['bench', '--model', FIXTURE_PATHS.opt!, '--prefill', '500', '-q']);
  assert.equal(r.status, 2, r.stderr);
  assert.match(r.stderr, /--context must be in \[1, 128\]|holds 128/);
});

test('decode bytes per token: dense counts every matrix once, sparse only the active neurons after the gate', () => {
  const spec = { dModel: 8, nLayers: 1, nHeads: 2, nKvHeads: 1, headDim: 4, dFF: [10], gated: true, vocabSize: 5 } as ModelSpec;
  // q 8x8, k 4x8, v 4x8, o 8x8 = 192; gate 80 + up/down 160; lm head 40 → 472 elements; KV 0.
  assert.equal(decodeBytes(spec, 2, 0), 472 * 2);
  assert.equal(decodeBytes(spec, 2, 0, [3]), (192 + 80 + 3 * 16 + 40) * 2);
  assert.equal(decodeBytes(spec, 2, 10), 472 * 2 + 2 * 10 * 4 * 4);
  // A bf16 KV cache: 2 bytes per cached element.
  assert.equal(decodeBytes(spec, 2, 10, undefined, undefined, 2), 472 * 2 + 2 * 10 * 4 * 2);
  // A screened gate: int8 copy (F·d bytes + 8 per row) plus the candidate rows read exactly.
  assert.equal(decodeBytes(spec, 2, 0, [3], [5]), (192 + 3 * 16 + 40) * 2 + 10 * 8 + 8 * 10 + 5 * 8 * 2);
});

test('bench --model --profile --json: every step of a decoded token, within the decode wall time, GB/s from the step weights', () => {
  const r = run(['bench', '--model', FIXTURE_PATHS.opt!, '--prefill', '16', '--decode', '8', '--repeats', '3', '--warmup', '0', '--no-bandwidth', '--profile', '--json', '-q']);
  assert.equal(r.status, 0, r.stderr);
  const j = JSON.parse(r.stdout);
  assert.equal(j.options.profile, true);
  for (const p of [j.dense, j.sparse]) {
    const steps: { step: string; microsecondsPerToken: number; gbPerSecond: number | null }[] = p.decodeSteps;
    assert.deepEqual(steps.map((s) => s.step), ['embed', 'norms', 'qkv', 'rope', 'kvStore', 'attention', 'oProj', 'residual', 'ffn', 'head']);
    for (const s of steps) assert.ok(Number.isFinite(s.microsecondsPerToken) && s.microsecondsPerToken >= 0, `${p.mode} ${s.step}`);
    for (const name of ['norms', 'qkv', 'attention', 'oProj', 'ffn', 'head']) {
      assert.ok(steps.find((s) => s.step === name)!.microsecondsPerToken > 0, `${p.mode} ${name} took no time`);
    }
    // OPT: learned positions, no RoPE.
    assert.equal(steps.find((s) => s.step === 'rope')!.microsecondsPerToken, 0);
    // The steps run inside the timed decode: their sum (each step a median over the rounds) stays
    // under the slowest round's wall time per token.
    const total = steps.reduce((a, s) => a + s.microsecondsPerToken, 0);
    const slowest = (Math.max(...p.decodeSeconds) / 8) * 1e6;
    assert.ok(total <= slowest * 1.001, `${p.mode}: steps ${total} us > ${slowest} us per token`);
    const qkv = steps.find((s) => s.step === 'qkv')!;
    assert.ok(qkv.gbPerSecond! > 0);
    assert.equal(steps.find((s) => s.step === 'ffn')!.gbPerSecond === null, p.mode === 'sparse');
    assert.equal(steps.find((s) => s.step === 'attention')!.gbPerSecond, null);
  }
  // Without --profile: no step times.
  const plain = run(['bench', '--model', FIXTURE_PATHS.opt!, '--prefill', '8', '--decode', '2', '--repeats', '1', '--warmup', '0', '--no-bandwidth', '--json', '-q']);
  assert.equal(plain.status, 0, plain.stderr);
  assert.equal(JSON.parse(plain.stdout).dense.decodeSteps, undefined);
});

test('bench --model --profile: a table of the decode steps', () => {
  const r = run(['bench', '--model', FIXTURE_PATHS.opt!, '--prefill', '8', '--decode', '4', '--repeats', '1', '--warmup', '0', '--no-bandwidth', '--profile', '--markdown']);
  assert.equal(r.status, 0, r.stderr);
  assert.match(r.stdout, /\| decode step \| dense µs\/token \| dense GB\/s \| sparse µs\/token \| sparse GB\/s \|/);
  assert.match(r.stdout, /\| qkv \| [0-9.]+ \| [0-9.]+ \|/);
  assert.match(r.stdout, /\| all steps \|/);
});
