// struct bkey: bcache's btree key, the engine's hottest data structure.
//
// On disk a key is two little-endian u64s, `high` and `low`, then KEY_PTRS(k)
// pointer u64s (bcache_ondisk.h):
//
//   high  63 legacy marker (always set by the kernel's KEY() macro)
//         60-62 KEY_PTRS   58-59 HEADER_SIZE (unused)   56-57 KEY_CSUM (unused)
//         55 KEY_PINNED (unused)   37-54 unused   36 KEY_DIRTY
//         20-35 KEY_SIZE (sectors)   0-19 KEY_INODE
//   low   KEY_OFFSET: the extent's END sector (exclusive), 63 bits in practice
//   ptr   63 unused   51-62 PTR_DEV   8-50 PTR_OFFSET (cache sector)   0-7 PTR_GEN
//
// An extent covers [offset - size, offset) of backing device `inode` (the
// uuid slot; the sectors include the backing device's data_offset). Keys sort
// by (inode, offset).
//
// In memory a key is a small plain object of numbers. Two decisions:
//
// * Offsets are JS numbers. Real offsets are sectors of a backing device, far
//   below 2^53 (4 EiB); the one larger value bcache uses is MAX_KEY_OFFSET
//   (2^63 - 1, the offset of MAX_KEY, the root node's key). It decodes to the
//   sentinel MAX_KEY_OFFSET = 2^53, which is still an exact integer, compares
//   greater than every real offset, and encodes back to 2^63 - 1. Any other
//   offset >= 2^53 is not something bcache writes and is refused with a
//   FormatError rather than silently rounded.
// * Bits without a named field are kept (`spare` on the key and on each
//   pointer) so that decode -> encode reproduces the kernel's bytes exactly.
//   The kernel does set some of them: bit 63 of `high` on every key, and bit
//   63 of a pointer in the random cache-miss placeholder keys whose pointer
//   has PTR_DEV = PTR_CHECK_DEV (bch_btree_insert_check_key fills the pointer
//   with random bytes).

import { MAX_CACHES_PER_SET } from './constants.ts';
import { FormatError } from './errors.ts';

export interface BkeyPtr {
  /** PTR_DEV: cache device index in the set (always 0 today), or PTR_CHECK_DEV. */
  dev: number;
  /** PTR_OFFSET: sector on the cache device where the data starts. */
  offset: number;
  /** PTR_GEN: the bucket generation this pointer is valid for. */
  gen: number;
  /** Bit 63 of the pointer, unused; 0 except in random PTR_CHECK_DEV placeholders. */
  spare: number;
}

export interface Bkey {
  /** KEY_INODE: uuid slot of the backing device or flash volume (20 bits). */
  inode: number;
  /** KEY_OFFSET: end sector of the extent (exclusive); MAX_KEY_OFFSET for MAX_KEY. */
  offset: number;
  /** KEY_SIZE in sectors (16 bits). For a btree node pointer: the node's size. */
  size: number;
  /** KEY_DIRTY: the cached data is newer than the backing device (writeback). */
  dirty: boolean;
  ptrs: BkeyPtr[];
  /**
   * The upper 32 bits of `high` with KEY_PTRS, KEY_DIRTY and KEY_SIZE cleared:
   * the legacy bit 63, HEADER_SIZE, KEY_CSUM, KEY_PINNED and unused bits.
   * SPARE_DEFAULT (bit 63 only) on every key the kernel writes.
   */
  spare: number;
}

export const MAX_KEY_INODE = 0xfffff;
/** Stands for the kernel's MAX_KEY_OFFSET (2^63 - 1); see the file comment. */
export const MAX_KEY_OFFSET = 2 ** 53;
export const KEY_SIZE_MAX = 0xffff;
export const KEY_PTRS_MAX = 7;
/** A BKEY_PADDED slot (jset's uuid_bucket and btree_root) holds 8 u64s: a key with up to 6 pointers. */
export const BKEY_PAD = 8;
export const PTR_DEV_MAX = 0xfff;
/** The pointer device of a cache-miss placeholder key (never a real device). */
export const PTR_CHECK_DEV = 0xfff;
export const PTR_OFFSET_MAX = 2 ** 43 - 1;
export const SPARE_DEFAULT = 0x80000000;

