// The kernel reads what our engine wrote: a cache set created and filled by
// CacheSet (dirty writeback data, enough small keys to split the root, keys
// crossing bucket boundaries), with a uuid slot for a backing device we
// formatted, stopped cleanly. Linux registers both, attaches, and serves
// exactly that data through /dev/bcacheN while the backing device is still
// untouched; then its writeback copies it to the backing device, guided by
// our keys. Finally our engine reopens the cache the kernel has written.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { FileBlockDevice } from '../../src/blockdev/file.ts';
import { makeKey } from '../../src/format/bkey.ts';
import { SB_OFFSET } from '../../src/format/constants.ts';
import { encodeBackingSuperblock, formatCacheImage } from '../helpers/engine-images.ts';
import { formatUuid } from '../../src/format/uuid-text.ts';
import { emptyUuidEntry } from '../../src/format/uuid.ts';
import { CacheSet } from '../../src/bcache/cache-set.ts';
import { ImageDir } from '../helpers/images.ts';
import { oracleFacts, oracleSkipReason, runOracle, ORACLE_SH_PRELUDE } from '../helpers/oracle.ts';

const skip = oracleSkipReason();
const MiB = 1024 * 1024;
const DATA_OFFSET = 16;
/** Where the VM writes a block to set writeback going. */
const EXTRA = 100000;

/** The regions we write, in bcache-device sectors, each filled with one byte. */
interface Region {
  name: string;
  start: number;
  sectors: number;
  byte: number;
}

const REGIONS: Region[] = [
  { name: 'A', start: 0, sectors: 8, byte: 0x11 },
  { name: 'B', start: 2048, sectors: 64, byte: 0x22 },
  { name: 'C', start: 10000, sectors: 8, byte: 0x33 },
  // 128 KiB: crosses 32 KiB buckets, so it is several keys.
  { name: 'D', start: 20000, sectors: 256, byte: 0x44 },
];
/**
 * 1500 one-block writes 32 sectors apart: more keys than one 32 KiB leaf
 * holds, so the root splits whenever the rewrites come (1200 filled a leaf
 * past the 4/5 at which a rewrite splits it, but a split needed a rewrite
 * after that point, and with whole-block appends one did not always come:
 * CI, 2026-12-07).
 */
const SMALL = { start: 40000, count: 1500, stride: 32, sectors: 8 };

function smallArea(): Buffer {
  const buf = Buffer.alloc(SMALL.count * SMALL.stride * 512);
  for (let i = 0; i < SMALL.count; i++)
    buf.fill(1 + (i % 250), i * SMALL.stride * 512, (i * SMALL.stride + SMALL.sectors) * 512);
  return buf;
}

function md5(buf: Buffer): string {
  return createHash('md5').update(buf).digest('hex');
}

async function writeDirty(cs: CacheSet, inode: number, start: number, data: Buffer): Promise<void> {
  const sectors = data.length / 512;
  let done = 0;
  while (done < sectors) {
    const a = await cs.allocSectors({ inode, offset: start + done, sectors: sectors - done, dirty: true, wait: true });
    assert.ok(a);
    await cs.writeCache(data.subarray(done * 512, (done + a.sectors) * 512), a.ptr.offset);
    await cs.insert([makeKey(inode, start + done + a.sectors, a.sectors, true, [a.ptr])]);
    cs.putAllocation(a);
    done += a.sectors;
  }
}

