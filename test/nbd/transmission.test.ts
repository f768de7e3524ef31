// Requests and replies: every command, the spec's validation (EINVAL, ENOSPC,
// EPERM in the right cases), hostile framing, pipelining, out-of-order
// replies, the bound on work in flight. Raw client against an in-process
// server; the device is inspected directly.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { MemoryBlockDevice } from '../../src/blockdev/memory.ts';
import { encodeClientFlags, encodeInfoRequest, encodeOptionRequest, encodeRequestHeader } from '../../src/nbd/codec.ts';
import { ClientFlag, Cmd, CmdFlag, NbdErr, Opt, Rep, REQUEST_MAGIC, State } from '../../src/nbd/protocol.ts';
import { captureLog } from '../../src/util/log.ts';
import { ControlledDevice } from '../helpers/controlled-device.ts';
import { startServer, type Fixture } from '../helpers/nbd-fixture.ts';
import type { Reply } from '../helpers/nbd-raw-client.ts';

const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 8 * MiB;

async function withServer(
  fn: (f: Fixture, dev: MemoryBlockDevice) => Promise<void>,
  options: { readOnly?: boolean; size?: number; min?: number } = {},
): Promise<void> {
  const dev = new MemoryBlockDevice(options.size ?? SIZE);
  const f = await startServer([
    {
      name: 'disk',
      device: dev,
      readOnly: options.readOnly ?? false,
      blockSize: { min: options.min ?? 1 },
    },
  ]);
  try {
    await fn(f, dev);
  } finally {
    await f.cleanup();
  }
}

function ok(r: Reply, what = 'request'): void {
  assert.equal(r.error, 0, `${what} failed with ${r.error}: ${r.message}`);
}

