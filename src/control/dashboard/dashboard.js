// The dashboard page: polls /api/stats (src/control/stats.ts's snapshot,
// the one /metrics renders) once a second and plots the last five minutes
// with uPlot (a global from /dashboard/uplot.js). Rates (IOPS, latency, the
// hit ratio over the last second) are differences of the daemon's counters
// between two polls, as Prometheus' rate() would compute them; gauges are
// plotted as read. Plain JavaScript, served as it is: nothing is built for
// the browser.
//
// window.ubcacheDashboard is the page's state (the tests read it): samples
// taken, the uPlot instances by chart id, the last snapshot; each sample
// fires a "ubcache:sample" event on window.

const POLL_MS = 1000;
/** Samples kept and plotted: five minutes at one a second. */
const KEEP = 300;
const COLORS = ['#2563eb', '#dc2626', '#059669', '#d97706', '#7c3aed', '#0891b2', '#db2777', '#4b5563'];

const state = {
  samples: 0,
  fetchErrors: 0,
  lastError: null,
  /** uPlot instances by chart id. */
  plots: {},
  stats: null,
};
window.ubcacheDashboard = state;

/** The snapshots polled, oldest first. */
const history = [];

// ---- formatting ----

function bytes(v) {
  if (v === null || v === undefined) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let x = Math.abs(v);
  let u = 0;
  while (x >= 1024 && u < units.length - 1) {
    x /= 1024;
    u++;
  }
  return `${v < 0 ? '-' : ''}${x >= 100 || u === 0 ? x.toFixed(0) : x.toFixed(1)} ${units[u]}`;
}
const bytesPerSecond = (v) => (v === null || v === undefined ? '–' : `${bytes(v)}/s`);
const plain = (v) =>
  v === null || v === undefined ? '–' : v >= 1000 ? Math.round(v).toLocaleString('en') : String(+v.toFixed(1));
const percent = (v) => (v === null || v === undefined ? '–' : `${+v.toFixed(1)}%`);
const ms = (v) => (v === null || v === undefined ? '–' : `${v >= 10 ? v.toFixed(0) : +v.toFixed(2)} ms`);
const shortSet = (uuid) => uuid.slice(0, 8);

// ---- what is plotted ----

function command(snap, exportName, name) {
  const e = snap.exports.find((x) => x.name === exportName);
  return e?.commands.find((c) => c.command === name);
}

/** Requests of an export's commands other than read and write (flush, trim, ...). */
function otherRequests(snap, exportName) {
  const e = snap.exports.find((x) => x.name === exportName);
  return (e?.commands ?? [])
    .filter((c) => c.command !== 'read' && c.command !== 'write')
    .reduce((n, c) => n + c.requests, 0);
}

/** Per-second increase of a counter between two snapshots (null when it went backwards: a reset, or a new export). */
function perSecond(prev, cur, get) {
  const dt = (cur.time - prev.time) / 1000;
  const a = get(prev);
  const b = get(cur);
  if (a === undefined || b === undefined || dt <= 0 || b < a) return null;
  return (b - a) / dt;
}

const device = (snap, name) => snap.devices.find((d) => d.name === name);
const cacheSet = (snap, uuid) => snap.sets.find((s) => s.uuid === uuid);

/**
 * Each chart: its series for the newest snapshot (key: what to look up,
 * label: the legend), and a series' value at a sample (prev is the sample
 * before, for rates).
 */
