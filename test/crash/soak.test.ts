// A soak as a careful user would run it: a 40 MiB cache with 64 KiB buckets
// over a 256 MiB backing file, rounds of `ubcache serve` in a random cache
// mode, each reading every block of a 32 MiB region and then writing it over
// with pipelined 4 KiB writes (8 in flight, a FLUSH every 64 writes, some FUA
// writes and write-zeroes), each ended by kill -9 or SIGTERM at a random
// moment. A nearly full cache is the point: what earlier rounds left (clean
// copies, dirty data scattered over many buckets) takes most buckets, so the
// writes run against an allocator that must keep reclaiming.
//
// Every round checks that requests keep completing (HANG_MS without a single
// completion is a hang: the test dumps the set's attribute tree and the
// daemon's stderr, checks whether SIGTERM still ends it, and fails), that
// SIGTERM ends the process by itself within EXIT_MS, that a kill -9 round
// restarts, and that every block reads back as the model allows (every
// flushed write exactly; after a clean stop every acknowledged one). A last
// start reads the region once more.
//
//   UBCACHE_SOAK_SEED=N      the seed of every random choice (printed)
//   UBCACHE_SOAK_ROUNDS=N    rounds (default 6, about a minute)
//   UBCACHE_SOAK_LOAD=1      keep the other core busy (a busy-loop child)
//   UBCACHE_SOAK_HANG_MS=N   no completion for this long is a hang (30000)
//   UBCACHE_SOAK_EXIT_MS=N   how long SIGTERM may take (45000)
//   UBCACHE_SOAK_KEEP=1      on a hang, leave the daemon running and print
//                            where it is (for inspection; the test then fails)

import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { join } from 'node:path';
import { Daemon, tempDir, UBCACHE, type Exit } from '../helpers/daemon.ts';
import { Prng } from '../../src/util/prng.ts';
import { makeImages, MiB } from '../e2e/serve-helpers.ts';
import { BLOCK, BlockModel, HangError, Pipeline } from './soak-client.ts';

const MODES = ['writethrough', 'writeback', 'writearound', 'none'] as const;
const REGION_BLOCKS = (32 * MiB) / BLOCK;
const DEPTH = 8;
const FLUSH_EVERY = 64;

function envInt(name: string, fallback: number): number {
  const v = process.env[name];
  if (v === undefined || v === '') return fallback;
  const n = Number(v);
  if (!Number.isSafeInteger(n) || n < 0) throw new Error(`${name}=${v}: not a whole number`);
  return n;
}

const SEED = envInt('UBCACHE_SOAK_SEED', Date.now() % 1_000_000_007);
const ROUNDS = envInt('UBCACHE_SOAK_ROUNDS', 6);
const LOAD = process.env['UBCACHE_SOAK_LOAD'] === '1';
const HANG_MS = envInt('UBCACHE_SOAK_HANG_MS', 30_000);
/** The NBD server gives clients 30 s at shutdown; a healthy stop takes a second or two. */
const EXIT_MS = envInt('UBCACHE_SOAK_EXIT_MS', 45_000);
const KEEP = process.env['UBCACHE_SOAK_KEEP'] === '1';
const START_MS = 60_000;

type Order = 'sequential' | 'random';

interface Round {
  n: number;
  mode: (typeof MODES)[number];
  /** In order, sequential detection bypasses most of a pass; shuffled, none of it. */
  readOrder: Order;
  writeOrder: Order;
  end: 'kill' | 'term';
  /** Writes sent before the end (all of them: the end comes after the pass and a FLUSH). */
  stopAfter: number;
}

function describe(r: Round): string {
  return (
    `round ${r.n} (${r.mode}, ${r.readOrder} reads, ${r.writeOrder} writes, ` +
    `${r.end === 'kill' ? 'kill -9' : 'SIGTERM'} after ${r.stopAfter} writes; seed ${SEED})`
  );
}

