// make and show-super on remote NBD exports (nbdkit on a unix socket): the
// same bytes as on a file, and the same refusals, with the server named.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { CliError } from '../../src/cli/common.ts';
import { make, makeAsync } from '../../src/cli/make.ts';
import { captureOutput } from '../../src/cli/output.ts';
import { showSuper, showSuperAsync } from '../../src/cli/show-super.ts';
import { SB_OFFSET, SB_SIZE } from '../../src/format/constants.ts';
import { sparseFile, tempDir } from '../helpers/daemon.ts';
import { startNbdkit, tools } from '../helpers/nbd-servers.ts';

const MiB = 1024 * 1024;
const skip = !tools.nbdkit && 'nbdkit is not installed';
const SET = '5c5c5c5c-1a1a-4b4b-8c8c-9d9d9d9d9d9d';

async function ours(args: string[]): Promise<{ status: number; out: string; err: string; message: string }> {
  const o = captureOutput();
  try {
    const status = await makeAsync(args, o);
    return { status, out: o.out, err: o.err, message: '' };
  } catch (err) {
    if (!(err instanceof CliError)) throw err;
    return { status: err.status, out: o.out, err: o.err, message: err.message };
  }
}

test(
  'make -C/-B over NBD writes what make writes on a file, and show-super reads it back the same',
  { skip },
  async () => {
    using tmp = tempDir();
    const remoteBacking = sparseFile(join(tmp.dir, 'remote-b.img'), 32 * MiB);
    const remoteCache = sparseFile(join(tmp.dir, 'remote-c.img'), 64 * MiB);
    const b = await startNbdkit(tmp.dir, ['file', remoteBacking], { name: 'b' });
    const c = await startNbdkit(tmp.dir, ['file', remoteCache], { name: 'c' });
    try {
      const r = await ours(['-b', '64k', '--cset-uuid', SET, '-C', c.uri(), '-B', b.uri()]);
      assert.equal(r.status, 0, r.message);
      // The same command on local files: identical superblocks but for the random device uuids.
      const localB = sparseFile(join(tmp.dir, 'local-b.img'), 32 * MiB);
      const localC = sparseFile(join(tmp.dir, 'local-c.img'), 64 * MiB);
      assert.equal(make(['-b', '64k', '--cset-uuid', SET, '-C', localC, '-B', localB], captureOutput()), 0);
      for (const [remote, local] of [
        [remoteBacking, localB],
        [remoteCache, localC],
      ] as const) {
        const rs = readFileSync(remote).subarray(0, SB_OFFSET + SB_SIZE);
        const ls = readFileSync(local).subarray(0, SB_OFFSET + SB_SIZE);
        // Device uuid (bytes 40..56 of the superblock) and checksum (0..8) differ; everything else is equal.
        const mask = (buf: Buffer): Buffer => {
          const copy = Buffer.from(buf);
          copy.fill(0, SB_OFFSET, SB_OFFSET + 8);
          copy.fill(0, SB_OFFSET + 40, SB_OFFSET + 56);
          return copy;
        };
        assert.ok(mask(rs).equals(mask(ls)), `${remote} holds what make writes on a file`);
      }
      for (const [uri, file] of [
        [b.uri(), remoteBacking],
        [c.uri(), remoteCache],
      ] as const) {
        const viaNbd = captureOutput();
        assert.equal(await showSuperAsync([uri], viaNbd), 0);
        const direct = captureOutput();
        assert.equal(showSuper([file], direct), 0);
        assert.equal(viaNbd.out, direct.out);
        const json = captureOutput();
        assert.equal(await showSuperAsync(['--json', uri], json), 0);
        assert.equal((JSON.parse(json.out) as { device: string }).device, uri);
      }
    } finally {
      await b.stop();
      await c.stop();
    }
  },
);

test(
  'refusals over NBD: an existing signature, bcache without --wipe-bcache, read-only exports, the same export twice, no server',
  { skip },
  async () => {
    using tmp = tempDir();
    const file = sparseFile(join(tmp.dir, 'disk.img'), 32 * MiB);
    // An ext4 superblock magic at byte 1080.
    const head = Buffer.alloc(2048);
    head.writeUInt16LE(0xef53, 1080);
    writeFileSync(file, head, { flag: 'r+' });
    const srv = await startNbdkit(tmp.dir, ['file', file], { name: 'rw' });
    const ro = await startNbdkit(tmp.dir, ['-r', 'memory', '32M'], { name: 'ro' });
    try {
      const fs = await ours(['-B', srv.uri()]);
      assert.equal(fs.status, 1);
      assert.match(fs.message, /already holds an ext[234] file system \(magic 0xEF53 at byte 1080\)/);
      writeFileSync(file, Buffer.alloc(2048), { flag: 'r+' });
      assert.equal((await ours(['-B', srv.uri()])).status, 0);
      assert.match((await ours(['-B', srv.uri()])).message, /is already a bcache backing device/);
      assert.equal((await ours(['--wipe-bcache', '-B', srv.uri()])).status, 0);
      assert.match((await ours(['-B', ro.uri()])).message, /exports it read-only/);
      assert.match((await ours(['-C', srv.uri(), '-B', srv.uri()])).message, /are the same device/);
      const missing = `nbd+unix:///?socket=${join(tmp.dir, 'none.sock')}`;
      assert.match((await ours(['-B', missing])).message, /cannot open .*none\.sock: cannot connect to unix:.*ENOENT/);
      const o = captureOutput();
      assert.equal(await showSuperAsync([missing], o), 2);
      assert.match(o.out, /^Can't open dev nbd\+unix:.*: cannot connect to unix:.*none\.sock: connect ENOENT/);
      const bad = captureOutput();
      assert.equal(await showSuperAsync(['nbd+unix:///x'], bad), 2);
      assert.match(bad.out, /needs the socket/);
      const blank = captureOutput();
      assert.equal(await showSuperAsync([ro.uri()], blank), 2, 'no superblock on a blank export');
      assert.match(blank.err, /Invalid superblock \(bad magic\)/);
    } finally {
      await srv.stop();
      await ro.stop();
    }
  },
);
