// A BlockDevice over a regular file or a block device: the hot path of every
// byte ubcache moves.
//
// I/O that cannot be done inline goes to the process's I/O engine
// (io-engine.ts): io_uring when the kernel and the addon have it (many
// requests in flight, completions on the event loop), else libuv's thread
// pool. Every transfer is positional, so concurrent operations never share a
// file offset, and the engine continues partial transfers.
//
// Two fast paths skip the engine: reads first try preadv2(RWF_NOWAIT), which
// copies from the page cache or refuses with EAGAIN without blocking (cheaper
// than any round trip, io_uring's included); small writes may be done inline
// while inline writes stay fast (see writeInline; whether they are depends on
// the engine, see INLINE_WRITES). Both fall back to the engine. Inline writes
// are gathered until a microtask queued by the first of them runs, and written
// in runs, one pwritev for writes that follow each other on the device (see
// writeGathered): the allocator places a device's writes back to back in its
// open bucket, so the 32 writes a client sends at once cost a couple of
// syscalls instead of 32.
//
// Durability: buffered I/O plus fdatasync. flush() coalesces: callers that
// arrive while an fdatasync runs cannot be covered by it (their writes may have
// completed after it started), so they share the next one. A failed fdatasync
// is sticky: Linux may have dropped the dirty pages it could not write and a
// later fdatasync can succeed without them, so no later flush may claim
// durability.
//
// Lifetime: every operation is counted while it uses the fd, and close() waits
// for the count to drain before closing it. Closing an fd an operation still
// uses would be worse than a crash: the number is reused by the next open and
// the late I/O lands in another file.

import * as fs from 'node:fs';
import { stat } from 'node:fs/promises';
import { deferred, type Deferred } from '../util/lifecycle.ts';
import { log } from '../util/log.ts';
import { ioEngine, type IoEngine, type IoEngineName } from './io-engine.ts';
import {
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_PUNCH_HOLE,
  FALLOC_FL_ZERO_RANGE,
  LOCK_EX,
  LOCK_NB,
  LOCK_SH,
  SEEK_DATA,
  SEEK_HOLE,
  isUnsupported,
  loadNative,
  type NativeOps,
} from './native.ts';
import { blockQueueInfo, filesystemRotational } from './sysfs.ts';
import {
  checkRange,
  IoError,
  type BlockDevice,
  type BlockDeviceCaps,
  type Extent,
  type IoErrorCode,
  type WriteOptions,
  type ZeroOptions,
} from './types.ts';

export interface FileOpenOptions {
  readOnly?: boolean;
  /**
   * Claim the device: a block device is opened with O_EXCL, so nothing else
   * (a mount, the kernel's bcache, another ubcache) can claim it; a regular
   * file, which has no exclusive open, gets an advisory flock(LOCK_EX) that
   * another ubcache honours (the lock goes with the fd, also on kill -9).
   * Without the native addon a file cannot be locked: a warning says so.
   */
  exclusive?: boolean;
  /** The native addon to use; null runs on the portable fallbacks. Default: loadNative(). */
  native?: NativeOps | null;
  /**
   * An inline write slower than this (ms) sends writes to the engine for a
   * second. Default 2; -1 never inlines. Without this option, whether small
   * writes are inlined at all depends on the engine (INLINE_WRITES).
   */
  inlineWriteSlowMs?: number;
  /** The I/O engine; default: the process's (ioEngine()). */
  engine?: IoEngine;
}

/** Opening failed; `code` is the errno name (ENOENT, EACCES, EBUSY, ...) or EINVAL for an unusable kind of file. */
export class DeviceOpenError extends Error {
  readonly code: string;
  readonly path: string;
  constructor(code: string, path: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'DeviceOpenError';
    this.code = code;
    this.path = path;
  }
}

/**
 * The largest read served synchronously from the page cache: a 1 MiB copy is
 * ~100 us of the event loop, the most a single request should take from the
 * other connections.
 */
const NOWAIT_MAX = 1024 * 1024;
const EAGAIN = 11;

/** Writes up to this size may be done inline (see writeInline). */
const INLINE_WRITE_MAX = 1024 * 1024;
/**
 * Whether small writes are done inline by default, per engine. Measured
 * (docs/io-engine.md, 4 KiB random writes at QD32): with io_uring, ring
 * writes to an ext4 file go through an io-wq thread (ext4 has no
 * non-blocking buffered writes) and cost ~24 us of CPU per write against
 * ~17 us inline; `ubcache serve` in writeback mode, CPU-bound, did 21k IOPS
 * with ring writes and 25k inline, and `ubcache export` 45-68k against
 * 57-68k. (Under heavy load from other processes the export order flipped:
 * inline writes were preempted past their slow mark and backed off.) Through
 * the thread pool the hop costs more still. UBCACHE_INLINE_WRITES=0/1
 * overrides.
 */
