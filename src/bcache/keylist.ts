// The keys of one btree node in memory: a sorted run of keys kept in small
// chunks, each chunk a pair of typed arrays (columns), not objects.
//
// Why chunks: a leaf holds thousands of keys (about 2,700 in a 64 KiB node,
// 10,000 in a 256 KiB one), and one flat run pays for every insert by moving
// half of them. With chunks of at most CHUNK_MAX keys an insert moves at most
// that many and finding a position is two binary searches (chunk, then key).
//
// Why columns: a key as a JS object (a Bkey, its ptrs array and a BkeyPtr)
// took about 225 bytes of heap, and every one lived as long as its leaf, in
// V8's old generation, where the collector traces and marks each of them (a
// 256 GiB cache's 500k keys were 107 MiB and a tenth of the write path's CPU
// in GC). Here a key is 32 bytes of typed arrays that the collector does not
// look into, and moving keys is a memmove (copyWithin) with no write barrier.
//
// Per key: four u32s (inode; size; the header's spare bits; a flags word with
// the first pointer's dev, gen and spare bit, the dirty bit and the pointer
// count) and two f64s (the end offset; the first pointer's offset). Offsets
// are exact in an f64 (they are below 2^53, see format/bkey.ts). A key with
// more than one pointer (flash-only or multi-device sets, never a plain
// single-cache writeback key) keeps the rest in the chunk's `more` array.
//
// Positions are plain numbers, chunk * POS_STRIDE + index, so that walking
// keys allocates nothing: `seekAfter` finds the first key after a position,
// `next` steps, the column readers (`inodeAt`, `endAt`, `sizeAt`, `dirtyAt`,
// `ptrCountAt`, `ptrOffsetAt`, `ptrGenAt`, `ptrDevAt`) read fields, and
// `keyAt` builds a Bkey (a fresh, short-lived object: the young generation
// makes those cheap; keys are values, extents.ts). A position is valid only
// until the list changes.
//
// The list does not know about extents: extents.ts keeps it sorted and
// non-overlapping (insertExtent is its only writer besides `from`).

import {
  checkKeyHeader,
  clonePtr,
  checkPtrFields,
  encodeBkey,
  encodeKeyHeader,
  encodePtr,
  posCmp,
  type Bkey,
  type BkeyPtr,
} from '../format/bkey.ts';
import type { EncodableKeys } from '../format/bset.ts';

/** A chunk that grows past this is split in two. */
const CHUNK_MAX = 128;
/** Chunks built from an array are filled this far, leaving room to insert. */
const CHUNK_FILL = 96;
/** Neighbouring chunks whose keys together fit in this are merged after removals. */
const CHUNK_MERGE = 64;
/** Room past chunkMax: an insert adds up to three keys (head, key, tail) before the chunk is split. */
const CHUNK_SLACK = 4;
/** The smallest chunk allocated. */
const MIN_CAP = 16;
/** Position encoding: chunk * POS_STRIDE + index (index < POS_STRIDE). */
const POS_STRIDE = 0x10000;

/** u32 slots per key and their order. */
const U = 4;
const U_INODE = 0;
const U_SIZE = 1;
const U_SPARE = 2;
const U_FLAGS = 3;
/** f64 slots per key: end offset, first pointer's offset. */
const F = 2;

// The flags word.
const FL_DEV_MASK = 0xfff;
const FL_GEN_SHIFT = 12;
const FL_PSPARE_SHIFT = 20;
const FL_DIRTY = 1 << 21;
const FL_NPTRS_SHIFT = 22;

/** Both columns of `cap` keys in one buffer: one allocation, one backing store for V8 to track. */
function columns(cap: number): [Float64Array, Uint32Array] {
  const buf = new ArrayBuffer(cap * (U * 4 + F * 8));
  return [new Float64Array(buf, 0, cap * F), new Uint32Array(buf, cap * F * 8, cap * U)];
}

class Chunk {
  n = 0;
  /** Slots allocated: a chunk starts small (a pending set holds a few keys) and grows up to its list's limit. */
  cap: number;
  u: Uint32Array;
  f: Float64Array;
  /** Pointers after the first, per slot, for keys that have them; allocated on the first such key. */
  more: (BkeyPtr[] | undefined)[] | undefined;

