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
import {
  mkdtempSync,
  rmSync,
  writeFileSync,
  readFileSync,
  existsSync,
  mkdirSync,
  openSync,
  closeSync,
  ftruncateSync,
} from 'node:fs';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');

interface Workload {
  name: string;
  rw: string;
  bs: string;
  iodepth: number;
  numjobs: number;
}

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

interface Result {
  server: string;
  workload: string;
  iops: number;
  mibps: number;
  p99us: number;
}

function parseSize(s: string): number {
  const m = /^(\d+)([kmgKMG]?)$/.exec(s);
  if (!m) throw new Error(`bad size ${s}`);
  const mult: Record<string, number> = { '': 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3 };
  return Number(m[1]) * (mult[(m[2] ?? '').toLowerCase()] ?? 1);
}

async function waitForSocket(path: string, child: ChildProcess, deadlineMs: number): Promise<void> {
  const until = Date.now() + deadlineMs;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`server exited with status ${child.exitCode} before listening`);
    if (existsSync(path)) {
      const ok = await new Promise<boolean>((resolve) => {
        const s = connect(path);
        s.once('connect', () => {
          s.destroy();
          resolve(true);
        });
        s.once('error', () => {
          resolve(false);
        });
      });
      if (ok) return;
    }
    if (Date.now() > until) throw new Error(`server did not listen on ${path} in time`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

function peakRssMiB(pid: number): number {
  try {
    const status = readFileSync(`/proc/${pid}/status`, 'utf8');
    const m = /VmHWM:\s+(\d+) kB/.exec(status);
    return m ? Number(m[1]) / 1024 : NaN;
  } catch {
    return NaN;
  }
}

interface FioJob {
  read: { iops: number; bw_bytes: number; clat_ns: { percentile?: Record<string, number> } };
  write: { iops: number; bw_bytes: number; clat_ns: { percentile?: Record<string, number> } };
}

function runFio(socket: string, w: Workload, runtime: number, size: number): Omit<Result, 'server' | 'workload'> {
  const args = [
    '--name=bench',
    '--ioengine=nbd',
    `--uri=nbd+unix:///disk?socket=${socket}`,
    `--rw=${w.rw}`,
    `--bs=${w.bs}`,
    `--iodepth=${w.iodepth}`,
    `--numjobs=${w.numjobs}`,
    `--size=${size}`,
    '--time_based',
    `--runtime=${runtime}`,
    '--ramp_time=1',
    '--group_reporting',
    '--output-format=json',
  ];
  const r = spawnSync('fio', args, { encoding: 'utf8', maxBuffer: 64 * 1024 * 1024 });
  if (r.status !== 0) throw new Error(`fio failed: ${r.stderr}`);
  const json = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))) as { jobs: FioJob[] };
  const job = json.jobs[0];
  if (!job) throw new Error('fio printed no job');
  const side = w.rw.includes('write') ? job.write : job.read;
  const p99 = side.clat_ns.percentile?.['99.000000'] ?? NaN;
  return { iops: side.iops, mibps: side.bw_bytes / 1024 / 1024, p99us: p99 / 1000 };
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      runtime: { type: 'string', default: '8' },
      size: { type: 'string', default: '1G' },
      only: { type: 'string' },
      json: { type: 'string' },
      servers: { type: 'string' },
    },
  });
  for (const tool of ['fio', 'nbdkit', 'qemu-nbd']) {
    if (spawnSync('sh', ['-c', `command -v ${tool}`]).status !== 0) {
      console.error(`bench: ${tool} is not installed (apt-get install fio nbdkit qemu-utils)`);
      process.exit(1);
    }
  }
  if (!existsSync(join(root, 'dist', 'cli', 'main.js'))) {
    console.error('bench: dist/ is missing; run `npm run build` first');
    process.exit(1);
  }
  const runtime = Number(values.runtime);
  const size = parseSize(values.size);
  const chosen = workloads.filter((w) => values.only === undefined || values.only.split(',').includes(w.name));
  const chosenServers = servers.filter(
    (s) => values.servers === undefined || values.servers.split(',').includes(s.name),
  );
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
          results.push({ server: server.name, workload: w.name, ...runFio(socket, w, runtime, size) });
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
  lines.push(`ubcache peak RSS: ${ubcacheRss.toFixed(0)} MiB`);
  console.log(lines.join('\n'));
  const out = values.json ?? join(root, '.bench-out', 'latest.json');
  mkdirSync(dirname(out), { recursive: true });
  writeFileSync(
    out,
    JSON.stringify({ date: new Date().toISOString(), runtime, size, results, ubcachePeakRssMiB: ubcacheRss }, null, 2) +
      '\n',
  );
  console.error(`bench: figures written to ${out}`);
}

main().catch((err: unknown) => {
  console.error(`bench: ${err instanceof Error ? err.message : String(err)}`);
  process.exitCode = 1;
});
