// The kernel-benchmark cases, as one table (test-backend-ops style): every case names an
// operation, an FFN shape, a token count, an activation density target and a weight dtype. The
// same table drives `sparsellm bench` and can be reused by tests on small shapes.

export type BenchOp = 'ffn-forward' | 'ffn-train' | 'gemm';
export const BENCH_OPS: readonly BenchOp[] = ['ffn-forward', 'ffn-train', 'gemm'];

export type WeightDType = 'f32' | 'bf16';

export interface FfnShape {
  dModel: number;
  dFF: number;
  /** Gated (llama: relu(x·W_gateᵀ) ⊙ x·W_upᵀ) or not (gpt2/opt: relu(x·W_upᵀ + b)). */
  gated: boolean;
}

/** The paper's FFN: d_model 2048, d_ff 5632, gated (1.5B/2B models). */
export const PAPER_SHAPE: FfnShape = { dModel: 2048, dFF: 5632, gated: true };

/**
 * A target fraction of the d_ff hidden units active per token, given either as non-zeros per
 * token (so it follows the shape: 29 of 5632 is the paper's 0.51%) or as a fraction (0 < f ≤ 1).
 */
export type DensityTarget = { kind: 'nnz'; nnz: number } | { kind: 'fraction'; fraction: number };

export interface BenchCase {
  /** Stable identifier, e.g. `ffn-forward d2048 f5632 gated bf16 t512 29nnz`. */
  id: string;
  op: BenchOp;
  shape: FfnShape;
  /** Token rows per call (M). */
  tokens: number;
  /** Activation density target; null for the plain GEMM. */
  density: DensityTarget | null;
  dtype: WeightDType;
}

/** The paper's 29 non-zeros per token, then 1%, 5%, 20% and fully dense. */
export const DEFAULT_DENSITIES: readonly DensityTarget[] = [
  { kind: 'nnz', nnz: 29 },
  { kind: 'fraction', fraction: 0.01 },
  { kind: 'fraction', fraction: 0.05 },
  { kind: 'fraction', fraction: 0.2 },
  { kind: 'fraction', fraction: 1 },
];
export const DEFAULT_TOKENS: readonly number[] = [1, 64, 512];

/** Fraction of d_ff a target asks for (clamped to 1). */
export function targetFraction(t: DensityTarget, dFF: number): number {
  return t.kind === 'nnz' ? Math.min(1, t.nnz / dFF) : t.fraction;
}

/** `29nnz`, `1%`, `0.5%`, `100%`. */
export function densityLabel(t: DensityTarget): string {
  if (t.kind === 'nnz') return `${t.nnz}nnz`;
  return `${formatPercent(t.fraction * 100)}%`;
}

function formatPercent(p: number): string {
  return Number(p.toPrecision(6)).toString();
}

/**
 * Parses one density: `29nnz` (non-zeros per token), `5%`, a fraction in (0, 1] such as `0.05`,
 * or `dense` (100%). Throws a RangeError with a message naming the bad entry.
 */
export function parseDensity(text: string): DensityTarget {
  const s = text.trim().toLowerCase();
  if (s === 'dense') return { kind: 'fraction', fraction: 1 };
  let m = /^(\d+)\s*nnz$/.exec(s);
  if (m) {
    const nnz = Number(m[1]);
    if (nnz < 1) throw new RangeError(`'${text}': non-zeros per token must be at least 1`);
    return { kind: 'nnz', nnz };
  }
  m = /^(\d+(?:\.\d*)?|\.\d+)\s*%$/.exec(s);
  if (m) {
    const p = Number(m[1]);
    if (!(p > 0 && p <= 100)) throw new RangeError(`'${text}': a percentage must be in (0, 100]`);
    return { kind: 'fraction', fraction: p / 100 };
  }
  m = /^(\d+(?:\.\d*)?|\.\d+)$/.exec(s);
  if (m) {
    const f = Number(m[1]);
    if (!(f > 0 && f <= 1)) {
      throw new RangeError(`'${text}': a bare number is a fraction in (0, 1]; write ${text}% or ${text}nnz`);
    }
    return { kind: 'fraction', fraction: f };
  }
  throw new RangeError(`'${text}' is not a density (examples: 29nnz, 1%, 0.05, dense)`);
}

/** Parses a comma-separated density list (duplicates removed, order kept). */
export function parseDensityList(text: string): DensityTarget[] {
  const parts = text.split(',').map((s) => s.trim()).filter(Boolean);
  if (!parts.length) throw new RangeError('empty density list (example: 29nnz,1%,5%,20%,100%)');
  const out: DensityTarget[] = [];
  const seen = new Set<string>();
  for (const p of parts) {
    const d = parseDensity(p);
    const key = densityLabel(d);
    if (!seen.has(key)) {
      seen.add(key);
      out.push(d);
    }
  }
  return out;
}

