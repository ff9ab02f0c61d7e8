// The safetensors container: a validating reader that never loads the whole file, and a streaming
// writer that writes to a temporary name and renames when every byte is in place.
//
// File layout (little-endian):
//   [8 bytes] N, the header length, u64
//   [N bytes] header, UTF-8 JSON: { "__metadata__"?: {string: string},
//                                   "<name>": { "dtype": "F32", "shape": [..], "data_offsets": [begin, end] }, ... }
//   [rest]    data section; offsets are relative to its start (byte 8 + N)
// A valid file's byte ranges, sorted, cover the data section exactly: no overlap, no hole, nothing
// after the last tensor (the same rules as the reference reader).
//
// Alignment. Our writer can align every tensor start to a multiple of A bytes (from the start of the
// file). The header is padded with trailing spaces (valid JSON whitespace) so the data section starts
// at a multiple of A, and because holes are forbidden, the gaps between tensors are filled by
// explicit padding tensors: dtype U8, shape [n], named `__pad.<k>`. Any safetensors reader lists
// them as ordinary byte tensors; our readers skip every name starting with `__pad.`.

import { open, rename, unlink, type FileHandle } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { FormatError, SparseLlmError } from '../errors.js';

/** Every dtype the safetensors format defines, with its element size in bytes. */
export const SAFETENSORS_DTYPE_SIZES: Readonly<Record<string, number>> = {
  BOOL: 1, U8: 1, I8: 1, F8_E5M2: 1, F8_E4M3: 1,
  I16: 2, U16: 2, F16: 2, BF16: 2,
  I32: 4, U32: 4, F32: 4,
  I64: 8, U64: 8, F64: 8,
};

/** The dtypes the dense reader accepts (default allow-list). */
export const DENSE_DTYPES: readonly string[] = ['F32', 'F16', 'BF16'];

/** Names starting with this prefix are alignment padding (dtype U8, 1-D); readers ignore them. */
export const PAD_PREFIX = '__pad.';

/** Header length limit, as in the reference reader. */
export const MAX_HEADER_BYTES = 100_000_000;

export interface TensorInfo {
  name: string;
  dtype: string;
  shape: number[];
  /** Absolute byte offsets in the file (dataStart + data_offsets). */
  begin: number;
  end: number;
}

export interface OpenOptions {
  /** Dtypes accepted for non-padding tensors. Default: F32, F16, BF16. */
  dtypes?: readonly string[];
}

const isPad = (name: string): boolean => name.startsWith(PAD_PREFIX);

function describeDtypes(list: readonly string[]): string {
  return list.join(', ');
}

/** Reads exactly `length` bytes at `position` into `into` (at `offset`), or throws FormatError. */
async function readExactly(fh: FileHandle, file: string, into: Uint8Array, offset: number, length: number, position: number): Promise<void> {
  let done = 0;
  while (done < length) {
    const want = Math.min(length - done, 1 << 30);
    const { bytesRead } = await fh.read(into, offset + done, want, position + done);
    if (bytesRead === 0) {
      throw new FormatError(file, `file ended at byte ${position + done} while reading ${length} bytes at ${position} (was it truncated while open?)`);
    }
    done += bytesRead;
  }
}

export class SafetensorsFile {
  private closed = false;

  private constructor(
    readonly path: string,
    private readonly fh: FileHandle,
    /** File size in bytes. */
    readonly size: number,
    /** Header length N (bytes of JSON, including any padding spaces). */
    readonly headerLength: number,
    /** Absolute offset of the data section (8 + N). */
    readonly dataStart: number,
    /** `__metadata__`, or an empty object when absent. */
    readonly metadata: Readonly<Record<string, string>>,
    /** Tensors by name, padding tensors excluded, in file order. */
    readonly tensors: ReadonlyMap<string, TensorInfo>,
    /** Names of the padding tensors (`__pad.*`), in file order. */
    readonly paddingTensors: readonly string[],
  ) {}