for (const structured of [false, true]) {
  const mode = structured ? 'structured' : 'simple';

  test(`${mode} replies: write, read back, FUA write, flush`, async () => {
    await withServer(async (f, dev) => {
      const { client } = await f.open({ structured });
      const data = randomBytes(64 * KiB);
      ok(await client.writeAt(12345, data));
      const r = await client.readAt(12345, data.length);
      ok(r);
      assert.equal(r.structured, structured);
      assert.deepEqual(r.data, data);
      const check = Buffer.alloc(data.length);
      dev.readSync(check, 12345);
      assert.deepEqual(check, data);
      ok(await client.writeAt(0, Buffer.from('fua'), CmdFlag.FUA));
      ok(await client.request({ type: Cmd.FLUSH, offset: 0, length: 0 }));
      // FUA is accepted (and ignored) on commands that do not write.
      ok(await client.readAt(0, 3, CmdFlag.FUA));
      ok(await client.request({ type: Cmd.FLUSH, offset: 0, length: 0, flags: CmdFlag.FUA }));
    });
  });

  test(`${mode} replies: zero-length READ, WRITE, TRIM and WRITE_ZEROES succeed without disconnecting`, async () => {
    await withServer(async (f) => {
      const { client } = await f.open({ structured });
      const r = await client.readAt(100, 0);
      ok(r);
      assert.equal(r.data?.length, 0);
      ok(await client.writeAt(SIZE, Buffer.alloc(0)));
      ok(await client.request({ type: Cmd.TRIM, offset: 5, length: 0 }));
      ok(await client.request({ type: Cmd.WRITE_ZEROES, offset: 5, length: 0 }));
      ok(await client.request({ type: Cmd.CACHE, offset: 5, length: 0 }));
      ok(await client.readAt(0, 1));
    });
  });

  test(`${mode} replies: ranges past the end are EINVAL for reads, ENOSPC for writes`, async () => {
    await withServer(async (f) => {
      const { client } = await f.open({ structured });
      const expect = async (type: number, offset: number | bigint, length: number, error: number): Promise<void> => {
        const payload = type === Cmd.WRITE ? Buffer.alloc(length, 7) : undefined;
        const r = await client.request({ type, offset, length }, payload);
        assert.equal(r.error, error, `${type} at ${offset}+${length}`);
        if (structured) assert.match(r.message, /past the end of export 'disk'/);
      };
      await expect(Cmd.READ, SIZE - 10, 11, NbdErr.EINVAL);
      await expect(Cmd.READ, SIZE + 1, 0, NbdErr.EINVAL);
      await expect(Cmd.READ, 2n ** 64n - 1n, 1, NbdErr.EINVAL);
      await expect(Cmd.TRIM, SIZE, 1, NbdErr.EINVAL);
      await expect(Cmd.CACHE, SIZE - 1, 2, NbdErr.EINVAL);
      await expect(Cmd.WRITE, SIZE - 100, 4096, NbdErr.ENOSPC);
      await expect(Cmd.WRITE, 2n ** 63n, 512, NbdErr.ENOSPC);
      await expect(Cmd.WRITE_ZEROES, SIZE - 1, 2, NbdErr.ENOSPC);
      // The rejected WRITE payloads were consumed: the stream is still in sync.
      const d = randomBytes(4096);
      ok(await client.writeAt(SIZE - 4096, d));
      assert.deepEqual((await client.readAt(SIZE - 4096, 4096)).data, d);
    });
  });

  test(`${mode} replies: unknown commands and bad flags are EINVAL and the stream stays in sync`, async () => {
    await withServer(async (f) => {
      const { client } = await f.open({ structured });
      const expectEinval = async (type: number, flags: number, length = 512): Promise<void> => {
        const payload = type === Cmd.WRITE ? randomBytes(length) : undefined;
        const r = await client.request({ type, flags, offset: 0, length }, payload);
        assert.equal(r.error, NbdErr.EINVAL, `type ${type} flags 0x${flags.toString(16)}`);
      };
      await expectEinval(9, 0);
      await expectEinval(Cmd.RESIZE, 0);
      await expectEinval(0xffff, 0);
      await expectEinval(Cmd.READ, 0x40);
      await expectEinval(Cmd.READ, 0x8000);
      await expectEinval(Cmd.READ, CmdFlag.DF); // DF is not advertised
      await expectEinval(Cmd.READ, CmdFlag.REQ_ONE);
      await expectEinval(Cmd.READ, CmdFlag.NO_HOLE);
      await expectEinval(Cmd.READ, CmdFlag.FAST_ZERO);
      await expectEinval(Cmd.WRITE, CmdFlag.NO_HOLE, 4096);
      await expectEinval(Cmd.WRITE, CmdFlag.PAYLOAD_LEN, 4096);
      await expectEinval(Cmd.TRIM, CmdFlag.NO_HOLE);
      await expectEinval(Cmd.FLUSH, CmdFlag.REQ_ONE, 0);
      await expectEinval(Cmd.BLOCK_STATUS, 0); // no meta context negotiated
      const flushWithRange = await client.request({ type: Cmd.FLUSH, offset: 512, length: 0 });
      assert.equal(flushWithRange.error, NbdErr.EINVAL);
      assert.equal((await client.request({ type: Cmd.FLUSH, offset: 0, length: 1 })).error, NbdErr.EINVAL);
      const d = randomBytes(1000);
      ok(await client.writeAt(0, d));
      assert.deepEqual((await client.readAt(0, 1000)).data, d);
    });
  });

  test(`${mode} replies: read-only export answers EPERM to WRITE, TRIM and WRITE_ZEROES, and serves reads`, async () => {
    await withServer(
      async (f, dev) => {
        dev.writeSync(Buffer.from('hello'), 0);
        const { client } = await f.open({ structured });
        assert.equal((await client.writeAt(0, Buffer.from('xxxxx'))).error, NbdErr.EPERM);
        assert.equal((await client.request({ type: Cmd.TRIM, offset: 0, length: 512 })).error, NbdErr.EPERM);
        assert.equal((await client.request({ type: Cmd.WRITE_ZEROES, offset: 0, length: 5 })).error, NbdErr.EPERM);
        const r = await client.readAt(0, 5);
        assert.equal(r.data?.toString(), 'hello');
        ok(await client.request({ type: Cmd.FLUSH, offset: 0, length: 0 }));
      },
      { readOnly: true },
    );
  });

  test(`${mode} replies: misaligned requests are EINVAL when the export has a minimum block size`, async () => {
    await withServer(
      async (f) => {
        const { client } = await f.open({ structured });
        assert.equal((await client.readAt(100, 512)).error, NbdErr.EINVAL);
        assert.equal((await client.readAt(512, 100)).error, NbdErr.EINVAL);
        assert.equal((await client.writeAt(1, Buffer.alloc(512))).error, NbdErr.EINVAL);
        assert.equal((await client.request({ type: Cmd.TRIM, offset: 0, length: 10 })).error, NbdErr.EINVAL);
        ok(await client.writeAt(512, Buffer.alloc(1024, 1)));
        ok(await client.readAt(1024, 512));
      },
      { min: 512 },
    );
  });

  test(`${mode} replies: 32 MiB READ and WRITE are served; one byte more is EINVAL, payload consumed`, async () => {
    await withServer(
      async (f) => {
        const { client } = await f.open({ structured });
        const big = randomBytes(32 * MiB);
        ok(await client.writeAt(0, big));
        const r = await client.readAt(0, 32 * MiB);
        assert.ok(r.data?.equals(big));
        const over = await client.request(
          { type: Cmd.WRITE, offset: 0, length: 32 * MiB + 1 },
          Buffer.alloc(32 * MiB + 1),
        );
        assert.equal(over.error, NbdErr.EINVAL);
        assert.equal((await client.readAt(0, 32 * MiB + 1)).error, NbdErr.EINVAL);
        assert.deepEqual((await client.readAt(0, 16)).data, big.subarray(0, 16));
      },
      { size: 40 * MiB },
    );
  });

  test(`${mode} replies: TRIM and WRITE_ZEROES (NO_HOLE, FAST_ZERO) reach the device and read back as zero`, async () => {
    await withServer(async (f, dev) => {
      const { client } = await f.open({ structured });
      ok(await client.writeAt(0, Buffer.alloc(256 * KiB, 0xaa)));
      assert.equal(dev.allocatedBytes, 256 * KiB);
      ok(await client.request({ type: Cmd.WRITE_ZEROES, offset: 0, length: 64 * KiB, flags: CmdFlag.NO_HOLE }));
      assert.equal(dev.allocatedBytes, 256 * KiB, 'NO_HOLE keeps the range allocated');
      ok(
        await client.request({ type: Cmd.WRITE_ZEROES, offset: 64 * KiB, length: 64 * KiB, flags: CmdFlag.FAST_ZERO }),
      );
      assert.equal(dev.allocatedBytes, 192 * KiB, 'without NO_HOLE the range may be punched');
      ok(await client.request({ type: Cmd.TRIM, offset: 128 * KiB, length: 64 * KiB, flags: CmdFlag.FUA }));
      assert.equal(dev.allocatedBytes, 128 * KiB);
      const r = await client.readAt(0, 128 * KiB);
      assert.ok(r.data?.equals(Buffer.alloc(128 * KiB)));
    });
  });
}

