// Backing device failures (2018 series #11-#13), cache read errors and the
// stale-writeback guard (#9's corruption): through a real NBD client, with
// the same retire/leak checks as the cache scenarios.

import { test } from 'node:test';
import { mkdtempSync, rmSync, truncateSync, unlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import assert from 'node:assert/strict';
import { Cmd } from '../../src/nbd/protocol.ts';
import { Registry } from '../../src/bcache/registry.ts';
import { FileBlockDevice } from '../../src/blockdev/file.ts';
import { MemoryBlockDevice } from '../../src/blockdev/memory.ts';
import { watchLog } from '../helpers/log-watch.ts';
import { assertQuiet, checkRetired, makeRig, restart, retired, within } from './failure-rig.ts';
import { assertNothingLeft, formatCache } from './helpers.ts';
import { formatBacking, MiB, pattern } from './request-helpers.ts';

const S = 512;

test('backing errors below error_limit are counted and returned; past it bcache0 stops with io_disable', async () => {
  const watch = watchLog();
  const rig = await makeRig({ settings: { ioErrorLimit: 4 } });
  try {
    const rule = rig.backing.failNth(1, { ops: ['write'], persist: true });
    for (let i = 0; i < 3; i++) {
      assert.notEqual((await rig.client.writeAt(i * 8 * S, pattern(20, i * 8, 8))).error, 0, 'the write fails');
    }
    assert.equal(rig.dev.ioErrors, 3);
    assert.equal(rig.dev.stopped, false, 'below the limit: still serving');
    rule.remove();
    assert.equal((await rig.client.writeAt(0, pattern(21, 0, 8))).error, 0, 'serving again');
    rig.backing.failAlways({ ops: ['write'] });
    assert.notEqual((await rig.client.writeAt(64 * S, pattern(22, 64, 8))).error, 0);
    await watch.waitFor(/stop bcache0: too many IO errors on backing device backing/);
    assert.equal(rig.dev.settings.ioDisable, true);
    assert.equal(rig.dev.stopped, true);
    assert.notEqual((await rig.client.readAt(0, 8 * S)).error, 0, 'a stopped device answers with errors');
    assert.equal(rig.set.cs.ioDisabled, false, 'the cache set is not retired for one bad backing device');
    assert.equal((await rig.otherClient.writeAt(0, pattern(23, 0, 8))).error, 0, 'the other device serves');
    await rig.close();
    await assertQuiet();
  } finally {
    watch.restore();
  }
});

test('a backing device pulled for the offline timeout stops bcache0; its dirty data survives on the cache device', async () => {
  const watch = watchLog();
  const rig = await makeRig({
    settings: { writebackRunning: false },
    backingOfflineMs: 40,
    backingProbeMs: 5,
  });
  try {
    await rig.dev.setCacheMode(1);
    const a = pattern(24, 0, 128);
    assert.equal((await rig.client.writeAt(0, a)).error, 0);
    assert.equal((await rig.client.request({ type: Cmd.FLUSH, offset: 0, length: 0 })).error, 0);
    rig.backing.pull();
    // Writeback fails on the pulled device: the keys stay dirty, the errors are counted.
    rig.dev.settings.writebackRunning = true;
    rig.dev.attachment?.writeback.wake();
    await watch.waitFor(/backing: device offline for \d+ seconds/);
    await watch.waitFor(/disable I\/O request due to backing device offline/);
    await within(10_000, 'the stop', rig.dev.stop());
    assert.ok(rig.dev.ioErrors > 0, 'errors counted');
    assert.equal(rig.set.cs.ioDisabled, false, 'the cache set lives on');
    assert.equal((await rig.otherClient.writeAt(0, pattern(25, 0, 8))).error, 0);
    await rig.close();
    await assertQuiet();
    // The backing device comes back: the dirty data is still in the cache and reads back.
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
  } finally {
    watch.restore();
  }
});

test('a read error on clean cached data is served from the backing device; on dirty data it fails; past io_error_limit the set retires', async () => {
  const rig = await makeRig();
  try {
    rig.set.settings.ioErrorLimit = 3;
    const a = pattern(26, 0, 64);
    assert.equal((await rig.client.writeAt(0, a)).error, 0);
    await rig.dev.request.settle();
    rig.cache.failAlways({ ops: ['read'] });
    const r = await rig.client.readAt(0, a.length);
    assert.equal(r.error, 0, 'the client notices nothing');
    assert.ok(r.data?.equals(a));
    assert.equal(rig.set.cs.io.ioErrors, 1, 'the error is counted');
    assert.equal(rig.set.cs.ioDisabled, false);
    for (let i = 0; i < 2; i++) assert.equal((await rig.client.readAt(0, a.length)).error, 0);
    await retired(rig);
    await checkRetired(rig);
    assert.ok((await rig.client.readAt(0, a.length)).data?.equals(a), 'kept serving uncached');
    await rig.close();
    await assertQuiet();
  } finally {
    // nothing else
  }
});

test('a dirty read error fails the read', async () => {
  const rig = await makeRig({ settings: { writebackRunning: false } });
  await rig.dev.setCacheMode(1);
  assert.equal((await rig.client.writeAt(0, pattern(27, 0, 16))).error, 0);
  rig.cache.failNth(1, { ops: ['read'] });
  assert.notEqual((await rig.client.readAt(0, 16 * S)).error, 0, 'dirty data exists only in the cache');
  assert.equal(rig.set.cs.ioDisabled, false, 'one error is below the limit');
  await rig.close();
  await assertQuiet();
});

test('a backing device whose cache was lost while dirty refuses another cache unless forced; running=1 serves it inconsistent', async () => {
  const rig = await makeRig({ settings: { writebackRunning: false } });
  await rig.dev.setCacheMode(1);
  assert.equal((await rig.client.writeAt(0, pattern(28, 0, 16))).error, 0);
  rig.set.cs.fail(new Error('test: cache lost'));
  await retired(rig);
  assert.equal(rig.dev.stopped, true);
  await rig.close();
  const registry = new Registry({ setOptions: { journalDelayMs: 2 } });
  try {
    const fresh = new MemoryBlockDevice(40 * MiB, { name: 'new-cache' });
    await formatCache(fresh, { bucketSize: 128, blockSize: 8 });
    const c = await registry.register(fresh);
    const b = await registry.register(rig.backingMem.clone());
    assert.ok(c.kind === 'cache' && b.kind === 'backing');
    assert.equal(b.dev.running, false, 'waits for its own cache set');
    await assert.rejects(b.dev.attach(c.set), /superblock says dirty.*force the attach/);
    assert.equal(b.dev.stateName, 'dirty');
    await b.dev.runStale();
    assert.equal(b.dev.stateName, 'inconsistent');
    const buf = Buffer.alloc(16 * S);
    await b.dev.device.read(buf, 0);
  } finally {
    await registry.stopAll();
  }
  const registry2 = new Registry({ setOptions: { journalDelayMs: 2 } });
  try {
    const fresh = new MemoryBlockDevice(40 * MiB, { name: 'new-cache' });
    await formatCache(fresh, { bucketSize: 128, blockSize: 8 });
    const c = await registry2.register(fresh);
    const b = await registry2.register(rig.backingMem.clone());
    assert.ok(c.kind === 'cache' && b.kind === 'backing');
    await b.dev.attach(c.set, { force: true });
    assert.equal(b.dev.stateName, 'clean');
  } finally {
    await registry2.stopAll();
  }
  await assertQuiet();
});

test('a backing file removed while open stops its bcache device after the offline timeout, though its I/O still works', async () => {
  const watch = watchLog();
  const dir = mkdtempSync(join(tmpdir(), 'ubcache-removed-'));
  try {
    const cacheMem = new MemoryBlockDevice(40 * MiB, { name: 'cache' });
    await formatCache(cacheMem, { bucketSize: 128, blockSize: 8, setUuid: Buffer.alloc(16, 7) });
    const path = join(dir, 'backing.img');
    writeFileSync(path, Buffer.alloc(0));
    truncateSync(path, 8 * MiB);
    const backing = await FileBlockDevice.open(path);
    await formatBacking(backing, { setUuid: Buffer.alloc(16, 7), uuid: Buffer.alloc(16, 8) });
    const registry = new Registry({ deviceOptions: { backingOfflineMs: 150, backingProbeMs: 10 } });
    await registry.register(cacheMem);
    const b = await registry.register(backing);
    assert.ok(b.kind === 'backing' && b.dev.attached && b.dev.running);
    const dev = b.dev;
    await dev.device.write(pattern(31, 0, 8), 0);
    unlinkSync(path);
    // The descriptor still works: only the periodic look notices.
    await dev.device.read(Buffer.alloc(4096), 0);
    await watch.waitFor(/bcache0: backing device .*backing\.img was removed/);
    await watch.waitFor(/backing\.img: device offline for \d+ seconds/);
    await watch.waitFor(/disable I\/O request due to backing device offline/);
    await within(10_000, 'the stop', dev.stop());
    assert.equal(dev.stopped, true);
    await registry.stopAll();
    assertNothingLeft();
  } finally {
    watch.restore();
    rmSync(dir, { recursive: true, force: true });
  }
});
