// Flash-only volumes through the daemon, with real NBD clients: `serve` of a
// cache device alone, a volume made with `ubcache ctl write
// .../flash_vol_create`, exported as bcache0 at once; nbdinfo maps it as one
// hole, nbdcopy writes an image into it and reads it back; `ctl status`
// and /metrics list it with its size and the data it holds; after a restart
// the volume is served again with its data; `unregister` deletes it and its
// export goes.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { controlRequest } from '../../src/control/client.ts';
import { have, run, sparseFile, tempDir, ubcache, UBCACHE } from '../helpers/daemon.ts';
import { patchyImage, sameContent } from '../helpers/patchy-image.ts';
import { startServe } from './serve-helpers.ts';

const MiB = 1024 * 1024;

function ctl(control: string, ...args: string[]): Promise<string> {
  return run(UBCACHE, ['ctl', '--control', control, ...args]);
}

const skip = (!have('nbdcopy') && 'nbdcopy is not installed') || (!have('nbdinfo') && 'nbdinfo is not installed');

test(
  'serve a cache alone, create a flash volume, copy an image in and out with nbdcopy, restart, unregister',
  { skip },
  async () => {
    using tmp = tempDir('ubcache-e2e-flash-');
    const cache = sparseFile(join(tmp.dir, 'cache.img'), 64 * MiB);
    const made = ubcache(['make', '-b', '64k', '-C', cache]);
    assert.equal(made.status, 0, made.stderr);
    const set = /^Set UUID:\t\t(\S+)$/m.exec(made.stdout)?.[1];
    assert.ok(set, made.stdout);
    const src = patchyImage(join(tmp.dir, 'src.img'), 16 * MiB, [
      [0, 1],
      [5, 2],
      [15, 1],
    ]);

    let s = await startServe(tmp.dir, [cache]);
    try {
      const control = `${s.socket}.control`;
      await ctl(control, 'write', `/sys/fs/bcache/${set}/flash_vol_create`, '16M');
      await s.daemon.waitForLine(/export bcache0 added/);
      assert.equal(await ctl(control, 'cat', `/sys/fs/bcache/${set}/volume0/size`), '16.0M\n');
      const map = await run('nbdinfo', ['--map', s.uri('bcache0')]);
      assert.match(map.trim(), /^0\s+16777216\s+3\s+hole,zero$/, 'a new volume is one hole');
      await run('nbdcopy', ['--flush', src, s.uri('bcache0')]);
      const out = join(tmp.dir, 'out.img');
      await run('nbdcopy', [s.uri('bcache0'), out]);
      assert.deepEqual(sameContent(src, out), { equal: true });
      await ctl(control, 'write', '/sys/block/bcache0/bcache/label', 'scratch');
      const st = await ctl(control, 'status');
      assert.match(st, new RegExp(`^bcache0\\s+${set}\\s+0\\s+16\\.0M\\s+scratch$`, 'm'), st);
      assert.match(st, /^no bcache device$/m, 'the volume is not a backing device');
      const metrics = (await controlRequest(control, 'GET', '/metrics')).body;
      const labels = `\\{device="bcache0",set="${set}"\\}`;
      assert.match(metrics, new RegExp(`^ubcache_flash_volume_size_bytes${labels} ${16 * MiB}$`, 'm'));
      // The image's data extents (4 MiB in 1 MiB blocks here), all of them held in the cache.
      const data = Number(new RegExp(`^ubcache_flash_volume_data_bytes${labels} (\\d+)$`, 'm').exec(metrics)?.[1]);
      assert.equal(data, 4 * MiB, metrics);
    } finally {
      await s.daemon.stop().finally(() => s.daemon.kill());
    }

    s = await startServe(tmp.dir, [cache]);
    try {
      const control = `${s.socket}.control`;
      assert.match(s.daemon.lines.join('\n'), /listening on .*\(exports: bcache0\)/);
      const out = join(tmp.dir, 'again.img');
      await run('nbdcopy', [s.uri('bcache0'), out]);
      assert.deepEqual(sameContent(src, out), { equal: true }, 'the volume came back with its data');
      await ctl(control, 'write', '/sys/block/bcache0/bcache/unregister', '1');
      await s.daemon.waitForLine(/export bcache0 removed/);
      assert.doesNotMatch(await ctl(control, 'ls', `/sys/fs/bcache/${set}`), /volume/);
      await assert.rejects(run('nbdinfo', [s.uri('bcache0')]), 'the export is gone');
    } finally {
      await s.daemon.stop().finally(() => s.daemon.kill());
    }
  },
);
