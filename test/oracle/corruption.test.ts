// The kernel oracle judges damaged metadata the way our decoders do: a bad
// prio bucket or btree bset fails the cache set; a bad journal entry just ends
// its journal bucket and the entries before it are replayed. The images are
// copies of the kernel-written fixtures with one byte flipped.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { decodeBtreeNode } from '../../src/format/bset.ts';
import { metaBucketBytes } from '../../src/format/constants.ts';
import { FormatError } from '../../src/format/errors.ts';
import { jsetBytes, scanJournalBucket, selectReplayEntries, type Jset } from '../../src/format/jset.ts';
import { keysU64s } from '../../src/format/bkey.ts';
import { decodePrioBucket } from '../../src/format/prio.ts';
import { decodeSuperblock, setMagic, type Superblock } from '../../src/format/superblock.ts';
import { formatUuid } from '../../src/format/uuid-text.ts';
import { loadKernelFixture } from '../helpers/fixtures.ts';
import { ImageDir } from '../helpers/images.ts';
import { oracleFacts, oracleSkipReason, runOracle, ORACLE_SH_PRELUDE } from '../helpers/oracle.ts';

const skip = oracleSkipReason();

function journal(img: Buffer, sb: Superblock): Jset[][] {
  const bytes = sb.bucketSize * 512;
  return sb.journalBuckets.map(
    (b) =>
      scanJournalBucket(img.subarray(b * bytes, (b + 1) * bytes), { setMagic: setMagic(sb), blockSize: sb.blockSize })
        .entries,
  );
}

function flip(img: Buffer, at: number): Buffer {
  const b = Buffer.from(img);
  b.writeUInt8(b.readUInt8(at) ^ 0xff, at);
  return b;
}

test('damaged metadata: the kernel and our decoders agree on what is fatal', { skip, timeout: 300_000 }, async () => {
  const { cache, bdev } = loadKernelFixture('wb-stopped');
  assert.ok(bdev);
  const sb = decodeSuperblock(cache.subarray(4096, 8192));
  const magic = setMagic(sb);
  const entries = journal(cache, sb).flat();
  const newest = selectReplayEntries(entries).at(-1);
  assert.ok(newest);

  // A prio bucket entry.
  const prioAt = (newest.prioBucket[0] ?? 0) * sb.bucketSize * 512;
  const badPrio = flip(cache, prioAt + 100);
  assert.throws(
    () =>
      decodePrioBucket(badPrio.subarray(prioAt, prioAt + metaBucketBytes(sb.bucketSize)), {
        setMagic: magic,
        bucketSize: sb.bucketSize,
      }),
    (e: unknown) => e instanceof FormatError && e.field === 'csum',
  );

  // A key in the root node's second bset.
  const root = newest.btreeRoot;
  const nodeAt = (root.ptrs[0]?.offset ?? 0) * 512;
  const badNode = flip(cache, nodeAt + sb.blockSize * 512 + 40);
  assert.throws(
    () =>
      decodeBtreeNode(badNode.subarray(nodeAt, nodeAt + root.size * 512), {
        nodeKey: root,
        setMagic: magic,
        blockSize: sb.blockSize,
      }),
    (e: unknown) => e instanceof FormatError && e.structure === 'btree_node' && e.field === 'csum',
  );

  // A key of the newest journal entry: the bucket ends before it, the rest replays.
  const buckets = journal(cache, sb);
  const idx = buckets.findIndex((es) => es.some((j) => j.seq === newest.seq));
  const before = (buckets[idx] ?? []).filter((j) => j.seq < newest.seq);
  const blockBytes = sb.blockSize * 512;
  const offsetInBucket = before.reduce(
    (n, j) => n + Math.ceil(jsetBytes(keysU64s(j.keys)) / blockBytes) * blockBytes,
    0,
  );
  const entryAt = (sb.journalBuckets[idx] ?? 0) * sb.bucketSize * 512 + offsetInBucket;
  const badJournal = flip(cache, entryAt + 250);
  const left = selectReplayEntries(journal(badJournal, sb).flat());
  assert.equal(left.at(-1)?.seq, newest.seq - 1, 'our scan stops before the damaged entry');
  const keys = left.reduce((n, j) => n + j.keys.length, 0);

  const d = new ImageDir('ubcache-oracle-corrupt-');
  try {
    const disks = [
      d.file('prio.img', badPrio),
      d.file('node.img', badNode),
      d.file('journal.img', badJournal),
      d.file('bdev.img', bdev),
    ];
    const setUuid = formatUuid(sb.setUuid);
    const script = `${ORACLE_SH_PRELUDE}
# The three images are copies of one cache: the same set uuid. A refused set
# is torn down asynchronously; registering the next copy before it is gone
# would meet the dying set (its I/O already disabled, so the kernel would not
# log the new error). Wait for each to go, and for its log line.
waitlog() { i=0; while ! dmesg | grep -q "$1"; do i=$((i+1)); [ $i -gt 100 ] && break; sleep 0.1; done; }
if echo /dev/vda >/sys/fs/bcache/register 2>/dev/null; then echo "vda=registered"; else echo "vda=refused"; fi
waitlog 'IO error reading priorities'
waitgone /sys/fs/bcache/${setUuid}
if echo /dev/vdb >/sys/fs/bcache/register 2>/dev/null; then echo "vdb=registered"; else echo "vdb=refused"; fi
waitlog 'bad checksum at bucket'
waitgone /sys/fs/bcache/${setUuid}
echo "prio.log=$(dmesg | grep -o 'IO error reading priorities' | head -1)"
echo "node.log=$(dmesg | grep -o 'bad checksum at bucket [0-9]*, block [0-9]*' | head -1)"
if echo /dev/vdc >/sys/fs/bcache/register 2>/dev/null; then echo "vdc=registered"; else echo "vdc=refused"; fi
waitlog 'journal replay done'
echo "journal.log=$(dmesg | grep -o 'journal replay done, [0-9]* keys in [0-9]* entries, seq [0-9]*' | head -1)"
echo "journal.bad=$(dmesg | grep -o 'bad csum, [0-9]* bytes, offset [0-9]*' | head -1)"
`;
    const r = await runOracle(script, disks);
    assert.equal(r.status, 0, `${r.output}\n${r.stderr}`);
    const f = oracleFacts(r.output);
    assert.equal(f.get('vda'), 'refused', r.output);
    assert.equal(f.get('prio.log'), 'IO error reading priorities');
    assert.equal(f.get('vdb'), 'refused');
    assert.equal(f.get('node.log'), `bad checksum at bucket ${(root.ptrs[0]?.offset ?? 0) / sb.bucketSize}, block 1`);
    assert.equal(f.get('vdc'), 'registered');
    assert.equal(
      f.get('journal.log'),
      `journal replay done, ${keys} keys in ${left.length} entries, seq ${newest.seq - 1}`,
    );
    assert.match(f.get('journal.bad') ?? '', new RegExp(`offset ${offsetInBucket / 512}$`));
  } finally {
    d.remove();
  }
});
