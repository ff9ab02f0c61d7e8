// Calibration statistics (src/core/calibrate) against plain recomputation on fresh random
// activations of awkward sizes, TwELL parameter choice, and neuron-map composition.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { LayerStats, TILE_WIDTHS } from '../src/core/calibrate/stats.js';
import { chooseTwell, compressionFor, coveredCount } from '../src/core/calibrate/twell.js';
import { composeNeuronMap, planLayer } from '../src/core/prune/plan.js';
import { Rng } from './helpers/rng.js';

const SEED = Number(process.env.TEST_SEED ?? Date.now() % 1_000_000);
console.log(`calibrate.test seed ${SEED} (TEST_SEED=${SEED} to repeat)`);

/** Random activations: a fraction `zero` of exact zeros, the rest ~ N(0, scale) (relu-like when positive). */
function randomActs(rng: Rng, n: number, zero: number, relu: boolean): Float32Array {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    if (rng.uniform() < zero) continue;
    const v = rng.normal(0, 0.7);
    a[i] = relu ? Math.abs(v) + 1e-3 : v;
  }
  return a;
}

test('LayerStats: firing counts, magnitudes, per-token nnz and per-tile maxima equal a plain recomputation', () => {
  const rng = new Rng(SEED);
  for (const [F, relu, thr] of [[300, true, 0], [77, false, 0.3], [513, true, 0]] as const) {
    const s = new LayerStats(F, thr);
    const batches: { T: number; act: Float32Array; hid: Float32Array }[] = [];
    for (const T of [5, 1, 17]) {
      const act = randomActs(rng, T * F, 0.6, relu);
      const hid = act.map((v) => v * rng.normal(0, 1));
      s.add(T, act, hid);
      batches.push({ T, act, hid });
    }
    const total = batches.reduce((a, b) => a + b.T, 0);
    assert.equal(s.tokens, total);
    const fires = new Float64Array(F);
    const maxA = new Float64Array(F);
    const sumH = new Float64Array(F);
    const nnz: number[] = [];
    const tileMax: Record<number, number[]> = {};
    const tileCounts: Record<number, number[]> = {};
    for (const w of TILE_WIDTHS) {
      tileMax[w] = new Array(Math.ceil(F / w)).fill(0);
      tileCounts[w] = new Array(w + 1).fill(0);
    }
    for (const b of batches) {
      for (let t = 0; t < b.T; t++) {
        let n = 0;
        const tiles: Record<number, number[]> = {};
        for (const w of TILE_WIDTHS) tiles[w] = new Array(Math.ceil(F / w)).fill(0);
        for (let j = 0; j < F; j++) {
          const a = Math.abs(b.act[t * F + j]!);
          maxA[j] = Math.max(maxA[j]!, a);
          sumH[j]! += Math.abs(b.hid[t * F + j]!);
          if (a > thr) {
            fires[j]!++;
            n++;
            for (const w of TILE_WIDTHS) tiles[w]![Math.floor(j / w)]!++;
          }
        }
        nnz.push(n);
        for (const w of TILE_WIDTHS) {
          tiles[w]!.forEach((c, i) => {
            tileMax[w]![i] = Math.max(tileMax[w]![i]!, c);
            tileCounts[w]![c]!++;
          });
        }
      }
    }
    assert.deepEqual(Array.from(s.fires), Array.from(fires));
    assert.deepEqual(Array.from(s.maxAbsAct), Array.from(maxA).map((v) => Math.fround(v)));
    for (let j = 0; j < F; j++) assert.ok(Math.abs(s.sumAbsHidden[j]! - sumH[j]!) <= 1e-9 * (1 + sumH[j]!), `sum |h| of neuron ${j}`);
    assert.deepEqual(Array.from(s.perToken()), nnz);
    const sum = s.summary(3);
    const sorted = [...nnz].sort((a, b) => a - b);
    assert.equal(sum.layer, 3);
    assert.equal(sum.nnzMax, sorted[sorted.length - 1]);
    assert.ok(Math.abs(sum.nnzMean - nnz.reduce((a, b) => a + b, 0) / nnz.length) < 1e-12);
    assert.equal(sum.nnzP99, sorted[Math.ceil(0.99 * sorted.length) - 1]);
    assert.equal(sum.dead, Array.from(fires).filter((f) => f === 0).length);
    for (const w of TILE_WIDTHS) {
      assert.deepEqual(sum.tileMax[w], tileMax[w], `tile maxima at width ${w}`);
      assert.deepEqual(sum.tileCounts[w], tileCounts[w], `tile count histogram at width ${w}`);
    }
  }
});

