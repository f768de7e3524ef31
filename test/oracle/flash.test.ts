// The kernel oracle for flash-only volumes (issue 13), both ways, each on a
// cache that also holds dirty data of a backing device:
//
// - Linux makes them: it registers a backing device and its cache (made by
//   `ubcache make --writeback`), writes a pattern through the backing
//   device's bcacheN with writeback held off (dirty data), creates a flash
//   volume (flash_vol_create), writes another pattern into it, and stops the
//   set. `ubcache serve` then starts that volume from the uuid table and
//   exports exactly the kernel's data (zeroes where the kernel wrote
//   nothing), and the backing device's export serves the kernel's dirty data.
// - ubcache makes them: serve writes dirty data through bcache0, creates a
//   volume through `ubcache ctl write .../flash_vol_create`, writes a pattern
//   into its export, and stops. Linux registers the images and reads exactly
//   those bytes from the volume's /dev/bcacheN (zeroes elsewhere) and from
//   the backing device's.
//
// The patterns come from a third image (/dev/vdc in the VM): block i of it
// holds its index and bytes derived from it, so misplaced data is caught.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { run, sparseFile, tempDir, ubcache, UBCACHE } from '../helpers/daemon.ts';
import { oracleFacts, oracleSkipReason, runOracle, ORACLE_SH_PRELUDE } from '../helpers/oracle.ts';
import { Client, startServe } from '../e2e/serve-helpers.ts';

const MiB = 1024 * 1024;
/** The volume's size, and where in it and in bcache0 the patterns go (4 KiB blocks). */
const VOLUME = '8M';
const VOLUME_BYTES = 8 * MiB;
const VOL_AT = 300;
const BDEV_AT = 100;
const BLOCKS = 512;

/** 4 KiB blocks that all differ: each holds its index (plus `seed`) and bytes derived from it. */
function pattern(seed: number, blocks: number): Buffer {
  const buf = Buffer.alloc(blocks * 4096);
  for (let i = 0; i < blocks; i++) {
    const block = buf.subarray(i * 4096, (i + 1) * 4096);
    for (let j = 0; j < 4096; j++) block[j] = (i * 131 + j * 7 + seed * 29 + (j >> 8)) & 0xff;
    block.writeUInt32LE(seed * 100_000 + i, 0);
  }
  return buf;
}

function md5(buf: Buffer): string {
  return createHash('md5').update(buf).digest('hex');
}

function makeImages(dir: string): { cache: string; backing: string; set: string } {
  const cache = sparseFile(join(dir, 'cache.img'), 64 * MiB);
  const backing = sparseFile(join(dir, 'backing.img'), 32 * MiB);
  const made = ubcache(['make', '-b', '64k', '--writeback', '-C', cache, '-B', backing]);
  assert.equal(made.status, 0, made.stderr);
  const m = /^Set UUID:\t\t(\S+)$/m.exec(made.stdout);
  assert.ok(m?.[1], made.stdout);
  return { cache, backing, set: m[1] };
}

/** md5 of `count` 4 KiB blocks of DEV from block `skip`, as the VM computes it. */
const md5In = (dev: string, skip: number, count: number): string =>
  `$(dd if=${dev} bs=4096 skip=${skip} count=${count} 2>/dev/null | md5sum | cut -d' ' -f1)`;

function ctl(control: string, ...args: string[]): Promise<string> {
  return run(UBCACHE, ['ctl', '--control', control, ...args]);
}

const skip = oracleSkipReason();
const DMESG_BAD = /error|\bbad\b|corrupt|inconsistent|missing/i;

