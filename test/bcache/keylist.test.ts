import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import {
  KEY_SIZE_MAX,
  MAX_KEY_INODE,
  MAX_KEY_OFFSET,
  PTR_DEV_MAX,
  PTR_OFFSET_MAX,
  SPARE_DEFAULT,
  encodeKeys,
  makeKey,
  type Bkey,
} from '../../src/format/bkey.ts';
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
        if (at >= 0) assert.deepEqual(list.keyAt(pos), model[at]);
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
          assert.deepEqual(k, model[i]);
        });
        assert.deepEqual(list.first(), model[0]);
        assert.deepEqual(list.last(), model[model.length - 1]);
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
  assert.deepEqual(
    list.keyAt(list.seekAfter(1, 100)),
    keys.find((k) => k.inode === 1 && k.offset === 101),
  );
  assert.equal(list.seekAfter(2, 1e9), -1);
  assert.throws(() => list.keyAt(-1), RangeError);
});

// Every field of a key survives the columns: pointers (none, one, several),
// the dirty bit, gens, the pointer's spare bit (a random check key's), the
// header's spare bits, offsets up to MAX_KEY_OFFSET; in place, after moves
// (splits, merges) and through the column readers.
const ptrArb = fc.record({
  dev: fc.integer({ min: 0, max: PTR_DEV_MAX }),
  offset: fc.integer({ min: 0, max: PTR_OFFSET_MAX }),
  gen: fc.integer({ min: 0, max: 255 }),
  spare: fc.integer({ min: 0, max: 1 }),
});
const fieldsArb = fc.record({
  size: fc.integer({ min: 0, max: KEY_SIZE_MAX }),
  dirty: fc.boolean(),
  ptrs: fc.array(ptrArb, { maxLength: 3 }),
  spare: fc.constantFrom(SPARE_DEFAULT, 0, 0x8f000000, 0x0fffffe0),
});

test('keys keep every field, through splices, splits and merges, and the column readers read them', () => {
  fc.assert(
    fc.property(
      fc.array(fieldsArb, { minLength: 1, maxLength: 40 }),
      fc.array(fc.nat(), { maxLength: 40 }),
      fc.integer({ min: 2, max: 6 }),
      (fields, removals, chunk) => {
        const keys: Bkey[] = fields.map((f, i) => ({
          inode: i % 2 === 0 ? MAX_KEY_INODE : i,
          offset: i === fields.length - 1 ? MAX_KEY_OFFSET : (i + 1) * 1000,
          size: f.size,
          dirty: f.dirty,
          ptrs: f.ptrs.map((p) => ({ dev: p.dev, offset: p.offset, gen: p.gen, spare: p.spare })),
          spare: f.spare,
        }));
        keys.sort((a, b) => a.inode - b.inode || a.offset - b.offset);
        const list = KeyList.from(keys, chunk);
        assert.deepEqual(list.toArray(), keys);
        // The on-disk bytes written from the columns are encodeKeys' bytes.
        const u64s = keys.reduce((n, k) => n + 2 + k.ptrs.length, 0);
        const fromColumns = Buffer.alloc(u64s * 8);
        const fromKeys = Buffer.alloc(u64s * 8);
        assert.equal(list.encode(fromColumns, 0), u64s * 8);
        encodeKeys(keys, fromKeys, 0);
        assert.deepEqual(fromColumns, fromKeys);
        // Copies: whole, filtered, sliced.
        assert.deepEqual(list.clone().toArray(), keys);
        const odd = list.filter((l, p) => l.sizeAt(p) % 2 === 1);
        assert.deepEqual(
          odd.toArray(),
          keys.filter((k) => k.size % 2 === 1),
        );
        assert.deepEqual(odd.check(), []);
        const mid = Math.floor(keys.length / 2);
        assert.deepEqual(list.slice(0, mid).toArray(), keys.slice(0, mid));
        assert.deepEqual(list.slice(mid, keys.length).toArray(), keys.slice(mid));
        assert.deepEqual(list.slice(1, keys.length - 1).check(), []);
        assert.equal(
          list.u64s(),
          keys.reduce((n, k) => n + 2 + k.ptrs.length, 0),
        );
        // Remove keys one by one (each removal moves the ones after it) and insert them back in place.
        const model = keys.slice();
        for (const r of removals) {
          if (model.length === 0) break;
          const at = r % model.length;
          const k = model[at] as Bkey;
          const pos = list.seekAfter(
            at === 0 ? -1 : (model[at - 1] as Bkey).inode,
            at === 0 ? 0 : (model[at - 1] as Bkey).offset,
          );
          assert.deepEqual(list.keyAt(pos), k);
          assert.equal(list.inodeAt(pos), k.inode);
          assert.equal(list.endAt(pos), k.offset);
          assert.equal(list.sizeAt(pos), k.size);
          assert.equal(list.dirtyAt(pos), k.dirty);
          assert.equal(list.ptrCountAt(pos), k.ptrs.length);
          assert.equal(list.ptrOffsetAt(pos), k.ptrs[0]?.offset ?? 0);
          assert.equal(list.ptrGenAt(pos), k.ptrs[0]?.gen ?? 0);
          assert.equal(list.ptrDevAt(pos), k.ptrs[0]?.dev ?? 0);
          list.splice(pos, 1, []);
          model.splice(at, 1);
          assert.deepEqual(list.toArray(), model);
          assert.deepEqual(list.check(), []);
        }
        // Replace what is left by itself in place (the commonest insert).
        if (model.length > 0) {
          list.splice(list.seekAfter(-1, 0), 1, [model[0] as Bkey]);
          assert.deepEqual(list.toArray(), model);
        }
      },
    ),
    { numRuns: 200 },
  );
});
