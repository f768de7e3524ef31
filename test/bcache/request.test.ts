// The request path of a bcache device against real parts (memory devices, a
// real cache set): hits, misses and fills, modes, bypass, stats, FLUSH/FUA,
// discard and write-zeroes, and the collision rule (a racing write wins).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { CrashableBlockDevice } from '../../src/blockdev/crashable.ts';
import { FaultyBlockDevice } from '../../src/blockdev/faulty.ts';
import { MemoryBlockDevice } from '../../src/blockdev/memory.ts';
import {
  CACHE_MODE_NONE,
  CACHE_MODE_WRITEAROUND,
  CACHE_MODE_WRITEBACK,
  CACHE_MODE_WRITETHROUGH,
  SB_OFFSET,
  SB_SIZE,
} from '../../src/format/constants.ts';
import { bdevState, decodeSuperblock } from '../../src/format/superblock.ts';
import { hitRatio, hprint } from '../../src/bcache/stats.ts';
import { captureLog } from '../../src/util/log.ts';
import { defined } from '../../src/util/assert.ts';
import { SimClock } from '../../src/util/clock.ts';
import { assertNothingLeft } from './helpers.ts';
import { makePair, mem, MiB, pattern } from './request-helpers.ts';

const S = 512;

function backingSb(dev: MemoryBlockDevice) {
  const block = Buffer.alloc(SB_SIZE);
  dev.readSync(block, SB_OFFSET);
  return decodeSuperblock(block);
}

async function readDev(dev: { read(b: Buffer, o: number): Promise<void> }, sector: number, sectors: number) {
  const buf = Buffer.alloc(sectors * S);
  await dev.read(buf, sector * S);
  return buf;
}

test('hprint and the hit ratio print as the kernel does', () => {
  assert.equal(hprint(0), '0.0k');
  assert.equal(hprint(512), '0.5k');
  assert.equal(hprint(4096), '4.0k');
  assert.equal(hprint(4 * MiB), '4.0M');
  assert.equal(hprint(1024000), '0.9M');
  assert.equal(hprint(999 * 1024), '999.0k');
  assert.equal(hprint(-2048), '-2.0k');
  assert.equal(hitRatio({ cacheHits: 0, cacheMisses: 0 }), 0);
  assert.equal(hitRatio({ cacheHits: 2, cacheMisses: 1 }), 66);
});

test('the bcache device: size, block size, keys in backing sectors (data offset included)', async () => {
  const p = await makePair({ backing: { dataOffset: 2048, writeback: true } });
  const d = p.dev.device;
  assert.equal(d.name, 'bcache0');
  assert.equal(d.size, 16 * MiB - 2048 * S);
  assert.equal(d.logicalBlockSize, 4096);
  await d.write(pattern(1, 0, 8), 0);
  const keys = await p.set.cs.btree.keysIn(p.dev.attachment?.inode ?? -1, 0, 1 << 30);
  assert.deepEqual(
    keys.map((k) => [k.offset - k.size, k.offset, k.dirty]),
    [[2048, 2056, true]],
  );
  await assert.rejects(d.read(Buffer.alloc(100), 0), { code: 'EINVAL' });
  await assert.rejects(d.read(Buffer.alloc(512), d.size), { code: 'EINVAL' });
  await p.registry.stopAll();
  assertNothingLeft();
});

