// `serve --shutdown-timeout` and `--stop-timeout`: parsed up front, with the
// engine's bounds and the last-resort deadline derived from them.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { lastResortMs, parseServeArgs, stopBounds } from '../../src/cli/serve.ts';
import { CliError } from '../../src/cli/common.ts';

function plan(args: string[]): Exclude<ReturnType<typeof parseServeArgs>, 'help'> {
  const p = parseServeArgs([...args, 'cache.img', 'disk.img']);
  assert.ok(p !== 'help');
  return p;
}

test('shutdown bounds: defaults, seconds, ms and s; the engine bounds and the last resort follow', () => {
  const d = plan([]);
  assert.equal(d.shutdownTimeoutMs, 30_000);
  assert.equal(d.stopTimeoutMs, 10_000);
  // The cache set's own default (60 s) is what --stop-timeout 10s gives.
  assert.deepEqual(stopBounds(d.stopTimeoutMs), { registry: 10_000, device: 20_000, set: 60_000 });
  assert.equal(lastResortMs(d), 30_000 + 200_000 + 60_000);
  assert.equal(plan(['--shutdown-timeout', '5']).shutdownTimeoutMs, 5000);
  assert.equal(plan(['--shutdown-timeout', '1.5s']).shutdownTimeoutMs, 1500);
  assert.equal(plan(['--stop-timeout', '250ms']).stopTimeoutMs, 250);
  assert.deepEqual(
    plan(['--fault', 'disk.img:hold:read:range=4m+1m']).faults,
    new Map([['disk.img', 'hold:read:range=4m+1m']]),
  );
});

test('shutdown bounds: nonsense is refused with what to write', () => {
  for (const [args, why] of [
    [['--shutdown-timeout', 'soon'], /--shutdown-timeout 'soon' is not a duration/],
    [['--stop-timeout', '5m'], /--stop-timeout '5m' is not a duration/],
    [['--stop-timeout', '0'], /must be at least 1ms/],
    [['--shutdown-timeout', '30d'], /is not a duration/],
    [['--shutdown-timeout', '9999999s'], /at most 24 days/],
  ] as const) {
    assert.throws(
      () => plan([...args]),
      (e: unknown) => e instanceof CliError && why.test(e.message),
      args.join(' '),
    );
  }
});
