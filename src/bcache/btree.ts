// The btree of extents: lookup, insert, replace, node writes, rewrites.
//
// Locking (docs/engine.md §3): one tree-wide reader/writer lock. Lookups and
// scans take it shared; inserts take it exclusive, and an insert whose leaf is
// in memory and has room runs without a single await. Rewrites (a leaf that
// is full, a split, a new root) hold it exclusive across their I/O, and never
// wait for the allocator while holding it: the buckets they need are taken
// first, without the lock (the allocator may be waiting for GC, which needs a
// shared lock).
//
// Rewrites are copy-on-write up to the root: the replacement nodes and every
// ancestor (with its updated child pointers) are written to fresh buckets and
// flushed (R2), the root is swapped in memory, and a journal entry carrying
// the new root makes the change durable; only then are the old buckets freed.
// The on-disk tree reachable from the newest durable journal entry is
// therefore always complete, and interior nodes never hold two pointers for
// one position (the kernel appends to interior nodes and relies on "freeing
// keys" and gens to hide the old pointer; we read such nodes, but never
// write them).
//
// Journal pins (R5): a leaf holds the oldest journal entry whose keys sit in
// its pending set. A leaf write moves that pin to the write, which hands it
// back to the journal once a flush covers the write. A rewrite releases the
// pins of the nodes it replaced when it swaps them out: from then on every
// journal entry carries the new root, whose nodes are already durable.

import {
  bkeyU64s,
  btreePtrInvalid,
  extentInvalid,
  keyText,
  makeKey,
  makePtr,
  MAX_KEY,
  posCmp,
  type Bkey,
  type BkeyPtr,
} from '../format/bkey.ts';
import { FormatError } from '../format/errors.ts';
import { BSET_HEADER_BYTES } from '../format/bset.ts';
import { defined } from '../util/assert.ts';
import { allDone } from '../util/lifecycle.ts';
import { log } from '../util/log.ts';
import { RwLock } from '../util/rwlock.ts';
import type { Buckets } from './buckets.ts';
import { cutBack, cutFront, insertExtent, type DirtySink } from './extents.ts';
import { KeyList } from './keylist.ts';
import { monotonicNs, TimeStats } from './time-stats.ts';
import {
  BtreeNode,
  bsetBlocks,
  decodeNode,
  encodeNodeBset,
  interiorView,
  leafView,
  olderPin,
  type JournalPin,
  nodeCapacityU64s,
  randomSeq,
  u64sOf,
  type NodeGeometry,
} from './btree-node.ts';
import type { CacheIo } from './io.ts';

/** Room kept for a key that splits an existing one (KEY_MAX_U64S). */
const KEY_MAX_U64S = 8;
/** A leaf's pending set is written once it holds about a page of keys (appendAtU64s). */
const PENDING_WRITE_BYTES = 4096;
/** Room left in an append's last block for keys that arrive between the queueing and the write. */
const PENDING_SLACK_BYTES = 512;

/**
 * The pending u64s at which a leaf's append is queued: a whole number of
 * blocks (a page's worth, at least one block) less the bset header and a
 * little slack. An append takes whole blocks of the node; queueing it at 4
 * KiB of keys with 4 KiB blocks, as before, made nearly every append two
 * blocks with the second all but empty, so a leaf took half as many keys
 * between rewrites as it had room for (2026-12-06: ~40 rewrites a second
 * under 4 KiB random writes at 28k a second, each ~1 ms of the event loop).
 */
export function appendAtU64s(blockBytes: number): number {
  const target = Math.max(1, Math.floor(PENDING_WRITE_BYTES / blockBytes)) * blockBytes;
  const slack = Math.min(PENDING_SLACK_BYTES, Math.floor(target / 8));
  return Math.max(1, Math.floor((target - BSET_HEADER_BYTES - slack) / 8));
}

/** What the tree needs from the cache set around it. */
/** Sees a leaf's key at position `at` of `keys` (read the columns, build the key only if needed); false stops the walk. */
type LeafVisitor = (keys: KeyList, at: number) => boolean;

export interface BtreeHost {
  io: CacheIo;
  geo: NodeGeometry;
  buckets: Buckets;
  /**
   * `n` buckets from the btree reserve, marked metadata; waits for the
   * allocator, or with `wait` false returns what is ready now (maybe fewer).
   */
  allocNodeBuckets(n: number, wait?: boolean): Promise<number[]>;
  /** A bucket from allocNodeBuckets that was not used after all. */
  returnNodeBucket(bucket: number): void;
  /** A node's bucket that no durable tree references any more. */
  freeNodeBucket(bucket: number): void;
  journalPin(entry: JournalPin): void;
  journalUnpin(entry: JournalPin): void;
  /** Release a pin once flush `epoch` has completed. */
  journalUnpinAfterFlush(entry: JournalPin, epoch: number): void;
  /**
   * Run `fn` once a journal entry written after now is durable (it carries
   * the new root); asks for one soon. Rewrites never wait for it: during
   * replay the journal may be full until replay has made progress.
   */
  afterCommit(fn: () => void): void;
  /** A leaf whose pending set should be written soon. */
  nodeNeedsWrite(node: BtreeNode): void;
  /** Sectors inserted with pointers (GC pressure). */
  sectorsInserted(sectors: number): void;
  dirty: DirtySink;
  /** A fatal metadata error: disable I/O and report. */
  fail(err: unknown): void;
}

export interface Hit {
  /** First cache sector of this segment's data. */
  sector: number;
  bucket: number;
  gen: number;
  dirty: boolean;
}

export interface LookupSegment {
  /** Sector range [start, end) of the device (backing sectors, data offset included). */
  start: number;
  end: number;
  /** Where the data is in the cache, or null for a miss. */
  hit: Hit | null;
  /**
   * A miss that covers a key whose pointer is stale (its bucket was
   * invalidated since). The staleness is not durable until the bucket's new
   * gen is written with the prios: after a crash the key can be live again,
   * pointing at data it held before. A write to the backing device under it
   * must therefore invalidate it as it would a clean hit (request.ts).
   */
  staleKey?: true;
}

