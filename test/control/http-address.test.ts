// serve --http [HOST:]PORT and its alias --metrics: a bare port is loopback,
// bad addresses are refused naming the option, the two spellings not together.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parseServeArgs, type ServePlan } from '../../src/cli/serve.ts';

function plan(args: string[]): ServePlan {
  const p = parseServeArgs([...args, 'cache.img']);
  assert.notEqual(p, 'help');
  return p as ServePlan;
}

test('--http takes [HOST:]PORT, loopback when no host is given; --metrics is the same option', () => {
  assert.deepEqual(plan(['--http', '9323']).http, { host: '127.0.0.1', port: 9323 });
  assert.deepEqual(plan(['--http', '[::1]:0']).http, { host: '::1', port: 0 });
  assert.deepEqual(plan(['--metrics', 'localhost:9323']).http, { host: 'localhost', port: 9323 });
  assert.deepEqual(plan(['--http', '0.0.0.0:80']).http, { host: '0.0.0.0', port: 80 });
  assert.equal(plan([]).http, undefined);
});

test('--http: bad addresses and both spellings at once are refused, naming the option', () => {
  for (const [args, message] of [
    [['--http', 'localhost'], /--http 'localhost' is not \[HOST:\]PORT/],
    [['--http', '1:2:3'], /--http '1:2:3' is not \[HOST:\]PORT/],
    [['--http', ''], /--http '' is not \[HOST:\]PORT/],
    [['--metrics', '127.0.0.1:99999'], /--metrics '127\.0\.0\.1:99999' is not \[HOST:\]PORT/],
    [['--http', '9323', '--metrics', '9324'], /--http and --metrics are the same option/],
  ] as const) {
    assert.throws(() => parseServeArgs([...args, 'cache.img']), message);
  }
});
