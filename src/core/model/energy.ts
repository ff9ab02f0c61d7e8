// Energy per token of the whole-model prefill, read from an energy counter around back-to-back
// prefills (NVML's GPU counter on the CUDA backend; the CPU has none we can read portably). The
// counter moves in steps of a few to tens of milliseconds, so each path runs for seconds.
import { cudaAvailability, nvmlEnergyMillijoules, nvmlInfo } from '../engine/cuda.js';
import type { ModelBackend } from './runtime.js';

/** A monotonic energy counter in millijoules. */
export type EnergyCounter = () => number;

export interface PrefillEnergy {
  /** Counter rise per prefill token. */
  millijoulesPerToken: number;
  /** Wall seconds of the measured prefills, and how many ran. */
  seconds: number;
  calls: number;
}

/** The backend's energy counter, or why there is none. */
export function energyCounterFor(backend: ModelBackend): { counter: EnergyCounter; source: string } | { counter: null; reason: string } {
  if (backend !== 'cuda') return { counter: null, reason: 'no energy counter on the cpu backend' };
  if (!cudaAvailability().usable) return { counter: null, reason: 'no usable GPU' };
  const info = nvmlInfo();
  if (!info.available) return { counter: null, reason: `NVML: ${info.reason ?? 'unavailable'}` };
  return { counter: nvmlEnergyMillijoules, source: `NVML (driver ${info.driver ?? '?'})` };
}

/**
 * Runs `prefill()` (one call of `tokensPerCall` tokens, synchronous) back to back for at least
 * `seconds` (and at least twice), reading `counter` before the first call and after the last.
 */
export function measurePrefillEnergy(counter: EnergyCounter, prefill: () => void, tokensPerCall: number, seconds: number): PrefillEnergy {
  prefill(); // warm: the first call after the timed rounds may pay for a mode switch
  const e0 = counter();
  const t0 = performance.now();
  let calls = 0;
  while (calls < 2 || performance.now() - t0 < seconds * 1000) {
    prefill();
    calls++;
  }
  const elapsed = (performance.now() - t0) / 1000;
  const mj = counter() - e0;
  return { millijoulesPerToken: mj / (calls * tokensPerCall), seconds: elapsed, calls };
}
