// Training checkpoints: a Hugging Face directory (config.json with model_type llama, hidden_act
// relu, tied embeddings; model.safetensors in f32; tokenizer.json) plus training_state.safetensors
// (AdamW moments, the dead-neuron window, and in its metadata the step, per-layer FFN paths, the
// run's options and its history). Written into a temporary sibling directory and swapped in by
// renames, so a kill during a save leaves the previous checkpoint whole (see recoverCheckpoint).
import { existsSync } from 'node:fs';
import { mkdir, open, rename, rm, readFile } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import { randomBytes } from 'node:crypto';
import { SafetensorsFile, SafetensorsWriter } from '../checkpoint/safetensors.js';
import { FormatError } from '../errors.js';
import type { ModelTrainer, TrainModelShape, TrainerStateData } from './engine.js';

export const STATE_FILE = 'training_state.safetensors';
const STATE_KEY = 'sparsellm.train';

/** What the state file's metadata holds besides the tensors. */
export interface TrainMeta {
  version: 1;
  step: number;
  tokensSeen: number;
  windowTokens: number;
  hybrid: number[];
  lastNnz: number[];
  dead: number[];
  /** The options the run was started with (the CLI's resolved config). */
  options: Record<string, unknown>;
  history: unknown[];
  elapsedSeconds: number;
}

export function hfConfig(shape: TrainModelShape, eosId: number | undefined, extra: Record<string, unknown>): Record<string, unknown> {
  return {
    architectures: ['LlamaForCausalLM'],
    model_type: 'llama',
    hidden_act: 'relu',
    hidden_size: shape.dModel,
    intermediate_size: shape.dFF,
    num_hidden_layers: shape.layers,
    num_attention_heads: shape.heads,
    num_key_value_heads: shape.heads,
    head_dim: shape.dModel / shape.heads,
    max_position_embeddings: shape.context,
    rms_norm_eps: shape.normEps,
    rope_theta: shape.ropeTheta,
    vocab_size: shape.vocab,
    tie_word_embeddings: true,
    attention_bias: false,
    mlp_bias: false,
    torch_dtype: 'float32',
    ...(eosId !== undefined ? { eos_token_id: eosId } : {}),
    sparsellm: extra,
  };
}

async function writeFileSynced(path: string, data: string | Uint8Array): Promise<void> {
  const fh = await open(path, 'wx');
  try {
    await fh.writeFile(data);
    await fh.sync();
  } finally {
    await fh.close();
  }
}

function bytesOf(a: Float32Array | Uint8Array): Uint8Array {
  return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
}

export interface TokenizerFiles {
  json: Uint8Array | string;
  config: Uint8Array | string | null;
}

/**
 * Writes the checkpoint to `dir` atomically: everything goes to `<dir>.tmp-…`, then `dir` (if
 * present) is renamed to `<dir>.old`, the new one renamed into place, and the old one removed.
 */
export async function saveCheckpoint(
  dir: string,
  trainer: ModelTrainer,
  config: Record<string, unknown>,
  tokenizer: TokenizerFiles | null,
  meta: TrainMeta,
): Promise<void> {
  dir = resolve(dir);
  await mkdir(dirname(dir), { recursive: true });
  const tmp = join(dirname(dir), `.${basename(dir)}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`);
  await mkdir(tmp);
  try {
    await writeFileSynced(join(tmp, 'config.json'), JSON.stringify(config, null, 2) + '\n');
    const tensors = trainer.tensors;
    const w = await SafetensorsWriter.create(join(tmp, 'model.safetensors'), {
      tensors: tensors.map((t) => ({ name: t.name, dtype: 'F32', shape: t.shape })),
      metadata: { format: 'pt' },
    });
    try {
      for (const t of tensors) await w.write(t.name, bytesOf(trainer.getTensor(t.name)));
      await w.finish();
    } catch (e) {
      await w.abort();
      throw e;
    }
    if (tokenizer) {
      await writeFileSynced(join(tmp, 'tokenizer.json'), tokenizer.json);
      if (tokenizer.config) await writeFileSynced(join(tmp, 'tokenizer_config.json'), tokenizer.config);
    }
    const st = trainer.getState();
    const s = await SafetensorsWriter.create(join(tmp, STATE_FILE), {
      tensors: [
        { name: 'optimizer.m', dtype: 'F32', shape: [st.m.length] },
        { name: 'optimizer.v', dtype: 'F32', shape: [st.v.length] },
        { name: 'dead_window.fired', dtype: 'U8', shape: [st.fired.length] },
      ],
      metadata: { [STATE_KEY]: JSON.stringify(meta) },
    });
    try {
      await s.write('optimizer.m', bytesOf(st.m));
      await s.write('optimizer.v', bytesOf(st.v));
      await s.write('dead_window.fired', bytesOf(st.fired));
      await s.finish();
    } catch (e) {
      await s.abort();
      throw e;
    }
    const old = `${dir}.old`;
    await rm(old, { recursive: true, force: true });
    if (existsSync(dir)) await rename(dir, old);
    await rename(tmp, dir);
    await rm(old, { recursive: true, force: true });
  } catch (e) {
    await rm(tmp, { recursive: true, force: true });
    throw e;
  }
}

