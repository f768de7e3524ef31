import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { formatUuid, isZeroUuid, parseUuid } from '../../src/format/uuid-text.ts';

test('UUID text and bytes convert both ways in uuid_unparse order', () => {
  for (let i = 0; i < 20; i++) {
    const text = randomUUID();
    const bytes = parseUuid(text);
    assert.ok(bytes);
    assert.equal(formatUuid(bytes), text);
  }
  assert.deepEqual(parseUuid('0F0F0F0F-1E1E-4D2D-8C3C-4B4B4B4B4B4B')?.subarray(0, 4), Buffer.from([15, 15, 15, 15]));
  for (const bad of [
    '',
    'xyz',
    '0f0f0f0f1e1e4d2d8c3c4b4b4b4b4b4b',
    '0f0f0f0f-1e1e-4d2d-8c3c-4b4b4b4b4b4',
    '0f0f0f0f-1e1e-4d2d-8c3c-4b4b4b4b4b4g',
  ]) {
    assert.equal(parseUuid(bad), undefined, bad);
  }
  assert.throws(() => formatUuid(Buffer.alloc(10)), RangeError);
  assert.ok(isZeroUuid(Buffer.alloc(16)));
  assert.ok(!isZeroUuid(Buffer.from([0, 1])));
});
