// Small dense checkpoints in real Hugging Face layouts, generated in a test's temp dir, for the
// packed-format tests: the values are chosen here (seeded), so tests can recompute every packed
// element from them independently of the checkpoint reader.
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { SafetensorsWriter } from '../../src/core/checkpoint/safetensors.js';
import { encodeFromF32, type DType } from '../../src/core/dtype.js';
import { Rng } from './rng.js';

export type Arch = 'llama' | 'qwen2' | 'gpt2' | 'opt';

export interface TinyModel {
  dir: string;
  arch: Arch;
  dtype: DType;
  d: number;
  dFF: number;
  nLayers: number;
  /** Canonical tensors (names of src/core/model/spec.ts, orientation [out, in]) as f32 values. */
  canonical: Map<string, { shape: number[]; values: Float32Array }>;
}

export interface TinyOptions {
  arch: Arch;
  dtype?: DType;
  seed?: number;
  d?: number;
  dFF?: number;
  nLayers?: number;
  vocab?: number;
  tied?: boolean;
  /** Put NaN, ±Inf, subnormals and rounding ties into some weights. */
  specials?: boolean;
  tokenizer?: boolean;
}

/** Writes config.json + model.safetensors into `dir` and returns the canonical values. */
export async function writeTinyCheckpoint(dir: string, o: TinyOptions): Promise<TinyModel> {
  mkdirSync(dir, { recursive: true });
  const rng = new Rng(o.seed ?? 1);
  const dtype = o.dtype ?? 'F32';
  const d = o.d ?? 24;
  const dFF = o.dFF ?? 40;
  const nLayers = o.nLayers ?? 2;
  const vocab = o.vocab ?? 50;
  const heads = 4;
  const hd = d / heads;
  const kvHeads = o.arch === 'llama' || o.arch === 'qwen2' ? 2 : heads;
  const maxPos = 16;
  const tied = o.tied ?? (o.arch !== 'llama');
  const canonical = new Map<string, { shape: number[]; values: Float32Array }>();
  const stored: { name: string; shape: number[]; values: Float32Array }[] = [];

  const rand = (n: number) => {
    const v = rng.normalArray(n, 0.5);
    if (o.specials && n > 16) {
      v[0] = NaN;
      v[1] = Infinity;
      v[2] = -Infinity;
      v[3] = 1e-40; // f32 subnormal
      v[4] = 1 + 2 ** -8; // bf16 tie (rounds to even: 1)
      v[5] = 1 + 3 * 2 ** -8; // bf16 tie (rounds up)
      v[6] = 70000; // f16 overflow → Inf
      v[7] = 2 ** -20; // f16 subnormal
    }
    return v;
  };
  /** A canonical tensor stored as itself under `hfName`. */
  const plain = (canon: string, hfName: string, shape: number[]) => {
    const values = rand(shape.reduce((a, b) => a * b, 1));
    canonical.set(canon, { shape, values });
    stored.push({ name: hfName, shape, values });
  };
  /** A canonical [out, in] weight stored as Conv1D [in, out] (GPT-2). */
  const conv1d = (canon: string, hfName: string, out: number, inp: number) => {
    const values = rand(out * inp);
    canonical.set(canon, { shape: [out, inp], values });
    const t = new Float32Array(out * inp);
    for (let r = 0; r < out; r++) for (let c = 0; c < inp; c++) t[c * out + r] = values[r * inp + c]!;
    stored.push({ name: hfName, shape: [inp, out], values: t });
  };

  let config: Record<string, unknown>;
  if (o.arch === 'llama' || o.arch === 'qwen2') {
    config = {
      model_type: o.arch,
      hidden_size: d,
      intermediate_size: dFF,
      num_hidden_layers: nLayers,
      num_attention_heads: heads,
      num_key_value_heads: kvHeads,
      vocab_size: vocab,
      max_position_embeddings: maxPos,
      hidden_act: 'relu',
      rms_norm_eps: 1e-5,
      tie_word_embeddings: tied,
      bos_token_id: 1,
      eos_token_id: 2,
    };
    plain('embed.weight', 'model.embed_tokens.weight', [vocab, d]);
    for (let i = 0; i < nLayers; i++) {
      const L = `model.layers.${i}.`;
      const C = `layers.${i}.`;
      plain(C + 'attn_norm.weight', L + 'input_layernorm.weight', [d]);
      for (const [p, rows] of [['q', heads * hd], ['k', kvHeads * hd], ['v', kvHeads * hd]] as const) {
        plain(`${C}attn.${p}.weight`, `${L}self_attn.${p}_proj.weight`, [rows, d]);
        if (o.arch === 'qwen2') plain(`${C}attn.${p}.bias`, `${L}self_attn.${p}_proj.bias`, [rows]);
      }
      plain(C + 'attn.o.weight', L + 'self_attn.o_proj.weight', [d, heads * hd]);
      plain(C + 'ffn_norm.weight', L + 'post_attention_layernorm.weight', [d]);
      plain(C + 'ffn.gate.weight', L + 'mlp.gate_proj.weight', [dFF, d]);
      plain(C + 'ffn.up.weight', L + 'mlp.up_proj.weight', [dFF, d]);
      plain(C + 'ffn.down.weight', L + 'mlp.down_proj.weight', [d, dFF]);
    }
    plain('final_norm.weight', 'model.norm.weight', [d]);
    if (!tied) plain('lm_head.weight', 'lm_head.weight', [vocab, d]);
  } else if (o.arch === 'gpt2') {
    config = { model_type: 'gpt2', n_embd: d, n_layer: nLayers, n_head: heads, vocab_size: vocab, n_positions: maxPos, n_inner: dFF, activation_function: 'relu' };
    plain('embed.weight', 'transformer.wte.weight', [vocab, d]);
    plain('pos_embed.weight', 'transformer.wpe.weight', [maxPos, d]);
    for (let i = 0; i < nLayers; i++) {
      const H = `transformer.h.${i}.`;
      const C = `layers.${i}.`;
      plain(C + 'attn_norm.weight', H + 'ln_1.weight', [d]);
      plain(C + 'attn_norm.bias', H + 'ln_1.bias', [d]);
      // Fused c_attn [d, 3d] (Conv1D): columns [0,d) q, [d,2d) k, [2d,3d) v.
      const qkv = ['q', 'k', 'v'].map((p) => {
        const w = rand(d * d);
        const b = rand(d);
        canonical.set(`${C}attn.${p}.weight`, { shape: [d, d], values: w });
        canonical.set(`${C}attn.${p}.bias`, { shape: [d], values: b });
        return { w, b };
      });
      const cw = new Float32Array(d * 3 * d);
      const cb = new Float32Array(3 * d);
      qkv.forEach(({ w, b }, part) => {
        for (let r = 0; r < d; r++) for (let c = 0; c < d; c++) cw[c * 3 * d + part * d + r] = w[r * d + c]!;
        cb.set(b, part * d);
      });
      stored.push({ name: H + 'attn.c_attn.weight', shape: [d, 3 * d], values: cw });
      stored.push({ name: H + 'attn.c_attn.bias', shape: [3 * d], values: cb });
      conv1d(C + 'attn.o.weight', H + 'attn.c_proj.weight', d, d);
      plain(C + 'attn.o.bias', H + 'attn.c_proj.bias', [d]);
      plain(C + 'ffn_norm.weight', H + 'ln_2.weight', [d]);
      plain(C + 'ffn_norm.bias', H + 'ln_2.bias', [d]);
      conv1d(C + 'ffn.up.weight', H + 'mlp.c_fc.weight', dFF, d);
      plain(C + 'ffn.up.bias', H + 'mlp.c_fc.bias', [dFF]);
      conv1d(C + 'ffn.down.weight', H + 'mlp.c_proj.weight', d, dFF);
      plain(C + 'ffn.down.bias', H + 'mlp.c_proj.bias', [d]);
    }
    plain('final_norm.weight', 'transformer.ln_f.weight', [d]);
    plain('final_norm.bias', 'transformer.ln_f.bias', [d]);
  } else {
    config = {
      model_type: 'opt', hidden_size: d, ffn_dim: dFF, num_hidden_layers: nLayers, num_attention_heads: heads, vocab_size: vocab,
      max_position_embeddings: maxPos, activation_function: 'relu', do_layer_norm_before: true, word_embed_proj_dim: d,
    };
    plain('embed.weight', 'model.decoder.embed_tokens.weight', [vocab, d]);
    plain('pos_embed.weight', 'model.decoder.embed_positions.weight', [maxPos + 2, d]);
    for (let i = 0; i < nLayers; i++) {
      const L = `model.decoder.layers.${i}.`;
      const C = `layers.${i}.`;
      plain(C + 'attn_norm.weight', L + 'self_attn_layer_norm.weight', [d]);
      plain(C + 'attn_norm.bias', L + 'self_attn_layer_norm.bias', [d]);
      for (const p of ['q', 'k', 'v'] as const) {
        plain(`${C}attn.${p}.weight`, `${L}self_attn.${p}_proj.weight`, [d, d]);
        plain(`${C}attn.${p}.bias`, `${L}self_attn.${p}_proj.bias`, [d]);
      }
      plain(C + 'attn.o.weight', L + 'self_attn.out_proj.weight', [d, d]);
      plain(C + 'attn.o.bias', L + 'self_attn.out_proj.bias', [d]);
      plain(C + 'ffn_norm.weight', L + 'final_layer_norm.weight', [d]);
      plain(C + 'ffn_norm.bias', L + 'final_layer_norm.bias', [d]);
      plain(C + 'ffn.up.weight', L + 'fc1.weight', [dFF, d]);
      plain(C + 'ffn.up.bias', L + 'fc1.bias', [dFF]);
      plain(C + 'ffn.down.weight', L + 'fc2.weight', [d, dFF]);
      plain(C + 'ffn.down.bias', L + 'fc2.bias', [d]);
    }
    plain('final_norm.weight', 'model.decoder.final_layer_norm.weight', [d]);
    plain('final_norm.bias', 'model.decoder.final_layer_norm.bias', [d]);
  }
  writeFileSync(join(dir, 'config.json'), JSON.stringify(config, null, 2));
  // The stored values are what the checkpoint holds: round the canonical copies to the file dtype.
  const bytes = stored.map((t) => encodeFromF32(t.values, dtype));
  const w = await SafetensorsWriter.create(join(dir, 'model.safetensors'), { tensors: stored.map((t) => ({ name: t.name, dtype, shape: t.shape })) });
  for (let i = 0; i < stored.length; i++) await w.write(stored[i]!.name, bytes[i]!);
  await w.finish();
  if (dtype !== 'F32') {
    for (const [, t] of canonical) t.values.set(roundTo(t.values, dtype));
  }
  if (o.tokenizer) {
    writeFileSync(join(dir, 'tokenizer.json'), JSON.stringify({ version: '1.0', model: { type: 'WordLevel', vocab: { a: 0, b: 1 }, unk_token: 'a' } }));
    writeFileSync(join(dir, 'tokenizer_config.json'), JSON.stringify({ eos_token: 'b' }));
  }
  return { dir, arch: o.arch, dtype, d, dFF, nLayers, canonical };
}