/** The bits of high's upper word that `spare` holds. */
const SPARE_MASK = 0x8fffffe0;
const TWO32 = 2 ** 32;
const TWO24 = 2 ** 24;

export function makePtr(dev: number, offset: number, gen: number): BkeyPtr {
  return { dev, offset, gen, spare: 0 };
}

export function makeKey(inode: number, offset: number, size: number, dirty = false, ptrs: BkeyPtr[] = []): Bkey {
  return { inode, offset, size, dirty, ptrs, spare: SPARE_DEFAULT };
}

/** ZERO_KEY and MAX_KEY (bcache_ondisk.h). Frozen: copy before changing. */
export const ZERO_KEY: Readonly<Bkey> = Object.freeze(
  makeKey(0, 0, 0, false, Object.freeze([]) as unknown as BkeyPtr[]),
);
export const MAX_KEY: Readonly<Bkey> = Object.freeze(
  makeKey(MAX_KEY_INODE, MAX_KEY_OFFSET, 0, false, Object.freeze([]) as unknown as BkeyPtr[]),
);

/** KEY_CSUM (2 bits; no kernel writes it today). */
export function keyCsum(k: Bkey): number {
  return (k.spare >>> 24) & 3;
}

/** bkey_u64s(): the key's length in u64s. */
export function bkeyU64s(k: Bkey): number {
  return 2 + k.ptrs.length;
}

export function bkeyBytes(k: Bkey): number {
  return 8 * (2 + k.ptrs.length);
}

/** KEY_START(): first sector of the extent. */
export function keyStart(k: Bkey): number {
  return k.offset - k.size;
}

/** bkey_cmp(): negative, zero or positive as a sorts before, with or after b by (inode, offset). */
export function bkeyCmp(a: Bkey, b: Bkey): number {
  return a.inode !== b.inode ? a.inode - b.inode : a.offset - b.offset;
}

/** Compare two positions (inode, offset) the way bkey_cmp does. */
export function posCmp(inodeA: number, offsetA: number, inodeB: number, offsetB: number): number {
  return inodeA !== inodeB ? inodeA - inodeB : offsetA - offsetB;
}

/** A deep copy (keys are mutable and often trimmed in place). */
export function cloneKey(k: Bkey): Bkey {
  return {
    inode: k.inode,
    offset: k.offset,
    size: k.size,
    dirty: k.dirty,
    ptrs: k.ptrs.map(clonePtr),
    spare: k.spare,
  };
}

export function clonePtr(p: BkeyPtr): BkeyPtr {
  return { dev: p.dev, offset: p.offset, gen: p.gen, spare: p.spare };
}

/** Same key bit for bit. */
export function bkeyEqual(a: Bkey, b: Bkey): boolean {
  if (
    a.inode !== b.inode ||
    a.offset !== b.offset ||
    a.size !== b.size ||
    a.dirty !== b.dirty ||
    a.spare !== b.spare ||
    a.ptrs.length !== b.ptrs.length
  ) {
    return false;
  }
  for (let i = 0; i < a.ptrs.length; i++) {
    const p = a.ptrs[i];
    const q = b.ptrs[i];
    if (!p || !q || p.dev !== q.dev || p.offset !== q.offset || p.gen !== q.gen || p.spare !== q.spare) return false;
  }
  return true;
}

/**
 * Number of u64s of the key at byte `pos`, read from its KEY_PTRS, without
 * decoding it (for walking a bset).
 */
export function bkeyU64sAt(buf: Buffer, pos: number): number {
  return 2 + ((buf.readUInt32LE(pos + 4) >>> 28) & 7);
}

