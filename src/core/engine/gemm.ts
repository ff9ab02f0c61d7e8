// Typed wrapper of the dense GEMM bindings (native/src/addon/gemm_binding.cpp): our GEMM, the
// OpenBLAS reference loaded at run time, the memory-bandwidth probe and native timing loops.
import { engine, type NativeAddon } from '../native.js';
import { SparseLlmError } from '../errors.js';

/** Weight element type: f32, or bf16 given as its raw 16-bit patterns. */
export type GemmDType = 'f32' | 'bf16';
export type GemmImpl = 'ours' | 'openblas';

export interface OpenBlasInfo {
  available: boolean;
  /** The shared library that was loaded. */
  path: string;
  /** The kernel set OpenBLAS dispatches to (e.g. SkylakeX). */
  coreName: string;
  /** OpenBLAS build options. */
  config: string;
  /** Why it is unavailable (empty when available). */
  reason: string;
}

export interface GemmTimingOptions {
  M: number;
  K: number;
  N: number;
  dtype?: GemmDType;
  impl?: GemmImpl;
  repeats?: number;
  warmup?: number;
  /** Cycle through enough copies of W to span this many bytes, so W streams from memory. */
  coldBytes?: number;
  /** 'thread-cpu' times the calling thread's CPU time (immune to other processes; one thread only). */
  clock?: 'wall' | 'thread-cpu';
}

export interface GemmTiming {
  medianMs: number;
  minMs: number;
  maxMs: number;
  repeats: number;
  weightCopies: number;
}

export interface GemmTuning {
  kc: number;
  nc: number;
  mc: number;
  mcEpilogue: number;
  gemvMaxM: number;
}

export interface GemmInfo {
  /** Register tile the current ISA dispatches to, e.g. "avx512 14x32". */
  kernel: string;
  tuning: GemmTuning;
}

interface GemmAddon extends NativeAddon {
  gemm(A: Float32Array, M: number, K: number, W: Float32Array | Uint16Array, N: number, out?: Float32Array): Float32Array;
  openblasInfo(): OpenBlasInfo;
  openblasSgemm(A: Float32Array, M: number, K: number, W: Float32Array, N: number, out?: Float32Array): Float32Array;
  memoryBandwidth(bytes?: number): number;
  timeGemm(options: GemmTimingOptions): GemmTiming;
  gemmInfo(): GemmInfo;
}

function addon(): GemmAddon {
  const e = engine() as GemmAddon;
  if (typeof e.gemm !== 'function') throw new SparseLlmError('native addon has no gemm: rebuild it (`npm run build:native`)');
  return e;
}

/** C[M, N] = A[M, K] · Wᵀ with W [N, K] row-major (f32, or bf16 bits in a Uint16Array). */
export function gemm(A: Float32Array, M: number, K: number, W: Float32Array | Uint16Array, N: number, out?: Float32Array): Float32Array {
  return addon().gemm(A, M, K, W, N, out);
}

/** Whether OpenBLAS could be loaded, which core it uses, or why not. Loads it on first call. */
export function openblasInfo(): OpenBlasInfo {
  return addon().openblasInfo();
}

/** The same product through OpenBLAS cblas_sgemm (f32 weights only); throws when it is absent. */
export function openblasSgemm(A: Float32Array, M: number, K: number, W: Float32Array, N: number, out?: Float32Array): Float32Array {
  return addon().openblasSgemm(A, M, K, W, N, out);
}

/** Sustained read bandwidth of main memory, GB/s (1e9 bytes/s), over a buffer of `bytes` (default 1 GiB). */
export function memoryBandwidth(bytes?: number): number {
  return addon().memoryBandwidth(bytes);
}

/** Times one GEMM shape natively on fresh random inputs (median/min/max of `repeats` after `warmup`). */
export function timeGemm(options: GemmTimingOptions): GemmTiming {
  return addon().timeGemm(options);
}

/** The dispatched register tile and the blocking parameters. */
export function gemmInfo(): GemmInfo {
  return addon().gemmInfo();
}
