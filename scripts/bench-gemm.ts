// Dense GEMM benchmark: our GEMM against OpenBLAS sgemm (same run, alternating rounds), for f32
// and bf16 weights, and the small-M (decode) path against the machine's measured memory
// bandwidth. Timing is native (timeGemm): fresh random inputs, steady clock, no JS in the loop.
//
//   npx tsx scripts/bench-gemm.ts [--threads N] [--repeats R] [--rounds K] [--json]
//
// Run it under `flock /tmp/sparsellm-bench.lock` on a shared machine. The last table (one
// thread, thread CPU time) stays meaningful even when other processes load the machine.
import { engine, setThreads } from '../src/core/native.js';
import { gemmInfo, memoryBandwidth, openblasInfo, timeGemm, type GemmDType, type GemmImpl } from '../src/core/engine/gemm.js';

function arg(name: string, fallback: number): number {
  const i = process.argv.indexOf(`--${name}`);
  if (i < 0) return fallback;
  const v = Number(process.argv[i + 1]);
  if (!Number.isInteger(v) || v < 1) throw new Error(`--${name} needs a positive integer`);
  return v;
}
const json = process.argv.includes('--json');
const threads = arg('threads', 2);
const repeats = arg('repeats', 7);
const rounds = arg('rounds', 3);
setThreads(threads);

const sleep = (ms: number): void => Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms) as unknown as void;

const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  const h = s.length >> 1;
  return s.length % 2 ? s[h]! : (s[h - 1]! + s[h]!) / 2;
};

const build = engine().buildInfo();
const ob = openblasInfo();
const info = gemmInfo();
const log = (s: string): void => {
  if (!json) console.log(s);
};
log(`# Dense GEMM: ours (${info.kernel}, kc=${info.tuning.kc} nc=${info.tuning.nc}) vs OpenBLAS`);
log(`CPU ${build.cpu.brand}, ${threads} threads; OpenBLAS: ${ob.available ? `${ob.path}, core ${ob.coreName}` : `absent (${ob.reason})`}`);
log(`times: median over ${rounds} alternating rounds of the per-round median of ${repeats} runs (min in brackets)\n`);

interface Row {
  M: number; K: number; N: number; dtype: GemmDType;
  oursMs: number; oursMinMs: number; openblasMs?: number; openblasMinMs?: number; ratio?: number; gflops: number;
}
const rows: Row[] = [];

function measure(M: number, K: number, N: number, dtype: GemmDType): Row {
  const per: Record<GemmImpl, { med: number[]; min: number[] }> = { ours: { med: [], min: [] }, openblas: { med: [], min: [] } };
  const warmup = M >= 256 ? 1 : 3;
  const reps = M >= 256 ? repeats : repeats * 4;
  for (let r = 0; r < rounds; r++) {
    const impls: GemmImpl[] = ob.available ? (r % 2 ? ['openblas', 'ours'] : ['ours', 'openblas']) : ['ours'];
    for (const impl of impls) {
      // Let the other library's worker threads stop spinning before timing this one.
      sleep(200);
      // OpenBLAS multiplies f32 weights only: the bf16 row compares with its f32 sgemm.
      const t = timeGemm({ M, K, N, dtype: impl === 'openblas' ? 'f32' : dtype, impl, repeats: reps, warmup });
      per[impl].med.push(t.medianMs);
      per[impl].min.push(t.minMs);
    }
  }
  const oursMs = median(per.ours.med);
  const row: Row = { M, K, N, dtype, oursMs, oursMinMs: Math.min(...per.ours.min), gflops: (2 * M * K * N) / oursMs / 1e6 };
  if (ob.available) {
    row.openblasMs = median(per.openblas.med);
    row.openblasMinMs = Math.min(...per.openblas.min);
    row.ratio = row.openblasMs / oursMs;
  }
  return row;
}

