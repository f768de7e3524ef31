// Per-bucket state, one typed-array entry per bucket of the cache device
// (the kernel's struct bucket, split into arrays so that a million buckets
// cost a few megabytes and a scan is a tight loop).
//
//   gen     u8   generation; a pointer is valid iff its gen equals it
//   prio    u16  LRU priority (INITIAL_PRIO on allocation and on hits,
//                BTREE_PRIO for metadata, decremented by rescaling)
//   mark    u8   0 free, 1 reclaimable (clean data), 2 dirty, 3 metadata
//   used    u16  sectors of live data (GC_SECTORS_USED, saturating at 8191)
//   pin     i32  references that forbid invalidation: an invalidated bucket
//                waiting on a free list, an open data bucket, a data key
//                written but not yet inserted, a journal key not yet replayed
//   lastGc  u8   the oldest gen any pointer referenced at the last GC: the
//                gen-wrap guard (a bucket may be invalidated only while
//                gen - lastGc < 96)
//   dirty   i32  sectors of dirty keys pointing into it, kept exactly as keys
//                come and go (not by GC): when writeback cleans a bucket's
//                last dirty key it is reclaimable at once, where the kernel
//                waits for the next GC to find out
//   reuse   u32  in memory only: how many times the bucket was invalidated or
//                handed out for writing since the set started. Data at a
//                sector can change only when this does, which is what the
//                copies of hot blocks in memory rely on (ram-cache.ts); it
//                does not wrap in practice, unlike the 8-bit gen

import { genAfter, ptrBucket, type BkeyPtr } from '../format/bkey.ts';
import { BTREE_PRIO, INITIAL_PRIO } from '../format/constants.ts';

export const GC_MARK_FREE = 0;
export const GC_MARK_RECLAIMABLE = 1;
export const GC_MARK_DIRTY = 2;
export const GC_MARK_METADATA = 3;

/** GC_SECTORS_USED is 13 bits in the kernel's gc_mark. */
export const MAX_GC_SECTORS_USED = 8191;
/** A bucket whose gen ran this far ahead of its last_gc must wait for GC (BUCKET_GC_GEN_MAX). */
export const BUCKET_GC_GEN_MAX = 96;

export { BTREE_PRIO, INITIAL_PRIO };

export class Buckets {
  readonly nbuckets: number;
  readonly bucketSize: number;
  readonly firstBucket: number;
  readonly gen: Uint8Array;
  readonly prio: Uint16Array;
  readonly mark: Uint8Array;
  readonly used: Uint16Array;
  readonly pin: Int32Array;
  readonly lastGc: Uint8Array;
  readonly dirty: Int32Array;
  readonly reuse: Uint32Array;
  /** Smallest prio of a data bucket since the last rescale (c->min_prio). */
  minPrio = 0;
  /**
   * While a GC pass walks the tree (in slices, yielding to I/O), the buckets
   * whose state the rest of the engine changed meanwhile: pinned or unpinned,
   * allocated, freed, invalidated. The walk may not have seen their newest
   * references, so the pass keeps their live state instead of installing
   * what it computed, as it does for buckets pinned at its end.
   */
  private changed: Uint8Array | undefined;

  constructor(nbuckets: number, bucketSize: number, firstBucket: number) {
    this.nbuckets = nbuckets;
    this.bucketSize = bucketSize;
    this.firstBucket = firstBucket;
    this.gen = new Uint8Array(nbuckets);
    this.prio = new Uint16Array(nbuckets);
    this.mark = new Uint8Array(nbuckets);
    this.used = new Uint16Array(nbuckets);
    this.pin = new Int32Array(nbuckets);
    this.lastGc = new Uint8Array(nbuckets);
    this.dirty = new Int32Array(nbuckets);
    this.reuse = new Uint32Array(nbuckets);
  }

  /** The bucket a pointer points into. */
  bucketOf(p: BkeyPtr): number {
    return ptrBucket(p, this.bucketSize);
  }

  /** First sector of bucket `b` on the cache device. */
  sector(b: number): number {
    return b * this.bucketSize;
  }

