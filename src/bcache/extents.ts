// Extents: the pure logic of a leaf's sorted key array (extents.c).
//
// A leaf holds extents keyed by (inode, end offset); an extent covers
// [offset - size, offset) and its pointer gives where the first of those
// sectors lives on the cache device. Every array handled here is sorted by
// (inode, offset) and its extents do not overlap.
//
// Keys are values: once made, a key object is never changed (cutting creates
// a new key). Lookup results and dirty-key scans hand out references to keys
// in the tree (and the writeback code later passes one back as the expected
// key of a replace), the journal holds the same objects the leaves do, and an
// inserted key is shared by a leaf's view and its pending set, so a key object
// must keep meaning what it meant when it was made.

import { cloneKey, posCmp, type Bkey, type BkeyPtr } from '../format/bkey.ts';
import { KeyList } from './keylist.ts';

/**
 * A change of dirty sectors: `sectors` (signed) at [offset, offset + |sectors|)
 * of `inode`, in the cache where `ptr` (the key's pointer) points.
 */
export type DirtySink = (inode: number, offset: number, sectors: number, ptr: BkeyPtr | undefined) => void;

export function start(k: Bkey): number {
  return k.offset - k.size;
}

/** bch_cut_front(): the part of `k` from sector `where` on; front cuts move the pointers forward. */
export function cutFront(k: Bkey, where: number): Bkey {
  const s = k.offset - k.size;
  if (where <= s) return k;
  const len = where >= k.offset ? 0 : k.offset - where;
  const skip = k.size - len;
  const c = cloneKey(k);
  c.size = len;
  for (const p of c.ptrs) p.offset += skip;
  return c;
}

/** bch_cut_back(): the part of `k` before sector `where`. */
export function cutBack(k: Bkey, where: number): Bkey {
  if (where >= k.offset) return k;
  const s = k.offset - k.size;
  const c = cloneKey(k);
  c.offset = where;
  c.size = where > s ? where - s : 0;
  return c;
}

/** The part of `k` inside [from, to), or undefined if none. */
export function clip(k: Bkey, from: number, to: number): Bkey | undefined {
  const s = k.offset - k.size;
  if (k.offset <= from || s >= to) return undefined;
  return cutBack(cutFront(k, from), to);
}

