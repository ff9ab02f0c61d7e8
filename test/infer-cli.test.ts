// `sparsellm infer` end to end: spawns bin/sparsellm.js (needs `npm run build:ts`) on fixture
// models packed here, with the fixture tokenizer.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { copyFileSync, readFileSync, writeFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { REPO_ROOT, copyFixture } from './helpers/fixtures.js';
import { makeTempDir } from './helpers/tmp.js';

const BIN = join(REPO_ROOT, 'bin', 'sparsellm.js');
const TOKENIZER = join(REPO_ROOT, 'fixtures', 'tokenizer', 'tokenizer.json');

function run(args: string[], input?: string) {
  const r = spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', input, env: { ...process.env, OMP_NUM_THREADS: '2' } });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

let tmp: string;
let cleanup = () => undefined as void;
let llamaDir: string;
let llama: string;
let opt: string;

before(() => {
  ({ dir: tmp, cleanup } = makeTempDir('sllm-infer-'));
  llamaDir = copyFixture('llama-relu-gqa', tmp);
  copyFileSync(TOKENIZER, join(llamaDir, 'tokenizer.json'));
  llama = join(tmp, 'llama.sllm');
  let r = run(['pack', llamaDir, '-o', llama, '-q']);
  assert.equal(r.code, 0, r.stderr);
  const optDir = copyFixture('opt', tmp);
  copyFileSync(TOKENIZER, join(optDir, 'tokenizer.json'));
  opt = join(tmp, 'opt.sllm');
  r = run(['pack', optDir, '-o', opt, '-q']);
  assert.equal(r.code, 0, r.stderr);
});
after(() => cleanup());

test('greedy generation: JSON result, deterministic, streamed text equals the JSON text', () => {
  const args = ['infer', llama, '--prompt', 'The river and the town', '-n', '16', '--temperature', '0'];
  const a = run([...args, '--json']);
  assert.equal(a.code, 0, a.stderr);
  const ja = JSON.parse(a.stdout);
  assert.ok(ja.tokens.prompt > 0 && ja.tokens.generated > 0);
  assert.equal(ja.backend, 'cpu');
  assert.equal(ja.layers.length, 2);
  assert.ok(ja.layers[0].nnzMean > 0 && ja.layers[0].nnzMean < 300);
  assert.ok(ja.prefill.tokensPerSecond > 0);
  const b = JSON.parse(run([...args, '--json']).stdout);
  assert.equal(b.text, ja.text);
  // --mmap (the file mapped instead of read into huge-page memory) gives the same text.
  const mapped = run([...args, '--json', '--mmap']);
  assert.equal(mapped.code, 0, mapped.stderr);
  assert.equal(JSON.parse(mapped.stdout).text, ja.text);
  const streamed = run(args);
  assert.equal(streamed.code, 0, streamed.stderr);
  assert.equal(streamed.stdout, ja.text + '\n');
  assert.match(streamed.stderr, /FFN non-zeros per token/);
  // A bf16 KV cache runs and is reported (its logits against the f32 cache: model-decode.test.ts;
  // the greedy text may part from the f32 one at a near tie, so it is not compared here).
  const kv = run([...args, '--json', '--kv-cache', 'bf16']);
  assert.equal(kv.code, 0, kv.stderr);
  const jkv = JSON.parse(kv.stdout);
  assert.equal(jkv.kvCache, 'bf16');
  assert.equal(ja.kvCache, 'f32');
  assert.ok(jkv.tokens.generated > 0);
  // --dense gives the same greedy text.
  const d = JSON.parse(run([...args, '--json', '--dense']).stdout);
  assert.equal(d.text, ja.text);
  assert.equal(d.mode, 'dense');
});

test('sampling: same seed same text; prompt from stdin', () => {
  const args = ['infer', llama, '-n', '12', '--temperature', '1.2', '--seed', '7', '--json'];
  const a = JSON.parse(run([...args, '--prompt', 'the water']).stdout);
  const b = JSON.parse(run(args, 'the water').stdout);
  assert.equal(a.seed, 7);
  assert.equal(a.text, b.text);
});

test('dense checkpoint directory: packed on the fly with a notice', () => {
  const r = run(['infer', llamaDir, '--prompt', 'the', '-n', '3', '--temperature', '0', '--json']);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stderr, /on the fly/);
  const fromPacked = JSON.parse(run(['infer', llama, '--prompt', 'the', '-n', '3', '--temperature', '0', '--json']).stdout);
  assert.equal(JSON.parse(r.stdout).text, fromPacked.text);
});

