// Shutdown is bounded whatever is stuck below (DESIGN rule 1): registry
// stopAll() with requests that never end by themselves.
//
// - A writeback write waiting forever for the allocator (a cache whose
//   reserves are empty and whose allocator cannot refill): the devices do not
//   stop within the registry's bound, so the cache set is stopped under them;
//   its stop rejects the allocator's waiters, the write fails (it was never
//   acknowledged), the device then stops cleanly, and every write
//   acknowledged before reads back after a restart.
// - A backing read that never answers until its device is closed (a hold):
//   the device's own stop gives up on it past its bound, ends the attachment
//   without it, and closing the backing device ends it.
// - An I/O that never settles at all, not even on close: stop still ends in
//   bounded time, leaves nothing running, and when the I/O completes much
//   later, the request's end touches nothing of the stopped objects (no
//   worker, no timer, no error).
//
// Each ends with assertNothingLeft(): no Worker alive, no timer pending.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { FaultyBlockDevice } from '../../src/blockdev/faulty.ts';
import { MemoryBlockDevice } from '../../src/blockdev/memory.ts';
import type { BlockDevice, BlockDeviceCaps, Extent, WriteOptions, ZeroOptions } from '../../src/blockdev/types.ts';
import { RESERVE_NONE } from '../../src/bcache/alloc.ts';
import type { CachedDev } from '../../src/bcache/cached-dev.ts';
import { CACHE_MODE_WRITEBACK, CACHE_MODE_WRITETHROUGH } from '../../src/format/constants.ts';
import { Registry, type RegisteredSet, type RegistryOptions } from '../../src/bcache/registry.ts';
import { deferred, Worker, type Deferred } from '../../src/util/lifecycle.ts';
import { captureLog } from '../../src/util/log.ts';
import { within } from './failure-rig.ts';
import { assertNothingLeft, checkMarks, formatCache } from './helpers.ts';
import { formatBacking, MiB, pattern } from './request-helpers.ts';

const SET_UUID = Buffer.alloc(16, 7);

/** Short bounds: the registry gives the devices 100 ms, each device's own waits get `deviceMs`. */
function bounds(deviceMs: number): RegistryOptions {
  return {
    deviceStopTimeoutMs: 100,
    deviceOptions: { stopTimeoutMs: deviceMs },
    setOptions: { journalDelayMs: 2, stopTimeoutMs: 5000 },
    deviceSettings: () => ({ writebackRunning: false, sequentialCutoff: 0, writebackDelay: 0 }),
  };
}

async function register(
  cache: BlockDevice,
  backing: BlockDevice,
  options: RegistryOptions,
): Promise<{ registry: Registry; set: RegisteredSet; dev: CachedDev }> {
  const registry = new Registry(options);
  const c = await registry.register(cache);
  const b = await registry.register(backing);
  if (c.kind !== 'cache' || b.kind !== 'backing') throw new Error('wrong device kinds');
  return { registry, set: c.set, dev: b.dev };
}

/** Wait (turn by turn of the event loop, up to a deadline) until `cond` holds. */
async function until(cond: () => boolean, what: string, ms = 5000): Promise<void> {
  const deadline = performance.now() + ms;
  while (!cond()) {
    if (performance.now() > deadline) throw new Error(`${what}: not within ${ms} ms`);
    await new Promise<void>((resolve) => setImmediate(resolve));
  }
}

/** Outcome of a promise without awaiting it: 'pending' until it settles. */
function track(p: Promise<unknown>): { state: 'pending' | 'fulfilled' | 'rejected'; error?: unknown } {
  const t: { state: 'pending' | 'fulfilled' | 'rejected'; error?: unknown } = { state: 'pending' };
  p.then(
    () => {
      t.state = 'fulfilled';
    },
    (err: unknown) => {
      t.state = 'rejected';
      t.error = err;
    },
  );
  return t;
}

