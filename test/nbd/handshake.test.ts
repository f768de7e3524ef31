// The handshake as the spec prescribes it, driven byte by byte with the raw
// client against an in-process server on a memory device.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryBlockDevice } from '../../src/blockdev/memory.ts';
import {
  decodeInfoReply,
  decodeRepMetaContext,
  decodeRepServer,
  encodeInfoRequest,
  encodeMetaContextRequest,
} from '../../src/nbd/codec.ts';
import {
  BASE_ALLOCATION,
  ClientFlag,
  Cmd,
  HandshakeFlag,
  Info,
  NbdErr,
  Opt,
  Rep,
  TxFlag,
} from '../../src/nbd/protocol.ts';
import { startServer, type Fixture } from '../helpers/nbd-fixture.ts';
import type { RawNbdClient } from '../helpers/nbd-raw-client.ts';

const MiB = 1024 * 1024;

async function twoExports(): Promise<Fixture> {
  return startServer([
    { name: 'disk', description: 'the main disk', device: new MemoryBlockDevice(4 * MiB) },
    { name: 'small', device: new MemoryBlockDevice(64 * 1024), readOnly: true },
  ]);
}

/** Connect and get past the greeting with the usual client flags. */
async function greeted(
  f: Fixture,
  flags = ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES,
): Promise<RawNbdClient> {
  const c = await f.connect();
  const g = await c.readGreeting();
  assert.equal(g.handshakeFlags, HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES);
  c.sendClientFlags(flags);
  return c;
}

test('GO answers INFO_EXPORT, NAME, DESCRIPTION and BLOCK_SIZE, then ACK, then transmission', async () => {
  const f = await twoExports();
  try {
    const c = await greeted(f);
    const replies = await c.option(
      Opt.GO,
      encodeInfoRequest({ name: 'disk', requests: [Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE] }),
    );
    assert.deepEqual(
      replies.map((r) => r.type),
      [Rep.INFO, Rep.INFO, Rep.INFO, Rep.INFO, Rep.ACK],
    );
    const infos = replies.slice(0, 4).map((r) => decodeInfoReply(r.data));
    const flags =
      TxFlag.HAS_FLAGS |
      TxFlag.SEND_FLUSH |
      TxFlag.SEND_FUA |
      TxFlag.SEND_TRIM |
      TxFlag.SEND_WRITE_ZEROES |
      TxFlag.CAN_MULTI_CONN |
      TxFlag.SEND_CACHE |
      TxFlag.SEND_FAST_ZERO;
    assert.deepEqual(infos, [
      { type: Info.EXPORT, size: 4 * MiB, flags },
      { type: Info.NAME, name: 'disk' },
      { type: Info.DESCRIPTION, description: 'the main disk' },
      { type: Info.BLOCK_SIZE, sizes: { min: 1, preferred: 4096, max: 32 * MiB } },
    ]);
    // Transmission has started: a READ gets a simple reply.
    const r = await c.readAt(0, 512);
    assert.equal(r.error, 0);
    assert.deepEqual(r.data, Buffer.alloc(512));
  } finally {
    await f.cleanup();
  }
});

test('INFO stays in negotiation and a following GO gives identical information', async () => {
  const f = await twoExports();
  try {
    const c = await greeted(f);
    const data = encodeInfoRequest({ name: 'small', requests: [Info.BLOCK_SIZE] });
    const info = await c.option(Opt.INFO, data);
    const go = await c.option(Opt.GO, data);
    assert.deepEqual(
      go,
      info.map((r) => ({ ...r, option: Opt.GO })),
    );
    const exp = decodeInfoReply(info[0]?.data ?? Buffer.alloc(0));
    assert.ok('flags' in exp && (exp.flags & TxFlag.READ_ONLY) !== 0);
    assert.equal(exp.flags & (TxFlag.SEND_TRIM | TxFlag.SEND_WRITE_ZEROES | TxFlag.SEND_FAST_ZERO), 0);
  } finally {
    await f.cleanup();
  }
});

