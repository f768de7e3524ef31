// A cache set: one cache device, its btree, journal, allocator and GC, from
// bring-up to teardown (super.c run_cache_set, cache_set_flush).
//
// API for the request path, writeback and the sysfs layer
// ======================================================
//
// Units: sectors (512 bytes) everywhere. Keys are bcache's (format/bkey.ts):
// an extent [offset - size, offset) of device `inode` (its uuid slot; sector
// numbers are backing-device sectors, data_offset included, as the kernel
// keys them).
//
//   const cs = await CacheSet.open(cacheDevice, options)
//       Brings up an existing set (journal, prios, root, uuids, btree check,
//       replay) or initialises a new one (CACHE_SYNC clear: "invalidating
//       existing data"). The set owns the device from then on; stop() closes it.
//
// Reads
//   await cs.lookup(inode, start, end) -> LookupSegment[]
//       Covers [start, end) in order: {start, end, hit: null} for misses,
//       {start, end, hit: {sector, bucket, gen, dirty}} for hits (sector =
//       where this segment's data starts on the cache device). One binary
//       search per level when the nodes are in memory.
//   cs.lookupNow(...) / cs.lookupOneNow(inode, start, end)
//       The same without waiting, or undefined (then lookup()); lookupOneNow
//       answers only a range one extent covers, as the hit path wants, and
//       builds nothing.
//   await cs.readCache(buf, sector)            read cached data
//   cs.ptrStale(hit) / cs.isStale(bucket, gen) after reading a clean hit: if the
//       bucket was reused meanwhile, the data is garbage; re-read from backing.
//
// Writes (writeback, writethrough, miss fill)
//   const a = await cs.allocSectors({inode, offset, sectors, writePoint, dirty, wait})
//       -> {ptr, sectors, bucket} | undefined. May grant fewer sectors than
//       asked: loop. Holds a pin on the bucket until cs.putAllocation(a).
//   await cs.writeCache(buf, a.ptr.offset)     write the data
//   key = makeKey(inode, offset + a.sectors, a.sectors, dirty, [a.ptr])
//   await cs.insert([key], {journal: true, fua})   journaled insert (writeback,
//       writethrough); resolves once the keys are in the btree (and, with fua,
//       their journal entry is durable).
//   await cs.insert([key], {replace: expected})    compare-and-insert, not
//       journaled (miss fills, writeback completions): only the part of the
//       range still held by `expected` is inserted; result.collisions counts
//       pieces that found nothing.
//   await cs.insert([key], {journal: false, guard})  not journaled, each piece
//       inserted only if guard() is true when it reaches its leaf (miss fills
//       with the request layer's collision tracker).
//   cs.putAllocation(a)                         after the insert (or a failure)
//   await cs.invalidate(inode, start, end)      bypass writes, discards: the
//       range becomes a hole (journaled).
//   await cs.flush()                            FLUSH/FUA: an R1 journal commit
//       (flush, jset, flush): every completed write and insert is durable.
//
// Writeback
//   await cs.scanDirty(inode, from, max)        whole dirty keys after `from`,
//       LBA order; continue from the last key's offset.
//   cs.dirtySectors(inode), cs.onDirtyChange((inode, offset, sectors) => ...)
//       dirty sectors per device, and every change (+/-) as it happens.
//
// Space and state
//   cs.inUse, cs.cacheAvailablePercent, cs.ioDisabled, cs.fail(err)
//   cs.uuids: the uuid table (find, findEmpty, get, set, invalidate);
//       await cs.writeUuids() makes changes durable (R4).
//   cs.triggerGc(), await cs.runGc(), cs.rescalePriorities(sectors)
//   cs.copyGcEnabled (copy_gc_enabled): moving GC after each pass; cs.movingGc.stats
//   await cs.stop(): stops GC, writes dirty nodes, stops the allocator,
//       writes a final journal entry and the superblock, closes the device.

import type { BlockDevice } from '../blockdev/types.ts';
import { IoError } from '../blockdev/types.ts';
import {
  btreePtrInvalid,
  extentInvalid,
  genAfter,
  makeKey,
  MAX_KEY,
  ptrAvailable,
  type Bkey,
  type BkeyPtr,
  type CacheGeometry,
} from '../format/bkey.ts';
import {
  BCACHE_JSET_VERSION_UUIDV1,
  BCACHE_SB_VERSION_CDEV_WITH_UUID,
  btreeNodeSectors,
  CACHE_SYNC_BIT,
  journalBucketCount,
  prioBucketCount,
  SB_OFFSET,
  SB_SECTOR,
  SB_SIZE,
  SECTOR_SIZE,
} from '../format/constants.ts';
import {
  cacheDiscard,
  cacheReplacement,
  cacheSync,
  decodeSuperblock,
  encodeSuperblock,
  isBacking,
  setFlagBits,
  setMagic,
  type Superblock,
} from '../format/superblock.ts';
import { formatUuid } from '../format/uuid-text.ts';
import { realClock, type Clock, type Timer } from '../util/clock.ts';
import { Prng } from '../util/prng.ts';
import { allDone, errorMessage, Mutex, rejectWith, WorkerScope } from '../util/lifecycle.ts';
import { log } from '../util/log.ts';
import { Allocator, RESERVE_BTREE } from './alloc.ts';
import { Btree, type Hit, type InsertResult, type LookupSegment } from './btree.ts';
import { BtreeNode, nodeGeometry, type NodeGeometry } from './btree-node.ts';
import { Buckets, GC_MARK_DIRTY, GC_MARK_RECLAIMABLE } from './buckets.ts';
import { type DirtySink } from './extents.ts';
import { Gc, initialGcFinish, initialMarkKey } from './gc.ts';
import { MovingGc } from './movinggc.ts';
import { CacheIo } from './io.ts';
import { Journal, logReplay, type JournalEntry } from './journal.ts';
import { OpenBuckets, type AllocSectorsOptions, type SectorAllocation } from './open-buckets.ts';
import { Prios } from './prio.ts';
import { RamCache, RAM_CACHE_DEFAULT } from './ram-cache.ts';
import { UuidTable } from './uuids.ts';
import { isFlashOnly } from '../format/uuid.ts';

export type { LookupSegment, InsertResult } from './btree.ts';
export type { SectorAllocation, AllocSectorsOptions } from './open-buckets.ts';

