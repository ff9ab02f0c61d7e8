// Tokenizers: Hugging Face tokenizer.json (through @huggingface/tokenizers, the official pure-JS
// implementation: offline, no dependencies) and sparsellm's byte-level tokenizer (token id =
// byte value, 256 = end of text) for models trained by this toolkit.
import { readFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { Tokenizer as HfTokenizer } from '@huggingface/tokenizers';
import { FormatError, SparseLlmError } from '../errors.js';

export type TokenizerKind = 'huggingface' | 'byte';

export interface Tokenizer {
  readonly kind: TokenizerKind;
  /** Number of ids the tokenizer can produce (the model's vocabulary must be at least this). */
  readonly vocabSize: number;
  /** The end-of-text id, when the tokenizer has one. */
  readonly eosId: number | undefined;
  /**
   * Text → ids. `addSpecial` adds what the tokenizer's post-processor adds around a sequence
   * (e.g. Llama's beginning-of-sequence id), as Hugging Face does by default for prompts.
   * Throws a TokenizerError when part of the text has no token.
   */
  encode(text: string, opts?: { addSpecial?: boolean }): number[];
  /** Ids → text (special tokens are dropped). */
  decode(ids: readonly number[]): string;
}

/** A prompt or text the tokenizer cannot represent. */
export class TokenizerError extends SparseLlmError {}

// ---- byte-level -------------------------------------------------------------------------------

export const BYTE_EOS_ID = 256;

export class ByteTokenizer implements Tokenizer {
  readonly kind = 'byte' as const;
  readonly vocabSize = 257;
  readonly eosId = BYTE_EOS_ID;
  encode(text: string, _opts?: { addSpecial?: boolean }): number[] {
    return [...Buffer.from(text, 'utf8')];
  }
  decode(ids: readonly number[]): string {
    const bytes = ids.filter((i) => i >= 0 && i < 256);
    return Buffer.from(bytes).toString('utf8');
  }
}

// ---- Hugging Face tokenizer.json -----------------------------------------------------------------

export class HuggingFaceTokenizer implements Tokenizer {
  readonly kind = 'huggingface' as const;
  readonly vocabSize: number;
  readonly eosId: number | undefined;
  private readonly tok: HfTokenizer;
  private readonly unkId: number | undefined;
  private readonly hasNormalizer: boolean;

  /**
   * @param json the parsed tokenizer.json
   * @param config the parsed tokenizer_config.json (optional; gives eos_token)
   * @param eosId an explicit end-of-text id (the model config's eos_token_id wins when given)
   */
  constructor(json: Record<string, unknown>, config: Record<string, unknown> = {}, eosId?: number, source = 'tokenizer.json') {
    if (typeof json !== 'object' || json === null || typeof json.model !== 'object' || json.model === null) {
      throw new FormatError(source, 'not a tokenizer.json (no "model" object)');
    }
    try {
      this.tok = new HfTokenizer(json, config);
    } catch (err) {
      throw new FormatError(source, `cannot build the tokenizer: ${(err as Error).message}`);
    }
    const vocab = this.tok.get_vocab(true);
    let max = -1;
    for (const id of vocab.values()) if (id > max) max = id;
    this.vocabSize = max + 1;
    const model = json.model as Record<string, unknown>;
    const unk = typeof model.unk_token === 'string' ? model.unk_token : undefined;
    this.unkId = unk !== undefined ? this.tok.token_to_id(unk) : undefined;
    this.hasNormalizer = json.normalizer !== null && json.normalizer !== undefined;
    if (eosId !== undefined) this.eosId = eosId;
    else {
      const e = config.eos_token;
      const name = typeof e === 'string' ? e : e && typeof e === 'object' ? (e as { content?: unknown }).content : undefined;
      let id = typeof name === 'string' ? this.tok.token_to_id(name) : undefined;
      if (id === undefined) {
        for (const cand of ['<|endoftext|>', '</s>', '<|end_of_text|>', '<eos>']) {
          id = this.tok.token_to_id(cand);
          if (id !== undefined) break;
        }
      }
      this.eosId = id;
    }
  }

  encode(text: string, opts: { addSpecial?: boolean } = {}): number[] {
    const ids = this.tok.encode(text, { add_special_tokens: !!opts.addSpecial }).ids;
    for (const id of ids) {
      if (!Number.isInteger(id)) throw new TokenizerError(`the text contains pieces the tokenizer has no token for`);
      if (this.unkId !== undefined && id === this.unkId) {
        throw new TokenizerError(`the text contains characters the tokenizer maps to its unknown token`);
      }
    }
    // Tokenizers without an unknown token drop what they cannot encode; find what went missing.
    if (!this.hasNormalizer) {
      const plain = opts.addSpecial ? this.tok.encode(text, { add_special_tokens: false }).ids : ids;
      const back = this.tok.decode(plain, { skip_special_tokens: false, clean_up_tokenization_spaces: false });
      if (back !== text) {
        const missing = missingChars(text, back);
        if (missing.length) {
          throw new TokenizerError(
            `the text contains characters the tokenizer has no token for: ${missing.map((c) => JSON.stringify(c)).join(', ')}`,
          );
        }
      }
    }
    return ids;
  }

  decode(ids: readonly number[]): string {
    return this.tok.decode([...ids], { skip_special_tokens: true, clean_up_tokenization_spaces: false });
  }
}

/** Characters of `text` that occur fewer times in `back` (at most 8 shown). */
function missingChars(text: string, back: string): string[] {
  const count = new Map<string, number>();
  for (const c of back) count.set(c, (count.get(c) ?? 0) + 1);
  const out: string[] = [];
  for (const c of text) {
    const n = count.get(c) ?? 0;
    if (n > 0) count.set(c, n - 1);
    else if (!out.includes(c)) out.push(c);
    if (out.length >= 8) break;
  }
  return out;
}

/** Builds a tokenizer from the bytes of a tokenizer.json (e.g. the one stored in a packed file). */
export function tokenizerFromJsonBytes(bytes: Uint8Array, source: string, config: Record<string, unknown> = {}, eosId?: number): HuggingFaceTokenizer {
  let json: unknown;
  try {
    json = JSON.parse(Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString('utf8'));
  } catch (err) {
    throw new FormatError(source, `tokenizer.json is not valid JSON: ${(err as Error).message}`);
  }
  return new HuggingFaceTokenizer(json as Record<string, unknown>, config, eosId, source);
}

/**
 * Loads tokenizer.json (and tokenizer_config.json when present) from a checkpoint directory;
 * undefined when the directory has no tokenizer.json.
 */
export function loadTokenizerDir(dir: string, eosId?: number): HuggingFaceTokenizer | undefined {
  const path = join(dir, 'tokenizer.json');
  if (!existsSync(path)) return undefined;
  const configPath = join(dir, 'tokenizer_config.json');
  let config: Record<string, unknown> = {};
  if (existsSync(configPath)) {
    try {
      config = JSON.parse(readFileSync(configPath, 'utf8')) as Record<string, unknown>;
    } catch (err) {
      throw new FormatError(configPath, `not valid JSON: ${(err as Error).message}`);
    }
  }
  return tokenizerFromJsonBytes(readFileSync(path), path, config, eosId);
}

/**
 * Turns generated ids into text as they come: emits only complete characters (a multi-byte
 * character split over several tokens is held back until it is whole).
 */
export class StreamDecoder {
  private ids: number[] = [];
  private emitted = '';
  constructor(private readonly tok: Tokenizer) {}

  /** Adds one id; returns the new text that became final (possibly empty). */
  push(id: number): string {
    this.ids.push(id);
    const text = this.tok.decode(this.ids);
    // Hold back a trailing replacement character: it may be half of a multi-byte character.
    let stable = text;
    while (stable.endsWith('\uFFFD')) stable = stable.slice(0, -1);
    // A decoder may rewrite earlier text (cleanup rules); what was printed stays printed.
    const out = stable.startsWith(this.emitted) ? stable.slice(this.emitted.length) : '';
    if (out) this.emitted = stable;
    return out;
  }

  /** Whatever is left (including a dangling partial character, as U+FFFD). */
  flush(): string {
    const text = this.tok.decode(this.ids);
    const out = text.startsWith(this.emitted) ? text.slice(this.emitted.length) : '';
    this.emitted = text;
    return out;
  }

  /** All text so far. */
  get text(): string {
    return this.tok.decode(this.ids);
  }
}
