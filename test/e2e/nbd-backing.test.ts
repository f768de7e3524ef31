// A remote NBD export as a bcache device, end to end with the built command:
// nbdkit serves a file; ubcache makes it a backing device over NBD, serves
// it cached (writeback, dirty across a restart, written back, writethrough),
// registers one at runtime through the sysfs tree, and proxies one with
// `ubcache export`. What the server's file holds is checked directly.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { have, run, sparseFile, startExport, tempDir, ubcache, UBCACHE, readFileRange } from '../helpers/daemon.ts';
import { startNbdkit, tools } from '../helpers/nbd-servers.ts';
import { startServe } from './serve-helpers.ts';

const MiB = 1024 * 1024;
/** The backing device's data starts after its 8 KiB superblock area (make's default data offset). */
const DATA_OFFSET = 8192;

function cacheState(showSuperOutput: string): string | undefined {
  return /dev\.data\.cache_state\t\d+ \[(\w+)\]/.exec(showSuperOutput)?.[1];
}

const skip = (!tools.nbdkit && 'nbdkit is not installed') || (!have('nbdcopy') && 'nbdcopy is not installed');

test(
  'remote backing: make -B over NBD, serve writeback over the native client, dirty across a restart, written back to the server',
  { skip },
  async () => {
    using tmp = tempDir();
    const backing = sparseFile(join(tmp.dir, 'backing.img'), 64 * MiB);
    const cache = sparseFile(join(tmp.dir, 'cache.img'), 64 * MiB);
    const srv = await startNbdkit(tmp.dir, ['file', backing]);
    const remote = srv.uri();
    try {
      const made = ubcache(['make', '-b', '64k', '-C', cache, '-B', remote]);
      assert.equal(made.status, 0, made.stderr);
      assert.match(made.stdout, /data_offset:\t\t16\n/);
      // The superblock went over NBD into the server's file: bcache-tools reads it there.
      const local = ubcache(['show-super', backing]);
      const viaNbd = ubcache(['show-super', remote]);
      assert.equal(viaNbd.status, 0, viaNbd.stderr);
      assert.equal(viaNbd.stdout, local.stdout, 'show-super over NBD prints what it prints for the file');
      if (have('bcache-super-show')) {
        assert.equal(await run('bcache-super-show', [backing]), viaNbd.stdout);
      }
      assert.match(viaNbd.stdout, /sb\.version\t\t1 \[backing device\]/);
      assert.equal(cacheState(viaNbd.stdout), 'detached');

      // Round 1: writeback with writeback held off; the data stays in the cache.
      const data = randomBytes(8 * MiB);
      const dataFile = join(tmp.dir, 'data.bin');
      writeFileSync(dataFile, data);
      const s1 = await startServe(tmp.dir, [
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
        assert.ok(s1.daemon.lines.some((l) => l.includes(`Caching ${remote} as bcache0`)));
        await run('nbdcopy', ['--flush', dataFile, s1.uri()]);
        const back = join(tmp.dir, 'back.bin');
        await run('nbdcopy', [s1.uri(), back]);
        assert.ok(readFileRange(back, 0, data.length).equals(data), 'read back through serve');
      } finally {
        await s1.daemon.stop().finally(() => s1.daemon.kill());
      }
      assert.equal(cacheState(ubcache(['show-super', remote]).stdout), 'dirty', 'the backing superblock says dirty');
      assert.ok(
        readFileRange(backing, DATA_OFFSET, data.length).every((b) => b === 0),
        'nothing written back yet',
      );

      // Round 2: writethrough with writeback unthrottled; the dirty data goes to the server, new writes go at once.
      const s2 = await startServe(tmp.dir, [
        '--set',
        'bcache0.cache_mode=writethrough',
        '--set',
        'bcache0.writeback_percent=0',
        '--set',
        'bcache0.writeback_delay=0',
        cache,
        remote,
      ]);
      try {
        await s2.daemon.waitForLine(/bcache0: written back, .* marked clean/);
        const more = randomBytes(MiB);
        const moreFile = join(tmp.dir, 'more.bin');
        writeFileSync(moreFile, more);
        // nbdcopy writes the 1 MiB file at the start of bcache0.
        await run('nbdcopy', ['--flush', moreFile, s2.uri()]);
        assert.ok(readFileRange(backing, DATA_OFFSET, MiB).equals(more), 'writethrough: on the server at once');
        data.set(more, 0);
      } finally {
        await s2.daemon.stop().finally(() => s2.daemon.kill());
      }
      assert.ok(readFileRange(backing, DATA_OFFSET, data.length).equals(data), "the server's file holds all the data");
      assert.equal(cacheState(ubcache(['show-super', remote]).stdout), 'clean');
    } finally {
      await srv.stop();
    }
  },
);

test(
  'bypassed 1 MiB reads through serve reach the server as 1 MiB reads, 8 at a time on one of the four connections',
  { skip },
  async () => {
    using tmp = tempDir();
    // bcache0 is the backing device past its superblock area: 64 MiB exactly.
    const backing = sparseFile(join(tmp.dir, 'backing.img'), DATA_OFFSET + 64 * MiB);
    const cache = sparseFile(join(tmp.dir, 'cache.img'), 64 * MiB);
    const srv = await startNbdkit(tmp.dir, ['file', backing], { log: true });
    try {
      const made = ubcache(['make', '-b', '64k', '-C', cache, '-B', srv.uri()]);
      assert.equal(made.status, 0, made.stderr);
      // A 1 MiB sequential_cutoff: every 1 MiB read is past it and bypasses the cache.
      const s = await startServe(tmp.dir, ['--set', 'bcache0.sequential_cutoff=1048576', cache, srv.uri()]);
      try {
        await run('nbdcopy', ['--connections=1', '--requests=8', '--request-size=1048576', s.uri(), 'null:']);
        const control = `${s.socket}.control`;
        const bypassed = await run(UBCACHE, [
          'ctl',
          '--control',
          control,
          'cat',
          'block/bcache0/bcache/stats_total/bypassed',
        ]);
        assert.equal(bypassed.trim(), '64.0M', 'every read bypassed the cache');
      } finally {
        await s.daemon.stop().finally(() => s.daemon.kill());
      }
    } finally {
      await srv.stop();
    }
    // The server's view of the reads of bcache0's data (past the 8 KiB superblock area).
    const reads = [...srv.log().matchAll(/connection=(\d+) Read id=\d+ offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+) /g)]
      .filter((m) => Number(m[2]) >= DATA_OFFSET)
      .map((m) => ({ connection: m[1], offset: Number(m[2]) - DATA_OFFSET, length: Number(m[3]) }));
    assert.deepEqual(
      reads.map((r) => r.length),
      Array.from({ length: 64 }, () => MiB),
      'one 1 MiB read at the server for each 1 MiB read through serve: not split, nothing read twice',
    );
    assert.deepEqual(
      reads.map((r) => r.offset).sort((a, b) => a - b),
      Array.from({ length: 64 }, (_, i) => i * MiB),
    );
    // nbdcopy keeps at most 8 in flight; ubcache passes them on as they come, so one connection takes them all.
    assert.equal(new Set(reads.map((r) => r.connection)).size, 1, 'all on one connection');
  },
);

