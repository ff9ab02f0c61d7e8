// Dense Hugging Face checkpoints: config.json + safetensors (single file or sharded), read onto a
// ModelSpec with canonical tensor names and orientation (see src/core/model/spec.ts).
//
// Accepted forms of `path`:
//   (a) a directory with config.json and model.safetensors
//   (b) a directory with config.json, model.safetensors.index.json and its shards (or the index
//       file itself; a directory holding exactly one other *.safetensors.index.json also works)
//   (c) a .safetensors file with config.json beside it
// Opening validates everything before returning: the containers, the shard index, the config, and
// that every tensor the spec needs is present, of a readable dtype and of the right shape. Tensors
// the spec does not need (rotary caches, attention-mask buffers) are ignored.

import { readFile, readdir, stat } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import { FormatError, ModelError, SparseLlmError } from '../errors.js';
import { decodeToF32, dtypeSize, isDType, type DType } from '../dtype.js';
import type { ModelSpec } from '../model/spec.js';
import { canonicalTensors } from '../model/canonical.js';
import { SafetensorsFile, SAFETENSORS_DTYPE_SIZES, DENSE_DTYPES } from './safetensors.js';
import { specFromConfig } from './config.js';
import { PREFIXES, PROBE, sourceOf, type Transform } from './hf-layout.js';

export type { Transform } from './hf-layout.js';

export interface SourceFile {
  path: string;
  bytes: number;
}

export interface CheckpointEntry {
  /** Canonical name. */
  name: string;
  /** Canonical shape (linear weights [out, in]). */
  shape: number[];
  /** Stored dtype. */
  dtype: DType;
  /** The safetensors file holding it. */
  file: string;
  /** Name in that file. */
  sourceName: string;
  /** Stored shape. */
  sourceShape: number[];
  transform: Transform;
}

export interface DenseCheckpoint {
  /** The path as given, resolved. */
  readonly path: string;
  readonly spec: ModelSpec;
  /** config.json, the shard index if any, then the safetensors files, with their sizes. */
  readonly sourceFiles: readonly SourceFile[];
  /** Canonical tensor names in canonicalTensors(spec) order. */
  tensorNames(): string[];
  entry(name: string): CheckpointEntry;
  /** The tensor in canonical orientation, widened to f32. */
  readF32(name: string): Promise<Float32Array>;
  /** The stored bytes of a tensor whose transform is identity (throws otherwise). */
  readRaw(name: string): Promise<Uint8Array>;
  /** The stored bytes of an identity-transform tensor, in chunks of at most `chunkBytes`. */
  rawChunks(name: string, chunkBytes?: number): AsyncGenerator<Uint8Array>;
  close(): Promise<void>;
}

const ALL_DTYPES = Object.keys(SAFETENSORS_DTYPE_SIZES);

async function statOrNull(p: string): Promise<Awaited<ReturnType<typeof stat>> | null> {
  try {
    return await stat(p);
  } catch {
    return null;
  }
}

async function readJson(path: string, what: string): Promise<unknown> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (e) {
    throw new FormatError(path, `cannot read ${what}: ${(e as Error).message}`);
  }
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new FormatError(path, `${what} is not valid JSON (${(e as Error).message})`);
  }
}

interface Layout {
  dir: string;
  configPath: string;
  /** The index file (sharded) or the single safetensors file: what errors about the whole set name. */
  main: string;
  index?: string;
  single?: string;
}

async function resolveLayout(path: string): Promise<Layout> {
  const st = await statOrNull(path);
  if (!st) throw new ModelError(path, 'no such file or directory');
  if (st.isDirectory()) {
    const dir = path;
    const configPath = join(dir, 'config.json');
    const index = join(dir, 'model.safetensors.index.json');
    const single = join(dir, 'model.safetensors');
    if (await statOrNull(index)) return { dir, configPath, main: index, index };
    if (await statOrNull(single)) return { dir, configPath, main: single, single };
    const names = await readdir(dir);
    const indexes = names.filter((n) => n.endsWith('.safetensors.index.json'));
    if (indexes.length === 1) {
      const idx = join(dir, indexes[0]!);
      return { dir, configPath, main: idx, index: idx };
    }
    const found = names.filter((n) => n.endsWith('.safetensors'));
    const hint = found.length > 0 ? ` (found ${found.slice(0, 5).join(', ')}: pass a .safetensors file's path to read it alone)` : '';
    throw new ModelError(dir, `not a Hugging Face checkpoint: no model.safetensors or model.safetensors.index.json${hint}`);
  }
  const dir = dirname(path);
  const configPath = join(dir, 'config.json');
  if (path.endsWith('.index.json')) return { dir, configPath, main: path, index: path };
  if (path.endsWith('.safetensors')) return { dir, configPath, main: path, single: path };
  throw new ModelError(path, 'not a checkpoint: expected a directory, a .safetensors file or a .safetensors.index.json file');
}