log('| M | K | N | W dtype | ours ms | OpenBLAS sgemm ms | ours/OpenBLAS speed | ours GFLOP/s |');
log('|---:|---:|---:|---|---:|---:|---:|---:|');
for (const M of [512, 64, 1]) {
  for (const dtype of ['f32', 'bf16'] as GemmDType[]) {
    const r = measure(M, 2048, 5632, dtype);
    rows.push(r);
    const f = (x: number | undefined): string => (x === undefined ? '-' : x.toFixed(3));
    log(`| ${M} | 2048 | 5632 | ${dtype} | ${f(r.oursMs)} [${f(r.oursMinMs)}] | ${f(r.openblasMs)} [${f(r.openblasMinMs)}] | ${r.ratio === undefined ? '-' : `${r.ratio.toFixed(2)}x`} | ${r.gflops.toFixed(1)} |`);
  }
}

// Decode: W streamed from memory (enough copies of W to exceed the caches), against the
// bandwidth probe measured in the same run.
const bw = memoryBandwidth();
log(`\n## Decode GEMV (M=1, K=2048, N=5632), W streamed from memory\nmeasured read bandwidth: ${bw.toFixed(1)} GB/s\n`);
log('| W dtype | W bytes | median ms | GB/s | % of measured bandwidth |');
log('|---|---:|---:|---:|---:|');
const gemv: Array<{ dtype: GemmDType; ms: number; gbs: number; fraction: number }> = [];
for (const dtype of ['bf16', 'f32'] as GemmDType[]) {
  const bytes = 2048 * 5632 * (dtype === 'f32' ? 4 : 2);
  const ms: number[] = [];
  for (let r = 0; r < rounds; r++) ms.push(timeGemm({ M: 1, K: 2048, N: 5632, dtype, repeats: repeats * 8, warmup: 4, coldBytes: 1 << 30 }).medianMs);
  const m = median(ms);
  const gbs = bytes / m / 1e6;
  gemv.push({ dtype, ms: m, gbs, fraction: gbs / bw });
  log(`| ${dtype} | ${(bytes / 1e6).toFixed(1)} MB | ${m.toFixed(3)} | ${gbs.toFixed(1)} | ${((100 * gbs) / bw).toFixed(0)}% |`);
}

// One thread, timed by the thread's CPU clock: the kernels' own speed, immune to other processes
// taking the CPU (a shared machine distorts the wall-clock figures above, ours more than
// OpenBLAS's because OpenMP threads spin at barriers while OpenBLAS's yield).
const cpuRows: Array<{ M: number; dtype: GemmDType; oursMs: number; openblasMs: number; ratio: number }> = [];
if (ob.available) {
  setThreads(1);
  log('\n## One thread, thread CPU time (min of alternating rounds), K=2048, N=5632\n');
  log('| M | W dtype | ours ms | OpenBLAS sgemm ms | ours/OpenBLAS speed |');
  log('|---:|---|---:|---:|---:|');
  for (const M of [512, 64]) {
    for (const dtype of ['f32', 'bf16'] as GemmDType[]) {
      let ours = Infinity, theirs = Infinity;
      for (let r = 0; r < rounds; r++) {
        ours = Math.min(ours, timeGemm({ M, K: 2048, N: 5632, dtype, repeats: 3, warmup: 1, clock: 'thread-cpu' }).minMs);
        theirs = Math.min(theirs, timeGemm({ M, K: 2048, N: 5632, impl: 'openblas', repeats: 3, warmup: 1, clock: 'thread-cpu' }).minMs);
      }
      cpuRows.push({ M, dtype, oursMs: ours, openblasMs: theirs, ratio: theirs / ours });
      log(`| ${M} | ${dtype} | ${ours.toFixed(2)} | ${theirs.toFixed(2)} | ${(theirs / ours).toFixed(2)}x |`);
    }
  }
  setThreads(threads);
}

if (json) {
  console.log(JSON.stringify({ cpu: build.cpu.brand, threads, kernel: info.kernel, tuning: info.tuning, openblas: ob, gemm: rows, bandwidthGBs: bw, gemv, oneThreadCpuTime: cpuRows }, null, 2));
}
