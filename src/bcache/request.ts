// The I/O path of a bcache device (request.c): bypass decisions, cache
// modes, hits and misses, FLUSH, FUA, discard and write-zeroes
// (docs/engine.md §8 has the design and its departures from the kernel).
//
// Offsets come in as bytes of the bcache device; inside, everything is in
// key space: backing sectors, data offset included (bcache sector s is
// backing sector s + data_offset, and its key is keyed so).
//
// Request kinds and what they do:
//
//   read        look up; hits from the cache (dirty data always from there),
//               misses from the backing device; non-bypassed misses are then
//               filled into the cache after the reply (compare-and-insert
//               through the collision tracker: a racing write wins).
//   write, writeback mode (should_writeback): cache only, dirty keys,
//               journaled; R7 first.
//   write, otherwise (writethrough, writearound, none, bypass), discard,
//   write-zeroes: the backing device, then the index made to agree:
//               - clean keys over the range are invalidated durably *before*
//                 the backing device is touched (R8): a clean key claims the
//                 cache holds what the backing device holds, and after a
//                 crash the backing write may have landed; so are keys whose
//                 pointer is stale in memory, since their bucket's new gen
//                 is durable only once the prios are written: after a crash
//                 such a key can be live again, over the data it held;
//               - dirty keys over the range are invalidated only *after* the
//                 backing write is durable (R9: FUA), or a crash could expose
//                 the backing device's older data under them;
//               - writethrough also writes a copy to the cache, whose clean
//                 key enters the index once a backing flush made the copy's
//                 source durable (R8 again).
//   flush       the backing device and a journal commit, in parallel.
//
// Lifecycle: every request runs inside enter()/leave() (stop waits for
// them, within its bound: see close()) and, on the cached path, holds a
// reference on the attachment (detach waits for it); a request that cannot
// take one is served in passthrough.

import { IoError, type BlockDevice } from '../blockdev/types.ts';
import { makeKey, type Bkey } from '../format/bkey.ts';
import {
  BDEV_STATE_CLEAN,
  CACHE_MODE_NONE,
  CACHE_MODE_WRITEAROUND,
  CACHE_MODE_WRITEBACK,
  SECTOR_SIZE,
} from '../format/constants.ts';
import type { Clock } from '../util/clock.ts';
import {
  allDone,
  deferred,
  errorMessage,
  nextTurn,
  Notifier,
  sleep,
  Worker,
  type Deferred,
  type RefCount,
} from '../util/lifecycle.ts';
import { defined } from '../util/assert.ts';
import { msLeft, settledWithin } from '../util/deadline.ts';
import { log } from '../util/log.ts';
import type { BackingIo } from './backing.ts';
import type { CacheSet, LookupSegment, SectorAllocation } from './cache-set.ts';
import type { AllocSectorsOptions } from './open-buckets.ts';
import type { CacheAccounting } from './stats.ts';
import { CollisionTracker, type Window } from './tracker.ts';
import { CUTOFF_CACHE_ADD, CUTOFF_CACHE_READA, CUTOFF_WRITEBACK_SYNC } from './cutoffs.ts';
import { SecondHit, slotsFor, type AdmissionPolicy } from './admission.ts';

/** The request path's tunables, part of a backing device's settings (read on every request). */
export interface RequestSettings {
  /** Bytes; 0 disables sequential bypass. */
  readonly sequentialCutoff: number;
  /** Bytes a cache miss is rounded up to; 0: none. */
  readonly readahead: number;
  /** dc->io_disable: every request fails fast. */
  readonly ioDisable: boolean;
  /** Which read misses are filled (ubcache's extension, admission.ts): `always` is bcache's behaviour. */
  readonly cacheAdmission: AdmissionPolicy;
}

/**
 * What the request path needs of its bcache device (CachedDev is one): the
 * backing device and its I/O, the superblock's mode and state, the R7
 * transition, the counters, and the current attachment, if any.
 */
export interface RequestHost {
  /** bcacheN, for messages and worker names. */
  readonly name: string;
  readonly backing: BlockDevice;
  readonly backingName: string;
  readonly backingIo: BackingIo;
  /** Sectors of the bcache device (the backing device minus data_offset). */
  readonly sectors: number;
  readonly dataOffset: number;
  /** CACHE_MODE_* and BDEV_STATE_* of the backing superblock. */
  readonly cacheMode: number;
  readonly state: number;
  readonly settings: RequestSettings;
  readonly stats: CacheAccounting;
  /** Bound on the stop of the request path's own worker (the backing flusher). */
  readonly stopTimeoutMs: number;
  /** Whose time deadlines, the flusher's delay and sequential-bypass detection are measured in. */
  readonly clock: Clock;
  /** The attachment to a cache set; undefined: every request goes to the backing device. */
  readonly attachment: RequestAttachment | undefined;
  /** R7: the superblock does not say DIRTY durably yet; markDirty() before a writeback-mode write. */
  readonly needsMarkDirty: boolean;
  markDirty(): Promise<void>;
}

/** What a request needs of the set its device is attached to (the registry's RegisteredSet is one). */
export interface RequestSet {
  readonly stats: CacheAccounting;
  /** A request arrived: the set is not idle (the writeback rate's idle shortcut). */
  noteRequest(): void;
}

/** What a request needs of the attachment it runs on (CachedDev's Attachment is one). */
export interface RequestAttachment {
  readonly cs: CacheSet;
  /** The device's keys in the btree. */
  readonly inode: number;
  readonly set: RequestSet;
  /** A request on the cached path holds a reference for its whole life (fills included). */
  readonly ref: RefCount;
  /** Once the set failed: true, requests caught by it are redone on the backing device; false, they fail. */
  readonly lossDecided: { readonly promise: Promise<boolean> };
  readonly detaching: boolean;
  readonly ended: boolean;
  /** The writeback worker: writes take queued keys out of its pass and wait for copies in flight. */
  readonly writeback: {
    overlapping(start: number, end: number): Promise<void>[] | undefined;
    dirtied(): void;
  };
}