/** Buckets set aside at bring-up for the btree rewrites of journal replay. */
const REPLAY_POOL = 64;

/** Node reads in flight while bring-up checks the btree (checkBtree). */
const BTREE_CHECK_READS = 16;

/** Keys journaled per entry by one insert call (an entry holds a bounded number). */
const INSERT_CHUNK = 64;

/** bch_data_invalidate chunks: at most 2^15 sectors per key. */
const INVALIDATE_CHUNK = 1 << 15;

/** Node seqs from a seeded PRNG (never 0: a zero seq means "not a node"), so that a seeded run writes the same bytes. */
function seqsFrom(rng: Prng): () => bigint {
  return () => {
    for (;;) {
      const v = (BigInt(rng.next()) << 32n) | BigInt(rng.next());
      if (v !== 0n) return v;
    }
  };
}

export interface CacheSetOptions {
  /** Group-commit delay of the journal (journal_delay_ms). */
  journalDelayMs?: number;
  /** Bytes of clean leaves kept in memory (btree_cache_size); interior nodes are always kept. */
  btreeCacheSize?: number;
  /** Close the device on stop() (default true: the set owns it). */
  closeDevice?: boolean;
  /** Bytes of hot cache blocks copied in memory (ram_cache_size; default RAM_CACHE_DEFAULT, 0 off). */
  ramCacheSize?: number;
  /** Sectors inserted between pressure-triggered GC passes (default nbuckets x bucket_size / 16). */
  gcSectors?: number;
  /** How long one slice of a GC walk marks before yielding to requests (ms; tests use 0: a slice per leaf). */
  gcSliceMs?: number;
  /**
   * What a GC walk awaits between slices (default: one macrotask turn, so
   * requests and I/O callbacks run). Tests inject their own to make a set
   * amount of work land during a pass, whatever the machine's speed.
   */
  gcYield?: () => Promise<void>;
  /** Bound on stop() before it gives up waiting and closes anyway. */
  stopTimeoutMs?: number;
  /** copy_gc_enabled at bring-up (default false, as Linux 6.1 has it): moving GC after each GC pass. */
  copyGc?: boolean;
  /**
   * Seed of the random replacement policy and of new btree nodes' seqs
   * (default: the time of day, the system's randomness). Give each bring-up
   * of a cache a different seed: a node's seq is what tells its bsets from
   * those an earlier node left in the same bucket, so seqs must not repeat.
   */
  seed?: number;
  /**
   * Every duration, deadline and timer of the set and its workers (default:
   * real time). The simulator and the tests that wait for a timer inject a
   * SimClock (docs/design.md, lifecycle rule 6).
   */
  clock?: Clock;
  /** Unix seconds (last_mount). */
  now?: () => number;
  /**
   * Tests only: btree nodes smaller than the kernel's (a whole number of
   * blocks, at most the bucket-derived size), so that trees grow deep with few
   * keys. A cache written this way is not for the kernel.
   */
  btreeNodeSectors?: number;
  /** The set finished stopping, however stop() was called (the registry forgets it). */
  onStopped?: (cs: CacheSet) => void;
}

export interface CacheSetStats {
  btree: Btree['stats'];
  journal: Journal['stats'];
  allocator: Allocator['stats'];
  gc: Gc['stats'];
  movingGc: MovingGc['stats'];
  io: CacheIo['stats'];
}

export class CacheSet {
  readonly dev: BlockDevice;
  readonly sb: Superblock;
  /** The set uuid, canonical text form. */
  readonly uuid: string;
  readonly io: CacheIo;
  readonly buckets: Buckets;
  /** Copies of the hottest cache blocks, for readCacheNow (ram-cache.ts). */
  readonly ramCache: RamCache;
  readonly geometry: CacheGeometry;
  readonly nodeGeo: NodeGeometry;
  readonly allocator: Allocator;
  readonly openBuckets: OpenBuckets;
  readonly prios: Prios;
  readonly uuids: UuidTable;
  readonly btree: Btree;
  readonly journal: Journal;
  readonly gc: Gc;
  readonly movingGc: MovingGc;
  /** copy_gc_enabled: moving GC runs after each GC pass. */
  copyGcEnabled: boolean;
  /** Every worker of the set, its attachments' included: retire stops them all (DESIGN rule 5). */
  readonly workers: WorkerScope;
  readonly clock: Clock;
  /** io_error_limit and io_error_halflife; the registry points this at the set's settings. */
  errorLimits: () => { limit: number; halflife: number } = () => ({ limit: 8, halflife: 0 });
  private readonly failureListeners: Array<(message: string) => void> = [];
  private readonly options: CacheSetOptions;
  private ioDisabledFlag = false;
  private stopping = false;
  private stopPromise: Promise<void> | undefined;
  private readonly dirty = new Map<number, number>();
  private readonly dirtyListeners: DirtySink[] = [];
  private rescale: number;
  /** Held from a grant of node buckets until it comes back (allocNodeBuckets). */
  private readonly nodeGrants = new Mutex();
  private nodeGrantRelease: (() => void) | undefined;
  /** Moves each time a grant comes back: a rewrite went in, or buckets were returned unused. */
  private nodeGrantEpoch = 0;
  /**
   * Per bucket, the journal's write generation when a dirty key pointing
   * into it last entered the index (makeDirtyDurable).
   */
  private readonly dirtyGeneration: Float64Array;
  /** Inserts waiting, with no pin, for the grant to come back (waitForNodeBuckets). */
  private nodeGrantWaiters: Array<() => void> = [];

