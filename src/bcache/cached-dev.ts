// A backing device (super.c struct cached_dev): its superblock and its state
// machine, its attachment to a cache set, and the bcache device it serves
// (/dev/bcacheN: a BlockDevice, exported over NBD unchanged).
//
// Lifecycle (DESIGN.md rules 1-5, bcache.md §2):
//
//   registered ──run()──► running (passthrough: every request goes to the
//        │                   │      backing device at data_offset)
//        └──attach(set)──────┴──► attached: an Attachment holds the set, the
//                                 uuid slot (the btree inode), a RefCount and
//                                 the writeback worker
//
// The Attachment's RefCount (the kernel's cached_dev->count) holds one
// reference for the attachment itself, one per request in flight on the
// cached path (fills that finish after their reply included), and one for
// the writeback worker for its whole life. A request that cannot take a
// reference (the count reached zero) is served in passthrough. When the
// count reaches zero the attachment ends:
//
// - detach() is two-phase: it marks the attachment detaching (new requests
//   bypass the cache, writeback runs at full speed, ignoring
//   writeback_running and the rate) and drops the attachment's reference;
//   the writeback worker exits once a full pass finds nothing dirty, after
//   writing the backing superblock NONE with a zero set uuid; at zero the
//   uuid slot is invalidated and written, and the device keeps serving in
//   passthrough ("Caching disabled for ...").
// - stop() (the device's own stop, or its set's) refuses new requests, waits
//   for those in flight (within a bound: see stop()), stops the writeback
//   worker and drops the attachment's reference without detaching: the slot
//   and the superblock state survive, so the next registration re-attaches
//   with the cache intact.
//
// The control socket's attach/detach/stop and the failure path (io_disable,
// io_errors, stop_when_cache_set_failed) only call what is here.
//
// The request path, writeback and the rate controller each declare what they
// need of this device (RequestHost, WritebackHost, RateHost) and of its
// attachment; CachedDev and Attachment implement them, and this file in turn
// declares what it needs of a cache set (AttachTarget), so no file of the
// backing-device side imports its owner.

import type { BlockDevice, BlockDeviceCaps, Extent, WriteOptions, ZeroOptions } from '../blockdev/types.ts';
import { IoError } from '../blockdev/types.ts';
import {
  BDEV_CACHE_MODE_MASK,
  BDEV_STATE_CLEAN,
  BDEV_STATE_DIRTY,
  BDEV_STATE_MASK,
  BDEV_STATE_NAMES,
  BDEV_STATE_NONE,
  BDEV_STATE_SHIFT,
  BDEV_STATE_STALE,
  CACHE_MODE_NAMES,
  SB_OFFSET,
  SB_SIZE,
  SECTOR_SIZE,
} from '../format/constants.ts';
import {
  bdevCacheMode,
  bdevState,
  decodeSuperblock,
  encodeSuperblock,
  isBacking,
  setFlagBits,
  type Superblock,
} from '../format/superblock.ts';
import { formatUuid } from '../format/uuid-text.ts';
import {
  aborted,
  deferred,
  errorMessage,
  Mutex,
  Notifier,
  RefCount,
  sleep,
  Worker,
  WorkerScope,
  type Deferred,
} from '../util/lifecycle.ts';
import { realClock, type Clock } from '../util/clock.ts';
import { msLeft, settledWithin } from '../util/deadline.ts';
import { log } from '../util/log.ts';
import { BackingIo } from './backing.ts';
import type { CacheSet } from './cache-set.ts';
import { RequestPath, type RequestHost, type RequestSet, type RequestSettings } from './request.ts';
import { OperationError } from './errors.ts';
import { CacheAccounting } from './stats.ts';
import { defaultWritebackSettings, Writeback, type WritebackHost, type WritebackSettings } from './writeback.ts';
import { WritebackRateState, type RateSet } from './writeback-rate.ts';

/**
 * The backing device's tunables (bcache.md §3.5): the request path's,
 * writeback's (the rate controller's among them) and the device's own.
 */
export interface CachedDevSettings extends RequestSettings, WritebackSettings {
  sequentialCutoff: number;
  readahead: number;
  ioDisable: boolean;
  stopWhenCacheSetFailed: 'auto' | 'always';
  readaheadCachePolicy: 'all' | 'meta-only';
  ioErrorLimit: number;
}

