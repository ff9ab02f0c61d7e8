// writePacked: a dense checkpoint → a packed .sllm file (docs/format.md), streamed with bounded
// memory. Plain tensors go through in row chunks; each FFN layer holds at most its W_down (source
// dtype) in memory while the kernel-layout blocks are written. The file lives under a temporary
// name until complete (SafetensorsWriter), and is removed on any error, SIGINT or SIGTERM.
// Conversions, the W_down transpose and the up/down interleave run in the native addon when it is
// built (./native-convert.ts; the JavaScript of ./convert.ts otherwise, with identical bytes), into
// a small pool of output buffers whose writes proceed while the next chunk is read and converted.
import { createHash, type Hash } from 'node:crypto';
import { constants as fsConstants, unlinkSync } from 'node:fs';
import { access, open, readdir, stat, unlink } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import { planSafetensors, SafetensorsWriter, type TensorDecl } from '../checkpoint/safetensors.js';
import { dtypeSize, type DType } from '../dtype.js';
import { ModelError, SparseLlmError } from '../errors.js';
import type { ModelSpec } from '../model/spec.js';
import { convertBytes, interleaveUpDown, Scratch, transposeBlock } from './convert.js';
import { nativeConvert, type NativeConvert } from './native-convert.js';
import { packedLayout, type PackedTensorDecl } from './layout.js';
import {
  ALIGNMENT,
  decodeMetadata,
  denseLayers,
  encodeMetadata,
  type PackedLayer,
  type PackedMetadata,
  type SourceFile,
  type StorageDType,
  type TokenizerInfo,
} from './metadata.js';

/**
 * What packing needs from a dense checkpoint: the spec, and the canonical tensors (names and
 * orientation of src/core/model/spec.ts) as raw bytes in their source dtype, by row ranges.
 */
export interface PackInput {
  spec: ModelSpec;
  /** Where the checkpoint came from (printed in errors). */
  path: string;
  /** Source dtype and canonical shape of a canonical tensor, or undefined when absent. */
  describe(name: string): { dtype: DType; shape: readonly number[] } | undefined;
  /**
   * The canonical tensor's elements in order, in chunks of whole rows (a "row" is one index of the
   * first dimension; a 1-D tensor's rows are its elements), exactly `rows` rows per chunk except
   * the last (`rows` may exceed the row count: then one chunk). Each
   * chunk is little-endian in its own dtype: the source dtype, or F32 holding the exact source
   * values when the source needed reordering (GPT-2's transposed and fused weights).
   */
  rowChunks(name: string, rows: number): AsyncIterable<{ dtype: DType; bytes: Uint8Array }>;
  /** Files read (relative names, sizes) for provenance. */
  sourceFiles: SourceFile[];
  /** Tokenizer files found with the checkpoint. */
  tokenizer: { kind: 'huggingface'; json: Uint8Array; config: Uint8Array | null } | { kind: 'byte' } | { kind: 'none' };
  /** Per-layer FFN entries of a pruned / calibrated model (sparsellm prune); default: dense layers. */
  layers?: readonly PackedLayer[];
  /** Layer i's neuron map (packed neuron → source neuron), for each layer whose entry names one. */
  neuronMap?(layer: number): Int32Array;
}

export interface WritePackedOptions {
  /** Storage dtype of the matrices (default BF16). */
  dtype?: StorageDType;
  /** Replace an existing file at the output path. */
  force?: boolean;
  /** Called with the number of bytes just written (the total is WritePackedResult.bytesOut / plan). */
  onProgress?: (bytes: number) => void;
  /** Called once, before any data is written, with the final file size. */
  onStart?: (totalBytes: number) => void;
  /** Aborts the write (the temporary file is removed). */
  signal?: AbortSignal;
  /** Bytes of f32 values per chunk (default 4 MiB): bounds the memory of one step. */
  chunkBytes?: number;
  /** Output buffers whose writes may be queued while the next chunk is prepared (default 3, min 1). */
  writeDepth?: number;
  /** Use the JavaScript conversions even when the native addon is built (tests, comparisons). */
  javascriptOnly?: boolean;
  /** The tool version recorded in the provenance. */
  toolVersion?: string;
}

