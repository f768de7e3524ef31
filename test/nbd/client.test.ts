// The NBD client against real servers (nbdkit, qemu-nbd, Debian's
// nbd-server, ubcache's own server), each started here on a unix socket,
// and against a scripted hostile server for what no real server does.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { IoError } from '../../src/blockdev/types.ts';
import { MemoryBlockDevice } from '../../src/blockdev/memory.ts';
import { NbdClient, type NbdClientOptions } from '../../src/nbd/client.ts';
import { encodeErrorChunk, encodeGreeting } from '../../src/nbd/codec.ts';
import { Cmd, NBD_MAGIC, NbdErr, OLDSTYLE_MAGIC, ReplyType, TxFlag } from '../../src/nbd/protocol.ts';
import { readFileRange, sparseFile, tempDir } from '../helpers/daemon.ts';
import {
  chunk,
  dataChunk,
  holeChunk,
  simple,
  startFakeServer,
  type FakeConnection,
  type FakeServer,
} from '../helpers/fake-nbd-server.ts';
import { startServer } from '../helpers/nbd-fixture.ts';
import { connectWhenListening, startNbdkit, startNbdServer, startQemuNbd, tools } from '../helpers/nbd-servers.ts';

const KiB = 1024;
const MiB = 1024 * 1024;

const unhandled: unknown[] = [];
process.on('unhandledRejection', (reason) => {
  unhandled.push(reason);
});

/** Assert `p` rejects with an IoError of `code` whose message matches `pattern`. */
async function rejectsWith(p: Promise<unknown>, code: string, pattern: RegExp): Promise<IoError> {
  let caught: unknown;
  await p.then(
    () => assert.fail(`expected ${code} ${pattern}`),
    (err: unknown) => {
      caught = err;
    },
  );
  assert.ok(caught instanceof IoError, `expected an IoError, got ${String(caught)}`);
  assert.equal(caught.code, code, caught.message);
  assert.match(caught.message, pattern);
  return caught;
}

/** Write, read back, and read an unaligned piece, through `c`. */
async function roundTrip(c: NbdClient, at: number, length: number): Promise<Buffer> {
  const data = randomBytes(length);
  await c.write(data, at);
  const back = Buffer.alloc(length);
  await c.read(back, at);
  assert.ok(back.equals(data), 'read back what was written');
  const piece = Buffer.alloc(1000);
  await c.read(piece, at + 123);
  assert.ok(piece.equals(data.subarray(123, 1123)), 'an unaligned piece');
  return data;
}

test(
  'nbdkit memory: structured replies, base:allocation, GO, multi-conn; data, zeroes, trim and block status',
  {
    skip: !tools.nbdkit && 'nbdkit is not installed',
  },
  async () => {
    using tmp = tempDir();
    const srv = await startNbdkit(tmp.dir, ['memory', '64M']);
    const c = await NbdClient.connect(srv.uri());
    try {
      assert.equal(c.size, 64 * MiB);
      assert.equal(c.info.via, 'go');
      assert.equal(c.info.structuredReplies, true);
      assert.notEqual(c.info.baseAllocationId, undefined);
      assert.ok(c.flags & TxFlag.CAN_MULTI_CONN);
      assert.equal(c.connections, 4, 'four connections when the server offers multi-conn');
      await roundTrip(c, 3 * MiB, 3 * MiB + 512);
      const before = await c.blockStatus(0, 8 * MiB);
      assert.equal(
        before.reduce((n, e) => n + e.length, 0),
        8 * MiB,
        'the extents cover the range exactly',
      );
      assert.deepEqual(before[0], { length: 3 * MiB, hole: true, zero: true }, 'never written: a hole');
      const written = before[1];
      assert.ok(written, 'an extent after the hole');
      assert.equal(written.hole, false, 'written: data');
      // The memory plugin allocates in pages, so the data extent ends at or after the written end.
      assert.ok(written.length >= 3 * MiB + 512);
      await c.writeZeroes(3 * MiB, MiB);
      await c.trim(4 * MiB, MiB);
      const status = await c.blockStatus(3 * MiB, 3 * MiB);
      assert.equal(
        status.reduce((n, e) => n + e.length, 0),
        3 * MiB,
        'the extents cover the range exactly',
      );
      assert.deepEqual(status[0], { length: 2 * MiB, hole: true, zero: true });
      const zeroes = Buffer.alloc(2 * MiB, 1);
      await c.read(zeroes, 3 * MiB);
      assert.ok(zeroes.every((b) => b === 0));
      await c.flush();
      await rejectsWith(c.read(Buffer.alloc(4096), 64 * MiB - 2048), 'EINVAL', /extends past the end/);
      await rejectsWith(c.write(Buffer.alloc(4096), 64 * MiB - 2048), 'ENOSPC', /extends past the end/);
    } finally {
      await c.close();
      await srv.stop();
    }
    await rejectsWith(c.read(Buffer.alloc(512), 0), 'ESHUTDOWN', /closed/);
  },
);

