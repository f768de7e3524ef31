import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { cloneKey, makeKey, makePtr, type Bkey } from '../../src/format/bkey.ts';
import {
  clip,
  cutBack,
  cutFront,
  firstAfter,
  insertExtent,
  isSortedNonOverlapping,
  mergeNewer,
  normalizeSet,
  matchesExpected,
  matchesExpectedAt,
} from '../../src/bcache/extents.ts';
import { KeyList } from '../../src/bcache/keylist.ts';

// The model: per inode, per sector, what the index says about that sector.
// `id` is the insert that wrote it; a key of the array is a maximal run of
// sectors with the same id (inserts only ever shrink and split keys).
interface Cell {
  id: number;
  dev: number;
  /** Cache sector holding this sector's data. */
  at: number;
  gen: number;
  dirty: boolean;
}

const INODES = 3;
const SECTORS = 160;

class Model {
  cells: (Cell | undefined)[][] = Array.from({ length: INODES }, () => new Array<Cell | undefined>(SECTORS));
  dirty(): number {
    let n = 0;
    for (const row of this.cells) for (const c of row) if (c?.dirty) n++;
    return n;
  }
  write(k: Bkey, id: number): void {
    const row = this.cells[k.inode] as (Cell | undefined)[];
    const p = k.ptrs[0];
    for (let s = k.offset - k.size; s < k.offset; s++) {
      row[s] = p ? { id, dev: p.dev, at: p.offset + (s - (k.offset - k.size)), gen: p.gen, dirty: k.dirty } : undefined;
    }
  }
  /** Runs of equal id overlapping [from, to) of an inode, in order: the keys the kernel would see. */
  runs(inode: number, from: number, to: number): Array<{ start: number; end: number; cell: Cell }> {
    const row = this.cells[inode] as (Cell | undefined)[];
    const out: Array<{ start: number; end: number; cell: Cell }> = [];
    let s = from;
    // Extend back to the start of the run containing `from`.
    const first = row[from];
    if (first) while (s > 0 && row[s - 1]?.id === first.id) s--;
    while (s < to) {
      const c = row[s];
      if (!c) {
        s++;
        continue;
      }
      let e = s + 1;
      while (e < SECTORS && row[e]?.id === c.id) e++;
      out.push({ start: s, end: e, cell: row[s] as Cell });
      s = e;
    }
    return out;
  }
  /** The kernel's sectors_found for a replace of [ks, ke) expecting `exp`. */
  replaceable(k: Bkey, exp: Bkey): number {
    const ks = k.offset - k.size;
    const es = exp.offset - exp.size;
    const ep = exp.ptrs[0];
    let found = 0;
    for (const r of this.runs(k.inode, ks, k.offset)) {
      if (r.start < es || r.end > exp.offset) break;
      if (r.start > ks + found) break;
      if (r.cell.dirty !== exp.dirty || !ep) break;
      if (r.cell.dev !== ep.dev || r.cell.gen !== ep.gen || r.cell.at !== ep.offset + (r.start - es)) break;
      found = r.end - ks;
    }
    return Math.min(found, k.size);
  }
}

/** Expand an array of keys into cells (without ids) and check its invariants. */
function expand(keys: readonly Bkey[]): (Omit<Cell, 'id'> | undefined)[][] {
  assert.ok(isSortedNonOverlapping(keys), 'keys sorted and non-overlapping');
  const out = Array.from({ length: INODES }, () => new Array<Omit<Cell, 'id'> | undefined>(SECTORS).fill(undefined));
  for (const k of keys) {
    assert.ok(k.size > 0, 'no empty keys');
    const p = k.ptrs[0];
    if (!p) continue;
    for (let s = k.offset - k.size; s < k.offset; s++) {
      (out[k.inode] as unknown[])[s] = {
        dev: p.dev,
        at: p.offset + (s - (k.offset - k.size)),
        gen: p.gen,
        dirty: k.dirty,
      };
    }
  }
  return out;
}

