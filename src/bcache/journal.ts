// The journal: a ring of buckets (sb.d[]) holding jsets, written by one
// Worker with group commit (docs/engine.md §6).
//
// Entries. Keys are added to the open entry; the caller gets the entry as a
// pin and drops it once the keys are in a leaf (which takes its own pin until
// it is written and flushed, R5). An entry's seq is assigned when its jset is
// written, so that a header-only entry can be written ahead of it when the
// ring needs one (below); entries are ordered by creation meanwhile.
//
// Group commit. The worker writes the open entry `journalDelayMs` after its
// first key, or at once when someone waits on it (FLUSH, FUA, metadata
// changes); waiters that arrive while it is being written wait for the next
// one, and all waiters of one entry share its write. A jset write is R1:
// flush, write, flush. `last_seq` is taken after the first flush, so node
// writes that flush covered already count.
//
// The ring. A bucket is reused only when every entry in it is older than the
// last_seq of a *durable* jset: reusing it on the strength of an in-memory
// last_seq (as the kernel does) would leave, after a crash at that moment, a
// newest durable jset asking to replay entries that are gone. Keyed entries
// leave the last block of each bucket free, so that when the next bucket can
// only be freed by a newer last_seq, a header-only entry can carry it.
// Writing resumes, after bring-up, at the start of the bucket after the one
// holding the newest entry, as the kernel does.

import { keysU64s, type Bkey } from '../format/bkey.ts';
import { BCACHE_JSET_VERSION, JSET_MAX_BYTES, MAX_CACHES_PER_SET, SECTOR_SIZE } from '../format/constants.ts';
import { FormatError } from '../format/errors.ts';
import {
  decodeJset,
  encodeJset,
  JSET_HEADER_BYTES,
  jsetBytes,
  jsetMagic,
  missingJournalRanges,
  scanJournalBucket,
  selectReplayEntries,
  type JournalBucketScan,
  type Jset,
} from '../format/jset.ts';
import { IoError } from '../blockdev/types.ts';
import { allDone, deferred, errorMessage, Mutex, Notifier, Worker, type Deferred } from '../util/lifecycle.ts';
import { realClock, type Clock } from '../util/clock.ts';
import { log } from '../util/log.ts';
import type { BtreeNode, JournalPin } from './btree-node.ts';
import type { CacheIo } from './io.ts';
import { defined } from '../util/assert.ts';

let entryOrder = 0;

export class JournalEntry implements JournalPin {
  readonly order = ++entryOrder;
  /** Assigned when the jset is written (or read). */
  seq = 0;
  keys: Bkey[] = [];
  u64s = 0;
  /** The entry's own reference (until written), callers' and leaves' pins. */
  pins = 1;
  durable = false;
  /** Someone waits: write at once. */
  urgent = false;
  /** When the first key arrived plus the delay. */
  deadline = 0;
  waiters: Deferred<void>[] = [];
  /** Run once the entry is durable (old buckets freed after a rewrite). */
  after: Array<() => void> = [];
}

/** What a jset header records: the current (durable) metadata pointers. */
export interface JournalHeader {
  root: Bkey;
  level: number;
  uuidBucket: Bkey;
  prioBucket: number;
  /**
   * The flush after which every node the root leads to is durable (R2): a
   * rewrite swaps its new nodes in once their writes complete, without a
   * flush of its own, and the jset that first points at them is written only
   * once a flush has covered them (flushForJset). 0 or absent: nothing waits.
   */
  durableAfter?: number;
}

export interface JournalHost {
  io: CacheIo;
  setMagic: bigint;
  blockSize: number;
  bucketSize: number;
  /** False until the set is initialised (CACHE_SYNC): nothing is journaled before. */
  cacheSync(): boolean;
  header(): JournalHeader;
  /** Dirty leaves pinning `entry` or older. */
  nodesPinning(entry: JournalPin, max: number): BtreeNode[];
  writeNode(node: BtreeNode): Promise<void>;
  fail(err: unknown): void;
  isDisabled(): boolean;
  /** Whose time group-commit deadlines are measured in (default: real time). */
  clock?: Clock;
}

export interface JournalReadResult {
  /** The entries to replay, oldest first (last_seq of the newest to the newest). */
  replay: Jset[];
  newest: Jset;
  /** Highest seq found in each ring bucket (0: none). */
  bucketSeq: number[];
}

export interface JournalStats {
  entriesWritten: number;
  metaEntries: number;
  keysWritten: number;
  reclaimedBuckets: number;
  nodeFlushes: number;
  /** Times the journal had to look for room (the kernel's journal_reclaim runs: `reclaim`). */
  reclaims: number;
}

