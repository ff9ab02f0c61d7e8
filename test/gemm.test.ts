// The dense GEMM through the addon (src/core/engine/gemm.ts) against a float64 reference written
// here, on fresh Gaussian inputs of awkward sizes, for f32 and bf16 weights and every ISA path the
// CPU has; OpenBLAS sgemm agreement when OpenBLAS is installed.
//
// Tolerance: relative Frobenius error 2e-6·sqrt(K). An f32 sum of K random-sign products errs by
// about eps_f32·sqrt(K) (eps ≈ 6e-8), so this leaves ~30x headroom; an indexing bug gives O(1).
// bf16 weights: the reference uses the same bf16-rounded weights, so the f32 tolerance applies.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { engine } from '../src/core/native.js';
import { gemm, gemmInfo, memoryBandwidth, openblasInfo, openblasSgemm, timeGemm } from '../src/core/engine/gemm.js';
import { bf16BitsToF32, f32ToBf16Bits } from '../src/core/dtype.js';
import { Rng } from './helpers/rng.js';

const seed = Rng.seedFromEnv((Math.random() * 2 ** 32) >>> 0);
console.error(`gemm.test seed ${seed} (set SPARSELLM_TEST_SEED to replay)`);
const rng = new Rng(seed);

const tol = (K: number): number => 2e-6 * Math.sqrt(Math.max(K, 1));

function reference(A: Float32Array, M: number, K: number, W: ArrayLike<number>, N: number): Float64Array {
  const C = new Float64Array(M * N);
  for (let m = 0; m < M; m++)
    for (let n = 0; n < N; n++) {
      let s = 0;
      for (let k = 0; k < K; k++) s += A[m * K + k]! * W[n * K + k]!;
      C[m * N + n] = s;
    }
  return C;
}

function relError(got: Float32Array, ref: Float64Array): number {
  let num = 0, den = 0;
  for (let i = 0; i < ref.length; i++) {
    const d = got[i]! - ref[i]!;
    if (Number.isNaN(got[i]!)) return Infinity;
    num += d * d;
    den += ref[i]! * ref[i]!;
  }
  return den === 0 ? Math.sqrt(num) : Math.sqrt(num / den);
}

function problem(M: number, K: number, N: number) {
  const A = rng.normalArray(M * K);
  const Wf = rng.normalArray(N * K);
  const Wh = new Uint16Array(N * K);
  const Wr = new Float32Array(N * K); // the bf16-rounded weights, widened exactly
  for (let i = 0; i < N * K; i++) {
    Wh[i] = f32ToBf16Bits(Wf[i]!);
    Wr[i] = bf16BitsToF32(Wh[i]!);
  }
  return { A, Wf, Wh, refF32: reference(A, M, K, Wf, N), refBf16: reference(A, M, K, Wr, N) };
}

const shapes: Array<[number, number, number]> = [
  [1, 37, 17], [2, 255, 300], [7, 1, 1], [33, 37, 300], [130, 255, 17], [5, 2048, 40], [64, 130, 333],
];

const isas = (): Array<'portable' | 'avx2' | 'avx512'> => {
  const cpu = engine().buildInfo().cpu;
  const out: Array<'portable' | 'avx2' | 'avx512'> = ['portable'];
  if (cpu.avx2) out.push('avx2');
  else console.error('gemm.test: skipping the avx2 path (this CPU lacks AVX2+FMA)');
  if (cpu.avx512) out.push('avx512');
  else console.error('gemm.test: skipping the avx512 path (this CPU lacks AVX-512)');
  return out;
};

