// The kernel oracle: devices made by `ubcache make` are registered, attached
// and served by Linux's own bcache driver, and the kernel refuses the caches
// it should refuse. One VM boot runs every scenario:
//
//   writethrough  make's defaults (512k buckets, 4k blocks, data offset 16):
//                 a write/read round trip through /dev/bcacheN that hits the
//                 cache, and the data lands on the backing device at 8 KiB.
//   writeback     128k buckets, 512-byte blocks, fifo, discard, -o 2048:
//                 dirty data stays in the cache until writeback is let run,
//                 then lands on the backing device at 1 MiB.
//   minimum size  513 buckets register; 512 (made by make-bcache, which allows
//                 it) are refused: the reason for make's MIN_CACHE_BUCKETS.
//
// Afterwards the images the kernel wrote to are read back with our codecs and
// with bcache-super-show.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, openSync, closeSync, ftruncateSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { make } from '../../src/cli/make.ts';
import { captureOutput } from '../../src/cli/output.ts';
import { decodeSuperblock, setMagic, cacheSync, bdevState } from '../../src/format/superblock.ts';
import { scanJournalBucket, selectReplayEntries } from '../../src/format/jset.ts';
import { decodeBtreeNode } from '../../src/format/bset.ts';
import { oracleFacts, oracleSkipReason, runOracle, ORACLE_SH_PRELUDE } from '../helpers/oracle.ts';

const skip =
  oracleSkipReason() ||
  (spawnSync('sh', ['-c', 'command -v make-bcache bcache-super-show']).status === 0
    ? false
    : 'bcache-tools (make-bcache, bcache-super-show) is not installed');

function image(dir: string, name: string, bytes: number): string {
  const path = join(dir, name);
  const fd = openSync(path, 'w');
  ftruncateSync(fd, bytes);
  closeSync(fd);
  return path;
}

function ubcacheMake(args: string[]): string {
  const out = captureOutput();
  assert.equal(make(args, out), 0);
  return out.out;
}

function setUuidOf(makeOutput: string): string {
  const m = /^Set UUID:\t\t(\S+)$/m.exec(makeOutput);
  assert.ok(m?.[1], makeOutput);
  return m[1];
}

const MiB = 1024 * 1024;

