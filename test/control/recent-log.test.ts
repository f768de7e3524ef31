// The dashboard's recent errors: warnings and errors logged while the ring is
// started, the newest RECENT_LOG_LINES of them, nothing once stopped.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { RecentLog } from '../../src/control/recent-log.ts';
import { captureLog, log } from '../../src/util/log.ts';

test('RecentLog keeps the last warnings and errors logged, oldest first, and stops with stop()', () => {
  const captured = captureLog();
  const ring = new RecentLog(3);
  try {
    log.info('before start');
    ring.start();
    ring.start(); // idempotent: one tap, not two
    log.info('an info line is not an error');
    log.warn('w1');
    log.error('e1');
    log.warn('w2');
    log.error('e2');
    ring.stop();
    log.error('after stop');
  } finally {
    captured.restore();
  }
  const entries = ring.list();
  assert.deepEqual(
    entries.map((e) => [e.level, e.line, e.seq]),
    [
      ['error', 'e1', 2],
      ['warn', 'w2', 3],
      ['error', 'e2', 4],
    ],
  );
  // The sink still got every line: the tap only listens.
  assert.ok(captured.lines.includes('warn: w1') && captured.lines.includes('error: after stop'));
});
