// The writeback rate PI controller (writeback-rate.ts): its step against
// values worked out by hand from the kernel's integer arithmetic
// (__update_writeback_rate, __calc_target_rate), its properties, the
// lifecycle of its periodic update, and real writeback driven by it.

import assert from 'node:assert/strict';
import test from 'node:test';
import fc from 'fast-check';
import { DEVICE_ATTRIBUTES, findAttribute, SET_ATTRIBUTES } from '../../src/bcache/attributes.ts';
import {
  targetSectors,
  updateWritebackRate,
  updateSecondsClamped,
  WRITEBACK_RATE_MAX,
  writebackThrottled,
  type RateInputs,
  type RateStep,
  type WritebackRateUpdate,
} from '../../src/bcache/writeback-rate.ts';
import { writebackRateDebug } from '../../src/bcache/sysfs/device-dir.ts';
import { SimClock } from '../../src/util/clock.ts';
import { Worker } from '../../src/util/lifecycle.ts';
import { assertNothingLeft, sectorData } from './helpers.ts';
import { makePair } from './request-helpers.ts';

const S = 512;

/** 1024 buckets of 1024 sectors, one backing device, the kernel's default terms. */
function inputs(o: Partial<RateInputs> = {}): RateInputs {
  return {
    dirty: 0,
    cacheSectors: 1024 * 1024,
    bdevSectors: 4_000_000,
    cachedDevSectors: 4_000_000,
    writebackPercent: 10,
    pTermInverse: 40,
    iTermInverse: 10000,
    minimum: 8,
    updateSeconds: 5,
    rate: 1024,
    integral: 0,
    keepingUp: true,
    considerFragment: true,
    inUse: 10,
    nbuckets: 1024,
    availBuckets: 920,
    bucketSize: 1024,
    fpTermLow: 1,
    fpTermMid: 10,
    fpTermHigh: 1000,
    ...o,
  };
}

test('target: writeback_percent of the cache, apportioned by the device share in 1/16384ths', () => {
  // 10% of 1048576 sectors = 104857 (truncated), all of it for a lone device.
  assert.equal(targetSectors(inputs()), 104857);
  // One device of 1e6 sectors among 3e6: share = (1e6 << 14) / 3e6 = 5461; 104857 * 5461 >> 14 = 34950.
  assert.equal(targetSectors(inputs({ bdevSectors: 1_000_000, cachedDevSectors: 3_000_000 })), 34950);
  // A tiny device still gets one share: 104857 >> 14 = 6.
  assert.equal(targetSectors(inputs({ bdevSectors: 1, cachedDevSectors: 1_000_000_000 })), 6);
  assert.equal(targetSectors(inputs({ writebackPercent: 0 })), 0);
});

test('above target the rate rises: P = error / p_term_inverse, the integral grows while writeback keeps up', () => {
  // error = 200000 - 104857 = 95143; P = 95143 / 40 = 2378; integral = 95143 * 5 = 475715, I = 47.
  const up = updateWritebackRate(inputs({ dirty: 200_000 }));
  assert.deepEqual(up, {
    rate: 2425,
    target: 104857,
    proportional: 2378,
    integral: 475715,
    integralScaled: 47,
    change: 2425 - 1024,
  });
  // Not keeping up (the limiter's schedule is behind): the integral does not wind up.
  const behind = updateWritebackRate(inputs({ dirty: 200_000, keepingUp: false }));
  assert.equal(behind.integral, 0);
  assert.equal(behind.rate, 2378);
});

test('below target the rate falls to writeback_rate_minimum; a positive integral unwinds, a zero one stays', () => {
  // error = 50000 - 104857 = -54857; P = -1371 (truncated toward zero).
  const down = updateWritebackRate(inputs({ dirty: 50_000 }));
  assert.deepEqual(down, {
    rate: 8,
    target: 104857,
    proportional: -1371,
    integral: 0,
    integralScaled: 0,
    change: -1016,
  });
  // integral 475715 - 54857 * 5 = 201430 -> I = 20; P + I is still negative.
  const unwinding = updateWritebackRate(inputs({ dirty: 50_000, integral: 475715 }));
  assert.equal(unwinding.integral, 201430);
  assert.equal(unwinding.integralScaled, 20);
  assert.equal(unwinding.rate, 8);
  assert.equal(updateWritebackRate(inputs({ dirty: 50_000, minimum: 100 })).rate, 100, 'the minimum is a setting');
  // Far above target the rate is capped at NSEC_PER_SEC.
  assert.equal(updateWritebackRate(inputs({ dirty: 1e12 })).rate, WRITEBACK_RATE_MAX);
});

