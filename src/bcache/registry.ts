// What /sys/fs/bcache/register does (super.c register_bcache, register_bdev,
// register_cache): devices are registered in any order; each is a cache or a
// backing device by its superblock. A cache brings up its set and attaches
// every registered backing device whose set uuid matches; a backing device
// attaches to its set if that is registered, and is run (gets its bcacheN)
// when attached, or at once when its superblock says it has no cache (NONE)
// or an inconsistent one (STALE). A backing device that is CLEAN or DIRTY
// and whose set is absent waits, without a bcacheN: serving it uncached
// could expose stale data (bcache.md §2.2).
//
// bcacheN numbers are taken at registration of each backing device, in
// order, as the kernel's IDA does.
//
// A cache set that fails (cs.fail: too many I/O errors, a metadata write
// error) is retired: retire() below.
//
// Teardown (DESIGN rule 5): stopAll() stops every bcache device (requests
// in flight finish, writeback workers stop, attachments end without
// detaching), then every cache set (GC, dirty nodes, allocator, journal,
// superblock), closing the devices. Every step is bounded (DESIGN rule 1):
// devices that have not stopped within deviceStopTimeoutMs have requests
// stuck below them, and the ones stuck on the cache (a write waiting for the
// allocator, say) only end when the cache set fails them; so their cache
// sets are stopped under them first (the set's own bounded stop rejects the
// allocator's waiters and refuses cache I/O), then the devices finish
// stopping (their own stop is bounded too: CachedDev.stop).
//
// Runtime operations (the sysfs files register, attach, detach, stop,
// unregister) are here too. Whatever starts or stops a device or a set (these
// operations, shutdown, or a stop() called directly on a CachedDev or a
// CacheSet, as the failure path does), the registry hears of it from the
// object itself and tells its watchers: serve adds and removes NBD exports
// that way, and exits once nothing is left.

import type { BlockDevice } from '../blockdev/types.ts';
import { BDEV_STATE_NONE, BDEV_STATE_STALE } from '../format/constants.ts';
import { isBacking, type Superblock } from '../format/superblock.ts';
import { formatUuid } from '../format/uuid-text.ts';
import { realClock, type Clock } from '../util/clock.ts';
import { settledWithin } from '../util/deadline.ts';
import { errorMessage } from '../util/lifecycle.ts';
import { log } from '../util/log.ts';
import { CacheSet, type CacheSetOptions } from './cache-set.ts';
import { parseUuidPrefix } from './sysfs/uuid-parse.ts';
import { CachedDev, type CachedDevOptions, type CachedDevSettings } from './cached-dev.ts';
import { OperationError } from './errors.ts';
import { FlashDev } from './flash-dev.ts';
import { CacheAccounting } from './stats.ts';

/** Cache set tunables that live above the engine core (bcache.md §3.2). */
export interface SetSettings {
  congestedReadThresholdUs: number;
  congestedWriteThresholdUs: number;
  ioErrorLimit: number;
  ioErrorHalflife: number;
  errors: 'unregister' | 'panic';
  /** idle_max_writeback_rate: write back at full speed while the whole set is idle. */
  idleMaxWritebackRate: boolean;
  /** gc_after_writeback: 0 or 1. */
  gcAfterWriteback: number;
}

export function defaultSetSettings(): SetSettings {
  return {
    // 0: congestion bypass off unless asked for (README, Control: ubcache times
    // I/O as the daemon sees it, so the kernel's 2000 / 20000 would fire on a
    // busy machine for reasons that are not the cache device's).
    congestedReadThresholdUs: 0,
    congestedWriteThresholdUs: 0,
    ioErrorLimit: 8,
    ioErrorHalflife: 0,
    errors: 'unregister',
    idleMaxWritebackRate: true,
    gcAfterWriteback: 0,
  };
}

