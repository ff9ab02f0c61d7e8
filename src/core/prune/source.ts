// The model being pruned, whatever its form: a dense Hugging Face checkpoint (possibly pruned
// before, with its sparsellm_prune.json) or a packed .sllm model. Gives the spec, the canonical
// tensors as f32 (src/core/model/spec.ts names and orientation), and per layer the neuron map
// back to the original model and the stored activation threshold, so that a second prune
// composes with the first.
import { stat } from 'node:fs/promises';
import { openCheckpoint, type DenseCheckpoint } from '../checkpoint/index.js';
import { FormatError } from '../errors.js';
import { openPacked, type PackedModel } from '../format/reader.js';
import { checkpointDir, packInputFromCheckpoint } from '../format/source.js';
import type { PackInput } from '../format/writer.js';
import type { StorageDType } from '../format/metadata.js';
import type { ModelSpec } from '../model/spec.js';
import { readPruneSidecar, type PruneSidecar } from './sidecar.js';
export { readPruneSidecar, PRUNE_SIDECAR, PRUNE_SIDECAR_FORMAT } from './sidecar.js';
export type { PruneSidecar, SidecarLayer } from './sidecar.js';
import { canonicalTensors } from '../model/canonical.js';

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
