import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import { FormatError } from '../../src/format/errors.ts';
import {
  bdevCacheMode,
  bdevState,
  cacheDiscard,
  cacheReplacement,
  cacheSync,
  decodeSuperblock,
  encodeSuperblock,
  newBackingSuperblock,
  newCacheSuperblock,
  readSuperblockFields,
  SB_FIELD,
  setFlagBits,
  setMagic,
  superblockCsum,
  type Superblock,
} from '../../src/format/superblock.ts';
import { formatUuid, parseUuid } from '../../src/format/uuid-text.ts';
import { KERNEL_FIXTURE_DIR, loadKernelFixture } from '../helpers/fixtures.ts';

const MAKE_BCACHE_DIR = join(KERNEL_FIXTURE_DIR, '..', 'make-bcache');
const SET = '0f0f0f0f-1e1e-4d2d-8c3c-4b4b4b4b4b4b';

function vector(name: string): Buffer {
  return readFileSync(join(MAKE_BCACHE_DIR, `${name}.sb`));
}

/** A copy of `block` with `edit` applied and the checksum made right again. */
function edited(block: Buffer, edit: (b: Buffer) => void, fixCsum = true): Buffer {
  const b = Buffer.from(block);
  edit(b);
  if (fixCsum) b.writeBigUInt64LE(superblockCsum(b, b.readUInt16LE(SB_FIELD.keys)), 0);
  return b;
}

function refusal(block: Buffer, field: string, pattern: RegExp, options = {}): void {
  assert.throws(
    () => decodeSuperblock(block, options),
    (e: unknown) =>
      e instanceof FormatError && e.structure === 'cache_sb' && e.field === field && pattern.test(e.message),
    `expected cache_sb.${field} ~ ${pattern}`,
  );
}

test('make-bcache superblocks decode to the values make-bcache printed', () => {
  const c = decodeSuperblock(vector('cache-default'), { deviceSectors: (64 << 20) / 512, logicalBlockSize: 512 });
  assert.equal(c.version, 0);
  assert.equal(formatUuid(c.setUuid), SET);
  assert.deepEqual(
    [c.nbuckets, c.blockSize, c.bucketSize, c.nrInSet, c.nrThisDev, c.firstBucket],
    [128, 8, 1024, 1, 0, 1],
  );
  assert.deepEqual([cacheSync(c), cacheDiscard(c), cacheReplacement(c)], [false, false, 0]);
  assert.deepEqual(c.journalBuckets, []);
  assert.equal(c.seq, 0n);

  const o = decodeSuperblock(vector('cache-options'));
  assert.deepEqual([o.nbuckets, o.blockSize, o.bucketSize, o.firstBucket], [768, 1, 256, 1]);
  assert.deepEqual([cacheDiscard(o), cacheReplacement(o)], [true, 2]);

  const b = decodeSuperblock(vector('backing-default'));
  assert.deepEqual(
    [b.version, b.dataOffset, b.blockSize, b.bucketSize, bdevCacheMode(b), bdevState(b)],
    [1, 16, 8, 1024, 0, 0],
  );
  const w = decodeSuperblock(vector('backing-offset'));
  assert.deepEqual([w.version, w.dataOffset, w.blockSize, bdevCacheMode(w)], [4, 2048, 4, 1]);
  assert.equal(formatUuid(w.setUuid), SET);
});

test('our encoder writes the bytes make-bcache writes, for the same values', () => {
  for (const name of ['cache-default', 'cache-options']) {
    const v = vector(name);
    const d = decodeSuperblock(v);
    const ours = newCacheSuperblock({
      uuid: d.uuid,
      setUuid: d.setUuid,
      blockSize: d.blockSize,
      bucketSize: d.bucketSize,
      nbuckets: d.nbuckets,
      discard: cacheDiscard(d),
      replacement: cacheReplacement(d),
    });
    assert.deepEqual(encodeSuperblock(ours), v, name);
  }
  for (const name of ['backing-default', 'backing-offset']) {
    const v = vector(name);
    const d = decodeSuperblock(v);
    const ours = newBackingSuperblock({
      uuid: d.uuid,
      setUuid: d.setUuid,
      blockSize: d.blockSize,
      bucketSize: d.bucketSize,
      dataOffset: d.dataOffset,
      writeback: bdevCacheMode(d) === 1,
    });
    assert.deepEqual(encodeSuperblock(ours), v, name);
  }
});