/** Parses `forward,train,gemm` (also the full names ffn-forward, ffn-train). */
export function parseOpList(text: string): BenchOp[] {
  const parts = text.split(',').map((s) => s.trim().toLowerCase()).filter(Boolean);
  if (!parts.length) throw new RangeError('empty op list (choose from forward, train, gemm)');
  const out: BenchOp[] = [];
  for (const p of parts) {
    const op = p === 'forward' ? 'ffn-forward' : p === 'train' ? 'ffn-train' : p;
    if (!(BENCH_OPS as readonly string[]).includes(op)) {
      throw new RangeError(`unknown op '${p}' (choose from forward, train, gemm)`);
    }
    if (!out.includes(op as BenchOp)) out.push(op as BenchOp);
  }
  return out;
}

export interface CaseTableParams {
  shape: FfnShape;
  ops: readonly BenchOp[];
  densities: readonly DensityTarget[];
  tokens: readonly number[];
  /** Weight dtype per op; the defaults are bf16 for inference and f32 for training and GEMM. */
  dtype: Partial<Record<BenchOp, WeightDType>>;
}

export const DEFAULT_DTYPES: Record<BenchOp, WeightDType> = {
  'ffn-forward': 'bf16',
  'ffn-train': 'f32',
  gemm: 'f32',
};

export function caseId(c: Omit<BenchCase, 'id'>): string {
  const s = c.shape;
  const parts = [c.op, `d${s.dModel}`, `f${s.dFF}`, s.gated ? 'gated' : 'plain', c.dtype, `t${c.tokens}`];
  if (c.density) parts.push(densityLabel(c.density));
  return parts.join(' ');
}

/**
 * The case table. Training cases need more than one token (a one-token training step is not a
 * workload); the GEMM cases are the FFN's gate projection [tokens × d_model] · [d_ff × d_model]ᵀ.
 * Order: by op, then tokens, then density, so that the dense baselines of one token count run
 * next to each other.
 */
export function buildCases(p: CaseTableParams): BenchCase[] {
  const out: BenchCase[] = [];
  for (const op of p.ops) {
    const dtype = p.dtype[op] ?? DEFAULT_DTYPES[op];
    for (const tokens of p.tokens) {
      if (op === 'ffn-train' && tokens < 2) continue;
      if (op === 'gemm') {
        const c = { op, shape: p.shape, tokens, density: null, dtype };
        out.push({ id: caseId(c), ...c });
        continue;
      }
      for (const density of p.densities) {
        const c = { op, shape: p.shape, tokens, density, dtype };
        out.push({ id: caseId(c), ...c });
      }
    }
  }
  return out;
}

/** The default `sparsellm bench` table: the paper's shape, 5 densities × {1, 64, 512} tokens. */
export function defaultCases(): BenchCase[] {
  return buildCases({
    shape: PAPER_SHAPE,
    ops: ['ffn-forward', 'ffn-train'],
    densities: DEFAULT_DENSITIES,
    tokens: DEFAULT_TOKENS,
    dtype: {},
  });
}

// ---- Work and traffic counts -------------------------------------------------------------

/** Number of [M × d_model]·[d_ff × d_model]ᵀ-sized GEMMs in a dense FFN pass. */
export function denseGemmCount(op: BenchOp, gated: boolean): number {
  if (op === 'gemm') return 1;
  if (op === 'ffn-forward') return gated ? 3 : 2; // gate, up, down  |  up, down
  // forward (3 | 2) + backward: dh = dy·W_down, dx (2 | 1), dW (3 | 2)
  return gated ? 9 : 6;
}

/**
 * Dense-equivalent FLOPs of one call: what the dense computation of the same result costs
 * (2·M·d·d_ff per GEMM-sized product). Effective GFLOP/s are this count over the measured time,
 * for the sparse path too, so they scale with the speedup and compare across paths.
 */
export function denseEquivalentFlops(c: BenchCase): number {
  return denseGemmCount(c.op, c.shape.gated) * 2 * c.tokens * c.shape.dModel * c.shape.dFF;
}

/**
 * Useful FLOPs of one sparse call given the measured non-zeros `nnz` (summed over all tokens):
 * the dense gate (or up, non-gated) projection that finds the pattern, plus 2·d per non-zero for
 * each product that only touches active neurons (forward: up and down, or down only; training
 * adds dh, dx through W_up and W_gate, dW_up, dW_gate, dW_down, per PAPER.md).
 */
export function usefulFlops(c: BenchCase, nnz: number): number {
  const { dModel: d, dFF, gated } = c.shape;
  const pattern = 2 * c.tokens * d * dFF;
  let perNnz: number;
  if (c.op === 'ffn-forward') perNnz = gated ? 2 : 1;
  // forward: up (gated), down; backward: dh, dx through W_up (and W_gate), dW_up (dW_gate), dW_down
  else if (c.op === 'ffn-train') perNnz = gated ? 8 : 5;
  else return pattern;
  return pattern + perNnz * 2 * d * nnz;
}

/** Bytes of one weight matrix [d_ff, d_model]. */
export function matrixBytes(shape: FfnShape, dtype: WeightDType): number {
  return shape.dModel * shape.dFF * (dtype === 'bf16' ? 2 : 4);
}
