// The model being pruned, whatever its form: a dense Hugging Face checkpoint (possibly pruned
// before, with its sparsellm_prune.json) or a packed .sllm model. Gives the spec, the canonical
// tensors as f32 (src/core/model/spec.ts names and orientation), and per layer the neuron map
// back to the original model and the stored activation threshold, so that a second prune
// composes with the first.
import { readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { openCheckpoint, type DenseCheckpoint } from '../checkpoint/index.js';
import { FormatError } from '../errors.js';
import { openPacked, type PackedModel } from '../format/reader.js';
import { checkpointDir, packInputFromCheckpoint } from '../format/source.js';
import type { PackInput } from '../format/writer.js';
import type { StorageDType } from '../format/metadata.js';
import type { ModelSpec } from '../model/spec.js';
import { canonicalTensors } from '../model/canonical.js';

/** The sidecar a pruned dense checkpoint carries (beside config.json). */
export const PRUNE_SIDECAR = 'sparsellm_prune.json';
export const PRUNE_SIDECAR_FORMAT = 'sparsellm-prune';

export interface SidecarLayer {
  /** Width of the layer in the original (never pruned) model. */
  sourceDFF: number;
  /** Kept neuron j is original neuron neuronMap[j]; null: identity. */
  neuronMap: number[] | null;
  /** Activation cut-off (|act| <= threshold is inactive); null: none. */
  threshold: number | null;
}

export interface PruneSidecar {
  format: typeof PRUNE_SIDECAR_FORMAT;
  version: 1;
  layers: SidecarLayer[];
}

/** The per-layer pruning state of a model. */
export interface LayerState {
  dFF: number;
  sourceDFF: number;
  /** Current neuron j → original neuron; null: identity (dFF = sourceDFF). */
  neuronMap: Int32Array | null;
  threshold: number | null;
}

export interface PruneSource {
  readonly kind: 'dense' | 'packed';
  readonly path: string;
  readonly spec: ModelSpec;
  readonly layers: readonly LayerState[];
  /** Storage dtype of a packed source. */
  readonly storageDtype?: StorageDType;
  /** Canonical names of the model's tensors. */
  readonly names: readonly string[];
  shape(name: string): readonly number[];
  readF32(name: string): Promise<Float32Array>;
  /** Tokenizer files and provenance names for packing (from the source). */
  packBase(): Promise<Pick<PackInput, 'tokenizer' | 'sourceFiles'>>;
  /** The dense checkpoint, for a dense source. */
  readonly dense?: DenseCheckpoint;
  readonly packed?: PackedModel;
  close(): Promise<void>;
}

function validateSidecar(file: string, v: unknown, spec: ModelSpec): PruneSidecar {
  const fail = (what: string): never => {
    throw new FormatError(file, what);
  };
  if (typeof v !== 'object' || v === null) fail('not a JSON object');
  const o = v as Record<string, unknown>;
  if (o.format !== PRUNE_SIDECAR_FORMAT) fail(`"format" must be "${PRUNE_SIDECAR_FORMAT}"`);
  if (o.version !== 1) fail(`"version" ${JSON.stringify(o.version)} is not supported (this build reads 1)`);
  if (!Array.isArray(o.layers) || o.layers.length !== spec.nLayers) fail(`"layers" must list ${spec.nLayers} layers`);
  const layers = (o.layers as unknown[]).map((l, i) => {
    if (typeof l !== 'object' || l === null) return fail(`layers[${i}] is not an object`);
    const e = l as Record<string, unknown>;
    const dFF = spec.dFF[i]!;
    const src = e.sourceDFF;
    if (typeof src !== 'number' || !Number.isSafeInteger(src) || src < dFF) fail(`layers[${i}].sourceDFF must be an integer >= ${dFF}`);
    const map = e.neuronMap;
    if (map === null) {
      if (src !== dFF) fail(`layers[${i}].neuronMap is null but the layer has ${dFF} of ${src} neurons`);
    } else {
      if (!Array.isArray(map) || map.length !== dFF) fail(`layers[${i}].neuronMap must list ${dFF} neuron indices`);
      let prev = -1;
      for (const x of map as unknown[]) {
        if (typeof x !== 'number' || !Number.isSafeInteger(x) || x <= prev || x >= (src as number)) {
          fail(`layers[${i}].neuronMap must be strictly increasing indices in [0, ${src})`);
        }
        prev = x as number;
      }
    }
    const thr = e.threshold;
    if (thr !== null && (typeof thr !== 'number' || !Number.isFinite(thr) || thr < 0)) fail(`layers[${i}].threshold must be null or a number >= 0`);
    return { sourceDFF: src as number, neuronMap: map as number[] | null, threshold: thr as number | null };
  });
  return { format: PRUNE_SIDECAR_FORMAT, version: 1, layers };
}

/** The sidecar of a dense checkpoint directory, or null when it has none. */
export async function readPruneSidecar(dir: string, spec: ModelSpec): Promise<PruneSidecar | null> {
  const file = join(dir, PRUNE_SIDECAR);
  let text: string;
  try {
    if (!(await stat(file)).isFile()) return null;
    text = await readFile(file, 'utf8');
  } catch {
    return null;
  }
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch (e) {
    throw new FormatError(file, `not valid JSON (${(e as Error).message})`);
  }
  return validateSidecar(file, v, spec);
}

function denseStates(spec: ModelSpec, sidecar: PruneSidecar | null): LayerState[] {
  return spec.dFF.map((dFF, i) => {
    const s = sidecar?.layers[i];
    return {
      dFF,
      sourceDFF: s?.sourceDFF ?? dFF,
      neuronMap: s?.neuronMap ? Int32Array.from(s.neuronMap) : null,
      threshold: s?.threshold ?? null,
    };
  });
}

function transpose(src: Float32Array, rows: number, cols: number): Float32Array {
  const out = new Float32Array(rows * cols);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) out[c * rows + r] = src[r * cols + c]!;
  return out;
}

