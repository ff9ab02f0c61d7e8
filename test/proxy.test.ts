// The paper-shaped proxy generator (fixtures/proxy/generate.ts): the same bytes whatever the
// number of worker threads, and a ReLU gate that fires for about --nnz neurons per token.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { REPO_ROOT } from './helpers/fixtures.js';
import { tempDir } from './helpers/tmp.js';
import { SafetensorsFile } from '../src/core/checkpoint/safetensors.js';
import { bf16BitsToF32 } from '../src/core/dtype.js';

const GENERATE = join(REPO_ROOT, 'fixtures', 'proxy', 'generate.ts');
// Small and awkward: d_ff not a multiple of any tile.
const SHAPE = ['--d', '256', '--ff', '700', '--heads', '4', '--layers', '2', '--nnz', '21', '--seed', '7'];

function generate(out: string, workers: number): void {
  const r = spawnSync(process.execPath, ['--import', 'tsx', GENERATE, '--out', out, ...SHAPE, '--workers', String(workers)], { cwd: REPO_ROOT, encoding: 'utf8' });
  assert.equal(r.status, 0, r.stderr);
}

async function matrix(f: SafetensorsFile, name: string): Promise<Float32Array> {
  const raw = await f.readTensorBytes(name);
  const bits = new Uint16Array(raw.buffer, raw.byteOffset, raw.byteLength / 2);
  return Float32Array.from(bits, bf16BitsToF32);
}

test('proxy: identical for 1 and 3 workers; the gate fires ~nnz of d_ff per token', async (t) => {
  const dir = tempDir((fn) => t.after(fn), 'sllm-proxy-');
  generate(join(dir, 'a'), 1);
  generate(join(dir, 'b'), 3);
  const a = readFileSync(join(dir, 'a', 'model.safetensors'));
  assert.ok(a.equals(readFileSync(join(dir, 'b', 'model.safetensors'))), 'the bytes depend on the worker count');
  const cfg = JSON.parse(readFileSync(join(dir, 'a', 'config.json'), 'utf8'));
  assert.equal(cfg.intermediate_size, 700);

  // Layer 1's gate on the RMSNorm'd embeddings (the residual stream stays dominated by them).
  const f = await SafetensorsFile.open(join(dir, 'a', 'model.safetensors'));
  const emb = await matrix(f, 'model.embed_tokens.weight');
  const gate = await matrix(f, 'model.layers.1.mlp.gate_proj.weight');
  const up = await matrix(f, 'model.layers.0.mlp.up_proj.weight');
  await f.close();
  assert.equal(gate.length, 700 * 256);
  const d = 256;
  let fired = 0;
  const vocab = emb.length / d;
  for (let tkn = 0; tkn < vocab; tkn++) {
    const row = emb.subarray(tkn * d, (tkn + 1) * d);
    const rms = Math.sqrt(row.reduce((s, x) => s + x * x, 0) / d);
    for (let j = 0; j < 700; j++) {
      let z = 0;
      for (let i = 0; i < d; i++) z += (row[i]! / rms) * gate[j * d + i]!;
      if (z > 0) fired++;
    }
  }
  const perToken = fired / vocab;
  assert.ok(perToken > 21 * 0.6 && perToken < 21 * 1.4, `the gate fires ${perToken.toFixed(1)} per token, target 21`);
  // Plain Gaussian matrices have the stated spread (up_proj: std 1/√d).
  const sd = Math.sqrt(up.reduce((s, x) => s + x * x, 0) / up.length);
  assert.ok(Math.abs(sd * Math.sqrt(d) - 1) < 0.02, `up_proj std ${sd}`);
});
