// The bucket allocator (alloc.c): free lists sized as the kernel sizes them,
// invalidation by policy, and the allocator Worker that keeps them stocked.
//
// A bucket's life: invalidated (gen bumped, prio reset, pinned) onto free_inc;
// its new gen written to the prio buckets and journaled (R3, writePrios); then
// moved to a reserve (discarded first if discard is on); allocated (marked
// metadata or reclaimable, pin handed to the caller); in use; freed or found
// empty by GC; invalidated again. Nothing is handed out from free_inc before
// its gen is durable, so a pointer written before a crash can never look
// valid into data written after it.
//
// Reserves (cache_alloc): btree = the journal bucket count (at least 8), prio
// = the number of prio buckets, movinggc = roundup_pow_of_two(nbuckets) >> 10
// as the kernel sizes them; free_inc and none larger than the kernel's on
// small caches (freeIncSize). alloc() takes from `none` first, then from the
// requested reserve, as bch_bucket_alloc does.

import { IoError } from '../blockdev/types.ts';
import { Prng } from '../util/prng.ts';
import { deferred, errorMessage, Notifier, Worker, type Deferred } from '../util/lifecycle.ts';
import type { Clock } from '../util/clock.ts';
import { log } from '../util/log.ts';
import {
  BTREE_PRIO,
  GC_MARK_FREE,
  GC_MARK_METADATA,
  GC_MARK_RECLAIMABLE,
  INITIAL_PRIO,
  type Buckets,
} from './buckets.ts';
import { defined } from '../util/assert.ts';
import { Fifo } from './fifo.ts';
import type { CacheIo } from './io.ts';

export const RESERVE_BTREE = 0;
export const RESERVE_PRIO = 1;
export const RESERVE_MOVINGGC = 2;
export const RESERVE_NONE = 3;
export type Reserve = typeof RESERVE_BTREE | typeof RESERVE_PRIO | typeof RESERVE_MOVINGGC | typeof RESERVE_NONE;
export const RESERVE_NAMES = ['btree', 'prio', 'movinggc', 'none'] as const;

export const REPLACEMENT_LRU = 0;
export const REPLACEMENT_FIFO = 1;
export const REPLACEMENT_RANDOM = 2;

export interface AllocatorHost {
  buckets: Buckets;
  io: CacheIo;
  /** cache_replacement_policy: 0 lru, 1 fifo, 2 random. */
  replacement(): number;
  discard(): boolean;
  cacheSync(): boolean;
  prioBucketCount: number;
  journalBucketCount: number;
  /** Write prios and gens, then journal them (R3). */
  writePrios(): Promise<void>;
  requestGc(): void;
  isDisabled(): boolean;
  fail(err: unknown): void;
  /** Whose time the worker's stop bound is measured in (default: real time). */
  clock?: Clock;
}

export interface AllocatorStats {
  invalidated: number;
  prioWrites: number;
  allocWaits: number;
  gcRequests: number;
}

/** roundup_pow_of_two(nbuckets) >> 10: the size of the movinggc reserve (and the kernel's none). */
export function freeReserveSize(nbuckets: number): number {
  return 2 ** Math.ceil(Math.log2(nbuckets)) / 1024;
}

/**
 * free_inc: how many buckets one prio write makes usable. The kernel takes 4
 * x freeReserveSize, about nbuckets / 256, which for a small cache is a
 * handful of buckets (16 of a 256 MiB cache in 64 KiB buckets) for a prio
 * write and a journal commit: three fdatasyncs for every megabyte written,
 * which capped writeback writes at a few thousand a second. So at least
 * nbuckets / 32 (at most 256) go through each prio write here, and the none
 * reserve, which writes take from while the next prio write runs, holds half
 * as many. Departs from the kernel in size only: the same buckets are
 * invalidated, by the same policy, and none is used before its gen is durable.
 */
export function freeIncSize(nbuckets: number): number {
  return Math.max(freeReserveSize(nbuckets) * 4, Math.min(256, Math.floor(nbuckets / 32)));
}

export class Allocator {
  private readonly host: AllocatorHost;
  private readonly b: Buckets;
  readonly free: readonly [Fifo, Fifo, Fifo, Fifo];
  readonly freeInc: Fifo;
  /**
   * How many buckets at the head of free_inc have their new gens on disk.
   * Only these may go to the reserves: a bucket invalidated since the last
   * prio write (an invalidation that found fewer than a prio write's worth
   * and waits for GC to find more) stays in free_inc until the next one.
   */
  private freeIncDurable = 0;
  private readonly heapCap: number;
  private readonly waiters: Array<{ reserve: Reserve; d: Deferred<number> }> = [];
  private readonly wake: Notifier;
  private worker: Worker | undefined;
  private fifoLast = 0;
  private readonly rng: Prng;
  private readonly pool: number[] = [];
  /** Marks are valid (GC or bring-up finished); invalidation needs them. */
  gcMarkValid = false;
  /** Invalidation found nothing: wait for a GC before trying again. */
  invalidateNeedsGc = false;
  /** avail_nbuckets: free or clean unpinned buckets. */
  avail = 0;
  readonly stats: AllocatorStats = { invalidated: 0, prioWrites: 0, allocWaits: 0, gcRequests: 0 };