export interface WritePackedResult {
  path: string;
  storageDtype: StorageDType;
  /** Tensors written, padding excluded. */
  tensors: number;
  bytesOut: number;
  /** Sum of the source files' sizes. */
  bytesIn: number;
  contentHash: string;
}

/** Thrown when a write is interrupted by a signal or an AbortSignal. */
export class InterruptedError extends SparseLlmError {
  override readonly exitCode = 130;
}

const HASH_PLACEHOLDER = '0'.repeat(64);
const TMP_MARK = '.tmp-';

/** Output checks before any work: directory exists and is writable, target free unless force. */
export async function checkOutputPath(outPath: string, force: boolean): Promise<void> {
  const dir = dirname(resolve(outPath));
  let st;
  try {
    st = await stat(dir);
  } catch {
    throw new SparseLlmError(`${outPath}: output directory ${dir} does not exist`);
  }
  if (!st.isDirectory()) throw new SparseLlmError(`${outPath}: ${dir} is not a directory`);
  try {
    await access(dir, fsConstants.W_OK);
  } catch {
    throw new SparseLlmError(`${outPath}: output directory ${dir} is not writable`);
  }
  let existing;
  try {
    existing = await stat(outPath);
  } catch {
    return;
  }
  if (existing.isDirectory()) throw new SparseLlmError(`${outPath}: is a directory; give a file name for the packed model`);
  if (!force) throw new SparseLlmError(`${outPath}: already exists (use --force to overwrite)`);
}

/** Removes temporary files a killed pack left for this output (their process no longer runs). */
async function removeStaleTemps(outPath: string): Promise<void> {
  const dir = dirname(resolve(outPath));
  const prefix = `.${basename(outPath)}${TMP_MARK}`;
  let names: string[];
  try {
    names = await readdir(dir);
  } catch {
    return;
  }
  for (const n of names) {
    if (!n.startsWith(prefix)) continue;
    const pid = Number(n.slice(prefix.length).split('-')[0]);
    if (!Number.isInteger(pid) || pid <= 0 || pid === process.pid) continue;
    try {
      process.kill(pid, 0);
      continue; // still running: another pack in progress
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'EPERM') continue;
    }
    await unlink(join(dir, n)).catch(() => undefined);
  }
}

/** The packed metadata for `input` (content hash left as a placeholder). */
export function packedMetadataFor(input: PackInput, storageDtype: StorageDType, toolVersion: string): PackedMetadata {
  const spec: ModelSpec = { ...input.spec, dFF: [...input.spec.dFF] };
  const tok = input.tokenizer;
  const tokenizer: TokenizerInfo =
    tok.kind === 'huggingface'
      ? {
          kind: 'huggingface',
          tensor: 'tokenizer.json',
          bytes: tok.json.byteLength,
          config: tok.config ? { tensor: 'tokenizer_config.json', bytes: tok.config.byteLength } : null,
        }
      : { kind: tok.kind };
  return {
    storageDtype,
    spec,
    layers: input.layers ? input.layers.map((l) => ({ ...l })) : denseLayers(spec),
    tokenizer,
    provenance: {
      tool: 'sparsellm',
      toolVersion,
      createdAt: new Date().toISOString(),
      sourceFiles: input.sourceFiles.map((f) => ({ ...f })),
      contentHash: { algorithm: 'sha256', hex: HASH_PLACEHOLDER },
    },
  };
}

