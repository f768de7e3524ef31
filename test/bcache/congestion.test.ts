// Congestion bypass (issue 13 part 3): the latency accounting and
// bch_get_congested()'s arithmetic, then the whole request path over a cache
// device made slow by the faulty device's latency, on simulated time (a slow
// machine must not make the cache look slower or faster than the test says).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { FaultyBlockDevice } from '../../src/blockdev/faulty.ts';
import { MemoryBlockDevice } from '../../src/blockdev/memory.ts';
import { CONGESTED_MAX, Congestion, fractExpTwo, popcount32 } from '../../src/bcache/congestion.ts';
import { SysfsTree } from '../../src/bcache/sysfs/tree.ts';
import { SimClock } from '../../src/util/clock.ts';
import { assertNothingLeft } from './helpers.ts';
import { makePair, MiB, pattern } from './request-helpers.ts';

const S = 512;

test('fract_exp_two and hweight32 as the kernel computes them', () => {
  assert.equal(fractExpTwo(0, 6), 1);
  assert.equal(fractExpTwo(64, 6), 2);
  assert.equal(fractExpTwo(96, 6), 3);
  assert.equal(fractExpTwo(1023, 6), 2 ** 15 + Math.floor((2 ** 15 * 63) / 64));
  assert.equal(popcount32(0), 0);
  assert.equal(popcount32(0xffffffff), 32);
  assert.equal(popcount32(0x80000001), 2);
});

test('the counter: slow I/O takes its ms off (bounded), fast I/O and time give them back', async () => {
  const clock = new SimClock(1000);
  const c = new Congestion(clock, () => 0);
  c.thresholds = { congestedReadThresholdUs: 2000, congestedWriteThresholdUs: 20000 };
  // A read within its threshold: nothing.
  let t = c.start(false);
  await clock.advance(1.5);
  c.completed(false, t);
  assert.equal(c.count, 0);
  assert.equal(c.congested(), 0);
  // A 10.24 ms read: -10; congested() = 2^((1024-10)/64) (interpolated), less 0 random bits.
  t = c.start(false);
  await clock.advance(10.24);
  c.completed(false, t);
  assert.equal(c.count, -10);
  assert.equal(c.congested(), fractExpTwo(CONGESTED_MAX - 10, 6));
  // The same latency on a write is within its threshold: one back.
  t = c.start(true);
  await clock.advance(10.24);
  c.completed(true, t);
  assert.equal(c.count, -9);
  // Time gives back one per 1024 us since the last slow I/O: 10.24 ms after it, nothing is left.
  assert.equal(c.congested(), 0);
  // Never below -CONGESTED_MAX.
  t = c.start(false);
  await clock.advance(5000);
  c.completed(false, t);
  assert.equal(c.count, -CONGESTED_MAX);
  assert.equal(c.congested(), 1, 'at the floor, every request is past the cutoff');
  // Thresholds 0: nothing measured, never congested.
  c.thresholds = { congestedReadThresholdUs: 0, congestedWriteThresholdUs: 0 };
  assert.equal(c.start(false), -1);
  assert.equal(c.congested(), 0);
});

