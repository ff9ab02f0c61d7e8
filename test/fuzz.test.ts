// Fuzzing the packed-format path: hundreds of seeded mutations of fixture checkpoints and packed
// files (header byte flips, truncation, header-length corruption, JSON edits, offset edits, config
// edits) go through openPacked, and through openCheckpoint + writePacked in-process. Every case
// must end in a FormatError/ModelError or a correct result (the output verifies against its
// source), within a time bound, and never leave a file at the output path or a temporary file.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { cpSync, existsSync, mkdirSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { openCheckpoint } from '../src/core/checkpoint/index.js';
import { FormatError, ModelError } from '../src/core/errors.js';
import { openPacked, packInputFromCheckpoint, verifyPacked, writePacked } from '../src/core/format/index.js';
import { Rng } from './helpers/rng.js';
import { tempDir } from './helpers/tmp.js';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
const FIXTURES = join(ROOT, 'fixtures', 'models');
const seed = Rng.seedFromEnv(424242);
console.log(`fuzz.test seed=${seed}`);
const rng = new Rng(seed);
const dir = tempDir(after, 'sparsellm-fuzz-');
const CASE_TIMEOUT_MS = 15_000;

const pick = <T>(xs: readonly T[]): T => xs[rng.int(0, xs.length - 1)]!;