/** The kernel's defaults (cached_dev_init; writeback's own from writeback.ts). */
export function defaultSettings(): CachedDevSettings {
  return {
    ...defaultWritebackSettings(),
    sequentialCutoff: 4 * 1024 * 1024,
    readahead: 0,
    stopWhenCacheSetFailed: 'auto',
    readaheadCachePolicy: 'all',
    ioErrorLimit: 64,
    ioDisable: false,
    cacheAdmission: 'always',
  };
}

/**
 * What a backing device needs of the cache set it attaches to: the set
 * itself, and the request layer's state kept about it (the registry's
 * RegisteredSet is one). The request path, writeback and the rate
 * controller each see only their part of it.
 */
export interface AttachTarget extends RequestSet, RateSet {
  readonly cs: CacheSet;
  readonly uuid: string;
  /** An orderly stop of the set is under way: nothing attaches any more. */
  readonly stopping: boolean;
  /** The backing devices attached to the set; a device adds and removes itself. */
  readonly devices: Set<CachedDev>;
}

/** One backing device attached to one cache set (bcache_device_attach .. detach). */
export class Attachment {
  readonly set: AttachTarget;
  readonly cs: CacheSet;
  /** The uuid slot: the inode of this device's keys. */
  readonly inode: number;
  readonly ref: RefCount;
  readonly writeback: Writeback;
  /** The attachment's workers (writeback, and whatever the writeback side adds), inside the set's scope. */
  readonly workers: WorkerScope;
  /**
   * Settled once the set failed and its retire decided this device's fate:
   * true, it keeps serving uncached (requests caught by the failure are
   * redone in passthrough); false, it stops (they fail).
   */
  readonly lossDecided: Deferred<boolean> = deferred();
  detaching = false;
  /** The writeback worker finished a detach: nothing dirty, superblock NONE. */
  detachComplete = false;
  /** Settled when the attachment has ended (detached or stopped) and is unlinked. */
  private readonly end: Deferred<void> = deferred();
  ended = false;

  constructor(dev: CachedDev, set: AttachTarget, inode: number) {
    this.set = set;
    this.cs = set.cs;
    this.inode = inode;
    this.ref = new RefCount(() => {
      dev.attachmentDrained(this);
    });
    this.writeback = new Writeback(dev, this);
    this.workers = new WorkerScope(`${dev.name} on ${set.uuid}`, set.cs.workers);
  }

  get finished(): Promise<void> {
    return this.end.promise;
  }

  settle(): void {
    this.ended = true;
    this.end.resolve();
  }
}

export interface CachedDevOptions {
  /** N of bcacheN, allocated at registration as the kernel's IDA does. */
  index: number;
  settings?: Partial<CachedDevSettings>;
  /** Unix seconds (uuid first_reg/last_reg, invalidated). */
  now?: () => number;
  /**
   * Every duration, deadline and timer of the device, its request path,
   * writeback and rate controller (default: real time; docs/design.md,
   * lifecycle rule 6).
   */
  clock?: Clock;
  /** The device started running (it has its bcacheN): the registry exports it. */
  onRunning?: (dev: CachedDev) => void;
  /** The device finished stopping, however stop() was called: the registry forgets it. */
  onStopped?: (dev: CachedDev) => void;
  /** How long every I/O to the backing device must fail before its bcache device stops (BACKING_DEV_OFFLINE_TIMEOUT). */
  backingOfflineMs?: number;
  /** How often a failing backing device is probed meanwhile. */
  backingProbeMs?: number;
  /**
   * Bound on each wait of stop() (DESIGN rule 1): the requests in flight and
   * the attachment's references together, then the backing device's flush,
   * then its close; past it, stop() logs and goes on (default 20 s).
   */
  stopTimeoutMs?: number;
}

/** BACKING_DEV_OFFLINE_TIMEOUT: 5 s. */
export const BACKING_OFFLINE_MS = 5000;

/** The default bound on each wait of CachedDev.stop(). */
export const DEVICE_STOP_TIMEOUT_MS = 20_000;