/** RECENT_IO: streams remembered for sequential detection. */
const RECENT_IO = 128;
/** How long a stream stays recent (ms). */
const RECENT_IO_MS = 5000;
/** Miss fills in flight or waiting for a backing flush, per device. */
const MAX_FILL_BYTES = 64 * 1024 * 1024;
/** How long fills wait for the backing flush that makes their source durable (ms). */
const BACKING_FLUSH_DELAY_MS = 50;
/** Released fills inserted per turn of the event loop (insertReleased): ~20 µs each. */
const FILLS_PER_TURN = 16;
/** Attempts to read a hit whose bucket is reused under the read. */
const READ_RACE_RETRIES = 4;

interface Stream {
  last: number;
  sequential: number;
  expires: number;
  prev: Stream | undefined;
  next: Stream | undefined;
}

/**
 * Sequential detection (check_should_bypass): RECENT_IO streams keyed by the
 * sector they end at; a request continues a stream if one ends where it
 * starts and was touched in the last 5 s, else it recycles the least
 * recently used one. Per device: a daemon has no submitting task, so the
 * per-task average the kernel also folds in is left out (a stream is judged
 * by its own length only).
 */
export class SequentialDetector {
  private readonly byLast = new Map<number, Stream>();
  private head: Stream | undefined;
  private tail: Stream | undefined;

  constructor() {
    for (let i = 0; i < RECENT_IO; i++) {
      const s: Stream = { last: -1, sequential: 0, expires: 0, prev: this.tail, next: undefined };
      if (this.tail) this.tail.next = s;
      else this.head = s;
      this.tail = s;
    }
  }

  /** The stream's sequential bytes including this request. */
  observe(start: number, end: number, now: number): number {
    let s: Stream | undefined = this.byLast.get(start);
    if (!s || s.expires <= now) {
      s = this.head;
      if (!s) return 0;
      s.sequential = 0;
    }
    if (this.byLast.get(s.last) === s) this.byLast.delete(s.last);
    s.sequential += (end - start) * SECTOR_SIZE;
    s.last = end;
    s.expires = now + RECENT_IO_MS;
    this.byLast.set(end, s);
    // Move to the tail (most recently used).
    if (s !== this.tail) {
      if (s.prev) s.prev.next = s.next;
      else this.head = s.next;
      if (s.next) s.next.prev = s.prev;
      s.prev = this.tail;
      s.next = undefined;
      if (this.tail) this.tail.next = s;
      this.tail = s;
    }
    return s.sequential;
  }
}

type BackingOp =
  | { kind: 'write'; buf: Buffer; fua: boolean; cache: boolean }
  | { kind: 'discard' }
  | { kind: 'zeroes'; noHole: boolean; fua: boolean };

/** A miss rounded up by readahead: [start, end) of the backing device, read into `data`. */
interface Readahead {
  start: number;
  end: number;
  data: Buffer;
}

/** What placeInCache started: allocations to put back, their writes, and the keys for them. */
interface Placed {
  allocs: SectorAllocation[];
  keys: Bkey[];
  writes: Promise<void>[];
}

/** The allocation asked for sectors [off, end) of a request (its write point is the device's). */
function placeWant(att: RequestAttachment, off: number, end: number, dirty: boolean): AllocSectorsOptions {
  return { inode: att.inode, offset: off, sectors: end - off, writePoint: att.inode, dirty, wait: dirty };
}

/** A clean key waiting for the backing flush that makes its source durable. */
interface PendingFill {
  att: RequestAttachment;
  keys: Bkey[];
  allocs: SectorAllocation[];
  win: Window;
  epoch: number;
  bytes: number;
  /** A miss fill (a lost race counts as cache_miss_collisions), not a writethrough copy. */
  miss: boolean;
}

export class RequestPath {
  private readonly dev: RequestHost;
  /** Bytes of the bcache device (its size is fixed: the backing device's is). */
  private readonly size: number;
  readonly tracker = new CollisionTracker();
  private readonly seq = new SequentialDetector();
  private inflight = 0;
  private drained: Deferred<void> | undefined;
  private closing = false;
  /** stopWorkers() ran: nothing may start a worker any more. */
  private workersStopped = false;
  private pending: PendingFill[] = [];
  /** Fills a completed flush made insertable, waiting for their turn (insertReleased). */
  private released: PendingFill[] = [];
  private releasing = false;
  private fillBytes = 0;
  /** Fills (and writethrough copies) between their read or write and their insert. */
  private fills = 0;
  private fillWaiters: Array<() => void> = [];
  private flusher: Worker | undefined;
  private readonly flusherWake: Notifier;
  /** Writeback-mode writes between their R7 check and their insert. */
  dirtyWritesInFlight = 0;
  /** Cache read races (cache_read_races): a hit's bucket was reused under the read. */
  cacheReadRaces = 0;
  /** The second-hit policy's ghost table, for the cache set it was sized for (made on first use). */
  private ghost: { cs: CacheSet; table: SecondHit } | undefined;

  constructor(dev: RequestHost) {
    this.dev = dev;
    this.size = dev.sectors * SECTOR_SIZE;
    this.flusherWake = new Notifier(dev.clock);
    dev.backingIo.onFlushed((epoch) => {
      this.backingFlushed(epoch);
    });
  }

  // ---------------------------------------------------------------------------
  // Lifecycle

  private enter(): void {
    if (this.closing) throw new IoError('ESHUTDOWN', `${this.dev.name}: the device is stopping`);
    // dc->io_disable (by hand, a failing or offline backing device, a lost dirty cache): fail fast.
    if (this.dev.settings.ioDisable) throw new IoError('EIO', `${this.dev.name}: I/O is disabled`);
    this.inflight++;
  }

  private leave(): void {
    this.inflight--;
    if (this.inflight === 0 && this.drained) this.drained.resolve();
  }

