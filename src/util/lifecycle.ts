// Lifecycle primitives: the structure that makes bcache's worst lifecycle bugs
// impossible (DESIGN.md, "Lifecycle rules").
//
// - A Worker is a background activity owned by exactly one object. stop() aborts
//   it and awaits its end; it is idempotent and bounded.
// - There are no self-re-arming timers: periodic work is a loop around an
//   abortable sleep, so once stop() has returned no step can run again (the seed
//   bug: bcache's writeback-rate update re-armed itself after cancel and touched
//   a freed cache set).
// - A RefCount is taken by a worker when it starts and dropped when it exits,
//   never on state transitions (the seed bug: cached_dev->count held by the
//   writeback thread from clean->dirty until dirty->clean, forever if the cache
//   died).

import { realClock, type Clock, type Timer } from './clock.ts';
import { log } from './log.ts';

/** One macrotask turn: timers and I/O callbacks run before the caller goes on (long walks yield with it). */
export const nextTurn = (): Promise<void> => new Promise<void>((resolve) => setImmediate(resolve));

/**
 * Sleep for `ms` milliseconds of `clock` or until `signal` aborts, whichever
 * is first. Resolves true if the full time elapsed, false if aborted. Never
 * rejects, and leaves no timer or listener behind either way.
 */
export function sleep(ms: number, signal?: AbortSignal, clock: Clock = realClock): Promise<boolean> {
  return clock.sleep(ms, signal);
}

/** The signal's state as a call, so that a check after an await is not narrowed away by TypeScript. */
export function aborted(signal: AbortSignal): boolean {
  return signal.aborted;
}

/** A promise with its resolve/reject exposed. */
export interface Deferred<T> {
  readonly promise: Promise<T>;
  resolve(value: T): void;
  reject(reason: unknown): void;
}

export function deferred<T = void>(): Deferred<T> {
  let resolve!: (value: T) => void;
  let reject!: (reason: unknown) => void;
  const promise = new Promise<T>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  return { promise, resolve, reject };
}

/**
 * A latched wake-up signal for event-driven workers. notify() before wait()
 * is not lost: the next wait() returns at once. This is the userspace form of
 * bcache's "check the stop condition after arming the wake-up" fix (2018
 * series, patch 2): a waiter can never miss a wake.
 */
export class Notifier {
  private pending = false;
  private waiter: Deferred<boolean> | undefined;
  /** Whose time a wait's timeout is measured in. */
  private readonly clock: Clock;

  constructor(clock: Clock = realClock) {
    this.clock = clock;
  }

  notify(): void {
    const w = this.waiter;
    if (w) {
      this.waiter = undefined;
      w.resolve(true);
    } else {
      this.pending = true;
    }
  }

  /**
   * Wait for a notify(), an abort, or `timeoutMs` (if given). Resolves true on
   * a notification, false on abort or timeout.
   */
  wait(signal: AbortSignal, timeoutMs?: number): Promise<boolean> {
    if (this.pending) {
      this.pending = false;
      return Promise.resolve(true);
    }
    if (signal.aborted) return Promise.resolve(false);
    if (this.waiter) throw new Error('Notifier: only one waiter at a time');
    const d = deferred<boolean>();
    this.waiter = d;
    const finish = (value: boolean): void => {
      if (this.waiter === d) this.waiter = undefined;
      timer?.cancel();
      signal.removeEventListener('abort', onAbort);
      d.resolve(value);
    };
    const onAbort = (): void => {
      finish(false);
    };
    signal.addEventListener('abort', onAbort, { once: true });
    const timer: Timer | undefined =
      timeoutMs === undefined
        ? undefined
        : this.clock.setTimer(Math.max(0, timeoutMs), () => {
            finish(false);
          });
    return d.promise.then((v) => {
      // notify() resolved it directly: clean up the timer and listener.
      timer?.cancel();
      signal.removeEventListener('abort', onAbort);
      return v;
    });
  }
}

export type WorkerState = 'new' | 'running' | 'stopping' | 'stopped';

export interface WorkerOptions {
  /** How long stop() waits for the body to finish before it logs and returns. */
  stopTimeoutMs?: number;
  /** Called once when the body exits (normally, by abort, or by throwing). */
  onExit?: (error: unknown) => void;
  /** The scope it belongs to; default: the scope running when start() is called (WorkerScope.run). */
  scope?: WorkerScope;
  /** Whose time the stop timeout and a periodic worker's interval are measured in (default: real time). */
  clock?: Clock | undefined;
}