const INLINE_WRITES: Record<IoEngineName, boolean> = { io_uring: true, threadpool: true };

function inlineWritesDefault(engine: IoEngineName): boolean {
  const v = process.env['UBCACHE_INLINE_WRITES'];
  if (v === '0') return false;
  if (v === '1') return true;
  return INLINE_WRITES[engine];
}
const INLINE_WRITE_SLOW_MS_DEFAULT = 2;
const INLINE_WRITE_BACKOFF_MS = 1000;
/** The most buffers in one gathered pwritev (Linux's IOV_MAX is 1024). */
const GATHER_MAX_BUFFERS = 64;

/** An inline write waiting for its turn's end, to go out with its neighbours (writeGathered). */
interface GatheredWrite {
  buf: Buffer;
  position: number;
  resolve: () => void;
  reject: (err: unknown) => void;
}

/** The largest single write of the zero-filling fallback, and the size of its one shared source buffer. */
const ZERO_CHUNK = 1024 * 1024;
let zeroBuffer: Buffer | undefined;
function zeroes(): Buffer {
  zeroBuffer ??= Buffer.alloc(ZERO_CHUNK);
  return zeroBuffer;
}

function errnoOf(err: unknown): string | undefined {
  const code = (err as { code?: unknown } | null)?.code;
  return typeof code === 'string' ? code : undefined;
}

/** Map an errno from the OS onto the codes a BlockDevice reports, with what the user should do about it. */
function classify(errno: string | undefined): { code: IoErrorCode; hint: string } {
  switch (errno) {
    case 'ENOSPC':
    case 'EDQUOT':
    case 'EFBIG':
      return {
        code: 'ENOSPC',
        hint: 'the filesystem holding it is out of space or quota; free space, or allocate the file in full (fallocate -l SIZE FILE)',
      };
    case 'EROFS':
    case 'EPERM':
    case 'EACCES':
      return {
        code: 'EPERM',
        hint: 'it refused the write (read-only filesystem or permissions); fix that or open it read-only',
      };
    case 'EINVAL':
      return { code: 'EINVAL', hint: 'the kernel rejected the request' };
    case 'ENOMEM':
      return { code: 'ENOMEM', hint: 'the system is out of memory' };
    case 'EOPNOTSUPP':
    case 'ENOTSUP':
      return { code: 'ENOTSUP', hint: 'the file or device does not support this operation' };
    case undefined:
    default:
      return { code: 'EIO', hint: 'the device reported an I/O error; check it and the kernel log (dmesg)' };
  }
}

function openFd(path: string, flags: number): Promise<number> {
  return new Promise((resolve, reject) => {
    fs.open(path, flags, (err, fd) => {
      if (err) reject(err);
      else resolve(fd);
    });
  });
}

function closeFd(fd: number): Promise<void> {
  return new Promise((resolve, reject) => {
    fs.close(fd, (err) => {
      if (err) reject(err);
      else resolve();
    });
  });
}

function fstatFd(fd: number): Promise<fs.BigIntStats> {
  return new Promise((resolve, reject) => {
    fs.fstat(fd, { bigint: true }, (err, st) => {
      if (err) reject(err);
      else resolve(st);
    });
  });
}

function fallocateWith(
  engine: IoEngine,
  native: NativeOps,
  fd: number,
  mode: number,
  offset: number,
  length: number,
): Promise<void> {
  return engine.fallocate !== undefined
    ? engine.fallocate(fd, mode, offset, length)
    : native.fallocate(fd, mode, offset, length);
}

function kindOf(st: fs.Stats | fs.BigIntStats): string {
  if (st.isDirectory()) return 'a directory';
  if (st.isCharacterDevice()) return 'a character device';
  if (st.isFIFO()) return 'a FIFO';
  if (st.isSocket()) return 'a socket';
  return 'not a regular file';
}

let warnedNoLock = false;