function strip(m: Model): (Omit<Cell, 'id'> | undefined)[][] {
  return m.cells.map((row) =>
    Array.from(row, (c) => (c ? { dev: c.dev, at: c.at, gen: c.gen, dirty: c.dirty } : undefined)),
  );
}

const keyArb = fc
  .record({
    inode: fc.nat({ max: INODES - 1 }),
    start: fc.nat({ max: SECTORS - 1 }),
    size: fc.integer({ min: 1, max: 48 }),
    at: fc.nat({ max: 100000 }),
    gen: fc.nat({ max: 3 }),
    dirty: fc.boolean(),
    ptr: fc.integer({ min: 0, max: 5 }),
  })
  .map(({ inode, start, size, at, gen, dirty, ptr }) => {
    const end = Math.min(SECTORS, start + size);
    return ptr === 0
      ? makeKey(inode, end, end - start, false, [])
      : makeKey(inode, end, end - start, dirty, [makePtr(0, at, gen)]);
  });

type Op = { op: 'insert'; key: Bkey } | { op: 'replace'; key: Bkey; pick: number; subrange: boolean; corrupt: number };

const opArb: fc.Arbitrary<Op> = fc.oneof(
  { weight: 3, arbitrary: keyArb.map((key) => ({ op: 'insert' as const, key })) },
  {
    weight: 2,
    arbitrary: fc
      .tuple(keyArb, fc.nat(), fc.boolean(), fc.nat({ max: 5 }))
      .map(([key, pick, subrange, corrupt]) => ({ op: 'replace' as const, key, pick, subrange, corrupt })),
  },
);

test('insert and replace match a per-sector model, dirty deltas included', () => {
  fc.assert(
    fc.property(fc.array(opArb, { maxLength: 70 }), fc.integer({ min: 2, max: 6 }), (ops, chunk) => {
      // Tiny chunks, so that inserts and removals split and merge them all the time.
      const keys = new KeyList(chunk);
      const model = new Model();
      let dirtyFromDeltas = 0;
      const sink = (_inode: number, _offset: number, sectors: number): void => {
        dirtyFromDeltas += sectors;
      };
      let id = 0;
      for (const o of ops) {
        if (o.op === 'insert') {
          const before = keys.toArray();
          const snapshot = structuredClone(before);
          const r = insertExtent(keys, o.key, { dirty: sink });
          assert.equal(r.collision, false);
          model.write(o.key, ++id);
          // Keys handed out before were not changed in place (a later replace relies on it).
          assert.deepEqual(before, snapshot);
        } else {
          // Expect a key that is (or was) in the array, or a damaged copy of one.
          const existing = keys.toArray().filter((k) => k.ptrs.length > 0);
          const base = existing.length > 0 ? existing[o.pick % existing.length] : o.key;
          if (!base || base.ptrs.length === 0) continue;
          const exp = structuredClone(base);
          if (o.corrupt === 1) (exp.ptrs[0] as { gen: number }).gen ^= 1;
          if (o.corrupt === 2) exp.dirty = !exp.dirty;
          const bs = base.offset - base.size;
          // The key to insert: the expected range (or part of it), marked clean, like writeback does.
          const ks = o.subrange ? Math.min(base.offset - 1, bs + (o.pick % base.size)) : bs;
          const ins = clip({ ...structuredClone(base), dirty: false }, ks, base.offset) as Bkey;
          const want = model.replaceable(ins, exp);
          const r = insertExtent(keys, ins, { replace: exp, dirty: sink });
          if (want === 0) {
            assert.equal(r.collision, true);
            assert.equal(r.inserted, undefined);
          } else {
            assert.equal(r.collision, false);
            assert.equal(r.inserted?.size, want);
            model.write(r.inserted, ++id);
          }
        }
        assert.deepEqual(keys.check(), []);
        assert.deepEqual(expand(keys.toArray()), strip(model));
        assert.equal(dirtyFromDeltas, model.dirty());
        assert.ok(
          keys.toArray().every((k) => k.ptrs.length > 0),
          'invalidations leave holes, not keys',
        );
      }
    }),
    { numRuns: 300 },
  );
});

