// Helpers shared by the benchmark suites: starting servers, waiting for their
// sockets, running fio's nbd engine and reading its JSON, and a process's
// peak resident memory.

import { spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { connect } from 'node:net';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const root = join(dirname(fileURLToPath(import.meta.url)), '..');

export interface Workload {
  name: string;
  rw: string;
  bs: string;
  iodepth: number;
  numjobs: number;
  /** Extra fio options, e.g. --random_distribution=zipf:1.2. */
  extra?: string[];
}

export interface Result {
  server: string;
  workload: string;
  iops: number;
  mibps: number;
  p99us: number;
}

export function parseSize(s: string): number {
  const m = /^(\d+)([kmgKMG]?)$/.exec(s);
  if (!m) throw new Error(`bad size ${s}`);
  const mult: Record<string, number> = { '': 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3 };
  return Number(m[1]) * (mult[(m[2] ?? '').toLowerCase()] ?? 1);
}

export async function waitForSocket(path: string, child: ChildProcess, deadlineMs: number): Promise<void> {
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

export function peakRssMiB(pid: number): number {
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

/** fio's nbd engine on `uri` (or, with a path to a regular file, plain pread/pwrite through io_uring). */
export function runFio(uri: string, w: Workload, runtime: number, size: number): Omit<Result, 'server' | 'workload'> {
  const target = uri.startsWith('nbd')
    ? ['--ioengine=nbd', `--uri=${uri}`]
    : ['--ioengine=io_uring', `--filename=${uri}`, '--direct=0'];
  const args = [
    '--name=bench',
    ...target,
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
    ...(w.extra ?? []),
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

/** `command -v` for each tool, exiting with a message naming the packages when one is missing. */
export function requireTools(tools: string[], packages: string): void {
  for (const tool of tools) {
    if (spawnSync('sh', ['-c', `command -v ${tool}`]).status !== 0) {
      console.error(`bench: ${tool} is not installed (apt-get install ${packages})`);
      process.exit(1);
    }
  }
}

/** Wait for a child to exit after a signal. */
export async function stopChild(child: ChildProcess, signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise((r) => child.once('exit', r));
  child.kill(signal);
  await exited;
}
