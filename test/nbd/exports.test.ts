import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryBlockDevice } from '../../src/blockdev/memory.ts';
import type { BlockDeviceCaps } from '../../src/blockdev/types.ts';
import { resolveExport } from '../../src/nbd/exports.ts';
import { TxFlag } from '../../src/nbd/protocol.ts';

function device(caps: Partial<BlockDeviceCaps> = {}, size = 1 << 20, readOnly = false): MemoryBlockDevice {
  const d = new MemoryBlockDevice(size, { readOnly });
  Object.assign(d.caps, caps);
  return d;
}

test('an export advertises flush, FUA, multi-conn and cache always, and only what the device can do', () => {
  const full = resolveExport({ name: 'a', device: device() });
  const always = TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH | TxFlag.SEND_FUA | TxFlag.CAN_MULTI_CONN | TxFlag.SEND_CACHE;
  assert.equal(full.flags, always | TxFlag.SEND_WRITE_ZEROES | TxFlag.SEND_TRIM | TxFlag.SEND_FAST_ZERO);
  const plain = resolveExport({ name: 'b', device: device({ discard: false, fastZero: false, rotational: true }) });
  assert.equal(plain.flags, always | TxFlag.SEND_WRITE_ZEROES | TxFlag.ROTATIONAL);
});

test('a read-only export (by choice or by device) advertises READ_ONLY and no write commands', () => {
  const always = TxFlag.HAS_FLAGS | TxFlag.SEND_FLUSH | TxFlag.SEND_FUA | TxFlag.CAN_MULTI_CONN | TxFlag.SEND_CACHE;
  const ro = resolveExport({ name: 'a', device: device(), readOnly: true });
  assert.equal(ro.readOnly, true);
  assert.equal(ro.flags, always | TxFlag.READ_ONLY);
  const roDev = resolveExport({ name: 'b', device: device({}, 4096, true) });
  assert.equal(roDev.readOnly, true);
  assert.equal(roDev.flags & TxFlag.READ_ONLY, TxFlag.READ_ONLY);
});

test('block size defaults and validation follow the spec', () => {
  const e = resolveExport({ name: 'a', description: 'd', device: device() });
  assert.deepEqual(e.blockSize, { min: 1, preferred: 4096, max: 32 * 1024 * 1024 });
  assert.equal(e.description, 'd');
  assert.equal(e.size, 1 << 20);
  assert.deepEqual(resolveExport({ name: 'a', device: device(), blockSize: { min: 512 } }).blockSize.min, 512);
  assert.equal(resolveExport({ name: 'a', device: device(), blockSize: { min: 8192 } }).blockSize.preferred, 8192);
  const bad = (blockSize: { min?: number; preferred?: number; max?: number }, re: RegExp): void => {
    assert.throws(() => resolveExport({ name: 'x', device: device(), blockSize }), re);
  };
  bad({ min: 3 }, /minimum block size 3 must be a power of two/);
  bad({ min: 131072 }, /no larger than 65536/);
  bad({ preferred: 256 }, /preferred block size 256/);
  bad({ preferred: 6000 }, /preferred block size 6000/);
  bad({ max: 1024 }, /maximum block size 1024/);
  bad({ min: 512, max: 1000000 }, /multiple of the minimum/);
  assert.throws(
    () => resolveExport({ name: 'x', device: device({}, 1000), blockSize: { min: 512 } }),
    /not a multiple of the minimum block size 512/,
  );
});

test('export names and descriptions must fit the spec string limits', () => {
  assert.throws(() => resolveExport({ name: 'x'.repeat(4097), device: device() }), /longer than 4096 bytes/);
  assert.throws(() => resolveExport({ name: 'a\0b', device: device() }), /NUL/);
  assert.throws(
    () => resolveExport({ name: 'a', description: 'é'.repeat(2049), device: device() }),
    /description is longer/,
  );
});