/** A running cache set and what the request layer keeps about it. */
export class RegisteredSet {
  readonly cs: CacheSet;
  readonly stats = new CacheAccounting();
  readonly settings: SetSettings = defaultSetSettings();
  /** Attached backing devices. */
  readonly devices = new Set<CachedDev>();
  /** Running flash-only volumes, by uuid slot. */
  readonly volumes = new Map<number, FlashDev>();
  stopping = false;
  /**
   * idle_counter: rate updates since the last request on any device of the
   * set (writeback-rate.ts counts up, every request resets it).
   */
  idleCounter = 0;
  /** at_max_writeback_rate: the idle shortcut has set some device's rate to the maximum. */
  atMaxWritebackRate = false;
  /** BCH_DO_AUTO_GC: with gc_after_writeback, a GC pass is due when writeback next finds nothing dirty. */
  gcAfterWritebackDue = false;
  /** Set once cs has stopped and the registry forgot the set. */
  gone = false;
  /** Settled when a retire after a fatal error has finished. */
  retired: Promise<void> | undefined;

  constructor(cs: CacheSet) {
    this.cs = cs;
    cs.errorLimits = () => ({ limit: this.settings.ioErrorLimit, halflife: this.settings.ioErrorHalflife });
    // congested_*_threshold_us: the cache device's latency is judged against the set's settings.
    cs.io.congestion.thresholds = this.settings;
  }

  get uuid(): string {
    return this.cs.uuid;
  }

  /**
   * A request arrived on a device of the set (cached_dev_submit_bio): the set
   * is not idle; if the idle shortcut had raised the rates, every device goes
   * back to a rate of 1 and the controller takes over from there.
   */
  noteRequest(): void {
    this.idleCounter = 0;
    if (!this.atMaxWritebackRate) return;
    this.atMaxWritebackRate = false;
    for (const d of this.devices) d.settings.writebackRate = 1;
  }

  /** writeback_keys_done / writeback_keys_failed (set internal/). */
  get writebackKeys(): { done: number; failed: number } {
    let done = 0;
    let failed = 0;
    for (const d of this.devices) {
      const wb = d.attachment?.writeback.stats;
      if (wb) {
        done += wb.keysDone;
        failed += wb.keysFailed;
      }
    }
    return { done, failed };
  }
}

export interface RegistryOptions {
  /** Options for every cache set brought up. */
  setOptions?: CacheSetOptions;
  /** Settings for a backing device, by its bcacheN name, before it attaches or runs. */
  deviceSettings?: (name: string) => Partial<CachedDevSettings> | undefined;
  /** Called for a new backing device before it attaches or runs (attributes given at startup). */
  configureDevice?: (dev: CachedDev) => Promise<void>;
  /** Called for a new set before backing devices attach to it. */
  configureSet?: (set: RegisteredSet) => Promise<void>;
  now?: () => number;
  /**
   * Every duration, deadline and timer of the registry, its cache sets and
   * its backing devices (default: real time; a set's own setOptions.clock
   * wins). The simulator runs everything on one SimClock through this.
   */
  clock?: Clock;
  /** Options for every backing device (the offline timeout and the stop bound, for tests and serve). */
  deviceOptions?: Pick<CachedDevOptions, 'backingOfflineMs' | 'backingProbeMs' | 'stopTimeoutMs'>;
  /**
   * How long stopAll() and stopSet() wait for the bcache devices to stop
   * before they stop the cache sets under them (default 10 s).
   */
  deviceStopTimeoutMs?: number;
  /** errors=panic and a set failed: the daemon decides what a panic is (serve exits). */
  panic?: (setUuid: string) => void;
  /** Opens a path written to /sys/fs/bcache/register (exclusively). */
  open?: (path: string) => Promise<BlockDevice>;
}

/** What a registry tells its watchers; fired for every way a device or set starts or stops. */
export interface RegistryWatcher {
  deviceRunning?(dev: CachedDev): void;
  deviceStopped?(dev: CachedDev): void;
  setRegistered?(set: RegisteredSet): void;
  setGone?(set: RegisteredSet): void;
  /** A flash-only volume got its bcacheN (created, or found when its set registered). */
  volumeRunning?(vol: FlashDev): void;
  volumeStopped?(vol: FlashDev): void;
}

export type Registered = { kind: 'cache'; set: RegisteredSet } | { kind: 'backing'; dev: CachedDev };

