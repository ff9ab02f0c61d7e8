// The one place that loads the native addon. Everything numeric goes through `engine()`.
import { createRequire } from 'node:module';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { SparseLlmError } from './errors.js';

export interface CpuBackendInfo {
  brand: string;
  /** The ISA the kernels dispatch to at run time. */
  isa: 'avx512' | 'avx2' | 'portable';
  avx2: boolean;
  avx512: boolean;
  avx512bf16: boolean;
  amx: boolean;
  threads: number;
}

export interface CudaDeviceInfo {
  index: number;
  name: string;
  computeCapability: string;
  totalMemory: number;
  multiprocessors: number;
}

export interface CudaBackendInfo {
  compiled: boolean;
  archs: string[];
  usable: boolean;
  reason: string;
  runtimeVersion: number;
  driverVersion: number;
  devices: CudaDeviceInfo[];
}

export interface BuildInfo {
  cpu: CpuBackendInfo;
  cuda: CudaBackendInfo;
  compiler?: string;
}

/**
 * The raw addon. Typed wrappers live next to the code that uses them (e.g. core/engine/);
 * each area extends this interface with the functions its binding file registers.
 */
export interface NativeAddon {
  buildInfo(): BuildInfo;
  setThreads(n: number): void;
  setIsa(name: 'portable' | 'avx2' | 'avx512'): string;
  [name: string]: unknown;
}

const packageRoot = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const addonPath = join(packageRoot, 'native', 'build', 'Release', 'sparsellm.node');

let cached: NativeAddon | undefined;

export function engine(): NativeAddon {
  if (cached) return cached;
  if (!existsSync(addonPath)) {
    throw new SparseLlmError(
      `native addon not built (${addonPath} is missing): run \`npm run build:native\` in ${packageRoot}`,
    );
  }
  const require = createRequire(import.meta.url);
  cached = require(addonPath) as NativeAddon;
  return cached;
}

/** Sets the engine's thread count; `undefined` keeps the default (all cores / OMP_NUM_THREADS). */
export function setThreads(n: number | undefined): void {
  if (n !== undefined) engine().setThreads(n);
}