/**
 * Decode the key at byte `pos` of `buf`. The caller makes sure the whole key
 * (bkeyU64sAt) lies inside the structure it belongs to; `structure` names
 * that structure in errors.
 */
export function decodeBkey(buf: Buffer, pos: number, structure = 'bkey'): Bkey {
  const hiLo = buf.readUInt32LE(pos);
  const hiHi = buf.readUInt32LE(pos + 4);
  const lowLo = buf.readUInt32LE(pos + 8);
  const lowHi = buf.readUInt32LE(pos + 12);
  let offset: number;
  if (lowHi < 0x200000) {
    offset = lowHi * TWO32 + lowLo;
  } else if (lowHi === 0x7fffffff && lowLo === 0xffffffff) {
    offset = MAX_KEY_OFFSET;
  } else {
    throw new FormatError(
      structure,
      'offset',
      `key offset 0x${lowHi.toString(16)}${lowLo.toString(16).padStart(8, '0')} is beyond 2^53 and is not MAX_KEY_OFFSET; bcache never writes such a key, so the metadata is corrupt`,
    );
  }
  const nptrs = (hiHi >>> 28) & 7;
  const ptrs: BkeyPtr[] = new Array<BkeyPtr>(nptrs);
  for (let i = 0; i < nptrs; i++) {
    const p = pos + 16 + 8 * i;
    const lo = buf.readUInt32LE(p);
    const hi = buf.readUInt32LE(p + 4);
    ptrs[i] = {
      dev: (hi >>> 19) & 0xfff,
      offset: (hi & 0x7ffff) * TWO24 + (lo >>> 8),
      gen: lo & 0xff,
      spare: hi >>> 31,
    };
  }
  return {
    inode: hiLo & 0xfffff,
    offset,
    size: ((hiLo >>> 20) | ((hiHi & 0xf) << 12)) >>> 0,
    dirty: (hiHi & 0x10) !== 0,
    ptrs,
    spare: (hiHi & SPARE_MASK) >>> 0,
  };
}

function badField(field: string, value: number, what: string): FormatError {
  return new FormatError('bkey', field, `${value} is not ${what}`);
}

/** Throw a FormatError if the key's fields do not fit their bit fields. */
export function checkKeyFields(k: Bkey): void {
  checkKeyHeader(k.inode, k.offset, k.size, k.ptrs.length, k.spare);
  for (const p of k.ptrs) checkPtrFields(p.dev, p.offset, p.gen, p.spare);
}

/** checkKeyFields() for a key's own fields given one by one (a key kept as columns, bcache/keylist.ts). */
export function checkKeyHeader(inode: number, offset: number, size: number, nptrs: number, spare: number): void {
  if (!Number.isInteger(inode) || inode < 0 || inode > MAX_KEY_INODE) {
    throw badField('inode', inode, 'a 20-bit inode');
  }
  if (!Number.isInteger(offset) || offset < 0 || offset > MAX_KEY_OFFSET) {
    throw badField('offset', offset, 'an offset below 2^53 (or MAX_KEY_OFFSET)');
  }
  if (!Number.isInteger(size) || size < 0 || size > KEY_SIZE_MAX) {
    throw badField('size', size, 'a 16-bit size');
  }
  if (nptrs > KEY_PTRS_MAX) throw badField('ptrs', nptrs, `at most ${KEY_PTRS_MAX} pointers`);
  if (!Number.isInteger(spare) || spare < 0 || spare > 0xffffffff || (spare & ~SPARE_MASK) !== 0) {
    throw badField('spare', spare, 'made of the unnamed bits of the key header only');
  }
}

