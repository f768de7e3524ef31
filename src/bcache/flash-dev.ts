// A flash-only volume (super.c flash_dev_run, request.c flash_dev_submit_bio):
// a thin volume that lives only in the cache set. Its uuid slot has
// UUID_FLASH_ONLY and its size in `sectors`; the slot index is the inode of
// its keys, as for a backing device.
//
// I/O, as the kernel's: a write is a writeback-mode data insert (keys dirty,
// buckets GC_MARK_DIRTY, journaled) that is never written back, since there
// is nothing behind it; a read looks the range up, hits come from the cache
// and a miss reads as zeroes (flash_dev_cache_miss); a discard invalidates
// the range's keys (bypass = true: zero-pointer keys), so their buckets can
// be reclaimed; an empty flush is a journal commit (flash_dev_nodata).
// Requests must be whole cache blocks, as the kernel's volume has the
// cache's block size as its logical block size.
//
// Lifecycle: stop() (the set's stop, or serve's shutdown) refuses new
// requests, waits for those in flight (within a bound) and leaves the slot as
// it is, so the volume comes back when the set registers again
// (flash_devs_run). unregister() deletes it: the kernel invalidates the slot
// (bcache_device_detach with DETACHING); ubcache first invalidates the
// volume's keys too, so that its dirty buckets are freed at once rather than
// held by keys nobody can reach (the kernel leaves them for good; the result
// on disk is valid bcache either way).

import { IoError, type BlockDevice, type BlockDeviceCaps, type Extent, type ZeroOptions } from '../blockdev/types.ts';
import { makeKey, type Bkey } from '../format/bkey.ts';
import { SECTOR_SIZE } from '../format/constants.ts';
import { isFlashOnly, type UuidEntry } from '../format/uuid.ts';
import { formatUuid } from '../format/uuid-text.ts';
import { deferred, errorMessage, type Deferred } from '../util/lifecycle.ts';
import { settledWithin } from '../util/deadline.ts';
import { log } from '../util/log.ts';
import type { CacheSet, LookupSegment, SectorAllocation } from './cache-set.ts';

/** Attempts to read a hit whose bucket is reused under the read (as request.ts). */
const READ_RACE_RETRIES = 4;
/** Zeroes written at a time for write-zeroes with NO_HOLE. */
const ZERO_CHUNK_BYTES = 1024 * 1024;

export interface FlashDevOptions {
  /** N of bcacheN (the registry's numbering, shared with backing devices). */
  index: number;
  /** Bound on stop()'s wait for requests in flight (ms). */
  stopTimeoutMs?: number;
  /** The volume finished stopping, however stop() was called: the registry forgets it. */
  onStopped?: (dev: FlashDev) => void;
}

/** One flash-only volume of a running cache set. */
export class FlashDev {
  readonly cs: CacheSet;
  /** The uuid slot: the inode of the volume's keys (d->id; `volume<inode>` in the set's directory). */
  readonly inode: number;
  readonly index: number;
  /** bcacheN */
  readonly name: string;
  readonly device: FlashVolume;
  private readonly stopTimeoutMs: number;
  private readonly onStopped: ((dev: FlashDev) => void) | undefined;
  private inflight = 0;
  private drained: Deferred<void> | undefined;
  private closing = false;
  private stopPromise: Promise<void> | undefined;
  /** Reads that found their hit's bucket reused under them and looked again. */
  cacheReadRaces = 0;

  constructor(cs: CacheSet, inode: number, options: FlashDevOptions) {
    const e = cs.uuids.get(inode);
    if (!isFlashOnly(e)) throw new Error(`uuid slot ${inode} of cache set ${cs.uuid} is not a flash-only volume`);
    this.cs = cs;
    this.inode = inode;
    this.index = options.index;
    this.name = `bcache${options.index}`;
    this.stopTimeoutMs = options.stopTimeoutMs ?? 20_000;
    this.onStopped = options.onStopped;
    this.device = new FlashVolume(this);
  }

  private get entry(): UuidEntry {
    return this.cs.uuids.get(this.inode);
  }

  /** The volume's uuid (its slot's), canonical text. */
  get uuid(): string {
    return formatUuid(this.entry.uuid);
  }

  /** Size in sectors (the slot's `sectors`). */
  get sectors(): number {
    return this.entry.sectors;
  }

  /** The label as the slot holds it (32 bytes, NUL padded). */
  get label(): Buffer {
    return this.entry.label;
  }

  /** Sectors the volume holds in the cache (all of them dirty). */
  get dirtySectors(): number {
    return this.cs.dirtySectors(this.inode);
  }