/** Resolves with the exit, or undefined if the process is still there after `ms` (a deadline, not a sleep). */
async function exitWithin(d: Daemon, ms: number): Promise<Exit | undefined> {
  let timer: NodeJS.Timeout | undefined;
  const r = await Promise.race([
    d.exited,
    new Promise<undefined>((resolve) => {
      timer = setTimeout(() => {
        resolve(undefined);
      }, ms);
    }),
  ]);
  clearTimeout(timer);
  return r;
}

/** The attribute trees an engineer would look at first, from the live daemon. */
function dumpState(control: string): string {
  const out: string[] = [];
  for (const path of ['/sys/fs/bcache', '/sys/block/bcache0/bcache']) {
    const r = spawnSync(UBCACHE, ['ctl', '--control', control, 'tree', path], { encoding: 'utf8', timeout: 10_000 });
    out.push(`$ ubcache ctl tree ${path}\n${r.stdout}${r.stderr}`);
  }
  return out.join('\n');
}

function blockOrder(kind: Order, rng: Prng): number[] {
  const a = Array.from({ length: REGION_BLOCKS }, (_, i) => i);
  if (kind === 'sequential') return a;
  for (let i = a.length - 1; i > 0; i--) {
    const j = rng.below(i + 1);
    [a[i], a[j]] = [a[j] as number, a[i] as number];
  }
  return a;
}

/** What one run shares between its rounds. */
interface Soak {
  dir: string;
  cache: string;
  backing: string;
  rng: Prng;
  model: BlockModel;
  /** Device offset of the region (the same in every round, so each read pass checks all earlier writes). */
  base: number;
  nextValue: number;
}

/** A hang: the state of the live daemon, then whether SIGTERM still ends it. */
async function reportHang(s: Soak, r: Round, d: Daemon, control: string, socket: string, err: HangError) {
  const state = dumpState(control);
  if (KEEP) {
    process.stderr.write(
      `soak: HANG in ${describe(r)}; daemon pid ${d.proc.pid}, --control ${control}, --socket ${socket}\n` +
        `${state}\nsoak: kill the daemon to end the test\n`,
    );
    await d.exited;
  }
  d.proc.kill('SIGTERM');
  const exit = await exitWithin(d, EXIT_MS);
  return new Error(
    `${describe(r)}: ${err.message}\n` +
      `after SIGTERM: ${exit ? `exited ${exit.code ?? exit.signal}` : `still running after ${EXIT_MS} ms`}\n` +
      `${state}\nstderr:\n${d.stderr}`,
    { cause: err },
  );
}