  /**
   * Refuse new requests and wait for those in flight (fills waiting for a
   * flush included), at most `timeoutMs` (DESIGN rule 1). Resolves true once
   * nothing is in flight, false past the bound: what is still in flight is
   * stuck below (a backing device that never answers, a bug) and is left to
   * end on its own. Its end is harmless: no new request or fill starts once
   * closing, stopWorkers() makes later fills drop instead of starting the
   * flusher, and the device's stop gives up on the attachment's references
   * the same way; a late completion only releases what it holds and settles
   * promises nobody awaits any more.
   */
  async close(timeoutMs = Infinity): Promise<boolean> {
    this.closing = true;
    const deadline = this.dev.clock.now() + timeoutMs;
    if (this.pending.length > 0) {
      const flushed = this.dev.backingIo.flush().then(
        () => true,
        (err: unknown) => {
          log.warn(`${this.dev.name}: flushing ${this.dev.backingName} at stop: ${errorMessage(err)}`);
          return false;
        },
      );
      const inTime = await settledWithin(flushed, msLeft(deadline, this.dev.clock), this.dev.clock);
      // Fills whose source is not known durable are dropped: a fill is only ever an optimisation.
      if (!inTime || !(await flushed)) {
        if (!inTime) log.warn(`${this.dev.name}: flushing ${this.dev.backingName} at stop took over ${timeoutMs} ms`);
        for (const p of this.pending.splice(0)) this.finishFill(p, false);
      }
    }
    if (this.inflight === 0) return true;
    this.drained ??= deferred();
    return settledWithin(this.drained.promise, msLeft(deadline, this.dev.clock), this.dev.clock);
  }

  /** Stop the backing flusher; from here on a fill that would wait for it is dropped instead. */
  async stopWorkers(): Promise<void> {
    this.workersStopped = true;
    await this.flusher?.stop();
    this.flusher = undefined;
    // Fills of requests that outlived close()'s bound: nothing will flush for them now.
    for (const p of this.pending.splice(0)) this.finishFill(p, false);
    for (const p of this.released.splice(0)) this.finishFill(p, false);
  }

  /** Drop the fills of an attachment that ended (detach finished, stop). */
  dropDeferred(att: RequestAttachment): void {
    const others = (fills: PendingFill[]): PendingFill[] => {
      const keep: PendingFill[] = [];
      for (const p of fills) {
        if (p.att === att) this.finishFill(p, false);
        else keep.push(p);
      }
      return keep;
    };
    this.pending = others(this.pending);
    this.released = others(this.released);
  }

  get requestsInFlight(): number {
    return this.inflight;
  }

  get fillsPending(): number {
    return this.pending.length;
  }

  // ---------------------------------------------------------------------------
  // Helpers

  /** Byte range -> key-space sectors, checked. */
  private range(offset: number, length: number): { start: number; end: number } {
    const size = this.size;
    if (
      !Number.isSafeInteger(offset) ||
      !Number.isSafeInteger(length) ||
      offset < 0 ||
      length < 0 ||
      offset % SECTOR_SIZE !== 0 ||
      length % SECTOR_SIZE !== 0
    ) {
      throw new IoError('EINVAL', `${this.dev.name}: offset ${offset} and length ${length} must be multiples of 512`);
    }
    if (offset + length > size) {
      throw new IoError('EINVAL', `${this.dev.name}: range ${offset}+${length} extends past the end (${size} bytes)`);
    }
    const start = offset / SECTOR_SIZE + this.dev.dataOffset;
    return { start, end: start + length / SECTOR_SIZE };
  }

  /**
   * Run a request on the cached path, or in passthrough when there is no
   * attachment (or it is ending: its count reached zero). When the cache set
   * fails under the request, or has failed before it, the set's retire
   * decides (cacheSetFailed): a device kept alive redoes the request from the
   * backing device alone, so its clients carry on without noticing; a
   * device being stopped fails it (CACHE_SET_IO_DISABLE: EIO).
   */
  private async withCache(
    cached: (att: RequestAttachment) => Promise<void>,
    passthrough: () => Promise<void>,
  ): Promise<void> {
    const att = this.dev.attachment;
    if (!att || !att.ref.tryGet()) return passthrough();
    let failure: unknown;
    try {
      if (!att.cs.ioDisabled) {
        att.set.noteRequest();
        await cached(att);
        return;
      }
      failure = new IoError('EIO', `${this.dev.name}: cache set ${att.cs.uuid} has I/O disabled`);
    } catch (err) {
      if (!att.cs.ioDisabled) throw err;
      failure = err;
    } finally {
      att.ref.put();
    }
    // The reference is dropped first: the retire waits for it before it decides.
    if (!(await att.lossDecided.promise)) throw failure;
    return passthrough();
  }

  private markBypassed(att: RequestAttachment, sectors: number): void {
    this.dev.stats.markBypassed(sectors);
    att.set.stats.markBypassed(sectors);
  }

  /**
   * check_should_bypass(). Counts bypassed sectors; rescales priorities for
   * what it admits.
   */
  private shouldBypass(att: RequestAttachment, start: number, end: number, write: boolean, fua: boolean): boolean {
    const cs = att.cs;
    const mode = this.dev.cacheMode;
    const sectors = end - start;
    let skip = false;
    if (att.detaching) skip = true;
    else if (cs.inUse > CUTOFF_CACHE_ADD) {
      // With nothing dirty, only GC can make room: make sure it runs.
      if (this.dev.state === BDEV_STATE_CLEAN) cs.triggerGc();
      skip = true;
    } else if (mode === CACHE_MODE_NONE || (mode === CACHE_MODE_WRITEAROUND && write)) skip = true;
    else if (start % cs.blockSize !== 0 || sectors % cs.blockSize !== 0) skip = true;
    else {
      const cutoff = this.dev.settings.sequentialCutoff;
      // bch_get_congested(): 0, or the stream length (sectors) past which a
      // slow cache device is bypassed; a congested set tracks streams even
      // with sequential_cutoff 0, and then FUA writes in writeback mode are
      // judged too (as the kernel that exempted sync writes did it).
      const congested = cs.io.congestion.congested();
      if (congested !== 0 || (cutoff !== 0 && !(mode === CACHE_MODE_WRITEBACK && write && fua))) {
        const sequential = Math.floor(this.seq.observe(start, end, this.dev.clock.now()) / SECTOR_SIZE);
        if (cutoff !== 0 && sequential >= Math.floor(cutoff / SECTOR_SIZE)) skip = true;
        else if (congested !== 0 && sequential >= congested) skip = true;
      }
    }
    if (skip) {
      this.markBypassed(att, sectors);
      return true;
    }
    cs.rescalePriorities(sectors);
    return false;
  }