test('structured error chunks carry a message; READ errors never send data', async () => {
  const dev = new ControlledDevice(new MemoryBlockDevice(SIZE));
  const f = await startServer([{ name: 'disk', device: dev }]);
  const cap = captureLog();
  try {
    const { client: s } = await f.open({ structured: true });
    const { client: p } = await f.open({ structured: false });
    dev.failures.set('read', 'EIO');
    const rs = await s.readAt(0, 4096);
    assert.equal(rs.error, NbdErr.EIO);
    assert.match(rs.message, /READ at 0 length 4096 failed: read failed by test/);
    assert.equal(rs.data, undefined);
    const rp = await p.readAt(0, 4096);
    assert.equal(rp.error, NbdErr.EIO);
    assert.equal(rp.data, undefined);
    // The simple-reply stream is still framed correctly after the error.
    dev.failures.clear();
    ok(await p.readAt(0, 10));
    assert.ok(cap.lines.some((l) => l.includes("export 'disk': READ at 0 length 4096 failed") && l.includes('(EIO)')));
  } finally {
    cap.restore();
    await f.cleanup();
  }
});

test('device errors map to NBD errors: EDQUOT/EFBIG to ENOSPC, EROFS to EPERM, unknown to EIO', async () => {
  const dev = new ControlledDevice(new MemoryBlockDevice(SIZE));
  const f = await startServer([{ name: 'disk', device: dev }]);
  const cap = captureLog();
  try {
    const { client } = await f.open();
    const cases: [string, number][] = [
      ['EDQUOT', NbdErr.ENOSPC],
      ['EFBIG', NbdErr.ENOSPC],
      ['ENOSPC', NbdErr.ENOSPC],
      ['EROFS', NbdErr.EPERM],
      ['EIO', NbdErr.EIO],
      ['EBADF', NbdErr.EIO],
      ['ENOTSUP', NbdErr.EIO], // ENOTSUP is reserved for FAST_ZERO
      ['ESHUTDOWN', NbdErr.ESHUTDOWN],
    ];
    for (const [code, expected] of cases) {
      dev.failures.set('write', code);
      dev.failures.set('flush', code);
      assert.equal((await client.writeAt(0, Buffer.alloc(8))).error, expected, code);
      assert.equal((await client.request({ type: Cmd.FLUSH, offset: 0, length: 0 })).error, expected, code);
    }
  } finally {
    cap.restore();
    await f.cleanup();
  }
});

