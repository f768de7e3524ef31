// The admission policy (issue 13 part 5): the second-hit rule's ghost table,
// and the request path with cache_admission = second-hit against always.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { CHUNK_SECTORS, SecondHit, slotsFor } from '../../src/bcache/admission.ts';
import { SysfsTree } from '../../src/bcache/sysfs/tree.ts';
import { assertNothingLeft } from './helpers.ts';
import { makePair, mem, pattern } from './request-helpers.ts';

const S = 512;

test('second-hit: a range is admitted when part of it was missed before, block by block', () => {
  const g = new SecondHit(1024);
  assert.equal(g.admit(0, 8), false, 'first miss of block 0');
  assert.equal(g.admit(8, 16), false, 'the next block of the same chunk is not a second sighting');
  assert.equal(g.admit(0, 8), true, 'block 0 again');
  assert.equal(g.admit(4, 12), true, 'a range overlapping blocks seen');
  // A range over several chunks: admitted if any block of it was seen.
  assert.equal(g.admit(CHUNK_SECTORS - 8, CHUNK_SECTORS + 8), false);
  assert.equal(g.admit(CHUNK_SECTORS, CHUNK_SECTORS + 4 * CHUNK_SECTORS), true);
  assert.equal(g.admitted, 3);
  assert.equal(g.declined, 3);
});

test('second-hit: one pass over many chunks admits nothing; the table forgets what it cannot hold', () => {
  const g = new SecondHit(1024);
  // A one-pass scan, 4 KiB at a time, chunk by chunk in a scrambled order: never the same block twice.
  let admitted = 0;
  for (let i = 0; i < 20000; i++) {
    const block = (i * 7919) % 20000;
    if (g.admit(block * 8, block * 8 + 8)) admitted++;
  }
  assert.equal(admitted, 0);
  // Block 0 was seen, but 20000 blocks over 1250 chunks went by in 1024 slots: mostly forgotten.
  let remembered = 0;
  for (let c = 0; c < 1250; c++) if (g.admit(c * CHUNK_SECTORS, c * CHUNK_SECTORS + CHUNK_SECTORS)) remembered++;
  assert.ok(remembered < 1024, `at most one chunk per slot (${remembered})`);
  assert.ok(remembered > 300, `but most slots still hold one (${remembered})`);
});

test('slotsFor: four slots per 64 KiB of cache, a power of two, bounded', () => {
  assert.equal(slotsFor(0), 1024);
  assert.equal(slotsFor((64 * 1024 * 1024) / S), 4096);
  assert.equal(slotsFor((1024 * 1024 * 1024) / S), 65536);
  assert.equal(slotsFor((1000 * 1024 * 1024) / S), 65536);
  assert.equal(slotsFor(2 ** 50), 1 << 21);
  assert.throws(() => new SecondHit(1000), /power of two/);
});

test('cache_admission: second-hit fills a miss on its second read; always on its first', async () => {
  const p = await makePair({ settings: { sequentialCutoff: 0 } });
  const tree = new SysfsTree(p.registry);
  const D = '/sys/block/bcache0/bcache';
  assert.equal(tree.read(`${D}/cache_admission`), '[always] second-hit\n');
  await tree.write(`${D}/cache_admission`, 'second-hit');
  assert.equal(tree.read(`${D}/cache_admission`), 'always [second-hit]\n');
  const backing = mem(p.backingDev);
  const d = p.dev.device;
  const stats = p.dev.stats.total;
  backing.writeSync(pattern(1, 1000, 8), (1000 + 16) * S);
  backing.writeSync(pattern(2, 5000, 8), (5000 + 16) * S);
  const buf = Buffer.alloc(8 * S);
  const readAt = async (sector: number): Promise<void> => {
    await d.read(buf, sector * S);
    await p.dev.request.settle();
  };
  await readAt(1000);
  await readAt(1000);
  assert.equal(stats.cacheMisses, 2, 'the first read is not admitted: the second misses too');
  assert.equal(tree.read(`${D}/cache_admission_declined`), '1\n');
  assert.equal(tree.read(`${D}/cache_admission_admitted`), '1\n');
  await readAt(1000);
  assert.equal(stats.cacheHits, 1, 'filled on the second read, a hit on the third');
  assert.deepEqual(buf, pattern(1, 1000, 8));
  assert.equal(stats.cacheBypassHits + stats.cacheBypassMisses, 0, 'declined misses are not bypasses');
  await tree.write(`${D}/cache_admission`, 'always');
  await readAt(5000);
  await readAt(5000);
  assert.equal(stats.cacheHits, 2, 'always: filled on the first read');
  await assert.rejects(tree.write(`${D}/cache_admission`, 'never'), /one of: always, second-hit/);
  await tree.stop();
  await p.registry.stopAll();
  assertNothingLeft();
});
