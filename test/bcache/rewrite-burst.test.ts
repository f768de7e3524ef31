// A burst of inserts reaching a full leaf at once (the soak's hang, test/crash/
// soak.test.ts, in the engine alone): every one of them needs a rewrite's worth
// of node buckets (2 x depth + 1) while holding its journal entry pinned. When
// each took its buckets a bucket at a time behind all the others, none got a
// whole set until nearly all had, the allocator went round after round - each
// round a prio write and a journal commit (R3) - until the journal ring was
// full up to the waiters' pinned entry; then the allocator's commit waited for
// ring space, the ring for the pinned entry, and its inserts for the
// allocator. Node buckets now go to one rewrite at a time, and the inserts
// behind it look at their leaf again when it is done: they fit.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryBlockDevice } from '../../src/blockdev/memory.ts';
import { FaultyBlockDevice } from '../../src/blockdev/faulty.ts';
import { makeKey, type Bkey } from '../../src/format/bkey.ts';
import { CacheSet } from '../../src/bcache/cache-set.ts';
import { RESERVE_BTREE, RESERVE_NONE } from '../../src/bcache/alloc.ts';
import { assertNothingLeft, formatCache } from './helpers.ts';

const MiB = 1024 * 1024;
/** Far more than the burst needs (about 0.1 s); the deadlock never ends. */
const DEADLINE_MS = 10_000;

test('a burst of journaled inserts into a full leaf completes (node buckets go to one rewrite at a time)', async () => {
  // The soak's geometry: 640 buckets of 64 KiB, so a 5-bucket journal and a 5-bucket btree reserve.
  const dev = new MemoryBlockDevice(40 * MiB);
  await formatCache(dev, { bucketSize: 128, blockSize: 8 });
  // Two-block nodes: a leaf takes one append after a rewrite, so the burst finds it full;
  // a long journal delay: only the allocator's commits (and the burst's) write entries.
  const cs = await CacheSet.open(dev, { closeDevice: false, journalDelayMs: 1000, btreeNodeSectors: 16 });
  const burst = 600;
  let inserted = 0;
  const all = Promise.allSettled(
    Array.from({ length: burst }, async (_, i) => {
      await cs.insert([makeKey(1, (i + 1) * 8, 8, false, [])]);
      inserted++;
    }),
  );
  let timer: NodeJS.Timeout | undefined;
  const inTime = await Promise.race([
    all.then(() => true),
    new Promise<boolean>((resolve) => {
      timer = setTimeout(() => {
        resolve(false);
      }, DEADLINE_MS);
    }),
  ]);
  clearTimeout(timer);
  const state =
    `${inserted}/${burst} inserted; allocator ${JSON.stringify(cs.stats.allocator)}, ` +
    `free lists ${cs.allocator.free.map((f) => f.length).join('/')}, ` +
    `journal ${cs.journal.bucketsInUse}/${cs.journal.ring.length} buckets in use, ${JSON.stringify(cs.stats.journal)}`;
  if (!inTime) {
    // Break the deadlock (waiters fail) so that the set can stop, then report it.
    cs.fail(new Error('test: the burst did not complete'));
    await all;
    await cs.stop();
    assert.fail(`the burst did not complete within ${DEADLINE_MS} ms: ${state}`);
  }
  for (const r of await all) assert.equal(r.status, 'fulfilled', state);
  // A rewrite's worth at a time: a handful of allocator rounds, not one per bucket each insert asked for.
  assert.ok(cs.stats.allocator.prioWrites < 20, state);
  assert.deepEqual(await cs.btree.verify(), []);
  await cs.stop();
  assertNothingLeft();
});

