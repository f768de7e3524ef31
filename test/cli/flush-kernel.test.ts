// `ubcache flush` on images the Linux kernel left dirty (test/fixtures/kernel):
// a cache set the kernel stopped with dirty data (wb-stopped) and one it left
// by a reset, with keys only in its journal (wb-crash). After the flush the
// backing image alone holds what /dev/bcache0 held (the patterns over what
// was on the backing device) and its superblock says clean. The kernel's own
// verdict on these images is test/oracle/flush.test.ts.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { BDEV_STATE_CLEAN, BDEV_STATE_DIRTY, SB_OFFSET, SB_SIZE } from '../../src/format/constants.ts';
import { bdevState, decodeSuperblock } from '../../src/format/superblock.ts';
import { KERNEL_FIXTURES } from '../helpers/fixtures.ts';
import { tempDir } from '../helpers/daemon.ts';
import { fixtureImages, flushCli, kernelView } from './flush-helpers.ts';

const S = 512;

const state = (path: string): number =>
  bdevState(decodeSuperblock(readFileSync(path).subarray(SB_OFFSET, SB_OFFSET + SB_SIZE)));

for (const name of ['wb-stopped', 'wb-crash'] as const) {
  test(`flush on the kernel's ${name} images: the backing image alone is the kernel's view, clean`, () => {
    using t = tempDir('ubcache-flush-kernel-');
    const { cache, bdev } = fixtureImages(t.dir, name);
    const info = KERNEL_FIXTURES[name];
    const dirty = info.patterns.reduce((s, p) => s + p.sectors, 0);
    assert.equal(state(bdev), BDEV_STATE_DIRTY);

    const dry = flushCli(['--dry-run', cache, bdev]);
    assert.equal(dry.status, 0, dry.stderr);
    assert.match(dry.stdout, new RegExp(`cache set ${info.setUuid}`));
    assert.match(dry.stdout, new RegExp(`\\(${dirty} sectors\\) dirty, superblock dirty`));

    const r = flushCli([cache, bdev]);
    assert.equal(r.status, 0, `${r.stdout}\n${r.stderr}`);
    assert.match(r.stdout, /superblock dirty -> clean/);
    assert.equal(state(bdev), BDEV_STATE_CLEAN);
    const data = readFileSync(bdev).subarray((info.dataOffset ?? 16) * S);
    assert.ok(data.equals(kernelView(name)), 'the backing image holds the kernel view');
  });
}