export class Registry {
  private readonly options: RegistryOptions;
  readonly sets = new Map<string, RegisteredSet>();
  /** Cache sets retired after a failure since start (a retired set leaves `sets`; /metrics counts it here). */
  setsFailed = 0;
  /** Backing devices in registration order. */
  readonly devices: CachedDev[] = [];
  private nextIndex = 0;
  private stopPromise: Promise<void> | undefined;
  private readonly watchers = new Set<RegistryWatcher>();
  readonly clock: Clock;

  constructor(options: RegistryOptions = {}) {
    this.options = options;
    this.clock = options.clock ?? realClock;
  }

  /** Flash-only volumes running, set by set. */
  get volumes(): FlashDev[] {
    return [...this.sets.values()].flatMap((s) => [...s.volumes.values()]);
  }

  /** Devices that are running (have a bcacheN), in registration order. */
  get running(): CachedDev[] {
    return this.devices.filter((d) => d.running && !d.stopped);
  }

  /**
   * Register a device (register_bcache). The registry owns it from then on
   * (stopAll closes it); on failure it is closed and an OperationError says
   * why, in the kernel's words where it has them, with the kernel's errno
   * (EBUSY: the device is registered already; EINVAL otherwise, a failed
   * bring-up of its cache set included).
   */
  async register(dev: BlockDevice): Promise<Registered> {
    try {
      return await this.registerDevice(dev);
    } catch (err) {
      throw err instanceof OperationError ? err : new OperationError('EINVAL', errorMessage(err), { cause: err });
    }
  }

  private async registerDevice(dev: BlockDevice): Promise<Registered> {
    if (this.stopPromise) throw new OperationError('EINVAL', 'bcache is shutting down');
    let sb: Superblock;
    try {
      sb = await CachedDev.readSuperblock(dev);
    } catch (err) {
      await dev.close().catch(() => undefined);
      throw new OperationError('EINVAL', `error ${dev.name}: ${errorMessage(err)}`, { cause: err });
    }
    if (this.stopping()) {
      await dev.close().catch(() => undefined);
      throw new OperationError('EINVAL', 'bcache is shutting down');
    }
    if (isBacking(sb)) return { kind: 'backing', dev: await this.registerBackingDevice(dev, sb) };
    return { kind: 'cache', set: await this.registerCache(dev, sb) };
  }

  private async registerBackingDevice(dev: BlockDevice, sb: Superblock): Promise<CachedDev> {
    if (this.devices.some((d) => !d.stopped && d.sb.uuid.equals(sb.uuid))) {
      await dev.close().catch(() => undefined);
      throw new OperationError('EBUSY', `error ${dev.name}: device already registered`);
    }
    const index = this.nextIndex++;
    const name = `bcache${index}`;
    const cd = new CachedDev(dev, sb, {
      index,
      settings: this.options.deviceSettings?.(name) ?? {},
      ...(this.options.now ? { now: this.options.now } : {}),
      clock: this.clock,
      onRunning: (d) => {
        this.emit((w) => w.deviceRunning?.(d));
      },
      onStopped: (d) => {
        this.deviceGone(d);
      },
      ...this.options.deviceOptions,
    });
    this.devices.push(cd);
    log.info(`bcache: register_bdev() registered backing device ${dev.name}`);
    await this.options.configureDevice?.(cd);
    const set = this.sets.get(cd.setUuid);
    if (set) {
      try {
        await cd.attach(set);
      } catch (err) {
        log.error(`bcache: bch_cached_dev_attach() ${errorMessage(err)}`);
      }
    }
    if (!cd.running && (cd.state === BDEV_STATE_NONE || cd.state === BDEV_STATE_STALE)) cd.run();
    if (!cd.running) {
      log.warn(
        `${dev.name}: its cache set ${cd.setUuid} is not registered and its superblock says ${cd.stateName}: ` +
          `not running ${name} until the cache is registered (serving it uncached could return stale data)`,
      );
    }
    return cd;
  }