  /**
   * should_writeback() for a write that is not bypassed. The kernel takes a
   * write it counts as sync (REQ_SYNC: O_DIRECT, fsync'd data) into the
   * cache while in_use is at most CUTOFF_WRITEBACK_SYNC, and any other write
   * only up to CUTOFF_WRITEBACK, because nobody waits on a page cache's
   * background writeback. Every NBD write has a waiter (it has left the
   * client's cache: qemu, the kernel's nbd driver and fio each wait on their
   * requests), and the protocol has nothing that tells the two kinds apart,
   * so every write counts as sync here; CUTOFF_WRITEBACK is unused.
   */
  private shouldWriteback(att: RequestAttachment): boolean {
    if (this.dev.cacheMode !== CACHE_MODE_WRITEBACK || att.detaching) return false;
    return att.cs.inUse <= CUTOFF_WRITEBACK_SYNC;
  }

  // ---------------------------------------------------------------------------
  // Reads

  async read(buf: Buffer, offset: number): Promise<void> {
    const { start, end } = this.range(offset, buf.length);
    this.enter();
    try {
      if (start === end) return;
      await this.withCache(
        (att) => this.cachedRead(att, buf, start, end),
        () => this.dev.backingIo.read(buf, start),
      );
    } finally {
      this.leave();
    }
  }

  /**
   * read() for the common hit, done here and now: one cached extent covers
   * the request and its data is in memory (the page cache), so nothing waits.
   * True when `buf` holds the data, counted as read() counts a hit (bypassed
   * or not: the bypass decision only matters to a miss's fill). False when
   * that does not hold; then nothing was done that read() would not do again
   * (the lookup's touch of the bucket's prio), nothing was counted, and the
   * caller uses read(). Through NBD a hit's promises and their microtasks
   * were about a tenth of its CPU (docs/performance.md, "The hit without a
   * promise").
   */
  readNow(buf: Buffer, offset: number): boolean {
    if (this.closing || this.dev.settings.ioDisable) return false;
    const att = this.dev.attachment;
    const length = buf.length;
    if (
      !att ||
      att.cs.ioDisabled ||
      length === 0 ||
      !Number.isSafeInteger(offset) ||
      offset < 0 ||
      offset % SECTOR_SIZE !== 0 ||
      length % SECTOR_SIZE !== 0 ||
      offset + length > this.size ||
      !att.ref.tryGet()
    ) {
      return false;
    }
    try {
      const cs = att.cs;
      const start = offset / SECTOR_SIZE + this.dev.dataOffset;
      const end = start + length / SECTOR_SIZE;
      const hit = cs.lookupOneNow(att.inode, start, end);
      if (!hit || !cs.readCacheNow(buf, hit.sector)) return false;
      // Nothing ran between the lookup and the copy, so the bucket cannot
      // have been reused under it (readHit's race); checked all the same.
      if (cs.isStale(hit.bucket, hit.gen)) return false;
      att.set.noteRequest();
      const bypass = this.shouldBypass(att, start, end, false, false);
      this.dev.stats.markRead(true, bypass);
      att.set.stats.markRead(true, bypass);
      return true;
    } finally {
      att.ref.put();
    }
  }

  private async cachedRead(att: RequestAttachment, buf: Buffer, start: number, end: number): Promise<void> {
    const bypass = this.shouldBypass(att, start, end, false, false);
    // A write that lands after the lookup saw the range empty must still win
    // over the fill: note what could tell (tracker.ts) before looking up.
    const tracker = this.tracker;
    const epoch = tracker.epoch;
    const raced = !bypass && tracker.activeOver(start, end);
    const cs = att.cs;
    // Readahead may extend the fill past the request: a write in flight there
    // rules it out, checked before the lookups for the same reason as `raced`.
    const raMax = bypass ? 0 : this.readaheadSectors(cs, end);
    const raRaced = raMax > 0 && tracker.activeOver(end, end + raMax);
    const segs = cs.lookupNow(att.inode, start, end) ?? (await cs.lookup(att.inode, start, end));
    let miss = false;
    for (const s of segs) if (!s.hit) miss = true;
    this.dev.stats.markRead(!miss, bypass);
    att.set.stats.markRead(!miss, bypass);
    let win: Window | undefined;
    let ra: Readahead | undefined;
    if (miss && !bypass && (this.dev.settings.cacheAdmission === 'always' || this.admit(att, segs))) {
      const last = defined(segs[segs.length - 1], 'a read with a miss has segments');
      if (!last.hit && raMax > 0 && !raRaced) ra = await this.readaheadRange(att, last.start, end, raMax);
      win = tracker.openWindow(start, ra ? ra.end : end);
      if (raced || tracker.epoch !== epoch) win.collided = true;
    }
    let filling = false;
    try {
      if (segs.length === 1 && !ra) {
        await this.readSegment(att, buf, start, defined(segs[0], 'segs has one segment'));
      } else {
        // Every part ends before the request does, failed or not: nothing
        // writes into the client's buffer after it was told the read failed.
        await allDone(
          segs.map((s, i) =>
            ra && i === segs.length - 1 ? this.readAhead(buf, start, ra) : this.readSegment(att, buf, start, s),
          ),
        );
      }
      if (win && !win.collided) filling = this.startFill(att, buf, start, segs, win, ra);
      else if (win) this.markCollision(att);
    } finally {
      if (win && !filling) tracker.closeWindow(win);
    }
  }

  /** The admission policy's verdict on a read's misses (never called under `always`). */
  private admit(att: RequestAttachment, segs: LookupSegment[]): boolean {
    const cs = att.cs;
    let g = this.ghost;
    if (g?.cs !== cs) {
      g = { cs, table: new SecondHit(slotsFor(cs.buckets.nbuckets * cs.bucketSize)) };
      this.ghost = g;
    }
    let seen = false;
    for (const s of segs) if (!s.hit && g.table.admit(s.start, s.end)) seen = true;
    return seen;
  }