test(
  'nbdkit file: what the client writes is in the file; several connections are used and a FLUSH reaches every one',
  {
    skip: !tools.nbdkit && 'nbdkit is not installed',
  },
  async () => {
    using tmp = tempDir();
    const file = sparseFile(join(tmp.dir, 'disk.img'), 32 * MiB);
    const srv = await startNbdkit(tmp.dir, ['-v', 'file', file], { log: true });
    const c = await NbdClient.connect(srv.uri(), { connections: 3 });
    const data = randomBytes(4 * MiB);
    try {
      assert.equal(c.connections, 3);
      // Many requests at once spread over the connections.
      await Promise.all(
        Array.from({ length: 32 }, (_, i) =>
          c.write(data.subarray(i * 128 * KiB, (i + 1) * 128 * KiB), MiB + i * 128 * KiB),
        ),
      );
      await c.flush();
      const direct = readFileRange(file, MiB, 4 * MiB);
      assert.ok(direct.equals(data), 'the file holds what was written');
      const back = Buffer.alloc(4 * MiB);
      await c.read(back, MiB);
      assert.ok(back.equals(data));
    } finally {
      await c.close();
      await srv.stop();
    }
    // The server's own view: which connection got which command.
    const log = srv.log();
    const conns = (verb: string): Set<string> =>
      new Set([...log.matchAll(new RegExp(`connection=(\\d+) ${verb} `, 'g'))].map((m) => m[1] ?? ''));
    assert.equal(conns('Write').size, 3, 'writes went over all three connections');
    assert.equal(conns('Flush').size, 3, 'the FLUSH reached all three connections');
    assert.equal(
      srv.stderr().match(/client sent NBD_CMD_DISC, closing connection/g)?.length,
      3,
      'each connection ended with NBD_CMD_DISC',
    );
  },
);

test(
  'nbdkit file, multi-conn: a light load of 1 MiB reads stays on one connection; past spillAt (8) the next takes the rest',
  {
    skip: !tools.nbdkit && 'nbdkit is not installed',
  },
  async () => {
    using tmp = tempDir();
    const file = sparseFile(join(tmp.dir, 'disk.img'), 128 * MiB);
    const srv = await startNbdkit(tmp.dir, ['file', file], { log: true });
    const c = await NbdClient.connect(srv.uri());
    try {
      assert.equal(c.connections, 4, 'four connections: the server offers multi-conn');
      // Issued in one turn, so all are in flight together: no reply can come before the last is placed.
      const batch = async (at: number, n: number): Promise<void> => {
        await Promise.all(Array.from({ length: n }, (_, i) => c.read(Buffer.alloc(MiB), at + i * MiB)));
      };
      await batch(0, 8);
      await batch(16 * MiB, 12);
      await batch(32 * MiB, 40);
    } finally {
      await c.close();
      await srv.stop();
    }
    // The server's view: which connection each 1 MiB read came in on, by batch.
    const reads = [...srv.log().matchAll(/connection=(\d+) Read id=\d+ offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+) /g)];
    const perConnection = (from: number, to: number): number[] => {
      const counts = new Map<string, number>();
      for (const m of reads) {
        const offset = Number(m[2]);
        if (offset < from || offset >= to) continue;
        assert.equal(Number(m[3]), MiB, 'each read went as one 1 MiB request');
        counts.set(m[1] ?? '', (counts.get(m[1] ?? '') ?? 0) + 1);
      }
      return [...counts.values()].sort((a, b) => b - a);
    };
    // Spread evenly (least loaded first), 8 reads would land 2 on each of four connections.
    assert.deepEqual(perConnection(0, 8 * MiB), [8], '8 reads at once: all on one connection');
    assert.deepEqual(perConnection(16 * MiB, 28 * MiB), [8, 4], '12 at once: 8 on one connection, 4 on the next');
    assert.deepEqual(perConnection(32 * MiB, 72 * MiB), [10, 10, 10, 10], '40 at once: every connection, evenly');
  },
);

test(
  'nbdkit delay filter: 64 reads in flight on one connection take about one delay, not 64',
  {
    skip: !tools.nbdkit && 'nbdkit is not installed',
  },
  async () => {
    using tmp = tempDir();
    const srv = await startNbdkit(tmp.dir, ['-t', '64', '--filter=delay', 'memory', '16M', 'rdelay=50ms']);
    const c = await NbdClient.connect(srv.uri(), { connections: 1 });
    try {
      const t0 = performance.now();
      await Promise.all(Array.from({ length: 64 }, (_, i) => c.read(Buffer.alloc(4096), i * 4096)));
      const elapsed = performance.now() - t0;
      // One at a time would take 64 x 50 ms = 3.2 s; all at once about 50 ms. A generous bound for a busy VM:
      assert.ok(elapsed < (64 * 50) / 4, `64 reads took ${elapsed.toFixed(0)} ms`);
      assert.deepEqual(c.requestCounts, [{ READ: 64 }], 'all 64 on the one connection');
    } finally {
      await c.close();
      await srv.stop();
    }
  },
);