  constructor(cap: number) {
    this.cap = cap;
    [this.f, this.u] = columns(cap);
  }

  /** Make room for `n` keys (at most `max` slots). */
  reserve(n: number, max: number): void {
    if (n <= this.cap) return;
    const cap = Math.min(max, Math.max(n, this.cap * 4));
    const [f, u] = columns(cap);
    f.set(this.f.subarray(0, this.n * F));
    u.set(this.u.subarray(0, this.n * U));
    this.f = f;
    this.u = u;
    if (this.more !== undefined) for (let j = this.more.length; j < cap; j++) this.more.push(undefined);
    this.cap = cap;
  }

  /** The extra-pointer array, allocated on first use. */
  private moreSlots(): (BkeyPtr[] | undefined)[] {
    this.more ??= new Array<BkeyPtr[] | undefined>(this.cap).fill(undefined);
    return this.more;
  }

  put(i: number, k: Bkey): void {
    const b = i * U;
    const u = this.u;
    const ptrs = k.ptrs;
    const np = ptrs.length;
    const p = ptrs[0];
    u[b + U_INODE] = k.inode;
    u[b + U_SIZE] = k.size;
    u[b + U_SPARE] = k.spare;
    u[b + U_FLAGS] =
      (p === undefined
        ? 0
        : (p.dev & FL_DEV_MASK) | ((p.gen & 0xff) << FL_GEN_SHIFT) | ((p.spare & 1) << FL_PSPARE_SHIFT)) |
      (k.dirty ? FL_DIRTY : 0) |
      (np << FL_NPTRS_SHIFT);
    this.f[i * F] = k.offset;
    this.f[i * F + 1] = p === undefined ? 0 : p.offset;
    if (np > 1) {
      this.moreSlots()[i] = ptrs.slice(1).map(clonePtr);
    } else if (this.more !== undefined) {
      this.more[i] = undefined;
    }
  }

  get(i: number): Bkey {
    const b = i * U;
    const u = this.u;
    const flags = u[b + U_FLAGS] as number;
    const np = flags >>> FL_NPTRS_SHIFT;
    const ptrs: BkeyPtr[] = [];
    if (np > 0) {
      ptrs.push({
        dev: flags & FL_DEV_MASK,
        offset: this.f[i * F + 1] as number,
        gen: (flags >>> FL_GEN_SHIFT) & 0xff,
        spare: (flags >>> FL_PSPARE_SHIFT) & 1,
      });
      const rest = np > 1 ? this.more?.[i] : undefined;
      if (rest !== undefined) for (const q of rest) ptrs.push(clonePtr(q));
    }
    return {
      inode: u[b + U_INODE] as number,
      offset: this.f[i * F] as number,
      size: u[b + U_SIZE] as number,
      dirty: (flags & FL_DIRTY) !== 0,
      ptrs,
      spare: u[b + U_SPARE] as number,
    };
  }

  /** Move slots [from, to) to start at `dest` (within this chunk). */
  move(dest: number, from: number, to: number): void {
    this.u.copyWithin(dest * U, from * U, to * U);
    this.f.copyWithin(dest * F, from * F, to * F);
    this.more?.copyWithin(dest, from, to);
  }

  /** Copy slots [from, to) of `src` to this chunk from `dest` on. */
  copyFrom(src: Chunk, from: number, to: number, dest: number): void {
    if (to - from <= 4) {
      // A few slots: element copies are cheaper than the two views set() needs.
      const su = src.u;
      const sf = src.f;
      const du = this.u;
      const df = this.f;
      for (let j = from * U, d = dest * U; j < to * U; j++, d++) du[d] = su[j] as number;
      for (let j = from * F, d = dest * F; j < to * F; j++, d++) df[d] = sf[j] as number;
    } else {
      this.u.set(src.u.subarray(from * U, to * U), dest * U);
      this.f.set(src.f.subarray(from * F, to * F), dest * F);
    }
    if (src.more !== undefined) {
      const more = this.moreSlots();
      for (let j = from; j < to; j++) more[dest + j - from] = src.more[j];
    } else if (this.more !== undefined) {
      for (let j = from; j < to; j++) this.more[dest + j - from] = undefined;
    }
  }

