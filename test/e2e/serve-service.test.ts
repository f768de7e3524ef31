// `ubcache serve` as a service (DESIGN rule 5), through the built CLI: it
// outlives a cache device pulled with dirty data (control socket and
// /metrics still answer and show the failure), starts empty and takes a
// runtime registration, stops when told to on the control socket, and has
// nbdkit's service conventions: --run with its variables and exit status,
// -r, -P/--pidfile, --exit-with-parent.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
// Each test's timeout bounds a hang, not speed: they take seconds.
import { existsSync, readFileSync } from 'node:fs';
import { request } from 'node:http';
import { join } from 'node:path';
import { controlRequest } from '../../src/control/client.ts';
import { NbdErr } from '../../src/nbd/protocol.ts';
import { SB_OFFSET, SB_SIZE } from '../../src/format/constants.ts';
import { bdevState, decodeSuperblock } from '../../src/format/superblock.ts';
import { BDEV_STATE_DIRTY } from '../../src/format/constants.ts';
import { Daemon, have, readFileRange, run, tempDir, UBCACHE, waitForFile } from '../helpers/daemon.ts';
import { Client, makeImages, startServe } from './serve-helpers.ts';

async function ctl(control: string, ...args: string[]): Promise<string> {
  return run(UBCACHE, ['ctl', '--control', control, ...args]);
}

function httpGet(url: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    request(url, (res) => {
      let body = '';
      res.setEncoding('utf8').on('data', (t: string) => (body += t));
      res.on('end', () => {
        resolve({ status: res.statusCode ?? 0, body });
      });
    })
      .on('error', reject)
      .end();
  });
}

test(
  'a cache device pulled with dirty data: the daemon serves on, its control socket and /metrics show the failure, and it stops when told to',
  { timeout: 120_000 },
  async () => {
    using tmp = tempDir();
    const { cache, backing } = makeImages(tmp.dir, { args: ['--writeback'] });
    const control = join(tmp.dir, 'control.sock');
    // The cache device takes 200 writes (registration, the dirty data, its
    // flush), then it is pulled: every I/O after fails, as if unplugged.
    const s = await startServe(tmp.dir, [
      '--control',
      control,
      '--metrics',
      '127.0.0.1:0',
      '--set',
      'bcache0.writeback_running=0',
      '--set',
      'bcache0.sequential_cutoff=0',
      '--fault',
      `${cache}:pull-after=200:write`,
      cache,
      backing,
    ]);
    try {
      const metricsLine = await s.daemon.waitForLine(/metrics on http:\/\/127\.0\.0\.1:\d+\/metrics/);
      const metricsUrl = /metrics on (http:\/\/\S+\/metrics)/.exec(metricsLine)?.[1] ?? '';
      const c = await Client.connect(s.socket);
      for (let i = 0; i < 16; i++) await c.write(i * 4096, Buffer.alloc(4096, i + 1));
      await c.flush();
      assert.equal(await ctl(control, 'cat', 'block/bcache0/bcache/state'), 'dirty\n');
      // Keep writing until the pulled cache fails the set and the dirty device stops.
      let failed = false;
      for (let n = 0; !failed && n < 100_000; n++) {
        try {
          await c.write((n % 64) * 4096, Buffer.alloc(4096, 0xee));
        } catch {
          failed = true;
        }
      }
      assert.ok(failed, 'writes failed once the cache was pulled');
      await s.daemon.waitForLine(/bcache0 is "auto" and cache is dirty, stop it/);
      await s.daemon.waitForLine(/Cache set .* unregistered/);
      await s.daemon.waitForLine(/export bcache0 removed/);
      await c.raw.closed;

      // Nothing is left to serve, and the daemon is still there.
      assert.equal(await ctl(control, 'ls', '/sys/block'), '');
      assert.equal(
        await ctl(control, 'ls', '/sys/fs/bcache'),
        'register\nregister_quiet\npendings_cleanup\nshutdown\n',
      );
      const viaSocket = await controlRequest(control, 'GET', '/metrics');
      assert.match(viaSocket.body, /^ubcache_cache_sets_failed_total 1$/m);
      const viaTcp = await httpGet(metricsUrl);
      assert.equal(viaTcp.status, 200);
      assert.match(viaTcp.body, /^ubcache_cache_sets_failed_total 1$/m);
      assert.match(s.daemon.stderr, /bch_cache_set_error\(\) error on [0-9a-f-]{36}: .*device pulled/);
      assert.equal(s.daemon.proc.exitCode, null, 'the daemon is still running');

      // Told to stop on the control socket: an orderly shutdown, exit 0, the sockets gone.
      await assert.rejects(ctl(control, 'write', '/sys/fs/bcache/shutdown', '0'), /write 1 to stop the daemon/);
      await ctl(control, 'write', '/sys/fs/bcache/shutdown', '1');
      assert.deepEqual(await s.daemon.exited, { code: 0, signal: null }, s.daemon.stderr);
      assert.match(s.daemon.stderr, /shutdown requested on the control socket/);
      assert.equal(existsSync(control), false);
      assert.equal(existsSync(s.socket), false);
    } catch (err) {
      console.error(s.daemon.stderr);
      throw err;
    } finally {
      await s.daemon.kill();
    }
    // The dirty data is still the cache's: the backing device says so, and does not hold it.
    const sb = decodeSuperblock(readFileRange(backing, SB_OFFSET, SB_SIZE));
    assert.equal(bdevState(sb), BDEV_STATE_DIRTY);
    assert.ok(!readFileRange(backing, 8192, 4096).equals(Buffer.alloc(4096, 1)));
  },
);

