// Garbage collection (btree.c bch_btree_gc, "basic"): recompute every bucket's
// mark, sectors used and oldest referenced gen from the btree, so the
// allocator knows what it may invalidate and gens cannot wrap around under a
// live pointer.
//
// One pass holds the btree's lock shared for the whole walk (inserts wait;
// lookups go on) and computes into fresh arrays; buckets pinned meanwhile (in
// flight: free lists, open data buckets, keys written but not inserted) keep
// their live state. The finish (marking journal, prio and uuid buckets as
// metadata, counting what is available) runs without an await in between, so
// nothing changes under it. Leaves that are mostly stale keys are rewritten
// afterwards. Moving GC is not done (the kernel's is off by default).
//
// The worker runs a pass when asked (trigger_gc), when the allocator found
// nothing to invalidate, and when more than nbuckets x bucket_size / 16
// sectors were inserted since the last pass.

import { genAfter, ptrAvailable, type Bkey } from '../format/bkey.ts';
import { Notifier, Worker, errorMessage } from '../util/lifecycle.ts';
import { log } from '../util/log.ts';
import type { Allocator } from './alloc.ts';
import type { Btree } from './btree.ts';
import type { BtreeNode } from './btree-node.ts';
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

export interface MarkArrays {
  mark: Uint8Array;
  used: Uint16Array;
  lastGc: Uint8Array;
}

/**
 * __bch_btree_mark_key(): note the oldest gen the key references, and if its
 * pointers are current, mark their buckets (metadata for node pointers,
 * dirty or reclaimable for data) and count its sectors.
 */
export function markKey(b: Buckets, into: MarkArrays, level: number, k: Bkey): void {
  if (k.inode === 0 && k.offset === 0) return;
  for (const p of k.ptrs) {
    if (!ptrAvailable(p)) continue;
    const i = b.bucketOf(p);
    if (i >= b.nbuckets) continue;
    if (genAfter(into.lastGc[i] ?? 0, p.gen)) into.lastGc[i] = p.gen;
    if (b.stale(p)) continue;
    if (level > 0) into.mark[i] = GC_MARK_METADATA;
    else if (k.dirty) into.mark[i] = GC_MARK_DIRTY;
    else if (into.mark[i] === GC_MARK_FREE) into.mark[i] = GC_MARK_RECLAIMABLE;
    into.used[i] = Math.min((into.used[i] ?? 0) + k.size, MAX_GC_SECTORS_USED);
  }
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
}

export class Gc {
  private readonly host: GcHost;
  private readonly wake = new Notifier();
  private worker: Worker | undefined;
  private requested = false;
  /** Inserted sectors left before pressure triggers a pass (sectors_to_gc). */
  sectorsToGc: number;
  private readonly sectorsBetweenRuns: number;
  private running: Promise<void> | undefined;

  /** A pass is in progress. */
  get inProgress(): boolean {
    return this.running !== undefined;
  }
  private waiters: Array<() => void> = [];
  readonly stats: GcStats = { runs: 0, nodes: 0, keys: 0, data: 0, rewrites: 0, lastDurationMs: 0 };

  constructor(host: GcHost, sectorsBetweenRuns?: number) {
    this.host = host;
    const b = host.buckets;
    this.sectorsBetweenRuns = sectorsBetweenRuns ?? Math.floor((b.nbuckets * b.bucketSize) / 16);
    this.sectorsToGc = this.sectorsBetweenRuns;
  }

  start(): void {
    this.worker = new Worker('bcache_gc', (signal) => this.run(signal), { stopTimeoutMs: 30_000 }).start();
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
        await this.pass();
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
  async pass(): Promise<void> {
    if (this.running) return this.running;
    this.running = this.passInner();
    try {
      await this.running;
    } finally {
      this.running = undefined;
    }
  }

  private async passInner(): Promise<void> {
    const { buckets: b, btree, allocator } = this.host;
    const t0 = Date.now();
    const fresh: MarkArrays = {
      mark: new Uint8Array(b.nbuckets),
      used: new Uint16Array(b.nbuckets),
      lastGc: Uint8Array.from(b.gen),
    };
    const staleLeaves: BtreeNode[] = [];
    let nodes = 0;
    let keys = 0;
    let data = 0;
    await btree.lock.read();
    try {
      allocator.gcMarkValid = false;
      markKey(b, fresh, btree.root.level + 1, btree.root.key);
      await btree.walk((node) => {
        nodes++;
        let stale = 0;
        for (const k of node.keys) {
          keys++;
          markKey(b, fresh, node.level, k);
          if (node.isLeaf) {
            if (k.ptrs.some((p) => b.stale(p) > 0)) stale++;
            else data += k.size;
          }
        }
        if (node.isLeaf && stale > 0 && stale * 2 > node.keys.length) staleLeaves.push(node);
      });
      this.finish(fresh);
    } finally {
      btree.lock.releaseRead();
    }
    this.stats.runs++;
    this.stats.nodes = nodes;
    this.stats.keys = keys;
    this.stats.data = data;
    this.stats.lastDurationMs = Date.now() - t0;
    for (const leaf of staleLeaves) {
      if (leaf.freed) continue;
      const last = leaf.keys[leaf.keys.length - 1];
      const at = last ?? leaf.key;
      await btree.compactLeaf(at.inode, Math.max(0, at.offset - 1));
      this.stats.rewrites++;
    }
  }

  /** bch_btree_gc_finish(): install the fresh marks (pinned buckets keep theirs). */
  private finish(fresh: MarkArrays): void {
    const { buckets: b, allocator } = this.host;
    for (const i of this.host.metadataBuckets()) if (i > 0 && i < b.nbuckets) fresh.mark[i] = GC_MARK_METADATA;
    let avail = 0;
    for (let i = 0; i < b.nbuckets; i++) {
      b.lastGc[i] = fresh.lastGc[i] ?? 0;
      if ((b.pin[i] ?? 0) > 0) continue;
      b.mark[i] = fresh.mark[i] ?? 0;
      b.used[i] = fresh.used[i] ?? 0;
      if (i >= b.firstBucket && (b.mark[i] === GC_MARK_FREE || b.mark[i] === GC_MARK_RECLAIMABLE)) avail++;
    }
    allocator.avail = avail;
    allocator.gcMarkValid = true;
    allocator.invalidateNeedsGc = false;
    this.sectorsToGc = this.sectorsBetweenRuns;
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
