// Power cuts (CrashableBlockDevice: every write not covered by a flush is
// kept, dropped or torn, sector by sector, decided by a seed). After each cut
// the set is brought up again on what survived and every sector is checked:
// a write whose FLUSH or FUA completed reads back exactly (dirty data never
// lost, invalidations never undone); any other write reads back as one of the
// values it could have had, never as data that was not durable; the metadata
// decodes and the tree's invariants hold. Runs are replayable by seed.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { CrashableBlockDevice } from '../../src/blockdev/crashable.ts';
import {
  IoError,
  type BlockDevice,
  type Extent,
  type WriteOptions,
  type ZeroOptions,
} from '../../src/blockdev/types.ts';
import { CacheSet } from '../../src/bcache/cache-set.ts';
import { captureLog } from '../../src/util/log.ts';
import { Prng } from '../../src/util/prng.ts';
import { assertNothingLeft, formatCache } from './helpers.ts';
import { applyOp, checkRange, IndexModel, randomOp, writeExtent, type Op } from './model.ts';

const MiB = 1024 * 1024;
const INODES = 2;
const SECTORS = 2000;

/** What a sector may read back as after a power cut. */
interface Candidate {
  seed: number | undefined;
  dirty: boolean;
}

class CrashModel {
  /** Per sector: the values it may hold; the last one is the current one. */
  cands: Candidate[][][] = Array.from({ length: INODES }, () =>
    Array.from({ length: SECTORS }, () => [{ seed: undefined, dirty: false }]),
  );
  /** The current value came from a writeback-style clean (not journaled): dirty may come back. */
  cleaned: boolean[][] = Array.from({ length: INODES }, () => new Array<boolean>(SECTORS).fill(false));

  current(inode: number, s: number): Candidate {
    const c = this.cands[inode]?.[s];
    return c?.[c.length - 1] ?? { seed: undefined, dirty: false };
  }

  add(inode: number, start: number, end: number, c: Candidate, cleaned = false): void {
    for (let s = start; s < end; s++) {
      this.cands[inode]?.[s]?.push({ ...c });
      (this.cleaned[inode] as boolean[])[s] = cleaned;
    }
  }

  /** A durable point for [start, end) (FUA) or everything (FLUSH). */
  settle(inode?: number, start = 0, end = SECTORS): void {
    for (let i = 0; i < INODES; i++) {
      if (inode !== undefined && i !== inode) continue;
      for (let s = start; s < end; s++) {
        const cur = this.current(i, s);
        const keep: Candidate[] = [cur];
        if (this.cleaned[i]?.[s] === true) keep.unshift({ seed: cur.seed, dirty: true });
        (this.cands[i] as Candidate[][])[s] = keep;
      }
    }
  }

  /** The model as an IndexModel of current values (for checks while running). */
  index(): IndexModel {
    const m = new IndexModel(INODES, SECTORS);
    for (let i = 0; i < INODES; i++) {
      for (let s = 0; s < SECTORS; s++) {
        const c = this.current(i, s);
        if (c.seed !== undefined) m.set(i, s, s + 1, { seed: c.seed, dirty: c.dirty });
      }
    }
    return m;
  }

  allowed(inode: number, s: number, seed: number | undefined, dirty: boolean): boolean {
    const cands = this.cands[inode]?.[s] ?? [];
    if (seed === undefined) return cands.some((c) => c.seed === undefined || !c.dirty);
    return cands.some((c) => c.seed === seed && (c.dirty === dirty || (!dirty && this.cleanedCandidate(cands, seed))));
  }

  private cleanedCandidate(cands: Candidate[], seed: number): boolean {
    return cands.some((c) => c.seed === seed && !c.dirty);
  }

  /** After the crash, the surviving value becomes the only one. */
  resetTo(inode: number, s: number, seed: number | undefined, dirty: boolean): void {
    (this.cands[inode] as Candidate[][])[s] = [{ seed, dirty }];
    (this.cleaned[inode] as boolean[])[s] = false;
  }
}

