// The journal across restarts and crashes: committed keys come back after a
// crash that drops everything unflushed; a small ring wraps many times while
// reclaim writes the leaves that pin old entries; a missing entry in the
// middle of the replay range is an error naming the range.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { CrashableBlockDevice } from '../../src/blockdev/crashable.ts';
import { SimClock } from '../../src/util/clock.ts';
import { MemoryBlockDevice } from '../../src/blockdev/memory.ts';
import { setMagic } from '../../src/format/superblock.ts';
import { scanJournalBucket } from '../../src/format/jset.ts';
import { CacheSet } from '../../src/bcache/cache-set.ts';
import { captureLog } from '../../src/util/log.ts';
import { Prng } from '../../src/util/prng.ts';
import { assertNothingLeft, formatCache } from './helpers.ts';
import { checkRange, IndexModel, writeExtent } from './model.ts';

const MiB = 1024 * 1024;

test('committed keys survive a crash that drops every unflushed write; the ring wraps many times', async () => {
  const dev = new CrashableBlockDevice(4 * MiB);
  await formatCache(dev, { bucketSize: 8, blockSize: 1 });
  const cs = await CacheSet.open(dev, { closeDevice: false, journalDelayMs: 0 });
  const model = new IndexModel(1, 30000);
  const rng = new Prng(7);
  for (let i = 0; i < 600; i++) {
    const start = rng.below(29000);
    const sectors = 1 + rng.below(8);
    await writeExtent(cs, 0, start, sectors, i + 1, true);
    model.set(0, start, start + sectors, { seed: i + 1, dirty: true });
  }
  await cs.flush();
  const ring = cs.journal.ring.length;
  assert.ok(
    cs.stats.journal.reclaimedBuckets > 3 * ring,
    `the ring of ${ring} buckets wrapped (${cs.stats.journal.reclaimedBuckets} buckets reclaimed)`,
  );
  assert.ok(cs.stats.journal.entriesWritten > 100);
  // The power goes: only what was flushed is there (the old set's errors are expected).
  const after = dev.powerCut(1, { policy: 'drop' });
  const cap = captureLog();
  await cs.stop().finally(cap.restore);
  const cs2 = await CacheSet.open(after, { closeDevice: false });
  await checkRange(cs2, model, 0, 0, 30000);
  assert.equal(cs2.dirtySectors(0), model.dirtySectors(0));
  await cs2.stop();
  assertNothingLeft();
});

test('a FUA insert makes it and everything inserted before it durable; a later unflushed one goes with the power', async () => {
  const dev = new CrashableBlockDevice(32 * MiB);
  await formatCache(dev, { bucketSize: 64 });
  const cs = await CacheSet.open(dev, { closeDevice: false, journalDelayMs: 60_000 });
  await writeExtent(cs, 3, 0, 8, 1, true);
  await writeExtent(cs, 3, 8, 8, 2, true, true);
  await writeExtent(cs, 3, 16, 8, 3, true);
  const after = dev.powerCut(2, { policy: 'drop' });
  const cap = captureLog();
  await cs.stop().finally(cap.restore);
  const cs2 = await CacheSet.open(after, { closeDevice: false });
  const model = new IndexModel(4, 24);
  model.set(3, 0, 8, { seed: 1, dirty: true });
  model.set(3, 8, 16, { seed: 2, dirty: true });
  await checkRange(cs2, model, 3, 0, 24);
  await cs2.stop();
});

test('an entry missing in the middle of the replay range is an error naming it', async () => {
  const mem = new MemoryBlockDevice(32 * MiB);
  await formatCache(mem, { bucketSize: 64 });
  const cs = await CacheSet.open(mem, { closeDevice: false, journalDelayMs: 0 });
  for (let i = 0; i < 20; i++) await writeExtent(cs, 1, i * 8, 8, i + 1, true, true);
  // A crash now: the image as it is, nothing written at stop.
  const image = mem.clone();
  const ring = cs.journal.ring;
  await cs.stop();
  const magic = setMagic(cs.sb);
  const buf = Buffer.alloc(64 * 512);
  let found: { at: number; seq: number } | undefined;
  for (const b of ring) {
    image.readSync(buf, b * 64 * 512);
    const scan = scanJournalBucket(buf, { setMagic: magic, blockSize: 8 });
    const newest = Math.max(0, ...scan.entries.map((j) => j.seq));
    // An entry in the middle: not the first and not the last of its bucket.
    let offset = 0;
    for (const j of scan.entries) {
      if (j.seq > j.lastSeq && j.seq < newest && !found) found = { at: b * 64 * 512 + offset, seq: j.seq };
      offset += 4096 * Math.ceil((240 + 8 * j.keys.reduce((n, k) => n + 2 + k.ptrs.length, 0)) / 4096);
    }
  }
  assert.ok(found, 'a middle entry to damage');
  const damaged = Buffer.alloc(8);
  image.readSync(damaged, found.at + 16);
  damaged[0] = (damaged[0] ?? 0) ^ 0xff;
  image.writeSync(damaged, found.at + 16);
  const cap = captureLog();
  try {
    await assert.rejects(CacheSet.open(image, { closeDevice: false }), /journal entries \d+-\d+ missing/);
  } finally {
    cap.restore();
  }
  assertNothingLeft();
});

