// The tensors of a packed file, in file order (docs/format.md section 5), derived from the model
// spec and layer table alone: the writer declares exactly this list and the reader requires it.
import type { ModelSpec } from '../model/spec.js';
import type { PackedLayer, StorageDType, TokenizerInfo } from './metadata.js';

/**
 * Where a packed tensor's values come from:
 *   copy     the canonical tensor `canonical`, unchanged apart from the dtype
 *   gate     W_gate of layer `layer`                       [dFF, d]
 *   updown   W_up[j, :] and W_down[:, j] interleaved       [dFF, 2, d]  (gated)
 *   up       W_up                                          [dFF, d]     (non-gated)
 *   down_t   W_downᵀ                                       [dFF, d]     (non-gated)
 *   neuron_map, tokenizer   written from the pack inputs, not from a canonical tensor
 */
export type PackedSource =
  | { kind: 'copy'; canonical: string }
  | { kind: 'gate' | 'updown' | 'up' | 'down_t'; layer: number }
  | { kind: 'neuron_map'; layer: number }
  | { kind: 'tokenizer' };

export interface PackedTensorDecl {
  name: string;
  dtype: StorageDType | 'I32' | 'U8';
  shape: number[];
  source: PackedSource;
}

/** Rule of section 5: matrices in the storage dtype, every 1-D tensor (norms, biases) F32. */
function copy(name: string, shape: number[], storage: StorageDType): PackedTensorDecl {
  return { name, dtype: shape.length >= 2 ? storage : 'F32', shape, source: { kind: 'copy', canonical: name } };
}

/** Shape of the learned position table: OPT keeps `positionOffset` extra leading rows. */
export function posEmbedRows(spec: ModelSpec): number {
  return spec.maxPositions + spec.positionOffset;
}

export function packedLayout(spec: ModelSpec, layers: readonly PackedLayer[], storage: StorageDType, tokenizer: TokenizerInfo): PackedTensorDecl[] {
  const d = spec.dModel;
  const q = spec.nHeads * spec.headDim;
  const kv = spec.nKvHeads * spec.headDim;
  const ln = spec.norm === 'layernorm';
  const out: PackedTensorDecl[] = [];
  const add = (name: string, shape: number[]) => out.push(copy(name, shape, storage));

  add('embed.weight', [spec.vocabSize, d]);
  if (spec.positions === 'learned') add('pos_embed.weight', [posEmbedRows(spec), d]);
  for (let i = 0; i < spec.nLayers; i++) {
    const p = `layers.${i}.`;
    const F = layers[i]!.dFF;
    add(p + 'attn_norm.weight', [d]);
    if (ln) add(p + 'attn_norm.bias', [d]);
    for (const [w, rows] of [['q', q], ['k', kv], ['v', kv]] as const) {
      add(`${p}attn.${w}.weight`, [rows, d]);
      if (spec.qkvBias) add(`${p}attn.${w}.bias`, [rows]);
    }
    add(p + 'attn.o.weight', [d, q]);
    if (spec.linearBias) add(p + 'attn.o.bias', [d]);
    add(p + 'ffn_norm.weight', [d]);
    if (ln) add(p + 'ffn_norm.bias', [d]);
    if (spec.gated) {
      out.push({ name: p + 'ffn.gate', dtype: storage, shape: [F, d], source: { kind: 'gate', layer: i } });
      out.push({ name: p + 'ffn.updown', dtype: storage, shape: [F, 2, d], source: { kind: 'updown', layer: i } });
      if (spec.linearBias) {
        add(p + 'ffn.up.bias', [F]);
        add(p + 'ffn.down.bias', [d]);
      }
    } else {
      out.push({ name: p + 'ffn.up', dtype: storage, shape: [F, d], source: { kind: 'up', layer: i } });
      if (spec.linearBias) add(p + 'ffn.up.bias', [F]);
      out.push({ name: p + 'ffn.down_t', dtype: storage, shape: [F, d], source: { kind: 'down_t', layer: i } });
      if (spec.linearBias) add(p + 'ffn.down.bias', [d]);
    }
    const map = layers[i]!.neuronMap;
    if (map !== null) out.push({ name: map, dtype: 'I32', shape: [F], source: { kind: 'neuron_map', layer: i } });
  }
  add('final_norm.weight', [d]);
  if (ln) add('final_norm.bias', [d]);
  if (!spec.tiedEmbeddings) add('lm_head.weight', [spec.vocabSize, d]);
  if (tokenizer.kind === 'huggingface') {
    out.push({ name: tokenizer.tensor, dtype: 'U8', shape: [tokenizer.bytes], source: { kind: 'tokenizer' } });
    const c = tokenizer.config;
    if (c) out.push({ name: c.tensor, dtype: 'U8', shape: [c.bytes], source: { kind: 'tokenizer' } });
  }
  return out;
}