test(
  'an empty daemon waits, takes a runtime registration and serves it; SIGTERM stops it with status 0',
  { timeout: 120_000 },
  async () => {
    using tmp = tempDir();
    const { cache, backing } = makeImages(tmp.dir);
    const control = join(tmp.dir, 'control.sock');
    const s = await startServe(tmp.dir, ['--control', control]);
    try {
      assert.match(await s.daemon.waitForLine(/listening on unix:/), /\(exports: none yet\)/);
      assert.equal(await ctl(control, 'ls', '/sys/block'), '');
      await ctl(control, 'write', '/sys/fs/bcache/register', cache);
      await ctl(control, 'write', '/sys/fs/bcache/register', backing);
      await s.daemon.waitForLine(/export bcache0 added/);
      const c = await Client.connect(s.socket);
      await c.write(0, Buffer.alloc(4096, 0x42));
      await c.flush();
      assert.ok((await c.read(0, 4096)).equals(Buffer.alloc(4096, 0x42)));
      c.close();
      // Its device stopped, the daemon waits for the next one.
      await ctl(control, 'write', 'block/bcache0/bcache/stop', '1');
      await s.daemon.waitForLine(/export bcache0 removed/);
      assert.equal(await ctl(control, 'ls', '/sys/block'), '');
      assert.equal(s.daemon.proc.exitCode, null);
    } catch (err) {
      console.error(s.daemon.stderr);
      throw err;
    } finally {
      await s.daemon.stop().finally(() => s.daemon.kill());
    }
    assert.ok(readFileRange(backing, 8192, 4096).equals(Buffer.alloc(4096, 0x42)), 'writethrough: on the disk');
  },
);

