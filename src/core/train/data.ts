// The training data pipeline: text files or directories → token stream → a deterministic
// train/validation split → batches of windows. The batch of step s depends only on (seed, s),
// so the "data position" of a run is its step count and a resumed run sees the same batches.
import { readdir, readFile, stat } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { SparseLlmError, UsageError } from '../errors.js';
import type { Tokenizer } from '../tokenizer/index.js';

/** Validation takes every VAL_EVERY-th block of BLOCK tokens (5%), independent of the seed. */
export const BLOCK = 4096;
export const VAL_EVERY = 20;

export interface Corpus {
  files: string[];
  bytes: number;
  train: Int32Array;
  val: Int32Array;
}

async function listFiles(path: string, out: string[]): Promise<void> {
  let st;
  try {
    st = await stat(path);
  } catch {
    throw new UsageError(`${path}: no such file or directory`);
  }
  if (st.isFile()) {
    out.push(path);
    return;
  }
  if (!st.isDirectory()) return;
  const names = (await readdir(path)).filter((n) => !n.startsWith('.')).sort();
  for (const n of names) await listFiles(join(path, n), out);
}

/**
 * Reads every file under `paths` (directories recursively, in name order; hidden files skipped),
 * tokenizes each as one document followed by the end-of-text id (when the tokenizer has one),
 * and splits the stream into train and validation blocks.
 */
export async function loadCorpus(paths: readonly string[], tok: Tokenizer, context: number): Promise<Corpus> {
  if (!paths.length) throw new UsageError('no training text given (pass text files or directories)');
  const files: string[] = [];
  for (const p of paths) await listFiles(resolve(p), files);
  let bytes = 0;
  const ids: number[] = [];
  for (const f of files) {
    const text = await readFile(f, 'utf8');
    bytes += Buffer.byteLength(text);
    if (!text.length) continue;
    for (const id of tok.encode(text)) ids.push(id);
    if (tok.eosId !== undefined) ids.push(tok.eosId);
  }
  if (!ids.length) throw new SparseLlmError(`the corpus is empty: no text in ${paths.join(', ')}`);
  const train: number[] = [];
  const val: number[] = [];
  for (let b = 0; b * BLOCK < ids.length; b++) {
    const dst = b % VAL_EVERY === VAL_EVERY - 1 ? val : train;
    for (let i = b * BLOCK; i < Math.min(ids.length, (b + 1) * BLOCK); i++) dst.push(ids[i]!);
  }
  // Small corpora (under VAL_EVERY blocks): the last 5% of the stream, at least one window.
  if (val.length < context + 1) {
    const n = Math.max(context + 1, Math.ceil(ids.length * 0.05));
    train.length = 0;
    val.length = 0;
    for (let i = 0; i < ids.length; i++) (i < ids.length - n ? train : val).push(ids[i]!);
  }
  if (train.length < context + 1 || val.length < context + 1) {
    throw new SparseLlmError(
      `the corpus is too small: ${ids.length} tokens in ${files.length} file(s); need at least ${2 * (context + 1)} ` +
        `(one training and one validation window of context ${context} + 1)`,
    );
  }
  return { files, bytes, train: Int32Array.from(train), val: Int32Array.from(val) };
}

/** SplitMix64-style mixing of two 32-bit words into a uniform [0, 1) double. */
function hash01(a: number, b: number, c: number): number {
  let h = Math.imul(a ^ 0x9e3779b9, 0x85ebca6b) ^ Math.imul(b + 0x632be5ab, 0xc2b2ae35) ^ Math.imul(c + 0x27d4eb2f, 0x165667b1);
  h ^= h >>> 16;
  h = Math.imul(h, 0x7feb352d);
  h ^= h >>> 15;
  h = Math.imul(h, 0x846ca68b);
  h ^= h >>> 16;
  return (h >>> 0) / 4294967296;
}

/**
 * The tokens of optimizer step `step`: `n` windows of T + 1 tokens at positions drawn from
 * (seed, step, i), laid out [n, T + 1].
 */
export function trainBatch(train: Int32Array, seed: number, step: number, n: number, T: number): Int32Array {
  const out = new Int32Array(n * (T + 1));
  const span = train.length - (T + 1) + 1;
  for (let i = 0; i < n; i++) {
    const pos = Math.floor(hash01(seed, step, i) * span);
    out.set(train.subarray(pos, pos + T + 1), i * (T + 1));
  }
  return out;
}

/** Non-overlapping validation windows (at most `maxTokens` predicted tokens), in batches of B. */
export function validationBatches(val: Int32Array, T: number, B: number, maxTokens: number): { tokens: Int32Array; B: number }[] {
  const windows = Math.max(1, Math.min(Math.floor((val.length - 1) / T), Math.floor(maxTokens / T)));
  const out: { tokens: Int32Array; B: number }[] = [];
  for (let w0 = 0; w0 < windows; w0 += B) {
    const nb = Math.min(B, windows - w0);
    const t = new Int32Array(nb * (T + 1));
    for (let i = 0; i < nb; i++) t.set(val.subarray((w0 + i) * T, (w0 + i) * T + T + 1), i * (T + 1));
    out.push({ tokens: t, B: nb });
  }
  return out;
}