export interface InsertOptions {
  /** Compare-and-insert against this key (miss fill, writeback completion). */
  replace?: Bkey | undefined;
  /** The journal entry the keys are in: the leaf takes a pin on it. */
  journal?: JournalPin | undefined;
  /**
   * Insert a piece only if this returns true at the moment it is applied to
   * its leaf (synchronously, under the tree lock); a false counts as a
   * collision. Miss fills use it with the request layer's collision tracker:
   * a write that overlapped the fill since it began wins (docs/engine.md §3).
   */
  guard?: (() => boolean) | undefined;
  /**
   * Never wait for node buckets: when a rewrite cannot have them at once,
   * insertRest() stops and returns the keys left. A journaled insert holds a
   * pin on its journal entry, and waiting for the allocator with it held can
   * close a circle (the allocator waits for a journal commit, the commit for
   * ring space, the ring for that pin); the cache set waits with no pin.
   */
  bucketsNow?: boolean | undefined;
  /**
   * False: the keys point at data already in the cache (writeback marking
   * its copies clean), so they do not count towards the next GC pass. The
   * kernel counts sectors_to_gc where data is written into the cache
   * (bch_data_insert_start: writes, fills, moving GC), never at writeback's
   * insert; counting those too ran GC twice as often under writeback.
   */
  countForGc?: boolean | undefined;
}

export interface InsertResult {
  /** Sectors actually inserted (a replace may insert less). */
  sectors: number;
  /** Pieces a replace could not insert at all. */
  collisions: number;
  /** Keys the leaves received, as inserted. */
  inserted: Bkey[];
}

export interface BtreeOptions {
  /** Clean leaves kept in memory beyond those in use (interior nodes are always kept). */
  cacheLeaves: number;
  /** Where new nodes' random seqs come from (default: the system's randomness; a simulation's seed). */
  newSeq?: (() => bigint) | undefined;
}

export class Btree {
  readonly lock = new RwLock();
  private readonly host: BtreeHost;
  private readonly geo: NodeGeometry;
  private rootNode: BtreeNode | undefined;
  /**
   * The flush that makes the nodes of the last rewrite durable (R2): a jset
   * carrying the root waits for it (JournalHeader.durableAfter).
   */
  private swappedEpoch = 0;
  /** Cached nodes by their bucket's first sector. */
  private readonly cache = new Map<number, BtreeNode>();
  private leafCount = 0;
  private clock = 0;
  private readonly cacheLeaves: number;
  private readonly capacity: number;
  /** Pending u64s that queue a leaf's append (appendAtU64s). */
  private readonly appendAt: number;
  private readonly newSeq: () => bigint;
  /** Nodes written, read, split: for stats and tests. */
  readonly stats = { reads: 0, writes: 0, rewrites: 0, splits: 0, newRoots: 0, evictions: 0 };
  /**
   * The kernel's btree time stats (internal/btree_split_*, _read_*, _sort_*):
   * a full leaf's rewrite on insert (btree_split, split or not), a node read
   * from disk, and the merge of a read node's bsets into its sorted view (the
   * kernel's sort on read).
   */
  readonly times = { split: new TimeStats(), read: new TimeStats(), sort: new TimeStats() };

  constructor(host: BtreeHost, options: BtreeOptions) {
    this.host = host;
    this.geo = host.geo;
    this.cacheLeaves = Math.max(4, options.cacheLeaves);
    this.newSeq = options.newSeq ?? randomSeq;
    this.capacity = nodeCapacityU64s(host.geo);
    this.appendAt = appendAtU64s(host.geo.blockBytes);
  }

  /** The flush after which every node reachable from the root is durable. */
  get rootDurableAfter(): number {
    return this.swappedEpoch;
  }

  get root(): BtreeNode {
    if (!this.rootNode) throw new Error('btree: no root');
    return this.rootNode;
  }

  get hasRoot(): boolean {
    return this.rootNode !== undefined;
  }

  /** Nodes in memory (for tests and stats). */
  get cachedNodes(): number {
    return this.cache.size;
  }

  /** The nodes in memory, in no particular order (sysfs statistics). */
  nodesInMemory(): IterableIterator<BtreeNode> {
    return this.cache.values();
  }

  // ---------------------------------------------------------------------------
  // Nodes in memory and on disk

  private cacheNode(node: BtreeNode): void {
    const at = node.bucketSector;
    const old = this.cache.get(at);
    if (old === node) return;
    if (old?.isLeaf) this.leafCount--;
    this.cache.set(at, node);
    if (node.isLeaf) this.leafCount++;
    node.lastUse = ++this.clock;
  }

  private uncacheNode(node: BtreeNode): void {
    const at = node.bucketSector;
    if (this.cache.get(at) === node) {
      this.cache.delete(at);
      if (node.isLeaf) this.leafCount--;
    }
  }

  /**
   * Drop least recently used clean leaves until the cache is within its
   * bound; never `keep`, the node just loaded for the caller (an insert
   * changes it next, and a change to a node no longer cached would be lost).
   */
  private evict(keep?: BtreeNode): void {
    if (this.leafCount <= this.cacheLeaves) return;
    const clean: BtreeNode[] = [];
    for (const n of this.cache.values()) {
      if (n.isLeaf && !n.dirty && !n.writing && !n.queued && n !== this.rootNode && n !== keep) clean.push(n);
    }
    clean.sort((a, b) => a.lastUse - b.lastUse);
    const excess = this.leafCount - this.cacheLeaves + Math.floor(this.cacheLeaves / 8);
    for (const n of clean.slice(0, Math.max(0, excess))) {
      this.uncacheNode(n);
      this.stats.evictions++;
    }
  }

  /** The node `key` points at, if it is in memory. */
  /**
   * The leaf holding the keys after (inode, offset), reached through nodes
   * already in memory only (for the sliced walks of GC and moving GC, which
   * hold the read lock and must not wait): the leaf; undefined when nothing
   * is after that position; or the child that must be read first. `interior`
   * sees each interior node on the way down.
   */
  cachedLeafAfter(
    inode: number,
    offset: number,
    interior?: (node: BtreeNode) => void,
  ): BtreeNode | { load: { key: Bkey; level: number } } | undefined {
    let node = this.root;
    while (!node.isLeaf) {
      interior?.(node);
      const at = node.keys.seekAfter(inode, offset);
      if (at < 0) return undefined;
      const child = this.cachedAt(node.keys, at);
      if (!child) return { load: { key: node.keys.keyAt(at), level: node.level - 1 } };
      node = child;
    }
    return node;
  }

