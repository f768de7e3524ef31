// bcache's writeback rate: the token schedule that paces writeback
// (bch_ratelimit, bch_next_delay), the PI controller that sets its rate
// (writeback.c __update_writeback_rate, bcache.md §4.8-4.9) and the periodic
// update that runs the controller. What sysfs prints of it (writeback_rate,
// writeback_rate_debug) is rendered with the other attributes, in
// attributes.ts and sysfs/device-dir.ts.
//
// The controller is a pure step over plain numbers so that it can be checked
// against values worked out by hand from the kernel's integer arithmetic
// (every division truncates toward zero, as div_s64 does).
//
// The update runs as a Worker loop (DESIGN.md rule 2), never a timer that
// re-arms itself: the seed bug of bcache.md §1 was the kernel's rate update
// re-arming after it had been cancelled and touching a freed cache set. Its
// owner is the attachment's Writeback, and it lives inside the writeback
// worker's own lifetime (started when that worker starts, stopped and awaited
// before that worker ends), so it holds the writeback worker's reference on
// the attachment and stopping writeback stops both.

import type { Clock } from '../util/clock.ts';
import { errorMessage, sleep, Worker } from '../util/lifecycle.ts';
import { log } from '../util/log.ts';
import type { CacheSet } from './cache-set.ts';

/** WRITEBACK_SHARE_SHIFT: a backing device's share of the cache, in 1/16384ths. */
const SHARE_SHIFT = 14;
/** NSEC_PER_SEC: the controller's upper clamp, sectors per second. */
export const WRITEBACK_RATE_MAX = 1_000_000_000;
/** WRITEBACK_RATE_UPDATE_SECS_MAX */
export const WRITEBACK_RATE_UPDATE_SECONDS_MAX = 60;
/** BCH_WRITEBACK_FRAGMENT_THRESHOLD_LOW / _MID / _HIGH (in_use percent). */
export const FRAGMENT_THRESHOLD_LOW = 50;
export const FRAGMENT_THRESHOLD_MID = 57;
export const FRAGMENT_THRESHOLD_HIGH = 64;

/**
 * The controller's tunables (writeback_percent and the writeback_rate_*
 * attributes), part of a backing device's settings.
 */
export interface RateSettings {
  /** Target dirty share of the cache (the PI controller's target); 0: no throttle. */
  writebackPercent: number;
  /** The current rate, sectors per second: set by the PI controller each update, or by the attribute. */
  writebackRate: number;
  writebackRateUpdateSeconds: number;
  writebackRateMinimum: number;
  writebackRatePTermInverse: number;
  writebackRateITermInverse: number;
  /** Weights of the fragmentation term (writeback_rate_fp_term_low/mid/high). */
  writebackRateFpTermLow: number;
  writebackRateFpTermMid: number;
  writebackRateFpTermHigh: number;
  writebackConsiderFragment: boolean;
}

/** The kernel's defaults (bch_cached_dev_writeback_init). */
export function defaultRateSettings(): RateSettings {
  return {
    writebackPercent: 10,
    writebackRate: 1024,
    writebackRateUpdateSeconds: 5,
    writebackRateMinimum: 8,
    writebackRatePTermInverse: 40,
    writebackRateITermInverse: 10000,
    writebackRateFpTermLow: 1,
    writebackRateFpTermMid: 10,
    writebackRateFpTermHigh: 1000,
    writebackConsiderFragment: true,
  };
}

/** What the controller needs of the backing device it paces (CachedDev is one). */
export interface RateHost {
  /** bcacheN, for worker names and messages. */
  readonly name: string;
  readonly settings: RateSettings;
  readonly writebackRateState: WritebackRateState;
  /** The whole backing device in sectors (bdev_nr_sectors: the data offset included). */
  readonly backingSectors: number;
  /** Whose time the update interval and the rate limiter's schedule are measured in. */
  readonly clock: Clock;
}

/** What it needs of the cache set the device is attached to (the registry's RegisteredSet is one). */
export interface RateSet {
  /** The backing devices attached to the set (their sizes apportion the target). */
  readonly devices: ReadonlySet<RateHost>;
  readonly settings: { readonly idleMaxWritebackRate: boolean; readonly gcAfterWriteback: number };
  /** Rate updates since the last request on any device of the set (the idle shortcut's counter). */
  idleCounter: number;
  /** The idle shortcut has set some device's rate to the maximum. */
  atMaxWritebackRate: boolean;
  /** gc_after_writeback's BCH_DO_AUTO_GC: a GC pass once writeback has found nothing dirty. */
  gcAfterWritebackDue: boolean;
}

