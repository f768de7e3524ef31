// DESIGN rules 1, 2, 4, 5 for a cache set: stop() stops every worker and
// leaves no timer, is idempotent and bounded, and the set can then be garbage
// collected; a fatal metadata error disables I/O at once, later calls fail
// fast, and stop() still tears down cleanly.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { FaultyBlockDevice } from '../../src/blockdev/faulty.ts';
import { MemoryBlockDevice } from '../../src/blockdev/memory.ts';
import { CacheSet } from '../../src/bcache/cache-set.ts';
import { Worker } from '../../src/util/lifecycle.ts';
import { captureLog } from '../../src/util/log.ts';
import { assertNothingLeft, formatCache } from './helpers.ts';
import { writeExtent } from './model.ts';

const MiB = 1024 * 1024;

function collectGarbage(): void {
  const gc = (globalThis as { gc?: () => void }).gc;
  if (!gc) throw new Error('run the tests with --expose-gc');
  gc();
}

test('after stop(): no worker, no timer, no open device, and the set is garbage-collectable', async () => {
  const dev = new MemoryBlockDevice(32 * MiB);
  await formatCache(dev, { bucketSize: 64 });
  let ref: WeakRef<CacheSet> | undefined;
  await (async () => {
    // A long journal delay: the delayed commit's timer must not outlive stop().
    const cs = await CacheSet.open(dev, { journalDelayMs: 60_000 });
    assert.ok(Worker.live().size >= 3, 'allocator, journal and gc workers run');
    await writeExtent(cs, 1, 0, 64, 1, true);
    cs.triggerGc();
    await Promise.all([cs.stop(), cs.stop()]);
    await cs.stop();
    await assert.rejects(cs.lookup(1, 0, 8), { code: 'ESHUTDOWN' });
    ref = new WeakRef(cs);
  })();
  assertNothingLeft();
  await assert.rejects(dev.read(Buffer.alloc(512), 0), { code: 'ESHUTDOWN' }, 'the set closed its device');
  for (let i = 0; i < 20 && ref?.deref(); i++) {
    await new Promise<void>((resolve) => setImmediate(resolve));
    collectGarbage();
  }
  assert.equal(ref?.deref(), undefined, 'the stopped set was collected');
});

test('a failed metadata write disables I/O; calls fail fast; stop() still ends everything', async () => {
  const mem = new MemoryBlockDevice(32 * MiB);
  await formatCache(mem, { bucketSize: 64 });
  const dev = new FaultyBlockDevice(mem);
  const cap = captureLog();
  try {
    const cs = await CacheSet.open(dev, { closeDevice: false, journalDelayMs: 1 });
    await writeExtent(cs, 1, 0, 16, 1, true);
    // Every flush fails from now on: the next journal commit is fatal.
    dev.failAlways({ ops: ['flush'] });
    await assert.rejects(writeExtent(cs, 1, 16, 16, 2, true, true));
    assert.equal(cs.ioDisabled, true);
    await assert.rejects(cs.lookup(1, 0, 8), { code: 'EIO' });
    await assert.rejects(cs.allocSectors({ inode: 1, offset: 0, sectors: 8, wait: true }), { code: 'EIO' });
    const t0 = Date.now();
    await cs.stop();
    assert.ok(Date.now() - t0 < 5000, 'stop is quick after a failure');
  } finally {
    cap.restore();
  }
  assert.ok(
    cap.lines.some((l) => /bch_cache_set_error\(\) error on .*, disabling caching/.test(l)),
    cap.lines.join('\n'),
  );
  assertNothingLeft();
});

test('a bring-up that fails names what is wrong and leaves nothing behind', async () => {
  const dev = new MemoryBlockDevice(32 * MiB);
  await formatCache(dev, { bucketSize: 64 });
  const cs = await CacheSet.open(dev, { closeDevice: false });
  const ring = cs.journal.ring;
  await cs.stop();
  // Wipe every journal bucket: the kernel's "no journal entries found".
  for (const b of ring) mem0(dev, b * 64 * 512, 64 * 512);
  const cap = captureLog();
  try {
    await assert.rejects(CacheSet.open(dev, { closeDevice: false }), /no journal entries found/);
  } finally {
    cap.restore();
  }
  assertNothingLeft();
  // A backing device is not a cache.
  await assert.rejects(CacheSet.open(new MemoryBlockDevice(MiB)), /bad magic|not a bcache superblock/);
});

function mem0(dev: MemoryBlockDevice, offset: number, length: number): void {
  dev.writeSync(Buffer.alloc(length), offset);
}
