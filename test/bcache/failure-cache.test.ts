// Cache device failures (issue 6, 2018 series #4-#9): each scenario runs a
// real NBD client against bcache0 while the cache device fails, then proves
// the retire: bounded, no worker of the set left, the set unregistered and
// collectable, the bystander device still serving, and the data where it
// belongs after a restart.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { SB_OFFSET, SB_SIZE } from '../../src/format/constants.ts';
import { bdevState, decodeSuperblock } from '../../src/format/superblock.ts';
import type { MemoryBlockDevice } from '../../src/blockdev/memory.ts';
import { Cmd } from '../../src/nbd/protocol.ts';
import { SimClock } from '../../src/util/clock.ts';
import { watchLog } from '../helpers/log-watch.ts';
import { assertQuiet, checkRetired, collected, makeRig, restart, retired, within, type Rig } from './failure-rig.ts';
import { pattern } from './request-helpers.ts';

const S = 512;

function backingState(m: MemoryBlockDevice): number {
  const block = Buffer.alloc(SB_SIZE);
  m.clone().readSync(block, SB_OFFSET);
  return bdevState(decodeSuperblock(block));
}

/** The journal buckets as a byte range of the cache device. */
function journalRange(rig: Rig): { offset: number; length: number } {
  const ring = rig.set.cs.journal.ring;
  const bucketBytes = rig.set.cs.bucketSize * S;
  const first = Math.min(...ring);
  const last = Math.max(...ring);
  return { offset: first * bucketBytes, length: (last - first + 1) * bucketBytes };
}

async function write(rig: Rig, sector: number, data: Buffer, flags = 0): Promise<number> {
  return (await rig.client.writeAt(sector * S, data, flags)).error;
}

async function readBack(rig: Rig, sector: number, sectors: number): Promise<Buffer | undefined> {
  const r = await rig.client.readAt(sector * S, sectors * S);
  return r.error === 0 ? r.data : undefined;
}

async function flush(rig: Rig): Promise<number> {
  return (await rig.client.request({ type: Cmd.FLUSH, offset: 0, length: 0 })).error;
}

/** The bystander serves reads and writes. */
async function otherServes(rig: Rig): Promise<void> {
  const data = pattern(99, 0, 8);
  assert.equal((await rig.otherClient.writeAt(0, data)).error, 0, 'the other device takes writes');
  const r = await rig.otherClient.readAt(0, data.length);
  assert.equal(r.error, 0);
  assert.ok(r.data?.equals(data), 'the other device reads back');
}

/** Close the rig; the set must then be collectable and nothing of it left. */
async function finish(rig: Rig): Promise<void> {
  const ref = rig.forgetSet();
  await rig.close();
  await assertQuiet();
  assert.ok(await collected(ref), 'the retired cache set was garbage-collected');
}

test('a journal write fails under a clean writethrough cache: the set retires, bcache0 serves on from the backing device', async () => {
  const watch = watchLog();
  const rig = await makeRig();
  try {
    const a = pattern(1, 0, 64);
    assert.equal(await write(rig, 0, a), 0);
    assert.equal(await flush(rig), 0);
    assert.ok((await readBack(rig, 0, 64))?.equals(a), 'a cached read');
    const { offset, length } = journalRange(rig);
    rig.cache.failRange(offset, length, { ops: ['write'] });
    const b = pattern(2, 64, 64);
    // The write's journal commit fails: the client notices nothing.
    assert.equal(await write(rig, 64, b, 1 /* FUA */), 0, 'the FUA write succeeds');
    assert.equal(await flush(rig), 0, 'a flush succeeds');
    await retired(rig);
    await watch.waitFor(/is "auto" and cache is clean, keep it alive/);
    assert.ok(watch.lines.some((l) => /bch_cache_set_error\(\) error on .*journal.*disabling caching/.test(l)));
    await checkRetired(rig);
    assert.equal(rig.dev.stopped, false, 'bcache0 keeps running');
    assert.equal(rig.dev.attached, false, 'uncached');
    const c = pattern(3, 128, 64);
    assert.equal(await write(rig, 128, c), 0);
    assert.ok((await readBack(rig, 0, 64))?.equals(a));
    assert.ok((await readBack(rig, 64, 64))?.equals(b));
    assert.ok((await readBack(rig, 128, 64))?.equals(c));
    assert.equal(await flush(rig), 0);
    await otherServes(rig);
    // The stale cache can never be trusted again: the backing device says "no cache".
    assert.equal(backingState(rig.backingMem), 0);
    await finish(rig);
    const again = await restart([rig.backingMem]);
    try {
      const d = again.devices[0];
      assert.ok(d?.running, 'the backing device runs on its own after a restart');
      for (const [sector, data] of [
        [0, a],
        [64, b],
        [128, c],
      ] as const) {
        const buf = Buffer.alloc(data.length);
        await d.device.read(buf, sector * S);
        assert.ok(buf.equals(data), `sector ${sector} intact after restart`);
      }
    } finally {
      await again.close();
    }
  } finally {
    watch.restore();
  }
});