/** The f32 values a `dtype` file stores for `v` (round trip through the scalar conversions). */
function roundTo(v: Float32Array, dtype: DType): Float32Array {
  const b = encodeFromF32(v, dtype);
  const view = new DataView(b.buffer);
  const out = new Float32Array(v.length);
  for (let i = 0; i < v.length; i++) {
    const h = view.getUint16(i * 2, true);
    if (dtype === 'BF16') {
      out[i] = new Float32Array(new Uint32Array([h << 16]).buffer)[0]!;
    } else {
      const sign = h & 0x8000 ? -1 : 1;
      const e = (h >>> 10) & 0x1f;
      const m = h & 0x3ff;
      out[i] = e === 0 ? sign * m * 2 ** -24 : e === 0x1f ? (m ? NaN : sign * Infinity) : sign * (1 + m / 1024) * 2 ** (e - 15);
    }
  }
  return out;
}

export interface SyntheticOptions {
  dModel: number;
  dFF: number;
  nLayers: number;
  vocab: number;
  dtype: DType;
  seed?: number;
  /** Called with bytes written. */
  onProgress?: (bytes: number) => void;
}

/**
 * A large Llama-shaped checkpoint (config.json + model.safetensors) written fast: one seeded block
 * of random values reused at a different offset for each tensor, streamed in 16 MiB chunks.
 * Returns the safetensors file size.
 */
