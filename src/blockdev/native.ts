// The optional native addon (native/ubcache_native.c): fallocate, SEEK_DATA/
// SEEK_HOLE and BLKDISCARD, which Node has no API for, and, when built with
// liburing, the io_uring engine's primitives (native/uring.c, io-engine.ts). The addon is an
// optimisation, never a requirement: without it discard is a no-op, write-zeroes
// writes zero buffers and block status reports everything as data, all of which
// the NBD spec allows. So loading never throws; it yields null instead.
//
// UBCACHE_NO_NATIVE=1 disables it at run time too (the build honours the same
// variable), which is how the fallbacks are exercised on a machine that has it.

import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { log } from '../util/log.ts';

/** fallocate(2) mode bits (linux/falloc.h). */
export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;

/** flock(2) operations. */
export const LOCK_SH = 1;
export const LOCK_EX = 2;
export const LOCK_NB = 4;
export const LOCK_UN = 8;

/** lseek(2) whence values for sparse files. */
export const SEEK_DATA = 3;
export const SEEK_HOLE = 4;

/**
 * The addon's operations. Each runs on libuv's thread pool and rejects with an
 * Error whose `code` is the errno name (EOPNOTSUPP, EIO, ...).
 */
export interface NativeOps {
  fallocate(fd: number, mode: number, offset: number, length: number): Promise<void>;
  /** lseek with SEEK_DATA or SEEK_HOLE; -1 when there is no data at or after `offset` (ENXIO). */
  seek(fd: number, offset: number, whence: number): Promise<number>;
  /** ioctl(BLKDISCARD); null when the addon predates it. */
  blkdiscard: ((fd: number, offset: number, length: number) => Promise<void>) | null;
  /** flock(2) (LOCK_* bits); a held lock with LOCK_NB rejects with EAGAIN. Null when the addon predates it. */
  flock: ((fd: number, operation: number) => Promise<void>) | null;
  /**
   * Synchronous preadv2(RWF_NOWAIT) into all of `buf`: the bytes read, or
   * -errno (-EAGAIN when the data is not in the page cache). null when the
   * addon predates it.
   */
  preadNowait: ((fd: number, buf: Uint8Array, position: number) => number) | null;
  /**
   * Replace the process image (execve(2)), keeping the pid and stdio; returns
   * only by throwing. null when the addon predates it.
   */
  execve: ((path: string, argv: string[], env: string[]) => never) | null;
  /**
   * One datagram to an AF_UNIX SOCK_DGRAM address ('@' first: abstract), for
   * sd_notify's $NOTIFY_SOCKET; throws an errno-coded Error. null when the
   * addon predates it.
   */
  notifySend: ((address: string, message: string) => void) | null;
  /** prctl(PR_SET_PDEATHSIG, signo) (--exit-with-parent). null when the addon predates it. */
  setParentDeathSignal: ((signo: number) => void) | null;
  /** The io_uring engine's primitives (native/uring.c); null when the addon was built without liburing. */
  uring: UringOps | null;
}

/**
 * The io_uring primitives. Requests are identified by ids the caller manages
 * (0 .. capacity-1); a request's buffer must stay referenced until its
 * completion. The queue functions return 0 or -errno and reach the kernel at
 * the next submit(); completions arrive in batches through the setup
 * callback: (ids[i], results[i]) for i < n, a result being the bytes moved
 * (short only at the end of the file or when a write made no progress), 0
 * for fdatasync and fallocate, or -errno.
 */
export interface UringOps {
  /** Create this environment's ring; the capacity (in-flight limit). Throws an errno-coded Error (ENOSYS, EPERM, ...). */
  setup: (onComplete: (n: number) => void, ids: Int32Array, results: Float64Array, workers: number) => number;
  /** position -1: the file's current position (pipes). */
  read: (id: number, fd: number, buf: Uint8Array, position: number) => number;
  write: (id: number, fd: number, buf: Uint8Array, position: number) => number;
  fdatasync: (id: number, fd: number) => number;
  fallocate: (id: number, fd: number, mode: number, offset: number, length: number) => number;
  /** Hand the queued requests to the kernel: how many, or -errno. */
  submit: () => number;
  /** [requests in flight, continuations after partial transfers, resubmissions after EAGAIN/EINTR]. */
  counters: () => [number, number, number];
}

