// The validating reader of packed models (docs/format.md section 6). `openPacked` reads the header
// only and checks every structural rule before anything trusts the file; tensor data is read on
// demand (positioned reads), so a model of any size opens in constant memory.
import { createHash } from 'node:crypto';
import { open } from 'node:fs/promises';
import { SafetensorsFile, type TensorInfo } from '../checkpoint/safetensors.js';
import { FormatError } from '../errors.js';
import type { DType } from '../dtype.js';
import type { ModelSpec } from '../model/spec.js';
import { toF32 } from './convert.js';
import { packedLayout, type PackedTensorDecl } from './layout.js';
import {
  ALIGNMENT,
  decodeMetadata,
  type PackedLayer,
  type Provenance,
  type StorageDType,
  type TokenizerInfo,
} from './metadata.js';

/** A tensor of a packed file: where its bytes are (absolute file offsets, for mmap) and what they hold. */
export interface PackedTensor {
  name: string;
  dtype: StorageDType | 'I32' | 'U8';
  shape: number[];
  /** Absolute file offset of the first byte (a multiple of 64). */
  offset: number;
  /** Length in bytes. */
  bytes: number;
}

/** Names of layer i's FFN tensors (docs/format.md 5.1, 5.2). */
export function ffnTensorNames(i: number) {
  const p = `layers.${i}.ffn.`;
  return { gate: p + 'gate', updown: p + 'updown', up: p + 'up', downT: p + 'down_t', upBias: p + 'up.bias', downBias: p + 'down.bias' };
}

const PACKED_DTYPES = ['BF16', 'F16', 'F32', 'I32', 'U8'] as const;

export class PackedModel {
  private constructor(
    private readonly file: SafetensorsFile,
    readonly spec: ModelSpec,
    readonly layers: readonly PackedLayer[],
    readonly storageDtype: StorageDType,
    readonly tokenizer: TokenizerInfo,
    readonly provenance: Provenance,
    private readonly layout: ReadonlyMap<string, PackedTensor>,
  ) {}

  /** Opens and validates `path` (header only). Throws FormatError naming the file and the tensor or key. */
  static async open(path: string): Promise<PackedModel> {
    const file = await SafetensorsFile.open(path, { dtypes: PACKED_DTYPES });
    try {
      const meta = decodeMetadata(path, file.metadata);
      const expected = packedLayout(meta.spec, meta.layers, meta.storageDtype, meta.tokenizer);
      const layout = checkTensors(path, file, expected);
      return new PackedModel(file, meta.spec, meta.layers, meta.storageDtype, meta.tokenizer, meta.provenance, layout);
    } catch (e) {
      await file.close();
      throw e;
    }
  }

  get path(): string {
    return this.file.path;
  }

  /** File size in bytes. */
  get fileSize(): number {
    return this.file.size;
  }

  /** Absolute offset of the data section (8 + header length; a multiple of 64). */
  get dataStart(): number {
    return this.file.dataStart;
  }

  /** Tensor names in file order (padding excluded). */
  tensorNames(): string[] {
    return [...this.layout.keys()];
  }

  has(name: string): boolean {
    return this.layout.has(name);
  }

  /** Where tensor `name` lies; FormatError when the file has no such tensor. */
  tensor(name: string): PackedTensor {
    const t = this.layout.get(name);
    if (!t) throw new FormatError(this.path, `no tensor named '${name}'`);
    return t;
  }

  /** The tensor's stored bytes (little-endian elements of its dtype). */
  async readBytes(name: string): Promise<Uint8Array> {
    this.tensor(name);
    return this.file.readTensorBytes(name);
  }

  /** `length` bytes starting `offset` bytes into tensor `name` (e.g. one neuron's updown block). */
  async readRange(name: string, offset: number, length: number): Promise<Uint8Array> {
    this.tensor(name);
    return this.file.readRange(name, offset, length);
  }

  /** Streams the tensor's bytes in chunks of at most `chunkBytes` (whole elements). */
  chunks(name: string, chunkBytes?: number): AsyncGenerator<Uint8Array> {
    this.tensor(name);
    return this.file.chunks(name, chunkBytes);
  }

  /** A floating-point tensor widened to f32 (exact). */
  async readF32(name: string): Promise<Float32Array> {
    const t = this.tensor(name);
    if (t.dtype === 'I32' || t.dtype === 'U8') throw new FormatError(this.path, `tensor '${name}' is ${t.dtype}, not a floating-point tensor`);
    return toF32(await this.readBytes(name), t.dtype as DType);
  }

