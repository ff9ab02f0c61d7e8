// Verification of a packed file against its source checkpoint (`sparsellm pack --verify`).
// Independent of the writer's fast paths: the source is read through the checkpoint reader's
// readF32 (canonical orientation, exact f32), and each stored element is compared with the scalar
// round-to-nearest-even conversion of ../dtype.ts; NaN must stay NaN. Memory: one tensor at a time
// (for an FFN layer: W_up, W_down and the packed tensor).
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { DenseCheckpoint } from '../checkpoint/dense.js';
import { f32ToBf16Bits, f32ToF16Bits } from '../dtype.js';
import type { PackedModel } from './reader.js';
import { checkpointDir } from './source.js';

export interface Mismatch {
  tensor: string;
  /** Flat element index in the packed tensor. */
  index: number;
  expected: string;
  actual: string;
}

export interface VerifyResult {
  ok: boolean;
  tensors: number;
  elements: number;
  /** Number of differing elements (bytes for U8 tensors). */
  mismatches: number;
  /** The first few, for the report. */
  examples: Mismatch[];
  contentHash: { ok: boolean; expected: string; actual: string };
}

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);
const bitsOf = (x: number): number => {
  f32[0] = x;
  return u32[0]!;
};
const hex = (n: number, digits: number) => '0x' + n.toString(16).padStart(digits, '0');

/** Compares packed elements with the expected conversion of source values. */
class Checker {
  mismatches = 0;
  elements = 0;
  readonly examples: Mismatch[] = [];

  constructor(private readonly maxExamples = 8) {}

  /** `get(i)` gives the source value of packed element i. */
  compare(tensor: string, dtype: string, packed: Uint8Array, count: number, get: (i: number) => number): void {
    const view = new DataView(packed.buffer, packed.byteOffset, packed.byteLength);
    this.elements += count;
    for (let i = 0; i < count; i++) {
      const x = get(i);
      let ok: boolean;
      let exp: string;
      let act: string;
      if (dtype === 'F32') {
        const a = view.getUint32(i * 4, true);
        const aNaN = (a & 0x7f800000) === 0x7f800000 && (a & 0x7fffff) !== 0;
        ok = Number.isNaN(x) ? aNaN : a === bitsOf(x);
        exp = hex(bitsOf(x), 8);
        act = hex(a, 8);
      } else {
        const a = view.getUint16(i * 2, true);
        const e = dtype === 'BF16' ? f32ToBf16Bits(x) : f32ToF16Bits(x);
        const aNaN = dtype === 'BF16' ? (a & 0x7f80) === 0x7f80 && (a & 0x7f) !== 0 : (a & 0x7c00) === 0x7c00 && (a & 0x3ff) !== 0;
        ok = Number.isNaN(x) ? aNaN : a === e;
        exp = hex(e, 4);
        act = hex(a, 4);
      }
      if (!ok) {
        this.mismatches++;
        if (this.examples.length < this.maxExamples) this.examples.push({ tensor, index: i, expected: `${exp} (${x})`, actual: act });
      }
    }
  }

  compareBytes(tensor: string, packed: Uint8Array, source: Uint8Array): void {
    this.elements += source.byteLength;
    const n = Math.max(packed.byteLength, source.byteLength);
    for (let i = 0; i < n; i++) {
      if (packed[i] !== source[i]) {
        this.mismatches++;
        if (this.examples.length < this.maxExamples) this.examples.push({ tensor, index: i, expected: String(source[i]), actual: String(packed[i]) });
      }
    }
  }
}

/**
 * Re-reads every tensor of `packed` and compares it with `source`. `onProgress` gets packed bytes
 * checked (total: the sum of tensor sizes, then the file's data section again for the hash).
 */
export async function verifyPacked(packed: PackedModel, source: DenseCheckpoint, onProgress?: (bytes: number) => void): Promise<VerifyResult> {
  const c = new Checker();
  const spec = packed.spec;
  const d = spec.dModel;
  const names = packed.tensorNames();
  for (const name of names) {
    const t = packed.tensor(name);
    const bytes = await packed.readBytes(name);
    const ffn = /^layers\.(\d+)\.ffn\.(gate|updown|up|down_t)$/.exec(name);
    if (t.dtype === 'U8') {
      const file = await readFile(join(checkpointDir(source), name));
      c.compareBytes(name, bytes, new Uint8Array(file));
    } else if (ffn) {
      const i = Number(ffn[1]);
      const F = spec.dFF[i]!;
      const kind = ffn[2]!;
      if (kind === 'gate' || kind === 'up') {
        const w = await source.readF32(`layers.${i}.ffn.${kind}.weight`);
        c.compare(name, t.dtype, bytes, F * d, (k) => w[k]!);
      } else {
        const down = await source.readF32(`layers.${i}.ffn.down.weight`); // [d, F]
        if (kind === 'down_t') {
          c.compare(name, t.dtype, bytes, F * d, (k) => down[(k % d) * F + Math.floor(k / d)]!);
        } else {
          const up = await source.readF32(`layers.${i}.ffn.up.weight`); // [F, d]
          c.compare(name, t.dtype, bytes, F * 2 * d, (k) => {
            const j = Math.floor(k / (2 * d));
            const r = Math.floor(k / d) % 2;
            const col = k % d;
            return r === 0 ? up[j * d + col]! : down[col * F + j]!;
          });
        }
      }
    } else if (t.dtype === 'I32') {
      // Neuron maps come from pruning, not from the dense source: nothing to compare with.
      continue;
    } else {
      const w = await source.readF32(name);
      c.compare(name, t.dtype, bytes, w.length, (k) => w[k]!);
    }
    onProgress?.(t.bytes);
  }
  const contentHash = await packed.verifyContentHash(onProgress);
  return {
    ok: c.mismatches === 0 && contentHash.ok,
    tensors: names.length,
    elements: c.elements,
    mismatches: c.mismatches,
    examples: c.examples,
    contentHash,
  };
}