  /** cached() for the child pointer at position `at` of an interior node's keys (no key built). */
  cachedAt(keys: KeyList, at: number): BtreeNode | undefined {
    return keys.ptrCountAt(at) === 0 ? undefined : this.cachedAtSector(keys.ptrOffsetAt(at));
  }

  cached(key: Bkey): BtreeNode | undefined {
    const p = key.ptrs[0];
    return p ? this.cachedAtSector(p.offset) : undefined;
  }

  /** The node in memory whose bucket starts at `sector`, marked as used. */
  private cachedAtSector(sector: number): BtreeNode | undefined {
    const n = this.cache.get(sector);
    if (n) n.lastUse = ++this.clock;
    return n;
  }

  /** Read and decode the node `key` points at (not cached). */
  async readNode(key: Bkey, level: number, markRaw?: (k: Bkey, level: number) => void): Promise<BtreeNode> {
    const p = key.ptrs[0];
    if (!p) throw new FormatError('btree_node', 'key', `node key ${keyText(key)} has no pointer`);
    const buf = Buffer.allocUnsafe(this.geo.nodeBytes);
    const t0 = monotonicNs();
    await this.host.io.read(buf, p.offset);
    this.stats.reads++;
    const t1 = monotonicNs();
    const d = decodeNode(buf, key, this.geo);
    if (d.torn) {
      if (level > 0) {
        throw new FormatError('btree_node', 'csum', `interior node ${keyText(key)} has a torn last bset`);
      }
      log.warn(
        `btree: leaf ${keyText(key)}: last bset (block ${d.written}) is torn; its keys are recovered from the journal`,
      );
    }
    let keys: Bkey[];
    if (level > 0) {
      if (markRaw) for (const set of d.bsets) for (const k of set) markRaw(k, level);
      keys = interiorView(d.bsets, key, this.geo, (k) => k.ptrs.some((q) => this.host.buckets.stale(q) > 0));
    } else {
      keys = leafView(d.bsets, key, this.geo);
      if (markRaw) for (const k of keys) markRaw(k, level);
    }
    const t2 = monotonicNs();
    this.times.sort.update(t1, t2);
    this.times.read.update(t0, t2);
    return new BtreeNode(key, level, d.seq, keys, d.written);
  }

  /** The node `key` points at, from memory or disk. */
  async getNode(key: Bkey, level: number): Promise<BtreeNode> {
    const c = this.cached(key);
    if (c) return c;
    const n = await this.readNode(key, level);
    // Another reader may have loaded it meanwhile: keep the first.
    const again = this.cached(key);
    if (again) return again;
    this.cacheNode(n);
    this.evict(n);
    return n;
  }

  /** Install the root read at bring-up or created for a new set. */
  setRoot(node: BtreeNode): void {
    if (this.rootNode) this.uncacheNode(this.rootNode);
    this.rootNode = node;
    this.cacheNode(node);
  }

  /** Put a node read elsewhere (bring-up) into the cache. */
  adopt(node: BtreeNode): void {
    this.cacheNode(node);
    this.evict(node);
  }

  /** A brand-new node in bucket `bucket` (not yet written). */
  newNode(bucket: number, level: number, position: Bkey, keys: readonly Bkey[] | KeyList): BtreeNode {
    const gen = this.host.buckets.gen[bucket] ?? 0;
    const key = makeKey(position.inode, position.offset, this.geo.nodeSectors, false, [
      makePtr(0, this.host.buckets.sector(bucket), gen),
    ]);
    const node = new BtreeNode(key, level, this.newSeq(), keys, 0);
    return node;
  }

  /** Write a node's whole view as its first bset (a new node). */
  async writeNewNode(node: BtreeNode): Promise<void> {
    const buf = encodeNodeBset(node.keys, node, this.geo);
    await this.host.io.writeMeta(buf, node.bucketSector);
    node.written = buf.length / this.geo.blockBytes;
    node.unflushedEpoch = this.host.io.nextFlushEpoch;
    this.stats.writes++;
  }

  /**
   * Append a leaf's pending set as a new bset. Writes of one node are
   * serialized, and each starts only once the one before it is durable (a
   * flush first if none has covered it yet): after a power cut a node's bsets
   * are then an intact prefix, at most its last one torn, never a hole with
   * a later bset behind it (which neither we nor the kernel can read; the
   * kernel gets the same order by writing every bset with FUA). It also
   * waits until the data its keys point at is durable (pendingDataEpoch).
   * The pin moves to the write and goes back to the journal once a flush
   * covers it.
   */
  async writeNode(node: BtreeNode): Promise<void> {
    while (node.writing) await node.writing;
    node.queued = false;
    if (node.freed || node.pending.length === 0) return;
    const buf = encodeNodeBset(node.pending, node, this.geo);
    const at = node.bucketSector + node.written * (this.geo.blockBytes / 512);
    const need = Math.max(node.unflushedEpoch, node.pendingDataEpoch);
    node.pending = new KeyList();
    node.pendingU64s = 0;
    node.pendingDataEpoch = 0;
    node.writingPin = node.pin;
    node.pin = undefined;
    node.written += buf.length / this.geo.blockBytes;
    const io = this.host.io;
    // A journal commit's flush often covers both already; concurrent appends share one flush.
    const write = need > io.durableEpoch ? io.flushTo(need).then(() => io.writeMeta(buf, at)) : io.writeMeta(buf, at);
    node.writing = write;
    try {
      await write;
    } catch (err) {
      this.host.fail(err);
      throw err;
    } finally {
      node.writing = undefined;
    }
    this.stats.writes++;
    node.unflushedEpoch = io.nextFlushEpoch;
    if (node.writingPin !== undefined) {
      this.host.journalUnpinAfterFlush(node.writingPin, node.unflushedEpoch);
      node.writingPin = undefined;
    }
  }

  /** Every cached node with unwritten keys. */
  dirtyNodes(): BtreeNode[] {
    const out: BtreeNode[] = [];
    for (const n of this.cache.values()) if (n.dirty && !n.freed) out.push(n);
    return out;
  }

  /** Dirty leaves holding a pin on `entry` or an older one, oldest first. */
  nodesPinning(entry: JournalPin, max: number): BtreeNode[] {
    const out: BtreeNode[] = [];
    for (const n of this.cache.values()) if (n.pin && n.pin.order <= entry.order && !n.freed) out.push(n);
    out.sort((a, b) => (a.pin?.order ?? 0) - (b.pin?.order ?? 0));
    return out.slice(0, max);
  }

