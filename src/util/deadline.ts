// Bounded waits for shutdown paths (DESIGN rule 1: stop is bounded; past its
// bound it logs and proceeds, never hangs). The wait leaves no timer behind
// either way, and the promise waited for keeps running: whoever gives up on
// it must make sure its late settling is harmless.

import { realClock, type Clock, type Timer } from './clock.ts';

const MAX_TIMER_MS = 2 ** 31 - 1;

/**
 * Wait for `p` at most `ms` milliseconds. Resolves true if it settled in
 * time (fulfilled or rejected: a stop path wants "done", not the value),
 * false past the bound. Never rejects.
 */
export async function settledWithin(p: Promise<unknown>, ms: number, clock: Clock = realClock): Promise<boolean> {
  const done = p.then(
    () => true,
    () => true,
  );
  // setTimeout takes at most 2^31-1 ms (a larger delay fires at once): a bound that large is no bound.
  if (!(ms < MAX_TIMER_MS)) return done;
  let timer: Timer | undefined;
  try {
    return await Promise.race([
      done,
      new Promise<boolean>((resolve) => {
        timer = clock.setTimer(Math.max(0, ms), () => {
          resolve(false);
        });
      }),
    ]);
  } finally {
    timer?.cancel();
  }
}

/** Milliseconds left until `deadline` (a time of `clock`), never negative. */
export function msLeft(deadline: number, clock: Clock = realClock): number {
  return Math.max(0, deadline - clock.now());
}
