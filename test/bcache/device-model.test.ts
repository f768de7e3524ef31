// Model-based test of a bcache device: random reads, writes, FUA writes,
// flushes, trims, write-zeroes, cache mode switches, clean restarts and
// simulated power cuts, against a per-sector model, in every cache mode.
//
// The cache is small (600 buckets of 8 or 16 KiB: nodes of one bucket, 4
// journal buckets) so that GC, node splits and journal wrap-around happen all the
// time; both devices are crashable (a power cut drops or tears any write not
// covered by a completed flush) and complete I/O out of order.
//
// What is checked:
// - after any sequence every read equals the model;
// - reads concurrent with writes to the same sectors return, per sector, the
//   old or the new content, and later reads the new;
// - after a clean restart everything reads back exactly;
// - after a power cut, every sector reads as what the last completed FLUSH
//   (or a FUA write) left there, or as one of the writes since: never
//   anything else, and - read once - it stays so (the state a power cut
//   leaves is the new durable state: a second cut cannot change it).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { CrashableBlockDevice } from '../../src/blockdev/crashable.ts';
import type { BlockDevice } from '../../src/blockdev/types.ts';
import type { CachedDev } from '../../src/bcache/cached-dev.ts';
import {
  CACHE_MODE_NONE,
  CACHE_MODE_WRITEAROUND,
  CACHE_MODE_WRITEBACK,
  CACHE_MODE_WRITETHROUGH,
} from '../../src/format/constants.ts';
import { Registry } from '../../src/bcache/registry.ts';
import { Worker } from '../../src/util/lifecycle.ts';
import { setLogSink } from '../../src/util/log.ts';
import { assertNothingLeft, checkMarks, formatCache } from './helpers.ts';
import { formatBacking, JitterDevice } from './request-helpers.ts';

const S = 512;
/** The bcache device's size in sectors (the model's address space). */
const SECTORS = Number(process.env['UBCACHE_MODEL_SECTORS'] ?? 16384);
const DATA_OFFSET = 16;
const BUCKET = 16;
// 1100 buckets: 8 journal buckets. With 4 (600 buckets) the engine's journal
// once found its ring full of needed entries at bring-up after a power cut
// and failed ("the ring is full and the reserved block is gone", about 1 run
// in 100), until the spare bucket became the reserve then (docs/simulation.md,
// fill seed 14); UBCACHE_MODEL_NBUCKETS=600 runs that geometry (1000 runs
// each of writethrough and writeback passed on 2026-12-07).
const NBUCKETS = Number(process.env['UBCACHE_MODEL_NBUCKETS'] ?? 1100);

type Op =
  | { t: 'write'; start: number; len: number; fua: boolean }
  | { t: 'read'; start: number; len: number }
  | { t: 'flush' }
  | { t: 'trim'; start: number; len: number }
  | { t: 'zero'; start: number; len: number }
  | { t: 'mode'; mode: number }
  | { t: 'batch'; writes: Array<{ start: number; len: number }>; reads: Array<{ start: number; len: number }> }
  | { t: 'restart' }
  | { t: 'crash'; seed: number }
  | { t: 'gc' };

const MODES = [CACHE_MODE_WRITETHROUGH, CACHE_MODE_WRITEBACK, CACHE_MODE_WRITEAROUND, CACHE_MODE_NONE];
const MODE_NAMES = ['writethrough', 'writeback', 'writearound', 'none'];

/** A range, mostly aligned to 4 KiB blocks, sometimes not. */
function rangeArb(maxLen: number): fc.Arbitrary<{ start: number; len: number }> {
  return fc
    .oneof(
      { weight: 4, arbitrary: fc.record({ b: fc.nat(SECTORS / 8 - 1), n: fc.integer({ min: 1, max: maxLen / 8 }) }) },
      { weight: 1, arbitrary: fc.record({ b: fc.nat(SECTORS - 1), n: fc.integer({ min: 1, max: maxLen }) }) },
    )
    .map((r) => {
      const aligned = r.b < SECTORS / 8 && r.n <= maxLen / 8 && (r.b + r.n) * 8 <= SECTORS;
      const start = aligned ? r.b * 8 : r.b;
      const len = aligned ? r.n * 8 : Math.min(r.n, SECTORS - r.b);
      return { start, len };
    });
}