  private constructor(dev: BlockDevice, sb: Superblock, options: CacheSetOptions) {
    this.dev = dev;
    this.sb = sb;
    this.options = options;
    this.clock = options.clock ?? realClock;
    this.uuid = formatUuid(sb.setUuid);
    this.workers = new WorkerScope(`cache set ${this.uuid}`);
    const congestionRng = options.seed === undefined ? undefined : new Prng(options.seed ^ 0xc0de);
    this.io = new CacheIo(dev, () => this.ioDisabledFlag, {
      clock: this.clock,
      ...(congestionRng ? { random: () => congestionRng.next() } : {}),
    });
    this.buckets = new Buckets(sb.nbuckets, sb.bucketSize, sb.firstBucket);
    this.ramCache = new RamCache(this.buckets.reuse, sb.bucketSize, options.ramCacheSize ?? RAM_CACHE_DEFAULT);
    this.dirtyGeneration = new Float64Array(sb.nbuckets);
    this.geometry = { bucketSize: sb.bucketSize, firstBucket: sb.firstBucket, nbuckets: sb.nbuckets };
    const magic = setMagic(sb);
    const nodeSectors = options.btreeNodeSectors ?? btreeNodeSectors(sb.bucketSize);
    if (nodeSectors % sb.blockSize !== 0 || nodeSectors > btreeNodeSectors(sb.bucketSize) || nodeSectors <= 0) {
      throw new RangeError(`btreeNodeSectors ${nodeSectors}: not a whole number of blocks within a node`);
    }
    this.nodeGeo = nodeGeometry(this.geometry, magic, sb.blockSize, nodeSectors);
    const journalBuckets = sb.journalBuckets.length > 0 ? sb.journalBuckets : this.newJournalBuckets();
    const prioCount = prioBucketCount(sb.nbuckets, sb.bucketSize);
    this.allocator = new Allocator(
      {
        buckets: this.buckets,
        io: this.io,
        replacement: () => cacheReplacement(this.sb),
        discard: () => cacheDiscard(this.sb) && this.dev.caps.discard,
        cacheSync: () => cacheSync(this.sb),
        prioBucketCount: prioCount,
        journalBucketCount: journalBuckets.length,
        writePrios: () => this.prios.write(),
        requestGc: () => {
          this.gc.request();
        },
        isDisabled: () => this.ioDisabledFlag,
        fail: (err) => {
          this.fail(err);
        },
        clock: this.clock,
      },
      options.seed,
    );
    this.openBuckets = new OpenBuckets(this.buckets, this.allocator, sb.blockSize);
    const commitJournal = (): Promise<void> => this.journal.commit();
    this.prios = new Prios({
      io: this.io,
      buckets: this.buckets,
      allocator: this.allocator,
      setMagic: magic,
      commitJournal,
    });
    this.uuids = new UuidTable({
      io: this.io,
      buckets: this.buckets,
      allocator: this.allocator,
      commitJournal,
      afterCommit: (fn) => {
        this.journal.afterCommit(fn);
      },
    });
    const cacheBytes = options.btreeCacheSize ?? 64 * 1024 * 1024;
    this.btree = new Btree(
      {
        io: this.io,
        geo: this.nodeGeo,
        buckets: this.buckets,
        allocNodeBuckets: (n, wait = true) => this.allocNodeBuckets(n, wait),
        returnNodeBucket: (b) => {
          this.allocator.unalloc(b, RESERVE_BTREE);
          this.nodeGrantBack();
        },
        freeNodeBucket: (b) => {
          this.allocator.freeBucket(b);
        },
        journalPin: (e) => {
          this.journal.pin(e);
        },
        journalUnpin: (e) => {
          this.journal.unpin(e);
        },
        journalUnpinAfterFlush: (e, epoch) => {
          this.journal.unpinAfterFlush(e, epoch);
        },
        afterCommit: (fn) => {
          this.journal.afterCommit(fn);
          // Only a rewrite that has just swapped its nodes in asks this.
          this.nodeGrantBack();
        },
        nodeNeedsWrite: (node) => {
          this.journal.queueNode(node);
        },
        sectorsInserted: (sectors) => {
          this.gc.inserted(sectors);
        },
        dirty: (inode, offset, sectors, ptr) => {
          this.dirtyAdd(inode, offset, sectors, ptr);
        },
        fail: (err) => {
          this.fail(err);
        },
      },
      {
        cacheLeaves: Math.max(16, Math.floor(cacheBytes / this.nodeGeo.nodeBytes)),
        newSeq: options.seed === undefined ? undefined : seqsFrom(new Prng(options.seed ^ 0x5eed)),
      },
    );
    this.journal = new Journal(
      {
        io: this.io,
        setMagic: magic,
        blockSize: sb.blockSize,
        bucketSize: sb.bucketSize,
        cacheSync: () => cacheSync(this.sb),
        header: () => ({
          root: this.btree.root.key,
          level: this.btree.root.level,
          uuidBucket: this.uuids.key,
          prioBucket: this.prios.first,
          durableAfter: this.btree.rootDurableAfter,
        }),
        nodesPinning: (entry, max) => this.btree.nodesPinning(entry, max),
        writeNode: (node) => this.btree.writeNode(node),
        fail: (err) => {
          this.fail(err);
        },
        isDisabled: () => this.ioDisabledFlag,
        clock: this.clock,
      },
      journalBuckets,
      options.journalDelayMs ?? 100,
    );
    if (sb.journalBuckets.length === 0) sb.journalBuckets = journalBuckets;
    this.copyGcEnabled = options.copyGc ?? false;
    this.movingGc = new MovingGc({
      buckets: this.buckets,
      btree: this.btree,
      allocator: this.allocator,
      journal: this.journal,
      io: this.io,
      enabled: () => this.copyGcEnabled,
      isDisabled: () => this.ioDisabledFlag,
      // The key scan slices as GC's walk does, with the same knobs.
      clock: this.clock,
      ...(options.gcSliceMs === undefined ? {} : { sliceMs: options.gcSliceMs }),
      ...(options.gcYield === undefined ? {} : { yieldBetweenSlices: options.gcYield }),
    });
    this.gc = new Gc(
      {
        buckets: this.buckets,
        btree: this.btree,
        allocator: this.allocator,
        metadataBuckets: () => this.metadataBuckets(),
        isDisabled: () => this.ioDisabledFlag,
        fail: (err) => {
          this.fail(err);
        },
        clock: this.clock,
        afterPass: (signal) => this.movingGc.run(signal),
      },
      options.gcSectors,
      options.gcSliceMs,
      options.gcYield,
    );
    this.rescale = Math.floor((sb.nbuckets * sb.bucketSize) / 1024);
    this.io.setErrorHooks({
      limits: () => this.errorLimits(),
      describe: (sector) => this.describeSector(sector),
      fatal: (message) => {
        this.fail(new Error(message));
      },
    });
  }

  /** Which metadata lives at `sector`, for error messages (undefined: data or a btree node). */
  private describeSector(sector: number): string | undefined {
    if (sector < this.sb.firstBucket * this.sb.bucketSize) return 'superblock';
    const b = Math.floor(sector / this.sb.bucketSize);
    if (this.journal.ring.includes(b)) return 'journal';
    if (this.prios.current.includes(b) || this.prios.last.includes(b)) return 'priorities';
    if (this.uuids.bucket === b) return 'uuids';
    return undefined;
  }