test('perplexity over a file and a directory; sparse equals dense within rounding', () => {
  const dir = join(tmp, 'text');
  mkdirSync(dir, { recursive: true });
  const text = 'The river runs near the town. In the winter the water is cold, in the spring the birds return.\n';
  writeFileSync(join(dir, 'a.txt'), text.repeat(3));
  writeFileSync(join(dir, 'b.txt'), text);
  const s = run(['infer', opt, '--perplexity', join(dir, 'a.txt'), '--context', '32', '--json']);
  assert.equal(s.code, 0, s.stderr);
  const js = JSON.parse(s.stdout);
  const jd = JSON.parse(run(['infer', opt, '--perplexity', join(dir, 'a.txt'), '--context', '32', '--json', '--dense']).stdout);
  assert.ok(js.perplexity > 1 && isFinite(js.perplexity));
  assert.ok(Math.abs(js.perplexity - jd.perplexity) < 1e-4 * jd.perplexity, `${js.perplexity} vs ${jd.perplexity}`);
  assert.equal(js.context, 32);
  assert.ok(js.windows >= 2);
  const all = JSON.parse(run(['infer', opt, '--perplexity', dir, '--context', '32', '--json']).stdout);
  assert.deepEqual(all.files.map((f: string) => f.split('/').pop()), ['a.txt', 'b.txt']);
  assert.ok(all.tokens > js.tokens);
  const plain = run(['infer', opt, '--perplexity', join(dir, 'a.txt'), '--context', '32']);
  assert.match(plain.stdout, /^\d+\.\d{4}\n$/);
});

test('clear errors', () => {
  let r = run(['infer', llama, '--prompt', '']);
  assert.equal(r.code, 2, r.stderr);
  assert.match(r.stderr, /prompt is empty/);
  r = run(['infer', llama, '--prompt', 'the river and the town and the water', '--context', '4']);
  assert.equal(r.code, 2, r.stderr);
  assert.match(r.stderr, /context holds 4/);
  r = run(['infer', llama, '--prompt', 'caf\u00e9']);
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr, /no token for: "é"/);
  r = run(['infer', llama, '--prompt', 'x', '--backend', 'cuda']);
  assert.equal(r.code, 2, r.stderr);
  assert.match(r.stderr, /CUDA model runtime/);
  r = run(['infer', llama, '--prompt', 'x', '--context', '100000']);
  assert.equal(r.code, 2, r.stderr);
  assert.match(r.stderr, /--context must be in \[1, 128\]/);
  // A model without a tokenizer.
  const bare = join(tmp, 'bare.sllm');
  assert.equal(run(['pack', copyFixture('gpt2', tmp), '-o', bare, '-q']).code, 0);
  r = run(['infer', bare, '--prompt', 'hello']);
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr, /has no tokenizer/);
  // Corrupted (truncated) and newer-version files.
  const bytes = readFileSync(llama);
  const cut = join(tmp, 'cut.sllm');
  writeFileSync(cut, bytes.subarray(0, bytes.length - 64));
  r = run(['infer', cut, '--prompt', 'the']);
  assert.equal(r.code, 1, r.stderr);
  assert.ok(r.stderr.includes(cut), r.stderr);
  const n = Number(bytes.readBigUInt64LE(0));
  const header = bytes.subarray(8, 8 + n).toString('utf8').replace('"format_version":"1"', '"format_version":"7"');
  const newer = join(tmp, 'newer.sllm');
  writeFileSync(newer, Buffer.concat([bytes.subarray(0, 8), Buffer.from(header), bytes.subarray(8 + n)]));
  r = run(['infer', newer, '--prompt', 'the']);
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr, /newer sparsellm \(format version 7\)/);
  r = run(['infer', join(tmp, 'missing.sllm'), '--prompt', 'the']);
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr, /missing\.sllm/);
});