/** flock the image file so a second daemon cannot serve it too (shared for read-only opens). */
async function lockFile(path: string, fd: number, readOnly: boolean, native: NativeOps | null): Promise<void> {
  if (!native?.flock) {
    if (!warnedNoLock) {
      warnedNoLock = true;
      log.warn(
        `cannot lock ${path} against a second ubcache: the native addon (with flock) is not built; ` +
          'run `npm run build` (until then, do not serve one image from two daemons)',
      );
    }
    return;
  }
  try {
    await native.flock(fd, (readOnly ? LOCK_SH : LOCK_EX) | LOCK_NB);
  } catch (err) {
    const code = errnoOf(err);
    if (code === 'EAGAIN' || code === 'EWOULDBLOCK') {
      throw new DeviceOpenError(
        'EBUSY',
        path,
        `${path} is in use by another process that locked it (another ubcache serving it?); stop that one first`,
        { cause: err },
      );
    }
    // A filesystem without locks (some network filesystems): serve, but say so.
    log.warn(`cannot lock ${path}: ${err instanceof Error ? err.message : String(err)}; serving it unlocked`);
  }
}

function openFailure(path: string, err: unknown, exclusive: boolean): DeviceOpenError {
  const code = errnoOf(err) ?? 'EIO';
  const detail = err instanceof Error ? err.message : String(err);
  let what: string;
  switch (code) {
    case 'ENOENT':
      what = 'does not exist; check the path';
      break;
    case 'EACCES':
    case 'EPERM':
      what = 'permission denied; run as a user that may open it, or open it read-only';
      break;
    case 'EROFS':
      what = 'is on a read-only filesystem or is a read-only device; open it read-only';
      break;
    case 'EBUSY':
      what = exclusive
        ? 'is in use (mounted, held by the kernel, e.g. by bcache or md, or opened exclusively by another ubcache); stop that user first'
        : 'is busy; stop whatever holds it first';
      break;
    case 'ENXIO':
    case 'ENODEV':
      what = 'has no device behind it (unplugged, or an unbound loop device)';
      break;
    default:
      what = `could not be opened (${detail})`;
  }
  return new DeviceOpenError(code, path, `${path} ${what}`, { cause: err });
}

type Kind = 'file' | 'block';

interface Geometry {
  kind: Kind;
  size: number;
  logicalBlockSize: number;
  caps: BlockDeviceCaps;
}

export class FileBlockDevice implements BlockDevice {
  readonly name: string;
  readonly size: number;
  readonly logicalBlockSize: number;
  readonly readOnly: boolean;
  /** Updated if an operation the open-time probe allowed turns out unsupported, so it keeps telling the truth. */
  readonly caps: BlockDeviceCaps;
  readonly kind: Kind;
  /** What runs the I/O that is not done inline. */
  readonly ioEngine: IoEngineName;
  private fd: number;
  private readonly native: NativeOps | null;
  private readonly engine: IoEngine;

  /** Operations currently using the fd; close() waits for zero. */
  private inflight = 0;
  private closing = false;
  private drained: Deferred<void> | undefined;
  private closed: Promise<void> | undefined;

  private syncs = 0;
  private syncRunning = false;
  private syncNext: Deferred<void> | undefined;
  private syncFailure: IoError | undefined;

  /** Inline writes are off until this performance.now() time (0: on). */
  private inlineWritesFrom = 0;
  private inlineWriteSlowMs = INLINE_WRITE_SLOW_MS_DEFAULT;
  /** How often a slow inline write sent writes to the thread pool (for tests and stats). */
  inlineWriteBackoffs = 0;
  /** Inline writes not yet written: issued since the microtask that writes them was queued. */
  private gathered: GatheredWrite[] = [];
  private readonly writeGatheredNow = (): void => {
    this.writeGathered();
  };
  /** Inline writes done, and the syscalls they took (for tests and stats: gathering at work). */
  readonly inlineWriteStats = { writes: 0, syscalls: 0 };

  /**
   * Reads try preadv2(RWF_NOWAIT) first. Turned off for good the first time it
   * fails with anything but EAGAIN (an old kernel, a file system or device
   * that does not support it), so the cost of trying is paid once.
   */
  private nowaitReads: boolean;

  /** Learnt at run time: the file refuses FALLOC_FL_ZERO_RANGE (tmpfs does), so noHole zeroing punches and reallocates. */
  private zeroRangeWorks = true;

  private constructor(
    name: string,
    fd: number,
    readOnly: boolean,
    native: NativeOps | null,
    engine: IoEngine,
    geometry: Geometry,
  ) {
    this.name = name;
    this.fd = fd;
    this.readOnly = readOnly;
    this.native = native;
    this.engine = engine;
    this.ioEngine = engine.name;
    if (!inlineWritesDefault(engine.name)) this.inlineWriteSlowMs = -1;
    this.kind = geometry.kind;
    this.size = geometry.size;
    this.logicalBlockSize = geometry.logicalBlockSize;
    this.caps = geometry.caps;
    this.nowaitReads = native?.preadNowait != null;
  }

