// GC recomputes each bucket's mark and usage from the btree: dirty data,
// clean data, metadata (nodes, journal, prios, uuids) and free buckets; a
// stale-heavy leaf is rewritten.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryBlockDevice } from '../../src/blockdev/memory.ts';
import { GC_MARK_DIRTY, GC_MARK_FREE, GC_MARK_METADATA, GC_MARK_RECLAIMABLE } from '../../src/bcache/buckets.ts';
import { CacheSet } from '../../src/bcache/cache-set.ts';
import { assertNothingLeft, formatCache } from './helpers.ts';
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