  get stopped(): boolean {
    return this.stopPromise !== undefined;
  }

  get running(): boolean {
    return !this.stopped;
  }

  /** The cache's block size in bytes: the volume's logical block size. */
  get blockBytes(): number {
    return this.cs.blockSize * SECTOR_SIZE;
  }

  // ---------------------------------------------------------------------------
  // Attributes (sysfs.c bch_flash_dev: size, label)

  /** `size` store: the slot's sectors (bytes >> 9), written with the uuid table. */
  async setSize(bytes: number): Promise<void> {
    const sectors = Math.floor(bytes / SECTOR_SIZE);
    this.entry.sectors = sectors;
    await this.cs.writeUuids();
  }

  /** `label` store: the first 32 bytes written (the kernel copies SB_LABEL_SIZE bytes of the buffer). */
  async setLabel(text: string): Promise<void> {
    const label = Buffer.alloc(32);
    Buffer.from(text).copy(label, 0, 0, 32);
    this.entry.label = label;
    await this.cs.writeUuids();
  }

  // ---------------------------------------------------------------------------
  // Requests

  private enter(): void {
    if (this.closing) throw new IoError('ESHUTDOWN', `${this.name}: the volume is stopping`);
    if (this.cs.ioDisabled) throw new IoError('EIO', `${this.name}: its cache set is disabled`);
    this.inflight++;
  }

  private leave(): void {
    this.inflight--;
    if (this.inflight === 0 && this.drained) this.drained.resolve();
  }

  /** Byte range to sectors, whole cache blocks inside the volume (EINVAL otherwise). */
  private range(offset: number, length: number): { start: number; end: number } {
    const problem = this.rangeProblem(offset, length);
    if (problem !== undefined) throw new IoError('EINVAL', problem);
    return { start: offset / SECTOR_SIZE, end: (offset + length) / SECTOR_SIZE };
  }

  /** Why a byte range is not whole cache blocks inside the volume, or undefined if it is (range, readNow). */
  private rangeProblem(offset: number, length: number): string | undefined {
    const bs = this.blockBytes;
    if (
      !Number.isSafeInteger(offset) ||
      !Number.isSafeInteger(length) ||
      offset < 0 ||
      length < 0 ||
      offset % bs !== 0 ||
      length % bs !== 0
    ) {
      return `${this.name}: offset ${offset} and length ${length} must be multiples of ${bs}`;
    }
    if (offset + length > this.sectors * SECTOR_SIZE) {
      return `${this.name}: ${offset}+${length} is past the end of the volume (${this.sectors * SECTOR_SIZE} bytes)`;
    }
    return undefined;
  }

  private async run<T>(op: () => Promise<T>): Promise<T> {
    this.enter();
    try {
      return await op();
    } finally {
      this.leave();
    }
  }

  /** cache_lookup with flash_dev_cache_miss: hits from the cache, the rest zeroes. */
  async read(buf: Buffer, offset: number): Promise<void> {
    const { start, end } = this.range(offset, buf.length);
    await this.run(async () => {
      if (start === end) return;
      const segs = await this.cs.lookup(this.inode, start, end);
      await Promise.all(
        segs.map((s) =>
          this.readSegment(buf.subarray((s.start - start) * SECTOR_SIZE, (s.end - start) * SECTOR_SIZE), s, 0),
        ),
      );
    });
  }

  /**
   * read() for the common hit, done here and now: one cached extent covers
   * the range and its data is in the page cache. True when `buf` holds the
   * data; false (nothing done but the lookup's touch of the bucket's prio,
   * which read() does again) when that does not hold, and the caller uses
   * read(). A range with a hole in it (zeroes) is left to read() too.
   */
  readNow(buf: Buffer, offset: number): boolean {
    const length = buf.length;
    if (this.closing || this.cs.ioDisabled || length === 0 || this.rangeProblem(offset, length) !== undefined) {
      return false;
    }
    const start = offset / SECTOR_SIZE;
    const hit = this.cs.lookupOneNow(this.inode, start, start + length / SECTOR_SIZE);
    // Nothing runs between the lookup and the copy, so the bucket cannot be
    // reused under it (readSegment's race); checked all the same.
    return hit !== undefined && this.cs.readCacheNow(buf, hit.sector) && !this.cs.isStale(hit.bucket, hit.gen);
  }

