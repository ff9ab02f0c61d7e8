// Benchmark inputs: FFN weights and token activations whose ReLU sparsity is genuinely produced by
// a gate projection, at a chosen density, with an uneven per-token distribution (a few heavy
// tokens). Seeded and deterministic. docs/benchmarks.md ("How the inputs are built") describes
// the construction; keep the two in step.
//
// Construction (d = d_model, F = d_ff, M = tokens):
//   x[t]        = [ c, s_t · ξ_t ]          ξ_t ~ N(0, I_{d−1}), c the constant feature
//   W_act[j]    = [ −b_j, σ · η_j ]         η_j ~ N(0, I_{d−1}), σ = 1/√(d−1), b_j ~ 1 + 0.15·N(0,1)
//   pre[t, j]   = x[t] · W_act[j] = −c·b_j + s_t · σ · (ξ_t · η_j)
// W_act is W_gate for a gated FFN and W_up (its ReLU'd projection) otherwise; the constant
// feature plays the role of a bias. Over the random weights, pre[t, j] ~ N(−c·b_j, (σ·r_t)²) with
// r_t = s_t·|ξ_t|, so P(pre > 0) = Φ(−c·b_j / (σ·r_t)). The per-token scale s_t is
// exp(0.1·N(0,1)), times `heavyScale` for a `heavyFraction` of the rows (the heavy tokens, which
// fire several times more neurons). c is solved by bisection so that the mean of that probability
// over the actual tokens and the neurons' offsets equals the target density. The density the
// kernels then see is measured, not assumed.
import type { FfnShape, WeightDType } from './cases.js';
import { Xoshiro128 } from '../random.js';

// ---- Random numbers ----------------------------------------------------------------------

/** Benchmark distributions over the project's seeded generator (src/core/random.ts). */
export class Rng extends Xoshiro128 {
  private spare: number | null = null;

  /** Uniform in (0, 1). */
  uniform(): number {
    return (this.u32() + 0.5) / 4294967296;
  }

  /** Integer in [0, n). */
  below(n: number): number {
    return Math.floor(this.uniform() * n);
  }

  /** Standard normal (Marsaglia's polar method). */
  normal(): number {
    if (this.spare !== null) {
      const v = this.spare;
      this.spare = null;
      return v;
    }
    for (;;) {
      const u = 2 * this.uniform() - 1;
      const v = 2 * this.uniform() - 1;
      const s = u * u + v * v;
      if (s >= 1 || s === 0) continue;
      const f = Math.sqrt((-2 * Math.log(s)) / s);
      this.spare = v * f;
      return u * f;
    }
  }
}


/** A 32-bit seed derived from a base seed and a label (FNV-1a), so each case gets its own stream. */
export function deriveSeed(base: number, label: string): number {
  let h = (0x811c9dc5 ^ (base >>> 0)) >>> 0;
  for (let i = 0; i < label.length; i++) h = Math.imul(h ^ label.charCodeAt(i), 0x01000193) >>> 0;
  return h >>> 0;
}

// ---- The normal distribution -------------------------------------------------------------

/**
 * erfc(x) with relative error under 1.2e-7 everywhere (a Chebyshev-fitted rational form in
 * t = 1/(1 + x/2)), accurate in the far tail where 1 − erf(x) would cancel.
 */
export function erfc(x: number): number {
  const z = Math.abs(x);
  const t = 1 / (1 + 0.5 * z);
  const poly =
    -z * z - 1.26551223 +
    t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806 + t * (0.27886807 +
    t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))));
  const r = t * Math.exp(poly);
  return x >= 0 ? r : 2 - r;
}

/** Φ(z) = P(Z ≤ z) for a standard normal Z. */
export function normalCdf(z: number): number {
  return 0.5 * erfc(-z / Math.SQRT2);
}

// ---- bf16 rounding -----------------------------------------------------------------------

/** Rounds every value to the nearest bf16 (ties to even) in place, so f32 and bf16 runs share values. */
export function roundToBf16InPlace(a: Float32Array): Float32Array {
  const u = new Uint32Array(a.buffer, a.byteOffset, a.length);
  for (let i = 0; i < u.length; i++) {
    const b = u[i]!;
    if ((b & 0x7f800000) === 0x7f800000) continue; // Inf/NaN untouched (never produced here)
    u[i] = ((b + 0x7fff + ((b >>> 16) & 1)) & 0xffff0000) >>> 0;
  }
  return a;
}

