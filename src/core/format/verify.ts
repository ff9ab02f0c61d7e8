// Verification of a packed file against its source checkpoint (`sparsellm pack --verify`).
// Independent of the writer's fast paths: the source is read through the checkpoint reader
// (raw chunks decoded by ../dtype.ts, or readF32 for reordered tensors), and each stored element is
// compared with the scalar round-to-nearest-even conversion of ../dtype.ts; NaN must stay NaN.
// Memory: a few MiB of rows at a time, plus one layer's W_down as f32 for the FFN tensors.
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { DenseCheckpoint } from '../checkpoint/dense.js';
import { decodeToF32, dtypeSize, f32ToBf16Bits, f32ToF16Bits } from '../dtype.js';
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
  /** `base` is the flat index of packed[0] in the whole tensor (for the report). */
  compare(tensor: string, dtype: string, packed: Uint8Array, count: number, get: (i: number) => number, base = 0): void {
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
        if (this.examples.length < this.maxExamples) this.examples.push({ tensor, index: base + i, expected: `${exp} (${x})`, actual: act });
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
 * The canonical tensor `name` as f32 values, `rows` rows at a time (the last chunk may be shorter):
 * identity-stored tensors stream through the checkpoint's raw chunks, decoded with ../dtype.ts;
 * reordered ones (GPT-2) come whole from readF32.
 */
async function* sourceRows(source: DenseCheckpoint, name: string, rows: number): AsyncGenerator<Float32Array> {
  const e = source.entry(name);
  const rowElems = e.shape.length <= 1 ? 1 : e.shape.slice(1).reduce((a, b) => a * b, 1);
  if (e.transform.kind !== 'identity') {
    const all = await source.readF32(name);
    for (let at = 0; at < all.length; at += rows * rowElems) yield all.subarray(at, at + rows * rowElems);
    return;
  }
  for await (const raw of source.rawChunks(name, Math.max(1, rows) * rowElems * dtypeSize(e.dtype))) yield decodeToF32(raw, e.dtype);
}

/**
 * Re-reads every tensor of `packed` and compares it with `source`. `onProgress` gets packed bytes
 * checked (total: the sum of tensor sizes, then the file's data section again for the hash).
 * Memory: a few MiB of rows at a time, plus one layer's W_down (f32) for the FFN tensors.
 */
export async function verifyPacked(packed: PackedModel, source: DenseCheckpoint, onProgress?: (bytes: number) => void): Promise<VerifyResult> {
  const c = new Checker();
  const spec = packed.spec;
  const d = spec.dModel;
  const names = packed.tensorNames();
  const STEP = 4 << 20; // bytes of f32 per step
  for (const name of names) {
    const t = packed.tensor(name);
    const ffn = /^layers\.(\d+)\.ffn\.(gate|updown|up|down_t)$/.exec(name);
    const elem = t.dtype === 'U8' ? 1 : t.dtype === 'F32' || t.dtype === 'I32' ? 4 : 2;
    if (t.dtype === 'U8') {
      const file = await readFile(join(checkpointDir(source), name));
      c.compareBytes(name, await packed.readBytes(name), new Uint8Array(file));
    } else if (t.dtype === 'I32') {
      // Neuron maps come from pruning, not from the dense source: nothing to compare with.
    } else if (ffn && (ffn[2] === 'updown' || ffn[2] === 'down_t')) {
      const i = Number(ffn[1]);
      const F = spec.dFF[i]!;
      const down = await source.readF32(`layers.${i}.ffn.down.weight`); // [d, F]
      const per = ffn[2] === 'updown' ? 2 * d : d;
      const block = Math.max(1, Math.floor(STEP / (per * 4)));
      const up = ffn[2] === 'updown' ? sourceRows(source, `layers.${i}.ffn.up.weight`, block)[Symbol.asyncIterator]() : undefined;
      try {
        for (let j0 = 0; j0 < F; j0 += block) {
          const n = Math.min(block, F - j0);
          const bytes = await packed.readRange(name, j0 * per * elem, n * per * elem);
          if (!up) {
            c.compare(name, t.dtype, bytes, n * d, (k) => down[(k % d) * F + j0 + Math.floor(k / d)]!, j0 * d);
          } else {
            const rows = await up.next();
            if (rows.done) throw new Error(`internal: W_up of layer ${i} ended early`);
            const u = rows.value;
            c.compare(name, t.dtype, bytes, n * 2 * d, (k) => {
              const j = Math.floor(k / (2 * d));
              const col = k % d;
              return Math.floor(k / d) % 2 === 0 ? u[j * d + col]! : down[col * F + j0 + j]!;
            }, j0 * 2 * d);
          }
        }
      } finally {
        await up?.return(undefined);
      }
    } else {
      const canonical = ffn ? `layers.${ffn[1]}.ffn.${ffn[2]}.weight` : name;
      const rowElems = t.shape.length <= 1 ? 1 : t.shape.slice(1).reduce((a, b) => a * b, 1);
      let at = 0;
      for await (const w of sourceRows(source, canonical, Math.max(1, Math.floor(STEP / (rowElems * 4))))) {
        const bytes = await packed.readRange(name, at * elem, w.length * elem);
        c.compare(name, t.dtype, bytes, w.length, (k) => w[k]!, at);
        at += w.length;
      }
      if (at * elem !== t.bytes) throw new Error(`internal: verified ${at} elements of '${name}', which has ${t.bytes / elem}`);
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