test(
  '--run: CMD sees $uri, $nbd, $uri_bcache0, $unixsocket, $port and $exportname, serve stops when it exits and exits with its status',
  { timeout: 120_000 },
  async () => {
    using tmp = tempDir();
    const { cache, backing } = makeImages(tmp.dir);
    const vars = join(tmp.dir, 'vars');
    const cmd =
      `printf '%s\\n' "$uri" "$nbd" "$uri_bcache0" "$unixsocket" "[$port]" "$exportname" > '${vars}'` +
      (have('nbdinfo') ? ` && nbdinfo --size "$uri" >> '${vars}'` : '') +
      '; exit 7';
    const d = new Daemon(['serve', '-U', '-', '--control', join(tmp.dir, 'c.sock'), '--run', cmd, cache, backing]);
    try {
      assert.deepEqual(await d.exited, { code: 7, signal: null }, d.stderr);
    } finally {
      await d.kill();
    }
    assert.match(d.stderr, /the --run command exited with status 7: shutting down/);
    assert.match(d.stderr, /ubcache: stopped/);
    const lines = readFileSync(vars, 'utf8').split('\n');
    const socket = lines[3] ?? '';
    assert.match(socket, /\/ubcache-[^/]+\/socket$/, '-U - makes a private socket');
    const uri = `nbd+unix:///bcache0?socket=${socket}`;
    assert.deepEqual(lines.slice(0, 6), [uri, uri, uri, socket, '[]', 'bcache0']);
    if (have('nbdinfo')) assert.equal(lines[6], String(64 * 1024 * 1024 - 8192));
    assert.equal(existsSync(socket), false, 'the private socket and its directory are removed');

    // serve stopped first (here by the command itself, on the control socket): the command gets SIGTERM.
    const got = join(tmp.dir, 'got-term');
    const ctlSock = join(tmp.dir, 'st.sock');
    const waiting =
      `trap 'kill $!; echo TERM > "${got}"; exit 0' TERM; ` +
      `"${UBCACHE}" ctl --control "${ctlSock}" write /sys/fs/bcache/shutdown 1; sleep 600 & wait $!`;
    const st = new Daemon(['serve', '-U', '-', '--control', ctlSock, '--run', waiting]);
    assert.deepEqual(await st.exited, { code: 0, signal: null }, st.stderr);
    assert.match(st.stderr, /sending SIGTERM to the --run command/);
    await waitForFile(got);

    // A command killed by a signal: 128 + its number, as the shell reports it.
    const k = new Daemon(['serve', '-U', '-', '--control', join(tmp.dir, 'k.sock'), '--run', 'kill -TERM $$']);
    assert.deepEqual(await k.exited, { code: 143, signal: null }, k.stderr);
  },
);

test(
  '-r serves read-only; -P writes the pid once ready and leaves the file; -V prints the version',
  { timeout: 120_000 },
  async () => {
    using tmp = tempDir();
    const { cache, backing } = makeImages(tmp.dir);
    const pidfile = join(tmp.dir, 'serve.pid');
    const s = await startServe(tmp.dir, ['-r', '-P', pidfile, '--control', join(tmp.dir, 'c.sock'), cache, backing]);
    try {
      await waitForFile(pidfile);
      assert.equal(readFileSync(pidfile, 'utf8'), `${s.daemon.proc.pid}\n`);
      const c = await Client.connect(s.socket);
      const w = await c.raw.writeAt(0, Buffer.alloc(4096, 1));
      assert.equal(w.error, NbdErr.EPERM);
      assert.equal((await c.read(0, 4096)).length, 4096);
      c.close();
    } finally {
      await s.daemon.stop().finally(() => s.daemon.kill());
    }
    assert.ok(existsSync(pidfile), 'left at exit, as nbdkit does');
    assert.match(await run(UBCACHE, ['serve', '-V']), /^ubcache \d+\.\d+\.\d+/);
  },
);

test('--exit-with-parent: the parent killed, serve shuts down in order', { timeout: 120_000 }, async () => {
  using tmp = tempDir();
  const { cache, backing } = makeImages(tmp.dir);
  const socket = join(tmp.dir, 'n.sock');
  const q = (t: string): string => `'${t.replace(/'/g, "'\\''")}'`;
  // sh starts serve in the background and waits: sh is serve's parent.
  const line = [UBCACHE, 'serve', '--exit-with-parent', '--socket', socket, '--control', `${socket}.c`, cache, backing]
    .map(q)
    .join(' ');
  const parent = spawn('sh', ['-c', `${line} & wait`], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  const listening = new Promise<void>((resolve) => {
    parent.stderr.setEncoding('utf8').on('data', (t: string) => {
      stderr += t;
      if (/listening on unix:/.test(stderr)) resolve();
    });
  });
  // The pipe closes once every writer is gone: sh and, after it, serve.
  const allClosed = new Promise<void>((resolve) => parent.stderr.on('close', resolve));
  await listening;
  parent.kill('SIGKILL');
  await allClosed;
  // The kernel's parent-death SIGTERM (the native addon), or without it serve's own check of its parent.
  assert.match(stderr, /SIGTERM: shutting down|the parent process exited \(--exit-with-parent\): shutting down/);
  assert.match(stderr, /ubcache: stopped/);
  assert.equal(existsSync(socket), false, 'an orderly stop removed the socket');
});
