// The native FFN layer through the addon (src/core/engine/ffn.ts) against a float64 reference
// written here in TypeScript. Small shapes, awkward sizes (d odd, dFF not a multiple of the tile).
//
// The gate is built "exactly" (small-integer inputs, gate weights multiples of 1/8, a constant
// input feature with a per-neuron negative weight as threshold) so that the f32 sparsity pattern
// equals the float64 one and the non-zero counts compare exactly; up/down weights are Gaussian,
// so the outputs carry real f32 rounding. Tolerance 2e-5 relative (Frobenius): f32 sums of
// d + dFF ≈ 340 terms err by ~eps·sqrt(340) ≈ 1e-6. bf16 weights: the reference uses the same
// bf16-rounded weights, so the same tolerance applies.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { FfnLayer } from '../src/core/engine/ffn.js';
import { bf16BitsToF32, f32ToBf16Bits } from '../src/core/dtype.js';
import { Rng } from './helpers/rng.js';

const seed = Rng.seedFromEnv((Math.random() * 2 ** 32) >>> 0);
console.error(`ffn.test seed ${seed} (set SPARSELLM_TEST_SEED to replay)`);
const rng = new Rng(seed);
const TOL = 2e-5;

interface Problem {
  M: number; d: number; F: number;
  x: Float32Array; gate: Float32Array; up: Float32Array; down: Float32Array;
  upBias?: Float32Array; downBias?: Float32Array;
}

/** Quantile of N(0,1) (Acklam-free bisection on a series erf). */
function invNormal(p: number): number {
  const cdf = (z: number): number => {
    // Abramowitz-Stegun 7.1.26 is enough to place a threshold
    const t = 1 / (1 + 0.3275911 * Math.abs(z) / Math.SQRT2);
    const y = 1 - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t + 0.254829592) * t * Math.exp(-z * z / 2);
    return 0.5 * (1 + Math.sign(z) * y);
  };
  let lo = -10, hi = 10;
  for (let i = 0; i < 80; i++) { const mid = (lo + hi) / 2; if (cdf(mid) < p) lo = mid; else hi = mid; }
  return (lo + hi) / 2;
}

function makeProblem(M: number, d: number, F: number, density: number, heavyEvery: number, biases: boolean): Problem {
  const x = new Float32Array(M * d);
  for (let m = 0; m < M; m++) {
    const heavy = heavyEvery > 0 && m % heavyEvery === heavyEvery - 1;
    x[m * d] = 1;
    for (let k = 1; k < d; k++) x[m * d + k] = rng.int(-3, 3) * (heavy ? 4 : 1);
  }
  const gate = new Float32Array(F * d);
  for (let j = 0; j < F; j++) {
    let ss = 0;
    for (let k = 1; k < d; k++) { const w = rng.int(-8, 8) / 8; gate[j * d + k] = w; ss += w * w; }
    const sigma = Math.sqrt(ss * 4);
    const theta = density >= 1 ? -(6 * sigma + 1) : sigma * invNormal(1 - density);
    gate[j * d] = -Math.round(theta * 8) / 8;
  }
  const up = rng.normalArray(F * d, 1 / Math.sqrt(d));
  const down = rng.normalArray(d * F, 1 / Math.sqrt(F * Math.max(density, 0.01)));
  const p: Problem = { M, d, F, x, gate, up, down };
  if (biases) {
    p.upBias = new Float32Array(F).map(() => rng.int(-8, 8) / 8);
    p.downBias = rng.normalArray(d);
  }
  return p;
}

function bf16Round(a: Float32Array): Float32Array {
  return a.map((v) => bf16BitsToF32(f32ToBf16Bits(v)));
}

function linear(x: Float32Array, M: number, d: number, W: Float32Array, F: number, bias?: Float32Array): Float64Array {
  const z = new Float64Array(M * F);
  for (let m = 0; m < M; m++)
    for (let j = 0; j < F; j++) {
      let s = bias ? bias[j]! : 0;
      for (let k = 0; k < d; k++) s += x[m * d + k]! * W[j * d + k]!;
      z[m * F + j] = s;
    }
  return z;
}