  /** The admission policy's counts since its table was made (sysfs cache_admission_*), or zeros. */
  get admissionStats(): { admitted: number; declined: number } {
    const t = this.ghost?.table;
    return { admitted: t?.admitted ?? 0, declined: t?.declined ?? 0 };
  }

  /**
   * readahead (bcache before Linux 5.13): how far past `end` a miss may be
   * rounded up, in sectors, or 0: the device's readahead, while the cache is
   * below CUTOFF_CACHE_READA in use, not past the device's end.
   */
  private readaheadSectors(cs: CacheSet, end: number): number {
    const bytes = this.dev.settings.readahead;
    if (bytes === 0 || cs.inUse >= CUTOFF_CACHE_READA) return 0;
    const deviceEnd = this.dev.dataOffset + this.dev.sectors;
    return Math.max(0, Math.min(Math.floor(bytes / SECTOR_SIZE), deviceEnd - end));
  }

  /**
   * The readahead of a read whose last segment [missStart, end) is a miss:
   * up to `raMax` sectors more, stopping at the first cached data (it never
   * overlaps what the cache holds), whole cache blocks only.
   */
  private async readaheadRange(
    att: RequestAttachment,
    missStart: number,
    end: number,
    raMax: number,
  ): Promise<Readahead | undefined> {
    const cs = att.cs;
    const after = await cs.lookup(att.inode, end, end + raMax);
    let raEnd = end + raMax;
    for (const s of after) {
      if (s.hit) {
        raEnd = s.start;
        break;
      }
    }
    raEnd = Math.floor(raEnd / cs.blockSize) * cs.blockSize;
    if (raEnd <= end) return undefined;
    this.dev.stats.markReadahead();
    att.set.stats.markReadahead();
    return { start: missStart, end: raEnd, data: Buffer.allocUnsafe((raEnd - missStart) * SECTOR_SIZE) };
  }

  /** The last miss segment with its readahead: one backing read, the request's part copied out. */
  private async readAhead(buf: Buffer, bufStart: number, ra: Readahead): Promise<void> {
    await this.dev.backingIo.read(ra.data, ra.start);
    const wanted = buf.length - (ra.start - bufStart) * SECTOR_SIZE;
    ra.data.copy(buf, (ra.start - bufStart) * SECTOR_SIZE, 0, wanted);
  }

  private readSegment(att: RequestAttachment, buf: Buffer, bufStart: number, s: LookupSegment): Promise<void> {
    const sub = buf.subarray((s.start - bufStart) * SECTOR_SIZE, (s.end - bufStart) * SECTOR_SIZE);
    return s.hit ? this.readHit(att, sub, s, 0) : this.dev.backingIo.read(sub, s.start);
  }

  /** One hit; re-read through a fresh lookup if its bucket was reused under the read. */
  private async readHit(att: RequestAttachment, sub: Buffer, s: LookupSegment, tries: number): Promise<void> {
    const hit = s.hit;
    if (!hit) {
      await this.dev.backingIo.read(sub, s.start);
      return;
    }
    const cs = att.cs;
    try {
      await cs.readCache(sub, hit.sector);
    } catch (err) {
      // Clean data is also on the backing device; dirty data is only here.
      if (hit.dirty || cs.ioDisabled) throw err;
      log.warn(`${cs.dev.name}: IO error reading from cache, recovering: ${errorMessage(err)}`);
      await this.dev.backingIo.read(sub, s.start);
      return;
    }
    if (!cs.isStale(hit.bucket, hit.gen)) return;
    this.cacheReadRaces++;
    if (tries >= READ_RACE_RETRIES) {
      throw new IoError('EIO', `${this.dev.name}: sectors ${s.start}-${s.end} keep moving under reads`);
    }
    const again = await cs.lookup(att.inode, s.start, s.end);
    await allDone(
      again.map((t) =>
        this.readHit(
          att,
          sub.subarray((t.start - s.start) * SECTOR_SIZE, (t.end - s.start) * SECTOR_SIZE),
          t,
          tries + 1,
        ),
      ),
    );
  }

  /**
   * Begin filling the misses of a read into the cache, after its reply (the
   * last one with its readahead, if any). Returns whether it did (and so owns
   * `win`).
   */
  private startFill(
    att: RequestAttachment,
    buf: Buffer,
    bufStart: number,
    segs: LookupSegment[],
    win: Window,
    ra: Readahead | undefined,
  ): boolean {
    const cs = att.cs;
    if (cs.stopped || cs.ioDisabled || this.closing) return false;
    const bs = cs.blockSize;
    const pieces: Array<{ start: number; end: number; src: Buffer; srcStart: number }> = [];
    let sectors = 0;
    for (let i = 0; i < segs.length; i++) {
      const s = defined(segs[i], 'i < segs.length');
      if (s.hit) continue;
      const last = ra !== undefined && i === segs.length - 1;
      const a = Math.ceil(s.start / bs) * bs;
      const b = Math.floor((last ? ra.end : s.end) / bs) * bs;
      if (b > a) {
        pieces.push(
          last
            ? { start: a, end: b, src: ra.data, srcStart: ra.start }
            : { start: a, end: b, src: buf, srcStart: bufStart },
        );
        sectors += b - a;
      }
    }
    const bytes = sectors * SECTOR_SIZE;
    if (bytes === 0 || this.fillBytes + bytes > MAX_FILL_BYTES) return false;
    if (!att.ref.tryGet()) return false;
    // The reply may go out and the client reuse its buffer: keep a copy.
    const data = Buffer.allocUnsafe(bytes);
    let at = 0;
    for (const p of pieces) {
      p.src.copy(data, at, (p.start - p.srcStart) * SECTOR_SIZE, (p.end - p.srcStart) * SECTOR_SIZE);
      at += (p.end - p.start) * SECTOR_SIZE;
    }
    this.inflight++;
    this.fills++;
    this.fillBytes += bytes;
    void this.fill(att, pieces, data, win, bytes);
    return true;
  }

