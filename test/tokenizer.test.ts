// Tokenizers: the fixture tokenizer.json through @huggingface/tokenizers, the byte tokenizer,
// unknown characters, and streaming decode of multi-byte characters.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  ByteTokenizer,
  loadTokenizerDir,
  StreamDecoder,
  tokenizerFromJsonBytes,
  TokenizerError,
  BYTE_EOS_ID,
} from '../src/core/tokenizer/index.js';
import { FormatError } from '../src/core/errors.js';

const FIXTURE = join(import.meta.dirname, '..', 'fixtures', 'tokenizer');

test('fixture tokenizer.json: 256 ids, eos, round trip of ASCII text', () => {
  const tok = loadTokenizerDir(FIXTURE)!;
  assert.ok(tok);
  assert.equal(tok.kind, 'huggingface');
  assert.equal(tok.vocabSize, 256);
  assert.equal(tok.eosId, 255);
  const text = 'The engine reads the packed model.\nThen\tit samples 42 tokens!';
  const ids = tok.encode(text);
  assert.ok(ids.length < Buffer.byteLength(text), 'merges shorten the sequence');
  assert.ok(ids.every((i) => Number.isInteger(i) && i >= 0 && i < 255));
  assert.equal(tok.decode(ids), text);
  // end-of-text is dropped by decode
  assert.equal(tok.decode([...ids, 255]), text);
});

test('fixture tokenizer: characters without a token are an error naming them', () => {
  const tok = loadTokenizerDir(FIXTURE)!;
  assert.throws(() => tok.encode('caf\u00e9 ok'), (e: unknown) => e instanceof TokenizerError && /"é"/.test((e as Error).message));
});

test('tokenizer.json that is not JSON or not a tokenizer: FormatError naming the source', () => {
  assert.throws(() => tokenizerFromJsonBytes(Buffer.from('{oops'), 'm.sllm'), (e: unknown) => e instanceof FormatError && /m\.sllm/.test((e as Error).message));
  assert.throws(() => tokenizerFromJsonBytes(Buffer.from('{"a":1}'), 'm.sllm'), FormatError);
  const dir = mkdtempSync(join(tmpdir(), 'sllm-tok-'));
  assert.equal(loadTokenizerDir(dir), undefined);
  writeFileSync(join(dir, 'tokenizer.json'), readFileSync(join(FIXTURE, 'tokenizer.json')));
  writeFileSync(join(dir, 'tokenizer_config.json'), '{bad');
  assert.throws(() => loadTokenizerDir(dir), FormatError);
});

test('byte tokenizer: ids are bytes, 256 is end of text', () => {
  const tok = new ByteTokenizer();
  const text = 'naïve → ok';
  const ids = tok.encode(text);
  assert.deepEqual(ids, [...Buffer.from(text, 'utf8')]);
  assert.equal(tok.decode([...ids, BYTE_EOS_ID]), text);
  assert.equal(tok.vocabSize, 257);
});

test('stream decoder holds back a split multi-byte character', () => {
  const tok = new ByteTokenizer();
  const ids = tok.encode('a→b');
  const dec = new StreamDecoder(tok);
  const pieces = ids.map((i) => dec.push(i));
  assert.deepEqual(pieces, ['a', '', '', '→', 'b']);
  assert.equal(dec.flush(), '');
  const hf = loadTokenizerDir(FIXTURE)!;
  const d2 = new StreamDecoder(hf);
  const text = 'the river and the town';
  assert.equal(hf.encode(text).map((i) => d2.push(i)).join(''), text);
});