const opArb: fc.Arbitrary<Op> = fc.oneof(
  {
    weight: 10,
    arbitrary: fc
      .record({ r: rangeArb(128), fua: fc.boolean() })
      .map(({ r, fua }) => ({ t: 'write' as const, ...r, fua: fua && r.len % 3 === 0 })),
  },
  { weight: 8, arbitrary: rangeArb(256).map((r) => ({ t: 'read' as const, ...r })) },
  { weight: 3, arbitrary: fc.constant({ t: 'flush' as const }) },
  { weight: 1, arbitrary: rangeArb(64).map((r) => ({ t: 'trim' as const, ...r })) },
  { weight: 1, arbitrary: rangeArb(64).map((r) => ({ t: 'zero' as const, ...r })) },
  { weight: 1, arbitrary: fc.constantFrom(...MODES).map((mode) => ({ t: 'mode' as const, mode })) },
  {
    weight: 3,
    arbitrary: fc
      .record({ writes: fc.array(rangeArb(64), { maxLength: 6 }), reads: fc.array(rangeArb(64), { maxLength: 6 }) })
      .map(({ writes, reads }) => {
        // Writes in a batch do not overlap each other (their order is undefined).
        const kept: Array<{ start: number; len: number }> = [];
        for (const w of writes) {
          if (kept.every((k) => w.start + w.len <= k.start || k.start + k.len <= w.start)) kept.push(w);
        }
        return { t: 'batch' as const, writes: kept, reads };
      }),
  },
  { weight: 1, arbitrary: fc.constant({ t: 'restart' as const }) },
  { weight: 1, arbitrary: fc.integer({ min: 1, max: 1 << 30 }).map((seed) => ({ t: 'crash' as const, seed })) },
  { weight: 1, arbitrary: fc.constant({ t: 'gc' as const }) },
);

/** Sector content: (value, sector) in the first 8 bytes, then a filler derived from both. 0 = zeroes. */
function fill(buf: Buffer, at: number, value: number, sector: number): void {
  const b = buf.subarray(at * S, (at + 1) * S);
  if (value === 0) {
    b.fill(0);
    return;
  }
  b.writeUInt32LE(value, 0);
  b.writeUInt32LE(sector, 4);
  b.fill((value * 31 + sector) & 0xff, 8);
}

function decode(buf: Buffer, at: number, sector: number): number {
  const b = buf.subarray(at * S, (at + 1) * S);
  const value = b.readUInt32LE(0);
  if (value === 0 && b.every((x) => x === 0)) return 0;
  const expected = Buffer.alloc(S);
  fill(expected, 0, value, sector);
  if (!b.equals(expected)) return -1;
  return value;
}

class Model {
  /** What a read returns now. */
  cur = new Int32Array(SECTORS);
  /** What survives a power cut for sure. */
  stable = new Int32Array(SECTORS);
  /** Values written since the sector was last stable. */
  since = new Map<number, Set<number>>();

  write(start: number, len: number, value: number, fua: boolean): void {
    for (let s = start; s < start + len; s++) {
      this.cur[s] = value;
      if (fua) {
        this.stable[s] = value;
        this.since.delete(s);
      } else {
        let set = this.since.get(s);
        if (!set) this.since.set(s, (set = new Set()));
        set.add(value);
      }
    }
  }

  flush(): void {
    this.stable.set(this.cur);
    this.since.clear();
  }

  /** May sector `s` read as `v` after a power cut? */
  allowedAfterCrash(s: number, v: number): boolean {
    return this.stable[s] === v || (this.since.get(s)?.has(v) ?? false);
  }
}

interface Real {
  cache: CrashableBlockDevice;
  backing: CrashableBlockDevice;
  registry: Registry;
  dev: CachedDev;
  bdev: BlockDevice;
  seed: number;
}

async function start(cache: CrashableBlockDevice, backing: CrashableBlockDevice, seed: number): Promise<Real> {
  const registry = new Registry({
    setOptions: {
      journalDelayMs: seed % 3 === 0 ? 40 : 2,
      seed,
      gcSectors: 2048,
      gcSliceMs: 0,
      btreeCacheSize: 64 * 1024,
    },
    deviceSettings: () => ({ writebackDelay: 0, writebackPercent: 0, sequentialCutoff: 256 * 1024 }),
  });
  try {
    const c = await registry.register(new JitterDevice(cache, seed));
    const b = await registry.register(new JitterDevice(backing, seed + 1));
    assert.equal(c.kind, 'cache');
    if (b.kind !== 'backing') throw new Error('the backing device registered as a cache');
    assert.ok(b.dev.attached, 'the backing device attached');
    return { cache, backing, registry, dev: b.dev, bdev: b.dev.device, seed };
  } catch (err) {
    await registry.stopAll();
    throw err;
  }
}

async function readAll(r: Real): Promise<Buffer> {
  const buf = Buffer.alloc(SECTORS * S);
  const chunk = 512;
  for (let s = 0; s < SECTORS; s += chunk) await r.bdev.read(buf.subarray(s * S, (s + chunk) * S), s * S);
  return buf;
}