interface Located {
  file: SafetensorsFile;
}

class HfCheckpoint implements DenseCheckpoint {
  constructor(
    readonly path: string,
    readonly spec: ModelSpec,
    readonly sourceFiles: readonly SourceFile[],
    private readonly entries: Map<string, CheckpointEntry & { handle: SafetensorsFile }>,
    private readonly files: SafetensorsFile[],
  ) {}

  tensorNames(): string[] {
    return [...this.entries.keys()];
  }

  entry(name: string): CheckpointEntry {
    const { handle: _handle, ...e } = this.get(name);
    return e;
  }

  async readF32(name: string): Promise<Float32Array> {
    const e = this.get(name);
    const t = e.transform;
    switch (t.kind) {
      case 'identity':
        return decodeToF32(await e.handle.readTensorBytes(e.sourceName), e.dtype);
      case 'range': {
        const size = dtypeSize(e.dtype);
        return decodeToF32(await e.handle.readRange(e.sourceName, t.start * size, t.count * size), e.dtype);
      }
      case 'transpose': {
        const src = decodeToF32(await e.handle.readTensorBytes(e.sourceName), e.dtype);
        const [r, c] = e.sourceShape as [number, number];
        return transposeColumns(src, r, c, 0, c);
      }
      case 'columns-transpose': {
        const src = decodeToF32(await e.handle.readTensorBytes(e.sourceName), e.dtype);
        const [r, c] = e.sourceShape as [number, number];
        return transposeColumns(src, r, c, t.start, t.count);
      }
    }
  }

  async readRaw(name: string): Promise<Uint8Array> {
    const e = this.identityEntry(name);
    return e.handle.readTensorBytes(e.sourceName);
  }

  async *rawChunks(name: string, chunkBytes?: number): AsyncGenerator<Uint8Array> {
    const e = this.identityEntry(name);
    yield* e.handle.chunks(e.sourceName, chunkBytes);
  }

  async close(): Promise<void> {
    await Promise.all(this.files.map((f) => f.close()));
  }

  private get(name: string): CheckpointEntry & { handle: SafetensorsFile } {
    const e = this.entries.get(name);
    if (!e) throw new SparseLlmError(`${this.path}: no canonical tensor '${name}' in this ${this.spec.modelType} checkpoint`);
    return e;
  }

  private identityEntry(name: string): CheckpointEntry & { handle: SafetensorsFile } {
    const e = this.get(name);
    if (e.transform.kind !== 'identity') {
      throw new SparseLlmError(`${this.path}: tensor '${name}' is stored as '${e.sourceName}' and needs a ${e.transform.kind} to reach canonical form; use readF32`);
    }
    return e;
  }
}

/** Columns [start, start+count) of a row-major [r, c] matrix, transposed to [count, r]. */
function transposeColumns(src: Float32Array, r: number, c: number, start: number, count: number): Float32Array {
  const out = new Float32Array(count * r);
  for (let i = 0; i < r; i++) {
    const row = i * c + start;
    for (let j = 0; j < count; j++) out[j * r + i] = src[row + j]!;
  }
  return out;
}

const fmtShape = (s: readonly number[]): string => `[${s.join(', ')}]`;

