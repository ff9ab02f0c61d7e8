// Hugging Face config.json → ModelSpec, for the architectures sparsellm reads.
// Fields that define tensor shapes are required (a missing one is named in the error); fields with
// a well-known Hugging Face default take it. Variants whose maths we do not implement are refused
// by naming the field, never read approximately.

import { ModelError } from '../errors.js';
import type { Activation, ModelSpec } from '../model/spec.js';

export const SUPPORTED_MODEL_TYPES = ['llama', 'mistral', 'qwen2', 'gpt2', 'opt'] as const;
export type SupportedModelType = (typeof SUPPORTED_MODEL_TYPES)[number];

type Config = Record<string, unknown>;

/** Upper bound on any size field of a config (layers, widths, vocabulary, positions). */
const MAX_DIM = 1 << 24;
const MAX_LAYERS = 4096;

/** Reads fields of one config, collecting every missing required field before failing. */
class Fields {
  private readonly missing: string[] = [];
  constructor(private readonly config: Config, private readonly file: string, private readonly modelType: string) {}

  has(key: string): boolean {
    return this.config[key] !== undefined && this.config[key] !== null;
  }

  /** A required positive integer. */
  int(key: string): number {
    if (!this.has(key)) {
      this.missing.push(key);
      return 0;
    }
    return this.checkInt(key);
  }

  /** A required layer count (bounded tighter than other sizes: per-layer lists are built from it). */
  layers(key: string): number {
    const n = this.int(key);
    if (n > MAX_LAYERS) throw this.error(`${key} = ${n} is implausibly large (limit ${MAX_LAYERS})`);
    return n;
  }

  /** An optional positive integer. */
  optInt(key: string): number | undefined {
    return this.has(key) ? this.checkInt(key) : undefined;
  }

  num(key: string, fallback: number): number {
    if (!this.has(key)) return fallback;
    const v = this.config[key];
    if (typeof v !== 'number' || !Number.isFinite(v)) throw this.error(`${key} must be a number, found ${JSON.stringify(v)}`);
    return v;
  }

  str(key: string, fallback: string): string {
    if (!this.has(key)) return fallback;
    const v = this.config[key];
    if (typeof v !== 'string') throw this.error(`${key} must be a string, found ${JSON.stringify(v)}`);
    return v;
  }

  bool(key: string, fallback: boolean): boolean {
    if (!this.has(key)) return fallback;
    const v = this.config[key];
    if (typeof v !== 'boolean') throw this.error(`${key} must be true or false, found ${JSON.stringify(v)}`);
    return v;
  }

  /** Throws if any required field was missing. */
  done(): void {
    if (this.missing.length > 0) {
      const s = this.missing.length === 1 ? 'field' : 'fields';
      throw this.error(`config.json (model_type ${this.modelType}) is missing the required ${s} ${this.missing.join(', ')}`);
    }
  }

  error(problem: string): ModelError {
    return new ModelError(this.file, problem);
  }

  private checkInt(key: string): number {
    const v = this.config[key];
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v <= 0) throw this.error(`${key} must be a positive integer, found ${JSON.stringify(v)}`);
    // No real model comes near this; the bound keeps a corrupt config from making huge tensor lists.
    if (v > MAX_DIM) throw this.error(`${key} = ${v} is implausibly large (limit ${MAX_DIM})`);
    return v;
  }
}

function activationOf(name: string, field: string, f: Fields): Activation {
  switch (name) {
    case 'relu':
      return 'relu';
    case 'silu':
    case 'swish':
      return 'silu';
    case 'gelu':
      return 'gelu';
    case 'gelu_new':
    case 'gelu_pytorch_tanh':
    case 'gelu_fast':
      return 'gelu_tanh';
    default:
      throw f.error(`${field} "${name}" is not supported (supported: relu, silu, gelu, gelu_new, gelu_pytorch_tanh)`);
  }
}

function tokenIds(config: Config): { bosTokenId?: number; eosTokenId?: number; eosTokenIds?: number[] } {
  const out: { bosTokenId?: number; eosTokenId?: number; eosTokenIds?: number[] } = {};
  const isId = (v: unknown): v is number => typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;
  if (isId(config.bos_token_id)) out.bosTokenId = config.bos_token_id;
  const eos = config.eos_token_id;
  if (isId(eos)) out.eosTokenId = eos;
  else if (Array.isArray(eos) && eos.length > 0 && eos.every(isId)) {
    out.eosTokenId = eos[0];
    out.eosTokenIds = [...eos];
  }
  return out;
}

