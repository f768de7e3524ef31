// The copies of hot cache blocks in memory (src/bcache/ram-cache.ts): a read
// is served only with the bytes last admitted for that sector during the
// bucket's current use, never with data of an earlier use, and a block read
// often outlives blocks read once in its set.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { RamCache, RAM_MAX_READ, RAM_PAGE } from '../../src/bcache/ram-cache.ts';
import { Prng } from '../../src/util/prng.ts';
import { seedsFromEnv } from '../helpers/seeds.ts';

const S = 512;
const BUCKET = 1024; // sectors

function filled(seed: number, bytes: number): Buffer {
  const rng = new Prng(seed);
  const b = Buffer.alloc(bytes);
  for (let i = 0; i < bytes; i += 4) b.writeUInt32LE(rng.next() >>> 0, i);
  return b;
}

test('a read is served with what was admitted at its sector, for every page it covers, and declined otherwise', () => {
  const reuse = new Uint32Array(16);
  const c = new RamCache(reuse, BUCKET, 1024 * 1024);
  const data = filled(1, 3 * RAM_PAGE);
  assert.equal(c.read(Buffer.alloc(RAM_PAGE), 2048, 2), false, 'nothing held yet');
  c.admit(data, 2048, 2);
  assert.equal(c.stats.admitted, 3);

  const whole = Buffer.alloc(3 * RAM_PAGE);
  assert.equal(c.read(whole, 2048, 2), true);
  assert.deepEqual(whole, data);
  const second = Buffer.alloc(RAM_PAGE);
  assert.equal(c.read(second, 2048 + 8, 2), true, 'a page inside an admitted read');
  assert.deepEqual(second, data.subarray(RAM_PAGE, 2 * RAM_PAGE));
  const short = Buffer.alloc(S);
  assert.equal(c.read(short, 2048 + 16, 2), true, 'the start of a held page');
  assert.deepEqual(short, data.subarray(2 * RAM_PAGE, 2 * RAM_PAGE + S));

  const untouched = (what: string, buf: Buffer, sector: number): void => {
    buf.fill(0xee);
    assert.equal(c.read(buf, sector, 2), false, what);
    assert.ok(
      buf.every((x) => x === 0xee),
      `${what}: the buffer is not touched`,
    );
  };
  untouched('one page past the admitted ones', Buffer.alloc(4 * RAM_PAGE), 2048);
  untouched('a page that starts at another sector', Buffer.alloc(RAM_PAGE), 2048 + 1);
  untouched('longer than the most it serves', Buffer.alloc(RAM_MAX_READ + RAM_PAGE), 2048);
  untouched('empty', Buffer.alloc(0), 2048);

  // A short admitted page serves reads up to its length only.
  c.admit(filled(2, S), 4096, 4);
  assert.equal(c.read(Buffer.alloc(S), 4096, 4), true);
  assert.equal(c.read(Buffer.alloc(2 * S), 4096, 4), false);
});

test("a bucket's reuse makes every copy of its data dead, even at the same sector", () => {
  const reuse = new Uint32Array(8);
  const c = new RamCache(reuse, BUCKET, 256 * 1024);
  const old = filled(3, RAM_PAGE);
  c.admit(old, 3 * BUCKET + 64, 3);
  c.admit(filled(4, RAM_PAGE), 5 * BUCKET, 5);
  reuse[3] = (reuse[3] ?? 0) + 1; // bucket 3 invalidated and written again
  assert.equal(c.read(Buffer.alloc(RAM_PAGE), 3 * BUCKET + 64, 3), false, 'the old use is dead');
  assert.equal(c.read(Buffer.alloc(RAM_PAGE), 5 * BUCKET, 5), true, 'other buckets keep theirs');
  const fresh = filled(5, RAM_PAGE);
  c.admit(fresh, 3 * BUCKET + 64, 3);
  const got = Buffer.alloc(RAM_PAGE);
  assert.equal(c.read(got, 3 * BUCKET + 64, 3), true);
  assert.deepEqual(got, fresh);
});

