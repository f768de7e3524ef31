// Everything Linux 6.1 wrote in the fixture images (test/fixtures/kernel)
// decodes, checks out, and re-encodes to the kernel's own bytes; and the data
// written through /dev/bcache0 is where the keys say it is.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  btreePtrInvalid,
  extentInvalid,
  keyStart,
  MAX_KEY,
  bkeyCmp,
  ptrAvailable,
  ptrBucket,
  ptrStale,
  type Bkey,
} from '../../src/format/bkey.ts';
import { decodeBtreeNode, encodeBset, bsetBytes, bsetMagic } from '../../src/format/bset.ts';
import {
  btreeNodeSectors,
  metaBucketBytes,
  metaBucketPages,
  PAGE_SECTORS,
  prioBucketCount,
  priosPerBucket,
  uuidSlotCount,
} from '../../src/format/constants.ts';
import {
  encodeJset,
  jsetBytes,
  missingJournalRanges,
  scanJournalBucket,
  selectReplayEntries,
  type Jset,
} from '../../src/format/jset.ts';
import { decodePrioBucket, encodePrioBucket } from '../../src/format/prio.ts';
import { decodeSuperblock, setMagic, type Superblock } from '../../src/format/superblock.ts';
import { decodeUuidBucket, encodeUuidBucket, isFreeSlot } from '../../src/format/uuid.ts';
import { formatUuid } from '../../src/format/uuid-text.ts';
import { keysU64s, ptrValue } from '../../src/format/bkey.ts';
import { KERNEL_FIXTURES, loadKernelFixture, type KernelFixtureName } from '../helpers/fixtures.ts';

interface Decoded {
  sb: Superblock;
  img: Buffer;
  bdev: Buffer | undefined;
  /** Journal entries per journal bucket index. */
  journal: Jset[][];
  replay: Jset[];
  nodeKeys: Bkey[][];
  gens: Uint8Array;
}

function bucket(img: Buffer, sb: Superblock, b: number): Buffer {
  const bytes = sb.bucketSize * 512;
  return img.subarray(b * bytes, (b + 1) * bytes);
}

function decodeFixture(name: KernelFixtureName): Decoded {
  const { cache: img, bdev } = loadKernelFixture(name);
  const sb = decodeSuperblock(img.subarray(4096, 8192), { deviceSectors: img.length / 512 });
  const magic = setMagic(sb);
  const blockBytes = sb.blockSize * 512;

  const journal = sb.journalBuckets.map((b) => {
    const raw = bucket(img, sb, b);
    const scan = scanJournalBucket(raw, { setMagic: magic, blockSize: sb.blockSize });
    let at = 0;
    for (const j of scan.entries) {
      // Every entry re-encodes to the kernel's bytes (header and keys: what the checksum covers).
      const bytes = jsetBytes(keysU64s(j.keys));
      assert.deepEqual(encodeJset(j, { setMagic: magic, blockBytes }).subarray(0, bytes), raw.subarray(at, at + bytes));
      at += Math.ceil(bytes / blockBytes) * blockBytes;
    }
    return scan.entries;
  });
  const replay = selectReplayEntries(journal.flat());
  assert.deepEqual(missingJournalRanges(replay), [], `${name}: no journal entry is missing`);
  const newest = replay[replay.length - 1];
  assert.ok(newest, `${name}: the journal has entries`);

  // The root node.
  const root = newest.btreeRoot;
  assert.equal(newest.btreeLevel, 0);
  assert.equal(bkeyCmp(root, MAX_KEY), 0, 'the root of a one-node tree has MAX_KEY');
  assert.equal(root.size, btreeNodeSectors(sb.bucketSize), 'a btree pointer carries the node size');
  assert.equal(btreePtrInvalid(root, sb), false);
  const p0 = root.ptrs[0];
  assert.ok(p0);
  const nodeBuf = img.subarray(p0.offset * 512, (p0.offset + root.size) * 512);
  const node = decodeBtreeNode(nodeBuf, { nodeKey: root, setMagic: magic, blockSize: sb.blockSize, geometry: sb });
  for (const b of node.bsets) {
    const u64s = keysU64s(b.keys);
    const ours = encodeBset(
      { magic: bsetMagic(magic), seq: node.seq, version: b.version, keys: b.keys },
      { seed: ptrValue(p0), blockBytes },
    );
    const at = b.block * blockBytes;
    assert.deepEqual(
      ours.subarray(0, bsetBytes(u64s)),
      nodeBuf.subarray(at, at + bsetBytes(u64s)),
      'bsets re-encode to the kernel bytes',
    );
  }

  // The prio buckets: read as many as the cache needs (next_bucket of the last one is stale).
  const gens = new Uint8Array(sb.nbuckets);
  let pb = newest.prioBucket[sb.nrThisDev] ?? 0;
  const count = prioBucketCount(sb.nbuckets, sb.bucketSize);
  for (let i = 0; i < count; i++) {
    const raw = bucket(img, sb, pb).subarray(0, metaBucketBytes(sb.bucketSize));
    const p = decodePrioBucket(raw, { setMagic: magic, bucketSize: sb.bucketSize });
    assert.deepEqual(
      encodePrioBucket(p, { setMagic: magic, bucketSize: sb.bucketSize }),
      raw,
      'prio buckets re-encode exactly',
    );
    const per = priosPerBucket(sb.bucketSize);
    for (let j = 0; j < per && i * per + j < sb.nbuckets; j++) gens[i * per + j] = p.gens[j] ?? 0;
    pb = p.nextBucket;
  }

  return { sb, img, bdev, journal, replay, nodeKeys: node.bsets.map((b) => b.keys), gens };
}

