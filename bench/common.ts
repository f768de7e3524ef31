// Helpers shared by the benchmark suites: starting servers, waiting for their
// sockets, running fio's nbd engine and reading its JSON, a process's peak
// resident memory, the control socket, and the rows of the summary table.
//
// fio runs asynchronously (never spawnSync): the GC trigger loop, the FUSE
// page-cache dropper and the hit-ratio snapshots run on this event loop while
// fio measures.

import { spawn, spawnSync, type ChildProcess, type ChildProcessByStdio } from 'node:child_process';
import { closeSync, existsSync, ftruncateSync, openSync, readFileSync } from 'node:fs';
import { request } from 'node:http';
import { connect } from 'node:net';
import { dirname, join } from 'node:path';
import type { Readable } from 'node:stream';
import { fileURLToPath } from 'node:url';

export const root = join(dirname(fileURLToPath(import.meta.url)), '..');
let ubcachePath = join(root, 'bin', 'ubcache');

/**
 * Run bin/ubcache of another built tree (bench --from: a private build of a
 * commit, while others rebuild this tree's dist/ from work in progress).
 */
export function useUbcacheTree(tree: string): void {
  ubcachePath = join(tree, 'bin', 'ubcache');
}

/** The ubcache command the suites run: bin/ubcache, or the snapshot of it (snapshotUbcache). */
export function ubcacheBin(): string {
  return ubcachePath;
}

/** The dist/ beside that command: what engine-micro loads (UBCACHE_DIST), so it measures the same build. */
export function ubcacheDist(): string {
  return join(dirname(dirname(ubcachePath)), 'dist');
}

/**
 * Copy the built ubcache (bin/, dist/, the native addon, package.json) to
 * `dir` and run that copy from now on: others rebuild dist/ while a long
 * bench runs, and a rebuild deletes dist/ first, which would fail or mix two
 * builds in one table. Waits for dist/ to stop changing (a build in
 * progress) and checks that the copy starts.
 */
export async function snapshotUbcache(dir: string, from = root): Promise<string> {
  const count = (): number => {
    const r = spawnSync('find', [join(from, 'dist'), '-type', 'f'], { encoding: 'utf8' });
    return r.status === 0 ? r.stdout.split('\n').length : -1;
  };
  for (let i = 0; ; i++) {
    const a = count();
    await sleep(2000);
    if (a > 0 && a === count() && existsSync(join(from, 'dist', 'cli', 'main.js'))) break;
    if (i >= 60) throw new Error('dist/ kept changing (or is missing) for two minutes; run `npm run build`');
  }
  sh('mkdir', ['-p', join(dir, 'native', 'build', 'Release')]);
  sh('cp', ['-a', join(from, 'bin'), join(from, 'dist'), join(from, 'package.json'), dir]);
  const addon = join(from, 'native', 'build', 'Release', 'ubcache_native.node');
  if (existsSync(addon)) sh('cp', [addon, join(dir, 'native', 'build', 'Release')]);
  const bin = join(dir, 'bin', 'ubcache');
  sh(bin, ['make', '--help']);
  ubcachePath = bin;
  return bin;
}
export const MiB = 1024 * 1024;

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

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
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
    await sleep(20);
  }
}

export function peakRssMiB(pid: number | undefined): number {
  if (pid === undefined) return NaN;
  try {
    const status = readFileSync(`/proc/${pid}/status`, 'utf8');
    const m = /VmHWM:\s+(\d+) kB/.exec(status);
    return m ? Number(m[1]) / 1024 : NaN;
  } catch {
    return NaN;
  }
}

/** A sparse file of `size` bytes (created or truncated). */
export function sparse(path: string, size: number): string {
  const fd = openSync(path, 'w');
  ftruncateSync(fd, size);
  closeSync(fd);
  return path;
}