/**
 * in_use (percent) from which a rate update with gc_after_writeback on makes a
 * GC pass due after writeback (BCH_AUTO_GC_DIRTY_THRESHOLD).
 */
const AUTO_GC_DIRTY_THRESHOLD = 50;

/** What it needs of the attachment (CachedDev's Attachment is one). */
export interface RateAttachment {
  readonly cs: CacheSet;
  /** The device's keys in the btree. */
  readonly inode: number;
  readonly set: RateSet;
}

/** s64 division as div_s64: truncated toward zero. */
function div(a: number, b: number): number {
  return Math.trunc(a / b);
}

/** bch_ratelimit / bch_next_delay(): a token schedule, in ms. */
export class RateLimiter {
  private nextMs = 0;

  /** When the next I/O may go (ms, the clock of the calls); 0 before first use. */
  get next(): number {
    return this.nextMs;
  }

  reset(now: number): void {
    this.nextMs = now;
  }

  /** Delay (ms) before the next I/O after `done` sectors at `rate` sectors/s. */
  delay(done: number, rate: number, now: number): number {
    if (this.nextMs === 0) this.nextMs = now;
    this.nextMs += (done * 1000) / Math.max(1, rate);
    if (this.nextMs > now + 2500) this.nextMs = now + 2500;
    if (this.nextMs < now - 2000) this.nextMs = now - 2000;
    return Math.max(0, this.nextMs - now);
  }
}

/**
 * writeback_delay(): the writeback of a device is paced by its rate unless it
 * is detaching (everything goes out at full speed so the detach can finish)
 * or writeback_percent is 0 (no throttle at all).
 */
export function writebackThrottled(detaching: boolean, writebackPercent: number): boolean {
  return !detaching && writebackPercent > 0;
}

/** writeback_rate_update_seconds as the kernel bounds it: [1, 60]. */
export function updateSecondsClamped(seconds: number): number {
  return Math.min(WRITEBACK_RATE_UPDATE_SECONDS_MAX, Math.max(1, Math.trunc(seconds)));
}

/** What one controller step looks at; all sizes in sectors. */
export interface RateInputs {
  /** Dirty sectors of this backing device in the cache. */
  dirty: number;
  /** The cache: nbuckets x bucket_size, minus what flash-only volumes hold dirty. */
  cacheSectors: number;
  /** This backing device's size (bdev_nr_sectors: the whole device, data offset included). */
  bdevSectors: number;
  /** All backing devices attached to the set, summed (c->cached_dev_sectors). */
  cachedDevSectors: number;
  writebackPercent: number;
  pTermInverse: number;
  iTermInverse: number;
  minimum: number;
  updateSeconds: number;
  /** The rate now (sectors/s), for `change`. */
  rate: number;
  /** The accumulated integral (writeback_rate_integral) before this step. */
  integral: number;
  /** The rate limiter's schedule is ahead of now: writeback is using all the rate it gets. */
  keepingUp: boolean;
  /** The fragmentation term (5.12+): writeback_consider_fragment and its inputs. */
  considerFragment: boolean;
  /** gc_stats.in_use: percent of buckets not available. */
  inUse: number;
  nbuckets: number;
  availBuckets: number;
  bucketSize: number;
  fpTermLow: number;
  fpTermMid: number;
  fpTermHigh: number;
}

/** What one step produces: the new rate and the terms writeback_rate_debug shows. */
export interface RateStep {
  rate: number;
  target: number;
  proportional: number;
  /** The accumulated integral to carry to the next step. */
  integral: number;
  /** integral / i_term_inverse: the integral's contribution to the rate. */
  integralScaled: number;
  change: number;
}

/**
 * __calc_target_rate(): writeback_percent of the cache, apportioned to this
 * device by its share of all the backing devices attached to the set (at
 * least one share in 16384, so a tiny device still gets a target).
 */
export function targetSectors(
  i: Pick<RateInputs, 'cacheSectors' | 'bdevSectors' | 'cachedDevSectors' | 'writebackPercent'>,
): number {
  const total = Math.max(1, i.cachedDevSectors);
  // (bdev_sectors << 14) / cached_dev_sectors, kept in a u32.
  let share = Number(((BigInt(i.bdevSectors) << BigInt(SHARE_SHIFT)) / BigInt(total)) & 0xffffffffn);
  if (share < 1) share = 1;
  const cacheTarget = Math.floor((i.cacheSectors * i.writebackPercent) / 100);
  return Number((BigInt(cacheTarget) * BigInt(share)) >> BigInt(SHARE_SHIFT));
}

