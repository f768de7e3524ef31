// The ceph suite of `npm run bench`: ubcache serve in front of a Ceph RBD
// image against the same image used directly, in one run.
//
// The cluster is the tests' fixture (test/fixtures/ceph): one mon and one
// OSD (bluestore on a sparse file, 128 MiB fixed cache, pool size 1) on this
// machine, the image served by qemu-nbd (cache=none) on a unix socket. fio's
// nbd engine reads and writes that socket directly for the reference;
// ubcache reaches it by its nbd+unix:// URI (make -B and serve take it).
// The image (512 MiB) is filled with random data first, so reads hit real
// RADOS objects (a never-written object reads back as zeroes at once).
//
//   ceph-randwrite-hot
//                   4k random writes QD32 for --runtime s over the image's
//                   first 128 MiB (a write set that fits the cache, what a
//                   writeback cache is for) through serve in writeback mode
//                   (256 MiB cache) against fio writing the same range of
//                   the image directly. Goal >= 4x.
//   ceph-randwrite  the same over the whole 512 MiB image, twice the cache:
//                   sustained writes past the cache's dirty threshold, which
//                   it absorbs only as fast as writeback drains them into
//                   RBD (docs/performance.md: a ceiling near 2.2x on this
//                   fixture). No goal; shown so nobody reads the hot row as
//                   a sustained rate.
//   ceph-randread   4k uniform random reads QD32 for --runtime s through
//                   serve (writethrough, after the Zipf run) against the
//                   image read directly: the miss path's cost, no goal.
//   ceph-zipf       4k random reads, Zipf(1.2), QD32, one continuous run
//                   from a cold cache (--zipf-runtime s); warm = its last
//                   third, against the same run on the image directly.
//                   Goal >= 4x warm.
//
// Also reported: how long the cluster took to start and each daemon's RSS.
// Ratios from one run on one machine; never a pass/fail test.

import { join } from 'node:path';
import { CephCluster, rbdUri } from '../test/fixtures/ceph/cluster.ts';
import {
  fio,
  fmtIops,
  hitCounters,
  hitStats,
  MiB,
  peakRssMiB,
  progress,
  run,
  sparse,
  ubcache,
  ubcacheBin,
  withProcess,
  type FioResult,
  type Row,
  type Workload,
} from './common.ts';
import type { SuiteResult } from './slow.ts';

const SPAN = 512 * MiB;
const CACHE = 256 * MiB;
/** The hot write set of ceph-randwrite-hot: half the cache, under its 70 % dirty threshold. */
const HOT_SPAN = 128 * MiB;
/** bcache's data offset on a backing device: the cached device is 8 KiB smaller than the image. */
const DATA_OFFSET = 8192;

const randread: Workload = { name: '4k-randread-qd32', rw: 'randread', bs: '4k', iodepth: 32, numjobs: 1 };
const randwrite: Workload = { name: '4k-randwrite-qd32', rw: 'randwrite', bs: '4k', iodepth: 32, numjobs: 1 };
const zipf: Workload = { ...randread, name: '4k-zipf1.2-randread-qd32', extra: ['--random_distribution=zipf:1.2'] };

export interface CephSuiteOptions {
  dir: string;
  outDir: string;
  /** Seconds of the plain fio runs. */
  runtime: number;
  /** Seconds of each continuous Zipf run; cold and warm are its first and last thirds. */
  zipfRuntime: number;
  want: (id: string) => boolean;
}

const mean = (xs: number[]): number => (xs.length === 0 ? NaN : xs.reduce((a, b) => a + b, 0) / xs.length);