  private async readSegment(sub: Buffer, s: LookupSegment, tries: number): Promise<void> {
    const hit = s.hit;
    if (!hit) {
      sub.fill(0);
      return;
    }
    await this.cs.readCache(sub, hit.sector);
    if (!this.cs.isStale(hit.bucket, hit.gen)) return;
    // The bucket was reused under the read (the key was overwritten and GC freed it): look again.
    this.cacheReadRaces++;
    if (tries >= READ_RACE_RETRIES) {
      throw new IoError('EIO', `${this.name}: sectors ${s.start}-${s.end} keep moving under reads`);
    }
    const again = await this.cs.lookup(this.inode, s.start, s.end);
    await Promise.all(
      again.map((t) =>
        this.readSegment(
          sub.subarray((t.start - s.start) * SECTOR_SIZE, (t.end - s.start) * SECTOR_SIZE),
          t,
          tries + 1,
        ),
      ),
    );
  }

  /** bch_data_insert with writeback = true: the data in the cache under dirty keys, journaled. */
  async write(buf: Buffer, offset: number, fua: boolean): Promise<void> {
    const { start, end } = this.range(offset, buf.length);
    await this.run(async () => {
      if (start === end) {
        if (fua) await this.cs.flush();
        return;
      }
      await this.insertData(buf, start, end, fua);
    });
  }

  private async insertData(data: Buffer, start: number, end: number, fua: boolean): Promise<void> {
    const cs = this.cs;
    const allocs: SectorAllocation[] = [];
    const keys: Bkey[] = [];
    const writes: Promise<void>[] = [];
    try {
      let off = start;
      while (off < end) {
        const want = {
          inode: this.inode,
          offset: off,
          sectors: end - off,
          writePoint: this.inode,
          flash: true,
          dirty: true,
          wait: true,
        };
        const a = cs.allocSectorsNow(want) ?? (await cs.allocSectors(want));
        if (!a) throw new IoError('ENOSPC', `${this.name}: no space left in cache set ${cs.uuid}`);
        allocs.push(a);
        const from = (off - start) * SECTOR_SIZE;
        writes.push(cs.writeCache(data.subarray(from, from + a.sectors * SECTOR_SIZE), a.ptr.offset));
        keys.push(makeKey(this.inode, off + a.sectors, a.sectors, true, [a.ptr]));
        off += a.sectors;
      }
      const results = await Promise.allSettled(writes);
      for (const r of results) if (r.status === 'rejected') throw r.reason;
      await cs.insert(keys, { journal: true, fua });
    } finally {
      if (!cs.stopped) for (const a of allocs) cs.putAllocation(a);
    }
  }

  /** A discard is a bypassed insert: the range's keys invalidated (bch_data_invalidate). */
  async discard(offset: number, length: number): Promise<void> {
    const { start, end } = this.range(offset, length);
    await this.run(async () => {
      if (start === end) return;
      await this.cs.invalidate(this.inode, start, end);
    });
  }

  /**
   * NBD WRITE_ZEROES (no kernel counterpart: the kernel's volume has no
   * write-zeroes). A hole reads as zeroes, so the range is invalidated; with
   * NO_HOLE zeroes are written as data.
   */
  async writeZeroes(offset: number, length: number, options: ZeroOptions = {}): Promise<void> {
    const { start, end } = this.range(offset, length);
    await this.run(async () => {
      if (start === end) return;
      if (options.noHole !== true) {
        await this.cs.invalidate(this.inode, start, end, { fua: options.fua === true });
        return;
      }
      if (options.fastOnly === true) {
        throw new IoError('ENOTSUP', `${this.name}: zeroes that must stay allocated (NO_HOLE) are written, not fast`);
      }
      const chunk = Math.floor(ZERO_CHUNK_BYTES / SECTOR_SIZE);
      const zeroes = Buffer.alloc(Math.min(end - start, chunk) * SECTOR_SIZE);
      for (let s = start; s < end; s += chunk) {
        const e = Math.min(end, s + chunk);
        await this.insertData(zeroes.subarray(0, (e - s) * SECTOR_SIZE), s, e, options.fua === true);
      }
    });
  }

  /** flash_dev_nodata: a journal commit. */
  flush(): Promise<void> {
    return this.run(() => this.cs.flush());
  }

