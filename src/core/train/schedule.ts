// Learning-rate schedule: linear warm-up to the peak, then cosine decay to minRatio × peak at
// the last step. `step` counts from 0 (the rate used for the first update is lr(0)).
export interface Schedule {
  lr: number;
  warmup: number;
  steps: number;
  /** Final rate as a fraction of the peak (default 0.1). */
  minRatio: number;
}

export function learningRate(s: Schedule, step: number): number {
  if (step < s.warmup) return (s.lr * (step + 1)) / s.warmup;
  const span = Math.max(1, s.steps - s.warmup);
  const p = Math.min(1, (step - s.warmup) / span);
  const min = s.lr * s.minRatio;
  return min + 0.5 * (s.lr - min) * (1 + Math.cos(Math.PI * p));
}