// ---- Weights -----------------------------------------------------------------------------

export interface InputOptions {
  seed: number;
  /** Fraction of token rows that are heavy (default 0.03). */
  heavyFraction?: number;
  /** Scale of a heavy token's non-constant features (default 1.6). */
  heavyScale?: number;
}

export interface FfnWeights {
  shape: FfnShape;
  /** The values are exactly representable in this dtype (bf16 weights are pre-rounded). */
  dtype: WeightDType;
  /** W_gate [d_ff, d_model] (gated only). */
  gate: Float32Array | null;
  /** W_up [d_ff, d_model]. */
  up: Float32Array;
  /** W_down [d_model, d_ff] (nn.Linear layout). */
  down: Float32Array;
  /** Per-neuron offsets b_j: column 0 of the ReLU'd projection holds −b_j. */
  offsets: Float32Array;
}

/** Column 0 of the ReLU'd projection is the offset column; the other d−1 columns are random. */
export const OFFSET_SPREAD = 0.15;

function fillNormal(rng: Rng, a: Float32Array, scale: number): void {
  for (let i = 0; i < a.length; i++) a[i] = rng.normal() * scale;
}

/** Weights of one FFN at `shape`, as described at the top of this file. Seeded. */
export function generateFfnWeights(shape: FfnShape, dtype: WeightDType, opts: { seed: number }): FfnWeights {
  const { dModel: d, dFF: F, gated } = shape;
  if (d < 2) throw new RangeError('d_model must be at least 2 (one constant feature and one random one)');
  const rng = new Rng(deriveSeed(opts.seed, `weights d${d} f${F} ${gated ? 'gated' : 'plain'}`));
  const sigma = 1 / Math.sqrt(d - 1);
  const act = new Float32Array(F * d);
  fillNormal(rng, act, sigma);
  const offsets = new Float32Array(F);
  for (let j = 0; j < F; j++) {
    const b = Math.min(1.5, Math.max(0.5, 1 + OFFSET_SPREAD * rng.normal()));
    offsets[j] = b;
    act[j * d] = -b;
  }
  const other = gated ? new Float32Array(F * d) : null; // W_up of a gated FFN: plain random
  if (other) fillNormal(rng, other, 1 / Math.sqrt(d));
  const down = new Float32Array(d * F);
  fillNormal(rng, down, 1 / Math.sqrt(F));
  if (dtype === 'bf16') {
    roundToBf16InPlace(act);
    if (other) roundToBf16InPlace(other);
    roundToBf16InPlace(down);
    for (let j = 0; j < F; j++) offsets[j] = -act[j * d]!;
  }
  return gated
    ? { shape, dtype, gate: act, up: other!, down, offsets }
    : { shape, dtype, gate: null, up: act, down, offsets };
}

/** The projection whose ReLU is sparse: W_gate (gated) or W_up (non-gated). */
export function reluProjection(w: FfnWeights): Float32Array {
  return w.gate ?? w.up;
}

/** The same weights rounded to bf16 (a copy; offsets re-read from the rounded column). */
export function toBf16Weights(w: FfnWeights): FfnWeights {
  if (w.dtype === 'bf16') return w;
  const r = (a: Float32Array) => roundToBf16InPlace(new Float32Array(a));
  const gate = w.gate ? r(w.gate) : null;
  const up = r(w.up);
  const act = gate ?? up;
  const d = w.shape.dModel;
  const offsets = new Float32Array(w.offsets.length);
  for (let j = 0; j < offsets.length; j++) offsets[j] = -act[j * d]!;
  return { shape: w.shape, dtype: 'bf16', gate, up, down: r(w.down), offsets };
}

// ---- Activations -------------------------------------------------------------------------

export interface Activations {
  /** x [tokens, d_model], f32. */
  x: Float32Array;
  tokens: number;
  /** The constant feature c (x[t, 0] for every t). */
  constant: number;
  /** Row indices of the heavy tokens. */
  heavyRows: number[];
  /** Target density (fraction of d_ff) and the model's expectation for these exact rows. */
  target: number;
  expectedDensity: number;
  /** Expected active neurons per token, per row (the model's expectation, not a measurement). */
  expectedNnz: Float64Array;
}

const QUANTILES = 64;

