#!/usr/bin/env node
// GPU benchmarks through the addon (run by scripts/gpu-check.sh on a machine with a GPU). Plain
// JavaScript over the compiled dist/ so that the GPU machine needs only dist/, the addon and
// Node.js (no node_modules: the device machine's 64 MiB carry limit).
//
//   node scripts/gpu-bench.mjs [--out DIR] [--quick] [--gemm-kernel mma|wgmma|wgmma2]
//
// --gemm-kernel forces the GEMM kernel of every suite (SPARSELLM_CUDA_GEMM; default: the Hopper
// wgmma kernel on sm_90, mma.sync elsewhere). The GEMM alone at the FFN's shapes, with every
// kernel against cuBLAS: native/build/test_cuda_ops --bench-gemm [M].
//
// Suites (each: ratios measured in the same run, device-side event timing after warm-up):
//   paper      d_model 2048, d_ff 5632, gated, 131072 tokens, ~29 non-zeros per token
//   dense1pct  the same at 56 non-zeros per token (1%)
//   nongated   non-gated FFN (relu(x·W_upᵀ)), 65536 tokens, ~29 non-zeros per token
// Writes DIR/gpu-bench.json (everything) and prints a short table last.
import { mkdirSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

const args = process.argv.slice(2);
const outDir = args.includes('--out') ? args[args.indexOf('--out') + 1] : process.env.OUT || '.';
const quick = args.includes('--quick');
if (args.includes('--gemm-kernel')) process.env.SPARSELLM_CUDA_GEMM = args[args.indexOf('--gemm-kernel') + 1];

const { cudaAvailability, runGpuBenchmarks, cublasInfo, nvmlInfo } = await import('../dist/core/engine/cuda.js');

const avail = cudaAvailability();
if (!avail.usable) {
  console.error(`gpu-bench: CUDA backend unavailable: ${avail.reason}`);
  process.exit(3);
}
console.error(`gpu-bench: ${avail.device}`);
console.error(`gpu-bench: cuBLAS ${JSON.stringify(cublasInfo())}; NVML ${JSON.stringify(nvmlInfo())}`);

const suites = [
  { name: 'paper', opts: { dModel: 2048, dFF: 5632, tokens: quick ? 16384 : 131072, gated: true, nnzPerToken: 29, decodeTokens: 1 } },
  { name: 'dense1pct', opts: { dModel: 2048, dFF: 5632, tokens: quick ? 16384 : 131072, gated: true, nnzPerToken: 56, decodeTokens: 4, energySeconds: 1, train: false } },
  { name: 'nongated', opts: { dModel: 2048, dFF: 5632, tokens: quick ? 16384 : 65536, gated: false, nnzPerToken: 29, decodeTokens: 1, energySeconds: 1 } },
];

const results = [];
for (const s of suites) {
  const t0 = Date.now();
  console.error(`gpu-bench: suite ${s.name} ${JSON.stringify(s.opts)}`);
  try {
    const r = runGpuBenchmarks({ repeats: 20, warmup: 3, ...s.opts });
    results.push({ suite: s.name, options: s.opts, seconds: (Date.now() - t0) / 1000, ...r });
  } catch (e) {
    console.error(`gpu-bench: suite ${s.name} failed: ${e.message}`);
    results.push({ suite: s.name, options: s.opts, error: e.message });
  }
}

mkdirSync(outDir, { recursive: true });
const file = join(outDir, 'gpu-bench.json');
writeFileSync(`${file}.tmp`, JSON.stringify({ startedAt: new Date().toISOString(), device: avail.device, results }, null, 2));
renameSync(`${file}.tmp`, file);

// ---- the short table --------------------------------------------------------------------------
const find = (r, prefix) => r.rows?.find((x) => x.name.startsWith(prefix));
const f = (v, d = 3) => (v === undefined || v === null || Number.isNaN(v) ? '-' : Number(v).toFixed(d));
const lines = [];
lines.push(`| suite | nnz/token | overflow rows | dense FFN ms | sparse FFN ms | sparse speedup | GEMM ours ms | cuBLAS ms | ours/cuBLAS | decode dense ms | decode sparse ms | decode speedup | mJ/token dense | mJ/token sparse | train dense ms | train hybrid ms | train speedup |`);
lines.push(`|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|`);
for (const r of results) {
  if (r.error) {
    lines.push(`| ${r.suite} | failed: ${r.error} |`);
    continue;
  }
  const fd = find(r, 'ffn forward dense'), fs = find(r, 'ffn forward sparse');
  const go = find(r, 'gemm ours'), gc = find(r, 'gemm cublas');
  const dd = find(r, 'decode dense'), ds = find(r, 'decode sparse');
  const td = find(r, 'train step dense'), th = find(r, 'train step hybrid');
  lines.push(
    `| ${r.suite} | ${f(r.measuredNnzPerToken, 1)} | ${r.overflowRows} | ${f(fd?.medianMs)} | ${f(fs?.medianMs)} | ${f(fd && fs ? fd.medianMs / fs.medianMs : NaN, 2)}x` +
      ` | ${f(go?.medianMs)} | ${gc ? f(gc.medianMs) : 'absent'} | ${go && gc ? f(gc.medianMs / go.medianMs, 2) + 'x' : '-'}` +
      ` | ${f(dd?.medianMs, 4)} | ${f(ds?.medianMs, 4)} | ${f(dd && ds ? dd.medianMs / ds.medianMs : NaN, 2)}x` +
      ` | ${f(fd?.mjPerToken, 4)} | ${f(fs?.mjPerToken, 4)}` +
      ` | ${f(td?.medianMs, 2)} | ${f(th?.medianMs, 2)} | ${td && th ? f(td.medianMs / th.medianMs, 2) + 'x' : '-'} |`,
  );
}
const dev = results.find((r) => !r.error);
console.log(`\nGPU: ${dev?.device ?? avail.device}; driver ${dev?.driver ?? '?'}; cuBLAS ${dev?.cublas ?? '?'}`);
console.log(`ours/cuBLAS = cuBLAS time / our time (1.0 = as fast); speedups = dense time / sparse time, same run.`);
console.log(lines.join('\n'));
