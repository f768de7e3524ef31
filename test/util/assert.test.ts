// The assertion helpers: they name the invariant, pass values through, and
// narrow types for the compiler.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { assert as check, defined, InvariantError } from '../../src/util/assert.ts';

test('assert throws InvariantError naming the invariant, and does nothing when it holds', () => {
  const one = (): number => Number('1');
  check(one() === 1, 'never thrown');
  assert.throws(
    () => {
      check(one() > 2, 'one is more than two');
    },
    (err: unknown) =>
      err instanceof InvariantError &&
      err.invariant === 'one is more than two' &&
      err.message === 'invariant violated: one is more than two' &&
      err.name === 'InvariantError',
  );
});

test('defined passes a value through (falsy ones too) and throws on undefined', () => {
  const xs: number[] = [0, 5];
  const zero: number = defined(xs[0], 'xs has two elements');
  assert.equal(zero, 0);
  assert.equal(defined<string | null>(null, 'null is a value'), null);
  assert.equal(defined('', 'so is the empty string'), '');
  assert.throws(() => defined(xs[2], 'xs has three elements'), {
    name: 'InvariantError',
    message: 'invariant violated: xs has three elements',
  });
});
