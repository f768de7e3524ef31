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
//
// Error accounting (bch_count_io_errors, bcache.md §1.2 #7 and §1.3): every
// completed I/O ticks a counter; with an error_decay (io_error_halflife / 88)
// the error count is multiplied by 127/128 every error_decay I/Os, so old
// errors fade. Each error adds one; reaching io_error_limit (default 8: an
// error the host sees means the SSD could no longer remap, so it is dying)
// calls the cache set error path. A failed metadata write (journal, btree
// node, prios, uuids, superblock) or a failed flush is fatal at once: the
// set's on-disk state would no longer be what it believes. Errors after I/O
// was disabled are teardown noise and are not counted.
//
// Latency (bch_bbio_count_io_errors, congestion.ts): data reads and writes
// and btree node reads and writes are timed against the set's
// congested_*_threshold_us, as the kernel times the I/O it submits through
// bbios; journal, prio, uuid and superblock writes are not, as there.

import { IoError, type BlockDevice } from '../blockdev/types.ts';
import { SECTOR_SIZE } from '../format/constants.ts';
import { realClock, type Clock } from '../util/clock.ts';
import { errorMessage } from '../util/lifecycle.ts';
import { log } from '../util/log.ts';
import { Congestion } from './congestion.ts';

export interface IoStats {
  /** Every metadata write, btree nodes included. */
  metaSectorsWritten: number;
  /** Btree node writes (btree_written). */
  btreeSectorsWritten: number;
  sectorsWritten: number;
  sectorsRead: number;
  flushes: number;
  discards: number;
}

/** The set's error policy and its reaction, supplied by the cache set. */
export interface CacheIoErrorHooks {
  /** io_error_limit and io_error_halflife, read at each error (they are tunable at run time). */
  limits(): { limit: number; halflife: number };
  /** The metadata at `sector` (journal, prios, uuids, superblock), for messages; undefined elsewhere. */
  describe(sector: number): string | undefined;
  /** bch_cache_set_error(): the set must retire. */
  fatal(message: string): void;
}

/** Fractional precision of the decayed error count (IO_ERROR_SHIFT). */
const IO_ERROR_SHIFT = 20;
/** The name account() asks for only on a failure: readNow() accounts successes only. */
const readWhat = (): string => 'reading from cache';

export class CacheIo {
  readonly dev: BlockDevice;
  private readonly isDisabled: () => boolean;
  private hooks: CacheIoErrorHooks | undefined;
  /** Errors << IO_ERROR_SHIFT, decayed. */
  private errorsScaled = 0;
  private ioCount = 0;
  /**
   * Every cache device I/O error while I/O was enabled, fatal ones included,
   * never decayed: a counter for /metrics, where an operator alerts on its
   * increase (the decayed ioErrors drops back and can be missed between scrapes).
   */
  errorsTotal = 0;
  private flushesStarted = 0;
  private flushedUpTo = 0;
  /** The newest flush started, and its epoch (flushTo shares it). */
  private lastFlush: Promise<void> | undefined;
  private lastFlushEpoch = 0;
  private readonly flushListeners: Array<(epoch: number) => void> = [];
  readonly stats: IoStats = {
    metaSectorsWritten: 0,
    btreeSectorsWritten: 0,
    sectorsWritten: 0,
    sectorsRead: 0,
    flushes: 0,
    discards: 0,
  };
  /** How slow the device has been lately (the set's `congested`). */
  readonly congestion: Congestion;

  constructor(dev: BlockDevice, isDisabled: () => boolean, options: { clock?: Clock; random?: () => number } = {}) {
    this.dev = dev;
    this.isDisabled = isDisabled;
    this.congestion = new Congestion(
      options.clock ?? realClock,
      options.random ?? (() => Math.floor(Math.random() * 0x1_0000_0000)),
    );
  }

  /** Install the error policy (the cache set does, once its parts exist). */
  setErrorHooks(hooks: CacheIoErrorHooks): void {
    this.hooks = hooks;
  }

  /** The decayed error count (sysfs `errors` of the cache device). */
  get ioErrors(): number {
    return Math.floor(this.errorsScaled / (1 << IO_ERROR_SHIFT));
  }

  /** bch_count_io_errors() for one completed I/O. */
  private account(err: unknown, what: () => string, isRead: boolean): void {
    const hooks = this.hooks;
    if (!hooks) return;
    const { limit, halflife } = hooks.limits();
    const decay = Math.floor(halflife / 88);
    if (decay > 0) {
      this.ioCount++;
      while (this.ioCount > decay) {
        this.ioCount -= decay;
        // Multiply by 127/128: a half-life of about 88 refreshes.
        this.errorsScaled = Math.floor((this.errorsScaled * 127) / 128);
      }
    }
    if (err === undefined || this.isDisabled()) return;
    this.errorsScaled += 1 << IO_ERROR_SHIFT;
    const errors = this.ioErrors;
    if (errors >= limit) {
      hooks.fatal(`${this.dev.name}: too many IO errors ${what()}`);
      return;
    }
    // bch_count_io_errors(): reads are retried from the backing device, hence "recovering".
    log.error(`bcache: bch_count_io_errors() ${this.dev.name}: IO error on ${what()}${isRead ? ', recovering' : ''}.`);
  }

