// The safetensors container: round trips, chunked and aligned writes, and every malformed input
// the reader must reject with a message naming the file and the tensor.
import { test, describe, after } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { SafetensorsFile, SafetensorsWriter, PAD_PREFIX, MAX_HEADER_BYTES } from '../src/core/checkpoint/safetensors.js';
import { FormatError } from '../src/core/errors.js';
import { encodeFromF32, decodeToF32, type DType } from '../src/core/dtype.js';
import { Rng } from './helpers/rng.js';
import { tempDir } from './helpers/tmp.js';
import { writeRawSafetensors, plainSafetensorsCheck } from './helpers/safetensors.js';

const seed = Rng.seedFromEnv(20261128);
console.log(`safetensors.test seed=${seed}`);
const rng = new Rng(seed);
const dir = tempDir(after);
let fileNo = 0;
const fresh = (name = 'x.safetensors'): string => join(dir, `${fileNo++}-${name}`);

async function expectFormatError(path: string, pattern: RegExp, options?: Parameters<typeof SafetensorsFile.open>[1]): Promise<FormatError> {
  try {
    const f = await SafetensorsFile.open(path, options);
    await f.close();
  } catch (e) {
    assert.ok(e instanceof FormatError, `expected FormatError, got ${String(e)}`);
    assert.ok(e.message.startsWith(path), `message names the file: ${e.message}`);
    assert.match(e.message, pattern);
    return e;
  }
  assert.fail(`expected ${path} to be rejected with ${pattern}`);
}

interface Made { name: string; dtype: DType; shape: number[]; bytes: Uint8Array }

function randomTensor(name: string, dtype: DType, shape: number[]): Made {
  const n = shape.reduce((a, b) => a * b, 1);
  return { name, dtype, shape, bytes: encodeFromF32(rng.normalArray(n, 1), dtype) };
}

async function writeAll(path: string, tensors: Made[], alignment: number, metadata?: Record<string, string>): Promise<void> {
  const w = await SafetensorsWriter.create(path, { tensors, metadata, alignment });
  for (const t of tensors) await w.write(t.name, t.bytes);
  await w.finish();
}

