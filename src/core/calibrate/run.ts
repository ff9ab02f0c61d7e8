// Calibration: run token windows through the model with the FFN observer set and accumulate
// per-layer statistics (src/core/calibrate/stats.ts).
import { UsageError } from '../errors.js';
import type { ModelRuntime } from '../model/runtime.js';
import { LayerStats } from './stats.js';

export interface CalibrateOptions {
  /** Tokens per window (each window starts from an empty KV cache). */
  context: number;
  /** Per layer: a unit counts as active when |act| > threshold (default: the model's stored one, else 0). */
  thresholds?: readonly number[];
  /** Called after each window with the number of tokens it held. */
  onWindow?: (tokens: number) => void;
}

/** Runs `ids` through `rt` in windows of `context` tokens and returns one LayerStats per layer. */
export function calibrate(rt: ModelRuntime, ids: readonly number[], opts: CalibrateOptions): LayerStats[] {
  if (ids.length < 1) throw new UsageError('calibration needs at least one token of text');
  const context = opts.context;
  if (!(Number.isInteger(context) && context >= 1 && context <= rt.context)) {
    throw new UsageError(`--context must be in [1, ${rt.context}], got ${context}`);
  }
  const thresholds = opts.thresholds ?? rt.layers.map((l) => l.threshold ?? 0);
  const stats = rt.spec.dFF.map((F, i) => new LayerStats(F, thresholds[i] ?? 0));
  rt.setFfnObserver((layer, T, F, act, hidden) => {
    const s = stats[layer]!;
    if (s.F !== F) throw new Error(`calibration: layer ${layer} reported ${F} hidden units, expected ${s.F}`);
    s.add(T, act, hidden);
  });
  try {
    for (let start = 0; start < ids.length; start += context) {
      const win = ids.slice(start, Math.min(ids.length, start + context));
      rt.reset();
      rt.forward(win, { mode: 'dense' });
      opts.onWindow?.(win.length);
    }
  } finally {
    rt.setFfnObserver(null);
    rt.reset();
  }
  return stats;
}