/** Apply an op, recording in the crash model what it may have changed. */
async function step(cs: CacheSet, model: CrashModel, o: Op, seed: number): Promise<void> {
  const idx = model.index();
  // Record first: if the power goes during the op, any of its effects may have landed.
  if (o.op === 'write') model.add(o.inode, o.start, o.start + o.sectors, { seed, dirty: o.dirty });
  if (o.op === 'invalidate') model.add(o.inode, o.start, o.end, { seed: undefined, dirty: false });
  // A clean cut short may have cleaned any of the keys it was given, and a
  // node write may have made that durable before the power went.
  const mayClean = o.op === 'clean' ? await cs.scanDirty(o.inode, 0, 4) : [];
  try {
    await applyOp(cs, idx, o, seed);
  } catch (err) {
    for (const k of mayClean) {
      for (let s = k.offset - k.size; s < k.offset; s++) {
        const cur = model.current(k.inode, s);
        if (cur.dirty) model.add(k.inode, s, s + 1, { seed: cur.seed, dirty: false }, true);
      }
    }
    throw err;
  }
  if (o.op === 'clean') {
    // applyOp cleaned some keys in `idx`: mirror that.
    for (let i = 0; i < INODES; i++) {
      for (let s = 0; s < SECTORS; s++) {
        const was = model.current(i, s);
        const now = idx.get(i, s);
        if (was.dirty && now && !now.dirty) model.add(i, s, s + 1, { seed: now.seed, dirty: false }, true);
      }
    }
  }
  if (o.op === 'flush') model.settle();
  if (o.op === 'write' && o.fua) model.settle(o.inode, o.start, o.start + o.sectors);
}

async function verifyAfterCrash(cs: CacheSet, model: CrashModel, seed: number): Promise<void> {
  for (let inode = 0; inode < INODES; inode++) {
    await checkRange(cs, new IndexModel(INODES, SECTORS), inode, 0, SECTORS, (i, s, got, dirty) => {
      const ok = model.allowed(i, s, got, dirty);
      if (ok) model.resetTo(i, s, got, dirty);
      return ok;
    });
  }
  assert.deepEqual(await cs.btree.verify(), [], `tree invariants after the crash (seed ${seed})`);
}

/**
 * A crashable device whose power goes at its N-th write or flush (that call
 * and every later one fail): cuts land anywhere in the engine's I/O
 * sequences, in the middle of a journal commit, a rewrite or a prio write.
 */
class CutAt implements BlockDevice {
  readonly name: string;
  readonly size: number;
  readonly logicalBlockSize: number;
  readonly readOnly = false;
  readonly caps: BlockDevice['caps'];
  private inner: CrashableBlockDevice;
  private left: number;
  private seed: number;
  /** The device after the cut. */
  private after: CrashableBlockDevice | undefined;

  /** Has the power gone? */
  isOff(): boolean {
    return this.after !== undefined;
  }

  constructor(inner: CrashableBlockDevice, ios: number, seed: number) {
    this.inner = inner;
    this.name = inner.name;
    this.size = inner.size;
    this.logicalBlockSize = inner.logicalBlockSize;
    this.caps = inner.caps;
    this.left = ios;
    this.seed = seed;
    this.rng = new Prng(seed + 1);
  }

  private readonly rng: Prng;

  /** A seeded 0-2 event-loop turns before each I/O: writes, flushes and the engine's steps interleave differently. */
  private async jitter(): Promise<void> {
    for (let n = this.rng.below(3); n > 0; n--) await new Promise<void>((resolve) => setImmediate(resolve));
  }

  private tick(): void {
    if (this.after) throw new IoError('EIO', 'power is off');
    if (--this.left <= 0) {
      this.after = this.inner.powerCut(this.seed);
      throw new IoError('EIO', 'power cut');
    }
  }

  /** Cut at the `ios`-th write or flush from now, with this crash seed. */
  arm(ios: number, seed: number): void {
    this.left = ios;
    this.seed = seed;
  }

  cut(): CrashableBlockDevice {
    this.after ??= this.inner.powerCut(this.seed);
    return this.after;
  }

