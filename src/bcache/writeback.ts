// The writeback worker of one attached backing device (writeback.c
// bch_writeback_thread, refill_dirty, read_dirty, write_dirty_finish).
//
// One Worker per Attachment, started at attach. It takes one reference on
// the attachment when it starts and drops it when it exits, never on a
// clean/dirty transition (DESIGN rule 3; the seed bug of bcache.md §1.2 #4).
// It exits when stopped, when the set's I/O is disabled, or - detaching -
// once a full pass finds nothing dirty and the backing superblock says NONE.
//
// A pass (docs/engine.md §9):
//   1. refill: up to 500 dirty keys of this device from where the last pass
//      stopped, wrapping to the start once; "searched the full index" when the
//      wrapped scan got back to where it began. The scan runs under a
//      recording window of the collision tracker: a key overlapped by a write
//      that was in flight during the scan is left for the next pass.
//   2. copy groups of up to 5 contiguous keys (5000 sectors): read from the
//      cache, check the pointer is still current, write to the backing
//      device; at most 64 keys in flight; paced by writeback_rate
//      (sectors/s; bch_next_delay), which the PI controller of
//      writeback-rate.ts updates, unless detaching or writeback_percent is 0.
//   3. flush the backing device (R6), then mark each copied key clean by a
//      compare-and-insert of its clean copy (replace); a key overwritten
//      meanwhile is not (writeback_keys_failed).
//   4. nothing dirty after a full pass: the superblock CLEAN; detaching:
//      NONE with a zero set uuid, and exit. Otherwise, after a full pass,
//      sleep writeback_delay seconds (not when detaching).
//
// Under pressure (ubcache's departure from the kernel): once the set's
// in_use reaches WRITEBACK_PRESSURE_IN_USE, writes are close to the cutoff
// past which they go around the cache, and the kernel's PI controller, which
// aims at writeback_percent dirty data a little at a time, lets a densely
// written cache sit there for minutes (its fragmentation term only acts on
// buckets sparsely dirty). So under pressure writeback is not paced and does
// not sleep writeback_delay: the cache frees buckets as fast as the backing
// device takes the copies, and writes keep landing in it. Dirty data past
// the controller's target also ends the writeback_delay sleep early (the
// kernel sleeps it out, however much piles up meanwhile).
//
// Also under pressure, a pass takes whole buckets, those with the least
// dirty data first (about 16 MiB of it), instead of the next keys in LBA
// order: after random writes every bucket holds keys from all over the
// device, so an LBA-ordered sweep empties no bucket until it has nearly
// finished, and writes go around the cache meanwhile (measured over a 5 ms
// NBD device: seconds at a time at a third of the device's own speed). A
// bucket whose last dirty key is cleaned is reclaimable at once, so room
// comes back as writeback goes. The backing flush and the clean inserts of
// such a pass overlap the next pass's copies (`tail`; the next pass picks
// other buckets); everything else about a pass is as above.
//
// Writes and writeback: a write that overlaps a key queued in this pass
// takes it out of the pass (bch_keybuf_check_overlapping); a write that goes
// to the backing device and overlaps a key whose copy is in flight waits for
// that copy to land first, so the older data can never land over it.

import { ioBuffers } from '../util/buffer-pool.ts';
import { cloneKey, type Bkey, type BkeyPtr } from '../format/bkey.ts';
import {
  BDEV_STATE_DIRTY,
  BDEV_STATE_MASK,
  BDEV_STATE_NONE,
  BDEV_STATE_SHIFT,
  SECTOR_SIZE,
} from '../format/constants.ts';
import { setFlagBits, type Superblock } from '../format/superblock.ts';
import { defined } from '../util/assert.ts';
import { aborted, errorMessage, nextTurn, Notifier, sleep, Worker, type RefCount } from '../util/lifecycle.ts';
import { log } from '../util/log.ts';
import type { BackingIo } from './backing.ts';
import type { CacheSet } from './cache-set.ts';
import { CUTOFF_WRITEBACK_SYNC } from './cutoffs.ts';
import type { CollisionTracker } from './tracker.ts';
import {
  defaultRateSettings,
  rateInputs,
  targetSectors,
  type RateAttachment,
  type RateHost,
  type RateLimiter,
  type RateSettings,
  writebackThrottled,
  WritebackRateUpdate,
} from './writeback-rate.ts';

