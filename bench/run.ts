// The side-by-side benchmark (`npm run bench`): fio's nbd engine against
// `ubcache export` and, in the same run on the same file, nbdkit's file
// plugin, qemu-nbd, and nbdkit's memory plugin (the protocol ceiling). Prints
// IOPS, MiB/s, p99 latency and the ratio ubcache / nbdkit-file per workload,
// the peak resident memory of ubcache, and writes the figures as JSON.
//
//   npm run bench [-- --runtime 10 --size 1G --only 4k-randread-qd32 --json out.json]
//
// Figures are ratios from one run on one machine: absolute numbers on a noisy
// 2-core VM mean little, the ratio against a peer measured minutes apart on the
// same file means more. This is never a pass/fail test.

import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync, existsSync, mkdirSync, openSync, closeSync, ftruncateSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { parseArgs } from 'node:util';
import { cacheSuite } from './cache.ts';
import {
  parseSize,
  peakRssMiB,
  requireTools,
  root,
  runFio,
  waitForSocket,
  type Result,
  type Workload,
} from './common.ts';

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
      spawn(join(root, 'bin', 'ubcache'), ['export', '--socket', socket, '--name', 'disk', file], {
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

/** The export suite: ubcache export against its peers on one plain file. */
async function exportSuite(opts: {
  runtime: number;
  size: number;
  only: string | undefined;
  servers: string | undefined;
}): Promise<{ lines: string[]; results: Result[]; ubcachePeakRssMiB: number }> {
  const { runtime, size } = opts;
  const chosen = workloads.filter((w) => opts.only === undefined || opts.only.split(',').includes(w.name));
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
          process.stderr.write(`bench: ${server.name} ${w.name} ...\n`);
          const uri = `nbd+unix:///disk?socket=${socket}`;
          results.push({ server: server.name, workload: w.name, ...runFio(uri, w, runtime, size) });
        }
        if (server.name === 'ubcache' && child.pid !== undefined) ubcacheRss = peakRssMiB(child.pid);
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
  lines.push(`| workload | server | IOPS | MiB/s | p99 µs | × nbdkit-file |`);
  lines.push(`|---|---|---:|---:|---:|---:|`);
  for (const w of chosen) {
    const base = get('nbdkit-file', w.name);
    for (const s of chosenServers) {
      const r = get(s.name, w.name);
      if (!r) continue;
      const ratio = base ? (w.bs === '4k' ? r.iops / base.iops : r.mibps / base.mibps) : NaN;
      lines.push(
        `| ${w.name} | ${s.name} | ${r.iops.toFixed(0)} | ${r.mibps.toFixed(1)} | ${r.p99us.toFixed(0)} | ${ratio.toFixed(2)} |`,
      );
    }
  }
  lines.push('');
  lines.push(`ubcache export peak RSS: ${ubcacheRss.toFixed(0)} MiB`);
  return { lines, results, ubcachePeakRssMiB: ubcacheRss };
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      suite: { type: 'string', default: 'export,cache' },
      runtime: { type: 'string', default: '8' },
      size: { type: 'string', default: '1G' },
      only: { type: 'string' },
      json: { type: 'string' },
      servers: { type: 'string' },
    },
  });
  requireTools(['fio', 'nbdkit', 'qemu-nbd', 'nbdcopy', 'nbdfuse'], 'fio nbdkit qemu-utils libnbd-bin fuse3');
  if (!existsSync(join(root, 'dist', 'cli', 'main.js'))) {
    console.error('bench: dist/ is missing; run `npm run build` first');
    process.exit(1);
  }
  const suites = values.suite.split(',');
  const runtime = Number(values.runtime);
  const size = parseSize(values.size);
  const report: Record<string, unknown> = { date: new Date().toISOString(), runtime, size };
  const out: string[] = [];
  if (suites.includes('export')) {
    const r = await exportSuite({ runtime, size, only: values.only, servers: values.servers });
    out.push('## ubcache export (no cache) vs peers, same file', '', ...r.lines, '');
    report['export'] = { results: r.results, ubcachePeakRssMiB: r.ubcachePeakRssMiB };
  }
  if (suites.includes('cache')) {
    const r = await cacheSuite({ runtime: Math.max(runtime, 10) });
    out.push('## ubcache serve (bcache) targets', '', ...r.lines, '');
    report['cache'] = r.json;
  }
  console.log(out.join('\n'));
  const file = values.json ?? join(root, '.bench-out', 'latest.json');
  mkdirSync(dirname(file), { recursive: true });
  writeFileSync(file, JSON.stringify(report, null, 2) + '\n');
  console.error(`bench: figures written to ${file}`);
}

main().catch((err: unknown) => {
  console.error(`bench: ${err instanceof Error ? err.message : String(err)}`);
  process.exitCode = 1;
});
