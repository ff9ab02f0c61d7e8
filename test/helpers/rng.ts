// A small seeded PRNG for tests and fixtures (xoshiro128**, seeded through splitmix32).
// Only integer arithmetic and float additions/multiplications are used, so the sequence is
// identical on every platform and Node version. fixtures/generate.ts depends on this exact
// sequence: changing it changes the committed fixtures (test/checkpoint.test.ts would notice).

export class Rng {
  private s0: number;
  private s1: number;
  private s2: number;
  private s3: number;

  constructor(readonly seed: number) {
    let x = seed >>> 0;
    const next = (): number => {
      x = (x + 0x9e3779b9) >>> 0;
      let z = x;
      z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0;
      z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0;
      return (z ^ (z >>> 16)) >>> 0;
    };
    this.s0 = next();
    this.s1 = next();
    this.s2 = next();
    this.s3 = next();
    if ((this.s0 | this.s1 | this.s2 | this.s3) === 0) this.s0 = 1;
  }

  /** A uniform 32-bit unsigned integer. */
  u32(): number {
    const result = Math.imul(rotl(Math.imul(this.s1, 5) >>> 0, 7), 9) >>> 0;
    const t = (this.s1 << 9) >>> 0;
    this.s2 = (this.s2 ^ this.s0) >>> 0;
    this.s3 = (this.s3 ^ this.s1) >>> 0;
    this.s1 = (this.s1 ^ this.s2) >>> 0;
    this.s0 = (this.s0 ^ this.s3) >>> 0;
    this.s2 = (this.s2 ^ t) >>> 0;
    this.s3 = rotl(this.s3, 11);
    return result;
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

function rotl(x: number, k: number): number {
  return ((x << k) | (x >>> (32 - k))) >>> 0;
}