  async read(buf: Buffer, offset: number): Promise<void> {
    await this.jitter();
    await this.inner.read(buf, offset);
  }
  async write(buf: Buffer, offset: number, options?: WriteOptions): Promise<void> {
    await this.jitter();
    this.tick();
    await this.inner.write(buf, offset, options);
  }
  async flush(): Promise<void> {
    await this.jitter();
    this.tick();
    await this.inner.flush();
  }
  async discard(offset: number, length: number): Promise<void> {
    this.tick();
    await this.inner.discard(offset, length);
  }
  async writeZeroes(offset: number, length: number, options?: ZeroOptions): Promise<void> {
    this.tick();
    await this.inner.writeZeroes(offset, length, options);
  }
  blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.inner.blockStatus(offset, length);
  }
  close(): Promise<void> {
    return Promise.resolve();
  }
}

async function run(seed: number): Promise<{ cuts: number; inOp: number; moved: number; movingAtCut: number }> {
  const rng = new Prng(seed);
  let dev = new CrashableBlockDevice(4 * MiB);
  await formatCache(dev, { bucketSize: 8, blockSize: 1 });
  await dev.flush();
  const options = {
    closeDevice: false,
    copyGc: true,
    journalDelayMs: 2,
    gcSectors: 1500,
    gcSliceMs: 0,
    seed,
    btreeNodeSectors: 4,
  };
  let cut = new CutAt(dev, Number.MAX_SAFE_INTEGER, seed);
  let cs = await CacheSet.open(cut, options);
  const model = new CrashModel();
  let cuts = 0;
  let inOp = 0;
  let moved = 0;
  let movingAtCut = 0;
  let n = 0;
  for (let round = 0; round < 5; round++) {
    // Arm the cut: power goes at a random I/O from now on (or, if the ops run out first, after them).
    cut.arm(1 + rng.below(400), seed * 100 + round);
    for (let i = 0; i < 150 && !cut.isOff(); i++) {
      const o = randomOp(rng, model.index(), 16);
      if (o.op === 'check') continue;
      if (o.op === 'gc') {
        // Not awaited: the pass and the moving GC after it run on while the ops go on, and the cut may hit them.
        cs.triggerGc();
        continue;
      }
      try {
        await step(cs, model, o, seed * 1_000_000 + n++);
      } catch (err) {
        if (!cut.isOff()) throw err;
        inOp++;
      }
    }
    const next = cut.cut();
    cuts++;
    if (cs.movingGc.inProgress) movingAtCut++;
    moved += cs.stats.movingGc.keysMoved;
    await cs.stop();
    dev = next;
    cut = new CutAt(dev, Number.MAX_SAFE_INTEGER, seed + round);
    // A new seed for each bring-up: node seqs must never repeat on one cache
    // (CacheSetOptions.seed); with the same seed the new set would give a
    // reused bucket the seq its old node had, and that node's bsets would
    // read as the new one's.
    cs = await CacheSet.open(cut, { ...options, seed: seed * 1000 + round + 1 });
    await verifyAfterCrash(cs, model, seed);
  }
  moved += cs.stats.movingGc.keysMoved;
  await cs.stop();
  return { cuts, inOp, moved, movingAtCut };
}

/**
 * The seeds the test runs: 11-34, or UBCACHE_POWER_CUT_SEEDS=FROM-TO (TO
 * excluded) for a longer hunt. Runs differ with timing as well as with the
 * seed (the journal's and GC's timers are real), so a rare failure shows up
 * only over thousands of seeds: a leaf append written before its keys' data
 * was durable did (2026-12-07), about once in 3000 runs, and now has its own
 * deterministic test below.
 */
const SEEDS = ((): { from: number; to: number } => {
  const m = /^(\d+)-(\d+)$/.exec(process.env['UBCACHE_POWER_CUT_SEEDS'] ?? '');
  return m ? { from: Number(m[1]), to: Number(m[2]) } : { from: 11, to: 35 };
})();