  inRange(b: number): boolean {
    return b >= this.firstBucket && b < this.nbuckets;
  }

  /** ptr_stale(): generations the pointer is behind its bucket (0: valid). */
  stale(p: BkeyPtr): number {
    return this.staleAt(p.offset, p.gen);
  }

  /** stale() for a pointer given by its sector and gen (a key kept as columns). */
  staleAt(sector: number, gen: number): number {
    return genAfter(this.gen[Math.floor(sector / this.bucketSize)] ?? 0, gen);
  }

  /** bucket_gc_gen(): how far the gen ran ahead of the oldest pointer GC saw. */
  gcGen(b: number): number {
    return ((this.gen[b] ?? 0) - (this.lastGc[b] ?? 0)) & 0xff;
  }

  /** bch_can_invalidate_bucket(): free or clean, unpinned, and with gen headroom. */
  canInvalidate(b: number): boolean {
    const m = this.mark[b] ?? 0;
    return (m === GC_MARK_FREE || m === GC_MARK_RECLAIMABLE) && this.pin[b] === 0 && this.gcGen(b) < BUCKET_GC_GEN_MAX;
  }

  /** Bump the gen (every pointer into the bucket goes stale), reset the prio and pin it. */
  invalidate(b: number): void {
    this.gen[b] = ((this.gen[b] ?? 0) + 1) & 0xff;
    this.reused(b);
    this.prio[b] = INITIAL_PRIO;
    this.pin[b] = (this.pin[b] ?? 0) + 1;
    if (this.changed) this.changed[b] = 1;
  }

  /** New data may go where old data was (see `reuse`): invalidation, and every hand-out for writing. */
  reused(b: number): void {
    this.reuse[b] = ((this.reuse[b] ?? 0) + 1) >>> 0;
  }

  /** A GC pass begins: from now on note every bucket whose state changes (pinned ones count as changed). */
  gcTrackBegin(): void {
    const changed = new Uint8Array(this.nbuckets);
    const pin = this.pin;
    for (let i = 0; i < this.nbuckets; i++) if ((pin[i] ?? 0) > 0) changed[i] = 1;
    this.changed = changed;
  }

  /** The pass ends: the buckets changed since gcTrackBegin(). */
  gcTrackEnd(): Uint8Array {
    const changed = this.changed ?? new Uint8Array(this.nbuckets);
    this.changed = undefined;
    return changed;
  }

  /** An allocation, free or mark change outside GC (see `changed`). */
  noteChange(b: number): void {
    if (this.changed) this.changed[b] = 1;
  }

  setUsed(b: number, sectors: number): void {
    this.used[b] = Math.min(sectors, MAX_GC_SECTORS_USED);
  }

  addUsed(b: number, sectors: number): void {
    this.used[b] = Math.min((this.used[b] ?? 0) + sectors, MAX_GC_SECTORS_USED);
  }

  pinBucket(b: number): void {
    this.pin[b] = (this.pin[b] ?? 0) + 1;
    if (this.changed) this.changed[b] = 1;
  }

  unpinBucket(b: number): void {
    const n = this.pin[b] ?? 0;
    if (n <= 0) throw new Error(`bucket ${b}: unpinned more often than pinned`);
    this.pin[b] = n - 1;
    if (this.changed) this.changed[b] = 1;
  }

  /** bucket_prio() for the lru policy: cold and empty buckets first. */
  lruWeight(b: number): number {
    const scaled = Math.floor((INITIAL_PRIO - this.minPrio) / 8);
    return ((this.prio[b] ?? 0) - this.minPrio + scaled) * (this.used[b] ?? 0);
  }

  /** Free buckets and clean ones nobody pins: what avail_nbuckets counts. */
  isAvailable(b: number): boolean {
    const m = this.mark[b] ?? 0;
    return this.pin[b] === 0 && (m === GC_MARK_FREE || m === GC_MARK_RECLAIMABLE);
  }

  /** The prio a hit gives a data bucket. */
  touch(b: number): void {
    if (this.prio[b] !== BTREE_PRIO) this.prio[b] = INITIAL_PRIO;
  }
}