let currentScope: WorkerScope | undefined;

function runInScope<T>(scope: WorkerScope, fn: () => T): T {
  const outer = currentScope;
  currentScope = scope;
  try {
    return fn();
  } finally {
    currentScope = outer;
  }
}

/**
 * Who owns a group of workers, so that an owner can stop all of them without
 * keeping a list that goes stale when someone adds a worker (the 2018 series'
 * lesson: the rate-update work was the one nobody stopped). A worker started
 * inside scope.run() belongs to that scope; scopes nest (a cache set's scope
 * holds each attachment's), and stopAll() stops every live worker of the
 * scope and of its children.
 */
export class WorkerScope {
  readonly name: string;
  readonly parent: WorkerScope | undefined;

  constructor(name: string, parent?: WorkerScope) {
    this.name = name;
    this.parent = parent;
  }

  /** Run `fn` synchronously; workers it starts belong to this scope. */
  run<T>(fn: () => T): T {
    return runInScope(this, fn);
  }

  /** Is `w` in this scope or one nested in it? */
  owns(w: Worker): boolean {
    for (let s = w.scope; s; s = s.parent) if (s === this) return true;
    return false;
  }

  /** The workers of this scope (and nested ones) that have started and not ended. */
  live(): Worker[] {
    return [...liveWorkers].filter((w) => this.owns(w));
  }

  /** Stop every live worker of the scope, all at once, each bounded by its own stop timeout. */
  async stopAll(): Promise<void> {
    await Promise.all(this.live().map((w) => w.stop()));
  }
}

/** Process-wide registry of workers that have started and not yet ended, for tests and leak checks. */
const liveWorkers = new Set<Worker>();

/**
 * A background activity with an owner. The body receives an AbortSignal and
 * must return promptly once it aborts; every await inside it should be either
 * abortable (sleep, Notifier.wait) or bounded I/O.
 */
export class Worker {
  readonly name: string;
  private readonly body: (signal: AbortSignal) => Promise<void>;
  private readonly controller = new AbortController();
  private readonly stopTimeoutMs: number;
  private readonly onExit: ((error: unknown) => void) | undefined;
  readonly clock: Clock;
  /** Set at start(): the owning scope, if any. */
  scope: WorkerScope | undefined;
  private readonly explicitScope: WorkerScope | undefined;
  private statePriv: WorkerState = 'new';
  private endPromise: Promise<void> | undefined;
  /** Number of completed steps (periodic workers) or loop turns reported via step(). */
  steps = 0;

  constructor(name: string, body: (signal: AbortSignal) => Promise<void>, options: WorkerOptions = {}) {
    this.name = name;
    this.body = body;
    this.stopTimeoutMs = options.stopTimeoutMs ?? 60_000;
    this.onExit = options.onExit;
    this.explicitScope = options.scope;
    this.clock = options.clock ?? realClock;
  }

  /** A worker that runs `step` every `intervalMs()` until stopped (never self-re-arming). */
  static periodic(
    name: string,
    intervalMs: () => number,
    step: (signal: AbortSignal) => Promise<void>,
    options: WorkerOptions = {},
  ): Worker {
    const w: Worker = new Worker(
      name,
      async (signal) => {
        while (!signal.aborted) {
          if (!(await w.clock.sleep(intervalMs(), signal))) break;
          await step(signal);
          w.steps++;
        }
      },
      options,
    );
    return w;
  }

  static live(): ReadonlySet<Worker> {
    return liveWorkers;
  }

  get state(): WorkerState {
    return this.statePriv;
  }

  get signal(): AbortSignal {
    return this.controller.signal;
  }

  /** Resolves when the body has ended (never rejects). */
  get ended(): Promise<void> {
    return this.endPromise ?? Promise.resolve();
  }