test(
  'ctl register takes a URI: a remote backing device registered at runtime attaches and is served',
  { skip },
  async () => {
    using tmp = tempDir();
    const cache = sparseFile(join(tmp.dir, 'cache.img'), 64 * MiB);
    const local = sparseFile(join(tmp.dir, 'local.img'), 32 * MiB);
    const remoteFile = sparseFile(join(tmp.dir, 'remote.img'), 32 * MiB);
    const srv = await startNbdkit(tmp.dir, ['file', remoteFile]);
    try {
      const set = '2a9d4c1e-8f3b-4d6a-9c5e-7b1f0e2d3c4a';
      assert.equal(ubcache(['make', '-b', '64k', '--cset-uuid', set, '-C', cache, '-B', local]).status, 0);
      const made = ubcache(['make', '-b', '64k', '--cset-uuid', set, '-B', srv.uri()]);
      assert.equal(made.status, 0, made.stderr);
      const s = await startServe(tmp.dir, [cache, local]);
      const control = `${s.socket}.control`;
      try {
        await run(UBCACHE, ['ctl', '--control', control, 'write', '/sys/fs/bcache/register', srv.uri()]);
        await s.daemon.waitForLine(/export bcache1 added/);
        assert.equal(await run(UBCACHE, ['ctl', '--control', control, 'cat', 'block/bcache1/bcache/state']), 'clean\n');
        const data = randomBytes(MiB);
        const dataFile = join(tmp.dir, 'data.bin');
        writeFileSync(dataFile, data);
        await run('nbdcopy', ['--flush', dataFile, s.uri('bcache1')]);
        // Writethrough (the default): on the server's file already.
        assert.ok(readFileRange(remoteFile, DATA_OFFSET, MiB).equals(data));
      } finally {
        await s.daemon.stop().finally(() => s.daemon.kill());
      }
    } finally {
      await srv.stop();
    }
  },
);

test('export proxies a remote export: nbdinfo and nbdcopy through ubcache to nbdkit', { skip }, async () => {
  using tmp = tempDir();
  const file = sparseFile(join(tmp.dir, 'disk.img'), 32 * MiB);
  const srv = await startNbdkit(tmp.dir, [
    '--filter=blocksize-policy',
    'file',
    file,
    'blocksize-minimum=4096',
    'blocksize-maximum=1048576',
  ]);
  const proxy = await startExport(tmp.dir, [srv.uri()]);
  try {
    assert.ok(proxy.daemon.lines.some((l) => /listening on unix:.*\(exports: nbd\)/.test(l)));
    const info = JSON.parse(await run('nbdinfo', ['--json', proxy.uri('nbd')])) as {
      exports: Array<{ 'export-size': number; block_size_minimum: number; can_multi_conn: boolean }>;
    };
    const exp = info.exports[0];
    assert.ok(exp, 'nbdinfo lists the export');
    assert.equal(exp['export-size'], 32 * MiB);
    assert.equal(exp.block_size_minimum, 4096, "the upstream's minimum block size is passed on");
    const data = randomBytes(4 * MiB);
    const dataFile = join(tmp.dir, 'data.bin');
    writeFileSync(dataFile, data);
    await run('nbdcopy', ['--flush', dataFile, proxy.uri('nbd')]);
    assert.ok(readFileRange(file, 0, data.length).equals(data), "the data is in nbdkit's file");
    const out = join(tmp.dir, 'out.bin');
    await run('nbdcopy', [proxy.uri('nbd'), out]);
    assert.ok(readFileRange(out, 0, data.length).equals(data));
  } finally {
    await proxy.daemon.stop().finally(() => proxy.daemon.kill());
    await srv.stop();
  }
});