export class CachedDev implements RequestHost, WritebackHost {
  readonly backing: BlockDevice;
  readonly backingIo: BackingIo;
  /** The backing superblock, as last written (or read). */
  readonly sb: Superblock;
  readonly index: number;
  /** bcacheN */
  readonly name: string;
  readonly settings: CachedDevSettings;
  readonly stats = new CacheAccounting();
  /** The writeback rate controller's state; it outlives attachments, as the kernel's does. */
  readonly writebackRateState = new WritebackRateState();
  readonly request: RequestPath;
  readonly device: BcacheDevice;
  attachment: Attachment | undefined;
  private runningFlag = false;
  private stopPromise: Promise<void> | undefined;
  private readonly sbLock = new Mutex();
  /** The BDEV_STATE the superblock on disk has (or is being written with). */
  private durableState: number;
  private readonly nowFn: () => number;
  private readonly onRunning: ((dev: CachedDev) => void) | undefined;
  private readonly onStopped: ((dev: CachedDev) => void) | undefined;
  /** io_errors: backing I/O errors, never decayed (bch_count_backing_io_errors). */
  ioErrors = 0;
  private readonly offlineMs: number;
  private readonly probeMs: number;
  /** Bound on each wait of stop(), and on stopping the device's own workers. */
  readonly stopTimeoutMs: number;
  /** When the backing device's current run of failures began (ms, monotonic); undefined while it works. */
  private failingSince: number | undefined;
  private readonly backingTrouble: Notifier;
  readonly clock: Clock;
  private statusWorker: Worker | undefined;

  constructor(backing: BlockDevice, sb: Superblock, options: CachedDevOptions) {
    if (!isBacking(sb)) throw new Error(`${backing.name}: not a backing device superblock`);
    this.backing = backing;
    this.backingIo = new BackingIo(backing, (err) => {
      this.backingIoDone(err);
    });
    this.sb = sb;
    this.index = options.index;
    this.name = `bcache${options.index}`;
    this.settings = { ...defaultSettings(), ...options.settings };
    this.durableState = bdevState(sb);
    this.clock = options.clock ?? realClock;
    this.backingTrouble = new Notifier(this.clock);
    this.nowFn = options.now ?? (() => Math.floor(Date.now() / 1000));
    this.onRunning = options.onRunning;
    this.onStopped = options.onStopped;
    this.offlineMs = options.backingOfflineMs ?? BACKING_OFFLINE_MS;
    this.probeMs = options.backingProbeMs ?? Math.min(1000, this.offlineMs);
    this.stopTimeoutMs = options.stopTimeoutMs ?? DEVICE_STOP_TIMEOUT_MS;
    this.request = new RequestPath(this);
    this.device = new BcacheDevice(this);
  }

  /** Read and check the superblock of a backing device (read_super). */
  static async readSuperblock(dev: BlockDevice): Promise<Superblock> {
    const block = Buffer.alloc(SB_SIZE);
    await dev.read(block, SB_OFFSET);
    return decodeSuperblock(block, {
      deviceSectors: Math.floor(dev.size / SECTOR_SIZE),
      logicalBlockSize: dev.logicalBlockSize,
    });
  }

  now(): number {
    return this.nowFn();
  }

  get backingName(): string {
    return this.backing.name;
  }

  get uuid(): string {
    return formatUuid(this.sb.uuid);
  }

  get setUuid(): string {
    return formatUuid(this.sb.setUuid);
  }

  get dataOffset(): number {
    return this.sb.dataOffset;
  }

  /** The whole backing device in sectors (bdev_nr_sectors: data_offset included). */
  get backingSectors(): number {
    return Math.floor(this.backing.size / SECTOR_SIZE);
  }

  /** Capacity of the bcache device in sectors: backing size minus data_offset. */
  get sectors(): number {
    return Math.max(0, Math.floor(this.backing.size / SECTOR_SIZE) - this.sb.dataOffset);
  }

  /**
   * The superblock's flags decoded, until they change: the cache mode is read
   * on every request, and decoding it is BigInt arithmetic.
   */
  private decodedFlags = { flags: -1n, mode: 0, state: 0 };

  private flags(): { mode: number; state: number } {
    const d = this.decodedFlags;
    const f = this.sb.flags;
    if (f !== d.flags) {
      d.flags = f;
      d.mode = bdevCacheMode(this.sb);
      d.state = bdevState(this.sb);
    }
    return d;
  }

  get cacheMode(): number {
    return this.flags().mode;
  }

  get cacheModeName(): string {
    return CACHE_MODE_NAMES[this.cacheMode] ?? 'writethrough';
  }

  get state(): number {
    return this.flags().state;
  }

  get stateName(): string {
    return BDEV_STATE_NAMES[this.state] ?? 'no cache';
  }

  get running(): boolean {
    return this.runningFlag;
  }

  get stopped(): boolean {
    return this.stopPromise !== undefined;
  }

  /** The attachment, if attached and not yet ended. */
  get attached(): boolean {
    return this.attachment !== undefined;
  }