test('group commit: concurrent flushes share journal writes; a quiet journal writes when its delay is up', async () => {
  // On simulated time: the delay is exact, and waiting for it takes no real time.
  const clock = new SimClock();
  const run = <T>(p: Promise<T>): Promise<T> => clock.run(p);
  const dev = new MemoryBlockDevice(32 * MiB);
  await formatCache(dev, { bucketSize: 64 });
  const cs = await run(CacheSet.open(dev, { closeDevice: false, journalDelayMs: 60_000, clock }));
  await run(writeExtent(cs, 0, 0, 8, 1, true));
  const before = cs.stats.journal.entriesWritten;
  await run(Promise.all(Array.from({ length: 20 }, () => cs.flush())));
  const written = cs.stats.journal.entriesWritten - before;
  assert.ok(written >= 1 && written <= 2, `20 concurrent flushes took ${written} journal writes`);
  await run(cs.stop());
  // With a 5 s delay the open entry is written without anyone asking, 5 s after its first key.
  const cs2 = await run(CacheSet.open(dev, { closeDevice: false, journalDelayMs: 5000, clock }));
  const n = cs2.stats.journal.entriesWritten;
  await run(writeExtent(cs2, 0, 8, 8, 2, true));
  const entry = cs2.journal.openEntry;
  assert.ok(entry.keys.length >= 1, 'the keys wait in the open entry');
  await clock.advance(4999);
  assert.equal(entry.durable, false, 'not before the delay is up');
  assert.equal(cs2.stats.journal.entriesWritten, n);
  await clock.advance(1);
  assert.equal(entry.durable, true, 'written when the delay is up');
  assert.ok(cs2.stats.journal.entriesWritten > n);
  await run(cs2.stop());
  assert.equal(clock.pending, 0);
  assertNothingLeft();
});

/** A memory device that counts the bytes read inside [from, to). */
class CountingDevice extends MemoryBlockDevice {
  from = 0;
  to = 0;
  bytes = 0;
  override read(buf: Buffer, offset: number): Promise<void> {
    const end = Math.min(offset + buf.length, this.to);
    if (end > Math.max(offset, this.from)) this.bytes += end - Math.max(offset, this.from);
    return super.read(buf, offset);
  }
}

test('bring-up reads the journal buckets it replays from, not the whole ring; a damaged newest bucket falls back to reading every bucket', async () => {
  const dev = new CountingDevice(64 * MiB);
  await formatCache(dev, { bucketSize: 8, blockSize: 1 });
  const cs = await CacheSet.open(dev, { closeDevice: false, journalDelayMs: 0 });
  const model = new IndexModel(1, 30000);
  const rng = new Prng(11);
  for (let i = 0; i < 1500; i++) {
    const start = rng.below(29000);
    const sectors = 1 + rng.below(8);
    await writeExtent(cs, 0, start, sectors, i + 1, true, i % 7 === 0);
    model.set(0, start, start + sectors, { seed: i + 1, dirty: true });
  }
  const ring = [...cs.journal.ring];
  assert.ok(ring.length >= 64, `a ring of ${ring.length} buckets`);
  assert.ok(cs.stats.journal.reclaimedBuckets > ring.length, 'the ring wrapped');
  // A clean stop writes the nodes and a last entry that replays nothing older: the rest of the ring is history.
  await cs.stop();
  const image = dev.clone();
  const counted = (): CountingDevice => {
    const d = new CountingDevice(64 * MiB);
    const buf = Buffer.alloc(64 * MiB);
    image.readSync(buf, 0);
    d.writeSync(buf, 0);
    // The ring is contiguous after the superblock's bucket (the format puts it there).
    d.from = Math.min(...ring) * 8 * 512;
    d.to = (Math.max(...ring) + 1) * 8 * 512;
    return d;
  };
  const ringBytes = ring.length * 8 * 512;

  const d1 = counted();
  const cs1 = await CacheSet.open(d1, { closeDevice: false });
  const fastBytes = d1.bytes;
  await checkRange(cs1, model, 0, 0, 30000);
  await cs1.stop();
  assert.ok(fastBytes < ringBytes / 4, `journal bytes read at bring-up: ${fastBytes} of a ${ringBytes}-byte ring`);

  // Damage the first entry of the bucket whose first entry is newest: its header still says where to
  // look, but its checksum fails, so the whole ring is read and the newest intact entry wins.
  const magic = setMagic(cs.sb);
  const buf = Buffer.alloc(8 * 512);
  let newest = { bucket: -1, seq: 0 };
  for (const b of ring) {
    image.readSync(buf, b * 8 * 512);
    const first = scanJournalBucket(buf, { setMagic: magic, blockSize: 1 }).entries[0];
    if (first && first.seq > newest.seq) newest = { bucket: b, seq: first.seq };
  }
  assert.ok(newest.bucket >= 0);
  const d2 = counted();
  const byte = Buffer.alloc(1);
  d2.readSync(byte, newest.bucket * 8 * 512 + 200);
  byte[0] = (byte[0] ?? 0) ^ 0xff;
  d2.writeSync(byte, newest.bucket * 8 * 512 + 200);
  const cap2 = captureLog();
  try {
    const cs2 = await CacheSet.open(d2, { closeDevice: false });
    assert.ok(d2.bytes > fastBytes, `the fallback read more of the ring (${d2.bytes} vs ${fastBytes} bytes)`);
    assert.deepEqual(await cs2.btree.verify(), []);
    await cs2.stop();
  } finally {
    cap2.restore();
  }
  assertNothingLeft();
});