test('gemm matches a float64 reference for f32 and bf16 weights on every ISA path', () => {
  const best = engine().buildInfo().cpu.isa;
  try {
    for (const isa of isas()) {
      engine().setIsa(isa);
      for (const [M, K, N] of shapes) {
        const p = problem(M, K, N);
        const c32 = gemm(p.A, M, K, p.Wf, N);
        assert.equal(c32.length, M * N);
        const e32 = relError(c32, p.refF32);
        assert.ok(e32 <= tol(K), `${isa} f32 M=${M} K=${K} N=${N}: rel err ${e32} > ${tol(K)}`);
        const c16 = gemm(p.A, M, K, p.Wh, N);
        const e16 = relError(c16, p.refBf16);
        assert.ok(e16 <= tol(K), `${isa} bf16 M=${M} K=${K} N=${N}: rel err ${e16} > ${tol(K)}`);
      }
    }
  } finally {
    engine().setIsa(best);
  }
});

test('gemm writes into a given output array and checks sizes', () => {
  const [M, K, N] = [3, 19, 11];
  const p = problem(M, K, N);
  const out = new Float32Array(M * N).fill(99);
  const r = gemm(p.A, M, K, p.Wf, N, out);
  assert.equal(r, out);
  assert.ok(relError(out, p.refF32) <= tol(K));
  assert.throws(() => gemm(p.A, M, K + 1, p.Wf, N), /A has/);
  assert.throws(() => gemm(p.A, M, K, p.Wf, N, new Float32Array(2)), /out has/);
  assert.throws(() => gemm(p.A, M, K, new Float64Array(N * K) as unknown as Float32Array, N), /W must be/);
});

test('gemm agrees with OpenBLAS sgemm when OpenBLAS is installed', (t) => {
  const info = openblasInfo();
  if (!info.available) {
    t.skip(`OpenBLAS unavailable: ${info.reason}`);
    return;
  }
  assert.ok(info.coreName.length > 0, 'OpenBLAS reported no core name');
  console.error(`gemm.test: OpenBLAS ${info.path}, core ${info.coreName}`);
  for (const [M, K, N] of [[1, 37, 17], [33, 255, 300], [70, 64, 129]] as Array<[number, number, number]>) {
    const p = problem(M, K, N);
    const ours = gemm(p.A, M, K, p.Wf, N);
    const theirs = openblasSgemm(p.A, M, K, p.Wf, N);
    assert.ok(relError(theirs, p.refF32) <= tol(K), `OpenBLAS itself is off at M=${M} K=${K} N=${N}`);
    const diff = relError(ours, Float64Array.from(theirs));
    assert.ok(diff <= 2 * tol(K), `ours vs OpenBLAS M=${M} K=${K} N=${N}: rel diff ${diff}`);
  }
});

test('timeGemm, memoryBandwidth and gemmInfo report plausible numbers', () => {
  const t = timeGemm({ M: 8, K: 64, N: 96, dtype: 'bf16', repeats: 3, warmup: 1 });
  assert.ok(t.minMs > 0 && t.minMs <= t.medianMs && t.medianMs <= t.maxMs, JSON.stringify(t));
  assert.equal(t.repeats, 3);
  assert.throws(() => timeGemm({ M: 0, K: 4, N: 4 }), /M must be/);
  assert.throws(() => timeGemm({ M: 4, K: 4, N: 4, dtype: 'bf16', impl: 'openblas' }), /f32 weights only|OpenBLAS/);
  const threads = engine().buildInfo().cpu.threads;
  try {
    engine().setThreads(2);
    assert.throws(() => timeGemm({ M: 4, K: 4, N: 4, clock: 'thread-cpu' }), /one thread/);
    engine().setThreads(1);
    const c = timeGemm({ M: 4, K: 64, N: 40, repeats: 2, warmup: 0, clock: 'thread-cpu' });
    assert.ok(c.minMs > 0 && c.minMs <= c.maxMs, JSON.stringify(c));
  } finally {
    engine().setThreads(threads);
  }
  const gbs = memoryBandwidth(64 << 20);
  assert.ok(Number.isFinite(gbs) && gbs > 0.1, `bandwidth ${gbs}`);
  const info = gemmInfo();
  assert.match(info.kernel, /\d+x\d+/);
  assert.ok(info.tuning.kc >= 16);
});