export async function writeSyntheticLlama(dir: string, o: SyntheticOptions): Promise<number> {
  mkdirSync(dir, { recursive: true });
  const heads = Math.max(1, Math.round(o.dModel / 128));
  const config = {
    model_type: 'llama', hidden_size: o.dModel, intermediate_size: o.dFF, num_hidden_layers: o.nLayers, num_attention_heads: heads,
    num_key_value_heads: heads, vocab_size: o.vocab, max_position_embeddings: 4096, hidden_act: 'relu', rms_norm_eps: 1e-5, tie_word_embeddings: false,
  };
  writeFileSync(join(dir, 'config.json'), JSON.stringify(config, null, 2));
  const d = o.dModel;
  const tensors: { name: string; dtype: DType; shape: number[] }[] = [{ name: 'model.embed_tokens.weight', dtype: o.dtype, shape: [o.vocab, d] }];
  for (let i = 0; i < o.nLayers; i++) {
    const L = `model.layers.${i}.`;
    tensors.push({ name: L + 'input_layernorm.weight', dtype: o.dtype, shape: [d] });
    for (const p of ['q', 'k', 'v', 'o']) tensors.push({ name: `${L}self_attn.${p}_proj.weight`, dtype: o.dtype, shape: [d, d] });
    tensors.push({ name: L + 'post_attention_layernorm.weight', dtype: o.dtype, shape: [d] });
    tensors.push({ name: L + 'mlp.gate_proj.weight', dtype: o.dtype, shape: [o.dFF, d] });
    tensors.push({ name: L + 'mlp.up_proj.weight', dtype: o.dtype, shape: [o.dFF, d] });
    tensors.push({ name: L + 'mlp.down_proj.weight', dtype: o.dtype, shape: [d, o.dFF] });
  }
  tensors.push({ name: 'model.norm.weight', dtype: o.dtype, shape: [d] });
  tensors.push({ name: 'lm_head.weight', dtype: o.dtype, shape: [o.vocab, d] });
  const rng = new Rng(o.seed ?? 99);
  const elem = o.dtype === 'F32' ? 4 : 2;
  const blockElems = (1 << 20) + 7; // odd length: tensors do not line up with block boundaries
  const block = encodeFromF32(rng.normalArray(blockElems, 0.02), o.dtype);
  const chunk = new Uint8Array(16 << 20);
  const path = join(dir, 'model.safetensors');
  const w = await SafetensorsWriter.create(path, { tensors });
  let shift = 0;
  for (const t of tensors) {
    let left = t.shape.reduce((a, b) => a * b, 1) * elem;
    shift = (shift + 4099 * elem) % block.length;
    let pos = shift;
    while (left > 0) {
      const nBytes = Math.min(left, chunk.length);
      let filled = 0;
      while (filled < nBytes) {
        const take = Math.min(nBytes - filled, block.length - pos);
        chunk.set(block.subarray(pos, pos + take), filled);
        filled += take;
        pos = (pos + take) % block.length;
      }
      await w.write(t.name, chunk.subarray(0, nBytes));
      o.onProgress?.(nBytes);
      left -= nBytes;
    }
  }
  await w.finish();
  return w.size;
}