  /** The inode of the key in slot i. */
  inodeOf(i: number): number {
    return this.u[i * U + U_INODE] as number;
  }

  /** The end (offset) of the key in slot i. */
  endOf(i: number): number {
    return this.f[i * F] as number;
  }

  /** Is the key in slot i at or before (inode, offset)? */
  atOrBefore(i: number, inode: number, offset: number): boolean {
    const ki = this.u[i * U + U_INODE] as number;
    return ki < inode || (ki === inode && (this.f[i * F] as number) <= offset);
  }
}

export class KeyList implements Iterable<Bkey>, EncodableKeys {
  private chunks: Chunk[] = [];
  private count = 0;
  /**
   * Each chunk's last key (inode, end), side by side, for seekAfter's search
   * over the chunks: without them each step of that search reads another
   * chunk's arrays, three or four pointers away and rarely in the CPU's
   * cache, and on the hit path that search was the largest JavaScript item
   * (docs/performance.md, "The leaf's chunk search over fences"). Built by the first search after a change; every
   * change drops them (`fences = 0`).
   */
  private fenceInode = new Uint32Array(0);
  private fenceEnd = new Float64Array(0);
  /** How many chunks the fences describe (0: none; rebuilt when they differ from chunks.length or were dropped). */
  private fences = 0;
  private readonly chunkMax: number;
  private readonly chunkFill: number;
  private readonly chunkMerge: number;

  /** `chunkMax` is for tests (tiny chunks exercise every split and merge). */
  constructor(chunkMax = CHUNK_MAX) {
    if (chunkMax < 2 || chunkMax >= POS_STRIDE - CHUNK_SLACK) throw new RangeError(`KeyList: chunk size ${chunkMax}`);
    this.chunkMax = chunkMax;
    this.chunkFill = chunkMax === CHUNK_MAX ? CHUNK_FILL : Math.max(1, Math.floor((chunkMax * 3) / 4));
    this.chunkMerge = chunkMax === CHUNK_MAX ? CHUNK_MERGE : Math.max(1, Math.floor(chunkMax / 2));
  }

  /** A list holding `keys` (sorted by position; not checked). */
  static from(keys: readonly Bkey[], chunkMax?: number): KeyList {
    const list = new KeyList(chunkMax);
    list.chunks = list.chunksOf(keys);
    list.count = keys.length;
    return list;
  }

  /** `keys` in new chunks filled to chunkFill. */
  private chunksOf(keys: readonly Bkey[]): Chunk[] {
    const out: Chunk[] = [];
    for (let at = 0; at < keys.length; at += this.chunkFill) {
      const end = Math.min(keys.length, at + this.chunkFill);
      const ch = this.newChunk(end - at);
      for (let j = at; j < end; j++) ch.put(j - at, keys[j] as Bkey);
      ch.n = end - at;
      out.push(ch);
    }
    return out;
  }

  /** The most slots a chunk has: chunkMax and room for one insert before the split. */
  private get maxCap(): number {
    return this.chunkMax + CHUNK_SLACK;
  }

  /** A chunk for `n` keys, with room to grow by a few before it must be reallocated. */
  private newChunk(n: number): Chunk {
    return new Chunk(Math.min(this.maxCap, Math.max(MIN_CAP, n + CHUNK_SLACK)));
  }

  /** A copy (the columns copied, no key built). */
  clone(): KeyList {
    return this.filter(() => true);
  }

  /** A new list of the keys `keep` accepts (it reads them through this list's column readers). */
  filter(keep: (list: KeyList, pos: number) => boolean): KeyList {
    const out = new KeyList(this.chunkMax);
    for (let c = 0; c < this.chunks.length; c++) {
      const ch = this.chunks[c] as Chunk;
      // Kept keys are copied a run at a time.
      let run = -1;
      for (let i = 0; i < ch.n; i++) {
        if (keep(this, c * POS_STRIDE + i)) {
          if (run < 0) run = i;
        } else if (run >= 0) {
          out.appendSlots(ch, run, i);
          run = -1;
        }
      }
      if (run >= 0) out.appendSlots(ch, run, ch.n);
    }
    return out;
  }