/**
 * The fragmentation term: when more than half the buckets are in use and the
 * dirty data is spread thin over them (more than 3 bucket-sizes of buckets
 * per dirty sector's worth), the proportional term is raised so writeback
 * frees buckets before writes have to bypass the nearly full cache
 * (cutoff_writeback_sync). Returns the proportional term to use.
 */
function fragmentProportional(i: RateInputs, proportional: number): number {
  if (!i.considerFragment || i.inUse <= FRAGMENT_THRESHOLD_LOW || i.dirty <= 0) return proportional;
  const dirtyBuckets = i.nbuckets - i.availBuckets;
  if (dirtyBuckets <= 0) return proportional;
  const fragment = div(dirtyBuckets * i.bucketSize, i.dirty);
  let fpTerm: number;
  if (i.inUse <= FRAGMENT_THRESHOLD_MID) fpTerm = i.fpTermLow * (i.inUse - FRAGMENT_THRESHOLD_LOW);
  else if (i.inUse <= FRAGMENT_THRESHOLD_HIGH) fpTerm = i.fpTermMid * (i.inUse - FRAGMENT_THRESHOLD_MID);
  else fpTerm = i.fpTermHigh * (i.inUse - FRAGMENT_THRESHOLD_HIGH);
  const fps = div(i.dirty, dirtyBuckets) * fpTerm;
  return fragment > 3 && fps > proportional ? fps : proportional;
}

/** One step of the PI controller (__update_writeback_rate). */
export function updateWritebackRate(i: RateInputs): RateStep {
  const target = targetSectors(i);
  const error = i.dirty - target;
  const proportional = fragmentProportional(i, div(error, i.pTermInverse));
  let integral = i.integral;
  // Anti-windup: the integral shrinks only while it is positive, and grows
  // only while writeback keeps up with the rate it has; otherwise it would
  // accumulate error the rate cannot act on and overshoot later.
  if ((error < 0 && integral > 0) || (error > 0 && i.keepingUp)) {
    integral += error * i.updateSeconds;
  }
  const integralScaled = div(integral, i.iTermInverse);
  // The kernel clamps in an int32 with the minimum as given; a minimum above
  // the maximum is taken as the maximum here rather than wrapping.
  const rate = Math.min(WRITEBACK_RATE_MAX, Math.max(i.minimum, proportional + integralScaled));
  return { rate, target, proportional, integral, integralScaled, change: rate - i.rate };
}

/**
 * A backing device's controller state (the writeback_rate_* fields of struct
 * cached_dev): it outlives attachments, as the kernel's does. The rate itself
 * is settings.writebackRate, which the writeback_rate attribute also sets.
 */
export class WritebackRateState {
  readonly limiter = new RateLimiter();
  integral = 0;
  target = 0;
  proportional = 0;
  integralScaled = 0;
  change = 0;
}

/** The kernel's step inputs for an attached device, from the engine's state now. */
export function rateInputs(dev: RateHost, att: RateAttachment, nowMs: number): RateInputs {
  const cs = att.cs;
  const s = dev.settings;
  const st = dev.writebackRateState;
  let cachedDevSectors = 0;
  for (const d of att.set.devices) cachedDevSectors += d.backingSectors;
  const bdevSectors = dev.backingSectors;
  return {
    dirty: cs.dirtySectors(att.inode),
    cacheSectors: cs.sb.nbuckets * cs.sb.bucketSize - cs.flashDirtySectors(),
    bdevSectors,
    cachedDevSectors: Math.max(cachedDevSectors, bdevSectors),
    writebackPercent: s.writebackPercent,
    pTermInverse: Math.max(1, s.writebackRatePTermInverse),
    iTermInverse: Math.max(1, s.writebackRateITermInverse),
    minimum: Math.max(1, s.writebackRateMinimum),
    updateSeconds: updateSecondsClamped(s.writebackRateUpdateSeconds),
    rate: s.writebackRate,
    integral: st.integral,
    keepingUp: nowMs < st.limiter.next + 1,
    considerFragment: s.writebackConsiderFragment,
    inUse: cs.inUse,
    nbuckets: cs.sb.nbuckets,
    availBuckets: cs.allocator.avail,
    bucketSize: cs.sb.bucketSize,
    fpTermLow: s.writebackRateFpTermLow,
    fpTermMid: s.writebackRateFpTermMid,
    fpTermHigh: s.writebackRateFpTermHigh,
  };
}