/** Index of the first key whose position (inode, offset) is after (inode, offset). */
export function firstAfter(keys: readonly Bkey[], inode: number, offset: number): number {
  let lo = 0;
  let hi = keys.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    const k = keys[mid] as Bkey;
    if (k.inode < inode || (k.inode === inode && k.offset <= offset)) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

/** Index of the first key whose position is at or after (inode, offset). */
export function firstAtOrAfter(keys: readonly Bkey[], inode: number, offset: number): number {
  let lo = 0;
  let hi = keys.length;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    const k = keys[mid] as Bkey;
    if (k.inode < inode || (k.inode === inode && k.offset < offset)) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

function samePtr(a: BkeyPtr, b: BkeyPtr, shift: number): boolean {
  return a.dev === b.dev && a.gen === b.gen && a.offset === b.offset + shift;
}

/**
 * Does `x` (a key in the tree) still hold the data of `expected` at its place?
 * As bch_extent_insert_fixup's replace test: a sub-range of the expected key,
 * same dirty bit, pointer count and csum, pointers at the matching offset.
 */
export function matchesExpected(x: Bkey, expected: Bkey): boolean {
  const xs = x.offset - x.size;
  const es = expected.offset - expected.size;
  if (x.inode !== expected.inode || xs < es || x.offset > expected.offset) return false;
  if (x.dirty !== expected.dirty || x.ptrs.length !== expected.ptrs.length) return false;
  if (((x.spare >>> 24) & 3) !== ((expected.spare >>> 24) & 3)) return false;
  for (let i = 0; i < x.ptrs.length; i++) {
    const p = x.ptrs[i];
    const q = expected.ptrs[i];
    if (!p || !q || !samePtr(p, q, xs - es)) return false;
  }
  return true;
}

/** matchesExpected() for the key at position `p` of `keys`, read from the columns when it has one pointer. */
export function matchesExpectedAt(keys: KeyList, p: number, expected: Bkey): boolean {
  if (keys.ptrCountAt(p) !== 1) return matchesExpected(keys.keyAt(p), expected);
  const q = expected.ptrs[0];
  const xe = keys.endAt(p);
  const xs = xe - keys.sizeAt(p);
  const es = expected.offset - expected.size;
  if (q === undefined || expected.ptrs.length !== 1) return false;
  if (keys.inodeAt(p) !== expected.inode || xs < es || xe > expected.offset) return false;
  if (keys.dirtyAt(p) !== expected.dirty || ((keys.spareAt(p) >>> 24) & 3) !== ((expected.spare >>> 24) & 3))
    return false;
  return keys.ptrDevAt(p) === q.dev && keys.ptrGenAt(p) === q.gen && keys.ptrOffsetAt(p) === q.offset + (xs - es);
}

export interface InsertOptions {
  /** Compare-and-insert: insert only over the part still held by (sub-ranges of) this key. */
  replace?: Bkey | undefined;
  /** Keep a key without pointers in the array (a pending set: it must override older bsets). */
  keepEmpty?: boolean;
  /** Told about dirty sectors removed and added. */
  dirty?: DirtySink | undefined;
}

export interface InsertResult {
  /** The key as inserted (a replace may have trimmed it); undefined if nothing was. */
  inserted: Bkey | undefined;
  /** A replace found nothing of the expected key at the start of the range. */
  collision: boolean;
  /** How many u64s the array grew by (negative if it shrank). */
  u64sDelta: number;
}

/**
 * How much of `k`, from its start, is still held by the expected key (the
 * kernel's sectors_found): overlapping keys are checked in order and the first
 * gap or mismatch ends the run.
 */
export function replaceableSectors(keys: KeyList, k: Bkey, expected: Bkey): number {
  const s = k.offset - k.size;
  let found = 0;
  for (let p = keys.seekAfter(k.inode, s); p >= 0; p = keys.next(p)) {
    const xe = keys.endAt(p);
    const xs = xe - keys.sizeAt(p);
    if (keys.inodeAt(p) !== k.inode || xs >= k.offset) break;
    if (xs > s + found) break;
    if (!matchesExpectedAt(keys, p, expected)) break;
    found = xe - s;
  }
  return Math.min(found, k.size);
}

/**
 * bch_extent_insert_fixup() on a sorted list: `k` overwrites the range it
 * covers; keys overlapping it are removed, cut at the front (their pointers
 * advance), cut at the back, or split in two. A key without pointers is an
 * invalidation: it only removes, unless keepEmpty. `k` itself goes into the
 * list when it is inserted whole (keys are values, see the file comment).
 */
export function insertExtent(keys: KeyList, k: Bkey, options: InsertOptions = {}): InsertResult {
  if (k.size === 0) return { inserted: undefined, collision: false, u64sDelta: 0 };
  let ins = k;
  if (options.replace) {
    const found = replaceableSectors(keys, k, options.replace);
    if (found === 0) return { inserted: undefined, collision: true, u64sDelta: 0 };
    if (found < k.size) ins = cutBack(k, k.offset - k.size + found);
  }
  const s = ins.offset - ins.size;
  const e = ins.offset;
  const at = keys.seekAfter(ins.inode, s);
  let removed = 0;
  let head: Bkey | undefined;
  let tail: Bkey | undefined;
  const sink = options.dirty;
  let delta = 0;
  // The overlapping keys are read from the list's columns; only a key that
  // is cut (at most the first and the last) is built as an object.
  for (let p = at; p >= 0; p = keys.next(p)) {
    const xe = keys.endAt(p);
    const xs = xe - keys.sizeAt(p);
    if (keys.inodeAt(p) !== ins.inode || xs >= e) break;
    const nptrs = keys.ptrCountAt(p);
    delta -= 2 + nptrs;
    if (sink && keys.dirtyAt(p)) {
      const from = Math.max(xs, s);
      const ptr =
        nptrs > 0 ? { dev: keys.ptrDevAt(p), offset: keys.ptrOffsetAt(p), gen: keys.ptrGenAt(p), spare: 0 } : undefined;
      sink(ins.inode, from, -(Math.min(xe, e) - from), ptr);
    }
    // Only the first overlapping key can start before `s`, only the last end after `e`.
    if (xs < s || xe > e) {
      const x = keys.keyAt(p);
      if (xs < s) head = cutBack(x, s);
      if (xe > e) tail = cutFront(x, e);
    }
    removed++;
  }
  const keep = ins.ptrs.length > 0 || options.keepEmpty === true;
  const pieces: Bkey[] = [];
  if (head) pieces.push(head);
  if (keep) pieces.push(ins);
  if (tail) pieces.push(tail);
  for (const p of pieces) delta += 2 + p.ptrs.length;
  if (removed > 0 || pieces.length > 0) keys.splice(at, removed, pieces);
  if (ins.dirty && sink) sink(ins.inode, s, ins.size, ins.ptrs[0]);
  return { inserted: ins, collision: false, u64sDelta: delta };
}

/** True if the array is sorted by position and its extents do not overlap (size-0 keys aside). */
export function isSortedNonOverlapping(keys: readonly Bkey[]): boolean {
  let prev: Bkey | undefined;
  for (const k of keys) {
    if (k.size === 0) continue;
    if (prev) {
      if (posCmp(prev.inode, prev.offset, k.inode, k.offset) >= 0) return false;
      if (prev.inode === k.inode && k.offset - k.size < prev.offset) return false;
    }
    prev = k;
  }
  return true;
}

/**
 * One bset's keys as a sorted, non-overlapping array without empty keys. The
 * kernel writes bsets that way (with zero-size leftovers, which are dropped);
 * anything else is resolved as if the keys had been inserted in order.
 */
export function normalizeSet(keys: readonly Bkey[]): Bkey[] {
  const nonEmpty = keys.filter((k) => k.size > 0);
  if (isSortedNonOverlapping(nonEmpty)) return nonEmpty;
  const out = new KeyList();
  for (const k of nonEmpty) insertExtent(out, k, { keepEmpty: true });
  return out.toArray();
}

/**
 * The merge of a node's bsets with later-wins (the kernel's sort fixup):
 * `newer` overrides `older` wherever they overlap. Both are sorted and
 * non-overlapping; so is the result. Linear in their lengths.
 */
export function mergeNewer(older: readonly Bkey[], newer: readonly Bkey[]): Bkey[] {
  if (older.length === 0) return newer.slice();
  if (newer.length === 0) return older.slice();
  const out: Bkey[] = [];
  let oi = 0;
  let cur: Bkey | undefined = older[0];
  for (const n of newer) {
    const ns = n.offset - n.size;
    while (cur && (cur.inode < n.inode || (cur.inode === n.inode && cur.offset <= ns))) {
      out.push(cur);
      cur = older[++oi];
    }
    while (cur && cur.inode === n.inode && cur.offset - cur.size < n.offset) {
      if (cur.offset - cur.size < ns) out.push(cutBack(cur, ns));
      if (cur.offset > n.offset) {
        cur = cutFront(cur, n.offset);
        break;
      }
      cur = older[++oi];
    }
    out.push(n);
  }
  while (cur) {
    out.push(cur);
    cur = older[++oi];
  }
  return out;
}

/** Total dirty sectors per inode. */
export function dirtyByInode(keys: Iterable<Bkey>, into: Map<number, number> = new Map()): Map<number, number> {
  for (const k of keys) if (k.dirty && k.ptrs.length > 0) into.set(k.inode, (into.get(k.inode) ?? 0) + k.size);
  return into;
}