test('a nearly full, fragmented cache raises P by the fragmentation term (in_use above 50)', () => {
  // 724 of 1024 buckets in use (70%), 50000 dirty sectors: fragment = 724 * 1024 / 50000 = 14 > 3;
  // fp_term = 1000 * (70 - 64); fps = (50000 / 724) * 6000 = 69 * 6000 = 414000 replaces P = -1371.
  const full = inputs({ dirty: 50_000, inUse: 70, availBuckets: 300 });
  assert.equal(updateWritebackRate(full).proportional, 414000);
  assert.equal(updateWritebackRate(full).rate, 414000);
  // 55% in use: fp_term = 1 * 5; fps = (50000 / 564) * 5 = 440.
  assert.equal(updateWritebackRate(inputs({ dirty: 50_000, inUse: 55, availBuckets: 460 })).rate, 440);
  // Off with writeback_consider_fragment = 0, and at 50% or below.
  assert.equal(updateWritebackRate({ ...full, considerFragment: false }).rate, 8);
  assert.equal(updateWritebackRate({ ...full, inUse: 50 }).rate, 8);
  // Dirty data in few, full buckets is not fragmented: fragment = 724 * 1024 / 400000 = 1.
  assert.equal(updateWritebackRate({ ...full, dirty: 400_000 }).proportional, Math.trunc((400_000 - 104857) / 40));
});

test('full speed while detaching or with writeback_percent 0; update seconds clamped to [1, 60]', () => {
  assert.equal(writebackThrottled(false, 10), true);
  assert.equal(writebackThrottled(true, 10), false);
  assert.equal(writebackThrottled(false, 0), false);
  assert.deepEqual([0, 1, 5, 60, 61, 1e9].map(updateSecondsClamped), [1, 1, 5, 60, 60, 60]);
});

const arbInputs = fc.record({
  dirty: fc.integer({ min: 0, max: 1e10 }),
  cacheSectors: fc.integer({ min: 1, max: 1e10 }),
  writebackPercent: fc.integer({ min: 0, max: 40 }),
  pTermInverse: fc.integer({ min: 1, max: 1e6 }),
  iTermInverse: fc.integer({ min: 1, max: 1e6 }),
  minimum: fc.integer({ min: 1, max: 1e6 }),
  updateSeconds: fc.integer({ min: 1, max: 60 }),
  rate: fc.integer({ min: 1, max: 0x7fffffff }),
  integral: fc.integer({ min: -1e12, max: 1e12 }),
  keepingUp: fc.boolean(),
  considerFragment: fc.boolean(),
  inUse: fc.integer({ min: 0, max: 100 }),
  availBuckets: fc.integer({ min: 0, max: 1024 }),
});

test('property: rate within [minimum, max]; change is relative to the rate before; the integral never winds up', () => {
  fc.assert(
    fc.property(arbInputs, (o) => {
      const i = inputs(o);
      const r = updateWritebackRate(i);
      assert.ok(r.rate >= i.minimum && r.rate <= WRITEBACK_RATE_MAX);
      assert.equal(r.change, r.rate - i.rate);
      const error = i.dirty - r.target;
      const may = (error < 0 && i.integral > 0) || (error > 0 && i.keepingUp);
      if (!may) assert.equal(r.integral, i.integral, 'the integral moves only under the anti-windup rules');
      else assert.equal(r.integral, i.integral + error * i.updateSeconds);
      if (error <= 0 && i.integral <= 0 && !i.considerFragment) assert.equal(r.rate, i.minimum, 'at or below target');
    }),
  );
});

test('property: without the fragmentation term, more dirty data never means a lower rate', () => {
  fc.assert(
    fc.property(arbInputs, fc.integer({ min: 0, max: 1e9 }), (o, more) => {
      const a = updateWritebackRate(inputs({ ...o, considerFragment: false }));
      const b = updateWritebackRate(inputs({ ...o, considerFragment: false, dirty: o.dirty + more }));
      assert.ok(b.rate >= a.rate);
    }),
  );
});

// ---------------------------------------------------------------------------
// The attributes and the debug text