  private async registerCache(dev: BlockDevice, sb: Superblock): Promise<RegisteredSet> {
    const uuid = formatUuid(sb.setUuid);
    if (this.sets.has(uuid)) {
      await dev.close().catch(() => undefined);
      throw new OperationError('EINVAL', `error ${dev.name}: duplicate cache set member`);
    }
    const holder: { set?: RegisteredSet } = {};
    const cs = await CacheSet.open(dev, {
      clock: this.clock,
      ...this.options.setOptions,
      onStopped: () => {
        if (holder.set) this.setGone(holder.set);
      },
    });
    if (this.stopping()) {
      // Stopped while the set came up: it is not ours to keep.
      await cs.stop();
      throw new OperationError('EINVAL', 'bcache is shutting down');
    }
    const set = new RegisteredSet(cs);
    holder.set = set;
    this.sets.set(uuid, set);
    this.emit((w) => w.setRegistered?.(set));
    cs.onFailure(() => {
      void this.retire(set);
    });
    await this.options.configureSet?.(set);
    for (const cd of this.devices) {
      if (cd.stopped || cd.attached || cd.setUuid !== uuid) continue;
      try {
        await cd.attach(set);
      } catch (err) {
        log.error(`bcache: bch_cached_dev_attach() ${errorMessage(err)}`);
      }
    }
    // flash_devs_run(): the volumes in the uuid table.
    for (const slot of cs.uuids.flashSlots()) this.runVolume(set, slot);
    return set;
  }

  /** flash_dev_run(): the volume in `slot` gets its bcacheN. */
  private runVolume(set: RegisteredSet, slot: number): FlashDev {
    const vol = new FlashDev(set.cs, slot, {
      index: this.nextIndex++,
      ...(this.options.deviceOptions?.stopTimeoutMs !== undefined
        ? { stopTimeoutMs: this.options.deviceOptions.stopTimeoutMs }
        : {}),
      onStopped: (v) => {
        if (set.volumes.get(v.inode) === v) set.volumes.delete(v.inode);
        this.emit((w) => w.volumeStopped?.(v));
      },
    });
    set.volumes.set(slot, vol);
    log.info(`bcache: flash_dev_run() ${vol.name}: flash-only volume ${slot} of cache set ${set.uuid}`);
    this.emit((w) => w.volumeRunning?.(vol));
    return vol;
  }

  /**
   * flash_vol_create (bch_flash_dev_create): a new flash-only volume of
   * `bytes` (rounded down to sectors) in the set's first free uuid slot,
   * written with the uuid table, then run.
   */
  async createFlashVolume(set: RegisteredSet, bytes: number): Promise<FlashDev> {
    if (set.stopping || set.gone || this.stopping()) {
      throw new OperationError('EBUSY', `cache set ${set.uuid} is stopping: no volume can be created`);
    }
    const slot = set.cs.uuids.createFlash(bytes, this.options.now?.() ?? Math.floor(Date.now() / 1000));
    if (slot < 0) {
      log.error("bcache: bch_flash_dev_create() Can't create volume, no room for UUID");
      throw new OperationError('EINVAL', "Can't create volume, no room for UUID");
    }
    await set.cs.writeUuids();
    return this.runVolume(set, slot);
  }

  /** A flash volume's `unregister`: stop and delete it. */
  async unregisterVolume(vol: FlashDev): Promise<void> {
    await vol.unregister(this.options.now?.() ?? Math.floor(Date.now() / 1000));
  }

  private async stopVolumes(set: RegisteredSet): Promise<void> {
    await Promise.all([...set.volumes.values()].map((v) => v.stop()));
  }

  /**
   * Stop one cache set: its bcache devices first (without detaching), then
   * the set (bch_cache_set_stop). Bounded: see stopDevices().
   */
  async stopSet(set: RegisteredSet): Promise<void> {
    if (set.retired) {
      await set.retired;
      return;
    }
    set.stopping = true;
    await Promise.all([this.stopDevices([...set.devices]), this.stopVolumes(set)]);
    await set.cs.stop();
    this.setGone(set);
  }

