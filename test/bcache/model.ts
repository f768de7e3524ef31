// A model of what the index must say, sector by sector, and a driver that
// applies the same random operations to a CacheSet and to the model. Shared
// by the btree model test, the restart test and the power-cut test.

import assert from 'node:assert/strict';
import { makeKey, type Bkey } from '../../src/format/bkey.ts';
import type { CacheSet } from '../../src/bcache/cache-set.ts';
import { Prng } from '../../src/util/prng.ts';
import { sectorData } from './helpers.ts';

export interface Cell {
  /** The write that produced the sector's data. */
  seed: number;
  dirty: boolean;
}

export class IndexModel {
  readonly inodes: number;
  readonly sectors: number;
  cells: Array<Array<Cell | undefined>>;

  constructor(inodes: number, sectors: number) {
    this.inodes = inodes;
    this.sectors = sectors;
    this.cells = Array.from({ length: inodes }, () => new Array<Cell | undefined>(sectors).fill(undefined));
  }

  set(inode: number, start: number, end: number, cell: Cell | undefined): void {
    const row = this.cells[inode] as Array<Cell | undefined>;
    for (let s = start; s < end; s++) row[s] = cell ? { ...cell } : undefined;
  }

  get(inode: number, sector: number): Cell | undefined {
    return this.cells[inode]?.[sector];
  }

  dirtySectors(inode: number): number {
    return (this.cells[inode] ?? []).filter((c) => c?.dirty === true).length;
  }

  clone(): IndexModel {
    const m = new IndexModel(this.inodes, this.sectors);
    m.cells = this.cells.map((row) => row.map((c) => (c ? { ...c } : undefined)));
    return m;
  }
}

/** Write `sectors` of fresh data at [start, ...) and insert its keys. Returns the keys inserted. */
export async function writeExtent(
  cs: CacheSet,
  inode: number,
  start: number,
  sectors: number,
  seed: number,
  dirty: boolean,
  fua = false,
): Promise<Bkey[]> {
  const keys: Bkey[] = [];
  let done = 0;
  while (done < sectors) {
    const a = await cs.allocSectors({ inode, offset: start + done, sectors: sectors - done, dirty, wait: true });
    assert.ok(a, 'allocation');
    try {
      await cs.writeCache(sectorData(seed, start + done, a.sectors), a.ptr.offset);
      const key = makeKey(inode, start + done + a.sectors, a.sectors, dirty, [a.ptr]);
      await cs.insert([key], { fua });
      keys.push(key);
    } finally {
      cs.putAllocation(a);
    }
    done += a.sectors;
  }
  return keys;
}

/** Which write's data a cached sector holds, from its tag. */
export function tagOf(buf: Buffer): { seed: number; sector: number } | undefined {
  const tag = buf.toString('latin1', 0, 32).split('|')[0] ?? '';
  const [seed, sector] = tag.split(':').map(Number);
  if (seed === undefined || sector === undefined || Number.isNaN(seed) || Number.isNaN(sector)) return undefined;
  return { seed, sector };
}

/**
 * Compare [start, end) of `inode` with the model: dirty sectors must be hits
 * with their data; clean ones hits with their data or misses (the cache may
 * have dropped them); sectors the model has nothing for must be misses.
 * `allowed` widens what a sector may hold (after a power cut: any write not
 * covered by a flush, or nothing).
 */
export async function checkRange(
  cs: CacheSet,
  model: IndexModel,
  inode: number,
  start: number,
  end: number,
  allowed?: (inode: number, sector: number, seed: number | undefined, dirty: boolean) => boolean,
): Promise<void> {
  const segs = await cs.lookup(inode, start, end);
  let cursor = start;
  for (const seg of segs) {
    assert.equal(seg.start, cursor, 'segments cover the range in order');
    cursor = seg.end;
    let buf: Buffer | undefined;
    if (seg.hit) {
      buf = Buffer.alloc((seg.end - seg.start) * 512);
      await cs.readCache(buf, seg.hit.sector);
      // A clean bucket may have been reused while we read: then it is a miss after all.
      if (cs.isStale(seg.hit.bucket, seg.hit.gen)) {
        assert.ok(!seg.hit.dirty, 'dirty data is never invalidated');
        buf = undefined;
      }
    }
    for (let s = seg.start; s < seg.end; s++) {
      const want = model.get(inode, s);
      const got = buf ? tagOf(buf.subarray((s - seg.start) * 512, (s - seg.start + 1) * 512)) : undefined;
      if (buf) assert.ok(got, `inode ${inode} sector ${s}: a hit on data that was never written there (garbage)`);
      if (got) assert.equal(got.sector, s, `inode ${inode} sector ${s} holds the data of sector ${got.sector}`);
      const dirty = buf !== undefined && seg.hit?.dirty === true;
      if (allowed) {
        assert.ok(
          allowed(inode, s, got?.seed, dirty),
          `inode ${inode} sector ${s}: ${got ? `data of write ${got.seed}${dirty ? ' (dirty)' : ''}` : 'a miss'} is not allowed`,
        );
        continue;
      }
      if (!want) {
        assert.equal(got, undefined, `inode ${inode} sector ${s} should be a miss`);
      } else if (want.dirty) {
        assert.ok(got, `inode ${inode} sector ${s} is dirty (write ${want.seed}) but missing`);
        assert.equal(got.seed, want.seed, `inode ${inode} sector ${s}`);
        assert.equal(dirty, true, `inode ${inode} sector ${s} should be dirty`);
      } else if (got) {
        assert.equal(got.seed, want.seed, `inode ${inode} sector ${s}`);
        assert.equal(dirty, false, `inode ${inode} sector ${s} should be clean`);
      }
    }
  }
  assert.equal(cursor, end);
}

