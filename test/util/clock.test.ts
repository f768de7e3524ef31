// The injected clock (src/util/clock.ts): the simulated one moves only when
// told and fires timers in (due time, creation order); the lifecycle
// primitives measure their waits in whichever clock they are given.

import assert from 'node:assert/strict';
import test from 'node:test';
import { realClock, SimClock } from '../../src/util/clock.ts';
import { settledWithin } from '../../src/util/deadline.ts';
import { Notifier, sleep, Worker } from '../../src/util/lifecycle.ts';

test('SimClock: time stands still until advanced; timers fire in due order, ties in creation order', async () => {
  const clock = new SimClock(1000);
  const fired: string[] = [];
  clock.setTimer(30, () => fired.push('c'));
  clock.setTimer(10, () => fired.push('a'));
  clock.setTimer(10, () => fired.push('b'));
  const cancelled = clock.setTimer(20, () => fired.push('x'));
  cancelled.cancel();
  assert.equal(clock.now(), 1000);
  assert.equal(clock.pending, 3);
  await clock.advance(15);
  assert.deepEqual(fired, ['a', 'b']);
  assert.equal(clock.now(), 1015);
  await clock.advance(100);
  assert.deepEqual(fired, ['a', 'b', 'c']);
  assert.equal(clock.now(), 1115);
  assert.equal(clock.pending, 0);
});

test('SimClock: a continuation a timer wakes runs before the next timer, and can set an earlier one', async () => {
  const clock = new SimClock();
  const order: string[] = [];
  void (async () => {
    await clock.sleep(5);
    order.push(`woke at ${clock.now()}`);
    await clock.sleep(1);
    order.push(`again at ${clock.now()}`);
  })();
  clock.setTimer(7, () => order.push(`timer at ${clock.now()}`));
  assert.equal(await clock.runUntilIdle(), true);
  assert.deepEqual(order, ['woke at 5', 'again at 6', 'timer at 7']);
});

test('SimClock.runUntil: ends when the promise settles, or at the bound with time at the bound', async () => {
  const clock = new SimClock();
  assert.equal(await clock.runUntil(clock.sleep(250), 1000), true);
  assert.equal(clock.now(), 250);
  assert.equal(await clock.runUntil(new Promise<never>(() => undefined), 1000), false);
  assert.equal(clock.now(), 1250);
});

test('the lifecycle primitives wait on the clock they are given: no real time passes', async () => {
  const clock = new SimClock();
  const ac = new AbortController();
  const slept = sleep(60_000, ac.signal, clock);
  const n = new Notifier(clock);
  const timedOut = n.wait(ac.signal, 30_000);
  const bounded = settledWithin(new Promise(() => undefined), 45_000, clock);
  let steps = 0;
  const w = Worker.periodic(
    'sim periodic',
    () => 10_000,
    () => {
      steps++;
      return Promise.resolve();
    },
    { clock },
  ).start();
  const t0 = performance.now();
  await clock.advance(60_000);
  assert.equal(await slept, true);
  assert.equal(await timedOut, false);
  assert.equal(await bounded, false);
  assert.equal(steps, 6);
  const stopped = w.stop();
  assert.equal(await clock.runUntil(stopped, 1), true);
  assert.ok(performance.now() - t0 < 1000, 'a simulated minute takes no real minute');
  assert.equal(clock.pending, 0, 'no timer left behind');
});

test('a stop bound on the simulated clock gives up at the bound', async () => {
  const clock = new SimClock();
  const w = new Worker('ignores abort', () => new Promise<void>(() => undefined), { stopTimeoutMs: 5000, clock });
  w.start();
  const stopped = w.stop();
  assert.equal(await clock.runUntil(stopped, 4999), false);
  assert.equal(await clock.runUntil(stopped, 1), true);
  assert.equal(clock.now(), 5000);
});

test('the real clock: a timer fires, a cancelled one does not, sleep aborts', async () => {
  let fired = 0;
  realClock.setTimer(1, () => fired++).cancel();
  await new Promise<void>((resolve) => realClock.setTimer(5, resolve));
  assert.equal(fired, 0);
  const ac = new AbortController();
  const s = realClock.sleep(60_000, ac.signal);
  ac.abort();
  assert.equal(await s, false);
});