test('the empty name selects the first export, and INFO_NAME gives its canonical name', async () => {
  const f = await twoExports();
  try {
    const c = await greeted(f);
    const n = await c.info(Opt.GO, '', [Info.NAME]);
    assert.equal(n.size, 4 * MiB);
    assert.deepEqual(
      n.infos.find((i) => i.type === Info.NAME),
      { type: Info.NAME, name: 'disk' },
    );
  } finally {
    await f.cleanup();
  }
});

test('an unknown export gets ERR_UNKNOWN naming the exports, and negotiation continues', async () => {
  const f = await twoExports();
  try {
    const c = await greeted(f);
    for (const option of [Opt.INFO, Opt.GO]) {
      const [r] = await c.option(option, encodeInfoRequest({ name: 'nope', requests: [] }));
      assert.equal(r?.type, Rep.ERR_UNKNOWN);
      assert.match(r.data.toString(), /no export named 'nope'; exports: 'disk', 'small'/);
    }
    const n = await c.info(Opt.GO, 'small', []);
    assert.equal(n.size, 64 * 1024);
  } finally {
    await f.cleanup();
  }
});

test('malformed INFO/GO data gets ERR_INVALID and negotiation continues', async () => {
  const f = await twoExports();
  try {
    const c = await greeted(f);
    const [short] = await c.option(Opt.GO, Buffer.alloc(3));
    assert.equal(short?.type, Rep.ERR_INVALID);
    const bad = encodeInfoRequest({ name: 'disk', requests: [1] });
    bad.writeUInt16BE(5, 8); // claims 5 requests, carries 1
    const [r] = await c.option(Opt.GO, bad);
    assert.equal(r?.type, Rep.ERR_INVALID);
    assert.match(r.data.toString(), /5 information requests need 10 bytes but 2 were sent/);
    assert.equal((await c.info(Opt.GO, 'disk', [])).size, 4 * MiB);
  } finally {
    await f.cleanup();
  }
});

test('EXPORT_NAME is the fallback: 134-byte reply, or 10 bytes with NO_ZEROES, then transmission', async () => {
  const f = await twoExports();
  try {
    for (const clientFlags of [ClientFlag.C_FIXED_NEWSTYLE, ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES, 0]) {
      const { client, size, flags } = await f.open({ name: 'small', exportName: true, clientFlags });
      assert.equal(size, 64 * 1024);
      assert.ok(flags & TxFlag.READ_ONLY);
      const r = await client.readAt(1000, 24);
      assert.equal(r.error, 0);
      assert.equal(r.data?.length, 24);
    }
  } finally {
    await f.cleanup();
  }
});

test('EXPORT_NAME for an unknown export ends the session (it cannot carry an error)', async () => {
  const f = await twoExports();
  try {
    const c = await greeted(f);
    c.sendOption(Opt.EXPORT_NAME, Buffer.from('nope'));
    await c.expectClose();
  } finally {
    await f.cleanup();
  }
});

test('LIST names every export with its description; LIST with data is ERR_INVALID', async () => {
  const f = await twoExports();
  try {
    const c = await greeted(f);
    const replies = await c.option(Opt.LIST);
    assert.deepEqual(
      replies.map((r) => r.type),
      [Rep.SERVER, Rep.SERVER, Rep.ACK],
    );
    assert.deepEqual(
      replies.slice(0, 2).map((r) => decodeRepServer(r.data)),
      [
        { name: 'disk', description: 'the main disk' },
        { name: 'small', description: '' },
      ],
    );
    const [bad] = await c.option(Opt.LIST, Buffer.from('x'));
    assert.equal(bad?.type, Rep.ERR_INVALID);
  } finally {
    await f.cleanup();
  }
});

test('ABORT is acknowledged (data ignored) and the server closes', async () => {
  const f = await twoExports();
  try {
    const c = await greeted(f);
    const [r] = await c.option(Opt.ABORT, Buffer.from('ignored'));
    assert.equal(r?.type, Rep.ACK);
    c.end();
    await c.expectClose();
  } finally {
    await f.cleanup();
  }
});