  private newJournalBuckets(): number[] {
    const n = journalBucketCount(this.sb.nbuckets);
    return Array.from({ length: n }, (_, i) => this.sb.firstBucket + i);
  }

  /**
   * Open the cache set on `dev` (a cache device: make-bcache -C or ours).
   * Throws with a message naming what is wrong if the superblock or the
   * metadata is not usable; the device is closed then (if closeDevice).
   */
  static async open(dev: BlockDevice, options: CacheSetOptions = {}): Promise<CacheSet> {
    const block = Buffer.alloc(SB_SIZE);
    await dev.read(block, SB_OFFSET);
    const sb = decodeSuperblock(block, {
      deviceSectors: Math.floor(dev.size / SECTOR_SIZE),
      logicalBlockSize: dev.logicalBlockSize,
    });
    if (isBacking(sb)) throw new Error(`${dev.name}: a backing device, not a cache device`);
    if (sb.nrInSet !== 1) {
      throw new Error(
        `${dev.name}: cache set of ${sb.nrInSet} devices (only single-device sets exist since Linux 5.10)`,
      );
    }
    const cs = new CacheSet(dev, sb, options);
    try {
      if (cacheSync(sb)) await cs.bringUpExisting();
      else await cs.bringUpNew();
      cs.workers.run(() => {
        cs.gc.start();
      });
      sb.lastMount = cs.now();
      await cs.writeSuperblock();
    } catch (err) {
      const msg = errorMessage(err);
      log.error(`bcache: run_cache_set() error on ${cs.uuid}: ${msg}`);
      cs.ioDisabledFlag = true;
      cs.stopPromise = cs.shutdown(false);
      await cs.stopPromise;
      throw new Error(`${dev.name}: cannot bring up cache set ${cs.uuid}: ${msg}`, { cause: err });
    }
    log.info(`bcache: register_cache() registered cache device ${dev.name}`);
    return cs;
  }

  private now(): number {
    return this.options.now?.() ?? Math.floor(Date.now() / 1000);
  }

  // ---------------------------------------------------------------------------
  // Bring-up

  private metadataBuckets(): number[] {
    const out = [...this.journal.ring, ...this.prios.current, ...this.prios.last];
    const u = this.uuids.bucket;
    if (u !== undefined) out.push(u);
    return out;
  }

  /** run_cache_set() with CACHE_SYNC: the kernel's order. */
  private async bringUpExisting(): Promise<void> {
    const sb = this.sb;
    const r = await Journal.read(this.io, this.journal.ring, {
      bucketSize: sb.bucketSize,
      blockSize: sb.blockSize,
      setMagic: setMagic(sb),
    });
    if (!r) throw new Error('no journal entries found');
    const j = r.newest;
    await this.prios.read(j.prioBucket[0] ?? 0);
    if (btreePtrInvalid(j.btreeRoot, this.geometry)) throw new Error('bad btree root');
    if (btreePtrInvalid(j.uuidBucket, this.geometry)) throw new Error('bad uuid pointer');
    await this.uuids.read(j.uuidBucket, j.version);
    await this.checkBtree(j.btreeRoot, j.btreeLevel);
    // bch_journal_mark(): keys not yet replayed pin their buckets and count as live.
    const b = this.buckets;
    for (const e of r.replay) {
      for (const k of e.keys) {
        if (k.size === 0 || extentInvalid(k, this.geometry)) continue;
        for (const p of k.ptrs) if (ptrAvailable(p)) b.pinBucket(b.bucketOf(p));
        initialMarkKey(b, 0, k);
      }
    }
    initialGcFinish(b, this.allocator, this.metadataBuckets());
    this.allocator.initialStock();
    this.allocator.stockPool(REPLAY_POOL);
    const replay = this.journal.resume(r);
    this.journal.reserveOpen = true;
    this.workers.run(() => {
      this.allocator.start();
      this.journal.start();
    });
    if (j.version < BCACHE_JSET_VERSION_UUIDV1) await this.uuids.write(false);
    await this.replay(replay);
    this.journal.reserveOpen = false;
    this.allocator.releasePool();
  }

  /**
   * bch_btree_check(): read every node, checking it, and mark what it
   * references. The reads of a node's children overlap, up to
   * BTREE_CHECK_READS in flight over the whole tree (the kernel checks with
   * several threads too): one at a time, a large cache's tree took seconds of
   * bring-up waiting on each read in turn. Marking is a sum, so the order in
   * which nodes arrive does not matter.
   */
  private async checkBtree(rootKey: Bkey, rootLevel: number): Promise<void> {
    const b = this.buckets;
    const mark = (k: Bkey, level: number): void => {
      initialMarkKey(b, level, k);
    };
    let inFlight = 0;
    const queue: Array<() => void> = [];
    const readNode = async (key: Bkey, level: number): Promise<BtreeNode> => {
      if (inFlight >= BTREE_CHECK_READS) await new Promise<void>((resolve) => queue.push(resolve));
      else inFlight++;
      try {
        return await this.btree.readNode(key, level, mark);
      } finally {
        // Hand the slot on, or free it.
        const next = queue.shift();
        if (next) next();
        else inFlight--;
      }
    };
    const visit = async (key: Bkey, level: number, isRoot: boolean): Promise<void> => {
      const node = await readNode(key, level);
      if (isRoot) this.btree.setRoot(node);
      else this.btree.adopt(node);
      if (level === 0) {
        for (const k of node.keys) {
          if (!k.dirty) continue;
          const p = k.ptrs[0];
          // A stale dirty key is dead (its data was written back and the bucket reused before a crash):
          // nothing to write back, so not dirty (dirtyAdd).
          if (p && ptrAvailable(p) && b.stale(p) > 0) continue;
          this.dirty.set(k.inode, (this.dirty.get(k.inode) ?? 0) + k.size);
          if (p && ptrAvailable(p)) {
            const i = b.bucketOf(p);
            if (i < b.nbuckets) b.dirty[i] = (b.dirty[i] ?? 0) + k.size;
          }
        }
        return;
      }
      // Every child's visit ends before this one does, failed or not: nothing reads on after a failed check.
      const children: Array<Promise<void>> = [];
      for (const child of node.keys) children.push(visit(child, level - 1, false));
      const results = await Promise.allSettled(children);
      for (const r of results) if (r.status === 'rejected') throw r.reason;
    };
    initialMarkKey(b, rootLevel + 1, rootKey);
    await visit(rootKey, rootLevel, true);
  }