  /** cached_dev_read_done .. bch_data_insert for a miss: never rejects. */
  private async fill(
    att: RequestAttachment,
    pieces: Array<{ start: number; end: number }>,
    data: Buffer,
    win: Window,
    bytes: number,
  ): Promise<void> {
    const allocs: SectorAllocation[] = [];
    const keys: Bkey[] = [];
    let handedOff = false;
    try {
      const writes: Promise<void>[] = [];
      const placed = { allocs, keys, writes };
      let at = 0;
      for (const p of pieces) {
        const len = (p.end - p.start) * SECTOR_SIZE;
        const piece = data.subarray(at, at + len);
        const reached = await this.placeInCache(att, piece, p.start, p.end, { stop: () => win.collided }, placed);
        at += len;
        if (reached < p.end) break;
      }
      await settleAll(writes);
      if (keys.length === 0) return;
      if (win.collided) {
        this.markCollision(att);
        return;
      }
      let epoch = 0;
      for (const p of pieces) epoch = Math.max(epoch, this.dev.backingIo.epochFor(p.start, p.end));
      const fill: PendingFill = { att, keys, allocs, win, epoch, bytes, miss: true };
      handedOff = true;
      if (epoch === 0) await this.insertFill(fill);
      else this.defer(fill);
    } catch (err) {
      log.debug(`${this.dev.name}: cache miss fill dropped: ${errorMessage(err)}`);
    } finally {
      if (!handedOff) this.releaseFill(att, allocs, win, bytes);
    }
  }

  private markCollision(att: RequestAttachment): void {
    this.dev.stats.markCollision();
    att.set.stats.markCollision();
  }

  /** Insert a fill's clean keys if no write overlapped it meanwhile (the guard). */
  private async insertFill(p: PendingFill): Promise<void> {
    let ok = false;
    try {
      if (!p.win.collided && !p.att.detaching && !p.att.ended) {
        const r = await p.att.cs.insert(p.keys, {
          journal: false,
          guard: () => !p.win.collided && !p.att.detaching,
        });
        ok = r.collisions === 0;
      }
    } catch (err) {
      log.debug(`${this.dev.name}: cache fill insert failed: ${errorMessage(err)}`);
      ok = true;
    } finally {
      if (!ok && p.miss) this.markCollision(p.att);
      this.releaseFill(p.att, p.allocs, p.win, p.bytes);
    }
  }

  /**
   * Give back a request's cache allocations, unless the request outlived
   * the device's stop (close(): the attachment ended under it) and the set
   * has stopped too: a stopped set's state is not its to touch (the pins go
   * with the set). A set still running (one device stopped by hand) gets
   * them back as from any request.
   */
  private putAllocations(att: RequestAttachment, allocs: readonly SectorAllocation[]): void {
    if (att.ended && att.cs.stopped) return;
    for (const a of allocs) att.cs.putAllocation(a);
  }

  private releaseFill(att: RequestAttachment, allocs: SectorAllocation[], win: Window, bytes: number): void {
    this.putAllocations(att, allocs);
    this.tracker.closeWindow(win);
    this.fillBytes -= bytes;
    this.fills--;
    att.ref.put();
    this.leave();
    if (this.fills === 0) for (const w of this.fillWaiters.splice(0)) w();
  }

  /**
   * Wait until every cache fill and writethrough copy has reached the index
   * or been dropped (flushing the backing device for those waiting on it):
   * for tests and for an orderly stop.
   */
  async settle(): Promise<void> {
    while (this.fills > 0) {
      const done = new Promise<void>((resolve) => this.fillWaiters.push(resolve));
      if (this.pending.length > 0) await this.dev.backingIo.flush();
      await done;
    }
  }

  private finishFill(p: PendingFill, insert: boolean): void {
    if (insert) void this.insertFill(p);
    else this.releaseFill(p.att, p.allocs, p.win, p.bytes);
  }

  private defer(p: PendingFill): void {
    if (this.workersStopped) {
      // A request that outlived the device's stop: no worker may start for it.
      this.finishFill(p, false);
      return;
    }
    this.pending.push(p);
    if (!this.flusher) {
      this.flusher = new Worker(`${this.dev.name} backing flusher`, (signal) => this.runFlusher(signal), {
        stopTimeoutMs: this.dev.stopTimeoutMs,
        clock: this.dev.clock,
      }).start();
    }
    this.flusherWake.notify();
  }

  /**
   * Flush the backing device shortly after fills start waiting for it (at
   * once when a quarter of the bound is waiting).
   */
  private async runFlusher(signal: AbortSignal): Promise<void> {
    while (!signal.aborted) {
      if (!(await this.flusherWake.wait(signal))) break;
      if (this.fillBytes < MAX_FILL_BYTES / 4 && !(await sleep(BACKING_FLUSH_DELAY_MS, signal, this.dev.clock))) break;
      if (this.pending.length === 0) continue;
      try {
        await this.dev.backingIo.flush();
      } catch (err) {
        log.warn(`${this.dev.name}: flushing ${this.dev.backingName}: ${errorMessage(err)}; dropping cache fills`);
        for (const p of this.pending.splice(0)) this.finishFill(p, false);
      }
    }
  }

  private backingFlushed(epoch: number): void {
    if (this.pending.length === 0) return;
    const keep: PendingFill[] = [];
    for (const p of this.pending) {
      if (p.epoch <= epoch) this.released.push(p);
      else keep.push(p);
    }
    this.pending = keep;
    this.insertReleased();
    if (keep.length > 0) this.flusherWake.notify();
  }

  /**
   * Insert the released fills FILLS_PER_TURN to a turn of the event loop.
   * Under a writethrough load a flush releases a couple of hundred fills
   * (about 15 flushes a second), and inserting them all in the flush's
   * completion held the loop for 4-13 ms, every reply waiting behind it.
   * The run ends by itself once the list is empty; a stop empties it.
   */
  private insertReleased(): void {
    if (this.releasing) return;
    this.releasing = true;
    void this.insertReleasedRun();
  }

