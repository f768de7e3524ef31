// The control socket and `ubcache ctl` against a real `ubcache serve`, with
// real NBD clients doing I/O while devices are registered, attached,
// detached and stopped and the cache set unregistered at runtime: no request
// that should succeed fails, no data is lost, exports come and go with
// their devices, and once nothing is left the daemon (--exit-when-idle)
// exits 0 by itself, leaving no socket behind. Also: the control socket's mode, malformed
// requests, a second daemon on the same control path, a stale socket.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, statSync } from 'node:fs';
import { request } from 'node:http';
import { createConnection } from 'node:net';
import { join } from 'node:path';
import { controlRequest } from '../../src/control/client.ts';
import { Daemon, run, sparseFile, tempDir, ubcache, UBCACHE, readFileRange } from '../helpers/daemon.ts';
import { Client, makeImages, MiB, startServe } from './serve-helpers.ts';

async function ctl(control: string, ...args: string[]): Promise<string> {
  return run(UBCACHE, ['ctl', '--control', control, ...args]);
}

/** Distinct, checkable 4 KiB blocks. */
function block(tag: number, i: number): Buffer {
  return Buffer.alloc(4096, `${tag}:${i};`);
}

/** A client writing and reading back blocks until stopped; every failure is kept. */
function ioLoop(c: Client, tag: number, blocks: number): { stop: () => Promise<number>; failures: string[] } {
  const failures: string[] = [];
  let stopping = false;
  let n = 0;
  const done = (async () => {
    while (!stopping) {
      const i = n % blocks;
      try {
        await c.write(i * 4096, block(tag, n));
        const back = await c.read(i * 4096, 4096);
        if (!back.equals(block(tag, n))) failures.push(`block ${i} read back wrong`);
      } catch (err) {
        failures.push(String(err));
      }
      n++;
    }
  })();
  return {
    failures,
    stop: async () => {
      stopping = true;
      await done;
      return n;
    },
  };
}

test('runtime register, attach, detach, stop and unregister while clients do I/O; the daemon exits when nothing is left', async () => {
  using tmp = tempDir();
  const { cache, backing } = makeImages(tmp.dir);
  const second = sparseFile(join(tmp.dir, 'second.img'), 32 * MiB);
  assert.equal(ubcache(['make', '-B', second]).status, 0);
  const control = join(tmp.dir, 'control.sock');
  const s = await startServe(tmp.dir, ['--exit-when-idle', '--control', control, cache, backing]);
  try {
    assert.equal(statSync(control).mode & 0o777, 0o600, 'the control socket is for its owner only');
    const setUuid = (await ctl(control, 'ls', '/sys/fs/bcache')).split('\n').find((l) => /^[0-9a-f-]{36}$/.test(l));
    assert.ok(setUuid);
    await ctl(control, 'write', 'block/bcache0/bcache/cache_mode', 'writeback');
    assert.equal(
      await ctl(control, 'cat', '/sys/block/bcache0/bcache/cache_mode'),
      'writethrough [writeback] writearound none\n',
    );

    const c0 = await Client.connect(s.socket, 'bcache0');
    const io0 = ioLoop(c0, 1, 64);

    // Register a second backing device while running: a new export appears.
    await ctl(control, 'write', '/sys/fs/bcache/register', second);
    await s.daemon.waitForLine(/export bcache1 added/);
    const c1 = await Client.connect(s.socket, 'bcache1');
    const io1 = ioLoop(c1, 2, 32);
    assert.equal(await ctl(control, 'cat', 'block/bcache1/bcache/state'), 'no cache\n');

    // Attach it to the running set by uuid.
    await ctl(control, 'write', 'block/bcache1/bcache/attach', setUuid);
    assert.equal(await ctl(control, 'cat', 'block/bcache1/bcache/state'), 'clean\n');
    assert.match(await ctl(control, 'status'), /bcache1\s+yes\s+clean\s+writethrough/);

    // Detach bcache0 (dirty data written back first) while its client keeps writing.
    await ctl(control, 'write', 'block/bcache0/bcache/detach', '1');
    await s.daemon.waitForLine(/Caching disabled for .*backing\.img/);
    assert.equal(await ctl(control, 'cat', 'block/bcache0/bcache/state'), 'no cache\n');
    assert.equal(await ctl(control, 'cat', 'block/bcache0/bcache/running'), '1\n');

    // Stop bcache1: its export goes, its client is disconnected cleanly.
    const written1 = await io1.stop();
    assert.ok(written1 > 0);
    await ctl(control, 'write', 'block/bcache1/bcache/stop', '1');
    await c1.raw.closed;
    await s.daemon.waitForLine(/export bcache1 removed/);
    await assert.rejects(Client.connect(s.socket, 'bcache1'));

    // Unregister the set: bcache0 is already detached and keeps serving.
    await ctl(control, 'write', `/sys/fs/bcache/${setUuid}/unregister`, '1');
    await s.daemon.waitForLine(/Cache set .* unregistered/);
    assert.equal(await ctl(control, 'ls', '/sys/fs/bcache'), 'register\nregister_quiet\npendings_cleanup\nshutdown\n');

    const written0 = await io0.stop();
    assert.deepEqual([...io0.failures, ...io1.failures], [], 'no request that should succeed failed');
    const metrics = await ctl(control, 'cat', '/sys/block/bcache0/bcache/stats_total/cache_hits').then(() =>
      controlRequest(control, 'GET', '/metrics'),
    );
    assert.match(metrics.body, /ubcache_nbd_requests_total\{export="bcache0",command="write"\} \d+/);
    assert.match(
      metrics.body,
      /ubcache_nbd_request_duration_seconds_bucket\{export="bcache0",command="read",le="\+Inf"\} \d+/,
    );

    // Stop the last device: the daemon shuts down and exits 0 on its own.
    c0.close();
    await ctl(control, 'write', 'block/bcache0/bcache/stop', '1');
    await s.daemon.waitForLine(/no bcache device and no cache set is left: shutting down \(--exit-when-idle\)/);
    assert.deepEqual(await s.daemon.exited, { code: 0, signal: null });
    assert.equal(existsSync(control), false, 'the control socket is removed');
    assert.equal(existsSync(s.socket), false, 'the NBD socket is removed');

    // Everything written is on the backing devices (data_offset 8 KiB).
    for (let n = Math.max(0, written0 - 64); n < written0; n++) {
      assert.ok(readFileRange(backing, 8192 + (n % 64) * 4096, 4096).equals(block(1, n)), `bcache0 block ${n % 64}`);
    }
    assert.ok(readFileRange(second, 8192 + ((written1 - 1) % 32) * 4096, 4096).equals(block(2, written1 - 1)));
  } finally {
    await s.daemon.kill();
  }
});

