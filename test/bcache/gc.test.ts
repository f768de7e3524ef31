// GC recomputes each bucket's mark and usage from the btree: dirty data,
// clean data, metadata (nodes, journal, prios, uuids) and free buckets; a
// stale-heavy leaf is rewritten.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryBlockDevice } from '../../src/blockdev/memory.ts';
import { GC_MARK_DIRTY, GC_MARK_FREE, GC_MARK_METADATA, GC_MARK_RECLAIMABLE } from '../../src/bcache/buckets.ts';
import { CacheSet } from '../../src/bcache/cache-set.ts';
import { assertNothingLeft, checkMarks, formatCache } from './helpers.ts';
import { Prng } from '../../src/util/prng.ts';
import { writeExtent } from './model.ts';

const MiB = 1024 * 1024;

test('marks after GC: dirty, clean, metadata and free buckets, and what is available', async () => {
  const dev = new MemoryBlockDevice(32 * MiB);
  await formatCache(dev, { bucketSize: 64 });
  const cs = await CacheSet.open(dev, { closeDevice: false });
  const dirty = await writeExtent(cs, 1, 0, 64, 1, true);
  const clean = await writeExtent(cs, 2, 0, 64, 2, false);
  await cs.runGc();
  const b = cs.buckets;
  const bucketOf = (k: (typeof dirty)[number]): number => b.bucketOf(k.ptrs[0] as (typeof k.ptrs)[number]);
  for (const k of dirty) assert.equal(b.mark[bucketOf(k)], GC_MARK_DIRTY);
  // Open buckets are pinned and keep their live marks; the others are recomputed.
  for (const k of clean)
    assert.ok(b.mark[bucketOf(k)] === GC_MARK_RECLAIMABLE || b.mark[bucketOf(k)] === GC_MARK_DIRTY);
  for (const j of cs.journal.ring) assert.equal(b.mark[j], GC_MARK_METADATA, `journal bucket ${j}`);
  for (const p of cs.prios.current) assert.equal(b.mark[p], GC_MARK_METADATA, `prio bucket ${p}`);
  assert.equal(b.mark[cs.uuids.bucket ?? -1], GC_MARK_METADATA, 'uuid bucket');
  assert.equal(b.mark[Math.floor(cs.btree.root.bucketSector / 64)], GC_MARK_METADATA, 'root node');
  let avail = 0;
  for (let i = b.firstBucket; i < b.nbuckets; i++) {
    if (b.pin[i] === 0 && (b.mark[i] === GC_MARK_FREE || b.mark[i] === GC_MARK_RECLAIMABLE)) avail++;
  }
  assert.equal(cs.allocator.avail, avail);
  assert.equal(cs.inUse, Math.floor(((b.nbuckets - avail) * 100) / b.nbuckets));
  assert.equal(cs.stats.gc.data, 128);
  // Overwrite the dirty data: its bucket has nothing live, GC frees it.
  await cs.invalidate(1, 0, 64);
  await cs.runGc();
  const first = dirty[0];
  assert.ok(first);
  const wasDirty = bucketOf(first);
  if (b.pin[wasDirty] === 0) assert.equal(b.mark[wasDirty], GC_MARK_FREE);
  await cs.stop();
  assertNothingLeft();
});

test('a leaf whose keys went mostly stale is rewritten by GC', async () => {
  const dev = new MemoryBlockDevice(4 * MiB);
  // FIFO replacement: the oldest buckets are reused first, whatever the
  // priorities GC and the allocator have computed by then (with LRU, which
  // leaf went stale depended on how far they had got).
  await formatCache(dev, { bucketSize: 8, blockSize: 1, replacement: 1 });
  const cs = await CacheSet.open(dev, { closeDevice: false, journalDelayMs: 1 });
  // Many small clean keys in one inode, then enough other clean data to cycle
  // the cache. The other data goes in rising order after them, so no insert
  // lands in the first leaf again (an insert would drop its stale keys): only
  // GC can clean it.
  for (let i = 0; i < 100; i++) await writeExtent(cs, 0, i * 8, 4, i + 1, false);
  for (let i = 0; i < 1200; i++) await writeExtent(cs, 1, 100_000 + i * 8, 8, 1000 + i, false);
  await cs.runGc();
  await cs.runGc();
  assert.ok(cs.stats.gc.rewrites > 0, `GC rewrote stale leaves (${cs.stats.gc.rewrites})`);
  assert.deepEqual(await cs.btree.verify(), []);
  await cs.stop();
});

