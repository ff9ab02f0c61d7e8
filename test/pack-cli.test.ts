// `sparsellm pack` end to end through the real binary (node bin/sparsellm.js; dist/ must be built,
// which `npm test` does first): every fixture architecture with --verify --json, the output read
// back with a plain safetensors parse written here, bad inputs (one line, exit 1; usage exit 2),
// and interrupted writes (SIGKILL / SIGINT leave nothing at the output path).
import { test, describe, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { cpSync, existsSync, readFileSync, readdirSync, statSync, writeFileSync, mkdirSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { tempDir } from './helpers/tmp.js';
import { writeSyntheticLlama } from './helpers/format-fixtures.js';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
const BIN = join(ROOT, 'bin', 'sparsellm.js');
const FIXTURES = join(ROOT, 'fixtures', 'models');
const dir = tempDir(after, 'sparsellm-pack-cli-');
let n = 0;
const fresh = (name: string): string => join(dir, `${n++}-${name}`);

function cli(args: string[]): { code: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', env: { ...process.env, FORCE_COLOR: '0', NO_COLOR: '1' }, timeout: 60_000 });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** One line on stderr, naming `names`, with exit code `code`. */
function assertOneLineError(r: ReturnType<typeof cli>, code: number, pattern: RegExp): void {
  assert.equal(r.code, code, `exit code (stderr: ${r.stderr})`);
  const lines = r.stderr.trim().split('\n');
  assert.equal(lines.length, 1, `one line on stderr, got:\n${r.stderr}`);
  assert.match(lines[0]!, /^sparsellm: error: /);
  assert.match(lines[0]!, pattern);
}

/** The header of a safetensors file, parsed here from the bytes (independent of src/). */
function plainList(path: string): { names: string[]; meta: Record<string, string>; header: Record<string, any> } {
  const raw = readFileSync(path);
  const len = Number(raw.readBigUInt64LE(0));
  assert.ok(8 + len <= raw.length);
  const header = JSON.parse(raw.subarray(8, 8 + len).toString('utf8'));
  let end = 0;
  for (const [k, v] of Object.entries<any>(header)) if (k !== '__metadata__') end = Math.max(end, v.data_offsets[1]);
  assert.equal(8 + len + end, raw.length, 'tensors end at the end of the file');
  return { names: Object.keys(header).filter((k) => k !== '__metadata__' && !k.startsWith('__pad.')), meta: header.__metadata__, header };
}

const fixtureDirs = readdirSync(FIXTURES).filter((f) => statSync(join(FIXTURES, f)).isDirectory());

describe('pack every fixture architecture', () => {
  test('there are fixtures of each family', () => {
    assert.ok(fixtureDirs.length >= 5, fixtureDirs.join(', '));
  });
  for (const fx of fixtureDirs) {
    test(`${fx}: --verify --json, listed by a plain safetensors parse`, () => {
      const src = join(FIXTURES, fx);
      const arg = existsSync(join(src, 'model.safetensors')) || existsSync(join(src, 'model.safetensors.index.json'))
        ? src
        : join(src, readdirSync(src).find((f) => f.endsWith('.safetensors'))!);
      const out = fresh(`${fx}.sllm`);
      const r = cli(['pack', arg, '-o', out, '--verify', '--json']);
      assert.equal(r.code, 0, r.stderr);
      const s = JSON.parse(r.stdout);
      const config = JSON.parse(readFileSync(join(src, 'config.json'), 'utf8'));
      assert.equal(s.architecture, config.model_type);
      assert.equal(s.output, out);
      assert.equal(s.dtype, 'BF16');
      assert.equal(s.verify.ok, true);
      assert.equal(s.verify.mismatches, 0);
      assert.equal(s.verify.contentHash, true);
      assert.equal(s.bytesOut, statSync(out).size);
      assert.ok(s.bytesIn > 0 && s.seconds >= 0 && s.layers >= 1);
      const { names, meta, header } = plainList(out);
      assert.equal(names.length, s.tensors);
      assert.equal(meta.format, 'sparsellm-packed');
      const spec = JSON.parse(meta.model!);
      assert.equal(spec.nLayers, s.layers);
      for (let i = 0; i < spec.nLayers; i++) {
        const F = spec.dFF[i];
        if (spec.gated) {
          assert.deepEqual(header[`layers.${i}.ffn.gate`].shape, [F, spec.dModel]);
          assert.deepEqual(header[`layers.${i}.ffn.updown`].shape, [F, 2, spec.dModel]);
        } else {
          assert.deepEqual(header[`layers.${i}.ffn.up`].shape, [F, spec.dModel]);
          assert.deepEqual(header[`layers.${i}.ffn.down_t`].shape, [F, spec.dModel]);
        }
      }
      // Human text went to stderr, not into the JSON.
      assert.match(r.stderr, /verified/);
    });
  }

  test('--dtype f32 and f16, --quiet prints nothing', () => {
    for (const dt of ['f32', 'f16']) {
      const out = fresh(`q-${dt}.sllm`);
      const r = cli(['pack', join(FIXTURES, 'opt'), '-o', out, '--dtype', dt, '--verify', '--quiet']);
      assert.equal(r.code, 0, r.stderr);
      assert.equal(r.stdout, '');
      assert.equal(r.stderr, '');
      assert.equal(plainList(out).meta.storage_dtype, dt.toUpperCase());
    }
  });
});

describe('pack errors', () => {
  /** A copy of a fixture in a temp dir, to damage. */
  const copyFixture = (fx: string): string => {
    const d = fresh(fx);
    cpSync(join(FIXTURES, fx), d, { recursive: true });
    return d;
  };
  const st = (d: string) => join(d, 'model.safetensors');
  const header = (path: string) => {
    const raw = readFileSync(path);
    const len = Number(raw.readBigUInt64LE(0));
    return { raw, len, json: JSON.parse(raw.subarray(8, 8 + len).toString('utf8')) };
  };
  /** Rewrites the header JSON in place (padded with spaces to its old length, or longer). */
  const rewriteHeader = (path: string, edit: (h: any) => void) => {
    const { raw, len, json } = header(path);
    edit(json);
    let text = Buffer.from(JSON.stringify(json));
    if (text.length < len) text = Buffer.concat([text, Buffer.alloc(len - text.length, 0x20)]);
    const head = Buffer.alloc(8);
    head.writeBigUInt64LE(BigInt(text.length));
    writeFileSync(path, Buffer.concat([head, text, raw.subarray(8 + len)]));
  };
  const packTo = (src: string, ...extra: string[]) => cli(['pack', src, '-o', fresh('out.sllm'), ...extra]);

  test('truncated checkpoint', () => {
    const d = copyFixture('opt');
    const raw = readFileSync(st(d));
    writeFileSync(st(d), raw.subarray(0, raw.length - 1000));
    assertOneLineError(packTo(d), 1, /model\.safetensors: .*(out of range|truncated)/);
  });
  test('header length past the end', () => {
    const d = copyFixture('opt');
    const raw = readFileSync(st(d));
    raw.writeBigUInt64LE(BigInt(raw.length), 0);
    writeFileSync(st(d), raw);
    assertOneLineError(packTo(d), 1, /model\.safetensors: header length .* past the end/);
  });
  test('header that is not JSON', () => {
    const d = copyFixture('opt');
    const raw = readFileSync(st(d));
    raw.write('{{{{', 8);
    writeFileSync(st(d), raw);
    assertOneLineError(packTo(d), 1, /model\.safetensors: header is not valid JSON/);
  });
  test('overlapping tensor offsets', () => {
    const d = copyFixture('opt');
    rewriteHeader(st(d), (h) => {
      const names = Object.keys(h).filter((k) => k !== '__metadata__').sort((a, b) => h[a].data_offsets[0] - h[b].data_offsets[0]);
      const [a, b] = [h[names[1]!], h[names[2]!]];
      const len = b.data_offsets[1] - b.data_offsets[0];
      b.data_offsets = [a.data_offsets[0], a.data_offsets[0] + len];
    });
    assertOneLineError(packTo(d), 1, /model\.safetensors: .*(overlaps|hole)/);
  });
  test('unsupported dtype', () => {
    const d = copyFixture('opt');
    rewriteHeader(st(d), (h) => {
      const e = h['model.decoder.layers.0.fc1.weight'];
      const bytes = e.data_offsets[1] - e.data_offsets[0];
      e.dtype = 'I8';
      e.shape = [bytes];
    });
    assertOneLineError(packTo(d), 1, /model\.safetensors: tensor 'model\.decoder\.layers\.0\.fc1\.weight' has dtype I8/);
  });
  test('tensor missing', () => {
    const d = copyFixture('opt');
    rewriteHeader(st(d), (h) => {
      h['renamed.fc2'] = h['model.decoder.layers.1.fc2.weight'];
      delete h['model.decoder.layers.1.fc2.weight'];
    });
    assertOneLineError(packTo(d), 1, /tensor 'model\.decoder\.layers\.1\.fc2\.weight' is missing/);
  });
  test('tensor of the wrong shape for the config', () => {
    const d = copyFixture('opt');
    const c = JSON.parse(readFileSync(join(d, 'config.json'), 'utf8'));
    c.ffn_dim = c.ffn_dim / 2;
    writeFileSync(join(d, 'config.json'), JSON.stringify(c));
    assertOneLineError(packTo(d), 1, /has shape \[.*\], expected \[.*\]/);
  });
  test('unknown architecture', () => {
    const d = copyFixture('opt');
    writeFileSync(join(d, 'config.json'), JSON.stringify({ ...JSON.parse(readFileSync(join(d, 'config.json'), 'utf8')), model_type: 'mamba' }));
    assertOneLineError(packTo(d), 1, /config\.json: unknown architecture: model_type "mamba"/);
  });
  test('missing config field', () => {
    const d = copyFixture('gpt2');
    const c = JSON.parse(readFileSync(join(d, 'config.json'), 'utf8'));
    delete c.n_embd;
    writeFileSync(join(d, 'config.json'), JSON.stringify(c));
    assertOneLineError(packTo(d), 1, /config\.json: .*missing the required field n_embd/);
  });
  test('checkpoint path that does not exist', () => {
    assertOneLineError(packTo(join(dir, 'nowhere')), 1, /nowhere: no such file or directory/);
  });
  test('output directory missing', () => {
    const out = join(dir, 'missing-dir', 'm.sllm');
    assertOneLineError(cli(['pack', join(FIXTURES, 'opt'), '-o', out]), 1, /m\.sllm: output directory .*missing-dir does not exist/);
  });
  test('output directory not writable', () => {
    let parent: string;
    if (process.getuid?.() === 0) {
      parent = '/sys'; // root may write anywhere permissions allow; sysfs refuses new files
    } else {
      parent = fresh('ro');
      mkdirSync(parent, { mode: 0o555 });
    }
    const out = join(parent, `sparsellm-test-${process.pid}.sllm`);
    assertOneLineError(cli(['pack', join(FIXTURES, 'opt'), '-o', out]), 1, /sparsellm-test-\d+\.sllm: .*directory .* is not writable/);
    assert.ok(!existsSync(out));
  });
  test('output exists without --force; --force replaces it', () => {
    const out = fresh('exists.sllm');
    writeFileSync(out, 'precious');
    assertOneLineError(cli(['pack', join(FIXTURES, 'opt'), '-o', out]), 1, /exists\.sllm: already exists \(use --force to overwrite\)/);
    assert.equal(readFileSync(out, 'utf8'), 'precious');
    const r = cli(['pack', join(FIXTURES, 'opt'), '-o', out, '--force', '--quiet']);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(plainList(out).meta.format, 'sparsellm-packed');
  });
  test('usage errors exit 2', () => {
    assert.equal(cli(['pack', join(FIXTURES, 'opt')]).code, 2, 'missing -o');
    assert.equal(cli(['pack', join(FIXTURES, 'opt'), '-o', fresh('x.sllm'), '--dtype', 'f8']).code, 2, 'bad --dtype');
    assert.equal(cli(['pack']).code, 2, 'missing checkpoint');
  });
  test('a stale temporary file of a killed pack is removed by the next pack to the same output', () => {
    const out = fresh('stale.sllm');
    // A pid that is not running: spawn a process and wait for it to end.
    const dead = spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))'], { encoding: 'utf8' }).stdout;
    const stale = join(dirname(out), `.${out.split('/').pop()}.tmp-${dead}-deadbeef`);
    writeFileSync(stale, 'left by a killed pack');
    const r = cli(['pack', join(FIXTURES, 'opt'), '-o', out, '--quiet']);
    assert.equal(r.code, 0, r.stderr);
    assert.ok(!existsSync(stale));
  });
});

describe('interrupted pack leaves no file at the output path', () => {
  let big: string;
  const bigCheckpoint = async (): Promise<string> => {
    if (big) return big;
    big = fresh('big');
    // F32 source → BF16: ~110 MB to read, convert and hash, a second or more on this machine.
    await writeSyntheticLlama(big, { dModel: 1024, dFF: 2816, nLayers: 2, vocab: 1000, dtype: 'F32' });
    return big;
  };

  /** Starts pack, waits until its temporary file holds `minBytes`, sends `signal`. */
  async function interrupt(signal: NodeJS.Signals): Promise<{ out: string; code: number | null; sig: NodeJS.Signals | null; stderr: string }> {
    const src = await bigCheckpoint();
    const outDir = fresh(`int-${signal}`);
    mkdirSync(outDir);
    const out = join(outDir, 'big.sllm');
    const child = spawn(process.execPath, [BIN, 'pack', src, '-o', out, '--dtype', 'bf16'], { env: { ...process.env, FORCE_COLOR: '0' }, stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    child.stderr.on('data', (b) => (stderr += b));
    const done = new Promise<{ code: number | null; sig: NodeJS.Signals | null }>((res) => child.on('exit', (code, sig) => res({ code, sig })));
    const deadline = Date.now() + 30_000;
    let sent = false;
    while (Date.now() < deadline) {
      const tmp = readdirSync(outDir).find((f) => f.includes('.tmp-'));
      if (tmp && statSync(join(outDir, tmp), { throwIfNoEntry: false })?.size! > 8e6) {
        child.kill(signal);
        sent = true;
        break;
      }
      if (child.exitCode !== null) break;
      await new Promise((r) => setTimeout(r, 10));
    }
    assert.ok(sent, `pack was still writing when signalled (stderr: ${stderr})`);
    const { code, sig } = await done;
    return { out, code, sig, stderr };
  }

  test('SIGKILL mid-write: no file at the output path', async () => {
    const r = await interrupt('SIGKILL');
    assert.equal(r.sig, 'SIGKILL');
    assert.ok(!existsSync(r.out), 'nothing at the output path');
  });

  test('SIGINT mid-write: no output and the temporary file removed', async () => {
    const r = await interrupt('SIGINT');
    assert.ok(r.sig === 'SIGINT' || r.code === 130, `ended by the signal (code ${r.code}, signal ${r.sig}, stderr ${r.stderr})`);
    assert.ok(!existsSync(r.out), 'nothing at the output path');
    assert.deepEqual(readdirSync(dirname(r.out)), [], 'no temporary file left');
  });

  test('SIGTERM mid-write: likewise', async () => {
    const r = await interrupt('SIGTERM');
    assert.ok(r.sig === 'SIGTERM' || r.code === 130, `ended by the signal (code ${r.code}, signal ${r.sig})`);
    assert.deepEqual(readdirSync(dirname(r.out)), []);
  });
});
