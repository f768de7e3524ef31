// Moving (copying) GC (movinggc.c bch_moving_gc, read_moving, write_moving):
// after a GC pass, the data buckets holding little live data have their live
// extents, clean and dirty, copied into fresh buckets from the movinggc
// reserve, so that the emptied buckets can be invalidated and reused.
//
// Choosing, as the kernel does: data buckets (clean or dirty, not metadata)
// that are neither empty nor full by GC_SECTORS_USED and that nobody pins; of
// those, the least used (a bounded heap, 8 x the reserve's size), as many as
// the buckets on the movinggc reserve can take. ubcache also skips a round
// that would not free a bucket (the copies would fill as many buckets as
// they empty): the kernel's copies share open buckets with other writes, ours
// have buckets of their own, and a partly filled one is not topped up later.
//
// Each move is a compare-and-insert of the copy against the exact key it
// was read from (cs.insert with `replace`, as writeback's completion): a write
// that changed the range since wins, and only the part of the range the old
// key still holds is moved. The data is flushed before any copy's key goes in,
// so a key never points at data a power cut could take back.
//
// When a source bucket may be reused. A copy's key is not journaled (it is a
// compare-and-insert). If the bucket it came from were invalidated (its new
// gen durable) while a crash could still replay the journal entry that
// inserted the old key, replay would turn the old key into a hole over the
// copy: dirty data lost. So when dirty keys were moved, the source buckets stay
// pinned until the leaves holding the copies are written and the journal's
// durable last_seq has passed every entry that existed when the copies went
// in. Clean keys need no such wait: a hole over clean data is a miss.

import { IoError } from '../blockdev/types.ts';
import { makeKey, makePtr, type Bkey, type BkeyPtr } from '../format/bkey.ts';
import { SECTOR_SIZE } from '../format/constants.ts';
import { allDone, errorMessage } from '../util/lifecycle.ts';
import { log } from '../util/log.ts';
import { RESERVE_MOVINGGC, type Allocator } from './alloc.ts';
import type { Btree, InsertResult } from './btree.ts';
import { GC_MARK_DIRTY, GC_MARK_RECLAIMABLE, type Buckets } from './buckets.ts';
import type { CacheIo } from './io.ts';
import type { Journal, JournalEntry } from './journal.ts';

export interface MovingGcHost {
  buckets: Buckets;
  btree: Btree;
  allocator: Allocator;
  journal: Journal;
  io: CacheIo;
  /** copy_gc_enabled. */
  enabled(): boolean;
  isDisabled(): boolean;
}

export interface MovingGcStats {
  /** Rounds that moved something. */
  runs: number;
  /** Buckets chosen for moving, over all rounds. */
  bucketsChosen: number;
  /** Keys (whole or in part) and sectors copied and inserted. */
  keysMoved: number;
  sectorsMoved: number;
  /** Copies that lost to a racing write (the kernel's gc_copy_collision trace). */
  collisions: number;
  /** Source buckets made reclaimable. */
  bucketsFreed: number;
  /** Fresh buckets the copies went into. */
  bucketsUsed: number;
  /** Rounds cut short because a leaf rewrite found no node bucket ready. */
  noNodeBuckets: number;
}

/** A bucket copies are written into. */
interface Dest {
  bucket: number;
  gen: number;
  next: number;
  left: number;
  dirty: boolean;
}

/** A copy written, waiting for its key to go in. */
interface Copy {
  key: Bkey;
  expected: Bkey;
}

/** Keys copied per flush and insert round. */
const BATCH_KEYS = 64;
/** Journal commits tried before source buckets are left pinned for the next round. */
const DURABLE_TRIES = 8;

export class MovingGc {
  private readonly host: MovingGcHost;
  /** Sources whose dirty copies were not yet durable at the end of a round: released later. */
  private held: { buckets: number[]; entry: JournalEntry } | undefined;
  readonly stats: MovingGcStats = {
    runs: 0,
    bucketsChosen: 0,
    keysMoved: 0,
    sectorsMoved: 0,
    collisions: 0,
    bucketsFreed: 0,
    bucketsUsed: 0,
    noNodeBuckets: 0,
  };

  private running = false;

  /** A round is in progress (between choosing its buckets and releasing them). */
  get inProgress(): boolean {
    return this.running;
  }

  constructor(host: MovingGcHost) {
    this.host = host;
  }

