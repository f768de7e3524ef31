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
// superblock), closing the devices.

import type { BlockDevice } from '../blockdev/types.ts';
import { BDEV_STATE_NONE, BDEV_STATE_STALE } from '../format/constants.ts';
import { isBacking, type Superblock } from '../format/superblock.ts';
import { formatUuid } from '../format/uuid-text.ts';
import { errorMessage } from '../util/lifecycle.ts';
import { log } from '../util/log.ts';
import { CacheSet, type CacheSetOptions } from './cache-set.ts';
import { CachedDev, type CachedDevOptions, type CachedDevSettings } from './cached-dev.ts';
import { CacheAccounting } from './stats.ts';

/** Cache set tunables that live above the engine core (bcache.md §3.2). */
export interface SetSettings {
  congestedReadThresholdUs: number;
  congestedWriteThresholdUs: number;
  ioErrorLimit: number;
  ioErrorHalflife: number;
  errors: 'unregister' | 'panic';
}

export function defaultSetSettings(): SetSettings {
  return {
    congestedReadThresholdUs: 2000,
    congestedWriteThresholdUs: 20000,
    ioErrorLimit: 8,
    ioErrorHalflife: 0,
    errors: 'unregister',
  };
}

/** A running cache set and what the request layer keeps about it. */
export class RegisteredSet {
  readonly cs: CacheSet;
  readonly stats = new CacheAccounting();
  readonly settings: SetSettings = defaultSetSettings();
  /** Attached backing devices. */
  readonly devices = new Set<CachedDev>();
  stopping = false;
  /** Settled when a retire after a fatal error has finished. */
  retired: Promise<void> | undefined;

  constructor(cs: CacheSet) {
    this.cs = cs;
    cs.errorLimits = () => ({ limit: this.settings.ioErrorLimit, halflife: this.settings.ioErrorHalflife });
  }

  get uuid(): string {
    return this.cs.uuid;
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
  /** Options for every backing device (the offline timeout, for tests). */
  deviceOptions?: Pick<CachedDevOptions, 'backingOfflineMs' | 'backingProbeMs'>;
  /** errors=panic and a set failed: the daemon decides what a panic is (serve exits). */
  panic?: (setUuid: string) => void;
}

export type Registered = { kind: 'cache'; set: RegisteredSet } | { kind: 'backing'; dev: CachedDev };

export class Registry {
  private readonly options: RegistryOptions;
  readonly sets = new Map<string, RegisteredSet>();
  /** Backing devices in registration order. */
  readonly devices: CachedDev[] = [];
  private nextIndex = 0;
  private stopPromise: Promise<void> | undefined;

  constructor(options: RegistryOptions = {}) {
    this.options = options;
  }

  /** Devices that are running (have a bcacheN), in registration order. */
  get running(): CachedDev[] {
    return this.devices.filter((d) => d.running && !d.stopped);
  }

  /**
   * Register a device (register_bcache). The registry owns it from then on
   * (stopAll closes it); on failure it is closed and the error says why, in
   * the kernel's words where it has them.
   */
  async register(dev: BlockDevice): Promise<Registered> {
    if (this.stopPromise) throw new Error('bcache is shutting down');
    let sb: Superblock;
    try {
      sb = await CachedDev.readSuperblock(dev);
    } catch (err) {
      await dev.close().catch(() => undefined);
      throw new Error(`error ${dev.name}: ${errorMessage(err)}`, { cause: err });
    }
    if (this.stopping()) {
      await dev.close().catch(() => undefined);
      throw new Error('bcache is shutting down');
    }
    if (isBacking(sb)) return { kind: 'backing', dev: await this.registerBackingDevice(dev, sb) };
    return { kind: 'cache', set: await this.registerCache(dev, sb) };
  }

  private async registerBackingDevice(dev: BlockDevice, sb: Superblock): Promise<CachedDev> {
    if (this.devices.some((d) => !d.stopped && d.sb.uuid.equals(sb.uuid))) {
      await dev.close().catch(() => undefined);
      throw new Error(`error ${dev.name}: device already registered`);
    }
    const index = this.nextIndex++;
    const name = `bcache${index}`;
    const cd = new CachedDev(dev, sb, {
      index,
      settings: this.options.deviceSettings?.(name) ?? {},
      ...(this.options.now ? { now: this.options.now } : {}),
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
      throw new Error(`error ${dev.name}: duplicate cache set member`);
    }
    const cs = await CacheSet.open(dev, this.options.setOptions ?? {});
    if (this.stopping()) {
      // Stopped while the set came up: it is not ours to keep.
      await cs.stop();
      throw new Error('bcache is shutting down');
    }
    const set = new RegisteredSet(cs);
    this.sets.set(uuid, set);
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
    return set;
  }

  /** Stop one cache set: its bcache devices first (without detaching), then the set (bch_cache_set_stop). */
  async stopSet(set: RegisteredSet): Promise<void> {
    if (set.retired) {
      await set.retired;
      return;
    }
    set.stopping = true;
    await Promise.all([...set.devices].map((d) => d.stop()));
    await set.cs.stop();
    if (this.sets.get(set.uuid) === set) this.sets.delete(set.uuid);
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
    if (!cs.ioDisabled) cs.fail(new Error('cache set retired'));
    if (set.settings.errors === 'panic') {
      log.error(`bcache: bch_cache_set_error() panic forced after error on ${set.uuid}`);
      this.options.panic?.(set.uuid);
    }
    await cs.workers.stopAll();
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

  /** Stop everything (shutdown): devices, then sets. Idempotent. */
  stopAll(): Promise<void> {
    this.stopPromise ??= this.shutdown();
    return this.stopPromise;
  }

  private async shutdown(): Promise<void> {
    await Promise.all(this.devices.map((d) => d.stop()));
    await Promise.all([...this.sets.values()].map((s) => this.stopSet(s)));
  }
}
