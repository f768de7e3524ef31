// `ubcache serve` as a user meets it: argument and --set errors, registration
// in any order, a backing device waiting for its cache, data through the
// export, a second daemon kept off the images, and an orderly SIGTERM after
// which the process exits by itself and the data is where the mode says.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { existsSync, openSync, readSync, closeSync } from 'node:fs';
import { join } from 'node:path';
import { SB_OFFSET, SB_SIZE } from '../../src/format/constants.ts';
import { bdevCacheMode, bdevState, decodeSuperblock } from '../../src/format/superblock.ts';
import { Daemon, readFileRange, run, tempDir, ubcache } from '../helpers/daemon.ts';
import { Client, makeImages, MiB, startServe } from './serve-helpers.ts';

function superblock(path: string) {
  const fd = openSync(path, 'r');
  try {
    const block = Buffer.alloc(SB_SIZE);
    readSync(fd, block, 0, SB_SIZE, SB_OFFSET);
    return decodeSuperblock(block);
  } finally {
    closeSync(fd);
  }
}

test('serve: help, and errors that say what is wrong before anything is opened', () => {
  using tmp = tempDir();
  const help = ubcache(['serve', '--help']);
  assert.equal(help.status, 0);
  assert.match(help.stdout, /Usage: ubcache serve \[options\] \[DEVICE\.\.\.\]/);
  assert.match(help.stdout, /--set TARGET\.ATTR=VALUE/);
  assert.match(ubcache(['--help']).stdout, /^\s+serve\s+register bcache devices and serve them over NBD$/m);
  // With no device, serve starts empty (tested in serve-service.test.ts); a one-shot run has nothing to do.
  const none = ubcache(['serve', '--exit-when-idle']);
  assert.equal(none.status, 1);
  assert.match(
    none.stderr,
    /ubcache serve: no DEVICE to register, and --exit-when-idle would exit at once\n.*ubcache serve cache\.img disk\.img/,
  );
  const img = join(tmp.dir, 'x.img');
  const cases: Array<[string[], RegExp]> = [
    [['--set', 'bcache0.cache_size=1', img], /bcache0 has no settable attribute "cache_size"; valid: cache_mode, /],
    [
      ['--set', 'bcache0.cache_mode=fast', img],
      /cache_mode: "fast" is not one of: writethrough, writeback, writearound, none/,
    ],
    [
      ['--set', 'bcache0.sequential_cutoff=4M', img],
      /sequential_cutoff: "4M" is not a whole number from 0 to 4294967295/,
    ],
    [['--set', 'set.journal_delay_ms=-1', img], /journal_delay_ms: "-1" is not a whole number from 0 to 65535/],
    [['--set', 'disk.cache_mode=none', img], /unknown target 'disk'\n.*bcacheN/],
    [['--set', 'cache_mode=none', img], /--set 'cache_mode=none' is not TARGET\.ATTR=VALUE/],
  ];
  for (const [args, pattern] of cases) {
    const r = ubcache(['serve', '--socket', join(tmp.dir, 's'), ...args]);
    assert.equal(r.status, 1, args.join(' '));
    assert.match(r.stderr, pattern);
  }
  assert.ok(!existsSync(img), 'nothing was created');
  const missing = ubcache(['serve', '--socket', join(tmp.dir, 's'), img]);
  assert.equal(missing.status, 1);
  assert.match(missing.stderr, /cannot register .*x\.img: .*does not exist/);
});

test('serve: writeback through NBD, a second daemon refused, SIGTERM leaves the data dirty in the cache', async () => {
  using tmp = tempDir();
  const { cache, backing } = makeImages(tmp.dir);
  // Backing device first: registration works in any order.
  const s = await startServe(tmp.dir, [
    '--set',
    'bcache0.cache_mode=writeback',
    '--set',
    'bcache0.writeback_running=0',
    '--set',
    'set.journal_delay_ms=10',
    backing,
    cache,
  ]);
  try {
    assert.ok(s.daemon.lines.some((l) => /Caching .*backing\.img as bcache0 on set/.test(l)));
    assert.ok(s.daemon.lines.some((l) => /listening on unix:.*\(exports: bcache0\)/.test(l)));
    const info = JSON.parse(await run('nbdinfo', ['--json', s.uri()])) as {
      exports: Array<{ 'export-size': number; block_size_minimum: number }>;
    };
    const exp = info.exports[0];
    assert.ok(exp, 'nbdinfo lists bcache0');
    assert.equal(exp['export-size'], 64 * MiB - 8192);
    assert.equal(exp.block_size_minimum, 512);
    const second = ubcache(['serve', '--socket', join(tmp.dir, 'other.sock'), cache, backing]);
    assert.equal(second.status, 1);
    assert.match(second.stderr, /in use by another process that locked it/);

    const c = await Client.connect(s.socket);
    const data = randomBytes(MiB);
    await c.write(4 * MiB, data);
    await c.flush();
    assert.deepEqual(await c.read(4 * MiB, MiB), data);
    c.close();
  } finally {
    await s.daemon.stop().finally(() => s.daemon.kill());
  }
  assert.ok(s.daemon.lines.some((l) => l.includes('bcache0 stopped')));
  assert.ok(s.daemon.lines.some((l) => l.includes('unregistered')));
  assert.ok(!existsSync(s.socket), 'the socket is gone');
  const sb = superblock(backing);
  assert.equal(bdevState(sb), 2, 'dirty: the data is in the cache');
  assert.equal(bdevCacheMode(sb), 1, 'writeback, from --set');
  assert.ok(
    readFileRange(backing, 8192 + 4 * MiB, MiB).every((b) => b === 0),
    'not written back (writeback_running=0)',
  );

  // Restart with writeback on: the data is served from the cache, then written back.
  const s2 = await startServe(tmp.dir, ['--set', 'bcache0.writeback_rate=100000', cache, backing]);
  try {
    const c = await Client.connect(s2.socket);
    const got = await c.read(4 * MiB, MiB);
    c.close();
    assert.ok(!got.every((b) => b === 0));
  } finally {
    await s2.daemon.stop().finally(() => s2.daemon.kill());
  }
});

test('serve: a backing device whose cache is not given waits, and says so; with no cache at all it is served uncached', async () => {
  using tmp = tempDir();
  const { backing } = makeImages(tmp.dir);
  // First attach it (so its superblock names the set and says clean), then serve it alone.
  const s = await startServe(tmp.dir, [backing, join(tmp.dir, 'cache.img')]);
  await s.daemon.stop().finally(() => s.daemon.kill());
  const alone = ubcache(['serve', '--exit-when-idle', '--socket', join(tmp.dir, 'a.sock'), backing]);
  assert.equal(alone.status, 1);
  assert.match(
    alone.stderr,
    /its cache set [0-9a-f-]+ is not registered and its superblock says clean: not running bcache0/,
  );
  assert.match(alone.stderr, /no bcache device to serve\n.*give their cache devices too/);

  const fresh = join(tmp.dir, 'fresh');
  const { mkdirSync } = await import('node:fs');
  mkdirSync(fresh);
  const only = makeImages(fresh);
  const d = new Daemon(['serve', '--socket', join(fresh, 's.sock'), only.backing]);
  try {
    await d.waitForLine(/listening on unix:/);
    const c = await Client.connect(join(fresh, 's.sock'));
    await c.write(0, Buffer.alloc(4096, 0x5a));
    await c.flush();
    c.close();
    assert.ok(
      readFileRange(only.backing, 8192, 4096).every((b) => b === 0x5a),
      'uncached: straight to the backing device',
    );
  } finally {
    await d.stop().finally(() => d.kill());
  }
});
