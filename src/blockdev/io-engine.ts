// The I/O engine under FileBlockDevice: what runs a read, write, fdatasync or
// fallocate that cannot be done inline on the event loop.
//
// io_uring (native/uring.c): requests are queued into the ring as they come
// and handed to the kernel in one io_uring_enter per microtask turn; their
// completions come back on the event loop in batches, one JS call per batch.
// Many requests are in flight at once (up to the ring's capacity; the rest
// wait here), and nothing crosses a thread on the way in or out.
//
// The thread pool: callback fs.read/fs.write/fs.fdatasync, promisified by
// hand (2-3x faster than FileHandle at depth, reference/ecosystem.md §7).
// libuv runs them on its pool, so at most UV_THREADPOOL_SIZE (default 4) are
// in flight, and each costs a thread hop both ways.
//
// One engine per process (per worker thread), chosen at first use: io_uring
// when the addon has it and the kernel lets us create a ring, else the thread
// pool; UBCACHE_IO_ENGINE=io_uring|threadpool forces one. Both engines have
// one contract: a transfer continues after a partial read or write until it
// is complete, meets the end of the file (read) or makes no progress
// (write), so the caller sees a short count only then; failures reject with
// an Error whose `code` is the errno name.

import * as fs from 'node:fs';
import { getSystemErrorMap } from 'node:util';
import { log } from '../util/log.ts';
import { loadNative, nativeDisabledByEnv, type UringOps } from './native.ts';

export type IoEngineName = 'io_uring' | 'threadpool';

export interface IoEngine {
  readonly name: IoEngineName;
  /**
   * Read buf.length bytes at `position` (-1: at the file's current position,
   * for pipes). Resolves with the bytes read: fewer only at the end of the file.
   */
  read(fd: number, buf: Uint8Array, position: number): Promise<number>;
  /** Write all of buf at `position`. Resolves with the bytes written: fewer only if a write made no progress. */
  write(fd: number, buf: Uint8Array, position: number): Promise<number>;
  fdatasync(fd: number): Promise<void>;
  /** fallocate(2) through the engine; absent where the engine has none (the addon's own runs on the pool). */
  readonly fallocate?: (fd: number, mode: number, offset: number, length: number) => Promise<void>;
}

/** An errno failure, shaped like Node's own fs errors. */
export class IoEngineError extends Error {
  readonly code: string;
  readonly errno: number;
  readonly syscall: string;
  /** `errno` is negative, as the kernel returns it (-5 for EIO). */
  constructor(errno: number, syscall: string) {
    const [code, text] = getSystemErrorMap().get(errno) ?? [`E${-errno}`, 'unknown error'];
    super(`${code}: ${text}, ${syscall}`);
    this.name = 'IoEngineError';
    this.code = code;
    this.errno = errno;
    this.syscall = syscall;
  }
}

// ---- the thread pool ---------------------------------------------------------

export class ThreadPoolEngine implements IoEngine {
  readonly name = 'threadpool';

  read(fd: number, buf: Uint8Array, position: number): Promise<number> {
    const length = buf.length;
    if (length === 0) return Promise.resolve(0);
    return new Promise<number>((resolve, reject) => {
      fs.read(fd, buf, 0, length, position, (err, n) => {
        if (err === null && n === length) resolve(n);
        else continueTransfer(false, fd, buf, position, 0, err, n, resolve, reject);
      });
    });
  }

  write(fd: number, buf: Uint8Array, position: number): Promise<number> {
    const length = buf.length;
    if (length === 0) return Promise.resolve(0);
    return new Promise<number>((resolve, reject) => {
      fs.write(fd, buf, 0, length, position, (err, n) => {
        if (err === null && n === length) resolve(n);
        else continueTransfer(true, fd, buf, position, 0, err, n, resolve, reject);
      });
    });
  }

  fdatasync(fd: number): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      fs.fdatasync(fd, (err) => {
        if (err === null) resolve();
        else reject(err);
      });
    });
  }
}