/** Canonical names and shapes the packed layout reads from, checked before writing anything. */
function checkInput(input: PackInput, layout: readonly PackedTensorDecl[]): void {
  const spec = input.spec;
  const need = (name: string, shape: number[]) => {
    const t = input.describe(name);
    if (!t) throw new ModelError(input.path, `tensor '${name}' is missing`);
    if (t.shape.length !== shape.length || t.shape.some((x, i) => x !== shape[i])) {
      throw new ModelError(input.path, `tensor '${name}' has shape ${JSON.stringify(t.shape)}, expected ${JSON.stringify(shape)} from the config`);
    }
  };
  for (const t of layout) {
    const s = t.source;
    const d = spec.dModel;
    if (s.kind === 'copy') need(s.canonical, t.shape);
    else if (s.kind === 'gate') need(`layers.${s.layer}.ffn.gate.weight`, [spec.dFF[s.layer]!, d]);
    else if (s.kind === 'up') need(`layers.${s.layer}.ffn.up.weight`, [spec.dFF[s.layer]!, d]);
    else if (s.kind === 'down_t') need(`layers.${s.layer}.ffn.down.weight`, [d, spec.dFF[s.layer]!]);
    else if (s.kind === 'updown') {
      need(`layers.${s.layer}.ffn.up.weight`, [spec.dFF[s.layer]!, d]);
      need(`layers.${s.layer}.ffn.down.weight`, [d, spec.dFF[s.layer]!]);
    }
  }
}

/**
 * Packs `input` into `outPath`. Never holds the model in memory: at most one chunk of a plain
 * tensor, or one layer's W_down plus one block of neurons. The output appears at `outPath` only
 * when complete; on error, abort or SIGINT/SIGTERM the temporary file is removed.
 */
