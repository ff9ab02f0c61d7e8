// Renderers of benchmark results: table rows (the CLI draws them with cli-table3 or Markdown),
// CSV (one row per case and implementation, llama-bench style) and the JSON document.
import { type BenchCase, densityLabel, targetFraction } from './cases.js';
import type { CaseResult, ImplResult } from './types.js';

/** Facts about the run that every output carries. */
export interface RunInfo {
  tool: string;
  version: string;
  startedAt: string;
  finishedAt?: string;
  /** git commit of the source tree, when it is a checkout ("-dirty" appended when modified). */
  commit: string | null;
  machine: {
    cpu: string;
    isa: string;
    /** Threads the kernels ran with. */
    threads: number;
    /** Logical CPUs the OS reports. */
    cpus: number;
    os: string;
    node: string;
    /** 1-minute load average at the start and end of the run (a busy machine shows here). */
    loadAverage: { start: number; end?: number };
  };
  build: { compiler?: string; cudaCompiled: boolean };
  options: Record<string, unknown>;
}

export const CONVENTIONS = {
  time:
    'milliseconds per call: median over rounds; each round times every implementation of the case back to back ' +
    '(a sample is the median of `inner` consecutive calls); ± is the standard deviation over rounds',
  speedup: 'median over rounds of baseline time / implementation time, both measured in the same round',
  gflops:
    'dense-equivalent: the FLOPs of the dense computation of the same result (2·M·d_model·d_ff per GEMM-sized ' +
    'product: 3 for a gated forward, 2 non-gated; 9 and 6 for forward+backward) over the median time',
  usefulFlops: 'the dense pattern-finding projection plus 2·d_model per measured non-zero per sparse product',
  weightBytes:
    'weight bytes the implementation must read at least once per call: dense, every matrix; sparse, the whole ' +
    'gate (or up) projection plus the up/down rows of the neurons active in at least one token (all of them ' +
    'when a training step sends rows to the dense tail)',
  savedBytes: 'activation bytes kept from forward for backward, as reported by the kernels',
  density: 'measured by the kernels (strictly positive ReLU outputs), not the target',
} as const;

// ---- Number formatting -------------------------------------------------------------------

export function fmtMs(ms: number): string {
  if (!Number.isFinite(ms)) return '-';
  if (ms >= 100) return ms.toFixed(0);
  if (ms >= 10) return ms.toFixed(1);
  if (ms >= 1) return ms.toFixed(2);
  return ms.toFixed(3);
}

export function fmtBytes(n: number | undefined): string {
  if (n === undefined || !Number.isFinite(n)) return '-';
  const units = ['B', 'KiB', 'MiB', 'GiB'];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
}

export function fmtSpeedup(x: number): string {
  return Number.isFinite(x) ? `${x.toFixed(2)}×` : '-';
}

function fmtTime(r: ImplResult): string {
  return r.ms.n > 1 ? `${fmtMs(r.ms.median)} ± ${fmtMs(r.ms.stddev)}` : fmtMs(r.ms.median);
}

function fmtNnz(n: number): string {
  return n >= 100 ? n.toFixed(0) : n.toFixed(1);
}

function fmtGflops(x: number): string {
  return x >= 100 ? x.toFixed(0) : x.toFixed(1);
}

function impl(r: CaseResult, name: string): ImplResult | undefined {
  return r.impls.find((i) => i.impl === name);
}

// ---- Tables ------------------------------------------------------------------------------

export interface TableData {
  title: string;
  head: string[];
  rows: string[][];
}

function groupKey(c: BenchCase): string {
  return `${c.op} ${c.shape.dModel} ${c.shape.dFF} ${c.shape.gated} ${c.dtype}`;
}

function shapeText(c: BenchCase): string {
  return `d_model ${c.shape.dModel}, d_ff ${c.shape.dFF}, ${c.shape.gated ? 'gated' : 'non-gated'}, ${c.dtype} weights`;
}

function backendText(r: CaseResult): string {
  return `${r.backend}/${r.isa}/${r.threads}t`;
}

function densityCell(c: BenchCase): string {
  const label = densityLabel(c.density!);
  if (c.density!.kind === 'nnz') return `${label} (${(targetFraction(c.density!, c.shape.dFF) * 100).toPrecision(2)}%)`;
  return label;
}

/** One table per (op, shape, dtype), rows in run order. */
export function resultTables(results: readonly CaseResult[]): TableData[] {
  const groups = new Map<string, CaseResult[]>();
  for (const r of results) {
    const k = groupKey(r.case);
    if (!groups.has(k)) groups.set(k, []);
    groups.get(k)!.push(r);
  }
  const tables: TableData[] = [];
  for (const rs of groups.values()) {
    const c0 = rs[0]!.case;
    if (c0.op === 'ffn-forward') tables.push(forwardTable(rs));
    else if (c0.op === 'ffn-train') tables.push(trainTable(rs));
    else tables.push(gemmTable(rs));
  }
  return tables;
}