  /**
   * Open a regular file or a block device. Anything else, a missing path, a
   * busy device (with `exclusive`) or an unbound loop device is a
   * DeviceOpenError whose message says what to do.
   */
  static async open(path: string, options: FileOpenOptions = {}): Promise<FileBlockDevice> {
    const readOnly = options.readOnly ?? false;
    const exclusive = options.exclusive ?? false;
    const native = options.native === undefined ? loadNative() : options.native;
    // Chosen (and logged) once per process, at the first open; forced but unavailable, it throws here.
    const engine = options.engine ?? ioEngine();

    // Refuse FIFOs and the like before open(): opening a FIFO can block forever.
    let pre: fs.Stats;
    try {
      pre = await stat(path);
    } catch (err) {
      throw openFailure(path, err, exclusive);
    }
    if (!pre.isFile() && !pre.isBlockDevice()) {
      throw new DeviceOpenError(
        'EINVAL',
        path,
        `${path} is ${kindOf(pre)}; ubcache needs a regular file or a block device`,
      );
    }

    const flags =
      (readOnly ? fs.constants.O_RDONLY : fs.constants.O_RDWR) |
      (exclusive && pre.isBlockDevice() ? fs.constants.O_EXCL : 0);
    let fd: number;
    try {
      fd = await openFd(path, flags);
    } catch (err) {
      throw openFailure(path, err, exclusive);
    }
    try {
      if (exclusive && pre.isFile()) await lockFile(path, fd, readOnly, native);
      const geometry = await FileBlockDevice.probe(path, fd, readOnly, native, engine);
      const dev = new FileBlockDevice(path, fd, readOnly, native, engine, geometry);
      if (options.inlineWriteSlowMs !== undefined) dev.inlineWriteSlowMs = options.inlineWriteSlowMs;
      return dev;
    } catch (err) {
      await closeFd(fd).catch(() => undefined);
      throw err;
    }
  }

  private static async probe(
    path: string,
    fd: number,
    readOnly: boolean,
    native: NativeOps | null,
    engine: IoEngine,
  ): Promise<Geometry> {
    const st = await fstatFd(fd);
    if (st.isBlockDevice()) {
      let q;
      try {
        q = await blockQueueInfo(st.rdev);
      } catch (err) {
        throw new DeviceOpenError('ENODEV', path, `${path}: cannot read its size: ${(err as Error).message}`, {
          cause: err,
        });
      }
      if (q.size === 0) {
        throw new DeviceOpenError(
          'ENXIO',
          path,
          `${path} has size 0 (an unbound loop device, or no medium); attach something to it first`,
        );
      }
      return {
        kind: 'block',
        size: q.size,
        logicalBlockSize: q.logicalBlockSize,
        caps: {
          discard: !readOnly && native?.blkdiscard != null && q.discardMaxBytes > 0,
          fastZero: !readOnly && native !== null && q.writeZeroesMaxBytes > 0,
          blockStatus: false,
          rotational: q.rotational,
        },
      };
    }
    if (!st.isFile()) {
      throw new DeviceOpenError(
        'EINVAL',
        path,
        `${path} is ${kindOf(st)}; ubcache needs a regular file or a block device`,
      );
    }
    const size = Number(st.size);
    // Punching past the end of the file with KEEP_SIZE changes nothing, but
    // answers whether the filesystem can punch at all, before a client is told.
    let punch = false;
    if (!readOnly && native !== null) {
      punch = await fallocateWith(engine, native, fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, size, 4096).then(
        () => true,
        () => false,
      );
    }
    return {
      kind: 'file',
      size,
      logicalBlockSize: 512,
      caps: {
        discard: punch,
        fastZero: punch,
        blockStatus: native !== null,
        rotational: await filesystemRotational(st.dev),
      },
    };
  }

  /** fdatasync calls issued by flush() and FUA (coalescing makes this smaller than the number of flushes). */
  get syncCount(): number {
    return this.syncs;
  }

  // ---- accounting --------------------------------------------------------

  private shutdownError(): IoError {
    return new IoError('ESHUTDOWN', `${this.name}: device is closed; reopen it to use it again`);
  }

  /** Admit a public operation; an error if the device is closing or the range is bad. */
  private admit(offset: number, length: number, write: boolean): IoError | undefined {
    if (this.closing) return this.shutdownError();
    if (write && this.readOnly)
      return new IoError('EPERM', `${this.name}: device is open read-only; writes are refused`);
    try {
      checkRange(this, offset, length, write);
    } catch (err) {
      return err as IoError;
    }
    return undefined;
  }