  /**
   * bch_moving_gc(): choose the buckets by the marks GC just installed,
   * find their live keys, copy them. The caller is the GC worker, after a
   * pass; `signal` is its stop.
   */
  async run(signal?: AbortSignal): Promise<void> {
    const host = this.host;
    if (this.held && !host.isDisabled()) await this.releaseHeld();
    if (!host.enabled() || host.isDisabled() || this.held) return;
    const chosen = this.choose();
    if (chosen.length === 0) return;
    const b = host.buckets;
    for (const i of chosen) b.pinBucket(i);
    this.running = true;
    this.stats.bucketsChosen += chosen.length;
    const dests: Dest[] = [];
    let movedDirty = false;
    let durable = false;
    let entry: JournalEntry | undefined;
    try {
      const keys = await this.liveKeys(new Set(chosen));
      const open: { clean: Dest | undefined; dirty: Dest | undefined } = { clean: undefined, dirty: undefined };
      let room = true;
      for (let at = 0; room && at < keys.length; at += BATCH_KEYS) {
        const copies: Copy[] = [];
        for (const k of keys.slice(at, at + BATCH_KEYS)) {
          if (signal?.aborted === true || host.isDisabled()) room = false;
          else room = await this.copy(k, open, dests, copies);
          if (!room) break;
        }
        if (copies.length === 0) continue;
        // The copies' data durable before any key points at it.
        await host.io.flush();
        for (const c of copies) {
          if (host.isDisabled()) throw new IoError('EIO', 'cache set I/O is disabled');
          const r = await this.insert(c);
          this.stats.collisions += r.collisions;
          if (r.sectors > 0) {
            this.stats.keysMoved++;
            this.stats.sectorsMoved += r.sectors;
            if (c.key.dirty) movedDirty = true;
          }
          if (!r.done) {
            // A leaf to rewrite and no node bucket ready: the round ends here (see insert()).
            this.stats.noNodeBuckets++;
            room = false;
            break;
          }
        }
      }
      if (movedDirty) {
        entry = host.journal.openEntry;
        durable = await this.makeDurable(entry);
      } else {
        durable = true;
      }
    } catch (err) {
      // A failed read or write ends the round; the set's error accounting has seen it.
      if (!host.isDisabled()) log.warn(`bcache: moving gc: ${errorMessage(err)}`);
      if (!movedDirty) durable = true;
      else entry ??= host.journal.openEntry;
    } finally {
      this.running = false;
      this.finish(chosen, dests, durable ? undefined : entry);
    }
  }

  /**
   * Compare-and-insert one copy against the key it was read from (the
   * unjournaled insert writeback's completion does), except that a leaf
   * rewrite never waits for node buckets: the GC worker runs this, and the
   * allocator may be waiting for the next GC pass to refill the btree
   * reserve. `done` is false when the copy could not go in for that reason.
   */
  private async insert(c: Copy): Promise<InsertResult & { done: boolean }> {
    const btree = this.host.btree;
    const result: InsertResult = { sectors: 0, collisions: 0, inserted: [] };
    const options = { replace: c.expected, bucketsNow: true };
    let left = btree.insertNow([c.key], options, result);
    if (left.length > 0) left = await btree.insertRest(left, options, result);
    return { ...result, done: left.length === 0 };
  }

  /** Buckets to move: the least used data buckets whose live data fits the reserve. */
  private choose(): number[] {
    const { buckets: b, allocator } = this.host;
    const reserve = allocator.free[RESERVE_MOVINGGC];
    const reserveSectors = reserve.length * b.bucketSize;
    if (reserveSectors === 0) return [];
    const cap = reserve.capacity * 8;
    // Candidates sorted by sectors used, the cap smallest kept (a sort is fine: run once per pass).
    const cand: Array<{ i: number; used: number }> = [];
    for (let i = b.firstBucket; i < b.nbuckets; i++) {
      const m = b.mark[i];
      if (m !== GC_MARK_DIRTY && m !== GC_MARK_RECLAIMABLE) continue;
      const used = b.used[i] ?? 0;
      if (used === 0 || used >= b.bucketSize || (b.pin[i] ?? 0) !== 0) continue;
      cand.push({ i, used });
    }
    cand.sort((x, y) => x.used - y.used || x.i - y.i);
    const out: number[] = [];
    let sectors = 0;
    for (const c of cand.slice(0, cap)) {
      if (sectors + c.used > reserveSectors) break;
      sectors += c.used;
      out.push(c.i);
    }
    // Worth it only if the copies fill fewer buckets than they empty.
    if (Math.ceil(sectors / b.bucketSize) >= out.length) return [];
    return out;
  }

  /** The live data keys pointing into `buckets` (read_moving's scan), in key order. */
  private async liveKeys(buckets: Set<number>): Promise<Bkey[]> {
    const { btree, buckets: b } = this.host;
    const out: Bkey[] = [];
    if (!btree.lock.tryRead()) await btree.lock.read();
    try {
      await btree.walk((node) => {
        if (!node.isLeaf) return;
        node.keys.forEach((k) => {
          if (k.size === 0 || k.ptrs.length === 0) return;
          const p = k.ptrs[0] as BkeyPtr;
          if (buckets.has(b.bucketOf(p)) && b.stale(p) === 0) out.push(k);
        });
      });
    } finally {
      btree.lock.releaseRead();
    }
    return out;
  }