  /** `seed` drives the random replacement policy; production takes the time, simulations their own seed. */
  constructor(host: AllocatorHost, seed = Date.now()) {
    this.host = host;
    this.wake = new Notifier(host.clock);
    this.b = host.buckets;
    const free = freeReserveSize(this.b.nbuckets);
    if (free < 1) throw new Error(`cache device is too small: ${this.b.nbuckets} buckets (at least 513 needed)`);
    this.free = [
      new Fifo(host.journalBucketCount || 8),
      new Fifo(host.prioBucketCount),
      new Fifo(free),
      new Fifo(Math.max(free, Math.floor(freeIncSize(this.b.nbuckets) / 2))),
    ];
    this.freeInc = new Fifo(freeIncSize(this.b.nbuckets));
    this.heapCap = Math.max(free * 8, this.freeInc.capacity * 2);
    this.fifoLast = this.b.firstBucket;
    this.rng = new Prng(seed);
  }

  /** in_use: percent of buckets neither free nor clean-and-unpinned. */
  get inUse(): number {
    return Math.floor(((this.b.nbuckets - this.avail) * 100) / this.b.nbuckets);
  }

  start(): void {
    this.worker = new Worker('bcache_allocator', (signal) => this.run(signal), {
      stopTimeoutMs: 30_000,
      clock: this.host.clock,
    }).start();
  }

  async stop(): Promise<void> {
    await this.worker?.stop();
    this.worker = undefined;
    this.rejectWaiters(new IoError('ESHUTDOWN', 'allocator stopped'));
  }

  /** Wake the allocator (GC finished, a bucket was allocated, ...). */
  notify(): void {
    this.wake.notify();
  }

  rejectWaiters(err: Error): void {
    for (const w of this.waiters.splice(0)) w.d.reject(err);
  }

  // ---------------------------------------------------------------------------
  // Allocation

  private take(reserve: Reserve): number {
    let r = this.free[RESERVE_NONE].pop();
    if (r < 0) r = this.free[reserve].pop();
    if (r < 0) return -1;
    const b = this.b;
    if (b.pin[r] !== 1) throw new Error(`allocator: bucket ${r} on a free list has pin ${b.pin[r]}, not 1`);
    b.noteChange(r);
    b.reused(r);
    b.setUsed(r, b.bucketSize);
    if (reserve <= RESERVE_PRIO) {
      b.mark[r] = GC_MARK_METADATA;
      b.prio[r] = BTREE_PRIO;
    } else {
      b.mark[r] = GC_MARK_RECLAIMABLE;
      b.prio[r] = INITIAL_PRIO;
    }
    if (this.avail > 0) this.avail--;
    this.wake.notify();
    return r;
  }

  /**
   * A bucket from `reserve` (bch_bucket_alloc), pinned for the caller: it
   * unpins once the bucket is referenced where GC will find it. Without
   * `wait`, undefined when none is ready.
   */
  async alloc(reserve: Reserve, wait: boolean): Promise<number | undefined> {
    if (this.host.isDisabled()) throw new IoError('EIO', 'allocator: cache set I/O is disabled');
    const r = this.take(reserve);
    if (r >= 0) return r;
    if (!wait) return undefined;
    if (!this.worker) throw new IoError('ESHUTDOWN', 'allocator: not running');
    this.stats.allocWaits++;
    const d = deferred<number>();
    this.waiters.push({ reserve, d });
    this.wake.notify();
    return d.promise;
  }

  /** Synchronous allocation without waiting (-1 if nothing is ready). */
  allocNow(reserve: Reserve): number {
    if (this.host.isDisabled()) throw new IoError('EIO', 'allocator: cache set I/O is disabled');
    return this.take(reserve);
  }

  /** Put back a bucket allocated from `reserve` and never used (still pinned, gen unchanged). */
  unalloc(bucket: number, reserve: Reserve): void {
    const b = this.b;
    b.noteChange(bucket);
    b.mark[bucket] = GC_MARK_FREE;
    b.setUsed(bucket, 0);
    this.avail++;
    const fifo = this.free[reserve];
    if (!fifo.unshift(bucket) && !this.free[RESERVE_NONE].unshift(bucket)) {
      // No room: let GC and invalidation find it.
      b.unpinBucket(bucket);
    }
    this.serveWaiters();
  }