/** KEYBUF_NR */
const KEYBUF_NR = 500;
/**
 * Under pressure: the dirty data a pass aims at (16 MiB), in sectors. A pass
 * ends with a flush of the backing device and starts with one of the
 * cache's, tens of ms on a remote device: over KEYBUF_NR 4 KiB keys those
 * waits would cost as much as the copies themselves.
 */
const KEYBUF_SECTORS_PRESSURE = 32768;
/** Keys a part of the by-bucket scan visits before the event loop gets a turn. */
const SCAN_PART_KEYS = 8192;

/** MAX_WRITEBACKS_IN_PASS */
const MAX_GROUP_KEYS = 5;
/** MAX_WRITESIZE_IN_PASS */
const MAX_GROUP_SECTORS = 5000;
/** The in_flight semaphore of read_dirty. */
const MAX_IN_FLIGHT = 64;
/**
 * Under pressure: copies in flight. A backing device far away (an NBD export
 * with 5 ms of latency) writes as many at once as it is given, and 64 at a
 * time caps writeback at about 12,000 4 KiB keys a second there.
 */
const MAX_IN_FLIGHT_PRESSURE = 256;
/**
 * in_use (percent) from which writeback runs unpaced: 10 below
 * CUTOFF_WRITEBACK_SYNC, past which writes stop landing in the cache.
 */
export const WRITEBACK_PRESSURE_IN_USE = CUTOFF_WRITEBACK_SYNC - 10;

type KeyState = 'queued' | 'started' | 'copied' | 'failed' | 'skipped';

interface WbKey {
  key: Bkey;
  start: number;
  end: number;
  state: KeyState;
  io: Promise<void> | undefined;
}

export { RateLimiter } from './writeback-rate.ts';

/** Writeback's tunables, the controller's included: part of a backing device's settings. */
export interface WritebackSettings extends RateSettings {
  writebackRunning: boolean;
  /** Seconds to sleep after a full writeback pass. */
  writebackDelay: number;
  writebackMetadata: boolean;
}

/** The kernel's defaults (bch_cached_dev_writeback_init). */
export function defaultWritebackSettings(): WritebackSettings {
  return {
    ...defaultRateSettings(),
    writebackRunning: true,
    writebackDelay: 30,
    writebackMetadata: true,
  };
}

/**
 * What the writeback worker needs of its backing device (CachedDev is one):
 * the controller's view, the backing device's I/O, its superblock state and
 * the request path's collision tracker (writes in flight over a key).
 */
export interface WritebackHost extends RateHost {
  readonly settings: WritebackSettings;
  readonly backingIo: BackingIo;
  /** The BDEV_STATE the backing superblock says. */
  readonly state: number;
  readonly request: { readonly tracker: CollisionTracker };
  /** Superblock CLEAN once nothing of `att` is dirty (false: a dirty write began meanwhile). */
  markClean(att: { readonly cs: CacheSet; readonly inode: number }): Promise<boolean>;
  /** Change the backing superblock and write it. */
  updateSuperblock(change: (sb: Superblock) => void): Promise<void>;
}

/** What it needs of the attachment it writes back for (CachedDev's Attachment is one). */
export interface WritebackAttachment extends RateAttachment {
  /** The worker holds one reference for its whole life. */
  readonly ref: RefCount;
  readonly detaching: boolean;
  /** Set by the worker once a detach's last pass found nothing dirty and the superblock says NONE. */
  detachComplete: boolean;
}

export interface WritebackStats {
  /** Keys marked clean (writeback_keys_done, per device; the set sums them). */
  keysDone: number;
  /** Keys copied but overwritten meanwhile, or that failed (writeback_keys_failed). */
  keysFailed: number;
  sectorsWritten: number;
  passes: number;
}

export class Writeback {
  private readonly dev: WritebackHost;
  private readonly att: WritebackAttachment;
  private worker: Worker | undefined;
  /** Dirty data appeared, a setting changed, detach began. */
  private readonly wakeup: Notifier;
  /** Cuts the writeback_delay sleep short: detach, settings, stop. */
  private readonly kick: Notifier;
  /** In the writeback_delay sleep: the dirty sectors (the controller's target) past which it ends. */
  private delayingUntilDirty: number | undefined;
  private keybuf: WbKey[] = [];
  private lastScanned = 0;
  /** The buckets the keybuf was chosen from (a pass by bucket under pressure), else undefined. */
  private passBuckets: Uint8Array | undefined;
  /** The end of the last pass by bucket (flush, clean inserts), still running, and its buckets. */
  private tail: { done: Promise<void>; buckets: Uint8Array } | undefined;
  /** The rate controller's update: runs within this worker's life (writeback-rate.ts). */
  readonly rateUpdate: WritebackRateUpdate;
  private idleWaiters: Array<() => void> = [];
  readonly stats: WritebackStats = { keysDone: 0, keysFailed: 0, sectorsWritten: 0, passes: 0 };

