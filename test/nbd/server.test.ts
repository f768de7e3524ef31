// Listeners, many connections, and the orderly shutdown: requests in flight
// finish, new ones get ESHUTDOWN (options ERR_SHUTDOWN), connections close,
// the devices close, and nothing is left running.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { MemoryBlockDevice } from '../../src/blockdev/memory.ts';
import { encodeInfoRequest, encodeRequestHeader } from '../../src/nbd/codec.ts';
import { ClientFlag, Cmd, NbdErr, Opt, Rep } from '../../src/nbd/protocol.ts';
import { formatAddress, NbdServer } from '../../src/nbd/server.ts';
import { captureLog } from '../../src/util/log.ts';
import { ControlledDevice } from '../helpers/controlled-device.ts';
import { watchLog } from '../helpers/log-watch.ts';
import { startServer } from '../helpers/nbd-fixture.ts';
import { RawNbdClient } from '../helpers/nbd-raw-client.ts';

const MiB = 1024 * 1024;

function tempDir(): { dir: string; [Symbol.dispose](): void } {
  const dir = mkdtempSync(join(tmpdir(), 'ubcache-srv-'));
  return {
    dir,
    [Symbol.dispose]() {
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/**
 * Handles that keep a process alive: servers, sockets, timers. A handle that
 * is being closed disappears within a turn of the event loop, so let it pass first.
 */
async function liveHandles(): Promise<string[]> {
  // libuv runs close callbacks after the check phase: two turns let every pending close finish.
  for (let i = 0; i < 2; i++) await new Promise((resolve) => setImmediate(resolve));
  return process
    .getActiveResourcesInfo()
    .filter((r) => ['TCPServerWrap', 'TCPSocketWrap', 'PipeServerWrap', 'PipeWrap', 'Timeout'].includes(r))
    .sort();
}

test('the server refuses an empty export list and duplicate names', () => {
  assert.throws(() => new NbdServer([]), /at least one export/);
  const device = new MemoryBlockDevice(4096);
  assert.throws(
    () =>
      new NbdServer([
        { name: 'a', device },
        { name: 'a', device },
      ]),
    /two exports are named 'a'/,
  );
});

test('TCP: listens on 127.0.0.1 with port 0 picking a free port, and serves', async () => {
  const server = new NbdServer([{ name: 'disk', device: new MemoryBlockDevice(MiB) }]);
  try {
    const addr = await server.listen({ host: '127.0.0.1', port: 0 });
    assert.ok('port' in addr && addr.port > 0);
    assert.equal(addr.host, '127.0.0.1');
    assert.match(formatAddress(addr), /^127\.0\.0\.1:\d+$/);
    assert.equal(formatAddress({ host: '::1', port: 10809 }), '[::1]:10809');
    assert.equal(formatAddress({ path: '/run/x.sock' }), 'unix:/run/x.sock');
    const { client } = await RawNbdClient.open(addr, { structured: true });
    assert.equal((await client.writeAt(0, Buffer.from('tcp'))).error, 0);
    assert.equal((await client.readAt(0, 3)).data?.toString(), 'tcp');
    client.destroy();
    await client.closed;
  } finally {
    await server.close();
  }
});

test('listen errors say what is wrong and what to do', async () => {
  using tmp = tempDir();
  const server = new NbdServer([{ name: 'disk', device: new MemoryBlockDevice(MiB) }]);
  const blocker: Server = createServer((s) => s.destroy());
  try {
    await new Promise<void>((resolve) => blocker.listen(0, '127.0.0.1', resolve));
    const port = (blocker.address() as { port: number }).port;
    await assert.rejects(server.listen({ host: '127.0.0.1', port }), /address is in use; stop the other server/);
    await assert.rejects(server.listen({ path: join(tmp.dir, 'no', 'such', 'dir', 's') }), /does not exist/);
    await assert.rejects(server.listen({ host: '192.0.2.1', port: 0 }), /no such local address/);
    // A regular file at the socket path is never removed.
    const file = join(tmp.dir, 'precious');
    writeFileSync(file, 'data');
    await assert.rejects(server.listen({ path: file }), /path is in use/);
    assert.equal(readFileSync(file, 'utf8'), 'data');
    // A live server's socket is not stolen.
    const live = join(tmp.dir, 'live.sock');
    await new Promise<void>((resolve) =>
      blocker.close(() => {
        resolve();
      }),
    );
    await new Promise<void>((resolve) => blocker.listen(live, resolve));
    await assert.rejects(server.listen({ path: live }), /path is in use/);
  } finally {
    await new Promise<void>((resolve) =>
      blocker.close(() => {
        resolve();
      }),
    );
    await server.close();
  }
});

test('a stale unix socket left by a dead server is replaced', async () => {
  using tmp = tempDir();
  const path = join(tmp.dir, 'stale.sock');
  // A process that binds the socket and exits without closing it leaves the file behind.
  const r = spawnSync(process.execPath, [
    '-e',
    `require('net').createServer().listen(${JSON.stringify(path)}, () => process.exit(0))`,
  ]);
  assert.equal(r.status, 0);
  assert.ok(existsSync(path));
  const cap = captureLog();
  const server = new NbdServer([{ name: 'disk', device: new MemoryBlockDevice(MiB) }]);
  try {
    await server.listen({ path });
    assert.ok(cap.lines.some((l) => l.includes(`removing stale socket ${path}`)));
    const { client } = await RawNbdClient.open({ path });
    assert.equal((await client.readAt(0, 1)).error, 0);
    client.destroy();
    await client.closed;
  } finally {
    cap.restore();
    await server.close();
  }
  assert.equal(existsSync(path), false, 'the socket file is removed on close');
});

test('32 connections at once, each writing and reading its own region', async () => {
  const dev = new MemoryBlockDevice(64 * MiB);
  const f = await startServer([{ name: 'disk', device: dev }]);
  try {
    const clients = await Promise.all(Array.from({ length: 32 }, (_, i) => f.open({ structured: i % 2 === 0 })));
    assert.equal(f.server.connectionCount, 32);
    const data = clients.map(() => randomBytes(256 * 1024));
    await Promise.all(
      clients.map(async ({ client }, i) => {
        const base = i * 2 * MiB;
        const d = data[i] ?? Buffer.alloc(0);
        const writes = [0, 1, 2, 3].map((k) =>
          client.writeAt(base + k * 65536, d.subarray(k * 65536, (k + 1) * 65536)),
        );
        for (const w of await Promise.all(writes)) assert.equal(w.error, 0);
        const r = await client.readAt(base, d.length);
        assert.ok(r.data?.equals(d));
      }),
    );
  } finally {
    await f.cleanup();
  }
});

test('shutdown: the request in flight finishes, a new one gets ESHUTDOWN, then the connection and device close', async () => {
  const dev = new ControlledDevice(new MemoryBlockDevice(MiB));
  const f = await startServer([{ name: 'disk', device: dev }]);
  try {
    const { client } = await f.open({ structured: true });
    const { client: idle } = await f.open();
    dev.hold();
    const inflight = client.writeAt(0, Buffer.from('in flight'));
    await dev.started(1);
    const closing = f.server.close();
    const late = await client.readAt(0, 9);
    assert.equal(late.error, NbdErr.ESHUTDOWN);
    assert.match(late.message, /shutting down/);
    await idle.expectClose(); // nothing in flight there: closed at once
    assert.equal(dev.closed, false, 'devices stay open while a request is in flight');
    dev.release();
    assert.equal((await inflight).error, 0);
    await client.expectClose();
    await closing;
    assert.equal(dev.closed, true);
    assert.equal(existsSync(f.socketPath), false);
    await assert.rejects(RawNbdClient.connect(f.target), /ENOENT|ECONNREFUSED/);
    await assert.rejects(f.server.listen({ host: '127.0.0.1', port: 0 }), /shutting down/);
    assert.equal(f.server.close(), closing, 'close() is idempotent');
  } finally {
    await f.cleanup();
  }
});

test('shutdown during the handshake: an arriving option gets ERR_SHUTDOWN, an idle client is let go', async () => {
  const watch = watchLog();
  const f = await startServer([{ name: 'disk', device: new MemoryBlockDevice(MiB) }]);
  try {
    const idle = await f.connect();
    await idle.readGreeting();
    idle.sendClientFlags(ClientFlag.C_FIXED_NEWSTYLE);

    const busy = await f.connect();
    await busy.readGreeting();
    busy.sendClientFlags(ClientFlag.C_FIXED_NEWSTYLE);
    const data = encodeInfoRequest({ name: 'disk', requests: [] });
    busy.sendOption(Opt.GO, data.subarray(0, 3), data.length); // header and part of the data
    await watch.waitFor(/NBD_OPT_GO with 10 bytes of data/);

    const closing = f.server.close();
    await idle.expectClose();
    busy.send(data.subarray(3));
    const r = await busy.readOptionReply();
    assert.equal(r.type, Rep.ERR_SHUTDOWN);
    assert.match(r.data.toString(), /shutting down/);
    await busy.expectClose();
    await closing;
  } finally {
    watch.restore();
    await f.cleanup();
  }
});

test('shutdown drops clients that stall mid-option or mid-request once the shutdown timeout passes', async () => {
  const watch = watchLog();
  const f = await startServer([{ name: 'disk', device: new MemoryBlockDevice(MiB) }], { shutdownTimeoutMs: 50 });
  try {
    const stalled = await f.connect();
    await stalled.readGreeting();
    stalled.sendClientFlags(ClientFlag.C_FIXED_NEWSTYLE);
    stalled.sendOption(Opt.GO, Buffer.alloc(2), 30); // 28 bytes of data never come
    await watch.waitFor(/NBD_OPT_GO with 30 bytes of data/);
    const { client: halfWrite } = await f.open();
    halfWrite.send(encodeRequestHeader({ type: Cmd.WRITE, cookie: 1n, offset: 0, length: 4096 }), Buffer.alloc(100));
    await f.server.close();
    await stalled.expectClose();
    await halfWrite.expectClose();
    assert.ok(watch.lines.some((l) => /did not finish within the shutdown timeout; dropping them/.test(l)));
  } finally {
    watch.restore();
    await f.cleanup();
  }
});

test('shutdown does not wait for a request stuck in its device: past the timeout the client is dropped and close() returns; the late end is harmless', async () => {
  const watch = watchLog();
  const dev = new ControlledDevice(new MemoryBlockDevice(MiB));
  const before = await liveHandles();
  const f = await startServer([{ name: 'disk', device: dev }], { shutdownTimeoutMs: 100 });
  try {
    const { client } = await f.open({ structured: true });
    dev.hold();
    const stuck = client.readAt(0, 4096).then(
      () => 'answered',
      () => 'connection closed',
    );
    await dev.started(1);
    const t0 = performance.now();
    let timer: NodeJS.Timeout | undefined;
    const closed = await Promise.race([
      f.server.close().then(() => true),
      new Promise<false>((resolve) => {
        timer = setTimeout(() => {
          resolve(false);
        }, 5000);
      }),
    ]);
    clearTimeout(timer);
    assert.ok(closed, 'close() returns although the request never ends');
    assert.ok(performance.now() - t0 < 2000);
    assert.equal(await stuck, 'connection closed', 'the reply has nowhere to go');
    assert.ok(
      watch.lines.some((l) =>
        /1 client\(s\) did not finish within the shutdown timeout; dropping them \(1 request\(s\) still in flight/.test(
          l,
        ),
      ),
      watch.lines.join('\n'),
    );
    assert.equal(dev.closed, true, 'the device was closed all the same');
    assert.equal(dev.inflight, 1, 'the request is still in the device');
    // Much later the device answers: the request ends with nobody to reply to, and nothing is left.
    dev.release();
    // (A call: the assertion above narrowed the field to 1.)
    const inflight = (): number => dev.inflight;
    for (let i = 0; i < 100 && inflight() > 0; i++) await new Promise((resolve) => setImmediate(resolve));
    assert.equal(inflight(), 0);
    assert.deepEqual(await liveHandles(), before);
  } finally {
    dev.release();
    watch.restore();
    await f.cleanup();
  }
});

test('with ownsDevices false the server leaves the devices open', async () => {
  const dev = new ControlledDevice(new MemoryBlockDevice(MiB));
  const f = await startServer([{ name: 'disk', device: dev }], { ownsDevices: false });
  await f.cleanup();
  assert.equal(dev.closed, false);
});

test('after close nothing is left: no listener, socket or timer, and the server can be collected', async () => {
  const before = await liveHandles();
  let ref: WeakRef<NbdServer> | undefined;
  await (async () => {
    const f = await startServer([{ name: 'disk', device: new MemoryBlockDevice(MiB) }]);
    ref = new WeakRef(f.server);
    const { client } = await f.open({ structured: true });
    assert.equal((await client.writeAt(0, Buffer.alloc(4096, 1))).error, 0);
    client.disconnect();
    await client.closed;
    // Left connected: close() must end it.
    const { client: c2 } = await f.open();
    await f.server.close();
    await c2.closed;
    await f.cleanup();
  })();
  assert.deepEqual(await liveHandles(), before);
  for (let i = 0; i < 10 && ref?.deref() !== undefined; i++) {
    await new Promise((resolve) => setImmediate(resolve));
    globalThis.gc?.();
  }
  assert.equal(ref?.deref(), undefined, 'the server was garbage-collected');
});

test('a client that does not reach transmission within the handshake limit is disconnected', async () => {
  const cap = captureLog();
  const f = await startServer([{ name: 'disk', device: new MemoryBlockDevice(MiB) }], { handshakeTimeoutMs: 50 });
  try {
    const slow = await f.connect();
    await slow.readGreeting();
    slow.sendClientFlags(ClientFlag.C_FIXED_NEWSTYLE);
    await slow.expectClose();
    assert.ok(cap.lines.some((l) => /no export chosen within 50 ms; closing the connection/.test(l)));
    // A client that completes the handshake in time stays connected past the limit.
    const { client } = await f.open();
    const trickle = await f.connect();
    await trickle.readGreeting();
    await slow.closed;
    await trickle.expectClose();
    assert.equal((await client.readAt(0, 1)).error, 0);
  } finally {
    cap.restore();
    await f.cleanup();
  }
});