test('writeback: writes stay in the cache, dirty, reads hit; the superblock says DIRTY before the ack (R7)', async () => {
  const p = await makePair({ backing: { writeback: true }, settings: { writebackRunning: false } });
  const d = p.dev.device;
  const backing = mem(p.backingDev);
  assert.equal(bdevState(backingSb(backing)), 1, 'attached: clean');
  await d.write(pattern(7, 104, 16), 104 * S);
  assert.equal(bdevState(backingSb(backing)), 2, 'dirty on disk once the first dirty write is acknowledged');
  const raw = Buffer.alloc(16 * S);
  backing.readSync(raw, (104 + 16) * S);
  assert.ok(
    raw.every((b) => b === 0),
    'the backing device is not written in writeback mode',
  );
  assert.deepEqual(await readDev(d, 104, 16), pattern(7, 104, 16));
  assert.equal(p.dev.dirtySectors, 16);
  assert.equal(p.dev.stats.total.cacheHits, 1);
  assert.equal(p.dev.stats.total.sectorsBypassed, 0);
  // A partial hit counts as a miss; the missing part comes from the backing device.
  const mixed = await readDev(d, 96, 32);
  assert.deepEqual(mixed.subarray(8 * S, 24 * S), pattern(7, 104, 16));
  assert.ok(mixed.subarray(0, 8 * S).every((b) => b === 0));
  assert.equal(p.dev.stats.total.cacheMisses, 1);
  assert.equal(p.set.stats.total.cacheHits, 1);
  assert.equal(p.set.stats.total.cacheMisses, 1);
  await p.registry.stopAll();
  assertNothingLeft();
});

test('a miss is filled after the reply; the next read hits', async () => {
  const p = await makePair({ settings: { sequentialCutoff: 0 } });
  const backing = mem(p.backingDev);
  backing.writeSync(pattern(3, 1000, 64), (1000 + 16) * S);
  const d = p.dev.device;
  assert.deepEqual(await readDev(d, 1000, 64), pattern(3, 1000, 64));
  assert.equal(p.dev.stats.total.cacheMisses, 1);
  // The fill runs after the reply; a flush waits for nothing of it, so look until it lands.
  await p.dev.request.settle();
  backing.writeSync(Buffer.alloc(64 * S), (1000 + 16) * S);
  assert.deepEqual(await readDev(d, 1000, 64), pattern(3, 1000, 64), 'served from the cache');
  assert.equal(p.dev.stats.total.cacheHits, 1);
  await p.registry.stopAll();
  assertNothingLeft();
});

test('writethrough: both devices written; the clean copy enters the index after a backing flush', async () => {
  const p = await makePair({ settings: { sequentialCutoff: 0 } });
  const d = p.dev.device;
  const backing = mem(p.backingDev);
  await d.write(pattern(4, 0, 8), 0);
  const raw = Buffer.alloc(8 * S);
  backing.readSync(raw, 16 * S);
  assert.deepEqual(raw, pattern(4, 0, 8), 'on the backing device at once');
  await d.flush();
  await p.dev.request.settle();
  backing.writeSync(Buffer.alloc(8 * S), 16 * S);
  assert.deepEqual(await readDev(d, 0, 8), pattern(4, 0, 8), 'a hit from the cache copy');
  assert.equal(p.dev.stats.total.cacheHits, 1);
  assert.equal(p.dev.dirtySectors, 0);
  // Overwriting cached data in writethrough: the old copy never reads back.
  await d.write(pattern(5, 0, 8), 0);
  assert.deepEqual(await readDev(d, 0, 8), pattern(5, 0, 8));
  await p.registry.stopAll();
  assertNothingLeft();
});

test('writethrough: the copies one backing flush releases enter the index a few per turn of the event loop', async () => {
  // Simulated time: the flusher's delay never passes, so all the copies wait for the FLUSH below.
  const clock = new SimClock();
  const p = await clock.run(makePair({ settings: { sequentialCutoff: 0 }, registry: { clock } }));
  const d = p.dev.device;
  const n = 200;
  await clock.run(Promise.all(Array.from({ length: n }, (_, i) => d.write(pattern(6, i * 8, 8), i * 8 * S))));
  const waiting = p.dev.request.fillsPending;
  assert.ok(waiting >= n - 16, `${waiting} copies wait for a backing flush`);
  // One turn after the flush completed, most copies are still waiting for their insert: inserting all
  // of them in the completion held the event loop (and every reply) for milliseconds.
  const stillOpen: number[] = [];
  let first = true;
  p.dev.backingIo.onFlushed(() => {
    if (first) setImmediate(() => stillOpen.push(p.dev.request.tracker.openWindows));
    first = false;
  });
  await clock.run(d.flush());
  await clock.run(p.dev.request.settle());
  assert.equal(stillOpen.length, 1);
  assert.ok(
    (stillOpen[0] ?? 0) >= waiting - 64,
    `${stillOpen[0]} of ${waiting} copies still waiting a turn after the flush`,
  );
  assert.equal(p.dev.request.tracker.openWindows, 0);
  for (let i = 0; i < n; i += 37) assert.deepEqual(await clock.run(readDev(d, i * 8, 8)), pattern(6, i * 8, 8));
  assert.equal(p.dev.stats.total.cacheHits, Math.ceil(n / 37), 'every copy is in the index');
  await clock.run(p.registry.stopAll());
  assertNothingLeft();
});

