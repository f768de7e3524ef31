// Flash-only volumes on the engine side (flash-dev.ts, the registry and the
// attribute tree): flash_vol_create makes one in the first free uuid slot,
// flagged UUID_FLASH_ONLY with its size; unwritten ranges read as zeroes;
// writes are dirty keys that survive a restart (the volume comes back when
// the set registers again); a discard frees its buckets; the set's stop
// stops the volume and keeps it; `unregister` deletes it and its data.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryBlockDevice } from '../../src/blockdev/memory.ts';
import { GC_MARK_DIRTY } from '../../src/bcache/buckets.ts';
import type { FlashDev } from '../../src/bcache/flash-dev.ts';
import { Registry, type RegisteredSet } from '../../src/bcache/registry.ts';
import { SysfsTree } from '../../src/bcache/sysfs/tree.ts';
import { isFlashOnly, isInvalidatedSlot } from '../../src/format/uuid.ts';
import { Prng } from '../../src/util/prng.ts';
import { checkMarks, formatCache, sectorData } from './helpers.ts';

const MiB = 1024 * 1024;

interface Rig {
  registry: Registry;
  tree: SysfsTree;
  set: RegisteredSet;
  running: FlashDev[];
  stopped: FlashDev[];
}

/** A registry over `cache` (kept open across restarts) and its attribute tree; watchers recorded. */
async function start(cache: MemoryBlockDevice): Promise<Rig> {
  const registry = new Registry({ setOptions: { journalDelayMs: 5, closeDevice: false } });
  const running: FlashDev[] = [];
  const stopped: FlashDev[] = [];
  registry.watch({
    volumeRunning: (v) => running.push(v),
    volumeStopped: (v) => stopped.push(v),
  });
  const r = await registry.register(cache);
  assert.equal(r.kind, 'cache');
  return { registry, tree: new SysfsTree(registry), set: r.set, running, stopped };
}

async function newCache(): Promise<MemoryBlockDevice> {
  const cache = new MemoryBlockDevice(48 * MiB, { name: 'cache' });
  // 64 KiB buckets, 4 KiB blocks.
  await formatCache(cache, { bucketSize: 128, blockSize: 8 });
  return cache;
}

function dirtyBuckets(set: RegisteredSet): number {
  let n = 0;
  for (const m of set.cs.buckets.mark) if (m === GC_MARK_DIRTY) n++;
  return n;
}

test('flash_vol_create makes a volume that reads zeroes where unwritten, keeps writes, and comes back after a restart', async () => {
  const cache = await newCache();
  let rig = await start(cache);
  const setPath = `/sys/fs/bcache/${rig.set.uuid}`;
  await rig.tree.write(`${setPath}/flash_vol_create`, '8M\n');
  assert.equal(rig.running.length, 1, 'the registry announced the volume');
  const vol = rig.running[0];
  assert.ok(vol);
  assert.equal(vol.name, 'bcache0');
  assert.equal(vol.inode, 0, 'the first free uuid slot');
  const entry = rig.set.cs.uuids.get(0);
  assert.ok(isFlashOnly(entry), 'UUID_FLASH_ONLY');
  assert.equal(entry.sectors, 16384);
  assert.ok(rig.tree.list(setPath).includes('volume0'));
  assert.equal(rig.tree.read(`${setPath}/volume0/size`), '8.0M\n');
  assert.equal(rig.tree.read('/sys/block/bcache0/size'), '16384\n');
  assert.deepEqual(rig.tree.list('/sys/block/bcache0/bcache'), ['unregister', 'label', 'size']);
  assert.equal(vol.device.size, 8 * MiB);

  // Never written: zeroes.
  const dev = vol.device;
  const buf = Buffer.alloc(64 * 1024, 0xaa);
  await dev.read(buf, 1 * MiB);
  assert.ok(
    buf.every((b) => b === 0),
    'unwritten data reads as zeroes',
  );

  // Writes, one overwriting part of another; a read spanning written and unwritten ranges.
  const a = sectorData(1, 0, 256); // 128 KiB at 1 MiB
  const b = sectorData(2, 0, 64); // 32 KiB at 1 MiB + 64 KiB
  await dev.write(a, 1 * MiB);
  await dev.write(b, 1 * MiB + 64 * 1024, { fua: true });
  const expect = Buffer.alloc(256 * 1024);
  a.copy(expect, 64 * 1024);
  b.copy(expect, 128 * 1024);
  const got = Buffer.alloc(256 * 1024);
  await dev.read(got, 1 * MiB - 64 * 1024);
  assert.ok(got.equals(expect), 'reads see the newest data, zeroes around it');
  assert.equal(vol.dirtySectors, 256, 'every sector of a volume is dirty');
  assert.equal(rig.set.cs.flashDirtySectors(), 256);
  const status = await dev.blockStatus(0, 8 * MiB);
  assert.deepEqual(
    status.map((e) => [e.length, e.hole]),
    [
      [1 * MiB, true],
      [128 * 1024, false],
      [8 * MiB - 1 * MiB - 128 * 1024, true],
    ],
  );

  await rig.tree.write('/sys/block/bcache0/bcache/label', 'scratch');
  assert.equal(rig.tree.read('/sys/block/bcache0/bcache/label'), 'scratch\n');

  // Unaligned and out-of-range requests are refused, naming what is wrong.
  await assert.rejects(dev.read(Buffer.alloc(512), 0), { code: 'EINVAL', message: /multiples of 4096/ });
  await assert.rejects(dev.write(Buffer.alloc(4096), 8 * MiB), { code: 'EINVAL', message: /past the end/ });
  await assert.rejects(rig.tree.write(`${setPath}/flash_vol_create`, 'lots'), { code: 'EINVAL' });
  // A size that is not whole blocks: the slot keeps its sectors, the device whole blocks of them.
  await rig.tree.write(`${setPath}/flash_vol_create`, '10000');
  const odd = rig.running[1];
  assert.ok(odd);
  assert.equal(odd.sectors, 19);
  assert.equal(odd.device.size, 8192);
  await rig.tree.write('/sys/block/bcache1/bcache/unregister', '1');
  await rig.tree.stop();

  // Restart: the set's registration runs the volume again, with its data.
  await rig.registry.stopAll();
  assert.deepEqual(rig.stopped, [odd, vol], 'the stops announced the volumes gone');
  await assert.rejects(dev.read(Buffer.alloc(4096), 0), { code: 'ESHUTDOWN' });
  rig = await start(cache);
  const again = rig.running[0];
  assert.ok(again, 'flash_devs_run brought the volume up');
  assert.equal(again.inode, 0);
  assert.equal(again.sectors, 16384);
  assert.equal(rig.tree.read('/sys/block/bcache0/bcache/label'), 'scratch\n');
  const after = Buffer.alloc(256 * 1024);
  await again.device.read(after, 1 * MiB - 64 * 1024);
  assert.ok(after.equals(expect), 'the data survived the restart');
  assert.equal(again.dirtySectors, 256);
  assert.deepEqual(await checkMarks(rig.set.cs), []);
  await rig.registry.stopAll();
});