  /** Opens and validates `path`. Reads the header only; throws FormatError naming the file and tensor. */
  static async open(path: string, options: OpenOptions = {}): Promise<SafetensorsFile> {
    const allowed = options.dtypes ?? DENSE_DTYPES;
    let fh: FileHandle;
    try {
      fh = await open(path, 'r');
    } catch (e) {
      const err = e as NodeJS.ErrnoException;
      if (err.code === 'ENOENT') throw new FormatError(path, 'no such file');
      if (err.code === 'EISDIR') throw new FormatError(path, 'is a directory, not a safetensors file');
      throw new FormatError(path, `cannot open: ${err.message}`);
    }
    try {
      const st = await fh.stat();
      if (st.isDirectory()) throw new FormatError(path, 'is a directory, not a safetensors file');
      if (!st.isFile()) throw new FormatError(path, 'is not a regular file');
      const size = st.size;
      if (size < 8) {
        throw new FormatError(path, `truncated: ${size} bytes, shorter than the 8-byte header length that starts a safetensors file`);
      }
      const lenBytes = new Uint8Array(8);
      await readExactly(fh, path, lenBytes, 0, 8, 0);
      const n = new DataView(lenBytes.buffer).getBigUint64(0, true);
      if (n > BigInt(MAX_HEADER_BYTES)) {
        throw new FormatError(path, `header length ${n} exceeds the ${MAX_HEADER_BYTES}-byte limit (not a safetensors file, or corrupt)`);
      }
      const headerLength = Number(n);
      if (8 + headerLength > size) {
        throw new FormatError(path, `header length ${headerLength} runs past the end of the file (${size} bytes): truncated or not a safetensors file`);
      }
      if (headerLength < 2) throw new FormatError(path, `header length ${headerLength} is too short to hold a JSON object`);
      const headerBytes = new Uint8Array(headerLength);
      await readExactly(fh, path, headerBytes, 0, headerLength, 8);
      let text: string;
      try {
        text = new TextDecoder('utf-8', { fatal: true }).decode(headerBytes);
      } catch {
        throw new FormatError(path, 'header is not valid UTF-8 (not a safetensors file, or corrupt)');
      }
      let header: unknown;
      try {
        header = JSON.parse(text);
      } catch (e) {
        throw new FormatError(path, `header is not valid JSON (${(e as Error).message}); not a safetensors file, or corrupt`);
      }
      if (typeof header !== 'object' || header === null || Array.isArray(header)) {
        throw new FormatError(path, 'header is not a JSON object');
      }
      const dataStart = 8 + headerLength;
      const dataLength = size - dataStart;
      const parsed = validateHeader(path, header as Record<string, unknown>, dataStart, dataLength, allowed);
      return new SafetensorsFile(path, fh, size, headerLength, dataStart, parsed.metadata, parsed.tensors, parsed.padding);
    } catch (e) {
      await fh.close().catch(() => undefined);
      throw e;
    }
  }

  /** Tensor names (padding excluded), in file order. */
  names(): string[] {
    return [...this.tensors.keys()];
  }

  has(name: string): boolean {
    return this.tensors.has(name);
  }

  /** The entry for `name`, or a FormatError naming the file and tensor. */
  info(name: string): TensorInfo {
    const t = this.tensors.get(name);
    if (!t) throw new FormatError(this.path, `no tensor named '${name}'`);
    return t;
  }

  /** The tensor's bytes, in one positioned read of just its range. The result owns a fresh buffer. */
  async readTensorBytes(name: string): Promise<Uint8Array> {
    const t = this.info(name);
    return this.readRange(name, 0, t.end - t.begin);
  }

