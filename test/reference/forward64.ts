// An independent float64 forward pass of the decoder-only transformers sparsellm runs, written
// for tests from the model definitions (pre-norm blocks, causal attention): Llama family
// (RMSNorm, rotate-half RoPE, grouped-query attention, optional q/k/v biases, gated FFN) and
// GPT-2 / OPT family (learned positions with an offset, LayerNorm, biases, non-gated FFN).
// Slow and plain on purpose: tiny models only. Weights come in by canonical name
// (src/core/model/spec.ts) as float64 arrays, [out, in] for linear layers.
import type { ModelSpec } from '../../src/core/model/spec.js';

export interface RefTensor {
  shape: number[];
  data: Float64Array;
}

/** Gives the weight of a canonical name, or undefined when the model has none. */
export type WeightSource = (name: string) => RefTensor | undefined;

export interface RefOptions {
  /** Zero every FFN hidden unit whose |act(pre-activation)| <= threshold[layer] (non-ReLU thresholds). */
  thresholds?: (number | null)[];
}

export interface RefResult {
  /** [T, vocab] logits, row t predicts token t + 1. */
  logits: Float64Array[];
  /** Per layer, per token: the number of non-zero FFN hidden units (activations after act). */
  ffnNonZeros: number[][];
}

function need(w: WeightSource, name: string): RefTensor {
  const t = w(name);
  if (!t) throw new Error(`reference forward: missing tensor ${name}`);
  return t;
}

/** y = x · Wᵀ (+ b), W [out, in]. */
function linear(x: Float64Array, W: RefTensor, b?: RefTensor): Float64Array {
  const [out, inp] = W.shape as [number, number];
  if (x.length !== inp) throw new Error(`reference forward: linear ${inp} ≠ input ${x.length}`);
  const y = new Float64Array(out);
  for (let o = 0; o < out; o++) {
    let s = 0;
    const base = o * inp;
    for (let i = 0; i < inp; i++) s += W.data[base + i]! * x[i]!;
    y[o] = s + (b ? b.data[o]! : 0);
  }
  return y;
}

function rmsNorm(x: Float64Array, w: RefTensor, eps: number): Float64Array {
  let ss = 0;
  for (const v of x) ss += v * v;
  const r = 1 / Math.sqrt(ss / x.length + eps);
  return x.map((v, i) => v * r * w.data[i]!);
}

function layerNorm(x: Float64Array, w: RefTensor, b: RefTensor | undefined, eps: number): Float64Array {
  let s = 0;
  for (const v of x) s += v;
  const mean = s / x.length;
  let vs = 0;
  for (const v of x) vs += (v - mean) * (v - mean);
  const r = 1 / Math.sqrt(vs / x.length + eps);
  return x.map((v, i) => (v - mean) * r * w.data[i]! + (b ? b.data[i]! : 0));
}

// erf by Abramowitz-Stegun 7.1.26 is too coarse for a float64 reference; use the series /
// continued fraction pair instead (accurate to ~1e-15).
export function erf(x: number): number {
  const ax = Math.abs(x);
  if (ax < 2.5) {
    // Taylor series: erf(x) = 2/sqrt(pi) Σ (-1)^n x^(2n+1) / (n! (2n+1))
    let term = x;
    let sum = x;
    for (let n = 1; n < 80; n++) {
      term *= (-x * x) / n;
      const add = term / (2 * n + 1);
      sum += add;
      if (Math.abs(add) < 1e-17 * Math.abs(sum)) break;
    }
    return (2 / Math.sqrt(Math.PI)) * sum;
  }
  // erfc continued fraction (Lentz), for |x| >= 2.5
  const z = ax;
  let f = z;
  let C = z;
  let D = 0;
  const tiny = 1e-300;
  for (let k = 1; k < 200; k++) {
    const a = k / 2;
    D = z + a * D;
    D = Math.abs(D) < tiny ? tiny : D;
    C = z + a / C;
    C = Math.abs(C) < tiny ? tiny : C;
    D = 1 / D;
    const delta = C * D;
    f *= delta;
    if (Math.abs(delta - 1) < 1e-16) break;
  }
  const erfc = Math.exp(-z * z) / (Math.sqrt(Math.PI) * f);
  return Math.sign(x) * (1 - erfc);
}

export function activation(kind: ModelSpec['activation'], v: number): number {
  switch (kind) {
    case 'relu':
      return v > 0 ? v : 0;
    case 'silu':
      return v / (1 + Math.exp(-v));
    case 'gelu':
      return 0.5 * v * (1 + erf(v / Math.SQRT2));
    case 'gelu_tanh':
      return 0.5 * v * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (v + 0.044715 * v * v * v)));
  }
}

/** Rotate-half RoPE on one head vector at position `pos`. */
function rope(v: Float64Array, pos: number, theta: number): Float64Array {
  const hd = v.length;
  const half = hd / 2;
  const out = new Float64Array(hd);
  for (let i = 0; i < hd; i++) {
    const j = i % half;
    const ang = pos * Math.pow(theta, (-2 * j) / hd);
    const rotated = i < half ? -v[i + half]! : v[i - half]!;
    out[i] = v[i]! * Math.cos(ang) + rotated * Math.sin(ang);
  }
  return out;
}

