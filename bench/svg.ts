// A line chart as hand-written SVG (no dependencies): IOPS per second of each
// system from a cold start, with the cold and warm windows the summary table
// averages shaded, so a reader sees where each ratio came from.

export interface Series {
  name: string;
  values: number[];
}

export interface ChartOptions {
  title: string;
  subtitle: string;
  /** [from, to) seconds of the cold and warm windows. */
  cold: [number, number];
  warm: [number, number];
}

const COLORS = ['#d62728', '#1f77b4', '#2ca02c', '#7f7f7f', '#9467bd', '#ff7f0e'];

function esc(s: string): string {
  return s.replaceAll('&', '&amp;').replaceAll('<', '&lt;').replaceAll('>', '&gt;').replaceAll('"', '&quot;');
}

/** A round axis maximum and step: 1, 2 or 5 times a power of ten, about five steps. */
function niceScale(max: number): { top: number; step: number } {
  if (!(max > 0)) return { top: 1, step: 1 };
  const rough = max / 5;
  const pow = 10 ** Math.floor(Math.log10(rough));
  const step = [1, 2, 5, 10].map((m) => m * pow).find((s) => s >= rough) ?? 10 * pow;
  return { top: Math.ceil(max / step) * step, step };
}

function fmtTick(v: number): string {
  return v >= 1000 ? `${Number((v / 1000).toFixed(1))}k` : String(v);
}

export function lineChart(series: Series[], o: ChartOptions): string {
  const W = 960;
  const H = 520;
  // The legend sits right of the plot: room for its longest name (about 7 px
  // a character at 12 px), so "ubcache serve, readahead 64k" is not cut off.
  const longest = Math.max(0, ...series.map((s) => s.name.length));
  const m = { left: 80, right: Math.max(200, 56 + 7 * longest), top: 70, bottom: 60 };
  const pw = W - m.left - m.right;
  const ph = H - m.top - m.bottom;
  const seconds = Math.max(1, ...series.map((s) => s.values.length));
  const { top, step } = niceScale(Math.max(0, ...series.flatMap((s) => s.values)));
  const x = (t: number): number => m.left + (t / seconds) * pw;
  const y = (v: number): number => m.top + ph - (v / top) * ph;
  const out: string[] = [];
  out.push(
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="sans-serif" font-size="12">`,
    `<rect width="${W}" height="${H}" fill="white"/>`,
    `<text x="${m.left}" y="26" font-size="16" font-weight="bold">${esc(o.title)}</text>`,
    `<text x="${m.left}" y="46" fill="#555">${esc(o.subtitle)}</text>`,
  );
  for (const [label, [a, b], fill] of [
    ['cold window', o.cold, '#fdecea'],
    ['warm window', o.warm, '#e8f4ea'],
  ] as const) {
    const x0 = x(Math.max(0, a));
    const x1 = x(Math.min(seconds, b));
    if (x1 <= x0) continue;
    out.push(
      `<rect x="${x0.toFixed(1)}" y="${m.top}" width="${(x1 - x0).toFixed(1)}" height="${ph}" fill="${fill}"/>`,
      `<text x="${((x0 + x1) / 2).toFixed(1)}" y="${m.top + 14}" text-anchor="middle" fill="#777">${label}</text>`,
    );
  }
  // Grid and y axis labels.
  for (let v = 0; v <= top + step / 2; v += step) {
    const yy = y(v).toFixed(1);
    out.push(
      `<line x1="${m.left}" y1="${yy}" x2="${m.left + pw}" y2="${yy}" stroke="#ddd"/>`,
      `<text x="${m.left - 8}" y="${yy}" text-anchor="end" dominant-baseline="middle">${fmtTick(v)}</text>`,
    );
  }
  const xStep = seconds > 60 ? 10 : seconds > 20 ? 5 : seconds > 10 ? 2 : 1;
  for (let t = 0; t <= seconds; t += xStep) {
    const xx = x(t).toFixed(1);
    out.push(
      `<line x1="${xx}" y1="${m.top + ph}" x2="${xx}" y2="${m.top + ph + 5}" stroke="#333"/>`,
      `<text x="${xx}" y="${m.top + ph + 18}" text-anchor="middle">${t}</text>`,
    );
  }
  out.push(
    `<line x1="${m.left}" y1="${m.top}" x2="${m.left}" y2="${m.top + ph}" stroke="#333"/>`,
    `<line x1="${m.left}" y1="${m.top + ph}" x2="${m.left + pw}" y2="${m.top + ph}" stroke="#333"/>`,
    `<text x="${m.left + pw / 2}" y="${H - 16}" text-anchor="middle">seconds since the first request (cold cache)</text>`,
    `<text x="20" y="${m.top + ph / 2}" text-anchor="middle" transform="rotate(-90 20 ${m.top + ph / 2})">IOPS (1 s averages)</text>`,
  );
  series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length] ?? '#000';
    // Sample i is the second (i, i+1]: plotted at its end.
    const pts = s.values.map((v, t) => `${x(t + 1).toFixed(1)},${y(v).toFixed(1)}`).join(' ');
    out.push(`<polyline fill="none" stroke="${color}" stroke-width="2" points="${pts}"/>`);
    const ly = m.top + 10 + i * 22;
    const lx = m.left + pw + 16;
    out.push(
      `<line x1="${lx}" y1="${ly}" x2="${lx + 24}" y2="${ly}" stroke="${color}" stroke-width="3"/>`,
      `<text x="${lx + 30}" y="${ly}" dominant-baseline="middle">${esc(s.name)}</text>`,
    );
  });
  out.push('</svg>');
  return out.join('\n') + '\n';
}
