// NBD_OPT_STARTTLS on ubcache's server, byte by byte with the raw client (the
// rules of proto.md "TLS support"), and the TLS upgrade with ubcache's own
// client; keys and certificates made by the test (server-tls.ts reads them).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { MemoryBlockDevice } from '../../src/blockdev/memory.ts';
import { encodeInfoRequest } from '../../src/nbd/codec.ts';
import { NbdClient } from '../../src/nbd/client.ts';
import { ClientFlag, Info, Opt, Rep } from '../../src/nbd/protocol.ts';
import { loadServerTls } from '../../src/nbd/server-tls.ts';
import { TlsConfigError } from '../../src/nbd/tls.ts';
import { tempDir } from '../helpers/daemon.ts';
import { startServer, type Fixture } from '../helpers/nbd-fixture.ts';
import { makeCertificates, tlsTools } from '../helpers/tls-certs.ts';

const MiB = 1024 * 1024;
const KEY = '0123456789abcdef0123456789abcdef';

async function pskServer(dir: string, mode: 'on' | 'require'): Promise<{ f: Fixture; keys: string }> {
  const keys = join(dir, 'keys.psk');
  writeFileSync(keys, `alice:${KEY}\n`);
  const tls = loadServerTls({ mode, psk: keys });
  assert.ok(tls);
  const f = await startServer([{ name: 'disk', device: new MemoryBlockDevice(4 * MiB) }], { tls });
  return { f, keys };
}

test('--tls=require: every option in clear but STARTTLS and ABORT gets NBD_REP_ERR_TLS_REQD; EXPORT_NAME is hung up on', async () => {
  using tmp = tempDir();
  const { f } = await pskServer(tmp.dir, 'require');
  try {
    const c = await f.connect();
    await c.readGreeting();
    c.sendClientFlags(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES);
    for (const [option, data] of [
      [Opt.LIST, undefined],
      [Opt.STRUCTURED_REPLY, undefined],
      [Opt.INFO, encodeInfoRequest({ name: 'disk', requests: [Info.BLOCK_SIZE] })],
      [Opt.GO, encodeInfoRequest({ name: 'disk', requests: [] })],
      [99, Buffer.from('x')],
    ] as const) {
      const r = await c.option(option, data);
      assert.deepEqual(
        r.map((x) => x.type),
        [Rep.ERR_TLS_REQD],
        `option ${option}`,
      );
      assert.match(r[0]?.data.toString() ?? '', /requires TLS/);
    }
    // STARTTLS with data is malformed; the connection goes on.
    assert.equal((await c.option(Opt.STARTTLS, Buffer.from('x')))[0]?.type, Rep.ERR_INVALID);
    c.sendOption(Opt.EXPORT_NAME, Buffer.from('disk'));
    await c.expectClose();
    const d = await f.connect();
    await d.readGreeting();
    d.sendClientFlags(ClientFlag.C_FIXED_NEWSTYLE);
    assert.equal((await d.option(Opt.ABORT))[0]?.type, Rep.ACK, 'ABORT is allowed in clear');
  } finally {
    await f.cleanup();
  }
});

test('--tls=on: clear clients are served; STARTTLS upgrades, options negotiated in clear are forgotten', async () => {
  using tmp = tempDir();
  const { f, keys } = await pskServer(tmp.dir, 'on');
  try {
    const clear = await NbdClient.connect(`nbd+unix:///disk?socket=${f.socketPath}`);
    await clear.write(Buffer.alloc(4096, 3), 0);
    await clear.close();
    const secure = await NbdClient.connect(
      `nbds+unix:///disk?socket=${f.socketPath}&tls-psk-file=${keys}&tls-username=alice`,
    );
    const b = Buffer.alloc(4096);
    await secure.read(b, 0);
    assert.ok(b.every((x) => x === 3));
    assert.equal(secure.info.structuredReplies, true, 'negotiated again inside TLS');
    await secure.close();
    // A server without TLS refuses STARTTLS in a way the client reports.
    const plain = await startServer([{ name: 'disk', device: new MemoryBlockDevice(MiB) }]);
    try {
      await assert.rejects(
        NbdClient.connect(`nbds+unix:///disk?socket=${plain.socketPath}&tls-psk-file=${keys}&tls-username=alice`),
        /refused NBD_OPT_STARTTLS \(NBD_REP_ERR_UNSUP.*does not offer TLS/,
      );
    } finally {
      await plain.cleanup();
    }
  } finally {
    await f.cleanup();
  }
});

test(
  'loadServerTls: what cannot work is refused with the reason',
  { skip: !tlsTools.certtool && 'certtool (gnutls-bin) is not installed' },
  () => {
    using tmp = tempDir();
    const certs = makeCertificates(tmp.dir);
    assert.equal(loadServerTls({ mode: 'off' }), undefined);
    const x = loadServerTls({ mode: 'require', certificates: certs.serverDir, verifyPeer: true });
    assert.ok(x);
    assert.equal(x.required, true);
    assert.match(x.describe, /X\.509 \(.*server, clients verified\)/);
    const bad: [Parameters<typeof loadServerTls>[0], RegExp][] = [
      [{ mode: 'on', certificates: certs.clientDir }, /server-cert\.pem does not exist/],
      [{ mode: 'on', certificates: certs.serverDir, psk: 'k' }, /exclude each other/],
      [{ mode: 'on', psk: join(tmp.dir, 'nope') }, /cannot read the PSK file .*nope \(ENOENT\)/],
      [{ mode: 'off', verifyPeer: true }, /need --tls=on or --tls=require/],
    ];
    writeFileSync(join(tmp.dir, 'empty.psk'), '# nothing\n');
    bad.push([{ mode: 'on', psk: join(tmp.dir, 'empty.psk') }, /holds no keys/]);
    for (const [settings, pattern] of bad) {
      assert.throws(
        () => loadServerTls(settings),
        (err: unknown) => err instanceof TlsConfigError && pattern.test(err.message),
      );
    }
  },
);
