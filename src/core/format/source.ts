// A dense checkpoint (src/core/checkpoint) seen as the input of writePacked: canonical tensors in
// row chunks, provenance file names, and the tokenizer files that sit beside the config.
import { readFile, stat } from 'node:fs/promises';
import { basename, dirname, join, relative } from 'node:path';
import type { DenseCheckpoint } from '../checkpoint/dense.js';
import { SAFETENSORS_DTYPE_SIZES, SafetensorsFile } from '../checkpoint/safetensors.js';

/** The checkpoint reader accepted the file with any dtype on tensors it does not use; so do we. */
const ALL_DTYPES = Object.keys(SAFETENSORS_DTYPE_SIZES);
import { dtypeSize, type DType } from '../dtype.js';
import { FormatError } from '../errors.js';
import type { PackInput } from './writer.js';
import { neuronMapName } from './metadata.js';
import { readPruneSidecar } from '../prune/sidecar.js';

async function readIfFile(path: string): Promise<Uint8Array | null> {
  try {
    if (!(await stat(path)).isFile()) return null;
    return new Uint8Array(await readFile(path));
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw new FormatError(path, `cannot read: ${(e as Error).message}`);
  }
}

/** The directory holding the checkpoint's config.json (and its tokenizer files, if any). */
export function checkpointDir(ckpt: DenseCheckpoint): string {
  const config = ckpt.sourceFiles.find((f) => basename(f.path) === 'config.json');
  return config ? dirname(config.path) : dirname(ckpt.path);
}

/**
 * A stored tensor's bytes in chunks of `step` bytes, read ahead: while the consumer works on one
 * chunk the next is being read into a second buffer. Two buffers are reused throughout, so memory
 * stays at 2 × step whatever the tensor's size; a chunk is valid until the consumer asks for the
 * next one. The file is opened (and its header validated again) through the safetensors reader.
 */
async function* identityChunks(file: string, name: string, dtype: DType, total: number, step: number): AsyncGenerator<{ dtype: DType; bytes: Uint8Array }> {
  const f = await SafetensorsFile.open(file, { dtypes: ALL_DTYPES });
  try {
    const size = Math.min(step, total);
    const bufs = [new Uint8Array(size), new Uint8Array(total > size ? size : 0)];
    const read = (k: number) => f.readInto(name, k * step, bufs[k % 2]!.subarray(0, Math.min(step, total - k * step)));
    const chunks = Math.ceil(total / step);
    let pending = read(0);
    for (let k = 0; k < chunks; k++) {
      const bytes = await pending;
      if (k + 1 < chunks) {
        pending = read(k + 1);
        pending.catch(() => undefined); // surfaced when awaited; never an unhandled rejection
      }
      yield { dtype, bytes };
    }
  } finally {
    await f.close();
  }
}

/** Wraps an open dense checkpoint for writePacked. The checkpoint stays owned by the caller. */
export async function packInputFromCheckpoint(ckpt: DenseCheckpoint): Promise<PackInput> {
  const dir = checkpointDir(ckpt);
  const json = await readIfFile(join(dir, 'tokenizer.json'));
  const config = json ? await readIfFile(join(dir, 'tokenizer_config.json')) : null;
  const names = new Set(ckpt.tensorNames());
  // A checkpoint pruned by `sparsellm prune` keeps its neuron maps and thresholds (sparsellm_prune.json).
  const sidecar = await readPruneSidecar(dir, ckpt.spec);
  const pruned = sidecar
    ? {
        layers: sidecar.layers.map((l, i) => ({
          dFF: ckpt.spec.dFF[i]!,
          sourceDFF: l.sourceDFF,
          activation: ckpt.spec.activation,
          twell: null,
          neuronMap: l.neuronMap ? neuronMapName(i) : null,
          threshold: l.threshold,
          calibration: null,
        })),
        neuronMap: (i: number) => Int32Array.from(sidecar.layers[i]!.neuronMap ?? []),
      }
    : {};
  return {
    ...pruned,
    spec: ckpt.spec,
    path: ckpt.path,
    sourceFiles: ckpt.sourceFiles.map((f) => ({ name: relative(dir, f.path) || basename(f.path), bytes: f.bytes })),
    tokenizer: json ? { kind: 'huggingface', json, config } : { kind: 'none' },
    describe(name: string) {
      if (!names.has(name)) return undefined;
      const e = ckpt.entry(name);
      return { dtype: e.dtype, shape: e.shape };
    },
    async *rowChunks(name: string, rows: number) {
      const e = ckpt.entry(name);
      const nRows = e.shape.length === 0 ? 1 : e.shape[0]!;
      const rowElems = e.shape.length <= 1 ? 1 : e.shape.slice(1).reduce((a, b) => a * b, 1);
      const step = Math.max(1, Math.min(rows, nRows));
      if (e.transform.kind === 'identity') {
        const dtype: DType = e.dtype;
        if (nRows * rowElems === 0) return;
        yield* identityChunks(e.file, e.sourceName, dtype, nRows * rowElems * dtypeSize(dtype), step * rowElems * dtypeSize(dtype));
        return;
      }
      // Reordered in the source (GPT-2 Conv1D / fused qkv): the whole tensor as exact f32 values.
      const all = await ckpt.readF32(name);
      const bytes = new Uint8Array(all.buffer, all.byteOffset, all.byteLength);
      const rowBytes = rowElems * 4;
      for (let r = 0; r < nRows; r += step) {
        yield { dtype: 'F32' as DType, bytes: bytes.subarray(r * rowBytes, Math.min(nRows, r + step) * rowBytes) };
      }
    },
  };
}