  /**
   * Read key `k`'s data and write it into destination buckets, a piece per
   * bucket it lands in; false when no bucket is left for it.
   */
  private async copy(
    k: Bkey,
    open: { clean: Dest | undefined; dirty: Dest | undefined },
    dests: Dest[],
    copies: Copy[],
  ): Promise<boolean> {
    const host = this.host;
    const b = host.buckets;
    const p = k.ptrs[0] as BkeyPtr;
    // The source is pinned: nothing can reuse it under the read, but the key may have gone stale before.
    if (b.stale(p) !== 0) return true;
    const data = Buffer.allocUnsafe(k.size * SECTOR_SIZE);
    await host.io.read(data, p.offset);
    const start = k.offset - k.size;
    let done = 0;
    while (done < k.size) {
      let d = k.dirty ? open.dirty : open.clean;
      if (!d || d.left === 0) {
        const bucket = host.allocator.allocNow(RESERVE_MOVINGGC);
        if (bucket < 0) return false;
        d = { bucket, gen: b.gen[bucket] ?? 0, next: b.sector(bucket), left: b.bucketSize, dirty: k.dirty };
        // A bucket of dirty copies is dirty from the start: never invalidated while it holds them.
        if (k.dirty) b.mark[bucket] = GC_MARK_DIRTY;
        dests.push(d);
        if (k.dirty) open.dirty = d;
        else open.clean = d;
      }
      const n = Math.min(d.left, k.size - done);
      await host.io.write(data.subarray(done * SECTOR_SIZE, (done + n) * SECTOR_SIZE), d.next);
      const piece = makeKey(k.inode, start + done + n, n, k.dirty, [makePtr(p.dev, d.next, d.gen)]);
      copies.push({ key: piece, expected: k });
      d.next += n;
      d.left -= n;
      done += n;
    }
    return true;
  }

  /**
   * Until no crash can bring back an old key of a source bucket: the leaves
   * holding the copies written, then journal commits until the durable
   * last_seq is past every entry that existed when the copies went in.
   */
  private async makeDurable(entry: JournalEntry): Promise<boolean> {
    const { btree, journal } = this.host;
    await allDone(btree.dirtyNodes().map((n) => btree.writeNode(n)));
    // A commit of the open entry: its first flush covers those node writes, and `entry` is durable after it.
    await journal.commit();
    for (let i = 0; i < DURABLE_TRIES; i++) {
      if (journal.replayFrom > entry.seq) return true;
      await allDone(btree.nodesPinning(entry, Number.MAX_SAFE_INTEGER).map((n) => btree.writeNode(n)));
      await journal.commit();
    }
    return journal.replayFrom > entry.seq;
  }

  /** Release the destinations and the sources, or hold the sources until `pending` is past replay. */
  private finish(chosen: number[], dests: Dest[], pending: JournalEntry | undefined): void {
    const { buckets: b, allocator } = this.host;
    for (const d of dests) {
      const written = b.bucketSize - d.left;
      if (written === 0) {
        allocator.unalloc(d.bucket, RESERVE_MOVINGGC);
        continue;
      }
      b.setUsed(d.bucket, written);
      this.stats.bucketsUsed++;
      b.unpinBucket(d.bucket);
    }
    if (dests.length > 0) this.stats.runs++;
    if (pending && !this.host.isDisabled()) {
      this.held = { buckets: chosen, entry: pending };
      return;
    }
    this.releaseSources(chosen);
  }

  /** Sources held over from a round whose copies were not yet durable: released once they are. */
  private async releaseHeld(): Promise<void> {
    const held = this.held;
    if (!held) return;
    // The round may have ended before its leaves were written: the whole wait again.
    if (!(await this.makeDurable(held.entry))) return;
    this.held = undefined;
    this.releaseSources(held.buckets);
  }

  private releaseSources(chosen: number[]): void {
    const { buckets: b, allocator } = this.host;
    for (const i of chosen) {
      b.unpinBucket(i);
      // A source whose dirty keys all moved holds nothing a crash could need: reclaimable.
      if ((b.pin[i] ?? 0) === 0 && (b.dirty[i] ?? 0) === 0) {
        b.noteChange(i);
        b.mark[i] = GC_MARK_RECLAIMABLE;
        b.setUsed(i, 0);
        this.stats.bucketsFreed++;
      }
    }
    let avail = 0;
    for (let i = b.firstBucket; i < b.nbuckets; i++) if (b.isAvailable(i)) avail++;
    allocator.avail = avail;
    allocator.notify();
  }
}