describe('safetensors round trip', () => {
  for (const dtype of ['F32', 'F16', 'BF16'] as DType[]) {
    for (const alignment of [1, 64]) {
      test(`${dtype}, alignment ${alignment}`, async () => {
        const tensors = [
          randomTensor('a.weight', dtype, [7, 13]),
          randomTensor('b', dtype, [3]),
          randomTensor('empty', dtype, [0, 5]),
          randomTensor('scalar', dtype, []),
          randomTensor('c.bias', dtype, [2, 3, 5]),
        ];
        const path = fresh();
        await writeAll(path, tensors, alignment, { format: 'test', note: 'ü ✓' });
        const f = await SafetensorsFile.open(path);
        try {
          assert.deepEqual(f.names().sort(), tensors.map((t) => t.name).sort());
          assert.deepEqual({ ...f.metadata }, { format: 'test', note: 'ü ✓' });
          for (const t of tensors) {
            const info = f.info(t.name);
            assert.equal(info.dtype, dtype);
            assert.deepEqual(info.shape, t.shape);
            const got = await f.readTensorBytes(t.name);
            assert.deepEqual(got, t.bytes);
            // Values survive too (decode both sides).
            assert.deepEqual(decodeToF32(got, dtype), decodeToF32(t.bytes, dtype));
          }
          assert.equal(f.dataStart % Math.max(8, alignment), 0);
        } finally {
          await f.close();
        }
        plainSafetensorsCheck(readFileSync(path));
      });
    }
  }

  test('mixed dtypes in one file', async () => {
    const tensors = [randomTensor('x', 'BF16', [5, 3]), randomTensor('y', 'F32', [9]), randomTensor('z', 'F16', [11])];
    const path = fresh();
    await writeAll(path, tensors, 1);
    const f = await SafetensorsFile.open(path);
    for (const t of tensors) assert.deepEqual(await f.readTensorBytes(t.name), t.bytes);
    await f.close();
  });

  test('chunked writes and the chunk iterator', async () => {
    const big = randomTensor('big', 'F32', [1000]);
    const small = randomTensor('small', 'BF16', [17]);
    const path = fresh();
    const w = await SafetensorsWriter.create(path, { tensors: [big, small], alignment: 64 });
    // Uneven chunk sizes, including an empty one.
    const cuts = [0, 1, 100, 100, 1333, 4000];
    for (let i = 0; i + 1 < cuts.length; i++) await w.write('big', big.bytes.subarray(cuts[i]!, cuts[i + 1]!));
    await w.write('small', small.bytes.subarray(0, 10));
    await w.write('small', small.bytes.subarray(10));
    await w.finish();
    const f = await SafetensorsFile.open(path);
    const parts: Uint8Array[] = [];
    for await (const c of f.chunks('big', 999)) {
      assert.ok(c.byteLength <= 999 && c.byteLength % 4 === 0, `chunk of ${c.byteLength} bytes is whole F32 elements`);
      parts.push(c);
    }
    assert.ok(parts.length > 1);
    assert.deepEqual(Buffer.concat(parts), Buffer.from(big.bytes));
    assert.deepEqual(await f.readRange('big', 8, 12), big.bytes.subarray(8, 20));
    const into = new Uint8Array(16);
    assert.deepEqual(await f.readInto('big', 3996 - 16, into), big.bytes.subarray(3980, 3996));
    await assert.rejects(f.readInto('big', 3990, into), /range \[3990, 4006\) is outside tensor 'big' \(4000 bytes\)/);
    await assert.rejects(f.readRange('small', 0, 35), /is outside tensor 'small'/);
    assert.deepEqual(await f.readTensorBytes('small'), small.bytes);
    await f.close();
  });

  test('alignment: every tensor starts on a multiple, padding is explicit and hidden', async () => {
    const tensors = [randomTensor('t0', 'BF16', [3]), randomTensor('t1', 'F32', [5]), randomTensor('t2', 'F16', [33]), randomTensor('t3', 'F32', [64])];
    const path = fresh();
    await writeAll(path, tensors, 64, { k: 'v' });
    const f = await SafetensorsFile.open(path);
    assert.equal(f.dataStart % 64, 0);
    for (const t of tensors) assert.equal(f.info(t.name).begin % 64, 0, `${t.name} aligned`);
    assert.equal(f.paddingTensors.length, 3);
    assert.ok(f.paddingTensors.every((n) => n.startsWith(PAD_PREFIX)));
    assert.ok(f.names().every((n) => !n.startsWith(PAD_PREFIX)));
    await f.close();
    // A plain reader sees the padding as ordinary U8 tensors, and the file as valid.
    const header = plainSafetensorsCheck(readFileSync(path));
    const pads = Object.entries(header).filter(([k]) => k.startsWith(PAD_PREFIX));
    assert.equal(pads.length, 3);
    for (const [, e] of pads) assert.equal(e.dtype, 'U8');
  });

  test('alignment 1 writes no padding tensors', async () => {
    const tensors = [randomTensor('t0', 'BF16', [3]), randomTensor('t1', 'F32', [5])];
    const path = fresh();
    await writeAll(path, tensors, 1);
    const f = await SafetensorsFile.open(path);
    assert.equal(f.paddingTensors.length, 0);
    assert.equal(f.info('t1').begin - f.dataStart, 6);
    await f.close();
  });

  test('U8 tensors are rejected by the dense reader and accepted on request', async () => {
    const path = fresh();
    const w = await SafetensorsWriter.create(path, { tensors: [{ name: 'blob', dtype: 'U8', shape: [5] }] });
    await w.write('blob', new Uint8Array([1, 2, 3, 4, 5]));
    await w.finish();
    await expectFormatError(path, /tensor 'blob' has dtype U8, which sparsellm does not read \(F32, F16, BF16\)/);
    const f = await SafetensorsFile.open(path, { dtypes: ['U8'] });
    assert.deepEqual(await f.readTensorBytes('blob'), new Uint8Array([1, 2, 3, 4, 5]));
    await f.close();
  });
});