export class Journal {
  private readonly host: JournalHost;
  /** Bucket numbers of the ring (sb.d[]). */
  readonly ring: readonly number[];
  private readonly bucketSeq: number[];
  private cur = 0;
  private last = 0;
  private blocksFree = 0;
  private writeSector = 0;
  private readonly bucketBlocks: number;
  private readonly blockSectors: number;
  private readonly maxEntryBlocks: number;
  private lastAssigned = 0;
  private writesStarted = 0;
  private writesDone = 0;
  private durableLastSeq = 0;
  /** Entries not yet reclaimed, oldest first; the open entry is last. */
  private readonly live: JournalEntry[] = [];
  private open: JournalEntry;
  /** Jset writes are serialized. */
  private readonly writeLock = new Mutex();
  private readonly afterFlush: Array<{ entry: JournalPin; epoch: number }> = [];
  private readonly wake: Notifier;
  private readonly clock: Clock;
  private readonly nodeQueue = new Set<BtreeNode>();
  /** Queued appends waiting to ride on the next commit (run()). */
  private readonly heldNodes = new Set<BtreeNode>();
  private worker: Worker | undefined;
  private dead: Error | undefined;
  /**
   * Normal writes leave the last free ring bucket alone; bring-up may use it,
   * since replay can need journal writes while the ring is still full of the
   * entries it is replaying (the kernel's 2022 journal-replay deadlock fix).
   */
  reserveOpen = false;
  delayMs: number;
  readonly stats: JournalStats = {
    entriesWritten: 0,
    metaEntries: 0,
    keysWritten: 0,
    reclaimedBuckets: 0,
    nodeFlushes: 0,
    reclaims: 0,
  };

  constructor(host: JournalHost, ring: readonly number[], delayMs: number) {
    if (ring.length === 0) throw new Error('journal: no journal buckets');
    this.host = host;
    this.clock = host.clock ?? realClock;
    this.wake = new Notifier(this.clock);
    this.ring = ring;
    this.bucketSeq = ring.map(() => 0);
    this.bucketBlocks = host.bucketSize / host.blockSize;
    this.blockSectors = host.blockSize;
    const blockBytes = host.blockSize * 512;
    const reserve = this.bucketBlocks > 1 ? 1 : 0;
    this.maxEntryBlocks = Math.min(Math.floor(JSET_MAX_BYTES / blockBytes), this.bucketBlocks - reserve);
    this.delayMs = delayMs;
    this.open = new JournalEntry();
    this.live.push(this.open);
    host.io.onFlushed((epoch) => {
      this.flushed(epoch);
    });
  }

  /**
   * Read the ring at bring-up and pick the entries to replay by the kernel's
   * rules (selectReplayEntries). Only the replayed entries need their keys: a
   * ring of 256 buckets can hold hundreds of thousands of keys already in
   * written nodes, and decoding them all was most of a large cache's bring-up.
   *
   * Reading the whole ring is needless too (a 256 GiB cache's is 128 MiB), so
   * the first try reads one block of each bucket: its first entry's header
   * (a bucket is always written from its start, so that is the oldest entry
   * of the bucket's latest use). The bucket whose first entry is newest holds
   * the newest entry; its last_seq says which buckets hold entries to replay,
   * and only those are read whole and checked. Anything that does not add up
   * (no entry where a header promised one, a gap in the seqs) falls back to
   * reading and checking every bucket, as the kernel's linear search does;
   * that path also gives the errors.
   */
  static async read(
    io: CacheIo,
    ring: readonly number[],
    g: { bucketSize: number; blockSize: number; setMagic: bigint },
  ): Promise<JournalReadResult | undefined> {
    const first = await probeFirstSeqs(io, ring, g);
    const byFirst = ring.map((_, i) => i).filter((i) => (first[i] ?? 0) > 0);
    byFirst.sort((a, b) => (first[a] ?? 0) - (first[b] ?? 0));
    const newestIdx = byFirst[byFirst.length - 1];
    if (newestIdx !== undefined) {
      const top = await Journal.scanBuckets(io, ring, g, [newestIdx]);
      const newest = top.entries.reduce<Jset | undefined>((n, j) => (!n || j.seq > n.seq ? j : n), undefined);
      if (newest) {
        // The buckets whose entries may reach last_seq: those whose successor in seq order starts after it.
        const window = byFirst.filter((idx, k) => {
          const next = byFirst[k + 1];
          return next === undefined || (first[next] ?? 0) > newest.lastSeq;
        });
        const got = await Journal.scanBuckets(io, ring, g, window);
        // A bucket not read whole counts by its first entry: older than last_seq, it is free for reuse all the same.
        const bucketSeq = ring.map((_, i) => got.maxSeq.get(i) ?? first[i] ?? 0);
        const r = await Journal.pickReplay(io, g, got, bucketSeq, false);
        if (r) return r;
      }
    }
    const all = await Journal.scanBuckets(
      io,
      ring,
      g,
      ring.map((_, i) => i),
    );
    return Journal.pickReplay(
      io,
      g,
      all,
      ring.map((_, i) => all.maxSeq.get(i) ?? 0),
      true,
    );
  }

