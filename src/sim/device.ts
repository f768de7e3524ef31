// A simulated device for the simulator (docs/simulation.md): every operation
// of the device below completes after a latency drawn from the run's seed, on
// the SimClock, so operations in flight together complete (and take effect)
// in an order the seed chose, not the order they were issued. The device below
// is a CrashableBlockDevice, whose unflushed writes a power cut keeps, drops or
// tears. Every operation goes into the run's trace, and a device can be
// fenced: an engine that was stopped must never touch its devices again, so
// any operation on a fenced device is a lifecycle violation.

import {
  IoError,
  type BlockDevice,
  type BlockDeviceCaps,
  type Extent,
  type WriteOptions,
  type ZeroOptions,
} from '../blockdev/types.ts';
import type { SimClock } from '../util/clock.ts';
import { Prng } from '../util/prng.ts';

export interface SimDeviceEnv {
  readonly clock: SimClock;
  /** Append one event to the run's trace. */
  trace(event: string): void;
  /** A lifecycle violation was seen (reported by the driver after the step). */
  violation(message: string): void;
}

export interface LatencyProfile {
  /** Typical latency of a read or write (ms of simulated time). */
  baseMs: number;
  /** Extra latency drawn uniformly in [0, jitterMs): this is what reorders operations. */
  jitterMs: number;
  /** Latency of a flush. */
  flushMs: number;
  /** Now and then an operation is this much slower (a stall), with probability 1/stallEvery. */
  stallMs: number;
  stallEvery: number;
}

export class SimDevice implements BlockDevice {
  readonly inner: BlockDevice;
  private readonly env: SimDeviceEnv;
  private readonly rng: Prng;
  private readonly lat: LatencyProfile;
  readonly name: string;
  /** Operations issued (a progress and liveness measure). */
  ops = 0;
  /** Operations in flight, by their trace id. */
  readonly inflight = new Map<number, string>();
  private fencedBy: string | undefined;
  /** Injected faults: each operation of these kinds fails (EIO) with this probability, from the seed. */
  private faults: { rate: number; kinds: ReadonlySet<string> } | undefined;
  /** Operations failed on purpose. */
  injected = 0;
  /** Simulated time of the first of them since the last injectFaults(). */
  firstInjectedAt: number | undefined;

  constructor(inner: BlockDevice, env: SimDeviceEnv, seed: number, latency: LatencyProfile) {
    this.inner = inner;
    this.env = env;
    this.rng = new Prng(seed);
    this.lat = latency;
    this.name = inner.name;
  }

  get size(): number {
    return this.inner.size;
  }
  get logicalBlockSize(): number {
    return this.inner.logicalBlockSize;
  }
  get readOnly(): boolean {
    return this.inner.readOnly;
  }
  get caps(): BlockDeviceCaps {
    return this.inner.caps;
  }

  /** From now on every operation is a violation: `why` says whose stop promised that. */
  fence(why: string): void {
    this.fencedBy = why;
  }

  /**
   * From now on fail each operation whose kind (read, write, flush, discard,
   * zero, status) is in `kinds` with probability `rate` (1: the device is
   * pulled). The operation does not reach the device below. Faults last for
   * this device's life: a bring-up makes new SimDevices, without them.
   */
  injectFaults(rate: number, kinds: readonly string[]): void {
    this.faults = { rate, kinds: new Set(kinds) };
    // Counted per episode: an earlier episode's first error says nothing of this one's.
    this.firstInjectedAt = undefined;
    this.env.trace(`${this.name} faults ${rate} ${kinds.join('/')}`);
  }

  private latency(base: number): number {
    let ms = base + this.rng.below(Math.max(1, this.lat.jitterMs));
    if (this.lat.stallEvery > 0 && this.rng.below(this.lat.stallEvery) === 0) ms += this.lat.stallMs;
    return ms;
  }

  /** Wait the drawn latency, then do `op` on the device below: the effect lands at completion time. */
  private async io<T>(what: string, base: number, op: () => Promise<T>): Promise<T> {
    if (this.fencedBy !== undefined) this.env.violation(`${this.name}: ${what} after ${this.fencedBy}`);
    const id = this.ops++;
    const ms = this.latency(base);
    this.env.trace(`${this.name} #${id} ${what} +${ms}`);
    this.inflight.set(id, what);
    try {
      await this.env.clock.sleep(ms);
      const f = this.faults;
      // Drawn only while faults are on, so that a run without them draws as it always did.
      if (f && f.kinds.has(what.split(' ')[0] ?? '') && (f.rate >= 1 || this.rng.below(1000) < f.rate * 1000)) {
        this.injected++;
        this.firstInjectedAt ??= this.env.clock.now();
        throw new IoError('EIO', `${this.name}: injected I/O error (${what})`);
      }
      const r = await op();
      this.env.trace(`${this.name} #${id} done`);
      return r;
    } catch (err) {
      this.env.trace(`${this.name} #${id} failed`);
      throw err;
    } finally {
      this.inflight.delete(id);
    }
  }

  read(buf: Buffer, offset: number): Promise<void> {
    return this.io(`read ${offset}+${buf.length}`, this.lat.baseMs, () => this.inner.read(buf, offset));
  }

  write(buf: Buffer, offset: number, options?: WriteOptions): Promise<void> {
    const fua = options?.fua === true;
    // No copy: the data is taken at completion time, so an engine that reused
    // a buffer before its write completed would write the wrong data and be caught.
    return this.io(`write ${offset}+${buf.length}${fua ? ' fua' : ''}`, this.lat.baseMs, () =>
      this.inner.write(buf, offset, options),
    );
  }

  flush(): Promise<void> {
    return this.io('flush', this.lat.flushMs, () => this.inner.flush());
  }

  discard(offset: number, length: number): Promise<void> {
    return this.io(`discard ${offset}+${length}`, this.lat.baseMs, () => this.inner.discard(offset, length));
  }

  writeZeroes(offset: number, length: number, options?: ZeroOptions): Promise<void> {
    return this.io(`zero ${offset}+${length}`, this.lat.baseMs, () => this.inner.writeZeroes(offset, length, options));
  }

  blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.io(`status ${offset}+${length}`, 0, () => this.inner.blockStatus(offset, length));
  }

  close(): Promise<void> {
    // Closing is the owner's last act, not I/O: no latency, and allowed on a fenced device.
    this.env.trace(`${this.name} close`);
    return this.inner.close();
  }
}
