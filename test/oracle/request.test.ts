// The kernel oracle in both directions, through the whole bcache device
// (registry, cached device, request path, writeback), in one VM boot:
//
// (b) ubcache writes through its bcache device in writeback mode with
//     writeback off and stops; Linux registers the images, reads exactly that
//     data through /dev/bcache0 (dirty, in our cache) and writes it back
//     correctly to the backing device;
// (a) then, in the same boot, Linux writes through /dev/bcache0 in writeback
//     mode with writeback_running=0 and stops; ubcache registers the images,
//     serves exactly that data (the dirty extents from the kernel's cache)
//     and later writes it back.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { FileBlockDevice } from '../../src/blockdev/file.ts';
import { SB_OFFSET, SB_SIZE } from '../../src/format/constants.ts';
import { bdevState, decodeSuperblock } from '../../src/format/superblock.ts';
import { formatUuid } from '../../src/format/uuid-text.ts';
import { Registry } from '../../src/bcache/registry.ts';
import { Prng } from '../../src/util/prng.ts';
import { setLogSink } from '../../src/util/log.ts';
import { formatBacking } from '../bcache/request-helpers.ts';
import { formatCacheImage } from '../helpers/engine-images.ts';
import { ImageDir } from '../helpers/images.ts';
import { oracleFacts, oracleSkipReason, runOracle, ORACLE_SH_PRELUDE } from '../helpers/oracle.ts';

const skip = oracleSkipReason();
const MiB = 1024 * 1024;
const S = 512;
const DATA_OFFSET = 16;

interface Region {
  name: string;
  /** bcache device sectors */
  start: number;
  sectors: number;
}

/** What ubcache writes (b): a few regions, one crossing buckets, and many small writes (a deeper tree). */
const OURS: Region[] = [
  { name: 'A', start: 0, sectors: 8 },
  { name: 'B', start: 2048, sectors: 64 },
  { name: 'C', start: 10000, sectors: 2048 },
];
/**
 * More keys than one 32 KiB leaf holds (1500 x 24 bytes), so the root splits
 * whenever the leaf is rewritten: with 1200 (29 KiB, past the 4/5 at which a
 * rewrite splits) it split only if a rewrite came late enough, and since
 * appends fill whole blocks one may not come at all. Block-aligned (4 KiB
 * blocks), clear of C and of the kernel's regions.
 */
const SMALL = { start: 16000, count: 1500, stride: 16, sectors: 8 };
/** What the kernel writes (a): over part of ours, and new places; byte values in the pattern. */
const THEIRS: Array<Region & { byte: number }> = [
  { name: 'K1', start: 8, sectors: 56, byte: 0o111 },
  { name: 'K2', start: 10000 + 512, sectors: 256, byte: 0o122 },
  { name: 'K3', start: 60000, sectors: 8, byte: 0o133 },
  { name: 'K4', start: 70000, sectors: 1024, byte: 0o144 },
];

function data(seed: number, sectors: number): Buffer {
  const rng = new Prng(seed);
  const buf = Buffer.alloc(sectors * S);
  for (let i = 0; i < buf.length; i += 4) buf.writeUInt32LE(rng.next() >>> 0, i);
  return buf;
}

function md5(buf: Buffer): string {
  return createHash('md5').update(buf).digest('hex');
}

function quietly<T>(fn: () => Promise<T>): Promise<T> {
  const restore = setLogSink((level, line) => {
    if (level === 'error' || level === 'warn') process.stderr.write(`${line}\n`);
  });
  return fn().finally(restore);
}

async function backingState(path: string): Promise<number> {
  const dev = await FileBlockDevice.open(path, { readOnly: true });
  try {
    const block = Buffer.alloc(SB_SIZE);
    await dev.read(block, SB_OFFSET);
    return bdevState(decodeSuperblock(block));
  } finally {
    await dev.close();
  }
}

async function readRaw(path: string, sector: number, sectors: number): Promise<Buffer> {
  const dev = await FileBlockDevice.open(path, { readOnly: true });
  try {
    const buf = Buffer.alloc(sectors * S);
    await dev.read(buf, (sector + DATA_OFFSET) * S);
    return buf;
  } finally {
    await dev.close();
  }
}

async function open(cachePath: string, bdevPath: string, writebackRunning: boolean) {
  const registry = new Registry({
    deviceSettings: () => ({ writebackRunning, writebackDelay: 0, writebackPercent: 0 }),
  });
  await registry.register(await FileBlockDevice.open(cachePath, { exclusive: true }));
  const b = await registry.register(await FileBlockDevice.open(bdevPath, { exclusive: true }));
  assert.ok(b.kind === 'backing');
  assert.ok(b.dev.attached, 'attached to its cache set');
  return { registry, dev: b.dev };
}