  private async replay(entries: JournalEntry[]): Promise<void> {
    const b = this.buckets;
    let keys = 0;
    for (const e of entries) {
      for (const k of e.keys) {
        if (k.size === 0) continue;
        if (extentInvalid(k, this.geometry) && k.ptrs.length > 0) {
          log.warn(`bcache: journal replay skips an invalid key in entry ${e.seq}`);
          continue;
        }
        // A key whose bucket was reused since (its data superseded and the bucket's new gen
        // durable) must not come back as data: replay it as the hole it now is.
        const stale = k.ptrs.some((p) => ptrAvailable(p) && b.stale(p) > 0);
        const key = stale ? makeKey(k.inode, k.offset, k.size, false, []) : k;
        try {
          await this.btree.insert([key], { journal: e });
        } finally {
          for (const p of k.ptrs) if (ptrAvailable(p)) b.unpinBucket(b.bucketOf(p));
        }
        keys++;
      }
      this.journal.unpin(e);
    }
    const last = entries[entries.length - 1];
    if (last) logReplay(keys, entries.length, last.seq);
  }

  /** run_cache_set() without CACHE_SYNC: a new set on this device. */
  private async bringUpNew(): Promise<void> {
    log.info('bcache: run_cache_set() invalidating existing data');
    const b = this.buckets;
    // Old journal entries of a previous life of this device must not be read back as ours.
    const zero = Buffer.alloc(this.sb.blockSize * SECTOR_SIZE);
    await allDone(this.journal.ring.map((bucket) => this.io.writeMeta(zero, b.sector(bucket))));
    initialGcFinish(b, this.allocator, this.metadataBuckets());
    this.allocator.initialStock();
    await this.prios.write();
    await this.uuids.write();
    const bucket = this.allocator.allocNow(RESERVE_BTREE);
    if (bucket < 0) throw new Error('cannot allocate new btree root');
    const root = this.btree.newNode(bucket, 0, MAX_KEY, []);
    await this.btree.writeNewNode(root);
    await this.io.flush();
    this.btree.setRoot(root);
    b.unpinBucket(bucket);
    this.sb.flags = setFlagBits(this.sb.flags, CACHE_SYNC_BIT, 1n, 1);
    await this.journal.commit();
    // The prio write above used the prio reserve; nothing holds data yet, so refill it the
    // bring-up way (the kernel's allocator does so in its first round, before CACHE_SYNC is set).
    this.allocator.initialStock();
    this.workers.run(() => {
      this.allocator.start();
      this.journal.start();
    });
  }

  /** bcache_write_super(): seq + 1, version at least 3, in place over the block read. */
  async writeSuperblock(): Promise<void> {
    const sb = this.sb;
    sb.seq += 1n;
    if (sb.version < BCACHE_SB_VERSION_CDEV_WITH_UUID) sb.version = BCACHE_SB_VERSION_CDEV_WITH_UUID;
    const block = encodeSuperblock(sb);
    await this.io.writeMeta(block, SB_SECTOR);
    await this.io.flush();
    sb.raw = block;
  }

  // ---------------------------------------------------------------------------
  // State

  get ioDisabled(): boolean {
    return this.ioDisabledFlag;
  }

  /** The flag as a call, so that checks after an await are not narrowed away. */
  private disabled(): boolean {
    return this.ioDisabledFlag;
  }

  get stopped(): boolean {
    return this.stopping;
  }

  /**
   * bch_cache_set_error(): a fatal error. I/O is disabled at once, waiters
   * fail; the owner is expected to stop() the set.
   */
  fail(err: unknown): void {
    if (this.ioDisabledFlag) return;
    this.ioDisabledFlag = true;
    const message = errorMessage(err);
    log.error(`bcache: bch_cache_set_error() error on ${this.uuid}: ${message}, disabling caching`);
    const disabled = new IoError('EIO', `cache set ${this.uuid}: I/O disabled after an error`);
    this.allocator.rejectWaiters(disabled);
    this.journal.failWaiters(disabled);
    // A rewrite that failed after taking every bucket of its grant never gives
    // it back: let the inserts waiting for it go, to find the set disabled.
    this.nodeGrantBack();
    for (const l of this.failureListeners.splice(0)) l(message);
  }

  /** Called once, right after fail() disabled I/O: the owner retires the set. */
  onFailure(listener: (message: string) => void): void {
    if (!this.ioDisabledFlag) {
      this.failureListeners.push(listener);
      return;
    }
    // Failed before anyone listened (between bring-up and registration): tell at once.
    queueMicrotask(() => {
      listener(`cache set ${this.uuid} failed`);
    });
  }

  private check(): void {
    const refused = this.refusal();
    if (refused) throw refused;
  }

  /** Why a call is refused now (I/O disabled, stopped), or undefined. */
  private refusal(): IoError | undefined {
    if (this.ioDisabledFlag) return new IoError('EIO', `cache set ${this.uuid}: I/O disabled`);
    if (this.stopping) return new IoError('ESHUTDOWN', `cache set ${this.uuid}: stopped`);
    return undefined;
  }

  get inUse(): number {
    return this.allocator.inUse;
  }

  get cacheAvailablePercent(): number {
    return 100 - this.allocator.inUse;
  }

  get blockSize(): number {
    return this.sb.blockSize;
  }

  get bucketSize(): number {
    return this.sb.bucketSize;
  }

  get stats(): CacheSetStats {
    return {
      btree: this.btree.stats,
      journal: this.journal.stats,
      allocator: this.allocator.stats,
      gc: this.gc.stats,
      movingGc: this.movingGc.stats,
      io: this.io.stats,
    };
  }

  // ---------------------------------------------------------------------------
  // Dirty accounting