test('a discard invalidates its keys and frees their buckets; unregister deletes the volume and its data', async () => {
  const cache = await newCache();
  let rig = await start(cache);
  const setPath = `/sys/fs/bcache/${rig.set.uuid}`;
  await rig.tree.write(`${setPath}/flash_vol_create`, '16M');
  await rig.tree.write(`${setPath}/flash_vol_create`, '4M');
  const [vol, other] = rig.running;
  assert.ok(vol && other);
  assert.deepEqual([vol.name, other.name, other.inode], ['bcache0', 'bcache1', 1]);
  const data = sectorData(3, 0, 8192); // 4 MiB
  await vol.device.write(data, 0);
  await other.device.write(sectorData(4, 0, 64), 0);
  await vol.device.flush();
  const before = dirtyBuckets(rig.set);
  assert.ok(before >= 64, `4 MiB of 64 KiB buckets are dirty (${before})`);

  await vol.device.discard(0, 4 * MiB);
  assert.equal(vol.dirtySectors, 0, 'no dirty data left under the discard');
  const freed = before - dirtyBuckets(rig.set);
  assert.ok(freed >= 60, `the discarded buckets are reclaimable again (${freed} of ${before})`);
  const back = Buffer.alloc(4 * MiB, 1);
  await vol.device.read(back, 0);
  assert.ok(
    back.every((x) => x === 0),
    'a discarded range reads as zeroes',
  );
  assert.deepEqual(await checkMarks(rig.set.cs), []);

  // WRITE_ZEROES: a hole, or with NO_HOLE zeroes written as data (never fast).
  await vol.device.write(data.subarray(0, 128 * 1024), 0);
  await vol.device.writeZeroes(0, 64 * 1024);
  await vol.device.writeZeroes(64 * 1024, 64 * 1024, { noHole: true });
  await assert.rejects(vol.device.writeZeroes(0, 4096, { noHole: true, fastOnly: true }), { code: 'ENOTSUP' });
  assert.deepEqual(
    (await vol.device.blockStatus(0, 256 * 1024)).map((e) => [e.length, e.hole]),
    [
      [64 * 1024, true],
      [64 * 1024, false],
      [128 * 1024, true],
    ],
  );
  const zeroed = Buffer.alloc(128 * 1024, 1);
  await vol.device.read(zeroed, 0);
  assert.ok(zeroed.every((x) => x === 0));

  // Unregister deletes: the slot is invalidated, the data goes, the other volume stays.
  await vol.device.write(data.subarray(0, 1 * MiB), 0);
  await rig.tree.write('/sys/block/bcache0/bcache/unregister', '1');
  await rig.tree.stop();
  assert.deepEqual(rig.stopped, [vol]);
  const slot = rig.set.cs.uuids.get(0);
  assert.ok(isInvalidatedSlot(slot) && !isFlashOnly(slot), 'the slot is invalid and no longer flash-only');
  assert.equal(rig.set.cs.dirtySectors(0), 0, "the deleted volume's keys are gone");
  assert.ok(!rig.tree.list(setPath).includes('volume0'));
  assert.ok(rig.tree.list(setPath).includes('volume1'));
  assert.deepEqual(rig.tree.list('/sys/block'), ['bcache1']);

  await rig.registry.stopAll();
  rig = await start(cache);
  assert.deepEqual(
    rig.running.map((v) => [v.name, v.inode]),
    [['bcache0', 1]],
    'only the other volume comes back (numbered afresh)',
  );
  const kept = Buffer.alloc(32 * 1024);
  await rig.running[0]?.device.read(kept, 0);
  assert.ok(kept.equals(sectorData(4, 0, 64)));
  // A new volume does not reuse the invalidated slot (uuid_find_empty looks for a zero uuid).
  await rig.tree.write(`/sys/fs/bcache/${rig.set.uuid}/flash_vol_create`, '1M');
  assert.equal(rig.running[1]?.inode, 2);
  await rig.registry.stopAll();
});