function rawHttp(
  socketPath: string,
  method: string,
  path: string,
  body?: Buffer,
): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request({ socketPath, method, path }, (res) => {
      let text = '';
      res.setEncoding('utf8').on('data', (t: string) => (text += t));
      res.on('end', () => {
        resolve({ status: res.statusCode ?? 0, body: text });
      });
    });
    req.on('error', reject);
    req.end(body);
  });
}

/**
 * Send raw HTTP/1.1 requests back to back on one connection (the last one
 * closing it), writing each whole body before reading anything, as a client
 * that does not look for an early answer does; resolve with every response
 * read, or reject on a socket error (EPIPE, ECONNRESET: the server hung up
 * while the client was still sending).
 */
function pipelined(
  socketPath: string,
  requests: { method: string; path: string; body?: Buffer }[],
): Promise<{ status: number; body: string }[]> {
  return new Promise((resolve, reject) => {
    const sock = createConnection(socketPath);
    const chunks: Buffer[] = [];
    sock.on('data', (b: Buffer) => chunks.push(b));
    sock.on('error', reject);
    sock.on('end', () => {
      const all = Buffer.concat(chunks).toString('latin1');
      const out: { status: number; body: string }[] = [];
      let at = 0;
      while (at < all.length) {
        const headEnd = all.indexOf('\r\n\r\n', at);
        if (headEnd < 0) break;
        const head = all.slice(at, headEnd);
        const status = Number(/^HTTP\/1\.1 (\d{3})/.exec(head)?.[1]);
        at = headEnd + 4;
        let body = '';
        if (/\r\ntransfer-encoding: *chunked/i.test(head)) {
          for (;;) {
            const lineEnd = all.indexOf('\r\n', at);
            const size = parseInt(all.slice(at, lineEnd), 16);
            at = lineEnd + 2;
            if (!(size > 0)) break;
            body += all.slice(at, at + size);
            at += size + 2;
          }
          at += 2; // the empty line after the last chunk
        } else {
          const length = Number(/\r\ncontent-length: *(\d+)/i.exec(head)?.[1] ?? '0');
          body = all.slice(at, at + length);
          at += length;
        }
        out.push({ status, body });
      }
      resolve(out);
    });
    requests.forEach((r, i) => {
      const last = i === requests.length - 1;
      sock.write(
        `${r.method} ${r.path} HTTP/1.1\r\nHost: control\r\nContent-Length: ${r.body?.length ?? 0}\r\n` +
          `${last ? 'Connection: close\r\n' : ''}\r\n`,
      );
      if (r.body) sock.write(r.body);
    });
  });
}