  /** Layer i's neuron map (packed neuron → source neuron, checked), or null when the layer is not pruned. */
  async neuronMap(layer: number): Promise<Int32Array | null> {
    const name = this.layers[layer]?.neuronMap;
    if (name === undefined) throw new FormatError(this.path, `no layer ${layer} (the model has ${this.spec.nLayers})`);
    if (name === null) return null;
    const b = await this.readBytes(name);
    const map = new Int32Array(b.buffer, b.byteOffset, b.byteLength / 4);
    const sourceDFF = this.layers[layer]!.sourceDFF;
    for (let j = 0; j < map.length; j++) {
      const v = map[j]!;
      if (v < 0 || v >= sourceDFF || (j > 0 && v <= map[j - 1]!)) {
        throw new FormatError(this.path, `tensor '${name}': entry ${j} is ${v}; a neuron map must be strictly increasing source indices in [0, ${sourceDFF})`);
      }
    }
    return map;
  }

  /** The stored tokenizer.json bytes, or undefined when the model has none. */
  async tokenizerJson(): Promise<Uint8Array | undefined> {
    return this.tokenizer.kind === 'huggingface' ? this.readBytes(this.tokenizer.tensor) : undefined;
  }

  /** The stored tokenizer_config.json bytes, or undefined. */
  async tokenizerConfigJson(): Promise<Uint8Array | undefined> {
    return this.tokenizer.kind === 'huggingface' && this.tokenizer.config ? this.readBytes(this.tokenizer.config.tensor) : undefined;
  }

  /** Recomputes the SHA-256 of the data section and compares it with provenance.contentHash. */
  async verifyContentHash(onProgress?: (bytes: number) => void): Promise<{ ok: boolean; expected: string; actual: string }> {
    const hash = createHash('sha256');
    // The data section as stored (padding included): plain positioned reads of the byte range,
    // the next one in flight while the current one is hashed (two 8 MiB buffers).
    const fh = await open(this.path, 'r');
    let pending: Promise<Uint8Array> | undefined;
    try {
      const bufs = [new Uint8Array(8 << 20), new Uint8Array(8 << 20)];
      const readAt = async (pos: number, k: number) => {
        const { bytesRead } = await fh.read(bufs[k % 2]!, 0, Math.min(8 << 20, this.fileSize - pos), pos);
        if (bytesRead === 0) throw new FormatError(this.path, `file ended at byte ${pos} while hashing (changed while open?)`);
        return bufs[k % 2]!.subarray(0, bytesRead);
      };
      let pos = this.dataStart;
      let k = 0;
      pending = pos < this.fileSize ? readAt(pos, k) : undefined;
      while (pending) {
        const chunk = await pending;
        pos += chunk.byteLength;
        k++;
        pending = pos < this.fileSize ? readAt(pos, k) : undefined;
        pending?.catch(() => undefined); // surfaced when awaited
        hash.update(chunk);
        onProgress?.(chunk.byteLength);
      }
    } finally {
      await pending?.catch(() => undefined);
      await fh.close();
    }
    const actual = hash.digest('hex');
    const expected = this.provenance.contentHash.hex;
    return { ok: actual === expected, expected, actual };
  }

  async close(): Promise<void> {
    await this.file.close();
  }
}

/** Opens and validates a packed model (see PackedModel.open). */
export function openPacked(path: string): Promise<PackedModel> {
  return PackedModel.open(path);
}

function checkTensors(path: string, file: SafetensorsFile, expected: readonly PackedTensorDecl[]): Map<string, PackedTensor> {
  if (file.dataStart % ALIGNMENT !== 0) {
    throw new FormatError(path, `the data section starts at byte ${file.dataStart}, not a multiple of ${ALIGNMENT} (header not padded; not written by sparsellm)`);
  }
  const out = new Map<string, PackedTensor>();
  for (const e of expected) {
    const t: TensorInfo | undefined = file.tensors.get(e.name);
    if (!t) throw new FormatError(path, `tensor '${e.name}' is missing (the model metadata requires it)`);
    if (t.dtype !== e.dtype) throw new FormatError(path, `tensor '${e.name}' has dtype ${t.dtype}, expected ${e.dtype}`);
    if (t.shape.length !== e.shape.length || t.shape.some((x, i) => x !== e.shape[i])) {
      throw new FormatError(path, `tensor '${e.name}' has shape ${JSON.stringify(t.shape)}, expected ${JSON.stringify(e.shape)} for this model`);
    }
    if (t.end > t.begin && t.begin % ALIGNMENT !== 0) {
      throw new FormatError(path, `tensor '${e.name}' starts at file offset ${t.begin}, not a multiple of ${ALIGNMENT}`);
    }
    out.set(e.name, { name: e.name, dtype: e.dtype, shape: e.shape, offset: t.begin, bytes: t.end - t.begin });
  }
  if (file.tensors.size !== out.size) {
    const extra = file.names().filter((n) => !out.has(n));
    throw new FormatError(path, `unexpected tensor '${extra[0]}' (not part of packed format version 1 for this model)${extra.length > 1 ? ` and ${extra.length - 1} more` : ''}`);
  }
  return out;
}
