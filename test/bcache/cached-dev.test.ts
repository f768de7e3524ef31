// Backing devices: registration in any order, attach rules, the writeback
// worker, two-phase detach, stop and re-registration, and the lifecycle
// rules (nothing left after a stop; a stopped set can be collected).

import { WRITEBACK_PRESSURE_IN_USE } from '../../src/bcache/writeback.ts';
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { MemoryBlockDevice } from '../../src/blockdev/memory.ts';
import type { BlockDevice, BlockDeviceCaps, Extent, WriteOptions, ZeroOptions } from '../../src/blockdev/types.ts';
import { INVALID_UUID, SB_OFFSET, SB_SIZE } from '../../src/format/constants.ts';
import { bdevState, decodeSuperblock, encodeSuperblock, setFlagBits } from '../../src/format/superblock.ts';
import { isZeroUuid } from '../../src/format/uuid-text.ts';
import { Registry } from '../../src/bcache/registry.ts';
import { RateLimiter } from '../../src/bcache/writeback.ts';
import { captureLog } from '../../src/util/log.ts';
import { Prng } from '../../src/util/prng.ts';
import { assertNothingLeft, formatCache } from './helpers.ts';
import { formatBacking, makePair, mem, MiB, pattern } from './request-helpers.ts';

const S = 512;

function sbOf(dev: BlockDevice) {
  const block = Buffer.alloc(SB_SIZE);
  mem(dev).clone().readSync(block, SB_OFFSET);
  return decodeSuperblock(block);
}