  /** Dirty data of this device in the cache, in sectors (dirty_data). */
  get dirtySectors(): number {
    const a = this.attachment;
    return a ? a.cs.dirtySectors(a.inode) : 0;
  }

  // ---------------------------------------------------------------------------
  // The backing superblock

  /** bch_write_bdev_super(): the whole 4 KiB block in place, then a flush. */
  private async writeSuperblock(): Promise<void> {
    const block = encodeSuperblock(this.sb);
    await this.backingIo.write(block, SB_OFFSET / SECTOR_SIZE);
    await this.backingIo.flush();
    this.sb.raw = block;
  }

  /** Change fields of the superblock and write it, serialized with other superblock writes. */
  async updateSuperblock(change: (sb: Superblock) => void): Promise<void> {
    await this.sbLock.run(async () => {
      change(this.sb);
      this.durableState = bdevState(this.sb);
      await this.writeSuperblock();
    });
  }

  private setState(sb: Superblock, state: number): void {
    sb.flags = setFlagBits(sb.flags, BDEV_STATE_SHIFT, BDEV_STATE_MASK, state);
  }

  /**
   * R7: before the first writeback-mode write since the device was clean is
   * acknowledged, the superblock says DIRTY on disk. Free when it already does.
   */
  /** The superblock does not say DIRTY durably yet: a writeback write must call markDirty() first (R7). */
  get needsMarkDirty(): boolean {
    return this.durableState !== BDEV_STATE_DIRTY;
  }

  async markDirty(): Promise<void> {
    if (this.durableState === BDEV_STATE_DIRTY) return;
    await this.sbLock.run(async () => {
      if (this.durableState === BDEV_STATE_DIRTY) return;
      this.setState(this.sb, BDEV_STATE_DIRTY);
      this.durableState = BDEV_STATE_DIRTY;
      await this.writeSuperblock();
    });
  }

  /**
   * The writeback worker found nothing dirty: superblock CLEAN (R6: after a
   * backing flush), unless a writeback-mode write began meanwhile. The check
   * and the state change happen without an await between them, so a write
   * either sees DIRTY gone and rewrites it, or stops this.
   */
  async markClean(att: { readonly cs: CacheSet; readonly inode: number }): Promise<boolean> {
    return this.sbLock.run(async () => {
      if (this.request.dirtyWritesInFlight > 0 || att.cs.dirtySectors(att.inode) > 0) return false;
      if (this.state !== BDEV_STATE_DIRTY) return true;
      this.durableState = BDEV_STATE_CLEAN;
      this.setState(this.sb, BDEV_STATE_CLEAN);
      await this.backingIo.flush();
      await this.writeSuperblock();
      // Not a kernel message; it tells an operator (and the tests) that the
      // backing device alone now holds the device's whole content.
      log.info(`${this.name}: written back, ${this.backingName} marked clean`);
      return true;
    });
  }

  /** Change the cache mode (sysfs cache_mode): stored in the superblock flags. */
  async setCacheMode(mode: number): Promise<void> {
    if (mode === this.cacheMode) return;
    await this.updateSuperblock((sb) => {
      sb.flags = setFlagBits(sb.flags, 0n, BDEV_CACHE_MODE_MASK, mode);
    });
    this.attachment?.writeback.wake();
  }

  // ---------------------------------------------------------------------------
  // Attach

