// Writing a pruned model: a packed .sllm file (through writePacked, with the layer table and
// neuron maps), or a dense Hugging Face checkpoint directory (the source's stored tensors, FFN
// rows/columns selected byte for byte, plus config.json widths and sparsellm_prune.json). Both
// appear only when complete: a temporary name, then a rename.
import { copyFile, mkdir, readdir, rename, rm, stat, writeFile } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import { SafetensorsFile, SafetensorsWriter, SAFETENSORS_DTYPE_SIZES, type TensorDecl } from '../checkpoint/safetensors.js';
import type { DenseCheckpoint } from '../checkpoint/index.js';
import { SparseLlmError, UsageError } from '../errors.js';
import { checkpointDir } from '../format/source.js';
import { writePacked, type PackInput, type WritePackedOptions, type WritePackedResult } from '../format/writer.js';
import { neuronMapName, type LayerCalibration, type PackedLayer, type TwellParams } from '../format/metadata.js';
import { ffnCut, isPruned, prunedSpec, prunedTensor, selectColsBytes, selectRowsBytes, type LayerPlan } from './plan.js';
import { PRUNE_SIDECAR, PRUNE_SIDECAR_FORMAT, type PruneSidecar, type PruneSource } from './source.js';

/** The packed layer table of a pruned model. */
export function prunedLayers(src: PruneSource, plans: readonly LayerPlan[], twell: readonly (TwellParams | null)[], calibration: readonly (LayerCalibration | null)[]): PackedLayer[] {
  return plans.map((p, i) => ({
    dFF: p.keep.length,
    sourceDFF: p.sourceDFF,
    activation: src.spec.activation,
    twell: twell[i] ?? null,
    neuronMap: p.neuronMap ? neuronMapName(i) : null,
    threshold: p.threshold,
    calibration: calibration[i] ?? null,
  }));
}

/** writePacked's input for the pruned model (tensors served as exact f32 values). */
export async function prunedPackInput(src: PruneSource, plans: readonly LayerPlan[], layers: readonly PackedLayer[]): Promise<PackInput> {
  const spec = prunedSpec(src.spec, plans);
  const base = await src.packBase();
  const shapes = new Map<string, number[]>();
  for (const name of src.names) {
    const s = [...src.shape(name)];
    const cut = ffnCut(name);
    if (cut) {
      const n = plans[cut.layer]!.keep.length;
      if (cut.axis === 'rows') s[0] = n;
      else s[1] = n;
    }
    shapes.set(name, s);
  }
  return {
    spec,
    path: src.path,
    sourceFiles: base.sourceFiles,
    tokenizer: base.tokenizer,
    layers,
    neuronMap: (i) => {
      const m = plans[i]!.neuronMap;
      if (!m) throw new SparseLlmError(`internal error: layer ${i} has no neuron map`);
      return m;
    },
    describe(name) {
      const shape = shapes.get(name);
      return shape ? { dtype: 'F32', shape } : undefined;
    },
    async *rowChunks(name, rows) {
      const { data, shape } = await prunedTensor(src, plans, name);
      const rowElems = shape.length <= 1 ? 1 : shape.slice(1).reduce((a, b) => a * b, 1);
      const nRows = shape.length === 0 ? 1 : shape[0]!;
      const step = Math.max(1, Math.min(rows, nRows));
      const bytes = new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
      for (let r = 0; r < nRows; r += step) yield { dtype: 'F32', bytes: bytes.subarray(r * rowElems * 4, Math.min(nRows, r + step) * rowElems * 4) };
    },
  };
}

export async function writePrunedPacked(
  src: PruneSource,
  plans: readonly LayerPlan[],
  layers: readonly PackedLayer[],
  out: string,
  opts: WritePackedOptions,
): Promise<WritePackedResult> {
  return writePacked(await prunedPackInput(src, plans, layers), out, opts);
}

// ---- dense Hugging Face directory ----------------------------------------------------------------

/** Files of a checkpoint directory that are weights in other formats (not carried over). */
const SKIP_EXT = ['.safetensors', '.bin', '.pt', '.pth', '.ckpt', '.gguf', '.h5', '.msgpack', '.onnx', '.index.json'];

/** Checks the output directory target before any work. */
export async function checkOutputDir(out: string, force: boolean): Promise<void> {
  const parent = dirname(resolve(out));
  try {
    if (!(await stat(parent)).isDirectory()) throw new Error();
  } catch {
    throw new SparseLlmError(`${out}: parent directory ${parent} does not exist`);
  }
  let st;
  try {
    st = await stat(out);
  } catch {
    return;
  }
  if (!st.isDirectory()) throw new SparseLlmError(`${out}: exists and is not a directory`);
  if (!force) throw new SparseLlmError(`${out}: already exists (use --force to overwrite)`);
}

export interface DenseWriteResult {
  path: string;
  bytesOut: number;
  files: string[];
}

/**
 * Writes the pruned model as a Hugging Face checkpoint directory `out`: config.json (with
 * sparsellm_intermediate_sizes when widths changed), one model.safetensors holding every stored
 * tensor of the source (FFN tensors of pruned layers cut, same dtype and orientation), the other
 * files of the source directory (tokenizer, generation config), and sparsellm_prune.json when any
 * layer has a neuron map or a threshold.
 */