async function runRound(s: Soak, r: Round): Promise<void> {
  const t0 = Date.now();
  const socket = join(s.dir, `s${r.n}.sock`);
  const control = join(s.dir, `c${r.n}.sock`);
  const d = new Daemon([
    'serve',
    '--socket',
    socket,
    '--control',
    control,
    '--set',
    `bcache0.cache_mode=${r.mode}`,
    s.cache,
    s.backing,
  ]);
  let pipe: Pipeline | undefined;
  try {
    const started = await Promise.race([
      d.waitForLine(/listening on unix:/).then(() => true),
      exitWithin(d, START_MS).then(() => false),
    ]);
    assert.ok(started, `${describe(r)}: serve did not start within ${START_MS} ms:\n${d.stderr}`);
    const p = await Pipeline.open(socket, s.model, { base: s.base, depth: DEPTH, hangMs: HANG_MS });
    pipe = p;
    try {
      // The read pass: every block.
      const wrong: string[] = [];
      for (const block of blockOrder(r.readOrder, s.rng)) {
        await p.read(block, (b, v) => {
          const why = s.model.check(b, v);
          if (why !== undefined) wrong.push(why);
          // Read after a restart: what it holds now, it holds from now on.
          else s.model.durable(b, v);
        });
      }
      await p.drain();
      assert.deepEqual(wrong.slice(0, 10), [], `${describe(r)}: ${wrong.length} blocks read back wrong`);
      // The write pass: every block once (the model relies on one write per block per round).
      let sent = 0;
      for (const block of blockOrder(r.writeOrder, s.rng)) {
        if (sent >= r.stopAfter) break;
        const fua = s.rng.below(16) === 0;
        if (s.rng.below(32) === 0) await p.zeroes(block, fua);
        else await p.write(block, s.nextValue++, fua);
        sent++;
        if (sent % FLUSH_EVERY === 0) await p.flush();
      }
      if (sent === REGION_BLOCKS) {
        await p.flush();
        await p.drain();
      }
    } catch (err) {
      if (err instanceof HangError) throw await reportHang(s, r, d, control, socket, err);
      throw err;
    }
    // The end of the round, with whatever is still in flight.
    p.goingAway();
    const inFlight = p.requestsInFlight;
    if (r.end === 'kill') {
      d.proc.kill('SIGKILL');
      await d.exited;
    } else {
      d.proc.kill('SIGTERM');
      const exit = await exitWithin(d, EXIT_MS);
      if (!exit) {
        throw new Error(
          `${describe(r)}: SIGTERM with ${inFlight} requests in flight: still running after ${EXIT_MS} ms\n` +
            `${dumpState(control)}\nstderr:\n${d.stderr}`,
        );
      }
      assert.equal(exit.code, 0, `${describe(r)}: SIGTERM: exit ${exit.code ?? exit.signal}:\n${d.stderr}`);
      // A clean stop makes every acknowledged write durable.
      for (const [b, v] of p.acked) s.model.durable(b, v);
    }
    const st = p.stats;
    process.stderr.write(
      `soak: ${describe(r)}: ${st.reads} reads, ${st.writes} writes (${st.fua} FUA), ${st.zeroes} write-zeroes, ` +
        `${st.flushes} flushes, ${inFlight} in flight at the end, ${((Date.now() - t0) / 1000).toFixed(1)} s\n`,
    );
  } finally {
    pipe?.close();
    await d.kill();
  }
}

test(`soak: rounds of serve on a nearly full cache (seed ${SEED})`, { timeout: (ROUNDS + 1) * 600_000 }, async (t) => {
  await soak(t);
});

async function soak(t: TestContext): Promise<void> {
  t.diagnostic(`UBCACHE_SOAK_SEED=${SEED} UBCACHE_SOAK_ROUNDS=${ROUNDS}${LOAD ? ' UBCACHE_SOAK_LOAD=1' : ''}`);
  process.stderr.write(`soak: seed ${SEED}, ${ROUNDS} rounds${LOAD ? ', the other core loaded' : ''}\n`);
  using tmp = tempDir('ubcache-soak-');
  const { cache, backing } = makeImages(tmp.dir, { cacheMiB: 40, backingMiB: 256 });
  const rng = new Prng(SEED);
  const s: Soak = {
    dir: tmp.dir,
    cache,
    backing,
    rng,
    model: new BlockModel(REGION_BLOCKS),
    base: rng.below((256 - 32 - 1) * 4) * (MiB / 4),
    nextValue: 1,
  };
  let load: ChildProcess | undefined;
  if (LOAD) load = spawn(process.execPath, ['-e', 'for (;;) {}'], { stdio: 'ignore' });
  const t0 = Date.now();
  try {
    for (let n = 0; n < ROUNDS; n++) {
      await runRound(s, {
        n,
        mode: MODES[rng.below(MODES.length)] ?? 'writethrough',
        readOrder: rng.bool() ? 'sequential' : 'random',
        writeOrder: rng.bool() ? 'sequential' : 'random',
        end: rng.bool() ? 'kill' : 'term',
        stopAfter: rng.bool() ? REGION_BLOCKS : rng.below(REGION_BLOCKS),
      });
    }
    // The last check: a start, a read pass of the whole region, a SIGTERM.
    await runRound(s, {
      n: ROUNDS,
      mode: 'writethrough',
      readOrder: 'random',
      writeOrder: 'sequential',
      end: 'term',
      stopAfter: 0,
    });
  } finally {
    load?.kill('SIGKILL');
  }
  process.stderr.write(`soak: ${ROUNDS} rounds in ${((Date.now() - t0) / 1000).toFixed(1)} s (seed ${SEED})\n`);
}
