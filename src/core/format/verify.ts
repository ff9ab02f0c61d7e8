// Verification of a packed file against its source checkpoint (`sparsellm pack --verify`).
// Independent of the writer's fast paths (neither ./convert.ts nor the native addon): the source is
// read through the checkpoint reader (raw chunks, or readF32 for reordered tensors), the expected
// stored bits of each chunk are computed here with the scalar round-to-nearest-even conversions of
// ../dtype.ts (W_down columns gathered by a plain loop), and the stored bytes must equal them. A
// chunk that differs is then checked element by element, where any NaN stands for a NaN.
// Memory: a few MiB of rows at a time, plus one layer's W_down (source dtype) for the FFN tensors.
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { DenseCheckpoint } from '../checkpoint/dense.js';
import { decodeToF32, dtypeSize, f16BitsToF32, f32ToBf16Bits, f32ToF16Bits, type DType } from '../dtype.js';
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
 * The canonical tensor `name`, `rows` rows at a time (the last chunk may be shorter), as raw
 * little-endian bytes of its source dtype; reordered tensors (GPT-2) come whole from readF32 as F32.
 */
async function* sourceChunks(source: DenseCheckpoint, name: string, rows: number): AsyncGenerator<{ dtype: DType; bytes: Uint8Array }> {
  const e = source.entry(name);
  const rowElems = e.shape.length <= 1 ? 1 : e.shape.slice(1).reduce((a, b) => a * b, 1);
  if (e.transform.kind !== 'identity') {
    const all = await source.readF32(name);
    const bytes = new Uint8Array(all.buffer, all.byteOffset, all.byteLength);
    for (let at = 0; at < bytes.byteLength; at += rows * rowElems * 4) yield { dtype: 'F32', bytes: bytes.subarray(at, at + rows * rowElems * 4) };
    return;
  }
  for await (const raw of source.rawChunks(name, Math.max(1, rows) * rowElems * dtypeSize(e.dtype))) yield { dtype: e.dtype, bytes: raw };
}

/** All of a canonical tensor as raw bytes of one dtype (see sourceChunks). */
async function sourceWhole(source: DenseCheckpoint, name: string): Promise<{ dtype: DType; bytes: Uint8Array }> {
  const e = source.entry(name);
  const count = e.shape.reduce((a, b) => a * b, 1);
  const parts: { dtype: DType; bytes: Uint8Array }[] = [];
  for await (const c of sourceChunks(source, name, Number.MAX_SAFE_INTEGER)) parts.push(c);
  const dtype = parts[0]?.dtype ?? e.dtype;
  const bytes = new Uint8Array(count * dtypeSize(dtype));
  let at = 0;
  for (const p of parts) {
    bytes.set(p.bytes, at);
    at += p.bytes.byteLength;
  }
  return { dtype, bytes };
}

/** f16 bits → f32 bits by ../dtype.ts's scalar decoder, for all 65536 patterns. */
let f16Bits: Uint32Array | undefined;
function f16ToF32Bits(): Uint32Array {
  if (!f16Bits) {
    f16Bits = new Uint32Array(65536);
    const f = new Float32Array(f16Bits.buffer);
    for (let h = 0; h < 65536; h++) f[h] = f16BitsToF32(h);
  }
  return f16Bits;
}

/** Elements of `from` (a view of `bytes` when aligned, else a copy) as a typed array of its width. */
function elements(bytes: Uint8Array, dtype: DType): Uint16Array | Uint32Array {
  const size = dtypeSize(dtype);
  const b = bytes.byteOffset % size === 0 ? bytes : bytes.slice();
  return size === 4 ? new Uint32Array(b.buffer, b.byteOffset, b.byteLength / 4) : new Uint16Array(b.buffer, b.byteOffset, b.byteLength / 2);
}

/**
 * The stored bits `to` must hold for source elements `src` of dtype `from`, into `out` at element
 * `at` (same dtype: the bits themselves; otherwise the exact f32 value rounded by ../dtype.ts).
 */
