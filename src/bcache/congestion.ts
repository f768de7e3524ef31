// Congestion of the cache device, as bcache measures it (io.c
// bch_bbio_count_io_errors, request.c bch_get_congested): a cache device
// that answers slower than congested_read_threshold_us (reads) or
// congested_write_threshold_us (writes) is congested, and then I/O with
// enough sequential history goes around it to the backing device.
//
// The state is one negative counter and the time of the last slow I/O:
//
//   - an I/O slower than its threshold takes its latency in ms (us / 1024)
//     off the counter (never below -CONGESTED_MAX) and stamps the time;
//     a faster one gives 1 back;
//   - bch_get_congested() adds back one for every 1024 us since the last
//     slow I/O; if the sum is still negative, the cache is congested, and
//     the result is a sequential size in sectors: 2^((sum + 1024) / 64)
//     (fract_exp_two: the fraction interpolated), minus the number of bits
//     set in a random 32-bit word (so requests near the cutoff go either
//     way), at least 1. The more congested, the smaller: at the counter's
//     floor every request bypasses, just past it only long streams do.
//
// Where bcache measures from bio submission to its end_io, we measure from
// the call to the device to the promise's settlement: time the request waits
// on the daemon's own event loop counts too (README, Control).

import type { Clock } from '../util/clock.ts';

/** CONGESTED_MAX: how far the counter goes down. */
export const CONGESTED_MAX = 1024;

/** The two thresholds (microseconds; 0 disables), read at every measured I/O: the set's settings. */
export interface CongestionThresholds {
  readonly congestedReadThresholdUs: number;
  readonly congestedWriteThresholdUs: number;
}

/** The kernel's defaults (cache_set_alloc), what to write to turn congestion bypass on as in Linux. */
export const KERNEL_CONGESTION_THRESHOLDS: CongestionThresholds = {
  congestedReadThresholdUs: 2000,
  congestedWriteThresholdUs: 20000,
};

/**
 * ubcache's defaults: off. The kernel times the bio on the device; ubcache
 * times the I/O from the call to its completion as the daemon sees it, so a
 * busy machine (a loaded event loop, a descheduled process) reads as a slow
 * cache device and the kernel's thresholds would send requests around a
 * perfectly fast cache. Set the thresholds to turn it on.
 */
export const DEFAULT_CONGESTION_THRESHOLDS: CongestionThresholds = {
  congestedReadThresholdUs: 0,
  congestedWriteThresholdUs: 0,
};

/** fract_exp_two(x, fractBits): 2^(x / 2^fractBits), the fraction linear between powers. */
export function fractExpTwo(x: number, fractBits: number): number {
  const fract = x & ((1 << fractBits) - 1);
  const whole = 2 ** Math.floor(x / 2 ** fractBits);
  return whole + Math.floor((whole * fract) / 2 ** fractBits);
}

/** hweight32: bits set in a 32-bit word. */
export function popcount32(v: number): number {
  let n = v >>> 0;
  n = n - ((n >>> 1) & 0x55555555);
  n = (n & 0x33333333) + ((n >>> 2) & 0x33333333);
  return (Math.imul((n + (n >>> 4)) & 0x0f0f0f0f, 0x01010101) >>> 24) & 0xff;
}

export class Congestion {
  /** The set's settings (the registry points this at them); off until then. */
  thresholds: CongestionThresholds = DEFAULT_CONGESTION_THRESHOLDS;
  private readonly clock: Clock;
  /** A random 32-bit word (get_random_u32), seeded in simulations. */
  private readonly random: () => number;
  /** c->congested: 0, or negative while slow I/O is remembered. */
  private counter = 0;
  /** c->congested_last_us: when the last slow I/O completed (clock microseconds). */
  private lastUs = 0;
  /** I/Os slower than their threshold, ever (for tests and /metrics). */
  slowIos = 0;

  constructor(clock: Clock, random: () => number) {
    this.clock = clock;
    this.random = random;
  }

  /**
   * The start time to pass to completed() for an I/O of this kind, or -1
   * when its threshold is 0 (then nothing is measured: no clock read).
   */
  start(write: boolean): number {
    const t = this.thresholds;
    return (write ? t.congestedWriteThresholdUs : t.congestedReadThresholdUs) === 0 ? -1 : this.clock.now();
  }

  /** An I/O started at `startMs` (from start()) completed, successfully or not. */
  completed(write: boolean, startMs: number): void {
    const threshold = write ? this.thresholds.congestedWriteThresholdUs : this.thresholds.congestedReadThresholdUs;
    if (startMs < 0 || threshold === 0) return;
    const nowUs = this.clock.now() * 1000;
    const us = nowUs - startMs * 1000;
    if (us > threshold) {
      this.slowIos++;
      this.lastUs = nowUs;
      const ms = Math.min(Math.floor(us / 1024), CONGESTED_MAX + this.counter);
      this.counter -= ms;
    } else if (this.counter < 0) {
      this.counter++;
    }
  }

  /** bch_get_congested(): 0 when not congested, else the sequential sectors past which I/O bypasses. */
  congested(): number {
    const t = this.thresholds;
    if (t.congestedReadThresholdUs === 0 && t.congestedWriteThresholdUs === 0) return 0;
    if (this.counter === 0) return 0;
    let i = Math.trunc((this.clock.now() * 1000 - this.lastUs) / 1024);
    if (i < 0) return 0;
    i += this.counter;
    if (i >= 0) return 0;
    i += CONGESTED_MAX;
    if (i > 0) i = fractExpTwo(i, 6);
    i -= popcount32(this.random());
    return i > 0 ? i : 1;
  }

  /** The counter (c->congested), for tests. */
  get count(): number {
    return this.counter;
  }
}