test('writeback_rate_debug is the kernel text; writeback_rate shows bytes/s and 0.0k while writeback_running is 0', async () => {
  const p = await makePair({ settings: { writebackRunning: false, writebackPercent: 10 } });
  try {
    const d = p.dev;
    d.settings.writebackRunning = true;
    d.settings.writebackRate = 3113;
    Object.assign(d.writebackRateState, { target: 983, proportional: -1371, integralScaled: 0, change: 3105 });
    d.writebackRateState.limiter.reset(10_000);
    assert.equal(
      writebackRateDebug(d, 8765.4),
      'rate:\t\t1.5M/sec\ndirty:\t\t0.0k\ntarget:\t\t491.5k\nproportional:\t-685.5k\n' +
        'integral:\t0.0k\nchange:\t\t1.5M/sec\nnext io:\t1234ms\n',
    );
    assert.match(writebackRateDebug(d, 12_000.5), /next io:\t-2000ms\n$/, 'truncated toward zero');
    const rate = findAttribute(DEVICE_ATTRIBUTES, 'writeback_rate', 'dev');
    assert.equal(rate.show(d), '1.5M');
    await rate.parse('2048\n')(d);
    assert.equal(d.settings.writebackRate, 2048, 'a store sets the rate');
    await rate.parse('0')(d);
    assert.equal(d.settings.writebackRate, 1, 'clamped to [1, INT_MAX]');
    d.settings.writebackRunning = false;
    assert.equal(rate.show(d), '0.0k');
    assert.equal(
      writebackRateDebug(d, 0),
      'rate:\t\t0.0k/sec\ndirty:\t\t0.0k\ntarget:\t\t491.5k\nproportional:\t0.0k\n' +
        'integral:\t0.0k\nchange:\t\t0.0k/sec\nnext io:\t0ms\n',
      'all but dirty and target are 0 while writeback is not running',
    );
    // The fragmentation weights stay ordered: low < mid < high.
    const low = findAttribute(DEVICE_ATTRIBUTES, 'writeback_rate_fp_term_low', 'dev');
    const mid = findAttribute(DEVICE_ATTRIBUTES, 'writeback_rate_fp_term_mid', 'dev');
    const high = findAttribute(DEVICE_ATTRIBUTES, 'writeback_rate_fp_term_high', 'dev');
    await low.parse('50')(d);
    assert.equal(low.show(d), '9');
    await mid.parse('5000')(d);
    assert.equal(mid.show(d), '999');
    await high.parse('1')(d);
    assert.equal(high.show(d), '1000');
  } finally {
    await p.registry.stopAll();
  }
});

// ---------------------------------------------------------------------------
// The periodic update

/** Resolve when a step of `u` satisfies `pred`. */
function stepWatcher(
  u: WritebackRateUpdate,
): (pred: (r: RateStep | undefined) => boolean) => Promise<RateStep | undefined> {
  const waiters: Array<{ pred: (r: RateStep | undefined) => boolean; resolve: (r: RateStep | undefined) => void }> = [];
  u.instrument.afterStep = (r) => {
    for (const w of waiters.splice(0)) {
      if (w.pred(r)) w.resolve(r);
      else waiters.push(w);
    }
  };
  return (pred) => new Promise((resolve) => waiters.push({ pred, resolve }));
}

/** Dirty data: `n` 4 KiB writes, each followed by a 4 KiB gap. */
async function writeDirty(p: Awaited<ReturnType<typeof makePair>>, n: number, seed: number): Promise<void> {
  for (let k = 0; k < n; k++) await p.dev.device.write(sectorData(seed, k * 16, 8), k * 16 * S);
}

/**
 * A pair on simulated time: rate updates, writeback delays and stop bounds
 * take no real time, and `run` drives the clock until what it is given settles.
 */
async function simPair(
  o: Parameters<typeof makePair>[0],
): Promise<{ p: Awaited<ReturnType<typeof makePair>>; clock: SimClock; run: <T>(x: Promise<T>) => Promise<T> }> {
  const clock = new SimClock();
  const run = <T>(x: Promise<T>): Promise<T> => clock.run(x);
  const p = await run(makePair({ ...o, registry: { ...o?.registry, clock } }));
  return { p, clock, run };
}

