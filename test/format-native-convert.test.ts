// The native packing conversions (src/core/format/native-convert.ts over native/src/cpu/convert*.cpp)
// against the JavaScript reference of src/core/format/convert.ts: every dtype pair on every 16-bit
// pattern and on random f32 bit patterns (NaN payloads, ±Inf, subnormals, rounding ties), the
// neuron-major block on awkward shapes, and whole packed files written both ways (byte-identical
// data and content hash) for every source × storage dtype, gated and non-gated, several chunkings.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { openCheckpoint } from '../src/core/checkpoint/index.js';
import { DTYPES, dtypeSize, type DType } from '../src/core/dtype.js';
import { convertBytes, interleaveUpDown, transposeBlock } from '../src/core/format/convert.js';
import { packInputFromCheckpoint, writePacked, type StorageDType } from '../src/core/format/index.js';
import { nativeConvert } from '../src/core/format/native-convert.js';
import { writeTinyCheckpoint, type Arch } from './helpers/format-fixtures.js';
import { Rng } from './helpers/rng.js';
import { tempDir } from './helpers/tmp.js';

const seed = Rng.seedFromEnv(Math.floor(Math.random() * 2 ** 31));
console.log(`format-native-convert.test seed=${seed}`);
const rng = new Rng(seed);
const dir = tempDir(after, 'sparsellm-native-convert-');

function native() {
  const n = nativeConvert();
  assert.ok(n, 'the native addon (with convertElements/packNeuronBlock) must be built: npm run build:native');
  return n;
}

/** Source elements of `dtype` as bytes: every 16-bit pattern, or random f32 bits plus specials. */
function sourceBytes(dtype: DType, count: number): Uint8Array {
  if (dtype !== 'F32') {
    const u = new Uint16Array(count);
    for (let i = 0; i < count; i++) u[i] = count >= 65536 ? i & 0xffff : rng.u32() & 0xffff;
    return new Uint8Array(u.buffer);
  }
  const u = new Uint32Array(count);
  const specials = [0x7f800000, 0xff800000, 0x7f800001, 0xffc00000, 0x7fbfffff, 0x00000001, 0x807fffff, 0x3f808000, 0x3f818000, 0x477ff000, 0x477fe000, 0x33000000, 0x33c00000, 0x387fe000, 0x38800000];
  for (let i = 0; i < count; i++) {
    const r = rng.u32();
    // Low half-words on rounding boundaries half of the time (ties for bf16 and f16 included).
    const lows = [0x8000, 0x1000, 0x0fff, 0x1001, 0x7fff, 0x8001, 0x0000, 0x2000];
    u[i] = i < specials.length ? specials[i]! : i % 2 ? r : ((r & 0xffff0000) | lows[r % lows.length]!) >>> 0;
  }
  return new Uint8Array(u.buffer);
}

test('convertInto equals the JavaScript conversion for every dtype pair (incl. unaligned input)', () => {
  const nc = native();
  for (const from of DTYPES) {
    const src = sourceBytes(from, from === 'F32' ? 200_003 : 65536);
    for (const to of DTYPES) {
      const want = convertBytes(src, from, to).slice();
      const got = nc.convertInto(src, from, to, new Uint8Array(want.byteLength));
      assert.ok(Buffer.from(got).equals(Buffer.from(want)), `${from} → ${to}: native differs from the JavaScript reference`);
      // An input at an odd byte offset (copied to an aligned buffer by the wrapper).
      const odd = new Uint8Array(src.byteLength + 1);
      odd.set(src, 1);
      const got2 = nc.convertInto(odd.subarray(1), from, to, new Uint8Array(want.byteLength));
      assert.ok(Buffer.from(got2).equals(Buffer.from(want)), `${from} → ${to} (unaligned input)`);
    }
  }
});

test('packNeuronBlock equals transposeBlock + convertBytes + interleaveUpDown', () => {
  const nc = native();
  const shapes = [
    { d: 37, F: 53, j0: 0, n: 53 },
    { d: 130, F: 301, j0: 17, n: 40 },
    { d: 8, F: 5, j0: 4, n: 1 },
  ];
  for (const s of shapes) {
    for (const downType of DTYPES) {
      const down = sourceBytes(downType, s.d * s.F);
      for (const upType of DTYPES) {
        const up = sourceBytes(upType, s.n * s.d);
        for (const to of DTYPES) {
          const colsT = convertBytes(transposeBlock(down, s.d, s.F, s.j0, s.j0 + s.n, dtypeSize(downType)), downType, to).slice();
          const upTo = convertBytes(up, upType, to).slice();
          const gated = interleaveUpDown(upTo, colsT, s.n, s.d, dtypeSize(to));
          const got = nc.packNeuronBlock(down, downType, s.d, s.F, s.j0, s.n, { bytes: up, dtype: upType }, to, new Uint8Array(gated.byteLength));
          assert.ok(Buffer.from(got).equals(Buffer.from(gated)), `updown ${JSON.stringify(s)} down ${downType} up ${upType} → ${to}`);
          const plain = nc.packNeuronBlock(down, downType, s.d, s.F, s.j0, s.n, null, to, new Uint8Array(colsT.byteLength));
          assert.ok(Buffer.from(plain).equals(Buffer.from(colsT)), `down_t ${JSON.stringify(s)} down ${downType} → ${to}`);
        }
      }
    }
  }
});

/** The data section of a safetensors file (the header differs by the creation time only). */
function dataSection(path: string): Buffer {
  const b = readFileSync(path);
  return b.subarray(8 + Number(b.readBigUInt64LE(0)));
}

test('writePacked: native and JavaScript paths write identical files for every source × storage dtype', async () => {
  native();
  const cases: { arch: Arch; dtype: DType }[] = [
    { arch: 'llama', dtype: 'F32' },
    { arch: 'llama', dtype: 'F16' },
    { arch: 'llama', dtype: 'BF16' },
    { arch: 'opt', dtype: 'F16' },
    { arch: 'gpt2', dtype: 'BF16' },
  ];
  let k = 0;
  for (const c of cases) {
    const ckDir = join(dir, `ck-${k++}`);
    await writeTinyCheckpoint(ckDir, { arch: c.arch, dtype: c.dtype, seed: rng.u32(), d: 40, dFF: 67, specials: true, tokenizer: true });
    const ckpt = await openCheckpoint(ckDir);
    try {
      for (const storage of ['BF16', 'F16', 'F32'] as StorageDType[]) {
        // Small chunks and one write in flight, then the defaults: several chunkings of each tensor.
        for (const opts of [{ chunkBytes: 1000, writeDepth: 1 }, { chunkBytes: 4096, writeDepth: 2 }, {}]) {
          const what = `${c.arch} ${c.dtype} → ${storage} ${JSON.stringify(opts)}`;
          const js = join(dir, `js-${k}.sllm`);
          const nat = join(dir, `native-${k++}.sllm`);
          const a = await writePacked(await packInputFromCheckpoint(ckpt), js, { dtype: storage, javascriptOnly: true, ...opts });
          const b = await writePacked(await packInputFromCheckpoint(ckpt), nat, { dtype: storage, ...opts });
          assert.equal(b.contentHash, a.contentHash, `${what}: content hash`);
          assert.equal(b.bytesOut, a.bytesOut, `${what}: size`);
          assert.ok(dataSection(nat).equals(dataSection(js)), `${what}: data sections differ`);
        }
      }
    } finally {
      await ckpt.close();
    }
  }
});
