import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import {
  INVALID_UUID,
  metaBucketBytes,
  PSET_MAGIC,
  priosPerBucket,
  prioBucketCount,
  uuidSlotCount,
  btreeNodeSectors,
  journalBucketCount,
  MAX_META_BUCKET_PAGES,
} from '../../src/format/constants.ts';
import { bchCrc64 } from '../../src/format/crc64.ts';
import { decodePrioBucket, encodePrioBucket, psetMagic } from '../../src/format/prio.ts';
import {
  decodeUuidBucket,
  decodeUuidEntry,
  emptyUuidEntry,
  encodeUuidBucket,
  encodeUuidEntryV0,
  isFlashOnly,
  isFreeSlot,
  isInvalidatedSlot,
  type UuidEntry,
} from '../../src/format/uuid.ts';

const SET_MAGIC = 0x4d2d1e1e0f0f0f0fn;

test('the kernel geometry: prio, uuid and btree sizes follow the bucket size, capped at 4 MiB and 256 KiB', () => {
  assert.equal(metaBucketBytes(128), 64 * 1024);
  assert.equal(metaBucketBytes(32768), MAX_META_BUCKET_PAGES * 4096, 'a 16 MiB bucket uses 4 MiB for metadata');
  assert.equal(priosPerBucket(128), Math.floor((65536 - 40) / 3));
  assert.equal(prioBucketCount(1024, 128), 1);
  assert.equal(prioBucketCount(100000, 8), Math.ceil(100000 / 1352));
  assert.equal(uuidSlotCount(1024), 4096);
  assert.equal(btreeNodeSectors(128), 128);
  assert.equal(btreeNodeSectors(1024), 512, '512 KiB buckets get 256 KiB nodes');
  assert.equal(btreeNodeSectors(8192), 2048, 'larger buckets: a quarter of the bucket');
  assert.deepEqual([journalBucketCount(128), journalBucketCount(1024), journalBucketCount(1 << 20)], [2, 8, 256]);
});

test('a prio bucket round-trips and carries its checksum over the whole metadata bucket', () => {
  fc.assert(
    fc.property(
      fc.constantFrom(8, 16, 128),
      fc.nat(1000),
      fc.nat(10000),
      fc.integer({ min: 0, max: 255 }),
      (bucketSize, seq, next, g) => {
        const n = priosPerBucket(bucketSize);
        const p = {
          seq,
          version: 0,
          pad: 0,
          nextBucket: next,
          prios: Uint16Array.from({ length: n }, (_, i) => (i * 7919) & 0xffff),
          gens: Uint8Array.from({ length: n }, (_, i) => (i + g) & 0xff),
        };
        const buf = encodePrioBucket(p, { setMagic: SET_MAGIC, bucketSize });
        assert.equal(buf.length, metaBucketBytes(bucketSize));
        assert.equal(buf.readBigUInt64LE(0), bchCrc64(buf, 8, buf.length));
        assert.equal(buf.readBigUInt64LE(8), SET_MAGIC ^ PSET_MAGIC);
        assert.deepEqual(decodePrioBucket(buf, { setMagic: SET_MAGIC, bucketSize }), p);
      },
    ),
    { numRuns: 30 },
  );
});

test('prio buckets are checked: checksum first, then magic, as prio_read() does', () => {
  const n = priosPerBucket(8);
  const p = { seq: 1, version: 0, pad: 0, nextBucket: 0, prios: new Uint16Array(n), gens: new Uint8Array(n) };
  const buf = encodePrioBucket(p, { setMagic: SET_MAGIC, bucketSize: 8 });
  const bad = Buffer.from(buf);
  bad[100] = 1;
  assert.throws(() => decodePrioBucket(bad, { setMagic: SET_MAGIC, bucketSize: 8 }), /prio_set\.csum/);
  assert.throws(() => decodePrioBucket(buf, { setMagic: 7n, bucketSize: 8 }), /prio_set\.magic/);
  assert.throws(() => decodePrioBucket(buf.subarray(0, 100), { setMagic: SET_MAGIC, bucketSize: 8 }), /prio_set\.size/);
  assert.throws(
    () => encodePrioBucket({ ...p, gens: new Uint8Array(3) }, { setMagic: SET_MAGIC, bucketSize: 8 }),
    /prio_set\.data/,
  );
  assert.equal(psetMagic(SET_MAGIC), SET_MAGIC ^ PSET_MAGIC);
});

const arbEntry: fc.Arbitrary<UuidEntry> = fc
  .record({
    uuid: fc.uint8Array({ minLength: 16, maxLength: 16 }).map((u) => Buffer.from(u)),
    label: fc.uint8Array({ minLength: 32, maxLength: 32 }).map((u) => Buffer.from(u)),
    firstReg: fc.integer({ min: 0, max: 0xffffffff }),
    lastReg: fc.integer({ min: 0, max: 0xffffffff }),
    invalidated: fc.integer({ min: 0, max: 0xffffffff }),
    flags: fc.integer({ min: 0, max: 0xffffffff }),
    sectors: fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER }),
  })
  .map((e) => ({ ...e }));

test('a uuid bucket round-trips; free, invalidated and flash-only slots are told apart', () => {
  fc.assert(
    fc.property(fc.array(arbEntry, { maxLength: 8 }), (entries) => {
      const buf = encodeUuidBucket(entries, 4096);
      const table = decodeUuidBucket(buf, { jsetVersion: 1 });
      assert.equal(table.length, 32);
      assert.deepEqual(table.slice(0, entries.length), entries);
      assert.ok(table.slice(entries.length).every(isFreeSlot));
    }),
    { numRuns: 50 },
  );
  const inv = { ...emptyUuidEntry(), uuid: Buffer.from(INVALID_UUID), invalidated: 5 };
  assert.ok(isInvalidatedSlot(inv) && !isFreeSlot(inv));
  assert.ok(isFlashOnly({ ...emptyUuidEntry(), flags: 1 }));
  assert.throws(() => encodeUuidBucket(new Array<UuidEntry>(33).fill(emptyUuidEntry()), 4096), /uuid_entry\.count/);
  assert.throws(() => encodeUuidBucket([{ ...emptyUuidEntry(), firstReg: -1 }], 4096), /uuid_entry\.first_reg/);
  const huge = Buffer.alloc(128);
  huge.writeBigUInt64LE(2n ** 60n, 64);
  assert.throws(() => decodeUuidEntry(huge, 0), /uuid_entry\.sectors/);
});

test('the old 64-byte entries of a version 0 journal are converted as uuid_read() does', () => {
  const entries = [
    {
      ...emptyUuidEntry(),
      uuid: Buffer.alloc(16, 1),
      label: Buffer.alloc(32, 0x61),
      firstReg: 10,
      lastReg: 20,
      invalidated: 0,
    },
    { ...emptyUuidEntry(), uuid: Buffer.alloc(16, 2), firstReg: 30, lastReg: 40, invalidated: 50 },
  ];
  const buf = Buffer.alloc(4096);
  entries.forEach((e, i) => {
    encodeUuidEntryV0(e, buf, 64 * i);
  });
  const table = decodeUuidBucket(buf, { jsetVersion: 0 });
  assert.deepEqual(table.slice(0, 2), entries);
  assert.ok(table.slice(2).every(isFreeSlot));
});