export type Op =
  | { op: 'write'; inode: number; start: number; sectors: number; dirty: boolean; fua: boolean }
  | { op: 'invalidate'; inode: number; start: number; end: number }
  | { op: 'clean'; inode: number }
  | { op: 'check'; inode: number; start: number; end: number }
  | { op: 'flush' }
  | { op: 'gc' };

export function randomOp(rng: Prng, model: IndexModel, maxWrite = 48): Op {
  const r = rng.below(100);
  const inode = rng.below(model.inodes);
  const start = rng.below(model.sectors - 1);
  if (r < 55) {
    const sectors = Math.min(model.sectors - start, 1 + rng.below(maxWrite));
    return { op: 'write', inode, start, sectors, dirty: rng.below(3) > 0, fua: rng.below(10) === 0 };
  }
  if (r < 65) return { op: 'invalidate', inode, start, end: Math.min(model.sectors, start + 1 + rng.below(200)) };
  if (r < 75) return { op: 'clean', inode };
  if (r < 95) return { op: 'check', inode, start, end: Math.min(model.sectors, start + 1 + rng.below(400)) };
  if (r < 98) return { op: 'flush' };
  return { op: 'gc' };
}

/** Apply one op to the set and the model. */
export async function applyOp(cs: CacheSet, model: IndexModel, o: Op, seed: number): Promise<void> {
  switch (o.op) {
    case 'write':
      await writeExtent(cs, o.inode, o.start, o.sectors, seed, o.dirty, o.fua);
      model.set(o.inode, o.start, o.start + o.sectors, { seed, dirty: o.dirty });
      return;
    case 'invalidate':
      await cs.invalidate(o.inode, o.start, o.end);
      model.set(o.inode, o.start, o.end, undefined);
      return;
    case 'clean': {
      // What writeback does: mark a dirty key clean with a replace of exactly that key.
      const movedBefore = cs.stats.movingGc.keysMoved;
      const keys = await cs.scanDirty(o.inode, 0, 4);
      for (const k of keys) {
        const clean = structuredClone(k);
        clean.dirty = false;
        const r = await cs.insert([clean], { replace: k });
        for (let s = k.offset - k.size; s < k.offset; s++) {
          assert.ok(model.get(o.inode, s)?.dirty, `scanDirty returned sector ${s}, which the model has clean`);
        }
        if (r.collisions === 0) {
          for (let s = k.offset - k.size; s < k.offset; s++) (model.get(o.inode, s) ?? assert.fail()).dirty = false;
          continue;
        }
        // Only moving GC, running in the background, may have changed the
        // key in between (as writeback's completion, the clean loses to the
        // move): same data, still dirty. What was cleaned is what the btree
        // now holds clean.
        assert.ok(
          cs.movingGc.inProgress || cs.stats.movingGc.keysMoved > movedBefore,
          'nothing but a move changed the key in between',
        );
        const now = await cs.btree.keysIn(o.inode, k.offset - k.size, k.offset);
        for (let s = k.offset - k.size; s < k.offset; s++) {
          const holder = now.find((n) => n.offset - n.size <= s && s < n.offset);
          assert.ok(holder, `sector ${s} is still in the cache after a move`);
          (model.get(o.inode, s) ?? assert.fail()).dirty = holder.dirty;
        }
      }
      return;
    }
    case 'check':
      await checkRange(cs, model, o.inode, o.start, o.end);
      return;
    case 'flush':
      await cs.flush();
      return;
    case 'gc':
      await cs.runGc();
      return;
  }
}
