// Runs the built CLI (bin/sparsellm.js, which loads dist/) in a child process.
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { REPO_ROOT } from './fixtures.js';

export const BIN = join(REPO_ROOT, 'bin', 'sparsellm.js');

/**
 * `sparsellm <args>` with `threads` OpenMP threads; `extraEnv` entries set to undefined are
 * removed from the child's environment (e.g. to run without SPARSELLM_CUDA_UNVERIFIED).
 */
export function runCli(args: string[], extraEnv: Record<string, string | undefined> = {}, threads = 2) {
  const env: Record<string, string | undefined> = { ...process.env, OMP_NUM_THREADS: String(threads), ...extraEnv };
  for (const [k, v] of Object.entries(env)) if (v === undefined) delete env[k];
  const r = spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', env });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}
