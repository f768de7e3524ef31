// readNow(), the hit path without a promise: it serves a whole cached extent
// here and now, counted exactly as read() counts it, and otherwise does
// nothing the caller could tell from not having called it. The property test
// runs the same seeded workload through two identical devices, one reading
// with readNow() first and read() when it declines, one with read() alone,
// and asks for the same data and the same counters after every step.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Prng } from '../../src/util/prng.ts';
import { assertNothingLeft } from './helpers.ts';
import { makePair, mem, MiB, pattern, type Pair } from './request-helpers.ts';
import { seedsFromEnv } from '../helpers/seeds.ts';

const S = 512;

/** Everything a read may count: the device's and the set's counters, the cache device's sectors read. */
function counters(p: Pair): unknown {
  return {
    dev: { ...p.dev.stats.total },
    set: { ...p.set.stats.total },
    cacheSectorsRead: p.set.cs.io.stats.sectorsRead,
  };
}

test('readNow serves a whole cached extent here and now, counted as read() counts a hit; anything else declines with nothing counted', async () => {
  const p = await makePair({ backing: { writeback: true }, settings: { sequentialCutoff: 0 } });
  const d = p.dev.device;
  const readNow = d.readNow.bind(d);
  await d.write(pattern(1, 64, 16), 64 * S);

  // A hit: the data, one hit counted, as read() would.
  const before = counters(p);
  const buf = Buffer.alloc(16 * S);
  assert.equal(readNow(buf, 64 * S), true);
  assert.deepEqual(buf, pattern(1, 64, 16));
  assert.equal(p.dev.stats.total.cacheHits, 1);
  assert.equal(p.set.stats.total.cacheHits, 1);
  await d.read(Buffer.alloc(16 * S), 64 * S);
  assert.equal(p.dev.stats.total.cacheHits, 2, 'read() counts the same hit the same way');
  assert.notDeepEqual(counters(p), before);

  // Declined, nothing counted: a miss, a range half cached, unaligned or out
  // of range, an empty read.
  const declined = (what: string, b: Buffer, offset: number): void => {
    const c = counters(p);
    assert.equal(readNow(b, offset), false, what);
    assert.deepEqual(counters(p), c, `${what}: nothing counted`);
  };
  declined('a miss', Buffer.alloc(8 * S), 512 * S);
  declined('half cached', Buffer.alloc(32 * S), 64 * S);
  declined('unaligned', Buffer.alloc(100), 64 * S);
  declined('past the end', Buffer.alloc(8 * S), d.size);
  declined('empty', Buffer.alloc(0), 64 * S);

  // A device with I/O disabled, and one detached, decline too; read() says why or reads the backing device.
  p.dev.settings.ioDisable = true;
  declined('io_disable', Buffer.alloc(8 * S), 64 * S);
  await assert.rejects(d.read(Buffer.alloc(8 * S), 64 * S), { code: 'EIO' });
  p.dev.settings.ioDisable = false;
  await p.registry.stopAll();
  declined('stopped', Buffer.alloc(8 * S), 64 * S);
  assertNothingLeft();
});

test('readNow counts a sequential hit past sequential_cutoff as a bypassed hit, as read() does', async () => {
  const p = await makePair({ backing: { writeback: true }, settings: { sequentialCutoff: 0 } });
  const d = p.dev.device;
  await d.write(pattern(2, 0, 512), 0);
  p.dev.settings.sequentialCutoff = 64 * 1024;
  const chunk = 32 * 1024;
  for (let i = 0; i < 8; i++) {
    const buf = Buffer.alloc(chunk);
    assert.equal(d.readNow(buf, i * chunk), true);
    assert.deepEqual(buf, pattern(2, (i * chunk) / S, chunk / S));
  }
  // The 2nd request makes the stream 64 KiB long: from then on it counts as bypassed.
  assert.equal(p.dev.stats.total.cacheHits, 1);
  assert.equal(p.dev.stats.total.cacheBypassHits, 7);
  await p.registry.stopAll();
  assertNothingLeft();
});

for (const seed of seedsFromEnv('UBCACHE_READNOW_SEEDS', 1, 12)) {
  test(`readNow, then read() when it declines, is read(): the same data and counters (seed ${seed})`, async (t) => {
    const rng = new Prng(seed);
    const writeback = rng.bool();
    const options = {
      backing: { writeback },
      // Writeback off: its reads of dirty data from the cache run on timers, not in step with the workload.
      settings: {
        sequentialCutoff: rng.bool() ? 0 : 64 * 1024,
        readahead: rng.bool() ? 0 : 16 * 1024,
        writebackRunning: false,
      },
    };
    const a = await makePair(options);
    const b = await makePair(options);
    t.after(async () => {
      await a.registry.stopAll();
      await b.registry.stopAll();
      assertNothingLeft();
    });
    const initial = Buffer.alloc(4 * MiB);
    for (let i = 0; i < initial.length; i += 4096) initial.writeUInt32LE(i, i);
    for (const p of [a, b]) mem(p.backingDev).writeSync(initial, p.dev.dataOffset * S);
    const span = 4 * MiB;
    let next = 0;
    let servedNow = 0;
    for (let step = 0; step < 300; step++) {
      const r = rng.below(10);
      // Mostly 4 KiB aligned, sometimes 512-byte aligned (bypassed), sometimes continuing the last request (sequential).
      const unit = rng.below(8) === 0 ? S : 4096;
      const length = unit * (1 + rng.below(16));
      // Half of the requests in a hot 256 KiB, so that reads hit often.
      const within = rng.bool() ? 256 * 1024 : span;
      const offset = rng.below(4) === 0 ? next : unit * rng.below((within - length) / unit);
      next = offset + length <= span - 64 * 1024 ? offset + length : 0;
      if (r < 3) {
        const data = pattern(step, offset / S, length / S);
        await Promise.all([a.dev.device.write(data, offset), b.dev.device.write(data, offset)]);
      } else if (r < 4) {
        await Promise.all([a.dev.device.discard(offset, length), b.dev.device.discard(offset, length)]);
      } else {
        const ba = Buffer.alloc(length);
        const bb = Buffer.alloc(length);
        if (a.dev.device.readNow(ba, offset)) servedNow++;
        else await a.dev.device.read(ba, offset);
        await b.dev.device.read(bb, offset);
        assert.deepEqual(ba, bb, `step ${step}: read ${offset}+${length}`);
      }
      await Promise.all([a.dev.request.settle(), b.dev.request.settle()]);
      assert.deepEqual(counters(a), counters(b), `step ${step}: counters`);
    }
    assert.ok(servedNow >= 10, `readNow served reads (${servedNow} of ${a.dev.stats.total.cacheHits} hits)`);
  });
}