test('writethrough: a stop right after a flush released the copies leaves nothing behind', async () => {
  const clock = new SimClock();
  const p = await clock.run(makePair({ settings: { sequentialCutoff: 0 }, registry: { clock } }));
  const d = p.dev.device;
  await clock.run(Promise.all(Array.from({ length: 300 }, (_, i) => d.write(pattern(7, i * 8, 8), i * 8 * S))));
  let stopped: Promise<void> | undefined;
  p.dev.backingIo.onFlushed(() => {
    // In the flush's completion, with the released copies not yet inserted.
    stopped ??= p.registry.stopAll();
  });
  await clock.run(d.flush());
  await clock.run(defined(stopped, 'the stop began in the flush completion'));
  assert.equal(p.dev.request.tracker.openWindows, 0);
  assertNothingLeft();
});

test('writearound and none: writes bypass (counted), and invalidate what was cached', async () => {
  const p = await makePair({ settings: { sequentialCutoff: 0 } });
  const d = p.dev.device;
  await d.write(pattern(1, 64, 8), 64 * S);
  await d.flush();
  await p.dev.request.settle();
  await p.dev.setCacheMode(CACHE_MODE_WRITEAROUND);
  await d.write(pattern(2, 64, 8), 64 * S);
  assert.equal(p.dev.stats.total.sectorsBypassed, 8);
  assert.deepEqual(await readDev(d, 64, 8), pattern(2, 64, 8));
  assert.equal(p.dev.stats.total.cacheMisses, 1, 'the old copy was invalidated');
  await p.dev.request.settle();
  await p.dev.setCacheMode(CACHE_MODE_NONE);
  // Mode none bypasses, but a bypassed read is still looked up: the fill above made it a hit.
  assert.deepEqual(await readDev(d, 64, 8), pattern(2, 64, 8));
  assert.equal(p.dev.stats.total.cacheBypassHits, 1);
  assert.deepEqual(await readDev(d, 128, 8), Buffer.alloc(8 * S));
  assert.equal(p.dev.stats.total.cacheBypassMisses, 1);
  await p.dev.request.settle();
  assert.equal(p.dev.request.fillsPending, 0);
  assert.equal(p.dev.stats.total.sectorsBypassed, 24);
  assert.equal(p.dev.cacheModeName, 'none');
  assert.equal(backingSb(mem(p.backingDev)).flags & 15n, 3n, 'the mode is in the superblock');
  await p.registry.stopAll();
  assertNothingLeft();
});

test('sequential reads past sequential_cutoff bypass; unaligned requests bypass', async () => {
  const p = await makePair({ settings: { sequentialCutoff: 1 * MiB } });
  const d = p.dev.device;
  const chunk = 256 * 1024;
  for (let i = 0; i < 8; i++) await d.read(Buffer.alloc(chunk), i * chunk);
  // The 4th request makes the stream 1 MiB long: from then on it bypasses.
  assert.equal(p.dev.stats.total.cacheMisses, 3);
  assert.equal(p.dev.stats.total.cacheBypassMisses, 5);
  assert.equal(p.dev.stats.total.sectorsBypassed, (5 * chunk) / S);
  // A request not aligned to the 4 KiB cache block bypasses.
  await d.read(Buffer.alloc(S), 3 * MiB + S);
  assert.equal(p.dev.stats.total.cacheBypassMisses, 6);
  await p.registry.stopAll();
  assertNothingLeft();
});