  /**
   * Stop `devices`. Those not stopped within deviceStopTimeoutMs have
   * requests stuck below them: stop the cache sets they are attached to,
   * whose bounded stop fails what waits on the cache (the allocator's
   * waiters, cache I/O, inserts), and then wait for the devices, whose own
   * stop is bounded (CachedDev.stop). Acknowledged writes keep their
   * guarantees: the set's stop still writes its dirty nodes, a final journal
   * entry and the superblock; only requests never acknowledged fail.
   */
  private async stopDevices(devices: readonly CachedDev[]): Promise<void> {
    if (devices.length === 0) return;
    const done = new Set<CachedDev>();
    const all = Promise.all(
      devices.map((d) =>
        d.stop().then(
          () => done.add(d),
          (err: unknown) => {
            done.add(d);
            log.error(`${d.name}: stopping: ${errorMessage(err)}`);
          },
        ),
      ),
    );
    const bound = this.options.deviceStopTimeoutMs ?? 10_000;
    if (await settledWithin(all, bound, this.clock)) return;
    const stuck = devices.filter((d) => !done.has(d));
    const sets = new Set<RegisteredSet>();
    for (const d of stuck) {
      // Every set a device of ours attaches to is a RegisteredSet of ours.
      const set = d.attachment?.set;
      if (set instanceof RegisteredSet && !set.gone) sets.add(set);
    }
    log.warn(
      `bcache: ${stuck.map((d) => d.name).join(', ')} did not stop within ${bound} ms (requests stuck below)` +
        (sets.size > 0
          ? `; stopping cache set ${[...sets].map((s) => s.uuid).join(', ')} under them, which fails what waits on the cache`
          : ''),
    );
    // DESIGN rule 5's order: the writeback workers (which copy out of the
    // cache) first, then the set. Idempotent: the devices' stop stops them too.
    await Promise.all(stuck.map((d) => d.attachment?.writeback.stop() ?? Promise.resolve()));
    await Promise.all(
      [...sets].map(async (set) => {
        set.stopping = true;
        await set.cs.stop().catch((err: unknown) => {
          log.error(`bcache: stopping cache set ${set.uuid}: ${errorMessage(err)}`);
        });
      }),
    );
    await all;
  }

  /**
   * Unregister a cache set: detach every backing device (their dirty data
   * written back first; they keep running uncached), then stop the set.
   */
  async unregisterSet(set: RegisteredSet): Promise<void> {
    set.stopping = true;
    await Promise.all([...set.devices].map((d) => d.detach()));
    await this.stopSet(set);
  }

  /**
   * Explicit attach (sysfs `attach`): the set named by `text`, parsed as
   * bch_parse_uuid does. Throws OperationError with the kernel's errno: the
   * attach's own refusals as they came, anything else (an I/O error) as
   * EINVAL.
   */
  async attach(dev: CachedDev, text: string): Promise<void> {
    const uuid = parseUuidPrefix(text);
    if (uuid === undefined) {
      throw new OperationError('EINVAL', `attach: "${text.trim()}" is not a cache set uuid; write the set's uuid`);
    }
    const set = this.sets.get(uuid);
    if (!set || set.gone) {
      log.error(`bcache: bch_cached_dev_attach() Can't attach ${text.trim()}: cache set not found`);
      throw new OperationError('ENOENT', `Can't attach ${text.trim()}: cache set not found`);
    }
    try {
      await dev.attach(set);
    } catch (err) {
      log.error(`bcache: bch_cached_dev_attach() ${errorMessage(err)}`);
      if (err instanceof OperationError) throw err;
      throw new OperationError('EINVAL', errorMessage(err), { cause: err });
    }
  }

  /**
   * Register a device by path (sysfs `register` / `register_quiet`). A path
   * already registered is EBUSY "device already registered", or success
   * when quiet.
   */
  async registerPath(path: string, options: { quiet?: boolean } = {}): Promise<Registered | undefined> {
    const open = this.options.open;
    if (!open) throw new OperationError('EINVAL', 'this registry cannot open devices by path');
    if (this.stopping()) throw new OperationError('EBUSY', 'bcache is shutting down');
    let dev: BlockDevice;
    try {
      dev = await open(path);
    } catch (err) {
      // The open's own errno (a system error's code): EBUSY is an exclusive open refused.
      const busy = err instanceof Error && 'code' in err && err.code === 'EBUSY';
      if (busy && options.quiet === true) return undefined;
      if (busy) {
        const ours =
          this.devices.some((d) => d.backingName === path) ||
          [...this.sets.values()].some((s) => s.cs.dev.name === path);
        throw new OperationError(
          'EBUSY',
          `error ${path}: ${ours ? 'device already registered' : `device busy (${errorMessage(err)})`}`,
          { cause: err },
        );
      }
      throw new OperationError('EINVAL', `error ${path}: failed to open device: ${errorMessage(err)}`, {
        cause: err,
      });
    }
    try {
      return await this.register(dev);
    } catch (err) {
      // register()'s only EBUSY: the device is registered already, which register_quiet ignores.
      if (err instanceof OperationError && err.code === 'EBUSY' && options.quiet === true) return undefined;
      throw err;
    }
  }

