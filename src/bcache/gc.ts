// Garbage collection (btree.c bch_btree_gc, "basic"): recompute every bucket's
// mark, sectors used and oldest referenced gen from the btree, so the
// allocator knows what it may invalidate and gens cannot wrap around under a
// live pointer.
//
// A pass walks the leaves in key order, a slice at a time: each slice holds
// the btree's lock shared only while it marks (synchronously) and gives the
// event loop back after GC_SLICE_MS, so requests never wait behind a whole
// walk (the kernel's GC stalls I/O for tens to hundreds of ms on fast
// devices; a 2025 fix cut its batch to 10 nodes per 10 ms). Between slices
// the tree may change under the walk, which is safe because every change is
// conservative or kept out of the result:
//   - the walk resumes by position from the root, so it follows rewrites and
//     splits, and marks each interior node (its child pointers) once;
//   - keys inserted behind the walk point into buckets that were pinned or
//     allocated meanwhile, and the buckets whose state changed during the
//     pass keep their live state at the end (Buckets.gcTrackBegin), as
//     pinned ones always did; overwrites behind the walk leave counts too
//     high, never too low, until the next pass;
//   - the allocator goes on invalidating during a pass, from the live marks:
//     those of the previous pass plus every allocation since, which never
//     call a bucket with live dirty data or metadata free (the kernel must
//     stop its allocator instead, because its GC rebuilds the live marks in
//     place); a bucket invalidated meanwhile counts as changed.
// The computed marks go into fresh arrays and are installed at the end
// (with the lock held, no await in between), so writes never wait for a
// pass to end to get a bucket. Leaves that are mostly stale
// keys are rewritten afterwards, and then moving GC runs (movinggc.ts,
// copy_gc_enabled).
//
// The worker runs a pass when asked (trigger_gc), when the allocator found
// nothing to invalidate, and when more than nbuckets x bucket_size / 16
// sectors were inserted since the last pass.

import { MAX_KEY, posCmp, ptrAvailable, type Bkey, type BkeyPtr } from '../format/bkey.ts';
import { MAX_CACHES_PER_SET } from '../format/constants.ts';
import { Notifier, Worker, errorMessage, nextTurn } from '../util/lifecycle.ts';
import { realClock, type Clock } from '../util/clock.ts';
import { log } from '../util/log.ts';
import type { Allocator } from './alloc.ts';
import type { Btree } from './btree.ts';
import type { BtreeNode } from './btree-node.ts';
import type { KeyList } from './keylist.ts';
import {
  BTREE_PRIO,
  GC_MARK_DIRTY,
  GC_MARK_FREE,
  GC_MARK_METADATA,
  GC_MARK_RECLAIMABLE,
  INITIAL_PRIO,
  MAX_GC_SECTORS_USED,
  type Buckets,
} from './buckets.ts';
import { monotonicNs, TimeStats } from './time-stats.ts';

/** A slice of the walk marks for at most this long before yielding to I/O (ms). */
export const GC_SLICE_MS = 1;

export interface MarkArrays {
  mark: Uint8Array;
  used: Uint16Array;
  lastGc: Uint8Array;
}

/** What markKey found: no usable pointer, a live key, or a stale one. */
export const MARK_NONE = 0;
export const MARK_LIVE = 1;
export const MARK_STALE = 2;

/**
 * __bch_btree_mark_key(): note the oldest gen the key references, and if its
 * pointers are current, mark their buckets (metadata for node pointers,
 * dirty or reclaimable for data) and count its sectors. Runs for every key of
 * every pass, so it is written as a plain loop over typed arrays.
 */
