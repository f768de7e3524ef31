import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { BufferPool } from '../../src/util/buffer-pool.ts';

test('acquire gives exactly the size asked for, and a released buffer is reused for its class', () => {
  const pool = new BufferPool();
  const a = pool.acquire(4096 + 16);
  assert.equal(a.length, 4112);
  pool.release(a);
  assert.equal(pool.idleBytes, 4096 + 64);
  const b = pool.acquire(4000);
  assert.equal(b.buffer, a.buffer, 'same class, same memory');
  assert.equal(b.length, 4000);
  assert.equal(pool.idleBytes, 0);
  const c = pool.acquire(4000);
  assert.notEqual(c.buffer, a.buffer, 'a buffer in use is never handed out twice');
});

test('small and huge sizes, and foreign buffers, bypass the pool', () => {
  const pool = new BufferPool();
  pool.release(pool.acquire(100));
  pool.release(Buffer.alloc(8192));
  pool.release(Buffer.alloc(65536).subarray(10));
  pool.release(pool.acquire(64 * 1024 * 1024));
  assert.equal(pool.idleBytes, 0);
});

test('the pool never keeps more idle memory than its cap', () => {
  const pool = new BufferPool(3 * (1024 * 1024 + 64));
  const bufs = Array.from({ length: 5 }, () => pool.acquire(1024 * 1024));
  for (const b of bufs) pool.release(b);
  assert.equal(pool.idleBytes, 3 * (1024 * 1024 + 64));
});

test('every size gets a buffer of that length, whose class fits it', () => {
  const pool = new BufferPool();
  fc.assert(
    fc.property(fc.integer({ min: 0, max: 33 * 1024 * 1024 }), (size) => {
      const b = pool.acquire(size);
      assert.equal(b.length, size);
      assert.ok(b.buffer.byteLength >= size);
      pool.release(b);
    }),
    { numRuns: 200 },
  );
});
