// A config file round trip through the built CLI: the devices it names by
// path are registered and given its attributes, the rule it has for a
// backing device's uuid applies when that device is registered at run time,
// and the control socket reads back what the file said. A section that
// names a device as the wrong kind is refused with its line.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Daemon, run, sparseFile, tempDir, ubcache, UBCACHE } from '../helpers/daemon.ts';
import { makeImages, MiB } from './serve-helpers.ts';

async function ctl(control: string, ...args: string[]): Promise<string> {
  return run(UBCACHE, ['ctl', '--control', control, ...args]);
}

test(
  'config round trip: devices by path with their attributes, a uuid rule for a device registered later',
  { timeout: 120_000 },
  async () => {
    using tmp = tempDir();
    const { cache, backing } = makeImages(tmp.dir);
    const later = sparseFile(join(tmp.dir, 'later.img'), 32 * MiB);
    assert.equal(ubcache(['make', '-B', later]).status, 0);
    const shown = JSON.parse(ubcache(['show-super', '--json', later]).stdout) as { dev: { uuid: string } };
    const control = join(tmp.dir, 'control.sock');
    const socket = join(tmp.dir, 'nbd.sock');
    const config = join(tmp.dir, 'ubcache.conf');
    writeFileSync(
      config,
      [
        '[serve]',
        `socket = ${socket}`,
        `control = ${control}`,
        '',
        '[cache "cache.img"]',
        'journal_delay_ms = 50',
        '',
        '[backing "backing.img"]',
        'cache_mode = writeback',
        'writeback_percent = 20',
        'sequential_cutoff = 0',
        '',
        `[backing "${shown.dev.uuid}"]`,
        'cache_mode = writearound',
        '',
      ].join('\n'),
    );
    const d = new Daemon(['serve', '--config', config]);
    try {
      await d.waitForLine(/listening on unix:.*\(exports: bcache0\)/);
      assert.equal(await ctl(control, 'cat', 'block/bcache0/bcache/backing_dev_name'), 'backing.img\n');
      assert.equal(
        await ctl(control, 'cat', 'block/bcache0/bcache/cache_mode'),
        'writethrough [writeback] writearound none\n',
      );
      assert.equal(await ctl(control, 'cat', 'block/bcache0/bcache/writeback_percent'), '20\n');
      assert.equal(await ctl(control, 'cat', 'block/bcache0/bcache/sequential_cutoff'), '0.0k\n');
      const set = (await ctl(control, 'ls', '/sys/fs/bcache')).split('\n').find((l) => /^[0-9a-f-]{36}$/.test(l));
      assert.ok(set);
      assert.equal(await ctl(control, 'cat', `/sys/fs/bcache/${set}/journal_delay_ms`), '50\n');
      // Registered later, by the path written to register: the uuid rule applies.
      await ctl(control, 'write', '/sys/fs/bcache/register', later);
      await d.waitForLine(/export bcache1 added/);
      assert.equal(
        await ctl(control, 'cat', 'block/bcache1/bcache/cache_mode'),
        'writethrough writeback [writearound] none\n',
      );
    } catch (err) {
      console.error(d.stderr);
      throw err;
    } finally {
      await d.stop().finally(() => d.kill());
    }
    // A cache device named as a backing device: refused at start, with the line.
    writeFileSync(
      config,
      `[serve]\nsocket = ${socket}\ncontrol = ${control}\n\n[backing "${cache}"]\ncache_mode = writeback\n`,
    );
    const wrong = ubcache(['serve', '--config', config, backing]);
    assert.equal(wrong.status, 1);
    assert.match(
      wrong.stderr,
      new RegExp(`ubcache serve: ${config}:5: ${cache} is a cache device, not a backing device; write \\[cache "`),
    );
  },
);