/** float64 FFN: returns y, the hidden h and the gate/up pre-activations. */
function refFfn(p: Problem, gated: boolean): { y: Float64Array; h: Float64Array; g: Float64Array; u: Float64Array } {
  const { M, d, F } = p;
  let h: Float64Array, g: Float64Array, u: Float64Array;
  if (gated) {
    g = linear(p.x, M, d, p.gate, F);
    u = linear(p.x, M, d, p.up, F);
    h = g.map((v, i) => (v > 0 ? v : 0) * u[i]!);
  } else {
    g = linear(p.x, M, d, p.up, F, p.upBias);
    u = g;
    h = g.map((v) => (v > 0 ? v : 0));
  }
  const y = new Float64Array(M * d);
  for (let m = 0; m < M; m++)
    for (let i = 0; i < d; i++) {
      let s = p.downBias ? p.downBias[i]! : 0;
      for (let j = 0; j < F; j++) s += h[m * F + j]! * p.down[i * F + j]!;
      y[m * d + i] = s;
    }
  return { y, h, g, u };
}

function relErr(a: Float32Array, ref: Float64Array): number {
  assert.equal(a.length, ref.length);
  let num = 0, den = 0;
  for (let i = 0; i < a.length; i++) {
    if (Number.isNaN(a[i])) return Infinity;
    num += (a[i]! - ref[i]!) ** 2; den += ref[i]! ** 2;
  }
  return den === 0 ? Math.sqrt(num) : Math.sqrt(num / den);
}

function countNnz(z: Float64Array, M: number, F: number): { nnz: number; maxRow: number } {
  let nnz = 0, maxRow = 0;
  for (let m = 0; m < M; m++) {
    let r = 0;
    for (let j = 0; j < F; j++) r += z[m * F + j]! > 0 ? 1 : 0;
    nnz += r; maxRow = Math.max(maxRow, r);
  }
  return { nnz, maxRow };
}

for (const gated of [true, false]) {
  for (const dtype of ['f32', 'bf16'] as const) {
    test(`FfnLayer ${gated ? 'gated' : 'non-gated'} ${dtype}: forward and decode match float64 in every mode`, () => {
      for (const [M, density, heavy] of [[7, 0.05, 3], [33, 0.2, 4], [5, 1, 0]] as const) {
        const p = makeProblem(M, 37, 300, density, heavy, !gated);
        if (!gated) p.up = p.gate; // the sparse projection is the up projection
        if (dtype === 'bf16') { p.up = bf16Round(p.up); p.down = bf16Round(p.down); p.gate = bf16Round(p.gate); }
        const layer = new FfnLayer({
          dModel: 37, dFF: 300, gated, dtype, tileWidth: 64, compression: 8,
          ...(gated ? { gate: p.gate } : {}), up: p.up, down: p.down,
          ...(p.upBias ? { upBias: p.upBias } : {}), ...(p.downBias ? { downBias: p.downBias } : {}),
        });
        assert.deepEqual(layer.config, { dModel: 37, dFF: 300, gated, dtype, tileWidth: 64, compression: 8, capacity: 7 });
        const ref = refFfn(p, gated);
        const counts = countNnz(ref.g, M, 300);
        for (const mode of ['dense', 'sparse', 'auto'] as const) {
          const r = layer.forward(p.x, M, { mode });
          const err = relErr(r.y, ref.y);
          assert.ok(err <= TOL, `M=${M} rho=${density} ${mode}: rel error ${err}`);
          assert.equal(r.stats.nnz, counts.nnz, `${mode} nnz`);
          assert.equal(r.stats.maxRowNnz, counts.maxRow, `${mode} maxRowNnz`);
          if (mode !== 'auto') assert.equal(r.stats.path, mode);
          if (mode === 'sparse' && density >= 1) assert.ok(r.stats.overflowTiles > 0 && r.stats.overflowRows === M);
          const one = p.x.subarray(0, 37);
          const dec = layer.decode(one, { mode });
          const errDec = relErr(dec.y, ref.y.subarray(0, 37));
          assert.ok(errDec <= TOL, `decode ${mode}: rel error ${errDec}`);
        }
        // the out buffer is filled in place
        const out = new Float32Array(M * 37);
        const r = layer.forward(p.x, M, { mode: 'sparse', out });
        assert.equal(r.y, out);
      }
    });
  }
}