describe('safetensors writer failures', () => {
  test('abort leaves no file at the path and no temporary', async () => {
    const sub = tempDir(after);
    const path = join(sub, 'out.safetensors');
    const t = randomTensor('w', 'F32', [100]);
    const w = await SafetensorsWriter.create(path, { tensors: [t] });
    await w.write('w', t.bytes.subarray(0, 40));
    assert.ok(existsSync(w.tempPath));
    assert.ok(!existsSync(path));
    await w.abort();
    assert.deepEqual(readdirSync(sub), []);
  });

  test('abort does not touch an existing file at the path', async () => {
    const sub = tempDir(after);
    const path = join(sub, 'out.safetensors');
    writeFileSync(path, 'previous');
    const t = randomTensor('w', 'F32', [4]);
    const w = await SafetensorsWriter.create(path, { tensors: [t] });
    await w.write('w', t.bytes);
    await w.abort();
    assert.equal(readFileSync(path, 'utf8'), 'previous');
    assert.deepEqual(readdirSync(sub), ['out.safetensors']);
  });

  test('finish with a tensor incomplete fails and leaves nothing', async () => {
    const sub = tempDir(after);
    const path = join(sub, 'out.safetensors');
    const a = randomTensor('a', 'F32', [10]);
    const b = randomTensor('b', 'F32', [10]);
    const w = await SafetensorsWriter.create(path, { tensors: [a, b] });
    await w.write('a', a.bytes);
    await w.write('b', b.bytes.subarray(0, 39));
    await assert.rejects(w.finish(), /tensor 'b' is incomplete \(39 of 40 bytes written\)/);
    assert.deepEqual(readdirSync(sub), []);
  });

  test('a missing or unwritable output directory is a clear error', async () => {
    const t = randomTensor('w', 'F32', [4]);
    await assert.rejects(SafetensorsWriter.create(join(dir, 'no-such-dir', 'out.safetensors'), { tensors: [t] }), /cannot write: directory .*no-such-dir does not exist/);
    const file = fresh('plain-file');
    writeFileSync(file, 'x');
    await assert.rejects(SafetensorsWriter.create(join(file, 'out.safetensors'), { tensors: [t] }), /cannot write: .*plain-file is not a directory/);
  });

  test('out-of-order, undeclared and overflowing writes are refused', async () => {
    const a = randomTensor('a', 'F32', [10]);
    const b = randomTensor('b', 'F32', [10]);
    const w = await SafetensorsWriter.create(fresh(), { tensors: [a, b] });
    await assert.rejects(w.write('b', b.bytes), /tensor 'b' written before tensor 'a' was complete/);
    await assert.rejects(w.write('zz', b.bytes), /tensor 'zz' was not declared/);
    await w.write('a', a.bytes.subarray(0, 20));
    await assert.rejects(w.write('a', a.bytes), /overflows/);
    await w.write('a', a.bytes.subarray(20));
    await w.write('b', b.bytes.subarray(0, 4));
    await assert.rejects(w.write('a', a.bytes.subarray(0, 4)), /already complete/);
    await w.abort();
  });
});

