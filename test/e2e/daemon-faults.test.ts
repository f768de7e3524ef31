// The daemon with a slow or failing device (faulty: specs from
// openBlockDevice): a request in flight at SIGTERM still completes while new
// ones get ESHUTDOWN, and device errors reach real clients as NBD errors.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { Cmd, NbdErr } from '../../src/nbd/protocol.ts';
import { run, sparseFile, startExport, tempDir } from '../helpers/daemon.ts';
import { RawNbdClient } from '../helpers/nbd-raw-client.ts';

const MiB = 1024 * 1024;

test('SIGTERM with a write in flight: the write completes, a new request gets ESHUTDOWN, exit status 0', async () => {
  using tmp = tempDir();
  const f = sparseFile(join(tmp.dir, 'disk.img'), MiB);
  const { daemon, socket } = await startExport(tmp.dir, ['--name', 'disk', `faulty:latency=1s:write@${f}`]);
  try {
    const { client } = await RawNbdClient.open({ path: socket }, { structured: true });
    const write = client.writeAt(4096, Buffer.from('landed despite the shutdown'));
    // Requests are dispatched in order: once this read is answered, the slow write is in flight.
    assert.equal((await client.readAt(0, 512)).error, 0);
    daemon.proc.kill('SIGTERM');
    await daemon.waitForLine(/SIGTERM: shutting down/);
    const late = await client.readAt(0, 512);
    assert.equal(late.error, NbdErr.ESHUTDOWN);
    assert.equal((await write).error, 0);
    await client.expectClose();
    const exit = await daemon.exited;
    assert.deepEqual(exit, { code: 0, signal: null }, daemon.stderr);
  } finally {
    await daemon.kill();
  }
  assert.equal(readFileSync(f).toString('utf8', 4096, 4096 + 27), 'landed despite the shutdown');
});

test('device errors reach clients: ENOSPC on writes, EIO on reads, and the daemon keeps serving', async () => {
  using tmp = tempDir();
  const f = sparseFile(join(tmp.dir, 'disk.img'), MiB);
  const spec = `faulty:fail-range=512k+4k:write:ENOSPC,fail-range=768k+4k:read:EIO@${f}`;
  const { daemon, uri, socket } = await startExport(tmp.dir, ['--name', 'disk', spec]);
  try {
    await assert.rejects(
      run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 512k 4k', uri('disk')]),
      /No space left on device/,
    );
    const { client } = await RawNbdClient.open({ path: socket }, { structured: true, name: 'disk' });
    const r = await client.request({ type: Cmd.READ, offset: 768 * 1024, length: 4096 });
    assert.equal(r.error, NbdErr.EIO);
    assert.match(r.message, /READ at 786432 length 4096 failed/);
    const ok = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x22 0 4k', '-c', 'read -P 0x22 0 4k', uri('disk')]);
    assert.match(ok, /read 4096\/4096 bytes at offset 0/);
    client.disconnect();
    await client.closed;
  } finally {
    await daemon.stop().finally(() => daemon.kill());
  }
  assert.match(daemon.stderr, /export 'disk': WRITE at 524288 length 4096 failed: .*\(ENOSPC\)/);
});