test(
  'the kernel registers our cache set and serves, then writes back, the dirty data we wrote',
  { skip, timeout: 600_000 },
  async () => {
    const dir = new ImageDir('ubcache-oracle-engine-');
    try {
      const cachePath = dir.zeroed('cache.img', 64 * MiB);
      const bdevPath = dir.zeroed('bdev.img', 64 * MiB);
      const setUuid = randomBytes(16);
      const bdevUuid = randomBytes(16);
      await formatCacheImage(cachePath, { setUuid, bucketSize: 64, blockSize: 8 });
      const bdev = await FileBlockDevice.open(bdevPath);
      await bdev.write(
        encodeBackingSuperblock({ uuid: bdevUuid, setUuid, blockSize: 8, dataOffset: DATA_OFFSET }),
        SB_OFFSET,
      );
      await bdev.close();

      const cs = await CacheSet.open(await FileBlockDevice.open(cachePath));
      const slot = cs.uuids.findEmpty();
      const label = Buffer.alloc(32);
      label.write('ours');
      const now = Math.floor(Date.now() / 1000);
      cs.uuids.set(slot, { ...emptyUuidEntry(), uuid: bdevUuid, label, firstReg: now, lastReg: now });
      await cs.writeUuids();
      for (const r of REGIONS) {
        await writeDirty(cs, slot, DATA_OFFSET + r.start, Buffer.alloc(r.sectors * 512, r.byte));
      }
      const small = smallArea();
      for (let i = 0; i < SMALL.count; i++) {
        const at = i * SMALL.stride;
        await writeDirty(
          cs,
          slot,
          DATA_OFFSET + SMALL.start + at,
          small.subarray(at * 512, (at + SMALL.sectors) * 512),
        );
      }
      const dirtySectors = cs.dirtySectors(slot);
      assert.ok(cs.btree.depth >= 2, 'the root split: the kernel reads an interior node of ours');
      await cs.stop();

      const read = (dev: string, start: number, sectors: number): string =>
        `$(dd if=${dev} bs=512 skip=${start} count=${sectors} 2>/dev/null | md5sum | cut -d' ' -f1)`;
      const lines: string[] = [];
      const show = (prefix: string, dev: string, base: number): void => {
        for (const r of REGIONS) lines.push(`echo "${prefix}${r.name}=${read(dev, base + r.start, r.sectors)}"`);
        lines.push(`echo "${prefix}SMALL=${read(dev, base + SMALL.start, SMALL.count * SMALL.stride)}"`);
      };
      const set = formatUuid(setUuid);
      const script = [
        ORACLE_SH_PRELUDE,
        'echo /dev/vda >/sys/fs/bcache/register',
        'echo /dev/vdb >/sys/fs/bcache/register',
        'waitfor /sys/block/vdb/bcache/cache || { dmesg | grep bcache; exit 1; }',
        'echo 0 >/sys/block/vdb/bcache/writeback_running',
        'dev=/dev/$(ls /sys/block/vdb/holders)',
        'echo "state=$(cat /sys/block/vdb/bcache/state)"',
        'echo "dirty=$(cat /sys/block/vdb/bcache/dirty_data)"',
        'echo "label=$(cat /sys/block/vdb/bcache/label)"',
      ];
      lines.length = 0;
      show('cached', '$dev', 0);
      show('raw', '/dev/vdb', DATA_OFFSET);
      script.push(...lines);
      // A write through the device makes the kernel's writeback start (it marks the backing
      // device dirty); it then writes back every dirty key of the device, ours included.
      script.push(
        'echo 0 >/sys/block/vdb/bcache/writeback_percent',
        'echo 1 >/sys/block/vdb/bcache/writeback_running',
        `pattern 167 | dd of=$dev bs=4096 seek=${EXTRA / 8} count=1 conv=notrunc 2>/dev/null; sync`,
        'echo "marked=$(cat /sys/block/vdb/bcache/state)"',
        'i=0; while [ "$(cat /sys/block/vdb/bcache/state)" != clean ]; do i=$((i+1)); [ $i -gt 2400 ] && break; sleep 0.1; done',
        'echo "after=$(cat /sys/block/vdb/bcache/state)"',
        'sync; echo 3 >/proc/sys/vm/drop_caches',
      );
      lines.length = 0;
      show('written', '/dev/vdb', DATA_OFFSET);
      lines.push(`echo "writtenEXTRA=${read('/dev/vdb', DATA_OFFSET + EXTRA, 8)}"`);
      script.push(...lines);
      script.push(
        `echo 1 >/sys/fs/bcache/${set}/stop`,
        `waitgone /sys/fs/bcache/${set}`,
        'dmesg | grep -i bcache | grep -i -E "error|\\bbad\\b|corrupt|inconsistent|missing" || true',
      );
      const r = await runOracle(script.join('\n') + '\n', [cachePath, bdevPath], { timeoutSec: 480 });
      assert.equal(r.status, 0, `${r.output}\n${r.stderr}`);
      const facts = oracleFacts(r.output);
      const zero = (sectors: number): string => md5(Buffer.alloc(sectors * 512));
      // The backing superblock says clean (see encodeBackingSuperblock): the kernel counts our
      // dirty keys but its writeback only starts once a write marks the device dirty.
      assert.equal(facts.get('state'), 'clean', r.output);
      assert.equal(facts.get('marked'), 'dirty', r.output);
      assert.equal(facts.get('writtenEXTRA'), md5(Buffer.alloc(4096, 0o167)));
      assert.equal(facts.get('label'), 'ours');
      assert.notEqual(facts.get('dirty'), '0.0k', r.output);
      for (const r2 of REGIONS) {
        const want = md5(Buffer.alloc(r2.sectors * 512, r2.byte));
        assert.equal(facts.get(`cached${r2.name}`), want, `region ${r2.name} through /dev/bcacheN`);
        assert.equal(facts.get(`raw${r2.name}`), zero(r2.sectors), `region ${r2.name} not yet on the backing device`);
        assert.equal(facts.get(`written${r2.name}`), want, `region ${r2.name} written back`);
      }
      assert.equal(facts.get('cachedSMALL'), md5(small), 'the small writes through /dev/bcacheN');
      assert.equal(facts.get('rawSMALL'), zero(small.length / 512));
      assert.equal(facts.get('writtenSMALL'), md5(small), 'the small writes written back');
      assert.equal(facts.get('after'), 'clean');
      // \bbad\b: a set uuid in the output may hold the hex letters "bad".
      assert.ok(!/error|\bbad\b|corrupt|inconsistent|missing/i.test(r.output.split('after=')[1] ?? ''), r.output);
      assert.ok(dirtySectors > 0);

      // And back: our engine opens what the kernel wrote. Every cached sector holds the right
      // data. Keys may come back dirty: the kernel's writeback marks keys clean without
      // journaling, and it writes no journal entry at stop when none is pending, so a journaled
      // dirty key (the VM's block, or ours from our last journal entry) can be replayed dirty
      // and is written back a second time, harmlessly.
      const cs2 = await CacheSet.open(await FileBlockDevice.open(cachePath));
      const expected = (sector: number): number | undefined => {
        const s = sector - DATA_OFFSET;
        for (const r2 of REGIONS) if (s >= r2.start && s < r2.start + r2.sectors) return r2.byte;
        if (s >= SMALL.start && s < SMALL.start + SMALL.count * SMALL.stride) {
          return small[(s - SMALL.start) * 512];
        }
        if (s >= EXTRA && s < EXTRA + 8) return 0o167;
        return undefined;
      };
      let checked = 0;
      for (const seg of await cs2.lookup(slot, 0, DATA_OFFSET + EXTRA + 8)) {
        if (!seg.hit) continue;
        const buf = Buffer.alloc((seg.end - seg.start) * 512);
        await cs2.readCache(buf, seg.hit.sector);
        for (let x = seg.start; x < seg.end; x++) {
          const want = expected(x) ?? 0;
          const got = buf.subarray((x - seg.start) * 512, (x - seg.start + 1) * 512);
          assert.ok(
            got.every((b) => b === want),
            `sector ${x} in the cache after the kernel`,
          );
          checked++;
        }
      }
      assert.ok(checked > 0, 'the kernel left cached data for us to read');
      assert.deepEqual(await cs2.btree.verify(), []);
      await cs2.stop();
    } finally {
      dir.remove();
    }
  },
);