  // ---------------------------------------------------------------------------
  // Lookups

  private async takeRead(): Promise<void> {
    if (!this.lock.tryRead()) await this.lock.read();
  }

  private async takeWrite(): Promise<void> {
    if (!this.lock.tryWrite()) await this.lock.write();
  }

  /**
   * Visit leaf keys in order, from the first whose position is after (inode,
   * from), until `fn` returns false. Children of an interior node are visited
   * while the previous child's key is before `limit` (no extent crosses a
   * leaf's boundary, so nothing past it can start before `limit`).
   */
  private async visit(
    node: BtreeNode,
    inode: number,
    from: number,
    limit: { inode: number; offset: number },
    fn: LeafVisitor,
  ): Promise<boolean> {
    const keys = node.keys;
    if (node.isLeaf) {
      node.lastUse = ++this.clock;
      for (let p = keys.seekAfter(inode, from); p >= 0; p = keys.next(p)) if (!fn(keys, p)) return true;
      return false;
    }
    let prev: Bkey | undefined;
    for (let p = keys.seekAfter(inode, from); p >= 0; p = keys.next(p)) {
      if (prev && posCmp(prev.inode, prev.offset, limit.inode, limit.offset) >= 0) return true;
      const ck = keys.keyAt(p);
      const child = this.cached(ck) ?? (await this.getNode(ck, node.level - 1));
      if (await this.visit(child, inode, from, limit, fn)) return true;
      prev = ck;
    }
    return false;
  }

  /**
   * visit() without awaits, for when every node on the way is in memory:
   * 1 if `fn` stopped, 0 if the keys ran out, -1 if a node must be read first
   * (the caller starts over with visit()).
   */
  private visitSync(
    node: BtreeNode,
    inode: number,
    from: number,
    limit: { inode: number; offset: number },
    fn: LeafVisitor,
  ): number {
    const keys = node.keys;
    if (node.isLeaf) {
      node.lastUse = ++this.clock;
      for (let p = keys.seekAfter(inode, from); p >= 0; p = keys.next(p)) if (!fn(keys, p)) return 1;
      return 0;
    }
    let prev = -1;
    for (let p = keys.seekAfter(inode, from); p >= 0; p = keys.next(p)) {
      if (prev >= 0 && posCmp(keys.inodeAt(prev), keys.endAt(prev), limit.inode, limit.offset) >= 0) return 1;
      const child = this.cachedAt(keys, p);
      if (!child) return -1;
      const r = this.visitSync(child, inode, from, limit, fn);
      if (r !== 0) return r;
      prev = p;
    }
    return 0;
  }

  /**
   * Visit keys as visit() does, under the read lock: synchronously (no
   * promise) when the lock is free and the nodes are in memory, else
   * asynchronously; `begin` resets the caller's state before each attempt.
   */
  private async scan(
    inode: number,
    from: number,
    limit: { inode: number; offset: number },
    begin: () => LeafVisitor,
  ): Promise<void> {
    if (this.scanNow(inode, from, limit, begin)) return;
    await this.takeRead();
    try {
      await this.visit(this.root, inode, from, limit, begin());
    } finally {
      this.lock.releaseRead();
    }
  }

  /** scan()'s attempt without waiting: true when the lock was free and the walk met no node on disk. */
  private scanNow(
    inode: number,
    from: number,
    limit: { inode: number; offset: number },
    begin: () => LeafVisitor,
  ): boolean {
    if (!this.lock.tryRead()) return false;
    try {
      return this.visitSync(this.root, inode, from, limit, begin()) >= 0;
    } finally {
      this.lock.releaseRead();
    }
  }

  /**
   * The index's answer for sectors [start, end) of `inode`: hits (pointers
   * adjusted to each segment's start) and holes, covering the range in order.
   * Stale pointers count as holes (marked staleKey). Hits make their bucket
   * recently used.
   */
  async lookup(inode: number, start: number, end: number): Promise<LookupSegment[]> {
    const l = this.lookupVisitor(inode, start, end);
    await this.scan(inode, start, { inode, offset: end }, l.begin);
    return l.result();
  }

  /**
   * lookup() without waiting, for the hit path: the same answer when the
   * btree's lock is free and every node on the way is in memory (the common
   * case), else undefined, and the caller awaits lookup(). No promise, no
   * microtask hop.
   */
  lookupNow(inode: number, start: number, end: number): LookupSegment[] | undefined {
    const l = this.lookupVisitor(inode, start, end);
    return this.scanNow(inode, start, { inode, offset: end }, l.begin) ? l.result() : undefined;
  }

  /**
   * The hit path's lookup (readNow): where in the cache all of sectors
   * [start, end) of `inode` are, when one current extent with one pointer
   * covers them, the btree's lock is free and the nodes on the way are in
   * memory; else undefined, and the caller takes the general path (whose
   * lookup() gives the same answer for such a range). Touches the bucket as
   * lookup() does a hit's. Builds nothing: the answer is `oneHit`, valid
   * until the next call. One descent: the only extent that can cover
   * `start` is the first key after it, in the first child after it (extents
   * do not overlap, and a child's key is its last key's end); anything less
   * plain declines.
   */
  lookupOneNow(inode: number, start: number, end: number): Readonly<Hit> | undefined {
    if (!this.lock.tryRead()) return undefined;
    try {
      const node = this.leafNow(inode, start);
      if (node === undefined) return undefined;
      node.lastUse = ++this.clock;
      const keys = node.keys;
      const at = keys.seekAfter(inode, start);
      if (at < 0 || keys.inodeAt(at) !== inode || keys.ptrCountAt(at) !== 1) return undefined;
      const ke = keys.endAt(at);
      if (ke < end || ke - keys.sizeAt(at) > start) return undefined;
      const buckets = this.host.buckets;
      const offset = keys.ptrOffsetAt(at);
      const gen = keys.ptrGenAt(at);
      if (buckets.staleAt(offset, gen) > 0) return undefined;
      const hit = this.oneHit;
      hit.bucket = Math.floor(offset / buckets.bucketSize);
      buckets.touch(hit.bucket);
      hit.sector = offset + (start - (ke - keys.sizeAt(at)));
      hit.gen = gen;
      hit.dirty = keys.dirtyAt(at);
      return hit;
    } finally {
      this.lock.releaseRead();
    }
  }

