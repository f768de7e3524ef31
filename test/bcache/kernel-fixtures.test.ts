// The caches the Linux kernel wrote (test/fixtures/kernel, see its scripts):
// a fresh one, and two holding dirty writeback data, after a clean stop and
// after a power-off. We must bring each up and find exactly the dirty data
// the script wrote, at the pointers the kernel's keys give.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { gunzipSync } from 'node:zlib';
import { fileURLToPath } from 'node:url';
import { MemoryBlockDevice } from '../../src/blockdev/memory.ts';
import { SB_OFFSET, SB_SIZE } from '../../src/format/constants.ts';
import { bdevState, cacheSync, decodeSuperblock } from '../../src/format/superblock.ts';
import { CacheSet } from '../../src/bcache/cache-set.ts';
import { captureLog } from '../../src/util/log.ts';
import { assertNothingLeft } from './helpers.ts';

const dir = fileURLToPath(new URL('../fixtures/kernel/', import.meta.url));

function image(name: string): MemoryBlockDevice {
  const data = gunzipSync(readFileSync(`${dir}${name}.img.gz`));
  const dev = new MemoryBlockDevice(data.length, { name });
  const chunk = 1024 * 1024;
  for (let at = 0; at < data.length; at += chunk) {
    const part = data.subarray(at, Math.min(data.length, at + chunk));
    if (part.some((b) => b !== 0)) dev.writeSync(part, at);
  }
  return dev;
}

function backingUuid(dev: MemoryBlockDevice): { uuid: Buffer; state: number; dataOffset: number } {
  const block = Buffer.alloc(SB_SIZE);
  dev.readSync(block, SB_OFFSET);
  const sb = decodeSuperblock(block);
  return { uuid: sb.uuid, state: bdevState(sb), dataOffset: sb.dataOffset };
}

/** Every dirty sector of `inode` with the byte its cached data is filled with. */
async function dirtySectors(cs: CacheSet, inode: number): Promise<Map<number, number>> {
  const out = new Map<number, number>();
  const keys = await cs.scanDirty(inode, 0, 100000);
  for (const k of keys) {
    const p = k.ptrs[0];
    assert.ok(p);
    const buf = Buffer.alloc(k.size * 512);
    await cs.readCache(buf, p.offset);
    for (let s = 0; s < k.size; s++) {
      const sector = buf.subarray(s * 512, (s + 1) * 512);
      const byte = sector[0] ?? -1;
      assert.ok(
        sector.every((b) => b === byte),
        `sector ${k.offset - k.size + s} is not one pattern`,
      );
      out.set(k.offset - k.size + s, byte);
    }
  }
  return out;
}

function expectRanges(ranges: Array<[number, number, number]>): Map<number, number> {
  const m = new Map<number, number>();
  for (const [start, count, byte] of ranges) for (let s = start; s < start + count; s++) m.set(s, byte);
  return m;
}

test('the fresh cache the kernel initialised comes up empty and goes down cleanly', async () => {
  const dev = image('fresh-cache');
  const cap = captureLog();
  try {
    const cs = await CacheSet.open(dev, { closeDevice: false });
    assert.equal(cs.uuid, '11111111-2222-4333-8444-555555555555');
    assert.deepEqual(await cs.lookup(0, 0, 1000), [{ start: 0, end: 1000, hit: null }]);
    assert.equal(cs.uuids.findEmpty(), 0);
    await cs.stop();
  } finally {
    cap.restore();
  }
  assert.ok(!cap.lines.some((l) => l.startsWith('error') || l.startsWith('warn')), cap.lines.join('\n'));
  assertNothingLeft();
  // And again, now that we wrote it.
  const cs2 = await CacheSet.open(dev, { closeDevice: false });
  assert.equal(cs2.sb.version, 3);
  await cs2.stop();
});

test('wb-stopped: the dirty data written through /dev/bcache0 is found, with its content', async () => {
  const cache = image('wb-stopped-cache');
  const bdev = backingUuid(image('wb-stopped-bdev'));
  assert.equal(bdev.state, 2, 'the backing device says dirty');
  const cs = await CacheSet.open(cache, { closeDevice: false });
  const inode = cs.uuids.find(bdev.uuid);
  assert.ok(inode >= 0, 'the backing device has a uuid slot');
  const off = bdev.dataOffset;
  // dd bs=4096: block 0 (0xa5), blocks 256..271 (0x5a), blocks 1000..1002 (0x01).
  const want = expectRanges([
    [off + 0, 8, 0xa5],
    [off + 2048, 128, 0x5a],
    [off + 8000, 24, 0x01],
  ]);
  assert.deepEqual(await dirtySectors(cs, inode), want);
  assert.equal(cs.dirtySectors(inode), 160, '80.0k of dirty data, as the kernel said');
  // The read of blocks 1500..1503 went to the backing device; whatever the kernel cached of it is clean.
  const read = await cs.lookup(inode, off + 12000, off + 12032);
  assert.ok(read.every((s) => s.hit === null || !s.hit.dirty));
  await cs.stop();
  assertNothingLeft();
});

test('wb-crash: after a power-off the journal gives back every flushed dirty write', async () => {
  const cache = image('wb-crash-cache');
  const bdev = backingUuid(image('wb-crash-bdev'));
  const block = Buffer.alloc(SB_SIZE);
  cache.readSync(block, SB_OFFSET);
  assert.ok(cacheSync(decodeSuperblock(block)));
  const cs = await CacheSet.open(cache, { closeDevice: false });
  const inode = cs.uuids.find(bdev.uuid);
  assert.ok(inode >= 0);
  const off = bdev.dataOffset;
  const ranges: Array<[number, number, number]> = [];
  for (let i = 0; i < 200; i++) ranges.push([off + 9000 + 16 * i, 1, 0x40]);
  ranges.push([off + 3, 1, 0xc3], [off + 100, 7, 0xaa], [off + 8192, 128, 0x0f]);
  assert.deepEqual(await dirtySectors(cs, inode), expectRanges(ranges));
  assert.equal(cs.dirtySectors(inode), 336, '168.0k of dirty data, as the kernel said');
  await cs.stop();
  // Reopened after our clean stop: the same.
  const cs2 = await CacheSet.open(cache, { closeDevice: false });
  assert.deepEqual(await dirtySectors(cs2, inode), expectRanges(ranges));
  await cs2.stop();
  assertNothingLeft();
});