test('FAST_ZERO: a device that cannot zero fast answers ENOTSUP; without the flag it zeroes', async () => {
  const inner = new MemoryBlockDevice(SIZE);
  const dev = new ControlledDevice(inner);
  const f = await startServer([{ name: 'disk', device: dev }]);
  try {
    const { client } = await f.open();
    dev.failures.set('writeZeroes', 'ENOTSUP');
    const r = await client.request({ type: Cmd.WRITE_ZEROES, offset: 0, length: 4096, flags: CmdFlag.FAST_ZERO });
    assert.equal(r.error, NbdErr.ENOTSUP);
    dev.failures.clear();
    ok(await client.request({ type: Cmd.WRITE_ZEROES, offset: 0, length: 4096, flags: CmdFlag.FAST_ZERO }));
    assert.deepEqual(dev.log.at(-1)?.options, { noHole: false, fastOnly: true, fua: false });
  } finally {
    await f.cleanup();
  }
});

test('an export whose device lacks discard and fast zero refuses TRIM and FAST_ZERO with EINVAL', async () => {
  const dev = new ControlledDevice(new MemoryBlockDevice(SIZE), { discard: false, fastZero: false });
  const f = await startServer([{ name: 'disk', device: dev }]);
  try {
    const { client } = await f.open();
    assert.equal((await client.request({ type: Cmd.TRIM, offset: 0, length: 4096 })).error, NbdErr.EINVAL);
    const fz = await client.request({ type: Cmd.WRITE_ZEROES, offset: 0, length: 4096, flags: CmdFlag.FAST_ZERO });
    assert.equal(fz.error, NbdErr.EINVAL);
    ok(await client.request({ type: Cmd.WRITE_ZEROES, offset: 0, length: 4096 }));
    assert.deepEqual(
      dev.log.map((l) => l.op),
      ['writeZeroes'],
    );
  } finally {
    await f.cleanup();
  }
});