  /** lookupOneNow's answer, one object reused by every call. */
  private readonly oneHit: Hit = { sector: 0, bucket: 0, gen: 0, dirty: false };

  /** lookup()'s visitor (`begin` starts it over, as scan() may) and its answer once the visit is done. */
  private lookupVisitor(
    inode: number,
    start: number,
    end: number,
  ): { begin: () => LeafVisitor; result: () => LookupSegment[] } {
    const buckets = this.host.buckets;
    const bucketSize = buckets.bucketSize;
    let out: LookupSegment[] = [];
    let cursor = start;
    const hole = (to: number, staleKey = false): void => {
      const last = out[out.length - 1];
      // Merged holes keep the mark: invalidating a little more than the stale key is harmless.
      if (last && last.hit === null && last.end === cursor) {
        last.end = to;
        if (staleKey) last.staleKey = true;
      } else
        out.push(staleKey ? { start: cursor, end: to, hit: null, staleKey } : { start: cursor, end: to, hit: null });
      cursor = to;
    };
    const fn = (keys: KeyList, at: number): boolean => {
      if (keys.inodeAt(at) !== inode) return false;
      const ke = keys.endAt(at);
      const ks = ke - keys.sizeAt(at);
      if (ks >= end) return false;
      const s = Math.max(ks, start);
      const e = Math.min(ke, end);
      if (s > cursor) hole(s);
      if (keys.ptrCountAt(at) === 0) throw new Error(`btree: a key in a leaf view has no pointer (${inode}:${ke})`);
      const offset = keys.ptrOffsetAt(at);
      const gen = keys.ptrGenAt(at);
      // Every pointer must be current (keys with more than one come from flash-only and multi-device sets).
      const stale =
        keys.ptrCountAt(at) === 1
          ? buckets.staleAt(offset, gen) > 0
          : keys.keyAt(at).ptrs.some((q) => buckets.stale(q) > 0);
      if (stale) hole(e, true);
      else {
        const bucket = Math.floor(offset / bucketSize);
        buckets.touch(bucket);
        out.push({ start: s, end: e, hit: { sector: offset + (s - ks), bucket, gen, dirty: keys.dirtyAt(at) } });
        cursor = e;
      }
      return ke < end;
    };
    return {
      begin: () => {
        out = [];
        cursor = start;
        return fn;
      },
      result: () => {
        if (cursor < end) hole(end);
        return out;
      },
    };
  }

  /**
   * Up to `max` dirty keys of `inode` after sector `from`, in LBA order
   * (whole keys, as writeback wants them), stopping before sector `to`.
   */
  async scanDirty(inode: number, from: number, max: number, to = Number.MAX_SAFE_INTEGER): Promise<Bkey[]> {
    const buckets = this.host.buckets;
    let out: Bkey[] = [];
    await this.scan(inode, from, { inode, offset: to }, () => {
      out = [];
      return (keys, at) => {
        if (keys.inodeAt(at) !== inode || keys.endAt(at) - keys.sizeAt(at) >= to) return false;
        if (!keys.dirtyAt(at)) return true;
        const k = keys.keyAt(at);
        if (!k.ptrs.some((q) => buckets.stale(q) > 0)) out.push(k);
        return out.length < max;
      };
    });
    return out;
  }

  /**
   * Part of a walk over the dirty keys of `inode`: from the first key that
   * ends after `from`, visiting at most `visitMax` keys of the inode, the
   * dirty ones whose first pointer `want` accepts (stale ones left out;
   * `want` must not keep the pointer it is shown, a scratch object).
   * `next` is where to go on (the last key visited ends there), or -1 at the
   * end of the inode's keys. A bounded part keeps each turn of the event
   * loop short when the caller walks a large tree.
   */
  async scanDirtyWhere(
    inode: number,
    from: number,
    want: (p: BkeyPtr) => boolean,
    visitMax: number,
  ): Promise<{ keys: Bkey[]; next: number }> {
    const buckets = this.host.buckets;
    let out: Bkey[] = [];
    let next = -1;
    const probe: BkeyPtr = { dev: 0, offset: 0, gen: 0, spare: 0 };
    await this.scan(inode, from, { inode: inode + 1, offset: 0 }, () => {
      out = [];
      next = -1;
      let visited = 0;
      return (keys, at) => {
        if (keys.inodeAt(at) !== inode) return false;
        if (keys.dirtyAt(at) && keys.ptrCountAt(at) > 0) {
          // `want` sees the pointer in a scratch object; only the keys it takes are built.
          probe.dev = keys.ptrDevAt(at);
          probe.offset = keys.ptrOffsetAt(at);
          probe.gen = keys.ptrGenAt(at);
          if (want(probe)) {
            const k = keys.keyAt(at);
            if (!k.ptrs.some((q) => buckets.stale(q) > 0)) out.push(k);
          }
        }
        if (++visited < visitMax) return true;
        next = keys.endAt(at);
        return false;
      };
    });
    return { keys: out, next };
  }

  /** Every key in [start, end) of `inode` as the leaves hold it (tests, debugging). */
  async keysIn(inode: number, start: number, end: number): Promise<Bkey[]> {
    await this.takeRead();
    try {
      const out: Bkey[] = [];
      await this.visit(this.root, inode, start, { inode, offset: end }, (keys, at) => {
        const k = keys.keyAt(at);
        if (k.inode !== inode || k.offset - k.size >= end) return false;
        out.push(k);
        return true;
      });
      return out;
    } finally {
      this.lock.releaseRead();
    }
  }

  /**
   * Visit every node, parents before children, loading what is not in memory.
   * The caller holds the lock (shared is enough) for the whole walk.
   */
  async walk(fn: (node: BtreeNode) => void): Promise<void> {
    const rec = async (node: BtreeNode): Promise<void> => {
      fn(node);
      if (node.isLeaf) return;
      for (const k of node.keys.toArray()) {
        const child = this.cached(k) ?? (await this.getNode(k, node.level - 1));
        await rec(child);
      }
    };
    await rec(this.root);
  }