/** The rare paths of a pool transfer: an error, the end, or a partial transfer that continues. */
function continueTransfer(
  write: boolean,
  fd: number,
  buf: Uint8Array,
  position: number,
  done: number,
  err: NodeJS.ErrnoException | null,
  n: number,
  resolve: (n: number) => void,
  reject: (err: Error) => void,
): void {
  if (err !== null) {
    reject(err);
    return;
  }
  const total = done + n;
  if (n === 0 || total === buf.length) {
    resolve(total);
    return;
  }
  const at = position < 0 ? -1 : position + total;
  const next = (e: NodeJS.ErrnoException | null, m: number): void => {
    continueTransfer(write, fd, buf, position, total, e, m, resolve, reject);
  };
  if (write) fs.write(fd, buf, total, buf.length - total, at, next);
  else fs.read(fd, buf, total, buf.length - total, at, next);
}

// ---- io_uring ------------------------------------------------------------------

/** Completion queue size, and so the most requests in the ring at once; the rest wait in JS. */
const URING_CAPACITY = 256;
/**
 * io-wq's bounded workers: the kernel threads that run what cannot complete
 * without blocking (a read the page cache misses on a file system without
 * async buffered reads, a FUSE file). The kernel's default, 4 per CPU, would
 * cap a slow device at 8 such reads here, as the thread pool caps it at 4.
 */
const URING_WORKERS = 64;

const OP_READ = 1;
const OP_WRITE = 2;
const OP_FDATASYNC = 3;
const OP_FALLOCATE = 4;
const SYSCALL = ['', 'read', 'write', 'fdatasync', 'fallocate'];

/** A request waiting for a free id (more than URING_CAPACITY in flight). */
interface Waiting {
  op: number;
  fd: number;
  buf: Uint8Array | undefined;
  position: number;
  mode: number;
  length: number;
  resolve: (n: number) => void;
  reject: (err: Error) => void;
}

export class UringEngine implements IoEngine {
  readonly name = 'io_uring';
  /** Requests the ring holds at once. */
  readonly capacity: number;
  private readonly ops: UringOps;
  private readonly ids: Int32Array;
  private readonly results: Float64Array;
  private readonly free: number[] = [];
  // Per request id: how to settle it, and its buffer, referenced until the kernel is done with it.
  private readonly resolvers: (((n: number) => void) | undefined)[] = [];
  private readonly rejecters: (((err: Error) => void) | undefined)[] = [];
  private readonly buffers: (Uint8Array | undefined)[] = [];
  private readonly kinds: Uint8Array;
  private readonly waiting: (Waiting | undefined)[] = [];
  private waitingHead = 0;
  private submitQueued = false;
  private submitRetry: NodeJS.Immediate | undefined;

  /** Create this environment's ring; throws an errno-coded Error when the kernel refuses. */
  constructor(ops: UringOps) {
    this.ops = ops;
    this.ids = new Int32Array(URING_CAPACITY);
    this.results = new Float64Array(URING_CAPACITY);
    this.capacity = ops.setup(this.onComplete, this.ids, this.results, URING_WORKERS);
    this.kinds = new Uint8Array(this.capacity);
    for (let id = this.capacity - 1; id >= 0; id--) this.free.push(id);
    this.resolvers.length = this.capacity;
    this.rejecters.length = this.capacity;
    this.buffers.length = this.capacity;
  }

  /** [requests in the ring, continuations after partial transfers, resubmissions after EAGAIN/EINTR]. */
  counters(): [number, number, number] {
    return this.ops.counters();
  }

  /** Requests waiting for room in the ring. */
  get queued(): number {
    return this.waiting.length - this.waitingHead;
  }

  read(fd: number, buf: Uint8Array, position: number): Promise<number> {
    if (buf.length === 0) return Promise.resolve(0);
    return new Promise<number>((resolve, reject) => {
      this.start(OP_READ, fd, buf, position, 0, 0, resolve, reject);
    });
  }

  write(fd: number, buf: Uint8Array, position: number): Promise<number> {
    if (buf.length === 0) return Promise.resolve(0);
    return new Promise<number>((resolve, reject) => {
      this.start(OP_WRITE, fd, buf, position, 0, 0, resolve, reject);
    });
  }

