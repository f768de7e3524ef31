import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { bchCrc64, seededCrc64 } from '../../src/format/crc64.ts';

/** Bit-at-a-time CRC-64/WE with BigInt: slow and obviously right, the reference for the tables. */
function reference(seed: bigint, data: Uint8Array): bigint {
  const poly = 0x42f0e1eba9ea3693n;
  let crc = seed;
  for (const byte of data) {
    crc ^= BigInt(byte) << 56n;
    for (let i = 0; i < 8; i++) {
      crc = crc & (1n << 63n) ? ((crc << 1n) ^ poly) & 0xffffffffffffffffn : (crc << 1n) & 0xffffffffffffffffn;
    }
  }
  return crc ^ 0xffffffffffffffffn;
}

test('bch_crc64 has the CRC-64/WE check value', () => {
  assert.equal(bchCrc64(Buffer.from('123456789')), 0x62ec59e3f1a4f00an);
});

test('the empty input gives the inverted initial value inverted back: zero', () => {
  assert.equal(bchCrc64(Buffer.alloc(0)), 0n);
});

test('slicing-by-8 agrees with a bit-at-a-time reference on any bytes, range and seed', () => {
  fc.assert(
    fc.property(
      fc.uint8Array({ maxLength: 200 }),
      fc.bigInt({ min: 0n, max: 2n ** 64n - 1n }),
      fc.nat(20),
      fc.nat(20),
      (bytes, seed, a, b) => {
        const start = Math.min(a, bytes.length);
        const end = Math.max(start, bytes.length - b);
        const slice = bytes.subarray(start, end);
        assert.equal(bchCrc64(bytes, start, end), reference(0xffffffffffffffffn, slice));
        assert.equal(seededCrc64(seed, bytes, start, end), reference(seed, slice));
      },
    ),
  );
});

test('the seeded variant with an all-ones seed is bch_crc64', () => {
  const data = Buffer.from('bcache');
  assert.equal(seededCrc64(0xffffffffffffffffn, data), bchCrc64(data));
});

test('a range outside the buffer is refused', () => {
  assert.throws(() => bchCrc64(Buffer.alloc(4), 2, 8), RangeError);
  assert.throws(() => bchCrc64(Buffer.alloc(4), 3, 2), RangeError);
});