  /**
   * bch_cached_dev_attach(): attach to `set` (whose uuid the caller matched,
   * or an explicit attach). A refusal throws OperationError with the
   * kernel's message and errno (ENOENT: no uuid slot for a dirty device;
   * EINVAL otherwise); an I/O error writing the uuids or the superblock
   * throws as it came.
   */
  async attach(set: AttachTarget, options: { force?: boolean } = {}): Promise<void> {
    const cs = set.cs;
    const bdev = this.backingName;
    const gone = (): boolean => this.stopped || cs.stopped || set.stopping;
    if (this.stopped) throw new OperationError('EINVAL', `Can't attach ${bdev}: device is stopping`);
    if (this.attachment) throw new OperationError('EINVAL', `Can't attach ${bdev}: already attached`);
    if (cs.stopped || set.stopping) throw new OperationError('EINVAL', `Can't attach ${bdev}: shutting down`);
    if (this.sb.blockSize < cs.blockSize) {
      throw new OperationError('EINVAL', `Couldn't attach ${bdev}: block size less than set's block size`);
    }
    for (const other of set.devices) {
      if (other !== this && other.sb.uuid.equals(this.sb.uuid)) {
        throw new OperationError('EINVAL', `Tried to attach ${bdev} but duplicate UUID already attached`);
      }
    }
    const now = this.now();
    let slot = cs.uuids.find(this.sb.uuid);
    const state = this.state;
    if (slot >= 0 && (state === BDEV_STATE_STALE || state === BDEV_STATE_NONE)) {
      cs.uuids.invalidate(slot, now);
      slot = -1;
    }
    let fresh = false;
    if (slot < 0) {
      if (state === BDEV_STATE_DIRTY && options.force !== true) {
        // The 2018 series' corruption: writes that went around a lost dirty
        // cache, then the stale dirty data written back over them.
        throw new OperationError(
          'ENOENT',
          `Couldn't find uuid for ${bdev} in set: its superblock says dirty, so part of its data is only in ` +
            `cache set ${this.setUuid}; register that cache device to write it back, or force the attach ` +
            `to this set and lose that dirty data`,
        );
      }
      if (state === BDEV_STATE_DIRTY) {
        log.warn(`${bdev}: attaching by force to ${cs.uuid}; dirty data in cache set ${this.setUuid} is abandoned`);
      }
      slot = cs.uuids.findEmpty();
      if (slot < 0) throw new OperationError('EINVAL', `Not caching ${bdev}, no room for UUID`);
      fresh = true;
    }
    const entry = cs.uuids.get(slot);
    if (fresh) {
      entry.uuid = Buffer.from(this.sb.uuid);
      entry.label = Buffer.from(this.sb.label);
      entry.firstReg = now;
      entry.lastReg = now;
      entry.invalidated = 0;
      entry.flags = 0;
      entry.sectors = 0;
      await cs.writeUuids();
      await this.updateSuperblock((sb) => {
        sb.setUuid = Buffer.from(cs.sb.setUuid);
        this.setState(sb, BDEV_STATE_CLEAN);
        sb.lastMount = now;
      });
    } else {
      entry.lastReg = now;
      await cs.writeUuids();
    }
    if (gone()) throw new OperationError('EINVAL', `Can't attach ${bdev}: shutting down`);
    const att = new Attachment(this, set, slot);
    this.attachment = att;
    set.devices.add(this);
    att.workers.run(() => {
      att.writeback.start();
    });
    if (!this.runningFlag) this.run();
    log.info(`bcache: bch_cached_dev_attach() Caching ${bdev} as ${this.name} on set ${cs.uuid}`);
  }

  /**
   * bch_cached_dev_detach(): begin a two-phase detach. Resolves when it has
   * completed (all dirty data written back, slot invalidated), or when the
   * attachment ended otherwise (the device or the set stopped first).
   */
  detach(): Promise<void> {
    const att = this.attachment;
    if (!att) return Promise.resolve();
    if (att.detaching) return att.finished;
    att.detaching = true;
    att.writeback.wake();
    att.ref.put();
    return att.finished;
  }

  /** The attachment's count reached zero (cached_dev_detach_finish / the unlink of a stop). */
  attachmentDrained(att: Attachment): void {
    if (att.ended) {
      // The last reference of a request that outlived stop()'s bound: stop ended the attachment without it.
      log.debug(`${this.name}: a request stuck past the stop ended; its attachment was ended already`);
      return;
    }
    void this.finishAttachment(att).catch((err: unknown) => {
      log.error(`${this.name}: ending the attachment failed: ${errorMessage(err)}`);
    });
  }

  private async finishAttachment(att: Attachment): Promise<void> {
    try {
      // The writeback worker exits before the count can reach zero; make sure it has.
      await att.writeback.stop();
      // Ended by the set's failure (a detach cut short, the workers gone):
      // stay linked, so that no request slips through to the backing device
      // in passthrough, until the retire has decided this device's fate.
      if (att.cs.ioDisabled && !att.detachComplete) await att.lossDecided.promise;
      this.request.dropDeferred(att);
      if (att.detaching && att.detachComplete && !att.cs.ioDisabled && !att.cs.stopped) {
        att.cs.uuids.invalidate(att.inode, this.now());
        await att.cs.writeUuids();
        log.info(`bcache: cached_dev_detach_finish() Caching disabled for ${this.backingName}`);
      }
    } finally {
      att.set.devices.delete(this);
      if (this.attachment === att) this.attachment = undefined;
      att.lossDecided.resolve(false);
      att.settle();
    }
  }