  fdatasync(fd: number): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      this.start(
        OP_FDATASYNC,
        fd,
        undefined,
        0,
        0,
        0,
        () => {
          resolve();
        },
        reject,
      );
    });
  }

  readonly fallocate = (fd: number, mode: number, offset: number, length: number): Promise<void> =>
    new Promise<void>((resolve, reject) => {
      this.start(
        OP_FALLOCATE,
        fd,
        undefined,
        offset,
        mode,
        length,
        () => {
          resolve();
        },
        reject,
      );
    });

  private start(
    op: number,
    fd: number,
    buf: Uint8Array | undefined,
    position: number,
    mode: number,
    length: number,
    resolve: (n: number) => void,
    reject: (err: Error) => void,
  ): void {
    const id = this.free.pop();
    if (id === undefined) {
      this.waiting.push({ op, fd, buf, position, mode, length, resolve, reject });
      return;
    }
    this.issue(id, op, fd, buf, position, mode, length, resolve, reject);
  }

  private issue(
    id: number,
    op: number,
    fd: number,
    buf: Uint8Array | undefined,
    position: number,
    mode: number,
    length: number,
    resolve: (n: number) => void,
    reject: (err: Error) => void,
  ): void {
    let r: number;
    try {
      switch (op) {
        case OP_READ:
          r = this.ops.read(id, fd, buf ?? new Uint8Array(0), position);
          break;
        case OP_WRITE:
          r = this.ops.write(id, fd, buf ?? new Uint8Array(0), position);
          break;
        case OP_FDATASYNC:
          r = this.ops.fdatasync(id, fd);
          break;
        default:
          r = this.ops.fallocate(id, fd, mode, position, length);
      }
    } catch (err) {
      // A bad argument (a TypeError from the addon): the id was never used.
      this.free.push(id);
      reject(err instanceof Error ? err : new Error(String(err)));
      return;
    }
    if (r < 0) {
      this.free.push(id);
      reject(new IoEngineError(r, SYSCALL[op] ?? 'io_uring'));
      return;
    }
    this.resolvers[id] = resolve;
    this.rejecters[id] = reject;
    this.buffers[id] = buf;
    this.kinds[id] = op;
    if (!this.submitQueued) {
      this.submitQueued = true;
      queueMicrotask(this.submit);
    }
  }

  /** One io_uring_enter for everything queued during this microtask turn. */
  private readonly submit = (): void => {
    this.submitQueued = false;
    if (this.ops.submit() >= 0) return;
    // The queued requests stay in the submission queue (ENOMEM, EAGAIN under
    // memory pressure); retry once the loop has turned instead of spinning here.
    this.submitRetry ??= setImmediate(() => {
      this.submitRetry = undefined;
      this.submit();
    });
  };

  /** Called by the addon with a batch of finished requests. Must not throw: the rest of the batch would be lost. */
  private readonly onComplete = (n: number): void => {
    for (let i = 0; i < n; i++) {
      const id = this.ids[i] ?? -1;
      const result = this.results[i] ?? 0;
      const resolve = this.resolvers[id];
      const reject = this.rejecters[id];
      this.resolvers[id] = undefined;
      this.rejecters[id] = undefined;
      this.buffers[id] = undefined;
      this.free.push(id);
      if (resolve === undefined || reject === undefined) continue;
      if (result < 0) reject(new IoEngineError(result, SYSCALL[this.kinds[id] ?? 0] ?? 'io_uring'));
      else resolve(result);
    }
    this.admitWaiting();
  };

  private admitWaiting(): void {
    while (this.waitingHead < this.waiting.length) {
      const id = this.free.pop();
      if (id === undefined) return;
      const w = this.waiting[this.waitingHead];
      this.waiting[this.waitingHead] = undefined;
      this.waitingHead++;
      if (w !== undefined) this.issue(id, w.op, w.fd, w.buf, w.position, w.mode, w.length, w.resolve, w.reject);
    }
    this.waiting.length = 0;
    this.waitingHead = 0;
  }
}

// ---- the process's engine ------------------------------------------------------

export interface IoEngineStatus {
  name: IoEngineName;
  /** Why this engine: forced, or why io_uring could not be used. */
  reason: string;
}

/** UBCACHE_IO_ENGINE=io_uring, but io_uring cannot be used here. */
export class IoEngineUnavailableError extends Error {
  readonly code = 'ENOTSUP';
  constructor(message: string) {
    super(message);
    this.name = 'IoEngineUnavailableError';
  }
}

let chosen: { engine: IoEngine; status: IoEngineStatus } | undefined;
let logged = false;
let poolNote: string | undefined;