/** Opens `path`: a packed .sllm file, or anything openCheckpoint accepts. */
export async function openPruneSource(path: string): Promise<PruneSource> {
  const st = await stat(path);
  if (st.isFile() && !path.endsWith('.safetensors') && !path.endsWith('.json')) return openPackedSource(path);
  const ckpt = await openCheckpoint(path);
  try {
    const spec = ckpt.spec;
    const sidecar = await readPruneSidecar(checkpointDir(ckpt), spec);
    const names = ckpt.tensorNames();
    return {
      kind: 'dense',
      path: ckpt.path,
      spec,
      layers: denseStates(spec, sidecar),
      names,
      shape: (n) => ckpt.entry(n).shape,
      readF32: (n) => ckpt.readF32(n),
      async packBase() {
        const input = await packInputFromCheckpoint(ckpt);
        return { tokenizer: input.tokenizer, sourceFiles: input.sourceFiles };
      },
      dense: ckpt,
      close: () => ckpt.close(),
    };
  } catch (e) {
    await ckpt.close();
    throw e;
  }
}

async function openPackedSource(path: string): Promise<PruneSource> {
  const pm = await openPacked(path);
  try {
    const spec = pm.spec;
    const layers: LayerState[] = [];
    for (let i = 0; i < spec.nLayers; i++) {
      const L = pm.layers[i]!;
      const map = await pm.neuronMap(i);
      layers.push({ dFF: L.dFF, sourceDFF: L.sourceDFF, neuronMap: map ? Int32Array.from(map) : null, threshold: L.threshold });
    }
    const canon = canonicalTensors(spec);
    const shapes = new Map(canon.map((t) => [t.name, t.shape]));
    const d = spec.dModel;
    const readF32 = async (name: string): Promise<Float32Array> => {
      const m = /^layers\.(\d+)\.ffn\.(gate|up|down)\.weight$/.exec(name);
      if (!m) return pm.readF32(name);
      const i = Number(m[1]);
      const F = spec.dFF[i]!;
      const p = `layers.${i}.ffn.`;
      if (m[2] === 'gate') return pm.readF32(p + 'gate');
      if (!spec.gated) return m[2] === 'up' ? pm.readF32(p + 'up') : transpose(await pm.readF32(p + 'down_t'), F, d);
      const ud = await pm.readF32(p + 'updown'); // [F, 2, d]
      const part = new Float32Array(F * d);
      const off = m[2] === 'up' ? 0 : d;
      for (let j = 0; j < F; j++) part.set(ud.subarray(j * 2 * d + off, j * 2 * d + off + d), j * d);
      return m[2] === 'up' ? part : transpose(part, F, d);
    };
    return {
      kind: 'packed',
      path,
      spec,
      layers,
      storageDtype: pm.storageDtype,
      names: canon.map((t) => t.name),
      shape: (n) => {
        const s = shapes.get(n);
        if (!s) throw new FormatError(path, `no tensor '${n}'`);
        return s;
      },
      readF32,
      async packBase() {
        const info = pm.tokenizer;
        const tokenizer: PackInput['tokenizer'] =
          info.kind === 'huggingface'
            ? { kind: 'huggingface', json: (await pm.tokenizerJson())!, config: (await pm.tokenizerConfigJson()) ?? null }
            : { kind: info.kind };
        return { tokenizer, sourceFiles: [{ name: path.split('/').pop()!, bytes: pm.fileSize }] };
      },
      packed: pm,
      close: () => pm.close(),
    };
  } catch (e) {
    await pm.close();
    throw e;
  }
}