test('an insert that waits for node buckets holds no journal pin meanwhile, and goes in once they come', async () => {
  // A waiting insert with its entry pinned keeps the journal from reclaiming
  // that entry; the allocator's prio writes need journal commits, so a
  // full ring could then stop everything. The insert must let go of its pin.
  const dev = new MemoryBlockDevice(40 * MiB);
  await formatCache(dev, { bucketSize: 128, blockSize: 1 });
  const cs = await CacheSet.open(dev, {
    closeDevice: false,
    journalDelayMs: 1,
    btreeNodeSectors: 2,
    gcSectors: 1 << 30,
  });
  // Nothing refills the reserves from here on: GC and the allocator stopped, the btree reserve emptied.
  await cs.gc.stop();
  await cs.allocator.stop();
  const a = cs.allocator;
  for (const fifo of [a.free[RESERVE_NONE], a.free[RESERVE_BTREE], a.freeInc]) {
    while (!fifo.empty) cs.buckets.unpinBucket(fifo.pop());
  }
  a.invalidateNeedsGc = true;
  a.start();
  // Keys into one leaf until one needs a rewrite: its insert cannot finish.
  let i = 0;
  let entry = cs.journal.openEntry;
  let waiting: Promise<unknown> | undefined;
  while (!waiting) {
    await cs.journal.commit();
    entry = cs.journal.openEntry;
    const before = cs.stats.allocator.allocWaits;
    const p = cs.insert([makeKey(1, (i + 1) * 8, 8, false, [])]);
    i++;
    const state = { settled: false };
    void p.then(
      () => (state.settled = true),
      () => (state.settled = true),
    );
    // Let it run until it either completes or waits for the allocator.
    for (let turn = 0; turn < 200 && !state.settled && cs.stats.allocator.allocWaits === before; turn++) {
      await new Promise((r) => setImmediate(r));
    }
    if (!state.settled) waiting = p;
    assert.ok(i < 500, 'a leaf of 1 KiB fills within 500 keys');
  }
  assert.ok(cs.stats.allocator.allocWaits > 0, 'the insert waits for the allocator');
  // The entry holds a reference on itself until it is written (the journal worker may have written it by now).
  assert.equal(entry.pins, entry.durable ? 0 : 1, 'no pin besides the entry’s own: the waiting insert let go of it');
  // Buckets come back: the insert goes in (journaled again in a newer entry).
  for (let b = cs.buckets.firstBucket; b < cs.buckets.nbuckets && a.free[RESERVE_BTREE].length < 8; b++) {
    if (cs.buckets.canInvalidate(b) && cs.buckets.mark[b] === 0) {
      cs.buckets.invalidate(b);
      a.unalloc(b, RESERVE_BTREE);
    }
  }
  await waiting;
  const keys = await cs.btree.keysIn(1, 0, 1 << 30);
  assert.equal(keys.length, 0, 'invalidations leave holes');
  assert.deepEqual(await cs.btree.verify(), []);
  await cs.stop();
  assertNothingLeft();
});

test('a rewrite that fails holding every node bucket of its grant: the inserts waiting for node buckets fail too, none hangs', async () => {
  // A lone root leaf splits into two leaves and a new root: all 2 x depth + 1
  // buckets of its grant, so nothing comes back unused. When the rewrite's
  // node writes failed, the grant never came back either, and inserts waiting
  // for it (their pins dropped, to journal their keys again once it came)
  // waited for good: a request that never completes.
  const geometry = { bucketSize: 128, blockSize: 8 } as const;
  const options = { closeDevice: false, journalDelayMs: 1000, btreeNodeSectors: 16 } as const;
  const keyAt = async (cs: CacheSet, i: number): Promise<Bkey> => {
    const a = await cs.allocSectors({ inode: 1, offset: i * 8, sectors: 8, dirty: false, wait: true });
    assert.ok(a, 'allocation');
    return makeKey(1, (i + 1) * 8, 8, false, [a.ptr]);
  };
  // How many keys, one at a time, the lone leaf takes before the first split (deterministic on a memory device).
  const probe = new MemoryBlockDevice(40 * MiB);
  await formatCache(probe, geometry);
  const p = await CacheSet.open(probe, options);
  let first = 0;
  while (p.btree.stats.splits === 0) await p.insert([await keyAt(p, first++)]);
  await p.stop();
  assert.ok(first > 10, `the lone leaf took ${first} keys before splitting`);

  const mem = new MemoryBlockDevice(40 * MiB);
  await formatCache(mem, geometry);
  const dev = new FaultyBlockDevice(mem, { name: 'cache' });
  const cs = await CacheSet.open(dev, options);
  for (let i = 0; i < first - 1; i++) await cs.insert([await keyAt(cs, i)]);
  assert.equal(cs.btree.depth, 1, 'still a lone leaf');
  const burst: Bkey[] = [];
  for (let i = 0; i < 200; i++) burst.push(await keyAt(cs, first - 1 + i));
  // Every write from here on is held: the split's node writes among them.
  const hold = dev.hold({ ops: ['write'] });
  const splitsBefore = cs.btree.stats.splits;
  const settled = burst.map((k) =>
    cs.insert([k]).then(
      () => 'ok',
      (err: unknown) => (err instanceof Error ? err.message : String(err)),
    ),
  );
  await hold.waitForHeld(1);
  // Let the burst reach its waits: the split holds the grant, the others wait for it to come back.
  for (let turn = 0; turn < 50; turn++) await new Promise((r) => setImmediate(r));
  dev.pull('EIO');
  hold.release();
  let timer: NodeJS.Timeout | undefined;
  const outcome = await Promise.race([
    Promise.all(settled),
    new Promise<undefined>((resolve) => {
      timer = setTimeout(() => {
        resolve(undefined);
      }, DEADLINE_MS);
    }),
  ]);
  clearTimeout(timer);
  assert.ok(outcome, `inserts still waiting ${DEADLINE_MS} ms after the set failed (splits ${cs.btree.stats.splits - splitsBefore})`);
  assert.ok(cs.ioDisabled, 'the failed node write disabled the set');
  assert.ok(outcome.some((r) => r !== 'ok'), 'inserts after the failure are refused');
  await cs.stop();
  assertNothingLeft();
});