  /** Does this device have data only the cache holds (dc->has_dirty), or writes that may make it so? */
  get hasDirty(): boolean {
    return this.state === BDEV_STATE_DIRTY || this.dirtySectors > 0 || this.request.dirtyWritesInFlight > 0;
  }

  /**
   * Its cache set failed and is retiring (conditional_stop_bcache_device()):
   * by stop_when_cache_set_failed, stop the device, or keep it serving from
   * the backing device alone. Called with the set's workers stopped.
   */
  async cacheSetFailed(att: Attachment): Promise<void> {
    const set = att.cs.uuid;
    if (this.settings.stopWhenCacheSetFailed === 'always') {
      log.warn(
        `bcache: conditional_stop_bcache_device() stop_when_cache_set_failed of ${this.name} is "always", stop it for failed cache set ${set}.`,
      );
    } else if (this.hasDirty) {
      log.warn(
        `bcache: conditional_stop_bcache_device() stop_when_cache_set_failed of ${this.name} is "auto" and cache is dirty, stop it to avoid potential data corruption.`,
      );
      // No window in which a write could reach the backing device under the lost dirty data.
      this.settings.ioDisable = true;
    } else {
      log.warn(
        `bcache: conditional_stop_bcache_device() stop_when_cache_set_failed of ${this.name} is "auto" and cache is clean, keep it alive.`,
      );
      if (await this.keepWithoutCache(att)) return;
    }
    att.lossDecided.resolve(false);
    await this.stop();
  }

  /**
   * Detach from a failed set and serve uncached. The superblock says NONE
   * first: the dead cache's clean keys go stale with the first passthrough
   * write, and if that cache device came back its slot must not be trusted.
   * Requests see the attachment until then and wait for the decision.
   */
  private async keepWithoutCache(att: Attachment): Promise<boolean> {
    try {
      await this.updateSuperblock((sb) => {
        sb.setUuid = Buffer.alloc(16);
        this.setState(sb, BDEV_STATE_NONE);
      });
    } catch (err) {
      log.error(`${this.name}: cannot mark ${this.backingName} uncached (${errorMessage(err)}): stopping it`);
      return false;
    }
    // From here the backing device alone is the truth: requests caught by the failure go on there.
    att.lossDecided.resolve(true);
    await att.writeback.stop();
    this.request.dropDeferred(att);
    if (!att.detaching && !att.ref.isZero) att.ref.put();
    await att.finished;
    log.info(`bcache: cached_dev_detach_finish() Caching disabled for ${this.backingName}`);
    return true;
  }

  // ---------------------------------------------------------------------------
  // Backing device errors (2018 series #11-#13)

  /** Every backing I/O ends here: errors are counted, and a run of failures is watched. */
  private backingIoDone(err: IoError | undefined): void {
    if (err === undefined) {
      this.failingSince = undefined;
      return;
    }
    // Errors of a device being stopped are the stop's own doing.
    if (this.stopped || err.code === 'ESHUTDOWN') return;
    this.failingSince ??= this.clock.now();
    this.backingTrouble.notify();
    const errors = ++this.ioErrors;
    if (errors < this.settings.ioErrorLimit) {
      log.error(`bcache: bch_count_backing_io_errors() ${this.backingName}: IO error on backing device, unrecoverable`);
      return;
    }
    this.backingFailed(`stop ${this.name}: too many IO errors on backing device ${this.backingName}`);
  }

  /** bch_cached_dev_error(): io_disable, then stop the bcache device. */
  private backingFailed(message: string): void {
    if (this.stopped) return;
    this.settings.ioDisable = true;
    log.error(`bcache: bch_cached_dev_error() ${message}`);
    if (this.attachment) this.attachment.lossDecided.resolve(false);
    void this.stop().catch((err: unknown) => {
      log.error(`${this.name}: stopping after backing device errors: ${errorMessage(err)}`);
    });
  }

  /**
   * bcache_status_update(): while the backing device keeps failing, probe it;
   * failing for offlineMs in a row, it is offline and the device stops.
   * Idle (no timer) while the device works.
   */
  private async backingGone(): Promise<boolean> {
    try {
      return (await this.backing.isGone?.()) ?? false;
    } catch {
      return false;
    }
  }