  /** Scan the ring buckets at `indices` whole (as far as their entries go), JOURNAL_READS at a time. */
  private static async scanBuckets(
    io: CacheIo,
    ring: readonly number[],
    g: { bucketSize: number; blockSize: number; setMagic: bigint },
    indices: readonly number[],
  ): Promise<RingScan> {
    const out: RingScan = { entries: [], where: new Map(), scanned: new Map(), maxSeq: new Map() };
    for (let i = 0; i < indices.length; i += JOURNAL_READS) {
      const batch = indices.slice(i, i + JOURNAL_READS);
      const reads = await Promise.all(
        batch.map((idx) => readJournalBucket(io, ring[idx] ?? 0, g).then((r) => ({ idx, ...r }))),
      );
      for (const { idx, scan, bytes } of reads) {
        const bucket = ring[idx] ?? 0;
        out.scanned.set(bucket, bytes);
        let max = 0;
        scan.entries.forEach((j, k) => {
          out.entries.push(j);
          out.where.set(j, { bucket, offset: scan.offsets[k] ?? 0 });
          max = Math.max(max, j.seq);
        });
        out.maxSeq.set(idx, max);
      }
    }
    return out;
  }

  /**
   * The replay list from scanned headers: the entries decoded with their
   * keys. undefined when there is nothing to replay, or (not `final`) when
   * the seqs have a gap, for the caller to read the whole ring; `final`
   * throws the kernel's "journal entries missing" instead.
   */
  private static async pickReplay(
    io: CacheIo,
    g: { bucketSize: number; setMagic: bigint },
    s: RingScan,
    bucketSeq: number[],
    final: boolean,
  ): Promise<JournalReadResult | undefined> {
    const headers = selectReplayEntries(s.entries);
    const last = headers[headers.length - 1];
    if (!last) return undefined;
    const gap = missingJournalRanges(headers)[0];
    if (gap) {
      if (!final) return undefined;
      throw new FormatError(
        'jset',
        'seq',
        `journal entries ${gap[0]}-${gap[1]} missing! (replaying ${last.lastSeq}-${last.seq})`,
      );
    }
    const replay: Jset[] = [];
    let loaded = -1;
    let buf = Buffer.alloc(0);
    for (const h of headers) {
      const at = s.where.get(h);
      if (!at) throw new Error(`journal: entry ${h.seq} lost its place`);
      if (at.bucket !== loaded) {
        // As far as the scan found entries: every replayed entry lies within that.
        buf = Buffer.allocUnsafe(s.scanned.get(at.bucket) ?? g.bucketSize * SECTOR_SIZE);
        await io.read(buf, at.bucket * g.bucketSize);
        loaded = at.bucket;
      }
      replay.push(decodeJset(buf, at.offset, { setMagic: g.setMagic }));
    }
    const newest = replay[replay.length - 1];
    if (!newest) return undefined;
    return { replay, newest, bucketSeq };
  }

  /**
   * Continue after reading: the replayed entries stay pinned (one reference
   * each, dropped by replayed()) and writing resumes in the bucket after the
   * newest entry's.
   */
  resume(r: JournalReadResult): JournalEntry[] {
    const open = this.live.pop();
    const replay: JournalEntry[] = [];
    for (const j of r.replay) {
      const e = new JournalEntry();
      e.seq = j.seq;
      e.durable = true;
      e.keys = j.keys;
      replay.push(e);
      this.live.push(e);
    }
    if (open) {
      // Its creation order must follow the replayed entries'.
      this.open = new JournalEntry();
      this.live.push(this.open);
    }
    r.bucketSeq.forEach((s, i) => (this.bucketSeq[i] = s));
    let newestIdx = 0;
    for (let i = 0; i < this.bucketSeq.length; i++) {
      if ((this.bucketSeq[i] ?? 0) > (this.bucketSeq[newestIdx] ?? 0)) newestIdx = i;
    }
    this.cur = newestIdx;
    this.last = (newestIdx + 1) % this.ring.length;
    this.blocksFree = 0;
    this.lastAssigned = r.newest.seq;
    this.durableLastSeq = r.newest.lastSeq;
    return replay;
  }

