// Every I/O a cached device does to its backing device goes through here
// (the counterpart of bcache/io.ts for the cache device). Offsets are in
// sectors of the backing device (key space: the data offset is included).
//
// Flushes are numbered, as on the cache device: a write that completed
// before flush N started is durable once flush N completed. The request path
// needs this for one rule (docs/engine.md §2, R8): a *clean* key says "the
// cache holds what the backing device holds", so it must not become durable
// before the backing data it copies is. Writes that completed and are not yet
// known durable are remembered per 1 MiB chunk with the epoch of the flush
// that will cover them; a miss fill or a writethrough copy over such a chunk
// waits for that flush before its key goes into the index.
//
// Every completion, failed or not, is reported to the owner (backing_request_endio,
// 2018 series #11): the cached device counts the errors (io_errors against
// io_error_limit) and watches for a device that went away.

import { IoError, type BlockDevice, type ZeroOptions } from '../blockdev/types.ts';
import { SECTOR_SIZE } from '../format/constants.ts';

const CHUNK_SHIFT = 11;

export class BackingIo {
  readonly dev: BlockDevice;
  private flushesStarted = 0;
  private flushedUpTo = 0;
  /** chunk -> epoch of the flush that makes its latest completed write durable. */
  private readonly volatile = new Map<number, number>();
  private readonly listeners: Array<(epoch: number) => void> = [];
  readonly stats = { sectorsRead: 0, sectorsWritten: 0, flushes: 0 };

  private readonly done: (err: IoError | undefined) => void;

  constructor(dev: BlockDevice, done: (err: IoError | undefined) => void = () => undefined) {
    this.dev = dev;
    this.done = done;
  }

  /** Run one I/O and report how it ended. */
  private async io(op: () => Promise<void>): Promise<void> {
    try {
      await op();
    } catch (err) {
      this.done(err instanceof IoError ? err : new IoError('EIO', String(err)));
      throw err;
    }
    this.done(undefined);
  }

  get durableEpoch(): number {
    return this.flushedUpTo;
  }

  /** The flush that will cover a write completing now. */
  get nextFlushEpoch(): number {
    return this.flushesStarted + 1;
  }

  /** Called after every completed flush with its epoch. */
  onFlushed(listener: (epoch: number) => void): void {
    this.listeners.push(listener);
  }

  private markVolatile(sector: number, sectors: number): void {
    if (sectors <= 0) return;
    const epoch = this.flushesStarted + 1;
    const last = (sector + sectors - 1) >> CHUNK_SHIFT;
    for (let c = sector >> CHUNK_SHIFT; c <= last; c++) this.volatile.set(c, epoch);
  }

  /**
   * The flush epoch that must complete before data read now from
   * [start, end) is known durable on the backing device (0: it already is).
   */
  epochFor(start: number, end: number): number {
    if (this.volatile.size === 0) return 0;
    let need = 0;
    const last = (end - 1) >> CHUNK_SHIFT;
    for (let c = start >> CHUNK_SHIFT; c <= last; c++) {
      const e = this.volatile.get(c);
      if (e !== undefined && e > need) need = e;
    }
    return need > this.flushedUpTo ? need : 0;
  }

  async read(buf: Buffer, sector: number): Promise<void> {
    await this.io(() => this.dev.read(buf, sector * SECTOR_SIZE));
    this.stats.sectorsRead += buf.length / SECTOR_SIZE;
  }

  async write(buf: Buffer, sector: number, fua = false): Promise<void> {
    await this.io(() => this.dev.write(buf, sector * SECTOR_SIZE, fua ? { fua: true } : undefined));
    this.stats.sectorsWritten += buf.length / SECTOR_SIZE;
    if (!fua) this.markVolatile(sector, buf.length / SECTOR_SIZE);
  }

  async discard(sector: number, sectors: number): Promise<void> {
    await this.io(() => this.dev.discard(sector * SECTOR_SIZE, sectors * SECTOR_SIZE));
    this.markVolatile(sector, sectors);
  }

  async writeZeroes(sector: number, sectors: number, options: ZeroOptions = {}): Promise<void> {
    await this.io(() => this.dev.writeZeroes(sector * SECTOR_SIZE, sectors * SECTOR_SIZE, options));
    if (options.fua !== true) this.markVolatile(sector, sectors);
  }

  async flush(): Promise<void> {
    const epoch = ++this.flushesStarted;
    await this.io(() => this.dev.flush());
    this.stats.flushes++;
    if (epoch <= this.flushedUpTo) return;
    this.flushedUpTo = epoch;
    for (const [c, e] of this.volatile) if (e <= epoch) this.volatile.delete(c);
    for (const l of this.listeners) l(epoch);
  }
}