  /**
   * Check the tree's invariants (tests, debugging): keys sorted, extents not
   * overlapping and inside their leaf's range, each interior node's last
   * child at its own position, size counters right, and every key's fields
   * as the on-disk checks want them (an extent's size and pointers inside
   * the cache; a child pointer clean, sized, inside the cache). Returns the
   * problems.
   */
  async verify(): Promise<string[]> {
    const problems: string[] = [];
    await this.takeRead();
    try {
      const rec = async (node: BtreeNode, lo: Bkey | undefined): Promise<void> => {
        const keys = node.keys;
        const where = `node ${keyText(node.key)} level ${node.level}`;
        if (node.viewU64s !== u64sOf(keys)) problems.push(`${where}: viewU64s ${node.viewU64s} != ${u64sOf(keys)}`);
        if (node.pendingU64s !== u64sOf(node.pending)) problems.push(`${where}: pendingU64s wrong`);
        for (const p of keys.check()) problems.push(`${where}: key list: ${p}`);
        let prev = lo;
        for (const k of keys) {
          if (prev && posCmp(prev.inode, prev.offset, k.inode, k.offset) >= 0) {
            problems.push(`${where}: ${keyText(k)} not after ${keyText(prev)}`);
          }
          if (posCmp(k.inode, k.offset, node.key.inode, node.key.offset) > 0) {
            problems.push(`${where}: ${keyText(k)} past the node's key`);
          }
          if (node.isLeaf && prev && prev.inode === k.inode && k.offset - k.size < prev.offset) {
            problems.push(`${where}: ${keyText(k)} overlaps ${keyText(prev)} (or the leaf's lower bound)`);
          }
          if (node.isLeaf && k.ptrs.length === 0) problems.push(`${where}: ${keyText(k)} has no pointer`);
          if (node.isLeaf ? extentInvalid(k, this.geo.cache) : btreePtrInvalid(k, this.geo.cache)) {
            problems.push(`${where}: ${keyText(k)}: fields out of range`);
          }
          prev = k;
        }
        if (node.isLeaf) return;
        const last = keys.last();
        if (!last || posCmp(last.inode, last.offset, node.key.inode, node.key.offset) !== 0) {
          problems.push(`${where}: last child ${last ? keyText(last) : '(none)'} is not at the node's position`);
        }
        let childLo = lo;
        for (const k of keys.toArray()) {
          const child = this.cached(k) ?? (await this.getNode(k, node.level - 1));
          if (child.level !== node.level - 1) problems.push(`${where}: child at level ${child.level}`);
          if (posCmp(child.key.inode, child.key.offset, k.inode, k.offset) !== 0) {
            problems.push(`${where}: child key ${keyText(child.key)} != pointer ${keyText(k)}`);
          }
          await rec(child, childLo);
          childLo = k;
        }
      };
      await rec(this.root, undefined);
    } finally {
      this.lock.releaseRead();
    }
    return problems;
  }

  /** Depth of the tree (1 for a lone leaf). */
  get depth(): number {
    return this.root.level + 1;
  }

  // ---------------------------------------------------------------------------
  // Inserts

  /** The path from the root to the leaf holding position (inode, sector + 1). */
  private async leafPath(inode: number, sector: number): Promise<BtreeNode[]> {
    const path: BtreeNode[] = [];
    let node = this.root;
    path.push(node);
    while (!node.isLeaf) {
      const at = node.keys.seekAfter(inode, sector);
      const ck = at >= 0 ? node.keys.keyAt(at) : undefined;
      if (!ck) throw new Error(`btree: no child for ${inode}:${sector} in node ${keyText(node.key)}`);
      node = this.cached(ck) ?? (await this.getNode(ck, node.level - 1));
      path.push(node);
    }
    return path;
  }

  /** leafPath() without awaits: undefined if a node on the way is not in memory. */
  private leafPathNow(inode: number, sector: number): BtreeNode[] | undefined {
    const path: BtreeNode[] = [];
    return this.leafNow(inode, sector, path) ? path : undefined;
  }

  /**
   * The leaf whose keys hold the first key after (inode, sector), without
   * awaits: undefined if a node on the way is not in memory. `path`, if
   * given, gets the nodes on the way, the root first and the leaf last.
   */
  private leafNow(inode: number, sector: number, path?: BtreeNode[]): BtreeNode | undefined {
    let node = this.root;
    path?.push(node);
    while (!node.isLeaf) {
      const at = node.keys.seekAfter(inode, sector);
      if (at < 0) return undefined;
      const child = this.cachedAt(node.keys, at);
      if (!child) return undefined;
      node = child;
      path?.push(node);
    }
    return node;
  }

  /**
   * The common insert, without a single await or promise: applies keys in
   * order while the lock is free, every node on the way is in memory and
   * each leaf has room, and returns what is left (empty when all went in)
   * for insert() to finish. A key crossing a leaf boundary may leave its
   * tail. The caller passes the result to collect into.
   */
  insertNow(keys: readonly Bkey[], options: InsertOptions, result: InsertResult): Bkey[] {
    if (!this.lock.tryWrite()) return keys.slice();
    try {
      for (let i = 0; i < keys.length; i++) {
        const key = defined(keys[i], 'i < keys.length');
        let rest: Bkey | undefined = key.size > 0 ? key : undefined;
        while (rest) {
          const path = this.leafPathNow(rest.inode, rest.offset - rest.size);
          const leaf = path?.[path.length - 1];
          let piece = rest;
          let next: Bkey | undefined;
          if (leaf && posCmp(rest.inode, rest.offset, leaf.key.inode, leaf.key.offset) > 0) {
            piece = cutBack(rest, leaf.key.offset);
            next = cutFront(rest, leaf.key.offset);
          }
          if (!leaf || !this.fits(leaf, piece)) return [rest, ...keys.slice(i + 1)];
          this.applyToLeaf(leaf, piece, options, result);
          rest = next;
        }
      }
      return [];
    } finally {
      this.lock.releaseWrite();
    }
  }

  private fits(leaf: BtreeNode, k: Bkey): boolean {
    const extra = bkeyU64s(k) + KEY_MAX_U64S;
    if (leaf.viewU64s + extra > this.capacity) return false;
    return leaf.written + bsetBlocks(leaf.pendingU64s + extra, this.geo) <= this.geo.nodeBlocks;
  }

