// The whole stack a user would build: nbdfuse exposes the export as a file,
// a loop device turns that into a block device, ext4 goes on top. Files copied
// in must come back identical after a remount, fsck must find the filesystem
// clean, and the exported file itself must hold that filesystem.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { run, sparseFile, startExport, tempDir } from '../helpers/daemon.ts';
import { attachLoop, missingFuseLoop } from '../helpers/fuse-loop.ts';

const MiB = 1024 * 1024;

test('nbdfuse + losetup + mkfs.ext4 + mount: files copied in come back identical and fsck is clean', async (t) => {
  const why = missingFuseLoop();
  if (why !== undefined) {
    t.skip(why);
    return;
  }
  using tmp = tempDir();
  const image = sparseFile(join(tmp.dir, 'disk.img'), 128 * MiB);
  const files = new Map<string, Buffer>([
    ['small.txt', Buffer.from('hello from ubcache\n')],
    ['random-1m.bin', randomBytes(MiB)],
    ['random-7m.bin', randomBytes(7 * MiB + 123)],
    ['zeroes-3m.bin', Buffer.alloc(3 * MiB)],
  ]);
  for (const [name, data] of files) writeFileSync(join(tmp.dir, name), data);

  const { daemon, uri } = await startExport(tmp.dir, [image]);
  const stack = await attachLoop(tmp.dir, uri('disk.img'));
  try {
    await run('mkfs.ext4', ['-q', '-F', '-L', 'ubcache', stack.loop]);
    await stack.mount();
    for (const name of files.keys()) await run('cp', [join(tmp.dir, name), join(stack.mnt, name)]);
    await run('sync', []);
    await stack.umount();

    const fsck = await run('fsck.ext4', ['-f', '-n', stack.loop]);
    assert.match(fsck, /ubcache: \d+\/\d+ files/);

    await stack.mount(['-o', 'ro']);
    for (const [name, data] of files) {
      assert.ok(readFileSync(join(stack.mnt, name)).equals(data), `${name} differs after the remount`);
    }
    await stack.umount();
  } finally {
    await stack.teardown();
    await daemon.stop().finally(() => daemon.kill());
  }
  // The writes went through to the exported file: it now holds the clean filesystem.
  const direct = await run('fsck.ext4', ['-f', '-n', image]);
  assert.match(direct, /ubcache: \d+\/\d+ files/);
});