  /** `length` bytes starting `offset` bytes into tensor `name`. */
  async readRange(name: string, offset: number, length: number): Promise<Uint8Array> {
    this.checkOpen();
    const t = this.info(name);
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > t.end - t.begin) {
      throw new SparseLlmError(`${this.path}: range [${offset}, ${offset + length}) is outside tensor '${name}' (${t.end - t.begin} bytes)`);
    }
    const out = new Uint8Array(length);
    await readExactly(this.fh, this.path, out, 0, length, t.begin + offset);
    return out;
  }

  /** Fills `target` with the bytes starting `offset` bytes into tensor `name` (no allocation). */
  async readInto(name: string, offset: number, target: Uint8Array): Promise<Uint8Array> {
    this.checkOpen();
    const t = this.info(name);
    const length = target.byteLength;
    if (!Number.isSafeInteger(offset) || offset < 0 || offset + length > t.end - t.begin) {
      throw new SparseLlmError(`${this.path}: range [${offset}, ${offset + length}) is outside tensor '${name}' (${t.end - t.begin} bytes)`);
    }
    await readExactly(this.fh, this.path, target, 0, length, t.begin + offset);
    return target;
  }

  /**
   * Streams tensor `name` in chunks of at most `chunkBytes` (rounded down to whole elements).
   * Each yielded array is freshly allocated.
   */
  async *chunks(name: string, chunkBytes = 16 << 20): AsyncGenerator<Uint8Array> {
    const t = this.info(name);
    const elem = SAFETENSORS_DTYPE_SIZES[t.dtype] ?? 1;
    const step = Math.max(elem, chunkBytes - (chunkBytes % elem));
    const total = t.end - t.begin;
    for (let off = 0; off < total; off += step) {
      yield await this.readRange(name, off, Math.min(step, total - off));
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.fh.close();
  }

  private checkOpen(): void {
    if (this.closed) throw new SparseLlmError(`${this.path}: read after close`);
  }
}