  private leave(): void {
    this.inflight--;
    if (this.inflight === 0 && this.drained !== undefined) this.drained.resolve();
  }

  private failure(op: string, offset: number, length: number, err: unknown): IoError {
    const errno = errnoOf(err);
    const { code, hint } = classify(errno);
    return new IoError(
      code,
      `${this.name}: ${op} of ${length} bytes at offset ${offset} failed (${errno ?? String(err)}): ${hint}`,
      { cause: err },
    );
  }

  // ---- data transfer -----------------------------------------------------

  /** Read `length` bytes into buf[start..] from `position`. Counts itself in flight. */
  private readAt(buf: Buffer, start: number, length: number, position: number): Promise<void> {
    this.inflight++;
    const target = start === 0 && length === buf.length ? buf : buf.subarray(start, start + length);
    return this.engine.read(this.fd, target, position).then(
      (n) => {
        this.leave();
        if (n !== length) throw this.short(false, position, length, n);
      },
      (err: unknown) => {
        this.leave();
        throw this.failure('read', position, length, err);
      },
    );
  }

  /** Write `length` bytes from buf[start..] at `position`. Counts itself in flight. */
  private writeAt(buf: Buffer, start: number, length: number, position: number): Promise<void> {
    this.inflight++;
    const source = start === 0 && length === buf.length ? buf : buf.subarray(start, start + length);
    return this.engine.write(this.fd, source, position).then(
      (n) => {
        this.leave();
        if (n !== length) throw this.short(true, position, length, n);
      },
      (err: unknown) => {
        this.leave();
        throw this.failure('write', position, length, err);
      },
    );
  }

  /**
   * A transfer the engine ended short: a read that met the end of the file
   * (the file shrank under us, and zeroes would be a lie), or a write that
   * made no progress. Both are EIO.
   */
  private short(write: boolean, position: number, length: number, done: number): IoError {
    return new IoError(
      'EIO',
      write
        ? `${this.name}: write at offset ${position + done} made no progress; check the device and dmesg`
        : `${this.name}: read at offset ${position + done} hit the end of the file, ${length - done} bytes ` +
            `short; it is smaller than the ${this.size} bytes it had when opened (truncated by something else?)`,
    );
  }

  private inlineWriteOk(): boolean {
    if (this.inlineWritesFrom === 0) return true;
    if (performance.now() < this.inlineWritesFrom) return false;
    this.inlineWritesFrom = 0;
    return true;
  }

  /**
   * A buffered write done on the event loop: into the page cache it takes a
   * few microseconds, where the thread-pool hop costs tens (it doubles 4 KiB
   * random-write throughput on two cores). The write waits in a microtask
   * queued by the first write of a batch, so that the writes issued by the
   * continuations already queued (a client's requests parsed from one
   * socket read reach their writes together) go out with it
   * (writeGathered). It returns a pending promise; nothing else on this
   * device can overtake it (every other operation writes the gathered ones
   * first), so the order of operations on the file is the order of the
   * calls, as if each had been written at once.
   */
  private writeInline(buf: Buffer, position: number): Promise<void> {
    this.inflight++;
    return new Promise<void>((resolve, reject) => {
      if (this.gathered.length === 0) queueMicrotask(this.writeGatheredNow);
      this.gathered.push({ buf, position, resolve, reject });
    });
  }

  /**
   * Write what writeInline gathered, in order: each run of writes that
   * follow each other on the device (up to INLINE_WRITE_MAX bytes and
   * GATHER_MAX_BUFFERS buffers) as one pwritev. A buffered write can block
   * (dirty-page throttling, a file-system lock), so each run is timed, and
   * one that takes longer than inlineWriteSlowMs sends writes to the engine
   * for the next INLINE_WRITE_BACKOFF_MS: the event loop is stalled at most
   * once per back-off period.
   */
  private writeGathered(): void {
    const list = this.gathered;
    if (list.length === 0) return;
    this.gathered = [];
    let i = 0;
    while (i < list.length) {
      const first = list[i] as GatheredWrite;
      let end = first.position + first.buf.length;
      let j = i + 1;
      for (; j < list.length && j - i < GATHER_MAX_BUFFERS; j++) {
        const w = list[j] as GatheredWrite;
        if (w.position !== end || end + w.buf.length - first.position > INLINE_WRITE_MAX) break;
        end += w.buf.length;
      }
      const t0 = performance.now();
      if (j === i + 1) this.writeOne(first);
      else this.writeRun(list, i, j, end - first.position);
      const t1 = performance.now();
      if (t1 - t0 > this.inlineWriteSlowMs) {
        this.inlineWritesFrom = t1 + INLINE_WRITE_BACKOFF_MS;
        this.inlineWriteBackoffs++;
      }
      i = j;
    }
  }

