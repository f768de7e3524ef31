import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryBlockDevice } from '../../src/blockdev/memory.ts';
import { makeKey } from '../../src/format/bkey.ts';
import { CacheSet } from '../../src/bcache/cache-set.ts';
import { assertNothingLeft, formatCache, sectorData } from './helpers.ts';

const MiB = 1024 * 1024;

function rep(v: number | null, n: number): Array<number | null> {
  return new Array<number | null>(n).fill(v);
}

async function writeData(cs: CacheSet, inode: number, start: number, sectors: number, seed: number, dirty: boolean) {
  let done = 0;
  while (done < sectors) {
    const a = await cs.allocSectors({ inode, offset: start + done, sectors: sectors - done, dirty, wait: true });
    assert.ok(a);
    await cs.writeCache(sectorData(seed, start + done, a.sectors), a.ptr.offset);
    await cs.insert([makeKey(inode, start + done + a.sectors, a.sectors, dirty, [a.ptr])]);
    cs.putAllocation(a);
    done += a.sectors;
  }
}

async function readBack(cs: CacheSet, inode: number, start: number, end: number): Promise<Array<number | null>> {
  const segs = await cs.lookup(inode, start, end);
  const out: Array<number | null> = [];
  for (const s of segs) {
    for (let x = s.start; x < s.end; x++) {
      if (!s.hit) out.push(null);
      else {
        const buf = Buffer.alloc(512);
        await cs.readCache(buf, s.hit.sector + (x - s.start));
        const tag = buf.toString('latin1', 0, 24).split('|')[0] ?? '';
        const [seed, sector] = tag.split(':').map(Number);
        assert.equal(sector, x, `sector ${x} holds data of sector ${sector}`);
        out.push(seed ?? -1);
      }
    }
  }
  return out;
}

test('a new set: insert, look up, stop, reopen, everything is there', async () => {
  const dev = new MemoryBlockDevice(32 * MiB);
  await formatCache(dev, { bucketSize: 64, blockSize: 1 });
  const cs = await CacheSet.open(dev, { closeDevice: false });
  await writeData(cs, 1, 100, 40, 7, true);
  await writeData(cs, 1, 120, 8, 9, false);
  await writeData(cs, 2, 0, 16, 3, false);
  assert.deepEqual(await readBack(cs, 1, 95, 145), [
    ...rep(null, 5),
    ...rep(7, 20),
    ...rep(9, 8),
    ...rep(7, 12),
    ...rep(null, 5),
  ]);
  assert.equal(cs.dirtySectors(1), 32);
  await cs.stop();
  assertNothingLeft();

  const cs2 = await CacheSet.open(dev, { closeDevice: false });
  assert.deepEqual(await readBack(cs2, 1, 95, 145), [
    ...rep(null, 5),
    ...rep(7, 20),
    ...rep(9, 8),
    ...rep(7, 12),
    ...rep(null, 5),
  ]);
  assert.deepEqual(await readBack(cs2, 2, 0, 16), rep(3, 16));
  assert.equal(cs2.dirtySectors(1), 32);
  const dirty = await cs2.scanDirty(1, 0, 100);
  assert.deepEqual(
    dirty.map((k) => [k.offset - k.size, k.offset]),
    [
      [100, 120],
      [128, 140],
    ],
  );
  await cs2.stop();
  assertNothingLeft();
});

test('lookupNow answers as lookup does, and leaves it to lookup while a writer holds the btree or the set is stopped', async () => {
  const dev = new MemoryBlockDevice(32 * MiB);
  await formatCache(dev, { bucketSize: 64, blockSize: 1 });
  const cs = await CacheSet.open(dev, { closeDevice: false });
  await writeData(cs, 1, 100, 40, 7, true);
  await writeData(cs, 1, 120, 8, 9, false);
  await writeData(cs, 1, 300, 24, 5, false);
  await writeData(cs, 2, 0, 16, 3, false);
  const ranges: Array<[number, number, number]> = [
    [1, 95, 145],
    [1, 0, 1000],
    [1, 120, 128],
    [1, 141, 299],
    [2, 0, 16],
    [3, 0, 64],
  ];
  for (const [inode, start, end] of ranges) {
    const now = cs.lookupNow(inode, start, end);
    assert.ok(now, `lookupNow(${inode}, ${start}, ${end}) had to wait with nothing to wait for`);
    assert.deepEqual(now, await cs.lookup(inode, start, end), `lookupNow(${inode}, ${start}, ${end})`);
  }
  assert.ok(cs.btree.lock.tryWrite());
  assert.equal(cs.lookupNow(1, 95, 145), undefined, 'a lookup without waiting while a writer holds the btree');
  cs.btree.lock.releaseWrite();
  assert.ok(cs.lookupNow(1, 95, 145));
  await cs.stop();
  assert.equal(cs.lookupNow(1, 95, 145), undefined, 'a stopped set answers nothing without waiting');
  await assert.rejects(cs.lookup(1, 95, 145));
  assertNothingLeft();
});