/** Sector -> cache sector of its dirty data, applying keys oldest first (later keys win). */
function dirtyMap(keyRuns: Bkey[][]): Map<number, number> {
  const map = new Map<number, number>();
  for (const keys of keyRuns) {
    for (const k of keys) {
      if (k.size === 0 || k.inode !== 0) continue;
      const p = k.ptrs[0];
      for (let s = keyStart(k); s < k.offset; s++) {
        if (k.dirty && p && ptrAvailable(p)) map.set(s, p.offset + (s - keyStart(k)));
        else map.delete(s);
      }
    }
  }
  return map;
}

function checkKeys(d: Decoded, keys: Bkey[]): void {
  for (const k of keys) {
    if (k.size === 0) continue;
    assert.equal(extentInvalid(k, d.sb), false, 'every live key is valid');
    for (const p of k.ptrs) {
      if (!ptrAvailable(p)) continue;
      if (k.dirty)
        assert.equal(ptrStale(d.gens[ptrBucket(p, d.sb.bucketSize)] ?? 0, p), 0, 'dirty data is never stale');
    }
  }
}

test('fresh: what run_cache_set() writes for a new cache set', () => {
  const d = decodeFixture('fresh');
  const info = KERNEL_FIXTURES.fresh;
  assert.equal(formatUuid(d.sb.setUuid), info.setUuid);
  assert.deepEqual([d.sb.blockSize, d.sb.bucketSize, d.sb.nbuckets], [info.blockSize, info.bucketSize, info.nbuckets]);
  // One journal entry, in the second journal bucket: journal_reclaim() moves on from d[0] before the first write.
  assert.deepEqual(
    d.journal.map((e) => e.length),
    [0, 1, 0, 0, 0, 0, 0, 0],
  );
  const [j] = d.replay;
  assert.ok(j);
  assert.deepEqual([j.seq, j.lastSeq, j.version, j.keys.length], [1, 1, 1, 0]);
  // The empty root: one bset without keys.
  assert.deepEqual(d.nodeKeys, [[]]);
  // The uuid bucket: a btree-pointer-like key of meta_bucket_pages, every slot free.
  assert.equal(j.uuidBucket.size, metaBucketPages(d.sb.bucketSize) * PAGE_SECTORS);
  assert.equal(btreePtrInvalid(j.uuidBucket, d.sb), false);
  const u = j.uuidBucket.ptrs[0];
  assert.ok(u);
  const raw = d.img.subarray(u.offset * 512, u.offset * 512 + metaBucketBytes(d.sb.bucketSize));
  const slots = decodeUuidBucket(raw, { jsetVersion: j.version });
  assert.equal(slots.length, uuidSlotCount(d.sb.bucketSize));
  assert.ok(slots.every(isFreeSlot));
  assert.deepEqual(encodeUuidBucket(slots, raw.length), raw);
  // Buckets before the journal keep gen 0; the allocator bumped the prio buckets' own.
  assert.equal(d.gens[0], 0);
  for (const b of d.sb.journalBuckets) assert.equal(d.gens[b], 0);
  assert.equal(d.gens[j.prioBucket[0] ?? 0], 1);
  // The prios were written before the root and uuid buckets were allocated:
  // on disk their gen (0) lags their pointers' (1). Such a pointer is not
  // stale (gen_after() of a negative difference is 0); on the next start the
  // kernel's bch_initial_mark_key() raises the bucket's gen to the pointer's.
  const rootPtr = j.btreeRoot.ptrs[0];
  assert.ok(rootPtr);
  assert.equal(rootPtr.gen, 1);
  assert.equal(d.gens[ptrBucket(rootPtr, d.sb.bucketSize)], 0);
  assert.equal(ptrStale(0, rootPtr), 0);
  assert.equal(u.gen, 1);
  assert.equal(d.gens[ptrBucket(u, d.sb.bucketSize)], 0);
});