function expectInto(src: Uint16Array | Uint32Array, from: DType, to: DType, out: Uint16Array | Uint32Array, at: number): void {
  const n = src.length;
  if (from === to) {
    out.set(src, at);
    return;
  }
  const t = from === 'F16' ? f16ToF32Bits() : undefined;
  const bits = (i: number): number => (from === 'F32' ? src[i]! : t ? t[src[i]!]! : src[i]! << 16);
  if (to === 'F32') {
    for (let i = 0; i < n; i++) out[at + i] = bits(i);
    return;
  }
  const f = new Float32Array(1);
  const u = new Uint32Array(f.buffer);
  const enc = to === 'BF16' ? f32ToBf16Bits : f32ToF16Bits;
  for (let i = 0; i < n; i++) {
    u[0] = bits(i);
    out[at + i] = enc(f[0]!);
  }
}

/** A typed array of `count` elements of `dtype`. */
function alloc(dtype: DType | string, count: number): Uint16Array | Uint32Array {
  return dtype === 'F32' ? new Uint32Array(count) : new Uint16Array(count);
}

function sameBytes(a: Uint8Array, b: Uint16Array | Uint32Array): boolean {
  return Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength));
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
      const to = t.dtype as DType;
      const down = await sourceWhole(source, `layers.${i}.ffn.down.weight`); // [d, F]
      const downEl = elements(down.bytes, down.dtype);
      let downF32: Float32Array | undefined; // decoded only when a block differs
      const per = ffn[2] === 'updown' ? 2 * d : d;
      const block = Math.max(1, Math.floor(STEP / (per * 4)));
      const up = ffn[2] === 'updown' ? sourceChunks(source, `layers.${i}.ffn.up.weight`, block)[Symbol.asyncIterator]() : undefined;
      const col = alloc(down.dtype, d);
      const want = alloc(to, block * per);
      try {
        for (let j0 = 0; j0 < F; j0 += block) {
          const n = Math.min(block, F - j0);
          const bytes = await packed.readRange(name, j0 * per * elem, n * per * elem);
          let u: { dtype: DType; bytes: Uint8Array } | undefined;
          if (up) {
            const rows = await up.next();
            if (rows.done) throw new Error(`internal: W_up of layer ${i} ended early`);
            u = rows.value;
          }
          const upEl = u ? elements(u.bytes, u.dtype) : undefined;
          for (let j = 0; j < n; j++) {
            if (upEl) expectInto(upEl.subarray(j * d, (j + 1) * d), u!.dtype, to, want, j * per);
            for (let r = 0; r < d; r++) col[r] = downEl[r * F + j0 + j]!;
            expectInto(col, down.dtype, to, want, j * per + per - d);
          }
          if (sameBytes(bytes, want.subarray(0, n * per))) {
            c.elements += n * per;
            continue;
          }
          downF32 ??= decodeToF32(down.bytes, down.dtype);
          const dv = downF32;
          if (!u) {
            c.compare(name, t.dtype, bytes, n * d, (k) => dv[(k % d) * F + j0 + Math.floor(k / d)]!, j0 * d);
          } else {
            const uv = decodeToF32(u.bytes, u.dtype);
            c.compare(name, t.dtype, bytes, n * 2 * d, (k) => {
              const j = Math.floor(k / (2 * d));
              const cc = k % d;
              return Math.floor(k / d) % 2 === 0 ? uv[j * d + cc]! : dv[cc * F + j0 + j]!;
            }, j0 * 2 * d);
          }
        }
      } finally {
        await up?.return(undefined);
      }
    } else {
      const canonical = ffn ? `layers.${ffn[1]}.ffn.${ffn[2]}.weight` : name;
      const rowElems = t.shape.length <= 1 ? 1 : t.shape.slice(1).reduce((a, b) => a * b, 1);
      const to = t.dtype as DType;
      let at = 0;
      for await (const w of sourceChunks(source, canonical, Math.max(1, Math.floor(STEP / (rowElems * 4))))) {
        const count = w.bytes.byteLength / dtypeSize(w.dtype);
        const bytes = await packed.readRange(name, at * elem, count * elem);
        const want = alloc(to, count);
        expectInto(elements(w.bytes, w.dtype), w.dtype, to, want, 0);
        if (sameBytes(bytes, want)) c.elements += count;
        else {
          const v = decodeToF32(w.bytes, w.dtype);
          c.compare(name, t.dtype, bytes, count, (k) => v[k]!, at);
        }
        at += count;
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
