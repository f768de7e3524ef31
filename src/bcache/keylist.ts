// The keys of one btree node in memory: a sorted run of keys kept in small
// chunks instead of one array.
//
// Why chunks: a leaf holds thousands of keys (about 2,700 in a 64 KiB node,
// 10,000 in a 256 KiB one), and a plain array pays for every insert by
// moving half of them. In V8 that move is not a memmove: an array that lives
// in the old generation records each moved slot for the garbage collector,
// about 2 ns a slot, so one 4 KiB write cost ~5 µs in the splice alone (the
// largest single item in the writeback profile, docs/performance.md). With
// chunks of at most CHUNK_MAX keys an insert moves at most that many slots
// and finding a position is two binary searches (chunk, then key).
//
// Positions are plain numbers, chunk * POS_STRIDE + index, so that walking
// keys on the hit path allocates nothing: `seekAfter` finds the first key
// after a position, `next` steps, `keyAt` reads. A position is valid only
// until the list changes.
//
// The list does not know about extents: extents.ts keeps it sorted and
// non-overlapping (insertExtent is its only writer besides `from`).

import { posCmp, type Bkey } from '../format/bkey.ts';

/** A chunk that grows past this is split in two. */
const CHUNK_MAX = 128;
/** Chunks built from an array are filled this far, leaving room to insert. */
const CHUNK_FILL = 96;
/** Neighbouring chunks whose keys together fit in this are merged after removals. */
const CHUNK_MERGE = 64;
/** Position encoding: chunk * POS_STRIDE + index (index < POS_STRIDE). */
const POS_STRIDE = 0x10000;

export class KeyList implements Iterable<Bkey> {
  private chunks: Bkey[][] = [];
  private count = 0;
  private readonly chunkMax: number;
  private readonly chunkFill: number;
  private readonly chunkMerge: number;

  /** `chunkMax` is for tests (tiny chunks exercise every split and merge). */
  constructor(chunkMax = CHUNK_MAX) {
    if (chunkMax < 2 || chunkMax >= POS_STRIDE) throw new RangeError(`KeyList: chunk size ${chunkMax}`);
    this.chunkMax = chunkMax;
    this.chunkFill = chunkMax === CHUNK_MAX ? CHUNK_FILL : Math.max(1, Math.floor((chunkMax * 3) / 4));
    this.chunkMerge = chunkMax === CHUNK_MAX ? CHUNK_MERGE : Math.max(1, Math.floor(chunkMax / 2));
  }

  /** A list holding `keys` (sorted by position; not checked). */
  static from(keys: readonly Bkey[], chunkMax?: number): KeyList {
    const list = new KeyList(chunkMax);
    for (let i = 0; i < keys.length; i += list.chunkFill) list.chunks.push(keys.slice(i, i + list.chunkFill));
    list.count = keys.length;
    return list;
  }

  get length(): number {
    return this.count;
  }

  toArray(): Bkey[] {
    if (this.chunks.length === 1) return (this.chunks[0] as Bkey[]).slice();
    const out: Bkey[] = [];
    for (const c of this.chunks) for (const k of c) out.push(k);
    return out;
  }

  first(): Bkey | undefined {
    return this.chunks[0]?.[0];
  }

  last(): Bkey | undefined {
    const c = this.chunks[this.chunks.length - 1];
    return c?.[c.length - 1];
  }

  forEach(fn: (k: Bkey) => void): void {
    for (const c of this.chunks) for (const k of c) fn(k);
  }

  *[Symbol.iterator](): Iterator<Bkey> {
    for (const c of this.chunks) yield* c;
  }

