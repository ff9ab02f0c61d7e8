// Per-layer FFN activation statistics over calibration text, accumulated from the activations the
// model runtime hands to its FFN observer (act = act(pre) before any threshold, hidden = the
// hidden units W_down consumes). One LayerStats per layer; everything is O(F) memory apart from
// the per-token non-zero counts (one int per token).

/** Tile widths whose per-tile maxima are tracked (TwELL candidates; each a multiple of BASE_TILE). */
export const TILE_WIDTHS = [64, 128, 256] as const;
export type TileWidth = (typeof TILE_WIDTHS)[number];
const BASE_TILE = 64;

/**
 * |act| histogram: the bin of a positive float32 is its bit pattern >>> 16 (8 exponent bits and
 * the top 7 mantissa bits), so bins are log-spaced with 128 per octave (relative width < 0.55%).
 */
export const HIST_BINS = 1 << 15;

/** Summary of one layer (what the per-layer table, --json and the packed metadata show). */
export interface LayerSummary {
  layer: number;
  dFF: number;
  tokens: number;
  /** The cut-off that defined "active" for these statistics (|act| > threshold; 0 = exact zeros). */
  threshold: number;
  nnzMean: number;
  nnzP99: number;
  nnzMax: number;
  /** 1 − nnzMean / dFF. */
  sparsity: number;
  /** Neurons never active on the calibration text. */
  dead: number;
  /** Per tracked tile width: the largest number of active neurons seen in one tile for one token. */
  tileMax: Record<TileWidth, number[]>;
  /** Per tracked tile width: how many (token, tile) pairs had c active neurons, c = 0..width. */
  tileCounts: Record<TileWidth, number[]>;
}

export class LayerStats {
  readonly F: number;
  tokens = 0;
  /** Tokens on which each neuron was active (|act| > threshold). */
  readonly fires: Float64Array;
  readonly sumAbsAct: Float64Array;
  readonly maxAbsAct: Float32Array;
  readonly sumAbsHidden: Float64Array;
  readonly maxAbsHidden: Float32Array;
  /** Histogram of |act| over all (token, neuron) pairs; bin 0 holds exact zeros. */
  readonly hist: Float64Array;
  private nnz: Int32Array;
  private readonly tileMax64: Int32Array;
  private readonly tileMax128: Int32Array;
  private readonly tileMax256: Int32Array;
  private readonly tileHist: Record<TileWidth, Float64Array> = { 64: new Float64Array(65), 128: new Float64Array(129), 256: new Float64Array(257) };
  private readonly bits = new Uint32Array(1);
  private readonly bitsF = new Float32Array(this.bits.buffer);

  /** `threshold`: a unit is active when |act| > threshold (0: any non-zero). */
  constructor(F: number, readonly threshold = 0) {
    this.F = F;
    this.fires = new Float64Array(F);
    this.sumAbsAct = new Float64Array(F);
    this.maxAbsAct = new Float32Array(F);
    this.sumAbsHidden = new Float64Array(F);
    this.maxAbsHidden = new Float32Array(F);
    this.hist = new Float64Array(HIST_BINS);
    this.nnz = new Int32Array(1024);
    this.tileMax64 = new Int32Array(Math.ceil(F / 64));
    this.tileMax128 = new Int32Array(Math.ceil(F / 128));
    this.tileMax256 = new Int32Array(Math.ceil(F / 256));
  }

  /** Adds T tokens: act and hidden are [T, F] row-major. */
  add(T: number, act: Float32Array, hidden: Float32Array): void {
    const F = this.F;
    if (act.length < T * F || hidden.length < T * F) throw new Error(`LayerStats.add: ${T}×${F} activations expected`);
    if (this.tokens + T > this.nnz.length) {
      const grown = new Int32Array(Math.max(this.nnz.length * 2, this.tokens + T));
      grown.set(this.nnz.subarray(0, this.tokens));
      this.nnz = grown;
    }
    const thr = this.threshold;
    const fires = this.fires;
    const sumA = this.sumAbsAct;
    const maxA = this.maxAbsAct;
    const sumH = this.sumAbsHidden;
    const maxH = this.maxAbsHidden;
    const hist = this.hist;
    const bitsF = this.bitsF;
    const bits = this.bits;
    const nTiles = this.tileMax64.length;
    const tileCount = new Int32Array(nTiles);
    for (let t = 0; t < T; t++) {
      const row = t * F;
      tileCount.fill(0);
      let n = 0;
      for (let j = 0; j < F; j++) {
        const a = act[row + j]!;
        const aa = a < 0 ? -a : a;
        bitsF[0] = aa;
        hist[bits[0]! >>> 16]!++;
        sumA[j]! += aa;
        if (aa > maxA[j]!) maxA[j] = aa;
        const h = hidden[row + j]!;
        const ha = h < 0 ? -h : h;
        sumH[j]! += ha;
        if (ha > maxH[j]!) maxH[j] = ha;
        if (aa > thr) {
          fires[j]!++;
          n++;
          tileCount[(j / BASE_TILE) | 0]!++;
        }
      }
      this.nnz[this.tokens + t] = n;
      this.mergeTiles(tileCount);
    }
    this.tokens += T;
  }