export function markKey(b: Buckets, into: MarkArrays, level: number, k: Bkey): number {
  if (k.inode === 0 && k.offset === 0) return MARK_NONE;
  const ptrs = k.ptrs;
  const gens = b.gen;
  const bucketSize = b.bucketSize;
  let result = MARK_NONE;
  for (let j = 0; j < ptrs.length; j++) {
    const p = ptrs[j] as BkeyPtr;
    if (p.dev >= MAX_CACHES_PER_SET) continue;
    const i = Math.floor(p.offset / bucketSize);
    if (i >= b.nbuckets) continue;
    // gen_after(lastGc, ptr.gen): this pointer references an older gen.
    const older = ((into.lastGc[i] as number) - p.gen) & 0xff;
    if (older !== 0 && older <= 128) into.lastGc[i] = p.gen;
    const stale = ((gens[i] as number) - p.gen) & 0xff;
    if (stale !== 0 && stale <= 128) {
      result = MARK_STALE;
      continue;
    }
    if (result === MARK_NONE) result = MARK_LIVE;
    if (level > 0) into.mark[i] = GC_MARK_METADATA;
    else if (k.dirty) into.mark[i] = GC_MARK_DIRTY;
    else if (into.mark[i] === GC_MARK_FREE) into.mark[i] = GC_MARK_RECLAIMABLE;
    const used = (into.used[i] as number) + k.size;
    into.used[i] = used > MAX_GC_SECTORS_USED ? MAX_GC_SECTORS_USED : used;
  }
  return result;
}

/**
 * markKey() for a leaf's key at position `p` of `keys`, read from the list's
 * columns: no key object is built for the common key with one pointer (GC's
 * walk visits every key of the tree).
 */
export function markLeafKeyAt(b: Buckets, into: MarkArrays, keys: KeyList, p: number): number {
  const nptrs = keys.ptrCountAt(p);
  if (nptrs !== 1) return markKey(b, into, 0, keys.keyAt(p));
  if (keys.inodeAt(p) === 0 && keys.endAt(p) === 0) return MARK_NONE;
  if (keys.ptrDevAt(p) >= MAX_CACHES_PER_SET) return MARK_NONE;
  const i = Math.floor(keys.ptrOffsetAt(p) / b.bucketSize);
  if (i >= b.nbuckets) return MARK_NONE;
  const gen = keys.ptrGenAt(p);
  const older = ((into.lastGc[i] as number) - gen) & 0xff;
  if (older !== 0 && older <= 128) into.lastGc[i] = gen;
  const stale = ((b.gen[i] as number) - gen) & 0xff;
  if (stale !== 0 && stale <= 128) return MARK_STALE;
  if (keys.dirtyAt(p)) into.mark[i] = GC_MARK_DIRTY;
  else if (into.mark[i] === GC_MARK_FREE) into.mark[i] = GC_MARK_RECLAIMABLE;
  const used = (into.used[i] as number) + keys.sizeAt(p);
  into.used[i] = used > MAX_GC_SECTORS_USED ? MAX_GC_SECTORS_USED : used;
  return MARK_LIVE;
}

/**
 * bch_initial_mark_key(): at bring-up a pointer ahead of its bucket's gen
 * (written after the prios were last written) raises the gen to its own, and
 * prios follow what the bucket holds; then mark as GC does, into the live
 * arrays.
 */
export function initialMarkKey(b: Buckets, level: number, k: Bkey): void {
  for (const p of k.ptrs) {
    if (!ptrAvailable(p)) continue;
    const i = b.bucketOf(p);
    if (i >= b.nbuckets || b.stale(p)) continue;
    b.gen[i] = p.gen;
    if (level > 0 && !(k.inode === 0 && k.offset === 0)) b.prio[i] = BTREE_PRIO;
    else if (level === 0 && b.prio[i] === BTREE_PRIO) b.prio[i] = INITIAL_PRIO;
  }
  markKey(b, b, level, k);
}

export interface GcHost {
  buckets: Buckets;
  btree: Btree;
  allocator: Allocator;
  /** Buckets that are metadata outside the btree: journal, prio (current and last), uuid. */
  metadataBuckets(): Iterable<number>;
  isDisabled(): boolean;
  fail(err: unknown): void;
  /** Whose time slices are measured in (default: real time). */
  clock?: Clock;
  /** Run after each pass, with its marks installed: moving GC (bch_moving_gc after bch_btree_gc). */
  afterPass?: (signal?: AbortSignal) => Promise<void>;
}

