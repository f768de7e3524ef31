// One injected source of time (docs/design.md, lifecycle rule 6). Every
// duration, deadline and timer of the engine goes through a Clock, so that the
// same engine runs on real time in production and on simulated time in tests
// and in the simulator (src/sim/), where time moves only when the driver says
// so and timers fire in one deterministic order. That is what makes a run
// replayable from its seed: no real timer and no reading of the machine's
// clock is left on the engine's path.

/** A pending timer; cancel() is idempotent and harmless after it fired. */
export interface Timer {
  cancel(): void;
}

export interface Clock {
  /** Milliseconds on a monotonic clock (only differences mean anything). */
  now(): number;
  /** Run `fn` once, `ms` from now (at the earliest). */
  setTimer(ms: number, fn: () => void): Timer;
  /**
   * Sleep for `ms` or until `signal` aborts, whichever is first. Resolves
   * true if the full time elapsed, false if aborted. Never rejects, and
   * leaves no timer or listener behind either way.
   */
  sleep(ms: number, signal?: AbortSignal): Promise<boolean>;
}

/** setTimeout takes at most 2^31-1 ms (a larger delay fires at once): longer timers are re-armed in steps. */
const MAX_TIMER_MS = 2 ** 31 - 1;

function sleepOn(clock: Pick<Clock, 'setTimer'>, ms: number, signal?: AbortSignal): Promise<boolean> {
  if (signal?.aborted) return Promise.resolve(false);
  return new Promise<boolean>((resolve) => {
    const onAbort = (): void => {
      timer.cancel();
      resolve(false);
    };
    const timer = clock.setTimer(Math.max(0, ms), () => {
      signal?.removeEventListener('abort', onAbort);
      resolve(true);
    });
    signal?.addEventListener('abort', onAbort, { once: true });
  });
}

/** The machine's clock: performance.now() and setTimeout. Production uses it. */
class RealClock implements Clock {
  now(): number {
    return performance.now();
  }

  setTimer(ms: number, fn: () => void): Timer {
    let handle: NodeJS.Timeout | undefined;
    let cancelled = false;
    const arm = (left: number): void => {
      const step = Math.min(Math.max(0, left), MAX_TIMER_MS);
      handle = setTimeout(() => {
        if (left > step) arm(left - step);
        else fn();
      }, step);
    };
    arm(ms);
    return {
      cancel: () => {
        if (cancelled) return;
        cancelled = true;
        clearTimeout(handle);
      },
    };
  }

  sleep(ms: number, signal?: AbortSignal): Promise<boolean> {
    return sleepOn(this, ms, signal);
  }
}

/** The one real clock; the default wherever no clock is given. */
export const realClock: Clock = new RealClock();

interface SimTimer {
  readonly at: number;
  /** Creation order: timers due at the same time fire in the order they were set. */
  readonly seq: number;
  readonly fn: () => void;
  cancelled: boolean;
}

/**
 * Lets every promise continuation that is ready run: one macrotask turn, after
 * which the microtask queue is empty. The simulated engine does its I/O on
 * memory and its waiting on the SimClock, so nothing else can be pending.
 */
export function settle(): Promise<void> {
  return new Promise<void>((resolve) => setImmediate(resolve));
}

/**
 * Simulated time: now() stands still until advance(), run() or runUntil()
 * moves it, and timers fire in (due time, creation order), each after every
 * continuation the previous one made ready has run. A single-process run on
 * a SimClock whose inputs come from a seed is therefore deterministic.
 */
export class SimClock implements Clock {
  private nowMs: number;
  private seq = 0;
  /** Pending timers, kept sorted by (at, seq): few are pending at once, so an insertion sort is enough. */
  private readonly timers: SimTimer[] = [];
  /** Timers fired so far (a cheap progress measure for the simulator's trace). */
  fired = 0;

  constructor(startMs = 0) {
    this.nowMs = startMs;
  }

  now(): number {
    return this.nowMs;
  }

  setTimer(ms: number, fn: () => void): Timer {
    // An infinite wait never fires (the real clock's equivalent is a timer that is never due).
    if (Number.isNaN(ms) || ms === Infinity) return { cancel: () => undefined };
    const t: SimTimer = { at: this.nowMs + Math.max(0, ms), seq: this.seq++, fn, cancelled: false };
    let i = this.timers.length;
    while (i > 0) {
      const prev = this.timers[i - 1];
      if (prev === undefined || prev.at < t.at || (prev.at === t.at && prev.seq < t.seq)) break;
      i--;
    }
    this.timers.splice(i, 0, t);
    return {
      cancel: () => {
        if (t.cancelled) return;
        t.cancelled = true;
        const j = this.timers.indexOf(t);
        if (j >= 0) this.timers.splice(j, 1);
      },
    };
  }

  sleep(ms: number, signal?: AbortSignal): Promise<boolean> {
    return sleepOn(this, ms, signal);
  }

  /** Timers set and neither fired nor cancelled. */
  get pending(): number {
    return this.timers.length;
  }

  /** When the next timer is due (undefined: none pending). */
  nextDue(): number | undefined {
    return this.timers[0]?.at;
  }

  /**
   * Fire the next timer due at or before `limit`, after letting every ready
   * continuation run; false if none is due by then (time does not move).
   */
  async step(limit = Infinity): Promise<boolean> {
    await settle();
    const t = this.timers[0];
    if (t === undefined || t.at > limit) return false;
    this.timers.shift();
    this.nowMs = Math.max(this.nowMs, t.at);
    this.fired++;
    t.fn();
    await settle();
    return true;
  }

  /** Move time forward by `ms`, firing every timer due meanwhile in order. */
  async advance(ms: number): Promise<void> {
    const target = this.nowMs + Math.max(0, ms);
    while (await this.step(target));
    this.nowMs = target;
    await settle();
  }

  /**
   * Run until `done` settles or `maxMs` of simulated time has passed,
   * whichever is first; true if it settled. Time moves only as far as the
   * timers that fire need it to.
   */
  async runUntil(done: Promise<unknown>, maxMs: number): Promise<boolean> {
    let settled = false;
    const mark = (): void => {
      settled = true;
    };
    // A call, so that TypeScript does not narrow the flag that the callbacks set.
    const isSettled = (): boolean => settled;
    void done.then(mark, mark);
    const limit = this.nowMs + maxMs;
    await settle();
    while (!isSettled()) {
      if (await this.step(limit)) continue;
      // Nothing left to fire before the limit: the wait cannot end by then (unless the last settle ended it).
      if (!isSettled()) this.nowMs = Math.max(this.nowMs, limit);
      break;
    }
    return isSettled();
  }

  /**
   * Run until `p` settles and return its value (or throw its error); past
   * `maxMs` of simulated time, throw: whatever it waits for is not coming.
   * Tests await every engine call through this.
   */
  async run<T>(p: Promise<T>, maxMs = 3_600_000): Promise<T> {
    void p.catch(() => undefined); // rejections are the caller's, from the await below
    if (!(await this.runUntil(p, maxMs)))
      throw new Error(`SimClock: still waiting after ${maxMs} ms of simulated time`);
    return p;
  }

  /** Fire timers until none is pending or `maxMs` has passed; true if it went idle. */
  async runUntilIdle(maxMs = Infinity): Promise<boolean> {
    const limit = this.nowMs + maxMs;
    while (await this.step(limit));
    return this.timers.length === 0;
  }
}
