// The allocator under pressure: a 4 MiB cache of 4 KiB buckets written many
// times over, with each replacement policy, so invalidation, prio writes and
// GC run constantly; dirty data must survive all of it, clean data may go.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryBlockDevice } from '../../src/blockdev/memory.ts';
import { Buckets, GC_MARK_DIRTY, GC_MARK_FREE, GC_MARK_RECLAIMABLE } from '../../src/bcache/buckets.ts';
import { decodePrioBucket } from '../../src/format/prio.ts';
import { setMagic } from '../../src/format/superblock.ts';
import {
  freeIncSize,
  freeReserveSize,
  REPLACEMENT_FIFO,
  REPLACEMENT_LRU,
  REPLACEMENT_RANDOM,
  RESERVE_BTREE,
  RESERVE_NONE,
} from '../../src/bcache/alloc.ts';
import { CacheSet } from '../../src/bcache/cache-set.ts';
import { Prng } from '../../src/util/prng.ts';
import { assertNothingLeft, formatCache } from './helpers.ts';
import { checkRange, IndexModel, writeExtent } from './model.ts';

const MiB = 1024 * 1024;

for (const [name, policy] of [
  ['lru', REPLACEMENT_LRU],
  ['fifo', REPLACEMENT_FIFO],
  ['random', REPLACEMENT_RANDOM],
] as const) {
  test(`${name}: clean data cycles through a small cache, dirty data stays`, async () => {
    const dev = new MemoryBlockDevice(4 * MiB);
    await formatCache(dev, { bucketSize: 8, blockSize: 1, replacement: policy, discard: true });
    const cs = await CacheSet.open(dev, { closeDevice: false, journalDelayMs: 1, seed: 5 });
    const model = new IndexModel(2, 40000);
    const rng = new Prng(policy + 1);
    let seed = 0;
    // Dirty data: a tenth of the cache, which must never be invalidated.
    for (let i = 0; i < 50; i++) {
      const start = i * 16;
      await writeExtent(cs, 0, start, 8, ++seed, true);
      model.set(0, start, start + 8, { seed, dirty: true });
    }
    // Clean data: about four times the cache's size.
    for (let i = 0; i < 2000; i++) {
      const start = rng.below(39000);
      const sectors = 1 + rng.below(16);
      await writeExtent(cs, 1, start, sectors, ++seed, false);
      model.set(1, start, start + sectors, { seed, dirty: false });
    }
    await checkRange(cs, model, 0, 0, 1000);
    await checkRange(cs, model, 1, 0, 40000);
    assert.equal(cs.dirtySectors(0), 400);
    const s = cs.stats;
    assert.ok(s.allocator.invalidated > cs.buckets.nbuckets, `buckets were reused (${s.allocator.invalidated})`);
    assert.ok(s.allocator.prioWrites > 10, `prio writes (${s.allocator.prioWrites})`);
    assert.ok(s.gc.runs > 0, 'GC ran');
    assert.ok(s.io.discards > 0, 'reused buckets were discarded first');
    assert.ok(cs.inUse >= 0 && cs.inUse <= 100);
    assert.equal(cs.cacheAvailablePercent, 100 - cs.inUse);
    await cs.stop();
    assertNothingLeft();
  });
}

test('reserves are sized as the kernel sizes them, free_inc and none larger on small caches', async () => {
  assert.equal(freeReserveSize(1024), 1);
  assert.equal(freeReserveSize(1025), 2);
  assert.equal(freeReserveSize(200000), 256);
  const dev = new MemoryBlockDevice(64 * MiB);
  await formatCache(dev, { bucketSize: 16 });
  const cs = await CacheSet.open(dev, { closeDevice: false });
  const a = cs.allocator;
  // 8192 buckets: the kernel's free_inc would be 32 (4 x 8); a prio write makes 256 usable here, none holds 128.
  assert.equal(freeIncSize(8192), 256);
  assert.equal(freeIncSize(200000), 1024, 'large caches keep the kernel size');
  assert.deepEqual(
    a.free.map((f) => f.capacity),
    [cs.journal.ring.length, cs.prios.count, 8, 128],
  );
  assert.equal(a.freeInc.capacity, 256);
  await cs.stop();
});

test('a bucket is not invalidated while dirty, pinned, or too far ahead of its last GC', () => {
  const b = new Buckets(1024, 8, 1);
  b.mark[5] = GC_MARK_RECLAIMABLE;
  assert.equal(b.canInvalidate(5), true);
  b.mark[5] = GC_MARK_DIRTY;
  assert.equal(b.canInvalidate(5), false);
  b.mark[5] = GC_MARK_RECLAIMABLE;
  b.pinBucket(5);
  assert.equal(b.canInvalidate(5), false);
  b.unpinBucket(5);
  b.gen[5] = 100;
  b.lastGc[5] = 5;
  assert.equal(b.canInvalidate(5), true, '95 generations ahead of the last GC is still fine');
  b.lastGc[5] = 4;
  assert.equal(b.canInvalidate(5), false, 'gen-wrap guard: 96 ahead must wait for GC');
  b.gen[5] = 2;
  b.lastGc[5] = 200;
  assert.equal(b.canInvalidate(5), true, 'gens compare modulo 256');
  assert.throws(() => {
    b.unpinBucket(6);
  }, /unpinned more often than pinned/);
});

