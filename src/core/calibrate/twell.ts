// TwELL parameters per layer from calibration. For each candidate tile width T: q is the number
// of active neurons per tile that a fraction `coverage` of the (token, tile) pairs do not exceed
// (coverage 1: the largest seen), the capacity T/C − 1 must hold ceil(q · headroom), and C is the
// largest factor that allows it. Among the widths, the fewest words per token row (tiles · T/C)
// wins (ties: the wider tile). Overflow stays exact in the engine (a dense side buffer for the
// tile), so coverage and headroom trade memory against how often that slower path runs; the
// overflow rate the choice would have had on the calibration text is reported with it.
import type { TwellParams } from '../format/metadata.js';
import { TILE_WIDTHS, type TileWidth } from './stats.js';

export const DEFAULT_HEADROOM = 1.5;
export const DEFAULT_COVERAGE = 0.999;

export interface TwellChoice extends TwellParams {
  /** Entries per tile: tileWidth / compression − 1. */
  capacity: number;
  /** The largest per-tile count seen on calibration text at this width. */
  observedTileMax: number;
  /** The per-tile count at the coverage quantile. */
  coveredCount: number;
  /** Fraction of (token, tile) pairs of the calibration text over capacity. */
  overflowRate: number;
  /** 32-bit words per token row: tiles · (tileWidth / compression). */
  wordsPerRow: number;
}

/** The compression factor for one tile width: capacity >= ceil(count · headroom), C >= 1. */
export function compressionFor(tileWidth: number, count: number, headroom: number): number {
  const needCap = Math.max(1, Math.ceil(count * headroom));
  if (needCap >= tileWidth - 1) return 1;
  // Largest C with floor(T / C) − 1 >= needCap.
  return Math.max(1, Math.floor(tileWidth / (needCap + 1)));
}

/** The smallest c with at most a fraction 1 − coverage of the pairs above it (hist[c] = pairs with count c). */
export function coveredCount(hist: readonly number[], coverage: number): number {
  const total = hist.reduce((a, b) => a + b, 0);
  if (total === 0) return 0;
  const allowed = (1 - coverage) * total;
  let above = total;
  for (let c = 0; c < hist.length; c++) {
    above -= hist[c]!;
    if (above <= allowed) return c;
  }
  return hist.length - 1;
}

export function chooseTwell(
  dFF: number,
  tileMax: Record<TileWidth, readonly number[]>,
  tileCounts: Record<TileWidth, readonly number[]> | null,
  headroom = DEFAULT_HEADROOM,
  coverage = DEFAULT_COVERAGE,
): TwellChoice {
  if (!(headroom >= 1)) throw new RangeError(`TwELL headroom must be >= 1, got ${headroom}`);
  if (!(coverage > 0 && coverage <= 1)) throw new RangeError(`TwELL coverage must be in (0, 1], got ${coverage}`);
  let best: TwellChoice | undefined;
  for (const T of TILE_WIDTHS) {
    if (T > Math.max(64, dFF) && T !== TILE_WIDTHS[0]) continue; // a tile wider than the layer gains nothing
    const observed = tileMax[T].reduce((a, b) => Math.max(a, b), 0);
    const hist = tileCounts?.[T];
    const q = coverage >= 1 || !hist ? observed : Math.min(observed, coveredCount(hist, coverage));
    const C = compressionFor(T, q, headroom);
    const capacity = Math.floor(T / C) - 1;
    let over = 0;
    let total = 0;
    if (hist) {
      hist.forEach((n, c) => {
        total += n;
        if (c > capacity) over += n;
      });
    }
    const words = Math.ceil(dFF / T) * Math.floor(T / C);
    const choice: TwellChoice = { tileWidth: T, compression: C, capacity, observedTileMax: observed, coveredCount: q, overflowRate: total ? over / total : 0, wordsPerRow: words };
    if (!best || words < best.wordsPerRow || (words === best.wordsPerRow && T > best.tileWidth)) best = choice;
  }
  return best!;
}