test('a journal write fails while data is dirty ("auto"): bcache0 stops, the client gets errors, the backing device is not written again', async () => {
  const watch = watchLog();
  const rig = await makeRig({ settings: { writebackRunning: false } });
  try {
    await rig.dev.setCacheMode(1);
    const a = pattern(4, 0, 64);
    assert.equal(await write(rig, 0, a), 0);
    assert.equal(await flush(rig), 0);
    assert.ok(rig.dev.dirtySectors > 0, 'dirty data in the cache');
    const { offset, length } = journalRange(rig);
    rig.cache.failRange(offset, length, { ops: ['write'] });
    const backingWrites = (): number => rig.backing.counters().ops.write;
    assert.notEqual(await write(rig, 64, pattern(5, 64, 64), 1), 0, 'the FUA write fails');
    await retired(rig);
    await watch.waitFor(/is "auto" and cache is dirty, stop it to avoid potential data corruption/);
    await checkRetired(rig);
    assert.equal(rig.dev.stopped, true);
    const before = backingWrites();
    assert.notEqual(await write(rig, 128, pattern(6, 128, 8)), 0, 'writes fail');
    assert.equal(await readBack(rig, 0, 8), undefined, 'reads fail');
    assert.equal(backingWrites(), before, 'nothing reaches the backing device afterwards');
    assert.equal(backingState(rig.backingMem), 2, 'the backing device stays marked dirty');
    await otherServes(rig);
    await finish(rig);
    // The failure was the journal's: with the cache device back, the flushed dirty data is there.
    const again = await restart([rig.cacheMem, rig.backingMem]);
    try {
      const d = again.devices[0];
      assert.ok(d?.attached, 'the backing device re-attaches to its cache');
      const buf = Buffer.alloc(a.length);
      await d.device.read(buf, 0);
      assert.ok(buf.equals(a), 'flushed dirty data intact after restart');
    } finally {
      await again.close();
    }
  } finally {
    watch.restore();
  }
});

test('"always" stops bcache0 even with a clean cache', async () => {
  const watch = watchLog();
  const rig = await makeRig({ settings: { stopWhenCacheSetFailed: 'always' } });
  try {
    assert.equal(await write(rig, 0, pattern(7, 0, 16)), 0);
    rig.cache.pull();
    assert.notEqual(await flush(rig), 0, 'the flush fails: the device is stopping');
    await retired(rig);
    await watch.waitFor(/is "always", stop it for failed cache set/);
    await checkRetired(rig);
    assert.equal(rig.dev.stopped, true);
    assert.equal(await readBack(rig, 0, 16), undefined);
    await otherServes(rig);
    await finish(rig);
  } finally {
    watch.restore();
  }
});

test('the cache device is pulled while a FLUSH waits on it: the FLUSH completes from the backing device', async () => {
  const rig = await makeRig();
  try {
    const a = pattern(8, 0, 32);
    assert.equal(await write(rig, 0, a), 0);
    const hold = rig.cache.hold({ ops: ['flush'] });
    const flushed = flush(rig);
    await hold.waitForHeld();
    rig.cache.pull();
    hold.release();
    assert.equal(await within(10_000, 'the FLUSH', flushed), 0, 'the FLUSH succeeds');
    await retired(rig);
    await checkRetired(rig);
    assert.ok((await readBack(rig, 0, 32))?.equals(a));
    await otherServes(rig);
    await finish(rig);
  } finally {
    // nothing else to restore
  }
});

test('the cache device is pulled during writeback, with its step blocked in I/O: the worker ends, bcache0 stops, dirty data survives', async () => {
  const rig = await makeRig({ settings: { writebackRunning: false } });
  await rig.dev.setCacheMode(1);
  const a = pattern(9, 0, 256);
  assert.equal(await write(rig, 0, a), 0);
  assert.equal(await flush(rig), 0);
  const hold = rig.cache.hold({ ops: ['read'] });
  rig.dev.settings.writebackRunning = true;
  rig.dev.attachment?.writeback.wake();
  await hold.waitForHeld();
  rig.cache.pull();
  hold.release();
  // A request notices the pulled device (the writeback read alone fails quietly: a key left dirty).
  assert.notEqual(await write(rig, 512, pattern(10, 512, 8), 1), 0);
  await retired(rig);
  await checkRetired(rig);
  assert.equal(rig.dev.stopped, true, 'dirty: stopped');
  await otherServes(rig);
  await finish(rig);
  const again = await restart([rig.cacheMem, rig.backingMem]);
  try {
    const d = again.devices[0];
    assert.ok(d?.attached);
    const buf = Buffer.alloc(a.length);
    await d.device.read(buf, 0);
    assert.ok(buf.equals(a), 'dirty data intact');
  } finally {
    await again.close();
  }
});