  /**
   * Entries taken for writing so far. Whatever is journaled now goes into
   * the write after these, so it is durable once `writesDone` exceeds this
   * value as read now (or any later reading: a larger value only asks for
   * more). Cheaper to keep than entry objects: writeback stamps buckets with
   * it (CacheSet.makeDirtyDurable).
   */
  get writeGeneration(): number {
    return this.writesStarted;
  }

  /** Entry writes completed (in order). */
  get writesCompleted(): number {
    return this.writesDone;
  }

  /** The seq of the newest durable entry. */
  get seq(): number {
    return this.lastAssigned;
  }

  /** Entries not yet reclaimed, the open one included (active_journal_entries: fifo_used(&journal.pin)). */
  get activeEntries(): number {
    return this.live.length;
  }

  /** The open entry (tests, stats). */
  get openEntry(): JournalEntry {
    return this.open;
  }

  start(): void {
    this.worker = new Worker('bcache_journal', (signal) => this.run(signal), {
      stopTimeoutMs: 30_000,
      clock: this.clock,
    }).start();
  }

  async stop(): Promise<void> {
    await this.worker?.stop();
    this.worker = undefined;
  }

  // ---------------------------------------------------------------------------
  // Pins

  pin(e: JournalPin): void {
    e.pins++;
  }

  /** last_seq of the newest durable jset: a crash now replays the entries from this seq on. */
  get replayFrom(): number {
    return this.durableLastSeq;
  }

  unpin(e: JournalPin): void {
    if (e.pins <= 0) throw new Error(`journal: entry ${e.order} unpinned more often than pinned`);
    e.pins--;
    if (e.pins === 0) {
      this.reclaimEntries();
      this.wake.notify();
    }
  }

  unpinAfterFlush(e: JournalPin, epoch: number): void {
    if (this.host.io.durableEpoch >= epoch) this.unpin(e);
    else this.afterFlush.push({ entry: e, epoch });
  }

  private flushed(epoch: number): void {
    if (this.afterFlush.length === 0) return;
    const keep: Array<{ entry: JournalPin; epoch: number }> = [];
    const release: JournalPin[] = [];
    for (const a of this.afterFlush) {
      if (a.epoch <= epoch) release.push(a.entry);
      else keep.push(a);
    }
    this.afterFlush.length = 0;
    this.afterFlush.push(...keep);
    for (const e of release) this.unpin(e);
  }

  /** Drop unpinned durable entries from the front. */
  private reclaimEntries(): void {
    while (this.live.length > 1) {
      const e = defined(this.live[0], 'live.length > 1');
      if (e.pins > 0 || !e.durable) break;
      this.live.shift();
    }
  }

  /**
   * last_seq for a jset written now with seq `seq`: the oldest entry anyone
   * still needs (an unwritten one counts as `seq`), never after `seq`.
   */
  private lastSeqFor(seq: number): number {
    for (const e of this.live) {
      if (e.pins > 0) return Math.min(e.seq === 0 ? seq : e.seq, seq);
    }
    return seq;
  }

  /** Oldest entry still pinned. */
  private oldestPinned(): JournalEntry | undefined {
    for (const e of this.live) if (e.pins > 0) return e;
    return undefined;
  }

  // ---------------------------------------------------------------------------
  // Adding keys and committing

  private check(): void {
    if (this.dead) throw this.dead;
    if (this.host.isDisabled()) throw new IoError('EIO', 'journal: cache set I/O is disabled');
  }

  private blocksFor(u64s: number): number {
    return Math.ceil(jsetBytes(u64s) / (this.host.blockSize * 512));
  }

  /**
   * Add keys to the open entry and return it, pinned: the caller unpins it
   * once the keys are in the btree. Waits if the open entry is full.
   */
  async add(keys: readonly Bkey[]): Promise<JournalEntry> {
    const u64s = keysU64s(keys);
    if (this.blocksFor(u64s) > this.maxEntryBlocks) {
      throw new RangeError(`journal: ${keys.length} keys (${u64s} u64s) do not fit one journal entry`);
    }
    for (;;) {
      const o = this.addNow(keys, u64s);
      if (o) return o;
      await this.commit(this.open);
    }
  }