test(
  'acknowledged writes held for replay: a FLUSH of its own past autoFlushBytes (4 MiB by default) or autoFlushEntries, writes wait at the max',
  {
    skip: !tools.nbdkit && 'nbdkit is not installed',
  },
  async () => {
    using tmp = tempDir();
    const srv = await startNbdkit(tmp.dir, ['memory', '64M']);
    const flushes = (c: NbdClient): number => c.requestCounts.reduce((n, s) => n + (s['FLUSH'] ?? 0), 0);
    const piece = 256 * KiB;
    // The default: nothing of its own below 4 MiB held, a FLUSH past it.
    const c = await NbdClient.connect(srv.uri(), { connections: 1 });
    try {
      for (let at = 0; at < 4 * MiB; at += piece) await c.write(randomBytes(piece), at);
      assert.equal(c.unflushedBytes, 4 * MiB);
      assert.equal(flushes(c), 0, 'no flush of its own at 4 MiB held');
      await c.write(randomBytes(piece), 4 * MiB);
      assert.equal(flushes(c), 1, 'one flush past 4 MiB');
      await c.flush();
      assert.equal(c.unflushedBytes, 0);
    } finally {
      await c.close();
    }
    // A small bound: past maxUnflushedBytes new writes wait, so the log holds at most the bound plus
    // what was already in flight when it was reached (8 writers, 64 KiB each).
    const small = await NbdClient.connect(srv.uri(), {
      connections: 2,
      autoFlushBytes: 512 * KiB,
      maxUnflushedBytes: 1 * MiB,
    });
    try {
      let most = 0;
      const data = randomBytes(8 * MiB);
      await Promise.all(
        Array.from({ length: 8 }, async (_, w) => {
          for (let at = w * MiB; at < (w + 1) * MiB; at += 64 * KiB) {
            await small.write(data.subarray(at, at + 64 * KiB), at);
            most = Math.max(most, small.unflushedBytes);
          }
        }),
      );
      assert.ok(most <= MiB + 8 * 64 * KiB, `held ${most} bytes, bound 1 MiB + 512 KiB in flight`);
      assert.ok(flushes(small) >= 8, `${flushes(small)} flushes of its own for 8 MiB written`);
      const back = Buffer.alloc(8 * MiB);
      await small.read(back, 0);
      assert.ok(back.equals(data), 'every write landed');
    } finally {
      await small.close();
    }
    // Counted in entries too: trims hold no data, but each is an entry to replay.
    const entries = await NbdClient.connect(srv.uri(), {
      connections: 2,
      autoFlushEntries: 64,
      maxUnflushedEntries: 128,
    });
    try {
      let most = 0;
      await Promise.all(
        Array.from({ length: 8 }, async (_, w) => {
          for (let k = 0; k < 100; k++) {
            await entries.trim((w * 100 + k) * 4 * KiB, 4 * KiB);
            most = Math.max(most, entries.unflushedEntries);
          }
        }),
      );
      assert.equal(entries.unflushedBytes, 0);
      assert.ok(most <= 128 + 8, `held ${most} entries, bound 128 + 8 in flight`);
      assert.ok(flushes(entries) >= 800 / 128, `${flushes(entries)} flushes of its own for 800 trims`);
    } finally {
      await entries.close();
      await srv.stop();
    }
  },
);
test(
  'bounded: past maxInflight requests queue, past maxQueued they fail with ENOMEM, the rest complete',
  {
    skip: !tools.nbdkit && 'nbdkit is not installed',
  },
  async () => {
    using tmp = tempDir();
    const srv = await startNbdkit(tmp.dir, ['--filter=delay', 'memory', '16M', 'rdelay=20ms'], { log: true });
    const c = await NbdClient.connect(srv.uri(), { connections: 1, maxInflight: 2, maxQueued: 4 });
    try {
      const all = Array.from({ length: 10 }, (_, i) => c.read(Buffer.alloc(4096), i * 4096));
      const results = await Promise.allSettled(all);
      assert.deepEqual(
        results.map((r) => r.status),
        [...Array<string>(6).fill('fulfilled'), ...Array<string>(4).fill('rejected')],
      );
      for (const r of results.slice(6)) {
        assert.ok(r.status === 'rejected' && r.reason instanceof IoError && r.reason.code === 'ENOMEM');
      }
    } finally {
      await c.close();
      await srv.stop();
    }
    // The server never saw more than two reads at once.
    let inflight = 0;
    let most = 0;
    for (const line of srv.log().split('\n')) {
      if (/ Read id=/.test(line)) most = Math.max(most, ++inflight);
      if (/ \.\.\.Read id=/.test(line)) inflight--;
    }
    assert.equal(most, 2);
  },
);

