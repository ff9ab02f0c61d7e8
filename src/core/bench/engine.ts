// The CPU engine as the benchmark drives it: adapts the typed wrappers of the native FFN layer
// (core/engine/ffn.ts) and dense GEMM (core/engine/gemm.ts) to the BenchEngine interface.
import { FfnLayer } from '../engine/ffn.js';
import { createCudaBenchEngine } from '../engine/cuda.js';
import { gemm, openblasInfo, timeGemm } from '../engine/gemm.js';
import { engine, setThreads } from '../native.js';
import type { BenchCase } from './cases.js';
import type { FfnWeights } from './inputs.js';
import type { BenchEngine, BenchFfnLayer, OpenBlasInfo } from './types.js';

/** One token goes through the decode entry point (gate GEMV, then only active neurons). */
export function forwardEntry(tokens: number): 'decode' | 'forward' {
  return tokens === 1 ? 'decode' : 'forward';
}

function wrapLayer(w: FfnWeights): BenchFfnLayer {
  const layer = new FfnLayer({
    dModel: w.shape.dModel,
    dFF: w.shape.dFF,
    gated: w.shape.gated,
    dtype: w.dtype,
    ...(w.gate ? { gate: w.gate } : {}),
    up: w.up,
    down: w.down,
  });
  return {
    forwardStats(x, tokens, mode) {
      const r = forwardEntry(tokens) === 'decode' ? layer.decode(x, { mode }) : layer.forward(x, tokens, { mode });
      return r.stats;
    },
    timeForward(x, tokens, mode, repeats, warmup) {
      return layer.time(forwardEntry(tokens), x, tokens, { mode }, repeats, warmup);
    },
    trainStats(x, dy, tokens, mode) {
      return layer.trainStep(x, dy, tokens, { mode }).stats;
    },
    timeTrain(x, dy, tokens, mode, repeats, warmup) {
      return layer.time('train', x, tokens, { mode, dy }, repeats, warmup);
    },
  };
}

/** The CPU backend with `threads` OpenMP threads (undefined: the engine's default). */
export function createCpuBenchEngine(threads?: number): BenchEngine {
  setThreads(threads);
  const info = engine().buildInfo();
  return {
    backend: 'cpu',
    isa: info.cpu.isa,
    threads: info.cpu.threads,
    supports(c: BenchCase) {
      if (c.op === 'ffn-train' && !c.shape.gated) return 'the training kernels cover gated FFNs only';
      if (c.op === 'ffn-train' && c.dtype !== 'f32') return 'the training kernels take f32 weights only';
      return true;
    },
    createFfn: wrapLayer,
    timeGemm(M, K, N, dtype, impl, repeats, warmup) {
      return timeGemm({ M, K, N, dtype, impl, repeats, warmup });
    },
    openblas(): OpenBlasInfo {
      return openblasInfo();
    },
    gemmProduct(x, M, w, N, K) {
      // The values are exactly representable in the case's dtype, so the f32 product sees the
      // same weights as the layer.
      return gemm(x, M, K, w, N);
    },
  };
}

/** The engine for a backend name already resolved by the command. */
export function createBenchEngine(backend: 'cpu' | 'cuda', threads?: number): BenchEngine {
  if (backend === 'cuda') return createCudaBenchEngine();
  if (backend !== 'cpu') throw new Error(`no benchmark engine for backend '${backend}'`);
  return createCpuBenchEngine(threads);
}
