// Typed wrapper over the addon's packing conversions (native/src/addon/convert_binding.cpp,
// native/src/cpu/convert*.cpp). Bit-identical to the JavaScript reference in ./convert.ts (tested
// in test/format-native-convert.test.ts); used by writePacked when the addon is built, with the
// JavaScript path kept as the fallback and the reference.
import type { DType } from '../dtype.js';
import { dtypeSize } from '../dtype.js';
import { engine, type NativeAddon } from '../native.js';
import { SparseLlmError } from '../errors.js';

interface ConvertAddon extends NativeAddon {
  convertElements(src: Uint8Array, from: number, dst: Uint8Array, to: number): void;
  packNeuronBlock(down: Uint8Array, downType: number, d: number, F: number, j0: number, n: number, up: Uint8Array | null, upType: number, out: Uint8Array, to: number): void;
}

const CODE: Record<DType, number> = { F32: 0, F16: 1, BF16: 2 };

/** The addon's conversions, or undefined when the addon is not built (or predates them). */
export function nativeConvert(): NativeConvert | undefined {
  if (cached !== null) return cached;
  try {
    const a = engine() as ConvertAddon;
    cached = typeof a.convertElements === 'function' && typeof a.packNeuronBlock === 'function' ? new NativeConvert(a) : undefined;
  } catch {
    cached = undefined;
  }
  return cached;
}
let cached: NativeConvert | undefined | null = null;

/** A view of `bytes` aligned to `align` (a copy only when it is not). */
function aligned(bytes: Uint8Array, align: number): Uint8Array {
  return bytes.byteOffset % align === 0 ? bytes : bytes.slice();
}

export class NativeConvert {
  constructor(private readonly addon: ConvertAddon) {}

  /** Converts `src` (elements of `from`) into `out` (elements of `to`, exactly as many). */
  convertInto(src: Uint8Array, from: DType, to: DType, out: Uint8Array): Uint8Array {
    if (src.byteLength % dtypeSize(from) !== 0) throw new SparseLlmError(`${src.byteLength} bytes is not a whole number of ${from} elements`);
    const n = src.byteLength / dtypeSize(from);
    const dst = out.subarray(0, n * dtypeSize(to));
    if (dst.byteLength !== n * dtypeSize(to)) throw new SparseLlmError(`convertInto: output of ${out.byteLength} bytes is too small for ${n} ${to} elements`);
    if (from === to) {
      dst.set(src);
      return dst;
    }
    if (dst.byteOffset % dtypeSize(to) !== 0) throw new SparseLlmError('convertInto: output buffer is not aligned');
    this.addon.convertElements(aligned(src, dtypeSize(from)), CODE[from], dst, CODE[to]);
    return dst;
  }

  /**
   * The neuron-major block of neurons [j0, j0 + n) in `to`: W_up row then W_down column per
   * neuron (`up` [n, d] given), or the W_down column only (`up` null). `down` is W_down [d, F].
   */
  packNeuronBlock(down: Uint8Array, downType: DType, d: number, F: number, j0: number, n: number, up: { bytes: Uint8Array; dtype: DType } | null, to: DType, out: Uint8Array): Uint8Array {
    const dst = out.subarray(0, n * (up ? 2 : 1) * d * dtypeSize(to));
    if (dst.byteOffset % dtypeSize(to) !== 0) throw new SparseLlmError('packNeuronBlock: output buffer is not aligned');
    this.addon.packNeuronBlock(
      aligned(down, dtypeSize(downType)),
      CODE[downType],
      d,
      F,
      j0,
      n,
      up ? aligned(up.bytes, dtypeSize(up.dtype)) : null,
      up ? CODE[up.dtype] : 0,
      dst,
      CODE[to],
    );
    return dst;
  }
}
