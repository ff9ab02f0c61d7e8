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

/** Decodes little-endian `dtype` bytes into f32 values. */
export function toF32(bytes: Uint8Array, dtype: DType): Float32Array {
  const size = dtypeSize(dtype);
  if (bytes.byteLength % size !== 0) throw new SparseLlmError(`toF32: ${bytes.byteLength} bytes is not a whole number of ${dtype} elements`);
  const b = aligned(bytes, 4);
  const n = b.byteLength / size;
  if (dtype === 'F32') return new Float32Array(b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength));
  const src = new Uint16Array(b.buffer, b.byteOffset, n);
  const out = new Float32Array(n);
  if (dtype === 'BF16') {
    const o = new Uint32Array(out.buffer);
    for (let i = 0; i < n; i++) o[i] = src[i]! << 16;
  } else {
    for (let i = 0; i < n; i++) out[i] = f16BitsToF32(src[i]!);
  }
  return out;
}

/** Encodes f32 values as little-endian `dtype` bytes. */
export function fromF32(values: Float32Array, dtype: DType): Uint8Array {
  const n = values.length;
  if (dtype === 'F32') return new Uint8Array(values.buffer.slice(values.byteOffset, values.byteOffset + n * 4));
  const out = new Uint16Array(n);
  if (dtype === 'BF16') {
    const bits = new Uint32Array(values.buffer, values.byteOffset, n);
    for (let i = 0; i < n; i++) {
      const x = bits[i]!;
      if ((x & 0x7f800000) === 0x7f800000 && (x & 0x007fffff) !== 0) out[i] = (x >>> 16) | 0x0040;
      else out[i] = (x + 0x7fff + ((x >>> 16) & 1)) >>> 16;
    }
  } else {
    for (let i = 0; i < n; i++) out[i] = f32ToF16Bits(values[i]!);
  }
  return new Uint8Array(out.buffer);
}

/**
 * Converts a chunk of `from` elements into `to` elements. Same dtype: the bytes unchanged (bit
 * exact, NaN payloads included). Otherwise one rounding from the exact f32 value.
 */
export function convertBytes(bytes: Uint8Array, from: DType, to: DType): Uint8Array {
  if (from === to) return bytes;
  return fromF32(toF32(bytes, from), to);
}

/**
 * Gathers columns [c0, c1) of a row-major [rows, cols] matrix of `elem`-byte elements as the rows
 * of a [c1 - c0, rows] matrix (a block of the transpose), bit exact.
 */
export function transposeBlock(src: Uint8Array, rows: number, cols: number, c0: number, c1: number, elem: number): Uint8Array {
  if (src.byteLength !== rows * cols * elem) throw new SparseLlmError(`transposeBlock: ${src.byteLength} bytes is not [${rows}, ${cols}] × ${elem}`);
  const n = c1 - c0;
  const out = new Uint8Array(n * rows * elem);
  if (elem === 2 || elem === 4) {
    const s = aligned(src, elem);
    const S = elem === 2 ? new Uint16Array(s.buffer, s.byteOffset, rows * cols) : new Uint32Array(s.buffer, s.byteOffset, rows * cols);
    const O = elem === 2 ? new Uint16Array(out.buffer) : new Uint32Array(out.buffer);
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
export function interleaveUpDown(up: Uint8Array, downT: Uint8Array, n: number, d: number, elem: number): Uint8Array {
  const row = d * elem;
  if (up.byteLength !== n * row || downT.byteLength !== n * row) throw new SparseLlmError(`interleaveUpDown: expected two [${n}, ${d}] blocks`);
  const out = new Uint8Array(2 * n * row);
  for (let j = 0; j < n; j++) {
    out.set(up.subarray(j * row, (j + 1) * row), 2 * j * row);
    out.set(downT.subarray(j * row, (j + 1) * row), (2 * j + 1) * row);
  }
  return out;
}
