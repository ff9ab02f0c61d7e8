// ModelSpec: one description of a decoder-only transformer, whatever checkpoint it came from.
// Tensors are named canonically (see CANONICAL_NAMES below); linear weights are [out, in].

export type ModelFamily = 'llama' | 'gpt2' | 'opt';
export type Activation = 'relu' | 'silu' | 'gelu' | 'gelu_tanh';

export interface ModelSpec {
  family: ModelFamily;
  /** config.json model_type as read: llama, mistral, qwen2, gpt2, opt. */
  modelType: string;
  vocabSize: number;
  dModel: number;
  nLayers: number;
  nHeads: number;
  /** Key/value heads (GQA when < nHeads, MQA when 1). */
  nKvHeads: number;
  headDim: number;
  /** FFN hidden width per layer (equal across layers for dense checkpoints; may differ after pruning). */
  dFF: number[];
  maxPositions: number;
  /** Gated FFN (llama: relu/silu(x·W_gateᵀ) ⊙ (x·W_upᵀ)) or not (gpt2/opt: act(x·W_upᵀ + b)). */
  gated: boolean;
  activation: Activation;
  norm: 'rmsnorm' | 'layernorm';
  normEps: number;
  positions: 'rope' | 'learned';
  ropeTheta: number;
  /** Learned position index offset (OPT stores positions shifted by 2). */
  positionOffset: number;
  tiedEmbeddings: boolean;
  /** Biases on q/k/v (qwen2, gpt2, opt). */
  qkvBias: boolean;
  /** Biases on the attention output projection and the FFN projections (gpt2, opt). */
  linearBias: boolean;
  /** Sliding attention window in tokens (mistral); absent when attention sees the whole context. */
  slidingWindow?: number;
  bosTokenId?: number;
  /** The end-of-sequence token (the first one when the config lists several; all in eosTokenIds). */
  eosTokenId?: number;
  eosTokenIds?: number[];
  /** The config.json as read, kept verbatim for provenance and re-export. */
  config: Record<string, unknown>;
}

/**
 * Canonical tensor names (i = layer index). Present or absent per the spec's flags;
 * canonicalTensors(spec) in ./canonical.ts lists them with their shapes.
 *   embed.weight [vocab, d]            pos_embed.weight [positionOffset + maxPositions, d] (learned
 *                                      positions; position p uses row p + positionOffset)
 *   layers.i.attn_norm.weight/.bias    layers.i.attn.{q,k,v}.weight [heads*headDim, d] (+ .bias)
 *   layers.i.attn.o.weight [d, nHeads*headDim] (+ .bias)
 *   layers.i.ffn_norm.weight/.bias     layers.i.ffn.gate.weight [dFF, d] (gated only)
 *   layers.i.ffn.up.weight [dFF, d] (+ .bias)   layers.i.ffn.down.weight [d, dFF] (+ .bias)
 *   final_norm.weight/.bias            lm_head.weight [vocab, d] (untied only)
 * Norm biases exist exactly when norm is 'layernorm'. heads*headDim need not equal d.
 */
export const CANONICAL_NAMES_DOC = 'see src/core/model/spec.ts';