function forwardTable(rs: CaseResult[]): TableData {
  const c0 = rs[0]!.case;
  return {
    title: `FFN forward: ${shapeText(c0)} (speedup = dense time / sparse time, same run)`,
    head: ['backend', 'tokens', 'density', 'nnz/tok (max)', 'dense ms', 'sparse ms', 'speedup', 'auto', 'GFLOP/s d→s', 'weights read d→s', 'overflow tiles/rows'],
    rows: rs.map((r) => {
      const d = impl(r, 'dense')!, s = impl(r, 'sparse')!, a = impl(r, 'auto')!;
      const m = r.measured!;
      return [
        backendText(r),
        String(r.case.tokens),
        densityCell(r.case),
        `${fmtNnz(m.nnzPerToken)} (${m.maxRowNnz})`,
        fmtTime(d),
        fmtTime(s),
        fmtSpeedup(s.speedup),
        `${a.path ?? '?'} ${fmtSpeedup(a.speedup)}`,
        `${fmtGflops(d.gflops)} → ${fmtGflops(s.gflops)}`,
        `${fmtBytes(d.weightBytes)} → ${fmtBytes(s.weightBytes)}`,
        `${r.overflow?.tiles ?? 0} / ${r.overflow?.rows ?? 0}`,
      ];
    }),
  };
}

function trainTable(rs: CaseResult[]): TableData {
  const c0 = rs[0]!.case;
  return {
    title: `FFN forward+backward: ${shapeText(c0)} (speedup = dense time / hybrid time, same run)`,
    head: ['backend', 'tokens', 'density', 'nnz/tok', 'dense ms', 'hybrid ms', 'speedup', 'GFLOP/s d→h', 'act. kept d→h', 'weights read d→h', 'tail rows'],
    rows: rs.map((r) => {
      const d = impl(r, 'dense')!, h = impl(r, 'hybrid')!;
      const q = d.savedBytes && h.savedBytes ? d.savedBytes / h.savedBytes : undefined;
      const ratio = q === undefined ? '' : q >= 1 ? ` (${q.toFixed(1)}× less)` : ` (${(1 / q).toFixed(1)}× more)`;
      return [
        backendText(r),
        String(r.case.tokens),
        densityCell(r.case),
        fmtNnz(r.measured!.nnzPerToken),
        fmtTime(d),
        fmtTime(h),
        fmtSpeedup(h.speedup),
        `${fmtGflops(d.gflops)} → ${fmtGflops(h.gflops)}`,
        `${fmtBytes(d.savedBytes)} → ${fmtBytes(h.savedBytes)}${ratio}`,
        `${fmtBytes(d.weightBytes)} → ${fmtBytes(h.weightBytes)}`,
        String(r.tailRows ?? 0),
      ];
    }),
  };
}

function gemmTable(rs: CaseResult[]): TableData {
  const c0 = rs[0]!.case;
  const blas = rs.some((r) => impl(r, 'openblas'));
  const note = rs.flatMap((r) => r.notes ?? [])[0];
  const head = ['backend', 'M×K×N', 'ours ms', 'GFLOP/s'];
  if (blas) head.push('OpenBLAS ms', 'GFLOP/s', 'ours vs OpenBLAS');
  return {
    title:
      `Dense GEMM at the gate shape [tokens × d_model]·[d_ff × d_model]ᵀ, ${c0.dtype} weights` +
      (blas ? ` (ours vs OpenBLAS = OpenBLAS time / our time, same run; ${note ?? 'OpenBLAS'})` : ''),
    head,
    rows: rs.map((r) => {
      const o = impl(r, 'ours')!, b = impl(r, 'openblas');
      const row = [backendText(r), `${r.case.tokens}×${r.case.shape.dModel}×${r.case.shape.dFF}`, fmtTime(o), fmtGflops(o.gflops)];
      if (blas) row.push(b ? fmtTime(b) : '-', b ? fmtGflops(b.gflops) : '-', b ? fmtSpeedup(o.speedup) : '-');
      return row;
    }),
  };
}

/** A GitHub-flavoured Markdown table (cells' `|` escaped). */
export function markdownTable(t: TableData): string {
  const esc = (s: string) => s.replace(/\|/g, '\\|');
  const lines = [`**${esc(t.title)}**`, '', `| ${t.head.map(esc).join(' | ')} |`, `|${t.head.map(() => ' --- ').join('|')}|`];
  for (const r of t.rows) lines.push(`| ${r.map(esc).join(' | ')} |`);
  return lines.join('\n') + '\n';
}

