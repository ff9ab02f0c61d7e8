// Element conversions for packing: whole chunks at a time, on typed arrays (little-endian hosts).
// Narrowing rounds to nearest, ties to even, from the exact f32 value; NaN stays NaN, ±Inf stays
// ±Inf (the same results as the scalar functions of ../dtype.ts, which the tests compare against).
import { dtypeSize, f16BitsToF32, f32ToF16Bits, type DType } from '../dtype.js';
import { SparseLlmError } from '../errors.js';

if (new Uint8Array(new Uint16Array([1]).buffer)[0] !== 1) {
  throw new SparseLlmError('sparsellm needs a little-endian machine (safetensors data is little-endian)');
}

/** A Uint8Array whose byteOffset is a multiple of `align` (copies only when it is not). */
function aligned(bytes: Uint8Array, align: number): Uint8Array {
  return bytes.byteOffset % align === 0 ? bytes : bytes.slice();
}

/**
 * Reusable work buffers: `get(role, bytes)` returns a view of at least `bytes` bytes that stays the
 * same allocation across calls (grown when needed). A caller owning a Scratch must be done with a
 * role's previous result before asking for it again.
 */
export class Scratch {
  private readonly bufs = new Map<string, ArrayBuffer>();
  get(role: string, bytes: number): Uint8Array {
    let b = this.bufs.get(role);
    if (!b || b.byteLength < bytes) {
      b = new ArrayBuffer(Math.max(bytes, 64));
      this.bufs.set(role, b);
    }
    return new Uint8Array(b, 0, bytes);
  }
}

/** f16 bits → f32 bits, for all 65536 patterns (exact; NaN payloads kept in the top bits). */
let F16_TABLE: Uint32Array | undefined;
function f16Table(): Uint32Array {
  if (!F16_TABLE) {
    F16_TABLE = new Uint32Array(65536);
    const f = new Float32Array(F16_TABLE.buffer);
    for (let h = 0; h < 65536; h++) {
      const exp = (h >>> 10) & 0x1f;
      if (exp === 0x1f && (h & 0x3ff) !== 0) F16_TABLE[h] = ((h & 0x8000) << 16) | 0x7fc00000 | ((h & 0x3ff) << 13);
      else f[h] = f16BitsToF32(h);
    }
  }
  return F16_TABLE;
}

function elementCount(bytes: Uint8Array, dtype: DType): number {
  const size = dtypeSize(dtype);
  if (bytes.byteLength % size !== 0) throw new SparseLlmError(`${bytes.byteLength} bytes is not a whole number of ${dtype} elements`);
  return bytes.byteLength / size;
}

/** f32 bit patterns of little-endian `dtype` bytes (a view when the input is F32 and aligned). */
function toF32Bits(bytes: Uint8Array, dtype: DType, scratch?: Scratch): Uint32Array {
  const n = elementCount(bytes, dtype);
  const b = aligned(bytes, 4);
  if (dtype === 'F32') return new Uint32Array(b.buffer, b.byteOffset, n);
  const src = new Uint16Array(b.buffer, b.byteOffset, n);
  const mem = scratch?.get('bits', n * 4);
  const out = mem ? new Uint32Array(mem.buffer, mem.byteOffset, n) : new Uint32Array(n);
  if (dtype === 'BF16') {
    for (let i = 0; i < n; i++) out[i] = src[i]! << 16;
  } else {
    const t = f16Table();
    for (let i = 0; i < n; i++) out[i] = t[src[i]!]!;
  }
  return out;
}

/** Decodes little-endian `dtype` bytes into f32 values (exact). */
export function toF32(bytes: Uint8Array, dtype: DType): Float32Array {
  const bits = toF32Bits(bytes, dtype);
  return dtype === 'F32' ? new Float32Array(bits.slice().buffer) : new Float32Array(bits.buffer, bits.byteOffset, bits.length);
}

