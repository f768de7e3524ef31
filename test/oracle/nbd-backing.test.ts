// The kernel oracle for a remote backing device (issue 11): nbdkit serves a
// file; `ubcache make -B nbd+unix://...` formats it over NBD as the backing
// device of a cache image; `ubcache serve` caches it in writeback mode with
// writeback held off, a known pattern is written through bcache0 with our own
// NBD client, and serve stops (exit 0) with the data dirty in the cache. Then
// Linux registers the cache image and the export's file itself: it finds the
// backing superblock make wrote over NBD dirty, counts our dirty keys, and
// /dev/bcacheN serves exactly the pattern, which the file did not hold when
// the VM booted. Then the kernel's writeback copies it into the file.
//
// The kernel's writeback cannot be held off here: attaching a backing device
// whose superblock says dirty starts a writeback pass at once
// (bch_cached_dev_writeback_start sets writeback_running and queues the
// thread, and a pass runs to its end), so the backing device's data area in
// the VM is not asserted to be zero. Either way every byte the kernel serves
// or writes back comes from our keys and our cache image.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { readFileRange, sparseFile, tempDir, ubcache } from '../helpers/daemon.ts';
import { startNbdkit, tools } from '../helpers/nbd-servers.ts';
import { oracleFacts, oracleSkipReason, runOracle, ORACLE_SH_PRELUDE } from '../helpers/oracle.ts';
import { Client, startServe } from '../e2e/serve-helpers.ts';

const MiB = 1024 * 1024;
/** make's default data offset: 16 sectors. */
const DATA_OFFSET_SECTORS = 16;
/** Where the pattern goes in bcache0, and how much of it (4 KiB blocks). */
const START_BLOCK = 256;
const BLOCKS = 1024;
const CHUNK = 256 * 1024;

/** 4 MiB in which every 4 KiB block differs: its index, and bytes derived from it. */
function pattern(): Buffer {
  const buf = Buffer.alloc(BLOCKS * 4096);
  for (let i = 0; i < BLOCKS; i++) {
    const block = buf.subarray(i * 4096, (i + 1) * 4096);
    for (let j = 0; j < 4096; j++) block[j] = (i * 131 + j * 7 + (j >> 8)) & 0xff;
    block.writeUInt32LE(START_BLOCK + i, 0);
    block.writeUInt32LE(START_BLOCK + i, 2048);
  }
  return buf;
}

function md5(buf: Buffer): string {
  return createHash('md5').update(buf).digest('hex');
}

function cacheState(showSuperOutput: string): string | undefined {
  return /dev\.data\.cache_state\t\d+ \[(\w+)\]/.exec(showSuperOutput)?.[1];
}

const skip = (!tools.nbdkit && 'nbdkit is not installed') || oracleSkipReason();