  /** The keys at indexes [from, to) (counted from the first key, not positions) as a new list. */
  slice(from: number, to: number): KeyList {
    const out = new KeyList(this.chunkMax);
    let base = 0;
    for (const ch of this.chunks) {
      const a = Math.max(from - base, 0);
      const b = Math.min(to - base, ch.n);
      if (a < b) out.appendSlots(ch, a, b);
      base += ch.n;
      if (base >= to) break;
    }
    return out;
  }

  /** Append slots [from, to) of `src` at the end, filling chunks to chunkFill (building a list in order). */
  private appendSlots(src: Chunk, from: number, to: number): void {
    this.fences = 0;
    let at = from;
    while (at < to) {
      let last = this.chunks[this.chunks.length - 1];
      if (last === undefined || last.n >= this.chunkFill) {
        // Sized for a full chunk: a list built in order is built to chunkFill.
        last = this.newChunk(this.chunkFill);
        this.chunks.push(last);
      }
      const take = Math.min(to - at, this.chunkFill - last.n);
      last.reserve(last.n + take, this.maxCap);
      last.copyFrom(src, at, at + take, last.n);
      last.n += take;
      this.count += take;
      at += take;
    }
  }

  /** Write the keys in their on-disk form from byte `pos` of `buf` (a bset's keys); returns the position after them. */
  encode(buf: Buffer, pos: number): number {
    let at = pos;
    for (const ch of this.chunks) {
      const u = ch.u;
      const f = ch.f;
      for (let i = 0; i < ch.n; i++) {
        const b = i * U;
        const flags = u[b + U_FLAGS] as number;
        const np = flags >>> FL_NPTRS_SHIFT;
        if (np > 1) {
          at = encodeBkey(ch.get(i), buf, at);
          continue;
        }
        const inode = u[b + U_INODE] as number;
        const offset = f[i * F] as number;
        const size = u[b + U_SIZE] as number;
        const spare = u[b + U_SPARE] as number;
        checkKeyHeader(inode, offset, size, np, spare);
        encodeKeyHeader(buf, at, inode, offset, size, (flags & FL_DIRTY) !== 0, np, spare);
        at += 16;
        if (np === 1) {
          const dev = flags & FL_DEV_MASK;
          const poff = f[i * F + 1] as number;
          const gen = (flags >>> FL_GEN_SHIFT) & 0xff;
          const pspare = (flags >>> FL_PSPARE_SHIFT) & 1;
          checkPtrFields(dev, poff, gen, pspare);
          encodePtr(buf, at, dev, poff, gen, pspare);
          at += 8;
        }
      }
    }
    return at;
  }

  get length(): number {
    return this.count;
  }

  toArray(): Bkey[] {
    const out: Bkey[] = new Array<Bkey>(this.count);
    let o = 0;
    for (const c of this.chunks) for (let i = 0; i < c.n; i++) out[o++] = c.get(i);
    return out;
  }

  first(): Bkey | undefined {
    const c = this.chunks[0];
    return c === undefined ? undefined : c.get(0);
  }

  last(): Bkey | undefined {
    const c = this.chunks[this.chunks.length - 1];
    return c === undefined ? undefined : c.get(c.n - 1);
  }

  forEach(fn: (k: Bkey) => void): void {
    for (const c of this.chunks) for (let i = 0; i < c.n; i++) fn(c.get(i));
  }

  *[Symbol.iterator](): Iterator<Bkey> {
    for (const c of this.chunks) for (let i = 0; i < c.n; i++) yield c.get(i);
  }

  /** The on-disk size of the keys in u64s (two a key, one a pointer). */
  u64s(): number {
    let n = 0;
    for (const c of this.chunks) {
      const u = c.u;
      for (let i = 0; i < c.n; i++) n += 2 + ((u[i * U + U_FLAGS] as number) >>> FL_NPTRS_SHIFT);
    }
    return n;
  }

  /** Position of the first key, or -1 if the list is empty. */
  start(): number {
    return this.count > 0 ? 0 : -1;
  }

