// Shared helpers for the engine tests: formatting a cache device the way
// make-bcache does, deterministic data, a key-builder, a leak check.

import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import type { BlockDevice } from '../../src/blockdev/types.ts';
import { RESERVE_MOVINGGC } from '../../src/bcache/alloc.ts';
import { GC_MARK_DIRTY, GC_MARK_METADATA, GC_MARK_RECLAIMABLE } from '../../src/bcache/buckets.ts';
import type { CacheSet } from '../../src/bcache/cache-set.ts';
import { SB_OFFSET } from '../../src/format/constants.ts';
import { encodeSuperblock, newCacheSuperblock, type Superblock } from '../../src/format/superblock.ts';
import { Worker } from '../../src/util/lifecycle.ts';

export interface FormatOptions {
  bucketSize?: number;
  blockSize?: number;
  setUuid?: Buffer;
  discard?: boolean;
  replacement?: number;
}

/** Write a fresh cache superblock (make-bcache -C): the first open initialises the set. */
export async function formatCache(dev: BlockDevice, o: FormatOptions = {}): Promise<Superblock> {
  const bucketSize = o.bucketSize ?? 128;
  const sb = newCacheSuperblock({
    uuid: randomBytes(16),
    setUuid: o.setUuid ?? randomBytes(16),
    blockSize: o.blockSize ?? 8,
    bucketSize,
    nbuckets: Math.floor(dev.size / 512 / bucketSize),
    discard: o.discard ?? false,
    replacement: o.replacement ?? 0,
  });
  await dev.write(encodeSuperblock(sb), SB_OFFSET);
  await dev.flush();
  return sb;
}

/** `sectors` sectors of data that depend on (seed, sector), so misplaced data is caught. */
export function sectorData(seed: number, firstSector: number, sectors: number): Buffer {
  const buf = Buffer.alloc(sectors * 512);
  for (let s = 0; s < sectors; s++) {
    const tag = `${seed}:${firstSector + s}|`;
    buf.write(tag.repeat(Math.ceil(512 / tag.length)).slice(0, 512), s * 512, 'latin1');
  }
  return buf;
}

/** Fail if any of our workers or timers outlived the test's objects. */
export function assertNothingLeft(): void {
  const workers = [...Worker.live()].map((w) => w.name);
  assert.deepEqual(workers, [], 'no worker alive');
  const timers = process.getActiveResourcesInfo().filter((r) => r === 'Timeout' || r === 'Immediate');
  assert.deepEqual(timers, [], 'no timer pending');
}

/**
 * The allocator's view agrees with the tree, whatever a GC pass in progress
 * has seen so far: every node's bucket is metadata, every bucket a live key
 * points into holds data (dirty if the key is), so nothing live can be
 * invalidated, and each bucket's dirty count is what its dirty keys add up to.
 */
export async function checkMarks(cs: CacheSet): Promise<string[]> {
  const b = cs.buckets;
  const problems: string[] = [];
  const dirtyFound = new Int32Array(b.nbuckets);
  await cs.btree.lock.read();
  try {
    await cs.btree.walk((node) => {
      if (node.isLeaf) {
        node.keys.forEach((k) => {
          const p = k.ptrs[0];
          // A stale dirty key is not dirty data: its bucket was reused, which
          // the allocator allows only once nothing dirty was left in it. A
          // power cut's replay can bring one back (an old jset's dirty key,
          // written back and its bucket reused before the cut); the engine
          // counts it nowhere, as the kernel skips it, so neither does this.
          if (k.dirty && p && b.stale(p) === 0) {
            const i = b.bucketOf(p);
            dirtyFound[i] = (dirtyFound[i] ?? 0) + k.size;
          }
        });
      }
      const nb = Math.floor(node.bucketSector / b.bucketSize);
      if (b.mark[nb] !== GC_MARK_METADATA) problems.push(`node bucket ${nb} has mark ${b.mark[nb]}`);
      if (!node.isLeaf) return;
      node.keys.forEach((k) => {
        const p = k.ptrs[0];
        if (!p || b.stale(p) > 0) return;
        const i = b.bucketOf(p);
        const m = b.mark[i];
        if (k.dirty ? m !== GC_MARK_DIRTY : m !== GC_MARK_RECLAIMABLE && m !== GC_MARK_DIRTY) {
          problems.push(`bucket ${i} holds a live ${k.dirty ? 'dirty' : 'clean'} key but has mark ${m}`);
        }
      });
    });
    // Every bucket's dirty count is exactly the dirty keys pointing into it.
    for (let i = 0; i < b.nbuckets; i++) {
      if (dirtyFound[i] !== b.dirty[i])
        problems.push(`bucket ${i}: ${b.dirty[i]} dirty sectors counted, ${dirtyFound[i]} in the tree`);
    }
  } finally {
    cs.btree.lock.releaseRead();
  }
  return problems;
}

/**
 * Fill the movinggc reserve before a moving GC round, as the kernel's
 * allocator thread has by the time the next pass runs: each bucket is waited
 * for from the allocator (an event, not a poll) and put back on that reserve.
 */
export async function stockMovingReserve(cs: CacheSet): Promise<void> {
  const fifo = cs.allocator.free[RESERVE_MOVINGGC];
  const got: number[] = [];
  while (got.length < fifo.capacity - fifo.length) {
    const b = await cs.allocator.alloc(RESERVE_MOVINGGC, true);
    assert.ok(b !== undefined);
    got.push(b);
  }
  for (const b of got) cs.allocator.unalloc(b, RESERVE_MOVINGGC);
}
