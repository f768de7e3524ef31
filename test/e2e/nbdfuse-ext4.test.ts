// The whole stack a user would build: nbdfuse exposes the export as a file,
// a loop device turns that into a block device, ext4 goes on top. Files copied
// in must come back identical after a remount, fsck must find the filesystem
// clean, and the exported file itself must hold that filesystem.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { have, run, sparseFile, startExport, tempDir, waitForFile } from '../helpers/daemon.ts';

const MiB = 1024 * 1024;

function missing(): string | undefined {
  if (process.getuid?.() !== 0) return 'mounting and loop devices need root';
  if (!existsSync('/dev/fuse')) return '/dev/fuse is missing (no FUSE in this kernel or container)';
  if (!existsSync('/dev/loop-control')) return '/dev/loop-control is missing (no loop devices here)';
  for (const cmd of ['nbdfuse', 'fusermount3', 'losetup', 'mkfs.ext4', 'fsck.ext4', 'mount', 'umount']) {
    if (!have(cmd)) return `${cmd} is not installed (apt-get install libnbd-bin fuse3 e2fsprogs util-linux)`;
  }
  return undefined;
}

test('nbdfuse + losetup + mkfs.ext4 + mount: files copied in come back identical and fsck is clean', async (t) => {
  const why = missing();
  if (why !== undefined) {
    t.skip(why);
    return;
  }
  using tmp = tempDir();
  const image = sparseFile(join(tmp.dir, 'disk.img'), 128 * MiB);
  const fuseDir = join(tmp.dir, 'fuse');
  const mnt = join(tmp.dir, 'mnt');
  mkdirSync(fuseDir);
  mkdirSync(mnt);
  const files = new Map<string, Buffer>([
    ['small.txt', Buffer.from('hello from ubcache\n')],
    ['random-1m.bin', randomBytes(MiB)],
    ['random-7m.bin', randomBytes(7 * MiB + 123)],
    ['zeroes-3m.bin', Buffer.alloc(3 * MiB)],
  ]);
  for (const [name, data] of files) writeFileSync(join(tmp.dir, name), data);

  const { daemon, uri } = await startExport(tmp.dir, [image]);
  const cleanups: (() => Promise<unknown>)[] = [];
  try {
    // nbdfuse stays in the foreground and writes its pid file once it serves.
    const pidFile = join(tmp.dir, 'nbdfuse.pid');
    const fuse = spawn('nbdfuse', ['-P', pidFile, join(fuseDir, 'disk'), uri('disk.img')], { stdio: 'inherit' });
    const fuseExited = new Promise<number | null>((resolve) =>
      fuse.once('exit', (code) => {
        resolve(code);
      }),
    );
    cleanups.push(async () => {
      await run('fusermount3', ['-u', fuseDir]).catch(() => fuse.kill('SIGKILL'));
      return fuseExited;
    });
    await Promise.race([
      waitForFile(pidFile),
      fuseExited.then((code) => {
        throw new Error(`nbdfuse exited with ${code} before it was ready`);
      }),
    ]);

    const loop = (await run('losetup', ['--find', '--show', join(fuseDir, 'disk')])).trim();
    assert.match(loop, /^\/dev\/loop\d+$/);
    cleanups.push(() => run('losetup', ['-d', loop]));

    await run('mkfs.ext4', ['-q', '-F', '-L', 'ubcache', loop]);
    await run('mount', [loop, mnt]);
    let mounted = true;
    cleanups.push(() => (mounted ? run('umount', [mnt]) : Promise.resolve()));
    for (const name of files.keys()) await run('cp', [join(tmp.dir, name), join(mnt, name)]);
    await run('sync', []);
    await run('umount', [mnt]);
    mounted = false;

    const fsck = await run('fsck.ext4', ['-f', '-n', loop]);
    assert.match(fsck, /ubcache: \d+\/\d+ files/);

    await run('mount', ['-o', 'ro', loop, mnt]);
    mounted = true;
    for (const [name, data] of files) {
      assert.ok(readFileSync(join(mnt, name)).equals(data), `${name} differs after the remount`);
    }
    await run('umount', [mnt]);
    mounted = false;
  } finally {
    // In reverse order, each step tolerated to fail, so a failed test leaves no mount, loop or FUSE behind.
    for (const undo of cleanups.reverse()) await undo().catch(() => undefined);
    await daemon.stop().finally(() => daemon.kill());
  }
  // The writes went through to the exported file: it now holds the clean filesystem.
  const direct = await run('fsck.ext4', ['-f', '-n', image]);
  assert.match(direct, /ubcache: \d+\/\d+ files/);
});
