// The CUDA backend through the addon (src/core/engine/cuda.ts) against the CPU FfnLayer and a
// float64 reference written here. Skipped, with the reason, where no usable GPU is present (or
// the build has no CUDA backend); the availability report itself is always tested.
//
// Inputs: "exact" gates (small-integer x, gate weights multiples of 1/8) so the sparsity pattern
// and non-zero counts compare exactly; every value rounded to bf16 first, since the GPU keeps
// bf16 weights and activations. Tolerance 2e-2 relative (Frobenius): the GPU rounds the hidden
// values g and h to bf16 (relative 2^-9 each) before the down projection.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { CudaFfnLayer, createCudaBenchEngine, cudaAvailability } from '../src/core/engine/cuda.js';
import { FfnLayer } from '../src/core/engine/ffn.js';
import { bf16BitsToF32, f32ToBf16Bits } from '../src/core/dtype.js';
import { Rng } from './helpers/rng.js';

const seed = Rng.seedFromEnv((Math.random() * 2 ** 32) >>> 0);
console.error(`cuda.test seed ${seed} (set SPARSELLM_TEST_SEED to replay)`);
const rng = new Rng(seed);
const TOL = 2e-2;
const avail = cudaAvailability();
const skip = avail.usable ? false : `no usable GPU: ${avail.reason}`;

test('CUDA availability is reported, with a reason when unusable', () => {
  if (avail.usable) assert.ok(avail.device, 'a usable backend names its device');
  else assert.ok(avail.reason && avail.reason.length > 10, `reason: ${avail.reason}`);
});

const rb = (v: number): number => bf16BitsToF32(f32ToBf16Bits(v));
const roundAll = (a: Float32Array): Float32Array => a.map(rb);

interface Problem {
  M: number; d: number; F: number; gated: boolean;
  x: Float32Array; act: Float32Array; up: Float32Array; down: Float32Array;
  upBias?: Float32Array; downBias?: Float32Array;
}

function makeProblem(M: number, d: number, F: number, gated: boolean, fires: number, heavyEvery: number): Problem {
  const x = new Float32Array(M * d);
  for (let m = 0; m < M; m++) {
    const heavy = heavyEvery > 0 && m % heavyEvery === heavyEvery - 1;
    x[m * d] = 1;
    for (let k = 1; k < d; k++) x[m * d + k] = rng.int(-3, 3) * (heavy ? 3 : 1);
  }
  // Threshold per neuron at `fires` standard deviations of the rest of its pre-activation.
  const act = new Float32Array(F * d);
  for (let j = 0; j < F; j++) {
    let ss = 0;
    for (let k = 1; k < d; k++) { const w = rng.int(-8, 8) / 8; act[j * d + k] = w; ss += w * w; }
    act[j * d] = -Math.round(Math.sqrt(ss * 4) * fires * 8) / 8;
  }
  const p: Problem = {
    M, d, F, gated, x,
    act: roundAll(act),
    up: roundAll(rng.normalArray(F * d, 1 / Math.sqrt(d))),
    down: roundAll(rng.normalArray(d * F, 1 / Math.sqrt(F * 0.05))),
  };
  if (!gated) p.upBias = new Float32Array(F).map(() => rng.int(-8, 8) / 8);
  p.downBias = rng.normalArray(d);
  return p;
}

function reference(p: Problem): { y: Float64Array; nnz: number } {
  const { M, d, F } = p;
  const y = new Float64Array(M * d);
  let nnz = 0;
  const h = new Float64Array(F);
  for (let m = 0; m < M; m++) {
    for (let j = 0; j < F; j++) {
      let z = p.upBias ? p.upBias[j]! : 0;
      for (let k = 0; k < d; k++) z += p.x[m * d + k]! * p.act[j * d + k]!;
      if (!(z > 0)) { h[j] = 0; continue; }
      nnz++;
      if (p.gated) {
        let u = 0;
        for (let k = 0; k < d; k++) u += p.x[m * d + k]! * p.up[j * d + k]!;
        h[j] = z * u;
      } else {
        h[j] = z;
      }
    }
    for (let i = 0; i < d; i++) {
      let s = p.downBias ? p.downBias[i]! : 0;
      for (let j = 0; j < F; j++) s += h[j]! * p.down[i * F + j]!;
      y[m * d + i] = s;
    }
  }
  return { y, nnz };
}

function relError(a: Float32Array, ref: ArrayLike<number>): number {
  let num = 0, den = 0;
  for (let i = 0; i < a.length; i++) {
    if (Number.isNaN(a[i])) return Infinity;
    num += (a[i]! - ref[i]!) ** 2;
    den += ref[i]! ** 2;
  }
  return Math.sqrt(num / den);
}

function layers(p: Problem, tileWidth: number): { gpu: CudaFfnLayer; cpu: FfnLayer } {
  const w = {
    dModel: p.d, dFF: p.F, gated: p.gated,
    ...(p.gated ? { gate: p.act, up: p.up } : { up: p.act, upBias: p.upBias }),
    down: p.down, downBias: p.downBias, tileWidth, compression: 8,
  };
  return { gpu: new CudaFfnLayer(w), cpu: new FfnLayer({ ...w, dtype: 'bf16' }) };
}

