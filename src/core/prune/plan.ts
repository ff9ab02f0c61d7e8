// What pruning does to each layer: which of its current neurons stay, the neuron map of the
// result back to the original model (composed with any earlier pruning), and its threshold; and
// the pruned tensors themselves (rows of W_gate / W_up / b_up, columns of W_down).
import type { ModelSpec } from '../model/spec.js';
import type { LayerState, PruneSource } from './source.js';

export interface LayerPlan {
  /** Current neuron indices kept, strictly increasing. */
  keep: Int32Array;
  /** Width before pruning (the source's dFF for this layer). */
  inDFF: number;
  /** Width in the original model. */
  sourceDFF: number;
  /** Kept neuron j → original neuron; null when nothing was ever removed. */
  neuronMap: Int32Array | null;
  threshold: number | null;
}

/** The composed map: kept neuron j is current neuron keep[j], which is original prev[keep[j]]. */
export function composeNeuronMap(prev: Int32Array | null, keep: Int32Array, sourceDFF: number): Int32Array | null {
  const out = prev ? Int32Array.from(keep, (k) => prev[k]!) : Int32Array.from(keep);
  if (out.length === sourceDFF) return null; // identity (strictly increasing over all indices)
  return out;
}

/** Plans a layer keeping `keep` (strictly increasing indices into the current layer). */
export function planLayer(state: LayerState, keep: Int32Array, threshold: number | null): LayerPlan {
  for (let j = 0; j < keep.length; j++) {
    if (!(keep[j]! >= 0 && keep[j]! < state.dFF) || (j > 0 && keep[j]! <= keep[j - 1]!)) {
      throw new Error(`internal error: keep list must be strictly increasing indices below ${state.dFF}`);
    }
  }
  if (keep.length < 1) throw new Error('internal error: a layer must keep at least one neuron');
  return { keep, inDFF: state.dFF, sourceDFF: state.sourceDFF, neuronMap: composeNeuronMap(state.neuronMap, keep, state.sourceDFF), threshold };
}

export function prunedSpec(spec: ModelSpec, plans: readonly LayerPlan[]): ModelSpec {
  return { ...spec, dFF: plans.map((p) => p.keep.length) };
}

function selectRows(src: Float32Array, cols: number, keep: Int32Array): Float32Array {
  const out = new Float32Array(keep.length * cols);
  for (let j = 0; j < keep.length; j++) out.set(src.subarray(keep[j]! * cols, (keep[j]! + 1) * cols), j * cols);
  return out;
}

function selectCols(src: Float32Array, rows: number, cols: number, keep: Int32Array): Float32Array {
  const n = keep.length;
  const out = new Float32Array(rows * n);
  for (let r = 0; r < rows; r++) {
    const s = r * cols;
    const o = r * n;
    for (let j = 0; j < n; j++) out[o + j] = src[s + keep[j]!]!;
  }
  return out;
}

/** Whether layer `i`'s plan removes anything. */
export const isPruned = (p: LayerPlan): boolean => p.keep.length !== p.inDFF;

/** How canonical tensor `name` is cut: rows or columns of layer `layer`, or untouched. */
export function ffnCut(name: string): { layer: number; axis: 'rows' | 'cols' } | null {
  const m = /^layers\.(\d+)\.ffn\.(gate\.weight|up\.weight|up\.bias|down\.weight)$/.exec(name);
  if (!m) return null;
  return { layer: Number(m[1]), axis: m[2] === 'down.weight' ? 'cols' : 'rows' };
}

/** The pruned canonical tensor `name` (f32) and its shape. */
export async function prunedTensor(src: PruneSource, plans: readonly LayerPlan[], name: string): Promise<{ data: Float32Array; shape: number[] }> {
  const shape = [...src.shape(name)];
  const data = await src.readF32(name);
  const cut = ffnCut(name);
  if (!cut || !isPruned(plans[cut.layer]!)) return { data, shape };
  const keep = plans[cut.layer]!.keep;
  if (cut.axis === 'rows') {
    const cols = shape.length > 1 ? shape[1]! : 1;
    return { data: selectRows(data, cols, keep), shape: shape.length > 1 ? [keep.length, cols] : [keep.length] };
  }
  return { data: selectCols(data, shape[0]!, shape[1]!, keep), shape: [shape[0]!, keep.length] };
}

/** Byte-level row / column selection in any element size (for writing stored layouts). */
export function selectRowsBytes(src: Uint8Array, cols: number, keep: Int32Array, elem: number): Uint8Array {
  const rowBytes = cols * elem;
  const out = new Uint8Array(keep.length * rowBytes);
  for (let j = 0; j < keep.length; j++) out.set(src.subarray(keep[j]! * rowBytes, (keep[j]! + 1) * rowBytes), j * rowBytes);
  return out;
}

export function selectColsBytes(src: Uint8Array, rows: number, cols: number, keep: Int32Array, elem: number): Uint8Array {
  const n = keep.length;
  const out = new Uint8Array(rows * n * elem);
  for (let r = 0; r < rows; r++) {
    for (let j = 0; j < n; j++) {
      const s = (r * cols + keep[j]!) * elem;
      out.set(src.subarray(s, s + elem), (r * n + j) * elem);
    }
  }
  return out;
}
