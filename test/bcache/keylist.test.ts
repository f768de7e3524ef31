import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { makeKey, type Bkey } from '../../src/format/bkey.ts';
import { KeyList } from '../../src/bcache/keylist.ts';

// KeyList against a plain sorted array: the same splices give the same keys,
// seekAfter finds what a linear search finds, and walking with next() visits
// every key once, in order, whatever the chunk size.

const key = (inode: number, offset: number): Bkey => makeKey(inode, offset, 1, false, []);

function firstAfterLinear(keys: Bkey[], inode: number, offset: number): number {
  return keys.findIndex((k) => k.inode > inode || (k.inode === inode && k.offset > offset));
}

const opArb = fc.record({
  inode: fc.integer({ min: 0, max: 2 }),
  offset: fc.integer({ min: 0, max: 60 }),
  remove: fc.nat({ max: 6 }),
  insert: fc.nat({ max: 3 }),
});

test('splice, seekAfter and next agree with a sorted array, through chunk splits and merges', () => {
  fc.assert(
    fc.property(fc.array(opArb, { maxLength: 120 }), fc.integer({ min: 2, max: 8 }), (ops, chunk) => {
      const list = new KeyList(chunk);
      const model: Bkey[] = [];
      for (const o of ops) {
        // Replace up to `remove` keys after (inode, offset) by `insert` new keys that keep the order.
        const at = firstAfterLinear(model, o.inode, o.offset);
        const pos = list.seekAfter(o.inode, o.offset);
        assert.equal(pos < 0, at < 0);
        if (at >= 0) assert.equal(list.keyAt(pos), model[at]);
        const start = at < 0 ? model.length : at;
        const remove = Math.min(o.remove, model.length - start);
        const lo = start > 0 ? (model[start - 1] as Bkey) : key(0, 0);
        const hi = start + remove < model.length ? (model[start + remove] as Bkey) : key(3, 1e9);
        // New keys strictly between lo and hi (fractional offsets keep the gap from closing).
        const pieces: Bkey[] = [];
        for (let i = 0; i < o.insert; i++) {
          const k = makeKey(lo.inode, lo.offset + (i + 1) / (o.insert + 1), 1, false, []);
          if (k.inode < hi.inode || (k.inode === hi.inode && k.offset < hi.offset)) pieces.push(k);
        }
        list.splice(pos, remove, pieces);
        model.splice(start, remove, ...pieces);
        assert.deepEqual(list.check(), []);
        assert.equal(list.length, model.length);
        const walked: Bkey[] = [];
        if (list.length > 0) for (let p = list.seekAfter(-1, 0); p >= 0; p = list.next(p)) walked.push(list.keyAt(p));
        assert.equal(walked.length, model.length);
        walked.forEach((k, i) => {
          assert.equal(k, model[i]);
        });
        assert.equal(list.first(), model[0]);
        assert.equal(list.last(), model[model.length - 1]);
      }
    }),
    { numRuns: 300 },
  );
});

test('from() builds a list that walks back to the same array', () => {
  const keys = Array.from({ length: 1000 }, (_, i) => key(i % 3, Math.floor(i / 3) + 1)).sort(
    (a, b) => a.inode - b.inode || a.offset - b.offset,
  );
  const list = KeyList.from(keys);
  assert.deepEqual(list.check(), []);
  assert.deepEqual(list.toArray(), keys);
  assert.deepEqual([...list], keys);
  let n = 0;
  list.forEach(() => n++);
  assert.equal(n, 1000);
  assert.equal(
    list.keyAt(list.seekAfter(1, 100)),
    keys.find((k) => k.inode === 1 && k.offset === 101),
  );
  assert.equal(list.seekAfter(2, 1e9), -1);
  assert.throws(() => list.keyAt(-1), RangeError);
});
