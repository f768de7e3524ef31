// qemu's NBD client: qemu-img convert in both directions with a compare, and
// qemu-io writing with FUA.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { run, sparseFile, startExport, tempDir } from '../helpers/daemon.ts';
import { patchyImage, sameContent } from '../helpers/patchy-image.ts';

const MiB = 1024 * 1024;

test('qemu-img convert into the export and back out, identical both ways', async () => {
  using tmp = tempDir();
  const src = patchyImage(join(tmp.dir, 'src.img'), 48 * MiB, [
    [0, 3],
    [10, 8],
    [40, 1],
  ]);
  const target = sparseFile(join(tmp.dir, 'target.img'), 48 * MiB);
  const { daemon, uri } = await startExport(tmp.dir, [target]);
  try {
    const nbd = uri('target.img');
    await run('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src, nbd]);
    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, nbd]);
    assert.match(cmp, /Images are identical/);
    const info = await run('qemu-img', ['info', '--output=json', nbd]);
    assert.equal((JSON.parse(info) as { 'virtual-size': number })['virtual-size'], 48 * MiB);
    const out = join(tmp.dir, 'out.img');
    await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', nbd, out]);
    assert.deepEqual(sameContent(src, out), { equal: true });
  } finally {
    await daemon.stop().finally(() => daemon.kill());
  }
  assert.deepEqual(sameContent(src, target), { equal: true }, 'the exported file holds the image');
});

test('qemu-io FUA writes land in the file and read back', async () => {
  using tmp = tempDir();
  const f = sparseFile(join(tmp.dir, 'disk.img'), 8 * MiB);
  const { daemon, uri } = await startExport(tmp.dir, [f]);
  try {
    const out = await run('qemu-io', [
      '-f',
      'raw',
      '-c',
      'write -f -P 0x5a 1M 64k',
      '-c',
      'write -f -P 0xa5 3145728 4096',
      '-c',
      'flush',
      '-c',
      'read -P 0x5a 1M 64k',
      '-c',
      'read -P 0xa5 3145728 4096',
      '-c',
      'read -P 0 0 1M',
      uri('disk.img'),
    ]);
    assert.match(out, /wrote 65536\/65536 bytes at offset 1048576/);
    assert.match(out, /read 65536\/65536 bytes at offset 1048576/);
    assert.doesNotMatch(out, /Pattern verification failed/);
  } finally {
    await daemon.stop().finally(() => daemon.kill());
  }
  const data = readFileSync(f);
  assert.ok(data.subarray(MiB, MiB + 65536).every((b) => b === 0x5a));
  assert.ok(data.subarray(3 * MiB, 3 * MiB + 4096).every((b) => b === 0xa5));
});