test(
  'the kernel registers a cache image and an NBD backing device ubcache left dirty, and serves exactly that data',
  { skip, timeout: 600_000 },
  async () => {
    using tmp = tempDir('ubcache-oracle-nbd-backing-');
    const cache = sparseFile(join(tmp.dir, 'cache.img'), 64 * MiB);
    const backing = sparseFile(join(tmp.dir, 'backing.img'), 64 * MiB);
    const data = pattern();
    const dataOffset = DATA_OFFSET_SECTORS * 512;
    let set: string;

    const srv = await startNbdkit(tmp.dir, ['file', backing]);
    try {
      const remote = srv.uri();
      const made = ubcache(['make', '-b', '64k', '--writeback', '-C', cache, '-B', remote]);
      assert.equal(made.status, 0, made.stderr);
      const m = /^Set UUID:\t\t(\S+)$/m.exec(made.stdout);
      assert.ok(m?.[1], made.stdout);
      set = m[1];
      assert.match(made.stdout, new RegExp(`data_offset:\\t\\t${DATA_OFFSET_SECTORS}\\n`));

      const s = await startServe(tmp.dir, [
        '--set',
        'bcache0.cache_mode=writeback',
        '--set',
        'bcache0.writeback_running=0',
        '--set',
        'bcache0.sequential_cutoff=0',
        cache,
        remote,
      ]);
      try {
        assert.ok(
          s.daemon.lines.some((l) => l.includes(`Caching ${remote} as bcache0`)),
          s.daemon.stderr,
        );
        const c = await Client.connect(s.socket);
        try {
          for (let at = 0; at < data.length; at += CHUNK) {
            await c.write(START_BLOCK * 4096 + at, data.subarray(at, at + CHUNK));
          }
          await c.flush();
          assert.ok((await c.read(START_BLOCK * 4096, data.length)).equals(data), 'read back through serve');
        } finally {
          c.close();
        }
      } finally {
        await s.daemon.stop().finally(() => s.daemon.kill());
      }
      assert.equal(cacheState(ubcache(['show-super', remote]).stdout), 'dirty', 'the backing superblock says dirty');
    } finally {
      await srv.stop();
    }
    assert.equal(cacheState(ubcache(['show-super', backing]).stdout), 'dirty', "so does the export's file");
    assert.ok(
      readFileRange(backing, dataOffset + START_BLOCK * 4096, data.length).every((b) => b === 0),
      'nothing written back to the file yet: what the kernel serves comes from the cache image',
    );

    // vda: the cache image, vdb: the file behind the export.
    const range = (dev: string, skipBlocks: number): string =>
      `$(dd if=${dev} bs=4096 skip=${skipBlocks} count=${BLOCKS} 2>/dev/null | md5sum | cut -d' ' -f1)`;
    // The data area starts 16 sectors (two 4 KiB blocks) into the backing device.
    const rawSkip = START_BLOCK + dataOffset / 4096;
    const script = [
      ORACLE_SH_PRELUDE,
      // The backing device first: alone, it waits for its cache.
      'echo /dev/vdb >/sys/fs/bcache/register',
      'waitfor /sys/block/vdb/bcache/state || { dmesg | grep bcache; exit 1; }',
      'echo "sb_state=$(cat /sys/block/vdb/bcache/state)"',
      'echo /dev/vda >/sys/fs/bcache/register',
      'waitfor /sys/block/vdb/bcache/cache || { dmesg | grep bcache; exit 1; }',
      'echo "dirty=$(cat /sys/block/vdb/bcache/dirty_data)"',
      'i=0; while [ -z "$(ls /sys/block/vdb/holders)" ]; do i=$((i+1)); [ $i -gt 200 ] && break; sleep 0.05; done',
      'dev=/dev/$(ls /sys/block/vdb/holders)',
      'echo "dev=$dev"',
      'echo "state=$(cat /sys/block/vdb/bcache/state)"',
      `echo "cached=${range('$dev', START_BLOCK)}"`,
      // Then the kernel's writeback, unthrottled, copies all the dirty data to the backing device.
      'echo 0 >/sys/block/vdb/bcache/writeback_percent',
      'echo 0 >/sys/block/vdb/bcache/writeback_delay',
      'echo 1 >/sys/block/vdb/bcache/writeback_running',
      'i=0; while [ "$(cat /sys/block/vdb/bcache/state)" != clean ]; do i=$((i+1)); [ $i -gt 1200 ] && break; sleep 0.1; done',
      'echo "after=$(cat /sys/block/vdb/bcache/state)"',
      'sync; echo 3 >/proc/sys/vm/drop_caches',
      `echo "written=${range('/dev/vdb', rawSkip)}"`,
      'echo 1 >/sys/block/vdb/bcache/stop',
      `echo 1 >/sys/fs/bcache/${set}/stop`,
      `waitgone /sys/fs/bcache/${set}`,
      'echo "dmesg check:"',
      'dmesg | grep -i bcache | grep -i -E "error|\\bbad\\b|corrupt|inconsistent|missing" || true',
    ];
    const r = await runOracle(script.join('\n') + '\n', [cache, backing]);
    assert.equal(r.status, 0, `${r.output}\n${r.stderr}`);
    const facts = oracleFacts(r.output);
    assert.equal(facts.get('sb_state'), 'dirty', `the kernel reads the superblock make wrote over NBD\n${r.output}`);
    assert.match(facts.get('dev') ?? '', /^\/dev\/bcache\d+$/, r.output);
    assert.equal(facts.get('state'), 'dirty', r.output);
    assert.notEqual(facts.get('dirty'), '0.0k', `the kernel counts our dirty keys\n${r.output}`);
    assert.equal(facts.get('cached'), md5(data), 'the kernel serves the data ubcache wrote, from the cache');
    assert.equal(facts.get('after'), 'clean', r.output);
    assert.equal(facts.get('written'), md5(data), "the kernel's writeback puts it on the backing device");
    // \bbad\b: a set uuid in the output may hold the hex letters "bad".
    assert.ok(!/error|\bbad\b|corrupt|inconsistent|missing/i.test(r.output.split('dmesg check:')[1] ?? ''), r.output);
    assert.ok(
      readFileRange(backing, dataOffset + START_BLOCK * 4096, data.length).equals(data),
      "and the export's file",
    );
  },
);