function validateHeader(
  file: string,
  header: Record<string, unknown>,
  dataStart: number,
  dataLength: number,
  allowed: readonly string[],
): { metadata: Record<string, string>; tensors: Map<string, TensorInfo>; padding: string[] } {
  const metadata: Record<string, string> = Object.create(null);
  const all: TensorInfo[] = [];
  for (const [name, raw] of Object.entries(header)) {
    if (name === '__metadata__') {
      if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) {
        throw new FormatError(file, '__metadata__ is not a JSON object of strings');
      }
      for (const [k, v] of Object.entries(raw as Record<string, unknown>)) {
        if (typeof v !== 'string') throw new FormatError(file, `__metadata__ entry '${k}' is not a string (safetensors metadata maps strings to strings)`);
        metadata[k] = v;
      }
      continue;
    }
    const where = `tensor '${name}'`;
    if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) throw new FormatError(file, `${where}: entry is not a JSON object`);
    const entry = raw as Record<string, unknown>;
    const { dtype, shape, data_offsets: offsets } = entry;
    if (typeof dtype !== 'string') throw new FormatError(file, `${where}: dtype missing or not a string`);
    const elem = SAFETENSORS_DTYPE_SIZES[dtype];
    if (elem === undefined) throw new FormatError(file, `${where} has dtype ${JSON.stringify(dtype)}, which is not a safetensors dtype`);
    if (isPad(name)) {
      if (dtype !== 'U8') throw new FormatError(file, `${where}: padding tensors (names starting '${PAD_PREFIX}') must have dtype U8, found ${dtype}`);
    } else if (!allowed.includes(dtype)) {
      throw new FormatError(file, `${where} has dtype ${dtype}, which sparsellm does not read (${describeDtypes(allowed)})`);
    }
    if (!Array.isArray(shape)) throw new FormatError(file, `${where}: shape missing or not an array`);
    let count = 1;
    for (const d of shape) {
      if (typeof d !== 'number' || !Number.isSafeInteger(d) || d < 0) {
        throw new FormatError(file, `${where}: shape ${JSON.stringify(shape)} has a dimension that is not a non-negative integer`);
      }
      count *= d;
      if (!Number.isSafeInteger(count)) throw new FormatError(file, `${where}: shape ${JSON.stringify(shape)} is too large`);
    }
    if (isPad(name) && shape.length !== 1) throw new FormatError(file, `${where}: padding tensors must be 1-D, found shape ${JSON.stringify(shape)}`);
    if (!Array.isArray(offsets) || offsets.length !== 2) throw new FormatError(file, `${where}: data_offsets missing or not a [begin, end] pair`);
    const [b, e] = offsets as unknown[];
    if (typeof b !== 'number' || typeof e !== 'number' || !Number.isSafeInteger(b) || !Number.isSafeInteger(e) || b < 0 || e < 0) {
      throw new FormatError(file, `${where}: data_offsets ${JSON.stringify(offsets)} are not non-negative integers`);
    }
    if (e < b) throw new FormatError(file, `${where}: data_offsets [${b}, ${e}] end before they begin`);
    if (e > dataLength) {
      throw new FormatError(file, `${where}: data_offsets [${b}, ${e}] are out of range: the data section has ${dataLength} bytes (truncated file?)`);
    }
    const bytes = count * elem;
    if (bytes !== e - b) {
      throw new FormatError(file, `${where}: shape ${JSON.stringify(shape)} × ${dtype} (${elem} bytes) is ${bytes} bytes, but data_offsets [${b}, ${e}] span ${e - b}`);
    }
    all.push({ name, dtype, shape: shape as number[], begin: dataStart + b, end: dataStart + e });
  }
  // Sorted by range, the tensors must tile the data section exactly.
  const sorted = [...all].sort((x, y) => x.begin - y.begin || x.end - y.end);
  let cursor = dataStart;
  let prev: TensorInfo | undefined;
  for (const t of sorted) {
    if (t.begin < cursor) {
      throw new FormatError(file, `tensor '${t.name}' (data_offsets [${t.begin - dataStart}, ${t.end - dataStart}]) overlaps tensor '${prev!.name}' (ending at ${cursor - dataStart})`);
    }
    if (t.begin > cursor) {
      const after = prev ? `after tensor '${prev.name}'` : 'at the start of the data section';
      throw new FormatError(file, `hole of ${t.begin - cursor} bytes ${after}, before tensor '${t.name}' (data_offsets [${t.begin - dataStart}, ${t.end - dataStart}])`);
    }
    cursor = t.end;
    prev = t;
  }
  if (cursor !== dataStart + dataLength) {
    const what = prev ? `after the last tensor '${prev.name}'` : 'with no tensors declared';
    throw new FormatError(file, `${dataStart + dataLength - cursor} bytes of data ${what} are not described by the header (corrupt, or trailing garbage)`);
  }
  const tensors = new Map<string, TensorInfo>();
  const padding: string[] = [];
  for (const t of sorted) {
    if (isPad(t.name)) padding.push(t.name);
    else tensors.set(t.name, t);
  }
  return { metadata, tensors, padding };
}

// ---------------------------------------------------------------------------------------------
// Writer

export interface TensorDecl {
  name: string;
  dtype: string;
  shape: readonly number[];
}

export interface WriterOptions {
  tensors: readonly TensorDecl[];
  metadata?: Readonly<Record<string, string>>;
  /**
   * Every tensor starts at a multiple of this many bytes from the start of the file (a power of
   * two; 1 = plain safetensors). Gaps are filled by U8 `__pad.<k>` tensors. The data section always
   * starts at a multiple of max(alignment, 8).
   */
  alignment?: number;
}

interface PlannedTensor {
  name: string;
  dtype: string;
  shape: number[];
  /** Relative to the data section. */
  begin: number;
  bytes: number;
  pad: boolean;
}

