// The cache suite of `npm run bench`: `ubcache serve` (the bcache engine)
// measured against what it should be compared with, in one run:
//
//   hit        4k random reads, QD32, over a working set that is entirely in
//              the cache (read through until a pass misses nothing), against
//              `ubcache export` of the cache file alone
//              (the same NBD server with no btree in front): what the cache
//              lookups cost. Goal >= 0.9x.
//   gc         the same reads twice more, back to back: plain, then while a
//              loop triggers GC every 0.5 s (internal/trigger_gc on the
//              control socket): p99.9 latency with GC over p99.9 without,
//              and IOPS both ways. Goal <= 1.5x.
//   writeback  4k random writes, QD32, writeback mode, against the same
//              export of the cache file: what dirty keys and the journal
//              cost. Goal >= 0.8x.
//   memory     peak resident memory of `ubcache serve` with a 1 GiB cache in
//              64 KiB buckets after those runs. Goal < 300 MiB.
//
// The Zipf row over a slow device moved to the slow suite (slow.ts).
// Ratios from one run on one machine; never a pass/fail test.

import { join } from 'node:path';
import {
  controlRequest,
  ctl,
  fio,
  fmtIops,
  hitCounters,
  ioEngineOf,
  MiB,
  peakRssMiB,
  progress,
  setUuid,
  sh,
  sleep,
  sparse,
  ubcache,
  ubcacheBin,
  withProcess,
  type FioResult,
  type Row,
  type Workload,
} from './common.ts';
import type { SuiteResult } from './slow.ts';

const randread: Workload = { name: '4k-randread-qd32', rw: 'randread', bs: '4k', iodepth: 32, numjobs: 1 };
const randwrite: Workload = { name: '4k-randwrite-qd32', rw: 'randwrite', bs: '4k', iodepth: 32, numjobs: 1 };
const PERCENTILES = [50, 99, 99.9];

export interface CacheSuiteOptions {
  dir: string;
  runtime: number;
  /** Milliseconds between GC triggers in the gc run. */
  gcEveryMs: number;
  want: (id: string) => boolean;
}

/**
 * Trigger GC every `everyMs` until `stop` is set: the write `ubcache ctl write
 * /sys/fs/bcache/<uuid>/internal/trigger_gc 1` does, sent on the control
 * socket directly (see controlRequest for why not a ctl process each time).
 */
async function gcLoop(control: string, path: string, everyMs: number, stop: { stopped: boolean }): Promise<number> {
  let n = 0;
  while (!stop.stopped) {
    await controlRequest(control, 'PUT', path, '1');
    n++;
    await sleep(everyMs);
  }
  return n;
}

const pct = (r: FioResult, p: string): number => r.percentiles[p] ?? NaN;

/** The hit ratio of the reads between two readings of bcache0's counters. */
function hitRatioNote(a: { hits: number; misses: number }, b: { hits: number; misses: number }): string {
  const hits = b.hits - a.hits;
  const n = hits + b.misses - a.misses;
  return n > 0 ? `hit ratio ${((hits * 100) / n).toFixed(1)} %` : 'no reads counted';
}

