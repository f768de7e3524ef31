// The scale suite of `npm run bench`: a 256 GiB cache (a sparse file, 512 KiB
// buckets as `ubcache make -b 512k` makes it, so 524288 buckets whose prios
// and gens registration reads) in front of a sparse 4 GiB backing file.
//
//   start to first byte   from spawning `ubcache serve` to the first 4 KiB
//                         read answered on bcache0 (a tiny NBD client polls
//                         every 5 ms): on the new cache, and again after 20 s
//                         of 4k random writes in writeback mode and a
//                         restart (SIGTERM, wait for the exit, spawn).
//                         Goal < 2 s each.
//   peak RSS              VmHWM of serve after the write load, and of the
//                         restarted serve after a short random-read load.
//                         Goal < 300 MiB.
//
// Figures from one run on one machine; never a pass/fail test.

import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { firstByteMs } from './nbd-first-read.ts';
import {
  fio,
  fmtIops,
  MiB,
  peakRssMiB,
  progress,
  sh,
  sparse,
  stopChild,
  ubcacheBin,
  type FioResult,
  type Proc,
  type Row,
  type Workload,
} from './common.ts';
import type { SuiteResult } from './slow.ts';

const GiB = 1024 * MiB;
const SPAN = 4 * GiB;
const randwrite: Workload = { name: '4k-randwrite-qd32', rw: 'randwrite', bs: '4k', iodepth: 32, numjobs: 1 };
const randread: Workload = { name: '4k-randread-qd32', rw: 'randread', bs: '4k', iodepth: 32, numjobs: 1 };

export interface ScaleSuiteOptions {
  dir: string;
  /** Seconds of random writes before the restart. */
  writeSeconds: number;
  /** Seconds of random reads after the restart (for its peak RSS). */
  readSeconds: number;
}

/** Spawn serve and time it to the first byte served; the process is left running. */
async function startTimed(args: string[], socket: string): Promise<{ p: Proc; ms: number }> {
  const t0 = performance.now();
  const child = spawn(ubcacheBin(), args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let text = '';
  child.stderr.on('data', (d: Buffer) => (text += d.toString()));
  const p: Proc = { child, stderr: () => text };
  try {
    const ms = await firstByteMs(socket, 'bcache0', t0, {
      deadlineMs: 120_000,
      alive: () => child.exitCode === null && child.signalCode === null,
    });
    return { p, ms };
  } catch (err) {
    await stopChild(child);
    throw new Error(
      `ubcache serve on the 256 GiB cache: ${err instanceof Error ? err.message : String(err)}\n${text}`,
      {
        cause: err,
      },
    );
  }
}

export async function scaleSuite(o: ScaleSuiteOptions): Promise<SuiteResult> {
  const { dir } = o;
  const cache = sparse(join(dir, 'big-cache.img'), 256 * GiB);
  const backing = sparse(join(dir, 'big-backing.img'), SPAN + 8 * 1024);
  progress('scale: ubcache make -b 512k on a 256 GiB sparse cache ...');
  const t0 = performance.now();
  sh(ubcacheBin(), ['make', '-b', '512k', '-C', cache, '-B', backing]);
  const makeMs = performance.now() - t0;
  const socket = join(dir, 'big.sock');
  const args = [
    'serve',
    '--socket',
    socket,
    '--control',
    join(dir, 'big-control.sock'),
    '--set',
    'bcache0.cache_mode=writeback',
    '--set',
    'bcache0.sequential_cutoff=0',
    cache,
    backing,
  ];
  const uri = `nbd+unix:///bcache0?socket=${socket}`;

  const first = await startTimed(args, socket);
  progress(`scale: new cache, first byte after ${first.ms.toFixed(0)} ms; ${o.writeSeconds} s of 4k random writes ...`);
  let writes: FioResult;
  let rssWrite: number;
  let stopMs: number;
  try {
    writes = await fio(uri, randwrite, o.writeSeconds, SPAN, { rampTime: 0 });
    rssWrite = peakRssMiB(first.p.child.pid);
  } catch (err) {
    throw new Error(`${err instanceof Error ? err.message : String(err)}\n${first.p.stderr()}`, { cause: err });
  } finally {
    const t = performance.now();
    await stopChild(first.p.child);
    stopMs = performance.now() - t;
  }
  if (first.p.child.exitCode !== 0)
    throw new Error(`serve exited with ${first.p.child.exitCode}:\n${first.p.stderr()}`);
  progress(`scale: ${fmtIops(writes.iops)} write IOPS, stopped in ${stopMs.toFixed(0)} ms; restarting ...`);

  const second = await startTimed(args, socket);
  progress(
    `scale: after restart, first byte after ${second.ms.toFixed(0)} ms; ${o.readSeconds} s of 4k random reads ...`,
  );
  let reads: FioResult;
  let rssRead: number;
  try {
    reads = await fio(uri, randread, o.readSeconds, SPAN, { rampTime: 0 });
    rssRead = peakRssMiB(second.p.child.pid);
  } catch (err) {
    throw new Error(`${err instanceof Error ? err.message : String(err)}\n${second.p.stderr()}`, { cause: err });
  } finally {
    await stopChild(second.p.child);
  }
  const rss = Math.max(rssWrite, rssRead);
  const what = '256 GiB cache (512 KiB buckets): serve start to first byte served';
  const rows: Row[] = [
    {
      id: 'scale',
      what: `${what}, new cache`,
      value: `${(first.ms / 1000).toFixed(2)} s`,
      reference: '',
      ratio: undefined,
      measured: first.ms / 1000,
      goal: { of: 'value', op: '<', limit: 2, unit: 's' },
      notes: `make took ${(makeMs / 1000).toFixed(1)} s`,
    },
    {
      id: 'scale',
      what: `${what}, after ${o.writeSeconds} s of random writes + restart`,
      value: `${(second.ms / 1000).toFixed(2)} s`,
      reference: '',
      ratio: undefined,
      measured: second.ms / 1000,
      goal: { of: 'value', op: '<', limit: 2, unit: 's' },
      notes: `${fmtIops(writes.iops)} write IOPS (writeback, 4 GiB span); shutdown took ${(stopMs / 1000).toFixed(2)} s`,
    },
    {
      id: 'scale',
      what: '256 GiB cache: peak RSS under load (VmHWM)',
      value: `${rss.toFixed(0)} MiB`,
      reference: '',
      ratio: undefined,
      measured: rss,
      goal: { of: 'value', op: '<', limit: 300, unit: 'MiB' },
      notes: `${rssWrite.toFixed(0)} MiB after the writes, ${rssRead.toFixed(0)} MiB after restart + ${o.readSeconds} s of reads (${fmtIops(reads.iops)} IOPS)`,
    },
  ];
  return {
    rows,
    lines: [],
    json: {
      makeMs,
      firstByteNewMs: first.ms,
      firstByteRestartMs: second.ms,
      stopMs,
      writes,
      reads,
      peakRssAfterWritesMiB: rssWrite,
      peakRssAfterRestartMiB: rssRead,
    },
  };
}
