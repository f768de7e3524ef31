// `npm run bench`: every figure ubcache is judged by, each as a ratio against
// its reference measured in the same run, in one markdown table.
//
//   npm run bench [-- --suite micro,export,cache,slow,scale,ceph,admission --runtime 10 --only zipf,gc
//                     --backing nbd|fuse|auto --slow-threads 256 --zipf-runtime 90
//                     --json out.json]
//
// Suites (each runs alone with --suite NAME; all of them by default):
//   micro   the engine alone (engine-micro.ts over memory devices): CPU µs per
//           writeback write, read hit and read miss, as a table of its own
//           (micro.ts).
//   export  fio's nbd engine against `ubcache export` and, on the same file,
//           nbdkit's file plugin, qemu-nbd and nbdkit's memory plugin (the
//           protocol ceiling); ratio ubcache / nbdkit-file (this file).
//   cache   `ubcache serve`: hit path, GC latency, writeback, memory (cache.ts).
//   slow    caches over a 5 ms NBD device: Zipf cold and warm against qemu's
//           copy-on-read overlay, nbdkit's cache filter and the device alone,
//           with an IOPS-over-time chart; the same Zipf run with readahead 64k
//           against ubcache without it; writeback over the device (slow.ts).
//           ubcache reaches the device by its nbd+unix:// URI (--backing nbd,
//           the default: make -B and serve take it), or through nbdfuse
//           (--backing fuse), or as the probe finds this build able
//           (--backing auto). The probe also runs before an nbd run, so a
//           build whose make takes no URI fails at once, not after the other
//           suites.
//   scale   a 256 GiB cache: start to first byte, restart, peak RSS (scale.ts).
//   ceph    serve in front of a Ceph RBD image (a single-node cluster started
//           for the run, test/fixtures/ceph) against the image used
//           directly: writeback 4k randwrite, 4k randread and Zipf reads
//           (ceph.ts). Skipped, saying why, where the cluster cannot run
//           (not root, Ceph or qemu-block-extra not installed).
//
//   admission  the engine alone: a Zipf hot set's hit ratio during a one-pass
//           scan of cold data larger than the cache, cache_admission
//           second-hit against always, and the CPU cost of a read hit under
//           each (admission.ts).
//
// --only takes row names: micro, the export workloads (4k-randread-qd1, ...),
// hit, gc, writeback, zipf, zipf-ra, slow-writeback, slow-writethrough, slow-seqread, scale,
// ceph-randwrite-hot, ceph-randwrite, ceph-randread, ceph-zipf, admission. --runtime sets the length of
// every plain fio run (defaults: export 8 s, cache 10 s, slow-writeback 15 s,
// scale writes 20 s); the Zipf runs last --zipf-runtime seconds (default 90,
// or 3 x --runtime when that is given), cold and warm being its first and
// last thirds. The suites run a copy of the built ubcache taken at the start
// (--live-dist runs bin/ubcache itself), so a rebuild meanwhile cannot mix
// two builds in one table. --from DIR takes that copy from another built
// tree (bin/, dist/, native/build) instead of this one, e.g. a build of
// `git archive HEAD` while this tree's dist/ holds others' work in progress.
//
// Figures are ratios from one run on one machine: absolute numbers on a noisy
// 2-core VM mean little, the ratio against a peer measured minutes apart on the
// same file means more. This is never a pass/fail test.