describe('safetensors reader rejects malformed files', () => {
  const f32 = (n: number): Uint8Array => encodeFromF32(rng.normalArray(n), 'F32');

  test('truncated file (shorter than the length prefix)', async () => {
    const path = fresh();
    writeFileSync(path, new Uint8Array([1, 2, 3]));
    await expectFormatError(path, /truncated: 3 bytes, shorter than the 8-byte header length/);
  });

  test('empty file', async () => {
    const path = fresh();
    writeFileSync(path, new Uint8Array(0));
    await expectFormatError(path, /truncated: 0 bytes/);
  });

  test('truncated file (data cut short)', async () => {
    const t = randomTensor('w', 'F32', [10, 10]);
    const path = fresh();
    await writeAll(path, [t], 1);
    const bytes = readFileSync(path);
    writeFileSync(path, bytes.subarray(0, bytes.length - 7));
    await expectFormatError(path, /tensor 'w': data_offsets \[0, 400\] are out of range: the data section has 393 bytes/);
  });

  test('truncated file (inside the header)', async () => {
    const t = randomTensor('w', 'F32', [4]);
    const path = fresh();
    await writeAll(path, [t], 1);
    writeFileSync(path, readFileSync(path).subarray(0, 20));
    await expectFormatError(path, /header length \d+ runs past the end of the file \(20 bytes\)/);
  });

  test('header length past the end of the file', async () => {
    const path = writeRawSafetensors(fresh(), { w: { dtype: 'F32', shape: [1], data_offsets: [0, 4] } }, f32(1), 5000n);
    await expectFormatError(path, /header length 5000 runs past the end of the file/);
  });

  test('header length over the limit', async () => {
    const path = writeRawSafetensors(fresh(), {}, undefined, BigInt(MAX_HEADER_BYTES) + 1n);
    await expectFormatError(path, /exceeds the 100000000-byte limit/);
    const path2 = writeRawSafetensors(fresh(), {}, undefined, 0xffffffffffffffffn);
    await expectFormatError(path2, /header length 18446744073709551615 exceeds/);
  });

  test('header not JSON', async () => {
    const path = writeRawSafetensors(fresh(), '{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}', f32(1));
    await expectFormatError(path, /header is not valid JSON/);
    await expectFormatError(writeRawSafetensors(fresh(), '[1,2]'), /header is not a JSON object/);
    await expectFormatError(writeRawSafetensors(fresh(), 'null'), /header is not a JSON object/);
    const bad = new Uint8Array([0x7b, 0xff, 0xfe, 0x7d]);
    const p3 = fresh();
    const buf = new Uint8Array(12);
    new DataView(buf.buffer).setBigUint64(0, 4n, true);
    buf.set(bad, 8);
    writeFileSync(p3, buf);
    await expectFormatError(p3, /header is not valid UTF-8/);
  });

  test('tensor offsets out of range', async () => {
    const path = writeRawSafetensors(fresh(), { w: { dtype: 'F32', shape: [4], data_offsets: [0, 16] } }, f32(2));
    await expectFormatError(path, /tensor 'w': data_offsets \[0, 16\] are out of range: the data section has 8 bytes/);
    const p2 = writeRawSafetensors(fresh(), { w: { dtype: 'F32', shape: [1], data_offsets: [8, 4] } }, f32(2));
    await expectFormatError(p2, /tensor 'w': data_offsets \[8, 4\] end before they begin/);
    const p3 = writeRawSafetensors(fresh(), { w: { dtype: 'F32', shape: [1], data_offsets: [-4, 0] } }, f32(2));
    await expectFormatError(p3, /tensor 'w': data_offsets \[-4,0\] are not non-negative integers/);
    const p4 = writeRawSafetensors(fresh(), { w: { dtype: 'F32', shape: [1], data_offsets: [0] } }, f32(1));
    await expectFormatError(p4, /tensor 'w': data_offsets missing or not a \[begin, end\] pair/);
  });

  test('overlapping tensors', async () => {
    const path = writeRawSafetensors(
      fresh(),
      { a: { dtype: 'F32', shape: [2], data_offsets: [0, 8] }, b: { dtype: 'F32', shape: [2], data_offsets: [4, 12] } },
      f32(3),
    );
    await expectFormatError(path, /tensor 'b' \(data_offsets \[4, 12\]\) overlaps tensor 'a'/);
  });

  test('holes between tensors, at the start, and at the end', async () => {
    const p1 = writeRawSafetensors(
      fresh(),
      { a: { dtype: 'F32', shape: [1], data_offsets: [0, 4] }, b: { dtype: 'F32', shape: [1], data_offsets: [8, 12] } },
      f32(3),
    );
    await expectFormatError(p1, /hole of 4 bytes after tensor 'a', before tensor 'b'/);
    const p2 = writeRawSafetensors(fresh(), { a: { dtype: 'F32', shape: [1], data_offsets: [4, 8] } }, f32(2));
    await expectFormatError(p2, /hole of 4 bytes at the start of the data section, before tensor 'a'/);
    const p3 = writeRawSafetensors(fresh(), { a: { dtype: 'F32', shape: [1], data_offsets: [0, 4] } }, f32(2));
    await expectFormatError(p3, /4 bytes of data after the last tensor 'a' are not described by the header/);
  });

  test('unsupported dtype, named', async () => {
    const path = writeRawSafetensors(fresh(), { 'model.ids': { dtype: 'I64', shape: [2], data_offsets: [0, 16] } }, new Uint8Array(16));
    await expectFormatError(path, /tensor 'model\.ids' has dtype I64, which sparsellm does not read \(F32, F16, BF16\)/);
    const p2 = writeRawSafetensors(fresh(), { x: { dtype: 'Q4_K', shape: [2], data_offsets: [0, 2] } }, new Uint8Array(2));
    await expectFormatError(p2, /tensor 'x' has dtype "Q4_K", which is not a safetensors dtype/);
  });

  test('shape and byte size disagree', async () => {
    const path = writeRawSafetensors(fresh(), { w: { dtype: 'BF16', shape: [3, 2], data_offsets: [0, 8] } }, new Uint8Array(8));
    await expectFormatError(path, /tensor 'w': shape \[3,2\] × BF16 \(2 bytes\) is 12 bytes, but data_offsets \[0, 8\] span 8/);
    const p2 = writeRawSafetensors(fresh(), { w: { dtype: 'F32', shape: [-1, 2], data_offsets: [0, 8] } }, new Uint8Array(8));
    await expectFormatError(p2, /tensor 'w': shape \[-1,2\] has a dimension that is not a non-negative integer/);
    const p3 = writeRawSafetensors(fresh(), { w: { dtype: 'F32', shape: [1.5], data_offsets: [0, 8] } }, new Uint8Array(8));
    await expectFormatError(p3, /not a non-negative integer/);
    const p4 = writeRawSafetensors(fresh(), { w: { dtype: 'F32', data_offsets: [0, 8] } }, new Uint8Array(8));
    await expectFormatError(p4, /tensor 'w': shape missing/);
  });

  test('metadata must map strings to strings', async () => {
    const path = writeRawSafetensors(fresh(), { __metadata__: { n: 3 } });
    await expectFormatError(path, /__metadata__ entry 'n' is not a string/);
    const p2 = writeRawSafetensors(fresh(), { __metadata__: ['a'] });
    await expectFormatError(p2, /__metadata__ is not a JSON object of strings/);
  });

  test('padding tensors must be U8 and 1-D', async () => {
    const path = writeRawSafetensors(fresh(), { '__pad.0': { dtype: 'F32', shape: [1], data_offsets: [0, 4] } }, new Uint8Array(4));
    await expectFormatError(path, /tensor '__pad\.0': padding tensors .* must have dtype U8, found F32/);
  });

  test('a directory or a missing path', async () => {
    await expectFormatError(dir, /is a directory/);
    await expectFormatError(join(dir, 'nope.safetensors'), /no such file/);
  });

  test('header order need not follow data order (as in files written by other tools)', async () => {
    const data = new Uint8Array(12).map((_, i) => i);
    const path = writeRawSafetensors(fresh(), {
      z: { dtype: 'F32', shape: [1], data_offsets: [8, 12] },
      __metadata__: { format: 'pt' },
      a: { dtype: 'BF16', shape: [2, 2], data_offsets: [0, 8] },
    }, data);
    const f = await SafetensorsFile.open(path);
    assert.deepEqual(f.names(), ['a', 'z']);
    assert.deepEqual(await f.readTensorBytes('z'), data.subarray(8));
    assert.deepEqual(await f.readTensorBytes('a'), data.subarray(0, 8));
    assert.equal(f.metadata.format, 'pt');
    await f.close();
  });

  test('an empty header with no data is a valid (empty) file', async () => {
    const f = await SafetensorsFile.open(writeRawSafetensors(fresh(), {}));
    assert.deepEqual(f.names(), []);
    await f.close();
  });
});
