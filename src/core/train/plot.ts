// SVG of a training run: loss (train cross-entropy, total loss, validation cross-entropy) and
// FFN sparsity (%) over steps, two panels sharing the x axis. Hand-written, no dependency.
export interface PlotPoint {
  step: number;
  loss: number;
  ce: number;
  sparsity: number;
  valCe?: number;
}

function esc(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');
}

function ticks(lo: number, hi: number, n: number): number[] {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / n;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) ?? raw;
  const out: number[] = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + 1e-9 * step; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

export function trainingSvg(points: readonly PlotPoint[], title: string): string {
  const W = 760, panelH = 220, left = 64, right = 150, top = 44, gap = 46;
  const plotW = W - left - right;
  const H = top + 2 * panelH + gap + 40;
  const steps = points.map((p) => p.step);
  const x0 = Math.min(...steps, 0), x1 = Math.max(...steps, 1);
  const X = (s: number): number => left + ((s - x0) / (x1 - x0 || 1)) * plotW;
  const parts: string[] = [];
  parts.push(`<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="sans-serif" font-size="12">`);
  parts.push(`<rect width="100%" height="100%" fill="white"/>`);
  parts.push(`<text x="${left}" y="24" font-size="15" font-weight="bold">${esc(title)}</text>`);
  const panel = (y0: number, label: string, series: { name: string; color: string; pts: [number, number][]; dots?: boolean }[]): void => {
    const ys = series.flatMap((s) => s.pts.map((p) => p[1])).filter(Number.isFinite);
    let lo = Math.min(...ys), hi = Math.max(...ys);
    if (!ys.length) { lo = 0; hi = 1; }
    if (hi - lo < 1e-9) { lo -= 0.5; hi += 0.5; }
    const pad = (hi - lo) * 0.05;
    lo -= pad; hi += pad;
    const Y = (v: number): number => y0 + panelH - ((v - lo) / (hi - lo)) * panelH;
    parts.push(`<rect x="${left}" y="${y0}" width="${plotW}" height="${panelH}" fill="none" stroke="#999"/>`);
    for (const t of ticks(lo, hi, 5)) {
      parts.push(`<line x1="${left}" x2="${left + plotW}" y1="${Y(t).toFixed(1)}" y2="${Y(t).toFixed(1)}" stroke="#eee"/>`);
      parts.push(`<text x="${left - 6}" y="${(Y(t) + 4).toFixed(1)}" text-anchor="end">${t}</text>`);
    }
    parts.push(`<text transform="translate(16 ${y0 + panelH / 2}) rotate(-90)" text-anchor="middle">${esc(label)}</text>`);
    series.forEach((s, i) => {
      const pts = s.pts.filter((p) => Number.isFinite(p[1]));
      if (pts.length) {
        if (s.dots) {
          for (const [a, b] of pts) parts.push(`<circle cx="${X(a).toFixed(1)}" cy="${Y(b).toFixed(1)}" r="3" fill="${s.color}"/>`);
        }
        const d = pts.map(([a, b], k) => `${k ? 'L' : 'M'}${X(a).toFixed(1)},${Y(b).toFixed(1)}`).join('');
        parts.push(`<path d="${d}" fill="none" stroke="${s.color}" stroke-width="1.5"/>`);
      }
      const ly = y0 + 14 + i * 18;
      parts.push(`<line x1="${left + plotW + 12}" x2="${left + plotW + 30}" y1="${ly - 4}" y2="${ly - 4}" stroke="${s.color}" stroke-width="2"/>`);
      parts.push(`<text x="${left + plotW + 36}" y="${ly}">${esc(s.name)}</text>`);
    });
  };
  panel(top, 'loss', [
    { name: 'train CE', color: '#1f77b4', pts: points.map((p) => [p.step, p.ce]) },
    { name: 'CE + λ·L1', color: '#aec7e8', pts: points.map((p) => [p.step, p.loss]) },
    { name: 'validation CE', color: '#d62728', pts: points.filter((p) => p.valCe !== undefined).map((p) => [p.step, p.valCe!]), dots: true },
  ]);
  const y2 = top + panelH + gap;
  panel(y2, 'FFN sparsity (%)', [{ name: 'sparsity', color: '#2ca02c', pts: points.map((p) => [p.step, p.sparsity]) }]);
  for (const t of ticks(x0, x1, 6)) {
    parts.push(`<text x="${X(t).toFixed(1)}" y="${y2 + panelH + 16}" text-anchor="middle">${t}</text>`);
  }
  parts.push(`<text x="${left + plotW / 2}" y="${y2 + panelH + 34}" text-anchor="middle">step</text>`);
  parts.push('</svg>');
  return parts.join('\n') + '\n';
}
