// A Hugging Face tokenizer.json that describes sparsellm's byte-level tokenizer exactly (id =
// byte value, 256 = <|endoftext|>), written beside checkpoints trained with it so that any
// tokenizer.json consumer (our pack/infer, Hugging Face) encodes and decodes the same ids.
// Byte-level BPE with the GPT-2 byte→character map, an identity vocabulary and no merges.

export const BYTE_EOS_TOKEN = '<|endoftext|>';

/** GPT-2's byte-level alphabet: printable bytes map to themselves, the rest to U+0100 onwards. */
function byteChars(): string[] {
  const direct = new Set<number>();
  for (let b = 33; b <= 126; b++) direct.add(b);
  for (let b = 161; b <= 172; b++) direct.add(b);
  for (let b = 174; b <= 255; b++) direct.add(b);
  const out: string[] = [];
  let n = 0;
  for (let b = 0; b < 256; b++) out.push(direct.has(b) ? String.fromCodePoint(b) : String.fromCodePoint(256 + n++));
  return out;
}

export function byteTokenizerJson(): string {
  const vocab: Record<string, number> = {};
  byteChars().forEach((c, b) => {
    vocab[c] = b;
  });
  const byteLevel = { type: 'ByteLevel', add_prefix_space: false, trim_offsets: false, use_regex: false };
  return JSON.stringify({
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: [
      { id: 256, content: BYTE_EOS_TOKEN, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true },
    ],
    normalizer: null,
    pre_tokenizer: byteLevel,
    post_processor: null,
    decoder: byteLevel,
    model: {
      type: 'BPE',
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: false,
      byte_fallback: false,
      ignore_merges: false,
      vocab,
      merges: [],
    },
  });
}

export function byteTokenizerConfigJson(context: number): string {
  return JSON.stringify(
    { tokenizer_class: 'PreTrainedTokenizerFast', eos_token: BYTE_EOS_TOKEN, model_max_length: context, sparsellm_tokenizer: 'byte' },
    null,
    2,
  );
}