  private dirtyAdd(inode: number, offset: number, sectors: number, ptr: BkeyPtr | undefined): void {
    // A dirty key whose pointer is stale holds nothing to write back (the
    // writeback scan skips it, as the kernel's filters skip bad keys): it does
    // not count, neither when it enters the index (a journal replay after a
    // crash) nor when it leaves. Counted, it kept dirty_data above zero for
    // good, so the device never went clean and a detach never ended (the
    // simulator, seed 13). A live dirty key cannot go stale: a bucket with
    // dirty data is never invalidated.
    if (ptr && ptrAvailable(ptr) && this.buckets.stale(ptr) > 0) return;
    const n = (this.dirty.get(inode) ?? 0) + sectors;
    if (n === 0) this.dirty.delete(inode);
    else this.dirty.set(inode, n);
    for (const l of this.dirtyListeners) l(inode, offset, sectors, ptr);
    if (ptr && ptrAvailable(ptr)) {
      const bucket = this.buckets.bucketOf(ptr);
      // Journaled in the open entry or an older one: durable once the write after this generation is.
      if (sectors > 0 && bucket < this.dirtyGeneration.length)
        this.dirtyGeneration[bucket] = this.journal.writeGeneration;
      this.bucketDirtyAdd(bucket, sectors);
    }
  }

  /**
   * Make these dirty keys durable in the cache (writeback does, before it
   * copies them to the backing device: a power cut must not keep the copy
   * and lose the key). A journal commit only when one of their buckets took
   * a dirty key since the last completed entry write began: writeback's
   * keys are mostly older than that, and the commit's fdatasync of a cache
   * file full of fresh writeback data took 50-130 ms, serial with the copies
   * (18 % of writeback's time over a 5 ms device). Keys that entered the
   * index without the journal are no different from before: a commit never
   * covered them either.
   */
  async makeDirtyDurable(keys: readonly Bkey[]): Promise<void> {
    this.check();
    const b = this.buckets;
    let need = 0;
    for (const k of keys) {
      const p = k.ptrs[0];
      if (!p || !ptrAvailable(p)) continue;
      const g = (this.dirtyGeneration[b.bucketOf(p)] ?? 0) + 1;
      if (g > need) need = g;
    }
    if (need === 0 || this.journal.writesCompleted >= need) return;
    await this.journal.commit();
  }

  /**
   * A bucket's dirty sectors changed. When writeback has cleaned the last of
   * them, an unpinned dirty bucket holds only clean data: reclaimable now,
   * not at the next GC (the kernel learns it only from GC, so a cache whose
   * writeback is draining it kept refusing writes until a pass ran).
   */
  private bucketDirtyAdd(i: number, sectors: number): void {
    const b = this.buckets;
    if (i >= b.nbuckets) return;
    const left = (b.dirty[i] ?? 0) + sectors;
    b.dirty[i] = left;
    if (left < 0) {
      log.error(`bcache: bucket ${i} has ${left} dirty sectors; keeping it dirty until GC`);
      return;
    }
    if (left === 0 && b.mark[i] === GC_MARK_DIRTY && b.pin[i] === 0) {
      b.noteChange(i);
      b.mark[i] = GC_MARK_RECLAIMABLE;
      this.allocator.avail++;
      this.allocator.notify();
    }
  }

  dirtySectors(inode: number): number {
    return this.dirty.get(inode) ?? 0;
  }

  /** c->flash_dev_dirty_sectors: what flash-only volumes hold (all of it dirty, never written back). */
  flashDirtySectors(): number {
    let n = 0;
    for (const [inode, sectors] of this.dirty) {
      const e = this.uuids.entries[inode];
      if (e && isFlashOnly(e)) n += sectors;
    }
    return n;
  }

  /** Every change of dirty sectors, as it happens (the per-stripe counters of a cached device). */
  onDirtyChange(listener: DirtySink): () => void {
    this.dirtyListeners.push(listener);
    return () => {
      const i = this.dirtyListeners.indexOf(listener);
      if (i >= 0) this.dirtyListeners.splice(i, 1);
    };
  }

  // ---------------------------------------------------------------------------
  // The index

  lookup(inode: number, start: number, end: number): Promise<LookupSegment[]> {
    const refused = this.refusal();
    if (refused) return Promise.reject(refused);
    return this.btree.lookup(inode, start, end);
  }

  /** lookup() when it need not wait (Btree.lookupNow), else undefined: then await lookup(), which also reports a refusal. */
  lookupNow(inode: number, start: number, end: number): LookupSegment[] | undefined {
    if (this.refusal()) return undefined;
    return this.btree.lookupNow(inode, start, end);
  }

  /** Btree.lookupOneNow: the hit path's single-extent lookup, or undefined (then the general path). */
  lookupOneNow(inode: number, start: number, end: number): Readonly<Hit> | undefined {
    if (this.refusal()) return undefined;
    return this.btree.lookupOneNow(inode, start, end);
  }

  async scanDirty(inode: number, from: number, max: number, to?: number): Promise<Bkey[]> {
    this.check();
    return this.btree.scanDirty(inode, from, max, to);
  }

  /** Btree.scanDirtyWhere(): a bounded part of a walk over an inode's dirty keys. */
  scanDirtyWhere(
    inode: number,
    from: number,
    want: (p: BkeyPtr) => boolean,
    visitMax: number,
  ): Promise<{ keys: Bkey[]; next: number }> {
    this.check();
    return this.btree.scanDirtyWhere(inode, from, want, visitMax);
  }

  /** Has the bucket been reused since a pointer with `gen` was taken? */
  isStale(bucket: number, gen: number): boolean {
    return genAfter(this.buckets.gen[bucket] ?? 0, gen) > 0;
  }

  ptrStale(p: BkeyPtr): boolean {
    return this.buckets.stale(p) > 0;
  }

  /**
   * Insert keys. Journaled unless `replace` is given (compare-and-insert
   * inserts are not journaled, as in the kernel: losing one in a crash loses
   * a cache fill or a writeback completion, which is redone). With `fua`,
   * resolves once the journal entry holding the keys is durable.
   */
  insert(
    keys: readonly Bkey[],
    options: { replace?: Bkey; journal?: boolean; fua?: boolean; guard?: () => boolean; countForGc?: boolean } = {},
  ): Promise<InsertResult> {
    const refused = this.refusal();
    if (refused) return Promise.reject(refused);
    const journaled = options.replace === undefined && options.journal !== false;
    if (!journaled) {
      return this.btree.insert(keys, {
        replace: options.replace,
        guard: options.guard,
        countForGc: options.countForGc,
      });
    }
    // The common case, a write's few keys into leaves in memory, runs without
    // a promise until the caller's own await (this is on every write's path).
    if (keys.length <= INSERT_CHUNK) {
      let entry: JournalEntry | undefined;
      try {
        entry = this.journal.addNow(keys);
      } catch (err) {
        return rejectWith(err);
      }
      if (entry) {
        const result: InsertResult = { sectors: 0, collisions: 0, inserted: [] };
        let left: Bkey[];
        try {
          left = this.btree.insertNow(keys, { journal: entry }, result);
        } catch (err) {
          this.journal.unpin(entry);
          return rejectWith(err);
        }
        if (left.length === 0) {
          this.journal.unpin(entry);
          if (options.fua !== true) return Promise.resolve(result);
          return this.journal.commit(entry).then(() => result);
        }
        return this.insertJournaledRest(entry, left, result, options.fua === true);
      }
    }
    return this.insertJournaled(keys, options.fua === true);
  }

