// A self-contained SVG chart of speedup against measured activation density (log x), one line
// per (op, token count). Written by hand: no plotting dependency.
import type { CaseResult } from './types.js';

export interface PlotSeries {
  /** Legend text, e.g. "forward, 512 tokens". */
  label: string;
  op: string;
  tokens: number;
  /** (density as a fraction of d_ff, speedup), sorted by density. */
  points: { x: number; y: number }[];
}

/** The series a result set plots: the sparse (forward) or hybrid (training) speedup over dense. */
export function speedupSeries(results: readonly CaseResult[]): PlotSeries[] {
  const map = new Map<string, PlotSeries>();
  for (const r of results) {
    if (r.case.op === 'gemm' || !r.measured) continue;
    const cand = r.impls.find((i) => i.impl === 'sparse' || i.impl === 'hybrid');
    if (!cand) continue;
    const op = r.case.op === 'ffn-forward' ? 'forward' : 'forward+backward';
    const key = `${op} ${r.case.tokens}`;
    let s = map.get(key);
    if (!s) {
      s = { label: `${op}, ${r.case.tokens} token${r.case.tokens === 1 ? '' : 's'}`, op, tokens: r.case.tokens, points: [] };
      map.set(key, s);
    }
    s.points.push({ x: r.measured.density, y: cand.speedup });
  }
  const out = [...map.values()];
  for (const s of out) s.points.sort((a, b) => a.x - b.x);
  return out;
}

const COLORS = ['#1f77b4', '#d62728', '#2ca02c', '#9467bd', '#ff7f0e', '#8c564b', '#17becf', '#7f7f7f'];

function esc(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');
}

function niceStep(range: number, target: number): number {
  const raw = range / target;
  const mag = 10 ** Math.floor(Math.log10(raw));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * mag >= raw) return m * mag;
  return 10 * mag;
}

function fmtPct(fraction: number): string {
  const p = fraction * 100;
  return `${p >= 1 ? p.toFixed(0) : Number(p.toPrecision(1))}%`;
}

