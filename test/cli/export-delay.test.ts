// `ubcache export --delay DURATION`: a slow disk for demos and tests (the
// demo's backing device is one; test/e2e/demo.test.ts runs it end to end).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parseDelay, parseExportArgs } from '../../src/cli/export.ts';
import { CliError } from '../../src/cli/common.ts';

test('--delay takes seconds, or a number with ms or s; none by default', () => {
  const plan = (args: string[]) => {
    const p = parseExportArgs([...args, 'disk.img']);
    assert.ok(p !== 'help');
    return p;
  };
  assert.equal(plan([]).delayMs, undefined);
  assert.equal(plan(['--delay', '5ms']).delayMs, 5);
  assert.equal(plan(['--delay', '0.5s']).delayMs, 500);
  assert.equal(plan(['--delay', '2']).delayMs, 2000);
  assert.equal(parseDelay('0'), 0);
  assert.equal(parseDelay('0.25ms'), 0.25);
  for (const bad of ['', 'fast', '-1ms', '5us', '2h', '3601s']) {
    assert.throws(
      () => parseDelay(bad),
      (e: unknown) => e instanceof CliError && /--delay .* is not a duration/.test(e.message),
      bad,
    );
  }
});