test(
  'nbdkit blocksize-policy: requests split at the maximum payload and aligned to the minimum block size',
  {
    skip: !tools.nbdkit && 'nbdkit is not installed',
  },
  async () => {
    using tmp = tempDir();
    const srv = await startNbdkit(
      tmp.dir,
      [
        '--filter=blocksize-policy',
        'memory',
        '8M',
        'blocksize-minimum=4096',
        'blocksize-preferred=4096',
        'blocksize-maximum=65536',
        'blocksize-error-policy=error',
      ],
      { log: true },
    );
    const c = await NbdClient.connect(srv.uri(), { connections: 1 });
    try {
      assert.deepEqual(c.info.advertisedBlockSize, { min: 4096, preferred: 4096, max: 65536 });
      assert.equal(c.alignment, 4096);
      assert.equal(c.maxPayload, 65536);
      const data = randomBytes(MiB);
      await c.write(data, 64 * KiB);
      const back = Buffer.alloc(MiB);
      await c.read(back, 64 * KiB);
      assert.ok(back.equals(data));
      // Unaligned reads are widened to whole blocks; unaligned writes would need read-modify-write: refused.
      const piece = Buffer.alloc(5000);
      await c.read(piece, 64 * KiB + 100);
      assert.ok(piece.equals(data.subarray(100, 5100)));
      await rejectsWith(
        c.write(Buffer.alloc(512), 4096),
        'EINVAL',
        /not aligned to the server's minimum block size 4096/,
      );
    } finally {
      await c.close();
      await srv.stop();
    }
    const counts = [...srv.log().matchAll(/ (Read|Write) id=\d+ offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+)/g)].map(
      (m) => ({
        offset: Number(m[2]),
        count: Number(m[3]),
      }),
    );
    assert.ok(counts.length >= 32, 'a 1 MiB write and read went as 64 KiB pieces');
    for (const r of counts) {
      assert.ok(r.count <= 65536 && r.count % 4096 === 0 && r.offset % 4096 === 0, JSON.stringify(r));
    }
  },
);

test(
  'non-fixed newstyle (nbdkit --mask-handshake=0): NBD_OPT_EXPORT_NAME, simple replies',
  {
    skip: !tools.nbdkit && 'nbdkit is not installed',
  },
  async () => {
    using tmp = tempDir();
    const srv = await startNbdkit(tmp.dir, ['--mask-handshake=0', 'memory', '4M']);
    const c = await NbdClient.connect(srv.uri());
    try {
      assert.equal(c.info.via, 'export-name');
      assert.equal(c.info.structuredReplies, false);
      assert.equal(c.size, 4 * MiB);
      await roundTrip(c, 4096, 64 * KiB);
    } finally {
      await c.close();
      await srv.stop();
    }
  },
);

test(
  'nbdkit --no-sr: simple replies for everything, no block status',
  {
    skip: !tools.nbdkit && 'nbdkit is not installed',
  },
  async () => {
    using tmp = tempDir();
    const srv = await startNbdkit(tmp.dir, ['--no-sr', 'memory', '4M']);
    const c = await NbdClient.connect(srv.uri());
    try {
      assert.equal(c.info.via, 'go');
      assert.equal(c.info.structuredReplies, false);
      assert.equal(c.info.baseAllocationId, undefined);
      await roundTrip(c, 0, 256 * KiB);
      await rejectsWith(c.blockStatus(0, 4096), 'EINVAL', /did not select base:allocation/);
    } finally {
      await c.close();
      await srv.stop();
    }
  },
);

test(
  'qemu-nbd (raw file): data reaches the file; zeroes, trim, block status',
  {
    skip: !tools.qemuNbd && 'qemu-nbd is not installed',
  },
  async () => {
    using tmp = tempDir();
    const file = sparseFile(join(tmp.dir, 'q.img'), 16 * MiB);
    const srv = await startQemuNbd(tmp.dir, file);
    const c = await NbdClient.connect(srv.uri());
    try {
      assert.equal(c.info.structuredReplies, true);
      assert.deepEqual(c.info.advertisedBlockSize, { min: 1, preferred: 4096, max: 32 * MiB });
      const data = await roundTrip(c, MiB, 2 * MiB);
      await c.flush();
      assert.ok(readFileRange(file, MiB, 2 * MiB).equals(data));
      await c.writeZeroes(MiB, 64 * KiB, { noHole: true });
      assert.ok(readFileRange(file, MiB, 64 * KiB).every((b) => b === 0));
      await c.trim(2 * MiB, MiB);
      const status = await c.blockStatus(0, 16 * MiB);
      assert.equal(
        status.reduce((n, e) => n + e.length, 0),
        16 * MiB,
      );
      assert.deepEqual(status[0], { length: MiB, hole: true, zero: true });
      // Reading a hole: qemu answers with OFFSET_HOLE chunks.
      const hole = Buffer.alloc(64 * KiB, 0xff);
      await c.read(hole, 8 * MiB);
      assert.ok(hole.every((b) => b === 0));
    } finally {
      await c.close();
      await srv.stop();
    }
  },
);