test('a write racing a miss fill wins, and the collision is counted', async () => {
  const cacheDev = new FaultyBlockDevice(new MemoryBlockDevice(48 * MiB, { name: 'cache' }));
  const p = await makePair({ cacheDev, settings: { sequentialCutoff: 0 }, backing: { writeback: true } });
  const d = p.dev.device;
  mem(p.backingDev).writeSync(pattern(1, 512, 8), (512 + 16) * S);
  // Hold the fill's write to the cache.
  const hold = cacheDev.hold({ ops: ['write'] });
  assert.deepEqual(await readDev(d, 512, 8), pattern(1, 512, 8));
  await hold.waitForHeld(1);
  const write = d.write(pattern(2, 512, 8), 512 * S);
  hold.release();
  await write;
  await p.dev.request.settle();
  assert.equal(p.dev.stats.total.cacheMissCollisions, 1);
  assert.equal(p.set.stats.total.cacheMissCollisions, 1);
  assert.deepEqual(await readDev(d, 512, 8), pattern(2, 512, 8));
  await p.registry.stopAll();
  assertNothingLeft();
});

test('discard and write-zeroes invalidate the cache and reach the backing device', async () => {
  const p = await makePair({ backing: { writeback: true }, settings: { writebackRunning: false } });
  const d = p.dev.device;
  await d.write(pattern(9, 0, 64), 0);
  assert.equal(p.dev.dirtySectors, 64);
  await d.discard(0, 32 * S);
  await d.writeZeroes(32 * S, 16 * S);
  assert.equal(p.dev.dirtySectors, 16);
  const got = await readDev(d, 0, 64);
  assert.ok(got.subarray(0, 48 * S).every((b) => b === 0));
  assert.deepEqual(got.subarray(48 * S), pattern(9, 48, 16));
  // The memory backing device zeroes fast, so FAST_ZERO is honoured.
  await d.writeZeroes(64 * S, 8 * S, { fastOnly: true });
  assert.deepEqual(await readDev(d, 48, 24), Buffer.concat([pattern(9, 48, 16), Buffer.alloc(8 * S)]));
  await p.registry.stopAll();
  assertNothingLeft();
});

test('FUA and FLUSH reach both devices', async () => {
  const p = await makePair({ backing: { writeback: true } });
  const d = p.dev.device;
  const cs = p.set.cs;
  const commits = cs.journal.stats.entriesWritten;
  await d.write(pattern(1, 0, 8), 0, { fua: true });
  assert.ok(cs.journal.stats.entriesWritten > commits, 'a FUA writeback write commits the journal');
  const before = cs.journal.stats.entriesWritten;
  const flushes = p.dev.backingIo.stats.flushes;
  await d.flush();
  assert.ok(cs.journal.stats.entriesWritten > before);
  assert.ok(p.dev.backingIo.stats.flushes > flushes);
  await p.dev.setCacheMode(CACHE_MODE_WRITEBACK);
  await p.registry.stopAll();
  assertNothingLeft();
});