test('superblocks the kernel rewrote decode and re-encode byte for byte', () => {
  for (const name of ['fresh', 'wb-stopped', 'wb-crash'] as const) {
    const { cache, bdev } = loadKernelFixture(name);
    const block = cache.subarray(4096, 8192);
    const sb = decodeSuperblock(block, { deviceSectors: cache.length / 512 });
    assert.equal(sb.version, 3, `${name}: the kernel upgrades caches to version 3`);
    assert.equal(sb.seq, 1n);
    assert.ok(cacheSync(sb));
    assert.equal(sb.journalBuckets.length, Math.min(Math.max(sb.nbuckets >> 7, 2), 256));
    assert.deepEqual(
      sb.journalBuckets,
      sb.journalBuckets.map((_, i) => sb.firstBucket + i),
    );
    assert.ok(sb.lastMount > 1_600_000_000);
    assert.deepEqual(encodeSuperblock(sb), block);
    if (bdev) {
      const bblock = bdev.subarray(4096, 8192);
      const b = decodeSuperblock(bblock);
      assert.equal(bdevState(b), 2, `${name}: the backing device is dirty`);
      assert.equal(bdevCacheMode(b), 1);
      assert.ok(b.setUuid.equals(sb.setUuid), 'attached to the set');
      assert.ok(b.lastMount > 0);
      assert.deepEqual(encodeSuperblock(b), bblock);
    }
  }
});

test('bytes of the 4 KiB block that no field covers survive a rewrite', () => {
  const v = edited(vector('cache-default'), (b) => {
    b.fill(0xee, 144, 184);
    b.fill(0xdd, SB_FIELD.d + 8 * 5, SB_FIELD.d + 8 * 256);
    b.fill(0xcc, 2258, 4096);
  });
  const sb = decodeSuperblock(v);
  sb.seq += 1n;
  sb.flags = setFlagBits(sb.flags, 0n, 1n, 1);
  sb.journalBuckets = [1, 2, 3];
  const out = encodeSuperblock(sb);
  assert.deepEqual(out.subarray(144, 184), v.subarray(144, 184));
  assert.deepEqual(out.subarray(SB_FIELD.d + 8 * 5, 4096), v.subarray(SB_FIELD.d + 8 * 5, 4096));
  const again = decodeSuperblock(out);
  assert.equal(again.seq, 1n);
  assert.ok(cacheSync(again));
  assert.deepEqual(again.journalBuckets, [1, 2, 3]);
});

test('every superblock round-trips through its encoding', () => {
  const arbUuid = fc
    .uint8Array({ minLength: 16, maxLength: 16 })
    .filter((u) => u.some((x) => x !== 0))
    .map((u) => Buffer.from(u));
  const arbCache = fc
    .record({
      uuid: arbUuid,
      setUuid: arbUuid,
      label: fc.uint8Array({ minLength: 32, maxLength: 32 }).map((u) => Buffer.from(u)),
      blockLog: fc.integer({ min: 0, max: 3 }),
      bucketLog: fc.integer({ min: 3, max: 15 }),
      nbuckets: fc.integer({ min: 128, max: 2 ** 40 }),
      keys: fc.integer({ min: 0, max: 256 }),
      flags: fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }),
      seq: fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }),
      lastMount: fc.integer({ min: 0, max: 0xffffffff }),
      version: fc.constantFrom(0, 3),
    })
    // The journal buckets start at first_bucket (after the superblock's sectors) and must fit.
    .filter((r) => Math.floor(23 / 2 ** r.bucketLog) + 1 + r.keys <= r.nbuckets && r.blockLog <= r.bucketLog);
  fc.assert(
    fc.property(arbCache, (r) => {
      const bucketSize = 2 ** r.bucketLog;
      const firstBucket = Math.floor(23 / bucketSize) + 1;
      const sb: Superblock = {
        ...newCacheSuperblock({
          uuid: r.uuid,
          setUuid: r.setUuid,
          blockSize: 2 ** r.blockLog,
          bucketSize,
          nbuckets: r.nbuckets,
          discard: false,
          replacement: 0,
        }),
        version: r.version,
        label: r.label,
        flags: r.flags,
        seq: r.seq,
        lastMount: r.lastMount,
        journalBuckets: Array.from({ length: r.keys }, (_, i) => firstBucket + i),
      };
      const back = decodeSuperblock(encodeSuperblock(sb));
      const { raw, ...fields } = back;
      assert.ok(raw);
      assert.deepEqual(fields, sb);
    }),
    { numRuns: 200 },
  );
});

