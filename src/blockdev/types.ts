// The BlockDevice interface: the one thin layer every byte goes through.
// Implementations: file (regular file or block device), memory, faulty (fault
// injection), crashable (simulated power cuts), later nbd (remote export).
// The NBD server exports any BlockDevice, and a bcache device is one too.

/** errno names a BlockDevice may fail with; the NBD layer maps them to NBD errors. */
export type IoErrorCode = 'EIO' | 'EINVAL' | 'ENOSPC' | 'EPERM' | 'ENOTSUP' | 'ESHUTDOWN' | 'ENOMEM' | 'EOVERFLOW';

/**
 * An I/O failure with an errno-style code. Devices throw these (or Node's own
 * fs errors, which carry `code` too); callers classify by `code`.
 */
export class IoError extends Error {
  readonly code: IoErrorCode;
  constructor(code: IoErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'IoError';
    this.code = code;
  }
}

export interface WriteOptions {
  /** Force unit access: the data is durable when the promise resolves. */
  fua?: boolean;
}

export interface ZeroOptions {
  /** The range must stay allocated (NBD_CMD_FLAG_NO_HOLE): zero it, do not punch it. */
  noHole?: boolean;
  /** Fail with ENOTSUP instead of falling back to writing zeroes (NBD_CMD_FLAG_FAST_ZERO). */
  fastOnly?: boolean;
  fua?: boolean;
}

/** One run of a block-status answer (NBD base:allocation). */
export interface Extent {
  length: number;
  /** Not allocated (NBD_STATE_HOLE). */
  hole: boolean;
  /** Reads as zeroes (NBD_STATE_ZERO). */
  zero: boolean;
}

export interface BlockDeviceCaps {
  /** discard() actually releases space (else it is an accepted no-op). */
  discard: boolean;
  /** writeZeroes() is faster than writing zero buffers (fastOnly will succeed). */
  fastZero: boolean;
  /** blockStatus() reports real holes/data (else everything is data). */
  blockStatus: boolean;
  /** Seeks are expensive (a spinning disk); a hint passed on to clients. */
  rotational: boolean;
}

/** Counters of a device that reaches its medium over a network and can ride out outages (a remote NBD export). */
export interface BlockDeviceStats {
  /** Outages survived by reconnecting. */
  reconnects: number;
  /** Time spent in outages so far, the current one included, in milliseconds. */
  outageMs: number;
  /** Connected and serving now: false during an outage, and once the device has failed for good. */
  online: boolean;
  /** How long an outage may last before the device fails for good, in milliseconds (0: it never reconnects). */
  outageTimeoutMs: number;
}

export interface BlockDevice {
  /** Identity for logs and errors: a path, a URI, "memory:...". */
  readonly name: string;
  /** Size in bytes; fixed for the life of the object. */
  readonly size: number;
  /** The smallest unit the device handles natively, in bytes (512 for files). */
  readonly logicalBlockSize: number;
  readonly readOnly: boolean;
  readonly caps: BlockDeviceCaps;

  /**
   * Fill `buf` from `offset`. The whole range must lie inside the device
   * (otherwise EINVAL); a short read from the medium is EIO, never silent zeroes.
   */
  read(buf: Buffer, offset: number): Promise<void>;
  /**
   * read() done here and now when it needs no waiting (data in memory or the
   * page cache): true when `buf` holds the data. False when it could not:
   * nothing was done that the caller can observe except `buf`'s contents,
   * and the caller uses read(). Optional; it exists for the hit path, where a
   * promise and its microtasks are a measurable share of a read's CPU.
   */
  readNow?(buf: Buffer, offset: number): boolean;
  /** Write all of `buf` at `offset` (EINVAL/ENOSPC past the end, EPERM if read-only). */
  write(buf: Buffer, offset: number, options?: WriteOptions): Promise<void>;
  /** Make every write that completed before this call durable. */
  flush(): Promise<void>;
  /** Hint that the range is no longer needed; reads of it return unspecified data until rewritten. */
  discard(offset: number, length: number): Promise<void>;
  /** Make the range read as zeroes. */
  writeZeroes(offset: number, length: number, options?: ZeroOptions): Promise<void>;
  /** Allocation status of the range, covering it exactly, in order. */
  blockStatus(offset: number, length: number): Promise<Extent[]>;
  /** Release the device. Implementations flush what they buffer; further calls fail with ESHUTDOWN. */
  close(): Promise<void>;
  /**
   * Whether the device has disappeared although its I/O may still work (a
   * file or device node removed: Linux keeps serving an open descriptor).
   * Optional: devices that cannot disappear that way leave it out.
   */
  isGone?(): Promise<boolean>;
  /** Connection counters, for devices that have a connection (/metrics). Optional. */
  stats?(): BlockDeviceStats;
  /** Change the outage timeout (ms, above 0) of a device that has one; RangeError for a bad value. Optional. */
  setOutageTimeout?(ms: number): void;
}

/** Throw EINVAL (or ENOSPC for writes) unless [offset, offset+length) lies within a device of `size` bytes. */
export function checkRange(dev: { name: string; size: number }, offset: number, length: number, write = false): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
    throw new IoError('EINVAL', `${dev.name}: invalid range offset=${offset} length=${length}`);
  }
  if (offset + length > dev.size) {
    throw new IoError(
      write ? 'ENOSPC' : 'EINVAL',
      `${dev.name}: range ${offset}+${length} extends past the end of the device (${dev.size} bytes)`,
    );
  }
}

/** The errno-style code of any error a device may throw (IoError, Node fs errors), defaulting to EIO. */
export function errorCode(err: unknown): string {
  if (err !== null && typeof err === 'object' && 'code' in err && typeof err.code === 'string') return err.code;
  return 'EIO';
}