test("a write that lands while a read waits for a btree node wins over that read's fill", async () => {
  // Many small keys in 8 KiB nodes: more leaves than the node cache keeps, so
  // after a restart the first leaves are not in memory and a lookup waits.
  const setUuid = Buffer.alloc(16, 0x5a);
  const cacheMem = new MemoryBlockDevice(1201 * 16 * S, { name: 'cache' });
  const backingMem = new MemoryBlockDevice(16 * MiB, { name: 'backing' });
  const small = { cacheDev: cacheMem, backingDev: backingMem, cache: { setUuid, bucketSize: 16, blockSize: 1 } };
  const p = await makePair({
    ...small,
    backing: { writeback: true, blockSize: 1 },
    settings: { writebackRunning: false, sequentialCutoff: 0 },
    registry: { setOptions: { btreeCacheSize: 1 } },
  });
  for (let i = 0; i < 6000; i++) await p.dev.device.write(pattern(1, 4096 + 2 * i, 1), (4096 + 2 * i) * S);
  await p.registry.stopAll();
  const cacheDev = new FaultyBlockDevice(cacheMem.clone());
  const r = await makePair({
    cacheDev,
    backingDev: backingMem.clone(),
    format: false,
    settings: { writebackRunning: false, sequentialCutoff: 0 },
    registry: { setOptions: { btreeCacheSize: 1 } },
  });
  const d = r.dev.device;
  assert.ok(r.set.cs.btree.stats.evictions > 0, 'leaves were evicted at bring-up');
  const reads = cacheDev.counters().ops.read;
  // Hold the node read of the first leaf: the lookup waits in it, holding the tree shared.
  const hold = cacheDev.hold({ ops: ['read'] });
  const read = readDev(d, 0, 8);
  await hold.waitForHeld(1);
  assert.ok(cacheDev.counters().ops.read > reads);
  // A writeback write to the same sectors: its data lands, its insert waits for the lookup.
  const write = d.write(pattern(2, 0, 8), 0);
  hold.release();
  assert.ok(
    (await read).every((b) => b === 0),
    'the read ran before the write',
  );
  await write;
  await r.dev.request.settle();
  assert.deepEqual(await readDev(d, 0, 8), pattern(2, 0, 8), 'the write won');
  await r.registry.stopAll();
  assertNothingLeft();
});

test('writeback takes every NBD write as sync: cached up to 70% in use, written through above', async () => {
  const p = await makePair({
    backing: { writeback: true },
    settings: { sequentialCutoff: 0, writebackRunning: false },
  });
  const d = p.dev.device;
  const cs = p.set.cs;
  const inode = p.dev.attachment?.inode ?? -1;
  const setInUse = (percent: number): void => {
    cs.allocator.avail = Math.floor((cs.buckets.nbuckets * (100 - percent)) / 100);
  };
  // 55% in use: past the kernel's CUTOFF_WRITEBACK (40) for a write that is not sync, below the sync cutoff.
  setInUse(55);
  assert.ok(cs.inUse > 40 && cs.inUse <= 70, `in_use ${cs.inUse}`);
  await d.write(pattern(1, 0, 8), 0);
  const dirty = await cs.btree.keysIn(inode, 0, 1 << 30);
  assert.deepEqual(
    dirty.map((k) => k.dirty),
    [true],
    'a write at 55% in use is cached dirty',
  );
  // 75% in use: written through (to the backing device), not dirty.
  setInUse(75);
  await d.write(pattern(2, 8, 8), 8 * S);
  const after = await cs.btree.keysIn(inode, 0, 1 << 30);
  assert.ok(!after.some((k) => k.dirty && k.offset > 16 + 8), 'the write at 75% in use is not dirty in the cache');
  const onBacking = Buffer.alloc(8 * S);
  mem(p.backingDev).readSync(onBacking, (16 + 8) * S);
  assert.deepEqual(onBacking, pattern(2, 8, 8), 'it is on the backing device');
  await p.registry.stopAll();
  assertNothingLeft();
});