  /** The part of a journaled insert that waits: node reads, rewrites, the btree lock. */
  private async insertJournaledRest(
    entry: JournalEntry,
    left: Bkey[],
    result: InsertResult,
    fua: boolean,
  ): Promise<InsertResult> {
    const last = await this.insertPinned(entry, left, result);
    if (fua) await this.journal.commit(last);
    return result;
  }

  private async insertJournaled(keys: readonly Bkey[], fua: boolean): Promise<InsertResult> {
    const total: InsertResult = { sectors: 0, collisions: 0, inserted: [] };
    // One journal entry holds a bounded number of keys: insert in chunks.
    const entries: JournalEntry[] = [];
    for (let i = 0; i < keys.length; i += INSERT_CHUNK) {
      const part = keys.slice(i, i + INSERT_CHUNK);
      entries.push(await this.insertPinned(await this.journal.add(part), part, total));
    }
    if (fua) for (const e of entries) await this.journal.commit(e);
    return total;
  }

  /**
   * Insert `keys`, journaled in `entry` (pinned by the caller; this unpins
   * it), and return the entry that holds them in the end. A rewrite whose
   * node buckets are not ready is not waited for with the pin held (see
   * InsertOptions.bucketsNow): the pin goes, the buckets are waited for, and
   * the keys left are journaled again in a newer entry. Until they are in the
   * tree the write has not been acknowledged, so whether a crash replays the
   * first entry's copy of them or not, it reads back as old or new.
   */
  private async insertPinned(entry: JournalEntry, keys: readonly Bkey[], result: InsertResult): Promise<JournalEntry> {
    let pinned = entry;
    let left = keys;
    for (;;) {
      try {
        left = await this.btree.insertRest(left, { journal: pinned, bucketsNow: true }, result);
      } finally {
        this.journal.unpin(pinned);
      }
      if (left.length === 0) return pinned;
      await this.waitForNodeBuckets(2 * this.btree.depth + 1);
      pinned = await this.journal.add(left);
    }
  }

  /**
   * Until `n` node buckets are ready (taken and given back, so the insert
   * that retries finds them), or, while another holds the grant, until it
   * comes back. Not in the grant's queue: an insert whose retry finds the
   * grant taken comes back here, and queued behind the others it found, on
   * every retry, the next of them holding the grant for the same take and
   * give back, and nobody rewrote the leaf (a burst of inserts into a full
   * leaf whose last block an append had just filled spun like that for
   * good: test/bcache/rewrite-burst.test.ts). Woken together when the grant
   * comes back, the first retry to reach its leaf takes the grant.
   */
  private async waitForNodeBuckets(n: number): Promise<void> {
    if (this.ioDisabledFlag) throw new IoError('EIO', `cache set ${this.uuid}: I/O disabled`);
    if (this.nodeGrants.isLocked) {
      await new Promise<void>((resolve) => this.nodeGrantWaiters.push(resolve));
      return;
    }
    const got = await this.allocNodeBuckets(n, true);
    if (got.length === 0) return; // a grant came back meanwhile: the retry may not need any
    for (const b of got) this.allocator.unalloc(b, RESERVE_BTREE);
    this.nodeGrantBack();
  }

  /** Make [start, end) of `inode` a hole (bch_data_invalidate): journaled zero-pointer keys. */
  async invalidate(inode: number, start: number, end: number, options: { fua?: boolean } = {}): Promise<void> {
    const keys: Bkey[] = [];
    for (let s = start; s < end; s += INVALIDATE_CHUNK) {
      const e = Math.min(end, s + INVALIDATE_CHUNK);
      keys.push(makeKey(inode, e, e - s, false, []));
    }
    await this.insert(keys, { journal: true, fua: options.fua === true });
  }

  /** FLUSH: an R1 journal commit; everything completed before is durable after. */
  async flush(): Promise<void> {
    this.check();
    await this.journal.commit();
  }

  // ---------------------------------------------------------------------------
  // Data

  async allocSectors(o: AllocSectorsOptions): Promise<SectorAllocation | undefined> {
    this.check();
    return this.openBuckets.alloc(o);
  }

  /** allocSectors() when space is ready now (no waiting, no promise); undefined otherwise. */
  allocSectorsNow(o: AllocSectorsOptions): SectorAllocation | undefined {
    this.check();
    return this.openBuckets.allocNow(o);
  }

  putAllocation(a: SectorAllocation): void {
    this.openBuckets.put(a);
  }

  // The data path's entry points return the I/O's own promise (no extra
  // async frame per cache hit or write).
  readCache(buf: Buffer, sector: number): Promise<void> {
    return this.io.read(buf, sector);
  }

  /**
   * readCache() done here and now: from the copies of hot blocks in memory,
   * else from the device if it can answer at once (CacheIo.readNow); false
   * when it must wait, and then nothing was counted. Only for sectors a live
   * key points to, checked in the same turn (ram-cache.ts says why).
   */
  readCacheNow(buf: Buffer, sector: number): boolean {
    if (this.ioDisabledFlag) return false;
    const bucket = Math.floor(sector / this.buckets.bucketSize);
    const ram = this.ramCache;
    if (ram.read(buf, sector, bucket)) return true;
    if (!this.io.readNow(buf, sector)) return false;
    ram.admit(buf, sector, bucket);
    return true;
  }

  writeCache(buf: Buffer, sector: number): Promise<void> {
    return this.io.write(buf, sector);
  }