test('CACHE reads the range through the device in bounded pieces', async () => {
  const dev = new ControlledDevice(new MemoryBlockDevice(SIZE));
  const f = await startServer([{ name: 'disk', device: dev }]);
  try {
    const { client } = await f.open();
    ok(await client.request({ type: Cmd.CACHE, offset: 4096, length: 3 * MiB + 5 }));
    assert.deepEqual(
      dev.log.map((l) => [l.op, l.offset, l.length]),
      [
        ['read', 4096, MiB],
        ['read', 4096 + MiB, MiB],
        ['read', 4096 + 2 * MiB, MiB],
        ['read', 4096 + 3 * MiB, 5],
      ],
    );
  } finally {
    await f.cleanup();
  }
});

test('BLOCK_STATUS reports holes and data, merges runs, and REQ_ONE returns one extent within the request', async () => {
  await withServer(async (f, dev) => {
    dev.writeSync(Buffer.alloc(128 * KiB, 1), 64 * KiB); // data at [64K, 192K)
    const { client } = await f.open({ blockStatus: true });
    const r = await client.request({ type: Cmd.BLOCK_STATUS, offset: 0, length: 512 * KiB });
    ok(r);
    assert.equal(r.status.length, 1);
    assert.deepEqual(r.status[0]?.extents, [
      { length: 64 * KiB, flags: State.HOLE | State.ZERO },
      { length: 128 * KiB, flags: 0 },
      { length: 320 * KiB, flags: State.HOLE | State.ZERO },
    ]);
    const one = await client.request({
      type: Cmd.BLOCK_STATUS,
      offset: 32 * KiB,
      length: 1000,
      flags: CmdFlag.REQ_ONE,
    });
    assert.deepEqual(one.status[0]?.extents, [{ length: 1000, flags: State.HOLE | State.ZERO }]);
    const one2 = await client.request({ type: Cmd.BLOCK_STATUS, offset: 0, length: SIZE, flags: CmdFlag.REQ_ONE });
    assert.deepEqual(one2.status[0]?.extents, [{ length: 64 * KiB, flags: State.HOLE | State.ZERO }]);
    assert.equal((await client.request({ type: Cmd.BLOCK_STATUS, offset: SIZE - 1, length: 2 })).error, NbdErr.EINVAL);
    assert.equal((await client.request({ type: Cmd.BLOCK_STATUS, offset: 0, length: 0 })).error, NbdErr.EINVAL);
  });
});

test('64 pipelined writes in one burst, then 64 pipelined reads, all answered correctly', async () => {
  await withServer(async (f) => {
    const { client } = await f.open();
    const blocks = Array.from({ length: 64 }, () => randomBytes(4096));
    // One socket write carrying 64 requests and their payloads.
    const burst = Buffer.concat(
      blocks.flatMap((b, i) => [
        encodeRequestHeader({ type: Cmd.WRITE, cookie: BigInt(i + 1), offset: i * 4096, length: 4096 }),
        b,
      ]),
    );
    client.send(burst);
    const cookies = new Set<bigint>();
    for (let i = 0; i < 64; i++) {
      const m = await client.nextMessage();
      assert.ok(m.kind === 'simple' && m.error === 0);
      cookies.add(m.cookie);
    }
    assert.equal(cookies.size, 64);
    const reads = await Promise.all(blocks.map((_, i) => client.readAt(i * 4096, 4096)));
    reads.forEach((r, i) => {
      assert.deepEqual(r.data, blocks[i]);
    });
  });
});