/** Runs the whole sequence `tokens` (positions 0..T-1) and returns every row's logits. */
export function referenceForward(spec: ModelSpec, w: WeightSource, tokens: readonly number[], opts: RefOptions = {}): RefResult {
  const d = spec.dModel;
  const T = tokens.length;
  const hd = spec.headDim;
  const H = spec.nHeads;
  const KV = spec.nKvHeads;
  const norm = (x: Float64Array, prefix: string) =>
    spec.norm === 'rmsnorm'
      ? rmsNorm(x, need(w, `${prefix}.weight`), spec.normEps)
      : layerNorm(x, need(w, `${prefix}.weight`), w(`${prefix}.bias`), spec.normEps);

  const embed = need(w, 'embed.weight');
  let xs: Float64Array[] = tokens.map((tok, t) => {
    const x = embed.data.slice(tok * d, (tok + 1) * d);
    if (spec.positions === 'learned') {
      const pe = need(w, 'pos_embed.weight');
      const p = t + spec.positionOffset;
      for (let i = 0; i < d; i++) x[i]! += pe.data[p * d + i]!;
    }
    return x;
  });

  const ffnNonZeros: number[][] = [];
  for (let l = 0; l < spec.nLayers; l++) {
    const L = `layers.${l}`;
    // --- attention
    const hs = xs.map((x) => norm(x, `${L}.attn_norm`));
    const q = hs.map((h) => linear(h, need(w, `${L}.attn.q.weight`), w(`${L}.attn.q.bias`)));
    const k = hs.map((h) => linear(h, need(w, `${L}.attn.k.weight`), w(`${L}.attn.k.bias`)));
    const v = hs.map((h) => linear(h, need(w, `${L}.attn.v.weight`), w(`${L}.attn.v.bias`)));
    const head = (vec: Float64Array, h: number) => vec.slice(h * hd, (h + 1) * hd);
    const qh = q.map((vec, t) => Array.from({ length: H }, (_, h) => (spec.positions === 'rope' ? rope(head(vec, h), t, spec.ropeTheta) : head(vec, h))));
    const kh = k.map((vec, t) => Array.from({ length: KV }, (_, h) => (spec.positions === 'rope' ? rope(head(vec, h), t, spec.ropeTheta) : head(vec, h))));
    const vh = v.map((vec) => Array.from({ length: KV }, (_, h) => head(vec, h)));
    const group = H / KV;
    const attnOut = xs.map((_, t) => {
      const out = new Float64Array(H * hd);
      for (let h = 0; h < H; h++) {
        const g = Math.floor(h / group);
        const scores: number[] = [];
        for (let j = 0; j <= t; j++) {
          let s = 0;
          for (let i = 0; i < hd; i++) s += qh[t]![h]![i]! * kh[j]![g]![i]!;
          scores.push(s / Math.sqrt(hd));
        }
        const mx = Math.max(...scores);
        const e = scores.map((s) => Math.exp(s - mx));
        const sum = e.reduce((a, b) => a + b, 0);
        for (let j = 0; j <= t; j++) {
          const p = e[j]! / sum;
          for (let i = 0; i < hd; i++) out[h * hd + i]! += p * vh[j]![g]![i]!;
        }
      }
      return linear(out, need(w, `${L}.attn.o.weight`), w(`${L}.attn.o.bias`));
    });
    xs = xs.map((x, t) => x.map((val, i) => val + attnOut[t]![i]!));

    // --- FFN
    const thr = opts.thresholds?.[l] ?? null;
    const nnz: number[] = [];
    const ffnOut = xs.map((x) => {
      const h = norm(x, `${L}.ffn_norm`);
      let hidden: Float64Array;
      if (spec.gated) {
        const g = linear(h, need(w, `${L}.ffn.gate.weight`));
        const u = linear(h, need(w, `${L}.ffn.up.weight`), w(`${L}.ffn.up.bias`));
        hidden = g.map((gv, j) => {
          const a = activation(spec.activation, gv);
          if (thr !== null && Math.abs(a) <= thr) return 0;
          return a * u[j]!;
        });
      } else {
        const u = linear(h, need(w, `${L}.ffn.up.weight`), w(`${L}.ffn.up.bias`));
        hidden = u.map((uv) => {
          const a = activation(spec.activation, uv);
          return thr !== null && Math.abs(a) <= thr ? 0 : a;
        });
      }
      nnz.push(hidden.reduce((n, v) => n + (v !== 0 ? 1 : 0), 0));
      return linear(hidden, need(w, `${L}.ffn.down.weight`), w(`${L}.ffn.down.bias`));
    });
    ffnNonZeros.push(nnz);
    xs = xs.map((x, t) => x.map((val, i) => val + ffnOut[t]![i]!));
  }
  const head = spec.tiedEmbeddings ? embed : need(w, 'lm_head.weight');
  const logits = xs.map((x) => linear(norm(x, 'final_norm'), head));
  return { logits, ffnNonZeros };
}