  /**
   * add() when the keys fit in the open entry: the entry, pinned, at once;
   * undefined when it is full (add() waits for its commit then).
   */
  addNow(keys: readonly Bkey[], u64s = keysU64s(keys)): JournalEntry | undefined {
    this.check();
    const o = this.open;
    if (this.blocksFor(o.u64s + u64s) > this.maxEntryBlocks) return undefined;
    for (const k of keys) o.keys.push(k);
    o.u64s += u64s;
    o.pins++;
    if (o.deadline === 0) {
      o.deadline = this.clock.now() + this.delayMs;
      this.wake.notify();
    }
    return o;
  }

  /**
   * Wait until `entry` (default: the open entry) is durable; it is written at
   * once. With no keys in it, this writes a header-only entry (a FLUSH does).
   */
  async commit(entry: JournalEntry = this.open): Promise<void> {
    if (entry.durable) return;
    this.check();
    const d = deferred();
    entry.waiters.push(d);
    entry.urgent = true;
    this.wake.notify();
    if (!this.worker) {
      // Bring-up and teardown: no worker, write in the caller.
      await this.writeOpen();
    }
    await d.promise;
  }

  /** Run `fn` once an entry written from now on is durable; that entry goes out soon. */
  afterCommit(fn: () => void): void {
    this.open.after.push(fn);
    this.open.urgent = true;
    this.wake.notify();
  }

  /** Write these leaves' appends, all at once (each waits for the flush its keys need). */
  private async writeNodes(nodes: readonly BtreeNode[]): Promise<void> {
    await allDone(nodes.map((n) => this.host.writeNode(n)));
  }

  /** Queue a leaf for writing by the journal worker. */
  queueNode(node: BtreeNode): void {
    this.nodeQueue.add(node);
    this.wake.notify();
  }

  private async run(signal: AbortSignal): Promise<void> {
    while (!signal.aborted && !this.dead) {
      if (this.nodeQueue.size > 0) {
        const now: BtreeNode[] = [];
        for (const n of this.nodeQueue) {
          // An append needs a flush after its newest key went in (the data
          // of its keys, BtreeNode.pendingDataEpoch). With keys waiting for
          // a commit, it rides on that commit, whose first flush is one
          // (within journal_delay_ms); written now, it would cost a flush of
          // its own, and under random writes a batch of appends is queued
          // every few milliseconds.
          if (this.open.keys.length > 0 && n.pendingDataEpoch > this.host.io.durableEpoch) this.heldNodes.add(n);
          else now.push(n);
        }
        this.nodeQueue.clear();
        if (now.length > 0) {
          try {
            await this.writeNodes(now);
          } catch (err) {
            this.die(err);
            return;
          }
        }
        continue;
      }
      const o = this.open;
      const due = o.urgent || (o.keys.length > 0 && this.clock.now() >= o.deadline);
      if (due && !this.writeLock.isLocked) {
        const held = [...this.heldNodes];
        this.heldNodes.clear();
        await this.writeOpen(signal, held);
        await this.reclaimEarly();
        continue;
      }
      const timeout = o.keys.length > 0 && !o.urgent ? Math.max(0, o.deadline - this.clock.now()) : undefined;
      await this.wake.wait(signal, timeout);
    }
  }

  /**
   * Write the open entry (rotating in a new one first), and leaf appends
   * `nodes` alongside it; serialized with other writes.
   */
  private async writeOpen(signal?: AbortSignal, nodes: readonly BtreeNode[] = []): Promise<void> {
    const release = await this.writeLock.lock();
    try {
      if (this.dead) return;
      const w = this.open;
      if (!w.urgent && w.keys.length === 0) {
        // Another write took the entry meanwhile: the appends go out on their own.
        try {
          await this.writeNodes(nodes);
        } catch (err) {
          this.die(err);
        }
        return;
      }
      this.writesStarted++;
      this.open = new JournalEntry();
      this.live.push(this.open);
      try {
        await this.writeEntry(w, signal, nodes);
      } catch (err) {
        this.die(err);
      }
    } finally {
      release();
      this.wake.notify();
    }
  }

  /**
   * The set failed (CacheSet.fail): every commit waiting now fails with it.
   * Its worker is about to be stopped by the retire, so nothing else would
   * settle them (the simulator, seed 14: a FLUSH caught by a failure that a
   * btree node write reported hung for good).
   */
  failWaiters(err: Error): void {
    for (const e of this.live) {
      for (const d of e.waiters) d.reject(err);
      e.waiters = [];
    }
  }