import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import {
  closeSync,
  existsSync,
  ftruncateSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  rmSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { cpus, loadavg, tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { parseArgs } from 'node:util';
import { probeNbdBacking, type BackingMode } from './backing.ts';
import { cacheSuite } from './cache.ts';
import { cephSuite } from './ceph.ts';
import { missingCeph } from '../test/fixtures/ceph/cluster.ts';
import { admissionSuite } from './admission.ts';
import { microSuite } from './micro.ts';
import {
  fio,
  fmtIops,
  parseSize,
  peakRssMiB,
  progress,
  renderRows,
  requireTools,
  root,
  selector,
  snapshotUbcache,
  useUbcacheTree,
  ubcacheBin,
  waitForSocket,
  type Result,
  type Row,
  type Workload,
} from './common.ts';
import { scaleSuite } from './scale.ts';
import { slowSuite } from './slow.ts';

const workloads: Workload[] = [
  { name: '4k-randread-qd1', rw: 'randread', bs: '4k', iodepth: 1, numjobs: 1 },
  { name: '4k-randread-qd32', rw: 'randread', bs: '4k', iodepth: 32, numjobs: 1 },
  { name: '4k-randwrite-qd32', rw: 'randwrite', bs: '4k', iodepth: 32, numjobs: 1 },
  { name: '1m-seqread-qd8', rw: 'read', bs: '1m', iodepth: 8, numjobs: 1 },
  { name: '1m-seqwrite-qd8', rw: 'write', bs: '1m', iodepth: 8, numjobs: 1 },
  { name: '4k-randread-qd32-2conn', rw: 'randread', bs: '4k', iodepth: 32, numjobs: 2 },
];

interface Server {
  name: string;
  start(file: string, socket: string, sizeBytes: number): ChildProcess;
}

const servers: Server[] = [
  {
    name: 'ubcache',
    start: (file, socket) =>
      spawn(ubcacheBin(), ['export', '--socket', socket, '--name', 'disk', file], {
        stdio: ['ignore', 'ignore', 'pipe'],
      }),
  },
  {
    name: 'nbdkit-file',
    start: (file, socket) =>
      spawn('nbdkit', ['--foreground', '--exit-with-parent', '-U', socket, 'file', file], {
        stdio: ['ignore', 'ignore', 'pipe'],
      }),
  },
  {
    name: 'qemu-nbd',
    start: (file, socket) =>
      spawn(
        'qemu-nbd',
        [
          '--persistent',
          '--shared=8',
          '-f',
          'raw',
          '--cache=writeback',
          '--aio=threads',
          '-x',
          'disk',
          '-k',
          socket,
          file,
        ],
        { stdio: ['ignore', 'ignore', 'pipe'] },
      ),
  },
  {
    name: 'nbdkit-memory',
    start: (_file, socket, size) =>
      spawn('nbdkit', ['--foreground', '--exit-with-parent', '-U', socket, 'memory', String(size)], {
        stdio: ['ignore', 'ignore', 'pipe'],
      }),
  },
];

/** The export rows' goals (README): ubcache export / nbdkit-file. */
const exportGoals: Record<string, number> = {
  '4k-randread-qd1': 0.8,
  '4k-randread-qd32': 0.8,
  '4k-randwrite-qd32': 0.8,
  '1m-seqread-qd8': 0.9,
  '1m-seqwrite-qd8': 0.9,
};

/** The export suite: ubcache export against its peers on one plain file. */
async function exportSuite(opts: {
  runtime: number;
  size: number;
  want: (id: string) => boolean;
  servers: string | undefined;
}): Promise<{ lines: string[]; rows: Row[]; results: Result[]; ubcachePeakRssMiB: number }> {
  const { runtime, size } = opts;
  const chosen = workloads.filter((w) => opts.want(w.name));
  const chosenServers = servers.filter((s) => opts.servers === undefined || opts.servers.split(',').includes(s.name));
  const dir = mkdtempSync(join(tmpdir(), 'ubcache-bench-'));
  const file = join(dir, 'disk.img');
  const results: Result[] = [];
  let ubcacheRss = NaN;
  try {
    // A fully written file (not sparse), so reads hit real data for every server.
    const fd = openSync(file, 'w');
    ftruncateSync(fd, 0);
    closeSync(fd);
    const dd = spawnSync('dd', [
      `if=/dev/urandom`,
      `of=${file}`,
      'bs=1M',
      `count=${size / 1024 / 1024}`,
      'status=none',
    ]);
    if (dd.status !== 0) throw new Error('could not create the test file');
    for (const server of chosenServers) {
      const socket = join(dir, `${server.name}.sock`);
      const child = server.start(file, socket, size);
      let stderr = '';
      child.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
      try {
        await waitForSocket(socket, child, 15_000);
        for (const w of chosen) {
          progress(`${server.name} ${w.name} ...`);
          const uri = `nbd+unix:///disk?socket=${socket}`;
          const r = await fio(uri, w, runtime, size);
          results.push({ server: server.name, workload: w.name, iops: r.iops, mibps: r.mibps, p99us: r.p99us });
        }
        if (server.name === 'ubcache') ubcacheRss = peakRssMiB(child.pid);
      } catch (err) {
        throw new Error(`${server.name}: ${err instanceof Error ? err.message : String(err)}\n${stderr}`, {
          cause: err,
        });
      } finally {
        child.kill('SIGTERM');
        await new Promise((r) => child.once('exit', r));
        rmSync(socket, { force: true });
      }
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }

  const get = (s: string, w: string): Result | undefined => results.find((r) => r.server === s && r.workload === w);
  const lines: string[] = [];
  const rows: Row[] = [];
  lines.push(`| workload | server | IOPS | MiB/s | p99 µs | × nbdkit-file |`);
  lines.push(`|---|---|---:|---:|---:|---:|`);
  for (const w of chosen) {
    const base = get('nbdkit-file', w.name);
    // 4k workloads compare IOPS, 1 MiB ones bandwidth.
    const figure = (r: Result): number => (w.bs === '4k' ? r.iops : r.mibps);
    const show = (r: Result): string => (w.bs === '4k' ? `${fmtIops(r.iops)} IOPS` : `${r.mibps.toFixed(0)} MiB/s`);
    for (const s of chosenServers) {
      const r = get(s.name, w.name);
      if (!r) continue;
      const ratio = base ? figure(r) / figure(base) : NaN;
      lines.push(
        `| ${w.name} | ${s.name} | ${r.iops.toFixed(0)} | ${r.mibps.toFixed(1)} | ${r.p99us.toFixed(0)} | ${ratio.toFixed(2)} |`,
      );
    }
    const u = get('ubcache', w.name);
    if (u && base) {
      const goal = exportGoals[w.name];
      rows.push({
        id: w.name,
        what: `export: ${w.name} through ubcache export`,
        value: show(u),
        reference: `${show(base)} (nbdkit file plugin)`,
        ratio: figure(u) / figure(base),
        ...(goal === undefined ? {} : { goal: { of: 'ratio', op: '>=', limit: goal, unit: '×' } as const }),
      });
    }
  }
  lines.push('');
  lines.push(`ubcache export peak RSS: ${ubcacheRss.toFixed(0)} MiB`);
  return { lines, rows, results, ubcachePeakRssMiB: ubcacheRss };
}

/**
 * A tree's commit, and whether tracked files differ from it (others' work in
 * progress may be in the dist/ built from it): what was measured.
 */
function commitOf(dir: string): string {
  const git = (...args: string[]): string => spawnSync('git', ['-C', dir, ...args], { encoding: 'utf8' }).stdout.trim();
  const head = git('rev-parse', '--short', 'HEAD');
  if (head === '') return 'no git commit';
  return git('status', '--porcelain', '--untracked-files=no') === '' ? head : `${head} + uncommitted changes`;
}

function fmtLoad(l: number[]): string {
  return l.map((x) => x.toFixed(2)).join(', ');
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      suite: { type: 'string', default: 'micro,export,cache,slow,scale,ceph,admission' },
      runtime: { type: 'string' },
      'zipf-runtime': { type: 'string' },
      size: { type: 'string', default: '1G' },
      only: { type: 'string' },
      json: { type: 'string' },
      servers: { type: 'string' },
      backing: { type: 'string', default: 'nbd' },
      'slow-threads': { type: 'string', default: '256' },
      'fuse-drop-ms': { type: 'string', default: '200' },
      chart: { type: 'string', default: join(root, 'docs', 'zipf-warmup.svg') },
      'live-dist': { type: 'boolean', default: false },
      from: { type: 'string', default: root },
    },
  });
  requireTools(
    ['fio', 'nbdkit', 'qemu-nbd', 'qemu-img', 'nbdcopy', 'nbdfuse', 'fusermount3', 'dd'],
    'fio nbdkit qemu-utils libnbd-bin fuse3',
  );
  const from = values.from;
  if (!existsSync(join(from, 'dist', 'cli', 'main.js'))) {
    console.error(`bench: ${join(from, 'dist')} is missing; run \`npm run build\` first`);
    process.exit(1);
  }
  const suites = values.suite.split(',');
  for (const s of suites) {
    if (!['micro', 'export', 'cache', 'slow', 'scale', 'ceph', 'admission'].includes(s))
      throw new Error(`unknown suite ${s} (micro, export, cache, slow, scale, ceph, admission)`);
  }
  const given = values.runtime === undefined ? undefined : Number(values.runtime);
  if (given !== undefined && !(given > 0)) throw new Error(`bad --runtime ${values.runtime}`);
  const zipfRuntime =
    values['zipf-runtime'] !== undefined
      ? Number(values['zipf-runtime'])
      : given !== undefined
        ? Math.min(90, 3 * given)
        : 90;
  if (!(zipfRuntime >= 3)) throw new Error('--zipf-runtime must be at least 3 s');
  const size = parseSize(values.size);
  const want = selector(values.only);
  if (!['nbd', 'fuse', 'auto'].includes(values.backing)) {
    throw new Error(`--backing is nbd, fuse or auto, not ${values.backing}`);
  }
  const slowThreads = Number(values['slow-threads']);
  if (!Number.isInteger(slowThreads) || slowThreads < 1)
    throw new Error(`bad --slow-threads ${values['slow-threads']}`);
  const outDir = join(root, '.bench-out');
  mkdirSync(outDir, { recursive: true });
  const started = new Date();
  // The machine is shared: how busy it was is part of every figure.
  const loadStart = loadavg();
  const report: Record<string, unknown> = {
    date: started.toISOString(),
    suites,
    runtime: given ?? 'default',
    zipfRuntime,
    size,
  };
  const rows: Row[] = [];
  const details: string[] = [];
  // The micro suite's own table, printed right after the main one.
  const micro: string[] = [];
  const work = mkdtempSync(join(tmpdir(), 'ubcache-bench-'));
  try {
    // What was measured: the commit, and when the dist/ in use was built
    // (others' uncommitted work may be in it).
    const head = commitOf(root);
    const built = statSync(join(from, 'dist', 'cli', 'main.js')).mtime.toISOString();
    report['build'] = { head, from, fromCommit: commitOf(from), distBuilt: built, snapshot: !values['live-dist'] };
    if (values['live-dist']) useUbcacheTree(from);
    else progress(`running a copy of the built ubcache: ${await snapshotUbcache(join(work, 'ubcache'), from)}`);
    // How the slow suite reaches its device, settled before any suite runs.
    let backing: BackingMode = 'fuse';
    let why = 'chosen with --backing fuse';
    if (suites.includes('slow') && values.backing !== 'fuse') {
      const probe = await probeNbdBacking();
      if (values.backing === 'auto') {
        ({ mode: backing, why } = probe);
        why = `--backing auto: ${why}`;
      } else if (probe.mode === 'nbd') {
        backing = 'nbd';
        why = `the default, --backing nbd (${probe.why})`;
      } else {
        throw new Error(`--backing nbd: ${probe.why}; use --backing fuse (or auto)`);
      }
    }
    if (suites.includes('micro') && want('micro')) {
      const r = await microSuite();
      micro.push(...r.lines);
      report['micro'] = r.json;
    }
    if (suites.includes('export') && workloads.some((w) => want(w.name))) {
      const r = await exportSuite({ runtime: given ?? 8, size, want, servers: values.servers });
      rows.push(...r.rows);
      details.push('### export suite: ubcache export (no cache) vs peers, same file', '', ...r.lines, '');
      report['export'] = { results: r.results, ubcachePeakRssMiB: r.ubcachePeakRssMiB };
    }
    if (suites.includes('cache') && ['hit', 'gc', 'writeback'].some(want)) {
      const dir = mkdtempSync(join(work, 'cache-'));
      const r = await cacheSuite({ dir, runtime: given ?? 10, gcEveryMs: 500, want });
      rmSync(dir, { recursive: true, force: true });
      rows.push(...r.rows);
      report['cache'] = r.json;
    }
    if (
      suites.includes('slow') &&
      ['zipf', 'zipf-ra', 'slow-writeback', 'slow-writethrough', 'slow-seqread'].some(want)
    ) {
      const dir = mkdtempSync(join(work, 'slow-'));
      const r = await slowSuite({
        dir,
        outDir,
        chart: values.chart,
        runtime: given ?? 15,
        zipfRuntime,
        backing,
        backingWhy: why,
        threads: slowThreads,
        dropMs: Number(values['fuse-drop-ms']),
        want,
        ...(values.servers === undefined ? {} : { systems: values.servers.split(',') }),
      });
      rmSync(dir, { recursive: true, force: true });
      rows.push(...r.rows);
      details.push(`### slow suite: ubcache reached the slow device through ${backing} (${why})`, '', ...r.lines);
      report['slow'] = r.json;
    }
    if (suites.includes('scale') && want('scale')) {
      const dir = mkdtempSync(join(work, 'scale-'));
      const r = await scaleSuite({ dir, writeSeconds: given ?? 20, readSeconds: Math.min(5, given ?? 5) });
      rmSync(dir, { recursive: true, force: true });
      rows.push(...r.rows);
      report['scale'] = r.json;
    }
    if (suites.includes('ceph') && ['ceph-randwrite-hot', 'ceph-randwrite', 'ceph-randread', 'ceph-zipf'].some(want)) {
      const why = missingCeph();
      if (why !== undefined) {
        progress(`ceph suite skipped: ${why}`);
        details.push(`### ceph suite: skipped (${why})`, '');
      } else {
        const dir = mkdtempSync(join(work, 'ceph-'));
        const r = await cephSuite({ dir, outDir, runtime: given ?? 15, zipfRuntime, want });
        rmSync(dir, { recursive: true, force: true });
        rows.push(...r.rows);
        details.push('### ceph suite: ubcache serve in front of an RBD image vs the image alone', '', ...r.lines);
        report['ceph'] = r.json;
      }
    }
    if (suites.includes('admission') && want('admission')) {
      const r = await admissionSuite();
      rows.push(...r.rows);
      details.push(...r.lines);
      report['admission'] = r.json;
    }
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
  const minutes = (Date.now() - started.getTime()) / 60_000;
  const loadEnd = loadavg();
  report['loadavg'] = { start: loadStart, end: loadEnd, cpus: cpus().length };
  const build = report['build'] as { head: string; from: string; fromCommit: string; distBuilt: string };
  report['rows'] = rows;
  report['minutes'] = minutes;
  // The thread pool size the children inherit: with the threadpool I/O
  // engine it bounds the file I/O in flight, so a value set by hand is named.
  const pool = process.env['UV_THREADPOOL_SIZE'] ?? 'unset';
  report['uvThreadpoolSize'] = pool;
  const out = [
    `## ubcache bench, ${started.toISOString().slice(0, 16)}Z (${minutes.toFixed(1)} min; suites ${suites.join(',')}; HEAD ${build.head}, ubcache ${build.from === root ? 'of this tree' : `from ${build.from} at ${build.fromCommit}`}, dist built ${build.distBuilt}; UV_THREADPOOL_SIZE ${pool})`,
    '',
    `Load average (1, 5, 15 min) at the start: ${fmtLoad(loadStart)}; at the end: ${fmtLoad(loadEnd)} (${cpus().length} CPUs; others' work shares them).`,
    '',
    ...renderRows(rows),
    '',
    ...micro,
    ...details,
  ];
  console.log(out.join('\n'));
  const file = values.json ?? join(outDir, 'latest.json');
  mkdirSync(dirname(file), { recursive: true });
  writeFileSync(file, JSON.stringify(report, null, 2) + '\n');
  progress(`figures written to ${file}`);
}

main().catch((err: unknown) => {
  console.error(`bench: ${err instanceof Error ? err.message : String(err)}`);
  process.exitCode = 1;
});
