// sparsellm_prune.json: what a pruned dense Hugging Face checkpoint carries beside its
// config.json (per layer: the original width, the neuron map back to it, the activation
// threshold), read by prune (to compose a second pruning) and by packing (to keep them).
import { readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { FormatError } from '../errors.js';
import type { ModelSpec } from '../model/spec.js';

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