export interface GcStats {
  runs: number;
  /** Nodes and keys seen by the last pass. */
  nodes: number;
  keys: number;
  /** Sectors of live data (clean and dirty) at the last pass. */
  data: number;
  rewrites: number;
  lastDurationMs: number;
  /** Slices of the last pass, and the longest one (ms): how long requests could wait behind GC. */
  lastSlices: number;
  lastMaxPauseMs: number;
  /** The longest slice of any pass (ms). */
  maxPauseMs: number;
  /** Every pass's duration (btree_gc_* in internal/). */
  time: TimeStats;
}

/** Where a slice of the walk stopped. */
type SliceEnd = { done: true } | { done: false; load?: { key: Bkey; level: number } };

/** A pass in progress: the fresh marks and where the walk is. */
interface PassState {
  fresh: MarkArrays;
  /** The walk continues with the leaf holding the first key after this position. */
  inode: number;
  offset: number;
  /** Interior nodes whose child pointers are marked (node objects: a rewrite makes new ones). */
  interiorSeen: Set<BtreeNode>;
  rootSeen: BtreeNode | undefined;
  staleLeaves: BtreeNode[];
  nodes: number;
  keys: number;
  data: number;
}

export class Gc {
  private readonly host: GcHost;
  private readonly wake: Notifier;
  private readonly clock: Clock;
  private worker: Worker | undefined;
  private requested = false;
  /** Inserted sectors left before pressure triggers a pass (sectors_to_gc). */
  sectorsToGc: number;
  private readonly sectorsBetweenRuns: number;
  private running: Promise<void> | undefined;
  private readonly sliceMs: number;
  private readonly yieldBetweenSlices: () => Promise<void>;

  /** A pass is in progress. */
  get inProgress(): boolean {
    return this.running !== undefined;
  }
  private waiters: Array<() => void> = [];
  readonly stats: GcStats = {
    runs: 0,
    nodes: 0,
    keys: 0,
    data: 0,
    rewrites: 0,
    lastDurationMs: 0,
    lastSlices: 0,
    lastMaxPauseMs: 0,
    maxPauseMs: 0,
    time: new TimeStats(),
  };

  constructor(
    host: GcHost,
    sectorsBetweenRuns?: number,
    sliceMs = GC_SLICE_MS,
    yieldBetweenSlices: () => Promise<void> = nextTurn,
  ) {
    this.host = host;
    this.clock = host.clock ?? realClock;
    this.wake = new Notifier(this.clock);
    const b = host.buckets;
    this.sectorsBetweenRuns = sectorsBetweenRuns ?? Math.floor((b.nbuckets * b.bucketSize) / 16);
    this.sectorsToGc = this.sectorsBetweenRuns;
    this.sliceMs = sliceMs;
    this.yieldBetweenSlices = yieldBetweenSlices;
  }

  start(): void {
    this.worker = new Worker('bcache_gc', (signal) => this.run(signal), {
      stopTimeoutMs: 30_000,
      clock: this.clock,
    }).start();
  }

  async stop(): Promise<void> {
    await this.worker?.stop();
    this.worker = undefined;
    for (const w of this.waiters.splice(0)) w();
  }

  /** Ask for a pass (trigger_gc, allocator demand). */
  request(): void {
    this.requested = true;
    this.wake.notify();
  }

  /** Sectors were inserted: count down towards the next pass. */
  inserted(sectors: number): void {
    this.sectorsToGc -= sectors;
    if (this.sectorsToGc < 0 && !this.requested) this.request();
  }