  /**
   * Run one I/O with its accounting; `fatal` errors retire the set whatever
   * the count. `what` names the I/O for messages; it is a function because
   * only a failure needs it (this is on every cache hit's path). `startMs`
   * is from congestion.start() for a timed I/O, -1 for an untimed one.
   */
  private counted(
    what: () => string,
    isRead: boolean,
    fatal: boolean,
    io: Promise<void>,
    startMs: number,
    onSuccess?: () => void,
  ): Promise<void> {
    return io.then(
      () => {
        if (startMs >= 0) this.congestion.completed(!isRead, startMs);
        this.account(undefined, what, isRead);
        onSuccess?.();
      },
      (err: unknown) => {
        if (startMs >= 0) this.congestion.completed(!isRead, startMs);
        if (!this.isDisabled()) this.errorsTotal++;
        if (fatal && !this.isDisabled() && this.hooks) {
          this.hooks.fatal(`${this.dev.name}: IO error ${what()}: ${errorMessage(err)}`);
        } else {
          this.account(err, what, isRead);
        }
        throw err;
      },
    );
  }

  private check(what: string): void {
    const refused = this.refusal(what);
    if (refused) throw refused;
  }

  private refusal(what: string): IoError | undefined {
    if (!this.isDisabled()) return undefined;
    return new IoError('EIO', `${this.dev.name}: ${what} refused: cache set I/O is disabled`);
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

  read(buf: Buffer, sector: number): Promise<void> {
    const refused = this.refusal('read');
    if (refused) return Promise.reject(refused);
    // Counted when issued: the sectors a failed read asked for are few and rare.
    this.stats.sectorsRead += buf.length / SECTOR_SIZE;
    const startMs = this.congestion.start(false);
    return this.counted(
      () => `reading ${this.hooks?.describe(sector) ?? 'from cache'}`,
      true,
      false,
      this.dev.read(buf, sector * SECTOR_SIZE),
      startMs,
    );
  }

  /**
   * read() without waiting, for the hit path: true when the device copied the
   * data here and now (counted as read() counts a success), false with
   * nothing counted when it could not (the caller then uses read()).
   */
  readNow(buf: Buffer, sector: number): boolean {
    const dev = this.dev;
    if (dev.readNow === undefined || this.isDisabled()) return false;
    const startMs = this.congestion.start(false);
    if (!dev.readNow(buf, sector * SECTOR_SIZE)) return false;
    this.stats.sectorsRead += buf.length / SECTOR_SIZE;
    if (startMs >= 0) this.congestion.completed(false, startMs);
    this.account(undefined, readWhat, true);
    return true;
  }

  /** A data write (counted as such). No async frame of its own: it is on every write's path. */
  write(buf: Buffer, sector: number): Promise<void> {
    const refused = this.refusal('write');
    if (refused) return Promise.reject(refused);
    const startMs = this.congestion.start(true);
    return this.counted(
      () => 'writing data to cache',
      false,
      false,
      this.dev.write(buf, sector * SECTOR_SIZE),
      startMs,
      () => {
        this.stats.sectorsWritten += buf.length / SECTOR_SIZE;
      },
    );
  }

  /** A metadata write: btree nodes, journal, prios, uuids, superblock. A failure retires the set. */
  async writeMeta(buf: Buffer, sector: number): Promise<void> {
    this.check('metadata write');
    // Only btree nodes are timed (the kernel's other metadata writes are not bbios).
    const btreeNode = this.hooks?.describe(sector) === undefined;
    const startMs = btreeNode ? this.congestion.start(true) : -1;
    await this.counted(
      () => `writing ${this.hooks?.describe(sector) ?? 'btree node'}`,
      false,
      true,
      this.dev.write(buf, sector * SECTOR_SIZE),
      startMs,
    );
    this.stats.metaSectorsWritten += buf.length / SECTOR_SIZE;
    if (btreeNode) this.stats.btreeSectorsWritten += buf.length / SECTOR_SIZE;
  }

  /** A cache flush; a failure retires the set (what it should have made durable may not be). */
  flush(): Promise<void> {
    const refused = this.refusal('flush');
    if (refused) return Promise.reject(refused);
    const epoch = ++this.flushesStarted;
    const p = this.flushAs(epoch);
    this.lastFlush = p;
    this.lastFlushEpoch = epoch;
    return p;
  }

  /**
   * Until `durableEpoch` reaches `epoch`: waits for the newest flush in
   * flight if it started late enough to cover it, else starts one (so that
   * appends to several leaves at once share a flush).
   */
  async flushTo(epoch: number): Promise<void> {
    while (this.flushedUpTo < epoch) {
      if (this.lastFlush && this.lastFlushEpoch >= epoch) await this.lastFlush;
      else await this.flush();
    }
  }

  private async flushAs(epoch: number): Promise<void> {
    await this.counted(() => 'flushing the cache device', false, true, this.dev.flush(), -1);
    this.stats.flushes++;
    if (epoch > this.flushedUpTo) {
      this.flushedUpTo = epoch;
      for (const l of this.flushListeners) l(epoch);
    }
  }

  async discard(sector: number, sectors: number): Promise<void> {
    this.check('discard');
    await this.counted(
      () => 'discarding',
      false,
      false,
      this.dev.discard(sector * SECTOR_SIZE, sectors * SECTOR_SIZE),
      -1,
    );
    this.stats.discards++;
  }
}
