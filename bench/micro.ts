// The micro suite of `npm run bench`: bench/engine-micro.ts (the engine alone
// over in-memory devices at QD32, no NBD, no other process) run as a child,
// its figures printed as a small table of their own. They have no same-run
// reference: CPU microseconds per request are steady enough on a shared
// machine to compare across runs and commits, which IOPS through fio are not.
//
// The child loads the engine from the dist/ of the ubcache the other suites
// run (UBCACHE_DIST: the bench's snapshot, or dist/ itself with --live-dist),
// so every table of one run measures one build. Its measurement is its own;
// this file only starts it and reads its lines.

import { join } from 'node:path';
import { progress, root, run, ubcacheDist } from './common.ts';

export interface MicroFigure {
  kind: string;
  cpuUs: number;
  wallUs: number;
}

const WHAT: Record<string, string> = {
  write: '4 KiB writeback write (random, 256 MiB span)',
  hit: '4 KiB read hit (64 MiB working set, cached)',
  miss: '4 KiB read miss (each block read once, then filled)',
};

export async function microSuite(): Promise<{ lines: string[]; json: Record<string, unknown> }> {
  const dist = ubcacheDist();
  progress(`micro: engine-micro.ts on ${dist} (write, hit, miss; best of 3 rounds each) ...`);
  const t0 = performance.now();
  const r = await run(process.execPath, ['--import', 'tsx', join(root, 'bench', 'engine-micro.ts')], {
    cwd: root,
    env: { ...process.env, UBCACHE_DIST: dist },
  });
  if (r.status !== 0) throw new Error(`engine-micro.ts failed (${r.status}):\n${r.stderr.slice(-4000)}`);
  const figures: MicroFigure[] = [];
  for (const line of r.stdout.split('\n')) {
    const m = /^(\w+)\s+([\d.]+) µs CPU per request,\s+([\d.]+) µs wall/.exec(line.trim());
    if (m?.[1] !== undefined) figures.push({ kind: m[1], cpuUs: Number(m[2]), wallUs: Number(m[3]) });
  }
  if (figures.length === 0) throw new Error(`engine-micro.ts printed no figures:\n${r.stdout}`);
  const seconds = (performance.now() - t0) / 1000;
  progress(`micro: ${figures.map((f) => `${f.kind} ${f.cpuUs.toFixed(2)} µs`).join(', ')} (${seconds.toFixed(0)} s)`);
  const lines = [
    '### micro suite: the engine alone (bench/engine-micro.ts: memory devices, QD32, no NBD; best of 3 rounds)',
    '',
    "| request | CPU µs per request | wall µs per request | one core's ceiling |",
    '|---|---:|---:|---:|',
    ...figures.map(
      (f) =>
        `| ${WHAT[f.kind] ?? f.kind} | ${f.cpuUs.toFixed(2)} | ${f.wallUs.toFixed(2)} | ${(1e6 / f.cpuUs / 1000).toFixed(0)}k/s |`,
    ),
    '',
  ];
  return { lines, json: { dist, seconds, figures } };
}