async function run(ops: Op[], mode: number, seed: number, blockSize: number): Promise<void> {
  // 8 KiB buckets with 512-byte blocks; with 4 KiB blocks, 16 KiB buckets (a journal bucket of two
  // blocks leaves the journal no room to turn around in).
  const bucket = blockSize === 1 ? BUCKET : 2 * BUCKET;
  const cache = new CrashableBlockDevice((NBUCKETS + 1) * bucket * S, { name: 'cache' });
  const backing = new CrashableBlockDevice((SECTORS + DATA_OFFSET) * S, { name: 'backing' });
  const setUuid = Buffer.alloc(16, seed & 0xff);
  setUuid.writeUInt32LE(seed >>> 0, 0);
  await formatCache(cache, { bucketSize: bucket, blockSize, setUuid });
  await formatBacking(backing, { setUuid, dataOffset: DATA_OFFSET, writeback: mode === CACHE_MODE_WRITEBACK });
  let real = await start(cache, backing, seed);
  if (mode !== CACHE_MODE_WRITEBACK) await real.dev.setCacheMode(mode);
  const m = new Model();
  let nextValue = 1;
  let step = 0;
  const where = (op: Op): string => `step ${step} (${JSON.stringify(op)}), mode ${MODE_NAMES[real.dev.cacheMode]}`;

  const checkRead = (buf: Buffer, start: number, len: number, op: Op, concurrent?: Map<number, number>): void => {
    for (let i = 0; i < len; i++) {
      const s = start + i;
      const got = decode(buf, i, s);
      const want = m.cur[s] ?? 0;
      if (got === want) continue;
      const alt = concurrent?.get(s);
      if (alt !== undefined && got === alt) continue;
      assert.fail(`${where(op)}: sector ${s} reads ${got}, expected ${want}${alt !== undefined ? ` or ${alt}` : ''}`);
    }
  };

  try {
    for (const op of ops) {
      step++;
      await watchdog(where(op), () => apply(op));
    }
    // Finally: everything reads back, and stops cleanly.
    const all = await readAll(real);
    checkRead(all, 0, SECTORS, { t: 'read', start: 0, len: SECTORS });
  } finally {
    const restore = setLogSink(() => undefined);
    try {
      await watchdog('final stop', () => real.registry.stopAll());
    } finally {
      restore();
    }
  }

  async function apply(op: Op): Promise<void> {
    switch (op.t) {
      case 'write': {
        const v = nextValue++;
        const buf = Buffer.alloc(op.len * S);
        for (let i = 0; i < op.len; i++) fill(buf, i, v, op.start + i);
        await real.bdev.write(buf, op.start * S, { fua: op.fua });
        m.write(op.start, op.len, v, op.fua);
        break;
      }
      case 'read': {
        const buf = Buffer.alloc(op.len * S);
        await real.bdev.read(buf, op.start * S);
        checkRead(buf, op.start, op.len, op);
        break;
      }
      case 'flush':
        await real.bdev.flush();
        m.flush();
        break;
      case 'trim':
        await real.bdev.discard(op.start * S, op.len * S);
        m.write(op.start, op.len, 0, false);
        break;
      case 'zero':
        await real.bdev.writeZeroes(op.start * S, op.len * S);
        m.write(op.start, op.len, 0, false);
        break;
      case 'mode':
        await real.dev.setCacheMode(op.mode);
        break;
      case 'gc': {
        const cs = real.dev.attachment?.cs;
        if (cs) {
          await cs.runGc();
          // Whatever the mode switches, restarts and power cuts before: marks and dirty counts agree with the tree.
          assert.deepEqual(await checkMarks(cs), [], 'bucket marks and dirty counts');
        }
        break;
      }
      case 'batch': {
        // Old values of sectors being written: a concurrent read may see them.
        const old = new Map<number, number>();
        const values = op.writes.map(() => nextValue++);
        op.writes.forEach((w) => {
          for (let s = w.start; s < w.start + w.len; s++) old.set(s, m.cur[s] ?? 0);
        });
        const wp = op.writes.map((w, i) => {
          const v = values[i] ?? 0;
          const buf = Buffer.alloc(w.len * S);
          for (let j = 0; j < w.len; j++) fill(buf, j, v, w.start + j);
          return real.bdev.write(buf, w.start * S);
        });
        const rp = op.reads.map(async (r) => {
          const buf = Buffer.alloc(r.len * S);
          await real.bdev.read(buf, r.start * S);
          return buf;
        });
        const [, bufs] = await Promise.all([Promise.all(wp), Promise.all(rp)]);
        op.writes.forEach((w, i) => {
          m.write(w.start, w.len, values[i] ?? 0, false);
        });
        // A read concurrent with a write sees, per sector, the old or the new content.
        op.reads.forEach((r, i) => {
          const buf = bufs[i] as Buffer;
          checkRead(buf, r.start, r.len, op, old);
        });
        break;
      }
      case 'restart': {
        await real.registry.stopAll();
        // A clean stop leaves nothing volatile: even a power cut now loses nothing.
        const c = real.cache.powerCut(real.seed);
        const b = real.backing.powerCut(real.seed + 7);
        real = await start(c, b, real.seed + 1);
        const all = await readAll(real);
        checkRead(all, 0, SECTORS, op);
        m.flush();
        break;
      }
      case 'crash': {
        const c = real.cache.powerCut(op.seed);
        const b = real.backing.powerCut(op.seed ^ 0x5555);
        const old = real.registry;
        // The old daemon is gone: its devices fail everything; let it wind down.
        const restore = setLogSink(() => undefined);
        try {
          await old.stopAll();
        } finally {
          restore();
        }
        real = await start(c, b, op.seed);
        const all = await readAll(real);
        for (let s = 0; s < SECTORS; s++) {
          const got = decode(all, s, s);
          if (!m.allowedAfterCrash(s, got)) {
            const options = [m.stable[s], ...(m.since.get(s) ?? [])];
            assert.fail(`${where(op)}: after the power cut sector ${s} reads ${got}; allowed: ${options.join(', ')}`);
          }
          m.cur[s] = got;
        }
        m.flush();
        break;
      }
    }
  }
}