  constructor(dev: WritebackHost, att: WritebackAttachment) {
    this.dev = dev;
    this.att = att;
    this.wakeup = new Notifier(dev.clock);
    this.kick = new Notifier(dev.clock);
    this.rateUpdate = new WritebackRateUpdate(dev, att);
  }

  get running(): boolean {
    return this.worker?.state === 'running';
  }

  /** Start the worker; it holds a reference on the attachment until it exits. */
  start(): void {
    if (this.worker) return;
    if (!this.att.ref.tryGet()) return;
    this.worker = new Worker(`bcache_writeback ${this.dev.name}`, (signal) => this.run(signal), {
      stopTimeoutMs: 60_000,
      clock: this.dev.clock,
      onExit: () => {
        this.keybuf = [];
        for (const w of this.idleWaiters.splice(0)) w();
        this.att.ref.put();
      },
    }).start();
  }

  /** Stop the worker, and with it the rate update, and wait for both (idempotent). */
  async stop(): Promise<void> {
    await this.worker?.stop();
    // The body stops the rate update as it ends; should the worker have been
    // given up on past its stop bound, stop it here all the same.
    await this.rateUpdate.stop();
  }

  /**
   * Resolves the next time the worker has nothing dirty left to write (the
   * superblock CLEAN) and waits for work, or when it exits.
   */
  whenIdle(): Promise<void> {
    if (this.worker?.state !== 'running') return Promise.resolve();
    return new Promise((resolve) => {
      this.idleWaiters.push(resolve);
      this.wakeup.notify();
    });
  }

  /** bch_writeback_queue(): dirty data or a state change; also ends the writeback_delay sleep. */
  wake(): void {
    this.wakeup.notify();
    this.kick.notify();
  }

  /** Dirty data was added (bch_writeback_add). */
  dirtied(): void {
    // With writeback off the worker would only go back to sleep; turning it on wakes it.
    if (!this.dev.settings.writebackRunning && !this.att.detaching) return;
    this.wakeup.notify();
    // A writeback_delay sleep ends early once dirty data is past the target or the cache is under pressure.
    const t = this.delayingUntilDirty;
    if (t !== undefined && (this.underPressure() || this.att.cs.dirtySectors(this.att.inode) > t)) {
      this.delayingUntilDirty = undefined;
      this.kick.notify();
    }
  }

  /** The set is close to the cutoff past which writes go around the cache. */
  private underPressure(): boolean {
    return this.att.cs.inUse >= WRITEBACK_PRESSURE_IN_USE;
  }