test('power cuts: flushed data survives exactly, the rest reads old or new, never garbage', async () => {
  const cap = captureLog();
  let inOp = 0;
  let moved = 0;
  let movingAtCut = 0;
  try {
    for (let seed = SEEDS.from; seed < SEEDS.to; seed++) {
      try {
        const r = await run(seed);
        inOp += r.inOp;
        moved += r.moved;
        movingAtCut += r.movingAtCut;
      } catch (err) {
        const tail = cap.lines.slice(-15).join('\n');
        throw new Error(
          `power-cut run with seed ${seed} failed: ${err instanceof Error ? err.message : String(err)}\nlast log lines:\n${tail}`,
          { cause: err },
        );
      }
    }
  } finally {
    cap.restore();
  }
  assert.ok(inOp > 0, 'some cuts hit an operation in flight');
  // Moving GC (on by default) copied keys between cuts, and some cuts came while a round was in flight.
  assert.ok(moved > 0, `moving GC moved keys (${moved})`);
  assert.ok(movingAtCut > 0, `cuts during a moving GC round (${movingAtCut})`);
  assertNothingLeft();
});

test('two appends to one leaf with no flush between: every crash leaves a readable node', async () => {
  // Without a flush between two bset writes of a node, the device may keep
  // the second and lose the first: a hole with the node's seq behind it,
  // which neither we nor the kernel can read ("corrupted btree"). The second
  // append must therefore wait for the first to be durable.
  const cap = captureLog();
  try {
    const dev = new CrashableBlockDevice(4 * MiB);
    await formatCache(dev, { bucketSize: 8, blockSize: 1 });
    await dev.flush();
    const cs = await CacheSet.open(dev, { closeDevice: false, seed: 1, btreeNodeSectors: 8 });
    const leaf = cs.btree.root;
    assert.ok(leaf.isLeaf, 'a new set has a leaf for its root');
    await writeExtent(cs, 0, 0, 8, 1, false);
    await cs.btree.writeNode(leaf);
    const flushesBefore = cs.io.stats.flushes;
    await writeExtent(cs, 0, 100, 8, 2, false);
    await cs.btree.writeNode(leaf);
    assert.ok(leaf.written >= 3, `three bsets were written (${leaf.written} blocks)`);
    assert.ok(cs.io.stats.flushes > flushesBefore, 'the second append flushed the first before it');
    for (let seed = 0; seed < 64; seed++) {
      const after = await CacheSet.open(dev.crashImage(seed), { closeDevice: false, seed: 100 + seed });
      assert.deepEqual(await after.btree.verify(), [], `tree invariants (crash seed ${seed})`);
      await after.stop();
    }
    await cs.stop();
  } finally {
    cap.restore();
  }
});

test('a leaf append never lands before the data its keys point at', async () => {
  // A leaf the durable tree already reaches takes its new keys as an
  // appended bset, with no jset (and so no R1 flush) in front of it. Written
  // while a key's data write had completed but was not yet flushed, a power
  // cut could keep the bset and drop the data: the key would then serve what
  // the sectors held before (the power-cut test, seed 13638 of a longer run:
  // "inode 1 sector 262 holds the data of sector 1238").
  const cap = captureLog();
  try {
    const dev = new CrashableBlockDevice(4 * MiB);
    await formatCache(dev, { bucketSize: 8, blockSize: 1 });
    await dev.flush();
    // No timed journal commit and no GC: nothing flushes but what the append itself does.
    const cs = await CacheSet.open(dev, { closeDevice: false, seed: 1, journalDelayMs: 60_000, gcSectors: 1 << 30 });
    const leaf = cs.btree.root;
    assert.ok(leaf.isLeaf, 'a new set has a leaf for its root');
    await writeExtent(cs, 0, 0, 8, 1, true);
    await cs.btree.writeNode(leaf);
    const model = new IndexModel(INODES, SECTORS);
    model.set(0, 0, 8, { seed: 1, dirty: true });
    let hits = 0;
    for (let seed = 0; seed < 64; seed++) {
      const after = await CacheSet.open(dev.crashImage(seed), { closeDevice: false, seed: 100 + seed });
      // Either the append was lost (a miss) or it came with its data; never a hit on other data.
      await checkRange(after, model, 0, 0, 8, (_i, _s, got) => {
        if (got !== undefined) hits++;
        return true;
      });
      await after.stop();
    }
    assert.ok(hits > 0, 'some crashes kept the append');
    await cs.stop();
  } finally {
    cap.restore();
  }
});
