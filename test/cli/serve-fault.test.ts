// `serve --fault DEV:RULES`: checked against the devices named before anything is opened.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parseServeArgs } from '../../src/cli/serve.ts';
import { CliError } from '../../src/cli/common.ts';

test('--fault attaches rules to the device named, joining repeats; paths may hold colons', () => {
  const plan = parseServeArgs([
    '--socket',
    '/tmp/x.sock',
    '--fault',
    'a:b.img:fail-nth=3:write',
    '--fault',
    'a:b.img:latency=1ms',
    'a:b.img',
    'disk.img',
  ]);
  assert.ok(plan !== 'help');
  assert.deepEqual([...(plan.faults ?? new Map<string, string>())], [['a:b.img', 'fail-nth=3:write,latency=1ms']]);
});

test('--fault refuses an unknown device or bad rules, saying what to write', () => {
  assert.throws(
    () => parseServeArgs(['--fault', 'other.img:fail', 'cache.img']),
    (e: unknown) => e instanceof CliError && /names none of the devices \(cache\.img\)/.test(e.message),
  );
  assert.throws(
    () => parseServeArgs(['--fault', 'cache.img:explode=1', 'cache.img']),
    (e: unknown) => e instanceof CliError && /unknown action "explode"/.test(e.message),
  );
});