test('Linux registers, attaches and serves devices made by ubcache make', { skip, timeout: 300_000 }, async () => {
  const dir = mkdtempSync(join(tmpdir(), 'ubcache-oracle-make-'));
  try {
    const wtCache = image(dir, 'wt-cache.img', 260 * MiB);
    const wtBdev = image(dir, 'wt-bdev.img', 16 * MiB);
    const wbCache = image(dir, 'wb-cache.img', 96 * MiB);
    const wbBdev = image(dir, 'wb-bdev.img', 16 * MiB);
    const min513 = image(dir, 'min513.img', 513 * 4096);
    const min512 = image(dir, 'min512.img', 512 * 4096);

    const wtSet = setUuidOf(ubcacheMake(['-C', wtCache, '-B', wtBdev]));
    const wbSet = setUuidOf(
      ubcacheMake([
        '-b',
        '128k',
        '-w',
        '512',
        '--writeback',
        '--discard',
        '--cache_replacement_policy',
        'fifo',
        '-o',
        '2048',
        '-C',
        wbCache,
        '-B',
        wbBdev,
      ]),
    );
    const set513 = setUuidOf(ubcacheMake(['-b', '4k', '-C', min513]));
    // ubcache make refuses 512 buckets; make-bcache does not, so it makes the counter-example.
    const set512 = '51251251-2512-4512-8512-512512512512';
    const mb = spawnSync('make-bcache', ['--cset-uuid', set512, '-b', '4k', '-C', min512], { encoding: 'utf8' });
    assert.equal(mb.status, 0, mb.stderr);

    const script = `${ORACLE_SH_PRELUDE}
# writethrough, make's defaults
echo /dev/vda >/sys/fs/bcache/register
echo /dev/vdb >/sys/fs/bcache/register
waitfor /sys/block/vdb/bcache/cache
dev=/dev/$(ls /sys/block/vdb/holders)
echo "wt.state=$(cat /sys/block/vdb/bcache/state)"
echo "wt.mode=$(cat /sys/block/vdb/bcache/cache_mode)"
echo "wt.block=$(cat /sys/block/$(basename $dev)/queue/logical_block_size)"
echo "wt.bucket=$(cat /sys/block/vda/bcache/bucket_size)"
# An emulated VM's slow I/O makes bcache think the cache is congested and
# bypass it; these writes and reads must go through the cache.
echo 0 >/sys/fs/bcache/${wtSet}/congested_read_threshold_us
echo 0 >/sys/fs/bcache/${wtSet}/congested_write_threshold_us
echo 0 >/sys/block/vdb/bcache/sequential_cutoff
pattern 132 | dd of=$dev bs=4096 seek=10 count=64 iflag=fullblock conv=fsync 2>/dev/null
echo 3 >/proc/sys/vm/drop_caches
echo "wt.expect=$(pattern 132 | dd bs=4096 count=64 iflag=fullblock 2>/dev/null | md5sum | cut -c1-32)"
echo "wt.read=$(dd if=$dev bs=4096 skip=10 count=64 2>/dev/null | md5sum | cut -c1-32)"
echo "wt.written=$(cat /sys/block/vda/bcache/written)"
echo "wt.backing=$(dd if=/dev/vdb bs=4096 skip=12 count=64 2>/dev/null | md5sum | cut -c1-32)"
echo 1 >/sys/block/vdb/bcache/stop
waitgone /sys/block/vdb/bcache/cache
echo 1 >/sys/fs/bcache/${wtSet}/stop
waitgone /sys/fs/bcache/${wtSet}

# writeback, 128k buckets, 512-byte blocks, data offset 2048
echo /dev/vdc >/sys/fs/bcache/register
echo /dev/vdd >/sys/fs/bcache/register
waitfor /sys/block/vdd/bcache/cache
dev=/dev/$(ls /sys/block/vdd/holders)
echo 0 >/sys/block/vdd/bcache/writeback_running
echo "wb.mode=$(cat /sys/block/vdd/bcache/cache_mode)"
echo "wb.policy=$(cat /sys/block/vdc/bcache/cache_replacement_policy)"
echo "wb.block=$(cat /sys/block/$(basename $dev)/queue/logical_block_size)"
echo "wb.bucket=$(cat /sys/block/vdc/bcache/bucket_size)"
echo "wb.sectors=$(cat /sys/block/$(basename $dev)/size)"
pattern 245 | dd of=$dev bs=4096 seek=5 count=32 iflag=fullblock conv=fsync 2>/dev/null
echo 3 >/proc/sys/vm/drop_caches
echo "wb.expect=$(pattern 245 | dd bs=4096 count=32 iflag=fullblock 2>/dev/null | md5sum | cut -c1-32)"
echo "wb.read=$(dd if=$dev bs=4096 skip=5 count=32 2>/dev/null | md5sum | cut -c1-32)"
echo "wb.dirty=$(cat /sys/block/vdd/bcache/dirty_data)"
echo "wb.state=$(cat /sys/block/vdd/bcache/state)"
echo "wb.backing.before=$(dd if=/dev/vdd bs=4096 skip=261 count=32 2>/dev/null | md5sum | cut -c1-32)"
# Write back at full speed, and mark the device clean as soon as it is
# (the writeback thread otherwise naps writeback_delay = 30 s first).
echo 0 >/sys/block/vdd/bcache/writeback_percent
echo 0 >/sys/block/vdd/bcache/writeback_delay
echo 1 >/sys/block/vdd/bcache/writeback_running
i=0; while [ "$(cat /sys/block/vdd/bcache/dirty_data)" != "0.0k" ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done
i=0; while [ "$(cat /sys/block/vdd/bcache/state)" != "clean" ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done
echo "wb.dirty.after=$(cat /sys/block/vdd/bcache/dirty_data)"
echo "wb.state.after=$(cat /sys/block/vdd/bcache/state)"
echo 3 >/proc/sys/vm/drop_caches
echo "wb.backing.after=$(dd if=/dev/vdd bs=4096 skip=261 count=32 2>/dev/null | md5sum | cut -c1-32)"
echo 1 >/sys/block/vdd/bcache/stop
waitgone /sys/block/vdd/bcache/cache
echo 1 >/sys/fs/bcache/${wbSet}/stop
waitgone /sys/fs/bcache/${wbSet}

# the kernel's minimum: 513 buckets register, 512 do not
echo /dev/vde >/sys/fs/bcache/register
if waitfor /sys/fs/bcache/${set513}/cache0; then echo "min513=registered"; echo 1 >/sys/fs/bcache/${set513}/stop; fi
# Registration may be asynchronous: wait for the set to appear or the refusal to be logged.
echo /dev/vdf >/sys/fs/bcache/register 2>/dev/null
i=0; while [ ! -e /sys/fs/bcache/${set512} ] && ! dmesg | grep -q 'cache device is too small' && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
if [ -e /sys/fs/bcache/${set512} ]; then echo "min512=registered"; else echo "min512=refused"; fi
echo "min512.log=$(dmesg | grep 'cache device is too small' | sed 's/^.*bcache: //')"
`;
    const r = await runOracle(script, [wtCache, wtBdev, wbCache, wbBdev, min513, min512]);
    assert.equal(r.status, 0, `${r.output}\n${r.stderr}`);
    const f = oracleFacts(r.output);
    const fact = (k: string): string | undefined => f.get(k);

    assert.equal(fact('wt.state'), 'clean', r.output);
    assert.equal(fact('wt.mode'), '[writethrough] writeback writearound none');
    assert.equal(fact('wt.block'), '4096');
    assert.equal(fact('wt.bucket'), '512.0k');
    assert.equal(fact('wt.read'), fact('wt.expect'), 'writethrough: the data reads back');
    assert.match(fact('wt.written') ?? '', /^[1-9]/, `data was written to the cache:\n${r.output}`);
    assert.equal(fact('wt.backing'), fact('wt.expect'), 'writethrough: the data is on the backing device at 8 KiB');

    assert.equal(fact('wb.mode'), 'writethrough [writeback] writearound none');
    assert.equal(fact('wb.policy'), 'lru [fifo] random');
    assert.equal(fact('wb.block'), '512');
    assert.equal(fact('wb.bucket'), '128.0k');
    assert.equal(fact('wb.sectors'), String((16 * MiB) / 512 - 2048), 'the data offset is taken off the size');
    assert.equal(fact('wb.read'), fact('wb.expect'), 'writeback: the data reads back');
    assert.equal(fact('wb.dirty'), '128.0k');
    assert.equal(fact('wb.state'), 'dirty');
    assert.notEqual(fact('wb.backing.before'), fact('wb.expect'), 'writeback held back: not on the backing device yet');
    assert.equal(fact('wb.dirty.after'), '0.0k');
    assert.equal(fact('wb.state.after'), 'clean');
    assert.equal(fact('wb.backing.after'), fact('wb.expect'), 'written back at the 1 MiB data offset');

    assert.equal(fact('min513'), 'registered');
    assert.equal(fact('min512'), 'refused');
    assert.match(fact('min512.log') ?? '', /cache device is too small/, 'the kernel says why');

    // The data really went to the caches: the patterns are in the cache images.
    const count = (path: string, byte: number): number => {
      const img = readFileSync(path);
      const want = Buffer.alloc(512, byte);
      let n = 0;
      for (let at = 0; at < img.length; at += 512) if (img.subarray(at, at + 512).equals(want)) n++;
      return n;
    };
    assert.ok(count(wtCache, 0o132) >= 512, 'the writethrough data is in the cache');
    assert.ok(count(wbCache, 0o245) >= 256, 'the writeback data is in the cache');

    // What the kernel wrote back is what we expect and what we can read.
    for (const [cache, bdev, state] of [
      [wtCache, wtBdev, 1],
      [wbCache, wbBdev, 1],
    ] as const) {
      const img = readFileSync(cache);
      const sb = decodeSuperblock(img.subarray(4096, 8192), { deviceSectors: img.length / 512 });
      assert.equal(sb.version, 3, 'the kernel upgrades the cache superblock to version 3');
      assert.ok(cacheSync(sb), 'and sets CACHE_SYNC');
      assert.ok(sb.journalBuckets.length >= 2);
      const bucketBytes = sb.bucketSize * 512;
      const entries = sb.journalBuckets.flatMap(
        (b) =>
          scanJournalBucket(img.subarray(b * bucketBytes, (b + 1) * bucketBytes), {
            setMagic: setMagic(sb),
            blockSize: sb.blockSize,
          }).entries,
      );
      const replay = selectReplayEntries(entries);
      const last = replay[replay.length - 1];
      assert.ok(last, 'journal entries are found');
      const root = last.btreeRoot;
      const at = (root.ptrs[0]?.offset ?? 0) * 512;
      const node = decodeBtreeNode(img.subarray(at, at + root.size * 512), {
        nodeKey: root,
        setMagic: setMagic(sb),
        blockSize: sb.blockSize,
        geometry: sb,
      });
      assert.ok(node.writtenBlocks >= 1);
      const bsb = decodeSuperblock(readFileSync(bdev).subarray(4096, 8192));
      assert.equal(bdevState(bsb), state, 'the backing device is attached and clean');
      assert.ok(bsb.setUuid.equals(sb.setUuid));
      const show = spawnSync('bcache-super-show', [cache], { encoding: 'utf8' });
      assert.equal(show.status, 0);
      assert.match(show.stdout, /sb\.version\t\t3 \[cache device\]/);
      assert.match(show.stdout, /dev\.cache\.ordered\tyes/);
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
