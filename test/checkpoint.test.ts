// Dense checkpoint reading: every fixture reads to the expected ModelSpec, tensors come out in
// canonical orientation (checked element-wise against an independent decoding of the stored
// bytes), the fixtures regenerate byte for byte, and each bad input fails with a precise message.
import { test, describe, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync, readdirSync, rmSync, statSync } from 'node:fs';
import { join, relative } from 'node:path';
import { openCheckpoint, specFromConfig, type DenseCheckpoint } from '../src/core/checkpoint/index.js';
import { SafetensorsFile } from '../src/core/checkpoint/safetensors.js';
import { canonicalTensors } from '../src/core/model/canonical.js';
import type { ModelSpec } from '../src/core/model/spec.js';
import { FormatError, ModelError, SparseLlmError } from '../src/core/errors.js';
import { generateFixtures, DEFAULT_SEED, FIXTURE_NAMES } from '../fixtures/generate.js';
import { tempDir } from './helpers/tmp.js';
import { Rng } from './helpers/rng.js';
import { FIXTURES_DIR, FIXTURE_PATHS, copyFixture, rewriteSafetensors } from './helpers/fixtures.js';

const dir = tempDir(after);

// ---- independent decoding of stored bytes ------------------------------------------------------

function decodeIndependently(bytes: Uint8Array, dtype: string): number[] {
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out: number[] = [];
  if (dtype === 'F32') for (let i = 0; i < bytes.length; i += 4) out.push(dv.getFloat32(i, true));
  else if (dtype === 'BF16') {
    const tmp = new DataView(new ArrayBuffer(4));
    for (let i = 0; i < bytes.length; i += 2) {
      tmp.setUint32(0, dv.getUint16(i, true) * 65536);
      out.push(tmp.getFloat32(0));
    }
  } else if (dtype === 'F16') {
    for (let i = 0; i < bytes.length; i += 2) {
      const h = dv.getUint16(i, true);
      const s = h >> 15 ? -1 : 1;
      const e = (h >> 10) & 31;
      const m = h & 1023;
      out.push(e === 0 ? s * m * Math.pow(2, -24) : e === 31 ? (m ? NaN : s * Infinity) : s * Math.pow(2, e - 15) * (1 + m / 1024));
    }
  } else throw new Error(dtype);
  return out;
}

/** The stored tensor `name` in the checkpoint's files, decoded, with its stored shape. */
async function stored(ck: DenseCheckpoint, sourceName: string): Promise<{ values: number[]; shape: number[] }> {
  for (const sf of ck.sourceFiles.filter((s) => s.path.endsWith('.safetensors'))) {
    const f = await SafetensorsFile.open(sf.path);
    try {
      if (f.has(sourceName)) {
        const info = f.info(sourceName);
        return { values: decodeIndependently(await f.readTensorBytes(sourceName), info.dtype), shape: info.shape };
      }
    } finally {
      await f.close();
    }
  }
  throw new Error(`no stored tensor ${sourceName}`);
}

// ---- expected specs ----------------------------------------------------------------------------

type SpecCore = Omit<ModelSpec, 'config'>;
const llamaBase = {
  family: 'llama', vocabSize: 256, nLayers: 2, maxPositions: 128, gated: true, norm: 'rmsnorm', positions: 'rope',
  positionOffset: 0, linearBias: false, bosTokenId: 1, eosTokenId: 2,
} as const;
const EXPECTED: Record<string, SpecCore> = {
  'llama-silu': { ...llamaBase, modelType: 'llama', dModel: 64, nHeads: 4, nKvHeads: 4, headDim: 16, dFF: [172, 172], activation: 'silu', normEps: 1e-6, ropeTheta: 10000, tiedEmbeddings: false, qkvBias: false },
  'llama-relu-gqa': { ...llamaBase, modelType: 'llama', dModel: 64, nHeads: 8, nKvHeads: 2, headDim: 8, dFF: [300, 300], activation: 'relu', normEps: 1e-5, ropeTheta: 500000, tiedEmbeddings: true, qkvBias: false },
  'mistral-gqa': { ...llamaBase, modelType: 'mistral', dModel: 48, nHeads: 4, nKvHeads: 2, headDim: 16, dFF: [128, 128], activation: 'silu', normEps: 1e-5, ropeTheta: 1e6, tiedEmbeddings: false, qkvBias: false, slidingWindow: 4096 },
  'qwen2-bias': { ...llamaBase, modelType: 'qwen2', dModel: 32, nHeads: 4, nKvHeads: 2, headDim: 8, dFF: [96, 96], activation: 'silu', normEps: 1e-6, ropeTheta: 1e6, tiedEmbeddings: true, qkvBias: true },
  gpt2: {
    family: 'gpt2', modelType: 'gpt2', vocabSize: 256, dModel: 32, nLayers: 2, nHeads: 4, nKvHeads: 4, headDim: 8, dFF: [128, 128], maxPositions: 128,
    gated: false, activation: 'gelu_tanh', norm: 'layernorm', normEps: 1e-5, positions: 'learned', ropeTheta: 0, positionOffset: 0,
    tiedEmbeddings: true, qkvBias: true, linearBias: true, bosTokenId: 0, eosTokenId: 0,
  },
  opt: {
    family: 'opt', modelType: 'opt', vocabSize: 256, dModel: 32, nLayers: 2, nHeads: 4, nKvHeads: 4, headDim: 8, dFF: [80, 80], maxPositions: 128,
    gated: false, activation: 'relu', norm: 'layernorm', normEps: 1e-5, positions: 'learned', ropeTheta: 0, positionOffset: 2,
    tiedEmbeddings: true, qkvBias: true, linearBias: true, bosTokenId: 2, eosTokenId: 2,
  },
  'llama-sharded': { ...llamaBase, modelType: 'llama', dModel: 32, nHeads: 4, nKvHeads: 4, headDim: 8, dFF: [88, 88], activation: 'silu', normEps: 1e-6, ropeTheta: 10000, tiedEmbeddings: false, qkvBias: false },
  single: { ...llamaBase, modelType: 'llama', dModel: 32, nHeads: 4, nKvHeads: 4, headDim: 8, dFF: [80, 80], activation: 'silu', normEps: 1e-6, ropeTheta: 10000, tiedEmbeddings: false, qkvBias: false },
};

