import { test } from 'node:test';
import assert from 'node:assert/strict';
import { TimeStats } from '../../src/bcache/time-stats.ts';

const MS = 1e6;
const SEC = 1e9;

test('time stats: never run, then the kernel ewma of durations and of the time between runs', () => {
  const t = new TimeStats();
  assert.deepEqual(t.view(100 * SEC), { averageFrequencySec: 0, averageDurationMs: 0, maxDurationMs: 0, lastSec: -1 });
  // First run: 40 ms, ending at 10 s. The first duration is taken as the average.
  t.update(10 * SEC - 40 * MS, 10 * SEC);
  assert.deepEqual(t.view(12 * SEC), { averageFrequencySec: 0, averageDurationMs: 40, maxDurationMs: 40, lastSec: 2 });
  // Second run: 8 ms, ending 20 s later. avg = (40*7 + 8)/8 = 36 ms; frequency = 20/8 = 2.5 s -> 2.
  t.update(30 * SEC - 8 * MS, 30 * SEC);
  assert.deepEqual(t.view(30 * SEC), { averageFrequencySec: 2, averageDurationMs: 36, maxDurationMs: 40, lastSec: 0 });
  assert.equal(t.count, 2);
  assert.equal(t.totalNs, 48 * MS);
  assert.equal(t.lastDurationNs, 8 * MS);
  // A run that did not take time changes nothing.
  t.update(40 * SEC, 40 * SEC);
  assert.equal(t.count, 2);
});