test('the cache device is pulled while detaching and while writeback_running is toggled: the retire is bounded', async () => {
  const rig = await makeRig({ settings: { writebackRunning: false } });
  await rig.dev.setCacheMode(1);
  for (let i = 0; i < 8; i++) assert.equal(await write(rig, i * 64, pattern(11, i * 64, 64)), 0);
  const hold = rig.cache.hold({ ops: ['read'] });
  const detached = rig.dev.detach();
  await hold.waitForHeld();
  const toggling = (async () => {
    for (let i = 0; i < 50 && !rig.dev.stopped; i++) {
      rig.dev.settings.writebackRunning = i % 2 === 0;
      rig.dev.attachment?.writeback.wake();
      await new Promise<void>((resolve) => setImmediate(resolve));
    }
  })();
  rig.cache.pull();
  hold.release();
  rig.set.cs.fail(new Error('test: cache device pulled'));
  await within(10_000, 'the detach', detached);
  await toggling;
  await retired(rig);
  await checkRetired(rig);
  assert.equal(rig.dev.stopped, true);
  await otherServes(rig);
  await finish(rig);
});

/**
 * The rate-update scenario up to the checks; its own frame keeps the
 * references to the set's objects, so they are gone before the collection check.
 */
async function rateStepHeldWhenPulled(rig: Rig, clock: SimClock): Promise<void> {
  const update = rig.dev.attachment?.writeback.rateUpdate;
  assert.ok(update?.running, 'the rate update runs with writeback');
  // The step reads the cache device and that read is held: a step stuck in
  // I/O, ignoring its abort signal as the kernel's would, when the failure hits.
  const hold = rig.cache.hold({ ops: ['read'] });
  let stepIo: Promise<unknown> | undefined;
  update.instrument.beforeStep = async () => {
    delete update.instrument.beforeStep;
    stepIo = rig.cache.read(Buffer.alloc(S), 0).then(
      () => 'read',
      (err: unknown) => err,
    );
    await stepIo;
  };
  let stepsAfter = 0;
  update.instrument.afterStep = () => stepsAfter++;
  const stepsBefore = update.steps;
  // The update comes one simulated second after writeback started: now, not after a real second.
  await clock.advance(1000);
  await within(10_000, 'the held step', hold.waitForHeld());
  rig.cache.pull();
  // A FLUSH meets the pulled device (a cache flush error is fatal): the set
  // fails and the retire begins; the FLUSH waits for its decision.
  const flushed = flush(rig);
  const start = Date.now();
  while (!rig.set.retired) {
    assert.ok(Date.now() - start < 10_000, 'the retire began');
    await new Promise<void>((resolve) => setImmediate(resolve));
  }
  let done = false;
  void rig.set.retired.then(() => (done = true));
  // Every callback that could finish the retire runs, and five simulated seconds pass (below
  // the rate worker's 30 s stop bound): it still waits for the step.
  await clock.advance(5000);
  assert.equal(done, false, 'the retire waits for the step in progress');
  assert.equal(update.running, false, 'the rate worker is stopping');
  hold.release();
  await retired(rig);
  assert.notEqual(await within(10_000, 'the FLUSH', flushed), 0, 'the FLUSH fails: dirty data, bcache0 stops');
  assert.ok((await stepIo) instanceof Error, "the step's I/O failed: the device was pulled");
  await checkRetired(rig);
  assert.equal(stepsAfter, 0, 'the held step applied nothing');
  assert.equal(update.steps, stepsBefore, 'no step ran afterwards');
  delete update.instrument.afterStep;
}

test('the cache device is pulled while a rate update is in progress, its step blocked in I/O: the retire waits for it, then nothing of the set runs', async () => {
  const clock = new SimClock();
  const rig = await makeRig({ settings: { writebackRunning: false, writebackRateUpdateSeconds: 1 }, clock });
  await rig.dev.setCacheMode(1);
  const a = pattern(12, 0, 128);
  assert.equal(await write(rig, 0, a), 0);
  assert.equal(await flush(rig), 0);
  await rateStepHeldWhenPulled(rig, clock);
  assert.equal(rig.dev.stopped, true, 'dirty: stopped');
  await otherServes(rig);
  await finish(rig);
  const again = await restart([rig.cacheMem, rig.backingMem]);
  try {
    const d = again.devices[0];
    assert.ok(d?.attached);
    const buf = Buffer.alloc(a.length);
    await d.device.read(buf, 0);
    assert.ok(buf.equals(a), 'flushed dirty data intact');
  } finally {
    await again.close();
  }
});