/** Renders the chart. `subtitle` names the shape, dtype and machine. */
export function speedupSvg(series: readonly PlotSeries[], title: string, subtitle: string): string {
  const W = 880, H = 480;
  const m = { left: 70, right: 250, top: 64, bottom: 60 };
  const pw = W - m.left - m.right, ph = H - m.top - m.bottom;
  const xs = series.flatMap((s) => s.points.map((p) => Math.max(p.x, 1e-5)));
  const ys = series.flatMap((s) => s.points.map((p) => p.y));
  const xMinDec = Math.floor(Math.log10(Math.min(1e-2, ...(xs.length ? xs : [1e-2]))));
  const xMaxDec = 0; // 100%
  const yTop = Math.max(1.2, ...ys) * 1.08;
  const yStep = niceStep(yTop, 6);
  const yMax = Math.ceil(yTop / yStep) * yStep;
  const sx = (x: number) => m.left + ((Math.log10(Math.max(x, 1e-5)) - xMinDec) / (xMaxDec - xMinDec)) * pw;
  const sy = (y: number) => m.top + ph - (y / yMax) * ph;
  const o: string[] = [];
  o.push(`<?xml version="1.0" encoding="UTF-8"?>`);
  o.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="sans-serif" font-size="12">`);
  o.push(`<title>${esc(title)}</title>`);
  o.push(`<rect x="0" y="0" width="${W}" height="${H}" fill="#ffffff"/>`);
  o.push(`<text x="${m.left}" y="24" font-size="15" font-weight="bold">${esc(title)}</text>`);
  o.push(`<text x="${m.left}" y="44" fill="#555555">${esc(subtitle)}</text>`);
  // Grid and ticks: decades (with 2× and 5× minor lines) on x, nice steps on y.
  o.push(`<g class="grid" stroke="#e5e5e5" stroke-width="1">`);
  for (let dec = xMinDec; dec <= xMaxDec; dec++) {
    for (const k of dec < xMaxDec ? [1, 2, 5] : [1]) {
      const x = sx(k * 10 ** dec);
      o.push(`<line x1="${x.toFixed(1)}" y1="${m.top}" x2="${x.toFixed(1)}" y2="${m.top + ph}"${k === 1 ? '' : ' stroke-dasharray="2,3"'}/>`);
    }
  }
  for (let y = 0; y <= yMax + 1e-9; y += yStep) {
    o.push(`<line x1="${m.left}" y1="${sy(y).toFixed(1)}" x2="${m.left + pw}" y2="${sy(y).toFixed(1)}"/>`);
  }
  o.push(`</g>`);
  o.push(`<g class="axes" stroke="#333333" stroke-width="1">`);
  o.push(`<line x1="${m.left}" y1="${m.top + ph}" x2="${m.left + pw}" y2="${m.top + ph}"/>`);
  o.push(`<line x1="${m.left}" y1="${m.top}" x2="${m.left}" y2="${m.top + ph}"/>`);
  o.push(`</g>`);
  o.push(`<g class="ticks" fill="#333333">`);
  for (let dec = xMinDec; dec <= xMaxDec; dec++) {
    o.push(`<text x="${sx(10 ** dec).toFixed(1)}" y="${m.top + ph + 18}" text-anchor="middle">${fmtPct(10 ** dec)}</text>`);
  }
  for (let y = 0; y <= yMax + 1e-9; y += yStep) {
    o.push(`<text x="${m.left - 8}" y="${(sy(y) + 4).toFixed(1)}" text-anchor="end">${Number(y.toPrecision(6))}×</text>`);
  }
  o.push(`</g>`);
  o.push(`<text class="xlabel" x="${m.left + pw / 2}" y="${H - 16}" text-anchor="middle">measured activation density (non-zeros / d_ff, log scale)</text>`);
  o.push(`<text class="ylabel" transform="translate(20 ${m.top + ph / 2}) rotate(-90)" text-anchor="middle">speedup over dense (same run)</text>`);
  // Break-even line.
  o.push(`<line class="breakeven" x1="${m.left}" y1="${sy(1).toFixed(1)}" x2="${m.left + pw}" y2="${sy(1).toFixed(1)}" stroke="#888888" stroke-dasharray="6,4"/>`);
  o.push(`<text x="${m.left + pw - 4}" y="${(sy(1) - 5).toFixed(1)}" text-anchor="end" fill="#888888">1× = dense</text>`);
  // Series.
  const tokenList = [...new Set(series.map((s) => s.tokens))].sort((a, b) => a - b);
  series.forEach((s, i) => {
    const color = COLORS[tokenList.indexOf(s.tokens) % COLORS.length]!;
    const dash = s.op === 'forward' ? '' : ' stroke-dasharray="7,4"';
    const pts = s.points.map((p) => `${sx(p.x).toFixed(1)},${sy(p.y).toFixed(1)}`).join(' ');
    o.push(`<g class="series" data-label="${esc(s.label)}">`);
    o.push(`<polyline fill="none" stroke="${color}" stroke-width="2"${dash} points="${pts}"/>`);
    for (const p of s.points) {
      const shape = s.op === 'forward'
        ? `<circle cx="${sx(p.x).toFixed(1)}" cy="${sy(p.y).toFixed(1)}" r="3.5" fill="${color}">`
        : `<circle cx="${sx(p.x).toFixed(1)}" cy="${sy(p.y).toFixed(1)}" r="3.5" fill="#ffffff" stroke="${color}" stroke-width="2">`;
      o.push(`${shape}<title>${esc(s.label)}: ${fmtPct(p.x)} → ${p.y.toFixed(2)}×</title></circle>`);
    }
    o.push(`</g>`);
    // Legend entry.
    const ly = m.top + 8 + i * 20;
    const lx = m.left + pw + 16;
    o.push(`<g class="legend"><line x1="${lx}" y1="${ly}" x2="${lx + 26}" y2="${ly}" stroke="${color}" stroke-width="2"${dash}/>` +
      `<text x="${lx + 32}" y="${ly + 4}">${esc(s.label)}</text></g>`);
  });
  o.push(`</svg>`);
  return o.join('\n') + '\n';
}
