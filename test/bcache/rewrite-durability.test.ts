// R2 without a flush in the rewrite: a leaf rewrite swaps its new nodes in as
// soon as their writes complete, and the flush that makes them durable is the
// journal's, before the first jset that carries the new root. The case that
// needs care is a swap while that flush is already running: it cannot cover
// writes that completed after it started, so the journal must flush again
// before it writes the jset. The device's log shows the order.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryBlockDevice } from '../../src/blockdev/memory.ts';
import { makeKey } from '../../src/format/bkey.ts';
import { SECTOR_SIZE } from '../../src/format/constants.ts';
import { CacheSet } from '../../src/bcache/cache-set.ts';
import { ControlledDevice } from '../helpers/controlled-device.ts';
import { assertNothingLeft, formatCache } from './helpers.ts';

const MiB = 1024 * 1024;

test('a jset carrying a rewritten root waits for a flush that began after the swap (R2)', async () => {
  const dev = new ControlledDevice(new MemoryBlockDevice(16 * MiB));
  await formatCache(dev, { bucketSize: 16, blockSize: 1 });
  // A long journal delay: only the commits this test asks for write entries.
  const cs = await CacheSet.open(dev, { closeDevice: false, journalDelayMs: 60_000 });
  const bucketBytes = 16 * SECTOR_SIZE;
  const inRing = (offset: number): boolean =>
    cs.journal.ring.some((b) => offset >= b * bucketBytes && offset < (b + 1) * bucketBytes);
  const data = Buffer.alloc(SECTOR_SIZE, 7);
  /** One 1-sector clean key at `sector`, inserted without the journal (this test is about the rewrite). */
  const insertOne = async (sector: number): Promise<void> => {
    const a = await cs.allocSectors({ inode: 1, offset: sector, sectors: 1, dirty: false, wait: true });
    assert.ok(a, 'allocation');
    try {
      await cs.writeCache(data, a.ptr.offset);
      await cs.btree.insert([makeKey(1, sector + 1, 1, false, [a.ptr])]);
    } finally {
      cs.putAllocation(a);
    }
  };
  // Everything so far durable: no node append below needs a flush first.
  await cs.flush();

  // A journal commit whose first flush is held at the device.
  const release = dev.hold((op) => op === 'flush');
  const before = dev.log.length;
  const commit = cs.flush();
  await dev.started(before + 1);
  assert.equal(dev.log[before]?.op, 'flush', 'the commit began with its flush');

  // Meanwhile a leaf fills and is rewritten: no flush of its own, so it completes under the hold.
  const rewrites = cs.btree.stats.rewrites;
  let sector = 0;
  while (cs.btree.stats.rewrites === rewrites) {
    await insertOne(sector);
    sector += 2;
    assert.ok(sector < 20_000, 'a leaf was rewritten');
  }
  const swappedAt = dev.log.length;
  assert.ok(
    dev.log.slice(before + 1).every((e) => e.op !== 'flush'),
    'the rewrite issued no flush while the commit held one',
  );
  assert.ok(
    dev.log.slice(before + 1).every((e) => e.op !== 'write' || !inRing(e.offset)),
    'no jset written while the flush is held',
  );

  release();
  await commit;
  await cs.flush();
  const firstJset = dev.log.findIndex((e, i) => i >= swappedAt && e.op === 'write' && inRing(e.offset));
  assert.ok(firstJset >= 0, 'a jset was written after the swap');
  const flushBetween = dev.log.slice(swappedAt, firstJset).some((e) => e.op === 'flush');
  assert.ok(flushBetween, 'a flush started after the swap and before the first jset that carries the new root');

  // And the tree the jsets point at reads back whole after a restart from the image as it is.
  await cs.stop();
  const cs2 = await CacheSet.open(dev, { closeDevice: false });
  for (let s = 0; s < sector; s += 2) {
    const segs = await cs2.btree.lookup(1, s, s + 1);
    assert.ok(segs.length === 1 && segs[0]?.hit, `sector ${s} is cached`);
  }
  await cs2.stop();
  assertNothingLeft();
});