test('keepEmpty keeps invalidations as keys that override, and the array stays sorted', () => {
  fc.assert(
    fc.property(fc.array(keyArb, { maxLength: 60 }), fc.integer({ min: 2, max: 6 }), (inserts, chunk) => {
      const list = new KeyList(chunk);
      const model = new Model();
      let id = 0;
      for (const k of inserts) {
        insertExtent(list, k, { keepEmpty: true });
        model.write(k, ++id);
      }
      assert.deepEqual(list.check(), []);
      const pending = list.toArray();
      assert.ok(isSortedNonOverlapping(pending));
      // Every sector written by some insert is covered by exactly one key of the pending set.
      const covered = Array.from({ length: INODES }, () => new Array<boolean>(SECTORS).fill(false));
      for (const k of pending)
        for (let s = k.offset - k.size; s < k.offset; s++) (covered[k.inode] as boolean[])[s] = true;
      const written = Array.from({ length: INODES }, () => new Array<boolean>(SECTORS).fill(false));
      for (const k of inserts)
        for (let s = k.offset - k.size; s < k.offset; s++) (written[k.inode] as boolean[])[s] = true;
      assert.deepEqual(covered, written);
      assert.deepEqual(expand(pending), strip(model));
    }),
    { numRuns: 300 },
  );
});

test('mergeNewer is later-wins: the same as inserting the newer set key by key', () => {
  const setArb = fc.array(keyArb, { maxLength: 30 }).map((ks) => {
    const out = new KeyList();
    for (const k of ks) insertExtent(out, k, { keepEmpty: true });
    return out.toArray();
  });
  fc.assert(
    fc.property(fc.array(setArb, { minLength: 1, maxLength: 5 }), (sets) => {
      let merged: Bkey[] = [];
      const byInsert = new KeyList(3);
      for (const s of sets) {
        merged = mergeNewer(merged, s);
        for (const k of s) insertExtent(byInsert, k, { keepEmpty: true });
        assert.ok(isSortedNonOverlapping(merged));
      }
      assert.deepEqual(merged, byInsert.toArray());
    }),
    { numRuns: 300 },
  );
});

test('normalizeSet drops empty keys and resolves unsorted input in order', () => {
  fc.assert(
    fc.property(fc.array(keyArb, { maxLength: 30 }), (ks) => {
      const withEmpty = ks.flatMap((k) => [k, makeKey(k.inode, k.offset, 0, false, [])]);
      const norm = normalizeSet(withEmpty);
      const byInsert = new KeyList();
      for (const k of ks) insertExtent(byInsert, k, { keepEmpty: true });
      assert.deepEqual(norm, byInsert.toArray());
    }),
    { numRuns: 200 },
  );
});

test('cuts: a front cut moves the pointer, a back cut keeps it, neither changes the original', () => {
  const k = makeKey(1, 100, 40, true, [makePtr(0, 5000, 7)]);
  const f = cutFront(k, 70);
  assert.deepEqual([f.offset, f.size, f.ptrs[0]?.offset, f.ptrs[0]?.gen, f.dirty], [100, 30, 5010, 7, true]);
  const b = cutBack(k, 70);
  assert.deepEqual([b.offset, b.size, b.ptrs[0]?.offset], [70, 10, 5000]);
  assert.deepEqual([k.offset, k.size, k.ptrs[0]?.offset], [100, 40, 5000]);
  assert.equal(cutFront(k, 50), k, 'a cut before the start is no cut');
  assert.equal(cutBack(k, 100), k);
  assert.equal(cutFront(k, 200).size, 0);
  assert.equal(cutBack(k, 10).size, 0);
  assert.equal(clip(k, 100, 120), undefined);
  assert.deepEqual([clip(k, 65, 90)?.offset, clip(k, 65, 90)?.size, clip(k, 65, 90)?.ptrs[0]?.offset], [90, 25, 5005]);
});