export async function cacheSuite(o: CacheSuiteOptions): Promise<SuiteResult> {
  const { runtime, dir } = o;
  const wantHit = o.want('hit');
  const wantGc = o.want('gc');
  const wantWb = o.want('writeback');
  const rows: Row[] = [];
  const lines: string[] = [];

  // 1 GiB cache in 64 KiB buckets, 256 MiB of random data behind it.
  const cache = sparse(join(dir, 'cache.img'), 1024 * MiB);
  const backing = join(dir, 'backing.img');
  sh('dd', ['if=/dev/urandom', `of=${backing}`, 'bs=1M', 'count=264', 'status=none']);
  sh(ubcacheBin(), ['make', '-b', '64k', '-C', cache, '-B', backing]);
  const set = join(dir, 'serve.sock');
  const control = join(dir, 'serve-control.sock');
  const region = 256 * MiB;
  const bcache0 = `nbd+unix:///bcache0?socket=${set}`;
  const serve = ubcache([
    'serve',
    '--socket',
    set,
    '--control',
    control,
    '--set',
    'bcache0.cache_mode=writeback',
    '--set',
    'bcache0.sequential_cutoff=0',
    cache,
    backing,
  ]);
  const s = await withProcess(serve, set, 'ubcache serve', async () => {
    let hit: FioResult | undefined;
    let gc: { r: FioResult; plain: FioResult; triggers: number; note: string } | undefined;
    let wb: FioResult | undefined;
    let hitNote = '';
    let plainNote = '';
    if (wantHit || wantGc) {
      // Warm until a whole pass over the device misses nothing, so the
      // timed reads below are hits (their own hit ratio is printed too).
      // One connection, few requests in flight: fills beyond the engine's
      // bound on fill memory are skipped (as bcache skips them under
      // pressure), so a wide copy would leave holes that later passes fill.
      let pass = 0;
      let misses = -1;
      while (misses !== 0 && pass < 12) {
        const a = await hitCounters(control);
        sh('nbdcopy', ['-C', '1', '-R', '4', bcache0, 'null:']);
        misses = (await hitCounters(control)).misses - a.misses;
        progress(`warming bcache0: pass ${++pass} over the device, ${misses} misses`);
      }
      const warmNote = `warm-up: ${pass} nbdcopy passes, ${misses} misses in the last`;
      // The last fills' journal and btree writes finish before anything is timed.
      await sleep(2000);
      progress(`hit path: ubcache serve 4k randread QD32 (${runtime} s) ...`);
      const before = await hitCounters(control);
      hit = await fio(bcache0, randread, runtime, region, { percentiles: PERCENTILES });
      hitNote = `${hitRatioNote(before, await hitCounters(control))}; ${warmNote}; file I/O engine ${await ioEngineOf(control)}`;
      progress(`hit path: ${fmtIops(hit.iops)} IOPS, p99.9 ${pct(hit, '99.9').toFixed(0)} µs, ${hitNote}`);
    }
    if (wantGc) {
      const uuid = await setUuid(control);
      const path = `/sys/fs/bcache/${uuid}/internal/trigger_gc`;
      // The run without GC right before the one with it, so both see the same
      // cache state and as nearly as possible the same machine.
      progress(`gc: the same reads without GC (${runtime} s) ...`);
      const b0 = await hitCounters(control);
      const plain = await fio(bcache0, randread, runtime, region, { percentiles: PERCENTILES });
      plainNote = hitRatioNote(b0, await hitCounters(control));
      // The first trigger as a user sends it, so a renamed file fails here loudly.
      await ctl(control, 'write', path, '1');
      progress(`gc: the same reads with GC triggered every ${o.gcEveryMs} ms (${runtime} s) ...`);
      const stop = { stopped: false };
      const loop = gcLoop(control, path, o.gcEveryMs, stop);
      try {
        const b1 = await hitCounters(control);
        const r = await fio(bcache0, randread, runtime, region, { percentiles: PERCENTILES });
        const note = hitRatioNote(b1, await hitCounters(control));
        stop.stopped = true;
        gc = { r, plain, triggers: await loop, note };
      } finally {
        stop.stopped = true;
        await loop.catch(() => undefined);
      }
      progress(
        `gc: ${fmtIops(gc.r.iops)} IOPS, p99.9 ${pct(gc.r, '99.9').toFixed(0)} µs with GC (${gc.triggers} triggers); ${fmtIops(plain.iops)} IOPS, p99.9 ${pct(plain, '99.9').toFixed(0)} µs without`,
      );
    }
    if (wantWb) {
      progress(`writeback: ubcache serve 4k randwrite QD32 (${runtime} s) ...`);
      wb = await fio(bcache0, randwrite, runtime, region);
      progress(`writeback: ${fmtIops(wb.iops)} IOPS`);
    }
    return { hit, hitNote, gc, plainNote, wb, rss: peakRssMiB(serve.child.pid) };
  });

  const exp = join(dir, 'export.sock');
  const cacheUri = `nbd+unix:///cache?socket=${exp}`;
  const exportCache = ubcache(['export', '--socket', exp, '--name', 'cache', cache]);
  const ref = await withProcess(exportCache, exp, 'ubcache export of the cache file', async () => {
    let read: FioResult | undefined;
    let write: FioResult | undefined;
    if (wantHit) {
      progress(`reference: ubcache export of the cache file, 4k randread QD32 (${runtime} s) ...`);
      read = await fio(cacheUri, randread, runtime, region);
    }
    if (wantWb) {
      progress(`reference: ubcache export of the cache file, 4k randwrite QD32 (${runtime} s) ...`);
      write = await fio(cacheUri, randwrite, runtime, region);
    }
    return { read, write };
  });

  const ref1 = '(ubcache export of the cache file)';
  if (s.wb && ref.write) {
    rows.push({
      id: 'writeback',
      what: 'writeback: 4k randwrite QD32 through ubcache serve (writeback mode)',
      value: `${fmtIops(s.wb.iops)} IOPS`,
      reference: `${fmtIops(ref.write.iops)} IOPS ${ref1}`,
      ratio: s.wb.iops / ref.write.iops,
      goal: { of: 'ratio', op: '>=', limit: 0.8, unit: '×' },
    });
  }
  if (s.hit && ref.read) {
    rows.push({
      id: 'hit',
      what: 'hit path: 4k randread QD32, working set cached',
      value: `${fmtIops(s.hit.iops)} IOPS`,
      reference: `${fmtIops(ref.read.iops)} IOPS ${ref1}`,
      ratio: s.hit.iops / ref.read.iops,
      goal: { of: 'ratio', op: '>=', limit: 0.9, unit: '×' },
      notes: s.hitNote,
    });
  }
  if (s.gc) {
    const withGc = pct(s.gc.r, '99.9');
    const without = pct(s.gc.plain, '99.9');
    rows.push({
      id: 'gc',
      what: `p99.9 latency of cached 4k reads QD32 with GC triggered every ${o.gcEveryMs / 1000} s`,
      value: `${withGc.toFixed(0)} µs`,
      reference: `${without.toFixed(0)} µs (same reads without GC, run just before)`,
      ratio: withGc / without,
      goal: { of: 'ratio', op: '<=', limit: 1.5, unit: '×' },
      notes: `IOPS ${fmtIops(s.gc.r.iops)} with GC vs ${fmtIops(s.gc.plain.iops)} without (${(s.gc.r.iops / s.gc.plain.iops).toFixed(2)}×); p99 ${pct(s.gc.r, '99').toFixed(0)} vs ${pct(s.gc.plain, '99').toFixed(0)} µs; ${s.gc.triggers} triggers accepted; ${s.gc.note} with GC, ${s.plainNote} without`,
    });
  }
  if (s.hit ?? s.wb) {
    rows.push({
      id: 'memory',
      what: 'peak RSS of ubcache serve, 1 GiB cache in 64 KiB buckets, after the runs above',
      value: `${s.rss.toFixed(0)} MiB`,
      reference: '',
      ratio: undefined,
      measured: s.rss,
      goal: { of: 'value', op: '<', limit: 300, unit: 'MiB' },
    });
  }
  const results = {
    hit: s.hit,
    gc: s.gc,
    writeback: s.wb,
    exportRead: ref.read,
    exportWrite: ref.write,
    servePeakRssMiB: s.rss,
  };
  return { rows, lines, json: results };
}