test('flash_vol_create with a full uuid table is refused as the kernel refuses it; the set stop ends volume I/O', async () => {
  const cache = await newCache();
  const rig = await start(cache);
  const setPath = `/sys/fs/bcache/${rig.set.uuid}`;
  await rig.tree.write(`${setPath}/flash_vol_create`, '1M');
  const uuids = rig.set.cs.uuids;
  for (let i = 1; i < uuids.slots; i++) uuids.get(i).uuid = Buffer.alloc(16, 0xff);
  await assert.rejects(rig.tree.write(`${setPath}/flash_vol_create`, '1M'), {
    code: 'EINVAL',
    message: "Can't create volume, no room for UUID",
  });
  const vol = rig.running[0];
  assert.ok(vol);
  const pending = vol.device.write(sectorData(5, 0, 8), 0);
  await rig.tree.write(`${setPath}/stop`, '1');
  await rig.tree.stop();
  await pending;
  assert.ok(vol.stopped);
  await assert.rejects(vol.device.write(Buffer.alloc(4096), 0), { code: 'ESHUTDOWN' });
  assert.equal(rig.registry.sets.size, 0);
  await rig.registry.stopAll();
});

test('readNow on a flash volume serves a range one written extent covers, and declines the rest', async () => {
  const cache = await newCache();
  const rig = await start(cache);
  await rig.tree.write(`/sys/fs/bcache/${rig.set.uuid}/flash_vol_create`, '8M\n');
  const vol = rig.running[0];
  assert.ok(vol);
  const bs = vol.blockBytes;
  const rng = new Prng(7);
  // The volume's contents as 4 KiB blocks: undefined for never written or discarded (zeroes).
  const model = new Map<number, Buffer>();
  const blocks = (8 * MiB) / bs;
  let served = 0;
  let declined = 0;
  for (let i = 0; i < 3000; i++) {
    const block = rng.below(blocks - 4);
    const n = 1 + rng.below(4);
    const op = rng.below(10);
    if (op < 4) {
      const data = Buffer.alloc(n * bs);
      for (let b = 0; b < n; b++) {
        const one = sectorData(i, (block + b) * 8, bs / 512);
        one.copy(data, b * bs);
        model.set(block + b, one);
      }
      await vol.write(data, block * bs, false);
    } else if (op < 5) {
      await vol.discard(block * bs, n * bs);
      for (let b = 0; b < n; b++) model.delete(block + b);
    } else {
      const buf = Buffer.alloc(n * bs, 0xee);
      const want = Buffer.alloc(n * bs);
      for (let b = 0; b < n; b++) model.get(block + b)?.copy(want, b * bs);
      if (vol.readNow(buf, block * bs)) {
        served++;
        assert.ok(buf.equals(want), `readNow of blocks ${block}+${n} after op ${i}`);
      } else {
        declined++;
        await vol.read(buf, block * bs);
        assert.ok(buf.equals(want), `read of blocks ${block}+${n} after op ${i}`);
      }
    }
  }
  assert.ok(served > 100 && declined > 100, `served ${served}, declined ${declined}`);
  const buf = Buffer.alloc(bs);
  assert.equal(vol.readNow(buf, 1), false, 'unaligned');
  assert.equal(vol.readNow(buf, 8 * MiB), false, 'past the end');
  assert.equal(vol.readNow(Buffer.alloc(0), 0), false, 'empty');
  await rig.registry.stopAll();
  assert.equal(vol.readNow(buf, 0), false, 'a stopped volume');
});