  /** bch_rescale_priorities(): age bucket prios as non-bypassed I/O goes by. */
  rescalePriorities(sectors: number): void {
    this.rescale -= sectors;
    if (this.rescale >= 0) return;
    this.rescale += Math.floor((this.sb.nbuckets * this.sb.bucketSize) / 1024);
    const b = this.buckets;
    let min = 0xffff;
    for (let i = 0; i < b.nbuckets; i++) {
      const p = b.prio[i] ?? 0;
      if (p !== 0 && p !== 0xffff && b.pin[i] === 0) {
        b.prio[i] = p - 1;
        if (p - 1 < min) min = p - 1;
      }
    }
    b.minPrio = min === 0xffff ? 0 : min;
  }

  // ---------------------------------------------------------------------------
  // Buckets for btree rewrites

  /**
   * `n` buckets for a btree rewrite (BtreeHost.allocNodeBuckets), granted to
   * one rewrite at a time: the next request waits until the grant comes back
   * (the rewrite swapped its nodes in, or gave the buckets back unused), and
   * then, if anything came back since it asked, gets nothing and looks at its
   * leaf again (Btree.insert asks again if the leaf still needs a rewrite).
   *
   * Why not every request at once, a bucket at a time: when a leaf is full,
   * every insert that reaches it (a burst of fills, the writes of a
   * sequential stream) asks for a whole rewrite's worth (2 x depth + 1).
   * Taking them a bucket at a time, each behind all the others, none gets
   * its set until all of them have got nearly theirs: dozens of partial sets,
   * drawn from the allocator round after round. Each round is a prio write
   * and a journal commit (R3), and each waiting insert holds its journal
   * entry pinned (CacheSet.insert) - so the rounds fill the journal ring up
   * to the oldest waiter's entry, the next prio commit waits for ring space
   * (Journal.makeRoom), the allocator waits for that commit, and the waiters
   * wait for the allocator: a deadlock, with the cache drained into partial
   * sets (cache_available_percent near 0). One grant at a time needs a
   * rewrite's worth, of which all but the nodes it writes come back; the
   * inserts behind it then find room in the new leaf and need nothing.
   *
   * Without `wait` (GC compaction, an optimisation): what is ready now, and
   * nothing while a grant is out or rewrites wait for one.
   */
  private async allocNodeBuckets(n: number, wait: boolean): Promise<number[]> {
    const seen = this.nodeGrantEpoch;
    if (!wait && this.nodeGrants.isLocked) return [];
    const release = await this.nodeGrants.lock();
    if (this.nodeGrantEpoch !== seen) {
      // A grant came back while this one waited: the caller's leaf may have room now.
      release();
      return [];
    }
    this.nodeGrantRelease = release;
    const out: number[] = [];
    try {
      for (let i = 0; i < n; i++) {
        const p = this.allocator.allocPool();
        const b = p >= 0 ? p : await this.allocator.alloc(RESERVE_BTREE, wait);
        if (b === undefined) {
          if (!wait) break;
          throw new IoError('ENOSPC', 'btree: no bucket for a node');
        }
        out.push(b);
      }
    } catch (err) {
      for (const b of out) this.allocator.unalloc(b, RESERVE_BTREE);
      this.nodeGrantBack();
      throw err;
    }
    if (out.length === 0) this.nodeGrantBack();
    return out;
  }

  /**
   * A grant came back: buckets were returned, or a rewrite went in. Whose is
   * not known (nor needed): a holder asks again while its grant is out only
   * when another rewrite grew the tree meanwhile, and that rewrite's coming
   * back is what lets it in; at worst a stray return lets the next request
   * in early, and two grants are out at once.
   */
  private nodeGrantBack(): void {
    this.nodeGrantEpoch++;
    const release = this.nodeGrantRelease;
    this.nodeGrantRelease = undefined;
    release?.();
    const waiters = this.nodeGrantWaiters;
    if (waiters.length > 0) {
      this.nodeGrantWaiters = [];
      for (const w of waiters) w();
    }
  }

  // ---------------------------------------------------------------------------
  // UUIDs and GC

  async writeUuids(): Promise<void> {
    this.check();
    await this.uuids.write();
  }

  triggerGc(): void {
    this.gc.request();
  }

  async runGc(): Promise<void> {
    this.check();
    await this.gc.runNow();
  }

  // ---------------------------------------------------------------------------
  // Teardown

  /**
   * Stop the set (cache_set_flush): GC, dirty nodes written, allocator, a
   * final journal entry, the superblock, the device closed. Idempotent and
   * bounded: past stopTimeoutMs it logs and closes anyway.
   */
  stop(): Promise<void> {
    if (!this.stopPromise) this.stopPromise = this.shutdown(true);
    return this.stopPromise;
  }

  private async shutdown(clean: boolean): Promise<void> {
    this.stopping = true;
    const limit = this.options.stopTimeoutMs ?? 60_000;
    let timer: Timer | undefined;
    const timedOut = await Promise.race([
      this.teardown(clean).then(() => false),
      new Promise<boolean>((resolve) => {
        timer = this.clock.setTimer(limit, () => {
          resolve(true);
        });
      }),
    ]);
    timer?.cancel();
    if (timedOut) log.warn(`bcache: cache set ${this.uuid}: stop gave up after ${limit} ms`);
    this.openBuckets.closeAll();
    if (this.options.closeDevice !== false) await this.dev.close().catch(() => undefined);
    log.info(`bcache: cache_set_free() Cache set ${this.uuid} unregistered`);
    this.options.onStopped?.(this);
  }

  private async teardown(clean: boolean): Promise<void> {
    const attempt = async (what: string, fn: () => Promise<void>): Promise<void> => {
      try {
        await fn();
      } catch (err) {
        log.error(`bcache: cache set ${this.uuid}: ${what} failed while stopping: ${errorMessage(err)}`);
        this.fail(err);
      }
    };
    // Workers stop whatever happens to the writes: each step on its own.
    await this.gc.stop();
    if (clean && !this.disabled() && this.btree.hasRoot) {
      await attempt('writing dirty btree nodes', async () => {
        await allDone(this.btree.dirtyNodes().map((n: BtreeNode) => this.btree.writeNode(n)));
      });
    }
    await this.allocator.stop();
    await this.journal.stop();
    if (clean && !this.disabled() && this.btree.hasRoot && cacheSync(this.sb)) {
      await attempt('the final journal entry', () => this.journal.writeFinal());
      if (!this.disabled()) await attempt('the superblock', () => this.writeSuperblock());
    }
  }
}
