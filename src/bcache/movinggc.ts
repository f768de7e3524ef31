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
// Their live keys are found by a scan of the leaves in slices, as GC's walk
// goes (gc.ts): requests run between slices, the btree's lock is held shared
// only within one (liveKeys).
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
import { makeKey, makePtr, MAX_KEY, posCmp, type Bkey } from '../format/bkey.ts';
import { SECTOR_SIZE } from '../format/constants.ts';
import { allDone, errorMessage, nextTurn } from '../util/lifecycle.ts';
import { realClock, type Clock } from '../util/clock.ts';
import { log } from '../util/log.ts';
import { RESERVE_MOVINGGC, type Allocator } from './alloc.ts';
import type { Btree, InsertResult } from './btree.ts';
import { GC_MARK_DIRTY, GC_MARK_RECLAIMABLE, type Buckets } from './buckets.ts';
import { GC_SLICE_MS } from './gc.ts';
import type { CacheIo } from './io.ts';
import type { Journal, JournalEntry } from './journal.ts';
import { defined } from '../util/assert.ts';

export interface MovingGcHost {
  buckets: Buckets;
  btree: Btree;
  allocator: Allocator;
  journal: Journal;
  io: CacheIo;
  /** copy_gc_enabled. */
  enabled(): boolean;
  isDisabled(): boolean;
  /** The key scan's slices, as GC's walk has them: the clock they are timed by, their length (ms), the yield between. */
  clock?: Clock;
  sliceMs?: number;
  yieldBetweenSlices?: () => Promise<void>;
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
  /** Slices of the last round's key scan (each one a hold of the btree's read lock). */
  lastCollectSlices: number;
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

/** Where the key scan is, and what it found. */
interface CollectState {
  out: Bkey[];
  /** The scan continues with the leaf holding the first key after this position. */
  inode: number;
  offset: number;
}

/** Where a slice of the key scan stopped. */
type CollectEnd = { done: true; load?: undefined } | { done: false; load?: { key: Bkey; level: number } };

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
    lastCollectSlices: 0,
  };

  private running = false;
  private scanning = false;

  /** The key scan is in progress (between the buckets' choice and the first copy). */
  get collecting(): boolean {
    return this.scanning;
  }

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
      this.scanning = true;
      let keys: Bkey[];
      try {
        keys = await this.liveKeys(new Set(chosen), signal);
      } finally {
        this.scanning = false;
      }
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

  /**
   * The live data keys pointing into `buckets` (read_moving's scan), in key
   * order. The scan goes leaf by leaf in slices, as GC's walk does (gc.ts):
   * each slice holds the btree's lock shared only while it reads leaves
   * (synchronously, or to load one node), and gives the event loop back
   * after sliceMs, so requests never wait behind a whole scan. It resumes by
   * position from the root, following splits and rewrites made between
   * slices. Keys inserted behind it never point into the chosen buckets
   * (they are pinned: no new data goes there), and a key collected and then
   * overwritten is caught by its copy's compare-and-insert; a leaf merged
   * with one already read gives back nothing twice (only keys past the
   * position are taken, and no extent crosses a leaf's boundary).
   */
  private async liveKeys(buckets: Set<number>, signal: AbortSignal | undefined): Promise<Bkey[]> {
    const host = this.host;
    const { btree } = host;
    const clock = host.clock ?? realClock;
    const sliceMs = host.sliceMs ?? GC_SLICE_MS;
    const yieldBetween = host.yieldBetweenSlices ?? nextTurn;
    const st: CollectState = { out: [], inode: 0, offset: -1 };
    let slices = 0;
    for (;;) {
      if (signal?.aborted === true || host.isDisabled()) break;
      if (!btree.lock.tryRead()) await btree.lock.read();
      let end: CollectEnd;
      try {
        end = this.collectSlice(buckets, st, clock.now() + sliceMs, clock);
        // A node that is not in memory: load it under the lock, as any reader would.
        if (end.load) await btree.getNode(end.load.key, end.load.level);
      } finally {
        btree.lock.releaseRead();
      }
      slices++;
      if (end.done) break;
      await yieldBetween();
    }
    this.stats.lastCollectSlices = slices;
    return st.out;
  }

  /**
   * Read leaves from the scan's position on, synchronously, until the tree
   * ends, `deadline` (a time of `clock`) passes, or a node must be read from
   * disk first. The caller holds the read lock.
   */
  private collectSlice(buckets: Set<number>, st: CollectState, deadline: number, clock: Clock): CollectEnd {
    const { btree, buckets: b } = this.host;
    for (;;) {
      const node = btree.cachedLeafAfter(st.inode, st.offset);
      if (node === undefined) return { done: true };
      if ('load' in node) return { done: false, load: node.load };
      const keys = node.keys;
      for (let p = keys.seekAfter(st.inode, st.offset); p >= 0; p = keys.next(p)) {
        if (keys.sizeAt(p) === 0 || keys.ptrCountAt(p) === 0) continue;
        if (!buckets.has(Math.floor(keys.ptrOffsetAt(p) / b.bucketSize))) continue;
        const k = keys.keyAt(p);
        if (b.stale(defined(k.ptrs[0], 'k.ptrs.length > 0')) === 0) st.out.push(k);
      }
      if (posCmp(node.key.inode, node.key.offset, MAX_KEY.inode, MAX_KEY.offset) >= 0) return { done: true };
      st.inode = node.key.inode;
      st.offset = node.key.offset;
      if (clock.now() >= deadline) return { done: false };
    }
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
    const p = defined(k.ptrs[0], 'a moving key has a pointer');
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