  private async insertReleasedRun(): Promise<void> {
    try {
      for (;;) {
        for (const p of this.released.splice(0, FILLS_PER_TURN)) void this.insertFill(p);
        if (this.released.length === 0) return;
        await nextTurn();
      }
    } finally {
      this.releasing = false;
    }
  }

  // ---------------------------------------------------------------------------
  // Writes

  async write(buf: Buffer, offset: number, fua: boolean): Promise<void> {
    const { start, end } = this.range(offset, buf.length);
    this.enter();
    try {
      if (start === end) {
        if (fua) await this.flushAll();
        return;
      }
      await this.withCache(
        async (att) => {
          const bypass = this.shouldBypass(att, start, end, true, fua);
          if (!bypass && this.shouldWriteback(att)) {
            await this.writebackWrite(att, buf, start, end, fua);
          } else {
            await this.backingWrite(att, { kind: 'write', buf, fua, cache: !bypass }, start, end);
          }
        },
        () => this.dev.backingIo.write(buf, start, fua),
      );
    } finally {
      this.leave();
    }
  }

  /**
   * bch_data_insert's allocation loop: place sectors [start, end) of `data`
   * in the cache, an allocation at a time, starting each write and making its
   * key (dirty for writeback data, which also waits for the allocator; other
   * data takes what is free now). Stops early when no space is free or
   * `stop()` says so, and returns the sector it reached. Allocations, writes
   * and keys are appended to `out`; the caller puts the allocations back.
   */
  private async placeInCache(
    att: RequestAttachment,
    data: Buffer,
    start: number,
    end: number,
    o: { dirty?: boolean; stop?: () => boolean },
    out: Placed,
    from = start,
  ): Promise<number> {
    const cs = att.cs;
    const dirty = o.dirty === true;
    let off: number;
    try {
      off = this.placeNow(att, data, start, from, end, dirty, o.stop, out);
      while (dirty && off < end && !(o.stop?.() ?? false)) {
        const a = await cs.allocSectors(placeWant(att, off, end, true));
        if (!a) break;
        off = this.placed(att, data, start, off, a, true, out);
        off = this.placeNow(att, data, start, off, end, dirty, o.stop, out);
      }
    } catch (err) {
      // An allocation failed (the set is failing): the writes already started
      // end before the caller puts their allocations back, and none of them
      // is left without a waiter.
      await Promise.allSettled(out.writes);
      throw err;
    }
    return off;
  }

  /**
   * The part of placeInCache that needs no wait: sectors [from, end) of the
   * request starting at `start`, placed while the allocator has space ready
   * now. Returns the sector reached. Throws if an allocation does (the
   * caller waits for the writes already started). A write that fits in the
   * open buckets goes through here alone, with no promise of its own.
   */
  private placeNow(
    att: RequestAttachment,
    data: Buffer,
    start: number,
    from: number,
    end: number,
    dirty: boolean,
    stop: (() => boolean) | undefined,
    out: Placed,
  ): number {
    let off = from;
    while (off < end && !(stop?.() ?? false)) {
      const a = att.cs.allocSectorsNow(placeWant(att, off, end, dirty));
      if (!a) break;
      off = this.placed(att, data, start, off, a, dirty, out);
    }
    return off;
  }

  /** Start the cache write of one allocation at sector `off` and make its key; returns the sector after it. */
  private placed(
    att: RequestAttachment,
    data: Buffer,
    start: number,
    off: number,
    a: SectorAllocation,
    dirty: boolean,
    out: Placed,
  ): number {
    out.allocs.push(a);
    const from = (off - start) * SECTOR_SIZE;
    const len = a.sectors * SECTOR_SIZE;
    const w = att.cs.writeCache(
      from === 0 && len === data.length ? data : data.subarray(from, from + len),
      a.ptr.offset,
    );
    // Handled from the start: it may fail while the next allocation waits,
    // before anyone awaits it (an unhandled rejection ends the daemon).
    w.catch(() => undefined);
    out.writes.push(w);
    out.keys.push(makeKey(att.inode, off + a.sectors, a.sectors, dirty, [a.ptr]));
    return off + a.sectors;
  }

  /** Writeback mode: the data in the cache under dirty keys; the backing device untouched. */
  private async writebackWrite(
    att: RequestAttachment,
    buf: Buffer,
    start: number,
    end: number,
    fua: boolean,
  ): Promise<void> {
    const cs = att.cs;
    const w = this.tracker.beginWrite(start, end);
    // Queued writeback keys under this write leave the pass; copies in flight need no wait here.
    void att.writeback.overlapping(start, end);
    this.dirtyWritesInFlight++;
    const allocs: SectorAllocation[] = [];
    try {
      if (this.dev.needsMarkDirty) await this.dev.markDirty();
      const keys: Bkey[] = [];
      const writes: Promise<void>[] = [];
      const out = { allocs, keys, writes };
      // The open buckets' space first, without a promise (the common case);
      // placeInCache waits for the allocator when they run out.
      let reached: number;
      try {
        reached = this.placeNow(att, buf, start, start, end, true, undefined, out);
      } catch (err) {
        await Promise.allSettled(writes);
        throw err;
      }
      if (reached < end) reached = await this.placeInCache(att, buf, start, end, { dirty: true }, out, reached);
      if (reached < end) {
        await Promise.allSettled(writes);
        throw new IoError('ENOSPC', `${this.dev.name}: no cache space for a writeback write`);
      }
      if (writes.length === 1) await writes[0];
      else await settleAll(writes);
      await cs.insert(keys, { journal: true, fua });
    } finally {
      this.putAllocations(att, allocs);
      this.dirtyWritesInFlight--;
      this.tracker.endWrite(w);
    }
    att.writeback.dirtied();
  }

  /** Invalidate the hit segments `segs` (journaled; durable before return with `fua`). */
  private async invalidate(att: RequestAttachment, segs: LookupSegment[], fua: boolean): Promise<void> {
    const keys: Bkey[] = [];
    for (const s of segs) {
      for (let a = s.start; a < s.end; a += 1 << 15) {
        const b = Math.min(s.end, a + (1 << 15));
        keys.push(makeKey(att.inode, b, b - a, false, []));
      }
    }
    if (keys.length > 0) await att.cs.insert(keys, { journal: true, fua });
  }