  /** Apply one piece to a leaf that has room (synchronous). */
  private applyToLeaf(leaf: BtreeNode, k: Bkey, options: InsertOptions, result: InsertResult): void {
    if (options.guard && !options.guard()) {
      result.collisions++;
      return;
    }
    const r = insertExtent(leaf.keys, k, { replace: options.replace, dirty: this.host.dirty });
    if (!r.inserted) {
      if (r.collision) result.collisions++;
      return;
    }
    leaf.viewU64s += r.u64sDelta;
    const ins = r.inserted;
    const p = insertExtent(leaf.pending, ins, { keepEmpty: true });
    leaf.pendingU64s += p.u64sDelta;
    result.inserted.push(ins);
    if (ins.ptrs.length > 0) {
      result.sectors += ins.size;
      if (options.countForGc !== false) this.host.sectorsInserted(ins.size);
      // Its data write completed before the insert: the next flush to start
      // covers it. A compare-and-insert (writeback's clean key, a moving GC
      // copy) points at data a flush already made durable.
      if (options.replace === undefined) leaf.pendingDataEpoch = this.host.io.nextFlushEpoch;
    }
    const entry = options.journal;
    if (entry) {
      if (leaf.pin === undefined) {
        this.host.journalPin(entry);
        leaf.pin = entry;
      } else if (olderPin(entry, leaf.pin)) {
        this.host.journalPin(entry);
        this.host.journalUnpin(leaf.pin);
        leaf.pin = entry;
      }
    }
    if (leaf.pendingU64s >= this.appendAt && !leaf.queued) {
      leaf.queued = true;
      this.host.nodeNeedsWrite(leaf);
    }
  }

  /**
   * Insert keys (leaf keys: extents, or invalidations without pointers). A
   * key crossing a leaf boundary is cut and inserted in both leaves; with
   * `replace`, each piece is checked against the expected key on its own.
   */
  async insert(keys: readonly Bkey[], options: InsertOptions = {}): Promise<InsertResult> {
    const result: InsertResult = { sectors: 0, collisions: 0, inserted: [] };
    const left = this.insertNow(keys, options, result);
    if (left.length > 0) await this.insertRest(left, options, result);
    return result;
  }

  /**
   * The rest of an insert that insertNow() could not do: node reads,
   * rewrites, a busy lock. Returns the keys left over (empty unless
   * `bucketsNow` stopped it: see InsertOptions).
   */
  async insertRest(keys: readonly Bkey[], options: InsertOptions, result: InsertResult): Promise<Bkey[]> {
    let spare: number[] = [];
    try {
      for (let ki = 0; ki < keys.length; ki++) {
        const key = defined(keys[ki], 'ki < keys.length');
        let rest: Bkey | undefined = key.size > 0 ? key : undefined;
        while (rest) {
          await this.takeWrite();
          let locked = true;
          try {
            const s = rest.offset - rest.size;
            const path = await this.leafPath(rest.inode, s);
            const leaf = leafOf(path);
            let piece = rest;
            let next: Bkey | undefined;
            if (posCmp(rest.inode, rest.offset, leaf.key.inode, leaf.key.offset) > 0) {
              piece = cutBack(rest, leaf.key.offset);
              next = cutFront(rest, leaf.key.offset);
            }
            if (this.fits(leaf, piece)) {
              this.applyToLeaf(leaf, piece, options, result);
              rest = next;
              continue;
            }
            // The leaf must be rewritten: get the buckets first, without the lock.
            const need = 2 * path.length + 1;
            if (spare.length < need) {
              this.lock.releaseWrite();
              locked = false;
              const wait = options.bucketsNow !== true;
              const got = await this.host.allocNodeBuckets(need - spare.length, wait);
              spare = spare.concat(got);
              if (!wait && got.length === 0 && spare.length < need) return [rest, ...keys.slice(ki + 1)];
              continue;
            }
            if (options.guard && !options.guard()) {
              result.collisions++;
              rest = next;
              continue;
            }
            const scratch: InsertResult = { sectors: 0, collisions: 0, inserted: [] };
            const view = leaf.keys.clone();
            const r = insertExtent(view, piece, { replace: options.replace, dirty: this.host.dirty });
            if (r.collision) scratch.collisions++;
            if (r.inserted) {
              scratch.inserted.push(r.inserted);
              if (r.inserted.ptrs.length > 0) {
                scratch.sectors += r.inserted.size;
                if (options.countForGc !== false) this.host.sectorsInserted(r.inserted.size);
              }
            }
            const t0 = monotonicNs();
            const freed = await this.rewrite(path, view, spare);
            this.times.split.update(t0, monotonicNs());
            this.lock.releaseWrite();
            locked = false;
            result.sectors += scratch.sectors;
            result.collisions += scratch.collisions;
            result.inserted.push(...scratch.inserted);
            this.finishRewrite(freed);
            rest = next;
          } finally {
            if (locked) this.lock.releaseWrite();
          }
        }
      }
    } finally {
      for (const b of spare) this.host.returnNodeBucket(b);
    }
    return [];
  }

