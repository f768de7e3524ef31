// TLS on ubcache's own server, end to end with the built command and
// libnbd's tools: `ubcache export --tls=require` refuses a client in clear
// with NBD_REP_ERR_TLS_REQD and serves nbdinfo and nbdcopy over TLS, with a
// PSK made by psktool and with X.509 certificates made by certtool (fio too,
// with X.509: its nbd engine refuses the URI's tls-psk-file; client
// certificates checked with --tls-verify-peer); --tls=on serves both; bad
// settings are refused before anything is opened; `ubcache serve` speaks TLS
// the same way, and reaches a backing device behind nbdkit --tls=require.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { execFile } from 'node:child_process';
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { NbdClient } from '../../src/nbd/client.ts';
import { have, run, sparseFile, startExport, tempDir, ubcache } from '../helpers/daemon.ts';
import { makeCertificates, makePskFile, tlsTools } from '../helpers/tls-certs.ts';
import { startNbdkit, tools } from '../helpers/nbd-servers.ts';
import { makeImages, startServe } from './serve-helpers.ts';

const MiB = 1024 * 1024;
const libnbd = have('nbdinfo') && have('nbdcopy');
const skipPsk =
  (!libnbd && 'nbdinfo/nbdcopy (libnbd-bin) are not installed') ||
  (!tlsTools.psktool && 'psktool (gnutls-bin) is not installed');
const skipX509 =
  (!libnbd && 'nbdinfo/nbdcopy (libnbd-bin) are not installed') ||
  (!tlsTools.certtool && 'certtool (gnutls-bin) is not installed');

/** nbdinfo URI for an export over TLS: nbds+unix://USER@/NAME?socket=...&params. */
function tlsUri(socket: string, name: string, params: Record<string, string>, user?: string): string {
  const q = Object.entries(params)
    .map(([k, v]) => `&${k}=${encodeURIComponent(v)}`)
    .join('');
  return `nbds+unix://${user === undefined ? '' : `${user}@`}/${name}?socket=${encodeURIComponent(socket)}${q}`;
}

/** Run a command with its own environment; its stdout. */
function runWithEnv(cmd: string, args: string[], env: NodeJS.ProcessEnv): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { env, maxBuffer: 16 * 1024 * 1024 }, (err, stdout, stderr) => {
      if (err) reject(new Error(`${cmd} failed: ${err.message}\n${stderr}`));
      else resolve(stdout);
    });
  });
}

/** Run a command expected to fail; its stderr. */
async function fails(cmd: string, args: string[]): Promise<string> {
  try {
    await run(cmd, args);
  } catch (err) {
    return String(err);
  }
  assert.fail(`${cmd} ${args.join(' ')} succeeded`);
}

/** nbdcopy a random file into the export and back out; both copies and the file behind the export agree. */
async function copyThrough(dir: string, uri: string, disk: string): Promise<void> {
  const data = randomBytes(4 * MiB);
  const src = join(dir, 'src.bin');
  const back = join(dir, 'back.bin');
  writeFileSync(src, data);
  await run('nbdcopy', ['--flush', src, uri]);
  await run('nbdcopy', [uri, back]);
  assert.ok(readFileSync(back).subarray(0, data.length).equals(data), 'nbdcopy reads back what it wrote over TLS');
  assert.ok(readFileSync(disk).subarray(0, data.length).equals(data), 'the file behind the export holds it');
}