test('200 pipelined writes then DISC: every success reply once, full 64-bit cookies, before the close', async () => {
  // Success replies of one turn leave batched (64 to a buffer): the batch must carry each cookie exactly,
  // spill into a second buffer past 64, and be written before the server closes after DISC.
  await withServer(async (f) => {
    const { client } = await f.open();
    const base = 0xfedc_ba98_0000_0000n;
    const burst = Buffer.concat([
      ...Array.from({ length: 200 }, (_, i) => [
        encodeRequestHeader({ type: Cmd.WRITE, cookie: base + BigInt(i) * 0x1_0001n, offset: i * 512, length: 512 }),
        Buffer.alloc(512, i & 0xff),
      ]).flat(),
      encodeRequestHeader({ type: Cmd.DISC, cookie: 1n, offset: 0, length: 0 }),
    ]);
    client.send(burst);
    const seen: bigint[] = [];
    for (let i = 0; i < 200; i++) {
      const m = await client.nextMessage();
      assert.ok(m.kind === 'simple' && m.error === 0, `reply ${i} is a success`);
      seen.push(m.cookie);
    }
    await client.expectClose();
    assert.deepEqual(
      seen.sort((a, b) => (a < b ? -1 : a > b ? 1 : 0)),
      Array.from({ length: 200 }, (_, i) => base + BigInt(i) * 0x1_0001n),
    );
  });
});

test('replies go out as requests complete, out of order, matched by cookie', async () => {
  const dev = new ControlledDevice(new MemoryBlockDevice(SIZE));
  const f = await startServer([{ name: 'disk', device: dev }]);
  try {
    const { client } = await f.open({ structured: true });
    const release = dev.hold((op, offset) => op === 'read' && offset === 0);
    client.sendRequest({ type: Cmd.READ, cookie: 100n, offset: 0, length: 512 });
    await dev.started(1);
    client.sendRequest({ type: Cmd.READ, cookie: 200n, offset: 4096, length: 512 });
    client.sendRequest({ type: Cmd.FLUSH, cookie: 300n, offset: 0, length: 0 });
    const first = await client.nextMessage();
    const second = await client.nextMessage();
    assert.deepEqual([first.cookie, second.cookie].sort(), [200n, 300n]);
    release();
    const last = await client.nextMessage();
    assert.equal(last.cookie, 100n);
  } finally {
    await f.cleanup();
  }
});

test('a bad request magic closes that connection only; others keep working', async () => {
  const cap = captureLog();
  try {
    await withServer(async (f) => {
      const { client: good } = await f.open();
      const { client: bad } = await f.open();
      const h = encodeRequestHeader({ type: Cmd.READ, cookie: 1n, offset: 0, length: 512 });
      h.writeUInt32BE(REQUEST_MAGIC ^ 1, 0);
      bad.send(h);
      await bad.expectClose();
      assert.ok(cap.lines.some((l) => /bad request magic 0x25609512/.test(l)));
      ok(await good.writeAt(0, Buffer.from('still here')));
      assert.equal((await good.readAt(0, 10)).data?.toString(), 'still here');
    });
  } finally {
    cap.restore();
  }
});

test('a truncated header, a half-sent payload or a vanished client disturb nobody else', async () => {
  await withServer(async (f, dev) => {
    const { client: good } = await f.open({ structured: true });
    const { client: truncated } = await f.open();
    truncated.send(encodeRequestHeader({ type: Cmd.READ, cookie: 1n, offset: 0, length: 512 }).subarray(0, 10));
    truncated.end();
    await truncated.expectClose();

    const { client: halfWrite } = await f.open();
    halfWrite.send(
      encodeRequestHeader({ type: Cmd.WRITE, cookie: 1n, offset: 0, length: 8192 }),
      Buffer.alloc(3000, 9),
    );
    halfWrite.destroy();

    const { client: gone } = await f.open();
    gone.sendRequest({ type: Cmd.READ, cookie: 5n, offset: 0, length: 1 * MiB });
    gone.destroy();

    ok(await good.writeAt(MiB, Buffer.from('fine')));
    assert.equal((await good.readAt(MiB, 4)).data?.toString(), 'fine');
    const check = Buffer.alloc(3000);
    dev.readSync(check, 0);
    assert.ok(check.equals(Buffer.alloc(3000)), 'the half-sent write was never applied');
  });
});

