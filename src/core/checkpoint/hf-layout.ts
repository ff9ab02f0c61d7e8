// Where each canonical tensor lives in a Hugging Face checkpoint, and how to turn the stored
// tensor into the canonical one. Names below are without the module prefix; the prefixes that
// real checkpoints use (model., transformer., model.decoder., or none) are tried in order.

import type { ModelFamily, ModelSpec } from '../model/spec.js';

/**
 * How the stored tensor becomes the canonical tensor:
 * - identity: same bytes, same shape.
 * - transpose: stored [r, c] (GPT-2 Conv1D, [in, out]) → canonical [c, r].
 * - columns-transpose: stored [r, C]; columns [start, start + count) transposed → [count, r]
 *   (GPT-2's fused c_attn weight split into q, k, v).
 * - range: stored 1-D; elements [start, start + count) (GPT-2's fused c_attn bias).
 */
export type Transform =
  | { kind: 'identity' }
  | { kind: 'transpose' }
  | { kind: 'columns-transpose'; start: number; count: number }
  | { kind: 'range'; start: number; count: number };

export interface SourceRef {
  /** Stored name without the module prefix. */
  name: string;
  /** Whether the module prefix applies (lm_head sits outside the base model). */
  prefixed: boolean;
  transform: Transform;
  /** Expected stored shape, from the canonical shape and the transform. */
  shape: number[];
}

/** Module prefixes tried, in order, per family. */
export const PREFIXES: Record<ModelFamily, readonly string[]> = {
  llama: ['model.', ''],
  gpt2: ['transformer.', ''],
  opt: ['model.decoder.', 'decoder.', ''],
};

/** The stored name (unprefixed) that tells which prefix a checkpoint uses. */
export const PROBE: Record<ModelFamily, string> = {
  llama: 'embed_tokens.weight',
  gpt2: 'wte.weight',
  opt: 'embed_tokens.weight',
};

const identity: Transform = { kind: 'identity' };

/** The stored tensor behind canonical tensor `name` of shape `shape`. */
export function sourceOf(spec: ModelSpec, name: string, shape: number[]): SourceRef {
  const plain = (n: string, prefixed = true): SourceRef => ({ name: n, prefixed, transform: identity, shape });
  if (name === 'lm_head.weight') return plain('lm_head.weight', false);
  const m = /^layers\.(\d+)\.(.+)$/.exec(name);
  switch (spec.family) {
    case 'llama': {
      if (name === 'embed.weight') return plain('embed_tokens.weight');
      if (name === 'final_norm.weight') return plain('norm.weight');
      if (!m) break;
      const L = `layers.${m[1]}`;
      const rest = m[2]!;
      const table: Record<string, string> = {
        'attn_norm.weight': 'input_layernorm.weight',
        'attn.q.weight': 'self_attn.q_proj.weight',
        'attn.q.bias': 'self_attn.q_proj.bias',
        'attn.k.weight': 'self_attn.k_proj.weight',
        'attn.k.bias': 'self_attn.k_proj.bias',
        'attn.v.weight': 'self_attn.v_proj.weight',
        'attn.v.bias': 'self_attn.v_proj.bias',
        'attn.o.weight': 'self_attn.o_proj.weight',
        'ffn_norm.weight': 'post_attention_layernorm.weight',
        'ffn.gate.weight': 'mlp.gate_proj.weight',
        'ffn.up.weight': 'mlp.up_proj.weight',
        'ffn.down.weight': 'mlp.down_proj.weight',
      };
      if (table[rest]) return plain(`${L}.${table[rest]}`);
      break;
    }
    case 'gpt2': {
      if (name === 'embed.weight') return plain('wte.weight');
      if (name === 'pos_embed.weight') return plain('wpe.weight');
      if (name === 'final_norm.weight') return plain('ln_f.weight');
      if (name === 'final_norm.bias') return plain('ln_f.bias');
      if (!m) break;
      const H = `h.${m[1]}`;
      const rest = m[2]!;
      const transposed = (n: string): SourceRef => ({ name: `${H}.${n}`, prefixed: true, transform: { kind: 'transpose' }, shape: [shape[1]!, shape[0]!] });
      const direct: Record<string, string> = {
        'attn_norm.weight': 'ln_1.weight',
        'attn_norm.bias': 'ln_1.bias',
        'attn.o.bias': 'attn.c_proj.bias',
        'ffn_norm.weight': 'ln_2.weight',
        'ffn_norm.bias': 'ln_2.bias',
        'ffn.up.bias': 'mlp.c_fc.bias',
        'ffn.down.bias': 'mlp.c_proj.bias',
      };
      if (direct[rest]) return plain(`${H}.${direct[rest]}`);
      if (rest === 'attn.o.weight') return transposed('attn.c_proj.weight');
      if (rest === 'ffn.up.weight') return transposed('mlp.c_fc.weight');
      if (rest === 'ffn.down.weight') return transposed('mlp.c_proj.weight');
      const qkv = /^attn\.([qkv])\.(weight|bias)$/.exec(rest);
      if (qkv) {
        const part = 'qkv'.indexOf(qkv[1]!);
        const width = spec.nHeads * spec.headDim;
        if (qkv[2] === 'weight') {
          return {
            name: `${H}.attn.c_attn.weight`,
            prefixed: true,
            transform: { kind: 'columns-transpose', start: part * width, count: width },
            shape: [spec.dModel, 3 * width],
          };
        }
        return { name: `${H}.attn.c_attn.bias`, prefixed: true, transform: { kind: 'range', start: part * width, count: width }, shape: [3 * width] };
      }
      break;
    }
    case 'opt': {
      if (name === 'embed.weight') return plain('embed_tokens.weight');
      if (name === 'pos_embed.weight') return plain('embed_positions.weight');
      if (name === 'final_norm.weight') return plain('final_layer_norm.weight');
      if (name === 'final_norm.bias') return plain('final_layer_norm.bias');
      if (!m) break;
      const L = `layers.${m[1]}`;
      const rest = m[2]!;
      const table: Record<string, string> = {
        'attn_norm.weight': 'self_attn_layer_norm.weight',
        'attn_norm.bias': 'self_attn_layer_norm.bias',
        'attn.q.weight': 'self_attn.q_proj.weight',
        'attn.q.bias': 'self_attn.q_proj.bias',
        'attn.k.weight': 'self_attn.k_proj.weight',
        'attn.k.bias': 'self_attn.k_proj.bias',
        'attn.v.weight': 'self_attn.v_proj.weight',
        'attn.v.bias': 'self_attn.v_proj.bias',
        'attn.o.weight': 'self_attn.out_proj.weight',
        'attn.o.bias': 'self_attn.out_proj.bias',
        'ffn_norm.weight': 'final_layer_norm.weight',
        'ffn_norm.bias': 'final_layer_norm.bias',
        'ffn.up.weight': 'fc1.weight',
        'ffn.up.bias': 'fc1.bias',
        'ffn.down.weight': 'fc2.weight',
        'ffn.down.bias': 'fc2.bias',
      };
      if (table[rest]) return plain(`${L}.${table[rest]}`);
      break;
    }
  }
  throw new Error(`internal: no ${spec.family} source for canonical tensor '${name}'`);
}