  /** __bch_bucket_free(): nothing references the bucket any more. */
  freeBucket(bucket: number): void {
    const b = this.b;
    b.noteChange(bucket);
    b.mark[bucket] = GC_MARK_FREE;
    b.setUsed(bucket, 0);
    if (this.avail < b.nbuckets) this.avail++;
  }

  /**
   * Hand buckets to the waiters that can have one now, in arrival order. A
   * waiter whose reserve is empty must not hold up the others behind it: a
   * btree rewrite waiting for RESERVE_BTREE (which has buckets) behind data
   * writes waiting for RESERVE_NONE (which only invalidation refills, and
   * invalidation may need the GC pass that is doing the rewrite) would wait
   * forever. The kernel wakes every waiter to retry its own reserve.
   */
  private serveWaiters(): void {
    for (let i = 0; i < this.waiters.length;) {
      const w = defined(this.waiters[i], 'i < waiters.length');
      const r = this.take(w.reserve);
      if (r < 0) {
        i++;
        continue;
      }
      this.waiters.splice(i, 1);
      w.d.resolve(r);
    }
  }

  private push(bucket: number): boolean {
    if (this.free[RESERVE_PRIO].push(bucket)) return true;
    for (const f of this.free) if (f.push(bucket)) return true;
    return false;
  }

  /** All reserves full. */
  get stocked(): boolean {
    return this.free.every((f) => f.full);
  }

  // ---------------------------------------------------------------------------
  // Bring-up

  /**
   * bch_initial_gc_finish(): buckets without live data go straight to the
   * prio and btree reserves with their gen bumped but not written (the
   * allocator needs buckets to write prios). Safe because nothing points into
   * them, and a pointer written with the new gen raises the bucket's gen on
   * the next bring-up (initial mark) if the prios were not written by then.
   */
  initialStock(): void {
    const b = this.b;
    const prio = this.free[RESERVE_PRIO];
    const btree = this.free[RESERVE_BTREE];
    for (let i = b.firstBucket; i < b.nbuckets; i++) {
      if (prio.full && btree.full) break;
      if (b.canInvalidate(i) && b.mark[i] === GC_MARK_FREE) {
        b.invalidate(i);
        if (!prio.push(i)) btree.push(i);
      }
    }
  }

  /**
   * Bring-up: up to `max` more buckets without live data, bumped and pinned
   * like initialStock's, for the btree rewrites journal replay may need while
   * the journal (and so prio writes) may still be full. Used first by
   * allocPool(); what is left goes back with releasePool().
   */
  stockPool(max: number): void {
    const b = this.b;
    for (let i = b.firstBucket; i < b.nbuckets && this.pool.length < max; i++) {
      if (b.canInvalidate(i) && b.mark[i] === GC_MARK_FREE) {
        b.invalidate(i);
        this.pool.push(i);
      }
    }
  }

  /** A bucket from the bring-up pool, as a btree reserve allocation; -1 if the pool is empty. */
  allocPool(): number {
    const r = this.pool.pop();
    if (r === undefined) return -1;
    const b = this.b;
    b.noteChange(r);
    b.reused(r);
    b.setUsed(r, b.bucketSize);
    b.mark[r] = GC_MARK_METADATA;
    b.prio[r] = BTREE_PRIO;
    if (this.avail > 0) this.avail--;
    return r;
  }

  releasePool(): void {
    for (const r of this.pool.splice(0)) this.b.unpinBucket(r);
  }

  // ---------------------------------------------------------------------------
  // Invalidation

  private invalidateOne(i: number): void {
    this.b.invalidate(i);
    this.freeInc.push(i);
    this.stats.invalidated++;
  }

  /** Fill free_inc by the replacement policy; false if nothing could be invalidated. */
  invalidate(): boolean {
    const before = this.freeInc.length;
    switch (this.host.replacement()) {
      case REPLACEMENT_FIFO:
        this.invalidateFifo();
        break;
      case REPLACEMENT_RANDOM:
        this.invalidateRandom();
        break;
      default:
        this.invalidateLru();
    }
    return this.freeInc.length > before;
  }