  private async watchBacking(signal: AbortSignal): Promise<void> {
    const probe = Buffer.alloc(SB_SIZE);
    let reportedGone = false;
    while (!signal.aborted) {
      // Woken by failing I/O, or every probe period to look whether the
      // device was removed: a removed file keeps working through our
      // descriptor, so its I/O alone would never tell (the kernel's
      // bcache_status_update polls its queue every second the same way).
      const woke = await this.backingTrouble.wait(signal, this.probeMs);
      if (!woke) {
        // A timeout or an abort (the loop condition tells them apart).
        if (aborted(signal)) return;
        if (!(await this.backingGone())) continue;
        if (!reportedGone) {
          reportedGone = true;
          log.warn(`${this.name}: backing device ${this.backingName} was removed`);
        }
        this.failingSince ??= this.clock.now();
      }
      for (;;) {
        const since = this.failingSince;
        if (since === undefined) break;
        const waited = this.clock.now() - since;
        if (waited >= this.offlineMs) {
          log.error(
            `bcache: bcache_status_update() ${this.backingName}: device offline for ${Math.round(waited / 1000)} seconds`,
          );
          this.backingFailed(`${this.name}: disable I/O request due to backing device offline`);
          return;
        }
        if (!(await sleep(Math.min(this.probeMs, this.offlineMs - waited), signal, this.clock))) return;
        // Straight to the device: a probe is not an I/O error of a request (io_errors).
        try {
          await this.backing.read(probe, SB_OFFSET);
          if (!(await this.backingGone())) this.failingSince = undefined;
        } catch {
          // Still failing.
        }
      }
    }
  }

  // ---------------------------------------------------------------------------
  // Run and stop

  /**
   * bch_cached_dev_run(): the bcache device exists (is exported). Forced on
   * a device whose cache is absent, a CLEAN or DIRTY superblock becomes STALE.
   */
  run(): void {
    if (this.runningFlag) throw new OperationError('EBUSY', `cached dev ${this.backingName} is running already`);
    if (this.stopped) throw new OperationError('EIO', `${this.name}: stopped`);
    if (!this.attachment && this.state !== BDEV_STATE_NONE && this.state !== BDEV_STATE_STALE) {
      throw new OperationError(
        'EINVAL',
        `${this.backingName}: its cache set is not registered; force it with runStale()`,
      );
    }
    this.runningFlag = true;
    this.onRunning?.(this);
    this.statusWorker ??= new Worker(`bcache_status_update ${this.name}`, (signal) => this.watchBacking(signal), {
      stopTimeoutMs: this.stopTimeoutMs,
      clock: this.clock,
    }).start();
  }

  /** `echo 1 > running` on a device whose cache is missing: the superblock goes STALE ("inconsistent"). */
  async runStale(): Promise<void> {
    if (this.runningFlag) throw new OperationError('EBUSY', `cached dev ${this.backingName} is running already`);
    if (!this.attachment && this.state !== BDEV_STATE_NONE) {
      await this.updateSuperblock((sb) => {
        this.setState(sb, BDEV_STATE_STALE);
      });
    }
    this.run();
  }

  /**
   * Stop the bcache device (bcache_device_stop .. cached_dev_free): new
   * requests fail, those in flight finish, the writeback worker stops, the
   * attachment ends without detaching, the backing device is closed.
   * Idempotent, never rejects, and bounded (DESIGN rule 1): requests in
   * flight and the attachment's references get stopTimeoutMs together, the
   * backing flush and close stopTimeoutMs each; past a bound it logs and goes
   * on. Requests stuck past it (below the device: a backing device that never
   * answers, a wait on the cache that only the set's own stop ends) are left
   * to end on their own, and their ending is harmless (RequestPath.close,
   * attachmentDrained).
   */
  stop(options: { closeBacking?: boolean } = {}): Promise<void> {
    this.stopPromise ??= this.shutdown(options.closeBacking ?? true).finally(() => {
      this.onStopped?.(this);
    });
    return this.stopPromise;
  }