  /** Position of the first key whose (inode, offset) is after (inode, offset), or -1 if none is. */
  seekAfter(inode: number, offset: number): number {
    const chunks = this.chunks;
    // The first chunk whose last key is after the position.
    let lo = 0;
    let hi = chunks.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      const c = chunks[mid] as Bkey[];
      const k = c[c.length - 1] as Bkey;
      if (k.inode < inode || (k.inode === inode && k.offset <= offset)) lo = mid + 1;
      else hi = mid;
    }
    if (lo === chunks.length) return -1;
    const c = chunks[lo] as Bkey[];
    let a = 0;
    let b = c.length - 1;
    while (a < b) {
      const mid = (a + b) >>> 1;
      const k = c[mid] as Bkey;
      if (k.inode < inode || (k.inode === inode && k.offset <= offset)) a = mid + 1;
      else b = mid;
    }
    return lo * POS_STRIDE + a;
  }

  keyAt(pos: number): Bkey {
    const k = this.chunks[Math.floor(pos / POS_STRIDE)]?.[pos % POS_STRIDE];
    if (k === undefined) throw new RangeError(`KeyList: no key at position ${pos}`);
    return k;
  }

  /** The position after `pos`, or -1 at the end. */
  next(pos: number): number {
    const c = Math.floor(pos / POS_STRIDE);
    const i = pos % POS_STRIDE;
    const chunk = this.chunks[c];
    if (chunk !== undefined && i + 1 < chunk.length) return pos + 1;
    return c + 1 < this.chunks.length ? (c + 1) * POS_STRIDE : -1;
  }

  /**
   * Remove `remove` keys starting at `pos` (-1: the end, with nothing to
   * remove) and put `pieces` in their place. The caller keeps the order.
   */
  splice(pos: number, remove: number, pieces: readonly Bkey[]): void {
    const chunks = this.chunks;
    let c = pos < 0 ? chunks.length : Math.floor(pos / POS_STRIDE);
    let i = pos < 0 ? 0 : pos % POS_STRIDE;
    // A key overwritten by one just like it (a rewrite of the same blocks, the
    // commonest insert under random writes), or one cut in two around a new
    // one: store in place, no slots moved, no chunk reshaped.
    if (remove > 0 && remove <= pieces.length) {
      const chunk = chunks[c];
      if (chunk !== undefined && i + remove <= chunk.length) {
        for (let j = 0; j < remove; j++) chunk[i + j] = pieces[j] as Bkey;
        if (remove === pieces.length) return;
        this.splice(pos + remove, 0, pieces.slice(remove));
        return;
      }
    }
    // Removal may run across chunks; the insertion point stays (c, i).
    let left = remove;
    let rc = c;
    let ri = i;
    while (left > 0) {
      const chunk = chunks[rc];
      if (chunk === undefined) throw new RangeError(`KeyList: removing ${remove} keys past the end`);
      const take = Math.min(left, chunk.length - ri);
      if (take === chunk.length) {
        chunks.splice(rc, 1);
      } else {
        chunk.splice(ri, take);
        if (ri === chunk.length) {
          rc++;
          ri = 0;
        }
      }
      left -= take;
    }
    this.count -= remove;
    if (pieces.length > 0) {
      if (c >= chunks.length) {
        // At the end: append to the last chunk (or start one).
        if (chunks.length === 0) chunks.push([]);
        c = chunks.length - 1;
        i = (chunks[c] as Bkey[]).length;
      }
      const chunk = chunks[c] as Bkey[];
      if (pieces.length === 1) chunk.splice(i, 0, pieces[0] as Bkey);
      else chunk.splice(i, 0, ...pieces);
      this.count += pieces.length;
      if (chunk.length > this.chunkMax) {
        // Split into chunks filled to about chunkFill (two halves when the chunk just overflowed).
        const parts = Math.ceil(chunk.length / this.chunkFill);
        const per = Math.ceil(chunk.length / parts);
        const rest: Bkey[][] = [];
        for (let from = per; from < chunk.length; from += per) rest.push(chunk.slice(from, from + per));
        chunk.length = per;
        chunks.splice(c + 1, 0, ...rest);
      }
    }
    if (remove > 0) this.mergeAround(Math.min(c, chunks.length - 1));
  }

  /** Merge chunk c with a neighbour when removals left them small, so the chunk count stays proportional. */
  private mergeAround(c: number): void {
    const chunks = this.chunks;
    for (let at = c; at >= c - 1; at--) {
      const a = chunks[at];
      const b = chunks[at + 1];
      if (a === undefined || b === undefined) continue;
      if (a.length + b.length <= this.chunkMerge) {
        for (const k of b) a.push(k);
        chunks.splice(at + 1, 1);
        return;
      }
    }
  }

  /** Check the chunks' shape and order (tests). Returns the problems found. */
  check(): string[] {
    const problems: string[] = [];
    let n = 0;
    let prev: Bkey | undefined;
    for (const c of this.chunks) {
      if (c.length === 0) problems.push('empty chunk');
      if (c.length > this.chunkMax) problems.push(`chunk of ${c.length} keys`);
      for (const k of c) {
        if (prev && posCmp(prev.inode, prev.offset, k.inode, k.offset) > 0) problems.push('keys out of order');
        prev = k;
        n++;
      }
    }
    if (n !== this.count) problems.push(`length ${this.count} but ${n} keys`);
    return problems;
  }
}