/** Refuses a field that, when set to anything but `ok`, changes the maths in a way we do not implement. */
function refuseUnless(f: Fields, config: Config, key: string, ok: (v: unknown) => boolean, why: string): void {
  const v = config[key];
  if (v !== undefined && !ok(v)) throw f.error(`${key} = ${JSON.stringify(v)} is not supported: ${why}`);
}

/**
 * The ModelSpec described by a parsed config.json. `file` names the config in errors.
 * `tiedEmbeddings` is what the config says; the checkpoint reader also treats a missing lm_head as tied.
 */
export function specFromConfig(config: Config, file: string): ModelSpec {
  return withPrunedWidths(specFromConfigBase(config, file), config, file);
}

/**
 * Per-layer FFN widths of a checkpoint pruned by `sparsellm prune` (config key
 * `sparsellm_intermediate_sizes`: one positive integer per layer, none above the config's width).
 */
function withPrunedWidths(spec: ModelSpec, config: Config, file: string): ModelSpec {
  const v = (config as Record<string, unknown>).sparsellm_intermediate_sizes;
  if (v === undefined) return spec;
  const max = Math.max(...spec.dFF);
  if (!Array.isArray(v) || v.length !== spec.nLayers || !v.every((x) => typeof x === 'number' && Number.isSafeInteger(x) && x >= 1 && x <= max)) {
    throw new ModelError(file, `sparsellm_intermediate_sizes must list ${spec.nLayers} integers in [1, ${max}] (one per layer), found ${JSON.stringify(v).slice(0, 80)}`);
  }
  return { ...spec, dFF: [...(v as number[])] };
}

function specFromConfigBase(config: Config, file: string): ModelSpec {
  if (typeof config !== 'object' || config === null || Array.isArray(config)) throw new ModelError(file, 'config.json is not a JSON object');
  const modelType = config.model_type;
  const supported = SUPPORTED_MODEL_TYPES.join(', ');
  if (modelType === undefined || modelType === null) {
    throw new ModelError(file, `config.json has no model_type; sparsellm reads ${supported}`);
  }
  if (typeof modelType !== 'string' || !(SUPPORTED_MODEL_TYPES as readonly string[]).includes(modelType)) {
    throw new ModelError(file, `unknown architecture: model_type ${JSON.stringify(modelType)} is not supported (supported: ${supported})`);
  }
  switch (modelType as SupportedModelType) {
    case 'llama':
    case 'mistral':
    case 'qwen2':
      return llamaFamily(config, file, modelType);
    case 'gpt2':
      return gpt2(config, file);
    case 'opt':
      return opt(config, file);
  }
}

function llamaFamily(config: Config, file: string, modelType: string): ModelSpec {
  const f = new Fields(config, file, modelType);
  const dModel = f.int('hidden_size');
  const dFF = f.int('intermediate_size');
  const nLayers = f.layers('num_hidden_layers');
  const nHeads = f.int('num_attention_heads');
  const vocabSize = f.int('vocab_size');
  f.done();
  const nKvHeads = f.optInt('num_key_value_heads') ?? nHeads;
  if (nHeads % nKvHeads !== 0) throw f.error(`num_attention_heads ${nHeads} is not a multiple of num_key_value_heads ${nKvHeads}`);
  let headDim = f.optInt('head_dim');
  if (headDim === undefined) {
    if (dModel % nHeads !== 0) throw f.error(`hidden_size ${dModel} is not a multiple of num_attention_heads ${nHeads}, and head_dim is not given`);
    headDim = dModel / nHeads;
  }
  if (headDim % 2 !== 0) throw f.error(`head dimension ${headDim} is odd; rotary embeddings need an even head dimension`);
  const defaultMaxPositions = modelType === 'llama' ? 2048 : modelType === 'mistral' ? 131072 : 32768;
  const maxPositions = f.optInt('max_position_embeddings') ?? defaultMaxPositions;
  refuseUnless(f, config, 'rope_scaling', (v) => v === null, 'rotary scaling variants (llama3, yarn, linear, dynamic) are not implemented');
  refuseUnless(f, config, 'partial_rotary_factor', (v) => v === 1 || v === 1.0, 'partial rotary embeddings are not implemented');
  refuseUnless(f, config, 'mlp_bias', (v) => v === false, 'FFN biases on a gated (llama-style) FFN are not implemented');
  if (modelType === 'llama') {
    refuseUnless(f, config, 'attention_bias', (v) => v === false, 'attention biases on llama (which include o_proj) are not implemented; qwen2 q/k/v biases are');
  }
  if (modelType === 'qwen2') {
    refuseUnless(f, config, 'use_sliding_window', (v) => v === false, 'qwen2 per-layer sliding windows are not implemented');
  }
  let slidingWindow: number | undefined;
  if (modelType === 'mistral') slidingWindow = f.optInt('sliding_window');
  const spec: ModelSpec = {
    family: 'llama',
    modelType,
    vocabSize,
    dModel,
    nLayers,
    nHeads,
    nKvHeads,
    headDim,
    dFF: new Array<number>(nLayers).fill(dFF),
    maxPositions,
    gated: true,
    activation: activationOf(f.str('hidden_act', 'silu'), 'hidden_act', f),
    norm: 'rmsnorm',
    normEps: f.num('rms_norm_eps', 1e-6),
    positions: 'rope',
    ropeTheta: f.num('rope_theta', 10000),
    positionOffset: 0,
    tiedEmbeddings: f.bool('tie_word_embeddings', false),
    qkvBias: modelType === 'qwen2',
    linearBias: false,
    ...tokenIds(config),
    config,
  };
  if (slidingWindow !== undefined) spec.slidingWindow = slidingWindow;
  return spec;
}