test('a slow cache device: reads and writes bypass it and count as bypassed; thresholds 0: none do', async () => {
  const clock = new SimClock();
  const cacheDev = new FaultyBlockDevice(new MemoryBlockDevice(48 * MiB, { name: 'cache' }), { clock });
  // Writethrough, no sequential cutoff: only congestion can make requests bypass.
  const p = await clock.run(
    makePair({ cacheDev, settings: { sequentialCutoff: 0 }, registry: { clock, setOptions: { seed: 7 } } }),
  );
  const tree = new SysfsTree(p.registry);
  const setDir = `/sys/fs/bcache/${p.set.uuid}`;
  const d = p.dev.device;
  const stats = p.dev.stats.total;
  const congestion = p.set.cs.io.congestion;
  await clock.run(tree.write(`${setDir}/congested_read_threshold_us`, '1000'));
  await clock.run(tree.write(`${setDir}/congested_write_threshold_us`, '1000'));
  assert.equal(tree.read(`${setDir}/congested`), '0.0k\n');

  // 200 ms per cache I/O: writethrough copies are slow, until the set is so congested that a write bypasses.
  cacheDev.addLatency(200, { ops: ['read', 'write'] });
  let sector = 0;
  let slowWrites = 0;
  for (; slowWrites < 50 && stats.sectorsBypassed === 0; slowWrites++, sector += 64) {
    await clock.run(d.write(pattern(1, sector, 8), sector * S));
    await clock.run(p.dev.request.settle());
  }
  assert.ok(slowWrites >= 3 && slowWrites < 50, `some slow writes, then a bypass (${slowWrites} writes)`);
  assert.ok(congestion.count < -(CONGESTED_MAX / 2), `slow writes congest the set (${congestion.count})`);
  assert.ok(congestion.slowIos >= slowWrites - 1);
  assert.notEqual(tree.read(`${setDir}/congested`), '0.0k\n', 'the set says it is congested');

  // Now requests go around the cache: a write, and reads of what is not cached.
  const bypassedBefore = stats.sectorsBypassed;
  assert.equal(bypassedBefore, 8, 'the write that ended the loop');
  const writesBefore = cacheDev.counters().ops.write;
  const far = 8192;
  await clock.run(d.write(pattern(2, far, 8), far * S));
  assert.equal(stats.sectorsBypassed, bypassedBefore + 8, 'the write bypassed');
  const buf = Buffer.alloc(8 * S);
  await clock.run(d.read(buf, (far + 64) * S));
  await clock.run(d.read(buf, (far + 128) * S));
  await clock.run(p.dev.request.settle());
  assert.equal(stats.cacheBypassMisses, 2, 'both reads were bypassed misses');
  assert.equal(stats.sectorsBypassed, bypassedBefore + 24);
  assert.equal(cacheDev.counters().ops.write, writesBefore, 'nothing was written to the cache for them');
  // A read of something cached is still a hit from the cache, counted as a bypass hit.
  await clock.run(d.read(buf, 0));
  assert.equal(stats.cacheBypassHits, 1);
  assert.deepEqual(buf, pattern(1, 0, 8));
  assert.match(tree.read(`/sys/block/bcache0/bcache/stats_total/bypassed`), /^20\.0k\n$/);

  // Thresholds 0: congestion is off at once, and misses fill the cache again.
  await clock.run(tree.write(`${setDir}/congested_read_threshold_us`, '0'));
  await clock.run(tree.write(`${setDir}/congested_write_threshold_us`, '0'));
  assert.equal(tree.read(`${setDir}/congested`), '0.0k\n');
  const bypassed = stats.sectorsBypassed;
  const misses = stats.cacheMisses;
  await clock.run(d.read(buf, (far + 64) * S));
  await clock.run(d.write(pattern(3, far + 256, 8), (far + 256) * S));
  await clock.run(d.flush());
  await clock.run(p.dev.request.settle());
  assert.equal(stats.sectorsBypassed, bypassed, 'nothing bypassed');
  assert.equal(stats.cacheMisses, misses + 1);
  await clock.run(d.read(buf, (far + 64) * S));
  await clock.run(d.read(buf, (far + 256) * S));
  assert.deepEqual(buf, pattern(3, far + 256, 8));
  assert.equal(stats.cacheBypassHits + stats.cacheBypassMisses, 3, 'no new bypass');
  assert.ok(stats.cacheHits >= 2, 'the miss and the write are cached now');

  cacheDev.clearRules();
  await clock.run(tree.stop());
  await clock.run(p.registry.stopAll());
  assertNothingLeft();
});

test('mild congestion: short requests still use the cache, a long enough stream bypasses it (cutoff 0)', async () => {
  const clock = new SimClock();
  const cacheDev = new FaultyBlockDevice(new MemoryBlockDevice(48 * MiB, { name: 'cache' }), { clock });
  const p = await clock.run(
    makePair({ cacheDev, settings: { sequentialCutoff: 0 }, registry: { clock, setOptions: { seed: 11 } } }),
  );
  p.set.settings.congestedReadThresholdUs = 1000;
  p.set.settings.congestedWriteThresholdUs = 1000;
  const d = p.dev.device;
  const stats = p.dev.stats.total;
  const congestion = p.set.cs.io.congestion;
  // Two slow cache writes (200 ms each: -195 apiece), then a fast device again.
  const rule = cacheDev.addLatency(200, { ops: ['write'] });
  for (const sector of [0, 64]) {
    await clock.run(d.write(pattern(1, sector, 8), sector * S));
    await clock.run(p.dev.request.settle());
  }
  rule.remove();
  assert.equal(stats.sectorsBypassed, 0);
  const c = congestion.congested();
  assert.ok(c > 256 && c < 4096, `mildly congested: streams past ${c} sectors bypass`);

  // A short random read: cached as usual.
  const small = Buffer.alloc(8 * S);
  await clock.run(d.read(small, 8000 * S));
  assert.equal(stats.sectorsBypassed, 0, 'a short request is not bypassed');
  // A stream of 64 KiB reads: the first ones fill, then the stream is long enough to go around.
  const buf = Buffer.alloc(128 * S);
  const bypassedAfter: number[] = [];
  for (let i = 0; i < 24; i++) {
    await clock.run(d.read(buf, (10000 + i * 128) * S));
    bypassedAfter.push(stats.sectorsBypassed);
  }
  await clock.run(p.dev.request.settle());
  const seen = bypassedAfter.join(' ');
  // Shorter than the congested size: cached; past it (with its random part), around the cache.
  const under = Math.floor((c - 32) / 128);
  assert.equal(bypassedAfter[under - 1], 0, `the stream's first ${under} reads use the cache (${seen})`);
  const over = Math.ceil((c + 64) / 128);
  for (let i = over; i < 24; i++) {
    assert.equal(bypassedAfter[i], (bypassedAfter[i - 1] ?? 0) + 128, `read ${i} bypasses (${seen})`);
  }
  assert.equal(stats.cacheBypassMisses * 128, bypassedAfter[23], 'every bypassed read was a bypassed miss');

  await clock.run(p.registry.stopAll());
  assertNothingLeft();
});