test('LayerStats.thresholdFor: the cut-off reaches the target fraction of |act| <= c within the bin resolution', () => {
  const rng = new Rng(SEED + 1);
  const F = 211;
  const T = 97;
  const s = new LayerStats(F);
  const act = randomActs(rng, T * F, 0.05, false);
  s.add(T, act, act);
  const abs = Array.from(act, Math.abs).sort((a, b) => a - b);
  for (const target of [0.1, 0.5, 0.73, 0.95]) {
    const c = s.thresholdFor(target);
    const frac = abs.filter((v) => v <= c).length / abs.length;
    assert.ok(Math.abs(frac - target) < 0.01, `target ${target}: cut-off ${c} zeroes ${frac}`);
    assert.ok(Math.abs(s.sparsityAt(c) - target) < 0.01);
  }
  assert.throws(() => new LayerStats(4).thresholdFor(0.5), /no calibration tokens/);
});

test('TwELL choice: capacity holds the observed maximum with headroom; fewest words per row wins', () => {
  assert.equal(compressionFor(256, 29, 1.5), 5); // need 44 entries: 256/5 − 1 = 50 ≥ 44, 256/6 − 1 = 41 < 44
  assert.equal(compressionFor(256, 0, 1.5), 128); // capacity 1
  assert.equal(compressionFor(64, 63, 1), 1);
  for (const [T, m, h] of [[256, 29, 1.5], [128, 7, 2], [64, 40, 1.25], [256, 300, 1]] as const) {
    const C = compressionFor(T, m, h);
    const cap = Math.floor(T / C) - 1;
    assert.ok(cap >= Math.min(T - 1, Math.ceil(m * h)), `T ${T} max ${m}: capacity ${cap}`);
    if (C > 1) assert.ok(Math.floor(T / (C + 1)) - 1 < Math.ceil(m * h), 'C is the largest that fits');
  }
  // Sparse layer: 5632 wide, few per tile (coverage 1: sized on the maxima).
  const F = 5632;
  const tileMax = { 64: new Array(88).fill(3), 128: new Array(44).fill(5), 256: new Array(22).fill(8) };
  const c = chooseTwell(F, tileMax, null, 1.5, 1);
  const words = (T: 64 | 128 | 256) => Math.ceil(F / T) * Math.floor(T / compressionFor(T, tileMax[T][0], 1.5));
  assert.equal(c.wordsPerRow, Math.min(words(64), words(128), words(256)));
  assert.ok(c.capacity >= Math.ceil(c.observedTileMax * 1.5));
  assert.equal(c.overflowRate, 0);
  assert.throws(() => chooseTwell(F, tileMax, null, 0.5), /headroom/);
  assert.throws(() => chooseTwell(F, tileMax, null, 1.5, 0), /coverage/);
  // Coverage: a few heavy (token, tile) pairs do not set the capacity; the overflow rate is reported.
  const hist = new Array(257).fill(0);
  hist[3] = 9000;
  hist[10] = 990;
  hist[200] = 10; // 0.1% heavy
  assert.equal(coveredCount(hist, 0.999), 10);
  assert.equal(coveredCount(hist, 1), 200);
  assert.equal(coveredCount(hist, 0.5), 3);
  const heavyMax = { 64: [64], 128: [128], 256: new Array(22).fill(200) };
  const dense = (w: number, at: number) => Array.from({ length: w + 1 }, (_, c) => (c === at ? 100 : 0));
  const h = chooseTwell(F, heavyMax, { 64: dense(64, 60), 128: dense(128, 120), 256: hist }, 1.5, 0.999);
  assert.equal(h.tileWidth, 256);
  assert.equal(h.coveredCount, 10);
  assert.ok(h.capacity >= 15 && h.compression > 1);
  assert.ok(Math.abs(h.overflowRate - 10 / 10000) < 1e-12);
});

test('neuron maps compose: pruning a pruned layer maps straight back to the original neurons', () => {
  const rng = new Rng(SEED + 2);
  const source = 97;
  // First pruning keeps a random subset.
  const keep1 = Int32Array.from([...Array(source).keys()].filter(() => rng.uniform() < 0.7));
  const p1 = planLayer({ dFF: source, sourceDFF: source, neuronMap: null, threshold: null }, keep1, null);
  assert.deepEqual(Array.from(p1.neuronMap!), Array.from(keep1));
  const keep2 = Int32Array.from([...Array(keep1.length).keys()].filter(() => rng.uniform() < 0.5));
  const p2 = planLayer({ dFF: keep1.length, sourceDFF: source, neuronMap: p1.neuronMap, threshold: null }, keep2, 0.1);
  assert.deepEqual(Array.from(p2.neuronMap!), Array.from(keep2, (k) => keep1[k]!));
  assert.equal(p2.sourceDFF, source);
  // Keeping everything of an unpruned layer is the identity (no map).
  assert.equal(composeNeuronMap(null, Int32Array.from({ length: 5 }, (_, i) => i), 5), null);
  assert.throws(() => planLayer({ dFF: 4, sourceDFF: 4, neuronMap: null, threshold: null }, Int32Array.from([2, 1]), null), /strictly increasing/);
  assert.throws(() => planLayer({ dFF: 4, sourceDFF: 4, neuronMap: null, threshold: null }, new Int32Array(0), null), /at least one/);
});
