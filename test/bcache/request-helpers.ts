// Helpers for the request-path, writeback and registry tests: backing
// devices formatted as make-bcache -B does, a registered cache + backing pair,
// and a device wrapper that makes I/O complete out of order.

import { randomBytes } from 'node:crypto';
import { MemoryBlockDevice } from '../../src/blockdev/memory.ts';
import type { BlockDevice, BlockDeviceCaps, Extent, WriteOptions, ZeroOptions } from '../../src/blockdev/types.ts';
import { SB_OFFSET } from '../../src/format/constants.ts';
import { encodeSuperblock, newBackingSuperblock, type Superblock } from '../../src/format/superblock.ts';
import { Registry, type RegisteredSet, type RegistryOptions } from '../../src/bcache/registry.ts';
import type { CachedDev, CachedDevSettings } from '../../src/bcache/cached-dev.ts';
import { Prng } from '../../src/util/prng.ts';
import { formatCache, type FormatOptions } from './helpers.ts';

export const MiB = 1024 * 1024;

export interface BackingFormat {
  setUuid?: Buffer;
  dataOffset?: number;
  blockSize?: number;
  writeback?: boolean;
  uuid?: Buffer;
}

/** Write a backing superblock (make-bcache -B) on `dev`. */
export async function formatBacking(dev: BlockDevice, o: BackingFormat = {}): Promise<Superblock> {
  const sb = newBackingSuperblock({
    uuid: o.uuid ?? randomBytes(16),
    setUuid: o.setUuid ?? randomBytes(16),
    blockSize: o.blockSize ?? 8,
    bucketSize: 1024,
    dataOffset: o.dataOffset ?? 16,
    writeback: o.writeback ?? false,
  });
  await dev.write(encodeSuperblock(sb), SB_OFFSET);
  await dev.flush();
  return sb;
}

export interface PairOptions {
  cacheBytes?: number;
  backingBytes?: number;
  cache?: FormatOptions;
  backing?: BackingFormat;
  settings?: Partial<CachedDevSettings>;
  registry?: RegistryOptions;
  /** Devices to use instead of fresh memory devices (already formatted unless `format`). */
  cacheDev?: BlockDevice;
  backingDev?: BlockDevice;
  format?: boolean;
}

export interface Pair {
  registry: Registry;
  set: RegisteredSet;
  dev: CachedDev;
  cacheDev: BlockDevice;
  backingDev: BlockDevice;
  setUuid: Buffer;
}

/** A cache set and one backing device attached to it, registered in that order. */
export async function makePair(o: PairOptions = {}): Promise<Pair> {
  const setUuid = o.cache?.setUuid ?? o.backing?.setUuid ?? randomBytes(16);
  const cacheDev = o.cacheDev ?? new MemoryBlockDevice(o.cacheBytes ?? 48 * MiB, { name: 'cache' });
  const backingDev = o.backingDev ?? new MemoryBlockDevice(o.backingBytes ?? 16 * MiB, { name: 'backing' });
  if (o.format !== false) {
    await formatCache(cacheDev, { bucketSize: 128, blockSize: 8, ...o.cache, setUuid });
    await formatBacking(backingDev, { ...o.backing, setUuid });
  }
  const registry = new Registry({
    setOptions: { journalDelayMs: 5, ...o.registry?.setOptions },
    // writeback_percent 0: writeback unthrottled, whatever the controller would set.
    deviceSettings: () => ({ writebackDelay: 0, writebackPercent: 0, ...o.settings }),
    ...(o.registry?.now ? { now: o.registry.now } : {}),
    ...(o.registry?.clock ? { clock: o.registry.clock } : {}),
  });
  const c = await registry.register(cacheDev);
  const b = await registry.register(backingDev);
  if (c.kind !== 'cache' || b.kind !== 'backing') throw new Error('makePair: wrong device kinds');
  return { registry, set: c.set, dev: b.dev, cacheDev, backingDev, setUuid };
}

/** `sectors` sectors whose bytes say (tag, sector), so misplaced data shows. */
export function pattern(tag: number, sector: number, sectors: number): Buffer {
  const buf = Buffer.alloc(sectors * 512);
  for (let s = 0; s < sectors; s++) {
    const text = `<${tag}:${sector + s}>`;
    buf.write(text.repeat(Math.ceil(512 / text.length)).slice(0, 512), s * 512, 'latin1');
  }
  return buf;
}

/**
 * A device whose operations complete after a seeded random number of event
 * loop turns, so that concurrent requests finish in any order (the memory
 * device completes everything at once). Order of effects is the order the
 * inner device receives them in.
 */
export class JitterDevice implements BlockDevice {
  readonly inner: BlockDevice;
  private readonly rng: Prng;
  private readonly maxTurns: number;
  readonly name: string;
  readonly size: number;
  readonly logicalBlockSize: number;
  readonly readOnly: boolean;
  readonly caps: BlockDeviceCaps;

  constructor(inner: BlockDevice, seed: number, maxTurns = 3) {
    this.inner = inner;
    this.rng = new Prng(seed);
    this.maxTurns = maxTurns;
    this.name = inner.name;
    this.size = inner.size;
    this.logicalBlockSize = inner.logicalBlockSize;
    this.readOnly = inner.readOnly;
    this.caps = inner.caps;
  }

  private async delay(): Promise<void> {
    const n = this.rng.below(this.maxTurns + 1);
    for (let i = 0; i < n; i++) await new Promise<void>((resolve) => setImmediate(resolve));
  }

  async read(buf: Buffer, offset: number): Promise<void> {
    await this.delay();
    await this.inner.read(buf, offset);
  }
  async write(buf: Buffer, offset: number, options?: WriteOptions): Promise<void> {
    await this.delay();
    await this.inner.write(buf, offset, options);
    await this.delay();
  }
  async flush(): Promise<void> {
    await this.delay();
    await this.inner.flush();
  }
  async discard(offset: number, length: number): Promise<void> {
    await this.delay();
    await this.inner.discard(offset, length);
  }
  async writeZeroes(offset: number, length: number, options?: ZeroOptions): Promise<void> {
    await this.delay();
    await this.inner.writeZeroes(offset, length, options);
  }
  blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.inner.blockStatus(offset, length);
  }
  close(): Promise<void> {
    return this.inner.close();
  }
}

/** The memory device under a test's device (for synchronous peeks at its bytes). */
export function mem(dev: BlockDevice): MemoryBlockDevice {
  if (dev instanceof MemoryBlockDevice) return dev;
  if (dev instanceof JitterDevice) return mem(dev.inner);
  throw new Error(`${dev.name} is not a memory device`);
}
