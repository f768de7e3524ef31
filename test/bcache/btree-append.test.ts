// A leaf's appends fill whole blocks: the pending set is queued for writing
// a little before it fills a page of keys, so with 4 KiB blocks an append is
// one block, not a full block and an all-but-empty second one (which halved
// the keys a leaf took between rewrites).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryBlockDevice } from '../../src/blockdev/memory.ts';
import { makeKey } from '../../src/format/bkey.ts';
import { bsetBytes } from '../../src/format/bset.ts';
import { CacheSet } from '../../src/bcache/cache-set.ts';
import { appendAtU64s } from '../../src/bcache/btree.ts';
import { Prng } from '../../src/util/prng.ts';
import { ControlledDevice } from '../helpers/controlled-device.ts';
import { assertNothingLeft, formatCache } from './helpers.ts';

const MiB = 1024 * 1024;

test('appendAtU64s leaves the bset a whole number of blocks, with room for keys that arrive late', () => {
  for (const block of [512, 1024, 2048, 4096, 8192, 16384]) {
    const at = appendAtU64s(block);
    const target = Math.max(block, 4096);
    // Twenty more 3-u64 keys (a 4 KiB extent with one pointer) still fit in a page (or one larger block).
    assert.ok(bsetBytes(at + 20 * 3) <= target, `block ${block}: ${bsetBytes(at + 20 * 3)} bytes`);
    // And an append is not much less than that.
    assert.ok(bsetBytes(at) >= target * 0.8, `block ${block}: ${bsetBytes(at)} bytes`);
  }
});

test('with 4 KiB blocks, the appends of random 4 KiB inserts are one block each', async () => {
  const dev = new ControlledDevice(new MemoryBlockDevice(64 * MiB));
  await formatCache(dev, { bucketSize: 128, blockSize: 8 });
  const cs = await CacheSet.open(dev, { closeDevice: false, journalDelayMs: 60_000 });
  const nodeBytes = 128 * 512;
  const rng = new Prng(3);
  const data = Buffer.alloc(4096, 1);
  const before = dev.log.length;
  const dataAt = new Set<number>();
  for (let i = 0; i < 6000; i++) {
    const sector = rng.below(40_000) * 8;
    const a = await cs.allocSectors({ inode: 1, offset: sector, sectors: 8, dirty: false, wait: true });
    assert.ok(a, 'allocation');
    try {
      dataAt.add(a.ptr.offset * 512);
      await cs.writeCache(data, a.ptr.offset);
      await cs.btree.insert([makeKey(1, sector + 8, 8, false, [a.ptr])]);
    } finally {
      cs.putAllocation(a);
    }
  }
  // Appends: writes inside a bucket past its start that are neither data nor journal.
  const ring = new Set(cs.journal.ring);
  const appends = dev.log
    .slice(before)
    .filter(
      (e) =>
        e.op === 'write' &&
        e.offset % nodeBytes !== 0 &&
        !dataAt.has(e.offset) &&
        !ring.has(Math.floor(e.offset / nodeBytes)),
    );
  assert.ok(appends.length >= 10, `${appends.length} leaf appends`);
  const sizes = new Map<number, number>();
  for (const e of appends) sizes.set(e.length, (sizes.get(e.length) ?? 0) + 1);
  assert.deepEqual([...sizes.keys()], [4096], `append sizes: ${JSON.stringify([...sizes])}`);
  await cs.stop();
  assertNothingLeft();
});