test('a writeback write stuck waiting for the allocator: stopAll stops the set under the device, the write fails, nothing acknowledged is lost', async () => {
  const cacheMem = new MemoryBlockDevice(8 * MiB, { name: 'cache' });
  const backingMem = new MemoryBlockDevice(8 * MiB, { name: 'backing' });
  await formatCache(cacheMem, { bucketSize: 16, blockSize: 8, setUuid: SET_UUID });
  await formatBacking(backingMem, { setUuid: SET_UUID, writeback: true });
  const cap = captureLog();
  let elapsed: number;
  let stuck: ReturnType<typeof track>;
  try {
    // The device's own bound (5 s) is far past the registry's (100 ms): the
    // set's stop must be what ends the write, not the device giving up on it.
    const { registry, set, dev } = await register(cacheMem, backingMem, bounds(5000));
    assert.equal(dev.cacheMode, CACHE_MODE_WRITEBACK);
    // Acknowledged before the trouble: one flushed, one only acknowledged.
    await dev.device.write(pattern(1, 0, 8), 0);
    await dev.device.flush();
    await dev.device.write(pattern(2, 8, 8), 8 * 512);

    // Starve the allocator (as alloc.test.ts does): no GC, no invalidation,
    // the data reserve and free_inc empty, the open bucket full; a worker that
    // runs (so that waiting is allowed) but never refills.
    const cs = set.cs;
    const a = cs.allocator;
    await cs.gc.stop();
    await a.stop();
    for (const fifo of [a.free[RESERVE_NONE], a.freeInc]) {
      while (!fifo.empty) cs.buckets.unpinBucket(fifo.pop());
    }
    a.invalidateNeedsGc = true;
    a.start();
    // Fill what the write point's open bucket has left, then one more write waits.
    const waitsBefore = a.stats.allocWaits;
    const writes: Promise<void>[] = [];
    for (let i = 0; i < 64 && a.stats.allocWaits === waitsBefore; i++) {
      writes.push(dev.device.write(pattern(3, 64 + i * 8, 8), (64 + i * 8) * 512));
      await new Promise<void>((resolve) => setImmediate(resolve));
    }
    await until(() => a.stats.allocWaits > waitsBefore, 'a write waits for the allocator');
    const last = writes.pop();
    assert.ok(last);
    stuck = track(last);
    await within(2000, 'the writes before it', Promise.all(writes));
    assert.equal(stuck.state, 'pending', 'the write is stuck');
    assert.equal(dev.request.requestsInFlight, 1);

    const t0 = performance.now();
    await within(4000, 'stopAll', registry.stopAll());
    elapsed = performance.now() - t0;
    await until(() => stuck.state !== 'pending', 'the stuck write ends');
  } finally {
    cap.restore();
  }
  const log = cap.lines.join('\n');
  assert.equal(stuck.state, 'rejected', 'the stuck write fails: it was never acknowledged');
  assert.match((stuck.error as Error).message, /allocator stopped|stopped/);
  assert.ok(
    elapsed < 3000,
    `stopAll took ${Math.round(elapsed)} ms: the set's stop ended the write, not a device bound`,
  );
  assert.match(log, /bcache0 did not stop within 100 ms \(requests stuck below\); stopping cache set .* under them/);
  assert.doesNotMatch(log, /still in flight after/, 'the device did not have to give up on the request');
  assert.doesNotMatch(log, /stop gave up/, 'the set stopped cleanly: journal and superblock written');
  assertNothingLeft();
  await assert.rejects(cacheMem.read(Buffer.alloc(512), 0), /closed/i, 'the cache device is closed');
  await assert.rejects(backingMem.read(Buffer.alloc(512), 0), /closed/i, 'the backing device is closed');

  // A restart over the same bytes: both acknowledged writes are there.
  const again = await register(cacheMem.clone(), backingMem.clone(), bounds(5000));
  try {
    const got = Buffer.alloc(16 * 512);
    await again.dev.device.read(got, 0);
    assert.ok(got.subarray(0, 8 * 512).equals(pattern(1, 0, 8)), 'the flushed write survived');
    assert.ok(got.subarray(8 * 512).equals(pattern(2, 8, 8)), 'the acknowledged write survived the clean stop');
  } finally {
    await again.registry.stopAll();
  }
  assertNothingLeft();
});