  /** Data where the volume has keys, holes (reading as zeroes) elsewhere. */
  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    const { start, end } = this.range(offset, length);
    return await this.run(async () => {
      if (start === end) return [];
      const segs = await this.cs.lookup(this.inode, start, end);
      const out: Extent[] = [];
      for (const s of segs) {
        const hole = s.hit === null;
        const len = (s.end - s.start) * SECTOR_SIZE;
        const last = out[out.length - 1];
        if (last && last.hole === hole) last.length += len;
        else out.push({ length: len, hole, zero: hole });
      }
      return out;
    });
  }

  // ---------------------------------------------------------------------------
  // Stop and unregister

  /**
   * Stop the volume (bcache_device_stop .. flash_dev_free) without deleting
   * it: new requests fail, those in flight finish (within the bound; past it
   * they are left to fail with the set). Idempotent, never rejects.
   */
  stop(): Promise<void> {
    this.stopPromise ??= this.shutdown().finally(() => {
      log.info(`bcache: bcache_device_free() ${this.name} stopped`);
      this.onStopped?.(this);
    });
    return this.stopPromise;
  }

  private async shutdown(): Promise<void> {
    this.closing = true;
    if (this.inflight === 0) return;
    this.drained = deferred();
    if (!(await settledWithin(this.drained.promise, this.stopTimeoutMs, this.cs.clock))) {
      log.warn(
        `${this.name}: ${this.inflight} request(s) still in flight after ${this.stopTimeoutMs} ms; stopping without them`,
      );
    }
  }

  /**
   * `unregister`: delete the volume. It stops, its keys are invalidated (its
   * space comes back), and its slot is marked invalid (UUID_FLASH_ONLY
   * cleared, the invalid uuid, `invalidated` now) and written.
   */
  async unregister(now: number): Promise<void> {
    await this.stop();
    const cs = this.cs;
    if (cs.stopped || cs.ioDisabled) return;
    try {
      const sectors = this.sectors;
      if (sectors > 0) await cs.invalidate(this.inode, 0, sectors, { fua: true });
      await this.invalidateBeyond(sectors);
      const e = this.entry;
      e.flags &= ~1;
      cs.uuids.invalidate(this.inode, now);
      await cs.writeUuids();
      log.info(`bcache: flash volume ${this.name} (slot ${this.inode} of cache set ${cs.uuid}) deleted`);
    } catch (err) {
      log.error(`${this.name}: deleting the volume: ${errorMessage(err)}`);
      throw err;
    }
  }

  /** Keys past the current size (written before a shrink) go too. */
  private async invalidateBeyond(sectors: number): Promise<void> {
    for (;;) {
      const keys = await this.cs.scanDirty(this.inode, sectors, 256);
      const past = keys.filter((k) => k.inode === this.inode && k.offset > sectors);
      if (past.length === 0) return;
      for (const k of past) {
        const from = Math.max(sectors, k.offset - k.size);
        await this.cs.invalidate(this.inode, from, k.offset, { fua: true });
      }
    }
  }
}

/**
 * /dev/bcacheN of a flash volume as a BlockDevice (what serve exports).
 * close() stops the volume.
 */
export class FlashVolume implements BlockDevice {
  private readonly dev: FlashDev;
  readonly name: string;
  readonly logicalBlockSize: number;
  readonly readOnly = false;
  readonly caps: BlockDeviceCaps = { discard: true, fastZero: true, blockStatus: true, rotational: false };

  constructor(dev: FlashDev) {
    this.dev = dev;
    this.name = dev.name;
    this.logicalBlockSize = dev.blockBytes;
  }

  get flashDev(): FlashDev {
    return this.dev;
  }

  /**
   * The size when asked (a `size` store changes it; an NBD export keeps the
   * size it was added with), in whole cache blocks: a partial last block
   * cannot be reached with block-sized I/O, as on the kernel's /dev/bcacheN.
   */
  get size(): number {
    const bs = this.logicalBlockSize;
    return Math.floor((this.dev.sectors * SECTOR_SIZE) / bs) * bs;
  }

  read(buf: Buffer, offset: number): Promise<void> {
    return this.dev.read(buf, offset);
  }

  readNow(buf: Buffer, offset: number): boolean {
    return this.dev.readNow(buf, offset);
  }

  write(buf: Buffer, offset: number, options?: { fua?: boolean }): Promise<void> {
    return this.dev.write(buf, offset, options?.fua === true);
  }

  flush(): Promise<void> {
    return this.dev.flush();
  }

  discard(offset: number, length: number): Promise<void> {
    return this.dev.discard(offset, length);
  }

  writeZeroes(offset: number, length: number, options?: ZeroOptions): Promise<void> {
    return this.dev.writeZeroes(offset, length, options ?? {});
  }

  blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.dev.blockStatus(offset, length);
  }

  close(): Promise<void> {
    return this.dev.stop();
  }
}