  /** One gathered write by itself; a short one is finished through the engine. */
  private writeOne(w: GatheredWrite): void {
    this.inlineWriteStats.writes++;
    this.inlineWriteStats.syscalls++;
    let done: number;
    try {
      done = fs.writeSync(this.fd, w.buf, 0, w.buf.length, w.position);
    } catch (err) {
      this.leave();
      w.reject(this.failure('write', w.position, w.buf.length, err));
      return;
    }
    // The rest through the engine, which holds the device open itself before this write lets go.
    if (done !== w.buf.length)
      this.writeAt(w.buf, done, w.buf.length - done, w.position + done).then(w.resolve, w.reject);
    else w.resolve();
    this.leave();
  }

  /**
   * list[i..j), back to back on the device, `bytes` in all, in one pwritev.
   * If it fails or ends short, each is written again by itself (writes are
   * idempotent), so that each gets its own result and error.
   */
  private writeRun(list: GatheredWrite[], i: number, j: number, bytes: number): void {
    const bufs: Buffer[] = [];
    for (let k = i; k < j; k++) bufs.push((list[k] as GatheredWrite).buf);
    let done = -1;
    try {
      done = fs.writevSync(this.fd, bufs, (list[i] as GatheredWrite).position);
    } catch {
      // Each write again by itself below, which reports the error per write.
    }
    if (done !== bytes) {
      for (let k = i; k < j; k++) this.writeOne(list[k] as GatheredWrite);
      return;
    }
    this.inlineWriteStats.writes += j - i;
    this.inlineWriteStats.syscalls++;
    for (let k = i; k < j; k++) {
      this.leave();
      (list[k] as GatheredWrite).resolve();
    }
  }

  /** fallocate through the engine when it has one, else the addon's (on the thread pool). */
  private fallocate(native: NativeOps, mode: number, offset: number, length: number): Promise<void> {
    return fallocateWith(this.engine, native, this.fd, mode, offset, length);
  }

  read(buf: Buffer, offset: number): Promise<void> {
    const bad = this.admit(offset, buf.length, false);
    if (bad !== undefined) return Promise.reject(bad);
    if (buf.length === 0) return Promise.resolve();
    this.writeGathered();
    if (this.nowaitReads && buf.length <= NOWAIT_MAX) {
      // Page-cache hit: copy it here and now, without the thread-pool hop
      // (about 1.5 us instead of 50-100 us). Anything short of the whole
      // transfer (EAGAIN: not cached; a partial copy) falls back to the pool
      // for the rest.
      const n = this.native?.preadNowait?.(this.fd, buf, offset) ?? -1;
      if (n === buf.length) return Promise.resolve();
      if (n > 0) return this.readAt(buf, n, buf.length - n, offset + n);
      if (n !== -EAGAIN) this.nowaitReads = false;
    }
    return this.readAt(buf, 0, buf.length, offset);
  }

  /** The page-cache half of read() alone: a copy here and now, or false (the caller then uses read()). */
  readNow(buf: Buffer, offset: number): boolean {
    if (!this.nowaitReads || buf.length > NOWAIT_MAX || buf.length === 0) return false;
    if (this.admit(offset, buf.length, false) !== undefined) return false;
    this.writeGathered();
    return this.native?.preadNowait?.(this.fd, buf, offset) === buf.length;
  }

  write(buf: Buffer, offset: number, options?: WriteOptions): Promise<void> {
    const bad = this.admit(offset, buf.length, true);
    if (bad !== undefined) return Promise.reject(bad);
    if (options?.fua === true) {
      this.writeGathered();
      return this.writeFua(buf, offset);
    }
    if (buf.length === 0) return Promise.resolve();
    if (buf.length <= INLINE_WRITE_MAX && this.inlineWriteSlowMs >= 0 && this.inlineWriteOk()) {
      return this.writeInline(buf, offset);
    }
    this.writeGathered();
    return this.writeAt(buf, 0, buf.length, offset);
  }

  private async writeFua(buf: Buffer, offset: number): Promise<void> {
    // Held in flight across both steps, so close() cannot slip in between.
    this.inflight++;
    try {
      if (buf.length > 0) await this.writeAt(buf, 0, buf.length, offset);
      await this.sync();
    } finally {
      this.leave();
    }
  }