export async function cephSuite(o: CephSuiteOptions): Promise<SuiteResult> {
  const { dir } = o;
  const T = o.zipfRuntime;
  const cold: [number, number] = [0, Math.round(T / 3)];
  const warm: [number, number] = [Math.round((2 * T) / 3), T];
  const rows: Row[] = [];
  const lines: string[] = [];
  const json: Record<string, unknown> = { span: SPAN, cache: CACHE, cold, warm };

  progress('ceph suite: starting a single-node cluster (mon + OSD on a sparse file) ...');
  const cluster = await CephCluster.start(join(dir, 'cluster'));
  try {
    json['started'] = cluster.started;
    json['startSeconds'] = cluster.startSeconds;
    progress(`ceph: ${cluster.started}`);
    await cluster.image('bench', `${SPAN / MiB}M`);
    const sock = await cluster.nbd('bench');
    const rbd = rbdUri(sock);
    progress(`ceph: filling the ${SPAN / MiB} MiB image with random data ...`);
    const fill = await run('sh', ['-c', `head -c ${SPAN} /dev/urandom | nbdcopy - '${rbd}'`]);
    if (fill.status !== 0) throw new Error(`filling the image failed: ${fill.stderr}`);

    // --- the image alone, read and written by fio directly.
    const direct: Record<string, FioResult> = {};
    const directRun = async (
      key: string,
      w: Workload,
      secs: number,
      log?: string,
      size = SPAN - DATA_OFFSET,
    ): Promise<void> => {
      progress(`ceph: RBD directly, ${w.name} over ${Math.round(size / MiB)} MiB (${secs} s) ...`);
      direct[key] = await fio(rbd, w, secs, size, {
        ...(log === undefined ? {} : { rampTime: 0, iopsLog: join(o.outDir, log) }),
      });
      progress(`ceph: RBD directly, ${w.name}: ${fmtIops(direct[key].iops)} IOPS`);
    };
    if (o.want('ceph-zipf')) await directRun('zipf', zipf, T, 'ceph-zipf-direct');
    if (o.want('ceph-randread')) await directRun('randread', randread, o.runtime);
    if (o.want('ceph-randwrite')) await directRun('randwrite', randwrite, o.runtime);
    if (o.want('ceph-randwrite-hot')) await directRun('randwrite-hot', randwrite, o.runtime, undefined, HOT_SPAN);
    const rss0 = await cluster.rssMiB();

    // --- ubcache serve in front of the same image, each run on a cache of its
    // own: the writes must not start on a cache the reads filled (past
    // cutoff_writeback_sync every write would go to RBD as it came).
    const through: Record<string, FioResult> = {};
    const notes: Record<string, string> = {};
    const serve = async (tag: string, sets: string[], body: (uri: string, control: string) => Promise<void>) => {
      const cache = sparse(join(dir, `cache-${tag}.img`), CACHE);
      const made = await run(ubcacheBin(), ['make', '--wipe-bcache', '-b', '64k', '-C', cache, '-B', rbd]);
      if (made.status !== 0) throw new Error(`ubcache make -B ${rbd} failed: ${made.stderr.trim()}`);
      const z = join(dir, `${tag}.sock`);
      const control = join(dir, `${tag}-control.sock`);
      const p = ubcache([
        'serve',
        '--socket',
        z,
        '--control',
        control,
        ...sets.flatMap((x) => ['--set', x]),
        cache,
        rbd,
      ]);
      await withProcess(p, z, `ubcache serve (${tag}) over RBD`, async () => {
        await body(`nbd+unix:///bcache0?socket=${z}`, control);
        notes[tag] = `peak RSS ${peakRssMiB(p.child.pid).toFixed(0)} MiB`;
      });
    };
    if (o.want('ceph-zipf') || o.want('ceph-randread')) {
      await serve('reads', ['bcache0.cache_mode=writethrough', 'bcache0.sequential_cutoff=0'], async (uri, control) => {
        if (o.want('ceph-zipf')) {
          progress(`ceph: ubcache serve, ${zipf.name} from a cold cache (${T} s) ...`);
          // Hit counters at the start of the warm window, so the window gets its own hit ratio.
          const atWarm = new Promise<{ hits: number; misses: number } | undefined>((resolve) =>
            setTimeout(() => {
              hitCounters(control).then(resolve, () => {
                resolve(undefined);
              });
            }, warm[0] * 1000),
          );
          through['zipf'] = await fio(uri, zipf, T, SPAN - DATA_OFFSET, {
            rampTime: 0,
            iopsLog: join(o.outDir, 'ceph-zipf-ubcache'),
          });
          const w = await atWarm;
          const end = await hitStats(control);
          const n = w ? end.hits - w.hits + (end.misses - w.misses) : 0;
          notes['zipf'] =
            `hit ratio in the warm window ${w && n > 0 ? (((end.hits - w.hits) * 100) / n).toFixed(1) : 'n/a'} %`;
        }
        if (o.want('ceph-randread')) {
          progress(`ceph: ubcache serve, ${randread.name} (${o.runtime} s) ...`);
          through['randread'] = await fio(uri, randread, o.runtime, SPAN - DATA_OFFSET);
          notes['randread'] = `hit ratio ${(await hitStats(control)).ratio} % over the whole serve`;
        }
      });
    }
    // Each write run on a cache of its own, new.
    const writes = async (key: string, size: number): Promise<void> => {
      await serve(
        `writes-${key}`,
        ['bcache0.cache_mode=writeback', 'bcache0.sequential_cutoff=0'],
        async (uri, control) => {
          progress(
            `ceph: ubcache serve writeback, ${randwrite.name} over ${Math.round(size / MiB)} MiB (${o.runtime} s) ...`,
          );
          through[key] = await fio(uri, randwrite, o.runtime, size);
          const dirty = await run(ubcacheBin(), [
            'ctl',
            '--control',
            control,
            'cat',
            'block/bcache0/bcache/dirty_data',
          ]);
          notes[key] = `dirty_data ${dirty.stdout.trim()} at the end`;
        },
      );
    };
    if (o.want('ceph-randwrite')) await writes('randwrite', SPAN - DATA_OFFSET);
    if (o.want('ceph-randwrite-hot')) await writes('randwrite-hot', HOT_SPAN);
    const rss1 = await cluster.rssMiB();
    json['rssMiB'] = { afterDirect: rss0, atEnd: rss1 };

    // --- rows.
    const win = (r: FioResult | undefined, [a, b]: [number, number]): number => mean((r?.series ?? []).slice(a, b));
    const fmtRss = (r: Record<string, number>): string =>
      Object.entries(r)
        .map(([k, v]) => `${k} ${v.toFixed(0)} MiB`)
        .join(', ');
    const base = `RBD image on a 1-OSD local cluster via qemu-nbd, ${SPAN / MiB} MiB span, ${CACHE / MiB} MiB cache`;
    const pair = (id: string, key: string, what: string, value: number, ref: number, limit?: number): void => {
      rows.push({
        id,
        what: `${what}, ${base}`,
        value: `${fmtIops(value)} IOPS`,
        reference: `${fmtIops(ref)} IOPS (RBD read/written directly by fio)`,
        ratio: value / ref,
        ...(limit === undefined ? {} : { goal: { of: 'ratio', op: '>=', limit, unit: '×' } as const }),
        notes: [notes[key], notes[key.startsWith('randwrite') ? `writes-${key}` : 'reads']]
          .filter((x) => x !== undefined)
          .join('; '),
      });
    };
    const d = (k: string): FioResult | undefined => direct[k];
    const u = (k: string): FioResult | undefined => through[k];
    const zd = d('zipf');
    const zu = u('zipf');
    if (zd && zu) {
      pair(
        'ceph-zipf',
        'zipf',
        `Zipf(1.2) 4k randread QD32, cold (${cold[0]}–${cold[1]} s)`,
        win(zu, cold),
        win(zd, cold),
      );
      pair(
        'ceph-zipf',
        'zipf',
        `Zipf(1.2) 4k randread QD32, warm (${warm[0]}–${warm[1]} s of one run)`,
        win(zu, warm),
        win(zd, warm),
        4,
      );
    }
    const rd = d('randread');
    const ru = u('randread');
    if (rd && ru)
      pair('ceph-randread', 'randread', 'writethrough 4k uniform randread QD32 (mostly misses)', ru.iops, rd.iops);
    const wd = d('randwrite');
    const wu = u('randwrite');
    const hd = d('randwrite-hot');
    const hu = u('randwrite-hot');
    if (hd && hu) {
      pair(
        'ceph-randwrite-hot',
        'randwrite-hot',
        `writeback 4k randwrite QD32 over the first ${HOT_SPAN / MiB} MiB (a write set that fits the cache), ${o.runtime} s`,
        hu.iops,
        hd.iops,
        4,
      );
    }
    if (wd && wu) {
      pair(
        'ceph-randwrite',
        'randwrite',
        `writeback 4k randwrite QD32 over all of it (twice the cache: sustained, past the dirty threshold), ${o.runtime} s`,
        wu.iops,
        wd.iops,
      );
    }

    lines.push(
      `The cluster: ${cluster.started}; RSS after the direct runs: ${fmtRss(rss0)}; at the end: ${fmtRss(rss1)}.`,
      '',
      '| workload | RBD directly | through ubcache serve | p99 µs direct | p99 µs ubcache |',
      '|---|---:|---:|---:|---:|',
      ...(['zipf', 'randread', 'randwrite', 'randwrite-hot'] as const).flatMap((k) => {
        const a = d(k);
        const b = u(k);
        return a && b
          ? [`| ${k} | ${fmtIops(a.iops)} | ${fmtIops(b.iops)} | ${a.p99us.toFixed(0)} | ${b.p99us.toFixed(0)} |`]
          : [];
      }),
      '',
    );
    json['direct'] = direct;
    json['ubcache'] = through;
    json['notes'] = notes;
  } finally {
    await cluster.stop();
  }
  return { rows, lines, json };
}
