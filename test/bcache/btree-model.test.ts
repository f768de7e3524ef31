// Random writes, invalidations, writeback-style replaces and lookups against
// a per-sector model, on a 4 MiB cache of 4 KiB buckets, with the btree's
// nodes shrunk to 1 KiB (two 512-byte blocks): every other insert into a leaf
// rewrites it, splits and new roots happen all the time and the tree grows
// four levels deep; the small cache keeps invalidation, prio writes and GC
// busy. Moving GC (copy_gc_enabled, the default) runs after each pass.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryBlockDevice } from '../../src/blockdev/memory.ts';
import { CacheSet } from '../../src/bcache/cache-set.ts';
import { Prng } from '../../src/util/prng.ts';
import { assertNothingLeft, checkMarks, formatCache } from './helpers.ts';
import { applyOp, checkRange, IndexModel, randomOp } from './model.ts';

const MiB = 1024 * 1024;

/**
 * lookupOneNow (the hit path's one-descent lookup) gives a hit exactly when
 * lookupNow's answer is one hit covering the range, and the same hit: over
 * short ranges at random (inside extents, across their edges and leaves'
 * boundaries, over holes) and over each hit of a longer one.
 */
let oneNowHits = 0;
function checkLookupOneNow(cs: CacheSet, rng: Prng, model: IndexModel): void {
  const probe = (inode: number, start: number, end: number): void => {
    const now = cs.lookupNow(inode, start, end);
    const one = cs.lookupOneNow(inode, start, end);
    const where = `lookupOneNow(${inode}, ${start}, ${end})`;
    if (now === undefined) {
      assert.equal(one, undefined, `${where} answered where lookupNow had to wait`);
      return;
    }
    const single = now.length === 1 ? now[0]?.hit : undefined;
    if (single == null) {
      assert.equal(one, undefined, `${where} against ${JSON.stringify(now)}`);
      return;
    }
    assert.deepEqual(one === undefined ? undefined : { ...one }, single, where);
    oneNowHits++;
  };
  for (let k = 0; k < 20; k++) {
    const inode = rng.below(model.inodes);
    const start = rng.below(model.sectors - 1);
    const end = Math.min(model.sectors, start + 1 + rng.below(16));
    probe(inode, start, end);
    // And the hits of a longer range: each one extent's, whole and by its last sector.
    for (const seg of cs.lookupNow(inode, start, start + 64) ?? []) {
      if (seg.hit === null) continue;
      probe(inode, seg.start, seg.end);
      probe(inode, seg.end - 1, seg.end);
    }
  }
}

async function run(seed: number, ops: number, btreeCacheSize?: number): Promise<CacheSet['stats'] & { depth: number }> {
  const dev = new MemoryBlockDevice(4 * MiB);
  await formatCache(dev, { bucketSize: 8, blockSize: 1 });
  const cs = await CacheSet.open(dev, {
    closeDevice: false,
    // Moving GC after every pass (off by default, as in the kernel): the model must hold while keys move.
    copyGc: true,
    journalDelayMs: 1,
    gcSectors: 2000,
    // A GC slice per leaf: inserts, rewrites and splits interleave with every walk.
    gcSliceMs: 0,
    seed,
    btreeNodeSectors: 2,
    ...(btreeCacheSize === undefined ? {} : { btreeCacheSize }),
  });
  const rng = new Prng(seed);
  const model = new IndexModel(3, 6000);
  try {
    for (let i = 0; i < ops; i++) {
      const o = randomOp(rng, model, 8);
      await applyOp(cs, model, o, seed * 100000 + i);
      if (i % 5 === 0) checkLookupOneNow(cs, rng, model);
      if (i % 25 === 0) {
        assert.deepEqual(await cs.btree.verify(), [], `tree invariants after op ${i}`);
        assert.deepEqual(await checkMarks(cs), [], `bucket marks after op ${i}`);
      }
    }
    for (let inode = 0; inode < model.inodes; inode++) {
      await checkRange(cs, model, inode, 0, model.sectors);
      assert.equal(cs.dirtySectors(inode), model.dirtySectors(inode), `dirty sectors of inode ${inode}`);
    }
    assert.deepEqual(await cs.btree.verify(), []);
    return { ...cs.stats, depth: cs.btree.depth };
  } finally {
    await cs.stop();
  }
}

test('the index matches the model through splits, new roots, GC and bucket reuse', async () => {
  let splits = 0;
  let roots = 0;
  let prioWrites = 0;
  let gcRuns = 0;
  let moved = 0;
  let depth = 0;
  for (const seed of [1, 2, 3, 4]) {
    const s = await run(seed, 700);
    depth = Math.max(depth, s.depth);
    splits += s.btree.splits;
    roots += s.btree.newRoots;
    prioWrites += s.allocator.prioWrites;
    gcRuns += s.gc.runs;
    moved += s.movingGc.keysMoved;
  }
  assert.ok(splits > 10, `splits happened (${splits})`);
  assert.ok(roots > 3, `new roots happened (${roots})`);
  assert.ok(prioWrites > 0, `buckets were reused (${prioWrites} prio writes)`);
  assert.ok(gcRuns > 0, `GC ran (${gcRuns})`);
  // Moving GC (on by default) ran during the ops, and the model still matched.
  assert.ok(moved > 0, `moving GC moved keys (${moved})`);
  assert.ok(depth >= 3, `the tree grew ${depth} levels deep`);
  assert.ok(oneNowHits > 1000, `lookupOneNow answered hits (${oneNowHits})`);
  assertNothingLeft();
});

test('with a tiny node cache, leaves are evicted and read back as needed', async () => {
  // 16 leaves of 1 KiB at most in memory (interior nodes always stay).
  const s = await run(9, 700, 16 * 1024);
  assert.ok(s.btree.evictions > 20, `leaves were evicted (${s.btree.evictions})`);
  assert.ok(s.btree.reads > 20, `and read back (${s.btree.reads})`);
  assertNothingLeft();
});