/** Run a short command to completion; its stdout, or an error with its stderr. */
export function sh(cmd: string, args: string[], opts: { cwd?: string } = {}): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 64 * MiB, ...opts });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.status ?? r.signal}): ${r.stderr}`);
  return r.stdout;
}

/** The same, without blocking the event loop; never throws, the caller looks at `status`. */
export function run(
  cmd: string,
  args: string[],
  opts: { cwd?: string; env?: NodeJS.ProcessEnv } = {},
): Promise<{ status: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], ...opts });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.once('error', (err) => {
      resolve({ status: -1, stdout, stderr: stderr + err.message });
    });
    child.once('close', (status) => {
      resolve({ status, stdout, stderr });
    });
  });
}

/** A long-running server whose stderr is kept for error messages. */
export interface Proc {
  child: ChildProcess;
  stderr: () => string;
}

export function startProc(cmd: string, args: string[], env?: NodeJS.ProcessEnv): Proc {
  const child: ChildProcessByStdio<null, null, Readable> = spawn(cmd, args, {
    stdio: ['ignore', 'ignore', 'pipe'],
    ...(env ? { env } : {}),
  });
  let text = '';
  child.stderr.on('data', (d: Buffer) => (text += d.toString()));
  return { child, stderr: () => text };
}

export function ubcache(args: string[]): Proc {
  return startProc(ubcacheBin(), args);
}

export interface NbdkitOptions {
  env?: NodeJS.ProcessEnv;
  /**
   * nbdkit's --threads: how many requests it serves at once, so that the
   * delay filter delays each request by itself rather than a queue of them.
   * Default 64; the slow suite passes its own (--slow-threads).
   */
  threads?: number;
}

/** nbdkit in the foreground on a unix socket, dying with us. */
export function nbdkit(socket: string, args: string[], o: NbdkitOptions = {}): Proc {
  return startProc(
    'nbdkit',
    ['--foreground', '--exit-with-parent', '--threads', String(o.threads ?? 64), '-U', socket, ...args],
    o.env,
  );
}

/** Wait for the socket, run `body`, stop the server however `body` ended; errors carry its stderr. */
export async function withProcess<T>(p: Proc, socket: string, what: string, body: () => Promise<T> | T): Promise<T> {
  try {
    await waitForSocket(socket, p.child, 60_000);
    return await body();
  } catch (err) {
    throw new Error(`${what}: ${err instanceof Error ? err.message : String(err)}\n${p.stderr()}`, { cause: err });
  } finally {
    await stopChild(p.child);
  }
}

export interface FioOptions {
  /** Seconds of warm-up fio leaves out of its figures; default 1, 0 for runs that measure the cold start. */
  rampTime?: number;
  /** fio's --percentile_list, e.g. [50, 99, 99.9]. */
  percentiles?: number[];
  /** Log IOPS once a second to `${iopsLog}_iops.1.log` (read back into `series`). */
  iopsLog?: string;
}

export interface FioResult {
  iops: number;
  mibps: number;
  p99us: number;
  /** Completion latency percentiles in µs, keyed as given ("99.9"). */
  percentiles: Record<string, number>;
  /** IOPS of each second from the start, when iopsLog was asked for. */
  series?: number[];
}

interface FioSide {
  iops: number;
  bw_bytes: number;
  clat_ns: { percentile?: Record<string, number> };
}
interface FioJob {
  read: FioSide;
  write: FioSide;
}

function fioArgs(uri: string, w: Workload, runtime: number, size: number, o: FioOptions): string[] {
  const target = uri.startsWith('nbd')
    ? ['--ioengine=nbd', `--uri=${uri}`]
    : ['--ioengine=io_uring', `--filename=${uri}`, '--direct=0'];
  return [
    '--name=bench',
    ...target,
    `--rw=${w.rw}`,
    `--bs=${w.bs}`,
    `--iodepth=${w.iodepth}`,
    `--numjobs=${w.numjobs}`,
    `--size=${size}`,
    '--time_based',
    `--runtime=${runtime}`,
    `--ramp_time=${o.rampTime ?? 1}`,
    '--group_reporting',
    '--output-format=json',
    ...(o.percentiles ? [`--percentile_list=${o.percentiles.join(':')}`] : []),
    ...(o.iopsLog !== undefined ? [`--write_iops_log=${o.iopsLog}`, '--log_avg_msec=1000'] : []),
    ...(w.extra ?? []),
  ];
}

function parseFio(stdout: string, w: Workload, o: FioOptions): FioResult {
  const json = JSON.parse(stdout.slice(stdout.indexOf('{'))) as { jobs: FioJob[] };
  const job = json.jobs[0];
  if (!job) throw new Error('fio printed no job');
  const side = w.rw.includes('write') ? job.write : job.read;
  const pct = side.clat_ns.percentile ?? {};
  const percentiles: Record<string, number> = {};
  for (const [k, v] of Object.entries(pct)) percentiles[String(Number(k))] = v / 1000;
  const result: FioResult = {
    iops: side.iops,
    mibps: side.bw_bytes / MiB,
    p99us: percentiles['99'] ?? NaN,
    percentiles,
  };
  if (o.iopsLog !== undefined) result.series = readIopsLog(`${o.iopsLog}_iops.1.log`);
  return result;
}

/**
 * fio's iops log with --log_avg_msec=1000: "msec, iops, dir, bs, prio" a line,
 * one line a second. Sample i (from 0) is the second (i, i+1].
 */
export function readIopsLog(path: string): number[] {
  const series: number[] = [];
  for (const line of readFileSync(path, 'utf8').split('\n')) {
    const [ms, iops] = line.split(',').map((s) => Number(s.trim()));
    if (ms === undefined || iops === undefined || !Number.isFinite(ms) || !Number.isFinite(iops)) continue;
    const i = Math.max(0, Math.round(ms / 1000) - 1);
    series[i] = (series[i] ?? 0) + iops;
  }
  for (let i = 0; i < series.length; i++) series[i] ??= 0;
  return series;
}

/** fio on `uri` (an NBD URI: fio's nbd engine; a path: io_uring on the file), without blocking the event loop. */
export async function fio(
  uri: string,
  w: Workload,
  runtime: number,
  size: number,
  o: FioOptions = {},
): Promise<FioResult> {
  const r = await run('fio', fioArgs(uri, w, runtime, size, o));
  if (r.status !== 0) throw new Error(`fio failed (${r.status}): ${r.stderr}`);
  return parseFio(r.stdout, w, o);
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

export function progress(text: string): void {
  process.stderr.write(`bench: ${text}\n`);
}

// --- the control socket of `ubcache serve` ---

/** `ubcache ctl --control SOCKET ARGS...`, as a user runs it. */
export async function ctl(control: string, ...args: string[]): Promise<string> {
  const r = await run(ubcacheBin(), ['ctl', '--control', control, ...args]);
  if (r.status !== 0) throw new Error(`ubcache ctl ${args.join(' ')}: ${r.stderr.trim()}`);
  return r.stdout;
}

/**
 * One HTTP request on the control socket: the request `ubcache ctl` sends,
 * without starting a node process each time (about 0.2 s of CPU, which on
 * two cores would weigh on the very figure a loop of them is measuring).
 */
export function controlRequest(
  socketPath: string,
  method: 'GET' | 'PUT',
  path: string,
  body?: string,
): Promise<string> {
  return new Promise((resolve, reject) => {
    const req = request(
      {
        socketPath,
        method,
        path,
        headers: body === undefined ? {} : { 'content-type': 'text/plain', 'content-length': Buffer.byteLength(body) },
      },
      (res) => {
        let text = '';
        res.on('data', (c: Buffer) => (text += c.toString()));
        res.on('end', () => {
          if ((res.statusCode ?? 0) >= 400) reject(new Error(`${method} ${path}: HTTP ${res.statusCode}: ${text}`));
          else resolve(text);
        });
        res.on('error', reject);
      },
    );
    req.on('error', reject);
    req.end(body);
  });
}

export interface HitStats {
  hits: number;
  misses: number;
  /** bcache's cache_hit_ratio (integer percent). */
  ratio: number;
}

/** bcache0's stats_total hit counters, read with `ubcache ctl tree`. */
export async function hitStats(control: string, dev = 'bcache0'): Promise<HitStats> {
  const text = await ctl(control, 'tree', `/sys/block/${dev}/bcache/stats_total`);
  const get = (name: string): number => {
    const m = new RegExp(`/${name}: (\\S+)`).exec(text);
    return m ? Number(m[1]) : NaN;
  };
  return { hits: get('cache_hits'), misses: get('cache_misses'), ratio: get('cache_hit_ratio') };
}

/** The same counters over HTTP, cheap enough to read in the middle of a measurement. */
export async function hitCounters(control: string, dev = 'bcache0'): Promise<{ hits: number; misses: number }> {
  const base = `/sys/block/${dev}/bcache/stats_total`;
  const [h, m] = await Promise.all([
    controlRequest(control, 'GET', `${base}/cache_hits`),
    controlRequest(control, 'GET', `${base}/cache_misses`),
  ]);
  return { hits: Number(h.trim()), misses: Number(m.trim()) };
}

/** The I/O engine serve's file devices use (io_uring or threadpool), from its /metrics. */
export async function ioEngineOf(control: string): Promise<string> {
  try {
    const m = /io_engine\{engine="([^"]+)"\} 1\b/.exec(await controlRequest(control, 'GET', '/metrics'));
    return m?.[1] ?? 'not in /metrics';
  } catch (err) {
    return `unknown (${err instanceof Error ? err.message : String(err)})`;
  }
}

/**
 * One sample of a counter in serve's /metrics (e.g. ubcache_cache_readaheads_total
 * of bcache0, which has no sysfs file): NaN when it is not there.
 */
export async function metricOf(control: string, name: string, device = 'bcache0'): Promise<number> {
  const text = await controlRequest(control, 'GET', '/metrics');
  const m = new RegExp(`^${name}\\{device="${device}"\\} (\\S+)$`, 'm').exec(text);
  return m ? Number(m[1]) : NaN;
}

/** The uuid of the (only) cache set. */
export async function setUuid(control: string): Promise<string> {
  const names = await ctl(control, 'ls', '/sys/fs/bcache');
  const uuid = names.split(/\s+/).find((n) => /^[0-9a-f]{8}-[0-9a-f]{4}-/.test(n));
  if (uuid === undefined) throw new Error(`no cache set in /sys/fs/bcache: ${names}`);
  return uuid;
}

// --- rows of the summary table ---

export interface Goal {
  /** What the goal is checked against: the ratio, or the value itself (seconds, MiB). */
  of: 'ratio' | 'value';
  op: '>=' | '<=' | '<';
  limit: number;
  unit: string;
}

export interface Row {
  /** The --only name that selects the measurement. */
  id: string;
  what: string;
  value: string;
  reference: string;
  /** value / reference (or reference / value where smaller is better, as the goal says). */
  ratio: number | undefined;
  /** The figure the goal is checked against when it is not the ratio. */
  measured?: number;
  goal?: Goal;
  notes?: string;
}

export function goalText(g: Goal | undefined): string {
  if (!g) return '—';
  const op = { '>=': '≥', '<=': '≤', '<': '<' }[g.op];
  return `${op} ${g.limit}${g.unit === '×' ? '×' : ` ${g.unit}`}`;
}

export function goalMet(r: Row): string {
  const g = r.goal;
  if (!g) return '';
  const x = g.of === 'ratio' ? r.ratio : r.measured;
  if (x === undefined || !Number.isFinite(x)) return '?';
  const ok = g.op === '>=' ? x >= g.limit : g.op === '<=' ? x <= g.limit : x < g.limit;
  return ok ? 'yes' : 'no';
}

export function fmtIops(x: number): string {
  if (!Number.isFinite(x)) return 'n/a';
  return x >= 10_000 ? `${(x / 1000).toFixed(1)}k` : x.toFixed(0);
}

export function fmtRatio(x: number | undefined): string {
  return x === undefined || !Number.isFinite(x) ? '—' : `${x.toFixed(2)}×`;
}

export function renderRows(rows: Row[]): string[] {
  const esc = (s: string): string => s.replaceAll('|', '\\|');
  const lines = ['| what | value | reference | ratio | goal | met | notes |', '|---|---:|---|---:|---:|:---:|---|'];
  for (const r of rows) {
    lines.push(
      `| ${esc(r.what)} | ${esc(r.value)} | ${esc(r.reference)} | ${fmtRatio(r.ratio)} | ${goalText(r.goal)} | ${goalMet(r)} | ${esc(r.notes ?? '')} |`,
    );
  }
  return lines;
}

/** Which measurements --only asks for (undefined: all). */
export function selector(only: string | undefined): (id: string) => boolean {
  if (only === undefined) return () => true;
  const set = new Set(only.split(',').map((s) => s.trim()));
  return (id) => set.has(id);
}