/** The header bytes and layout a writer would produce; exported for tools that need the plan. */
export function planSafetensors(options: WriterOptions): { header: Uint8Array; dataStart: number; size: number; tensors: PlannedTensor[] } {
  const alignment = options.alignment ?? 1;
  if (!Number.isSafeInteger(alignment) || alignment < 1 || (alignment & (alignment - 1)) !== 0) {
    throw new SparseLlmError(`safetensors writer: alignment must be a power of two, got ${alignment}`);
  }
  const seen = new Set<string>();
  const planned: PlannedTensor[] = [];
  let cursor = 0;
  let padIndex = 0;
  for (const d of options.tensors) {
    if (d.name === '__metadata__' || isPad(d.name) || d.name.length === 0) {
      throw new SparseLlmError(`safetensors writer: tensor name '${d.name}' is reserved`);
    }
    if (seen.has(d.name)) throw new SparseLlmError(`safetensors writer: tensor '${d.name}' declared twice`);
    seen.add(d.name);
    const elem = SAFETENSORS_DTYPE_SIZES[d.dtype];
    if (elem === undefined) throw new SparseLlmError(`safetensors writer: tensor '${d.name}' has unknown dtype ${d.dtype}`);
    let count = 1;
    for (const x of d.shape) {
      if (!Number.isSafeInteger(x) || x < 0) throw new SparseLlmError(`safetensors writer: tensor '${d.name}' has bad shape ${JSON.stringify(d.shape)}`);
      count *= x;
    }
    const bytes = count * elem;
    const misalign = cursor % alignment;
    if (misalign !== 0 && bytes > 0) {
      const n = alignment - misalign;
      planned.push({ name: `${PAD_PREFIX}${padIndex++}`, dtype: 'U8', shape: [n], begin: cursor, bytes: n, pad: true });
      cursor += n;
    }
    planned.push({ name: d.name, dtype: d.dtype, shape: [...d.shape], begin: cursor, bytes, pad: false });
    cursor += bytes;
  }
  const obj: Record<string, unknown> = Object.create(null);
  if (options.metadata && Object.keys(options.metadata).length > 0) {
    for (const [k, v] of Object.entries(options.metadata)) {
      if (typeof v !== 'string') throw new SparseLlmError(`safetensors writer: metadata '${k}' is not a string`);
    }
    obj.__metadata__ = options.metadata;
  }
  for (const t of planned) obj[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [t.begin, t.begin + t.bytes] };
  const json = new TextEncoder().encode(JSON.stringify(obj));
  const startAlign = Math.max(alignment, 8);
  const dataStart = Math.ceil((8 + json.length) / startAlign) * startAlign;
  const header = new Uint8Array(dataStart);
  new DataView(header.buffer).setBigUint64(0, BigInt(dataStart - 8), true);
  header.set(json, 8);
  header.fill(0x20, 8 + json.length);
  return { header, dataStart, size: dataStart + cursor, tensors: planned };
}

/**
 * Streams a safetensors file: all tensors are declared up front (so the header is written first),
 * then their bytes are written in declared order, in as many chunks as wanted. The file lives
 * under a temporary name in the destination directory until `finish()` renames it into place.
 */
export class SafetensorsWriter {
  private index = 0;
  private writtenInTensor = 0;
  private position: number;
  private state: 'open' | 'finished' | 'aborted' = 'open';
  private readonly order = new Map<string, number>();

  private constructor(
    readonly path: string,
    readonly tempPath: string,
    private readonly fh: FileHandle,
    private readonly plan: ReturnType<typeof planSafetensors>,
  ) {
    this.position = plan.dataStart;
    plan.tensors.forEach((t, i) => {
      if (!t.pad) this.order.set(t.name, i);
    });
  }

  /** Final size of the file in bytes. */
  get size(): number {
    return this.plan.size;
  }

  static async create(path: string, options: WriterOptions): Promise<SafetensorsWriter> {
    const plan = planSafetensors(options);
    const tempPath = join(dirname(path), `.${basename(path)}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`);
    let fh: FileHandle;
    try {
      fh = await open(tempPath, 'wx');
    } catch (e) {
      const err = e as NodeJS.ErrnoException;
      const dir = dirname(path);
      if (err.code === 'ENOENT') throw new SparseLlmError(`${path}: cannot write: directory ${dir} does not exist`);
      if (err.code === 'EACCES' || err.code === 'EPERM' || err.code === 'EROFS') throw new SparseLlmError(`${path}: cannot write: directory ${dir} is not writable`);
      if (err.code === 'ENOTDIR') throw new SparseLlmError(`${path}: cannot write: ${dir} is not a directory`);
      throw new SparseLlmError(`${path}: cannot write: ${err.message}`);
    }
    const writer = new SafetensorsWriter(path, tempPath, fh, plan);
    try {
      await writer.writeAt(plan.header, 0);
    } catch (e) {
      await writer.abort();
      throw e;
    }
    return writer;
  }

