// The admission suite of `npm run bench` (issue 13 part 5): bench/admission-engine.ts
// (the engine alone over memory devices) run as a child; its two policies,
// measured in that one run, become two rows: the hot set's hit ratio during a
// one-pass scan of cold data four times the cache, second-hit against always
// (bcache), and the CPU time of a read hit under each (the policy's cost on the
// hit path, which never consults it).

import { join } from 'node:path';
import { progress, root, run, ubcacheDist, type Row } from './common.ts';

/** The workload: a 20 MiB Zipf (s = 0.6) hot set in a 32 MiB cache, read at QD2 while 16 readers scan 128 MiB once. */
const WORKLOAD = ['--cache-mib', '32', '--hot-mib', '20', '--zipf', '0.6', '--hot-lanes', '2', '--scan-lanes', '16'];

interface PolicyFigures {
  hotHit: number;
  coldAdmitted: string;
  hitCpuUs: number;
  scanSeconds: number;
}

export async function admissionSuite(): Promise<{ rows: Row[]; lines: string[]; json: Record<string, unknown> }> {
  const dist = ubcacheDist();
  progress('admission: admission-engine.ts (always, then second-hit) ...');
  const r = await run(process.execPath, ['--import', 'tsx', join(root, 'bench', 'admission-engine.ts'), ...WORKLOAD], {
    cwd: root,
    env: { ...process.env, UBCACHE_DIST: dist },
  });
  if (r.status !== 0) throw new Error(`admission-engine.ts failed (${r.status}):\n${r.stderr.slice(-4000)}`);
  const figures = new Map<string, PolicyFigures>();
  for (const line of r.stdout.split('\n')) {
    const m =
      /^admission (\S+) hot-hit% ([\d.]+) cold-admitted% (\S+) hit-cpu-us ([\d.]+) hit-share% \d+ scan-s ([\d.]+)/.exec(
        line.trim(),
      );
    if (m?.[1] !== undefined) {
      figures.set(m[1], {
        hotHit: Number(m[2]),
        coldAdmitted: m[3] ?? '-',
        hitCpuUs: Number(m[4]),
        scanSeconds: Number(m[5]),
      });
    }
  }
  const always = figures.get('always');
  const second = figures.get('second-hit');
  if (!always || !second) throw new Error(`admission-engine.ts printed no figures:\n${r.stdout}`);
  progress(`admission: hot-set hit ratio ${second.hotHit}% (second-hit) vs ${always.hotHit}% (always)`);
  const rows: Row[] = [
    {
      id: 'admission',
      what: 'admission: hot-set hit ratio during a one-pass scan of 4× the cache (engine, memory devices)',
      value: `${second.hotHit.toFixed(1)} % (second-hit; ${second.coldAdmitted} % of the scan admitted)`,
      reference: `${always.hotHit.toFixed(1)} % (always: bcache, every miss filled)`,
      ratio: second.hotHit / always.hotHit,
    },
    {
      id: 'admission',
      what: 'admission: CPU per 4 KiB read hit, second-hit (lower is better)',
      value: `${second.hitCpuUs.toFixed(2)} µs`,
      reference: `${always.hitCpuUs.toFixed(2)} µs (always)`,
      ratio: always.hitCpuUs / second.hitCpuUs,
    },
  ];
  const lines = [
    `### admission suite: bench/admission-engine.ts ${WORKLOAD.join(' ')}`,
    '',
    ...r.stdout
      .split('\n')
      .filter((l) => l.startsWith('admission '))
      .map((l) => `    ${l}`),
    '',
  ];
  return { rows, lines, json: { dist, always, secondHit: second } };
}