export async function writePrunedDense(src: PruneSource, plans: readonly LayerPlan[], out: string, force: boolean): Promise<DenseWriteResult> {
  const ckpt = src.dense;
  if (!ckpt) throw new UsageError(`${src.path}: a packed model can only be pruned into a packed model (-o model.sllm)`);
  await checkOutputDir(out, force);
  const target = resolve(out);
  const tmp = join(dirname(target), `.${basename(target)}.tmp-${process.pid}-${Date.now()}`);
  await mkdir(tmp);
  try {
    const files: string[] = [];
    // config.json
    const spec = prunedSpec(src.spec, plans);
    const config: Record<string, unknown> = { ...src.spec.config };
    const uniform = spec.dFF.every((x) => x === Math.max(...plans.map((p) => p.sourceDFF)));
    if (uniform) delete config.sparsellm_intermediate_sizes;
    else config.sparsellm_intermediate_sizes = [...spec.dFF];
    await writeFile(join(tmp, 'config.json'), JSON.stringify(config, null, 2) + '\n');
    files.push('config.json');
    // Other files of the source directory (tokenizer and friends).
    const dir = checkpointDir(ckpt);
    for (const e of await readdir(dir, { withFileTypes: true })) {
      if (!e.isFile() || e.name === 'config.json' || e.name === PRUNE_SIDECAR || e.name.startsWith('.')) continue;
      if (SKIP_EXT.some((x) => e.name.endsWith(x))) continue;
      await copyFile(join(dir, e.name), join(tmp, e.name));
      files.push(e.name);
    }
    // Weights.
    const bytesOut = await writeStoredTensors(ckpt, src, plans, join(tmp, 'model.safetensors'));
    files.push('model.safetensors');
    // Sidecar.
    if (plans.some((p) => p.neuronMap || p.threshold !== null)) {
      const sidecar: PruneSidecar = {
        format: PRUNE_SIDECAR_FORMAT,
        version: 1,
        layers: plans.map((p) => ({ sourceDFF: p.sourceDFF, neuronMap: p.neuronMap ? Array.from(p.neuronMap) : null, threshold: p.threshold })),
      };
      await writeFile(join(tmp, PRUNE_SIDECAR), JSON.stringify(sidecar) + '\n');
      files.push(PRUNE_SIDECAR);
    }
    // Swap in: the old directory (with --force) goes only once the new one is complete.
    let old: string | undefined;
    try {
      await stat(target);
      old = join(dirname(target), `.${basename(target)}.old-${process.pid}-${Date.now()}`);
      await rename(target, old);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
    }
    await rename(tmp, target);
    if (old) await rm(old, { recursive: true, force: true });
    return { path: out, bytesOut, files };
  } catch (e) {
    await rm(tmp, { recursive: true, force: true });
    throw e;
  }
}

/** Every stored tensor of the source's safetensors files, FFN tensors of pruned layers cut. */
async function writeStoredTensors(ckpt: DenseCheckpoint, src: PruneSource, plans: readonly LayerPlan[], path: string): Promise<number> {
  // Stored name → how to cut it (from the canonical entries of the FFN tensors).
  const cuts = new Map<string, { keep: Int32Array; axis: 'rows' | 'cols' }>();
  for (const name of src.names) {
    const cut = ffnCut(name);
    if (!cut || !isPruned(plans[cut.layer]!)) continue;
    const e = ckpt.entry(name);
    let axis = cut.axis;
    if (e.transform.kind === 'transpose') axis = axis === 'rows' ? 'cols' : 'rows';
    else if (e.transform.kind !== 'identity') throw new SparseLlmError(`${e.file}: internal error: FFN tensor ${e.sourceName} is stored fused`);
    cuts.set(`${e.file}\u0000${e.sourceName}`, { keep: plans[cut.layer]!.keep, axis });
  }
  const files = ckpt.sourceFiles.map((f) => f.path).filter((p) => p.endsWith('.safetensors'));
  const opened: SafetensorsFile[] = [];
  try {
    for (const f of files) opened.push(await SafetensorsFile.open(f, { dtypes: Object.keys(SAFETENSORS_DTYPE_SIZES) }));
    const decls: (TensorDecl & { file: SafetensorsFile; cut?: { keep: Int32Array; axis: 'rows' | 'cols' } })[] = [];
    const seen = new Set<string>();
    for (let k = 0; k < opened.length; k++) {
      const sf = opened[k]!;
      for (const name of sf.names()) {
        if (seen.has(name)) continue;
        seen.add(name);
        const info = sf.info(name);
        const shape = [...info.shape];
        const cut = cuts.get(`${files[k]}\u0000${name}`);
        if (cut) {
          if (cut.axis === 'rows') shape[0] = cut.keep.length;
          else shape[1] = cut.keep.length;
        }
        decls.push({ name, dtype: info.dtype, shape, file: sf, cut });
      }
    }
    const metadata = { ...(opened[0]?.metadata ?? {}) };
    const w = await SafetensorsWriter.create(path, { tensors: decls.map(({ name, dtype, shape }) => ({ name, dtype, shape })), metadata });
    try {
      for (const t of decls) {
        let bytes = await t.file.readTensorBytes(t.name);
        if (t.cut) {
          const info = t.file.info(t.name);
          const elem = SAFETENSORS_DTYPE_SIZES[info.dtype]!;
          bytes = t.cut.axis === 'rows'
            ? selectRowsBytes(bytes, info.shape.length > 1 ? info.shape[1]! : 1, t.cut.keep, elem)
            : selectColsBytes(bytes, info.shape[0]!, info.shape[1]!, t.cut.keep, elem);
        }
        await w.write(t.name, bytes);
      }
      await w.finish();
    } catch (e) {
      await w.abort();
      throw e;
    }
    return (await stat(path)).size;
  } finally {
    for (const f of opened) await f.close();
  }
}
