// A small seeded PRNG for tests and fixtures (xoshiro128**, seeded through splitmix32).
// Only integer arithmetic and float additions/multiplications are used, so the sequence is
// identical on every platform and Node version. fixtures/generate.ts depends on this exact
// sequence: changing it changes the committed fixtures (test/checkpoint.test.ts would notice). The generator itself is src/core/random.ts.
import { Xoshiro128 } from '../../src/core/random.js';

export class Rng extends Xoshiro128 {
  constructor(readonly seed: number) {
    super(seed);
  }

  /** Uniform in [0, 1). */
  uniform(): number {
    return this.u32() / 4294967296;
  }

  /** Integer in [lo, hi] inclusive. */
  int(lo: number, hi: number): number {
    return lo + Math.floor(this.uniform() * (hi - lo + 1));
  }

  /**
   * Approximately N(mean, std²): the Irwin-Hall sum of 12 uniforms minus 6 (variance 1, range ±6).
   * No transcendental functions, so it is bit-identical everywhere.
   */
  normal(mean = 0, std = 1): number {
    let s = 0;
    for (let i = 0; i < 12; i++) s += this.uniform();
    return mean + std * (s - 6);
  }

  /** A Float32Array of `n` values ~ N(mean, std²). */
  normalArray(n: number, std = 1, mean = 0): Float32Array {
    const out = new Float32Array(n);
    for (let i = 0; i < n; i++) out[i] = this.normal(mean, std);
    return out;
  }

  /** A seed from SPARSELLM_TEST_SEED or the given default; tests print the seed they use. */
  static seedFromEnv(fallback: number): number {
    const env = process.env.SPARSELLM_TEST_SEED;
    return env !== undefined && env !== '' ? Number.parseInt(env, 10) >>> 0 : fallback;
  }
}