const CHARTS = [
  {
    id: 'iops',
    title: 'IOPS per export',
    format: plain,
    series: (s) =>
      s.exports.flatMap((e) => ['read', 'write', 'other'].map((c) => ({ key: [e.name, c], label: `${e.name} ${c}` }))),
    value: ([name, c], prev, cur) =>
      c === 'other'
        ? perSecond(prev, cur, (s) => (s.exports.some((e) => e.name === name) ? otherRequests(s, name) : undefined))
        : perSecond(
            prev,
            cur,
            (s) => command(s, name, c)?.requests ?? (s.exports.some((e) => e.name === name) ? 0 : undefined),
          ),
  },
  {
    id: 'latency',
    title: 'Mean latency per export (dispatch to reply)',
    format: ms,
    series: (s) =>
      s.exports.flatMap((e) => ['read', 'write'].map((c) => ({ key: [e.name, c], label: `${e.name} ${c}` }))),
    value: ([name, c], prev, cur) => {
      const a = command(prev, name, c);
      const b = command(cur, name, c);
      if (!b) return null;
      const n = b.requests - (a?.requests ?? 0);
      return n > 0 ? ((b.seconds - (a?.seconds ?? 0)) / n) * 1000 : null;
    },
  },
  {
    id: 'hits',
    title: 'Hit ratio (reads in the last second)',
    format: percent,
    range: [0, 100],
    series: (s) => s.devices.map((d) => ({ key: d.name, label: d.name })),
    value: (name, prev, cur) => {
      const a = device(prev, name);
      const b = device(cur, name);
      if (!a || !b) return null;
      const hits = b.counters.hits - a.counters.hits;
      const misses = b.counters.misses - a.counters.misses;
      return hits + misses > 0 && hits >= 0 && misses >= 0 ? (hits * 100) / (hits + misses) : null;
    },
  },
  {
    id: 'dirty',
    title: 'Dirty data and the writeback target',
    format: bytes,
    series: (s) =>
      s.devices.flatMap((d) => [
        { key: [d.name, 'dirtyBytes'], label: `${d.name} dirty` },
        { key: [d.name, 'target'], label: `${d.name} target`, dash: true },
      ]),
    value: ([name, what], _prev, cur) => {
      const d = device(cur, name);
      if (!d) return null;
      return what === 'target' ? d.writeback.target : d.dirtyBytes;
    },
  },
  {
    id: 'writeback',
    title: 'Writeback rate controller',
    format: bytesPerSecond,
    series: (s) =>
      s.devices.flatMap((d) => [
        { key: [d.name, 'rate'], label: `${d.name} rate` },
        { key: [d.name, 'proportional'], label: `${d.name} proportional`, dash: true },
        { key: [d.name, 'integral'], label: `${d.name} integral`, dash: true },
      ]),
    value: ([name, term], _prev, cur) => device(cur, name)?.writeback[term] ?? null,
  },
  {
    id: 'available',
    title: 'Cache available',
    format: percent,
    range: [0, 100],
    series: (s) => s.sets.map((x) => ({ key: x.uuid, label: `set ${shortSet(x.uuid)}` })),
    value: (uuid, _prev, cur) => cacheSet(cur, uuid)?.availablePercent ?? null,
  },
  {
    id: 'cacheio',
    title: 'Cache device I/O',
    format: bytesPerSecond,
    series: (s) =>
      s.sets.flatMap((x) => [
        { key: [x.uuid, 'cacheReadBytes'], label: `set ${shortSet(x.uuid)} read` },
        { key: [x.uuid, 'cacheWrittenBytes'], label: `set ${shortSet(x.uuid)} written` },
      ]),
    value: ([uuid, what], prev, cur) => perSecond(prev, cur, (s) => cacheSet(s, uuid)?.[what]),
  },
  {
    id: 'gc',
    title: 'GC runs',
    format: plain,
    series: (s) => s.sets.map((x) => ({ key: x.uuid, label: `set ${shortSet(x.uuid)}` })),
    value: (uuid, _prev, cur) => cacheSet(cur, uuid)?.gc.runs ?? null,
  },
];

// ---- plots ----

const chartBoxes = new Map();

function plotWidth(box) {
  return Math.max(300, box.clientWidth - 16);
}

function makePlot(chart, box, series) {
  const opts = {
    width: plotWidth(box),
    height: 190,
    title: chart.title,
    scales: {
      x: { time: true },
      y: chart.range
        ? { range: chart.range }
        : { range: (_u, min, max) => [Math.min(0, min ?? 0), Math.max(max ?? 1, 1e-9) * 1.1] },
    },
    series: [
      {},
      ...series.map((s, i) => ({
        label: s.label,
        // Dirty data and its target share a colour per device; every other series has its own.
        stroke: COLORS[(chart.id === 'dirty' ? Math.floor(i / 2) : i) % COLORS.length],
        width: 1.5,
        dash: s.dash ? [6, 4] : undefined,
        spanGaps: false,
        value: (_u, v) => chart.format(v),
      })),
    ],
    axes: [{}, { size: 80, values: (_u, splits) => splits.map((v) => chart.format(v)) }],
    legend: { live: false },
  };
  return new window.uPlot(opts, [[], ...series.map(() => [])], box);
}

function render() {
  const cur = history[history.length - 1];
  if (!cur) return;
  for (const chart of CHARTS) {
    const box = chartBoxes.get(chart.id);
    const series = chart.series(cur);
    const signature = series.map((s) => s.label).join('\n');
    let plot = state.plots[chart.id];
    if (plot && plot.signature !== signature) {
      plot.destroy();
      plot = undefined;
      state.plots[chart.id] = undefined;
    }
    if (series.length === 0) {
      if (!box.querySelector('.empty')) box.innerHTML = `<div class="empty">${chart.title}: nothing yet</div>`;
      continue;
    }
    if (!plot) {
      box.textContent = '';
      plot = makePlot(chart, box, series);
      plot.signature = signature;
      state.plots[chart.id] = plot;
    }
    const xs = [];
    const ys = series.map(() => []);
    for (let i = 1; i < history.length; i++) {
      const prev = history[i - 1];
      const snap = history[i];
      xs.push(snap.time / 1000);
      series.forEach((s, j) => ys[j].push(chart.value(s.key, prev, snap)));
    }
    plot.setData([xs, ...ys]);
  }
}

