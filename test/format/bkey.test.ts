import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import {
  bkeyCmp,
  bkeyEqual,
  bkeyU64sAt,
  btreePtrInvalid,
  checkKeyFields,
  cloneKey,
  decodeBkey,
  decodeKeys,
  encodeBkey,
  encodeKeys,
  extentInvalid,
  genAfter,
  keyCsum,
  keysU64s,
  keyStart,
  keyText,
  makeKey,
  makePtr,
  MAX_KEY,
  MAX_KEY_OFFSET,
  ptrAvailable,
  ptrStale,
  ptrStatus,
  ptrValue,
  PTR_CHECK_DEV,
  SPARE_DEFAULT,
  ZERO_KEY,
  type Bkey,
} from '../../src/format/bkey.ts';
import { FormatError } from '../../src/format/errors.ts';

/** Little-endian u64 words to bytes. */
function words(...ws: bigint[]): Buffer {
  const b = Buffer.alloc(8 * ws.length);
  ws.forEach((w, i) => b.writeBigUInt64LE(w, 8 * i));
  return b;
}

// Keys as Linux 6.1 wrote them (read from images the kernel oracle produced).
const KERNEL_DIRTY = words(0x9000001000800000n, 0x18n, 0xd0001n);
const KERNEL_ROOT = words(0x90000000080fffffn, 0x7fffffffffffffffn, 0xa8001n);
const KERNEL_CHECK = words(0x9000000000000000n, 0x10n, 0xfff9650bb2152bc0n);
const KERNEL_MERGED = words(0x9000001008000000n, 0x890n, 0x100001n);

test('a dirty extent the kernel wrote decodes field by field and encodes back to the same bytes', () => {
  const k = decodeBkey(KERNEL_DIRTY, 0);
  assert.deepEqual(k, {
    inode: 0,
    offset: 24,
    size: 8,
    dirty: true,
    ptrs: [{ dev: 0, offset: 3328, gen: 1, spare: 0 }],
    spare: SPARE_DEFAULT,
  });
  assert.equal(keyStart(k), 16);
  const out = Buffer.alloc(24);
  assert.equal(encodeBkey(k, out, 0), 24);
  assert.deepEqual(out, KERNEL_DIRTY);
  assert.deepEqual(decodeBkey(KERNEL_MERGED, 0), makeKey(0, 0x890, 128, true, [makePtr(0, 4096, 1)]));
});

test("the root node's key is MAX_KEY with a size and a pointer, and MAX_KEY_OFFSET round-trips", () => {
  const k = decodeBkey(KERNEL_ROOT, 0);
  assert.equal(k.inode, 0xfffff);
  assert.equal(k.offset, MAX_KEY_OFFSET);
  assert.equal(k.size, 128);
  assert.equal(bkeyCmp(k, MAX_KEY), 0);
  assert.deepEqual(k.ptrs, [{ dev: 0, offset: 2688, gen: 1, spare: 0 }]);
  const out = Buffer.alloc(24);
  encodeBkey(k, out, 0);
  assert.deepEqual(out, KERNEL_ROOT);
});

test("a cache-miss placeholder's random pointer (PTR_CHECK_DEV, bit 63 set) survives a round trip", () => {
  const k = decodeBkey(KERNEL_CHECK, 0);
  assert.equal(k.size, 0);
  const p = k.ptrs[0];
  assert.ok(p);
  assert.equal(p.dev, PTR_CHECK_DEV);
  assert.equal(p.spare, 1);
  assert.equal(ptrAvailable(p), false);
  assert.equal(ptrValue(p), 0xfff9650bb2152bc0n);
  const out = Buffer.alloc(24);
  encodeBkey(k, out, 0);
  assert.deepEqual(out, KERNEL_CHECK);
  assert.equal(keyText(k), '0:16 len 0 -> [check dev]');
});

const arbPtr = fc
  .record({
    dev: fc.integer({ min: 0, max: 0xfff }),
    offset: fc.integer({ min: 0, max: 2 ** 43 - 1 }),
    gen: fc.integer({ min: 0, max: 255 }),
    spare: fc.integer({ min: 0, max: 1 }),
  })
  .map((p) => ({ ...p }));