const EXPECTED_DTYPE: Record<string, string> = {
  'llama-silu': 'BF16', 'llama-relu-gqa': 'F16', 'mistral-gqa': 'BF16', 'qwen2-bias': 'F32', gpt2: 'F32', opt: 'F16', 'llama-sharded': 'BF16', single: 'F32',
};

async function withCheckpoint<T>(path: string, fn: (ck: DenseCheckpoint) => Promise<T>): Promise<T> {
  const ck = await openCheckpoint(path);
  try {
    return await fn(ck);
  } finally {
    await ck.close();
  }
}

/** Expects openCheckpoint(path) to fail with `type` and a message matching `pattern`. */
async function expectOpenError(path: string, type: typeof FormatError | typeof ModelError, pattern: RegExp): Promise<void> {
  await assert.rejects(openCheckpoint(path), (e: unknown) => {
    assert.ok(e instanceof type, `expected ${type.name}, got ${String(e)}`);
    assert.match((e as Error).message, pattern);
    return true;
  });
}

// ---- tests -------------------------------------------------------------------------------------

describe('fixtures', () => {
  test('regenerating from the default seed reproduces the committed files byte for byte', async () => {
    const out = join(dir, 'regen');
    const files = await generateFixtures(out, DEFAULT_SEED);
    assert.ok(files.length >= 19);
    for (const rel of files) {
      const want = readFileSync(join(FIXTURES_DIR, rel));
      const got = readFileSync(join(out, rel));
      assert.ok(Buffer.compare(want, got) === 0, `${rel} differs from the committed fixture (run: npx tsx fixtures/generate.ts)`);
    }
    // The generator writes only what it lists (no stray temporaries).
    const listed = new Set(files);
    const walk = (d: string): string[] => readdirSync(d, { withFileTypes: true }).flatMap((e) => (e.isDirectory() ? walk(join(d, e.name)) : [relative(out, join(d, e.name))]));
    assert.deepEqual(walk(out).filter((f) => !listed.has(f)), []);
    rmSync(out, { recursive: true });
  });

  test('another seed gives other weights, same configs', async () => {
    const out = join(dir, 'regen2');
    const files = await generateFixtures(out, DEFAULT_SEED + 1);
    const st = files.find((f) => f.startsWith('gpt2') && f.endsWith('.safetensors'))!;
    assert.notDeepEqual(readFileSync(join(out, st)), readFileSync(join(FIXTURES_DIR, st)));
    assert.deepEqual(readFileSync(join(out, 'gpt2', 'config.json')), readFileSync(join(FIXTURES_DIR, 'gpt2', 'config.json')));
    rmSync(out, { recursive: true });
  });

  test('the fixture tree is small', () => {
    let total = 0;
    const walk = (d: string): void => {
      for (const e of readdirSync(d, { withFileTypes: true })) {
        if (e.isDirectory()) walk(join(d, e.name));
        else total += statSync(join(d, e.name)).size;
      }
    };
    walk(FIXTURES_DIR);
    assert.ok(total < 3_000_000, `fixtures/models holds ${total} bytes`);
  });

  test('every fixture is covered here', () => {
    assert.deepEqual([...FIXTURE_NAMES].sort(), Object.keys(EXPECTED).sort());
  });
});