test(
  'a flash volume Linux made, on a cache with dirty backing data: serve exports exactly its data',
  { skip, timeout: 600_000 },
  async () => {
    using tmp = tempDir('ubcache-oracle-flash-kernel-');
    const { cache, backing, set } = makeImages(tmp.dir);
    const volData = pattern(1, BLOCKS);
    const bdevData = pattern(2, BLOCKS);
    const source = join(tmp.dir, 'source.img');
    writeFileSync(source, Buffer.concat([volData, bdevData]));

    const script = [
      ORACLE_SH_PRELUDE,
      'echo /dev/vdb >/sys/fs/bcache/register',
      'echo /dev/vda >/sys/fs/bcache/register',
      'waitfor /sys/block/vdb/bcache/cache || { dmesg | grep bcache; exit 1; }',
      'i=0; while [ -z "$(ls /sys/block/vdb/holders)" ]; do i=$((i+1)); [ $i -gt 200 ] && break; sleep 0.05; done',
      'bdev=/dev/$(ls /sys/block/vdb/holders)',
      'echo 0 >/sys/block/vdb/bcache/writeback_running',
      'echo writeback >/sys/block/vdb/bcache/cache_mode',
      'echo 0 >/sys/block/vdb/bcache/sequential_cutoff',
      `dd if=/dev/vdc of=$bdev bs=4096 skip=${BLOCKS} seek=${BDEV_AT} count=${BLOCKS} conv=fsync 2>/dev/null`,
      `echo ${VOLUME} >/sys/fs/bcache/${set}/flash_vol_create`,
      `waitfor /sys/fs/bcache/${set}/volume1 || waitfor /sys/fs/bcache/${set}/volume0 || exit 1`,
      `vlink=$(ls -d /sys/fs/bcache/${set}/volume*)`,
      'echo "vlink=$(basename $vlink)"',
      'vol=$(basename $(dirname $(readlink -f $vlink)))',
      'echo "vol=$vol"',
      'echo "vsize=$(cat $vlink/size)"',
      'waitfor /dev/$vol || exit 1',
      `dd if=/dev/vdc of=/dev/$vol bs=4096 seek=${VOL_AT} count=${BLOCKS} conv=fsync 2>/dev/null`,
      'sync',
      `echo "volread=${md5In('/dev/$vol', VOL_AT, BLOCKS)}"`,
      'echo "bdev_state=$(cat /sys/block/vdb/bcache/state)"',
      'echo "dirty=$(cat /sys/block/vdb/bcache/dirty_data)"',
      `echo 1 >/sys/fs/bcache/${set}/stop`,
      `waitgone /sys/fs/bcache/${set}`,
      'echo "dmesg check:"',
      'dmesg | grep -i bcache | grep -i -E "error|\\bbad\\b|corrupt|inconsistent|missing" || true',
    ];
    const r = await runOracle(script.join('\n') + '\n', [cache, backing, source]);
    assert.equal(r.status, 0, `${r.output}\n${r.stderr}`);
    const facts = oracleFacts(r.output);
    assert.equal(facts.get('volread'), md5(volData), `the kernel wrote its volume\n${r.output}`);
    assert.equal(facts.get('vsize'), '8.0M', r.output);
    assert.equal(facts.get('bdev_state'), 'dirty', r.output);
    assert.notEqual(facts.get('dirty'), '0.0k', r.output);
    assert.ok(!DMESG_BAD.test(r.output.split('dmesg check:')[1] ?? ''), r.output);
    const slot = /^volume(\d+)$/.exec(facts.get('vlink') ?? '')?.[1];
    assert.ok(slot !== undefined, r.output);

    // Backing first: it is bcache0 and the volume, run when the cache registers, bcache1.
    const s = await startServe(tmp.dir, [backing, cache]);
    try {
      const control = `${s.socket}.control`;
      assert.equal(
        (await ctl(control, 'ls', `/sys/fs/bcache/${set}`))
          .split('\n')
          .filter((l) => l.startsWith('volume'))
          .join(),
        `volume${slot}`,
      );
      assert.equal(await ctl(control, 'cat', `/sys/fs/bcache/${set}/volume${slot}/size`), '8.0M\n');
      assert.equal(await ctl(control, 'cat', '/sys/block/bcache0/bcache/state'), 'dirty\n');
      const vol = await Client.connect(s.socket, 'bcache1');
      try {
        assert.equal(vol.size, VOLUME_BYTES, 'the export has the volume size from the uuid entry');
        assert.ok((await vol.read(VOL_AT * 4096, volData.length)).equals(volData), "the kernel's volume data");
        const before = await vol.read(0, VOL_AT * 4096);
        assert.ok(
          before.every((b) => b === 0),
          'zeroes where the kernel wrote nothing',
        );
        const after = await vol.read((VOL_AT + BLOCKS) * 4096, VOLUME_BYTES - (VOL_AT + BLOCKS) * 4096);
        assert.ok(
          after.every((b) => b === 0),
          'zeroes after it too',
        );
      } finally {
        vol.close();
      }
      const bdev = await Client.connect(s.socket, 'bcache0');
      try {
        assert.ok(
          (await bdev.read(BDEV_AT * 4096, bdevData.length)).equals(bdevData),
          "the kernel's dirty data of the backing device",
        );
      } finally {
        bdev.close();
      }
    } finally {
      await s.daemon.stop().finally(() => s.daemon.kill());
    }
  },
);