/** checkKeyFields() for one pointer's fields. */
export function checkPtrFields(dev: number, offset: number, gen: number, spare: number): void {
  if (!Number.isInteger(dev) || dev < 0 || dev > PTR_DEV_MAX) throw badField('ptr.dev', dev, 'a 12-bit device');
  if (!Number.isInteger(offset) || offset < 0 || offset > PTR_OFFSET_MAX) {
    throw badField('ptr.offset', offset, 'a 43-bit sector');
  }
  if (!Number.isInteger(gen) || gen < 0 || gen > 0xff) throw badField('ptr.gen', gen, 'an 8-bit generation');
  if (spare !== 0 && spare !== 1) throw badField('ptr.spare', spare, 'a single bit');
}

/** Write the key at byte `pos` of `buf`; returns the position after it. */
export function encodeBkey(k: Bkey, buf: Buffer, pos: number): number {
  checkKeyFields(k);
  const n = k.ptrs.length;
  encodeKeyHeader(buf, pos, k.inode, k.offset, k.size, k.dirty, n, k.spare);
  for (let i = 0; i < n; i++) {
    const p = k.ptrs[i];
    if (p) encodePtr(buf, pos + 16 + 8 * i, p.dev, p.offset, p.gen, p.spare);
  }
  return pos + 16 + 8 * n;
}

/** The two header u64s of a key (fields already checked) at byte `pos`. */
export function encodeKeyHeader(
  buf: Buffer,
  pos: number,
  inode: number,
  offset: number,
  size: number,
  dirty: boolean,
  nptrs: number,
  spare: number,
): void {
  buf.writeUInt32LE((inode | ((size & 0xfff) << 20)) >>> 0, pos);
  buf.writeUInt32LE((spare | (nptrs << 28) | (dirty ? 0x10 : 0) | (size >>> 12)) >>> 0, pos + 4);
  if (offset === MAX_KEY_OFFSET) {
    buf.writeUInt32LE(0xffffffff, pos + 8);
    buf.writeUInt32LE(0x7fffffff, pos + 12);
  } else {
    buf.writeUInt32LE(offset % TWO32, pos + 8);
    buf.writeUInt32LE(Math.floor(offset / TWO32), pos + 12);
  }
}

/** One pointer u64 (fields already checked) at byte `at`. */
export function encodePtr(buf: Buffer, at: number, dev: number, offset: number, gen: number, spare: number): void {
  buf.writeUInt32LE((((offset % TWO24) << 8) | gen) >>> 0, at);
  buf.writeUInt32LE((Math.floor(offset / TWO24) | (dev << 19) | (spare << 31)) >>> 0, at + 4);
}

/** The raw 64-bit value of a pointer: the seed of a btree node's bset checksums. */
export function ptrValue(p: BkeyPtr): bigint {
  return (BigInt(p.spare) << 63n) | (BigInt(p.dev) << 51n) | (BigInt(p.offset) << 8n) | BigInt(p.gen);
}

/** Decode the keys filling bytes [start, end) of `buf` (a bset's or jset's key area). */
export function decodeKeys(buf: Buffer, start: number, end: number, structure: string): Bkey[] {
  const keys: Bkey[] = [];
  let pos = start;
  while (pos < end) {
    if (pos + 16 > end) {
      throw new FormatError(structure, 'keys', `a key header at byte ${pos - start} of the key area runs past its end`);
    }
    const len = 8 * bkeyU64sAt(buf, pos);
    if (pos + len > end) {
      throw new FormatError(
        structure,
        'keys',
        `the key at byte ${pos - start} has ${len / 8 - 2} pointers and runs past the end of the key area (${end - start} bytes)`,
      );
    }
    keys.push(decodeBkey(buf, pos, structure));
    pos += len;
  }
  return keys;
}

/** Total u64s of a list of keys (a bset's or jset's `keys` field). */
export function keysU64s(keys: readonly Bkey[]): number {
  let n = 0;
  for (const k of keys) n += 2 + k.ptrs.length;
  return n;
}

/** Write `keys` from byte `pos`; returns the position after them. */
export function encodeKeys(keys: readonly Bkey[], buf: Buffer, pos: number): number {
  let at = pos;
  for (const k of keys) at = encodeBkey(k, buf, at);
  return at;
}