/** Encodes f32 bit patterns as `dtype` (round to nearest even; NaN stays NaN; ±Inf stays ±Inf). */
function fromF32Bits(bits: Uint32Array, dtype: DType, scratch?: Scratch, role = 'encode'): Uint8Array {
  const n = bits.length;
  if (dtype === 'F32') return new Uint8Array(bits.buffer, bits.byteOffset, n * 4);
  const mem = scratch?.get(role, n * 2);
  const out = mem ? new Uint16Array(mem.buffer, mem.byteOffset, n) : new Uint16Array(n);
  if (dtype === 'BF16') {
    for (let i = 0; i < n; i++) {
      const x = bits[i]!;
      if ((x & 0x7f800000) === 0x7f800000 && (x & 0x007fffff) !== 0) out[i] = (x >>> 16) | 0x0040;
      else out[i] = (x + 0x7fff + ((x >>> 16) & 1)) >>> 16;
    }
  } else {
    const f = new Float32Array(bits.buffer, bits.byteOffset, n);
    for (let i = 0; i < n; i++) out[i] = f32ToF16Bits(f[i]!);
  }
  return new Uint8Array(out.buffer, out.byteOffset, n * 2);
}

/** Encodes f32 values as little-endian `dtype` bytes. */
export function fromF32(values: Float32Array, dtype: DType): Uint8Array {
  const bits = new Uint32Array(values.buffer, values.byteOffset, values.length);
  return dtype === 'F32' ? new Uint8Array(bits.slice().buffer) : fromF32Bits(bits, dtype);
}

/**
 * Converts a chunk of `from` elements into `to` elements. Same dtype: the bytes unchanged (bit
 * exact, NaN payloads included). Otherwise one rounding from the exact f32 value.
 */
export function convertBytes(bytes: Uint8Array, from: DType, to: DType, scratch?: Scratch, role = 'encode'): Uint8Array {
  if (from === to) return bytes;
  const bits = toF32Bits(bytes, from, scratch);
  // F32 output of a 16-bit input is the bits buffer itself: copy it out of the shared role.
  if (to === 'F32' && scratch && from !== 'F32') {
    const out = scratch.get(role, bits.length * 4);
    out.set(new Uint8Array(bits.buffer, bits.byteOffset, bits.length * 4));
    return out;
  }
  return fromF32Bits(bits, to, scratch, role);
}

/**
 * Gathers columns [c0, c1) of a row-major [rows, cols] matrix of `elem`-byte elements as the rows
 * of a [c1 - c0, rows] matrix (a block of the transpose), bit exact.
 */
export function transposeBlock(src: Uint8Array, rows: number, cols: number, c0: number, c1: number, elem: number, out?: Uint8Array): Uint8Array {
  if (src.byteLength !== rows * cols * elem) throw new SparseLlmError(`transposeBlock: ${src.byteLength} bytes is not [${rows}, ${cols}] × ${elem}`);
  const n = c1 - c0;
  out = out ? out.subarray(0, n * rows * elem) : new Uint8Array(n * rows * elem);
  if ((elem === 2 || elem === 4) && out.byteOffset % elem === 0) {
    const s = aligned(src, elem);
    const S = elem === 2 ? new Uint16Array(s.buffer, s.byteOffset, rows * cols) : new Uint32Array(s.buffer, s.byteOffset, rows * cols);
    const O = elem === 2 ? new Uint16Array(out.buffer, out.byteOffset, n * rows) : new Uint32Array(out.buffer, out.byteOffset, n * rows);
    // Walk source rows in order (sequential reads), scattering into the output columns.
    for (let r = 0; r < rows; r++) {
      const base = r * cols;
      for (let c = c0, o = r; c < c1; c++, o += rows) O[o] = S[base + c]!;
    }
    return out;
  }
  for (let r = 0; r < rows; r++) {
    for (let c = c0; c < c1; c++) out.set(src.subarray((r * cols + c) * elem, (r * cols + c + 1) * elem), ((c - c0) * rows + r) * elem);
  }
  return out;
}

/**
 * Interleaves `n` up rows ([n, d], row j = W_up[j0 + j]) with `n` down columns given as rows
 * ([n, d], row j = W_down[:, j0 + j]) into the neuron-major block [n, 2, d] of `updown`.
 */
export function interleaveUpDown(up: Uint8Array, downT: Uint8Array, n: number, d: number, elem: number, out?: Uint8Array): Uint8Array {
  const row = d * elem;
  if (up.byteLength !== n * row || downT.byteLength !== n * row) throw new SparseLlmError(`interleaveUpDown: expected two [${n}, ${d}] blocks`);
  out = out ? out.subarray(0, 2 * n * row) : new Uint8Array(2 * n * row);
  for (let j = 0; j < n; j++) {
    out.set(up.subarray(j * row, (j + 1) * row), 2 * j * row);
    out.set(downT.subarray(j * row, (j + 1) * row), (2 * j + 1) * row);
  }
  return out;
}