  // ---- durability --------------------------------------------------------

  flush(): Promise<void> {
    if (this.closing) return Promise.reject(this.shutdownError());
    if (this.readOnly) return Promise.resolve();
    this.writeGathered();
    this.inflight++;
    return this.sync().then(
      () => {
        this.leave();
      },
      (err: unknown) => {
        this.leave();
        throw err;
      },
    );
  }

  /** fdatasync, shared by every caller that arrives before it starts. Callers hold their own in-flight count. */
  private sync(): Promise<void> {
    if (this.syncFailure !== undefined) return Promise.reject(this.stickyFailure());
    if (!this.syncRunning) return this.startSync();
    this.syncNext ??= deferred();
    return this.syncNext.promise;
  }

  private stickyFailure(): IoError {
    return new IoError(
      'EIO',
      `${this.name}: an earlier flush failed, so writes since the last good flush may be lost; ` +
        'stop using this device and check it (dmesg)',
      { cause: this.syncFailure },
    );
  }

  private startSync(): Promise<void> {
    this.syncRunning = true;
    this.syncs++;
    const ended = (): void => {
      this.syncRunning = false;
      const next = this.syncNext;
      this.syncNext = undefined;
      if (next !== undefined) {
        // Started before our callers' continuations run, while they still hold the device open.
        this.sync().then(
          () => {
            next.resolve();
          },
          (e: unknown) => {
            next.reject(e);
          },
        );
      }
    };
    return this.engine.fdatasync(this.fd).then(
      () => {
        ended();
      },
      (err: unknown) => {
        const e = this.failure('flush (fdatasync)', 0, this.size, err);
        this.syncFailure ??= e;
        ended();
        throw e;
      },
    );
  }

  // ---- discard, zeroes, block status -------------------------------------