  /** Request a pass and wait until one that started after this call has finished. */
  async runNow(): Promise<void> {
    if (!this.worker) {
      await this.pass();
      return;
    }
    const done = new Promise<void>((resolve) => this.waiters.push(resolve));
    this.request();
    await done;
  }

  private async run(signal: AbortSignal): Promise<void> {
    const stopping = (): boolean => signal.aborted || this.host.isDisabled();
    while (!stopping()) {
      if (!this.requested) {
        await this.wake.wait(signal);
        continue;
      }
      this.requested = false;
      const waiting = this.waiters.splice(0);
      try {
        await this.pass(signal);
      } catch (err) {
        if (!stopping()) {
          log.error(`gc: ${errorMessage(err)}`);
          this.host.fail(err);
        }
      } finally {
        for (const w of waiting) w();
      }
    }
  }

  /** One GC pass. */
  async pass(signal?: AbortSignal): Promise<void> {
    if (this.running) return this.running;
    this.running = this.passInner(signal);
    try {
      await this.running;
    } finally {
      this.running = undefined;
    }
  }

  private async passInner(signal: AbortSignal | undefined): Promise<void> {
    const { buckets: b, btree } = this.host;
    const t0 = monotonicNs();
    // The countdown restarts as the pass starts (bch_gc_thread's
    // set_gc_sectors before bch_btree_gc): what is inserted during the pass
    // counts towards the next one. Restarted only at the end, it stayed below
    // zero for the whole pass, and the first insert meanwhile asked for
    // another pass at once - every pressure-triggered pass ran twice.
    this.sectorsToGc = this.sectorsBetweenRuns;
    const st: PassState = {
      fresh: {
        mark: new Uint8Array(b.nbuckets),
        used: new Uint16Array(b.nbuckets),
        lastGc: Uint8Array.from(b.gen),
      },
      inode: 0,
      offset: -1,
      interiorSeen: new Set(),
      rootSeen: undefined,
      staleLeaves: [],
      nodes: 0,
      keys: 0,
      data: 0,
    };
    b.gcTrackBegin();
    let slices = 0;
    let maxPause = 0;
    let finished = false;
    try {
      for (;;) {
        if (signal?.aborted === true || this.host.isDisabled()) return;
        if (!btree.lock.tryRead()) await btree.lock.read();
        const s0 = this.clock.now();
        let end: SliceEnd;
        try {
          end = this.slice(st, s0 + this.sliceMs);
          if (end.done) {
            // Install with the lock still held: nothing changes between the walk's end and the install.
            this.finish(st.fresh, b.gcTrackEnd());
            finished = true;
          } else if (end.load) {
            // A node that is not in memory: load it under the lock, as any reader would.
            await btree.getNode(end.load.key, end.load.level);
          }
        } finally {
          btree.lock.releaseRead();
        }
        const pause = this.clock.now() - s0;
        slices++;
        if (pause > maxPause) maxPause = pause;
        if (finished) break;
        // Let requests run between slices (a macrotask turn: I/O callbacks included).
        await this.yieldBetweenSlices();
      }
    } finally {
      if (!finished) b.gcTrackEnd();
    }
    const t1 = monotonicNs();
    this.stats.runs++;
    this.stats.nodes = st.nodes;
    this.stats.keys = st.keys;
    this.stats.data = st.data;
    this.stats.lastDurationMs = (t1 - t0) / 1e6;
    this.stats.lastSlices = slices;
    this.stats.lastMaxPauseMs = maxPause;
    if (maxPause > this.stats.maxPauseMs) this.stats.maxPauseMs = maxPause;
    this.stats.time.update(t0, t1);
    for (const leaf of st.staleLeaves) {
      if (leaf.freed) continue;
      const last = leaf.keys.last();
      const at = last ?? leaf.key;
      if (await btree.compactLeaf(at.inode, Math.max(0, at.offset - 1))) this.stats.rewrites++;
    }
    // (A slice may have seen the signal; it is read again: it can have come during the rewrites.)
    const stopped = (): boolean => signal?.aborted === true || this.host.isDisabled();
    if (this.host.afterPass && !stopped()) await this.host.afterPass(signal);
  }