test('GC in slices while writes land: marks stay right for keys inserted behind the walk', async () => {
  // 32 KiB buckets hold several writes, so writes go on during a pass without
  // waiting for the allocator; tiny nodes make the walk many slices (one per
  // leaf with gcSliceMs 0). Inode 2 gets many keys first, so each pass spends
  // most of its slices there, while the writes go to inode 1, which the walk
  // has passed: their buckets fill up and are released during the pass
  // without the walk seeing a single key in them. The pass must keep their
  // live marks, or the allocator could invalidate a bucket of dirty data.
  const dev = new MemoryBlockDevice(24 * MiB);
  await formatCache(dev, { bucketSize: 64, blockSize: 1 });
  // Between its first slices a pass waits for a write to land (or a bound of
  // macrotask turns, should writes be waiting for something the pass holds),
  // so writes land behind the walk on a fast machine as on a slow one.
  let running = false;
  let writes = 0;
  let wrote: (() => void) | undefined;
  let slicesThisPass = 0;
  const turns = async (n: number): Promise<void> => {
    for (let i = 0; i < n; i++) await new Promise<void>((resolve) => setImmediate(resolve));
  };
  const gcYield = async (): Promise<void> => {
    if (!running || slicesThisPass++ >= 24) return turns(1);
    await Promise.race([new Promise<void>((resolve) => (wrote = resolve)), turns(1000)]);
  };
  const cs = await CacheSet.open(dev, {
    closeDevice: false,
    journalDelayMs: 1,
    gcSliceMs: 0,
    btreeNodeSectors: 2,
    gcSectors: 1 << 30,
    gcYield,
  });
  try {
    const rng = new Prng(7);
    for (let i = 0; i < 1500; i++) await writeExtent(cs, 2, i * 4, 2, i, false);
    running = true;
    // One lane writes dirty data over a small range (bounded, as the writeback
    // cutoffs bound it in a real device: without a writeback worker here,
    // unbounded dirty data would fill the cache for good), the others clean data.
    const writer = async (dirty: boolean): Promise<void> => {
      while (running) {
        await writeExtent(cs, 1, rng.below(dirty ? 200 : 2000) * 8, 8, writes, dirty);
        writes++;
        wrote?.();
      }
    };
    const lanes = [writer(true), writer(false), writer(false), writer(false)];
    let passes = 0;
    let concurrent = 0;
    let sliced = 0;
    try {
      for (let round = 0; round < 8; round++) {
        const before = writes;
        slicesThisPass = 0;
        await cs.runGc();
        passes++;
        if (writes - before >= 16) concurrent++;
        if (cs.gc.stats.lastSlices > 10) sliced++;
        assert.deepEqual(await checkMarks(cs), [], `marks after pass ${passes}`);
      }
    } finally {
      running = false;
      await Promise.all(lanes);
    }
    assert.ok(sliced >= 6, `passes ran in slices (${sliced} of ${passes})`);
    assert.ok(concurrent >= 6, `buckets filled during passes (${concurrent} of ${passes})`);
    assert.deepEqual(await cs.btree.verify(), []);
  } finally {
    await cs.stop();
  }
  assertNothingLeft();
});

test('a pass the countdown starts restarts it: inserts during the pass count towards the next pass, not this one', async () => {
  // bcache resets sectors_to_gc as a pass starts. Reset only at the end, the
  // countdown stayed below zero through the pass, and the first insert during
  // it asked for a second pass straight after: every pass ran twice.
  const GC_SECTORS = 4096;
  const dev = new MemoryBlockDevice(24 * MiB);
  await formatCache(dev, { bucketSize: 64, blockSize: 1 });
  // Set once open (the bring-up's own pass may yield before).
  const box: { cs?: CacheSet } = {};
  let during: number | undefined;
  let inPass: Promise<void> | undefined;
  const gcYield = async (): Promise<void> => {
    // The first yield of the first pass the countdown starts: a write lands.
    const cs = box.cs;
    if (cs && during === undefined && inPass === undefined && cs.gc.stats.runs === 0) {
      inPass = writeExtent(cs, 1, 1_000_000, 8, 1, true).then(() => {
        during = cs.gc.sectorsToGc;
      });
      await inPass;
    }
    await new Promise<void>((resolve) => setImmediate(resolve));
  };
  const cs = await CacheSet.open(dev, {
    closeDevice: false,
    journalDelayMs: 1,
    gcSliceMs: 0,
    btreeNodeSectors: 2,
    gcSectors: GC_SECTORS,
    gcYield,
  });
  box.cs = cs;
  try {
    // Past the countdown: the worker starts a pass (tiny nodes: many slices).
    for (let i = 0; during === undefined && i < 4000; i++) await writeExtent(cs, 2, i * 4, 4, i, false);
    assert.ok(during !== undefined, 'a pass started by the countdown saw a write land');
    assert.equal(during, GC_SECTORS - 8, 'the countdown restarted when the pass began and counted the write since');
    await cs.runGc();
    assert.deepEqual(await checkMarks(cs), []);
  } finally {
    await cs.stop();
  }
  assertNothingLeft();
});

test('writeback marking data clean does not count towards the next GC pass; data written into the cache does', async () => {
  // bcache counts sectors_to_gc where data is written into the cache
  // (bch_data_insert_start), not where writeback's clean key replaces the
  // dirty one: that data was counted when it was written.
  const dev = new MemoryBlockDevice(24 * MiB);
  await formatCache(dev, { bucketSize: 64, blockSize: 1 });
  const cs = await CacheSet.open(dev, { closeDevice: false, journalDelayMs: 1, gcSectors: 1 << 20 });
  try {
    const before = cs.gc.sectorsToGc;
    const [dirty] = await writeExtent(cs, 1, 0, 16, 1, true);
    assert.ok(dirty);
    assert.equal(cs.gc.sectorsToGc, before - 16, 'a write counts');
    const clean = { ...dirty, dirty: false, ptrs: dirty.ptrs.map((p) => ({ ...p })) };
    const r = await cs.insert([clean], { replace: dirty, countForGc: false });
    assert.equal(r.sectors, 16, 'the clean key replaced the dirty one');
    assert.equal(cs.gc.sectorsToGc, before - 16, 'marking it clean does not count');
    // New data written over it counts again.
    const [moved] = await writeExtent(cs, 1, 0, 16, 2, false);
    assert.ok(moved);
    assert.equal(cs.gc.sectorsToGc, before - 32);
  } finally {
    await cs.stop();
  }
  assertNothingLeft();
});