  start(): this {
    if (this.statePriv !== 'new') throw new Error(`worker ${this.name}: start() called in state ${this.statePriv}`);
    this.statePriv = 'running';
    this.scope = this.explicitScope ?? currentScope;
    liveWorkers.add(this);
    let failure: unknown = undefined;
    this.endPromise = (async () => {
      try {
        await this.body(this.controller.signal);
      } catch (err) {
        failure = err;
        if (!this.controller.signal.aborted) log.error(`worker ${this.name} failed: ${errorMessage(err)}`);
      } finally {
        this.statePriv = 'stopped';
        liveWorkers.delete(this);
        try {
          this.onExit?.(failure);
        } catch (err) {
          log.error(`worker ${this.name}: exit hook failed: ${errorMessage(err)}`);
        }
      }
    })();
    return this;
  }

  /**
   * Abort the worker and wait for its body to end. Idempotent. Bounded: past
   * the stop timeout it logs and returns (the body keeps its abort signal and
   * will still end on its own; nothing restarts it).
   */
  async stop(): Promise<void> {
    if (this.statePriv === 'new') {
      this.statePriv = 'stopped';
      return;
    }
    if (this.statePriv === 'running') this.statePriv = 'stopping';
    // A plain reason: the default DOMException keeps the stack of whoever
    // stopped the worker, receivers included (a whole cache set), alive as
    // long as the worker object is.
    this.controller.abort('worker stopped');
    const end = this.endPromise;
    if (!end) return;
    let timer: Timer | undefined;
    const timedOut = await Promise.race([
      end.then(() => false),
      new Promise<boolean>((resolve) => {
        timer = this.clock.setTimer(this.stopTimeoutMs, () => {
          resolve(true);
        });
      }),
    ]);
    timer?.cancel();
    if (timedOut) log.warn(`worker ${this.name}: gave up waiting ${this.stopTimeoutMs} ms for it to stop`);
  }
}

/**
 * A reference count with bcache's cached_dev->count semantics: get() fails
 * once the count has reached zero (like atomic_inc_not_zero), and reaching
 * zero runs onZero exactly once. Used for two-phase detach: the attachment
 * holds one reference, each in-flight request and each worker one more; detach
 * drops the attachment's reference and completes when the rest drain.
 */
export class RefCount {
  private n: number;
  private readonly onZero: () => void;
  private zeroed = false;

  constructor(onZero: () => void, initial = 1) {
    this.n = initial;
    this.onZero = onZero;
  }

  get count(): number {
    return this.n;
  }

  get isZero(): boolean {
    return this.zeroed;
  }

  /** Take a reference; false if the count already reached zero. */
  tryGet(): boolean {
    if (this.zeroed) return false;
    this.n++;
    return true;
  }

  put(): void {
    if (this.zeroed || this.n <= 0) throw new Error('RefCount: put() without a matching reference');
    this.n--;
    if (this.n === 0) {
      this.zeroed = true;
      this.onZero();
    }
  }
}

/** A FIFO async mutex, for the few places that must hold exclusion across awaits. */
export class Mutex {
  private locked = false;
  private readonly queue: (() => void)[] = [];

  get isLocked(): boolean {
    return this.locked;
  }

  async lock(): Promise<() => void> {
    if (this.locked) {
      await new Promise<void>((resolve) => this.queue.push(resolve));
    }
    this.locked = true;
    let released = false;
    return () => {
      if (released) return;
      released = true;
      const next = this.queue.shift();
      if (next) next();
      else this.locked = false;
    };
  }

  async run<T>(fn: () => Promise<T>): Promise<T> {
    const release = await this.lock();
    try {
      return await fn();
    } finally {
      release();
    }
  }
}

/**
 * Promise.all for I/O: waits for every promise before it rejects with the
 * first failure, so that nothing is left in flight behind an error (a stop
 * that follows must not return while a write it does not know of is still
 * running; docs/design.md, lifecycle rule 5).
 */
export async function allDone<T>(promises: readonly Promise<T>[]): Promise<T[]> {
  const results = await Promise.allSettled(promises);
  const values: T[] = [];
  for (const r of results) {
    if (r.status === 'rejected') throw r.reason;
    values.push(r.value);
  }
  return values;
}

export function errorMessage(err: unknown): string {
  if (err instanceof Error) return err.message;
  return String(err);
}

/**
 * A rejected promise for what a synchronous check threw: for hot-path
 * functions that return a promise without being async (an async function
 * costs a promise and a frame per call), so a failed check still rejects
 * rather than throws, as it would in an async function.
 */
export function rejectWith(err: unknown): Promise<never> {
  return Promise.reject(err instanceof Error ? err : new Error(String(err)));
}