  /**
   * Replace the leaf at the end of `path` by nodes holding `leafKeys`, and
   * every ancestor by a copy with updated child pointers (splitting any that
   * grow too full, growing the tree at the root). Takes buckets from `spare`
   * (removing them). Writes and flushes the new nodes, then swaps them in.
   * Returns the replaced nodes, to be freed once a journal entry with the new
   * root is durable (finishRewrite). Called with the write lock held.
   */
  private async rewrite(path: BtreeNode[], leafKeys: KeyList, spare: number[]): Promise<BtreeNode[]> {
    const buckets = this.host.buckets;
    const take = (): number => {
      const b = spare.shift();
      if (b === undefined) throw new Error('btree: rewrite ran out of reserved buckets');
      return b;
    };
    const created: BtreeNode[] = [];
    const make = (level: number, position: Bkey, keys: readonly Bkey[] | KeyList): BtreeNode => {
      const n = this.newNode(take(), level, position, keys);
      created.push(n);
      return n;
    };
    let level = path.length - 1;
    let old = leafOf(path);
    // A rewrite drops stale keys for good (GC relies on it to keep gens from wrapping).
    let keys = old.isLeaf ? withoutStale(leafKeys, buckets) : leafKeys;
    let repl = this.splitKeys(keys, old.level, old.key, make);
    if (repl.length > 1) this.stats.splits++;
    while (level > 0) {
      const parent = defined(path[level - 1], 'a path holds every level from the root down');
      const pkeys = parent.keys.clone();
      // The parent's pointer to the old node sits at the old node's own position.
      const at = pkeys.seekAfter(old.key.inode, old.key.offset - 1);
      if (at < 0 || pkeys.inodeAt(at) !== old.key.inode || pkeys.endAt(at) !== old.key.offset) {
        throw new Error(`btree: node ${keyText(old.key)} not found in its parent`);
      }
      pkeys.splice(
        at,
        1,
        repl.map((n) => n.key),
      );
      level--;
      old = parent;
      keys = pkeys;
      repl = this.splitKeys(keys, parent.level, parent.key, make);
      if (repl.length > 1) this.stats.splits++;
    }
    let newRoot: BtreeNode;
    if (repl.length === 1) newRoot = defined(repl[0], 'repl has one node');
    else {
      newRoot = make(
        old.level + 1,
        MAX_KEY,
        repl.map((n) => n.key),
      );
      this.stats.newRoots++;
    }
    // R2: every new node is on disk before anything durable points at it.
    // The writes complete here; the flush that makes them durable is the
    // journal's (flushForJset), before the first jset that carries the new
    // root, and the old nodes' pins go back only after that flush too. Not a
    // flush of our own: the write lock is held until the swap, every insert
    // waits meanwhile, and an fdatasync of a cache file full of fresh
    // writeback data took 3-20 ms (a fifth of the time under 4k random
    // writes, when every leaf is near full and one is rewritten every ~25 ms).
    await allDone(created.map((n) => this.writeNewNode(n)));
    // Appends to the old nodes still in flight must land before their buckets can be freed.
    for (const n of path) while (n.writing) await n.writing.catch(() => undefined);
    this.stats.rewrites++;
    // Swap in memory (synchronously): from here on journal entries carry the new root.
    const epoch = this.host.io.nextFlushEpoch;
    this.swappedEpoch = Math.max(this.swappedEpoch, epoch);
    for (const n of path) {
      this.uncacheNode(n);
      n.freed = true;
      if (n.pin !== undefined) this.host.journalUnpinAfterFlush(n.pin, epoch);
      if (n.writingPin !== undefined) this.host.journalUnpinAfterFlush(n.writingPin, epoch);
      n.pin = undefined;
      n.writingPin = undefined;
      n.pending = new KeyList();
      n.pendingU64s = 0;
    }
    for (const n of created) {
      this.cacheNode(n);
      // The tree references it now: GC will find it, the allocation pin can go.
      buckets.unpinBucket(Math.floor(n.bucketSector / buckets.bucketSize));
    }
    this.rootNode = newRoot;
    this.evict();
    return path;
  }

  /** After a rewrite: once a journal entry with the new root is durable, free the old nodes' buckets. */
  private finishRewrite(old: BtreeNode[]): void {
    const size = this.host.buckets.bucketSize;
    this.host.afterCommit(() => {
      for (const n of old) this.host.freeNodeBucket(Math.floor(n.bucketSector / size));
    });
  }

  /**
   * The nodes for `keys` at `level`, the last one at `position`: one node, or
   * two if one would be more than 4/5 full (the first taking 3/5 of the keys,
   * as btree_split does).
   */
  private splitKeys(
    keys: KeyList,
    level: number,
    position: Bkey,
    make: (level: number, position: Bkey, keys: KeyList) => BtreeNode,
  ): BtreeNode[] {
    const u64s = keys.u64s();
    const blocks = bsetBlocks(u64s, this.geo);
    if (blocks <= Math.floor((this.geo.nodeBlocks * 4) / 5) || keys.length < 2) {
      return [make(level, position, keys)];
    }
    // The first node takes keys up to three fifths of the u64s (and leaves the second at least one key).
    let acc = 0;
    let i = 0;
    for (let p = keys.start(); p >= 0 && i < keys.length - 1 && acc < (u64s * 3) / 5; p = keys.next(p), i++) {
      acc += 2 + keys.ptrCountAt(p);
    }
    const first = keys.slice(0, i);
    const last = defined(first.last(), 'a split leaves keys in its first node');
    return [make(level, makeKey(last.inode, last.offset, 0), first), make(level, position, keys.slice(i, keys.length))];
  }

  /**
   * Rewrite one leaf as it is (compaction: drops stale keys and the log of
   * bsets). Used by GC for leaves full of stale keys, as an optimisation: it
   * takes only buckets that are ready now and gives up (false) otherwise,
   * since a GC waiting for the btree reserve could wait for itself (the
   * reserve is refilled by invalidation, which may need the next GC pass).
   * Takes the lock.
   */
  async compactLeaf(inode: number, sector: number): Promise<boolean> {
    let spare: number[] = [];
    try {
      for (;;) {
        await this.takeWrite();
        let locked = true;
        try {
          const path = await this.leafPath(inode, sector);
          const need = 2 * path.length + 1;
          if (spare.length < need) {
            this.lock.releaseWrite();
            locked = false;
            const got = await this.host.allocNodeBuckets(need - spare.length, false);
            spare = spare.concat(got);
            if (spare.length < need) return false;
            continue;
          }
          const leaf = leafOf(path);
          const old = await this.rewrite(path, leaf.keys, spare);
          this.lock.releaseWrite();
          locked = false;
          this.finishRewrite(old);
          return true;
        } finally {
          if (locked) this.lock.releaseWrite();
        }
      }
    } finally {
      for (const b of spare) this.host.returnNodeBucket(b);
    }
  }
}

/** The last node of a path from the root: the leaf (a path is never empty, it starts at the root). */
/**
 * The keys none of whose pointers is stale. A plain loop: it runs over every
 * key of a leaf on each rewrite (thousands of keys), where a filter with a
 * closure per key showed in the write path's profile.
 */
function withoutStale(keys: KeyList, buckets: Buckets): KeyList {
  return keys.filter((list, p) => {
    const n = list.ptrCountAt(p);
    if (n === 1) return buckets.staleAt(list.ptrOffsetAt(p), list.ptrGenAt(p)) === 0;
    return list.keyAt(p).ptrs.every((q) => buckets.stale(q) === 0);
  });
}

function leafOf(path: readonly BtreeNode[]): BtreeNode {
  return defined(path[path.length - 1], 'a path from the root is never empty');
}
