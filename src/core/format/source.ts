// A dense checkpoint (src/core/checkpoint) seen as the input of writePacked: canonical tensors in
// row chunks, provenance file names, and the tokenizer files that sit beside the config.
import { readFile, stat } from 'node:fs/promises';
import { basename, dirname, join, relative } from 'node:path';
import type { DenseCheckpoint } from '../checkpoint/dense.js';
import { dtypeSize, type DType } from '../dtype.js';
import { FormatError } from '../errors.js';
import type { PackInput } from './writer.js';

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

/** Wraps an open dense checkpoint for writePacked. The checkpoint stays owned by the caller. */
export async function packInputFromCheckpoint(ckpt: DenseCheckpoint): Promise<PackInput> {
  const dir = checkpointDir(ckpt);
  const json = await readIfFile(join(dir, 'tokenizer.json'));
  const config = json ? await readIfFile(join(dir, 'tokenizer_config.json')) : null;
  const names = new Set(ckpt.tensorNames());
  return {
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
        for await (const bytes of ckpt.rawChunks(name, step * rowElems * dtypeSize(dtype))) yield { dtype, bytes };
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
