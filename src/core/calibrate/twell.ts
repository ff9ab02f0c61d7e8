// TwELL parameters per layer from calibration: for each candidate tile width T, the compression
// factor C is the largest whose capacity T/C − 1 holds the largest per-tile count seen, times the
// headroom; among the widths, the one with the fewest words per token row (tiles · T/C) wins
// (ties: the wider tile, fewer counts to read). Overflow stays exact in the engine (dense side
// buffer), so the headroom trades memory against how often that slower path runs.
import type { TwellParams } from '../format/metadata.js';
import { TILE_WIDTHS, type TileWidth } from './stats.js';

export const DEFAULT_HEADROOM = 1.5;

export interface TwellChoice extends TwellParams {
  /** Entries per tile: tileWidth / compression − 1. */
  capacity: number;
  /** The largest per-tile count seen on calibration text at this width. */
  observedTileMax: number;
  /** 32-bit words per token row: tiles · (tileWidth / compression). */
  wordsPerRow: number;
}

/** The compression factor for one tile width: capacity >= ceil(tileMax · headroom), C >= 1. */
export function compressionFor(tileWidth: number, tileMax: number, headroom: number): number {
  const needCap = Math.max(1, Math.ceil(tileMax * headroom));
  if (needCap >= tileWidth - 1) return 1;
  // Largest C with floor(T / C) − 1 >= needCap.
  return Math.max(1, Math.floor(tileWidth / (needCap + 1)));
}

export function chooseTwell(dFF: number, tileMax: Record<TileWidth, readonly number[]>, headroom = DEFAULT_HEADROOM): TwellChoice {
  if (!(headroom >= 1)) throw new RangeError(`TwELL headroom must be >= 1, got ${headroom}`);
  let best: TwellChoice | undefined;
  for (const T of TILE_WIDTHS) {
    if (T > Math.max(64, dFF) && T !== TILE_WIDTHS[0]) continue; // a tile wider than the layer gains nothing
    const observed = tileMax[T].reduce((a, b) => Math.max(a, b), 0);
    const C = compressionFor(T, observed, headroom);
    const tiles = Math.ceil(dFF / T);
    const words = tiles * Math.floor(T / C);
    const c: TwellChoice = { tileWidth: T, compression: C, capacity: Math.floor(T / C) - 1, observedTileMax: observed, wordsPerRow: words };
    if (!best || words < best.wordsPerRow || (words === best.wordsPerRow && T > best.tileWidth)) best = c;
  }
  return best!;
}