test('malformed control requests get clear errors and change nothing; ctl exits nonzero with the message; one daemon per control path', async () => {
  using tmp = tempDir();
  const { cache, backing } = makeImages(tmp.dir);
  const control = join(tmp.dir, 'control.sock');
  // A stale socket file left by a killed daemon is replaced.
  const py = spawnSync('python3', [
    '-c',
    `import socket; socket.socket(socket.AF_UNIX).bind(${JSON.stringify(control)})`,
  ]);
  assert.equal(py.status, 0);
  const s = await startServe(tmp.dir, ['--control', control, cache, backing]);
  try {
    await s.daemon.waitForLine(/removing stale control socket/);
    const state = '/sys/block/bcache0/bcache/state';
    assert.equal((await rawHttp(control, 'DELETE', state)).status, 405);
    // A body too large is answered 413 at once and the rest of it read and
    // dropped, the connection kept: a client that sends it all before reading
    // gets the answer (no EPIPE or reset for hanging up on it mid-body), and
    // the next request on the same connection is served.
    const big = await rawHttp(control, 'PUT', '/sys/block/bcache0/bcache/label', Buffer.alloc(1 << 20, 0x41));
    assert.equal(big.status, 413);
    assert.match(big.body, /at most 4096 bytes/);
    const [tooBig, after] = await pipelined(control, [
      { method: 'PUT', path: '/sys/block/bcache0/bcache/label', body: Buffer.alloc(1 << 20, 0x41) },
      { method: 'GET', path: state },
    ]);
    assert.equal(tooBig?.status, 413);
    assert.match(tooBig.body, /at most 4096 bytes \(got 1048576\)/);
    assert.deepEqual(after, { status: 200, body: 'clean\n' }, 'the connection stays in sync');
    const bad = await rawHttp(control, 'GET', '/sys/block/%zz');
    assert.equal(bad.status, 400);
    assert.match((await rawHttp(control, 'GET', '/etc/passwd')).body, /no such endpoint \/etc\/passwd; use \/sys/);
    // ".." is resolved as URLs resolve it, so it cannot climb out of /sys.
    assert.equal((await rawHttp(control, 'GET', '/sys/block/bcache0/bcache/../../../../x')).status, 404);
    const wrongMode = await rawHttp(control, 'PUT', '/sys/block/bcache0/bcache/cache_mode', Buffer.from('fast'));
    assert.equal(wrongMode.status, 400);
    assert.deepEqual(JSON.parse(wrongMode.body), {
      error: 'EINVAL',
      message: 'cache_mode: "fast" is not one of: writethrough, writeback, writearound, none',
    });
    assert.equal((await rawHttp(control, 'GET', state)).body, 'clean\n', 'the daemon is unaffected');
    assert.equal(await ctl(control, 'cat', 'block/bcache0/bcache/label'), '\n', 'nothing was changed');

    const r = spawnSync(
      UBCACHE,
      ['ctl', '--control', control, 'write', 'block/bcache0/bcache/sequential_cutoff', '4M'],
      {
        encoding: 'utf8',
      },
    );
    assert.equal(r.status, 1);
    assert.match(r.stderr, /sequential_cutoff: "4M" is not a whole number .*\(EINVAL\)/);
    const nope = spawnSync(UBCACHE, ['ctl', '--control', join(tmp.dir, 'none.sock'), 'status'], { encoding: 'utf8' });
    assert.equal(nope.status, 1);
    assert.match(nope.stderr, /cannot reach the control socket .*none\.sock.*\n.*Is ubcache serve running/);

    const twin = new Daemon(['serve', '--socket', join(tmp.dir, 'twin.sock'), '--control', control, cache]);
    assert.equal((await twin.exited).code, 1);
    assert.match(twin.stderr, /cannot use control socket .*control\.sock: another ubcache serve is using it/);
    assert.match(await ctl(control, 'tree', 'block/bcache0/bcache/stats_total'), /stats_total\/cache_hit_ratio: 0\n/);
  } finally {
    await s.daemon.stop().finally(() => s.daemon.kill());
  }
  assert.equal(existsSync(control), false);
});