export async function writePacked(input: PackInput, outPath: string, options: WritePackedOptions = {}): Promise<WritePackedResult> {
  const storage = options.dtype ?? 'BF16';
  const chunkBytes = Math.max(64, options.chunkBytes ?? 4 << 20);
  await checkOutputPath(outPath, !!options.force);
  const meta = packedMetadataFor(input, storage, options.toolVersion ?? 'unknown');
  const layout = packedLayout(meta.spec, meta.layers, storage, meta.tokenizer);
  checkInput(input, layout);

  const decls: TensorDecl[] = layout.map((t) => ({ name: t.name, dtype: t.dtype, shape: t.shape }));
  const metadata = encodeMetadata(meta);
  // Never write what the reader would refuse: the metadata goes through the validating decoder.
  try {
    decodeMetadata(outPath, metadata);
  } catch (e) {
    throw new SparseLlmError(`internal error: the packed metadata for ${input.path} does not validate: ${(e as Error).message}`);
  }
  const plan = planSafetensors({ tensors: decls, metadata, alignment: ALIGNMENT });
  const placeholderAt = findPlaceholder(plan.header);
  await removeStaleTemps(outPath);
  let writer: SafetensorsWriter;
  try {
    writer = await SafetensorsWriter.create(outPath, { tensors: decls, metadata, alignment: ALIGNMENT });
  } catch (e) {
    const err = e as NodeJS.ErrnoException;
    if (!err.code) throw e;
    throw new SparseLlmError(`${outPath}: output directory ${dirname(resolve(outPath))} is not writable (${err.code}: cannot create a file there)`);
  }
  if (writer.size !== plan.size) {
    await writer.abort();
    throw new SparseLlmError(`${outPath}: internal error: writer plan differs from the expected layout`);
  }

  // Signals: remove the temporary file synchronously, then let the signal do what it would have.
  let interrupted: string | undefined;
  const onSignal = (sig: NodeJS.Signals) => {
    interrupted = sig;
    void writer.abort();
    try {
      // abort() unlinks asynchronously; make sure nothing is left if the process dies right now.
      unlinkSync(writer.tempPath);
    } catch {
      /* already gone */
    }
    process.removeListener('SIGINT', onSignal);
    process.removeListener('SIGTERM', onSignal);
    if (process.listenerCount(sig) === 0) process.kill(process.pid, sig);
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);

  const hash = createHash('sha256');
  const planned = plan.tensors;
  const pipe = new WritePipeline(writer, Math.max(1, options.writeDepth ?? 3));
  let next = 0; // index into plan.tensors of the next entry to account for in the hash
  const check = () => {
    if (interrupted) throw new InterruptedError(`${outPath}: interrupted by ${interrupted}; nothing was written`);
    if (options.signal?.aborted) throw new InterruptedError(`${outPath}: aborted; nothing was written`);
  };
  // Queues `bytes` (a buffer from pipe.acquire, untouched until its write completes) for tensor `name`.
  const submit = (name: string, bytes: Uint8Array) => {
    check();
    // Padding before this tensor is written by the writer as zeros: hash it the same way.
    while (planned[next] && planned[next]!.name !== name) {
      const p = planned[next]!;
      if (p.pad) {
        hash.update(new Uint8Array(p.bytes));
        options.onProgress?.(p.bytes);
      }
      next++;
    }
    if (!planned[next]) throw new SparseLlmError(`${outPath}: internal error: tensor '${name}' written out of order`);
    hash.update(bytes);
    pipe.submit(name, bytes);
    options.onProgress?.(bytes.byteLength);
  };
  const out: Out = {
    native: options.javascriptOnly ? undefined : nativeConvert(),
    acquire: async (bytes: number) => {
      check();
      return pipe.acquire(bytes);
    },
    submit,
    // Bytes the caller may reuse: copied into a pipeline buffer first.
    emit: async (name: string, bytes: Uint8Array) => {
      const buf = await out.acquire(bytes.byteLength);
      buf.set(bytes);
      submit(name, buf);
    },
  };

  try {
    options.onStart?.(plan.size);
    for (const t of layout) await writeTensor(input, t, meta, storage, chunkBytes, out);
    await pipe.drain();
    const hex = hash.digest('hex');
    // Patch the placeholder in the header of the temporary file, then fsync + rename (finish).
    const fh = await open(writer.tempPath, 'r+');
    try {
      await fh.write(Buffer.from(hex, 'ascii'), 0, 64, placeholderAt);
    } finally {
      await fh.close();
    }
    if (interrupted) throw new InterruptedError(`${outPath}: interrupted by ${interrupted}; nothing was written`);
    await writer.finish();
    const bytesIn = input.sourceFiles.reduce((a, f) => a + f.bytes, 0);
    return { path: outPath, storageDtype: storage, tensors: layout.length, bytesOut: plan.size, bytesIn, contentHash: hex };
  } catch (e) {
    await pipe.settle();
    await writer.abort();
    throw e;
  } finally {
    process.removeListener('SIGINT', onSignal);
    process.removeListener('SIGTERM', onSignal);
  }
}

function findPlaceholder(header: Uint8Array): number {
  const needle = Buffer.from(`hex\\":\\"${HASH_PLACEHOLDER}`, 'utf8');
  const at = Buffer.from(header.buffer, header.byteOffset, header.byteLength).lastIndexOf(needle);
  if (at < 0) throw new SparseLlmError('internal error: content hash placeholder not found in the header');
  return at + needle.length - 64;
}

/**
 * Writes in file order with at most `depth` output buffers: a buffer handed to submit() is written
 * in the background (writes stay sequential, one after the other) while the caller prepares the
 * next one; acquire() waits for the oldest write when all buffers are busy. A failed write is
 * rethrown by the next acquire() or by drain().
 */
class WritePipeline {
  private readonly free: ArrayBuffer[] = [];
  private readonly busy: { buffer: ArrayBuffer; done: Promise<void> }[] = [];
  private tail: Promise<void> = Promise.resolve();
  private failed: { error: unknown } | undefined;

  constructor(
    private readonly writer: SafetensorsWriter,
    private readonly depth: number,
  ) {}

