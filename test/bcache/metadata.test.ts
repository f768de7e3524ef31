// Prio buckets, the uuid table and leaf bsets on disk: written, read back,
// and damaged the ways the kernel tolerates (a prio bucket with a bad
// checksum: warn and go on) or we do (a leaf's torn last bset after a crash:
// warn, its keys come back from the journal).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryBlockDevice } from '../../src/blockdev/memory.ts';
import { makeKey, makePtr } from '../../src/format/bkey.ts';
import { metaBucketBytes, UUID_ENTRY_V0_BYTES } from '../../src/format/constants.ts';
import { decodePrioBucket } from '../../src/format/prio.ts';
import { setMagic } from '../../src/format/superblock.ts';
import { emptyUuidEntry, encodeUuidEntryV0, isInvalidatedSlot } from '../../src/format/uuid.ts';
import { CacheSet } from '../../src/bcache/cache-set.ts';
import { captureLog } from '../../src/util/log.ts';
import { assertNothingLeft, formatCache } from './helpers.ts';
import { checkRange, IndexModel, writeExtent } from './model.ts';

const MiB = 1024 * 1024;

test('prios and gens round-trip; a prio bucket with a bad checksum is warned about, not fatal', async () => {
  const dev = new MemoryBlockDevice(4 * MiB);
  await formatCache(dev, { bucketSize: 8, blockSize: 1 });
  const cs = await CacheSet.open(dev, { closeDevice: false, journalDelayMs: 1 });
  // Enough clean data to make the allocator reuse buckets (gens move on).
  for (let i = 0; i < 1500; i++) await writeExtent(cs, 0, (i * 16) % 30000, 8, i + 1, false);
  await cs.stop();
  const gens = Uint8Array.from(cs.buckets.gen);
  assert.ok(
    gens.some((g) => g > 1),
    'some gens moved on',
  );
  // The chain on disk, as the kernel would read it: every bucket's gen, at most
  // one behind memory (a bucket invalidated after the last prio write).
  const magic = setMagic(cs.sb);
  let bucket = cs.prios.first;
  const buf = Buffer.alloc(metaBucketBytes(8));
  for (let i = 0; i < cs.prios.count; i++) {
    dev.readSync(buf, bucket * 8 * 512);
    const p = decodePrioBucket(buf, { setMagic: magic, bucketSize: 8 });
    for (let j = 0; j < p.gens.length && i * p.gens.length + j < gens.length; j++) {
      const n = i * p.gens.length + j;
      const d = ((gens[n] ?? 0) - (p.gens[j] ?? 0)) & 0xff;
      assert.ok(d === 0 || d === 1, `bucket ${n}: gen ${p.gens[j]} on disk, ${gens[n]} in memory`);
    }
    bucket = p.nextBucket;
  }
  assert.equal(bucket, 0, 'the chain ends');

  // Damage the first prio bucket's entries.
  const at = cs.prios.first * 8 * 512 + 100;
  const b = Buffer.alloc(1);
  dev.readSync(b, at);
  b[0] = (b[0] ?? 0) ^ 0x5a;
  dev.writeSync(b, at);
  const cap = captureLog();
  try {
    const cs3 = await CacheSet.open(dev, { closeDevice: false });
    await cs3.stop();
  } finally {
    cap.restore();
  }
  assert.ok(
    cap.lines.some((l) => l.includes('bad csum reading priorities')),
    cap.lines.join('\n'),
  );
  assertNothingLeft();
});