/** Test instrumentation: see each step, or hold one in progress. */
export interface RateUpdateInstrument {
  /** Awaited at the start of every step (a test can block a step here). */
  beforeStep?: (signal: AbortSignal) => Promise<void>;
  /** Called after every step that ran, with what it computed (undefined: skipped). */
  afterStep?: (step: RateStep | undefined) => void;
}

export interface RateUpdateOptions {
  /** ms clock of the rate limiter (default: the device's clock). */
  now?: () => number;
}

/**
 * update_writeback_rate(), every writeback_rate_update_seconds, as a Worker
 * loop. Each step runs only while the set's I/O is enabled, and applies the
 * controller only while the device has dirty data and writeback_percent is
 * not 0 (with 0, the rate is left alone and writeback is not throttled).
 */
export class WritebackRateUpdate {
  private readonly dev: RateHost;
  private readonly att: RateAttachment;
  private readonly now: () => number;
  private worker: Worker | undefined;
  readonly instrument: RateUpdateInstrument = {};
  /** Steps completed (the controller applied or not). */
  steps = 0;

  constructor(dev: RateHost, att: RateAttachment, options: RateUpdateOptions = {}) {
    this.dev = dev;
    this.att = att;
    this.now = options.now ?? (() => dev.clock.now());
  }

  get running(): boolean {
    return this.worker?.state === 'running';
  }

  start(): void {
    if (this.worker) return;
    this.worker = new Worker(`bcache_writeback_rate ${this.dev.name}`, (signal) => this.run(signal), {
      stopTimeoutMs: 30_000,
      clock: this.dev.clock,
    }).start();
  }

  /** Stop and wait: a step in progress finishes first, none starts afterwards. Idempotent. */
  async stop(): Promise<void> {
    await this.worker?.stop();
  }

  private async run(signal: AbortSignal): Promise<void> {
    const cs = this.att.cs;
    const interval = (): number => updateSecondsClamped(this.dev.settings.writebackRateUpdateSeconds) * 1000;
    while (!signal.aborted && !cs.ioDisabled && !cs.stopped) {
      if (!(await sleep(interval(), signal, this.dev.clock))) break;
      try {
        await this.step(signal);
      } catch (err) {
        // A failed step leaves the rate as it was; the next one tries again.
        log.error(`${this.dev.name}: writeback rate update: ${errorMessage(err)}`);
      }
    }
  }

  private async step(signal: AbortSignal): Promise<void> {
    const hook = this.instrument.beforeStep;
    if (hook) await hook(signal);
    // Stopped, or the set failed, while the step waited: touch nothing.
    if (signal.aborted || this.att.cs.ioDisabled || this.att.cs.stopped) return;
    const dev = this.dev;
    const att = this.att;
    const dirty = att.cs.dirtySectors(att.inode) > 0;
    let result: RateStep | undefined;
    if (dirty && dev.settings.writebackPercent > 0 && !atMaxWritebackRate(dev, att)) {
      result = updateWritebackRate(rateInputs(dev, att, this.now()));
      const st = dev.writebackRateState;
      st.integral = result.integral;
      st.target = result.target;
      st.proportional = result.proportional;
      st.integralScaled = result.integralScaled;
      st.change = result.change;
      dev.settings.writebackRate = result.rate;
      // update_gc_after_writeback(): a densely used cache is worth a GC pass
      // once writeback has emptied it, so that its buckets come back at once.
      if (att.set.settings.gcAfterWriteback === 1 && att.cs.inUse >= AUTO_GC_DIRTY_THRESHOLD) {
        att.set.gcAfterWritebackDue = true;
      }
    }
    this.steps++;
    this.instrument.afterStep?.(result);
  }
}

/**
 * set_at_max_writeback_rate(): while no request has reached any device of the
 * set for attached² × 6 rate updates (30 s for one device at the default 5 s
 * period) and GC is not running, write back at the maximum rate instead of
 * the controller's (idle_max_writeback_rate, on by default). A user expects
 * an idle cache to clean itself; below target the controller alone would sit
 * at writeback_rate_minimum (4 KiB/s) forever.
 */
function atMaxWritebackRate(dev: RateHost, att: RateAttachment): boolean {
  const set = att.set;
  if (!set.settings.idleMaxWritebackRate || att.cs.gc.inProgress) return false;
  const n = Math.max(1, set.devices.size);
  if (++set.idleCounter < n * n * 6) return false;
  set.atMaxWritebackRate = true;
  dev.settings.writebackRate = WRITEBACK_RATE_MAX;
  const st = dev.writebackRateState;
  st.proportional = 0;
  st.integralScaled = 0;
  st.change = 0;
  return true;
}