test(
  "Debian's nbd-server: simple replies, no block sizes; data reaches the file",
  {
    skip: !tools.nbdServer && 'nbd-server is not installed',
  },
  async () => {
    using tmp = tempDir();
    const file = sparseFile(join(tmp.dir, 'n.img'), 16 * MiB);
    const srv = await startNbdServer(tmp.dir, file, 'disk');
    // nbd-server -d serves one connection only, although it advertises multi-conn.
    const c = await connectWhenListening(srv.uri(), { connections: 1 });
    try {
      assert.equal(c.size, 16 * MiB);
      assert.equal(c.info.structuredReplies, false);
      assert.equal(c.info.advertisedBlockSize, undefined);
      const data = await roundTrip(c, 512 * KiB, MiB);
      await c.write(data.subarray(0, 4096), 0, { fua: true });
      await c.flush();
      assert.ok(readFileRange(file, 512 * KiB, MiB).equals(data));
      assert.ok(readFileRange(file, 0, 4096).equals(data.subarray(0, 4096)));
      await c.writeZeroes(512 * KiB, 4096);
      assert.ok(readFileRange(file, 512 * KiB, 4096).every((b) => b === 0));
    } finally {
      await c.close();
      await srv.stop();
    }
  },
);

test("ubcache's own server: many requests, replies out of order, FAST_ZERO, errors with messages", async () => {
  const dev = new MemoryBlockDevice(16 * MiB);
  const fx = await startServer([{ name: 'disk', device: dev }]);
  const c = await NbdClient.connect(`nbd+unix:///disk?socket=${fx.socketPath}`);
  try {
    assert.equal(c.connections, 4);
    assert.ok(c.flags & TxFlag.SEND_FAST_ZERO);
    const blocks = Array.from({ length: 200 }, () => randomBytes(8 * KiB));
    await Promise.all(blocks.map((b, i) => c.write(b, i * 8 * KiB)));
    const back = blocks.map(() => Buffer.alloc(8 * KiB));
    await Promise.all(back.map((b, i) => c.read(b, i * 8 * KiB)));
    back.forEach((b, i) => {
      assert.ok(b.equals(blocks[i] ?? Buffer.alloc(0)), `block ${i}`);
    });
    const direct = Buffer.alloc(8 * KiB);
    await dev.read(direct, 7 * 8 * KiB);
    assert.ok(direct.equals(blocks[7] ?? Buffer.alloc(0)));
    await c.writeZeroes(0, MiB, { fastZero: true });
    await dev.read(direct, 0);
    assert.ok(direct.every((b) => b === 0));
    assert.deepEqual((await c.blockStatus(0, MiB))[0], { length: MiB, hole: true, zero: true });
  } finally {
    await c.close();
    await fx.cleanup();
  }
});

test('TLS settings that cannot work are refused before connecting, and a missing server is named', async () => {
  await assert.rejects(
    NbdClient.connect('nbds+unix:///x?socket=/nonexistent&tls-psk-file=/nonexistent/keys.psk'),
    /cannot read the PSK file \/nonexistent\/keys\.psk \(ENOENT\)/,
  );
  await assert.rejects(
    NbdClient.connect('nbds+unix:///x?socket=/nonexistent&tls-certificates=/nonexistent'),
    /\/nonexistent\/ca-cert\.pem does not exist/,
  );
  await assert.rejects(NbdClient.connect('nbds://localhost/?tls-type=anon'), /anonymous TLS\) is not supported/);
  await assert.rejects(
    NbdClient.connect('nbd+unix:///x?socket=/nonexistent/nbd.sock'),
    /^Error: nbd\+unix:\/\/\/x\?socket=\/nonexistent\/nbd\.sock: cannot connect to unix:\/nonexistent\/nbd\.sock: connect ENOENT/,
  );
});

// ---------------------------------------------------------------------------
// Broken and hostile servers (scripted: no real server misbehaves on purpose)

/** A fake server whose onRequest is `script`; the client connected to it. */
async function hostile(
  dir: string,
  script: (req: { type: number; cookie: bigint; offset: number; length: number }, conn: FakeConnection) => void,
  options: Parameters<typeof startFakeServer>[1] = {},
  clientOptions: NbdClientOptions = {},
): Promise<{ c: NbdClient; srv: FakeServer; close: () => Promise<void> }> {
  const srv = await startFakeServer(dir, { ...options, onRequest: script });
  const c = await NbdClient.connect(srv.uri, clientOptions);
  return {
    c,
    srv,
    close: async () => {
      await c.close();
      await srv.close();
    },
  };
}

/** Answer a READ with `fill` bytes, anything else with success. */
function answer(req: { type: number; cookie: bigint; length: number }, conn: FakeConnection, fill = 5): void {
  conn.send(simple(req.cookie, 0, req.type === Cmd.READ ? Buffer.alloc(req.length, fill) : undefined));
}