test('a rejected WRITE with a payload too large to skip ends the connection', async () => {
  const f = await startServer([{ name: 'disk', device: new MemoryBlockDevice(SIZE) }], { maxDiscardedPayload: MiB });
  const cap = captureLog();
  try {
    const { client } = await f.open();
    client.send(encodeRequestHeader({ type: Cmd.WRITE, cookie: 1n, offset: SIZE, length: 2 * MiB }));
    await client.expectClose();
    assert.ok(cap.lines.some((l) => /too large to skip/.test(l)));
    // Within the limit, the payload is skipped and the error returned.
    const { client: c2 } = await f.open();
    assert.equal((await c2.writeAt(SIZE, Buffer.alloc(MiB))).error, NbdErr.ENOSPC);
    ok(await c2.readAt(0, 1));
  } finally {
    cap.restore();
    await f.cleanup();
  }
});

for (const [what, options, bound] of [
  ['requests', { maxInflightRequests: 8 }, 8],
  ['bytes', { maxInflightBytes: 64 * KiB }, 4],
] as const) {
  test(`a flood of requests is bounded in ${what}: the server stops reading until work completes`, async () => {
    const dev = new ControlledDevice(new MemoryBlockDevice(SIZE));
    const f = await startServer(
      [
        { name: 'disk', device: dev },
        { name: 'other', device: new MemoryBlockDevice(SIZE) },
      ],
      options,
    );
    try {
      const { client } = await f.open();
      const { client: other } = await f.open({ name: 'other' });
      dev.hold((op) => op === 'read');
      const n = 100;
      const replies = Array.from({ length: n }, (_, i) => client.readAt(i * 16 * KiB, 16 * KiB));
      await dev.started(bound);
      // Give the server every chance to read on: a full round trip on another connection.
      ok(await other.request({ type: Cmd.FLUSH, offset: 0, length: 0 }));
      assert.equal(dev.inflight, bound);
      dev.release();
      for (const r of await Promise.all(replies)) ok(r);
      assert.equal(dev.maxInflight, bound);
      assert.equal(dev.log.filter((l) => l.op === 'read').length, n);
    } finally {
      await f.cleanup();
    }
  });
}

test('DISC: requests in flight still get their replies, then the server closes', async () => {
  const dev = new ControlledDevice(new MemoryBlockDevice(SIZE));
  const f = await startServer([{ name: 'disk', device: dev }]);
  try {
    const { client } = await f.open();
    dev.hold();
    client.sendRequest({ type: Cmd.READ, cookie: 7n, offset: 0, length: 4096 });
    await dev.started(1);
    client.send(encodeRequestHeader({ type: Cmd.DISC, cookie: 8n, offset: 0, length: 0 }));
    // Anything after DISC is ignored.
    client.send(encodeRequestHeader({ type: Cmd.READ, cookie: 9n, offset: 0, length: 1 }));
    dev.release();
    const m = await client.nextMessage();
    assert.equal(m.cookie, 7n);
    assert.ok(m.kind === 'simple' && m.error === 0 && m.data?.length === 4096);
    await client.expectClose();
    assert.equal(dev.log.length, 1);
  } finally {
    await f.cleanup();
  }
});

test('a client that half-closes after sending requests still gets every reply', async () => {
  await withServer(async (f) => {
    const { client } = await f.open();
    for (let i = 0; i < 10; i++)
      client.sendRequest({ type: Cmd.READ, cookie: BigInt(i), offset: i * 512, length: 512 });
    client.end();
    for (let i = 0; i < 10; i++) assert.equal((await client.nextMessage()).kind, 'simple');
    await client.expectClose();
  });
});

test('multi-conn: a write completed on one connection is visible and flushed through another', async () => {
  const dev = new ControlledDevice(new MemoryBlockDevice(SIZE));
  const f = await startServer([{ name: 'disk', device: dev }]);
  try {
    const { client: a } = await f.open();
    const { client: b } = await f.open({ structured: true });
    ok(await a.writeAt(8192, Buffer.from('written on a')));
    ok(await b.request({ type: Cmd.FLUSH, offset: 0, length: 0 }));
    assert.deepEqual(
      dev.log.map((l) => l.op),
      ['write', 'flush'],
    );
    assert.equal((await b.readAt(8192, 12)).data?.toString(), 'written on a');
  } finally {
    await f.cleanup();
  }
});