test('a backing read that never answers: the device gives up on it past its bound, closing the backing device ends it', async () => {
  const cacheMem = new MemoryBlockDevice(8 * MiB, { name: 'cache' });
  const backingMem = new MemoryBlockDevice(8 * MiB, { name: 'backing' });
  await formatCache(cacheMem, { bucketSize: 16, blockSize: 8, setUuid: SET_UUID });
  await formatBacking(backingMem, { setUuid: SET_UUID });
  const backing = new FaultyBlockDevice(backingMem, { name: 'backing' });
  const cap = captureLog();
  let elapsed: number;
  let stuck: ReturnType<typeof track>;
  try {
    const { registry, dev } = await register(cacheMem, backing, bounds(300));
    assert.equal(dev.cacheMode, CACHE_MODE_WRITETHROUGH);
    // Never released by the test: only the device's close ends it.
    const hold = backing.hold({ ops: ['read'] });
    stuck = track(dev.device.read(Buffer.alloc(4096), 0));
    await within(2000, 'the read reaching the backing device', hold.waitForHeld(1));
    assert.ok(dev.attachment && dev.attachment.ref.count >= 2, 'the read holds a reference on the attachment');

    const t0 = performance.now();
    await within(3000, 'stopAll', registry.stopAll());
    elapsed = performance.now() - t0;
    await until(() => stuck.state !== 'pending', 'the stuck read ends');
  } finally {
    cap.restore();
  }
  const log = cap.lines.join('\n');
  assert.equal(stuck.state, 'rejected');
  assert.equal((stuck.error as { code?: string }).code, 'ESHUTDOWN');
  assert.ok(elapsed >= 250 && elapsed < 2000, `stopAll took ${Math.round(elapsed)} ms (the device's bound is 300 ms)`);
  assert.match(log, /bcache0: 1 request\(s\) still in flight after 300 ms; stopping without them/);
  assert.match(log, /bcache0: the attachment to cache set .* still has 1 reference\(s\) after 300 ms; ending it/);
  assert.match(log, /bcache_device_free\(\) bcache0 stopped/);
  assertNothingLeft();
  await assert.rejects(cacheMem.read(Buffer.alloc(512), 0), /closed/i, 'the cache device is closed');
});

/**
 * A device whose reads of `range` never settle, not even when it is closed
 * (a hung disk): `finish()` completes them, much later.
 */
class HungDevice implements BlockDevice {
  readonly inner: BlockDevice;
  readonly name: string;
  readonly size: number;
  readonly logicalBlockSize: number;
  readonly readOnly: boolean;
  readonly caps: BlockDeviceCaps;
  private readonly range: { offset: number; length: number };
  readonly hung: Deferred<void>[] = [];
  private closed = false;

  constructor(inner: BlockDevice, range: { offset: number; length: number }) {
    this.inner = inner;
    this.range = range;
    this.name = inner.name;
    this.size = inner.size;
    this.logicalBlockSize = inner.logicalBlockSize;
    this.readOnly = inner.readOnly;
    this.caps = inner.caps;
  }

  async read(buf: Buffer, offset: number): Promise<void> {
    if (offset < this.range.offset + this.range.length && offset + buf.length > this.range.offset) {
      const d = deferred();
      this.hung.push(d);
      await d.promise;
      // The data the disk finally returns.
      buf.fill(0x5a);
      return;
    }
    if (this.closed) throw new Error(`${this.name}: closed`);
    await this.inner.read(buf, offset);
  }
  write(buf: Buffer, offset: number, options?: WriteOptions): Promise<void> {
    return this.inner.write(buf, offset, options);
  }
  flush(): Promise<void> {
    return this.inner.flush();
  }
  discard(offset: number, length: number): Promise<void> {
    return this.inner.discard(offset, length);
  }
  writeZeroes(offset: number, length: number, options?: ZeroOptions): Promise<void> {
    return this.inner.writeZeroes(offset, length, options);
  }
  blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.inner.blockStatus(offset, length);
  }
  /** Closes without waiting for the hung reads (they are not its to end). */
  close(): Promise<void> {
    this.closed = true;
    return this.inner.close();
  }

  finish(): void {
    for (const d of this.hung.splice(0)) d.resolve();
  }
}