const arbKey: fc.Arbitrary<Bkey> = fc
  .record({
    inode: fc.integer({ min: 0, max: 0xfffff }),
    offset: fc.oneof(fc.integer({ min: 0, max: 2 ** 53 - 1 }), fc.constant(MAX_KEY_OFFSET)),
    size: fc.integer({ min: 0, max: 0xffff }),
    dirty: fc.boolean(),
    ptrs: fc.array(arbPtr, { maxLength: 7 }),
    spare: fc.integer({ min: 0, max: 0xffffffff }).map((v) => (v & 0x8fffffe0) >>> 0),
  })
  .map((k) => ({ ...k }));

test('every key round-trips through its encoding', () => {
  fc.assert(
    fc.property(arbKey, (k) => {
      const buf = Buffer.alloc(8 * (2 + k.ptrs.length));
      encodeBkey(k, buf, 0);
      assert.equal(bkeyU64sAt(buf, 0), 2 + k.ptrs.length);
      const back = decodeBkey(buf, 0);
      assert.deepEqual(back, k);
      assert.ok(bkeyEqual(back, k));
    }),
  );
});

test('any bytes bcache could have written decode and re-encode to themselves', () => {
  fc.assert(
    fc.property(
      fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }),
      fc.bigInt({ min: 0n, max: 2n ** 53n - 1n }),
      fc.array(fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }), { maxLength: 7 }),
      (high, low, ptrs) => {
        const h = (high & ~(7n << 60n)) | (BigInt(ptrs.length) << 60n);
        const bytes = words(h, low, ...ptrs);
        const out = Buffer.alloc(bytes.length);
        encodeBkey(decodeBkey(bytes, 0), out, 0);
        assert.deepEqual(out, bytes);
      },
    ),
  );
});

test('an offset past 2^53 other than MAX_KEY_OFFSET is refused by name', () => {
  assert.throws(
    () => decodeBkey(words(0x9000000000000000n, 1n << 53n), 0),
    (e: unknown) => e instanceof FormatError && e.structure === 'bkey' && e.field === 'offset',
  );
  assert.throws(() => decodeBkey(words(0x9000000000000000n, 0x7ffffffffffffffen), 0, 'bset'), /bset\.offset/);
});

test('encoding refuses fields that do not fit their bits', () => {
  const k = makeKey(1, 100, 8, false, [makePtr(0, 1000, 3)]);
  const bad: Array<[string, (k: Bkey) => void]> = [
    ['inode', (x) => (x.inode = 0x100000)],
    ['offset', (x) => (x.offset = MAX_KEY_OFFSET + 2)],
    ['offset', (x) => (x.offset = 1.5)],
    ['size', (x) => (x.size = 0x10000)],
    ['spare', (x) => (x.spare = 1)],
    ['ptrs', (x) => (x.ptrs = Array.from({ length: 8 }, () => makePtr(0, 0, 0)))],
    ['ptr.dev', (x) => ((x.ptrs[0] ?? makePtr(0, 0, 0)).dev = 0x1000)],
    ['ptr.offset', (x) => ((x.ptrs[0] ?? makePtr(0, 0, 0)).offset = 2 ** 43)],
    ['ptr.gen', (x) => ((x.ptrs[0] ?? makePtr(0, 0, 0)).gen = 256)],
    ['ptr.spare', (x) => ((x.ptrs[0] ?? makePtr(0, 0, 0)).spare = 2)],
  ];
  for (const [field, spoil] of bad) {
    const x = cloneKey(k);
    spoil(x);
    assert.throws(
      () => encodeBkey(x, Buffer.alloc(128), 0),
      (e: unknown) => e instanceof FormatError && e.field === field,
      field,
    );
  }
  checkKeyFields(k);
});

test('keys sort by (inode, offset) exactly as the 64-bit comparison does', () => {
  fc.assert(
    fc.property(arbKey, arbKey, (a, b) => {
      const ref = (k: Bkey): bigint =>
        (BigInt(k.inode) << 64n) | (k.offset === MAX_KEY_OFFSET ? 2n ** 63n - 1n : BigInt(k.offset));
      const c = bkeyCmp(a, b);
      const r = ref(a) - ref(b);
      assert.equal(Math.sign(c), r === 0n ? 0 : r > 0n ? 1 : -1);
    }),
  );
  assert.ok(bkeyCmp(ZERO_KEY, MAX_KEY) < 0);
});

