// The cache suite of `npm run bench`: `ubcache serve` (the bcache engine)
// measured against what it should be compared with, in one run:
//
//   hit path   4k random reads, QD32, over a working set that is entirely in
//              the cache, against `ubcache export` of the cache file alone
//              (the same NBD server with no btree in front): what the cache
//              lookups cost. Goal >= 0.7x.
//   writeback  4k random writes, QD32, writeback mode, against the same
//              export of the cache file: what dirty keys and the journal
//              cost. Goal >= 0.7x.
//   zipf       4k random reads with a Zipf(1.2) distribution over a slow
//              backing device (nbdkit's file plugin behind its delay filter,
//              rdelay=5ms, reached through nbdfuse), the cache a quarter of
//              the device, against nbdkit's cache filter (cache-on-read, same
//              cache size) over the same slow plugin. Goal >= 2x.
//   memory     peak resident memory of `ubcache serve` with a 1 GiB cache in
//              64 KiB buckets after the hit and writeback runs. Goal < 300 MiB.
//
// Ratios from one run on one machine; never a pass/fail test.

import { spawn, spawnSync, type ChildProcess, type ChildProcessByStdio } from 'node:child_process';
import type { Readable } from 'node:stream';
import { closeSync, existsSync, ftruncateSync, mkdirSync, mkdtempSync, openSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { peakRssMiB, root, runFio, stopChild, waitForSocket, type Result, type Workload } from './common.ts';

const MiB = 1024 * 1024;
const UBCACHE = join(root, 'bin', 'ubcache');

const randread: Workload = { name: '4k-randread-qd32', rw: 'randread', bs: '4k', iodepth: 32, numjobs: 1 };
const randwrite: Workload = { name: '4k-randwrite-qd32', rw: 'randwrite', bs: '4k', iodepth: 32, numjobs: 1 };
const zipf: Workload = {
  name: '4k-zipf1.2-randread-qd32',
  rw: 'randread',
  bs: '4k',
  iodepth: 32,
  numjobs: 1,
  extra: ['--random_distribution=zipf:1.2'],
};

function sh(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed: ${r.stderr}`);
  return r.stdout;
}

function sparse(path: string, size: number): string {
  const fd = openSync(path, 'w');
  ftruncateSync(fd, size);
  closeSync(fd);
  return path;
}

function daemon(args: string[]): { child: ChildProcess; stderr: () => string } {
  const child: ChildProcessByStdio<null, null, Readable> = spawn(UBCACHE, args, {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let text = '';
  child.stderr.on('data', (d: Buffer) => (text += d.toString()));
  return { child, stderr: () => text };
}

async function withProcess<T>(
  p: { child: ChildProcess; stderr: () => string },
  socket: string,
  what: string,
  body: () => Promise<T> | T,
): Promise<T> {
  try {
    await waitForSocket(socket, p.child, 30_000);
    return await body();
  } catch (err) {
    throw new Error(`${what}: ${err instanceof Error ? err.message : String(err)}\n${p.stderr()}`, { cause: err });
  } finally {
    await stopChild(p.child);
  }
}

export interface CacheSuiteResult {
  lines: string[];
  json: { results: Result[]; servePeakRssMiB: number };
}

export async function cacheSuite(opts: { runtime: number }): Promise<CacheSuiteResult> {
  const { runtime } = opts;
  const results: Result[] = [];
  const record = (server: string, w: Workload, r: Omit<Result, 'server' | 'workload'>): Result => {
    const full = { server, workload: w.name, ...r };
    results.push(full);
    process.stderr.write(`bench: ${server} ${w.name}: ${r.iops.toFixed(0)} IOPS\n`);
    return full;
  };
  const dir = mkdtempSync(join(tmpdir(), 'ubcache-bench-cache-'));
  let rss = NaN;
  try {
    // --- hit path, writeback, memory: 1 GiB cache in 64 KiB buckets, 256 MiB of random data behind it.
    const cache = sparse(join(dir, 'cache.img'), 1024 * MiB);
    const backing = join(dir, 'backing.img');
    sh('dd', ['if=/dev/urandom', `of=${backing}`, 'bs=1M', 'count=264', 'status=none']);
    sh(UBCACHE, ['make', '-b', '64k', '-C', cache, '-B', backing]);
    const set = join(dir, 'serve.sock');
    const region = 256 * MiB;
    const bcache0 = `nbd+unix:///bcache0?socket=${set}`;
    const serve = daemon([
      'serve',
      '--socket',
      set,
      '--set',
      'bcache0.cache_mode=writeback',
      '--set',
      'bcache0.sequential_cutoff=0',
      cache,
      backing,
    ]);
    const [hit, wb] = await withProcess(serve, set, 'ubcache serve', () => {
      process.stderr.write('bench: warming bcache0 (every block read once) ...\n');
      // One connection, few requests in flight: fills beyond the engine's
      // bound on fill memory are skipped (as bcache skips them under
      // pressure), so a wide copy would leave holes. The second pass fills
      // whatever the first could not.
      for (let pass = 0; pass < 2; pass++) sh('nbdcopy', ['-C', '1', '-R', '4', bcache0, 'null:']);
      const h = record('ubcache serve (hits)', randread, runFio(bcache0, randread, runtime, region));
      const w = record('ubcache serve (writeback)', randwrite, runFio(bcache0, randwrite, runtime, region));
      if (serve.child.pid !== undefined) rss = peakRssMiB(serve.child.pid);
      return [h, w];
    });
    const exp = join(dir, 'export.sock');
    const cacheUri = `nbd+unix:///cache?socket=${exp}`;
    const exportCache = daemon(['export', '--socket', exp, '--name', 'cache', cache]);
    const [refRead, refWrite] = await withProcess(exportCache, exp, 'ubcache export of the cache file', () => [
      record('ubcache export cache.img', randread, runFio(cacheUri, randread, runtime, region)),
      record('ubcache export cache.img', randwrite, runFio(cacheUri, randwrite, runtime, region)),
    ]);

    // --- zipf over a slow backing device: 1 GiB behind 5 ms reads, a 256 MiB cache.
    const slowImg = sparse(join(dir, 'slow.img'), 1024 * MiB);
    const cache2 = sparse(join(dir, 'cache2.img'), 256 * MiB);
    sh(UBCACHE, ['make', '-b', '64k', '-C', cache2, '-B', slowImg]);
    const slowSock = join(dir, 'slow.sock');
    const nbdkitSlow = spawn(
      'nbdkit',
      ['--foreground', '--exit-with-parent', '-U', slowSock, '--filter=delay', 'file', slowImg, 'rdelay=5ms'],
      { stdio: ['ignore', 'ignore', 'inherit'] },
    );
    const fuseDir = join(dir, 'fuse');
    mkdirSync(fuseDir);
    let zipfUbcache: Result | undefined;
    try {
      await waitForSocket(slowSock, nbdkitSlow, 15_000);
      const pid = join(dir, 'nbdfuse.pid');
      const fuse = spawn('nbdfuse', ['-P', pid, join(fuseDir, 'slow'), `nbd+unix:///?socket=${slowSock}`], {
        stdio: ['ignore', 'ignore', 'inherit'],
      });
      try {
        for (let i = 0; i < 300 && !existsSync(pid); i++) await new Promise((r) => setTimeout(r, 20));
        if (!existsSync(pid)) throw new Error('nbdfuse did not start');
        const z = join(dir, 'zipf.sock');
        const serveSlow = daemon(['serve', '--socket', z, cache2, join(fuseDir, 'slow')]);
        zipfUbcache = await withProcess(serveSlow, z, 'ubcache serve over the slow device', () =>
          record('ubcache serve', zipf, runFio(`nbd+unix:///bcache0?socket=${z}`, zipf, runtime * 2, 1000 * MiB)),
        );
      } finally {
        spawnSync('fusermount3', ['-u', fuseDir]);
        await stopChild(fuse);
      }
    } finally {
      await stopChild(nbdkitSlow);
    }
    const kc = join(dir, 'nbdkit-cache.sock');
    const nbdkitCache = spawn(
      'nbdkit',
      [
        '--foreground',
        '--exit-with-parent',
        '-U',
        kc,
        '--filter=cache',
        '--filter=delay',
        'file',
        slowImg,
        'rdelay=5ms',
        'cache-on-read=true',
        'cache-max-size=256M',
      ],
      { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, TMPDIR: dir } },
    );
    let nbdkitErr = '';
    nbdkitCache.stderr.on('data', (d: Buffer) => (nbdkitErr += d.toString()));
    const zipfNbdkit = await withProcess(
      { child: nbdkitCache, stderr: () => nbdkitErr },
      kc,
      'nbdkit cache filter',
      () => record('nbdkit cache filter', zipf, runFio(`nbd+unix:///?socket=${kc}`, zipf, runtime * 2, 1000 * MiB)),
    );

    const ratio = (a: Result | undefined, b: Result | undefined): string =>
      a && b ? `${(a.iops / b.iops).toFixed(2)}×` : 'n/a';
    const lines = [
      '| target | ubcache serve | reference | ratio | goal |',
      '|---|---:|---:|---:|---:|',
      `| hit path: 4k randread QD32, working set cached | ${hit.iops.toFixed(0)} IOPS | ${refRead.iops.toFixed(0)} IOPS (ubcache export of the cache file) | ${ratio(hit, refRead)} | ≥ 0.7× |`,
      `| writeback: 4k randwrite QD32 | ${wb.iops.toFixed(0)} IOPS | ${refWrite.iops.toFixed(0)} IOPS (ubcache export of the cache file) | ${ratio(wb, refWrite)} | ≥ 0.7× |`,
      `| Zipf(1.2) 4k randread QD32 over 5 ms reads, cache = ¼ device | ${zipfUbcache.iops.toFixed(0)} IOPS | ${zipfNbdkit.iops.toFixed(0)} IOPS (nbdkit cache filter) | ${ratio(zipfUbcache, zipfNbdkit)} | ≥ 2× |`,
      `| peak RSS, 1 GiB cache in 64 KiB buckets | ${rss.toFixed(0)} MiB | | | < 300 MiB |`,
    ];
    return { lines, json: { results, servePeakRssMiB: rss } };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}
