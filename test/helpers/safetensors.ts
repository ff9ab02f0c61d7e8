// Hand-built safetensors bytes for tests: any header (valid or not) followed by any data.
import { writeFileSync } from 'node:fs';

/** 8-byte little-endian length + header text (JSON.stringify of `header` unless a string) + data. */
export function rawSafetensors(header: unknown, data: Uint8Array = new Uint8Array(0), headerLength?: bigint): Uint8Array {
  const text = typeof header === 'string' ? header : JSON.stringify(header);
  const json = new TextEncoder().encode(text);
  const out = new Uint8Array(8 + json.length + data.length);
  new DataView(out.buffer).setBigUint64(0, headerLength ?? BigInt(json.length), true);
  out.set(json, 8);
  out.set(data, 8 + json.length);
  return out;
}

export function writeRawSafetensors(path: string, header: unknown, data?: Uint8Array, headerLength?: bigint): string {
  writeFileSync(path, rawSafetensors(header, data, headerLength));
  return path;
}

/**
 * An independent, minimal reading of the safetensors rules (the reference reader's), used to check
 * that files we write are plain safetensors: returns the parsed header or throws a string reason.
 */
export function plainSafetensorsCheck(bytes: Uint8Array): Record<string, { dtype: string; shape: number[]; data_offsets: [number, number] }> {
  const sizes: Record<string, number> = { BOOL: 1, U8: 1, I8: 1, F8_E5M2: 1, F8_E4M3: 1, I16: 2, U16: 2, F16: 2, BF16: 2, I32: 4, U32: 4, F32: 4, I64: 8, U64: 8, F64: 8 };
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const n = Number(view.getBigUint64(0, true));
  if (8 + n > bytes.length) throw new Error('header past end');
  const header = JSON.parse(Buffer.from(bytes.subarray(8, 8 + n)).toString('utf8')) as Record<string, any>;
  const entries = Object.entries(header).filter(([k]) => k !== '__metadata__');
  entries.sort((a, b) => a[1].data_offsets[0] - b[1].data_offsets[0]);
  let cursor = 0;
  for (const [name, e] of entries) {
    const [b, end] = e.data_offsets;
    if (b !== cursor) throw new Error(`tensor ${name} starts at ${b}, expected ${cursor}`);
    const count = (e.shape as number[]).reduce((x, y) => x * y, 1);
    if (sizes[e.dtype] === undefined) throw new Error(`dtype ${e.dtype}`);
    if (count * sizes[e.dtype]! !== end - b) throw new Error(`tensor ${name} size`);
    cursor = end;
  }
  if (8 + n + cursor !== bytes.length) throw new Error('metadata incomplete buffer');
  return header;
}