test('an I/O that never settles: stop is bounded and leaves nothing; its late end touches nothing of the stopped device', async () => {
  const cacheMem = new MemoryBlockDevice(8 * MiB, { name: 'cache' });
  const backingMem = new MemoryBlockDevice(8 * MiB, { name: 'backing' });
  await formatCache(cacheMem, { bucketSize: 16, blockSize: 8, setUuid: SET_UUID });
  await formatBacking(backingMem, { setUuid: SET_UUID });
  // Data starts at sector 16 of the backing device (data_offset): hang the first 64 KiB of data.
  const backing = new HungDevice(backingMem, { offset: 16 * 512, length: 64 * 1024 });
  const cap = captureLog();
  try {
    const { registry, set, dev } = await register(cacheMem, backing, bounds(200));
    const att = dev.attachment;
    assert.ok(att);
    // A miss (would fill the cache afterwards) and a read of a range the cache will never see.
    const stuck = [track(dev.device.read(Buffer.alloc(4096), 0)), track(dev.device.read(Buffer.alloc(8192), 8192))];
    await until(() => backing.hung.length === 2, 'both reads reach the backing device');

    const t0 = performance.now();
    await within(3000, 'stopAll', registry.stopAll());
    const elapsed = performance.now() - t0;
    assert.ok(elapsed < 2000, `stopAll took ${Math.round(elapsed)} ms`);
    assert.deepEqual(
      stuck.map((s) => s.state),
      ['pending', 'pending'],
      'the reads are still stuck below',
    );
    assert.equal(dev.attachment, undefined, 'the attachment was ended without them');
    assert.equal(set.devices.size, 0);
    assert.ok(!registry.sets.has(set.uuid) && registry.devices.length === 0, 'everything unregistered');
    assertNothingLeft();

    // Much later the disk answers: the requests end (with the data, nobody
    // listening any more), the last reference finds the attachment ended, no
    // fill is started, nothing runs afterwards.
    const workersBefore = Worker.live().size;
    backing.finish();
    await until(() => stuck.every((s) => s.state !== 'pending'), 'the late reads end');
    assert.deepEqual(
      stuck.map((s) => s.state),
      ['fulfilled', 'fulfilled'],
    );
    assert.equal(Worker.live().size, workersBefore);
    assert.equal(att.ref.count, 0);
    assert.equal(dev.request.requestsInFlight, 0);
    assert.equal(dev.request.fillsPending, 0, 'no cache fill for a stopped device');
    assertNothingLeft();
  } finally {
    cap.restore();
  }
  const log = cap.lines.join('\n');
  assert.match(log, /bcache0: 2 request\(s\) still in flight after 200 ms/);
  assert.doesNotMatch(log, /worker .* failed|unhandled/i);
});

test('a device stopped alone while its set runs: a write stuck in the cache device is given up on, and its late end is an ordinary insert into the live set', async () => {
  const cacheMem = new MemoryBlockDevice(8 * MiB, { name: 'cache' });
  const backingMem = new MemoryBlockDevice(8 * MiB, { name: 'backing' });
  await formatCache(cacheMem, { bucketSize: 16, blockSize: 8, setUuid: SET_UUID });
  await formatBacking(backingMem, { setUuid: SET_UUID, writeback: true });
  const cache = new FaultyBlockDevice(cacheMem, { name: 'cache' });
  const cap = captureLog();
  try {
    const { registry, set, dev } = await register(cache, backingMem, bounds(200));
    await dev.device.write(pattern(1, 0, 8), 0);
    await dev.device.flush();
    const hold = cache.hold({ ops: ['write'] });
    const late = track(dev.device.write(pattern(2, 64, 8), 64 * 512));
    await within(2000, 'the write reaching the cache device', hold.waitForHeld(1));

    const t0 = performance.now();
    await within(3000, 'the device stop', dev.stop());
    assert.ok(performance.now() - t0 < 2000);
    assert.equal(late.state, 'pending');
    assert.equal(set.devices.size, 0, 'the attachment ended without the write');
    assert.ok(!set.gone && !set.cs.stopped, 'the set runs on');

    // The cache device answers again: the write ends with an ordinary
    // insert into the set (journaled, its allocation given back).
    hold.release();
    await until(() => late.state !== 'pending', 'the late write ends');
    assert.equal(late.state, 'fulfilled');
    assert.deepEqual(await checkMarks(set.cs), [], 'the set is consistent: pins and marks agree with the tree');

    // The device registered again finds both writes in the cache.
    const again = await registry.register(backingMem.clone());
    assert.equal(again.kind, 'backing');
    const got = Buffer.alloc(8 * 512);
    await again.dev.device.read(got, 64 * 512);
    assert.ok(got.equals(pattern(2, 64, 8)), 'the late write is there');
    await again.dev.device.read(got, 0);
    assert.ok(got.equals(pattern(1, 0, 8)));
    await within(5000, 'stopAll', registry.stopAll());
  } finally {
    cap.restore();
  }
  assert.match(cap.lines.join('\n'), /bcache0: 1 request\(s\) still in flight after 200 ms/);
  assertNothingLeft();
});