/** Runs `fn` with a time bound: a hang fails the test instead of stalling the suite. */
async function bounded<T>(what: string, fn: () => Promise<T>): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer within ${CASE_TIMEOUT_MS} ms (hang)`)), CASE_TIMEOUT_MS);
  });
  try {
    return await Promise.race([fn(), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** A clean error: one of the typed errors, a one-line message that names a file. */
function assertClean(what: string, e: unknown): void {
  if (!(e instanceof FormatError || e instanceof ModelError)) {
    assert.fail(`${what}: expected FormatError or ModelError, got ${e instanceof Error ? `${e.constructor.name}: ${e.message}\n${e.stack}` : String(e)}`);
  }
  assert.ok(!e.message.includes('\n'), `${what}: one-line message: ${e.message}`);
  assert.ok(e.message.startsWith(e.file), `${what}: message names the file: ${e.message}`);
}

// ---- mutations of a safetensors file ------------------------------------------------------------

interface Parsed {
  n: number;
  header: Record<string, any>;
}

function parse(raw: Buffer): Parsed {
  const n = Number(raw.readBigUInt64LE(0));
  return { n, header: JSON.parse(raw.subarray(8, 8 + n).toString('utf8')) };
}

/** Re-serialises an edited header; keeps the data section; pads to the old length when shorter. */
function withHeader(raw: Buffer, p: Parsed, header: Record<string, any>): Buffer {
  let text = Buffer.from(JSON.stringify(header));
  if (text.length < p.n && rng.uniform() < 0.7) text = Buffer.concat([text, Buffer.alloc(p.n - text.length, 0x20)]);
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(text.length));
  return Buffer.concat([len, text, raw.subarray(8 + p.n)]);
}

const tensorNames = (h: Record<string, any>) => Object.keys(h).filter((k) => k !== '__metadata__');

const mutations: Record<string, (raw: Buffer) => Buffer> = {
  'flip header byte': (raw) => {
    const out = Buffer.from(raw);
    const n = Number(raw.readBigUInt64LE(0));
    for (let k = rng.int(1, 3); k > 0; k--) {
      const at = rng.int(8, 8 + n - 1);
      out[at] = out[at]! ^ (1 << rng.int(0, 7));
    }
    return out;
  },
  'random header byte': (raw) => {
    const out = Buffer.from(raw);
    const n = Number(raw.readBigUInt64LE(0));
    out[rng.int(8, 8 + n - 1)] = pick([0x22, 0x7b, 0x7d, 0x5b, 0x5d, 0x2c, 0x3a, 0x30, 0x39, 0x00, 0xff, 0x5c]);
    return out;
  },
  truncate: (raw) => raw.subarray(0, rng.int(0, raw.length - 1)),
  'header length': (raw) => {
    const out = Buffer.from(raw);
    const n = Number(raw.readBigUInt64LE(0));
    const v = pick([0n, 1n, 2n, BigInt(n - 1), BigInt(n + 1), BigInt(n + rng.int(2, 4096)), BigInt(raw.length), 2n ** 63n, 2n ** 64n - 1n, 100_000_001n]);
    out.writeBigUInt64LE(v < 0n ? 0n : v, 0);
    return out;
  },
  'data offsets': (raw) => {
    const p = parse(raw);
    const h = structuredClone(p.header);
    const t = h[pick(tensorNames(h))];
    const which = rng.int(0, 1);
    t.data_offsets[which] = pick([t.data_offsets[which] + rng.int(-70, 70), 0, -1, 1e300, raw.length, 2 ** 53, '12', null]);
    return withHeader(raw, p, h);
  },
  'swap offsets': (raw) => {
    const p = parse(raw);
    const h = structuredClone(p.header);
    const [a, b] = [pick(tensorNames(h)), pick(tensorNames(h))];
    [h[a].data_offsets, h[b].data_offsets] = [h[b].data_offsets, h[a].data_offsets];
    return withHeader(raw, p, h);
  },
  shape: (raw) => {
    const p = parse(raw);
    const h = structuredClone(p.header);
    const t = h[pick(tensorNames(h))];
    const edit = rng.int(0, 4);
    if (edit === 0 && t.shape.length) t.shape[rng.int(0, t.shape.length - 1)] += pick([-1, 1, 2]);
    else if (edit === 1) t.shape = [...t.shape].reverse();
    else if (edit === 2) t.shape = [t.shape.reduce((a: number, b: number) => a * b, 1)];
    else if (edit === 3) t.shape = pick([[-1], [1.5], 'x', null, [2 ** 60, 2 ** 60]]);
    else t.shape.push(1);
    return withHeader(raw, p, h);
  },
  dtype: (raw) => {
    const p = parse(raw);
    const h = structuredClone(p.header);
    h[pick(tensorNames(h))].dtype = pick(['F64', 'I8', 'U8', 'BOOL', 'F16', 'BF16', 'F32', 'I32', 'Q4', '', 7, null]);
    return withHeader(raw, p, h);
  },
  'delete or rename tensor': (raw) => {
    const p = parse(raw);
    const h = structuredClone(p.header);
    const name = pick(tensorNames(h));
    if (rng.uniform() < 0.5) h[name + '.renamed'] = h[name];
    delete h[name];
    return withHeader(raw, p, h);
  },
  'extra tensor': (raw) => {
    const p = parse(raw);
    const h = structuredClone(p.header);
    const t = h[pick(tensorNames(h))];
    h[pick(['extra', '__pad.99', '__metadata__x', ''])] = { dtype: 'U8', shape: [0], data_offsets: [t.data_offsets[0], t.data_offsets[0]] };
    return withHeader(raw, p, h);
  },
  'header not an object': (raw) => {
    const p = parse(raw);
    return withHeader(raw, p, pick([[], null, 'text', 42, { __metadata__: 'x' }, { __metadata__: { a: 1 } }]) as any);
  },
};

/** Metadata edits that only make sense for packed files. */
const packedMutations: Record<string, (raw: Buffer) => Buffer> = {
  'metadata value': (raw) => {
    const p = parse(raw);
    const h = structuredClone(p.header);
    const meta = h.__metadata__;
    const key = pick(Object.keys(meta));
    const v: string = meta[key];
    meta[key] = pick([
      v.slice(0, rng.int(0, v.length)),
      v + '}',
      '',
      'null',
      '[]',
      '{}',
      '2',
      '0',
      v.replace(/\d+/, String(rng.int(0, 100000))),
      v.replace(/true/, 'false'),
      v.replace(/"relu"|"silu"|"gelu_tanh"/, '"swish"'),
    ]);
    return withHeader(raw, p, h);
  },
  'JSON field': (raw) => {
    const p = parse(raw);
    const h = structuredClone(p.header);
    const meta = h.__metadata__;
    const key = pick(['model', 'layers', 'tokenizer', 'provenance']);
    const obj = JSON.parse(meta[key]);
    const target = Array.isArray(obj) ? obj[rng.int(0, obj.length - 1)] : obj;
    const field = pick(Object.keys(target));
    target[field] = pick([null, -1, 0, 1, 1e9, 2.5, 'x', [], {}, true, undefined]);
    meta[key] = JSON.stringify(obj);
    return withHeader(raw, p, h);
  },
};

// ---- sources ------------------------------------------------------------------------------------

const CKPT_FIXTURES = ['opt', 'gpt2', 'llama-relu-gqa', 'qwen2-bias'].filter((f) => existsSync(join(FIXTURES, f, 'model.safetensors')));

async function packFixture(fx: string): Promise<string> {
  const out = join(dir, `${fx}.sllm`);
  const ck = await openCheckpoint(join(FIXTURES, fx));
  try {
    await writePacked(await packInputFromCheckpoint(ck), out, { dtype: pick(['BF16', 'F16', 'F32'] as const) });
  } finally {
    await ck.close();
  }
  return out;
}

let caseNo = 0;

/** Packed file mutation → openPacked: clean error, or a file whose every tensor reads as declared. */
async function packedCase(src: Buffer, name: string, mutate: (raw: Buffer) => Buffer): Promise<'error' | 'ok'> {
  const path = join(dir, `p${caseNo++}.sllm`);
  let bytes: Buffer;
  try {
    bytes = mutate(src);
  } catch {
    return 'error'; // the mutation itself did not apply (e.g. nothing to edit); not a reader case
  }
  writeFileSync(path, bytes);
  const what = `packed/${name} (case ${caseNo - 1})`;
  try {
    return await bounded(what, async () => {
      const p = await openPacked(path);
      try {
        for (const t of p.tensorNames()) {
          const info = p.tensor(t);
          const b = await p.readBytes(t);
          assert.equal(b.byteLength, info.bytes, `${what}: ${t} reads ${info.bytes} bytes`);
          if (info.dtype !== 'U8' && info.dtype !== 'I32') assert.equal((await p.readF32(t)).length, info.shape.reduce((a, x) => a * x, 1));
        }
        await p.tokenizerJson();
        for (let i = 0; i < p.spec.nLayers; i++) await p.neuronMap(i);
      } finally {
        await p.close();
      }
      return 'ok' as const;
    });
  } catch (e) {
    if (e instanceof assert.AssertionError || (e instanceof Error && e.message.includes('(hang)'))) throw e;
    assertClean(what, e);
    return 'error';
  } finally {
    rmSync(path, { force: true });
  }
}

/** Checkpoint mutation → openCheckpoint + writePacked: clean error and no output, or an output that verifies. */
async function checkpointCase(fx: string, name: string, edit: (ckDir: string) => void): Promise<'error' | 'ok'> {
  const ckDir = join(dir, `c${caseNo++}`);
  cpSync(join(FIXTURES, fx), ckDir, { recursive: true });
  try {
    edit(ckDir);
  } catch {
    rmSync(ckDir, { recursive: true, force: true });
    return 'error';
  }
  const outDir = join(ckDir, 'out');
  mkdirSync(outDir);
  const out = join(outDir, 'model.sllm');
  const what = `checkpoint ${fx}/${name} (case ${caseNo - 1})`;
  try {
    return await bounded(what, async () => {
      const ck = await openCheckpoint(ckDir);
      try {
        await writePacked(await packInputFromCheckpoint(ck), out, { dtype: pick(['BF16', 'F16', 'F32'] as const), chunkBytes: pick([64, 1024, 1 << 20]) });
        const p = await openPacked(out);
        try {
          const v = await verifyPacked(p, ck);
          assert.ok(v.ok, `${what}: packed output does not verify: ${JSON.stringify(v.examples)}`);
        } finally {
          await p.close();
        }
      } finally {
        await ck.close();
      }
      return 'ok' as const;
    });
  } catch (e) {
    if (e instanceof assert.AssertionError || (e instanceof Error && e.message.includes('(hang)'))) throw e;
    assertClean(what, e);
    assert.ok(!existsSync(out), `${what}: no file at the output path after an error`);
    return 'error';
  } finally {
    assert.deepEqual(readdirSync(outDir).filter((f) => f !== 'model.sllm'), [], `${what}: no temporary file left`);
    rmSync(ckDir, { recursive: true, force: true });
  }
}

const configEdits: ((c: Record<string, any>) => void)[] = [
  (c) => delete c[pick(Object.keys(c))],
  (c) => (c[pick(Object.keys(c))] = pick([null, -1, 0, 1, 3, 1e12, 2.5, 'x', [], {}, true])),
  (c) => (c.model_type = pick(['llama', 'gpt2', 'opt', 'mistral', 'qwen2', 'bert', 'LLAMA', 7])),
];

test(`fuzz: mutated packed files through openPacked`, async () => {
  const counts = { ok: 0, error: 0 };
  const all = { ...mutations, ...packedMutations };
  const names = Object.keys(all);
  for (const fx of CKPT_FIXTURES) {
    const src = readFileSync(await packFixture(fx));
    for (let i = 0; i < 70; i++) {
      const name = pick(names);
      counts[await packedCase(src, name, all[name]!)]++;
    }
  }
  console.log(`packed-file cases: ${counts.ok} opened and read, ${counts.error} clean errors`);
  assert.ok(counts.error > counts.ok, 'most mutations are caught');
  assert.ok(counts.ok + counts.error >= 250);
});

test(`fuzz: mutated checkpoints through openCheckpoint + writePacked`, async () => {
  const counts = { ok: 0, error: 0 };
  const names = Object.keys(mutations);
  for (const fx of CKPT_FIXTURES) {
    for (let i = 0; i < 45; i++) {
      if (rng.uniform() < 0.2) {
        const edit = pick(configEdits);
        counts[await checkpointCase(fx, 'config', (d) => {
          const c = JSON.parse(readFileSync(join(d, 'config.json'), 'utf8'));
          edit(c);
          writeFileSync(join(d, 'config.json'), JSON.stringify(c));
        })]++;
      } else {
        const name = pick(names);
        counts[await checkpointCase(fx, name, (d) => {
          const f = join(d, 'model.safetensors');
          writeFileSync(f, mutations[name]!(readFileSync(f)));
        })]++;
      }
    }
  }
  console.log(`checkpoint cases: ${counts.ok} packed and verified, ${counts.error} clean errors`);
  assert.ok(counts.ok > 0 && counts.error > 0, 'both outcomes occur');
  assert.ok(counts.ok + counts.error >= 150);
});