  private die(err: unknown): void {
    if (!this.dead) {
      this.dead = err instanceof Error ? err : new Error(errorMessage(err));
      this.host.fail(err);
    }
    for (const e of this.live) {
      for (const d of e.waiters) d.reject(this.dead);
      e.waiters = [];
    }
  }

  /**
   * Make room for `blocks` in the ring, then write `w` as an R1 commit. Leaf
   * appends `nodes` are taken once the room is made and written after the
   * commit's first flush, which covers their keys' data as it covers the
   * entry's (one flush for both).
   */
  private async writeEntry(w: JournalEntry, signal?: AbortSignal, nodes: readonly BtreeNode[] = []): Promise<void> {
    // Every key in `w` went in before the rotation that just happened: a flush from now on covers their data.
    const cover = this.host.io.nextFlushEpoch;
    if (!this.host.cacheSync()) {
      // Nothing is journaled before the set is initialised (bch_journal without CACHE_SYNC).
      await this.writeNodes(nodes);
      this.finish(w);
      return;
    }
    const blocks = this.blocksFor(w.u64s);
    // Every entry leaves the last block of its bucket free for the header-only entry makeRoom may need.
    await this.makeRoom(blocks + (this.bucketBlocks > 1 ? 1 : 0), signal);
    // Each append starts the flush it needs (or joins one started since its snapshot); the jset's joins it.
    const appends = this.writeNodes(nodes);
    let failure: unknown;
    try {
      await this.flushForJset(cover);
      await this.writeJset(w, blocks);
      await this.host.io.flush();
    } catch (err) {
      failure = err;
    }
    try {
      await appends;
    } catch (err) {
      failure ??= err;
    }
    if (failure !== undefined) throw failure instanceof Error ? failure : new Error(errorMessage(failure));
    this.finish(w);
  }

  private finish(w: JournalEntry): void {
    // Writes finish in the order they start (writeLock).
    this.writesDone++;
    w.durable = true;
    for (const d of w.waiters) d.resolve();
    w.waiters = [];
    const after = w.after;
    w.after = [];
    for (const fn of after) fn();
    this.unpin(w);
  }

  /**
   * Past half the ring, write the leaves pinning the oldest entry now rather
   * than when the ring is full: a crash then rarely finds the ring full of
   * entries to replay.
   *
   * Not during journal replay (reserveOpen): the ring is then as full as the
   * crash left it, so every commit (each allocator round's prio write has
   * one) wrote the leaves that replay had just put keys in, one write each.
   * A node takes as many writes as it has blocks before it must be
   * rewritten into a fresh bucket; with nodes of two blocks (8 KiB buckets,
   * 4 KiB blocks) nearly every replayed key cost a rewrite, the rewrites
   * drained the replay pool, the allocator's rounds spent the ring's last
   * blocks on their commits, and replay, allocator and journal waited on
   * each other: bring-up never ended (the simulator, soak workload seed 2:
   * 96 rewrites for 234 keys). Replay still reclaims as makeRoom needs.
   */
  private async reclaimEarly(): Promise<void> {
    if (this.dead || this.reserveOpen || this.bucketsInUse * 2 <= this.ring.length) return;
    const oldest = this.oldestPinned();
    if (!oldest) return;
    const nodes = this.host.nodesPinning(oldest, 8);
    if (nodes.length === 0) return;
    try {
      await this.writeNodes(nodes);
    } catch (err) {
      this.die(err);
    }
  }

  /**
   * R1's first flush, and R2's: one that started after the entry was
   * closed (`cover`: its keys' data completed before that), shared with
   * the appends riding on the commit or any other flush started since; and
   * the jset about to be encoded points at the root of now, so the nodes
   * swapped in by a rewrite must be durable first.
   * A rewrite that completed its node writes before this flush started is
   * covered by it; one that swapped in while it ran needs one more (rare:
   * the swap must land in the flush's few milliseconds). writeJset encodes
   * the header synchronously after the last check, so nothing swaps between.
   */
  private async flushForJset(cover: number): Promise<void> {
    const io = this.host.io;
    await io.flushTo(cover);
    while ((this.host.header().durableAfter ?? 0) > io.durableEpoch) await io.flush();
  }

