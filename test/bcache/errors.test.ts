// Refused register and attach operations throw OperationError with the
// kernel's errno, set where the refusal is decided, and the kernel's message
// unchanged; the sysfs tree passes both on (tree.test.ts checks it from there).

import { randomBytes } from 'node:crypto';
import { constants } from 'node:os';
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryBlockDevice } from '../../src/blockdev/memory.ts';
import { OperationError, type OperationErrno } from '../../src/bcache/errors.ts';
import { Registry } from '../../src/bcache/registry.ts';
import { BDEV_STATE_DIRTY, BDEV_STATE_MASK, BDEV_STATE_SHIFT, SB_OFFSET } from '../../src/format/constants.ts';
import { encodeSuperblock, setFlagBits } from '../../src/format/superblock.ts';
import { formatUuid } from '../../src/format/uuid-text.ts';
import { setLogSink } from '../../src/util/log.ts';
import { assertNothingLeft, formatCache } from './helpers.ts';
import { formatBacking, MiB } from './request-helpers.ts';

/** `p` rejects with an OperationError of `code` (its errno number to match) and exactly `message`, or one matching it. */
async function refused(p: Promise<unknown>, code: OperationErrno, message: string | RegExp): Promise<OperationError> {
  const err: unknown = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  assert.ok(err instanceof OperationError, `an OperationError, not ${String(err)}`);
  assert.equal(err.code, code);
  assert.equal(err.errno, constants.errno[code]);
  if (typeof message === 'string') assert.equal(err.message, message);
  else assert.match(err.message, message);
  return err;
}

function quiet(): () => void {
  return setLogSink(() => undefined);
}

test('register: EBUSY for a device registered already, EINVAL for the rest, with the kernel messages', async () => {
  const restore = quiet();
  const setUuid = randomBytes(16);
  const uuid = randomBytes(16);
  const cache = new MemoryBlockDevice(48 * MiB, { name: 'cache' });
  await formatCache(cache, { setUuid });
  const backing = new MemoryBlockDevice(8 * MiB, { name: 'backing' });
  await formatBacking(backing, { setUuid, uuid });
  const twin = new MemoryBlockDevice(8 * MiB, { name: 'twin' });
  await formatBacking(twin, { setUuid, uuid });
  const cache2 = new MemoryBlockDevice(48 * MiB, { name: 'cache2' });
  await formatCache(cache2, { setUuid });
  const junk = new MemoryBlockDevice(8 * MiB, { name: 'junk' });
  const r = new Registry({ setOptions: { journalDelayMs: 5 } });
  try {
    await r.register(cache);
    await r.register(backing);
    await refused(r.register(twin), 'EBUSY', 'error twin: device already registered');
    await refused(r.register(cache2), 'EINVAL', 'error cache2: duplicate cache set member');
    const err = await refused(r.register(junk), 'EINVAL', /^error junk: /);
    assert.ok(err.cause instanceof Error, 'the superblock decoder says why');
    await r.stopAll();
    const late = new MemoryBlockDevice(8 * MiB, { name: 'late' });
    await refused(r.register(late), 'EINVAL', 'bcache is shutting down');
  } finally {
    restore();
    await r.stopAll();
  }
  assertNothingLeft();
});

test("attach: ENOENT for a dirty device the set has no slot for, EINVAL for the kernel's other refusals", async () => {
  const restore = quiet();
  const setUuid = randomBytes(16);
  const cache = new MemoryBlockDevice(48 * MiB, { name: 'cache' });
  await formatCache(cache, { setUuid, blockSize: 8 });
  // Dirty data in another set's cache: attaching here would lose it.
  const dirty = new MemoryBlockDevice(8 * MiB, { name: 'dirty' });
  const sb = await formatBacking(dirty, {});
  sb.flags = setFlagBits(sb.flags, BDEV_STATE_SHIFT, BDEV_STATE_MASK, BDEV_STATE_DIRTY);
  await dirty.write(encodeSuperblock(sb), SB_OFFSET);
  const small = new MemoryBlockDevice(8 * MiB, { name: 'small' });
  await formatBacking(small, { blockSize: 1 });
  const backing = new MemoryBlockDevice(8 * MiB, { name: 'backing' });
  await formatBacking(backing, { setUuid });
  const r = new Registry({ setOptions: { journalDelayMs: 5 } });
  try {
    const c = await r.register(cache);
    const d = await r.register(dirty);
    const s = await r.register(small);
    const b = await r.register(backing);
    assert.ok(c.kind === 'cache' && d.kind === 'backing' && s.kind === 'backing' && b.kind === 'backing');
    const setText = formatUuid(setUuid);
    await refused(
      r.attach(d.dev, setText),
      'ENOENT',
      /^Couldn't find uuid for dirty in set: its superblock says dirty/,
    );
    await refused(d.dev.attach(c.set), 'ENOENT', /^Couldn't find uuid for dirty in set/);
    await refused(r.attach(s.dev, setText), 'EINVAL', "Couldn't attach small: block size less than set's block size");
    await refused(r.attach(b.dev, setText), 'EINVAL', "Can't attach backing: already attached");
    await refused(r.attach(b.dev, 'xyz'), 'EINVAL', 'attach: "xyz" is not a cache set uuid; write the set\'s uuid');
    await refused(
      r.attach(s.dev, '00000000-0000-0000-0000-000000000001'),
      'ENOENT',
      "Can't attach 00000000-0000-0000-0000-000000000001: cache set not found",
    );
    await refused(s.dev.runStale(), 'EBUSY', 'cached dev small is running already');
  } finally {
    restore();
    await r.stopAll();
  }
  assertNothingLeft();
});