for (const name of ['wb-stopped', 'wb-crash'] as const) {
  test(`${name}: every dirty pattern written through /dev/bcache0 is found through its keys`, () => {
    const d = decodeFixture(name);
    const info = KERNEL_FIXTURES[name];
    assert.equal(formatUuid(d.sb.setUuid), info.setUuid);
    assert.deepEqual(
      [d.sb.blockSize, d.sb.bucketSize, d.sb.nbuckets],
      [info.blockSize, info.bucketSize, info.nbuckets],
    );

    // The backing device is in uuid slot 0, so its keys have inode 0.
    const newest = d.replay[d.replay.length - 1];
    assert.ok(newest && d.bdev);
    const u = newest.uuidBucket.ptrs[0];
    assert.ok(u);
    const slots = decodeUuidBucket(d.img.subarray(u.offset * 512, u.offset * 512 + metaBucketBytes(d.sb.bucketSize)), {
      jsetVersion: newest.version,
    });
    const bsb = decodeSuperblock(d.bdev.subarray(4096, 8192));
    assert.ok(slots[0]?.uuid.equals(bsb.uuid), 'slot 0 is the backing device');
    assert.ok((slots[0]?.firstReg ?? 0) > 0);
    assert.ok(slots.slice(1).every(isFreeSlot));

    const journalKeys = d.replay.map((j) => j.keys);
    for (const keys of [...d.nodeKeys, ...journalKeys]) checkKeys(d, keys);
    const map = dirtyMap([...d.nodeKeys, ...journalKeys]);
    const offset = info.dataOffset ?? 16;
    let sectors = 0;
    for (const pat of info.patterns) {
      for (let s = pat.sector; s < pat.sector + pat.sectors; s++) {
        const at = map.get(s + offset);
        assert.ok(at !== undefined, `sector ${s} is dirty in the cache`);
        const data = d.img.subarray(at * 512, at * 512 + 512);
        assert.ok(data.equals(Buffer.alloc(512, pat.byte)), `sector ${s} holds 0x${pat.byte.toString(16)}`);
        sectors++;
      }
    }
    assert.equal(map.size, sectors, 'nothing else is dirty');

    if (info.stopped) {
      // A clean stop wrote the leaf: the btree alone has every dirty key.
      assert.equal(dirtyMap(d.nodeKeys).size, sectors);
    } else {
      // A reset: the last patterns are only in the journal, to be replayed.
      const inNode = dirtyMap(d.nodeKeys);
      assert.equal(inNode.has(3 + offset), false, 'the last writes are not in the btree');
      assert.ok(inNode.size > 0, 'but earlier ones are: the leaf was written once');
      assert.ok(d.replay.length >= 2 && d.replay.some((j) => j.keys.length > 0));
    }
  });
}
