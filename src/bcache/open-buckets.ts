// The sector allocator (alloc.c bch_alloc_sectors): buckets open for data,
// from which writes get their space block by block.
//
// A write picks, among the open buckets of its kind, the one whose last allocation
// ended where this write starts (sequential streams stay together), else the
// one last used by the same write point, else the least recently used one.
// Kinds: flash volumes and cached devices never share a bucket (as in the
// kernel), and neither do dirty data (writeback) and clean data (miss fills,
// writethrough copies), which the kernel mixes: one dirty block makes its
// whole bucket dirty, and a dirty bucket cannot be reused until writeback
// has copied it, so mixed buckets pin the clean data around the dirty and a
// read-heavy cache with a few writes ends up with nothing it can reclaim.
// If the chosen bucket is exhausted it gets a fresh bucket from the `none`
// reserve. A write larger than what is left gets less and asks again (one key
// per piece).
//
// Pins: an open bucket with space left holds one; each allocation hands its
// caller one more (dropped with put() once the key is in the btree, or the
// write failed); the allocation that exhausts a bucket takes over the bucket's
// own pin instead.

import { makePtr, type BkeyPtr } from '../format/bkey.ts';
import { RESERVE_NONE, type Allocator } from './alloc.ts';
import { GC_MARK_DIRTY, type Buckets } from './buckets.ts';

interface OpenBucket {
  bucket: number;
  gen: number;
  /** Next free sector on the cache device. */
  next: number;
  sectorsFree: number;
  writePoint: number;
  /** Where the last allocation from it ended: (inode, end sector). */
  lastInode: number;
  lastEnd: number;
  flash: boolean;
  /** Holds writeback (dirty) data; clean data goes elsewhere. */
  dirty: boolean;
  lastUse: number;
}

export interface SectorAllocation {
  /** The pointer for the key: first cache sector, with the bucket's gen. */
  ptr: BkeyPtr;
  /** Sectors granted (at most what was asked). */
  sectors: number;
  bucket: number;
}

export interface AllocSectorsOptions {
  inode: number;
  /** First sector of the write (for sequential detection). */
  offset: number;
  sectors: number;
  /** Writes with the same write point share buckets (the kernel hashes the task). */
  writePoint?: number;
  /** Flash-only volume data. */
  flash?: boolean;
  /** Writeback data: the bucket becomes dirty at once (never invalidated while it holds it). */
  dirty?: boolean;
  /** Wait for the allocator if no bucket is ready (else undefined is returned). */
  wait?: boolean;
}

export class OpenBuckets {
  private readonly b: Buckets;
  private readonly allocator: Allocator;
  private readonly blockSize: number;
  private readonly open: OpenBucket[] = [];
  private readonly max: number;
  private clock = 0;

  constructor(buckets: Buckets, allocator: Allocator, blockSize: number, max = 16) {
    this.b = buckets;
    this.allocator = allocator;
    this.blockSize = blockSize;
    this.max = max;
  }

  private pick(o: AllocSectorsOptions): OpenBucket | undefined {
    const flash = o.flash === true;
    const dirty = o.dirty === true;
    let sameTask: OpenBucket | undefined;
    let lru: OpenBucket | undefined;
    for (const ob of this.open) {
      if (ob.flash !== flash || ob.dirty !== dirty) continue;
      if (ob.sectorsFree > 0 && ob.lastInode === o.inode && ob.lastEnd === o.offset) return ob;
      if (ob.writePoint === (o.writePoint ?? 0) && (!sameTask || ob.lastUse > sameTask.lastUse)) sameTask = ob;
      if (!lru || ob.lastUse < lru.lastUse) lru = ob;
    }
    if (sameTask) return sameTask;
    if (this.open.length < this.max) return undefined;
    return lru;
  }

  /** Space for a write, or undefined if none is ready and !wait. */
  async alloc(o: AllocSectorsOptions): Promise<SectorAllocation | undefined> {
    const now = this.allocNow(o);
    if (now !== undefined || o.wait !== true) return now;
    const bucket = await this.allocator.alloc(RESERVE_NONE, true);
    if (bucket === undefined) return undefined;
    // Picked again: another allocation may have run while we waited.
    const ob = this.pick(o);
    if (ob && ob.sectorsFree > 0) {
      this.allocator.unalloc(bucket, RESERVE_NONE);
      return this.carve(ob, o);
    }
    return this.carve(this.openFresh(bucket, ob, o), o);
  }

  /**
   * alloc() without waiting: from an open bucket with room, or a fresh
   * bucket the allocator has ready; undefined if neither (this is on every
   * write's and fill's path, so it needs no promise).
   */
  allocNow(o: AllocSectorsOptions): SectorAllocation | undefined {
    if (o.sectors <= 0) throw new RangeError(`allocSectors: ${o.sectors} sectors`);
    const ob = this.pick(o);
    if (ob && ob.sectorsFree > 0) return this.carve(ob, o);
    const bucket = this.allocator.allocNow(RESERVE_NONE);
    if (bucket < 0) return undefined;
    return this.carve(this.openFresh(bucket, ob, o), o);
  }

  /** Open `bucket` for data, in place of `replace` (an exhausted or least recently used one) if given. */
  private openFresh(bucket: number, replace: OpenBucket | undefined, o: AllocSectorsOptions): OpenBucket {
    const fresh: OpenBucket = {
      bucket,
      gen: this.b.gen[bucket] ?? 0,
      next: this.b.sector(bucket),
      sectorsFree: this.b.bucketSize,
      writePoint: o.writePoint ?? 0,
      lastInode: -1,
      lastEnd: -1,
      flash: o.flash === true,
      dirty: o.dirty === true,
      lastUse: 0,
    };
    if (replace) this.open.splice(this.open.indexOf(replace), 1, fresh);
    else this.open.push(fresh);
    return fresh;
  }

  /** Take the write's sectors from `ob`. */
  private carve(ob: OpenBucket, o: AllocSectorsOptions): SectorAllocation {
    const sectors = Math.min(o.sectors, ob.sectorsFree);
    const ptr = makePtr(0, ob.next, ob.gen);
    ob.next += sectors;
    ob.sectorsFree -= sectors;
    if (ob.sectorsFree < this.blockSize) ob.sectorsFree = 0;
    ob.lastInode = o.inode;
    ob.lastEnd = o.offset + sectors;
    ob.writePoint = o.writePoint ?? 0;
    ob.lastUse = ++this.clock;
    // The caller's pin; the last allocation inherits the bucket's own.
    if (ob.sectorsFree > 0) this.b.pinBucket(ob.bucket);
    if (o.dirty === true) this.b.mark[ob.bucket] = GC_MARK_DIRTY;
    return { ptr, sectors, bucket: ob.bucket };
  }

  /** Drop an allocation's pin (its key is in the btree, or its write failed). */
  put(a: SectorAllocation): void {
    this.b.unpinBucket(a.bucket);
  }

  /** Close every open bucket (teardown): their own pins go. */
  closeAll(): void {
    for (const ob of this.open) if (ob.sectorsFree > 0) this.b.unpinBucket(ob.bucket);
    this.open.length = 0;
  }

  /** Buckets currently open for data. */
  get openCount(): number {
    return this.open.filter((ob) => ob.sectorsFree > 0).length;
  }
}