describe('fixtures read to the expected ModelSpec', () => {
  for (const [name, path] of Object.entries(FIXTURE_PATHS)) {
    test(name, async () => {
      await withCheckpoint(path, async (ck) => {
        const { config, ...core } = ck.spec;
        assert.deepEqual(core, EXPECTED[name]);
        assert.equal(config.model_type, EXPECTED[name]!.modelType);
        assert.deepEqual(ck.tensorNames(), canonicalTensors(ck.spec).map((t) => t.name));
        for (const t of canonicalTensors(ck.spec)) {
          const e = ck.entry(t.name);
          assert.deepEqual(e.shape, t.shape, t.name);
          assert.equal(e.dtype, EXPECTED_DTYPE[name]);
        }
        assert.equal(ck.sourceFiles[0]!.path.endsWith('config.json'), true);
        for (const s of ck.sourceFiles) assert.equal(s.bytes, statSync(s.path).size);
        // Tied embeddings have no lm_head; untied have one.
        assert.equal(ck.tensorNames().includes('lm_head.weight'), !EXPECTED[name]!.tiedEmbeddings);
      });
    });
  }
});

describe('config.json → ModelSpec defaults and mappings', () => {
  const llama = { model_type: 'llama', hidden_size: 64, intermediate_size: 100, num_hidden_layers: 3, num_attention_heads: 4, vocab_size: 300 };
  test('llama defaults: MHA, head_dim from hidden_size, silu, untied, theta 10000, eps 1e-6, 2048 positions', () => {
    const s = specFromConfig({ ...llama }, 'c.json');
    assert.equal(s.nKvHeads, 4);
    assert.equal(s.headDim, 16);
    assert.equal(s.activation, 'silu');
    assert.equal(s.tiedEmbeddings, false);
    assert.equal(s.ropeTheta, 10000);
    assert.equal(s.normEps, 1e-6);
    assert.equal(s.maxPositions, 2048);
    assert.deepEqual(s.dFF, [100, 100, 100]);
    assert.equal(s.qkvBias, false);
    assert.equal(s.slidingWindow, undefined);
  });
  test('activations', () => {
    const act = (hidden_act: string): string => specFromConfig({ ...llama, hidden_act }, 'c.json').activation;
    assert.equal(act('relu'), 'relu');
    assert.equal(act('gelu'), 'gelu');
    assert.equal(act('gelu_pytorch_tanh'), 'gelu_tanh');
    assert.equal(act('silu'), 'silu');
    const g = { model_type: 'gpt2', n_embd: 32, n_layer: 1, n_head: 4, vocab_size: 10, n_positions: 16 };
    assert.equal(specFromConfig(g, 'c.json').activation, 'gelu_tanh');
    assert.equal(specFromConfig({ ...g, activation_function: 'relu' }, 'c.json').activation, 'relu');
    assert.equal(specFromConfig(g, 'c.json').dFF[0], 128);
    assert.equal(specFromConfig({ ...g, n_inner: 50 }, 'c.json').dFF[0], 50);
  });
  test('eos lists, qwen2 biases, mistral window, head_dim given', () => {
    const s = specFromConfig({ ...llama, eos_token_id: [7, 8, 9], bos_token_id: 5 }, 'c.json');
    assert.equal(s.eosTokenId, 7);
    assert.deepEqual(s.eosTokenIds, [7, 8, 9]);
    assert.equal(s.bosTokenId, 5);
    assert.equal(specFromConfig({ ...llama, model_type: 'qwen2' }, 'c.json').qkvBias, true);
    assert.equal(specFromConfig({ ...llama, model_type: 'mistral', sliding_window: 32 }, 'c.json').slidingWindow, 32);
    assert.equal(specFromConfig({ ...llama, model_type: 'mistral', sliding_window: null }, 'c.json').slidingWindow, undefined);
    assert.equal(specFromConfig({ ...llama, head_dim: 24, num_key_value_heads: 1 }, 'c.json').headDim, 24);
    assert.throws(() => specFromConfig({ ...llama, num_attention_heads: 5 }, 'c.json'), /hidden_size 64 is not a multiple of num_attention_heads 5, and head_dim is not given/);
    assert.throws(() => specFromConfig({ ...llama, num_hidden_layers: 1e6 }, 'c.json'), /num_hidden_layers = 1000000 is implausibly large/);
  });
});

