// The computed files of a set's internal/ and cache0/ (priority_stats,
// feature_*, the btree time stats, copy_gc_enabled, gc_after_writeback):
// their arithmetic and stores. The kernel oracle checks their formats
// against Linux's (test/oracle/attribute-tree.test.ts).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  Buckets,
  BTREE_PRIO,
  GC_MARK_DIRTY,
  GC_MARK_METADATA,
  GC_MARK_RECLAIMABLE,
} from '../../../src/bcache/buckets.ts';
import { featureList, priorityStats } from '../../../src/bcache/sysfs/set-internals.ts';
import { assertNothingLeft } from '../helpers.ts';
import { makeRig, refused } from './helpers.ts';

test('priority_stats: usage by mark, and quantiles of INITIAL_PRIO - prio without btree buckets', () => {
  const b = new Buckets(100, 1024, 4);
  // 4..13 btree nodes, 14..53 clean with prios 32768-0..39, 54..63 dirty, the rest free.
  for (let i = 4; i < 14; i++) {
    b.mark[i] = GC_MARK_METADATA;
    b.prio[i] = BTREE_PRIO;
    b.used[i] = 1024;
  }
  for (let i = 14; i < 54; i++) {
    b.mark[i] = GC_MARK_RECLAIMABLE;
    b.prio[i] = 32768 - (i - 14);
    b.used[i] = 512;
  }
  for (let i = 54; i < 64; i++) {
    b.mark[i] = GC_MARK_DIRTY;
    b.prio[i] = 32768;
    b.used[i] = 1024;
  }
  const text = priorityStats(b);
  const lines = text.split('\n');
  assert.equal(lines[0], 'Unused:\t\t36%', 'buckets 64..99 (the first 4 are not counted, but divide)');
  assert.equal(lines[1], 'Clean:\t\t40%');
  assert.equal(lines[2], 'Dirty:\t\t10%');
  assert.equal(lines[3], 'Metadata:\t10%');
  // 50 data buckets: 10 at 0 and 40 at 0..39 ago; sum 780, average 15.
  assert.equal(lines[4], 'Average:\t15');
  assert.equal(lines[5], `Sectors per Q:\t${Math.floor((50 * 1024) / 32)}`);
  const q =
    /^Quantiles:\t\[(.*)\]$/
      .exec(lines[6] ?? '')?.[1]
      ?.split(' ')
      .map(Number) ?? [];
  assert.equal(q.length, 31);
  assert.deepEqual(
    q,
    [...q].sort((x, y) => x - y),
    'ascending: the most recently used first',
  );
  assert.equal(q[30], 38, 'the 31st of 32 quantiles of 0..39 (and ten 0s)');
  assert.ok(text.endsWith(']\n'));
});

test('feature lists: only the incompat class has a known feature', () => {
  assert.equal(featureList('compat', 0n), '');
  assert.equal(featureList('ro_compat', 0xffn), '');
  assert.equal(featureList('incompat', 0n), 'large_bucket\n');
  assert.equal(featureList('incompat', 1n), '[large_bucket]\n');
});

test('internal/: copy_gc_enabled and gc_after_writeback store as the kernel does; the new files read', async () => {
  const rig = await makeRig();
  await rig.registry.registerPath('cache');
  await rig.registry.registerPath('backing');
  const t = rig.tree;
  const set = [...rig.registry.sets.keys()][0] ?? '';
  const I = `/sys/fs/bcache/${set}/internal`;
  assert.equal(t.read(`${I}/copy_gc_enabled`), '0\n');
  await t.write(`${I}/copy_gc_enabled`, '7');
  assert.equal(t.read(`${I}/copy_gc_enabled`), '1\n');
  assert.equal(t.read(`${I}/gc_after_writeback`), '0\n');
  await t.write(`${I}/gc_after_writeback`, '5');
  assert.equal(t.read(`${I}/gc_after_writeback`), '1\n', 'clamped to 1');
  await refused(t, `${I}/gc_after_writeback`, 'x', 'EINVAL');
  assert.ok(!t.list(`/sys/fs/bcache/${set}`).includes('copy_gc_enabled'), 'only in internal/');
  assert.match(t.read(`${I}/active_journal_entries`), /^[1-9][0-9]*\n$/);
  assert.equal(t.read(`${I}/btree_split_last_sec`), '-1\n');
  assert.match(t.read(`${I}/bset_tree_stats`), /^btree nodes:\t\t1\nwritten sets:\t\t1\n/);
  assert.match(t.read(`/sys/fs/bcache/${set}/cache0/btree_written`), /^[0-9.]+k\n$/);
  assert.match(t.read(`/sys/fs/bcache/${set}/cache0/priority_stats`), /^Unused:\t\t\d+%\n/);
  assert.equal(t.read(`${I}/cache_read_races`), '0\n');
  await t.stop();
  await rig.registry.stopAll();
  assertNothingLeft();
});
