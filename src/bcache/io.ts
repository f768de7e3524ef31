// Every I/O the engine does to its cache device goes through here (DESIGN
// rule 4): each call checks the set's ioDisabled flag first and fails fast
// once it is set, so teardown after a fatal error is never held up by new
// work. Offsets are in sectors, as everywhere in the engine.
//
// Flushes are numbered. A write that completed before flush N started is
// durable once flush N completes; `durableEpoch` is the highest completed
// flush, and a write remembers `nextFlushEpoch` at its completion to know
// which flush covers it. This is how a btree node write releases its journal
// pin only after a flush (R5) without the node waiting for one itself.

import { IoError, type BlockDevice } from '../blockdev/types.ts';
import { SECTOR_SIZE } from '../format/constants.ts';

export interface IoStats {
  metaSectorsWritten: number;
  sectorsWritten: number;
  sectorsRead: number;
  flushes: number;
  discards: number;
}

export class CacheIo {
  readonly dev: BlockDevice;
  private readonly isDisabled: () => boolean;
  private flushesStarted = 0;
  private flushedUpTo = 0;
  private readonly flushListeners: Array<(epoch: number) => void> = [];
  readonly stats: IoStats = { metaSectorsWritten: 0, sectorsWritten: 0, sectorsRead: 0, flushes: 0, discards: 0 };

  constructor(dev: BlockDevice, isDisabled: () => boolean) {
    this.dev = dev;
    this.isDisabled = isDisabled;
  }

  private check(what: string): void {
    if (this.isDisabled()) throw new IoError('EIO', `${this.dev.name}: ${what} refused: cache set I/O is disabled`);
  }

  /** The flush that will cover a write completing now. */
  get nextFlushEpoch(): number {
    return this.flushesStarted + 1;
  }

  get durableEpoch(): number {
    return this.flushedUpTo;
  }

  onFlushed(listener: (epoch: number) => void): void {
    this.flushListeners.push(listener);
  }

  async read(buf: Buffer, sector: number): Promise<void> {
    this.check('read');
    await this.dev.read(buf, sector * SECTOR_SIZE);
    this.stats.sectorsRead += buf.length / SECTOR_SIZE;
  }

  /** A data write (counted as such). */
  async write(buf: Buffer, sector: number): Promise<void> {
    this.check('write');
    await this.dev.write(buf, sector * SECTOR_SIZE);
    this.stats.sectorsWritten += buf.length / SECTOR_SIZE;
  }

  /** A metadata write: btree nodes, journal, prios, uuids, superblock. */
  async writeMeta(buf: Buffer, sector: number): Promise<void> {
    this.check('metadata write');
    await this.dev.write(buf, sector * SECTOR_SIZE);
    this.stats.metaSectorsWritten += buf.length / SECTOR_SIZE;
  }

  async flush(): Promise<void> {
    this.check('flush');
    const epoch = ++this.flushesStarted;
    await this.dev.flush();
    this.stats.flushes++;
    if (epoch > this.flushedUpTo) {
      this.flushedUpTo = epoch;
      for (const l of this.flushListeners) l(epoch);
    }
  }

  async discard(sector: number, sectors: number): Promise<void> {
    this.check('discard');
    await this.dev.discard(sector * SECTOR_SIZE, sectors * SECTOR_SIZE);
    this.stats.discards++;
  }
}