describe('tensors in canonical orientation', () => {
  test('identity tensors: readF32 and readRaw agree with the stored bytes, for every fixture and tensor', async () => {
    for (const path of Object.values(FIXTURE_PATHS)) {
      await withCheckpoint(path, async (ck) => {
        for (const name of ck.tensorNames()) {
          const e = ck.entry(name);
          if (e.transform.kind !== 'identity') continue;
          const src = await stored(ck, e.sourceName);
          assert.deepEqual(src.shape, e.shape);
          const got = await ck.readF32(name);
          assert.equal(got.length, src.values.length);
          for (let i = 0; i < got.length; i++) if (got[i] !== src.values[i]) assert.fail(`${path} ${name}[${i}]: ${got[i]} vs ${src.values[i]}`);
          const raw = await ck.readRaw(name);
          assert.deepEqual(decodeIndependently(raw, e.dtype), src.values);
          const chunks: Uint8Array[] = [];
          for await (const c of ck.rawChunks(name, 100)) chunks.push(c);
          assert.deepEqual(Buffer.concat(chunks), Buffer.from(raw));
        }
      });
    }
  });

  test('llama family: Hugging Face names behind the canonical ones', async () => {
    await withCheckpoint(FIXTURE_PATHS['qwen2-bias']!, async (ck) => {
      const want: Record<string, string> = {
        'embed.weight': 'model.embed_tokens.weight',
        'layers.1.attn_norm.weight': 'model.layers.1.input_layernorm.weight',
        'layers.1.attn.q.weight': 'model.layers.1.self_attn.q_proj.weight',
        'layers.1.attn.k.bias': 'model.layers.1.self_attn.k_proj.bias',
        'layers.1.attn.v.weight': 'model.layers.1.self_attn.v_proj.weight',
        'layers.1.attn.o.weight': 'model.layers.1.self_attn.o_proj.weight',
        'layers.1.ffn_norm.weight': 'model.layers.1.post_attention_layernorm.weight',
        'layers.1.ffn.gate.weight': 'model.layers.1.mlp.gate_proj.weight',
        'layers.1.ffn.up.weight': 'model.layers.1.mlp.up_proj.weight',
        'layers.1.ffn.down.weight': 'model.layers.1.mlp.down_proj.weight',
        'final_norm.weight': 'model.norm.weight',
      };
      for (const [c, s] of Object.entries(want)) assert.equal(ck.entry(c).sourceName, s);
      assert.deepEqual(ck.entry('layers.0.attn.k.weight').shape, [16, 32]);
      assert.deepEqual(ck.entry('layers.0.attn.q.bias').shape, [32]);
    });
    await withCheckpoint(FIXTURE_PATHS['mistral-gqa']!, async (ck) => {
      // head_dim × heads (64) differs from hidden_size (48).
      assert.deepEqual(ck.entry('layers.0.attn.q.weight').shape, [64, 48]);
      assert.deepEqual(ck.entry('layers.0.attn.k.weight').shape, [32, 48]);
      assert.deepEqual(ck.entry('layers.0.attn.o.weight').shape, [48, 64]);
      assert.deepEqual(ck.entry('lm_head.weight').shape, [256, 48]);
    });
  });

  test('gpt2: Conv1D weights transposed to [out, in], c_attn split into q/k/v, element by element', async () => {
    await withCheckpoint(FIXTURE_PATHS.gpt2!, async (ck) => {
      const d = 32;
      for (let layer = 0; layer < 2; layer++) {
        const P = `transformer.h.${layer}`;
        const cAttn = await stored(ck, `${P}.attn.c_attn.weight`);
        assert.deepEqual(cAttn.shape, [d, 3 * d]);
        const cAttnB = await stored(ck, `${P}.attn.c_attn.bias`);
        for (const [part, p] of [['q', 0], ['k', 1], ['v', 2]] as const) {
          const w = await ck.readF32(`layers.${layer}.attn.${part}.weight`);
          assert.deepEqual(ck.entry(`layers.${layer}.attn.${part}.weight`).shape, [d, d]);
          for (let o = 0; o < d; o++) {
            for (let i = 0; i < d; i++) {
              if (w[o * d + i] !== cAttn.values[i * 3 * d + p * d + o]) assert.fail(`${part}[${o}][${i}]`);
            }
          }
          const b = await ck.readF32(`layers.${layer}.attn.${part}.bias`);
          assert.deepEqual([...b], cAttnB.values.slice(p * d, (p + 1) * d));
          await assert.rejects(ck.readRaw(`layers.${layer}.attn.${part}.weight`), /needs a columns-transpose/);
        }
        const pairs: [string, string, number, number][] = [
          ['attn.o.weight', 'attn.c_proj.weight', d, d],
          ['ffn.up.weight', 'mlp.c_fc.weight', 128, d],
          ['ffn.down.weight', 'mlp.c_proj.weight', d, 128],
        ];
        for (const [canon, src, out, inn] of pairs) {
          const s = await stored(ck, `${P}.${src}`);
          assert.deepEqual(s.shape, [inn, out], `${src} is stored [in, out]`);
          assert.deepEqual(ck.entry(`layers.${layer}.${canon}`).shape, [out, inn]);
          const w = await ck.readF32(`layers.${layer}.${canon}`);
          for (let o = 0; o < out; o++) for (let i = 0; i < inn; i++) if (w[o * inn + i] !== s.values[i * out + o]) assert.fail(`${canon}[${o}][${i}]`);
        }
      }
      assert.equal(ck.entry('pos_embed.weight').sourceName, 'transformer.wpe.weight');
      assert.equal(ck.entry('final_norm.bias').sourceName, 'transformer.ln_f.bias');
    });
  });

  test('opt: positions table with offset 2, per-layer final_layer_norm is the FFN norm', async () => {
    await withCheckpoint(FIXTURE_PATHS.opt!, async (ck) => {
      assert.deepEqual(ck.entry('pos_embed.weight').shape, [130, 32]);
      assert.equal(ck.entry('pos_embed.weight').sourceName, 'model.decoder.embed_positions.weight');
      assert.equal(ck.entry('layers.1.ffn_norm.weight').sourceName, 'model.decoder.layers.1.final_layer_norm.weight');
      assert.equal(ck.entry('final_norm.weight').sourceName, 'model.decoder.final_layer_norm.weight');
      assert.equal(ck.entry('layers.0.attn.o.bias').sourceName, 'model.decoder.layers.0.self_attn.out_proj.bias');
      assert.equal(ck.entry('layers.0.ffn.up.weight').sourceName, 'model.decoder.layers.0.fc1.weight');
      assert.deepEqual(ck.entry('layers.0.ffn.down.weight').shape, [32, 80]);
    });
  });

  test('sharded: tensors come from their shards', async () => {
    await withCheckpoint(FIXTURE_PATHS['llama-sharded']!, async (ck) => {
      assert.match(ck.entry('embed.weight').file, /model-00001-of-00003\.safetensors$/);
      assert.match(ck.entry('layers.1.ffn.up.weight').file, /model-00002-of-00003\.safetensors$/);
      assert.match(ck.entry('lm_head.weight').file, /model-00003-of-00003\.safetensors$/);
      assert.deepEqual(ck.sourceFiles.map((s) => s.path.split('/').pop()), [
        'config.json', 'model.safetensors.index.json',
        'model-00001-of-00003.safetensors', 'model-00002-of-00003.safetensors', 'model-00003-of-00003.safetensors',
      ]);
    });
    // The index file itself is also accepted.
    await withCheckpoint(join(FIXTURE_PATHS['llama-sharded']!, 'model.safetensors.index.json'), async (ck) => {
      assert.equal(ck.spec.dModel, 32);
    });
  });

  test('forms: directory, model.safetensors path, other .safetensors name', async () => {
    await withCheckpoint(join(FIXTURE_PATHS['llama-silu']!, 'model.safetensors'), async (ck) => assert.equal(ck.spec.dModel, 64));
    await withCheckpoint(FIXTURE_PATHS.single!, async (ck) => assert.match(ck.entry('embed.weight').file, /weights\.safetensors$/));
    await expectOpenError(join(FIXTURES_DIR, 'single'), ModelError, /no model\.safetensors or model\.safetensors\.index\.json \(found weights\.safetensors: pass a \.safetensors file's path/);
  });

  test('checkpoints without the module prefix read the same', async () => {
    for (const [name, prefix] of [['gpt2', 'transformer.'], ['llama-relu-gqa', 'model.']] as const) {
      const copy = copyFixture(name, join(dir, 'noprefix'));
      const file = join(copy, 'model.safetensors');
      await rewriteSafetensors(file, file, (ts) => ts.map((t) => ({ ...t, name: t.name.startsWith(prefix) ? t.name.slice(prefix.length) : t.name })));
      await withCheckpoint(copy, async (a) => {
        await withCheckpoint(FIXTURE_PATHS[name]!, async (b) => {
          assert.deepEqual(a.tensorNames(), b.tensorNames());
          for (const n of a.tensorNames()) assert.deepEqual(await a.readF32(n), await b.readF32(n));
          assert.ok(!a.entry('embed.weight').sourceName.startsWith(prefix));
        });
      });
    }
  });

  test('an untied config without lm_head reads as tied; extra tensors are ignored', async () => {
    const copy = copyFixture('llama-silu', join(dir, 'nohead'));
    const file = join(copy, 'model.safetensors');
    await rewriteSafetensors(file, file, (ts) => [
      ...ts.filter((t) => t.name !== 'lm_head.weight'),
      { name: 'model.unused_ids', dtype: 'I64', shape: [2], bytes: new Uint8Array(16) },
    ]);
    await withCheckpoint(copy, async (ck) => {
      assert.equal(ck.spec.tiedEmbeddings, true);
      assert.ok(!ck.tensorNames().includes('lm_head.weight'));
      assert.ok(ck.tensorNames().every((n) => !n.includes('inv_freq')));
    });
  });
});

describe('bad checkpoints', () => {
  let n = 0;
  const copy = (name: string): string => copyFixture(name, join(dir, `bad-${n++}`));
  const editConfig = (d: string, edit: (c: Record<string, unknown>) => void): void => {
    const p = join(d, 'config.json');
    const c = JSON.parse(readFileSync(p, 'utf8')) as Record<string, unknown>;
    edit(c);
    writeFileSync(p, JSON.stringify(c));
  };

  test('tensor missing', async () => {
    const d = copy('llama-relu-gqa');
    const f = join(d, 'model.safetensors');
    await rewriteSafetensors(f, f, (ts) => ts.filter((t) => t.name !== 'model.layers.1.mlp.up_proj.weight'));
    await expectOpenError(d, ModelError, new RegExp(`^${f.replace(/[.]/g, '\\.')}: tensor 'model\\.layers\\.1\\.mlp\\.up_proj\\.weight' is missing \\(needed as layers\\.1\\.ffn\\.up\\.weight \\[300, 64\\]`));
  });

  test('tensor of the wrong shape for the config', async () => {
    const d = copy('llama-relu-gqa');
    editConfig(d, (c) => (c.intermediate_size = 256));
    await expectOpenError(d, ModelError, /model\.safetensors: tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \[300, 64\], expected \[256, 64\] from config\.json/);
    const g = copy('gpt2');
    editConfig(g, (c) => (c.n_inner = 100));
    await expectOpenError(g, ModelError, /tensor 'transformer\.h\.0\.mlp\.c_fc\.weight' has shape \[32, 128\], expected \[32, 100\]/);
    const k = copy('mistral-gqa');
    editConfig(k, (c) => (c.num_key_value_heads = 4));
    await expectOpenError(k, ModelError, /tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \[32, 48\], expected \[64, 48\]/);
  });

  test('unsupported dtype of a needed tensor, named', async () => {
    const d = copy('llama-sharded');
    const f = join(d, 'model-00003-of-00003.safetensors');
    await rewriteSafetensors(f, f, (ts) => ts.map((t) => (t.name === 'model.norm.weight' ? { ...t, dtype: 'I64', shape: [8], bytes: new Uint8Array(64) } : t)));
    await expectOpenError(d, FormatError, /model-00003-of-00003\.safetensors: tensor 'model\.norm\.weight' has dtype I64, which sparsellm does not read \(F32, F16, BF16\)/);
  });

  test('unknown architecture, and no model_type', async () => {
    const d = copy('gpt2');
    editConfig(d, (c) => (c.model_type = 'bert'));
    await expectOpenError(d, ModelError, /config\.json: unknown architecture: model_type "bert" is not supported \(supported: llama, mistral, qwen2, gpt2, opt\)/);
    editConfig(d, (c) => delete c.model_type);
    await expectOpenError(d, ModelError, /config\.json has no model_type; sparsellm reads llama, mistral, qwen2, gpt2, opt/);
  });

  test('missing config fields, all named', async () => {
    const d = copy('llama-silu');
    editConfig(d, (c) => {
      delete c.hidden_size;
      delete c.num_attention_heads;
    });
    await expectOpenError(d, ModelError, /config\.json: config\.json \(model_type llama\) is missing the required fields hidden_size, num_attention_heads/);
    const o = copy('opt');
    editConfig(o, (c) => delete c.ffn_dim);
    await expectOpenError(o, ModelError, /missing the required field ffn_dim$/);
    const g = copy('gpt2');
    editConfig(g, (c) => delete c.n_positions);
    await expectOpenError(g, ModelError, /missing the required field n_positions$/);
  });

  test('config values we do not implement are refused by field', async () => {
    const cases: [string, (c: Record<string, unknown>) => void, RegExp][] = [
      ['opt', (c) => (c.do_layer_norm_before = false), /do_layer_norm_before = false is not supported: post-norm/],
      ['opt', (c) => (c.word_embed_proj_dim = 16), /word_embed_proj_dim = 16 is not supported/],
      ['llama-silu', (c) => (c.rope_scaling = { rope_type: 'llama3', factor: 8 }), /rope_scaling = .* is not supported/],
      ['llama-silu', (c) => (c.hidden_act = 'tanh'), /hidden_act "tanh" is not supported \(supported: relu, silu, gelu/],
      ['llama-silu', (c) => (c.attention_bias = true), /attention_bias = true is not supported/],
      ['mistral-gqa', (c) => (c.num_key_value_heads = 3), /num_attention_heads 4 is not a multiple of num_key_value_heads 3/],
      ['qwen2-bias', (c) => (c.use_sliding_window = true), /use_sliding_window = true is not supported/],
      ['gpt2', (c) => (c.n_embd = 'wide'), /n_embd must be a positive integer, found "wide"/],
    ];
    for (const [name, edit, pattern] of cases) {
      const d = copy(name);
      editConfig(d, edit);
      await expectOpenError(d, ModelError, pattern);
    }
  });

  test('shard index naming a missing file, a tensor not in its shard, or a path', async () => {
    const d = copy('llama-sharded');
    const idx = join(d, 'model.safetensors.index.json');
    const original = readFileSync(idx, 'utf8');
    const edit = (fn: (wm: Record<string, string>) => void): void => {
      const j = JSON.parse(original) as { weight_map: Record<string, string> };
      fn(j.weight_map);
      writeFileSync(idx, JSON.stringify(j));
    };
    edit((wm) => (wm['model.norm.weight'] = 'model-00004-of-00003.safetensors'));
    await expectOpenError(d, FormatError, /model\.safetensors\.index\.json: weight_map puts tensor 'model\.norm\.weight' in shard 'model-00004-of-00003\.safetensors', but .*model-00004-of-00003\.safetensors does not exist/);
    edit((wm) => (wm['model.norm.weight'] = 'model-00001-of-00003.safetensors'));
    await expectOpenError(d, FormatError, /model-00001-of-00003\.safetensors: tensor 'model\.norm\.weight' is listed for this shard in model\.safetensors\.index\.json but is not in it/);
    edit((wm) => (wm['model.norm.weight'] = '../model-00003-of-00003.safetensors'));
    await expectOpenError(d, FormatError, /which is not a plain file name/);
    edit((wm) => delete wm['lm_head.weight']);
    // lm_head gone from the index: read as tied (the tensor in the shard is not listed, so unused).
    await withCheckpoint(d, async (ck) => assert.equal(ck.spec.tiedEmbeddings, true));
    writeFileSync(idx, '{"weight_map": ');
    await expectOpenError(d, FormatError, /model\.safetensors\.index\.json: shard index is not valid JSON/);
  });

  test('a damaged shard is reported as a container error naming it', async () => {
    const d = copy('llama-sharded');
    const f = join(d, 'model-00002-of-00003.safetensors');
    writeFileSync(f, readFileSync(f).subarray(0, 1000));
    await expectOpenError(d, FormatError, /model-00002-of-00003\.safetensors: tensor '.*': data_offsets \[\d+, \d+\] are out of range/);
  });

  test('missing or broken config.json, missing path', async () => {
    const d = copy('opt');
    writeFileSync(join(d, 'config.json'), '{ not json');
    await expectOpenError(d, FormatError, /config\.json: config\.json is not valid JSON/);
    rmSync(join(d, 'config.json'));
    await expectOpenError(d, ModelError, /no config\.json in .* \(a checkpoint needs config\.json beside its safetensors files\)/);
    await expectOpenError(join(dir, 'does-not-exist'), ModelError, /does-not-exist: no such file or directory/);
    await expectOpenError(join(d, 'config.txt'), ModelError, /no such file or directory/);
  });
});

describe('fuzz', () => {
  // Random damage to fixture files: each case must end in a clean FormatError/ModelError naming a
  // file of the checkpoint, or in a read that returns every tensor whole, with the values unchanged
  // except where the data bytes themselves were changed. Never a crash, a hang or a stray exception.
  test('300 mutated checkpoints: a clean error or a correct read', async () => {
    const seed = Rng.seedFromEnv(4242);
    console.log(`checkpoint fuzz seed=${seed}`);
    const rng = new Rng(seed);
    const bases = ['llama-relu-gqa', 'gpt2', 'opt', 'llama-sharded', 'qwen2-bias', 'mistral-gqa'];
    const work = join(dir, 'fuzz');
    const originals = new Map<string, Map<string, Float32Array>>();
    for (const b of bases) {
      copyFixture(b, work);
      const values = new Map<string, Float32Array>();
      await withCheckpoint(join(work, b), async (ck) => {
        for (const n of ck.tensorNames()) values.set(n, await ck.readF32(n));
      });
      originals.set(b, values);
    }
    const weird: unknown[] = [null, -1, 0, 1.5, 'x', 1e9, true, {}, [], 2 ** 60, '', [1, 2]];
    const pick = <T,>(xs: readonly T[]): T => xs[rng.int(0, xs.length - 1)]!;
    const tally: Record<string, number> = { ok: 0, error: 0 };
    for (let c = 0; c < 300; c++) {
      const base = pick(bases);
      const bdir = join(work, base);
      const files = readdirSync(bdir).filter((f) => f.endsWith('.safetensors') || f.endsWith('.json'));
      const file = join(bdir, pick(files));
      const before = readFileSync(file);
      let bytes = Buffer.from(before);
      const headerEnd = 8 + Number(bytes.readBigUInt64LE(0) & 0xffffffn);
      const isJson = file.endsWith('.json');
      const kind = isJson ? pick(['json-edit', 'flip', 'truncate'] as const) : pick(['flip-header', 'truncate', 'length', 'header-edit', 'append', 'flip-data', 'flip-data'] as const);
      let dataFlip = false;
      switch (kind) {
        case 'flip':
        case 'flip-header': {
          const at = rng.int(0, Math.min(bytes.length, isJson ? bytes.length : headerEnd) - 1);
          bytes[at]! ^= 1 << rng.int(0, 7);
          break;
        }
        case 'flip-data': {
          if (headerEnd >= bytes.length) break;
          bytes[rng.int(headerEnd, bytes.length - 1)]! ^= 1 << rng.int(0, 7);
          dataFlip = true;
          break;
        }
        case 'truncate':
          bytes = bytes.subarray(0, rng.int(0, bytes.length - 1));
          break;
        case 'append':
          bytes = Buffer.concat([bytes, Buffer.from([rng.int(0, 255), rng.int(0, 255)])]);
          break;
        case 'length':
          bytes.writeBigUInt64LE(rng.uniform() < 0.5 ? BigInt(Math.max(0, headerEnd - 8 + rng.int(-16, 16))) : BigInt(rng.u32()) * BigInt(rng.u32()), 0);
          break;
        case 'header-edit':
        case 'json-edit': {
          const text = isJson ? bytes.toString('utf8') : bytes.subarray(8, headerEnd).toString('utf8');
          const obj = JSON.parse(text) as Record<string, any>;
          let target: Record<string, any> = obj;
          if (!isJson || file.endsWith('index.json')) {
            const holder = file.endsWith('index.json') ? obj.weight_map : obj;
            const key = pick(Object.keys(holder));
            if (file.endsWith('index.json')) {
              if (rng.uniform() < 0.5) delete holder[key];
              else holder[key] = pick(['model-00001-of-00003.safetensors', 'nope.safetensors', 7, '../x']);
              target = {};
            } else target = holder[key];
          }
          const keys = Object.keys(target);
          if (keys.length > 0) {
            const key = pick(keys);
            if (rng.uniform() < 0.25) delete target[key];
            else target[key] = pick(weird);
          }
          const json = Buffer.from(JSON.stringify(obj));
          if (isJson) bytes = json;
          else {
            const len = Buffer.alloc(8);
            len.writeBigUInt64LE(BigInt(json.length));
            bytes = Buffer.concat([len, json, bytes.subarray(headerEnd)]);
          }
          break;
        }
      }
      writeFileSync(file, bytes);
      const what = `case ${c}: ${kind} on ${relative(work, file)}`;
      let timer: NodeJS.Timeout | undefined;
      const timeout = new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Error(`${what}: hung`)), 10_000);
      });
      try {
        await Promise.race([
          timeout,
          (async () => {
            let ck: DenseCheckpoint;
            try {
              ck = await openCheckpoint(bdir);
            } catch (e) {
              assert.ok(e instanceof FormatError || e instanceof ModelError, `${what}: unexpected ${e instanceof Error ? e.stack : String(e)}`);
              assert.ok((e as SparseLlmError).message.startsWith(bdir), `${what}: message names the file: ${(e as Error).message}`);
              tally.error!++;
              return;
            }
            try {
              const orig = originals.get(base)!;
              let diffs = 0;
              for (const n of ck.tensorNames()) {
                const got = await ck.readF32(n);
                assert.equal(got.length, ck.entry(n).shape.reduce((a, b) => a * b, 1), `${what}: ${n} length`);
                const want = orig.get(n);
                if (!want) continue;
                for (let i = 0; i < got.length; i++) if (!Object.is(got[i], want[i])) diffs++;
              }
              assert.ok(diffs <= (dataFlip ? 1 : 0), `${what}: ${diffs} values changed`);
              tally.ok!++;
            } finally {
              await ck.close();
            }
          })(),
        ]);
      } finally {
        clearTimeout(timer);
        writeFileSync(file, before);
      }
    }
    console.log(`checkpoint fuzz: ${tally.ok} read correctly, ${tally.error} rejected cleanly`);
    assert.ok(tally.error! > 100 && tally.ok! > 20, 'the mutations exercise both outcomes');
  });
});