  async discard(offset: number, length: number): Promise<void> {
    const bad = this.admit(offset, length, true);
    if (bad !== undefined) throw bad;
    if (length === 0 || !this.caps.discard || this.native === null) return;
    this.writeGathered();
    const native = this.native;
    this.inflight++;
    try {
      if (this.kind === 'file') {
        await this.fallocate(native, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
      } else if (native.blkdiscard !== null) {
        // A discard is a hint: trim only the whole logical blocks inside the range.
        const lbs = this.logicalBlockSize;
        const start = Math.ceil(offset / lbs) * lbs;
        const end = Math.floor((offset + length) / lbs) * lbs;
        if (end > start) await native.blkdiscard(this.fd, start, end - start);
      }
    } catch (err) {
      if (!isUnsupported(err)) throw this.failure('discard', offset, length, err);
      this.caps.discard = false;
      if (this.kind === 'file') this.caps.fastZero = false;
    } finally {
      this.leave();
    }
  }

  async writeZeroes(offset: number, length: number, options?: ZeroOptions): Promise<void> {
    const bad = this.admit(offset, length, true);
    if (bad !== undefined) throw bad;
    const fastOnly = options?.fastOnly === true;
    if (fastOnly && !this.caps.fastZero) {
      throw new IoError('ENOTSUP', `${this.name}: no fast way to zero a range here (fast-zero requested)`);
    }
    this.writeGathered();
    this.inflight++;
    try {
      if (length > 0) {
        let done = false;
        if (this.caps.fastZero && this.native !== null) {
          done =
            this.kind === 'file'
              ? await this.zeroFileFast(this.native, offset, length, options?.noHole === true)
              : await this.zeroBlockFast(this.native, offset, length, options?.noHole === true);
        }
        if (!done) {
          if (fastOnly) throw new IoError('ENOTSUP', `${this.name}: fast zeroing turned out unsupported here`);
          await this.writeZeroBuffers(offset, length);
        }
      }
      if (options?.fua === true) await this.sync();
    } finally {
      this.leave();
    }
  }

  /** Zero a file range with fallocate; false if the filesystem cannot (nothing was changed then). */
  private async zeroFileFast(native: NativeOps, offset: number, length: number, noHole: boolean): Promise<boolean> {
    try {
      if (noHole && this.zeroRangeWorks) {
        try {
          await this.fallocate(native, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length);
          return true;
        } catch (err) {
          if (!isUnsupported(err)) throw err;
          this.zeroRangeWorks = false;
        }
      }
      await this.fallocate(native, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
      if (noHole) {
        // Put the blocks back (as unwritten extents: they read as zeroes) so the range stays allocated.
        try {
          await this.fallocate(native, 0, offset, length);
        } catch (err) {
          if (!isUnsupported(err)) throw err;
          await this.writeZeroBuffers(offset, length);
        }
      }
      return true;
    } catch (err) {
      if (err instanceof IoError) throw err;
      if (!isUnsupported(err)) throw this.failure('write-zeroes', offset, length, err);
      this.caps.fastZero = false;
      this.caps.discard = false;
      return false;
    }
  }

  /**
   * Zero a block-device range: the kernel zeroes the whole logical blocks
   * (BLKDEV_ZERO_NOUNMAP for noHole, else it may unmap); partial blocks at the
   * ends are written. False if the device cannot zero in hardware and the
   * caller should write zeroes itself.
   */
  private async zeroBlockFast(native: NativeOps, offset: number, length: number, noHole: boolean): Promise<boolean> {
    const lbs = this.logicalBlockSize;
    const end = offset + length;
    const start = Math.ceil(offset / lbs) * lbs;
    const stop = Math.floor(end / lbs) * lbs;
    if (stop <= start) return false;
    const mode = noHole ? FALLOC_FL_ZERO_RANGE : FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE;
    try {
      await this.fallocate(native, mode, start, stop - start);
    } catch (err) {
      if (!isUnsupported(err)) throw this.failure('write-zeroes', offset, length, err);
      this.caps.fastZero = false;
      return false;
    }
    if (start > offset) await this.writeZeroBuffers(offset, start - offset);
    if (end > stop) await this.writeZeroBuffers(stop, end - stop);
    return true;
  }

  /** The fallback: write zeroes from the one shared buffer, a chunk at a time. */
  private async writeZeroBuffers(offset: number, length: number): Promise<void> {
    const zero = zeroes();
    let done = 0;
    while (done < length) {
      const n = Math.min(ZERO_CHUNK, length - done);
      await this.writeAt(zero, 0, n, offset + done);
      done += n;
    }
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    const bad = this.admit(offset, length, false);
    if (bad !== undefined) throw bad;
    if (length === 0) return [];
    this.writeGathered();
    const allData: Extent[] = [{ length, hole: false, zero: false }];
    if (this.kind === 'block' || !this.caps.blockStatus || this.native === null) return allData;
    const native = this.native;
    this.inflight++;
    try {
      const out: Extent[] = [];
      const push = (n: number, hole: boolean): void => {
        const last = out[out.length - 1];
        if (last !== undefined && last.hole === hole) last.length += n;
        else out.push({ length: n, hole, zero: hole });
      };
      const end = offset + length;
      let pos = offset;
      while (pos < end) {
        const data = await native.seek(this.fd, pos, SEEK_DATA);
        if (data < 0 || data >= end) {
          push(end - pos, true);
          break;
        }
        if (data > pos) push(data - pos, true);
        const hole = await native.seek(this.fd, data, SEEK_HOLE);
        // A racing truncate can make the answers disagree; never emit an empty or backward extent.
        const dataEnd = hole > data ? Math.min(hole, end) : end;
        push(dataEnd - data, false);
        pos = dataEnd;
      }
      return out;
    } catch (err) {
      if (!isUnsupported(err) && errnoOf(err) !== 'EINVAL') throw this.failure('block status', offset, length, err);
      this.caps.blockStatus = false;
      return allData;
    } finally {
      this.leave();
    }
  }

  // ---- presence ----------------------------------------------------------

  /** Removed from its directory (no links left) while we hold it open. */
  isGone(): Promise<boolean> {
    if (this.closing) return Promise.resolve(false);
    return new Promise((resolve) => {
      fs.fstat(this.fd, (err, st) => {
        resolve(err === null && st.nlink === 0);
      });
    });
  }

  // ---- close -------------------------------------------------------------

  /** Wait for in-flight operations, fdatasync if writable, close. Idempotent: every call returns the same promise. */
  close(): Promise<void> {
    this.closed ??= this.shutdown();
    return this.closed;
  }

  private async shutdown(): Promise<void> {
    this.closing = true;
    if (this.inflight > 0) {
      this.drained = deferred();
      await this.drained.promise;
    }
    const fd = this.fd;
    this.fd = -1;
    let failure: IoError | undefined;
    if (!this.readOnly) {
      if (this.syncFailure !== undefined) failure = this.stickyFailure();
      else {
        try {
          await this.engine.fdatasync(fd);
        } catch (err) {
          failure = this.failure('final flush (fdatasync) on close', 0, this.size, err);
        }
      }
    }
    try {
      await closeFd(fd);
    } catch (err) {
      failure ??= this.failure('close', 0, 0, err);
    }
    if (failure !== undefined) throw failure;
  }
}