  /** pendings_cleanup: stop every backing device waiting for a cache set that is not registered. */
  async stopPending(): Promise<void> {
    const waiting = this.devices.filter((d) => !d.running && !d.stopped && !this.sets.has(d.setUuid));
    await Promise.all(waiting.map((d) => d.stop()));
  }

  /** Subscribe to devices and sets starting and stopping. Returns the unsubscribe function. */
  watch(watcher: RegistryWatcher): () => void {
    this.watchers.add(watcher);
    return () => {
      this.watchers.delete(watcher);
    };
  }

  /** No backing device and no cache set is registered. */
  get empty(): boolean {
    return this.devices.length === 0 && this.sets.size === 0;
  }

  private emit(fn: (w: RegistryWatcher) => void): void {
    for (const w of [...this.watchers]) {
      try {
        fn(w);
      } catch (err) {
        log.error(`registry watcher failed: ${errorMessage(err)}`);
      }
    }
  }

  private deviceGone(dev: CachedDev): void {
    const i = this.devices.indexOf(dev);
    if (i >= 0) this.devices.splice(i, 1);
    this.emit((w) => w.deviceStopped?.(dev));
  }

  private setGone(set: RegisteredSet): void {
    if (set.gone) return;
    set.gone = true;
    set.stopping = true;
    if (this.sets.get(set.uuid) === set) this.sets.delete(set.uuid);
    this.emit((w) => w.setGone?.(set));
  }

  /**
   * The cache set failed (bch_cache_set_error .. bch_cache_set_unregister):
   * retire it in DESIGN rule 5's order. Its I/O is already disabled (new
   * requests and internal I/O fail fast); every worker of the set stops
   * (whoever started it: the set's worker scope holds them all); each
   * backing device is stopped or kept serving uncached, as its
   * stop_when_cache_set_failed says; then the set is stopped, which closes
   * the cache device, and unregistered. Idempotent; bounded by the workers'
   * and the set's stop bounds.
   */
  retire(set: RegisteredSet): Promise<void> {
    set.retired ??= this.retireSet(set);
    return set.retired;
  }

  private async retireSet(set: RegisteredSet): Promise<void> {
    const cs = set.cs;
    // bch_cache_set_error(): an orderly stop already under way needs nothing more.
    if (set.stopping) return;
    set.stopping = true;
    this.setsFailed++;
    if (!cs.ioDisabled) cs.fail(new Error('cache set retired'));
    if (set.settings.errors === 'panic') {
      log.error(`bcache: bch_cache_set_error() panic forced after error on ${set.uuid}`);
      this.options.panic?.(set.uuid);
    }
    await cs.workers.stopAll();
    await this.stopVolumes(set);
    await Promise.all(
      [...set.devices].map(async (d) => {
        const att = d.attachment;
        if (!att || att.set !== set) return;
        try {
          await d.cacheSetFailed(att);
        } catch (err) {
          log.error(`${d.name}: leaving failed cache set ${set.uuid}: ${errorMessage(err)}`);
          await d.stop();
        }
      }),
    );
    await cs.stop();
    if (this.sets.get(set.uuid) === set) this.sets.delete(set.uuid);
  }

  /** As a call, so that checks after an await are not narrowed away. */
  private stopping(): boolean {
    return this.stopPromise !== undefined;
  }

  /** Stop everything (shutdown): devices, then sets. Idempotent and bounded (stopDevices()). */
  stopAll(): Promise<void> {
    this.stopPromise ??= this.shutdown();
    return this.stopPromise;
  }

  private async shutdown(): Promise<void> {
    await this.stopDevices([...this.devices]);
    await Promise.all([...this.sets.values()].map((s) => this.stopSet(s)));
  }
}