test(
  'a flash volume ubcache made, on a cache with dirty backing data: Linux reads exactly its data',
  { skip, timeout: 600_000 },
  async () => {
    using tmp = tempDir('ubcache-oracle-flash-ubcache-');
    const { cache, backing, set } = makeImages(tmp.dir);
    const volData = pattern(3, BLOCKS);
    const bdevData = pattern(4, BLOCKS);

    const s = await startServe(tmp.dir, [
      '--set',
      'bcache0.cache_mode=writeback',
      '--set',
      'bcache0.writeback_running=0',
      '--set',
      'bcache0.sequential_cutoff=0',
      backing,
      cache,
    ]);
    try {
      const control = `${s.socket}.control`;
      const bdev = await Client.connect(s.socket, 'bcache0');
      try {
        await bdev.write(BDEV_AT * 4096, bdevData);
        await bdev.flush();
      } finally {
        bdev.close();
      }
      await ctl(control, 'write', `/sys/fs/bcache/${set}/flash_vol_create`, VOLUME);
      await s.daemon.waitForLine(/export bcache1 added/);
      assert.match(await ctl(control, 'ls', `/sys/fs/bcache/${set}`), /^volume1$/m, 'slot 0 is the backing device');
      const vol = await Client.connect(s.socket, 'bcache1');
      try {
        assert.equal(vol.size, VOLUME_BYTES);
        for (let at = 0; at < volData.length; at += 256 * 1024) {
          await vol.write(VOL_AT * 4096 + at, volData.subarray(at, at + 256 * 1024));
        }
        await vol.flush();
        assert.ok((await vol.read(VOL_AT * 4096, volData.length)).equals(volData), 'read back through serve');
      } finally {
        vol.close();
      }
      assert.equal(await ctl(control, 'cat', '/sys/block/bcache0/bcache/state'), 'dirty\n');
    } finally {
      await s.daemon.stop().finally(() => s.daemon.kill());
    }

    const script = [
      ORACLE_SH_PRELUDE,
      'echo /dev/vdb >/sys/fs/bcache/register',
      'echo /dev/vda >/sys/fs/bcache/register',
      `waitfor /sys/fs/bcache/${set}/volume1 || { dmesg | grep bcache; exit 1; }`,
      `vlink=/sys/fs/bcache/${set}/volume1`,
      'vol=$(basename $(dirname $(readlink -f $vlink)))',
      'echo "vol=$vol"',
      'echo "vsize=$(cat $vlink/size)"',
      'echo "vsectors=$(cat /sys/block/$vol/size)"',
      'waitfor /dev/$vol || exit 1',
      `echo "volread=${md5In('/dev/$vol', VOL_AT, BLOCKS)}"`,
      `echo "volzero=${md5In('/dev/$vol', 0, VOL_AT)}"`,
      `echo "zeroes=${md5In('/dev/zero', 0, VOL_AT)}"`,
      'waitfor /sys/block/vdb/bcache/cache || exit 1',
      'i=0; while [ -z "$(ls /sys/block/vdb/holders)" ]; do i=$((i+1)); [ $i -gt 200 ] && break; sleep 0.05; done',
      'bdev=/dev/$(ls /sys/block/vdb/holders)',
      'echo "bdev_state=$(cat /sys/block/vdb/bcache/state)"',
      `echo "bdevread=${md5In('$bdev', BDEV_AT, BLOCKS)}"`,
      `echo 1 >/sys/fs/bcache/${set}/stop`,
      `waitgone /sys/fs/bcache/${set}`,
      'echo "dmesg check:"',
      'dmesg | grep -i bcache | grep -i -E "error|\\bbad\\b|corrupt|inconsistent|missing" || true',
    ];
    const r = await runOracle(script.join('\n') + '\n', [cache, backing]);
    assert.equal(r.status, 0, `${r.output}\n${r.stderr}`);
    const facts = oracleFacts(r.output);
    assert.match(facts.get('vol') ?? '', /^bcache\d+$/, r.output);
    assert.equal(facts.get('vsize'), '8.0M', r.output);
    assert.equal(facts.get('vsectors'), String(VOLUME_BYTES / 512), r.output);
    assert.equal(facts.get('volread'), md5(volData), `the kernel reads the volume ubcache wrote\n${r.output}`);
    assert.equal(facts.get('volzero'), facts.get('zeroes'), `zeroes where nothing was written\n${r.output}`);
    assert.equal(facts.get('bdev_state'), 'dirty', r.output);
    assert.equal(facts.get('bdevread'), md5(bdevData), `and the backing device's dirty data\n${r.output}`);
    assert.ok(!DMESG_BAD.test(r.output.split('dmesg check:')[1] ?? ''), r.output);
  },
);
