import { test } from 'node:test';
import assert from 'node:assert/strict';
import { RwLock } from '../../src/util/rwlock.ts';

test('the fast path takes a free lock synchronously', () => {
  const l = new RwLock();
  assert.equal(l.tryRead(), true);
  assert.equal(l.tryRead(), true);
  assert.equal(l.tryWrite(), false);
  l.releaseRead();
  l.releaseRead();
  assert.equal(l.tryWrite(), true);
  assert.equal(l.tryRead(), false);
  l.releaseWrite();
  assert.equal(l.idle, true);
});

test('a queued writer goes before later readers; readers queued together enter together', async () => {
  const l = new RwLock();
  const order: string[] = [];
  await l.read();
  const w = l.write().then(() => {
    order.push('w');
    l.releaseWrite();
  });
  assert.equal(l.tryRead(), false, 'a reader may not overtake a queued writer');
  const r1 = l.read().then(() => order.push('r1'));
  const r2 = l.read().then(() => order.push('r2'));
  order.push('release');
  l.releaseRead();
  await Promise.all([w, r1, r2]);
  assert.deepEqual(order, ['release', 'w', 'r1', 'r2']);
  assert.equal(l.readersHeld, 2);
  l.releaseRead();
  l.releaseRead();
  assert.equal(l.idle, true);
});

test('release without holding throws', () => {
  const l = new RwLock();
  assert.throws(() => {
    l.releaseRead();
  }, /without a read lock/);
  assert.throws(() => {
    l.releaseWrite();
  }, /without the write lock/);
});
