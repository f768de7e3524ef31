// CrashableBlockDevice: a disk with a volatile write cache, for power-cut tests.
// It proves the durability contract (DESIGN.md): after a power cut, everything
// covered by a completed flush or FUA reads back exactly, and everything else
// reads as its old or its new content, sector by sector, never garbage.
//
// State: a durable image, plus the writes (and zeroes and discards) since the
// last flush, in order. Reads see the newest data. flush() makes them all
// durable; a FUA write makes that write durable (and only it). A power cut
// decides, from a seed, the fate of each volatile write independently: kept,
// dropped, or torn, where each 512-byte sector of it is separately old or new
// (the part of a write inside one sector is atomic, as on real disks). The
// writes that survive are applied in their original order, so an older write
// can never land over a newer one, and a FUA write is never undone by an older
// cached write to the same sector.
//
// powerCut() kills this device (every later call fails, as for a machine with
// no power) and returns a fresh device over the post-crash image: the code
// under test must restart on it, exactly as it would after a real crash, and it
// cannot keep writing to the old one by mistake.

import { rejectWith } from '../util/lifecycle.ts';
import { Prng } from '../util/prng.ts';
import { MemoryBlockDevice } from './memory.ts';
import {
  IoError,
  type BlockDevice,
  type BlockDeviceCaps,
  type Extent,
  type WriteOptions,
  type ZeroOptions,
} from './types.ts';

const SECTOR = 512;

interface VolatileWrite {
  offset: number;
  length: number;
  /** A private copy of the data, or null for zeroes (write-zeroes and discard). */
  data: Buffer | null;
  /** FUA: durable the moment it completed; survives every power cut whole. */
  fua: boolean;
}

/**
 * What a power cut does to the volatile writes: `random` decides each write's
 * fate from the seed (kept, dropped or torn, a third each); `keep` and `drop`
 * are the two extremes, for tests that want them.
 */
export type CrashPolicy = 'random' | 'keep' | 'drop';

export interface PowerCutOptions {
  policy?: CrashPolicy;
}

export interface CrashableOptions {
  name?: string;
  logicalBlockSize?: number;
}

function settle<T>(fn: () => T): Promise<T> {
  try {
    return Promise.resolve(fn());
  } catch (err) {
    return rejectWith(err);
  }
}

export class CrashableBlockDevice implements BlockDevice {
  readonly name: string;
  readonly size: number;
  readonly logicalBlockSize: number;
  readonly readOnly = false;
  readonly caps: BlockDeviceCaps = { discard: true, fastZero: true, blockStatus: true, rotational: false };
  /** What survives any power cut. */
  private durable: MemoryBlockDevice;
  /** The durable image with every volatile write applied: what reads see. */
  private readonly current: MemoryBlockDevice;
  private volatile: VolatileWrite[] = [];
  private poweredOff = false;
  private closed = false;

  /** A device of `size` zero bytes, or one whose durable contents are a copy of `image`. */
  constructor(sizeOrImage: number | MemoryBlockDevice, options: CrashableOptions = {}) {
    const image =
      typeof sizeOrImage === 'number'
        ? new MemoryBlockDevice(sizeOrImage, { logicalBlockSize: options.logicalBlockSize ?? 512 })
        : sizeOrImage.clone({ readOnly: false });
    this.size = image.size;
    this.logicalBlockSize = options.logicalBlockSize ?? image.logicalBlockSize;
    this.name = options.name ?? `crashable:${this.size}`;
    this.durable = image;
    this.current = image.clone();
  }

  /** Writes, zeroes and discards not yet made durable. */
  get volatileWrites(): number {
    return this.volatile.length;
  }

  /** Why the device cannot be used, if it cannot. */
  private dead(): IoError | undefined {
    if (this.poweredOff)
      return new IoError('EIO', `${this.name}: the device lost power; use the device powerCut() returned`);
    if (this.closed) return new IoError('ESHUTDOWN', `${this.name}: device is closed`);
    return undefined;
  }

  private live(): void {
    const err = this.dead();
    if (err) throw err;
  }

  read(buf: Buffer, offset: number): Promise<void> {
    return settle(() => {
      this.live();
      this.current.readSync(buf, offset);
    });
  }

  write(buf: Buffer, offset: number, options?: WriteOptions): Promise<void> {
    return settle(() => {
      this.live();
      this.current.writeSync(buf, offset);
      this.record({ offset, length: buf.length, data: Buffer.from(buf), fua: options?.fua === true });
    });
  }

  flush(): Promise<void> {
    return settle(() => {
      this.live();
      for (const w of this.volatile) apply(this.durable, w, 0, w.length);
      this.volatile = [];
    });
  }

  discard(offset: number, length: number): Promise<void> {
    return settle(() => {
      this.live();
      this.current.zeroSync(offset, length, true);
      this.record({ offset, length, data: null, fua: false });
    });
  }

  writeZeroes(offset: number, length: number, options?: ZeroOptions): Promise<void> {
    return settle(() => {
      this.live();
      this.current.zeroSync(offset, length, options?.noHole !== true);
      this.record({ offset, length, data: null, fua: options?.fua === true });
    });
  }

  blockStatus(offset: number, length: number): Promise<Extent[]> {
    const err = this.dead();
    return err ? Promise.reject(err) : this.current.blockStatus(offset, length);
  }

  close(): Promise<void> {
    this.closed = true;
    return Promise.resolve();
  }

  private record(w: VolatileWrite): void {
    if (w.length > 0) this.volatile.push(w);
  }

  /** Read what is durable now, ignoring the volatile writes (for tests). */
  readDurable(buf: Buffer, offset: number): void {
    this.durable.readSync(buf, offset);
  }

  /**
   * The durable image a power cut now would leave, for `seed`; the same seed
   * (and the same history) gives the same image. This device is not changed.
   */
  crashImage(seed: number, options: PowerCutOptions = {}): MemoryBlockDevice {
    const policy = options.policy ?? 'random';
    const rng = new Prng(seed);
    const image = this.durable.clone({ name: `${this.name} after power cut (seed ${seed})` });
    for (const w of this.volatile) {
      if (w.fua) {
        apply(image, w, 0, w.length);
        continue;
      }
      const fate = policy === 'keep' ? 0 : policy === 'drop' ? 1 : rng.below(3);
      if (fate === 0) apply(image, w, 0, w.length);
      else if (fate === 2) {
        // Torn: each sector-sized piece (cut at absolute sector boundaries) independently old or new.
        let pos = w.offset;
        const end = w.offset + w.length;
        while (pos < end) {
          const next = Math.min(end, (Math.floor(pos / SECTOR) + 1) * SECTOR);
          if (rng.bool()) apply(image, w, pos - w.offset, next - pos);
          pos = next;
        }
      }
    }
    return image;
  }

  /**
   * Cut the power: this device fails every later call with EIO, and a fresh
   * device over the post-crash image (see crashImage) is returned.
   */
  powerCut(seed: number, options: PowerCutOptions = {}): CrashableBlockDevice {
    const image = this.crashImage(seed, options);
    this.poweredOff = true;
    this.volatile = [];
    return new CrashableBlockDevice(image, { name: this.name, logicalBlockSize: this.logicalBlockSize });
  }
}

/** Apply bytes [from, from+length) of a volatile write to `dev`. */
function apply(dev: MemoryBlockDevice, w: VolatileWrite, from: number, length: number): void {
  if (w.data === null) dev.zeroSync(w.offset + from, length, false);
  else dev.writeSync(w.data.subarray(from, from + length), w.offset + from);
}