/** Evenly spaced quantiles of the offsets (for a fast, accurate mean over neurons). */
function offsetQuantiles(offsets: Float32Array): Float64Array {
  const s = Float64Array.from(offsets).sort();
  const q = new Float64Array(Math.min(QUANTILES, s.length));
  for (let i = 0; i < q.length; i++) q[i] = s[Math.min(s.length - 1, Math.floor(((i + 0.5) / q.length) * s.length))]!;
  return q;
}

/** Mean over rows and neuron offsets of Φ(−c·b / (σ·r_t)), with σ·r_t given per row. */
function expectedDensity(c: number, spread: Float64Array, b: Float64Array): number {
  let sum = 0;
  for (let t = 0; t < spread.length; t++) {
    const inv = 1 / spread[t]!;
    for (let q = 0; q < b.length; q++) sum += normalCdf(-c * b[q]! * inv);
  }
  return sum / (spread.length * b.length);
}

/**
 * Token rows whose ReLU(x · W_actᵀ) has, in expectation over the weights' draw, the `target`
 * fraction of active neurons (target 1 makes every pre-activation at least 8 standard deviations
 * positive). Seeded by `opts.seed` and the token count.
 */
export function generateActivations(w: FfnWeights, tokens: number, target: number, opts: InputOptions): Activations {
  if (!(target > 0 && target <= 1)) throw new RangeError(`target density must be in (0, 1], got ${target}`);
  if (!Number.isInteger(tokens) || tokens < 1) throw new RangeError(`tokens must be a positive integer, got ${tokens}`);
  const d = w.shape.dModel;
  const heavyFraction = opts.heavyFraction ?? 0.03;
  const heavyScale = opts.heavyScale ?? 1.6;
  const rng = new Rng(deriveSeed(opts.seed, `activations t${tokens} target ${target}`));
  const x = new Float32Array(tokens * d);
  const nHeavy = Math.round(heavyFraction * tokens);
  const heavy = new Set<number>();
  while (heavy.size < nHeavy) heavy.add(rng.below(tokens));
  const sigma = 1 / Math.sqrt(d - 1);
  const spread = new Float64Array(tokens); // σ·r_t: the standard deviation of row t's pre-activations
  for (let t = 0; t < tokens; t++) {
    const s = Math.exp(0.1 * rng.normal()) * (heavy.has(t) ? heavyScale : 1);
    let norm2 = 0;
    for (let i = 1; i < d; i++) {
      const v = Math.fround(s * rng.normal());
      x[t * d + i] = v;
      norm2 += v * v;
    }
    spread[t] = sigma * Math.sqrt(norm2);
  }
  const b = offsetQuantiles(w.offsets);
  let c: number;
  if (target >= 1) {
    const maxSpread = Math.max(...spread);
    c = (-8 * maxSpread) / Math.min(...b);
  } else {
    // expectedDensity is decreasing in c; bracket then bisect.
    let lo = -64, hi = 64;
    for (let it = 0; it < 100; it++) {
      const mid = (lo + hi) / 2;
      if (expectedDensity(mid, spread, b) > target) lo = mid;
      else hi = mid;
      if (hi - lo < 1e-9) break;
    }
    c = (lo + hi) / 2;
  }
  c = Math.fround(c);
  for (let t = 0; t < tokens; t++) x[t * d] = c;
  const expectedNnz = new Float64Array(tokens);
  let total = 0;
  for (let t = 0; t < tokens; t++) {
    let p = 0;
    for (let q = 0; q < b.length; q++) p += normalCdf((-c * b[q]!) / spread[t]!);
    expectedNnz[t] = (p / b.length) * w.shape.dFF;
    total += expectedNnz[t]!;
  }
  return {
    x,
    tokens,
    constant: c,
    heavyRows: [...heavy].sort((a, z) => a - z),
    target,
    expectedDensity: total / (tokens * w.shape.dFF),
    expectedNnz,
  };
}

/** Upstream gradient dy [tokens, d_model] for a training step: N(0, 1), seeded. */
export function generateGradOutput(tokens: number, dModel: number, seed: number): Float32Array {
  const rng = new Rng(deriveSeed(seed, `dy t${tokens} d${dModel}`));
  const dy = new Float32Array(tokens * dModel);
  fillNormal(rng, dy, 1);
  return dy;
}