test('hostile: garbage reply magic fails every request in flight with EIO, once; the client reconnects and serves', async () => {
  using tmp = tempDir();
  let seen = 0;
  let first: FakeConnection | undefined;
  const { c, close } = await hostile(tmp.dir, (req, conn) => {
    first ??= conn;
    // The first connection holds two reads, then answers the third with garbage; later ones behave.
    if (conn !== first) answer(req, conn);
    else if (++seen === 3) conn.send(Buffer.from('GARBAGE!GARBAGE!GARBAGE!'));
  });
  try {
    const settled: string[] = [];
    const reqs = [0, 1, 2].map((i) =>
      c.read(Buffer.alloc(512), i * 512).finally(() => {
        settled.push(`read ${i}`);
      }),
    );
    for (const p of reqs) await rejectsWith(p, 'EIO', /bad magic 0x47415242.*3 request\(s\) on this connection failed/);
    const b = Buffer.alloc(512);
    await c.read(b, 0);
    assert.ok(
      b.every((x) => x === 5),
      'served by a fresh connection',
    );
    assert.equal(c.failed, undefined);
    assert.equal(c.reconnects, 1);
    assert.deepEqual(settled.sort(), ['read 0', 'read 1', 'read 2'], 'each request answered once');
  } finally {
    await close();
  }
});

test('hostile: a reply for a cookie never sent, and a second reply to an answered request', async () => {
  using tmp = tempDir();
  {
    let first: FakeConnection | undefined;
    const { c, close } = await hostile(tmp.dir, (req, conn) => {
      first ??= conn;
      conn.send(simple(conn === first ? req.cookie + 1000n : req.cookie));
    });
    try {
      await rejectsWith(c.flush(), 'EIO', /for cookie \d+, which no request in flight has/);
      await c.flush();
      assert.equal(c.reconnects, 1, 'the next FLUSH went over a fresh connection');
    } finally {
      await close();
    }
  }
  using tmp2 = tempDir();
  let settled = 0;
  const { c, srv, close } = await hostile(tmp2.dir, (req, conn) => {
    // Answer every read, then answer it again (with other data).
    conn.send(simple(req.cookie, 0, Buffer.alloc(req.length, 1)), simple(req.cookie, 0, Buffer.alloc(req.length, 2)));
  });
  try {
    const b = Buffer.alloc(512);
    await c.read(b, 0).then(() => settled++);
    assert.equal(settled, 1, 'the read succeeded once; its second reply broke the connection');
    await c.read(b, 512).then(() => settled++);
    assert.equal(settled, 2);
    assert.ok(
      b.every((x) => x === 1),
      'the first reply is the one that counts',
    );
    assert.equal(srv.connections.length, 2, 'the second read went over a new connection');
  } finally {
    await close();
  }
});

test('hostile: an oversized chunk, data outside the request, a chunk type for another command', async () => {
  const cases: Array<[string, (cookie: bigint, offset: number) => Buffer, RegExp]> = [
    ['oversized', (k, o) => dataChunk(k, o, Buffer.alloc(8192), true), /the most this READ allows is 8 \+ 4096/],
    ['outside', (k, o) => dataChunk(k, o + 2048, Buffer.alloc(4096), true), /outside its range/],
    [
      'overlap',
      (k, o) => Buffer.concat([dataChunk(k, o, Buffer.alloc(4096), false), holeChunk(k, o, 4096, true)]),
      /exactly once/,
    ],
    ['short', (k, o) => dataChunk(k, o, Buffer.alloc(1024), true), /does not cover the range exactly once/],
    [
      'status',
      (k) => chunk(k, ReplyType.BLOCK_STATUS, Buffer.alloc(12), true),
      /block status for a request that is not BLOCK_STATUS/,
    ],
    ['unknown type', (k) => chunk(k, 77, Buffer.alloc(4), true), /type is unknown/],
    ['huge error', (k) => chunk(k, ReplyType.ERROR, Buffer.alloc(70000), true), /an error chunk is 6 to/],
  ];
  for (const [what, reply, pattern] of cases) {
    using tmp = tempDir();
    const { c, close } = await hostile(tmp.dir, (req, conn) => {
      conn.send(reply(req.cookie, req.offset));
    });
    try {
      await rejectsWith(c.read(Buffer.alloc(4096), 8192), 'EIO', pattern);
    } catch (err) {
      throw new Error(`case ${what}: ${String(err)}`, { cause: err });
    } finally {
      await close();
    }
  }
});

test('hostile: the server closes in the middle of a reply: the reads in flight are sent again after a reconnect', async () => {
  using tmp = tempDir();
  let n = 0;
  let first: FakeConnection | undefined;
  const { c, srv, close } = await hostile(tmp.dir, (req, conn) => {
    first ??= conn;
    if (conn !== first) {
      conn.send(dataChunk(req.cookie, req.offset, Buffer.alloc(req.length, 7), true));
      return;
    }
    if (++n < 4) return;
    // Half of a data chunk, then hang up.
    const reply = dataChunk(req.cookie, req.offset, Buffer.alloc(req.length, 9), true);
    conn.send(reply.subarray(0, 100));
    conn.socket.end();
  });
  try {
    const bufs = [0, 1, 2, 3].map(() => Buffer.alloc(4096));
    await Promise.all(bufs.map((b, i) => c.read(b, i * 4096)));
    for (const b of bufs)
      assert.ok(
        b.every((x) => x === 7),
        'the whole reply of the second server',
      );
    assert.equal(c.reconnects, 1);
    assert.equal(srv.connections[1]?.requests.length, 4, 'all four sent again, once');
  } finally {
    await close();
  }
});

