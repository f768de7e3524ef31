// The slow suite of `npm run bench`: caches in front of a slow device, each
// against what a user would otherwise pick, in one run.
//
// The slow device is nbdkit's file plugin behind its delay filter (rdelay and
// wdelay 5 ms) over a 1 GiB file on a unix socket, with --threads 256
// (--slow-threads): a distributed store such as Ceph takes many requests at
// once, and ubcache may have more than 32 in flight (misses, readahead, and
// up to 256 writeback copies when the cache is under pressure), each of which
// should wait 5 ms by itself, not in nbdkit's queue. fio's direct reference
// runs at QD32, so it never has more than 32 requests in flight and the
// thread count does not change its figure. Measured once (2026-12-06, load
// about 3, two runs of each, alternating): the direct Zipf run (30 s) gave
// 5226 and 5943 IOPS with 64 threads, 5384 and 5837 with 256; fio's direct
// 4k randwrite QD32 (15 s) 5782 and 5936 with 64, 5837 and 5892 with 256.
// Both sit under the QD32 ceiling of 6400 IOPS at 5 ms either way.
//
// The file is filled with random data, not left sparse: qemu's NBD client
// asks for block status and serves holes as zeroes without reading them, so
// over a sparse file qemu's copy-on-read would never touch the device (and
// would copy nothing).
//
// ubcache reaches the device by its nbd+unix:// URI (the default; make -B
// writes the backing superblock over NBD) or through nbdfuse (backing.ts).
//
//   zipf       4k random reads, Zipf(1.2), QD32, over 1000 MiB, one
//              continuous run per system from a cold cache, IOPS logged once
//              a second: cold = the first third (0-30 s of 90), warm = the
//              last third (60-90 s). Systems: ubcache serve (256 MiB cache,
//              64 KiB buckets, writethrough, readahead 0), a qemu
//              copy-on-read qcow2 overlay over the slow export (qemu-nbd),
//              nbdkit's cache filter (cache-on-read, 256 MiB), and the slow
//              device read directly.
//              fio's random generator is seeded alike, so every system sees
//              the same offsets in the same order.
//   zipf-ra    the same run through ubcache serve with bcache0.readahead=64k
//              (a miss is rounded up to 64 KiB, below 90 % of the cache in
//              use), against ubcache serve without readahead: what readahead
//              gains or costs on random reads. With --only zipf-ra alone, the
//              peers are left out and only the two ubcache runs are made.
//   slow-writeback
//              4k random writes, QD32, over 1000 MiB for 15 s through
//              ubcache serve in writeback mode (256 MiB cache) against fio
//              writing the slow device directly.
//   slow-writethrough
//              the same in writethrough mode (goal: never slower than the
//              device alone, >= 0.9x).
//   slow-seqread
//              1 MiB sequential reads, QD8, through serve (bypassed past
//              sequential_cutoff) against fio reading the device directly.
//
// Ratios from one run on one machine; never a pass/fail test.

import { statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { openBacking, slowUri, type BackingMode } from './backing.ts';
import {
  controlRequest,
  ctl,
  fio,
  fmtIops,
  hitCounters,
  hitStats,
  ioEngineOf,
  metricOf,
  MiB,
  nbdkit,
  peakRssMiB,
  progress,
  run,
  sh,
  sparse,
  startProc,
  ubcache,
  ubcacheBin,
  withProcess,
  type FioResult,
  type HitStats,
  type Proc,
  type Row,
  type Workload,
} from './common.ts';
import { lineChart } from './svg.ts';

const SPAN = 1000 * MiB;
const DELAY = ['rdelay=5ms', 'wdelay=5ms'];

const zipf: Workload = {
  name: '4k-zipf1.2-randread-qd32',
  rw: 'randread',
  bs: '4k',
  iodepth: 32,
  numjobs: 1,
  extra: ['--random_distribution=zipf:1.2'],
};
const randwrite: Workload = { name: '4k-randwrite-qd32', rw: 'randwrite', bs: '4k', iodepth: 32, numjobs: 1 };
const seqread: Workload = { name: '1m-seqread-qd8', rw: 'read', bs: '1m', iodepth: 8, numjobs: 1 };

export interface SlowSuiteOptions {
  dir: string;
  outDir: string;
  /** Where the warm-up chart goes (also copied to outDir). */
  chart: string;
  /** Seconds of the slow-writeback runs. */
  runtime: number;
  /** Seconds of each continuous Zipf run; cold and warm are its first and last thirds. */
  zipfRuntime: number;
  backing: BackingMode;
  backingWhy: string;
  /** nbdkit --threads of every slow device (and of the nbdkit cache filter over it). */
  threads: number;
  /** Milliseconds between drops of the FUSE file's page cache (fuse backing only; 0 never). */
  dropMs: number;
  want: (id: string) => boolean;
  /** Which Zipf systems run (ubcache, ubcache-ra, qemu-cor, nbdkit-cache, slow); all when undefined. */
  systems?: string[];
}

interface ZipfRun {
  key: string;
  label: string;
  fio: FioResult;
  series: number[];
  cold: number;
  warm: number;
  notes: string;
  extra: Record<string, unknown>;
}

export interface SuiteResult {
  rows: Row[];
  lines: string[];
  json: Record<string, unknown>;
}

/** The readahead of the zipf-ra run (bcache0.readahead). */
export const READAHEAD = '64k';

/**
 * Format a 256 MiB cache and the slow device as its backing device, through
 * the path serve will use: `make -B` on the nbd+unix:// URI itself (the
 * superblock goes over NBD), or on the FUSE file.
 */
async function makeOverSlow(cache: string, spec: string): Promise<void> {
  const made = await run(ubcacheBin(), ['make', '-b', '64k', '-C', cache, '-B', spec]);
  if (made.status !== 0) throw new Error(`ubcache make -B ${spec} failed: ${made.stderr.trim()}`);
}

/**
 * Zero the first MiB of the slow device's file again: what the device looked
 * like before a `make -B` put a bcache superblock on it, which the next
 * make -B would refuse to overwrite (and qemu and nbdkit then read the same
 * bytes as the first ubcache run did).
 */
function clearHead(file: string): void {
  sh('dd', ['if=/dev/zero', `of=${file}`, 'bs=1M', 'count=1', 'conv=notrunc', 'status=none']);
}

function mean(xs: number[]): number {
  return xs.length === 0 ? NaN : xs.reduce((a, b) => a + b, 0) / xs.length;
}

/** Mean IOPS over the seconds [from, to) of a per-second series. */
function windowMean(series: number[], [from, to]: [number, number]): number {
  return mean(series.slice(from, to));
}

function ratioOf(hits: number, misses: number): string {
  const n = hits + misses;
  return n === 0 ? 'n/a' : `${((hits * 100) / n).toFixed(1)} %`;
}

/** bcache0's hit, miss and readahead counters, cheap enough to read during a run. */
interface Counters {
  hits: number;
  misses: number;
  readaheads: number;
}

async function counters(control: string): Promise<Counters> {
  const [hm, readaheads] = await Promise.all([
    hitCounters(control),
    metricOf(control, 'ubcache_cache_readaheads_total'),
  ]);
  return { ...hm, readaheads };
}

export async function slowSuite(o: SlowSuiteOptions): Promise<SuiteResult> {
  const { dir } = o;
  const T = o.zipfRuntime;
  const cold: [number, number] = [0, Math.round(T / 3)];
  const warm: [number, number] = [Math.round((2 * T) / 3), T];
  const rows: Row[] = [];
  const lines: string[] = [];
  const json: Record<string, unknown> = {
    backing: o.backing,
    backingWhy: o.backingWhy,
    nbdkitThreads: o.threads,
    cold,
    warm,
    dropMs: o.dropMs,
  };
  const slowDevice = (socket: string, file: string): Proc =>
    nbdkit(socket, ['--filter=delay', 'file', file, ...DELAY], { threads: o.threads });
  progress(
    `slow suite: ubcache reaches the slow device through ${o.backing} (${o.backingWhy}); nbdkit --threads ${o.threads}`,
  );

  const wantZipf = o.want('zipf');
  const wantRa = o.want('zipf-ra');
  if (wantZipf || wantRa) {
    const slowImg = join(dir, 'slow.img');
    progress('filling the 1 GiB slow device with random data ...');
    sh('dd', ['if=/dev/urandom', `of=${slowImg}`, 'bs=1M', 'count=1024', 'status=none']);
    // Zeroes at the start, so no chance pattern there looks like a signature
    // that ubcache make would refuse to overwrite.
    clearHead(slowImg);

    const runs: ZipfRun[] = [];
    const finish = (key: string, label: string, r: FioResult, notes: string, extra: Record<string, unknown>): void => {
      const series = r.series ?? [];
      const z: ZipfRun = {
        key,
        label,
        fio: r,
        series,
        cold: windowMean(series, cold),
        warm: windowMean(series, warm),
        notes,
        extra,
      };
      runs.push(z);
      progress(`${label}: cold ${fmtIops(z.cold)}, warm ${fmtIops(z.warm)} IOPS`);
    };
    const zipfFio = (uri: string, key: string): Promise<FioResult> =>
      fio(uri, zipf, T, SPAN, { rampTime: 0, iopsLog: join(o.outDir, `zipf-${key}`), percentiles: [50, 99, 99.9] });

    // --only zipf-ra alone: the two ubcache runs, not the peers.
    const sys = (key: string): boolean =>
      (o.systems === undefined || o.systems.includes(key)) &&
      (key === 'ubcache-ra' ? wantRa : key === 'ubcache' || wantZipf);

    // --- ubcache serve over the slow device; `sets` are serve's extra --set options.
    const ubcacheZipf = async (key: string, label: string, sets: string[]): Promise<void> => {
      const sock = join(dir, `slow-${key}.sock`);
      await withProcess(slowDevice(sock, slowImg), sock, `slow device for ${label}`, async () => {
        const backing = await openBacking(o.backing, sock, dir, { dropMs: o.dropMs });
        try {
          const cache = sparse(join(dir, `zipf-cache-${key}.img`), 256 * MiB);
          await makeOverSlow(cache, backing.spec);
          const z = join(dir, `zipf-${key}.sock`);
          const control = join(dir, `zipf-${key}-control.sock`);
          const serve = ubcache([
            'serve',
            '--socket',
            z,
            '--control',
            control,
            ...sets.flatMap((x) => ['--set', x]),
            cache,
            backing.spec,
          ]);
          await withProcess(serve, z, `${label} over the slow device`, async () => {
            progress(`zipf: ${label} (${T} s) ...`);
            // Counters at the window edges, so each window gets its own hit ratio.
            const edges: Promise<Counters | undefined>[] = [cold[1], warm[0]].map(
              (s) =>
                new Promise((resolve) =>
                  setTimeout(() => {
                    counters(control).then(resolve, () => {
                      resolve(undefined);
                    });
                  }, s * 1000),
                ),
            );
            const r = await zipfFio(`nbd+unix:///bcache0?socket=${z}`, key);
            const [atColdEnd, atWarmStart] = await Promise.all(edges);
            const end: HitStats = await hitStats(control);
            const endCounters = await counters(control);
            const engine = await ioEngineOf(control);
            const rss = peakRssMiB(serve.child.pid);
            const coldRatio = atColdEnd ? ratioOf(atColdEnd.hits, atColdEnd.misses) : 'n/a';
            const warmRatio = atWarmStart
              ? ratioOf(end.hits - atWarmStart.hits, end.misses - atWarmStart.misses)
              : 'n/a';
            // Misses rounded up by readahead in each window (0 without it).
            const coldRa = atColdEnd ? atColdEnd.readaheads : NaN;
            const warmRa = atWarmStart ? endCounters.readaheads - atWarmStart.readaheads : NaN;
            const raNote = sets.some((x) => x.includes('readahead'))
              ? `; readaheads: cold ${coldRa}, warm ${warmRa}, whole run ${endCounters.readaheads}`
              : '';
            finish(
              key,
              label,
              r,
              `hit ratio: cold ${coldRatio}, warm ${warmRatio}, whole run ${end.ratio} % (${end.hits} hits, ${end.misses} misses)${raNote}; peak RSS ${rss.toFixed(0)} MiB; file I/O engine ${engine}`,
              {
                hitStats: end,
                atColdEnd,
                atWarmStart,
                atEnd: endCounters,
                coldRatio,
                warmRatio,
                coldReadaheads: coldRa,
                warmReadaheads: warmRa,
                peakRssMiB: rss,
                ioEngine: engine,
                sets,
              },
            );
          });
        } finally {
          await backing.close();
          clearHead(slowImg);
        }
      });
    };
    if (sys('ubcache')) await ubcacheZipf('ubcache', 'ubcache serve', []);
    if (sys('ubcache-ra'))
      await ubcacheZipf('ubcache-ra', `ubcache serve, readahead ${READAHEAD}`, [`bcache0.readahead=${READAHEAD}`]);

    // --- qemu: a qcow2 overlay over the slow export, served with copy-on-read.
    if (sys('qemu-cor')) {
      const sock = join(dir, 'slow-qemu.sock');
      await withProcess(slowDevice(sock, slowImg), sock, 'slow device for qemu', async () => {
        const overlay = join(dir, 'overlay.qcow2');
        sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-F', 'raw', '-b', slowUri(sock), overlay, '1G']);
        const before = statSync(overlay).blocks * 512;
        const q = join(dir, 'qemu-cor.sock');
        const qn = startProc('qemu-nbd', [
          '--persistent',
          '--shared=8',
          '--cache=writeback',
          '--aio=threads',
          '-x',
          'disk',
          '-k',
          q,
          '--image-opts',
          `driver=copy-on-read,file.driver=qcow2,file.file.driver=file,file.file.filename=${overlay}`,
        ]);
        await withProcess(qn, q, 'qemu-nbd copy-on-read', async () => {
          progress(`zipf: qemu copy-on-read overlay (${T} s) ...`);
          const r = await zipfFio(`nbd+unix:///disk?socket=${q}`, 'qemu-cor');
          const after = statSync(overlay).blocks * 512;
          finish(
            'qemu-cor',
            'qemu COR overlay',
            r,
            `overlay allocated ${(before / MiB).toFixed(1)} → ${(after / MiB).toFixed(0)} MiB (copies on read, 64 KiB qcow2 clusters; no size bound)`,
            { overlayBytesBefore: before, overlayBytesAfter: after },
          );
        });
      });
    }

    // --- nbdkit's cache filter in front of the same delay.
    if (sys('nbdkit-cache')) {
      const kc = join(dir, 'nbdkit-cache.sock');
      const k = nbdkit(
        kc,
        ['--filter=cache', '--filter=delay', 'file', slowImg, ...DELAY, 'cache-on-read=true', 'cache-max-size=256M'],
        // The filter keeps its cache file in TMPDIR.
        { env: { ...process.env, TMPDIR: dir }, threads: o.threads },
      );
      await withProcess(k, kc, 'nbdkit cache filter', async () => {
        progress(`zipf: nbdkit cache filter (${T} s) ...`);
        finish(
          'nbdkit-cache',
          'nbdkit cache filter',
          await zipfFio(`nbd+unix:///?socket=${kc}`, 'nbdkit-cache'),
          'cache-on-read=true cache-max-size=256M',
          {},
        );
      });
    }

    // --- the slow device alone.
    if (sys('slow')) {
      const sock = join(dir, 'slow-direct.sock');
      await withProcess(slowDevice(sock, slowImg), sock, 'slow device', async () => {
        progress(`zipf: the slow device read directly (${T} s) ...`);
        finish('slow', 'slow device (direct)', await zipfFio(slowUri(sock), 'slow'), 'fio nbd engine, no cache', {});
      });
    }

    const by = (key: string): ZipfRun | undefined => runs.find((r) => r.key === key);
    const u = by('ubcache');
    const ra = by('ubcache-ra');
    const q = by('qemu-cor');
    const k = by('nbdkit-cache');
    const s = by('slow');
    const div = (a: number | undefined, b: number | undefined): number | undefined =>
      a === undefined || b === undefined ? undefined : a / b;
    const coldLabel = `${cold[0]}–${cold[1]} s`;
    const warmLabel = `${warm[0]}–${warm[1]} s`;
    const what = `Zipf(1.2) 4k randread QD32 over the 5 ms device, cache ¼`;
    const ucold = u ? `${fmtIops(u.cold)} IOPS` : 'n/a';
    const uwarm = u ? `${fmtIops(u.warm)} IOPS` : 'n/a';
    const hitNote = (which: 'coldRatio' | 'warmRatio'): string =>
      u ? `hit ratio ${String(u.extra[which])}; backing via ${o.backing}` : '';
    if (wantZipf)
      rows.push(
        {
          id: 'zipf',
          what: `${what}, cold (${coldLabel})`,
          value: ucold,
          reference: q ? `${fmtIops(q.cold)} IOPS (qemu COR overlay)` : 'n/a',
          ratio: div(u?.cold, q?.cold),
          goal: { of: 'ratio', op: '>=', limit: 1.0, unit: '×' },
          notes: `${hitNote('coldRatio')}; ${q?.notes ?? ''}`,
        },
        {
          id: 'zipf',
          what: `${what}, cold (${coldLabel})`,
          value: ucold,
          reference: s ? `${fmtIops(s.cold)} IOPS (slow device direct)` : 'n/a',
          ratio: div(u?.cold, s?.cold),
        },
        {
          id: 'zipf',
          what: `${what}, cold (${coldLabel})`,
          value: ucold,
          reference: k ? `${fmtIops(k.cold)} IOPS (nbdkit cache filter)` : 'n/a',
          ratio: div(u?.cold, k?.cold),
        },
        {
          id: 'zipf',
          what: `${what}, warm (${warmLabel} of one run)`,
          value: uwarm,
          reference: s ? `${fmtIops(s.warm)} IOPS (slow device direct)` : 'n/a',
          ratio: div(u?.warm, s?.warm),
          goal: { of: 'ratio', op: '>=', limit: 8, unit: '×' },
          notes: hitNote('warmRatio'),
        },
        {
          id: 'zipf',
          what: `${what}, warm (${warmLabel} of one run)`,
          value: uwarm,
          reference: q ? `${fmtIops(q.warm)} IOPS (qemu COR overlay, same warm-up)` : 'n/a',
          ratio: div(u?.warm, q?.warm),
          goal: { of: 'ratio', op: '>=', limit: 1.5, unit: '×' },
        },
        {
          id: 'zipf',
          what: `${what}, warm (${warmLabel} of one run)`,
          value: uwarm,
          reference: k ? `${fmtIops(k.warm)} IOPS (nbdkit cache filter, same warm-up)` : 'n/a',
          ratio: div(u?.warm, k?.warm),
        },
      );
    if (wantRa) {
      // Readahead against the same run without it: > 1× is its gain, < 1× its cost.
      const raNote = (which: 'cold' | 'warm'): string => {
        if (!ra) return '';
        const n = ra.extra[which === 'cold' ? 'coldReadaheads' : 'warmReadaheads'];
        const own = String(ra.extra[which === 'cold' ? 'coldRatio' : 'warmRatio']);
        const plain = u ? String(u.extra[which === 'cold' ? 'coldRatio' : 'warmRatio']) : 'n/a';
        return `hit ratio ${own} (${plain} without readahead); ${String(n)} misses rounded up by readahead; backing via ${o.backing}`;
      };
      const raWhat = `Zipf with readahead ${READAHEAD}: the Zipf run above through ubcache serve with bcache0.readahead=${READAHEAD}`;
      rows.push(
        {
          id: 'zipf-ra',
          what: `${raWhat}, cold (${coldLabel})`,
          value: ra ? `${fmtIops(ra.cold)} IOPS` : 'n/a',
          reference: `${ucold} (ubcache serve, readahead 0)`,
          ratio: div(ra?.cold, u?.cold),
          notes: raNote('cold'),
        },
        {
          id: 'zipf-ra',
          what: `${raWhat}, warm (${warmLabel} of one run)`,
          value: ra ? `${fmtIops(ra.warm)} IOPS` : 'n/a',
          reference: `${uwarm} (ubcache serve, readahead 0)`,
          ratio: div(ra?.warm, u?.warm),
          notes: raNote('warm'),
        },
      );
    }
    lines.push(
      `Zipf runs: ${T} s each from a cold cache; cold = ${coldLabel}, warm = ${warmLabel}; ubcache reached the slow device through ${o.backing} (${o.backingWhy}).`,
      '',
      ...(o.backing === 'fuse'
        ? [
            `Through FUSE the misses meet a ceiling that is not bcache's: nbdfuse makes one synchronous request at a time per connection and libfuse runs at most 10 workers, so with -C 16 about 8 reads are in flight (about 1.7k IOPS at 5 ms, measured with fio O_DIRECT and 32 jobs). The FUSE file's page cache is dropped every ${o.dropMs} ms so it does not act as a second, unbounded cache.`,
            '',
          ]
        : []),
      `Every slow device is nbdkit --threads ${o.threads}.`,
      '',
      '| system | cold IOPS | warm IOPS | whole run IOPS | p99 µs | p99.9 µs | notes |',
      '|---|---:|---:|---:|---:|---:|---|',
      ...runs.map(
        (r) =>
          `| ${r.label} | ${fmtIops(r.cold)} | ${fmtIops(r.warm)} | ${fmtIops(r.fio.iops)} | ${(r.fio.percentiles['99'] ?? NaN).toFixed(0)} | ${(r.fio.percentiles['99.9'] ?? NaN).toFixed(0)} | ${r.notes} |`,
      ),
      '',
    );
    const series = runs.map((r) => ({ name: r.label, values: r.series }));
    writeFileSync(join(o.outDir, 'zipf-series.json'), JSON.stringify({ cold, warm, series }, null, 2) + '\n');
    const svg = lineChart(series, {
      title: 'Zipf(1.2) 4k random reads, QD32, over a 5 ms device: IOPS from a cold cache',
      subtitle: `cache ¼ of the 1000 MiB span (qemu's overlay unbounded); ubcache backing via ${o.backing}; ${new Date().toISOString().slice(0, 16)}Z`,
      cold,
      warm,
    });
    writeFileSync(join(o.outDir, 'zipf-warmup.svg'), svg);
    writeFileSync(o.chart, svg);
    lines.push(`IOPS-over-time chart: ${o.chart} (series: ${join(o.outDir, 'zipf-series.json')})`, '');
    json['zipf'] = runs.map((r) => ({
      key: r.key,
      label: r.label,
      cold: r.cold,
      warm: r.warm,
      iops: r.fio.iops,
      percentilesUs: r.fio.percentiles,
      series: r.series,
      notes: r.notes,
      ...r.extra,
    }));
  }

  // ubcache serve over its own fresh slow device, in `mode`, running `w`; the
  // reference is fio running `w` on another fresh slow device directly.
  const overSlow = async (
    tag: string,
    mode: 'writeback' | 'writethrough',
    w: Workload,
    sets: string[],
  ): Promise<{ r: FioResult; direct: FioResult; note: string }> => {
    const ub = await (async (): Promise<{ r: FioResult; note: string }> => {
      const img = sparse(join(dir, `${tag}-1.img`), 1024 * MiB);
      const sock = join(dir, `${tag}-1.sock`);
      return withProcess(slowDevice(sock, img), sock, `slow device for ubcache ${mode}`, async () => {
        const backing = await openBacking(o.backing, sock, dir, { dropMs: 0 });
        try {
          const cache = sparse(join(dir, `${tag}-cache.img`), 256 * MiB);
          await makeOverSlow(cache, backing.spec);
          const z = join(dir, `${tag}.sock`);
          const control = join(dir, `${tag}-control.sock`);
          const args = ['serve', '--socket', z, '--control', control, '--set', `bcache0.cache_mode=${mode}`];
          for (const x of sets) args.push('--set', x);
          const serve = ubcache([...args, cache, backing.spec]);
          return await withProcess(serve, z, `ubcache serve (${mode}) over the slow device`, async () => {
            progress(`${tag}: ubcache serve, ${mode} (${o.runtime} s) ...`);
            const r = await fio(`nbd+unix:///bcache0?socket=${z}`, w, o.runtime, SPAN);
            const dirty = (await ctl(control, 'cat', '/sys/block/bcache0/bcache/dirty_data')).trim();
            const bypassed = (
              await controlRequest(control, 'GET', '/sys/block/bcache0/bcache/stats_total/bypassed')
            ).trim();
            const note = `dirty_data ${dirty} at the end, bypassed ${bypassed}; peak RSS ${peakRssMiB(serve.child.pid).toFixed(0)} MiB; file I/O engine ${await ioEngineOf(control)}; backing via ${o.backing}`;
            progress(`${tag}: ubcache ${fmtIops(r.iops)} IOPS, ${r.mibps.toFixed(0)} MiB/s (${note})`);
            return { r, note };
          });
        } finally {
          await backing.close();
        }
      });
    })();
    const img = sparse(join(dir, `${tag}-2.img`), 1024 * MiB);
    const sock = join(dir, `${tag}-2.sock`);
    const direct = await withProcess(slowDevice(sock, img), sock, 'slow device used directly', async () => {
      progress(`${tag}: the slow device directly (${o.runtime} s) ...`);
      const r = await fio(slowUri(sock), w, o.runtime, SPAN);
      progress(`${tag}: direct ${fmtIops(r.iops)} IOPS, ${r.mibps.toFixed(0)} MiB/s`);
      return r;
    });
    return { ...ub, direct };
  };

  // The rows over the slow device: serve in a mode against fio on the device alone.
  const span = `256 MiB cache, 1000 MiB span, ${o.runtime} s`;
  const slowRows: Array<{
    id: 'slow-writeback' | 'slow-writethrough' | 'slow-seqread';
    key: string;
    mode: 'writeback' | 'writethrough';
    w: Workload;
    sets: string[];
    what: string;
    bandwidth: boolean;
    limit: number;
  }> = [
    {
      id: 'slow-writeback',
      key: 'slowWriteback',
      mode: 'writeback',
      w: randwrite,
      sets: ['bcache0.sequential_cutoff=0'],
      what: `writeback 4k randwrite QD32 over the 5 ms device, ${span}`,
      bandwidth: false,
      limit: 2,
    },
    {
      id: 'slow-writethrough',
      key: 'slowWritethrough',
      mode: 'writethrough',
      w: randwrite,
      sets: ['bcache0.sequential_cutoff=0'],
      what: `writethrough 4k randwrite QD32 over the 5 ms device, ${span}`,
      bandwidth: false,
      limit: 0.9,
    },
    {
      // Sequential reads past sequential_cutoff (4 MiB by default) bypass the cache: the cost of the way through.
      id: 'slow-seqread',
      key: 'slowSeqread',
      mode: 'writethrough',
      w: seqread,
      sets: [],
      what: `1 MiB sequential reads QD8 through serve (bypassed: past sequential_cutoff) over the 5 ms device, ${o.runtime} s`,
      bandwidth: true,
      limit: 0.9,
    },
  ];
  for (const row of slowRows) {
    if (!o.want(row.id)) continue;
    const x = await overSlow(row.id, row.mode, row.w, row.sets);
    const fmt = (r: FioResult): string => (row.bandwidth ? `${r.mibps.toFixed(0)} MiB/s` : `${fmtIops(r.iops)} IOPS`);
    const of = (r: FioResult): number => (row.bandwidth ? r.mibps : r.iops);
    rows.push({
      id: row.id,
      what: row.what,
      value: fmt(x.r),
      reference: `${fmt(x.direct)} (slow device ${row.w.rw.includes('write') ? 'written' : 'read'} directly by fio)`,
      ratio: of(x.r) / of(x.direct),
      goal: { of: 'ratio', op: '>=', limit: row.limit, unit: '×' },
      notes: x.note,
    });
    json[row.key] = { ubcache: x.r, direct: x.direct, notes: x.note };
  }
  return { rows, lines, json };
}
