// How `ubcache serve` reaches the slow device (an NBD export on a unix
// socket): natively, by an nbd+unix:// URI given to make -B and serve, or
// through nbdfuse, which shows the export as a file.
//
// Through FUSE, ubcache's buffered reads of the backing file land in the
// kernel's page cache (nbdfuse cannot set direct_io, and ubcache opens files
// without O_DIRECT), which would put an unbounded RAM cache of the whole
// device between bcache and the "slow" device and flatter every miss that
// repeats. The dropper below throws the FUSE file's pages away every
// `dropMs` (posix_fadvise DONTNEED through dd iflag=nocache), so repeated
// misses pay the delay again, as they do for the peers.

import { spawn, type ChildProcessByStdio } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Readable } from 'node:stream';
import { nbdkit, run, sleep, stopChild, ubcacheBin, waitForSocket } from './common.ts';

export type BackingMode = 'fuse' | 'nbd';

export function slowUri(socket: string): string {
  return `nbd+unix:///?socket=${socket}`;
}

/**
 * Whether this build's `ubcache make -B` takes an nbd+unix:// URI: a make on
 * a throwaway nbdkit memory export. The reason is printed either way. Run
 * before the suites: --backing nbd (the default) then fails at once on a
 * build without it, and --backing auto picks fuse there.
 */
export async function probeNbdBacking(): Promise<{ mode: BackingMode; why: string }> {
  const dir = mkdtempSync(join(tmpdir(), 'ubcache-bench-probe-'));
  const sock = join(dir, 'probe.sock');
  const mem = nbdkit(sock, ['memory', '64M']);
  try {
    await waitForSocket(sock, mem.child, 15_000);
    // cwd is the scratch directory: a build that took the URI for a file
    // name would at worst create it there.
    const r = await run(ubcacheBin(), ['make', '-B', slowUri(sock)], { cwd: dir });
    if (r.status === 0) return { mode: 'nbd', why: 'ubcache make -B nbd+unix:///?socket=… works on this build' };
    const msg = (r.stderr.trim().split('\n')[0] ?? '').replaceAll(sock, 'PATH').slice(0, 160);
    return { mode: 'fuse', why: `ubcache make -B nbd+unix:// failed on this build (${msg})` };
  } finally {
    await stopChild(mem.child);
    rmSync(dir, { recursive: true, force: true });
  }
}

/** The device spec ubcache is given for the slow export, and what undoes it. */
export interface BackingPath {
  spec: string;
  close(): Promise<void>;
}

async function dropLoop(file: string, everyMs: number, stop: { stopped: boolean }): Promise<void> {
  while (!stop.stopped) {
    await run('dd', [`if=${file}`, 'iflag=nocache', 'count=0', 'status=none']);
    await sleep(everyMs);
  }
}

/** Make the slow export at `socket` reachable for ubcache, as `mode` says. */
export async function openBacking(
  mode: BackingMode,
  socket: string,
  dir: string,
  opts: { dropMs: number },
): Promise<BackingPath> {
  if (mode === 'nbd') return { spec: slowUri(socket), close: () => Promise.resolve() };
  const mnt = mkdtempSync(join(dir, 'fuse-'));
  const pid = join(dir, `${mnt.split('/').pop() ?? 'fuse'}.pid`);
  const file = join(mnt, 'slow');
  // -C 16: nbdfuse makes synchronous libnbd calls, one request at a time per
  // connection, so its default of 4 connections allows 4 reads in flight
  // (about 800 IOPS at 5 ms); 16 lets libfuse's 10 worker threads all wait
  // at once (about 1700 IOPS at 5 ms measured with fio O_DIRECT, 32 jobs).
  const fuse: ChildProcessByStdio<null, null, Readable> = spawn(
    'nbdfuse',
    ['-C', '16', '-P', pid, file, slowUri(socket)],
    {
      stdio: ['ignore', 'ignore', 'pipe'],
    },
  );
  // Kept for an error message only: nbdfuse logs every refused request
  // (a trim past the end when ubcache probes discard support, for one).
  let fuseErr = '';
  fuse.stderr.on('data', (d: Buffer) => (fuseErr += d.toString()));
  for (let i = 0; i < 500 && !existsSync(pid); i++) await sleep(20);
  if (!existsSync(pid)) {
    await stopChild(fuse);
    throw new Error(`nbdfuse did not start: ${fuseErr}`);
  }
  const stop = { stopped: false };
  const dropper = opts.dropMs > 0 ? dropLoop(file, opts.dropMs, stop) : Promise.resolve();
  return {
    spec: file,
    close: async () => {
      stop.stopped = true;
      await dropper;
      await run('fusermount3', ['-u', mnt]);
      await stopChild(fuse);
      rmSync(mnt, { recursive: true, force: true });
    },
  };
}