test('stop while a step is blocked waits for it; the step then changes nothing and none runs after', async () => {
  const { p, clock, run } = await simPair({
    backing: { writeback: true },
    settings: { writebackRunning: false, writebackPercent: 10, writebackRateUpdateSeconds: 1, sequentialCutoff: 0 },
  });
  const wb = p.dev.attachment?.writeback;
  assert.ok(wb);
  await run(writeDirty(p, 16, 1));
  let entered!: () => void;
  const inStep = new Promise<void>((resolve) => (entered = resolve));
  let release!: () => void;
  const held = new Promise<void>((resolve) => (release = resolve));
  // Ignores its abort signal: as a step stuck in I/O would.
  wb.rateUpdate.instrument.beforeStep = async () => {
    entered();
    await held;
  };
  let after = 0;
  wb.rateUpdate.instrument.afterStep = () => after++;
  await run(inStep);
  assert.equal(clock.now(), 1000, 'the first step comes one update interval after the start');
  assert.equal(wb.rateUpdate.running, true);
  let stopped = false;
  const stopping = wb.stop().then(() => (stopped = true));
  // Ten simulated seconds (below the 30 s stop bound): everything that could end the stop has run.
  await clock.advance(10_000);
  assert.equal(stopped, false, 'stop() waits for the step in progress');
  const rateBefore = p.dev.settings.writebackRate;
  release();
  await run(stopping);
  assert.equal(wb.rateUpdate.running, false);
  assert.equal(after, 0, 'the aborted step applied nothing');
  assert.equal(wb.rateUpdate.steps, 0);
  assert.equal(p.dev.settings.writebackRate, rateBefore);
  assert.equal(p.dev.writebackRateState.target, 0);
  assert.ok(![...Worker.live()].some((w) => w.name.startsWith('bcache_writeback')), 'neither writeback worker lives');
  await run(p.registry.stopAll());
  await clock.advance(60_000);
  assert.equal(after, 0, 'no step after stop');
  assert.equal(clock.pending, 0, 'no simulated timer left');
  assertNothingLeft();
});

test('writeback_percent 0: the update leaves the rate alone', async () => {
  const { p, run } = await simPair({
    backing: { writeback: true },
    settings: { writebackRunning: false, writebackPercent: 0, writebackRateUpdateSeconds: 1, sequentialCutoff: 0 },
  });
  try {
    const wb = p.dev.attachment?.writeback;
    assert.ok(wb);
    const next = stepWatcher(wb.rateUpdate);
    await run(writeDirty(p, 4, 2));
    assert.equal(await run(next(() => true)), undefined, 'the controller did not run');
    assert.equal(p.dev.settings.writebackRate, 1024);
  } finally {
    await run(p.registry.stopAll());
  }
  assertNothingLeft();
});

test('real writeback: the controller raises the rate above target, the data drains, and the rate falls to the minimum', async () => {
  // A 48 MiB cache of 768 buckets x 128 sectors: 1% is a target of 983 sectors.
  const { p, run } = await simPair({
    backing: { writeback: true },
    settings: {
      writebackRunning: false,
      writebackPercent: 1,
      writebackRatePTermInverse: 1,
      writebackRateUpdateSeconds: 1,
      writebackRate: 8,
      sequentialCutoff: 0,
    },
  });
  try {
    const d = p.dev;
    const wb = d.attachment?.writeback;
    assert.ok(wb);
    const next = stepWatcher(wb.rateUpdate);
    await run(writeDirty(p, 512, 3));
    assert.equal(d.dirtySectors, 4096);
    // error = 4096 - 983 = 3113 = P; the limiter is idle, so the integral stays 0.
    const raised = await run(next((r) => r !== undefined));
    assert.deepEqual(raised, {
      rate: 3113,
      target: 983,
      proportional: 3113,
      integral: 0,
      integralScaled: 0,
      change: 3105,
    });
    assert.equal(d.settings.writebackRate, 3113);
    assert.match(
      writebackRateDebug(d),
      /^rate:\t\t0\.0k\/sec\ndirty:\t\t2\.0M\ntarget:\t\t491\.5k\n/,
      'writeback not running',
    );

    d.settings.writebackRunning = true;
    wb.wake();
    await run(wb.whenIdle());
    assert.equal(d.dirtySectors, 0, 'written back');
    assert.equal(wb.stats.sectorsWritten, 4096);

    // New dirty data below target: the next update brings the rate down to writeback_rate_minimum.
    d.settings.writebackRunning = false;
    await run(writeDirty(p, 16, 4));
    assert.ok(d.dirtySectors > 0 && d.dirtySectors < 983);
    const fell = await run(next((r) => r !== undefined && r.rate === 8));
    assert.ok(fell && fell.proportional < 0);
    assert.equal(d.settings.writebackRate, 8);
    d.settings.writebackRunning = true;
    assert.match(writebackRateDebug(d), /^rate:\t\t4\.0k\/sec\n/);
    d.settings.writebackRunning = false;
  } finally {
    await run(p.registry.stopAll());
  }
  assertNothingLeft();
});

test('detaching writes back at full speed whatever the rate', async () => {
  const { p, clock, run } = await simPair({
    backing: { writeback: true },
    settings: { writebackRunning: false, writebackPercent: 10, writebackRateUpdateSeconds: 60, sequentialCutoff: 0 },
  });
  try {
    await run(p.dev.device.write(sectorData(5, 0, 2048), 0));
    assert.equal(p.dev.dirtySectors, 2048);
    // 1 sector/s would take over half an hour for this MiB if it were paced.
    p.dev.settings.writebackRate = 1;
    // Within a simulated minute: paced, it would take half an hour.
    await clock.run(p.dev.detach(), 60_000);
    assert.equal(p.dev.attached, false);
    const raw = Buffer.alloc(2048 * S);
    await p.backingDev.read(raw, 16 * S);
    assert.ok(raw.equals(sectorData(5, 0, 2048)), 'on the backing device');
  } finally {
    await run(p.registry.stopAll());
  }
  assertNothingLeft();
});