  private mergeTiles(c64: Int32Array): void {
    const m64 = this.tileMax64;
    const m128 = this.tileMax128;
    const m256 = this.tileMax256;
    const h = this.tileHist;
    for (let i = 0; i < c64.length; i++) {
      if (c64[i]! > m64[i]!) m64[i] = c64[i]!;
      h[64][c64[i]!]!++;
    }
    for (let i = 0; i < m128.length; i++) {
      const c = c64[2 * i]! + (2 * i + 1 < c64.length ? c64[2 * i + 1]! : 0);
      if (c > m128[i]!) m128[i] = c;
      h[128][c]!++;
    }
    for (let i = 0; i < m256.length; i++) {
      let c = 0;
      for (let k = 4 * i; k < Math.min(c64.length, 4 * i + 4); k++) c += c64[k]!;
      if (c > m256[i]!) m256[i] = c;
      h[256][c]!++;
    }
  }

  /** Non-zero counts per token, in the order the tokens were added. */
  perToken(): Int32Array {
    return this.nnz.subarray(0, this.tokens);
  }

  summary(layer: number): LayerSummary {
    const counts = Int32Array.from(this.perToken()).sort();
    const n = counts.length;
    let total = 0;
    for (const c of counts) total += c;
    const mean = n ? total / n : 0;
    // p99: the smallest count that at least 99% of the tokens do not exceed (nearest rank).
    const p99 = n ? counts[Math.min(n - 1, Math.ceil(0.99 * n) - 1)]! : 0;
    let dead = 0;
    for (let j = 0; j < this.F; j++) if (this.fires[j] === 0) dead++;
    return {
      layer,
      dFF: this.F,
      tokens: this.tokens,
      threshold: this.threshold,
      nnzMean: mean,
      nnzP99: p99,
      nnzMax: n ? counts[n - 1]! : 0,
      sparsity: this.F > 0 ? 1 - mean / this.F : 0,
      dead,
      tileMax: { 64: Array.from(this.tileMax64), 128: Array.from(this.tileMax128), 256: Array.from(this.tileMax256) },
      tileCounts: { 64: Array.from(this.tileHist[64]), 128: Array.from(this.tileHist[128]), 256: Array.from(this.tileHist[256]) },
    };
  }

  /**
   * The smallest cut-off c such that a fraction of at least `sparsity` of all (token, neuron)
   * pairs has |act| <= c, from the histogram (interpolated inside the bin, in float32 bit space,
   * which is monotone in the value). Exact zeros count as inactive at any cut-off.
   */
  thresholdFor(sparsity: number): number {
    const total = this.tokens * this.F;
    if (total === 0) throw new Error('thresholdFor: no calibration tokens');
    const want = sparsity * total;
    let acc = 0;
    for (let b = 0; b < HIST_BINS; b++) {
      const c = this.hist[b]!;
      if (c > 0 && acc + c >= want) {
        const frac = Math.min(1, Math.max(0, (want - acc) / c));
        this.bits[0] = ((b << 16) + Math.min(0xffff, Math.floor(frac * 0x10000))) >>> 0;
        return this.bitsF[0]!;
      }
      acc += c;
    }
    return Infinity;
  }

  /** The fraction of (token, neuron) pairs with |act| <= c, from the histogram (bin resolution). */
  sparsityAt(c: number): number {
    const total = this.tokens * this.F;
    if (total === 0) return 0;
    this.bitsF[0] = Math.abs(c);
    const cb = this.bits[0]! >>> 16;
    let acc = 0;
    for (let b = 0; b < cb; b++) acc += this.hist[b]!;
    return acc / total;
  }
}