test('requests sent together with the handshake and an immediate EOF are all answered', async () => {
  await withServer(async (f, dev) => {
    dev.writeSync(Buffer.from('pipelined'), 0);
    const c = await f.connect();
    await c.readGreeting();
    // Client flags, GO, three requests and EOF, in one burst: a scripted client that does not wait.
    c.send(
      encodeClientFlags(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES),
      encodeOptionRequest(Opt.GO, encodeInfoRequest({ name: 'disk', requests: [] })),
      encodeRequestHeader({ type: Cmd.WRITE, cookie: 1n, offset: 100, length: 3 }),
      Buffer.from('abc'),
      encodeRequestHeader({ type: Cmd.FLUSH, cookie: 2n, offset: 0, length: 0 }),
      encodeRequestHeader({ type: Cmd.READ, cookie: 3n, offset: 0, length: 9 }),
    );
    c.end();
    for (;;) {
      const r = await c.readOptionReply();
      if (r.type === Rep.ACK) break;
    }
    c.sendRequest({ type: Cmd.READ, cookie: 3n, offset: 0, length: 9 }); // only registers the cookie for framing
    const got = new Map<bigint, Buffer | undefined>();
    for (let i = 0; i < 3; i++) {
      const m = await c.nextMessage();
      assert.ok(m.kind === 'simple' && m.error === 0);
      got.set(m.cookie, m.data);
    }
    assert.equal(got.get(3n)?.toString(), 'pipelined');
    assert.deepEqual([...got.keys()].sort(), [1n, 2n, 3n]);
    await c.expectClose();
    const check = Buffer.alloc(3);
    dev.readSync(check, 100);
    assert.equal(check.toString(), 'abc');
  });
});

test('requests held back by the in-flight bound are still served when the client closes its side', async () => {
  const dev = new ControlledDevice(new MemoryBlockDevice(SIZE));
  const f = await startServer([{ name: 'disk', device: dev }], { maxInflightRequests: 2 });
  try {
    const { client } = await f.open();
    dev.hold();
    for (let i = 0; i < 10; i++)
      client.sendRequest({ type: Cmd.READ, cookie: BigInt(i), offset: i * 512, length: 512 });
    client.end();
    await dev.started(2);
    dev.release();
    const cookies: bigint[] = [];
    for (let i = 0; i < 10; i++) cookies.push((await client.nextMessage()).cookie);
    assert.deepEqual(
      cookies.sort((a, b) => Number(a - b)),
      Array.from({ length: 10 }, (_, i) => BigInt(i)),
    );
    await client.expectClose();
  } finally {
    await f.cleanup();
  }
});

test('FUA reaches the device: write and write-zeroes carry it, a FUA trim is followed by a flush', async () => {
  const dev = new ControlledDevice(new MemoryBlockDevice(SIZE));
  const f = await startServer([{ name: 'disk', device: dev }]);
  try {
    const { client } = await f.open();
    ok(await client.writeAt(0, Buffer.alloc(4096, 1), CmdFlag.FUA));
    ok(await client.writeAt(4096, Buffer.alloc(4096, 2)));
    ok(await client.request({ type: Cmd.WRITE_ZEROES, offset: 0, length: 512, flags: CmdFlag.FUA | CmdFlag.NO_HOLE }));
    ok(await client.request({ type: Cmd.TRIM, offset: 65536, length: 65536, flags: CmdFlag.FUA }));
    assert.deepEqual(
      dev.log.map((l) => [l.op, l.options]),
      [
        ['write', { fua: true }],
        ['write', undefined],
        ['writeZeroes', { noHole: true, fastOnly: false, fua: true }],
        ['discard', undefined],
        ['flush', undefined],
      ],
    );
  } finally {
    await f.cleanup();
  }
});