test('a waiter whose reserve is empty does not hold up a waiter whose reserve has a bucket', async () => {
  // Data writes wait for RESERVE_NONE, which only invalidation refills; a
  // btree rewrite behind them asks for RESERVE_BTREE, which has buckets. If
  // the rewrite had to wait its turn, and it was the GC pass that
  // invalidation waits for, nothing would ever move (the hang of a nearly
  // full cache).
  const dev = new MemoryBlockDevice(4 * MiB);
  await formatCache(dev, { bucketSize: 8, blockSize: 1 });
  const cs = await CacheSet.open(dev, { closeDevice: false, journalDelayMs: 1 });
  const a = cs.allocator;
  // Stop refilling: no GC and no invalidation from here on.
  await cs.gc.stop();
  await a.stop();
  try {
    // Both reserves empty: a data write and then a btree rewrite wait.
    const spare = a.free[RESERVE_BTREE].pop();
    assert.ok(spare >= 0, 'the btree reserve had a bucket');
    for (const fifo of [a.free[RESERVE_NONE], a.free[RESERVE_BTREE], a.freeInc]) {
      while (!fifo.empty) cs.buckets.unpinBucket(fifo.pop());
    }
    // Waiting needs a running worker: one that never refills (nothing is
    // invalidatable and GC is never asked).
    a.invalidateNeedsGc = true;
    a.start();
    const data = a.alloc(RESERVE_NONE, true);
    const btree = a.alloc(RESERVE_BTREE, true);
    // A bucket comes back to the btree reserve: the rewrite gets it, the data write still waits.
    a.unalloc(spare, RESERVE_BTREE);
    assert.equal(await btree, spare);
    a.unalloc(spare, RESERVE_BTREE);
    await a.stop();
    await assert.rejects(data, /stopped/);
  } finally {
    await cs.stop();
  }
  assertNothingLeft();
});

test('a bucket invalidated with fewer than a prio write needs waits in free_inc until its gen is written', async () => {
  // Invalidation that finds fewer buckets than a prio write needs (here one,
  // where the cache has two prio buckets) waits for GC to find more. The
  // bucket it found has a new gen in memory only: handed out then, data
  // written into it would read as valid through any old pointer after a
  // crash. It must wait for the prio write that covers it.
  const dev = new MemoryBlockDevice(8 * MiB);
  await formatCache(dev, { bucketSize: 8, blockSize: 1 });
  const cs = await CacheSet.open(dev, { closeDevice: false, journalDelayMs: 1 });
  const a = cs.allocator;
  const b = cs.buckets;
  assert.equal(cs.prios.count, 2, 'a cache of 2048 buckets has two prio buckets');
  await cs.gc.stop();
  await a.stop();
  try {
    // The data reserve and free_inc empty; the other reserves stay stocked.
    for (const fifo of [a.free[RESERVE_NONE], a.freeInc]) {
      while (!fifo.empty) b.unpinBucket(fifo.pop());
    }
    // Nothing invalidatable but one bucket; three more join it later.
    const spare: number[] = [];
    for (let i = b.firstBucket; i < b.nbuckets; i++) {
      if (!b.canInvalidate(i)) continue;
      // The other reserves full first (as bring-up stocks them).
      const reserve = a.free.find((f, r) => r !== RESERVE_NONE && !f.full);
      if (reserve) {
        b.invalidate(i);
        reserve.push(i);
        continue;
      }
      spare.push(i);
      b.mark[i] = GC_MARK_DIRTY;
    }
    const [first, ...later] = spare.slice(0, 4);
    assert.ok(first !== undefined && later.length === 3, 'free buckets to work with');
    b.mark[first] = GC_MARK_FREE;
    // The worker asks GC for more once it has invalidated the first: see that moment.
    let askedGc!: () => void;
    const asked = new Promise<void>((resolve) => (askedGc = resolve));
    cs.gc.request = () => {
      askedGc();
    };
    a.gcMarkValid = true;
    a.invalidateNeedsGc = false;
    a.start();
    const got = a.alloc(RESERVE_NONE, true);
    await asked;
    assert.equal(a.freeInc.length, 1, 'the first bucket waits in free_inc for a prio write');
    const prioWrites = a.stats.prioWrites;
    // GC found three more: the worker invalidates them and writes all four gens.
    for (const i of later) b.mark[i] = GC_MARK_FREE;
    a.invalidateNeedsGc = false;
    a.notify();
    const r = await got;
    assert.ok(r !== undefined && spare.includes(r), `a bucket of the four (${r})`);
    assert.ok(a.stats.prioWrites > prioWrites, 'handed out only after a prio write');
    const buf = Buffer.alloc(8 * 512);
    await dev.read(buf, b.sector(cs.prios.current[Math.floor(r / cs.prios.perBucket)] ?? 0) * 512);
    const onDisk = decodePrioBucket(buf, { setMagic: setMagic(cs.sb), bucketSize: 8 });
    assert.equal(onDisk.gens[r % cs.prios.perBucket], b.gen[r], 'its gen on disk is the one it was handed out with');
    a.unalloc(r, RESERVE_NONE);
  } finally {
    await cs.stop();
  }
  assertNothingLeft();
});