test('the kernel checks are made in its order, each naming the field', () => {
  const cache = vector('cache-default');
  refusal(
    edited(cache, (b) => b.writeBigUInt64LE(9n, SB_FIELD.offset)),
    'offset',
    /not a bcache superblock/,
  );
  refusal(
    edited(cache, (b) => (b[SB_FIELD.magic] = 0)),
    'magic',
    /bad magic/,
  );
  refusal(
    edited(cache, (b) => (b[SB_FIELD.label] = 1), false),
    'csum',
    /checksums to/,
  );
  refusal(
    edited(cache, (b) => b.fill(0, SB_FIELD.uuid, SB_FIELD.uuid + 16)),
    'uuid',
    /zero/,
  );
  refusal(cache, 'block_size', /smaller than the device's logical block size 8192/, { logicalBlockSize: 8192 });
  refusal(
    edited(cache, (b) => b.writeBigUInt64LE(2n, SB_FIELD.version)),
    'version',
    /not a superblock version/,
  );
  refusal(
    edited(cache, (b) => b.writeBigUInt64LE(7n, SB_FIELD.version)),
    'version',
    /not a superblock version/,
  );
  refusal(
    edited(cache, (b) => b.writeUInt16LE(257, SB_FIELD.keys)),
    'keys',
    /more than 256/,
  );
  refusal(
    edited(cache, (b) => b.writeBigUInt64LE(127n, SB_FIELD.nbuckets)),
    'nbuckets',
    /fewer than the 128/,
  );
  refusal(
    edited(cache, (b) => b.writeUInt16LE(3, SB_FIELD.blockSize)),
    'block_size',
    /power of two/,
  );
  refusal(
    edited(cache, (b) => b.writeUInt16LE(16, SB_FIELD.blockSize)),
    'block_size',
    /larger than a page/,
  );
  refusal(
    edited(cache, (b) => b.writeUInt16LE(1000, SB_FIELD.bucketSize)),
    'bucket_size',
    /power of two/,
  );
  refusal(
    edited(cache, (b) => b.writeUInt16LE(4, SB_FIELD.bucketSize)),
    'bucket_size',
    /smaller than a page/,
  );
  refusal(cache, 'nbuckets', /device too small/, { deviceSectors: 1000 });
  refusal(
    edited(cache, (b) => b.fill(0, SB_FIELD.setUuid, SB_FIELD.setUuid + 16)),
    'set_uuid',
    /zero/,
  );
  refusal(
    edited(cache, (b) => b.writeUInt16LE(0, SB_FIELD.nrInSet)),
    'nr_in_set',
    /not a valid cache device number/,
  );
  refusal(
    edited(cache, (b) => b.writeUInt16LE(9, SB_FIELD.nrInSet)),
    'nr_in_set',
    /at most 8/,
  );
  refusal(
    edited(cache, (b) => b.writeUInt16LE(1, SB_FIELD.nrThisDev)),
    'nr_in_set',
    /device 1 of 1/,
  );
  refusal(
    edited(cache, (b) => {
      b.writeUInt16LE(2, SB_FIELD.keys);
      b.writeBigUInt64LE(1n, SB_FIELD.d);
      b.writeBigUInt64LE(3n, SB_FIELD.d + 8);
    }),
    'd',
    /not sequential/,
  );
  refusal(
    edited(cache, (b) => {
      b.writeUInt16LE(128, SB_FIELD.keys);
      for (let i = 0; i < 128; i++) b.writeBigUInt64LE(BigInt(1 + i), SB_FIELD.d + 8 * i);
    }),
    'keys',
    /run past 128 buckets/,
  );
  refusal(
    edited(cache, (b) => {
      b.writeUInt16LE(8, SB_FIELD.bucketSize);
      b.writeUInt16LE(1, SB_FIELD.firstBucket);
    }),
    'first_bucket',
    /before the end of the superblock/,
  );
  refusal(
    edited(vector('backing-offset'), (b) => b.writeBigUInt64LE(15n, SB_FIELD.dataOffset)),
    'data_offset',
    /at least 16/,
  );
});

test('too short a block is refused, and the raw fields of anything can still be read', () => {
  assert.throws(() => decodeSuperblock(Buffer.alloc(100)), /cache_sb\.size/);
  const f = readSuperblockFields(Buffer.alloc(4096, 0xff));
  assert.equal(f.version, 2n ** 64n - 1n);
  assert.equal(f.keys, 0xffff);
});

test('version 5 and 6 superblocks: features are read, large buckets understood, unknown features refused by name', () => {
  const cache = vector('cache-default');
  const v5 = (incompat: bigint, edit: (b: Buffer) => void = () => undefined): Buffer =>
    edited(cache, (b) => {
      b.writeBigUInt64LE(5n, SB_FIELD.version);
      b.writeBigUInt64LE(incompat, SB_FIELD.featureIncompat);
      edit(b);
    });
  const plain = decodeSuperblock(v5(0n));
  assert.equal(plain.version, 5);
  assert.equal(plain.bucketSize, 1024);
  assert.deepEqual(encodeSuperblock(plain), v5(0n));

  const large = v5(2n, (b) => {
    b.writeUInt16LE(17, SB_FIELD.bucketSize);
    b.writeBigUInt64LE(130n, SB_FIELD.nbuckets);
  });
  const l = decodeSuperblock(large);
  assert.equal(l.bucketSize, 2 ** 17, 'large_bucket stores log2 of the bucket size');
  assert.equal(l.featureIncompat, 2n);
  assert.deepEqual(encodeSuperblock(l), large);

  const obso = v5(1n, (b) => {
    b.writeUInt16LE(0, SB_FIELD.bucketSize);
    b.writeUInt16LE(2, SB_FIELD.obsoBucketSizeHi);
  });
  const o = decodeSuperblock(obso);
  assert.equal(o.bucketSize, 2 * 65536, 'the obsolete layout keeps the high 16 bits apart');
  assert.deepEqual(encodeSuperblock(o), obso);

  refusal(
    v5(2n, (b) => b.writeUInt16LE(40, SB_FIELD.bucketSize)),
    'bucket_size',
    /overflows/,
  );
  refusal(v5(1n << 5n), 'feature_incompat', /unknown incompatible feature bit 5/);
  refusal(v5((1n << 5n) | (1n << 9n)), 'feature_incompat', /features bit 5, bit 9/);
  refusal(
    v5(0n, (b) => b.writeBigUInt64LE(1n, SB_FIELD.featureCompat)),
    'feature_compat',
    /unknown compatible feature bit 0/,
  );
  refusal(
    v5(0n, (b) => b.writeBigUInt64LE(4n, SB_FIELD.featureRoCompat)),
    'feature_ro_compat',
    /unknown read-only compatible feature bit 2/,
  );
  const v6 = edited(vector('backing-offset'), (b) => {
    b.writeBigUInt64LE(6n, SB_FIELD.version);
    b.writeBigUInt64LE(2n, SB_FIELD.featureIncompat);
  });
  const b6 = decodeSuperblock(v6);
  assert.equal(b6.dataOffset, 2048);
  assert.deepEqual(encodeSuperblock(b6), v6);
  refusal(
    edited(v6, (b) => b.writeBigUInt64LE(8n, SB_FIELD.featureIncompat)),
    'feature_incompat',
    /bit 3/,
  );
});

test('flags, set magic and bad field values on encoding', () => {
  const sb = decodeSuperblock(vector('cache-default'));
  assert.equal(setMagic(sb), parseUuid(SET)?.readBigUInt64LE(0));
  assert.equal(setFlagBits(0n, 2n, 7n, 9), 4n, 'values are masked to the field');
  assert.equal(bdevState({ flags: 3n << 61n }), 3);
  assert.throws(() => encodeSuperblock({ ...sb, blockSize: 70000 }), /cache_sb\.block_size/);
  assert.throws(() => encodeSuperblock({ ...sb, bucketSize: 70000 }), /cache_sb\.bucket_size/);
  assert.throws(() => encodeSuperblock({ ...sb, journalBuckets: new Array<number>(257).fill(1) }), /cache_sb\.keys/);
  assert.throws(() => encodeSuperblock({ ...sb, label: Buffer.alloc(33) }), /cache_sb\.label/);
  assert.throws(() => encodeSuperblock({ ...sb, uuid: Buffer.alloc(4) }), /cache_sb\.uuid/);
  assert.throws(
    () => encodeSuperblock({ ...sb, version: 5, featureIncompat: 2n, bucketSize: 3000 }),
    /large_bucket stores a log2/,
  );
});