test('every unsupported or unknown option gets ERR_UNSUP and negotiation continues', async () => {
  const f = await twoExports();
  try {
    const c = await greeted(f);
    for (const option of [Opt.PEEK_EXPORT, Opt.STARTTLS, Opt.EXTENDED_HEADERS, 0, 12, 99, 0xffffffff]) {
      const [r] = await c.option(option, Buffer.from('some data'));
      assert.equal(r?.type, Rep.ERR_UNSUP, `option ${option}`);
      assert.ok(r.data.length > 0, 'the error carries a message');
    }
    assert.equal((await c.option(Opt.LIST)).length, 3);
  } finally {
    await f.cleanup();
  }
});

test('STRUCTURED_REPLY: data is ERR_INVALID, no data is ACK and READ replies become structured', async () => {
  const f = await twoExports();
  try {
    const c = await greeted(f);
    assert.equal((await c.option(Opt.STRUCTURED_REPLY, Buffer.from([0])))[0]?.type, Rep.ERR_INVALID);
    assert.equal((await c.option(Opt.STRUCTURED_REPLY))[0]?.type, Rep.ACK);
    await c.info(Opt.GO, 'disk', []);
    const r = await c.readAt(0, 100);
    assert.equal(r.structured, true);
    assert.deepEqual(r.data, Buffer.alloc(100));
  } finally {
    await f.cleanup();
  }
});

test('meta context options need structured replies first', async () => {
  const f = await twoExports();
  try {
    const c = await greeted(f);
    const data = encodeMetaContextRequest({ exportName: 'disk', queries: [BASE_ALLOCATION] });
    for (const option of [Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT]) {
      const [r] = await c.option(option, data);
      assert.equal(r?.type, Rep.ERR_INVALID);
      assert.match(r.data.toString(), /send NBD_OPT_STRUCTURED_REPLY first/);
    }
  } finally {
    await f.cleanup();
  }
});

test('LIST_META_CONTEXT lists base:allocation for no query, base: and base:allocation; ignores other namespaces', async () => {
  const f = await twoExports();
  try {
    const c = await greeted(f);
    await c.option(Opt.STRUCTURED_REPLY);
    const list = async (exportName: string, queries: string[]): Promise<{ type: number; data: Buffer }[]> =>
      c.option(Opt.LIST_META_CONTEXT, encodeMetaContextRequest({ exportName, queries }));
    for (const queries of [[], ['base:'], [BASE_ALLOCATION], ['qemu:dirty-bitmap:x', 'base:']]) {
      const r = await list('disk', queries);
      assert.deepEqual(
        r.map((x) => x.type),
        [Rep.META_CONTEXT, Rep.ACK],
        JSON.stringify(queries),
      );
      assert.deepEqual(decodeRepMetaContext(r[0]?.data ?? Buffer.alloc(4)), { id: 0, name: BASE_ALLOCATION });
    }
    for (const queries of [['qemu:allocation-depth'], ['base:other']]) {
      assert.deepEqual(
        (await list('disk', queries)).map((x) => x.type),
        [Rep.ACK],
      );
    }
    assert.equal((await list('disk', ['nocolon']))[0]?.type, Rep.ERR_INVALID);
    assert.equal((await list('nope', []))[0]?.type, Rep.ERR_UNKNOWN);
    assert.equal((await c.option(Opt.LIST_META_CONTEXT, Buffer.alloc(3)))[0]?.type, Rep.ERR_INVALID);
  } finally {
    await f.cleanup();
  }
});

test('SET_META_CONTEXT selects base:allocation for the export GO then enters; BLOCK_STATUS works', async () => {
  const f = await twoExports();
  try {
    const c = await greeted(f);
    await c.option(Opt.STRUCTURED_REPLY);
    const r = await c.option(
      Opt.SET_META_CONTEXT,
      encodeMetaContextRequest({ exportName: 'disk', queries: ['base:', 'x-foo:bar', BASE_ALLOCATION] }),
    );
    assert.deepEqual(
      r.map((x) => x.type),
      [Rep.META_CONTEXT, Rep.ACK],
    );
    const ctx = decodeRepMetaContext(r[0]?.data ?? Buffer.alloc(4));
    assert.equal(ctx.name, BASE_ALLOCATION);
    await c.info(Opt.GO, 'disk', []);
    const s = await c.request({ type: Cmd.BLOCK_STATUS, offset: 0, length: 4096 });
    assert.equal(s.error, 0);
    assert.equal(s.status[0]?.contextId, ctx.id);
  } finally {
    await f.cleanup();
  }
});