// ---------------------------------------------------------------------------
// Validity, as the kernel checks it (extents.c). The geometry is the cache's.

export interface CacheGeometry {
  /** Sectors per bucket (a power of two). */
  bucketSize: number;
  firstBucket: number;
  nbuckets: number;
}

/** ptr_available(): a pointer to a cache device of the set (not a PTR_CHECK_DEV placeholder). */
export function ptrAvailable(p: BkeyPtr): boolean {
  return p.dev < MAX_CACHES_PER_SET;
}

/** PTR_BUCKET_NR(). */
export function ptrBucket(p: BkeyPtr, bucketSize: number): number {
  return Math.floor(p.offset / bucketSize);
}

/** gen_after(a, b): how far a is ahead of b, 0 if it is behind (by more than 128). */
export function genAfter(a: number, b: number): number {
  const r = (a - b) & 0xff;
  return r > 128 ? 0 : r;
}

/** ptr_stale(): how many generations the pointer is behind its bucket (0 = current). */
export function ptrStale(bucketGen: number, p: BkeyPtr): number {
  return genAfter(bucketGen, p.gen);
}

/**
 * bch_ptr_status() without the staleness test: why a key's pointers are bad,
 * or '' if they are fine. The kernel's wording, for logs.
 */
export function ptrStatus(k: Bkey, g: CacheGeometry): string {
  for (const p of k.ptrs) {
    if (!ptrAvailable(p)) continue;
    const bucket = ptrBucket(p, g.bucketSize);
    const r = p.offset - bucket * g.bucketSize;
    if (k.size + r > g.bucketSize) return 'bad, length too big';
    if (bucket < g.firstBucket) return 'bad, short offset';
    if (bucket >= g.nbuckets) return 'bad, offset past end of device';
  }
  if (k.inode === 0 && k.offset === 0) return 'bad, null key';
  if (k.ptrs.length === 0) return 'bad, no pointers';
  if (k.size === 0) return 'zeroed key';
  return '';
}

/** __ptr_invalid(): some available pointer leaves its bucket or the cache's bucket range. */
export function ptrsInvalid(k: Bkey, g: CacheGeometry): boolean {
  for (const p of k.ptrs) {
    if (!ptrAvailable(p)) continue;
    const bucket = ptrBucket(p, g.bucketSize);
    const r = p.offset - bucket * g.bucketSize;
    if (k.size + r > g.bucketSize || bucket < g.firstBucket || bucket >= g.nbuckets) return true;
  }
  return false;
}

/**
 * __bch_btree_ptr_invalid(): a pointer to a btree node (interior keys, the
 * root, the uuid bucket) must have pointers, a size (the node's sectors), no
 * dirty bit, and pointers inside the cache.
 */
export function btreePtrInvalid(k: Bkey, g: CacheGeometry): boolean {
  return k.ptrs.length === 0 || k.size === 0 || k.dirty || ptrsInvalid(k, g);
}

/**
 * __bch_extent_invalid(): a leaf key is invalid if it is empty (size 0, which
 * the kernel uses for deleted and placeholder keys and drops without comment),
 * starts before sector 0, or points outside the cache.
 */
export function extentInvalid(k: Bkey, g: CacheGeometry): boolean {
  return k.size === 0 || k.size > k.offset || ptrsInvalid(k, g);
}

/** bch_extent_to_text(): "inode:start len size -> [dev:offset gen g, ...] dirty". */
export function keyText(k: Bkey): string {
  const start = k.offset === MAX_KEY_OFFSET ? String(2n ** 63n - 1n - BigInt(k.size)) : String(keyStart(k));
  const ptrs = k.ptrs
    .map((p) => (p.dev === PTR_CHECK_DEV ? 'check dev' : `${p.dev}:${p.offset} gen ${p.gen}`))
    .join(', ');
  return `${k.inode}:${start} len ${k.size} -> [${ptrs}]${k.dirty ? ' dirty' : ''}`;
}