/** Opens and validates a dense checkpoint; see the forms accepted at the top of this file. */
export async function openCheckpoint(path: string): Promise<DenseCheckpoint> {
  const resolved = resolve(path);
  const layout = await resolveLayout(resolved);
  if (!(await statOrNull(layout.configPath))) {
    throw new ModelError(layout.dir, `no config.json in ${layout.dir} (a checkpoint needs config.json beside its safetensors files)`);
  }
  const config = await readJson(layout.configPath, 'config.json');
  if (typeof config !== 'object' || config === null || Array.isArray(config)) throw new FormatError(layout.configPath, 'config.json is not a JSON object');
  const spec = specFromConfig(config as Record<string, unknown>, layout.configPath);

  const opened: SafetensorsFile[] = [];
  try {
    const located = new Map<string, Located>();
    const sourceFiles: SourceFile[] = [{ path: layout.configPath, bytes: (await stat(layout.configPath)).size }];
    if (layout.single) {
      const f = await SafetensorsFile.open(layout.single, { dtypes: ALL_DTYPES });
      opened.push(f);
      sourceFiles.push({ path: layout.single, bytes: f.size });
      for (const n of f.names()) located.set(n, { file: f });
    } else {
      const indexPath = layout.index!;
      sourceFiles.push({ path: indexPath, bytes: (await stat(indexPath)).size });
      const weightMap = await readIndex(indexPath);
      // Shards in name order, so sourceFiles (and any hash over them) do not depend on the index's order.
      const shards = new Map<string, SafetensorsFile>();
      for (const shard of [...new Set(weightMap.values())].sort()) {
        const shardPath = join(layout.dir, shard);
        if (!(await statOrNull(shardPath))) {
          const tensor = [...weightMap].find(([, s]) => s === shard)![0];
          throw new FormatError(indexPath, `weight_map puts tensor '${tensor}' in shard '${shard}', but ${shardPath} does not exist`);
        }
        const f = await SafetensorsFile.open(shardPath, { dtypes: ALL_DTYPES });
        opened.push(f);
        shards.set(shard, f);
        sourceFiles.push({ path: shardPath, bytes: f.size });
      }
      for (const [tensor, shard] of weightMap) {
        const f = shards.get(shard)!;
        if (!f.has(tensor)) {
          throw new FormatError(f.path, `tensor '${tensor}' is listed for this shard in ${basename(indexPath)} but is not in it`);
        }
        located.set(tensor, { file: f });
      }
    }

    const prefix = PREFIXES[spec.family].find((p) => located.has(p + PROBE[spec.family])) ?? PREFIXES[spec.family][0]!;
    if (!spec.tiedEmbeddings && !located.has('lm_head.weight')) spec.tiedEmbeddings = true;

    const entries = new Map<string, CheckpointEntry & { handle: SafetensorsFile }>();
    for (const t of canonicalTensors(spec)) {
      const src = sourceOf(spec, t.name, t.shape);
      const sourceName = src.prefixed ? prefix + src.name : src.name;
      const loc = located.get(sourceName);
      if (!loc) {
        throw new ModelError(layout.main, `tensor '${sourceName}' is missing (needed as ${t.name} ${fmtShape(t.shape)} by this ${spec.modelType} config)`);
      }
      const info = loc.file.info(sourceName);
      if (!isDType(info.dtype)) {
        throw new FormatError(loc.file.path, `tensor '${sourceName}' has dtype ${info.dtype}, which sparsellm does not read (${DENSE_DTYPES.join(', ')})`);
      }
      if (info.shape.length !== src.shape.length || info.shape.some((d, i) => d !== src.shape[i])) {
        throw new ModelError(loc.file.path, `tensor '${sourceName}' has shape ${fmtShape(info.shape)}, expected ${fmtShape(src.shape)} from config.json (canonical ${t.name})`);
      }
      entries.set(t.name, {
        name: t.name,
        shape: t.shape,
        dtype: info.dtype,
        file: loc.file.path,
        sourceName,
        sourceShape: info.shape,
        transform: src.transform,
        handle: loc.file,
      });
    }
    return new HfCheckpoint(resolved, spec, sourceFiles, entries, opened);
  } catch (e) {
    await Promise.all(opened.map((f) => f.close().catch(() => undefined)));
    throw e;
  }
}

/** The index's weight_map (tensor → shard file name), validated. */
async function readIndex(indexPath: string): Promise<Map<string, string>> {
  const index = await readJson(indexPath, 'shard index');
  if (typeof index !== 'object' || index === null || Array.isArray(index)) throw new FormatError(indexPath, 'shard index is not a JSON object');
  const wm = (index as Record<string, unknown>).weight_map;
  if (typeof wm !== 'object' || wm === null || Array.isArray(wm)) throw new FormatError(indexPath, 'shard index has no weight_map object');
  const out = new Map<string, string>();
  for (const [tensor, shard] of Object.entries(wm as Record<string, unknown>)) {
    if (typeof shard !== 'string' || shard.length === 0) throw new FormatError(indexPath, `weight_map entry for tensor '${tensor}' is not a file name`);
    if (shard.includes('/') || shard.includes('\\') || shard === '.' || shard === '..') {
      throw new FormatError(indexPath, `weight_map puts tensor '${tensor}' in '${shard}', which is not a plain file name in the checkpoint directory`);
    }
    out.set(tensor, shard);
  }
  if (out.size === 0) throw new FormatError(indexPath, 'weight_map is empty');
  return out;
}