  /**
   * Writethrough, writearound, none, bypassed writes, discards and
   * write-zeroes: the backing device first, the index made to agree (R8, R9).
   */
  private async backingWrite(att: RequestAttachment, op: BackingOp, start: number, end: number): Promise<void> {
    const cs = att.cs;
    const backing = this.dev.backingIo;
    let w: ReturnType<CollisionTracker['beginWrite']> | undefined = this.tracker.beginWrite(start, end);
    const allocs: SectorAllocation[] = [];
    let handedOff = false;
    try {
      const waits = att.writeback.overlapping(start, end);
      if (waits) await Promise.all(waits);
      const segs = cs.lookupNow(att.inode, start, end) ?? (await cs.lookup(att.inode, start, end));
      const clean: LookupSegment[] = [];
      const dirty: LookupSegment[] = [];
      for (const s of segs) {
        if (s.hit) (s.hit.dirty ? dirty : clean).push(s);
        // A stale key may be live again after a crash (its bucket's new gen not yet durable): it goes too.
        else if (s.staleKey) clean.push(s);
      }
      // R8: no durable clean key may outlive a backing write under it.
      if (clean.length > 0) await this.invalidate(att, clean, true);
      // R9: dirty keys go only once the data replacing them is durable.
      const fua = dirty.length > 0 || (op.kind !== 'discard' && op.fua);
      const keys: Bkey[] = [];
      const cacheWrites: Promise<void>[] = [];
      // The writethrough copy counts against the bound on fills waiting for the
      // backing device; past it the write just goes uncached.
      const copyBytes = (end - start) * SECTOR_SIZE;
      if (op.kind === 'write' && op.cache && this.fillBytes + copyBytes <= MAX_FILL_BYTES) {
        await this.placeInCache(att, op.buf, start, end, {}, { allocs, keys, writes: cacheWrites });
      }
      const backingDone = this.backingOp(op, start, end, fua);
      // allDone: the copy's cache writes end before its allocations go back, even when the backing write failed.
      const [cacheResult] = await allDone([
        settleAll(cacheWrites).then(
          () => true,
          (err: unknown) => {
            log.debug(`${this.dev.name}: writethrough copy to the cache failed: ${errorMessage(err)}`);
            return false;
          },
        ),
        backingDone.then(() => true),
      ]);
      if (dirty.length > 0) await this.invalidate(att, dirty, op.kind !== 'discard' && op.fua);
      if (keys.length > 0 && cacheResult && !att.detaching) {
        // The copy's key: after a flush made the backing data durable (at once with FUA).
        this.tracker.endWrite(w);
        w = undefined;
        const win = this.tracker.openWindow(start, end);
        const epoch = fua ? 0 : backing.epochFor(start, end);
        if (!win.collided && att.ref.tryGet()) {
          const bytes = copyBytes;
          this.fillBytes += bytes;
          this.inflight++;
          this.fills++;
          handedOff = true;
          const fill: PendingFill = { att, keys, allocs, win, epoch, bytes, miss: false };
          if (epoch === 0) void this.insertFill(fill);
          else this.defer(fill);
        } else {
          this.tracker.closeWindow(win);
        }
      }
    } finally {
      if (w) this.tracker.endWrite(w);
      if (!handedOff) this.putAllocations(att, allocs);
    }
  }

  private async backingOp(op: BackingOp, start: number, end: number, fua: boolean): Promise<void> {
    const backing = this.dev.backingIo;
    switch (op.kind) {
      case 'write':
        await backing.write(op.buf, start, fua);
        return;
      case 'discard':
        await backing.discard(start, end - start);
        if (fua) await backing.flush();
        return;
      case 'zeroes':
        await backing.writeZeroes(start, end - start, { noHole: op.noHole, fua });
        return;
    }
  }

  async discard(offset: number, length: number): Promise<void> {
    const { start, end } = this.range(offset, length);
    this.enter();
    try {
      if (start === end) return;
      await this.withCache(
        async (att) => {
          // Discards always bypass (and never become dirty).
          this.markBypassed(att, end - start);
          await this.backingWrite(att, { kind: 'discard' }, start, end);
        },
        () => this.dev.backingIo.discard(start, end - start),
      );
    } finally {
      this.leave();
    }
  }

  async writeZeroes(
    offset: number,
    length: number,
    options: { noHole?: boolean; fastOnly?: boolean; fua?: boolean },
  ): Promise<void> {
    const { start, end } = this.range(offset, length);
    if (options.fastOnly === true && !this.dev.backing.caps.fastZero) {
      throw new IoError('ENOTSUP', `${this.dev.name}: ${this.dev.backingName} cannot zero fast`);
    }
    this.enter();
    try {
      if (start === end) return;
      const noHole = options.noHole === true;
      const fua = options.fua === true;
      await this.withCache(
        async (att) => {
          this.markBypassed(att, end - start);
          await this.backingWrite(att, { kind: 'zeroes', noHole, fua }, start, end);
        },
        () => this.dev.backingIo.writeZeroes(start, end - start, { noHole, fua }),
      );
    } finally {
      this.leave();
    }
  }

  // ---------------------------------------------------------------------------
  // Flush

  /** FLUSH: the backing device and an R1 journal commit, in parallel. */
  async flush(): Promise<void> {
    this.enter();
    try {
      await this.flushAll();
    } finally {
      this.leave();
    }
  }

  private async flushAll(): Promise<void> {
    await this.withCache(
      async (att) => {
        await allDone([this.dev.backingIo.flush(), att.cs.flush()]);
      },
      () => this.dev.backingIo.flush(),
    );
  }
}

/** Wait for every promise; then throw the first failure, if any (no I/O left running behind an error). */
async function settleAll(ps: Promise<void>[]): Promise<void> {
  if (ps.length === 0) return;
  if (ps.length === 1) {
    await ps[0];
    return;
  }
  const rs = await Promise.allSettled(ps);
  for (const r of rs) if (r.status === 'rejected') throw r.reason;
}
