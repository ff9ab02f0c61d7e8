// Facts about the machine and the source tree that every benchmark output carries.
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { cpus, loadavg, platform, release } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const packageRoot = join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');

/** The git commit of the package's source tree ("-dirty" when tracked files differ), or null. */
export function sourceCommit(): string | null {
  if (!existsSync(join(packageRoot, '.git'))) return null;
  const head = spawnSync('git', ['rev-parse', '--short=12', 'HEAD'], { cwd: packageRoot, encoding: 'utf8' });
  if (head.status !== 0) return null;
  const dirty = spawnSync('git', ['diff', '--quiet', 'HEAD', '--'], { cwd: packageRoot });
  return head.stdout.trim() + (dirty.status === 1 ? '-dirty' : '');
}

export function osText(): string {
  return `${platform()} ${release()}`;
}

export function logicalCpus(): number {
  return cpus().length;
}

export function loadAverage1m(): number {
  return Number(loadavg()[0]!.toFixed(2));
}

/**
 * Whether the CPU has AVX-512F, read from /proc/cpuinfo without loading the addon (so that
 * OPENBLAS_CORETYPE can still be set before any library that reads it is loaded). False where
 * /proc/cpuinfo does not exist.
 */
export function cpuHasAvx512(): boolean {
  try {
    const text = readFileSync('/proc/cpuinfo', 'utf8');
    const flags = /^flags\s*:\s*(.*)$/m.exec(text);
    return !!flags && flags[1]!.split(/\s+/).includes('avx512f');
  } catch {
    return false;
  }
}