  async acquire(bytes: number): Promise<Uint8Array> {
    this.rethrow();
    while (this.free.length === 0 && this.busy.length >= this.depth) {
      const oldest = this.busy.shift()!;
      await oldest.done;
      this.free.push(oldest.buffer);
      this.rethrow();
    }
    let buffer = this.free.pop();
    // 8-byte aligned (a fresh ArrayBuffer), reused whole: any element type can be written into it.
    if (!buffer || buffer.byteLength < bytes) buffer = new ArrayBuffer(Math.max(bytes, 64));
    return new Uint8Array(buffer, 0, bytes);
  }

  submit(name: string, bytes: Uint8Array): void {
    const done = this.tail
      .then(() => (this.failed ? undefined : this.writer.write(name, bytes)))
      .catch((e: unknown) => {
        this.failed ??= { error: e };
      });
    this.tail = done;
    this.busy.push({ buffer: bytes.buffer as ArrayBuffer, done });
  }

  /** Waits for every queued write; throws the first failure. */
  async drain(): Promise<void> {
    await this.tail;
    this.busy.length = 0;
    this.rethrow();
  }

  /** Waits for queued writes to end, ignoring failures (before aborting the file). */
  async settle(): Promise<void> {
    await this.tail;
  }

  private rethrow(): void {
    if (this.failed) throw this.failed.error;
  }
}

/** Where writeTensor puts its bytes. */
interface Out {
  /** The addon's conversions, or undefined for the JavaScript path. */
  native: NativeConvert | undefined;
  /** A buffer of `bytes` bytes to fill and submit (aligned for any element type). */
  acquire(bytes: number): Promise<Uint8Array>;
  /** Queues a buffer from acquire() for tensor `name` (the next bytes of the file). */
  submit(name: string, bytes: Uint8Array): void;
  /** Copies bytes the caller keeps into a buffer and queues it. */
  emit(name: string, bytes: Uint8Array): Promise<void>;
}

async function writeTensor(input: PackInput, t: PackedTensorDecl, meta: PackedMetadata, storage: StorageDType, chunkBytes: number, out: Out): Promise<void> {
  const s = t.source;
  switch (s.kind) {
    case 'copy':
      return copyRows(input, s.canonical, t.name, t.dtype as DType, chunkBytes, out);
    case 'gate':
      return copyRows(input, `layers.${s.layer}.ffn.gate.weight`, t.name, storage, chunkBytes, out);
    case 'up':
      return copyRows(input, `layers.${s.layer}.ffn.up.weight`, t.name, storage, chunkBytes, out);
    case 'down_t':
    case 'updown':
      return writeNeuronMajor(input, s.layer, s.kind, t.name, meta.spec, storage, chunkBytes, out);
    case 'tokenizer': {
      const tok = input.tokenizer;
      if (tok.kind !== 'huggingface') throw new SparseLlmError('internal error: tokenizer tensor without a tokenizer');
      return out.emit(t.name, t.name === 'tokenizer.json' ? tok.json : tok.config!);
    }
    case 'neuron_map': {
      if (!input.neuronMap) throw new SparseLlmError(`internal error: dense packing has no neuron map (${t.name})`);
      const map = input.neuronMap(s.layer);
      if (map.length !== t.shape[0]) throw new SparseLlmError(`internal error: neuron map of layer ${s.layer} has ${map.length} entries, expected ${t.shape[0]}`);
      return out.emit(t.name, new Uint8Array(map.buffer, map.byteOffset, map.byteLength));
    }
  }
}

/** Streams a canonical tensor in row chunks, converting to `to`. */
async function copyRows(input: PackInput, canonical: string, outName: string, to: DType, chunkBytes: number, out: Out): Promise<void> {
  const src = input.describe(canonical)!;
  const rowElems = src.shape.length <= 1 ? 1 : src.shape.slice(1).reduce((a, b) => a * b, 1);
  const step = Math.max(1, Math.floor(chunkBytes / Math.max(1, rowElems * 4)));
  const native = out.native;
  if (!native) {
    const scratch = new Scratch();
    for await (const c of input.rowChunks(canonical, step)) await out.emit(outName, convertBytes(c.bytes, c.dtype, to, scratch));
    return;
  }
  for await (const c of input.rowChunks(canonical, step)) {
    const buf = await out.acquire((c.bytes.byteLength / dtypeSize(c.dtype)) * dtypeSize(to));
    out.submit(outName, native.convertInto(c.bytes, c.dtype, to, buf));
  }
}