/** Records the offsets of writes (to check writeback's LBA order). */
class RecordingDevice implements BlockDevice {
  readonly inner: MemoryBlockDevice;
  readonly writes: number[] = [];
  readonly name: string;
  readonly size: number;
  readonly logicalBlockSize = 512;
  readonly readOnly = false;
  readonly caps: BlockDeviceCaps;
  constructor(inner: MemoryBlockDevice) {
    this.inner = inner;
    this.name = inner.name;
    this.size = inner.size;
    this.caps = inner.caps;
  }
  read(buf: Buffer, offset: number): Promise<void> {
    return this.inner.read(buf, offset);
  }
  write(buf: Buffer, offset: number, options?: WriteOptions): Promise<void> {
    this.writes.push(offset);
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
  close(): Promise<void> {
    return this.inner.close();
  }
}

test('the rate limiter paces by sectors per second, within the kernel bounds', () => {
  const r = new RateLimiter();
  r.reset(1000);
  assert.equal(r.delay(512, 1024, 1000), 500);
  assert.equal(r.delay(512, 1024, 1000), 1000);
  // Never more than 2.5 s ahead, never more than 2 s behind.
  assert.equal(r.delay(100000, 1024, 1000), 2500);
  r.reset(1000);
  assert.equal(r.delay(8, 1024, 10000), 0);
  assert.equal(r.delay(1024, 1024, 10000), 0, 'a backlog of 2 s is caught up at once');
});

test('writeback copies dirty data in LBA order, marks it clean, and the superblock CLEAN', async () => {
  const inner = new MemoryBlockDevice(16 * MiB, { name: 'backing' });
  const backingDev = new RecordingDevice(inner);
  const p = await makePair({ backingDev, backing: { writeback: true }, settings: { writebackRunning: false } });
  const d = p.dev.device;
  const extents = [4096, 64, 2048, 512, 1024, 8];
  for (const at of extents) await d.write(pattern(at, at, 8), at * S);
  assert.equal(p.dev.dirtySectors, 48);
  assert.equal(bdevState(sbOf(inner)), 2);
  backingDev.writes.length = 0;
  p.dev.settings.writebackRunning = true;
  p.dev.attachment?.writeback.wake();
  await p.dev.attachment?.writeback.whenIdle();
  assert.equal(p.dev.dirtySectors, 0);
  assert.equal(bdevState(sbOf(inner)), 1, 'clean again on disk');
  const data = backingDev.writes.filter((o) => o !== SB_OFFSET);
  assert.deepEqual(
    data,
    [...extents].sort((a, b) => a - b).map((s) => (s + 16) * S),
    'in LBA order',
  );
  for (const at of extents) {
    const raw = Buffer.alloc(8 * S);
    inner.readSync(raw, (at + 16) * S);
    assert.deepEqual(raw, pattern(at, at, 8), `sector ${at} written back at data_offset`);
  }
  const wb = p.set.writebackKeys;
  assert.equal(wb.done, extents.length);
  // The data is still cached, now clean: reads hit.
  const buf = Buffer.alloc(8 * S);
  await d.read(buf, 2048 * S);
  assert.deepEqual(buf, pattern(2048, 2048, 8));
  assert.equal(p.dev.stats.total.cacheHits, 1);
  await p.registry.stopAll();
  assertNothingLeft();
});

test('detach is two-phase: dirty data written back, superblock NONE, slot invalidated, passthrough after', async () => {
  const p = await makePair({ backing: { writeback: true }, settings: { writebackRunning: false } });
  const d = p.dev.device;
  const cs = p.set.cs;
  await d.write(pattern(1, 0, 64), 0);
  const inode = p.dev.attachment?.inode ?? -1;
  assert.equal(inode, 0);
  const cap = captureLog();
  try {
    // writeback_running=0 does not hold up a detach: it writes back at full speed.
    await p.dev.detach();
  } finally {
    cap.restore();
  }
  assert.ok(
    cap.lines.some((l) => l.includes('Caching disabled for backing')),
    cap.lines.join('\n'),
  );
  assert.equal(p.dev.attached, false);
  assert.equal(p.set.devices.size, 0);
  const sb = sbOf(p.backingDev);
  assert.equal(bdevState(sb), 0, 'NONE');
  assert.ok(isZeroUuid(sb.setUuid), 'set uuid zeroed');
  assert.deepEqual(cs.uuids.get(inode).uuid, Buffer.from(INVALID_UUID), 'slot invalidated');
  assert.equal(cs.uuids.findEmpty(), 1, 'an invalidated slot is never reused');
  // The data is on the backing device, and the device keeps serving in passthrough.
  const raw = Buffer.alloc(64 * S);
  mem(p.backingDev).readSync(raw, 16 * S);
  assert.deepEqual(raw, pattern(1, 0, 64));
  await d.write(pattern(2, 8, 8), 8 * S);
  mem(p.backingDev).readSync(raw, 16 * S);
  assert.equal(p.dev.stats.total.cacheHits, 0);
  assert.deepEqual(raw.subarray(8 * S, 16 * S), pattern(2, 8, 8));
  const back = Buffer.alloc(64 * S);
  await d.read(back, 0);
  assert.deepEqual(back.subarray(8 * S, 16 * S), pattern(2, 8, 8));
  assert.equal(p.dev.running, true);
  // Detaching again is a no-op.
  await p.dev.detach();
  await p.registry.stopAll();
  assertNothingLeft();
});

test('a detach waits for requests in flight, which complete through the cache', async () => {
  const p = await makePair({ backing: { writeback: true } });
  const d = p.dev.device;
  const writes = Array.from({ length: 16 }, (_, i) => d.write(pattern(3, i * 8, 8), i * 8 * S));
  const detached = p.dev.detach();
  await Promise.all(writes);
  await detached;
  const raw = Buffer.alloc(128 * S);
  mem(p.backingDev).readSync(raw, 16 * S);
  assert.deepEqual(raw, Buffer.concat(Array.from({ length: 16 }, (_, i) => pattern(3, i * 8, 8))));
  await p.registry.stopAll();
  assertNothingLeft();
});

test('stop keeps the attachment: re-registering (in either order) finds the dirty data', async () => {
  const setUuid = randomBytes(16);
  const cacheDev = new MemoryBlockDevice(48 * MiB, { name: 'cache' });
  const backingDev = new MemoryBlockDevice(16 * MiB, { name: 'backing' });
  const p = await makePair({
    cacheDev,
    backingDev,
    cache: { setUuid },
    backing: { writeback: true },
    settings: { writebackRunning: false },
  });
  await p.dev.device.write(pattern(5, 256, 32), 256 * S);
  await p.registry.stopAll();
  assert.equal(bdevState(sbOf(backingDev)), 2, 'still dirty');
  assertNothingLeft();

  // Backing device first: it waits for its cache, without a bcache device.
  const cap = captureLog();
  const r = new Registry({ deviceSettings: () => ({ writebackRunning: false }) });
  let b;
  try {
    b = await r.register(backingDev.clone());
    assert.ok(b.kind === 'backing');
    assert.equal(b.dev.running, false);
    assert.deepEqual(r.running, []);
    const c = await r.register(cacheDev.clone());
    assert.equal(c.kind, 'cache');
  } finally {
    cap.restore();
  }
  assert.ok(cap.lines.some((l) => l.includes('not running bcache0 until the cache is registered')));
  assert.equal(b.dev.running, true);
  assert.equal(b.dev.attached, true);
  assert.equal(b.dev.dirtySectors, 32);
  const buf = Buffer.alloc(32 * S);
  await b.dev.device.read(buf, 256 * S);
  assert.deepEqual(buf, pattern(5, 256, 32));
  await r.stopAll();
  assertNothingLeft();
});

test('attach rules: a dirty device with no slot is refused; a smaller block size is refused; no cache runs uncached', async () => {
  const setUuid = randomBytes(16);
  const cacheDev = new MemoryBlockDevice(48 * MiB, { name: 'cache' });
  await formatCache(cacheDev, { bucketSize: 128, blockSize: 8, setUuid });
  const dirty = new MemoryBlockDevice(8 * MiB, { name: 'dirty' });
  const sb = await formatBacking(dirty, { setUuid });
  sb.flags = setFlagBits(sb.flags, 61n, 3n, 2);
  await dirty.write(encodeSuperblock(sb), SB_OFFSET);
  const small = new MemoryBlockDevice(8 * MiB, { name: 'small' });
  await formatBacking(small, { setUuid, blockSize: 1 });
  const loose = new MemoryBlockDevice(8 * MiB, { name: 'loose' });
  await formatBacking(loose, {});
  const r = new Registry();
  const cap = captureLog();
  try {
    await r.register(cacheDev);
    const d1 = await r.register(dirty);
    const d2 = await r.register(small);
    const d3 = await r.register(loose);
    assert.ok(d1.kind === 'backing' && d2.kind === 'backing' && d3.kind === 'backing');
    assert.equal(d1.dev.attached, false);
    assert.equal(d1.dev.running, false, 'dirty without its cache data: not run');
    assert.equal(d2.dev.attached, false);
    assert.equal(d2.dev.running, true, 'never attached (NONE): runs uncached');
    assert.equal(d3.dev.running, true, 'no cache: passthrough');
    assert.deepEqual(
      r.running.map((d) => d.name),
      ['bcache1', 'bcache2'],
    );
    // A passthrough device reads and writes the backing device at data_offset.
    await d3.dev.device.write(pattern(9, 0, 8), 0);
    const raw = Buffer.alloc(8 * S);
    loose.readSync(raw, 16 * S);
    assert.deepEqual(raw, pattern(9, 0, 8));
  } finally {
    cap.restore();
  }
  assert.ok(
    cap.lines.some((l) => l.includes("Couldn't find uuid for dirty in set")),
    cap.lines.join('\n'),
  );
  assert.ok(cap.lines.some((l) => l.includes("Couldn't attach small: block size less than set's block size")));
  await r.stopAll();
  assertNothingLeft();
});

test('a new attachment fills a slot with uuid, label and times, and writes the backing superblock', async () => {
  let now = 1700000000;
  const p = await makePair({ registry: { now: () => now } });
  const cs = p.set.cs;
  const e = cs.uuids.get(0);
  assert.deepEqual(e.uuid, p.dev.sb.uuid);
  assert.equal(e.firstReg, 1700000000);
  assert.equal(e.lastReg, 1700000000);
  const sb = sbOf(p.backingDev);
  assert.equal(bdevState(sb), 1);
  assert.deepEqual(sb.setUuid, p.setUuid);
  await p.registry.stopAll();
  // Re-attach: same slot, last_reg updated.
  now += 100;
  const r = new Registry({ now: () => now });
  await r.register(mem(p.cacheDev).clone());
  const b = await r.register(mem(p.backingDev).clone());
  assert.ok(b.kind === 'backing');
  assert.equal(b.dev.attachment?.inode, 0);
  const set = [...r.sets.values()][0];
  assert.ok(set);
  assert.equal(set.cs.uuids.get(0).lastReg, 1700000100);
  assert.equal(set.cs.uuids.get(0).firstReg, 1700000000);
  await r.stopAll();
  assertNothingLeft();
});

test('after a stop nothing is left, and the cache set and devices can be garbage-collected', async (t) => {
  const gc = (globalThis as { gc?: () => void }).gc;
  if (!gc) {
    t.skip('run with --expose-gc');
    return;
  }
  const refs = await (async () => {
    const p = await makePair({ backing: { writeback: true } });
    await p.dev.device.write(pattern(1, 0, 64), 0);
    const buf = Buffer.alloc(64 * S);
    await p.dev.device.read(buf, 4096 * S);
    await p.registry.stopAll();
    return { cs: new WeakRef(p.set.cs), dev: new WeakRef(p.dev), registry: new WeakRef(p.registry) };
  })();
  assertNothingLeft();
  for (let i = 0; i < 10 && (refs.cs.deref() || refs.dev.deref()); i++) {
    await new Promise((resolve) => setImmediate(resolve));
    gc();
  }
  assert.equal(refs.cs.deref(), undefined, 'the cache set was collected');
  assert.equal(refs.dev.deref(), undefined, 'the cached device was collected');
  assert.equal(refs.registry.deref(), undefined);
});

test('under pressure writeback is not paced and does not sleep writeback_delay; cleaned buckets are reclaimable at once', async () => {
  // The rate at its minimum (8 sectors a second) and a 30 s writeback_delay:
  // paced, the dirty data here would take hours to go back. No GC pass runs
  // (gcSectors huge), so buckets can only become reclaimable as their last
  // dirty key is cleaned.
  const p = await makePair({
    backingBytes: 64 * MiB,
    backing: { writeback: true },
    registry: { setOptions: { gcSectors: 1 << 30 } },
    settings: {
      sequentialCutoff: 0,
      writebackPercent: 10,
      writebackRate: 8,
      writebackRateMinimum: 8,
      writebackDelay: 30,
    },
  });
  const d = p.dev.device;
  const cs = p.set.cs;
  const wb = p.dev.attachment?.writeback;
  assert.ok(wb);
  // 64 KiB writes (a bucket each) until the cache is past the pressure threshold.
  let n = 0;
  while (cs.inUse < WRITEBACK_PRESSURE_IN_USE + 3) {
    await d.write(pattern(n, n * 128, 128), n * 128 * S);
    n++;
  }
  const t0 = Date.now();
  const relieved = new Promise<void>((resolve) => {
    const off = cs.onDirtyChange(() => {
      if (cs.inUse < WRITEBACK_PRESSURE_IN_USE) {
        off();
        resolve();
      }
    });
  });
  wb.wake();
  let timer: NodeJS.Timeout | undefined;
  const ok = await Promise.race([
    relieved.then(() => true),
    new Promise<boolean>((r) => {
      timer = setTimeout(() => {
        r(false);
      }, 15_000);
    }),
  ]);
  clearTimeout(timer);
  assert.ok(
    ok,
    `in_use still ${cs.inUse} after 15 s: writeback was paced or slept under pressure (it needs well under a second)`,
  );
  assert.ok(Date.now() - t0 < 15_000);
  assert.ok(p.dev.dirtySectors < n * 128, 'some dirty data went back');
  assert.equal(cs.gc.stats.runs, 0, 'buckets came back without a GC pass');
  await p.registry.stopAll();
  assertNothingLeft();
});

test('under pressure writeback empties whole buckets first: random writes give room back long before the dirty data is all written back', async () => {
  // Random 4 KiB writes put keys from all over the device in every bucket: in
  // LBA order no bucket would empty until nearly all the dirty data had gone
  // back. No GC pass runs (gcSectors huge), no pacing (pressure).
  const p = await makePair({
    backingBytes: 256 * MiB,
    backing: { writeback: true },
    registry: { setOptions: { gcSectors: 1 << 30 } },
    settings: { sequentialCutoff: 0, writebackPercent: 10, writebackRunning: false },
  });
  const d = p.dev.device;
  const cs = p.set.cs;
  const wb = p.dev.attachment?.writeback;
  assert.ok(wb);
  // Distinct random 4 KiB blocks, from a fixed seed.
  const blocks = (256 * MiB) / 4096;
  const rng = new Prng(12345);
  const seen = new Set<number>();
  const written: number[] = [];
  while (cs.inUse < WRITEBACK_PRESSURE_IN_USE + 5) {
    const block = rng.below(blocks);
    if (seen.has(block)) continue;
    seen.add(block);
    written.push(block);
    await d.write(pattern(block, block * 8, 8), block * 4096);
  }
  const dirtyBefore = p.dev.dirtySectors;
  let dirtyWhenRelieved = -1;
  const relieved = new Promise<void>((resolve) => {
    const off = cs.onDirtyChange(() => {
      if (cs.inUse < WRITEBACK_PRESSURE_IN_USE) {
        dirtyWhenRelieved = p.dev.dirtySectors;
        off();
        resolve();
      }
    });
  });
  p.dev.settings.writebackRunning = true;
  wb.wake();
  await relieved;
  assert.ok(
    dirtyWhenRelieved > dirtyBefore / 2,
    `in_use fell below ${WRITEBACK_PRESSURE_IN_USE} % with ${dirtyWhenRelieved} of ${dirtyBefore} dirty sectors left: buckets emptied one by one`,
  );
  await wb.whenIdle();
  assert.equal(p.dev.dirtySectors, 0);
  assert.equal(cs.gc.stats.runs, 0, 'no GC pass was needed for the room');
  // Everything written is on the backing device, each block in its place.
  const back = mem(p.backingDev).clone();
  const got = Buffer.alloc(4096);
  for (const block of written) {
    back.readSync(got, 8192 + block * 4096);
    assert.ok(got.equals(pattern(block, block * 8, 8)), `block ${block} on the backing device`);
  }
  await p.registry.stopAll();
  assertNothingLeft();
});

/** Logs each operation, with the device's name, into a shared list: the order across devices. */
class OpLogDevice extends RecordingDevice {
  readonly log: string[];
  constructor(inner: MemoryBlockDevice, log: string[]) {
    super(inner);
    this.log = log;
  }
  override write(buf: Buffer, offset: number, options?: WriteOptions): Promise<void> {
    this.log.push(`${this.name} write ${offset}`);
    return super.write(buf, offset, options);
  }
  override flush(): Promise<void> {
    this.log.push(`${this.name} flush`);
    return super.flush();
  }
}

test('writeback commits the journal before copying keys not yet durable, and skips that flush when they are', async () => {
  const log: string[] = [];
  const cacheDev = new OpLogDevice(new MemoryBlockDevice(48 * MiB, { name: 'cache' }), log);
  const backingDev = new OpLogDevice(new MemoryBlockDevice(16 * MiB, { name: 'backing' }), log);
  // A journal that writes only when asked: the writes' keys stay in the open entry.
  const p = await makePair({
    cacheDev,
    backingDev,
    backing: { writeback: true },
    settings: { writebackRunning: false },
    registry: { setOptions: { journalDelayMs: 60_000 } },
  });
  const d = p.dev.device;
  const pass = async (): Promise<string[]> => {
    log.length = 0;
    p.dev.settings.writebackRunning = true;
    p.dev.attachment?.writeback.wake();
    await p.dev.attachment?.writeback.whenIdle();
    p.dev.settings.writebackRunning = false;
    // What the cache device did before the first copy reached the backing device.
    const first = log.findIndex((op) => op.startsWith('backing write') && op !== `backing write ${SB_OFFSET}`);
    assert.ok(first >= 0, `a copy was written back: ${log.join(', ')}`);
    return log.slice(0, first).filter((op) => op.startsWith('cache'));
  };
  for (const at of [64, 512, 2048]) await d.write(pattern(at, at, 8), at * S);
  const before1 = await pass();
  assert.ok(before1.includes('cache flush'), `keys only in the open journal entry are committed first: ${before1.join(', ')}`);
  assert.equal(p.dev.dirtySectors, 0);
  for (const at of [128, 1024, 4096]) await d.write(pattern(at, at, 8), at * S);
  await p.set.cs.flush(); // the keys are durable now
  const before2 = await pass();
  assert.ok(!before2.includes('cache flush'), `durable keys need no flush of the cache: ${before2.join(', ')}`);
  assert.equal(p.dev.dirtySectors, 0);
  for (const at of [64, 128, 512, 1024, 2048, 4096]) {
    const raw = Buffer.alloc(8 * S);
    backingDev.inner.readSync(raw, (at + 16) * S);
    assert.deepEqual(raw, pattern(at, at, 8), `sector ${at} written back`);
  }
  await p.registry.stopAll();
  assertNothingLeft();
});