test('a run of keys decodes and encodes as a whole; a key running past the end is refused', () => {
  const keys = [
    makeKey(0, 24, 8, true, [makePtr(0, 3328, 1)]),
    makeKey(0, 40, 0),
    makeKey(3, 90, 2, false, [makePtr(0, 1, 2), makePtr(0, 9, 2)]),
  ];
  const buf = Buffer.alloc(8 * keysU64s(keys));
  assert.equal(encodeKeys(keys, buf, 0), buf.length);
  assert.deepEqual(decodeKeys(buf, 0, buf.length, 'bset'), keys);
  assert.throws(
    () => decodeKeys(buf, 0, buf.length - 8, 'bset'),
    /bset\.keys: the key at byte 40 has 2 pointers and runs past/,
  );
  assert.throws(() => decodeKeys(buf, 0, 8, 'jset'), /jset\.keys: a key header/);
});

test('pointer validity follows the kernel: btree pointers need a size, no dirty bit and a place inside the cache', () => {
  const g = { bucketSize: 128, firstBucket: 1, nbuckets: 1024 };
  const node = makeKey(0xfffff, MAX_KEY_OFFSET, 128, false, [makePtr(0, 2688, 1)]);
  assert.equal(btreePtrInvalid(node, g), false);
  assert.equal(btreePtrInvalid({ ...node, size: 0 }, g), true);
  assert.equal(btreePtrInvalid({ ...node, dirty: true }, g), true);
  assert.equal(btreePtrInvalid({ ...node, ptrs: [] }, g), true);
  assert.equal(btreePtrInvalid({ ...node, ptrs: [makePtr(0, 2700, 1)] }, g), true, 'runs past its bucket');
  assert.equal(btreePtrInvalid({ ...node, ptrs: [makePtr(0, 64, 1)] }, g), true, 'in the superblock bucket');
  assert.equal(btreePtrInvalid({ ...node, ptrs: [makePtr(0, 1024 * 128, 1)] }, g), true, 'past the last bucket');
  assert.equal(ptrStatus({ ...node, ptrs: [makePtr(0, 2700, 1)] }, g), 'bad, length too big');
  assert.equal(ptrStatus({ ...node, size: 8, ptrs: [makePtr(0, 64, 1)] }, g), 'bad, short offset');
  assert.equal(ptrStatus({ ...node, ptrs: [makePtr(0, 1024 * 128, 1)] }, g), 'bad, offset past end of device');
  assert.equal(ptrStatus(makeKey(0, 0, 0), g), 'bad, null key');
  assert.equal(ptrStatus(makeKey(0, 10, 1), g), 'bad, no pointers');
  assert.equal(ptrStatus(makeKey(0, 10, 0, false, [makePtr(0, 200, 1)]), g), 'zeroed key');
  assert.equal(ptrStatus(node, g), '');
});

test('extents are invalid when empty, when they start before sector 0 or point outside the cache', () => {
  const g = { bucketSize: 128, firstBucket: 1, nbuckets: 1024 };
  const k = makeKey(0, 24, 8, true, [makePtr(0, 3328, 1)]);
  assert.equal(extentInvalid(k, g), false);
  assert.equal(extentInvalid({ ...k, size: 0 }, g), true);
  assert.equal(extentInvalid({ ...k, offset: 4 }, g), true);
  assert.equal(
    extentInvalid(makeKey(0, 24, 8, false, [makePtr(PTR_CHECK_DEV, 3, 1)]), g),
    false,
    'placeholders are not checked',
  );
});

test('generations wrap: a pointer is stale by how far its bucket moved on, up to 128', () => {
  assert.equal(genAfter(5, 3), 2);
  assert.equal(genAfter(3, 5), 0);
  assert.equal(genAfter(2, 250), 8);
  assert.equal(ptrStale(1, makePtr(0, 0, 1)), 0);
  assert.equal(ptrStale(3, makePtr(0, 0, 1)), 2);
});

test("KEY_CSUM is carried in the spare bits and printed keys read like the kernel's", () => {
  const k = makeKey(2, 100, 4, true, [makePtr(0, 512, 7), makePtr(1, 99, 0)]);
  k.spare = (SPARE_DEFAULT | (2 << 24)) >>> 0;
  assert.equal(keyCsum(k), 2);
  assert.equal(keyText(k), '2:96 len 4 -> [0:512 gen 7, 1:99 gen 0] dirty');
  assert.equal(keyText(MAX_KEY), '1048575:9223372036854775807 len 0 -> []');
});