function ioUringDisabledSysctl(): string | undefined {
  try {
    return fs.readFileSync('/proc/sys/kernel/io_uring_disabled', 'utf8').trim();
  } catch {
    return undefined;
  }
}

/** io_uring, or why not. */
function tryUring(): { engine: UringEngine } | { why: string } {
  const native = loadNative();
  if (native === null) {
    return {
      why: nativeDisabledByEnv()
        ? 'the native addon is disabled (UBCACHE_NO_NATIVE)'
        : 'the native addon is not built (needs a C compiler; run `npm run build`)',
    };
  }
  if (native.uring === null) {
    return {
      why: 'the native addon was built without io_uring (liburing-dev was not installed; install it and run `npm run build`)',
    };
  }
  try {
    return { engine: new UringEngine(native.uring) };
  } catch (err) {
    const code = (err as { code?: unknown }).code;
    const detail = err instanceof Error ? err.message : String(err);
    if (code === 'EPERM' || code === 'ENOSYS') {
      const sysctl = ioUringDisabledSysctl();
      const where =
        sysctl !== undefined && sysctl !== '0'
          ? `kernel.io_uring_disabled is ${sysctl}`
          : code === 'EPERM'
            ? 'a seccomp filter refuses it (container runtimes often do)'
            : 'the kernel was built without it, or a seccomp filter refuses it';
      return { why: `io_uring is unavailable (${detail}): ${where}` };
    }
    return { why: `io_uring setup failed (${detail})` };
  }
}

function choose(): { engine: IoEngine; status: IoEngineStatus } {
  const forced = process.env['UBCACHE_IO_ENGINE'];
  if (forced !== undefined && forced !== '' && forced !== 'io_uring' && forced !== 'threadpool') {
    throw new IoEngineUnavailableError(`UBCACHE_IO_ENGINE=${forced} is not an engine; use io_uring or threadpool`);
  }
  if (forced === 'threadpool') {
    return { engine: new ThreadPoolEngine(), status: { name: 'threadpool', reason: 'UBCACHE_IO_ENGINE=threadpool' } };
  }
  const u = tryUring();
  if ('engine' in u) {
    const reason = forced === 'io_uring' ? 'UBCACHE_IO_ENGINE=io_uring' : 'the kernel and the addon support it';
    return { engine: u.engine, status: { name: 'io_uring', reason } };
  }
  if (forced === 'io_uring') {
    throw new IoEngineUnavailableError(
      `UBCACHE_IO_ENGINE=io_uring, but ${u.why}; unset UBCACHE_IO_ENGINE to use the thread pool`,
    );
  }
  return { engine: new ThreadPoolEngine(), status: { name: 'threadpool', reason: u.why } };
}

function chooseOnce(): { engine: IoEngine; status: IoEngineStatus } {
  chosen ??= choose();
  return chosen;
}

/**
 * The engine this process uses, without logging: chosen on the first call
 * (creating the ring). Throws IoEngineUnavailableError when io_uring is
 * forced but unavailable, or UBCACHE_IO_ENGINE names no engine.
 */
export function ioEngineStatus(): IoEngineStatus {
  return chooseOnce().status;
}

/** libuv's pool size as this process has it: UV_THREADPOOL_SIZE (clamped as libuv does), else 4. */
export function threadPoolSize(): number {
  const n = Number.parseInt(process.env['UV_THREADPOOL_SIZE'] ?? '', 10);
  if (!Number.isFinite(n) || n <= 0) return 4;
  return Math.min(n, 1024);
}

/** What the log line says about the pool's size (the CLI sets it when it sized the pool). */
export function setThreadPoolNote(note: string): void {
  poolNote = note;
}

function describe(status: IoEngineStatus): string {
  if (status.name === 'io_uring') {
    return `I/O engine: io_uring (${status.reason}; up to ${URING_CAPACITY} requests in flight)`;
  }
  return `I/O engine: thread pool (${status.reason}); ${poolNote ?? `${threadPoolSize()} threads`}`;
}

/** The process's engine, chosen on first use; the choice and its reason are logged once. */
export function ioEngine(): IoEngine {
  const c = chooseOnce();
  if (!logged) {
    logged = true;
    log.info(describe(c.status));
  }
  return c.engine;
}
