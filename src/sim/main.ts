// npm run sim -- --seed N [--ops K] [--seeds M] [--workload mixed|fill|soak] [--sets 1|2] [--no-power-cuts] [--no-faults] [--expensive-checks] [--trace]
//
// Runs the simulator (sim.ts) for one seed, or for M seeds from N, and prints
// for each: the seed, the digest of its trace and the verdict. A failing seed
// is its own repro: `npm run sim -- --seed N --ops K` runs it again, exactly.
// Exit status 1 if any seed failed.

import { runSim } from './sim.ts';

function usage(message: string): never {
  process.stderr.write(
    `sim: ${message}\nusage: npm run sim -- --seed N [--ops K] [--seeds M] [--workload mixed|fill|soak] [--sets 1|2] [--no-power-cuts] [--no-faults] [--expensive-checks] [--trace]\n`,
  );
  process.exit(2);
}

function intArg(args: string[], name: string, fallback: number): number {
  const i = args.indexOf(name);
  if (i < 0) return fallback;
  const v = Number(args[i + 1]);
  if (!Number.isSafeInteger(v) || v < 0) usage(`${name} needs a non-negative integer`);
  return v;
}

async function main(): Promise<void> {
  const args = process.argv.slice(2);
  const known = new Set([
    '--seed',
    '--ops',
    '--seeds',
    '--sets',
    '--workload',
    '--no-power-cuts',
    '--no-faults',
    '--trace',
    '--expensive-checks',
  ]);
  for (const [i, a] of args.entries()) {
    if (a.startsWith('--') && !known.has(a)) usage(`unknown option ${a}`);
    if (!a.startsWith('--') && !['--seed', '--ops', '--seeds', '--sets', '--workload'].includes(args[i - 1] ?? ''))
      usage(`unexpected ${a}`);
  }
  const first = intArg(args, '--seed', 1);
  const wi = args.indexOf('--workload');
  const workloadArg = wi < 0 ? 'mixed' : args[wi + 1];
  if (workloadArg !== 'mixed' && workloadArg !== 'fill' && workloadArg !== 'soak')
    usage('--workload is mixed, fill or soak');
  const workload = workloadArg;
  const ops = intArg(args, '--ops', workload === 'mixed' ? 300 : 4);
  const seeds = intArg(args, '--seeds', 1);
  const powerCuts = !args.includes('--no-power-cuts');
  const faults = !args.includes('--no-faults');
  const setsArg = intArg(args, '--sets', 0);
  if (args.includes('--sets') && (setsArg < 1 || setsArg > 2)) usage('--sets is 1 or 2');
  const sets = setsArg === 0 ? undefined : setsArg;
  const keepTrace = args.includes('--trace');
  const expensiveChecks = args.includes('--expensive-checks');
  let failed = 0;
  const t0 = performance.now();
  for (let seed = first; seed < first + Math.max(1, seeds); seed++) {
    const r = await runSim({
      seed,
      ops,
      powerCuts,
      faults,
      keepTrace,
      expensiveChecks,
      workload,
      ...(sets === undefined ? {} : { sets }),
    });
    if (r.trace) process.stdout.write(`${r.trace.join('\n')}\n`);
    const s = r.stats;
    process.stdout.write(
      `seed ${r.seed} ops ${r.ops} digest ${r.digest} ${r.ok ? 'ok' : 'FAIL'} ` +
        `(${(r.simMs / 1000).toFixed(1)} s simulated, ${r.events} events; ` +
        `${s.writes}+${s.fuaWrites} fua writes, ${s.reads} reads, ${s.flushes} flushes, ${s.discards} discards, ${s.zeroes} zeroes, ` +
        `${s.gcs} gc, ${s.detaches} detaches, ${s.attaches} attaches, ` +
        `${s.faultEpisodes} fault episodes (${s.retires} retires, ${s.deviceStops} device stops, ${s.failedOps} failed ops), ${s.powerCuts} power cuts, ${s.restarts} restarts)` +
        `${r.ok ? '' : `\n  ${r.verdict}\n  repro: npm run sim -- --seed ${r.seed} --ops ${r.ops}${workload === 'mixed' ? '' : ` --workload ${workload}`}${powerCuts ? '' : ' --no-power-cuts'}${faults ? '' : ' --no-faults'}${sets === undefined ? '' : ` --sets ${sets}`}`}\n`,
    );
    if (!r.ok) failed++;
  }
  if (seeds > 1) {
    process.stdout.write(`${seeds} seeds, ${failed} failed, ${((performance.now() - t0) / 1000).toFixed(1)} s\n`);
  }
  process.exitCode = failed > 0 ? 1 : 0;
}

await main();
