// readNow(), the hit path without a promise: it serves a whole cached extent
// here and now, counted exactly as read() counts a hit, and otherwise does
// nothing the caller could tell from not having called it. The seeded test
// reads through readNow() first and read() when it declines, against a model
// of the data, and checks the counters around every readNow(). (Two devices
// run in step, one with read() alone, are not comparable: a miss's fill
// takes only the space the allocator has ready, which its own timing decides.)

import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { CacheCounters } from '../../src/bcache/stats.ts';
import { Prng } from '../../src/util/prng.ts';
import { assertNothingLeft } from './helpers.ts';
import { makePair, mem, MiB, pattern, type Pair } from './request-helpers.ts';
import { seedsFromEnv } from '../helpers/seeds.ts';

const S = 512;

/** Everything a read may count: the device's and the set's counters, the cache device's sectors read, hits served from memory. */
function counters(p: Pair): { dev: CacheCounters; set: CacheCounters; cacheSectorsRead: number; ramHits: number } {
  return {
    dev: { ...p.dev.stats.total },
    set: { ...p.set.stats.total },
    cacheSectorsRead: p.set.cs.io.stats.sectorsRead,
    ramHits: p.set.cs.ramCache.stats.hits,
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
  test(`readNow over a seeded workload: the model's data when it serves, one hit counted; nothing counted when it declines (seed ${seed})`, async (t) => {
    const rng = new Prng(seed);
    const p = await makePair({
      backing: { writeback: rng.bool() },
      // Writeback off: its reads of dirty data from the cache run on timers, not in step with the workload.
      settings: {
        sequentialCutoff: rng.bool() ? 0 : 64 * 1024,
        readahead: rng.bool() ? 0 : 16 * 1024,
        writebackRunning: false,
      },
    });
    t.after(async () => {
      await p.registry.stopAll();
      assertNothingLeft();
    });
    const d = p.dev.device;
    const span = 4 * MiB;
    // The model: what each byte of the span holds; a discarded sector holds anything.
    const model = Buffer.alloc(span);
    for (let i = 0; i < span; i += 4096) model.writeUInt32LE(i, i);
    mem(p.backingDev).writeSync(model, p.dev.dataOffset * S);
    const known = new Uint8Array(span / S).fill(1);
    let next = 0;
    let servedNow = 0;
    let servedFromRam = 0;
    let declined = 0;
    for (let step = 0; step < 300; step++) {
      const r = rng.below(10);
      // Mostly 4 KiB aligned, sometimes 512-byte aligned (bypassed), half in a hot 256 KiB, some continuing the last request (sequential).
      const unit = rng.below(8) === 0 ? S : 4096;
      const length = unit * (1 + rng.below(16));
      const within = rng.bool() ? 256 * 1024 : span;
      const offset = rng.below(4) === 0 ? next : unit * rng.below((within - length) / unit);
      next = offset + length <= span - 64 * 1024 ? offset + length : 0;
      if (r < 3) {
        const data = pattern(step, offset / S, length / S);
        await d.write(data, offset);
        data.copy(model, offset);
        known.fill(1, offset / S, (offset + length) / S);
      } else if (r < 4) {
        await d.discard(offset, length);
        known.fill(0, offset / S, (offset + length) / S);
      } else {
        const buf = Buffer.alloc(length);
        const before = counters(p);
        if (d.readNow(buf, offset)) {
          servedNow++;
          const after = counters(p);
          const hits = (c: typeof after): number => c.dev.cacheHits + c.dev.cacheBypassHits;
          assert.equal(hits(after), hits(before) + 1, `step ${step}: one hit counted`);
          assert.deepEqual(after.set, after.dev, 'the set counts as its only device does');
          assert.equal(
            after.dev.cacheMisses + after.dev.cacheBypassMisses,
            before.dev.cacheMisses + before.dev.cacheBypassMisses,
          );
          // Served from the copies in memory (ram-cache.ts) or read from the cache device, not both.
          const fromRam = after.ramHits - before.ramHits;
          assert.ok(fromRam === 0 || fromRam === 1, `step ${step}: ${fromRam} hits from memory`);
          assert.equal(
            after.cacheSectorsRead,
            before.cacheSectorsRead + (fromRam === 1 ? 0 : length / S),
            `step ${step}: sectors read from the cache device`,
          );
          servedFromRam += fromRam;
        } else {
          declined++;
          assert.deepEqual(counters(p), before, `step ${step}: declined, nothing counted`);
          await d.read(buf, offset);
        }
        for (let s = 0; s < length / S; s++) {
          const at = offset + s * S;
          if (known[at / S])
            assert.ok(
              buf.subarray(s * S, (s + 1) * S).equals(model.subarray(at, at + S)),
              `step ${step}: sector ${at / S}`,
            );
        }
      }
      await p.dev.request.settle();
    }
    assert.ok(servedNow >= 10 && declined >= 10, `readNow served ${servedNow} reads and declined ${declined}`);
    t.diagnostic(`served ${servedNow} (${servedFromRam} from memory), declined ${declined}`);
  });
}

// The copies of hot blocks in memory (ram-cache.ts) are keyed by where the
// data is on the cache device; a small cache under random writes reuses
// every bucket many times over, so the same sectors hold one block's data,
// then another's. Reads of a hot set, through readNow first, must see the
// model's data throughout.
for (const seed of seedsFromEnv('UBCACHE_RAM_REUSE_SEEDS', 1, 3)) {
  test(`hits served from memory stay right while the cache reuses its buckets (seed ${seed})`, async (t) => {
    const rng = new Prng(seed);
    const p = await makePair({
      cacheBytes: 8 * MiB,
      cache: { bucketSize: 16 }, // 1024 buckets of 8 KiB
      backingBytes: 24 * MiB,
      settings: { sequentialCutoff: 0, writebackRunning: false },
    });
    t.after(async () => {
      await p.registry.stopAll();
      assertNothingLeft();
    });
    const d = p.dev.device;
    const blocks = 4096; // 16 MiB of 4 KiB blocks, twice the cache
    const model = Buffer.alloc(blocks * 4096);
    const hot = 64;
    const pick = (): number => (rng.below(2) === 0 ? rng.below(hot) : rng.below(blocks));
    for (let step = 0; step < 6000; step++) {
      const block = pick();
      if (rng.below(3) === 0) {
        const data = pattern(step, block * 8, 8);
        await d.write(data, block * 4096);
        data.copy(model, block * 4096);
      } else {
        const buf = Buffer.alloc(4096);
        if (!d.readNow(buf, block * 4096)) await d.read(buf, block * 4096);
        assert.ok(buf.equals(model.subarray(block * 4096, (block + 1) * 4096)), `step ${step}: block ${block}`);
      }
      await p.dev.request.settle();
    }
    const ram = p.set.cs.ramCache.stats;
    const invalidated = p.set.cs.allocator.stats.invalidated;
    t.diagnostic(`from memory ${ram.hits}, admitted ${ram.admitted}, buckets invalidated ${invalidated}`);
    assert.ok(ram.hits > 500, `${ram.hits} hits from memory`);
    assert.ok(invalidated > 2000, `${invalidated} buckets invalidated: the cache's 1024 buckets were reused`);
  });
}
