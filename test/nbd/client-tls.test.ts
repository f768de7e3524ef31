// The NBD client over TLS (nbds+unix:// URIs) against nbdkit --tls=require:
// PSK keys made by psktool, X.509 certificates made by certtool; the
// refusals say what went wrong; a restarted TLS server is reconnected to.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { NbdClient } from '../../src/nbd/client.ts';
import { sparseFile, tempDir } from '../helpers/daemon.ts';
import { startNbdkit, tools, type ChildServer } from '../helpers/nbd-servers.ts';
import { makeCertificates, makePskFile, tlsTools } from '../helpers/tls-certs.ts';

const KiB = 1024;
const MiB = 1024 * 1024;

const skipPsk =
  (!tools.nbdkit && 'nbdkit is not installed') || (!tlsTools.psktool && 'psktool (gnutls-bin) is not installed');
const skipX509 =
  (!tools.nbdkit && 'nbdkit is not installed') || (!tlsTools.certtool && 'certtool (gnutls-bin) is not installed');

/** nbds+unix URI for the nbdkit socket with TLS parameters. */
function tlsUri(srv: ChildServer, params: Record<string, string>): string {
  const q = Object.entries(params)
    .map(([k, v]) => `&${k}=${encodeURIComponent(v)}`)
    .join('');
  return srv.uri().replace(/^nbd\+unix:/, 'nbds+unix:') + q;
}

async function roundTrip(c: NbdClient): Promise<void> {
  const data = randomBytes(256 * KiB + 512);
  await c.write(data, MiB);
  const back = Buffer.alloc(data.length);
  await c.read(back, MiB);
  assert.ok(back.equals(data), 'read back over TLS');
}

test(
  'PSK: nbdkit --tls=require --tls-psk; the key of tls-username; in clear, a wrong key or user: refused with the reason',
  { skip: skipPsk },
  async () => {
    using tmp = tempDir();
    const keys = makePskFile(tmp.dir, ['alice', 'bob']);
    const srv = await startNbdkit(tmp.dir, ['--tls=require', `--tls-psk=${keys}`, 'memory', '16M']);
    try {
      const c = await NbdClient.connect(tlsUri(srv, { 'tls-psk-file': keys, 'tls-username': 'alice' }));
      try {
        assert.equal(c.size, 16 * MiB);
        assert.equal(c.info.structuredReplies, true, 'options negotiated inside TLS');
        await roundTrip(c);
      } finally {
        await c.close();
      }
      await assert.rejects(
        NbdClient.connect(srv.uri()),
        /the server requires TLS .*use an nbds:\/\/ or nbds\+unix:\/\/ URI/,
      );
      // Same user, another key: the handshake fails, and says which credentials were tried.
      using other = tempDir();
      const wrong = makePskFile(other.dir, ['alice']);
      await assert.rejects(
        NbdClient.connect(tlsUri(srv, { 'tls-psk-file': wrong, 'tls-username': 'alice' })),
        /the TLS handshake failed \(PSK user alice\)/,
      );
      await assert.rejects(
        NbdClient.connect(tlsUri(srv, { 'tls-psk-file': keys, 'tls-username': 'carol' })),
        /keys\.psk has no key for user 'carol'/,
      );
    } finally {
      await srv.stop();
    }
  },
);

test(
  'X.509: the server verified by its CA; a client certificate for --tls-verify-peer; another CA refused unless tls-verify-peer=false',
  { skip: skipX509 },
  async () => {
    using tmp = tempDir();
    const certs = makeCertificates(tmp.dir);
    const srv = await startNbdkit(tmp.dir, ['--tls=require', `--tls-certificates=${certs.serverDir}`, 'memory', '16M']);
    try {
      const c = await NbdClient.connect(tlsUri(srv, { 'tls-certificates': certs.caOnlyDir }));
      try {
        await roundTrip(c);
      } finally {
        await c.close();
      }
      await assert.rejects(
        NbdClient.connect(tlsUri(srv, { 'tls-certificates': certs.otherCaDir })),
        /the TLS handshake failed \(X\.509 \(CA .*other\/ca-cert\.pem\)\): .*(certificate|verify)/i,
      );
      const unverified = await NbdClient.connect(
        tlsUri(srv, { 'tls-certificates': certs.otherCaDir, 'tls-verify-peer': 'false' }),
      );
      await unverified.close();
    } finally {
      await srv.stop();
    }
    // The server asks for a client certificate: the client directory has one.
    using tmp2 = tempDir();
    const peer = await startNbdkit(tmp2.dir, [
      '--tls=require',
      `--tls-certificates=${certs.serverDir}`,
      '--tls-verify-peer',
      'memory',
      '16M',
    ]);
    try {
      const c = await NbdClient.connect(tlsUri(peer, { 'tls-certificates': certs.clientDir }));
      try {
        await roundTrip(c);
      } finally {
        await c.close();
      }
      await assert.rejects(
        NbdClient.connect(tlsUri(peer, { 'tls-certificates': certs.caOnlyDir })),
        /right after the TLS handshake \(X\.509 \(CA .*\)\): the server may have refused our credentials/,
      );
    } finally {
      await peer.stop();
    }
  },
);

test(
  'a TLS server killed and restarted: the client reconnects with a new TLS handshake and goes on',
  { skip: skipPsk },
  async () => {
    using tmp = tempDir();
    const keys = makePskFile(tmp.dir, ['alice']);
    const file = sparseFile(join(tmp.dir, 'disk.img'), 8 * MiB);
    const args = ['--tls=require', `--tls-psk=${keys}`, 'file', file];
    let srv: ChildServer = await startNbdkit(tmp.dir, args);
    const c = await NbdClient.connect(tlsUri(srv, { 'tls-psk-file': keys, 'tls-username': 'alice' }));
    try {
      const data = randomBytes(64 * KiB);
      await c.write(data, 0);
      await srv.kill();
      rmSync(srv.socket, { force: true });
      rmSync(join(tmp.dir, 'nbdkit.pid'), { force: true });
      const pending = c.read(Buffer.alloc(4096), 0);
      srv = await startNbdkit(tmp.dir, args);
      await pending;
      const back = Buffer.alloc(data.length);
      await c.read(back, 0);
      assert.ok(back.equals(data));
      assert.equal(c.reconnects, 1);
    } finally {
      await c.close();
      await srv.stop();
    }
  },
);