interface RawAddon {
  fallocate?: unknown;
  seek?: unknown;
  blkdiscard?: unknown;
  flock?: unknown;
  preadNowait?: unknown;
  execve?: unknown;
  notifySend?: unknown;
  setParentDeathSignal?: unknown;
  uringSetup?: unknown;
  uringRead?: unknown;
  uringWrite?: unknown;
  uringFdatasync?: unknown;
  uringFallocate?: unknown;
  uringSubmit?: unknown;
  uringCounters?: unknown;
}

function uringOps(raw: RawAddon): UringOps | null {
  const { uringSetup, uringRead, uringWrite, uringFdatasync, uringFallocate, uringSubmit, uringCounters } = raw;
  if (
    typeof uringSetup !== 'function' ||
    typeof uringRead !== 'function' ||
    typeof uringWrite !== 'function' ||
    typeof uringFdatasync !== 'function' ||
    typeof uringFallocate !== 'function' ||
    typeof uringSubmit !== 'function' ||
    typeof uringCounters !== 'function'
  ) {
    return null;
  }
  return {
    setup: uringSetup as UringOps['setup'],
    read: uringRead as UringOps['read'],
    write: uringWrite as UringOps['write'],
    fdatasync: uringFdatasync as UringOps['fdatasync'],
    fallocate: uringFallocate as UringOps['fallocate'],
    submit: uringSubmit as UringOps['submit'],
    counters: uringCounters as UringOps['counters'],
  };
}

// src/blockdev/native.ts and dist/blockdev/native.js are both two levels below
// the package root, so one relative path serves both.
const addonPath = join(
  dirname(fileURLToPath(import.meta.url)),
  '..',
  '..',
  'native',
  'build',
  'Release',
  'ubcache_native.node',
);

let cached: NativeOps | null | undefined;

/** UBCACHE_NO_NATIVE is set: the addon is not loaded even when built. */
export function nativeDisabledByEnv(): boolean {
  const v = process.env['UBCACHE_NO_NATIVE'];
  return v !== undefined && v !== '' && v !== '0';
}

function load(): NativeOps | null {
  if (nativeDisabledByEnv()) {
    log.debug('native addon disabled by UBCACHE_NO_NATIVE');
    return null;
  }
  let raw: RawAddon;
  try {
    raw = createRequire(import.meta.url)(addonPath) as RawAddon;
  } catch (err) {
    const code = (err as { code?: unknown }).code;
    if (code !== 'MODULE_NOT_FOUND' && code !== 'ENOENT') {
      log.warn(
        `native addon ${addonPath} failed to load (${String(err)}); discard, fast zeroing and block status are ` +
          'disabled; rebuild it with `npm run build`',
      );
    }
    return null;
  }
  const { fallocate, seek, blkdiscard, flock, preadNowait, execve, notifySend, setParentDeathSignal } = raw;
  if (typeof fallocate !== 'function' || typeof seek !== 'function') {
    log.warn(`native addon ${addonPath} lacks fallocate/seek; rebuild it with \`npm run build\``);
    return null;
  }
  return {
    fallocate: fallocate as NativeOps['fallocate'],
    seek: seek as NativeOps['seek'],
    blkdiscard: typeof blkdiscard === 'function' ? (blkdiscard as NonNullable<NativeOps['blkdiscard']>) : null,
    flock: typeof flock === 'function' ? (flock as NonNullable<NativeOps['flock']>) : null,
    preadNowait: typeof preadNowait === 'function' ? (preadNowait as NonNullable<NativeOps['preadNowait']>) : null,
    execve: typeof execve === 'function' ? (execve as NonNullable<NativeOps['execve']>) : null,
    notifySend: typeof notifySend === 'function' ? (notifySend as NonNullable<NativeOps['notifySend']>) : null,
    setParentDeathSignal:
      typeof setParentDeathSignal === 'function'
        ? (setParentDeathSignal as NonNullable<NativeOps['setParentDeathSignal']>)
        : null,
    uring: uringOps(raw),
  };
}

/** The addon's operations, or null when it is not built, fails to load, or is disabled. Loaded once. */
export function loadNative(): NativeOps | null {
  if (cached === undefined) cached = load();
  return cached;
}

/** Is this the errno of an operation the file or device does not support? */
export function isUnsupported(err: unknown): boolean {
  const code = (err as { code?: unknown } | null)?.code;
  return code === 'EOPNOTSUPP' || code === 'ENOTSUP' || code === 'ENOSYS' || code === 'ENOTTY';
}