test('hostile: a server that always hangs up mid-reply: one outage, backed off, EIO at its timeout, then gone', async () => {
  using tmp = tempDir();
  const { c, srv, close } = await hostile(
    tmp.dir,
    (req, conn) => {
      const reply = dataChunk(req.cookie, req.offset, Buffer.alloc(req.length, 9), true);
      conn.send(reply.subarray(0, 100));
      conn.socket.end();
    },
    {},
    { outageTimeoutMs: 1500 },
  );
  try {
    const started = performance.now();
    await rejectsWith(
      c.read(Buffer.alloc(4096), 0),
      'EIO',
      /unreachable for 1\.5 s \(outage timeout\), giving up: .*in the middle of a reply/,
    );
    const elapsed = performance.now() - started;
    assert.ok(elapsed >= 1400 && elapsed < 10_000, `gave up after ${elapsed.toFixed(0)} ms`);
    // Backoff from 100 ms doubling: about 5 attempts in 1.5 s, never a tight loop.
    assert.ok(srv.connections.length <= 10, `${srv.connections.length} connections`);
    assert.ok(c.failed);
    await rejectsWith(c.read(Buffer.alloc(512), 0), 'EIO', /outage timeout/);
    assert.ok(c.outageMs >= 1400, `outage ${c.outageMs} ms`);
  } finally {
    await close();
  }
});

test('large replies (read straight into the caller buffer): chunks out of order, simple and structured back to back, a close mid-data', async () => {
  using tmp = tempDir();
  const big = randomBytes(512 * KiB);
  let n = 0;
  const { c, close } = await hostile(tmp.dir, (req, conn) => {
    n++;
    const rel = (at: number, len: number): Buffer => big.subarray(at - req.offset, at - req.offset + len);
    if (n === 1) {
      // Second half first, then the first half, in odd-sized pieces; the next reply follows in the same write.
      const h = 200 * KiB + 3;
      conn.send(
        dataChunk(req.cookie, req.offset + h, rel(req.offset + h, req.length - h), false),
        dataChunk(req.cookie, req.offset, rel(req.offset, h), true),
      );
    } else if (n === 2) {
      conn.send(simple(req.cookie, 0, rel(req.offset, req.length)));
    } else if (n === 3) {
      // Part of the data (garbage), then hang up while the client reads straight into the caller's buffer.
      const reply = dataChunk(req.cookie, req.offset, Buffer.alloc(req.length, 0xee), true);
      conn.send(reply.subarray(0, 100 * KiB));
      conn.socket.end();
    } else {
      // The reconnected server answers the read sent again.
      conn.send(dataChunk(req.cookie, req.offset, rel(req.offset, req.length), true));
    }
  });
  try {
    const a = Buffer.alloc(big.length);
    await c.read(a, 0);
    assert.ok(a.equals(big), 'out-of-order chunks reassembled');
    const b = Buffer.alloc(big.length);
    await c.read(b, 0);
    assert.ok(b.equals(big), 'a simple reply with its data');
    const d = Buffer.alloc(big.length);
    await c.read(d, 0);
    assert.ok(d.equals(big), 'sent again after the reconnect: the half-filled buffer is filled anew');
    assert.equal(c.reconnects, 1);
  } finally {
    await close();
  }
});