  /** Appends `bytes` to tensor `name`, which must be the current one in declared order. */
  async write(name: string, bytes: Uint8Array): Promise<void> {
    if (this.state !== 'open') throw new SparseLlmError(`${this.path}: write after ${this.state}`);
    await this.advanceTo(name);
    const t = this.plan.tensors[this.index];
    if (!t) throw new SparseLlmError(`${this.path}: tensor '${name}' written after all tensors were complete`);
    if (this.writtenInTensor + bytes.byteLength > t.bytes) {
      throw new SparseLlmError(`${this.path}: tensor '${name}' has ${t.bytes} bytes; writing ${bytes.byteLength} more after ${this.writtenInTensor} overflows it`);
    }
    await this.writeAt(bytes, this.position);
    this.position += bytes.byteLength;
    this.writtenInTensor += bytes.byteLength;
  }

  /** Checks every declared byte was written, fsyncs, closes and renames into place. */
  async finish(): Promise<void> {
    if (this.state !== 'open') throw new SparseLlmError(`${this.path}: finish after ${this.state}`);
    try {
      await this.skipCompleted();
      const t = this.plan.tensors[this.index];
      if (t) {
        throw new SparseLlmError(`${this.path}: tensor '${t.name}' is incomplete (${this.writtenInTensor} of ${t.bytes} bytes written)`);
      }
      if (this.position !== this.plan.size) throw new SparseLlmError(`${this.path}: internal error: wrote ${this.position} of ${this.plan.size} bytes`);
      await this.fh.sync();
      await this.fh.close();
      this.state = 'finished';
      await rename(this.tempPath, this.path);
    } catch (e) {
      await this.abort();
      throw e;
    }
  }

  /** Closes and removes the temporary file; the destination path is untouched. Safe to call twice. */
  async abort(): Promise<void> {
    if (this.state === 'open') {
      this.state = 'aborted';
      await this.fh.close().catch(() => undefined);
    }
    this.state = 'aborted';
    await unlink(this.tempPath).catch(() => undefined);
  }

  private async writeAt(bytes: Uint8Array, position: number): Promise<void> {
    let done = 0;
    while (done < bytes.byteLength) {
      const { bytesWritten } = await this.fh.write(bytes, done, bytes.byteLength - done, position + done);
      done += bytesWritten;
    }
  }

  /** Moves past completed tensors (writing padding) until the current tensor is `name`. */
  private async advanceTo(name: string): Promise<void> {
    const declared = this.order.get(name) ?? -1;
    if (declared < 0) throw new SparseLlmError(`${this.path}: tensor '${name}' was not declared`);
    if (declared < this.index) throw new SparseLlmError(`${this.path}: tensor '${name}' is already complete; write tensors in declared order`);
    for (;;) {
      const t = this.plan.tensors[this.index];
      if (!t) return;
      if (t.name === name && !t.pad) return;
      if (!t.pad && this.writtenInTensor < t.bytes) {
        throw new SparseLlmError(`${this.path}: tensor '${name}' written before tensor '${t.name}' was complete (${this.writtenInTensor} of ${t.bytes} bytes); write tensors in declared order`);
      }
      await this.step();
    }
  }

  private async skipCompleted(): Promise<void> {
    for (;;) {
      const t = this.plan.tensors[this.index];
      if (!t) return;
      if (!t.pad && this.writtenInTensor < t.bytes) return;
      await this.step();
    }
  }

  private async step(): Promise<void> {
    const t = this.plan.tensors[this.index]!;
    if (t.pad) {
      await this.writeAt(new Uint8Array(t.bytes), this.position);
      this.position += t.bytes;
    }
    this.index++;
    this.writtenInTensor = 0;
  }
}
