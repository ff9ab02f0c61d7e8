// Paths of the committed fixtures (fixtures/models/<name>) and helpers to make altered copies.
import { cpSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { SafetensorsFile, SafetensorsWriter, SAFETENSORS_DTYPE_SIZES } from '../../src/core/checkpoint/safetensors.js';

export const REPO_ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const FIXTURES_DIR = join(REPO_ROOT, 'fixtures', 'models');

/** The fixture checkpoints and the path to open for each. */
export const FIXTURE_PATHS: Readonly<Record<string, string>> = {
  'llama-silu': join(FIXTURES_DIR, 'llama-silu'),
  'llama-relu-gqa': join(FIXTURES_DIR, 'llama-relu-gqa'),
  'mistral-gqa': join(FIXTURES_DIR, 'mistral-gqa'),
  'qwen2-bias': join(FIXTURES_DIR, 'qwen2-bias'),
  gpt2: join(FIXTURES_DIR, 'gpt2'),
  opt: join(FIXTURES_DIR, 'opt'),
  'llama-sharded': join(FIXTURES_DIR, 'llama-sharded'),
  single: join(FIXTURES_DIR, 'single', 'weights.safetensors'),
};

/** Copies fixture directory `name` into `destDir`/<name> and returns that path. */
export function copyFixture(name: string, destDir: string): string {
  const dest = join(destDir, name);
  cpSync(join(FIXTURES_DIR, name), dest, { recursive: true });
  return dest;
}

export interface RawTensor {
  name: string;
  dtype: string;
  shape: number[];
  bytes: Uint8Array;
}

/** Reads every tensor of a safetensors file (any dtype), lets `edit` change the list, writes `dst`. */
export async function rewriteSafetensors(src: string, dst: string, edit: (tensors: RawTensor[]) => RawTensor[]): Promise<void> {
  const f = await SafetensorsFile.open(src, { dtypes: Object.keys(SAFETENSORS_DTYPE_SIZES) });
  const tensors: RawTensor[] = [];
  for (const name of f.names()) {
    const info = f.info(name);
    tensors.push({ name, dtype: info.dtype, shape: [...info.shape], bytes: await f.readTensorBytes(name) });
  }
  const metadata = { ...f.metadata };
  await f.close();
  const out = edit(tensors);
  const w = await SafetensorsWriter.create(dst, { tensors: out, metadata });
  for (const t of out) await w.write(t.name, t.bytes);
  await w.finish();
}