  private async writeJset(w: JournalEntry, blocks: number): Promise<void> {
    w.seq = ++this.lastAssigned;
    const h = this.host.header();
    const prio = new Array<number>(MAX_CACHES_PER_SET).fill(0);
    prio[0] = h.prioBucket;
    const lastSeq = this.lastSeqFor(w.seq);
    const buf = encodeJset(
      {
        seq: w.seq,
        lastSeq,
        version: BCACHE_JSET_VERSION,
        uuidBucket: h.uuidBucket,
        btreeRoot: h.root,
        btreeLevel: h.level,
        prioBucket: prio,
        keys: w.keys,
      },
      { setMagic: this.host.setMagic, blockBytes: this.host.blockSize * 512 },
    );
    if (buf.length / (this.host.blockSize * 512) !== blocks || blocks > this.blocksFree) {
      throw new Error(`journal: entry ${w.seq} takes ${blocks} blocks, ${this.blocksFree} free`);
    }
    await this.host.io.writeMeta(buf, this.writeSector);
    this.writeSector += blocks * this.blockSectors;
    this.blocksFree -= blocks;
    this.bucketSeq[this.cur] = w.seq;
    this.durableLastSeq = lastSeq;
    this.stats.entriesWritten++;
    this.stats.keysWritten += w.keys.length;
    if (w.keys.length === 0) this.stats.metaEntries++;
  }

  /** A ring bucket whose entries no durable jset needs any more. */
  private bucketFree(i: number): boolean {
    const s = this.bucketSeq[i] ?? 0;
    return s === 0 || s < this.durableLastSeq;
  }

  private async makeRoom(blocks: number, signal?: AbortSignal): Promise<void> {
    for (;;) {
      if (this.blocksFree >= blocks) return;
      this.stats.reclaims++;
      const n = this.ring.length;
      while (this.last !== this.cur && this.bucketFree(this.last)) this.last = (this.last + 1) % n;
      const next = (this.cur + 1) % n;
      const free = n - 1 - ((this.cur - this.last + n) % n);
      if (next !== this.last && (free >= 2 || this.reserveOpen || n < 3)) {
        this.cur = next;
        this.bucketSeq[next] = 0;
        this.blocksFree = this.bucketBlocks;
        this.writeSector = (this.ring[next] ?? 0) * this.host.bucketSize;
        this.stats.reclaimedBuckets++;
        continue;
      }
      // The ring is full (but for the reserve). The oldest bucket's entries must become unneeded, durably.
      const target = this.bucketSeq[this.last] ?? 0;
      const oldest = this.oldestPinned();
      if (oldest && oldest.seq !== 0 && oldest.seq <= target) {
        const nodes = this.host.nodesPinning(oldest, 8);
        if (nodes.length > 0) {
          this.stats.nodeFlushes++;
          await this.writeNodes(nodes);
          await this.host.io.flush();
          continue;
        }
        // Node writes whose pins wait for a flush: flush.
        if (this.afterFlush.length > 0) {
          await this.host.io.flush();
          continue;
        }
        // Pinned by keys on their way into the btree: wait for them.
        if (this.host.isDisabled()) throw new IoError('EIO', 'journal: cache set I/O is disabled');
        if (signal?.aborted) throw new IoError('ESHUTDOWN', 'journal: stopped while the journal was full');
        await this.wake.wait(signal ?? new AbortController().signal);
        continue;
      }
      // Nothing old is needed any more, but no durable jset says so yet: write one in the reserved block.
      const metaBlocks = this.blocksFor(0);
      if (this.blocksFree < metaBlocks && next !== this.last) {
        // After a restart nothing more is written to the bucket of the newest
        // entry (resume()), so its reserved block is gone; the spare bucket
        // is the reserve then. Without this a ring that was as full as normal
        // writes allow when the power went fails the set at bring-up (the
        // simulator, fill seed 14).
        this.cur = next;
        this.bucketSeq[next] = 0;
        this.blocksFree = this.bucketBlocks;
        this.writeSector = (this.ring[next] ?? 0) * this.host.bucketSize;
        this.stats.reclaimedBuckets++;
      }
      if (this.blocksFree < metaBlocks) {
        throw new Error('journal: the ring is full and the reserved block is gone');
      }
      const m = new JournalEntry();
      // A header-only entry written ahead of the one that needs the room.
      this.live.splice(this.live.length - 2, 0, m);
      await this.flushForJset(this.host.io.nextFlushEpoch);
      await this.writeJset(m, metaBlocks);
      await this.host.io.flush();
      m.durable = true;
      this.unpin(m);
    }
  }

  /** Write whatever is open now, header-only if empty (teardown and bring-up). */
  async writeFinal(): Promise<void> {
    if (this.dead || this.host.isDisabled()) return;
    this.open.urgent = true;
    await this.writeOpen();
  }

