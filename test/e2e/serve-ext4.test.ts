// ext4 on bcache0 in writeback mode, the way a user runs it: nbdfuse + loop
// over `ubcache serve`, a file workload, the daemon restarted in the middle
// (SIGTERM with the data still dirty in the cache), more work, fsck clean and
// every file intact; then writeback on, and the backing device alone (read
// past its data_offset) holds the same clean filesystem.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash, randomBytes } from 'node:crypto';
import { closeSync, mkdirSync, openSync, readFileSync, readSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { run, tempDir } from '../helpers/daemon.ts';
import { missingFuseLoop } from '../helpers/fuse-loop.ts';
import { ext4Round, makeImages, MiB, startServe } from './serve-helpers.ts';

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

test('ext4 on bcache0 in writeback mode survives a serve restart; fsck clean; files intact', async (t) => {
  const why = missingFuseLoop();
  if (why !== undefined) {
    t.skip(why);
    return;
  }
  using tmp = tempDir();
  const { cache, backing } = makeImages(tmp.dir, { cacheMiB: 256, backingMiB: 160, args: ['--writeback'] });
  const files = new Map<string, Buffer>();
  const addFiles = (prefix: string, n: number): void => {
    for (let i = 0; i < n; i++) {
      const data = randomBytes(i % 3 === 0 ? 3 * MiB + i : 4096 * (i + 1) + 17);
      const name = `${prefix}-${i}.bin`;
      writeFileSync(join(tmp.dir, name), data);
      files.set(name, data);
    }
  };
  const verify = (mnt: string): void => {
    for (const [name, data] of files) {
      assert.equal(sha(readFileSync(join(mnt, name))), sha(data), `${name} differs`);
    }
  };
  const common = ['--set', 'bcache0.sequential_cutoff=0', '--set', 'set.journal_delay_ms=10'];

  const round = async (
    n: number,
    args: string[],
    work: (mnt: string, loop: string) => Promise<void>,
  ): Promise<void> => {
    const dir = join(tmp.dir, `r${n}`);
    mkdirSync(dir);
    const s = await startServe(dir, [...common, ...args, cache, backing]);
    await ext4Round(dir, s, 'ubcache', work);
  };

  // Round 1: writeback held off, so everything stays dirty in the cache across the restart.
  await round(1, ['--set', 'bcache0.writeback_running=0'], async (mnt, loop) => {
    await run('mkfs.ext4', ['-q', '-F', '-L', 'ubcache', loop]);
    await run('mount', [loop, mnt]);
    addFiles('a', 8);
    for (const name of files.keys()) await run('cp', [join(tmp.dir, name), join(mnt, name)]);
    await run('sync', []);
  });
  // The filesystem is in the cache only: the backing device alone does not hold it yet.
  // (ext4's superblock sits 1 KiB into the device, its magic 0xEF53 at byte 0x38.)
  const ext4Magic = (): number => {
    const fd = openSync(backing, 'r');
    try {
      const b = Buffer.alloc(2);
      readSync(fd, b, 0, 2, 8192 + 1024 + 0x38);
      return b.readUInt16LE(0);
    } finally {
      closeSync(fd);
    }
  };
  assert.notEqual(ext4Magic(), 0xef53, 'nothing was written back');

  // Round 2: the restarted daemon serves the dirty data; more work on top.
  await round(2, ['--set', 'bcache0.writeback_running=0'], async (mnt, loop) => {
    await run('mount', [loop, mnt]);
    verify(mnt);
    await run('rm', [join(mnt, 'a-1.bin')]);
    files.delete('a-1.bin');
    addFiles('b', 5);
    for (const name of [...files.keys()].filter((f) => f.startsWith('b-'))) {
      await run('cp', [join(tmp.dir, name), join(mnt, name)]);
    }
    await run('sync', []);
    verify(mnt);
  });

  // Round 3: writeback on at full rate; wait until bcache0 is clean, then look at the backing device alone.
  const dir = join(tmp.dir, 'r3');
  mkdirSync(dir);
  const s = await startServe(dir, [
    ...common,
    // writeback_percent 0: unthrottled; the rate controller would lower a set rate within seconds.
    '--set',
    'bcache0.writeback_percent=0',
    '--set',
    'bcache0.writeback_delay=0',
    cache,
    backing,
  ]);
  try {
    await s.daemon.waitForLine(/bcache0: written back, .*backing\.img marked clean/);
  } finally {
    await s.daemon.stop().finally(() => s.daemon.kill());
  }
  // The backing device alone, past its 8 KiB data offset, is the filesystem.
  const alone = join(tmp.dir, 'alone.img');
  await run('dd', [`if=${backing}`, `of=${alone}`, 'bs=8k', 'skip=1', 'status=none']);
  assert.equal(ext4Magic(), 0xef53);
  const fsck = await run('fsck.ext4', ['-f', '-n', alone]);
  assert.match(fsck, /ubcache: \d+\/\d+ files/);
  const files2 = await run('debugfs', ['-R', 'ls -l /', alone]);
  for (const name of files.keys()) assert.ok(files2.includes(name), `${name} is on the backing device`);
  const dump = join(tmp.dir, 'dumped.bin');
  await run('debugfs', ['-R', `dump /b-0.bin ${dump}`, alone]);
  assert.equal(sha(readFileSync(dump)), sha(files.get('b-0.bin') ?? Buffer.alloc(0)));
});