// ---- tables ----

function cell(text, cls) {
  const td = document.createElement('td');
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function fillTable(id, rows) {
  const body = document.querySelector(`#${id} tbody`);
  body.replaceChildren(
    ...rows.map((cells) => {
      const tr = document.createElement('tr');
      tr.append(...cells);
      return tr;
    }),
  );
}

function renderTables(s) {
  fillTable(
    'devices',
    s.devices.map((d) => [
      cell(d.name),
      cell(d.backing),
      cell(d.state, d.state === 'inconsistent' ? 'bad' : ''),
      cell(d.running ? 'yes' : 'no', d.running ? '' : 'bad'),
      cell(d.cacheMode),
      cell(d.set ? shortSet(d.set) : '–'),
      cell(bytes(d.dirtyBytes), 'num'),
      cell(`${d.counters.hitRatio}%`, 'num'),
      cell(d.writeback.active ? bytesPerSecond(d.writeback.rate) : 'off', 'num'),
      cell(`${d.ioErrors}${d.ioDisabled ? ' (I/O disabled)' : ''}`, d.ioDisabled || d.ioErrors > 0 ? 'num bad' : 'num'),
    ]),
  );
  fillTable(
    'sets',
    s.sets.map((x) => [
      cell(x.uuid),
      cell(percent(x.availablePercent), 'num'),
      cell(x.ioDisabled ? 'disabled' : 'enabled', x.ioDisabled ? 'bad' : ''),
      cell(`${x.counters.hitRatio}%`, 'num'),
      cell(bytes(x.cacheReadBytes), 'num'),
      cell(bytes(x.cacheWrittenBytes), 'num'),
      cell(String(x.gc.runs), 'num'),
      cell(String(x.ioErrorsTotal), x.ioErrorsTotal > 0 ? 'num bad' : 'num'),
    ]),
  );
  const list = document.getElementById('errors');
  if (s.recentErrors.length === 0) {
    const li = document.createElement('li');
    li.className = 'none';
    li.textContent = 'none since the daemon started';
    list.replaceChildren(li);
  } else {
    list.replaceChildren(
      ...s.recentErrors
        .slice()
        .reverse()
        .map((e) => {
          const li = document.createElement('li');
          li.className = e.level;
          li.textContent = `${new Date(e.time).toLocaleTimeString('en-GB')} ${e.level === 'warn' ? 'warning' : e.level}: ${e.line}`;
          return li;
        }),
    );
  }
  const failed = s.setsFailed > 0 ? `, ${s.setsFailed} cache set(s) failed since start` : '';
  document.getElementById('summary').textContent =
    `${s.devices.length} device(s), ${s.sets.length} cache set(s), ${s.exports.length} export(s); I/O engine ${s.engine ?? 'unavailable'}${failed}; updated ${new Date(s.time).toLocaleTimeString('en-GB')}`;
}

// ---- polling ----

function setStatus(text, cls) {
  const el = document.getElementById('status');
  el.textContent = text;
  el.className = `status ${cls}`;
}

async function poll() {
  try {
    const res = await fetch('/api/stats', { cache: 'no-store' });
    if (!res.ok) throw new Error(`/api/stats answered ${res.status}`);
    const s = await res.json();
    history.push(s);
    if (history.length > KEEP + 1) history.shift();
    state.stats = s;
    state.samples++;
    setStatus('live', 'live');
    renderTables(s);
    render();
  } catch (err) {
    // The daemon stopped or restarts: say so on the page and keep trying.
    state.fetchErrors++;
    state.lastError = String(err);
    setStatus(`cannot reach the daemon (${err instanceof Error ? err.message : String(err)}); retrying`, 'down');
  }
  window.dispatchEvent(new CustomEvent('ubcache:sample', { detail: state.samples }));
  setTimeout(() => void poll(), POLL_MS);
}

function layout() {
  const grid = document.getElementById('charts');
  for (const chart of CHARTS) {
    const box = document.createElement('div');
    box.className = 'chart';
    box.id = `chart-${chart.id}`;
    grid.append(box);
    chartBoxes.set(chart.id, box);
  }
  window.addEventListener('resize', () => {
    for (const chart of CHARTS) {
      const plot = state.plots[chart.id];
      if (plot) plot.setSize({ width: plotWidth(chartBoxes.get(chart.id)), height: 190 });
    }
  });
}

layout();
void poll();