  private async shutdown(closeBacking: boolean): Promise<void> {
    const bound = this.stopTimeoutMs;
    const deadline = this.clock.now() + bound;
    if (!(await this.request.close(bound))) {
      log.warn(
        `${this.name}: ${this.request.requestsInFlight} request(s) still in flight after ${bound} ms; ` +
          'stopping without them (they fail or end on their own; none was acknowledged)',
      );
    }
    const att = this.attachment;
    if (att) {
      await att.writeback.stop();
      att.lossDecided.resolve(false);
      if (!att.detaching && !att.ref.isZero) att.ref.put();
      // References still held are requests stuck past the bound above: wait
      // only for what is left of it. At zero the attachment's end is running
      // (a detach's last uuid write, say): that gets a bound of its own.
      const inTime = await settledWithin(
        att.finished,
        att.ref.isZero ? bound : msLeft(deadline, this.clock),
        this.clock,
      );
      if (!inTime) {
        log.warn(
          `${this.name}: the attachment to cache set ${att.cs.uuid} still has ${att.ref.count} reference(s) ` +
            `after ${bound} ms; ending it without them`,
        );
        this.abandonAttachment(att);
      }
    }
    await this.request.stopWorkers();
    await this.statusWorker?.stop();
    // A clean stop leaves nothing volatile on the backing device either.
    const flushed = this.backingIo.flush().catch((err: unknown) => {
      log.error(`${this.name}: flushing ${this.backingName} at stop: ${errorMessage(err)}`);
    });
    if (!(await settledWithin(flushed, bound, this.clock))) {
      log.warn(`${this.name}: flushing ${this.backingName} at stop: no answer within ${bound} ms; going on`);
    }
    if (this.runningFlag) log.info(`bcache: bcache_device_free() ${this.name} stopped`);
    this.runningFlag = false;
    if (closeBacking) {
      // A device's close waits for its I/O in flight (so that no late I/O
      // reaches a reused descriptor); one that never ends is left to it.
      const closed = this.backing.close().catch((err: unknown) => {
        log.error(`${this.name}: closing ${this.backingName}: ${errorMessage(err)}`);
      });
      if (!(await settledWithin(closed, bound, this.clock))) {
        log.warn(`${this.name}: closing ${this.backingName}: I/O still in flight after ${bound} ms; going on`);
      }
    }
  }

  /**
   * stop() gave up on the attachment's last references (requests stuck
   * below): unlink it now, as its end would have. When those requests end,
   * their last put finds it ended and does nothing (attachmentDrained), and
   * they leave a stopped set's state alone (RequestPath.putAllocations):
   * only their own bookkeeping and promises nobody awaits any more are
   * touched (a set still running, after a stop of this device alone, is
   * served as usual: an insert or a put there is the set's normal work).
   */
  private abandonAttachment(att: Attachment): void {
    this.request.dropDeferred(att);
    att.set.devices.delete(this);
    if (this.attachment === att) this.attachment = undefined;
    att.lossDecided.resolve(false);
    att.settle();
  }
}

/**
 * /dev/bcacheN as a BlockDevice: byte offsets in, sectors inside. Requests
 * must be 512-byte aligned (the NBD export's minimum block size is 512);
 * those not aligned to the cache's block size bypass the cache, as in the
 * kernel. close() stops the device.
 */
export class BcacheDevice implements BlockDevice {
  private readonly dev: CachedDev;
  readonly name: string;
  readonly size: number;
  readonly logicalBlockSize: number;
  readonly readOnly: boolean;
  readonly caps: BlockDeviceCaps;

  constructor(dev: CachedDev) {
    this.dev = dev;
    this.name = dev.name;
    this.size = dev.sectors * SECTOR_SIZE;
    this.logicalBlockSize = dev.sb.blockSize * SECTOR_SIZE;
    this.readOnly = dev.backing.readOnly;
    this.caps = {
      // Discards always invalidate the cache; the backing device may ignore them.
      discard: true,
      fastZero: dev.backing.caps.fastZero,
      blockStatus: false,
      rotational: false,
    };
  }

  get cachedDev(): CachedDev {
    return this.dev;
  }

  read(buf: Buffer, offset: number): Promise<void> {
    return this.dev.request.read(buf, offset);
  }

  readNow(buf: Buffer, offset: number): boolean {
    return this.dev.request.readNow(buf, offset);
  }

  write(buf: Buffer, offset: number, options?: WriteOptions): Promise<void> {
    return this.dev.request.write(buf, offset, options?.fua === true);
  }

  flush(): Promise<void> {
    return this.dev.request.flush();
  }

  discard(offset: number, length: number): Promise<void> {
    return this.dev.request.discard(offset, length);
  }

  writeZeroes(offset: number, length: number, options?: ZeroOptions): Promise<void> {
    return this.dev.request.writeZeroes(offset, length, options ?? {});
  }

  blockStatus(offset: number, length: number): Promise<Extent[]> {
    if (offset < 0 || length < 0 || offset + length > this.size) {
      return Promise.reject(new IoError('EINVAL', `${this.name}: block status past the end of the device`));
    }
    return Promise.resolve(length === 0 ? [] : [{ length, hole: false, zero: false }]);
  }

  close(): Promise<void> {
    return this.dev.stop();
  }
}