test('a selection made for another export, or cleared by a later SET, does not carry into transmission', async () => {
  const f = await twoExports();
  try {
    const select = async (c: RawNbdClient, exportName: string, queries: string[]): Promise<void> => {
      await c.option(Opt.SET_META_CONTEXT, encodeMetaContextRequest({ exportName, queries }));
    };
    const a = await greeted(f);
    await a.option(Opt.STRUCTURED_REPLY);
    await select(a, 'small', [BASE_ALLOCATION]);
    await a.info(Opt.GO, 'disk', []);
    const ra = await a.request({ type: Cmd.BLOCK_STATUS, offset: 0, length: 4096 });
    assert.equal(ra.error, NbdErr.EINVAL);

    const b = await greeted(f);
    await b.option(Opt.STRUCTURED_REPLY);
    await select(b, 'disk', [BASE_ALLOCATION]);
    await select(b, 'disk', []); // zero queries select nothing
    await b.info(Opt.GO, 'disk', []);
    assert.equal((await b.request({ type: Cmd.BLOCK_STATUS, offset: 0, length: 4096 })).error, NbdErr.EINVAL);

    const c = await greeted(f);
    await c.option(Opt.STRUCTURED_REPLY);
    const [unknown] = await c.option(
      Opt.SET_META_CONTEXT,
      encodeMetaContextRequest({ exportName: 'nope', queries: [BASE_ALLOCATION] }),
    );
    assert.equal(unknown?.type, Rep.ERR_UNKNOWN);
  } finally {
    await f.cleanup();
  }
});

test('protocol violations in the handshake close only that connection', async () => {
  const f = await twoExports();
  try {
    const badFlags = await greeted(f, 0x4);
    await badFlags.expectClose();

    const badMagic = await greeted(f);
    badMagic.send(Buffer.from('IHAVEOPX'), Buffer.alloc(8));
    await badMagic.expectClose();

    const hugeExportName = await greeted(f);
    hugeExportName.sendOption(Opt.EXPORT_NAME, Buffer.alloc(0), 100_000);
    await hugeExportName.expectClose();

    const absurd = await greeted(f);
    absurd.sendOption(Opt.LIST, Buffer.alloc(0), 0xffffffff);
    await absurd.expectClose();

    // Meanwhile a well-behaved client is served.
    const { client } = await f.open({ name: 'disk' });
    assert.equal((await client.readAt(0, 1)).error, 0);
  } finally {
    await f.cleanup();
  }
});

test('an oversized option is read past and answered ERR_TOO_BIG; negotiation continues', async () => {
  const f = await twoExports();
  try {
    const c = await greeted(f);
    const [r] = await c.option(Opt.INFO, Buffer.alloc(200_000));
    assert.equal(r?.type, Rep.ERR_TOO_BIG);
    assert.equal((await c.info(Opt.GO, 'disk', [])).size, 4 * MiB);
  } finally {
    await f.cleanup();
  }
});

test('a client that vanishes mid-handshake leaves the server serving others', async () => {
  const f = await twoExports();
  try {
    const a = await greeted(f);
    a.send(Buffer.from('IHAVEOPT'), Buffer.from([0, 0, 0, 7, 0, 0, 0, 20, 0, 0])); // GO, truncated data
    a.destroy();
    const b = await f.connect();
    b.destroy(); // before even reading the greeting
    const { client } = await f.open({ name: 'disk', structured: true });
    assert.equal((await client.readAt(0, 8)).error, 0);
  } finally {
    await f.cleanup();
  }
});
