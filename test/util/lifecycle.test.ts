import { test } from 'node:test';
import assert from 'node:assert/strict';
import { sleep, Notifier, Worker, RefCount, Mutex, deferred } from '../../src/util/lifecycle.ts';
import { captureLog } from '../../src/util/log.ts';

function timersActive(): number {
  return process.getActiveResourcesInfo().filter((r) => r === 'Timeout').length;
}

test('sleep resolves true after the delay and false when aborted, leaving no timer', async () => {
  const before = timersActive();
  assert.equal(await sleep(1), true);
  const ac = new AbortController();
  const p = sleep(60_000, ac.signal);
  assert.equal(timersActive(), before + 1);
  ac.abort();
  assert.equal(await p, false);
  assert.equal(timersActive(), before);
  assert.equal(await sleep(60_000, ac.signal), false, 'an already-aborted signal returns at once');
});

test('Notifier latches a notify that comes before the wait', async () => {
  const n = new Notifier();
  const ac = new AbortController();
  n.notify();
  assert.equal(await n.wait(ac.signal), true);
  const p = n.wait(ac.signal);
  n.notify();
  assert.equal(await p, true);
  const q = n.wait(ac.signal, 60_000);
  ac.abort();
  assert.equal(await q, false);
  assert.equal(timersActive(), 0);
});

test('a periodic worker never runs a step after stop() returns, even when stop comes mid-step', async () => {
  const entered = deferred();
  const release = deferred();
  let stepsStarted = 0;
  let stepsFinished = 0;
  let stopped = false;
  const w = Worker.periodic(
    'test-periodic',
    () => 0,
    async () => {
      assert.equal(stopped, false, 'a step ran after stop() returned');
      stepsStarted++;
      if (stepsStarted === 3) {
        entered.resolve();
        await release.promise; // blocked "in I/O" when stop() is called
      }
      stepsFinished++;
    },
  ).start();
  assert.ok(Worker.live().has(w));
  await entered.promise;
  const stopping = w.stop();
  assert.equal(w.state, 'stopping');
  release.resolve();
  await stopping;
  stopped = true;
  assert.equal(w.state, 'stopped');
  assert.equal(stepsStarted, 3);
  assert.equal(stepsFinished, 3, 'the step in flight was allowed to finish');
  assert.equal(Worker.live().has(w), false);
  await w.stop(); // idempotent
  assert.equal(timersActive(), 0);
});

test('stop() is bounded: a body that ignores abort is given up on with a warning', async () => {
  const cap = captureLog();
  const hang = deferred();
  const w = new Worker('stubborn', () => hang.promise, { stopTimeoutMs: 20 }).start();
  await w.stop();
  cap.restore();
  assert.match(cap.lines.join('\n'), /stubborn: gave up waiting 20 ms/);
  hang.resolve();
  await w.ended;
  assert.equal(w.state, 'stopped');
});

test('a worker body that throws is logged and ends; onExit sees the error', async () => {
  const cap = captureLog();
  const exit = deferred<unknown>();
  const w = new Worker('thrower', () => Promise.reject(new Error('boom')), {
    onExit: (e) => {
      exit.resolve(e);
    },
  }).start();
  await w.ended;
  cap.restore();
  assert.match(String(await exit.promise), /boom/);
  assert.match(cap.lines.join('\n'), /worker thrower failed: boom/);
});

test('stop() before start() just marks the worker stopped', async () => {
  const w = new Worker('never', () => Promise.resolve());
  await w.stop();
  assert.equal(w.state, 'stopped');
  assert.throws(() => w.start(), /start\(\) called in state stopped/);
});

test('RefCount: zero runs onZero once, and tryGet fails afterwards', () => {
  let zeros = 0;
  const r = new RefCount(() => zeros++);
  assert.equal(r.tryGet(), true);
  r.put();
  assert.equal(zeros, 0);
  r.put();
  assert.equal(zeros, 1);
  assert.equal(r.tryGet(), false);
  assert.throws(() => {
    r.put();
  }, /without a matching reference/);
});

test('Mutex serialises critical sections in FIFO order', async () => {
  const m = new Mutex();
  const order: number[] = [];
  const gate = deferred();
  const a = m.run(async () => {
    await gate.promise;
    order.push(1);
  });
  const b = m.run(() => {
    order.push(2);
    return Promise.resolve();
  });
  const c = m.run(() => {
    order.push(3);
    return Promise.resolve();
  });
  assert.equal(m.isLocked, true);
  gate.resolve();
  await Promise.all([a, b, c]);
  assert.deepEqual(order, [1, 2, 3]);
  assert.equal(m.isLocked, false);
});

test('an owner whose worker stopped can be garbage-collected', async (t) => {
  if (typeof globalThis.gc !== 'function') {
    t.skip('needs --expose-gc');
    return;
  }
  class Owner {
    readonly worker = Worker.periodic(
      'owned',
      () => 1,
      () => Promise.resolve(),
    );
  }
  // The owner lives only inside this function, so nothing but the WeakRef remains.
  const startAndStop = async (): Promise<WeakRef<Owner>> => {
    const owner = new Owner();
    owner.worker.start();
    await owner.worker.stop();
    return new WeakRef(owner);
  };
  const ref = await startAndStop();
  for (let i = 0; i < 10 && ref.deref() !== undefined; i++) {
    await new Promise((r) => setImmediate(r));
    globalThis.gc();
  }
  assert.equal(ref.deref(), undefined, 'the stopped owner is still reachable');
});