/** All of a canonical tensor, as bytes of one dtype. */
async function readWhole(input: PackInput, name: string): Promise<{ dtype: DType; bytes: Uint8Array }> {
  const parts: { dtype: DType; bytes: Uint8Array }[] = [];
  for await (const c of input.rowChunks(name, Number.MAX_SAFE_INTEGER)) parts.push(c);
  if (parts.length === 1) return parts[0]!;
  const dtype = parts[0]?.dtype ?? input.describe(name)!.dtype;
  const bytes = new Uint8Array(parts.reduce((a, p) => a + p.bytes.byteLength, 0));
  let at = 0;
  for (const p of parts) {
    bytes.set(convertBytes(p.bytes, p.dtype, dtype), at);
    at += p.bytes.byteLength;
  }
  return { dtype, bytes };
}

/**
 * updown (gated): for neuron j, W_up[j, :] then W_down[:, j]; down_t (non-gated): W_down[:, j].
 * W_down [d, F] is read whole (one layer's matrix, source dtype), then written in neuron blocks.
 */
async function writeNeuronMajor(
  input: PackInput,
  layer: number,
  kind: 'updown' | 'down_t',
  outName: string,
  spec: ModelSpec,
  storage: StorageDType,
  chunkBytes: number,
  out: Out,
): Promise<void> {
  const d = spec.dModel;
  const F = spec.dFF[layer]!;
  const down = await readWhole(input, `layers.${layer}.ffn.down.weight`);
  const perNeuron = (kind === 'updown' ? 2 : 1) * d * 4;
  const block = Math.max(1, Math.floor(chunkBytes / perNeuron));
  const scratch = new Scratch();
  const elemIn = dtypeSize(down.dtype);
  const elemOut = dtypeSize(storage);
  const upChunks = kind === 'updown' ? input.rowChunks(`layers.${layer}.ffn.up.weight`, block)[Symbol.asyncIterator]() : undefined;
  const native = out.native;
  try {
    for (let j = 0; j < F; j += block) {
      const j1 = Math.min(F, j + block);
      const n = j1 - j;
      if (native) {
        let up: { bytes: Uint8Array; dtype: DType } | null = null;
        if (upChunks) {
          const next = await upChunks.next();
          if (next.done) throw new SparseLlmError(`${input.path}: internal error: W_up of layer ${layer} ended early`);
          up = next.value;
          if (up.bytes.byteLength !== n * d * dtypeSize(up.dtype)) throw new SparseLlmError(`${input.path}: internal error: W_up chunk of layer ${layer} has the wrong size`);
        }
        const buf = await out.acquire((up ? 2 : 1) * n * d * elemOut);
        out.submit(outName, native.packNeuronBlock(down.bytes, down.dtype, d, F, j, n, up, storage, buf));
        continue;
      }
      const t = transposeBlock(down.bytes, d, F, j, j1, elemIn, scratch.get('transpose', n * d * elemIn));
      const colsT = convertBytes(t, down.dtype, storage, scratch, 'down');
      if (!upChunks) {
        await out.emit(outName, colsT);
        continue;
      }
      const next = await upChunks.next();
      if (next.done) throw new SparseLlmError(`${input.path}: internal error: W_up of layer ${layer} ended early`);
      const up = convertBytes(next.value.bytes, next.value.dtype, storage, scratch, 'up');
      await out.emit(outName, interleaveUpDown(up, colsT, n, d, elemOut, scratch.get('updown', 2 * n * d * elemOut)));
    }
  } finally {
    await upChunks?.return?.(undefined);
  }
}
