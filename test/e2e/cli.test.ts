// The `ubcache` command as a user meets it: help, version, errors, and the
// life of an `export` daemon (listening lines, several exports, read-only,
// signals, exit status).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { encodeInfoRequest } from '../../src/nbd/codec.ts';
import { ClientFlag, Opt } from '../../src/nbd/protocol.ts';
import { Daemon, run, sparseFile, startExport, tempDir, ubcache } from '../helpers/daemon.ts';
import { RawNbdClient } from '../helpers/nbd-raw-client.ts';

const MiB = 1024 * 1024;

interface NbdinfoExport {
  'export-name': string;
  description?: string;
  'export-size': number;
  is_read_only: boolean;
}

async function nbdinfoList(uri: string): Promise<NbdinfoExport[]> {
  const out = JSON.parse(await run('nbdinfo', ['--list', '--json', uri])) as { exports: NbdinfoExport[] };
  return out.exports;
}

test('ubcache --help, --version and an unknown command', () => {
  const help = ubcache(['--help']);
  assert.equal(help.status, 0);
  assert.match(help.stdout, /^\s+export\s+serve files or block devices over NBD$/m);
  const version = ubcache(['--version']);
  assert.equal(version.status, 0);
  assert.match(version.stdout, /^ubcache \d+\.\d+\.\d+\n$/);
  const unknown = ubcache(['exprot']);
  assert.equal(unknown.status, 1);
  assert.match(unknown.stderr, /unknown command 'exprot'[\s\S]*ubcache --help/);
  const exportHelp = ubcache(['export', '--help']);
  assert.equal(exportHelp.status, 0);
  assert.match(exportHelp.stdout, /Usage: ubcache export \[options\] FILE\.\.\./);
  assert.match(exportHelp.stdout, /--listen HOST:PORT/);
});

test('export errors exit 1 and say what is wrong and what to do', () => {
  using tmp = tempDir();
  const noFile = ubcache(['export']);
  assert.equal(noFile.status, 1);
  assert.match(noFile.stderr, /ubcache export: no FILE to export\n.*e\.g\. ubcache export disk\.img/);
  const missing = ubcache(['export', '--socket', join(tmp.dir, 's'), join(tmp.dir, 'nope.img')]);
  assert.equal(missing.status, 1);
  assert.match(missing.stderr, /nope\.img does not exist; check the path/);
  const dir = ubcache(['export', '--socket', join(tmp.dir, 's'), tmp.dir]);
  assert.equal(dir.status, 1);
  assert.match(dir.stderr, /is a directory; ubcache needs a regular file or a block device/);
  const badListen = ubcache(['export', '--listen', 'localhost', join(tmp.dir, 'x')]);
  assert.equal(badListen.status, 1);
  assert.match(badListen.stderr, /--listen 'localhost' is not HOST:PORT\n.*--listen 127\.0\.0\.1:10809/);
});

test('a daemon serves several named, described exports on a unix socket and TCP, then stops on SIGTERM', async () => {
  using tmp = tempDir();
  const a = join(tmp.dir, 'a.img');
  const b = join(tmp.dir, 'b.img');
  sparseFile(a, 4 * MiB);
  sparseFile(b, 2 * MiB);
  const { daemon, uri } = await startExport(tmp.dir, [
    '--listen',
    '127.0.0.1:0',
    '--name',
    'alpha',
    '--description',
    'the first disk',
    a,
    b,
  ]);
  try {
    const tcpLine = await daemon.waitForLine(/listening on 127\.0\.0\.1:\d+ \(exports: alpha, b\.img\)/);
    assert.match(daemon.stderr, /^ubcache: listening on unix:.*nbd\.sock \(exports: alpha, b\.img\)$/m);
    const port = Number(/:(\d+) /.exec(tcpLine)?.[1]);
    const list = await nbdinfoList(uri());
    assert.deepEqual(
      list.map((e) => [e['export-name'], e.description, e['export-size'], e.is_read_only]),
      [
        ['alpha', 'the first disk', 4 * MiB, false],
        ['b.img', undefined, 2 * MiB, false],
      ],
    );
    // The same exports over TCP, and the first is the default export.
    const overTcp = JSON.parse(await run('nbdinfo', ['--json', `nbd://127.0.0.1:${port}`])) as {
      exports: NbdinfoExport[];
    };
    assert.equal(overTcp.exports[0]?.['export-name'], 'alpha', 'the default export is the first');
    assert.equal(overTcp.exports[0]['export-size'], 4 * MiB);
  } finally {
    await daemon.stop().finally(() => daemon.kill());
  }
  assert.match(daemon.stderr, /SIGTERM: shutting down[\s\S]*ubcache: stopped$/);
});

test('--read-only exports refuse writes, and SIGINT stops the daemon with status 0', async () => {
  using tmp = tempDir();
  const f = join(tmp.dir, 'ro.img');
  writeFileSync(f, Buffer.alloc(MiB, 0x61));
  const { daemon, uri } = await startExport(tmp.dir, ['--read-only', f]);
  try {
    const [e] = await nbdinfoList(uri());
    assert.equal(e?.is_read_only, true);
    await assert.rejects(run('qemu-io', ['-f', 'raw', '-c', 'write 0 4096', uri('ro.img')]), /exited with/);
    const read = await run('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0x61 0 4096', uri('ro.img')]);
    assert.match(read, /read 4096\/4096 bytes/);
  } finally {
    const exit = await daemon.signal('SIGINT');
    await daemon.kill();
    assert.deepEqual(exit, { code: 0, signal: null }, daemon.stderr);
  }
});

test('a second daemon on the same socket is refused; the first keeps serving', async () => {
  using tmp = tempDir();
  const f = join(tmp.dir, 'd.img');
  sparseFile(f, MiB);
  const g = join(tmp.dir, 'g.img');
  sparseFile(g, MiB);
  const first = await startExport(tmp.dir, [f]);
  try {
    const second = new Daemon(['export', '--socket', first.socket, g]);
    const exit = await second.exited;
    assert.equal(exit.code, 1);
    assert.match(second.stderr, /cannot listen on unix:.*: the path is in use .*pick another --socket path/);
    assert.equal((await nbdinfoList(first.uri()))[0]?.['export-size'], MiB);
  } finally {
    await first.daemon.stop().finally(() => first.daemon.kill());
  }
});

test('a signal during shutdown exits at once with a message', async () => {
  using tmp = tempDir();
  const f = join(tmp.dir, 'd.img');
  sparseFile(f, MiB);
  const { daemon, socket } = await startExport(tmp.dir, [f], { UBCACHE_LOG: 'debug' });
  const stalled = await RawNbdClient.connect({ path: socket });
  try {
    await stalled.readGreeting();
    stalled.sendClientFlags(ClientFlag.C_FIXED_NEWSTYLE);
    const data = encodeInfoRequest({ name: '', requests: [] });
    stalled.sendOption(Opt.GO, data.subarray(0, 2), data.length); // the rest never comes
    await daemon.waitForLine(/NBD_OPT_GO with 6 bytes of data/);
    daemon.proc.kill('SIGTERM');
    await daemon.waitForLine(/SIGTERM: shutting down/);
    const exit = await daemon.signal('SIGTERM');
    assert.deepEqual(exit, { code: 143, signal: null });
    assert.match(daemon.stderr, /SIGTERM again: exiting at once; requests in flight are abandoned/);
  } finally {
    stalled.destroy();
    await daemon.kill();
  }
});
