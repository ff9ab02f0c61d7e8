// The packed format: kernel layout read back element by element against values generated here,
// dtype conversions (fast paths vs the scalar reference), metadata, alignment, the plain
// safetensors view, and every structural problem the validating reader must reject.
import { test, describe, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { openCheckpoint } from '../src/core/checkpoint/index.js';
import { SafetensorsWriter } from '../src/core/checkpoint/safetensors.js';
import { bf16BitsToF32, f16BitsToF32, f32ToBf16Bits, f32ToF16Bits, type DType } from '../src/core/dtype.js';
import { FormatError, ModelError, SparseLlmError } from '../src/core/errors.js';
import { fromF32, interleaveUpDown, toF32, transposeBlock } from '../src/core/format/convert.js';
import {
  ALIGNMENT,
  FORMAT_VERSION,
  InterruptedError,
  openPacked,
  packInputFromCheckpoint,
  verifyPacked,
  writePacked,
  type PackInput,
  type StorageDType,
} from '../src/core/format/index.js';
import { writeTinyCheckpoint, type Arch, type TinyModel } from './helpers/format-fixtures.js';
import { Rng } from './helpers/rng.js';
import { tempDir } from './helpers/tmp.js';

const seed = Rng.seedFromEnv(20261129);
console.log(`format.test seed=${seed}`);
const rng = new Rng(seed);
const dir = tempDir(after, 'sparsellm-format-');
let n = 0;
const fresh = (name: string): string => join(dir, `${n++}-${name}`);

/** The stored bits a packed element must have for source value x (scalar reference of dtype.ts). */
function expectedBits(x: number, dtype: StorageDType): number {
  if (dtype === 'BF16') return f32ToBf16Bits(x);
  if (dtype === 'F16') return f32ToF16Bits(x);
  return new Uint32Array(new Float32Array([x]).buffer)[0]!;
}

function storedBits(bytes: Uint8Array, i: number, dtype: StorageDType): number {
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  return dtype === 'F32' ? v.getUint32(i * 4, true) : v.getUint16(i * 2, true);
}

function isNaNBits(bits: number, dtype: StorageDType): boolean {
  if (dtype === 'BF16') return (bits & 0x7f80) === 0x7f80 && (bits & 0x7f) !== 0;
  if (dtype === 'F16') return (bits & 0x7c00) === 0x7c00 && (bits & 0x3ff) !== 0;
  return (bits & 0x7f800000) === 0x7f800000 && (bits & 0x7fffff) !== 0;
}

function assertElement(bytes: Uint8Array, i: number, dtype: StorageDType, x: number, what: string): void {
  const got = storedBits(bytes, i, dtype);
  if (Number.isNaN(x)) assert.ok(isNaNBits(got, dtype), `${what}: NaN must stay NaN, got 0x${got.toString(16)}`);
  else assert.equal(got, expectedBits(x, dtype), `${what}: source ${x}`);
}

/** The header of a file, parsed here without the project's reader. */
function plainHeader(path: string): { n: number; header: Record<string, any>; size: number } {
  const bytes = readFileSync(path);
  const n = Number(bytes.readBigUInt64LE(0));
  return { n, header: JSON.parse(bytes.subarray(8, 8 + n).toString('utf8')), size: bytes.length };
}

async function packTiny(arch: Arch, src: DType, dst: StorageDType, extra: Partial<Parameters<typeof writeTinyCheckpoint>[1]> = {}, chunkBytes?: number) {
  const ckDir = fresh(`${arch}-${src}`);
  const tiny = await writeTinyCheckpoint(ckDir, { arch, dtype: src, seed: rng.u32(), specials: true, ...extra });
  const out = join(ckDir, 'model.sllm');
  const ck = await openCheckpoint(ckDir);
  try {
    const res = await writePacked(await packInputFromCheckpoint(ck), out, { dtype: dst, chunkBytes, toolVersion: 'test' });
    return { tiny, out, res };
  } finally {
    await ck.close();
  }
}

/** Checks every packed tensor of `out` against the generator's canonical values. */
async function checkAgainstCanonical(tiny: TinyModel, out: string, dst: StorageDType): Promise<void> {
  const p = await openPacked(out);
  try {
    const d = tiny.d;
    for (const name of p.tensorNames()) {
      const t = p.tensor(name);
      const bytes = await p.readBytes(name);
      assert.equal(t.offset % ALIGNMENT, 0, `${name} aligned`);
      if (t.dtype === 'U8') continue;
      const m = /^layers\.(\d+)\.ffn\.(gate|updown|up|down_t)$/.exec(name);
      if (!m) {
        const c = tiny.canonical.get(name);
        assert.ok(c, `packed tensor ${name} has a canonical source`);
        assert.deepEqual(t.shape, c.shape);
        const dt = c.shape.length >= 2 ? dst : 'F32';
        assert.equal(t.dtype, dt, `${name} dtype`);
        for (let i = 0; i < c.values.length; i++) assertElement(bytes, i, dt, c.values[i]!, `${name}[${i}]`);
        continue;
      }
      const L = `layers.${m[1]}.ffn.`;
      const F = tiny.dFF;
      const up = tiny.canonical.get(L + 'up.weight')!.values;
      const down = tiny.canonical.get(L + 'down.weight')!.values; // [d, F]
      if (m[2] === 'gate' || m[2] === 'up') {
        const w = tiny.canonical.get(`${L}${m[2]}.weight`)!.values;
        assert.deepEqual(t.shape, [F, d]);
        for (let i = 0; i < F * d; i++) assertElement(bytes, i, dst, w[i]!, `${name}[${i}]`);
      } else if (m[2] === 'down_t') {
        assert.deepEqual(t.shape, [F, d]);
        for (let j = 0; j < F; j++) for (let k = 0; k < d; k++) assertElement(bytes, j * d + k, dst, down[k * F + j]!, `${name}[${j}, ${k}]`);
      } else {
        assert.deepEqual(t.shape, [F, 2, d]);
        for (let j = 0; j < F; j++) {
          for (let k = 0; k < d; k++) {
            assertElement(bytes, (2 * j) * d + k, dst, up[j * d + k]!, `${name}[${j}, 0, ${k}] = W_up[${j}, ${k}]`);
            assertElement(bytes, (2 * j + 1) * d + k, dst, down[k * F + j]!, `${name}[${j}, 1, ${k}] = W_down[${k}, ${j}]`);
          }
        }
      }
    }
  } finally {
    await p.close();
  }
}

describe('conversions', () => {
  test('toF32 matches the scalar decoders on every 16-bit pattern', () => {
    const all = new Uint16Array(65536).map((_, i) => i);
    const bytes = new Uint8Array(all.buffer);
    const bf = toF32(bytes, 'BF16');
    const hf = toF32(bytes, 'F16');
    for (let i = 0; i < 65536; i++) {
      assert.ok(Object.is(bf[i], Math.fround(bf16BitsToF32(i))) || (Number.isNaN(bf[i]) && Number.isNaN(bf16BitsToF32(i))), `bf16 0x${i.toString(16)}`);
      assert.ok(Object.is(hf[i], Math.fround(f16BitsToF32(i))) || (Number.isNaN(hf[i]) && Number.isNaN(f16BitsToF32(i))), `f16 0x${i.toString(16)}`);
    }
  });

  test('fromF32 rounds like the scalar encoders (random bits, ties, NaN, Inf, subnormals)', () => {
    const count = 200_000;
    const bits = new Uint32Array(count);
    for (let i = 0; i < count; i++) bits[i] = rng.u32();
    // Exact ties and boundary values for both 16-bit formats.
    const special = [0x3f808000, 0x3f818000, 0x3f800fff, 0x7f7fffff, 0x477ff000, 0x477fefff, 0x33800000, 0x33000000, 0x7fc00001, 0xff800001, 0x7f800000, 0xff800000, 0x00000001, 0x80000000];
    bits.set(special);
    const f = new Float32Array(bits.buffer);
    for (const dtype of ['BF16', 'F16'] as const) {
      const out = fromF32(f, dtype);
      const v = new DataView(out.buffer, out.byteOffset, out.byteLength);
      for (let i = 0; i < count; i++) {
        const want = dtype === 'BF16' ? f32ToBf16Bits(f[i]!) : f32ToF16Bits(f[i]!);
        assert.equal(v.getUint16(i * 2, true), want, `${dtype} of 0x${bits[i]!.toString(16)}`);
      }
    }
    assert.deepEqual(new Uint8Array(fromF32(f, 'F32')), new Uint8Array(f.buffer));
  });

  test('transposeBlock and interleaveUpDown put each element where the layout says', () => {
    const rows = 5;
    const cols = 7;
    for (const elem of [2, 4]) {
      const src = new Uint8Array(rows * cols * elem);
      for (let i = 0; i < src.length; i++) src[i] = rng.int(0, 255);
      const block = transposeBlock(src, rows, cols, 2, 6, elem);
      for (let c = 2; c < 6; c++) {
        for (let r = 0; r < rows; r++) {
          assert.deepEqual(block.subarray(((c - 2) * rows + r) * elem, ((c - 2) * rows + r + 1) * elem), src.subarray((r * cols + c) * elem, (r * cols + c + 1) * elem));
        }
      }
    }
    const up = new Uint8Array([1, 2, 3, 4, 5, 6, 7, 8]); // 2 neurons, d = 2, 2-byte elements
    const dn = new Uint8Array([9, 10, 11, 12, 13, 14, 15, 16]);
    assert.deepEqual([...interleaveUpDown(up, dn, 2, 2, 2)], [1, 2, 3, 4, 9, 10, 11, 12, 5, 6, 7, 8, 13, 14, 15, 16]);
  });
});

describe('writePacked → openPacked', () => {
  const cases: [Arch, DType, StorageDType][] = [
    ['llama', 'F32', 'BF16'],
    ['llama', 'BF16', 'BF16'],
    ['llama', 'F16', 'F32'],
    ['qwen2', 'F32', 'F16'],
    ['qwen2', 'BF16', 'F16'],
    ['gpt2', 'F32', 'BF16'],
    ['gpt2', 'F16', 'F16'],
    ['opt', 'BF16', 'F32'],
    ['opt', 'F32', 'BF16'],
  ];
  for (const [arch, src, dst] of cases) {
    test(`${arch} ${src} → ${dst}: every element in kernel layout, rounded once (NaN/Inf kept)`, async () => {
      // Small chunks so that tensors and FFN layers are written in many pieces.
      const { tiny, out } = await packTiny(arch, src, dst, {}, 256);
      await checkAgainstCanonical(tiny, out, dst);
    });
  }

  test('updown: random neurons read with readRange are [W_up[j], W_down[:, j]]', async () => {
    const { tiny, out } = await packTiny('llama', 'F32', 'F32', { d: 40, dFF: 77 });
    const p = await openPacked(out);
    try {
      for (let trial = 0; trial < 20; trial++) {
        const layer = rng.int(0, tiny.nLayers - 1);
        const j = rng.int(0, tiny.dFF - 1);
        const block = toF32(await p.readRange(`layers.${layer}.ffn.updown`, j * 2 * tiny.d * 4, 2 * tiny.d * 4), 'F32');
        const up = tiny.canonical.get(`layers.${layer}.ffn.up.weight`)!.values;
        const down = tiny.canonical.get(`layers.${layer}.ffn.down.weight`)!.values;
        for (let k = 0; k < tiny.d; k++) {
          assert.ok(Object.is(block[k], up[j * tiny.d + k]) || (Number.isNaN(block[k]) && Number.isNaN(up[j * tiny.d + k])), `up row, neuron ${j}`);
          assert.ok(Object.is(block[tiny.d + k], down[k * tiny.dFF + j]) || (Number.isNaN(block[tiny.d + k]) && Number.isNaN(down[k * tiny.dFF + j])), `down column, neuron ${j}`);
        }
      }
    } finally {
      await p.close();
    }
  });

  test('metadata: spec, layers, tokenizer, provenance and content hash', async () => {
    const { tiny, out, res } = await packTiny('llama', 'BF16', 'BF16', { tokenizer: true, tied: false });
    const ck = await openCheckpoint(tiny.dir);
    const p = await openPacked(out);
    try {
      assert.deepEqual(p.spec, JSON.parse(JSON.stringify(ck.spec)));
      assert.equal(p.storageDtype, 'BF16');
      assert.deepEqual(p.layers.map((l) => l.dFF), [tiny.dFF, tiny.dFF]);
      for (const l of p.layers) {
        assert.equal(l.sourceDFF, l.dFF);
        assert.equal(l.activation, 'relu');
        assert.equal(l.twell, null);
        assert.equal(l.neuronMap, null);
        assert.equal(l.threshold, null);
        assert.equal(l.calibration, null);
      }
      assert.equal(await p.neuronMap(0), null);
      assert.equal(p.tokenizer.kind, 'huggingface');
      assert.deepEqual(await p.tokenizerJson(), new Uint8Array(readFileSync(join(tiny.dir, 'tokenizer.json'))));
      assert.deepEqual(await p.tokenizerConfigJson(), new Uint8Array(readFileSync(join(tiny.dir, 'tokenizer_config.json'))));
      assert.equal(p.provenance.tool, 'sparsellm');
      assert.equal(p.provenance.toolVersion, 'test');
      assert.ok(!Number.isNaN(Date.parse(p.provenance.createdAt)));
      assert.deepEqual(
        p.provenance.sourceFiles.map((f) => f.name),
        ['config.json', 'model.safetensors'],
      );
      assert.equal(p.provenance.sourceFiles[1]!.bytes, readFileSync(join(tiny.dir, 'model.safetensors')).length);
      // contentHash = sha256 of the bytes after the header, computed here from the raw file.
      const raw = readFileSync(out);
      const digest = createHash('sha256').update(raw.subarray(p.dataStart)).digest('hex');
      assert.equal(p.provenance.contentHash.hex, digest);
      assert.equal(res.contentHash, digest);
      assert.ok((await p.verifyContentHash()).ok);
      assert.equal(res.bytesOut, raw.length);
      // verifyPacked agrees with the source, element by element.
      const v = await verifyPacked(p, ck);
      assert.ok(v.ok, JSON.stringify(v.examples));
      assert.equal(v.mismatches, 0);
    } finally {
      await p.close();
      await ck.close();
    }
  });

  test('a plain safetensors reading of the file: header, alignment, padding, no holes, file order by layer', async () => {
    const { out } = await packTiny('gpt2', 'F32', 'BF16', { d: 20, dFF: 36 });
    const { n, header, size } = plainHeader(out);
    assert.equal((8 + n) % 64, 0, 'header padded to 64');
    const meta = header.__metadata__;
    assert.equal(meta.format, 'sparsellm-packed');
    assert.equal(meta.format_version, String(FORMAT_VERSION));
    assert.equal(meta.storage_dtype, 'BF16');
    for (const k of ['model', 'layers', 'tokenizer', 'provenance']) assert.doesNotThrow(() => JSON.parse(meta[k]), k);
    const entries = Object.entries(header).filter(([k]) => k !== '__metadata__') as [string, any][];
    entries.sort((a, b) => a[1].data_offsets[0] - b[1].data_offsets[0]);
    let cursor = 0;
    const order: string[] = [];
    for (const [name, e] of entries) {
      assert.equal(e.data_offsets[0], cursor, `${name} follows the previous tensor`);
      if (!name.startsWith('__pad.')) assert.equal(e.data_offsets[0] % 64, 0, `${name} aligned`);
      const size1 = { BF16: 2, F16: 2, F32: 4, I32: 4, U8: 1 }[e.dtype as string]!;
      assert.equal(e.data_offsets[1] - e.data_offsets[0], e.shape.reduce((a: number, b: number) => a * b, 1) * size1);
      cursor = e.data_offsets[1];
      if (name.startsWith('__pad.')) {
        assert.equal(e.dtype, 'U8');
        assert.ok(e.shape[0] >= 1 && e.shape[0] < 64);
        const raw = readFileSync(out).subarray(8 + n + e.data_offsets[0], 8 + n + e.data_offsets[1]);
        assert.ok(raw.every((b) => b === 0), 'padding is zero');
      } else order.push(name);
    }
    assert.equal(8 + n + cursor, size, 'the data section ends at the end of the file');
    assert.deepEqual(order.slice(0, 4), ['embed.weight', 'pos_embed.weight', 'layers.0.attn_norm.weight', 'layers.0.attn_norm.bias']);
    const layerOf = order.map((x) => /^layers\.(\d+)\./.exec(x)?.[1]).filter((x) => x !== undefined).map(Number);
    assert.deepEqual(layerOf, [...layerOf].sort((a, b) => a - b), 'each layer contiguous, in order');
    assert.ok(order.includes('layers.1.ffn.up') && order.includes('layers.1.ffn.down_t') && order.includes('layers.1.ffn.up.bias'));
    assert.equal(header['layers.0.ffn.up.bias'].dtype, 'F32');
    assert.equal(header['layers.0.ffn.up'].dtype, 'BF16');
  });

  test('a checkpoint of mixed dtypes, with unused tensors of other dtypes, packs and verifies', async () => {
    const ckDir = fresh('mixed');
    await writeTinyCheckpoint(ckDir, { arch: 'llama', dtype: 'F32', seed: 11 });
    const st = join(ckDir, 'model.safetensors');
    const raw = readFileSync(st);
    const len = Number(raw.readBigUInt64LE(0));
    const header = JSON.parse(raw.subarray(8, 8 + len).toString('utf8'));
    const tensors = Object.entries<any>(header)
      .filter(([k]) => k !== '__metadata__')
      .map(([name, e]) => {
        const f32 = new Float32Array(raw.buffer.slice(raw.byteOffset + 8 + len + e.data_offsets[0], raw.byteOffset + 8 + len + e.data_offsets[1]));
        const dtype: DType = e.shape.length >= 2 ? 'BF16' : 'F32';
        return { name, dtype: dtype as string, shape: e.shape as number[], bytes: fromF32(f32, dtype) };
      });
    tensors.push({ name: 'model.layers.0.self_attn.rotary_emb.inv_freq', dtype: 'I64', shape: [4], bytes: new Uint8Array(32) });
    const w = await SafetensorsWriter.create(st, { tensors });
    for (const t of tensors) await w.write(t.name, t.bytes);
    await w.finish();
    const ck = await openCheckpoint(ckDir);
    try {
      const out = join(ckDir, 'm.sllm');
      await writePacked(await packInputFromCheckpoint(ck), out, { dtype: 'F16', chunkBytes: 512 });
      const p = await openPacked(out);
      try {
        const v = await verifyPacked(p, ck);
        assert.ok(v.ok, JSON.stringify(v.examples));
      } finally {
        await p.close();
      }
    } finally {
      await ck.close();
    }
  });

  test('pruned layers: neuron maps are written, read back and checked', async () => {
    const ckDir = fresh('pruned');
    const tiny = await writeTinyCheckpoint(ckDir, { arch: 'llama', seed: 12, dFF: 30 });
    const ck = await openCheckpoint(ckDir);
    try {
      const base = await packInputFromCheckpoint(ck);
      const layers = ck.spec.dFF.map((dFF) => ({
        dFF, sourceDFF: 64, activation: ck.spec.activation, twell: { tileWidth: 16, compression: 4 },
        neuronMap: '', threshold: null, calibration: null,
      }));
      layers.forEach((l, i) => (l.neuronMap = `layers.${i}.ffn.neuron_map`));
      const good = (i: number) => Int32Array.from({ length: tiny.dFF }, (_, j) => 2 * j + i);
      const out = join(ckDir, 'pruned.sllm');
      await writePacked({ ...base, layers, neuronMap: good }, out);
      const p = await openPacked(out);
      try {
        assert.deepEqual(p.layers[1]!.twell, { tileWidth: 16, compression: 4 });
        assert.equal(p.layers[0]!.sourceDFF, 64);
        assert.deepEqual([...(await p.neuronMap(1))!], [...good(1)]);
        assert.equal(p.tensor('layers.0.ffn.neuron_map').dtype, 'I32');
      } finally {
        await p.close();
      }
      const bad = join(ckDir, 'bad-map.sllm');
      await writePacked({ ...base, layers, neuronMap: (i) => { const m = good(i); m[5] = m[4]!; return m; } }, bad);
      const q = await openPacked(bad);
      try {
        await assert.rejects(q.neuronMap(0), (e: unknown) => e instanceof FormatError && /neuron_map': entry 5 is \d+; a neuron map must be strictly increasing/.test((e as Error).message));
      } finally {
        await q.close();
      }
    } finally {
      await ck.close();
    }
  });

  test('a file packed twice from the same source has the same content hash', async () => {
    const ckDir = fresh('twice');
    await writeTinyCheckpoint(ckDir, { arch: 'opt', seed: 7 });
    const ck = await openCheckpoint(ckDir);
    try {
      const input = await packInputFromCheckpoint(ck);
      const a = await writePacked(input, join(ckDir, 'a.sllm'));
      const b = await writePacked(input, join(ckDir, 'b.sllm'));
      assert.equal(a.contentHash, b.contentHash);
    } finally {
      await ck.close();
    }
  });
});

describe('writePacked errors leave no output', () => {
  async function tinyInput(arch: Arch = 'llama'): Promise<{ input: PackInput; close: () => Promise<void>; ckDir: string }> {
    const ckDir = fresh(`err-${arch}`);
    await writeTinyCheckpoint(ckDir, { arch, seed: 3 });
    const ck = await openCheckpoint(ckDir);
    return { input: await packInputFromCheckpoint(ck), close: () => ck.close(), ckDir };
  }
  const noTemps = (d: string) => assert.deepEqual(readdirSync(d).filter((f) => f.includes('.tmp-')), [], 'no temporary files left');

  test('output directory missing', async () => {
    const { input, close } = await tinyInput();
    try {
      await assert.rejects(writePacked(input, join(dir, 'no-such-dir', 'm.sllm')), (e: Error) => e instanceof SparseLlmError && /output directory .* does not exist/.test(e.message));
    } finally {
      await close();
    }
  });

  test('output exists: refused without force, replaced with force', async () => {
    const { input, close, ckDir } = await tinyInput();
    const out = join(ckDir, 'exists.sllm');
    writeFileSync(out, 'keep me');
    try {
      await assert.rejects(writePacked(input, out), (e: Error) => e instanceof SparseLlmError && e.message.startsWith(out) && /already exists \(use --force/.test(e.message));
      assert.equal(readFileSync(out, 'utf8'), 'keep me');
      await writePacked(input, out, { force: true });
      const p = await openPacked(out);
      await p.close();
      noTemps(ckDir);
    } finally {
      await close();
    }
  });

  test('a source tensor of the wrong shape is a ModelError before any file is created', async () => {
    const { input, close, ckDir } = await tinyInput();
    const bad: PackInput = {
      ...input,
      describe: (name) => {
        const t = input.describe(name);
        return name === 'layers.1.ffn.down.weight' && t ? { ...t, shape: [t.shape[0]!, t.shape[1]! + 1] } : t;
      },
    };
    const out = join(ckDir, 'shape.sllm');
    try {
      await assert.rejects(writePacked(bad, out), (e: Error) => e instanceof ModelError && /layers\.1\.ffn\.down\.weight/.test(e.message));
      const missing: PackInput = { ...input, describe: (name) => (name === 'layers.0.attn.q.weight' ? undefined : input.describe(name)) };
      await assert.rejects(writePacked(missing, out), (e: Error) => e instanceof ModelError && /layers\.0\.attn\.q\.weight' is missing/.test(e.message));
      assert.ok(!existsSync(out));
      noTemps(ckDir);
    } finally {
      await close();
    }
  });

  test('a read error mid-way and an abort both remove the temporary file', async () => {
    const { input, close, ckDir } = await tinyInput();
    const out = join(ckDir, 'mid.sllm');
    let calls = 0;
    const failing: PackInput = {
      ...input,
      rowChunks: (name, rows) => {
        if (++calls === 6) throw new FormatError(join(ckDir, 'model.safetensors'), 'simulated read failure');
        return input.rowChunks(name, rows);
      },
    };
    try {
      await assert.rejects(writePacked(failing, out), /simulated read failure/);
      assert.ok(!existsSync(out));
      noTemps(ckDir);
      const ac = new AbortController();
      let written = 0;
      await assert.rejects(
        writePacked(input, out, {
          signal: ac.signal,
          chunkBytes: 64,
          onProgress: (b) => {
            written += b;
            if (written > 2000) ac.abort();
          },
        }),
        (e: Error) => e instanceof InterruptedError,
      );
      assert.ok(!existsSync(out));
      noTemps(ckDir);
    } finally {
      await close();
    }
  });
});

// ---- the validating reader ---------------------------------------------------------------------

interface Parts {
  metadata: Record<string, string>;
  tensors: { name: string; dtype: string; shape: number[]; bytes: Uint8Array }[];
}

/** Reads a packed file's parts without the project's reader (padding dropped). */
function readParts(path: string): Parts {
  const raw = readFileSync(path);
  const { n, header } = plainHeader(path);
  const tensors = Object.entries(header)
    .filter(([k]) => k !== '__metadata__' && !k.startsWith('__pad.'))
    .map(([name, e]: [string, any]) => ({ name, dtype: e.dtype, shape: e.shape, begin: e.data_offsets[0], bytes: new Uint8Array(raw.subarray(8 + n + e.data_offsets[0], 8 + n + e.data_offsets[1])) }))
    .sort((a, b) => a.begin - b.begin)
    .map(({ begin: _b, ...t }) => t);
  return { metadata: { ...header.__metadata__ }, tensors };
}

/** Writes parts as an aligned safetensors file (the project's writer, alignment 64 unless told). */
async function writeParts(path: string, parts: Parts, alignment = 64): Promise<string> {
  const w = await SafetensorsWriter.create(path, { tensors: parts.tensors, metadata: parts.metadata, alignment });
  for (const t of parts.tensors) await w.write(t.name, t.bytes);
  await w.finish();
  return path;
}

describe('openPacked rejects', () => {
  let good: string;
  const base = async (): Promise<Parts> => {
    if (!good) good = (await packTiny('qwen2', 'F32', 'BF16', { tokenizer: true })).out;
    return readParts(good);
  };

  async function expectReject(mutate: (p: Parts) => void, pattern: RegExp, alignment?: number): Promise<void> {
    const parts = await base();
    mutate(parts);
    const path = await writeParts(fresh('bad.sllm'), parts, alignment);
    await assert.rejects(openPacked(path), (e: unknown) => {
      assert.ok(e instanceof FormatError, `expected FormatError, got ${String(e)}`);
      assert.ok(e.message.startsWith(path), `names the file: ${e.message}`);
      assert.match(e.message, pattern);
      return true;
    });
  }
  const layers = (p: Parts) => JSON.parse(p.metadata.layers!);
  const model = (p: Parts) => JSON.parse(p.metadata.model!);

  test('the unmodified file opens (control)', async () => {
    const path = await writeParts(fresh('ok.sllm'), await base());
    const p = await openPacked(path);
    await p.close();
  });
  test('a newer format version, with the version named', () =>
    expectReject((p) => (p.metadata.format_version = '2'), /was written by a newer sparsellm \(format version 2\); this build reads version 1/));
  test('a malformed format version', () => expectReject((p) => (p.metadata.format_version = '1.x'), /format_version' is "1.x", not a positive integer/));
  test('another format name', () => expectReject((p) => (p.metadata.format = 'gguf'), /metadata 'format' is "gguf"/));
  test('a plain safetensors file without our metadata', () => expectReject((p) => (p.metadata = {}), /not a sparsellm packed model/));
  test('a metadata key missing', () => expectReject((p) => delete p.metadata.layers, /metadata key 'layers' is missing/));
  test('metadata JSON that does not parse, naming the key', () => expectReject((p) => (p.metadata.model = '{"family": "llama",'), /metadata 'model' is not valid JSON/));
  test('a model field of the wrong type', () =>
    expectReject((p) => (p.metadata.model = JSON.stringify({ ...model(p), dModel: '32' })), /metadata 'model': dModel must be an integer >= 1/));
  test('an unknown storage dtype', () => expectReject((p) => (p.metadata.storage_dtype = 'F8'), /storage_dtype' is "F8"/));
  test('layers of the wrong length', () => expectReject((p) => (p.metadata.layers = JSON.stringify(layers(p).slice(1))), /'layers' has 1 entries, but the model has 2 layers/));
  test('a layer dFF that disagrees with the model', () =>
    expectReject((p) => {
      const l = layers(p);
      l[1].dFF += 1;
      p.metadata.layers = JSON.stringify(l);
    }, /layers\[1\]\.dFF is \d+, but model\.dFF\[1\]/));
  test('bad TwELL parameters', () =>
    expectReject((p) => {
      const l = layers(p);
      l[0].twell = { tileWidth: 8, compression: 8 };
      p.metadata.layers = JSON.stringify(l);
    }, /layers\[0\]\.twell/));
  test('a neuron map named in the metadata but absent', () =>
    expectReject((p) => {
      const l = layers(p);
      l[0].neuronMap = 'layers.0.ffn.neuron_map';
      p.metadata.layers = JSON.stringify(l);
    }, /tensor 'layers\.0\.ffn\.neuron_map' is missing/));
  test('a tensor missing', () => expectReject((p) => (p.tensors = p.tensors.filter((t) => t.name !== 'layers.1.ffn.updown')), /tensor 'layers\.1\.ffn\.updown' is missing/));
  test('a tensor of the wrong shape', () =>
    expectReject((p) => {
      const t = p.tensors.find((x) => x.name === 'layers.0.ffn.updown')!;
      t.shape = [t.shape[0]! * 2, 1, t.shape[2]!]; // same byte count, wrong layout
    }, /tensor 'layers\.0\.ffn\.updown' has shape \[\d+,1,\d+\], expected \[\d+,2,\d+\]/));
  test('a tensor of the wrong dtype', () =>
    expectReject((p) => {
      const t = p.tensors.find((x) => x.name === 'layers.0.attn_norm.weight')!;
      t.dtype = 'BF16';
      t.shape = [t.shape[0]! * 2];
    }, /tensor 'layers\.0\.attn_norm\.weight' has dtype BF16, expected F32/));
  test('an unsupported dtype', () =>
    expectReject((p) => {
      const t = p.tensors.find((x) => x.name === 'embed.weight')!;
      t.dtype = 'I64';
      t.shape = [t.bytes.length / 8];
    }, /tensor 'embed\.weight' has dtype I64/));
  test('an unexpected tensor', () =>
    expectReject((p) => p.tensors.push({ name: 'extra.weight', dtype: 'F32', shape: [2], bytes: new Uint8Array(8) }), /unexpected tensor 'extra\.weight'/));
  test('the tokenizer size disagreeing with its tensor', () =>
    expectReject((p) => {
      const tok = JSON.parse(p.metadata.tokenizer!);
      tok.bytes += 1;
      p.metadata.tokenizer = JSON.stringify(tok);
    }, /tensor 'tokenizer\.json' has shape/));
  test('tensors not aligned to 64 bytes', () => expectReject(() => undefined, /not a multiple of 64/, 8));

  test('container damage: truncated, header past the end, header not JSON, overlapping offsets', async () => {
    const raw = readFileSync(await writeParts(fresh('src.sllm'), await base()));
    const cases: [string, Uint8Array, RegExp][] = [];
    cases.push(['truncated', raw.subarray(0, raw.length - 100), /out of range|not described|truncated/]);
    cases.push(['tiny', raw.subarray(0, 5), /truncated: 5 bytes/]);
    const longHeader = Buffer.from(raw);
    longHeader.writeBigUInt64LE(BigInt(raw.length), 0);
    cases.push(['header past end', longHeader, /runs past the end of the file/]);
    const notJson = Buffer.from(raw);
    notJson[8] = 0x5b; // '[' then garbage
    notJson[9] = 0x7b;
    cases.push(['not json', notJson, /not valid JSON|not a JSON object/]);
    // Overlap: move one tensor's offsets onto its predecessor (same length, so sizes still agree).
    const n = Number(raw.readBigUInt64LE(0));
    const header = JSON.parse(raw.subarray(8, 8 + n).toString('utf8'));
    const k = header['layers.0.ffn.gate'].data_offsets;
    const q = header['layers.0.attn.q.weight'].data_offsets;
    header['layers.0.attn.q.weight'].data_offsets = [q[0] + 64, q[1] + 64];
    const text = Buffer.from(JSON.stringify(header));
    const overlap = Buffer.concat([Buffer.alloc(8), text, Buffer.alloc(Math.max(0, n - text.length), 0x20), raw.subarray(8 + n)]);
    overlap.writeBigUInt64LE(BigInt(Math.max(n, text.length)), 0);
    cases.push(['overlap', overlap, /overlaps|hole/]);
    assert.ok(k);
    for (const [what, bytes, pattern] of cases) {
      const path = fresh(`${what.replace(/ /g, '-')}.sllm`);
      writeFileSync(path, bytes);
      await assert.rejects(openPacked(path), (e: unknown) => {
        assert.ok(e instanceof FormatError, `${what}: expected FormatError, got ${String(e)}`);
        assert.ok(e.message.startsWith(path));
        assert.match(e.message, pattern, what);
        return true;
      });
    }
  });

  test('corrupted tensor data opens (structure intact) but fails verification', async () => {
    const { tiny, out } = await packTiny('llama', 'F32', 'BF16');
    const raw = readFileSync(out);
    const p0 = await openPacked(out);
    const at = p0.tensor('layers.1.ffn.updown').offset + 10;
    await p0.close();
    raw[at] = raw[at]! ^ 0x40;
    writeFileSync(out, raw);
    const ck = await openCheckpoint(tiny.dir);
    const p = await openPacked(out);
    try {
      const v = await verifyPacked(p, ck);
      assert.equal(v.ok, false);
      assert.equal(v.mismatches, 1);
      assert.equal(v.examples[0]!.tensor, 'layers.1.ffn.updown');
      assert.equal(v.contentHash.ok, false);
    } finally {
      await p.close();
      await ck.close();
    }
  });
});

test('a missing packed file is a FormatError naming it', async () => {
  const path = join(dir, 'nope.sllm');
  await assert.rejects(openPacked(path), (e: unknown) => e instanceof FormatError && e.message.startsWith(path));
  mkdirSync(join(dir, 'adir.sllm'));
  await assert.rejects(openPacked(join(dir, 'adir.sllm')), (e: unknown) => e instanceof FormatError);
});