test('a key inside another splits it in two with the right pointers', () => {
  const list = KeyList.from([makeKey(0, 64, 64, true, [makePtr(0, 1024, 1)])]);
  const deltas: number[] = [];
  insertExtent(list, makeKey(0, 40, 8, false, [makePtr(0, 9000, 2)]), { dirty: (_i, _o, s) => deltas.push(s) });
  const keys = list.toArray();
  assert.deepEqual(
    keys.map((k) => [k.offset, k.size, k.ptrs[0]?.offset, k.dirty]),
    [
      [32, 32, 1024, true],
      [40, 8, 9000, false],
      [64, 24, 1064, true],
    ],
  );
  assert.deepEqual(deltas, [-8]);
  assert.equal(firstAfter(keys, 0, 32), 1);
  assert.equal(firstAfter(keys, 0, 31), 0);
  assert.equal(firstAfter(keys, 1, 0), 3);
  assert.deepEqual(list.keyAt(list.seekAfter(0, 32)), keys[1]);
  assert.deepEqual(list.keyAt(list.seekAfter(0, 31)), keys[0]);
  assert.equal(list.seekAfter(1, 0), -1);
});

// The replace test read from the list's columns answers as the one on key
// objects, whatever differs: position, size, dirty bit, csum bits, pointer
// count, device, gen or offset (a sub-range's pointer must be shifted).
test('matchesExpectedAt agrees with matchesExpected on every field', () => {
  const ptr = fc.record({
    dev: fc.integer({ min: 0, max: 2 }),
    gen: fc.integer({ min: 0, max: 2 }),
    offset: fc.integer({ min: 0, max: 40 }),
  });
  const keyArb = fc.record({
    inode: fc.integer({ min: 0, max: 1 }),
    offset: fc.integer({ min: 8, max: 40 }),
    size: fc.integer({ min: 1, max: 8 }),
    dirty: fc.boolean(),
    csum: fc.integer({ min: 0, max: 1 }),
    ptrs: fc.array(ptr, { minLength: 0, maxLength: 2 }),
  });
  const mk = (k: {
    inode: number;
    offset: number;
    size: number;
    dirty: boolean;
    csum: number;
    ptrs: { dev: number; gen: number; offset: number }[];
  }): Bkey => {
    const key = makeKey(
      k.inode,
      k.offset,
      k.size,
      k.dirty,
      k.ptrs.map((p) => makePtr(p.dev, p.offset, p.gen)),
    );
    key.spare = (key.spare | (k.csum << 24)) >>> 0;
    return key;
  };
  fc.assert(
    fc.property(keyArb, keyArb, fc.integer({ min: 0, max: 4 }), (a, b, cut) => {
      const x = mk(a);
      const e = mk(b);
      // Often make x a sub-range of e with its pointers shifted, so matches happen.
      const sub = cutFront(e, e.offset - e.size + Math.min(cut, e.size - 1));
      const variants = [x, sub];
      for (const change of [
        (k: Bkey) => (k.dirty = !k.dirty),
        (k: Bkey) => (k.spare = (k.spare ^ (1 << 24)) >>> 0),
        (k: Bkey) => {
          k.ptrs.forEach((p) => (p.gen = (p.gen + 1) & 0xff));
        },
        (k: Bkey) => {
          k.ptrs.forEach((p) => (p.dev += 1));
        },
        (k: Bkey) => {
          k.ptrs.forEach((p) => (p.offset += 1));
        },
      ]) {
        const v = cloneKey(sub);
        change(v);
        variants.push(v);
      }
      for (const k of variants) {
        const list = KeyList.from([k]);
        assert.equal(matchesExpectedAt(list, list.start(), e), matchesExpected(k, e));
      }
    }),
    { numRuns: 2000 },
  );
});
