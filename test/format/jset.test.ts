import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { makeKey, makePtr, MAX_KEY_OFFSET, type Bkey } from '../../src/format/bkey.ts';
import { JSET_MAGIC } from '../../src/format/constants.ts';
import { bchCrc64 } from '../../src/format/crc64.ts';
import { FormatError } from '../../src/format/errors.ts';
import {
  decodeJset,
  encodeJset,
  jsetBytes,
  jsetMagic,
  missingJournalRanges,
  scanJournalBucket,
  selectReplayEntries,
  type Jset,
} from '../../src/format/jset.ts';

const SET_MAGIC = 0x4d2d1e1e0f0f0f0fn;

function entry(seq: number, lastSeq: number, keys: Bkey[] = []): Jset {
  return {
    seq,
    lastSeq,
    version: 1,
    uuidBucket: makeKey(0, 0, 128, false, [makePtr(0, 2816, 1)]),
    btreeRoot: makeKey(0xfffff, MAX_KEY_OFFSET, 128, false, [makePtr(0, 2688, 1)]),
    btreeLevel: 0,
    prioBucket: [9, 0, 0, 0, 0, 0, 0, 0],
    keys,
  };
}

const dirty = (end: number, cache: number): Bkey => makeKey(0, end, 8, true, [makePtr(0, cache, 1)]);

test('a journal entry round-trips, its checksum covering header and keys', () => {
  fc.assert(
    fc.property(
      fc.integer({ min: 1, max: 2 ** 40 }),
      fc.nat(100),
      fc.integer({ min: 0, max: 50 }),
      fc.constantFrom(512, 4096),
      (seq, back, n, blockBytes) => {
        const j = entry(
          seq,
          Math.max(1, seq - back),
          Array.from({ length: n }, (_, i) => dirty(24 + 8 * i, 3000 + 8 * i)),
        );
        const buf = encodeJset(j, { setMagic: SET_MAGIC, blockBytes });
        assert.equal(buf.length % blockBytes, 0);
        assert.equal(buf.readBigUInt64LE(8), SET_MAGIC ^ JSET_MAGIC);
        assert.equal(buf.readBigUInt64LE(0), bchCrc64(buf, 8, jsetBytes(3 * n)));
        const { header, ...back2 } = decodeJset(buf, 0, { setMagic: SET_MAGIC });
        assert.equal(header?.length, 240);
        assert.deepEqual(back2, j);
      },
    ),
    { numRuns: 50 },
  );
});

test('old bytes in the header padding are kept through decode and encode', () => {
  const buf = encodeJset(entry(5, 3), { setMagic: SET_MAGIC, blockBytes: 512 });
  buf.fill(0xab, 64, 104); // after the uuid_bucket key in its 8-u64 slot
  buf.fill(0xcd, 170, 176); // pad[3]
  buf.writeBigUInt64LE(bchCrc64(buf, 8, 240), 0);
  const j = decodeJset(buf, 0, { setMagic: SET_MAGIC });
  assert.deepEqual(encodeJset(j, { setMagic: SET_MAGIC, blockBytes: 512 }), buf);
});

test('decoding checks magic, size and checksum, naming the field', () => {
  const buf = encodeJset(entry(5, 3, [dirty(24, 3000)]), { setMagic: SET_MAGIC, blockBytes: 512 });
  const fail = (b: Buffer, field: string): void => {
    assert.throws(
      () => decodeJset(b, 0, { setMagic: SET_MAGIC }),
      (e: unknown) => e instanceof FormatError && e.structure === 'jset' && e.field === field,
    );
  };
  fail(buf.subarray(0, 100), 'size');
  assert.throws(() => decodeJset(buf, 0, { setMagic: 1n }), /not this set's journal magic/);
  const big = Buffer.from(buf);
  big.writeUInt32LE(5000, 28);
  fail(big, 'keys');
  const flipped = Buffer.from(buf);
  flipped[250] = (flipped[250] ?? 0) ^ 0x10;
  fail(flipped, 'csum');
  const wide = Buffer.from(buf);
  wide.writeBigUInt64LE(wide.readBigUInt64LE(40) | (7n << 60n), 40);
  wide.writeBigUInt64LE(bchCrc64(wide, 8, jsetBytes(3)), 0);
  fail(wide, 'uuid_bucket');
  const tooMany = {
    ...entry(1, 1),
    btreeRoot: makeKey(
      0,
      1,
      1,
      false,
      Array.from({ length: 7 }, () => makePtr(0, 1, 1)),
    ),
  };
  assert.throws(() => encodeJset(tooMany, { setMagic: SET_MAGIC, blockBytes: 512 }), /jset\.btree_root/);
});

test('a journal bucket is read entry after entry until the first bad one', () => {
  const bucket = Buffer.alloc(64 * 1024);
  let at = 0;
  for (const j of [
    entry(1, 1),
    entry(2, 1, [dirty(24, 3000)]),
    entry(
      3,
      2,
      Array.from({ length: 30 }, (_, i) => dirty(100 + 8 * i, 4000 + 8 * i)),
    ),
  ]) {
    const b = encodeJset(j, { setMagic: SET_MAGIC, blockBytes: 4096 });
    b.copy(bucket, at);
    at += b.length;
  }
  const scan = scanJournalBucket(bucket, { setMagic: SET_MAGIC, blockSize: 8 });
  assert.deepEqual(
    scan.entries.map((e) => e.seq),
    [1, 2, 3],
  );
  assert.deepEqual(scan.end, { offset: 12288, reason: 'bad magic' });

  const torn = Buffer.from(bucket);
  torn.writeUInt8(torn.readUInt8(4096 + 250) ^ 0xff, 4096 + 250);
  assert.deepEqual(scanJournalBucket(torn, { setMagic: SET_MAGIC, blockSize: 8 }).end, {
    offset: 4096,
    reason: 'bad csum',
  });
  const huge = Buffer.from(bucket);
  huge.writeUInt32LE(1 << 20, 4096 + 28);
  assert.deepEqual(scanJournalBucket(huge, { setMagic: SET_MAGIC, blockSize: 8 }).end, {
    offset: 4096,
    reason: 'too big',
  });
  const full = Buffer.alloc(4096);
  encodeJset(entry(9, 9), { setMagic: SET_MAGIC, blockBytes: 4096 }).copy(full);
  assert.deepEqual(scanJournalBucket(full, { setMagic: SET_MAGIC, blockSize: 8 }).end, {
    offset: 4096,
    reason: 'end of bucket',
  });
});

test("replay takes one entry per seq from the newest entry's last_seq, and reports gaps", () => {
  const entries = [entry(7, 5), entry(3, 1), entry(5, 4), entry(6, 5), entry(6, 5), entry(4, 3)];
  const replay = selectReplayEntries(entries);
  assert.deepEqual(
    replay.map((j) => j.seq),
    [5, 6, 7],
  );
  assert.deepEqual(missingJournalRanges(replay), []);
  assert.deepEqual(missingJournalRanges(selectReplayEntries([entry(9, 4), entry(6, 4)])), [
    [4, 5],
    [7, 8],
  ]);
  assert.deepEqual(selectReplayEntries([]), []);
  assert.deepEqual(missingJournalRanges([]), []);
  assert.equal(jsetMagic(SET_MAGIC), SET_MAGIC ^ JSET_MAGIC);
});