test('a block read often stays while blocks read once pass through its set', () => {
  // One set of 4 ways: every page lands in it.
  const reuse = new Uint32Array(1 << 12);
  const c = new RamCache(reuse, BUCKET, 4 * RAM_PAGE);
  const hot = filled(6, RAM_PAGE);
  c.admit(hot, 0, 0);
  for (let i = 1; i <= 200; i++) {
    assert.equal(c.read(Buffer.alloc(RAM_PAGE), 0, 0), true, `the hot block is still held after ${i - 1} cold ones`);
    c.admit(filled(100 + i, RAM_PAGE), i * 8, 0);
  }
});

test('resize drops everything held; size 0 serves and keeps nothing', () => {
  const reuse = new Uint32Array(4);
  const c = new RamCache(reuse, BUCKET, 1024 * 1024);
  c.admit(filled(7, RAM_PAGE), 0, 0);
  assert.equal(c.allocated, 1024 * 1024);
  c.resize(0);
  assert.equal(c.size, 0);
  assert.equal(c.allocated, 0);
  c.admit(filled(7, RAM_PAGE), 0, 0);
  assert.equal(c.read(Buffer.alloc(RAM_PAGE), 0, 0), false);
  c.resize(64 * 1024);
  assert.equal(c.size, 64 * 1024);
  assert.equal(c.read(Buffer.alloc(RAM_PAGE), 0, 0), false, 'a resize starts empty');
});

// Against a model: the device's content per sector and each bucket's reuse
// count. Writes go only to a bucket's next unwritten sectors, and a bucket is
// reused (count bumped, rewritten from its start) as the allocator does; a
// read of live sectors through the cache must return the device's bytes.
for (const seed of seedsFromEnv('UBCACHE_RAM_CACHE_SEEDS', 1, 4)) {
  test(`seed ${seed}: reads through the cache return the device's data across reuse (model)`, () => {
    const rng = new Prng(seed);
    const buckets = 8;
    const reuse = new Uint32Array(buckets);
    const device = Buffer.alloc(buckets * BUCKET * S);
    const written = new Array<number>(buckets).fill(0); // sectors written in the current use
    const c = new RamCache(reuse, BUCKET, 24 * RAM_PAGE); // small: conflicts and evictions all the time
    let served = 0;
    for (let op = 0; op < 20000; op++) {
      const b = rng.below(buckets);
      const r = rng.below(100);
      if (r < 3) {
        reuse[b] = (reuse[b] ?? 0) + 1;
        written[b] = 0;
      } else if (r < 30) {
        const sectors = Math.min(1 + rng.below(24), BUCKET - (written[b] ?? 0));
        if (sectors <= 0) continue;
        const at = (b * BUCKET + (written[b] ?? 0)) * S;
        filled(seed * 100000 + op, sectors * S).copy(device, at);
        written[b] = (written[b] ?? 0) + sectors;
      } else {
        const w = written[b] ?? 0;
        if (w === 0) continue;
        // Mostly a few hot pages at the bucket's start, as a skewed workload reads; else anywhere, any length.
        const hot = w >= 8 && rng.below(4) > 0;
        const start = hot ? 8 * rng.below(Math.min(4, Math.floor(w / 8))) : rng.below(w);
        const sectors = hot ? 8 : 1 + rng.below(Math.min(w - start, RAM_MAX_READ / S + 8));
        const sector = b * BUCKET + start;
        const want = device.subarray(sector * S, (sector + sectors) * S);
        const buf = Buffer.alloc(sectors * S);
        if (c.read(buf, sector, b)) {
          served++;
          assert.deepEqual(buf, want, `op ${op}: ${sectors} sectors at ${sector} served stale or wrong`);
        } else {
          c.admit(Buffer.from(want), sector, b);
        }
      }
    }
    assert.ok(served > 500, `the cache served ${served} reads`);
  });
}