  private invalidateLru(): void {
    const b = this.b;
    // A bounded max-heap of the heapCap lowest-weight candidates.
    const idx = new Int32Array(this.heapCap);
    const w = new Float64Array(this.heapCap);
    let n = 0;
    const siftDown = (i: number, len: number): void => {
      for (;;) {
        const l = 2 * i + 1;
        const r = l + 1;
        let m = i;
        if (l < len && (w[l] ?? 0) > (w[m] ?? 0)) m = l;
        if (r < len && (w[r] ?? 0) > (w[m] ?? 0)) m = r;
        if (m === i) return;
        const ti = idx[i] ?? 0;
        const tw = w[i] ?? 0;
        idx[i] = idx[m] ?? 0;
        w[i] = w[m] ?? 0;
        idx[m] = ti;
        w[m] = tw;
        i = m;
      }
    };
    for (let i = b.firstBucket; i < b.nbuckets; i++) {
      if (!b.canInvalidate(i)) continue;
      const weight = b.lruWeight(i);
      if (n < this.heapCap) {
        let c = n++;
        idx[c] = i;
        w[c] = weight;
        while (c > 0) {
          const p = (c - 1) >> 1;
          if ((w[p] ?? 0) >= (w[c] ?? 0)) break;
          const ti = idx[p] ?? 0;
          const tw = w[p] ?? 0;
          idx[p] = idx[c] ?? 0;
          w[p] = w[c] ?? 0;
          idx[c] = ti;
          w[c] = tw;
          c = p;
        }
      } else if (weight < (w[0] ?? 0)) {
        idx[0] = i;
        w[0] = weight;
        siftDown(0, n);
      }
    }
    const order = Array.from(idx.subarray(0, n)).map((bucket, k) => ({ bucket, weight: w[k] ?? 0 }));
    order.sort((x, y) => x.weight - y.weight || x.bucket - y.bucket);
    for (const o of order) {
      if (this.freeInc.full) break;
      this.invalidateOne(o.bucket);
    }
  }

  private invalidateFifo(): void {
    const b = this.b;
    let checked = 0;
    while (!this.freeInc.full) {
      if (this.fifoLast < b.firstBucket || this.fifoLast >= b.nbuckets) this.fifoLast = b.firstBucket;
      const i = this.fifoLast++;
      if (b.canInvalidate(i)) this.invalidateOne(i);
      if (++checked >= b.nbuckets) return;
    }
  }

  private invalidateRandom(): void {
    const b = this.b;
    let checked = 0;
    const span = b.nbuckets - b.firstBucket;
    while (!this.freeInc.full) {
      const i = b.firstBucket + this.rng.below(span);
      if (b.canInvalidate(i)) this.invalidateOne(i);
      if (++checked >= b.nbuckets / 2) return;
    }
  }

  // ---------------------------------------------------------------------------
  // The worker

  private async run(signal: AbortSignal): Promise<void> {
    const host = this.host;
    try {
      while (!signal.aborted && !host.isDisabled()) {
        // 1. Buckets whose gens are durable go to the reserves.
        if (this.freeIncDurable > this.freeInc.length) this.freeIncDurable = this.freeInc.length;
        let moved = false;
        while (this.freeIncDurable > 0 && !this.stocked) {
          const bucket = this.freeInc.pop();
          this.freeIncDurable--;
          if (host.discard()) await host.io.discard(this.b.sector(bucket), this.b.bucketSize);
          this.push(bucket);
          moved = true;
        }
        if (moved) this.serveWaiters();
        if (this.freeIncDurable > 0 || (this.stocked && this.waiters.length === 0)) {
          await this.wake.wait(signal);
          continue;
        }
        // 2. Invalidate more, once GC has valid marks (free_inc may still
        // hold buckets an earlier round invalidated: they wait for the same
        // prio write).
        if (!this.gcMarkValid || this.invalidateNeedsGc) {
          this.requestGc();
          await this.wake.wait(signal);
          continue;
        }
        this.invalidate();
        const enough = this.freeInc.length >= Math.max(1, host.prioBucketCount);
        if (!this.freeInc.full || !enough) {
          this.invalidateNeedsGc = true;
          this.requestGc();
          if (!enough) {
            await this.wake.wait(signal);
            continue;
          }
        }
        // 3. Their new gens must be on disk before anyone writes into them (R3).
        // Nothing else invalidates while this worker runs, so every bucket in
        // free_inc now is covered by the gens this write takes.
        const covered = this.freeInc.length;
        if (host.cacheSync()) {
          await host.writePrios();
          this.stats.prioWrites++;
        }
        this.freeIncDurable = covered;
      }
    } catch (err) {
      if (!signal.aborted) {
        log.error(`allocator: ${errorMessage(err)}`);
        host.fail(err);
      }
    } finally {
      this.rejectWaiters(new IoError(host.isDisabled() ? 'EIO' : 'ESHUTDOWN', 'allocator stopped'));
    }
  }

  private requestGc(): void {
    this.stats.gcRequests++;
    this.host.requestGc();
  }
}