test(
  'export --tls=require --tls-psk: refused in clear (NBD_REP_ERR_TLS_REQD); nbdinfo and nbdcopy over TLS',
  { skip: skipPsk },
  async () => {
    using tmp = tempDir();
    const keys = makePskFile(tmp.dir, ['alice', 'bob']);
    const disk = sparseFile(join(tmp.dir, 'disk.img'), 16 * MiB);
    const srv = await startExport(tmp.dir, ['--tls=require', `--tls-psk=${keys}`, disk]);
    try {
      assert.ok(srv.daemon.lines.some((l) => /TLS required: PSK \(.*keys\.psk, 2 user\(s\)\)/.test(l)));
      // In clear: libnbd's nbdinfo gives up, and the spec's error is what the server sent.
      const clear = await fails('nbdinfo', [srv.uri('disk.img')]);
      assert.match(clear, /nbd_opt_go: server replied with error/);
      await assert.rejects(NbdClient.connect(srv.uri('disk.img')), /the server requires TLS \(NBD_REP_ERR_TLS_REQD/);
      const uri = tlsUri(srv.socket, 'disk.img', { 'tls-psk-file': keys }, 'alice');
      const info = await run('nbdinfo', [uri]);
      assert.match(info, /protocol: newstyle-fixed with TLS, using structured packets/);
      assert.match(info, /export-size: 16777216/);
      await copyThrough(tmp.dir, uri, disk);
      // A key that is not the server's: the TLS handshake fails, and the server goes on serving others.
      using other = tempDir();
      const wrong = makePskFile(other.dir, ['alice']);
      await fails('nbdinfo', [tlsUri(srv.socket, 'disk.img', { 'tls-psk-file': wrong }, 'alice')]);
      await run('nbdinfo', [tlsUri(srv.socket, 'disk.img', { 'tls-psk-file': keys }, 'bob')]);
      // ubcache's own client over TLS to ubcache's server.
      const c = await NbdClient.connect(
        tlsUri(srv.socket, 'disk.img', { 'tls-psk-file': keys, 'tls-username': 'bob' }),
      );
      const buf = Buffer.alloc(4096);
      await c.read(buf, 0);
      assert.ok(buf.equals(readFileSync(disk).subarray(0, 4096)));
      await c.close();
    } finally {
      await srv.daemon.stop().finally(() => srv.daemon.kill());
    }
    assert.ok(
      srv.daemon.lines.some((l) => /TLS handshake failed \(PSK/.test(l)),
      'the failed handshake is logged',
    );
  },
);

test(
  'export --tls=require --tls-certificates: nbdinfo, nbdcopy and fio verify the server by its CA; --tls-verify-peer wants a client certificate',
  { skip: skipX509 },
  async () => {
    using tmp = tempDir();
    const certs = makeCertificates(tmp.dir);
    const disk = sparseFile(join(tmp.dir, 'disk.img'), 16 * MiB);
    {
      const srv = await startExport(tmp.dir, ['--tls=require', `--tls-certificates=${certs.serverDir}`, disk]);
      try {
        await fails('nbdinfo', [srv.uri('disk.img')]);
        const uri = tlsUri(srv.socket, 'disk.img', { 'tls-certificates': certs.caOnlyDir });
        assert.match(await run('nbdinfo', [uri]), /with TLS/);
        await copyThrough(tmp.dir, uri, disk);
        if (have('fio')) {
          // fio's nbd engine refuses URI parameters naming local files, so libnbd finds the CA in its
          // default directory ($HOME/.pki/libnbd); HOME points at one made here.
          const home = join(tmp.dir, 'home');
          mkdirSync(join(home, '.pki', 'libnbd'), { recursive: true });
          copyFileSync(join(certs.caOnlyDir, 'ca-cert.pem'), join(home, '.pki', 'libnbd', 'ca-cert.pem'));
          const out = await runWithEnv(
            'fio',
            [
              '--name=tls',
              '--ioengine=nbd',
              `--uri=nbds+unix:///disk.img?socket=${srv.socket}`,
              '--rw=randwrite',
              '--bs=4k',
              '--size=8M',
              '--iodepth=16',
              '--verify=crc32c',
              '--do_verify=1',
              '--verify_fatal=1',
              '--verify_state_save=0',
              '--output-format=json',
              `--directory=${tmp.dir}`,
            ],
            { ...process.env, HOME: home },
          );
          const json = JSON.parse(out.slice(out.indexOf('{'))) as { jobs: { error: number }[] };
          assert.deepEqual(
            json.jobs.map((j) => j.error),
            [0],
            'fio over TLS: every block verified',
          );
        }
        // ubcache's client verifies the server's chain: trusting another CA, it refuses the server.
        await assert.rejects(
          NbdClient.connect(tlsUri(srv.socket, 'disk.img', { 'tls-certificates': certs.otherCaDir })),
          /the TLS handshake failed \(X\.509/,
        );
        const c = await NbdClient.connect(tlsUri(srv.socket, 'disk.img', { 'tls-certificates': certs.caOnlyDir }));
        await c.close();
      } finally {
        await srv.daemon.stop().finally(() => srv.daemon.kill());
      }
    }
    using tmp2 = tempDir();
    const srv = await startExport(tmp2.dir, [
      '--tls=require',
      `--tls-certificates=${certs.serverDir}`,
      '--tls-verify-peer',
      disk,
    ]);
    try {
      assert.match(
        await run('nbdinfo', [tlsUri(srv.socket, 'disk.img', { 'tls-certificates': certs.clientDir })]),
        /with TLS/,
      );
      await fails('nbdinfo', [tlsUri(srv.socket, 'disk.img', { 'tls-certificates': certs.caOnlyDir })]);
    } finally {
      await srv.daemon.stop().finally(() => srv.daemon.kill());
    }
    assert.ok(
      srv.daemon.lines.some((l) => /TLS handshake failed/.test(l)),
      'the client without a certificate is logged',
    );
  },
);

test('export --tls=on: clients in clear and over TLS are both served', { skip: skipPsk }, async () => {
  using tmp = tempDir();
  const keys = makePskFile(tmp.dir, ['alice']);
  const disk = sparseFile(join(tmp.dir, 'disk.img'), 4 * MiB);
  const srv = await startExport(tmp.dir, ['--tls=on', `--tls-psk=${keys}`, disk]);
  try {
    assert.match(await run('nbdinfo', [srv.uri('disk.img')]), /without TLS/);
    assert.match(await run('nbdinfo', [tlsUri(srv.socket, 'disk.img', { 'tls-psk-file': keys }, 'alice')]), /with TLS/);
  } finally {
    await srv.daemon.stop().finally(() => srv.daemon.kill());
  }
});

test('bad TLS settings are refused before anything is opened, with the reason', () => {
  using tmp = tempDir();
  const disk = sparseFile(join(tmp.dir, 'disk.img'), MiB);
  const cases: [string[], RegExp][] = [
    [['--tls=maybe'], /--tls=maybe: expected off, on or require/],
    [
      ['--tls=require', `--tls-psk=${join(tmp.dir, 'none.psk')}`],
      /TLS: cannot read the PSK file .*none\.psk \(ENOENT\)/,
    ],
    [['--tls=require', `--tls-certificates=${tmp.dir}`], /TLS: .*server-cert\.pem does not exist/],
    [['--tls-psk=x.psk'], /need --tls=on or --tls=require/],
  ];
  writeFileSync(join(tmp.dir, 'bad.psk'), 'alice:not-hex\n');
  cases.push([['--tls=on', `--tls-psk=${join(tmp.dir, 'bad.psk')}`], /bad\.psk line 1: expected username:hexkey/]);
  for (const [args, pattern] of cases) {
    const r = ubcache(['export', '--socket', join(tmp.dir, 'x.sock'), ...args, disk]);
    assert.equal(r.status, 1, `${args.join(' ')}: ${r.stderr}`);
    assert.match(r.stderr, pattern);
  }
});

test(
  'serve --tls=require: the bcache device over TLS (nbdcopy with a PSK); refused in clear',
  { skip: skipPsk },
  async () => {
    using tmp = tempDir();
    const keys = makePskFile(tmp.dir, ['alice']);
    const { cache, backing } = makeImages(tmp.dir);
    const s = await startServe(tmp.dir, [
      '--tls=require',
      `--tls-psk=${keys}`,
      '--set',
      'bcache0.cache_mode=writeback',
      cache,
      backing,
    ]);
    try {
      await fails('nbdinfo', [s.uri()]);
      const uri = tlsUri(s.socket, 'bcache0', { 'tls-psk-file': keys }, 'alice');
      const data = randomBytes(2 * MiB);
      const src = join(tmp.dir, 'src.bin');
      const back = join(tmp.dir, 'back.bin');
      writeFileSync(src, data);
      await run('nbdcopy', ['--flush', src, uri]);
      await run('nbdcopy', [uri, back]);
      assert.ok(readFileSync(back).subarray(0, data.length).equals(data));
    } finally {
      await s.daemon.stop().finally(() => s.daemon.kill());
    }
  },
);

test(
  'a backing device behind nbdkit --tls=require: make -B and serve over an nbds+unix URI with a PSK; the data reaches the server',
  { skip: skipPsk || (!tools.nbdkit && 'nbdkit is not installed') },
  async () => {
    using tmp = tempDir();
    const keys = makePskFile(tmp.dir, ['alice']);
    const backing = sparseFile(join(tmp.dir, 'backing.img'), 32 * MiB);
    const cache = sparseFile(join(tmp.dir, 'cache.img'), 64 * MiB);
    const srv = await startNbdkit(tmp.dir, ['--tls=require', `--tls-psk=${keys}`, 'file', backing]);
    const remote = tlsUri(srv.socket, '', { 'tls-psk-file': keys }, 'alice');
    try {
      const made = ubcache(['make', '-b', '64k', '-C', cache, '-B', remote]);
      assert.equal(made.status, 0, made.stderr);
      const s = await startServe(tmp.dir, ['--set', 'bcache0.cache_mode=writethrough', cache, remote]);
      const data = randomBytes(MiB);
      const src = join(tmp.dir, 'src.bin');
      writeFileSync(src, data);
      try {
        await run('nbdcopy', ['--flush', src, s.uri()]);
      } finally {
        await s.daemon.stop().finally(() => s.daemon.kill());
      }
      // Writethrough: on the server's file, after the backing superblock's 8 KiB.
      assert.ok(
        readFileSync(backing)
          .subarray(8192, 8192 + MiB)
          .equals(data),
        'the data went over TLS to the file',
      );
    } finally {
      await srv.stop();
    }
  },
);
