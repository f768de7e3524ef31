import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryBlockDevice } from '../../src/blockdev/memory.ts';
import { pattern } from './helpers.ts';

test('clone copies contents and holes, and the copies are independent', async () => {
  const a = new MemoryBlockDevice(256 * 1024, { name: 'a', logicalBlockSize: 4096 });
  await a.write(pattern(1000, 1), 70_000);
  const b = a.clone();
  assert.equal(b.name, 'a');
  assert.equal(b.logicalBlockSize, 4096);
  assert.equal(b.allocatedBytes, a.allocatedBytes);
  assert.deepEqual(await b.blockStatus(0, b.size), await a.blockStatus(0, a.size));
  await b.write(pattern(1000, 2), 70_000);
  const got = Buffer.alloc(1000);
  await a.read(got, 70_000);
  assert.ok(got.equals(pattern(1000, 1)), 'writing the clone leaves the original alone');
  await a.close();
  const c = a.clone({ name: 'c', readOnly: true });
  await c.read(got, 70_000);
  assert.ok(got.equals(pattern(1000, 1)), 'a closed device can still be cloned');
  await assert.rejects(c.write(got, 0), { code: 'EPERM' });
});