  /**
   * Mark leaves from the walk's position on, synchronously, until the walk
   * is done, `deadline` (a time of the clock) passes, or a node must be read
   * from disk first. The caller holds the read lock.
   */
  private slice(st: PassState, deadline: number): SliceEnd {
    const { buckets: b, btree } = this.host;
    const fresh = st.fresh;
    for (;;) {
      const root = btree.root;
      if (st.rootSeen !== root) {
        markKey(b, fresh, root.level + 1, root.key);
        st.rootSeen = root;
      }
      const found = btree.cachedLeafAfter(st.inode, st.offset, (node) => {
        if (st.interiorSeen.has(node)) return;
        const level = node.level;
        node.keys.forEach((k) => {
          markKey(b, fresh, level, k);
        });
        st.interiorSeen.add(node);
        st.nodes++;
      });
      if (found === undefined) return { done: true };
      if ('load' in found) return { done: false, load: found.load };
      let stale = 0;
      let n = 0;
      const leaf = found;
      const keys = leaf.keys;
      for (let p = keys.start(); p >= 0; p = keys.next(p)) {
        n++;
        const r = markLeafKeyAt(b, fresh, keys, p);
        if (r === MARK_STALE) stale++;
        else if (r === MARK_LIVE) st.data += keys.sizeAt(p);
      }
      st.keys += n;
      st.nodes++;
      if (stale > 0 && stale * 2 > n) st.staleLeaves.push(leaf);
      if (posCmp(leaf.key.inode, leaf.key.offset, MAX_KEY.inode, MAX_KEY.offset) >= 0) return { done: true };
      st.inode = leaf.key.inode;
      st.offset = leaf.key.offset;
      if (this.clock.now() >= deadline) return { done: false };
    }
  }

  /**
   * bch_btree_gc_finish(): install the fresh marks, except for buckets pinned
   * now or changed during the pass (`changed`), which keep their live state.
   */
  private finish(fresh: MarkArrays, changed: Uint8Array): void {
    const { buckets: b, allocator } = this.host;
    for (const i of this.host.metadataBuckets()) if (i > 0 && i < b.nbuckets) fresh.mark[i] = GC_MARK_METADATA;
    let avail = 0;
    for (let i = 0; i < b.nbuckets; i++) {
      b.lastGc[i] = fresh.lastGc[i] ?? 0;
      if ((b.pin[i] ?? 0) === 0 && changed[i] === 0) {
        b.mark[i] = fresh.mark[i] ?? 0;
        b.used[i] = fresh.used[i] ?? 0;
      }
      if (
        i >= b.firstBucket &&
        (b.pin[i] ?? 0) === 0 &&
        (b.mark[i] === GC_MARK_FREE || b.mark[i] === GC_MARK_RECLAIMABLE)
      ) {
        avail++;
      }
    }
    allocator.avail = avail;
    allocator.gcMarkValid = true;
    allocator.invalidateNeedsGc = false;
    allocator.notify();
  }
}

/**
 * The bring-up counterpart of finish(): marks are already in the live arrays
 * (initial mark); add the metadata outside the btree and count what is
 * available.
 */
export function initialGcFinish(b: Buckets, allocator: Allocator, metadata: Iterable<number>): void {
  for (const i of metadata) if (i > 0 && i < b.nbuckets) b.mark[i] = GC_MARK_METADATA;
  let avail = 0;
  for (let i = b.firstBucket; i < b.nbuckets; i++) {
    if ((b.pin[i] ?? 0) > 0) continue;
    if (b.mark[i] === GC_MARK_FREE || b.mark[i] === GC_MARK_RECLAIMABLE) avail++;
  }
  allocator.avail = avail;
  allocator.gcMarkValid = true;
  allocator.invalidateNeedsGc = false;
}