// ---- CSV ---------------------------------------------------------------------------------

export const CSV_COLUMNS = [
  'commit', 'backend', 'isa', 'threads', 'op', 'd_model', 'd_ff', 'gated', 'dtype', 'tokens',
  'density_target', 'target_fraction', 'nnz_per_token', 'max_row_nnz', 'density_measured', 'union_active',
  'impl', 'path', 'baseline', 'repeats', 'inner', 'median_ms', 'mean_ms', 'stddev_ms', 'min_ms', 'max_ms',
  'speedup', 'gflops_dense_equiv', 'dense_equiv_flops', 'useful_flops', 'weight_bytes', 'saved_bytes',
  'overflow_tiles', 'overflow_rows', 'tail_rows',
] as const;

function csvCell(v: unknown): string {
  if (v === undefined || v === null || (typeof v === 'number' && !Number.isFinite(v))) return '';
  const s = String(v);
  return /[",\n\r]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}

/** One row per (case, implementation); a header line first. */
export function toCsv(results: readonly CaseResult[], info: Pick<RunInfo, 'commit'>): string {
  const lines = [CSV_COLUMNS.join(',')];
  for (const r of results) {
    const c = r.case;
    for (const i of r.impls) {
      const row: Record<(typeof CSV_COLUMNS)[number], unknown> = {
        commit: info.commit,
        backend: r.backend,
        isa: r.isa,
        threads: r.threads,
        op: c.op,
        d_model: c.shape.dModel,
        d_ff: c.shape.dFF,
        gated: c.shape.gated,
        dtype: c.dtype,
        tokens: c.tokens,
        density_target: c.density ? densityLabel(c.density) : '',
        target_fraction: c.density ? targetFraction(c.density, c.shape.dFF) : '',
        nnz_per_token: r.measured?.nnzPerToken,
        max_row_nnz: r.measured?.maxRowNnz,
        density_measured: r.measured?.density,
        union_active: r.measured?.unionActive,
        impl: i.impl,
        path: i.path,
        baseline: r.baseline,
        repeats: i.ms.n,
        inner: i.inner,
        median_ms: i.ms.median,
        mean_ms: i.ms.mean,
        stddev_ms: i.ms.stddev,
        min_ms: i.ms.min,
        max_ms: i.ms.max,
        speedup: i.speedup,
        gflops_dense_equiv: i.gflops,
        dense_equiv_flops: r.flops.denseEquivalent,
        useful_flops: r.flops.useful,
        weight_bytes: i.weightBytes,
        saved_bytes: i.savedBytes,
        overflow_tiles: r.overflow?.tiles,
        overflow_rows: r.overflow?.rows,
        tail_rows: r.tailRows,
      };
      lines.push(CSV_COLUMNS.map((k) => csvCell(row[k])).join(','));
    }
  }
  return lines.join('\n') + '\n';
}

// ---- JSON --------------------------------------------------------------------------------

/** The --json document: run facts, conventions, and every case with all its fields. */
export function toJsonDocument(results: readonly CaseResult[], info: RunInfo): Record<string, unknown> {
  return {
    ...info,
    conventions: CONVENTIONS,
    cases: results.map((r) => ({
      id: r.case.id,
      op: r.case.op,
      shape: r.case.shape,
      tokens: r.case.tokens,
      dtype: r.case.dtype,
      density: r.case.density
        ? { target: densityLabel(r.case.density), targetFraction: targetFraction(r.case.density, r.case.shape.dFF) }
        : null,
      backend: r.backend,
      isa: r.isa,
      threads: r.threads,
      baseline: r.baseline,
      measured: r.measured ? { ...r.measured, maxRowNnz: Number.isFinite(r.measured.maxRowNnz) ? r.measured.maxRowNnz : null } : null,
      overflow: r.overflow ?? null,
      tailRows: r.tailRows ?? null,
      flops: r.flops,
      impls: r.impls.map((i) => ({
        impl: i.impl,
        path: i.path ?? null,
        medianMs: i.ms.median,
        meanMs: i.ms.mean,
        stddevMs: i.ms.stddev,
        minMs: i.ms.min,
        maxMs: i.ms.max,
        samplesMs: i.samples,
        inner: i.inner,
        speedup: i.speedup,
        gflops: i.gflops,
        weightBytes: i.weightBytes ?? null,
        savedBytes: i.savedBytes ?? null,
      })),
      notes: r.notes ?? [],
    })),
  };
}
