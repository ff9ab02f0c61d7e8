// Summary statistics of timing samples. Pure functions, no I/O.

export interface Summary {
  /** Number of samples. */
  n: number;
  median: number;
  mean: number;
  /** Sample standard deviation (n − 1 in the denominator); 0 for a single sample. */
  stddev: number;
  min: number;
  max: number;
}

function checkSamples(xs: readonly number[]): void {
  if (!xs.length) throw new RangeError('no samples');
  for (const x of xs) if (!Number.isFinite(x)) throw new RangeError(`sample is not finite: ${x}`);
}

/** The median; the mean of the two middle values for an even count. */
export function median(xs: readonly number[]): number {
  checkSamples(xs);
  const s = [...xs].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
}

export function mean(xs: readonly number[]): number {
  checkSamples(xs);
  let sum = 0;
  for (const x of xs) sum += x;
  return sum / xs.length;
}

export function stddev(xs: readonly number[]): number {
  checkSamples(xs);
  if (xs.length < 2) return 0;
  const m = mean(xs);
  let ss = 0;
  for (const x of xs) ss += (x - m) ** 2;
  return Math.sqrt(ss / (xs.length - 1));
}

export function summarize(xs: readonly number[]): Summary {
  checkSamples(xs);
  return {
    n: xs.length,
    median: median(xs),
    mean: mean(xs),
    stddev: stddev(xs),
    min: Math.min(...xs),
    max: Math.max(...xs),
  };
}

/**
 * Speedup of `candidate` over `baseline` from paired samples (round i of each was measured back to
 * back): the median of the per-round ratios baseline[i] / candidate[i]. Pairing cancels most of
 * the drift of a busy machine, which a ratio of two medians would not.
 */
export function pairedSpeedup(baseline: readonly number[], candidate: readonly number[]): number {
  if (baseline.length !== candidate.length) throw new RangeError('paired samples must have the same length');
  checkSamples(baseline);
  checkSamples(candidate);
  return median(baseline.map((b, i) => b / candidate[i]!));
}

/** Geometric mean of positive values. */
export function geomean(xs: readonly number[]): number {
  checkSamples(xs);
  let s = 0;
  for (const x of xs) {
    if (x <= 0) throw new RangeError(`geomean needs positive values, got ${x}`);
    s += Math.log(x);
  }
  return Math.exp(s / xs.length);
}
