// nbdcopy with 4 connections, into the export and back out. nbdcopy opens
// more than one only because we advertise multi-conn, and no more than its
// thread count (the CPU count by default), hence --threads=4.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { run, sparseFile, startExport, tempDir } from '../helpers/daemon.ts';
import { patchyImage, sameContent } from '../helpers/patchy-image.ts';

const MiB = 1024 * 1024;

test('nbdcopy --connections=4 both ways copies the image exactly, over 4 connections each way', async () => {
  using tmp = tempDir();
  const src = patchyImage(join(tmp.dir, 'src.img'), 64 * MiB, [
    [0, 16],
    [33, 7],
    [63, 1],
  ]);
  const target = sparseFile(join(tmp.dir, 'target.img'), 64 * MiB);
  const { daemon, uri } = await startExport(tmp.dir, [target], { UBCACHE_LOG: 'debug' });
  const transmissions = (): number => daemon.lines.filter((l) => /: export 'target\.img'/.test(l)).length;
  try {
    await run('nbdcopy', ['--connections=4', '--threads=4', '--flush', src, uri('target.img')]);
    assert.equal(transmissions(), 4, 'nbdcopy wrote over 4 connections');
    const out = join(tmp.dir, 'out.img');
    await run('nbdcopy', ['--connections=4', '--threads=4', uri('target.img'), out]);
    assert.equal(transmissions(), 8, 'and read over 4 connections');
    assert.deepEqual(sameContent(src, out), { equal: true });
  } finally {
    await daemon.stop().finally(() => daemon.kill());
  }
  assert.deepEqual(sameContent(src, target), { equal: true });
});