test("the kernel and ubcache serve and write back each other's dirty data", { skip, timeout: 600_000 }, async () => {
  const dir = new ImageDir('ubcache-oracle-request-');
  try {
    const cachePath = dir.zeroed('cache.img', 64 * MiB);
    const bdevPath = dir.zeroed('bdev.img', 64 * MiB);
    const setUuid = randomBytes(16);
    await formatCacheImage(cachePath, { setUuid, bucketSize: 64, blockSize: 8 });
    const b = await FileBlockDevice.open(bdevPath);
    await formatBacking(b, { setUuid, dataOffset: DATA_OFFSET, writeback: true, blockSize: 8 });
    await b.close();

    // (b), ours: write in writeback mode with writeback off, stop.
    const small = data(99, SMALL.count * SMALL.stride);
    await quietly(async () => {
      const { registry, dev } = await open(cachePath, bdevPath, false);
      const d = dev.device;
      for (const [i, r] of OURS.entries()) await d.write(data(i + 1, r.sectors), r.start * S);
      for (let i = 0; i < SMALL.count; i++) {
        const at = i * SMALL.stride;
        await d.write(small.subarray(at * S, (at + SMALL.sectors) * S), (SMALL.start + at) * S);
      }
      await d.flush();
      assert.ok(dev.dirtySectors >= 2120 + SMALL.count * SMALL.sectors, `dirty ${dev.dirtySectors}`);
      assert.ok((dev.attachment?.cs.btree.depth ?? 0) >= 2, 'the root split');
      await registry.stopAll();
    });
    assert.equal(await backingState(bdevPath), 2, 'our backing superblock says dirty');
    assert.ok(
      (await readRaw(bdevPath, 2048, 64)).every((x) => x === 0),
      'nothing written back yet',
    );

    const smallMask = (buf: Buffer): Buffer => {
      // Only the written blocks of the small area (the gaps read as whatever is under them).
      const out = Buffer.alloc(SMALL.count * SMALL.sectors * S);
      for (let i = 0; i < SMALL.count; i++) {
        buf.copy(out, i * SMALL.sectors * S, i * SMALL.stride * S, (i * SMALL.stride + SMALL.sectors) * S);
      }
      return out;
    };
    const md5Sh = (dev: string, start: number, sectors: number): string =>
      `$(dd if=${dev} bs=512 skip=${start} count=${sectors} 2>/dev/null | md5sum | cut -d' ' -f1)`;
    const smallSh = (dev: string, base: number): string =>
      `$(i=0; while [ $i -lt ${SMALL.count} ]; do dd if=${dev} bs=512 skip=$((${base + SMALL.start} + i * ${SMALL.stride})) count=${SMALL.sectors} 2>/dev/null; i=$((i+1)); done | md5sum | cut -d' ' -f1)`;
    const set = formatUuid(setUuid);
    const script: string[] = [
      ORACLE_SH_PRELUDE,
      'echo /dev/vda >/sys/fs/bcache/register',
      'echo /dev/vdb >/sys/fs/bcache/register',
      'waitfor /sys/block/vdb/bcache/cache || { dmesg | grep bcache; exit 1; }',
      'dev=/dev/$(ls /sys/block/vdb/holders)',
      // An emulated VM's slow I/O makes bcache think the cache is congested and
      // bypass it, and dd's writes are sequential: neither may send the
      // kernel's writes below around the cache (they must be dirty in it).
      `echo 0 >/sys/fs/bcache/${set}/congested_read_threshold_us`,
      `echo 0 >/sys/fs/bcache/${set}/congested_write_threshold_us`,
      'echo 0 >/sys/block/vdb/bcache/sequential_cutoff',
      'echo "state=$(cat /sys/block/vdb/bcache/state)"',
      'echo "dirty=$(cat /sys/block/vdb/bcache/dirty_data)"',
    ];
    for (const r of OURS) script.push(`echo "cached${r.name}=${md5Sh('$dev', r.start, r.sectors)}"`);
    script.push(`echo "cachedSMALL=${smallSh('$dev', 0)}"`);
    script.push(
      'echo 0 >/sys/block/vdb/bcache/writeback_percent',
      'echo 1 >/sys/block/vdb/bcache/writeback_running',
      'i=0; while [ "$(cat /sys/block/vdb/bcache/state)" != clean ]; do i=$((i+1)); [ $i -gt 1200 ] && break; sleep 0.1; done',
      'echo "after=$(cat /sys/block/vdb/bcache/state)"',
      'sync; echo 3 >/proc/sys/vm/drop_caches',
    );
    for (const r of OURS) script.push(`echo "written${r.name}=${md5Sh('/dev/vdb', DATA_OFFSET + r.start, r.sectors)}"`);
    script.push(`echo "writtenSMALL=${smallSh('/dev/vdb', DATA_OFFSET)}"`);
    // (a), theirs: writeback mode, writeback held off, write, stop.
    script.push('echo 0 >/sys/block/vdb/bcache/writeback_running', 'echo writeback >/sys/block/vdb/bcache/cache_mode');
    for (const r of THEIRS) {
      script.push(
        `pattern ${r.byte.toString(8)} | dd of=$dev bs=4096 seek=${r.start / 8} count=${r.sectors / 8} conv=notrunc 2>/dev/null`,
      );
    }
    script.push(
      'sync',
      'echo "theirstate=$(cat /sys/block/vdb/bcache/state)"',
      'echo "theirdirty=$(cat /sys/block/vdb/bcache/dirty_data)"',
      'echo 1 >/sys/block/vdb/bcache/stop',
      `echo 1 >/sys/fs/bcache/${set}/stop`,
      `waitgone /sys/fs/bcache/${set}`,
      'dmesg | grep -i bcache | grep -i -E "error|\\bbad\\b|corrupt|inconsistent|missing" || true',
    );
    const r = await runOracle(script.join('\n') + '\n', [cachePath, bdevPath]);
    assert.equal(r.status, 0, `${r.output}\n${r.stderr}`);
    const facts = oracleFacts(r.output);
    assert.equal(facts.get('state'), 'dirty', r.output);
    assert.notEqual(facts.get('dirty'), '0.0k', r.output);
    for (const [i, reg] of OURS.entries()) {
      const want = md5(data(i + 1, reg.sectors));
      assert.equal(facts.get(`cached${reg.name}`), want, `(b) region ${reg.name} read through /dev/bcache0`);
      assert.equal(facts.get(`written${reg.name}`), want, `(b) region ${reg.name} written back by the kernel`);
    }
    assert.equal(facts.get('cachedSMALL'), md5(smallMask(small)), '(b) the small writes through /dev/bcache0');
    assert.equal(facts.get('writtenSMALL'), md5(smallMask(small)), '(b) the small writes written back');
    assert.equal(facts.get('after'), 'clean', r.output);
    assert.equal(facts.get('theirstate'), 'dirty', r.output);
    // \bbad\b: a set uuid in the output may hold the hex letters "bad".
    assert.ok(!/error|\bbad\b|corrupt|inconsistent|missing/i.test(r.output.split('theirdirty=')[1] ?? ''), r.output);

    // (a), theirs served by us: the kernel's dirty extents, from its cache.
    assert.equal(await backingState(bdevPath), 2);
    const expected = (start: number, sectors: number): Buffer => {
      const buf = Buffer.alloc(sectors * S);
      // What the device holds: ours (written back), then the kernel's on top.
      for (const [i, reg] of OURS.entries()) {
        const src = data(i + 1, reg.sectors);
        const from = Math.max(start, reg.start);
        const to = Math.min(start + sectors, reg.start + reg.sectors);
        if (to > from) src.copy(buf, (from - start) * S, (from - reg.start) * S, (to - reg.start) * S);
      }
      for (let i = 0; i < SMALL.count; i++) {
        const at = SMALL.start + i * SMALL.stride;
        const from = Math.max(start, at);
        const to = Math.min(start + sectors, at + SMALL.sectors);
        if (to > from) small.copy(buf, (from - start) * S, (from - SMALL.start) * S, (to - SMALL.start) * S);
      }
      for (const reg of THEIRS) {
        const from = Math.max(start, reg.start);
        const to = Math.min(start + sectors, reg.start + reg.sectors);
        if (to > from) buf.fill(reg.byte, (from - start) * S, (to - start) * S);
      }
      return buf;
    };
    for (const reg of THEIRS) {
      const raw = await readRaw(bdevPath, reg.start, reg.sectors);
      assert.ok(!raw.every((x) => x === reg.byte), `(a) ${reg.name} is not on the backing device yet`);
    }
    await quietly(async () => {
      const { registry, dev } = await open(cachePath, bdevPath, false);
      assert.ok(dev.dirtySectors >= 1344, `the kernel's dirty data is counted: ${dev.dirtySectors}`);
      const d = dev.device;
      for (const reg of [...THEIRS, ...OURS]) {
        const from = Math.max(0, reg.start - 64);
        const sectors = reg.sectors + 128;
        const buf = Buffer.alloc(sectors * S);
        await d.read(buf, from * S);
        assert.ok(buf.equals(expected(from, sectors)), `(a) ${reg.name} and around it through our bcache0`);
      }
      // Later, our writeback copies it to the backing device.
      dev.settings.writebackRunning = true;
      dev.attachment?.writeback.wake();
      await dev.attachment?.writeback.whenIdle();
      assert.equal(dev.dirtySectors, 0);
      await registry.stopAll();
    });
    assert.equal(await backingState(bdevPath), 1, 'clean after our writeback');
    for (const reg of [...THEIRS, ...OURS]) {
      const raw = await readRaw(bdevPath, reg.start, reg.sectors);
      assert.ok(raw.equals(expected(reg.start, reg.sectors)), `(a) ${reg.name} written back by ubcache`);
    }
  } finally {
    dir.remove();
  }
});