  /** Keys in the open entry (tests). */
  get openKeys(): number {
    return this.open.keys.length;
  }

  /** Fraction of the ring in use, for stats. */
  get bucketsInUse(): number {
    let n = 0;
    for (let i = 0; i < this.ring.length; i++) if (!this.bucketFree(i) || i === this.cur) n++;
    return n;
  }

  /** Header bytes: exported for the size computations of callers. */
  static readonly headerBytes = JSET_HEADER_BYTES;
}

export function logReplay(keys: number, entries: number, seq: number): void {
  log.info(`bcache: bch_journal_replay() journal replay done, ${keys} keys in ${entries} entries, seq ${seq}`);
}

/** Headers and places of the entries found in some ring buckets. */
interface RingScan {
  entries: Jset[];
  where: Map<Jset, { bucket: number; offset: number }>;
  /** Bytes read of each bucket (its entries lie within them). */
  scanned: Map<number, number>;
  /** Highest seq found, by ring index (0: none). */
  maxSeq: Map<number, number>;
}

/**
 * The seq of each ring bucket's first entry, from one block read of each (0:
 * no entry of this set there). Unchecked: the header alone says where to look;
 * the buckets read whole afterwards are checked.
 */
async function probeFirstSeqs(
  io: CacheIo,
  ring: readonly number[],
  g: { bucketSize: number; blockSize: number; setMagic: bigint },
): Promise<number[]> {
  const magic = jsetMagic(g.setMagic);
  const bytes = Math.max(g.blockSize * SECTOR_SIZE, Math.ceil(JSET_HEADER_BYTES / SECTOR_SIZE) * SECTOR_SIZE);
  const out: number[] = [];
  for (let i = 0; i < ring.length; i += JOURNAL_READS * 4) {
    const batch = ring.slice(i, i + JOURNAL_READS * 4);
    const seqs = await Promise.all(
      batch.map(async (bucket) => {
        const buf = Buffer.allocUnsafe(bytes);
        await io.read(buf, bucket * g.bucketSize);
        if (buf.readBigUInt64LE(8) !== magic) return 0;
        const seq = buf.readBigUInt64LE(16);
        return seq > BigInt(Number.MAX_SAFE_INTEGER) ? 0 : Number(seq);
      }),
    );
    out.push(...seqs);
  }
  return out;
}

/** Journal buckets read at once at bring-up. */
const JOURNAL_READS = 8;

/** The first read of a journal bucket: enough for the entries of a lightly used bucket. */
const JOURNAL_READ_CHUNK = 64 * 1024;

/**
 * Scan one journal bucket, reading it only as far as its entries go: from a
 * 64 KiB chunk, doubling while the scan runs into the end of what was read
 * (an entry's header or body past it) and the bucket goes on. The scan stops
 * at the first entry that fails its checks wherever it is, so the entries
 * found are exactly those of a scan of the whole bucket. Returns the scan and
 * the bytes read (sector-aligned).
 */
async function readJournalBucket(
  io: CacheIo,
  bucket: number,
  g: { bucketSize: number; blockSize: number; setMagic: bigint },
): Promise<{ scan: JournalBucketScan; bytes: number }> {
  const bucketBytes = g.bucketSize * SECTOR_SIZE;
  let len = Math.min(bucketBytes, JOURNAL_READ_CHUNK);
  for (;;) {
    const buf = Buffer.allocUnsafe(len);
    await io.read(buf, bucket * g.bucketSize);
    const scan = scanJournalBucket(buf, { setMagic: g.setMagic, blockSize: g.blockSize, headerOnly: true });
    if (len >= bucketBytes) return { scan, bytes: len };
    const at = scan.end.offset;
    // Cut short by the chunk: the next header does not fit, or an entry runs past the chunk but not past the bucket.
    let need = 0;
    if (at + JSET_HEADER_BYTES > len) need = at + JSET_HEADER_BYTES;
    else if (scan.end.reason === 'too big' && buf.readBigUInt64LE(at + 8) === jsetMagic(g.setMagic)) {
      const entry = jsetBytes(buf.readUInt32LE(at + 28));
      if (entry <= JSET_MAX_BYTES && at + entry <= bucketBytes) need = at + entry;
    }
    if (need === 0) return { scan, bytes: len };
    len = Math.min(bucketBytes, Math.max(len * 2, Math.ceil(need / SECTOR_SIZE) * SECTOR_SIZE));
  }
}
