#!/usr/bin/env node
// Builds the native addon with cmake-js. CUDA is compiled when nvcc is found (PATH or
// /usr/local/cuda/bin) unless SPARSELLM_CUDA=0; sm_80 and sm_90 code, cudart linked statically.
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { availableParallelism } from 'node:os';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');

function findNvcc() {
  const fromPath = spawnSync('sh', ['-c', 'command -v nvcc'], { encoding: 'utf8' });
  if (fromPath.status === 0 && fromPath.stdout.trim()) return fromPath.stdout.trim();
  for (const p of ['/usr/local/cuda/bin/nvcc']) if (existsSync(p)) return p;
  return null;
}

const wantCuda = process.env.SPARSELLM_CUDA !== '0';
const nvcc = wantCuda ? findNvcc() : null;
// `cmake-js compile` reuses an existing build tree without configuring it again, so a build
// dir configured with CUDA off (or on) would silently stay so: configure afresh when it differs.
const cache = join(root, 'native', 'build', 'CMakeCache.txt');
const cached = existsSync(cache) ? /^SPARSELLM_CUDA:BOOL=(\w+)$/m.exec(readFileSync(cache, 'utf8'))?.[1] : undefined;
const reconfigure = cached !== undefined && cached !== (nvcc ? 'ON' : 'OFF');
const args = [
  join(root, 'node_modules', 'cmake-js', 'bin', 'cmake-js'), reconfigure ? 'rebuild' : 'compile',
  '-d', join(root, 'native'), '-O', join(root, 'native', 'build'),
  '-p', String(Math.max(1, availableParallelism())),
  '--CDCMAKE_BUILD_TYPE=Release',
  `--CDSPARSELLM_CUDA=${nvcc ? 'ON' : 'OFF'}`,
];
if (nvcc) args.push(`--CDCMAKE_CUDA_COMPILER=${nvcc}`);
console.error(`sparsellm: building native addon (${nvcc ? `CUDA via ${nvcc}` : wantCuda ? 'CPU only: nvcc not found' : 'CPU only: SPARSELLM_CUDA=0'})${reconfigure ? `; the build tree had CUDA ${cached}: configuring it again` : ''}`);
execFileSync(process.execPath, args, { stdio: 'inherit', cwd: root });