test('uuid slots persist through a write and a restart; invalidated slots are not reused', async () => {
  const dev = new MemoryBlockDevice(32 * MiB);
  await formatCache(dev, { bucketSize: 64 });
  const cs = await CacheSet.open(dev, { closeDevice: false });
  assert.equal(cs.uuids.slots, metaBucketBytes(64) / 128);
  const uuid = Buffer.from('00112233445566778899aabbccddeeff', 'hex');
  const slot = cs.uuids.findEmpty();
  assert.equal(slot, 0);
  cs.uuids.set(slot, { ...emptyUuidEntry(), uuid, firstReg: 100, lastReg: 200 });
  await cs.writeUuids();
  const before = cs.uuids.bucket;
  await cs.writeUuids();
  assert.notEqual(cs.uuids.bucket, before, 'every write goes to a fresh bucket');
  await cs.stop();
  const cs2 = await CacheSet.open(dev, { closeDevice: false });
  assert.equal(cs2.uuids.find(uuid), 0);
  assert.equal(cs2.uuids.get(0).lastReg, 200);
  cs2.uuids.invalidate(0, 300);
  await cs2.writeUuids();
  assert.equal(cs2.uuids.find(uuid), -1);
  assert.equal(cs2.uuids.findEmpty(), 1, 'the invalidated slot is not free');
  await cs2.stop();
  const cs3 = await CacheSet.open(dev, { closeDevice: false });
  assert.ok(isInvalidatedSlot(cs3.uuids.get(0)));
  assert.equal(cs3.uuids.get(0).invalidated, 300);
  await cs3.stop();
});

test('a uuid table in the old 48-byte form (journal version 0) is converted on read', async () => {
  const dev = new MemoryBlockDevice(32 * MiB);
  await formatCache(dev, { bucketSize: 64 });
  const cs = await CacheSet.open(dev, { closeDevice: false });
  const buf = Buffer.alloc(64 * 512);
  const e = { ...emptyUuidEntry(), uuid: Buffer.alloc(16, 7), lastReg: 42 };
  encodeUuidEntryV0(e, buf, UUID_ENTRY_V0_BYTES * 2);
  const bucket = 500;
  await cs.writeCache(buf, bucket * 64);
  await cs.uuids.read(makeKey(0, 0, 64, false, [makePtr(0, bucket * 64, 0)]), 0);
  assert.equal(cs.uuids.find(Buffer.alloc(16, 7)), 2);
  assert.equal(cs.uuids.get(2).lastReg, 42);
  assert.equal(cs.uuids.get(2).flags, 0);
  await cs.stop();
});

test('a torn last bset of a leaf after a crash: warned about, its keys replayed from the journal', async () => {
  const mem = new MemoryBlockDevice(32 * MiB);
  await formatCache(mem, { bucketSize: 64 });
  const cs = await CacheSet.open(mem, { closeDevice: false, journalDelayMs: 60_000 });
  const model = new IndexModel(1, 2000);
  for (let i = 0; i < 40; i++) {
    await writeExtent(cs, 0, i * 40, 8, i + 1, true);
    model.set(0, i * 40, i * 40 + 8, { seed: i + 1, dirty: true });
  }
  await cs.flush();
  const leaf = cs.btree.root;
  assert.ok(leaf.isLeaf && leaf.dirty);
  assert.ok(leaf.pendingU64s * 8 + 32 > 512, 'the next bset is longer than a sector');
  const block = leaf.written;
  await cs.btree.writeNode(leaf);
  // The crash: the image as it is now, the new bset's second sector never written.
  const image = mem.clone();
  image.writeSync(Buffer.alloc(512), leaf.bucketSector * 512 + block * 4096 + 512);
  await cs.stop();
  const cap = captureLog();
  try {
    const cs2 = await CacheSet.open(image, { closeDevice: false });
    await checkRange(cs2, model, 0, 0, 2000);
    await cs2.stop();
  } finally {
    cap.restore();
  }
  assert.ok(
    cap.lines.some((l) => /last bset \(block \d+\) is torn/.test(l)),
    cap.lines.join('\n'),
  );
});

test('a corrupt btree node is an error naming the node and the field', async () => {
  const mem = new MemoryBlockDevice(32 * MiB);
  await formatCache(mem, { bucketSize: 64 });
  const cs = await CacheSet.open(mem, { closeDevice: false });
  await writeExtent(cs, 0, 0, 8, 1, true);
  const root = cs.btree.root.bucketSector;
  await cs.stop();
  // Damage the first bset's magic: not a torn append, corruption.
  const b = Buffer.alloc(8);
  mem.readSync(b, root * 512 + 8);
  b[3] = (b[3] ?? 0) ^ 1;
  mem.writeSync(b, root * 512 + 8);
  const cap = captureLog();
  try {
    await assert.rejects(CacheSet.open(mem, { closeDevice: false }), /btree_node\.(magic|seq)/);
  } finally {
    cap.restore();
  }
  assertNothingLeft();
});