test('scripted: chunks out of order, holes, interleaved replies, error chunks with messages, ESHUTDOWN', async () => {
  using tmp = tempDir();
  const pending: Array<{ cookie: bigint; offset: number; length: number; type: number }> = [];
  let flushes = 0;
  const { c, close } = await hostile(tmp.dir, (req, conn) => {
    if (req.type === Cmd.WRITE) {
      conn.send(encodeErrorChunk(req.cookie, NbdErr.ENOSPC, 'the disk is full'));
      return;
    }
    if (req.type === Cmd.FLUSH) {
      // The first server is going down; the one after it flushes.
      if (flushes++ === 0) conn.send(encodeErrorChunk(req.cookie, NbdErr.ESHUTDOWN, 'going down'));
      else conn.send(simple(req.cookie));
      return;
    }
    pending.push(req);
    if (pending.length < 2) return;
    // Both reads answered at once, last first, their chunks interleaved and out of order.
    const [a, b] = pending as [(typeof pending)[0], (typeof pending)[0]];
    const q = a.length / 4;
    conn.send(
      dataChunk(b.cookie, b.offset + 2 * q, Buffer.alloc(2 * q, 0xbb), false),
      dataChunk(a.cookie, a.offset + 3 * q, Buffer.alloc(q, 0xa3), false),
      holeChunk(b.cookie, b.offset, 2 * q, true),
      holeChunk(a.cookie, a.offset + q, 2 * q, false),
      dataChunk(a.cookie, a.offset, Buffer.alloc(q, 0xa0), false),
      chunk(a.cookie, ReplyType.NONE, Buffer.alloc(0), true),
    );
  });
  try {
    const a = Buffer.alloc(4096, 0xff);
    const b = Buffer.alloc(4096, 0xff);
    await Promise.all([c.read(a, 0), c.read(b, 8192)]);
    const expectA = Buffer.concat([Buffer.alloc(1024, 0xa0), Buffer.alloc(2048), Buffer.alloc(1024, 0xa3)]);
    assert.ok(a.equals(expectA));
    assert.ok(b.equals(Buffer.concat([Buffer.alloc(2048), Buffer.alloc(2048, 0xbb)])));
    await rejectsWith(
      c.write(Buffer.alloc(512), 0),
      'ENOSPC',
      /WRITE at 0 length 512 failed on the server: ENOSPC \(the disk is full\)/,
    );
    assert.equal(c.failed, undefined, 'an error reply is not a broken server');
    // ESHUTDOWN: the server is going away; the FLUSH waits for the reconnect and goes again.
    await c.flush();
    assert.equal(flushes, 2);
    assert.equal(c.reconnects, 1);
  } finally {
    await close();
  }
});

test('outageTimeoutMs 0: nothing reconnects; ESHUTDOWN fails the request and the client refuses more', async () => {
  using tmp = tempDir();
  const { c, close } = await hostile(
    tmp.dir,
    (req, conn) => {
      conn.send(encodeErrorChunk(req.cookie, NbdErr.ESHUTDOWN, 'going down'));
    },
    {},
    { outageTimeoutMs: 0 },
  );
  try {
    await rejectsWith(c.flush(), 'ESHUTDOWN', /ESHUTDOWN \(going down\)/);
    await rejectsWith(c.read(Buffer.alloc(512), 0), 'ESHUTDOWN', /shutting down/);
    assert.equal(c.reconnects, 0);
  } finally {
    await close();
  }
});

test('handshake: GO unsupported falls back to EXPORT_NAME; oldstyle, silence and a non-NBD server are named', async () => {
  using tmp = tempDir();
  {
    const srv = await startFakeServer(tmp.dir, {
      goUnsupported: true,
      size: 8192,
      onRequest: (req, conn) => {
        conn.send(simple(req.cookie, 0, req.type === Cmd.READ ? Buffer.alloc(req.length, 5) : undefined));
      },
      structured: false,
    });
    const c = await NbdClient.connect(srv.uri);
    assert.equal(c.info.via, 'export-name');
    const b = Buffer.alloc(512);
    await c.read(b, 512);
    assert.ok(b.every((x) => x === 5));
    await c.close();
    await srv.close();
  }
  const greeting = (second: bigint): Buffer => {
    const g = Buffer.alloc(18);
    g.writeBigUInt64BE(NBD_MAGIC, 0);
    g.writeBigUInt64BE(second, 8);
    return g;
  };
  const cases: Array<[Parameters<typeof startFakeServer>[1], RegExp]> = [
    [{ greeting: greeting(OLDSTYLE_MAGIC) }, /oldstyle handshake/],
    [{ greeting: Buffer.from('SSH-2.0-OpenSSH_9.2p1 Debian\r\n') }, /not an NBD server/],
    [{ greeting: encodeGreeting(0).subarray(0, 10) }, /closed the connection during the handshake/],
    [{ silent: true }, /no NBD handshake within 300 ms/],
  ];
  for (const [options, pattern] of cases) {
    using t = tempDir();
    const srv = await startFakeServer(t.dir, options);
    const started = performance.now();
    await assert.rejects(NbdClient.connect(srv.uri, { handshakeTimeoutMs: 300 }), pattern);
    assert.ok(performance.now() - started < 5000);
    await srv.close();
  }
});

test('close() while the server is gone: what waits fails with ESHUTDOWN, reconnecting stops, close returns', async () => {
  using tmp = tempDir();
  const srv = await startFakeServer(tmp.dir, {
    onRequest: (_req, conn) => {
      conn.socket.destroy();
    },
  });
  const c = await NbdClient.connect(srv.uri, { outageTimeoutMs: 60_000 });
  try {
    const waiting = c.read(Buffer.alloc(512), 0);
    // The server hangs up on every request: the read waits in an outage that would last a minute.
    await srv.close();
    const closing = c.close();
    // Whether the loss or the close() is seen first, the waiting read ends with ESHUTDOWN, once.
    await rejectsWith(waiting, 'ESHUTDOWN', /the client (is closed|was closed while the server was unreachable)/);
    await closing;
    assert.equal(c.online, false);
  } finally {
    await c.close();
  }
});

test('no unhandled rejections were left behind by any of the above', async () => {
  await new Promise((resolve) => setImmediate(resolve));
  assert.deepEqual(unhandled, []);
});