test('readahead rounds a miss up to its size, never over cached data, never past the end', async () => {
  // 512 KiB buckets: every fill of the test fits the first open bucket (a clean
  // fill takes only space that is ready; it never waits for the allocator).
  const p = await makePair({
    cacheBytes: 300 * MiB,
    cache: { bucketSize: 1024 },
    settings: { sequentialCutoff: 0, readahead: 64 * 1024 },
  });
  const d = p.dev.device;
  const cs = p.set.cs;
  const inode = p.dev.attachment?.inode ?? -1;
  const backing = mem(p.backingDev);
  const base = 16; // data offset: bcache sector 0 is key-space sector 16
  // Distinct data on the backing device, so that what the cache holds can be told apart.
  for (let s = 0; s < 512; s += 8) backing.writeSync(pattern(9, s, 8), (base + s) * S);
  // Something cached at 48 KiB (sectors 96-104; written, so that no readahead follows it):
  // the readahead of a miss at 0 must stop there.
  await d.write(pattern(9, 96, 8), 96 * S);
  await p.dev.request.settle();
  const got = await readDev(d, 0, 8);
  assert.deepEqual(got, pattern(9, 0, 8), 'the reader gets exactly its 4 KiB');
  await p.dev.request.settle();
  const keys = await cs.btree.keysIn(inode, 0, 1 << 30);
  assert.deepEqual(
    keys.map((k) => [k.offset - k.size - base, k.offset - base]),
    [
      [0, 96],
      [96, 104],
    ],
    'the miss at 0 was filled up to the cached block at 96, not 128 sectors',
  );
  // The readahead part is a hit now, with the backing device's data.
  const before = p.dev.stats.total.cacheHits;
  assert.deepEqual(await readDev(d, 40, 8), pattern(9, 40, 8));
  assert.equal(p.dev.stats.total.cacheHits, before + 1);
  assert.equal(p.dev.stats.total.cacheReadaheads, 1);
  // Near the end of the device: no readahead past it.
  const lastBlock = d.size / S - 8;
  await readDev(d, lastBlock, 8);
  await p.dev.request.settle();
  const tail = await cs.btree.keysIn(inode, base + lastBlock - 8, 1 << 30);
  assert.deepEqual(
    tail.map((k) => k.offset - base),
    [lastBlock + 8],
  );
  // readahead 0: a miss fills just itself.
  p.dev.settings.readahead = 0;
  await readDev(d, 200, 8);
  await p.dev.request.settle();
  const one = await cs.btree.keysIn(inode, base + 200, base + 208);
  assert.deepEqual(
    one.map((k) => [k.offset - k.size - base, k.offset - base]),
    [[200, 208]],
  );
  await p.registry.stopAll();
  assertNothingLeft();
});

test('writethrough: a write over a key whose bucket was invalidated (gen not yet durable) invalidates it durably; after a power cut the old data does not come back', async () => {
  const cacheDev = new CrashableBlockDevice(48 * MiB, { name: 'cache' });
  const backingDev = new CrashableBlockDevice(16 * MiB, { name: 'backing' });
  const first = await makePair({ cacheDev, backingDev });
  await first.dev.device.write(pattern(1, 64, 8), 64 * 512);
  await first.dev.device.flush();
  // A clean stop writes the leaf: the copy's key is durable (a power cut after it loses nothing).
  await first.registry.stopAll();
  const cache1 = cacheDev.powerCut(0);
  const backing1 = backingDev.powerCut(0);
  const p = await makePair({ cacheDev: cache1, backingDev: backing1, format: false });
  let registry = p.registry;
  try {
    assert.equal(p.dev.cacheMode, CACHE_MODE_WRITETHROUGH);
    const dev = p.dev.device;
    const inode = defined(p.dev.attachment, 'attached').inode;
    const hit = (await p.set.cs.lookup(inode, 0, 1 << 20)).find((s) => s.hit)?.hit;
    assert.ok(hit, 'the writethrough copy is cached');
    // The allocator invalidates the bucket: its gen moves on in memory only (the prios are not written).
    p.set.cs.buckets.invalidate(hit.bucket);
    // Unaligned to the 4 KiB cache block, so bypassed: nothing is allocated, no prio write makes the gen durable.
    await dev.write(pattern(2, 65, 7), 65 * 512, { fua: true });
    const cache2 = cache1.powerCut(1);
    const backing2 = backing1.powerCut(2);
    const cap = captureLog();
    await registry.stopAll().finally(cap.restore);
    const q = await makePair({ cacheDev: cache2, backingDev: backing2, format: false });
    registry = q.registry;
    const buf = Buffer.alloc(8 * 512);
    await q.dev.device.read(buf, 64 * 512);
    assert.ok(buf.subarray(0, 512).equals(pattern(1, 64, 1)), 'the sector before the write');
    assert.ok(buf.subarray(512).equals(pattern(2, 65, 7)), 'the FUA write reads back, not the stale cached copy');
  } finally {
    await registry.stopAll();
  }
  assertNothingLeft();
});