/** Fail (naming the step and what is still running) instead of hanging. */
async function watchdog(what: string, fn: () => Promise<void>): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  const hang = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      const workers = [...Worker.live()].map((w) => w.name).join(', ');
      reject(new Error(`${what}: no progress in 30 s; workers alive: ${workers}`));
    }, 30_000);
  });
  try {
    await Promise.race([fn(), hang]);
  } finally {
    clearTimeout(timer);
  }
}

const RUNS = Number(process.env['UBCACHE_MODEL_RUNS'] ?? 12);

for (const mode of MODES) {
  test(`model: ${MODE_NAMES[mode]}`, async () => {
    const restore = setLogSink((level, line) => {
      if (level === 'error') process.stderr.write(`${line}\n`);
    });
    try {
      await fc.assert(
        fc.asyncProperty(
          fc.array(opArb, { minLength: 10, maxLength: 80 }),
          fc.integer({ min: 1, max: 1 << 30 }),
          fc.constantFrom(...(process.env['UBCACHE_MODEL_BS'] ?? '1,8').split(',').map(Number)),
          (ops, seed, blockSize) => run(ops, mode, seed, blockSize),
        ),
        {
          numRuns: RUNS,
          endOnFailure: true,
          includeErrorInReport: true,
          ...(process.env['UBCACHE_MODEL_SEED'] ? { seed: Number(process.env['UBCACHE_MODEL_SEED']) } : {}),
          ...(process.env['UBCACHE_MODEL_PATH'] ? { path: process.env['UBCACHE_MODEL_PATH'] } : {}),
        },
      );
    } finally {
      restore();
    }
    assertNothingLeft();
  });
}

// Found by a hunt of 2000 runs (fast-check seed 395392606, path 91): a
// write left dirty, written back and its buckets reused; a power cut's
// replay then brought its dirty keys back from an old jset, stale. They are
// no dirty data (their buckets' gens moved on, which the allocator allows
// only once nothing dirty is left in them): reads of the range go to the
// backing device, which holds the data, and no dirty count includes them.
// checkMarks once counted them as dirty and failed here.
test('model: stale dirty keys replayed after a power cut count nowhere (writeback)', async () => {
  const ops: Op[] = [
    { t: 'write', start: 3064, len: 112, fua: false },
    { t: 'restart' },
    {
      t: 'batch',
      writes: [{ start: 5056, len: 8 }],
      reads: [
        { start: 11320, len: 56 },
        { start: 4336, len: 40 },
        { start: 2720, len: 8 },
        { start: 11888, len: 16 },
      ],
    },
    { t: 'read', start: 1352, len: 208 },
    { t: 'write', start: 12576, len: 128, fua: false },
    { t: 'write', start: 11111, len: 55, fua: false },
    { t: 'write', start: 1904, len: 80, fua: false },
    { t: 'read', start: 3208, len: 16 },
    { t: 'zero', start: 8544, len: 40 },
    { t: 'flush' },
    { t: 'crash', seed: 93724271 },
    { t: 'flush' },
    { t: 'gc' },
  ];
  await run(ops, CACHE_MODE_WRITEBACK, 25, 8);
  assertNothingLeft();
});