for (const gated of [true, false]) {
  const kind = gated ? 'gated' : 'non-gated';
  test(`CUDA ${kind} FFN forward (sparse, dense, auto) matches float64 and the CPU; overflow rows recomputed`, { skip }, () => {
    for (const [M, d, F, tile, heavyEvery] of [[1, 40, 300, 256, 0], [7, 40, 300, 64, 3], [300, 37, 520, 128, 5]] as const) {
      const p = makeProblem(M, d, F, gated, 2.0, heavyEvery);
      const ref = reference(p);
      const { gpu, cpu } = layers(p, tile);
      const cpuOut = cpu.forward(p.x, M, { mode: 'sparse' });
      for (const mode of ['sparse', 'dense', 'auto'] as const) {
        const r = gpu.forward(p.x, M, { mode });
        const eRef = relError(r.y, ref.y), eCpu = relError(r.y, cpuOut.y);
        assert.ok(eRef < TOL && eCpu < TOL, `${kind} M=${M} d=${d} F=${F} T=${tile} ${mode}: ${eRef} vs float64, ${eCpu} vs CPU`);
        assert.equal(r.stats.nnz, ref.nnz, `${kind} M=${M} ${mode}: non-zeros`);
        if (mode === 'sparse') {
          assert.equal(r.stats.overflowRows, cpuOut.stats.overflowRows, 'overflow rows as the CPU counts them');
          assert.equal(r.stats.fallbackRows, r.stats.overflowRows, 'every overflowing row recomputed');
          if (heavyEvery === 5) assert.ok(r.stats.overflowRows > 0, 'the heavy rows overflow their tiles');
        }
      }
      // the any-shape kernel on the same inputs
      const g = gpu.forward(p.x, M, { mode: 'sparse', generic: true });
      assert.ok(relError(g.y, ref.y) < TOL, `${kind} M=${M} generic kernel`);
    }
  });

  test(`CUDA ${kind} FFN decode (1 and 3 tokens) matches float64`, { skip }, () => {
    for (const M of [1, 3]) {
      const p = makeProblem(M, 48, 700, gated, 2.0, 0);
      const ref = reference(p);
      const { gpu } = layers(p, 256);
      for (const mode of ['sparse', 'dense'] as const) {
        const r = gpu.decode(p.x, { mode });
        assert.ok(relError(r.y, ref.y) < TOL, `${kind} decode M=${M} ${mode}: ${relError(r.y, ref.y)}`);
      }
      assert.equal(gpu.decode(p.x, { mode: 'sparse' }).stats.nnz, ref.nnz);
    }
  });
}

test('CUDA bench engine: forward and GEMM cases, training refused with a reason', { skip }, () => {
  const eng = createCudaBenchEngine();
  const shape = { dModel: 64, dFF: 256, gated: true };
  assert.equal(eng.supports({ id: 't', op: 'ffn-forward', shape, tokens: 8, density: null, dtype: 'bf16' }), true);
  assert.match(String(eng.supports({ id: 't', op: 'ffn-train', shape, tokens: 8, density: null, dtype: 'f32' })), /training baseline/);
  const t = eng.timeGemm(300, 64, 200, 'bf16', 'ours', 3, 1);
  assert.ok(t.medianMs > 0);
});

test('CUDA training step (hybrid and dense) matches the CPU trainer (y, dx, weight gradients, L1)', { skip }, () => {
  for (const [M, d, F, tile, ellWidth, l1] of [[7, 40, 300, 64, 128, 0], [120, 37, 520, 128, 16, 0.3]] as const) {
    const p = makeProblem(M, d, F, true, 2.0, 5);
    const dy = roundAll(rng.normalArray(M * d));
    const w = { dModel: d, dFF: F, gated: true, gate: p.act, up: p.up, down: p.down, tileWidth: tile, compression: 8 };
    const layer = new CudaFfnLayer(w);
    const cpu = new FfnLayer({ ...w, dtype: 'f32' }).trainStep(p.x, dy, M, { mode: 'hybrid', ellWidth, l1 });
    for (const mode of ['hybrid', 'dense'] as const) {
      const gpu = layer.trainStep(p.x, dy, M, { mode, ellWidth, l1 });
      for (const k of ['y', 'dx', 'dWgate', 'dWup', 'dWdown'] as const) {
        const e = relError(gpu[k], cpu[k]);
        assert.ok(e < TOL, `${mode} M=${M} d=${d} F=${F}: ${k} rel error ${e}`);
      }
      assert.ok(Math.abs(gpu.loss.l1 - cpu.loss.l1) <= 1e-2 * Math.abs(cpu.loss.l1) + 1e-12, `${mode} l1 ${gpu.loss.l1} vs ${cpu.loss.l1}`);
      assert.equal(gpu.stats.nnz, cpu.stats.nnz);
    }
  }
});