/** After a kill between the two renames of a save: puts `<dir>.old` back. Removes stale temporaries. */
export async function recoverCheckpoint(dir: string): Promise<boolean> {
  dir = resolve(dir);
  const old = `${dir}.old`;
  if (!existsSync(dir) && existsSync(old)) {
    await rename(old, dir);
    return true;
  }
  return false;
}

export interface LoadedState {
  meta: TrainMeta;
  state: TrainerStateData;
}

/** Reads training_state.safetensors of a checkpoint directory, validating shapes against the trainer. */
export async function loadTrainingState(dir: string, paramCount: number, layers: number, dFF: number): Promise<LoadedState> {
  const path = join(dir, STATE_FILE);
  if (!existsSync(path)) throw new FormatError(path, 'no such file: not a checkpoint written by `sparsellm train` (use --init to start from a model)');
  const f = await SafetensorsFile.open(path, { dtypes: ['F32', 'U8'] });
  try {
    const raw = f.metadata[STATE_KEY];
    if (!raw) throw new FormatError(path, `metadata has no '${STATE_KEY}' entry`);
    let meta: TrainMeta;
    try {
      meta = JSON.parse(raw) as TrainMeta;
    } catch {
      throw new FormatError(path, `metadata '${STATE_KEY}' is not valid JSON`);
    }
    if (meta.version !== 1 || !Number.isInteger(meta.step) || meta.step < 0) throw new FormatError(path, 'unsupported or corrupt training-state metadata');
    for (const k of ['hybrid', 'lastNnz', 'dead'] as const) {
      if (!Array.isArray(meta[k]) || meta[k].length !== layers) throw new FormatError(path, `metadata '${k}' does not have one entry per layer (${layers})`);
    }
    const want: Record<string, [string, number]> = {
      'optimizer.m': ['F32', paramCount],
      'optimizer.v': ['F32', paramCount],
      'dead_window.fired': ['U8', layers * dFF],
    };
    const arrays: Record<string, Uint8Array> = {};
    for (const [name, [dtype, n]] of Object.entries(want)) {
      if (!f.has(name)) throw new FormatError(path, `tensor '${name}' is missing`);
      const info = f.info(name);
      if (info.dtype !== dtype || info.shape.length !== 1 || info.shape[0] !== n) {
        throw new FormatError(path, `tensor '${name}' is ${info.dtype}${JSON.stringify(info.shape)}, expected ${dtype}[${n}] for this model`);
      }
      arrays[name] = await f.readTensorBytes(name);
    }
    const f32 = (b: Uint8Array): Float32Array => {
      const c = new Uint8Array(b.byteLength);
      c.set(b);
      return new Float32Array(c.buffer);
    };
    const state: TrainerStateData = {
      step: meta.step,
      windowTokens: meta.windowTokens,
      hybrid: meta.hybrid,
      lastNnz: meta.lastNnz,
      dead: meta.dead,
      fired: Uint8Array.from(arrays['dead_window.fired']!),
      m: f32(arrays['optimizer.m']!),
      v: f32(arrays['optimizer.v']!),
    };
    return { meta, state };
  } finally {
    await f.close();
  }
}

export async function readTokenizerFiles(dir: string): Promise<TokenizerFiles | null> {
  const j = join(dir, 'tokenizer.json');
  if (!existsSync(j)) return null;
  const c = join(dir, 'tokenizer_config.json');
  return { json: await readFile(j), config: existsSync(c) ? await readFile(c) : null };
}

