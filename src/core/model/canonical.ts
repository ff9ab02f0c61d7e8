// The canonical tensors a ModelSpec implies: names and shapes (linear weights [out, in]).
// Every reader maps its source layout onto this list, and every writer starts from it.

import type { ModelSpec } from './spec.js';

export interface CanonicalTensor {
  name: string;
  shape: number[];
}

/** All tensors of `spec` in a stable order: embeddings, then layer by layer, then the head. */
export function canonicalTensors(spec: ModelSpec): CanonicalTensor[] {
  const d = spec.dModel;
  const q = spec.nHeads * spec.headDim;
  const kv = spec.nKvHeads * spec.headDim;
  const normBias = spec.norm === 'layernorm';
  const out: CanonicalTensor[] = [];
  const add = (name: string, ...shape: number[]): void => {
    out.push({ name, shape });
  };
  add('embed.weight', spec.vocabSize, d);
  if (spec.positions === 'learned') add('pos_embed.weight', spec.positionOffset + spec.maxPositions, d);
  for (let i = 0; i < spec.nLayers; i++) {
    const L = `layers.${i}`;
    const ff = spec.dFF[i]!;
    add(`${L}.attn_norm.weight`, d);
    if (normBias) add(`${L}.attn_norm.bias`, d);
    for (const [p, rows] of [['q', q], ['k', kv], ['v', kv]] as const) {
      add(`${L}.attn.${p}.weight`, rows, d);
      if (spec.qkvBias) add(`${L}.attn.${p}.bias`, rows);
    }
    add(`${L}.attn.o.weight`, d, q);
    if (spec.linearBias) add(`${L}.attn.o.bias`, d);
    add(`${L}.ffn_norm.weight`, d);
    if (normBias) add(`${L}.ffn_norm.bias`, d);
    if (spec.gated) add(`${L}.ffn.gate.weight`, ff, d);
    add(`${L}.ffn.up.weight`, ff, d);
    if (spec.linearBias) add(`${L}.ffn.up.bias`, ff);
    add(`${L}.ffn.down.weight`, d, ff);
    if (spec.linearBias) add(`${L}.ffn.down.bias`, d);
  }
  add('final_norm.weight', d);
  if (normBias) add('final_norm.bias', d);
  if (!spec.tiedEmbeddings) add('lm_head.weight', spec.vocabSize, d);
  return out;
}

/** Parameter count implied by the spec (tied embeddings counted once). */
export function parameterCount(spec: ModelSpec): number {
  return canonicalTensors(spec).reduce((n, t) => n + t.shape.reduce((a, b) => a * b, 1), 0);
}