  /**
   * A write is about to touch [start, end) (called right after it became
   * active in the collision tracker): queued keys over it leave this pass;
   * returns the copies in flight over it, which a write to the backing
   * device must wait for.
   */
  overlapping(start: number, end: number): Promise<void>[] | undefined {
    // The keybuf is in LBA order and its keys do not overlap (they are the
    // tree's): a binary search finds the first that ends after `start`. This
    // runs for every write, against up to KEYBUF_NR keys.
    const keys = this.keybuf;
    let lo = 0;
    let hi = keys.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if ((keys[mid] as WbKey).end <= start) lo = mid + 1;
      else hi = mid;
    }
    let waits: Promise<void>[] | undefined;
    for (let i = lo; i < keys.length; i++) {
      const k = keys[i] as WbKey;
      if (k.start >= end) break;
      if (k.state === 'queued') k.state = 'skipped';
      else if (k.state === 'started' && k.io) (waits ??= []).push(k.io);
    }
    return waits;
  }

  private hasDirty(): boolean {
    return this.att.cs.dirtySectors(this.att.inode) > 0 || this.dev.state === BDEV_STATE_DIRTY;
  }

  private get limiter(): RateLimiter {
    return this.dev.writebackRateState.limiter;
  }

  /**
   * The rate update lives inside this worker's life: started with it, and
   * stopped (awaited) before it ends however it ends, so it is covered by
   * this worker's reference on the attachment.
   */
  private async run(signal: AbortSignal): Promise<void> {
    this.limiter.reset(this.dev.clock.now());
    this.rateUpdate.start();
    try {
      await this.loop(signal);
    } finally {
      await this.rateUpdate.stop();
    }
  }

  private async loop(signal: AbortSignal): Promise<void> {
    try {
      await this.passes(signal);
    } finally {
      // Nothing of this worker runs after it: a pipelined pass end included.
      await this.settleTail();
    }
  }

  private async passes(signal: AbortSignal): Promise<void> {
    const att = this.att;
    const cs = att.cs;
    while (!signal.aborted && !cs.ioDisabled && !cs.stopped) {
      if (!att.detaching && (!this.hasDirty() || !this.dev.settings.writebackRunning)) {
        if (!this.hasDirty()) for (const w of this.idleWaiters.splice(0)) w();
        await this.wakeup.wait(signal);
        continue;
      }
      const r = await this.refill();
      if (aborted(signal)) break;
      if (r.full && r.found === 0) {
        if (await this.dev.markClean(att)) {
          if (att.set.gcAfterWritebackDue && att.set.settings.gcAfterWriteback === 1) {
            att.set.gcAfterWritebackDue = false;
            cs.triggerGc();
          }
          if (att.detaching) {
            await this.dev.updateSuperblock((sb) => {
              sb.setUuid = Buffer.alloc(16);
              sb.flags = setFlagBits(sb.flags, BDEV_STATE_SHIFT, BDEV_STATE_MASK, BDEV_STATE_NONE);
            });
            att.detachComplete = true;
            break;
          }
          continue;
        }
      }
      if (this.keybuf.length === 0) {
        // Dirty writes still landing, or every key found is under a write in
        // flight: let them finish, then look again.
        await sleep(1, signal, this.dev.clock);
        continue;
      }
      try {
        await this.writeKeys(signal, this.passBuckets);
      } catch (err) {
        if (!aborted(signal)) log.error(`${this.dev.name}: writeback: ${errorMessage(err)}`);
        this.keybuf = [];
        if (!(await sleep(1000, signal, this.dev.clock))) break;
        continue;
      }
      this.keybuf = [];
      this.stats.passes++;
      if (r.full && !att.detaching && !this.underPressure()) {
        // bch_writeback_thread's writeback_delay after a full pass, cut short (dirtied()) by dirty
        // data past the controller's target or by pressure.
        this.delayingUntilDirty = targetSectors(rateInputs(this.dev, att, this.dev.clock.now()));
        try {
          await this.kick.wait(signal, this.dev.settings.writebackDelay * 1000);
        } finally {
          this.delayingUntilDirty = undefined;
        }
        this.limiter.reset(this.dev.clock.now());
      }
    }
  }

  /** refill_dirty(): the next batch of dirty keys into the keybuf. */
  private async refill(): Promise<{ found: number; full: boolean }> {
    const att = this.att;
    const cs = att.cs;
    const tracker = this.dev.request.tracker;
    const win = tracker.openWindow(0, Number.MAX_SAFE_INTEGER, true);
    let keys: Bkey[] | undefined;
    let full = false;
    try {
      this.passBuckets = undefined;
      if (this.underPressure()) keys = await this.scanEmptiestBuckets();
      if (keys === undefined) {
        // The pipelined end of a pass by bucket first: its keys would be found again.
        await this.settleTail();
        const from = this.lastScanned;
        keys = await cs.scanDirty(att.inode, from, KEYBUF_NR);
        if (keys.length < KEYBUF_NR) {
          // Reached the end: scan again from the start, only up to where we began.
          const more = from > 0 ? await cs.scanDirty(att.inode, 0, KEYBUF_NR - keys.length, from + 1) : [];
          keys = keys.concat(more.filter((k) => k.offset <= from));
          full = keys.length < KEYBUF_NR;
          this.lastScanned = full ? 0 : (keys[keys.length - 1]?.offset ?? 0);
        } else {
          this.lastScanned = keys[keys.length - 1]?.offset ?? 0;
        }
      }
    } finally {
      tracker.closeWindow(win);
    }
    keys.sort((a, b) => a.offset - b.offset);
    this.keybuf = [];
    for (const key of keys) {
      const start = key.offset - key.size;
      if (win.overlapsHit(start, key.offset)) continue;
      this.keybuf.push({ key, start, end: key.offset, state: 'queued', io: undefined });
    }
    return { found: keys.length, full };
  }

  /**
   * Under pressure: the dirty keys of this device in the buckets with the
   * least dirty data, about KEYBUF_SECTORS_PRESSURE of it (a 256th of the
   * cache if that is more), in LBA order; or
   * undefined when no bucket qualifies (the LBA-ordered pass runs instead).
   * Writing back in LBA order empties no bucket until a sweep of all the
   * dirty data is nearly done when writes were random, so in_use stays
   * past the cutoff, and writes go around the cache, for seconds at a time;
   * a bucket whose dirty sectors all went back is reclaimable at once
   * (CacheSet's bucket dirty counts), so this order gives the room back as
   * writeback goes. Buckets that are pinned (open for writes, being moved)
   * are left out.
   */
  private async scanEmptiestBuckets(): Promise<Bkey[] | undefined> {
    const cs = this.att.cs;
    const b = cs.buckets;
    // The last pass's buckets are still dirty until its clean inserts end.
    const finishing = this.tail?.buckets;
    const eligible = (i: number, d: number): boolean =>
      d > 0 && (b.pin[i] ?? 0) === 0 && (finishing === undefined || finishing[i] !== 1);
    // Each pass walks all the device's keys: on a large cache it takes a
    // larger share (1/256 of the cache) so the walk stays a small part of it.
    const budget = Math.max(KEYBUF_SECTORS_PRESSURE, Math.floor((b.nbuckets * b.bucketSize) / 256));
    // A histogram of dirty sectors over the candidate buckets gives the
    // threshold below which the budget is reached, in two linear passes.
    const counts = new Uint32Array(b.bucketSize + 1);
    let candidates = 0;
    for (let i = b.firstBucket; i < b.nbuckets; i++) {
      const d = b.dirty[i] ?? 0;
      if (!eligible(i, d)) continue;
      const at = Math.min(d, b.bucketSize);
      counts[at] = (counts[at] ?? 0) + 1;
      candidates++;
    }
    if (candidates === 0) return undefined;
    // Every bucket below `threshold` dirty sectors, and `atThreshold` of those
    // with exactly that many, make up the budget.
    let threshold = 0;
    let below = 0;
    for (;;) {
      threshold++;
      const here = threshold * (counts[threshold] ?? 0);
      if (threshold >= b.bucketSize || below + here >= budget) break;
      below += here;
    }
    let atThreshold = Math.ceil((budget - below) / threshold);
    const chosen = new Uint8Array(b.nbuckets);
    for (let i = b.firstBucket; i < b.nbuckets; i++) {
      const d = b.dirty[i] ?? 0;
      if (d > threshold || !eligible(i, d)) continue;
      if (d === threshold) {
        if (atThreshold === 0) continue;
        atThreshold--;
      }
      chosen[i] = 1;
    }
    const want = (p: BkeyPtr): boolean => chosen[b.bucketOf(p)] === 1;
    const keys: Bkey[] = [];
    let from = 0;
    do {
      const part = await cs.scanDirtyWhere(this.att.inode, from, want, SCAN_PART_KEYS);
      for (const k of part.keys) keys.push(k);
      from = part.next;
      if (from >= 0) await nextTurn();
    } while (from >= 0);
    if (keys.length === 0) return undefined;
    this.passBuckets = chosen;
    return keys;
  }

  /**
   * read_dirty() and write_dirty_finish() for the keybuf. With `buckets` (a
   * pass by bucket under pressure), the finish is left running as `tail`.
   */
  private async writeKeys(signal: AbortSignal, buckets: Uint8Array | undefined): Promise<void> {
    const att = this.att;
    const keys = this.keybuf;
    let inFlight = 0;
    const maxInFlight = this.underPressure() ? MAX_IN_FLIGHT_PRESSURE : MAX_IN_FLIGHT;
    let slot: (() => void) | undefined;
    const ios: Promise<void>[] = [];
    // A dirty key goes to the backing device only once the key is durable.
    // Otherwise a power cut can lose the key and keep the backing write: the
    // clean key the write had replaced comes back and serves the old data
    // over a backing device holding the new, until it is evicted and the new
    // data appears without anyone writing it (the simulator, seed 106).
    if (keys.length > 0) await att.cs.makeDirtyDurable(keys.map((k) => k.key));
    let i = 0;
    while (i < keys.length && !signal.aborted) {
      // A group: up to 5 contiguous keys, at most 5000 sectors.
      const group: WbKey[] = [];
      let sectors = 0;
      while (i < keys.length && group.length < MAX_GROUP_KEYS) {
        const k = defined(keys[i], 'i < keys.length');
        const prev = group[group.length - 1];
        if (prev && (k.start !== prev.end || sectors + (k.end - k.start) > MAX_GROUP_SECTORS)) break;
        group.push(k);
        sectors += k.end - k.start;
        i++;
      }
      for (const k of group) {
        while (inFlight >= maxInFlight) {
          await new Promise<void>((resolve) => (slot = resolve));
        }
        if (k.state !== 'queued') continue;
        k.state = 'started';
        inFlight++;
        const io = this.copy(k).finally(() => {
          inFlight--;
          const s = slot;
          slot = undefined;
          s?.();
        });
        k.io = io;
        ios.push(io);
      }
      if (writebackThrottled(att.detaching, this.dev.settings.writebackPercent) && !this.underPressure()) {
        const ms = this.limiter.delay(sectors, this.dev.settings.writebackRate, this.dev.clock.now());
        if (ms > 0) await this.kick.wait(signal, ms);
      }
    }
    await Promise.all(ios);
    const copied = keys.filter((k) => k.state === 'copied');
    if (copied.length === 0 || aborted(signal)) return;
    if (buckets === undefined) {
      await this.finishPass(copied);
      return;
    }
    // Pipelined: the flush and the clean inserts go on while the next pass
    // copies (its buckets are others: scanEmptiestBuckets leaves these out).
    await this.settleTail();
    const done = this.finishPass(copied).catch((err: unknown) => {
      if (!aborted(signal)) log.error(`${this.dev.name}: writeback: ${errorMessage(err)}`);
    });
    this.tail = { done, buckets };
  }

  /** write_dirty_finish() for a pass's copied keys: flush, then mark each clean. */
  private async finishPass(copied: WbKey[]): Promise<void> {
    // R6: the copies are durable on the backing device before their keys say clean.
    await this.dev.backingIo.flush();
    for (const k of copied) {
      const clean = cloneKey(k.key);
      clean.dirty = false;
      try {
        // Data already in the cache: not counted towards GC (InsertOptions.countForGc in btree.ts).
        const r = await this.att.cs.insert([clean], { replace: k.key, countForGc: false });
        if (r.collisions > 0 || r.sectors < k.key.size) this.stats.keysFailed++;
        else this.stats.keysDone++;
      } catch (err) {
        this.stats.keysFailed++;
        throw err;
      }
    }
  }

  /** Until the pipelined end of the last pass (if any) has finished. Never rejects. */
  private async settleTail(): Promise<void> {
    const t = this.tail;
    if (!t) return;
    await t.done;
    if (this.tail === t) this.tail = undefined;
  }

  /** One key: cache -> backing device. Never rejects; the key's state says how it went. */
  private async copy(k: WbKey): Promise<void> {
    const cs = this.att.cs;
    const p = k.key.ptrs[0];
    if (!p) {
      k.state = 'failed';
      return;
    }
    // A fresh 4 KiB Buffer per key cost more than the copy (allocation and GC); pooled.
    const buf = ioBuffers.acquire((k.end - k.start) * SECTOR_SIZE);
    // Back to the pool only when no I/O on it failed: a request that failed (a
    // timeout) may still sit in a device's queue and touch the buffer later.
    let settled = false;
    try {
      await cs.readCache(buf, p.offset);
      // The bucket was reused under us: the key was overwritten; nothing to copy.
      if (cs.ptrStale(p)) {
        settled = true;
        k.state = 'failed';
        this.stats.keysFailed++;
        return;
      }
      await this.dev.backingIo.write(buf, k.start);
      settled = true;
      this.stats.sectorsWritten += k.end - k.start;
      k.state = 'copied';
    } catch (err) {
      k.state = 'failed';
      this.stats.keysFailed++;
      log.warn(`${this.dev.name}: writeback of ${k.start}+${k.end - k.start}: ${errorMessage(err)}`);
    } finally {
      if (settled) ioBuffers.release(buf);
    }
  }
}
