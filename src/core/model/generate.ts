// Text generation over a ModelRuntime: a seeded sampler (temperature, top-k, top-p; greedy at
// temperature 0) and the prefill + decode loop, with timings for throughput figures.
import { UsageError } from '../errors.js';
import type { FfnRunMode, ModelRuntime } from './runtime.js';
import { Xoshiro128 } from '../random.js';

export interface SamplerOptions {
  /** 0 = greedy (argmax, ties to the lowest id). */
  temperature: number;
  /** Keep the k most likely ids (0 = all). */
  topK: number;
  /** Keep the smallest set of most likely ids whose probability reaches p (1 = all). */
  topP: number;
  seed: number;
}

/** The sampler's uniform stream over the project's seeded generator (src/core/random.ts). */
export class Rng extends Xoshiro128 {
  /** A float in [0, 1). */
  next(): number {
    return this.u32() / 4294967296;
  }
}

export class Sampler {
  private readonly rng: Rng;
  constructor(private readonly opts: SamplerOptions) {
    if (!(opts.temperature >= 0)) throw new UsageError('--temperature must be >= 0');
    if (!(opts.topP > 0 && opts.topP <= 1)) throw new UsageError('--top-p must be in (0, 1]');
    if (!(Number.isInteger(opts.topK) && opts.topK >= 0)) throw new UsageError('--top-k must be an integer >= 0');
    this.rng = new Rng(opts.seed);
  }

  /** Picks the next id from `logits` ([vocab]). `limit` restricts to ids < limit (the tokenizer's). */
  sample(logits: Float32Array, limit = logits.length): number {
    const n = Math.min(limit, logits.length);
    if (this.opts.temperature === 0) {
      let best = 0;
      for (let i = 1; i < n; i++) if (logits[i]! > logits[best]!) best = i;
      return best;
    }
    // Candidates sorted by logit (descending, ties by id), cut by top-k.
    let ids = Array.from({ length: n }, (_, i) => i);
    ids.sort((a, b) => logits[b]! - logits[a]! || a - b);
    if (this.opts.topK > 0) ids = ids.slice(0, this.opts.topK);
    const t = this.opts.temperature;
    const mx = logits[ids[0]!]! / t;
    const p = ids.map((i) => Math.exp(logits[i]! / t - mx));
    const sum = p.reduce((a, b) => a + b, 0);
    for (let i = 0; i < p.length; i++) p[i]! /= sum;
    let keep = p.length;
    if (this.opts.topP < 1) {
      let acc = 0;
      for (let i = 0; i < p.length; i++) {
        acc += p[i]!;
        if (acc >= this.opts.topP) {
          keep = i + 1;
          break;
        }
      }
    }
    let total = 0;
    for (let i = 0; i < keep; i++) total += p[i]!;
    let r = this.rng.next() * total;
    for (let i = 0; i < keep; i++) {
      r -= p[i]!;
      if (r < 0) return ids[i]!;
    }
    return ids[keep - 1]!;
  }
}

export interface GenerateOptions extends SamplerOptions {
  maxTokens: number;
  mode: FfnRunMode;
  /** Stop when this id is produced (it is not emitted). */
  eosId?: number;
  /** More ids that end the text (e.g. a config listing several end-of-sequence ids). */
  stopIds?: readonly number[];
  /** Sample only ids below this (the tokenizer's size, when smaller than the model's vocabulary). */
  sampleLimit?: number;
  onToken?: (id: number) => void;
}

export interface GenerateResult {
  tokens: number[];
  stoppedAt: 'eos' | 'max-tokens' | 'context';
  promptTokens: number;
  prefillSeconds: number;
  decodeSeconds: number;
}

/** Runs the prompt through the model (from an empty cache) and samples up to maxTokens ids. */
export function generate(rt: ModelRuntime, prompt: readonly number[], opts: GenerateOptions): GenerateResult {
  if (prompt.length === 0) throw new UsageError('the prompt is empty');
  if (prompt.length > rt.context) {
    throw new UsageError(`the prompt has ${prompt.length} tokens but the context holds ${rt.context}; shorten it or raise --context`);
  }
  const sampler = new Sampler(opts);
  rt.reset();
  const t0 = performance.now();
  let logits = rt.forward(prompt, { mode: opts.mode });
  const t1 = performance.now();
  const out: number[] = [];
  let stoppedAt: GenerateResult['stoppedAt'] = 'max-tokens';
  while (out.length < opts.maxTokens) {
    const id = sampler.sample(logits, opts.sampleLimit);
    if ((opts.eosId !== undefined && id === opts.eosId) || opts.stopIds?.includes(id)) {
      stoppedAt = 'eos';
      break;
    }
    out.push(id);
    opts.onToken?.(id);
    if (out.length >= opts.maxTokens) break;
    if (rt.position >= rt.context) {
      stoppedAt = 'context';
      break;
    }
    logits = rt.forward([id], { mode: opts.mode });
  }
  const t2 = performance.now();
  return { tokens: out, stoppedAt, promptTokens: prompt.length, prefillSeconds: (t1 - t0) / 1000, decodeSeconds: (t2 - t1) / 1000 };
}

export interface PerplexityResult {
  tokens: number;
  /** Mean negative log-likelihood (nats per predicted token). */
  nll: number;
  perplexity: number;
  windows: number;
  seconds: number;
}

/**
 * Perplexity of `ids` over non-overlapping windows of `context` tokens (each window predicts
 * its tokens 2..n from the ones before, starting from an empty cache).
 */
export function perplexity(rt: ModelRuntime, ids: readonly number[], context: number, mode: FfnRunMode, onWindow?: (tokens: number) => void): PerplexityResult {
  if (ids.length < 2) throw new UsageError('perplexity needs at least 2 tokens of text');
  if (context < 2 || context > rt.context) throw new UsageError(`--context must be in [2, ${rt.context}]`);
  const vocab = rt.spec.vocabSize;
  let nll = 0;
  let count = 0;
  let windows = 0;
  const t0 = performance.now();
  for (let start = 0; start + 1 < ids.length; start += context) {
    const win = ids.slice(start, Math.min(ids.length, start + context));
    if (win.length < 2) break;
    rt.reset();
    const logits = rt.forward(win, { allLogits: true, mode });
    for (let t = 0; t + 1 < win.length; t++) {
      const row = logits.subarray(t * vocab, (t + 1) * vocab);
      let mx = -Infinity;
      for (let i = 0; i < vocab; i++) if (row[i]! > mx) mx = row[i]!;
      let s = 0;
      for (let i = 0; i < vocab; i++) s += Math.exp(row[i]! - mx);
      nll += Math.log(s) + mx - row[win[t + 1]!]!;
      count++;
    }
    windows++;
    onWindow?.(win.length);
  }
  const mean = nll / count;
  return { tokens: count, nll: mean, perplexity: Math.exp(mean), windows, seconds: (performance.now() - t0) / 1000 };
}
