// The slow suite of `npm run bench`: caches in front of a slow device, each
// against what a user would otherwise pick, in one run.
//
// The slow device is nbdkit's file plugin behind its delay filter (rdelay and
// wdelay 5 ms, --threads 64 so each request is delayed by itself) over a
// 1 GiB file on a unix socket. The file is filled with random data, not left
// sparse: qemu's NBD client asks for block status and serves holes as zeroes
// without reading them, so over a sparse file qemu's copy-on-read would never
// touch the device (and would copy nothing).
//
//   zipf       4k random reads, Zipf(1.2), QD32, over 1000 MiB, one
//              continuous run per system from a cold cache, IOPS logged once
//              a second: cold = the first third (0-30 s of 90), warm = the
//              last third (60-90 s). Systems: ubcache serve (256 MiB cache,
//              64 KiB buckets, writethrough), a qemu copy-on-read qcow2
//              overlay over the slow export (qemu-nbd), nbdkit's cache filter
//              (cache-on-read, 256 MiB), and the slow device read directly.
//              fio's random generator is seeded alike, so every system sees
//              the same offsets in the same order.
//   slow-writeback
//              4k random writes, QD32, over 1000 MiB for 15 s through
//              ubcache serve in writeback mode (256 MiB cache) against fio
//              writing the slow device directly.
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
  /** Milliseconds between drops of the FUSE file's page cache (fuse backing only; 0 never). */
  dropMs: number;
  want: (id: string) => boolean;
  /** Which Zipf systems run (ubcache, qemu-cor, nbdkit-cache, slow); all when undefined. */
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

/**
 * Format a 256 MiB cache and the slow device as its backing device, through
 * the path serve will use. A build whose serve takes nbd+unix:// URIs but
 * whose make does not yet (--backing nbd chosen by hand) gets the backing
 * superblock written on the file behind the export instead; the note says so.
 */