test('FfnLayer.trainStep: hybrid and dense match the float64 gradients, hybrid keeps far less', () => {
  const M = 9, d = 37, F = 300, lambda = 0.01;
  const p = makeProblem(M, d, F, 0.05, 4, false);
  const layer = new FfnLayer({ dModel: d, dFF: F, gated: true, dtype: 'f32', gate: p.gate, up: p.up, down: p.down, tileWidth: 64, compression: 8 });
  const dy = rng.normalArray(M * d);
  const { y, h, g, u } = refFfn(p, true);
  // float64 backward
  const dh = new Float64Array(M * F);
  for (let m = 0; m < M; m++)
    for (let j = 0; j < F; j++) {
      let s = 0;
      for (let i = 0; i < d; i++) s += dy[m * d + i]! * p.down[i * F + j]!;
      const hv = h[m * F + j]!;
      dh[m * F + j] = g[m * F + j]! > 0 ? s + (lambda * Math.sign(hv)) / M : 0;
    }
  const du = dh.map((v, i) => v * Math.max(g[i]!, 0));
  const dg = dh.map((v, i) => (g[i]! > 0 ? v * u[i]! : 0));
  const dx = new Float64Array(M * d), dWg = new Float64Array(F * d), dWu = new Float64Array(F * d), dWd = new Float64Array(d * F);
  for (let m = 0; m < M; m++)
    for (let j = 0; j < F; j++) {
      const a = du[m * F + j]!, b = dg[m * F + j]!, hv = h[m * F + j]!;
      for (let k = 0; k < d; k++) {
        dx[m * d + k] += a * p.up[j * d + k]! + b * p.gate[j * d + k]!;
        dWu[j * d + k] += a * p.x[m * d + k]!;
        dWg[j * d + k] += b * p.x[m * d + k]!;
        dWd[k * F + j] += hv * dy[m * d + k]!;
      }
    }
  let l1 = 0;
  for (const v of h) l1 += Math.abs(v);
  l1 /= M;
  const results = [
    layer.trainStep(p.x, dy, M, { mode: 'dense', l1: lambda }),
    layer.trainStep(p.x, dy, M, { mode: 'hybrid', l1: lambda, ellWidth: 16 }),
  ];
  for (const r of results) {
    for (const [name, got, want] of [['y', r.y, y], ['dx', r.dx, dx], ['dWgate', r.dWgate, dWg], ['dWup', r.dWup, dWu], ['dWdown', r.dWdown, dWd]] as const) {
      const err = relErr(got, want);
      assert.ok(err <= TOL, `${name}: rel error ${err}`);
    }
    assert.ok(Math.abs(r.loss.l1 - l1) <= 1e-5 * l1, `l1 ${r.loss.l1} vs ${l1}`);
  }
  const [dense, hybrid] = results as [typeof results[0], typeof results[0]];
  assert.ok(hybrid.stats.tailRows > 0, 'heavy rows should exceed the ELL width of 16');
  assert.ok(hybrid.stats.savedBytes < dense.stats.savedBytes, `saved ${hybrid.stats.savedBytes} vs dense ${dense.stats.savedBytes}`);
  assert.equal(hybrid.stats.nnz, countNnz(g, M, F).nnz);
});

test('FfnLayer: native timing helper and argument checks', () => {
  const p = makeProblem(4, 16, 64, 0.1, 0, false);
  const layer = new FfnLayer({ dModel: 16, dFF: 64, gated: true, dtype: 'bf16', gate: p.gate, up: p.up, down: p.down, tileWidth: 16, compression: 4 });
  for (const kind of ['forward', 'decode'] as const) {
    const t = layer.time(kind, p.x, 4, { mode: 'sparse' }, 3, 1);
    assert.ok(t.minMs >= 0 && t.minMs <= t.medianMs && t.medianMs <= t.maxMs);
  }
  assert.throws(() => layer.forward(p.x, 5), /x has 64 elements, expected 80/);
  assert.throws(() => layer.forward(p.x, 4, { mode: 'fast' as never }), /mode must be/);
  assert.throws(() => layer.trainStep(p.x, p.x, 4), /f32/);
  assert.throws(() => new FfnLayer({ dModel: 16, dFF: 64, gated: true, dtype: 'f32', up: p.up, down: p.down }), /gate must be a Float32Array/);
  assert.throws(() => new FfnLayer({ dModel: 16, dFF: 64, gated: true, dtype: 'f32', gate: p.gate, up: p.up, down: p.down, tileWidth: 8, compression: 8 }), /leaves no room/);
  const f32 = new FfnLayer({ dModel: 16, dFF: 64, gated: true, dtype: 'f32', gate: p.gate, up: p.up, down: p.down });
  const t = f32.time('train', p.x, 4, { mode: 'hybrid' }, 2, 0);
  assert.ok(t.medianMs >= 0);
});