  /** Position of the first key whose (inode, offset) is after (inode, offset), or -1 if none is. */
  seekAfter(inode: number, offset: number): number {
    const chunks = this.chunks;
    if (this.fences !== chunks.length) this.buildFences();
    const fi = this.fenceInode;
    const fe = this.fenceEnd;
    // The first chunk whose last key is after the position.
    let lo = 0;
    let hi = chunks.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      const ki = fi[mid] as number;
      if (ki < inode || (ki === inode && (fe[mid] as number) <= offset)) lo = mid + 1;
      else hi = mid;
    }
    if (lo === chunks.length) return -1;
    const c = chunks[lo] as Chunk;
    let a = 0;
    let b = c.n - 1;
    while (a < b) {
      const mid = (a + b) >>> 1;
      if (c.atOrBefore(mid, inode, offset)) a = mid + 1;
      else b = mid;
    }
    return lo * POS_STRIDE + a;
  }

  /** Each chunk's last key into the fences (seekAfter). */
  private buildFences(): void {
    const chunks = this.chunks;
    const n = chunks.length;
    if (this.fenceInode.length < n) {
      const cap = Math.max(8, n * 2);
      this.fenceInode = new Uint32Array(cap);
      this.fenceEnd = new Float64Array(cap);
    }
    for (let c = 0; c < n; c++) {
      const ch = chunks[c] as Chunk;
      this.fenceInode[c] = ch.inodeOf(ch.n - 1);
      this.fenceEnd[c] = ch.endOf(ch.n - 1);
    }
    this.fences = n;
  }

  /** The chunk holding position `pos` (throws past the end). */
  private chunkAt(pos: number): Chunk {
    const c = this.chunks[Math.floor(pos / POS_STRIDE)];
    if (c === undefined || pos < 0 || pos % POS_STRIDE >= c.n)
      throw new RangeError(`KeyList: no key at position ${pos}`);
    return c;
  }

  keyAt(pos: number): Bkey {
    return this.chunkAt(pos).get(pos % POS_STRIDE);
  }

  inodeAt(pos: number): number {
    return this.chunkAt(pos).u[(pos % POS_STRIDE) * U + U_INODE] as number;
  }

  /** KEY_OFFSET: the end sector. */
  endAt(pos: number): number {
    return this.chunkAt(pos).f[(pos % POS_STRIDE) * F] as number;
  }

  sizeAt(pos: number): number {
    return this.chunkAt(pos).u[(pos % POS_STRIDE) * U + U_SIZE] as number;
  }

  /** The header's spare bits (KEY_CSUM among them). */
  spareAt(pos: number): number {
    return this.chunkAt(pos).u[(pos % POS_STRIDE) * U + U_SPARE] as number;
  }

  dirtyAt(pos: number): boolean {
    return ((this.chunkAt(pos).u[(pos % POS_STRIDE) * U + U_FLAGS] as number) & FL_DIRTY) !== 0;
  }

  ptrCountAt(pos: number): number {
    return (this.chunkAt(pos).u[(pos % POS_STRIDE) * U + U_FLAGS] as number) >>> FL_NPTRS_SHIFT;
  }

  /** The first pointer's fields (0 when the key has none). */
  ptrOffsetAt(pos: number): number {
    return this.chunkAt(pos).f[(pos % POS_STRIDE) * F + 1] as number;
  }

  ptrGenAt(pos: number): number {
    return ((this.chunkAt(pos).u[(pos % POS_STRIDE) * U + U_FLAGS] as number) >>> FL_GEN_SHIFT) & 0xff;
  }

  ptrDevAt(pos: number): number {
    return (this.chunkAt(pos).u[(pos % POS_STRIDE) * U + U_FLAGS] as number) & FL_DEV_MASK;
  }

  /** The position after `pos`, or -1 at the end. */
  next(pos: number): number {
    const c = Math.floor(pos / POS_STRIDE);
    const i = pos % POS_STRIDE;
    const chunk = this.chunks[c];
    if (chunk !== undefined && i + 1 < chunk.n) return pos + 1;
    return c + 1 < this.chunks.length ? (c + 1) * POS_STRIDE : -1;
  }

  /**
   * Remove `remove` keys starting at `pos` (-1: the end, with nothing to
   * remove) and put `pieces` in their place. The caller keeps the order.
   */
  splice(pos: number, remove: number, pieces: readonly Bkey[]): void {
    this.fences = 0;
    const chunks = this.chunks;
    let c = pos < 0 ? chunks.length : Math.floor(pos / POS_STRIDE);
    let i = pos < 0 ? 0 : pos % POS_STRIDE;
    // A key overwritten by one just like it (a rewrite of the same blocks, the
    // commonest insert under random writes), or one cut in two around a new
    // one: store in place, no slots moved, no chunk reshaped.
    if (remove > 0 && remove <= pieces.length) {
      const chunk = chunks[c];
      if (chunk !== undefined && i + remove <= chunk.n) {
        for (let j = 0; j < remove; j++) chunk.put(i + j, pieces[j] as Bkey);
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
      const take = Math.min(left, chunk.n - ri);
      if (take === chunk.n) {
        chunks.splice(rc, 1);
      } else {
        chunk.move(ri, ri + take, chunk.n);
        chunk.n -= take;
        if (ri === chunk.n) {
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
        if (chunks.length === 0) chunks.push(this.newChunk(pieces.length));
        c = chunks.length - 1;
        i = (chunks[c] as Chunk).n;
      }
      const chunk = chunks[c] as Chunk;
      this.count += pieces.length;
      if (chunk.n + pieces.length <= this.maxCap) {
        chunk.reserve(chunk.n + pieces.length, this.maxCap);
        chunk.move(i + pieces.length, i, chunk.n);
        for (let j = 0; j < pieces.length; j++) chunk.put(i + j, pieces[j] as Bkey);
        chunk.n += pieces.length;
        if (chunk.n > this.chunkMax) this.split(c);
      } else {
        // More pieces than the slack holds (not an extent insert): rebuild this chunk's keys.
        const keys: Bkey[] = [];
        for (let j = 0; j < i; j++) keys.push(chunk.get(j));
        for (const k of pieces) keys.push(k);
        for (let j = i; j < chunk.n; j++) keys.push(chunk.get(j));
        chunks.splice(c, 1, ...this.chunksOf(keys));
      }
    }
    if (remove > 0) this.mergeAround(Math.min(c, chunks.length - 1));
  }

  /** Split chunk c into chunks filled to about chunkFill (two halves when it just overflowed). */
  private split(c: number): void {
    const chunk = this.chunks[c] as Chunk;
    const n = chunk.n;
    const parts = Math.ceil(n / this.chunkFill);
    const per = Math.ceil(n / parts);
    const rest: Chunk[] = [];
    for (let from = per; from < n; from += per) {
      const to = Math.min(n, from + per);
      // Full size: a chunk that split is where the inserts go.
      const ch = new Chunk(this.maxCap);
      ch.copyFrom(chunk, from, to, 0);
      ch.n = to - from;
      rest.push(ch);
    }
    chunk.n = per;
    if (chunk.more !== undefined) for (let j = per; j < n; j++) chunk.more[j] = undefined;
    this.chunks.splice(c + 1, 0, ...rest);
  }

  /** Merge chunk c with a neighbour when removals left them small, so the chunk count stays proportional. */
  private mergeAround(c: number): void {
    const chunks = this.chunks;
    for (let at = c; at >= c - 1; at--) {
      const a = chunks[at];
      const b = chunks[at + 1];
      if (a === undefined || b === undefined) continue;
      if (a.n + b.n <= this.chunkMerge) {
        a.reserve(a.n + b.n, this.maxCap);
        a.copyFrom(b, 0, b.n, a.n);
        a.n += b.n;
        chunks.splice(at + 1, 1);
        return;
      }
    }
  }

  /** Check the chunks' shape and order (tests). Returns the problems found. */
  check(): string[] {
    const problems: string[] = [];
    let n = 0;
    let prevInode = -1;
    let prevOffset = 0;
    for (const c of this.chunks) {
      if (c.n === 0) problems.push('empty chunk');
      if (c.n > this.chunkMax) problems.push(`chunk of ${c.n} keys`);
      for (let i = 0; i < c.n; i++) {
        const inode = c.u[i * U + U_INODE] as number;
        const offset = c.f[i * F] as number;
        if (n > 0 && posCmp(prevInode, prevOffset, inode, offset) > 0) problems.push('keys out of order');
        prevInode = inode;
        prevOffset = offset;
        n++;
      }
    }
    if (n !== this.count) problems.push(`length ${this.count} but ${n} keys`);
    return problems;
  }
}