async function makeOverSlow(cache: string, spec: string, file: string): Promise<string> {
  const made = await run(ubcacheBin(), ['make', '-b', '64k', '-C', cache, '-B', spec]);
  if (made.status === 0) return '';
  if (spec === file || !spec.startsWith('nbd')) {
    throw new Error(`ubcache make over the slow device failed: ${made.stderr}`);
  }
  const again = await run(ubcacheBin(), ['make', '-b', '64k', '-C', cache, '-B', file]);
  if (again.status !== 0) throw new Error(`ubcache make on ${file} failed: ${again.stderr}`);
  progress(`ubcache make -B ${spec}: ${made.stderr.trim().split('\n')[0] ?? ''}`);
  return 'this make -B takes no URI: the superblock went on the file behind the export';
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

export async function slowSuite(o: SlowSuiteOptions): Promise<SuiteResult> {
  const { dir } = o;
  const T = o.zipfRuntime;
  const cold: [number, number] = [0, Math.round(T / 3)];
  const warm: [number, number] = [Math.round((2 * T) / 3), T];
  const rows: Row[] = [];
  const lines: string[] = [];
  const json: Record<string, unknown> = { backing: o.backing, backingWhy: o.backingWhy, cold, warm, dropMs: o.dropMs };
  progress(`slow suite: ubcache reaches the slow device through ${o.backing} (${o.backingWhy})`);

  if (o.want('zipf')) {
    const slowImg = join(dir, 'slow.img');
    progress('filling the 1 GiB slow device with random data ...');
    sh('dd', ['if=/dev/urandom', `of=${slowImg}`, 'bs=1M', 'count=1024', 'status=none']);
    // Zeroes at the start, so no chance pattern there looks like a signature
    // that ubcache make would refuse to overwrite.
    sh('dd', ['if=/dev/zero', `of=${slowImg}`, 'bs=1M', 'count=1', 'conv=notrunc', 'status=none']);

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

    const sys = (key: string): boolean => o.systems === undefined || o.systems.includes(key);

    let makeNote = '';

    // --- ubcache serve over the slow device.
    if (sys('ubcache')) {
      const sock = join(dir, 'slow-ubcache.sock');
      const slow = nbdkit(sock, ['--filter=delay', 'file', slowImg, ...DELAY]);
      await withProcess(slow, sock, 'slow device for ubcache', async () => {
        const backing = await openBacking(o.backing, sock, dir, { dropMs: o.dropMs });
        try {
          const cache = sparse(join(dir, 'zipf-cache.img'), 256 * MiB);
          makeNote = await makeOverSlow(cache, backing.spec, slowImg);
          const z = join(dir, 'zipf.sock');
          const control = join(dir, 'zipf-control.sock');
          const serve = ubcache(['serve', '--socket', z, '--control', control, cache, backing.spec]);
          await withProcess(serve, z, 'ubcache serve over the slow device', async () => {
            progress(`zipf: ubcache serve (${T} s) ...`);
            // Hit counters at the window edges, so each window gets its own hit ratio.
            const edges: Promise<{ hits: number; misses: number } | undefined>[] = [cold[1], warm[0]].map(
              (s) =>
                new Promise((resolve) =>
                  setTimeout(() => {
                    hitCounters(control).then(resolve, () => {
                      resolve(undefined);
                    });
                  }, s * 1000),
                ),
            );
            const r = await zipfFio(`nbd+unix:///bcache0?socket=${z}`, 'ubcache');
            const [atColdEnd, atWarmStart] = await Promise.all(edges);
            const end: HitStats = await hitStats(control);
            const engine = await ioEngineOf(control);
            const rss = peakRssMiB(serve.child.pid);
            const coldRatio = atColdEnd ? ratioOf(atColdEnd.hits, atColdEnd.misses) : 'n/a';
            const warmRatio = atWarmStart
              ? ratioOf(end.hits - atWarmStart.hits, end.misses - atWarmStart.misses)
              : 'n/a';
            finish(
              'ubcache',
              'ubcache serve',
              r,
              `hit ratio: cold ${coldRatio}, warm ${warmRatio}, whole run ${end.ratio} % (${end.hits} hits, ${end.misses} misses); peak RSS ${rss.toFixed(0)} MiB; file I/O engine ${engine}`,
              { hitStats: end, atColdEnd, atWarmStart, coldRatio, warmRatio, peakRssMiB: rss, ioEngine: engine },
            );
          });
        } finally {
          await backing.close();
        }
      });
    }

    // --- qemu: a qcow2 overlay over the slow export, served with copy-on-read.
    if (sys('qemu-cor')) {
      const sock = join(dir, 'slow-qemu.sock');
      const slow = nbdkit(sock, ['--filter=delay', 'file', slowImg, ...DELAY]);
      await withProcess(slow, sock, 'slow device for qemu', async () => {
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
        { ...process.env, TMPDIR: dir },
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
      const slow = nbdkit(sock, ['--filter=delay', 'file', slowImg, ...DELAY]);
      await withProcess(slow, sock, 'slow device', async () => {
        progress(`zipf: the slow device read directly (${T} s) ...`);
        finish('slow', 'slow device (direct)', await zipfFio(slowUri(sock), 'slow'), 'fio nbd engine, no cache', {});
      });
    }

    const by = (key: string): ZipfRun | undefined => runs.find((r) => r.key === key);
    const u = by('ubcache');
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
    lines.push(
      `Zipf runs: ${T} s each from a cold cache; cold = ${coldLabel}, warm = ${warmLabel}; ubcache reached the slow device through ${o.backing} (${o.backingWhy}).`,
      '',
      ...(o.backing === 'fuse'
        ? [
            `Through FUSE the misses meet a ceiling that is not bcache's: nbdfuse makes one synchronous request at a time per connection and libfuse runs at most 10 workers, so with -C 16 about 8 reads are in flight (about 1.7k IOPS at 5 ms, measured with fio O_DIRECT and 32 jobs). The FUSE file's page cache is dropped every ${o.dropMs} ms so it does not act as a second, unbounded cache.`,
            '',
          ]
        : []),
      ...(makeNote === '' ? [] : [`ubcache make: ${makeNote}.`, '']),
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
    json['makeNote'] = makeNote;
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

  if (o.want('slow-writeback')) {
    // ubcache serve, writeback, over its own fresh slow device.
    const ub = await (async (): Promise<{ r: FioResult; note: string }> => {
      const img = sparse(join(dir, 'slow-w1.img'), 1024 * MiB);
      const sock = join(dir, 'slow-w1.sock');
      const slow = nbdkit(sock, ['--filter=delay', 'file', img, ...DELAY]);
      return withProcess(slow, sock, 'slow device for ubcache writeback', async () => {
        const backing = await openBacking(o.backing, sock, dir, { dropMs: 0 });
        try {
          const cache = sparse(join(dir, 'wb-cache.img'), 256 * MiB);
          const mk = await makeOverSlow(cache, backing.spec, img);
          const z = join(dir, 'wb.sock');
          const control = join(dir, 'wb-control.sock');
          const serve = ubcache([
            'serve',
            '--socket',
            z,
            '--control',
            control,
            '--set',
            'bcache0.cache_mode=writeback',
            '--set',
            'bcache0.sequential_cutoff=0',
            cache,
            backing.spec,
          ]);
          return await withProcess(serve, z, 'ubcache serve (writeback) over the slow device', async () => {
            progress(`slow-writeback: ubcache serve (${o.runtime} s) ...`);
            const r = await fio(`nbd+unix:///bcache0?socket=${z}`, randwrite, o.runtime, SPAN);
            const dirty = (await ctl(control, 'cat', '/sys/block/bcache0/bcache/dirty_data')).trim();
            const bypassed = (
              await controlRequest(control, 'GET', '/sys/block/bcache0/bcache/stats_total/bypassed')
            ).trim();
            const note = `dirty_data ${dirty} at the end, bypassed ${bypassed}; peak RSS ${peakRssMiB(serve.child.pid).toFixed(0)} MiB; file I/O engine ${await ioEngineOf(control)}; backing via ${o.backing}${mk === '' ? '' : ` (${mk})`}`;
            progress(`slow-writeback: ubcache ${fmtIops(r.iops)} IOPS (${note})`);
            return { r, note };
          });
        } finally {
          await backing.close();
        }
      });
    })();
    // The reference: fio writing a fresh slow device directly.
    const img = sparse(join(dir, 'slow-w2.img'), 1024 * MiB);
    const sock = join(dir, 'slow-w2.sock');
    const slow = nbdkit(sock, ['--filter=delay', 'file', img, ...DELAY]);
    const direct = await withProcess(slow, sock, 'slow device written directly', async () => {
      progress(`slow-writeback: the slow device written directly (${o.runtime} s) ...`);
      const r = await fio(slowUri(sock), randwrite, o.runtime, SPAN);
      progress(`slow-writeback: direct ${fmtIops(r.iops)} IOPS`);
      return r;
    });
    rows.push({
      id: 'slow-writeback',
      what: `writeback 4k randwrite QD32 over the 5 ms device, 256 MiB cache, 1000 MiB span, ${o.runtime} s`,
      value: `${fmtIops(ub.r.iops)} IOPS`,
      reference: `${fmtIops(direct.iops)} IOPS (slow device written directly by fio)`,
      ratio: ub.r.iops / direct.iops,
      goal: { of: 'ratio', op: '>=', limit: 2, unit: '×' },
      notes: ub.note,
    });
    json['slowWriteback'] = { ubcache: ub.r, direct, notes: ub.note };
  }
  return { rows, lines, json };
}