function gpt2(config: Config, file: string): ModelSpec {
  const f = new Fields(config, file, 'gpt2');
  const dModel = f.int('n_embd');
  const nLayers = f.layers('n_layer');
  const nHeads = f.int('n_head');
  const vocabSize = f.int('vocab_size');
  const maxPositions = f.int('n_positions');
  f.done();
  if (dModel % nHeads !== 0) throw f.error(`n_embd ${dModel} is not a multiple of n_head ${nHeads}`);
  const dFF = f.optInt('n_inner') ?? 4 * dModel;
  refuseUnless(f, config, 'scale_attn_weights', (v) => v === true, 'unscaled attention is not implemented');
  refuseUnless(f, config, 'scale_attn_by_inverse_layer_idx', (v) => v === false, 'per-layer attention scaling is not implemented');
  return {
    family: 'gpt2',
    modelType: 'gpt2',
    vocabSize,
    dModel,
    nLayers,
    nHeads,
    nKvHeads: nHeads,
    headDim: dModel / nHeads,
    dFF: new Array<number>(nLayers).fill(dFF),
    maxPositions,
    gated: false,
    activation: activationOf(f.str('activation_function', 'gelu_new'), 'activation_function', f),
    norm: 'layernorm',
    normEps: f.num('layer_norm_epsilon', 1e-5),
    positions: 'learned',
    ropeTheta: 0,
    positionOffset: 0,
    tiedEmbeddings: f.bool('tie_word_embeddings', true),
    qkvBias: true,
    linearBias: true,
    ...tokenIds(config),
    config,
  };
}

function opt(config: Config, file: string): ModelSpec {
  const f = new Fields(config, file, 'opt');
  const dModel = f.int('hidden_size');
  const dFF = f.int('ffn_dim');
  const nLayers = f.layers('num_hidden_layers');
  const nHeads = f.int('num_attention_heads');
  const vocabSize = f.int('vocab_size');
  const maxPositions = f.int('max_position_embeddings');
  f.done();
  if (dModel % nHeads !== 0) throw f.error(`hidden_size ${dModel} is not a multiple of num_attention_heads ${nHeads}`);
  refuseUnless(f, config, 'do_layer_norm_before', (v) => v === true, 'post-norm OPT variants (opt-350m) are not supported');
  refuseUnless(f, config, 'word_embed_proj_dim', (v) => v === dModel, `an embedding projection (word_embed_proj_dim != hidden_size ${dModel}) is not supported`);
  refuseUnless(f, config, 'enable_bias', (v) => v === true, 'OPT without linear biases is not supported');
  refuseUnless(f, config, 'layer_norm_elementwise_affine', (v) => v === true, 'LayerNorm without affine parameters is not supported');
  return {
    family: 'opt',
    modelType: 'opt',
    vocabSize,
    dModel,
    nLayers,
    nHeads,
    nKvHeads: nHeads,
    headDim: dModel / nHeads,
    dFF: new Array<number>(nLayers).fill(dFF),
    maxPositions,
    gated: false,
    activation: activationOf(f.str('activation_function', 'relu'), 'activation_function', f),
    norm: 'layernorm',
    normEps: 1e-5,
    positions: 'learned',
    ropeTheta: 0,
    positionOffset: 2,
    tiedEmbeddings: f.bool('tie_word_embeddings', true),
    qkvBias: true,
    linearBias: true,
    ...tokenIds(config),
    config,
  };
}