test('an idle set writes back at the maximum rate after attached² × 6 updates; the next request hands back to the controller', async () => {
  const { p, run } = await simPair({
    backing: { writeback: true },
    settings: { writebackRunning: false, writebackPercent: 10, writebackRateUpdateSeconds: 1, sequentialCutoff: 0 },
  });
  try {
    const d = p.dev;
    const att = d.attachment;
    assert.ok(att);
    const next = stepWatcher(att.writeback.rateUpdate);
    await run(writeDirty(p, 16, 5));
    // Below target: the controller holds the minimum for five updates, the sixth finds the set idle.
    for (let k = 1; k <= 5; k++) {
      const r = await run(next(() => true));
      assert.ok(r, `update ${k} ran the controller`);
      assert.equal(d.settings.writebackRate, 8);
      assert.equal(att.set.atMaxWritebackRate, false);
    }
    assert.equal(await run(next(() => true)), undefined, 'the sixth update took the idle shortcut');
    assert.equal(d.settings.writebackRate, WRITEBACK_RATE_MAX);
    assert.equal(att.set.atMaxWritebackRate, true);
    assert.match(writebackRateDebug(d), /proportional:\t0\.0k\nintegral:\t0\.0k\nchange:\t\t0\.0k\/sec/);
    // Any request on the set ends it: every device back to 1, the controller takes over.
    await run(d.device.read(Buffer.alloc(4096), 0));
    assert.equal(d.settings.writebackRate, 1);
    assert.equal(att.set.atMaxWritebackRate, false);
    assert.equal(att.set.idleCounter, 0);
    assert.ok(await run(next(() => true)), 'the controller runs again');
    assert.equal(d.settings.writebackRate, 8);
    // idle_max_writeback_rate 0 turns the shortcut off.
    await findAttribute(SET_ATTRIBUTES, 'idle_max_writeback_rate', 'set').parse('0')(p.set);
    assert.equal(findAttribute(SET_ATTRIBUTES, 'idle_max_writeback_rate', 'set').show(p.set), '0');
    att.set.idleCounter = 100;
    assert.ok(await run(next(() => true)), 'the controller ran although the set is idle');
    assert.equal(d.settings.writebackRate, 8);
  } finally {
    await run(p.registry.stopAll());
  }
  assertNothingLeft();
});

test('gc_after_writeback: a rate update with in_use at 50 % or more makes a GC pass due once writeback has emptied the cache; off, none runs', async () => {
  for (const on of [1, 0]) {
    const { p, clock, run } = await simPair({
      backing: { writeback: true },
      backingBytes: 64 * 1024 * 1024,
      // No GC pass from the inserted-sectors countdown: only gc_after_writeback may start one.
      registry: { setOptions: { gcSectors: 1 << 30 } },
      settings: { writebackRunning: false, writebackPercent: 10, writebackRateUpdateSeconds: 1, sequentialCutoff: 0 },
    });
    try {
      const cs = p.set.cs;
      const wb = p.dev.attachment?.writeback;
      assert.ok(wb);
      p.set.settings.gcAfterWriteback = on;
      // 64 KiB dirty writes (a bucket each) until half the cache is in use.
      for (let k = 0; cs.inUse < 50; k++) await run(p.dev.device.write(sectorData(k, k * 128, 128), k * 128 * S));
      const next = stepWatcher(wb.rateUpdate);
      await run(next((r) => r !== undefined));
      assert.equal(p.set.gcAfterWritebackDue, on === 1, 'BCH_DO_AUTO_GC follows gc_after_writeback');
      const runs = cs.gc.stats.runs;
      p.dev.settings.writebackRunning = true;
      wb.wake();
      await run(wb.whenIdle());
      assert.equal(p.dev.dirtySectors, 0);
      // Simulated time for a pass to start and finish if one was asked for.
      await clock.advance(5_000);
      assert.equal(cs.gc.stats.runs - runs, on, on === 1 ? 'one GC pass after writeback' : 'no GC pass');
      assert.equal(p.set.gcAfterWritebackDue, false);
    } finally {
      await run(p.registry.stopAll());
    }
  }
  assertNothingLeft();
});
