// NbdBlockDevice: the BlockDevice contract over real NBD servers, whatever
// they offer. nbdkit's eval plugin makes a server with chosen capabilities
// (no FUA, no FLUSH, no TRIM, rotational) that logs each call it gets, so a
// test sees what reached the server.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { NbdBlockDevice } from '../../src/blockdev/nbd.ts';
import { openBlockDevice } from '../../src/blockdev/open.ts';
import { FaultyBlockDevice } from '../../src/blockdev/faulty.ts';
import { IoError } from '../../src/blockdev/types.ts';
import { sparseFile, tempDir } from '../helpers/daemon.ts';
import { startNbdkit, tools } from '../helpers/nbd-servers.ts';

const KiB = 1024;
const MiB = 1024 * 1024;
const skip = !tools.nbdkit && 'nbdkit is not installed';

/** nbdkit's eval plugin over `file`, logging pwrite/flush/trim/zero calls to `log`; `caps` sets the can_* answers. */
function evalServer(file: string, log: string, caps: Record<string, string>): string[] {
  const record = (what: string): string => `echo ${what} >> ${log};`;
  return [
    'eval',
    `get_size=stat -c %s ${file}`,
    `pread=dd if=${file} skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none`,
    `pwrite=${record('pwrite $3 $4 $5')} dd of=${file} seek=$4 conv=notrunc oflag=seek_bytes status=none`,
    `flush=${record('flush')}`,
    `trim=${record('trim $3 $4')}`,
    'can_write=exit 0',
    ...Object.entries(caps).map(([k, v]) => `${k}=${v}`),
  ];
}

function logLines(log: string): string[] {
  try {
    return readFileSync(log, 'utf8')
      .split('\n')
      .map((l) => l.trim())
      .filter(Boolean);
  } catch {
    return [];
  }
}

async function rejectsCode(p: Promise<unknown>, code: string, pattern?: RegExp): Promise<void> {
  await assert.rejects(p, (err: unknown) => {
    assert.ok(err instanceof IoError, String(err));
    assert.equal(err.code, code, err.message);
    if (pattern) assert.match(err.message, pattern);
    return true;
  });
}

test(
  'a full-featured export: size, block size, caps and read-only from the handshake; the contract holds',
  { skip },
  async () => {
    using tmp = tempDir();
    const srv = await startNbdkit(tmp.dir, ['memory', '32M']);
    const dev = await openBlockDevice(srv.uri());
    try {
      assert.ok(dev instanceof NbdBlockDevice);
      assert.equal(dev.name, srv.uri(), 'named by its URI');
      assert.equal(dev.size, 32 * MiB);
      assert.equal(dev.logicalBlockSize, 512, 'no NBD_INFO_BLOCK_SIZE: the 512 bytes the spec advises');
      assert.equal(dev.readOnly, false);
      assert.deepEqual(dev.caps, { discard: true, fastZero: true, blockStatus: true, rotational: false });
      const data = randomBytes(512 * KiB);
      await dev.write(data, MiB, { fua: true });
      const back = Buffer.alloc(data.length);
      await dev.read(back, MiB);
      assert.ok(back.equals(data));
      await dev.flush();
      await dev.writeZeroes(MiB, 64 * KiB, { noHole: true, fua: true });
      await dev.writeZeroes(MiB + 64 * KiB, 64 * KiB, { fastOnly: true });
      await dev.read(back, MiB);
      assert.ok(back.subarray(0, 128 * KiB).every((b) => b === 0));
      // A discard rounds inward to the alignment the server needs (here none): the range goes.
      await dev.discard(MiB + 128 * KiB, 128 * KiB);
      const status = await dev.blockStatus(0, 2 * MiB);
      assert.equal(
        status.reduce((n, e) => n + e.length, 0),
        2 * MiB,
        'the extents cover the range',
      );
      assert.deepEqual(status[0], { length: MiB + 256 * KiB, hole: true, zero: true }, 'zeroed and discarded: holes');
      assert.equal(status[1]?.hole, false, 'the rest of the write is data');
      await rejectsCode(dev.read(Buffer.alloc(512), 32 * MiB), 'EINVAL', /past the end/);
      await rejectsCode(dev.write(Buffer.alloc(512), 32 * MiB), 'ENOSPC', /past the end/);
      assert.equal(await dev.isGone(), false);
    } finally {
      await dev.close();
      await srv.stop();
    }
    await rejectsCode(dev.read(Buffer.alloc(512), 0), 'ESHUTDOWN');
    assert.equal(await dev.isGone(), false, 'closed is not gone');
  },
);

test('read-only: the server says so (nbdkit -r), or the opener asks', { skip }, async () => {
  using tmp = tempDir();
  const srv = await startNbdkit(tmp.dir, ['-r', 'memory', '1M']);
  const dev = await NbdBlockDevice.open(srv.uri());
  try {
    assert.equal(dev.readOnly, true);
    await rejectsCode(dev.write(Buffer.alloc(512), 0), 'EPERM', /read-only/);
    await rejectsCode(dev.discard(0, 512), 'EPERM');
    await dev.read(Buffer.alloc(512), 0);
  } finally {
    await dev.close();
    await srv.stop();
  }
  using tmp2 = tempDir();
  const rw = await startNbdkit(tmp2.dir, ['memory', '1M']);
  const ro = await openBlockDevice(rw.uri(), { readOnly: true });
  try {
    assert.equal(ro.readOnly, true);
    await rejectsCode(ro.writeZeroes(0, 512), 'EPERM');
  } finally {
    await ro.close();
    await rw.stop();
  }
});

test('the server minimum block size is the logical block size (nbdkit blocksize-policy)', { skip }, async () => {
  using tmp = tempDir();
  const srv = await startNbdkit(tmp.dir, [
    '--filter=blocksize-policy',
    'memory',
    '1M',
    'blocksize-minimum=4096',
    'blocksize-maximum=65536',
  ]);
  const dev = await NbdBlockDevice.open(srv.uri());
  try {
    assert.equal(dev.logicalBlockSize, 4096);
    // A discard of a range that covers no whole block is dropped, not refused.
    await dev.discard(100, 3000);
    await dev.discard(100, 10000);
  } finally {
    await dev.close();
    await srv.stop();
  }
});

test(
  'no SEND_FUA: a FUA write is a write and then a flush; no TRIM: discard is a no-op; rotational is passed on',
  { skip },
  async () => {
    using tmp = tempDir();
    const file = sparseFile(join(tmp.dir, 'disk.img'), MiB);
    const log = join(tmp.dir, 'calls.log');
    const srv = await startNbdkit(tmp.dir, [
      '--filter=nozero',
      ...evalServer(file, log, {
        can_flush: 'exit 0',
        can_fua: 'echo none',
        can_trim: 'exit 3',
        is_rotational: 'exit 0',
        can_multi_conn: 'exit 3',
      }),
    ]);
    const dev = await NbdBlockDevice.open(srv.uri());
    try {
      assert.deepEqual(dev.caps, { discard: false, fastZero: false, blockStatus: true, rotational: true });
      const data = randomBytes(8 * KiB);
      await dev.write(data, 64 * KiB, { fua: true });
      assert.deepEqual(logLines(log), [`pwrite ${8 * KiB} ${64 * KiB}`, 'flush']);
      assert.ok(
        readFileSync(file)
          .subarray(64 * KiB, 72 * KiB)
          .equals(data),
      );
      await dev.discard(0, 64 * KiB);
      assert.equal(logLines(log).length, 2, 'no TRIM was sent');
      // No WRITE_ZEROES (nozero filter): zeroes are written, and a fast-only zero is refused at once.
      await rejectsCode(dev.writeZeroes(64 * KiB, 4 * KiB, { fastOnly: true }), 'ENOTSUP', /fast zero/);
      await dev.writeZeroes(64 * KiB, 4 * KiB, { fua: true });
      assert.deepEqual(logLines(log).slice(2), [`pwrite ${4 * KiB} ${64 * KiB}`, 'flush']);
      assert.ok(
        readFileSync(file)
          .subarray(64 * KiB, 68 * KiB)
          .every((b) => b === 0),
      );
    } finally {
      await dev.close();
      await srv.stop();
    }
  },
);

test('no SEND_FLUSH (no volatile cache): flush and FUA send nothing more', { skip }, async () => {
  using tmp = tempDir();
  const file = sparseFile(join(tmp.dir, 'disk.img'), MiB);
  const log = join(tmp.dir, 'calls.log');
  const srv = await startNbdkit(tmp.dir, [...evalServer(file, log, { can_flush: 'exit 3', can_fua: 'echo none' })]);
  const dev = await NbdBlockDevice.open(srv.uri());
  try {
    await dev.write(Buffer.alloc(512, 1), 0, { fua: true });
    await dev.flush();
    assert.deepEqual(logLines(log), ['pwrite 512 0']);
  } finally {
    await dev.close();
    await srv.stop();
  }
});

test('without base:allocation (nbdkit --no-sr) block status says all data', { skip }, async () => {
  using tmp = tempDir();
  const srv = await startNbdkit(tmp.dir, ['--no-sr', 'memory', '1M']);
  const dev = await NbdBlockDevice.open(srv.uri());
  try {
    assert.equal(dev.caps.blockStatus, false);
    assert.deepEqual(await dev.blockStatus(4096, 8192), [{ length: 8192, hole: false, zero: false }]);
  } finally {
    await dev.close();
    await srv.stop();
  }
});

test(
  'the server goes away for longer than the outage timeout: I/O fails with EIO and the device says it is gone; faulty: wraps a URI',
  { skip },
  async () => {
    using tmp = tempDir();
    const srv = await startNbdkit(tmp.dir, ['memory', '1M']);
    const dev = await openBlockDevice(`faulty:fail-nth=2:write@${srv.uri()}&outage-timeout=500ms`);
    assert.ok(dev instanceof FaultyBlockDevice);
    try {
      await dev.write(Buffer.alloc(512), 0);
      await rejectsCode(dev.write(Buffer.alloc(512), 0), 'EIO');
      // Timed from before the kill: the outage starts when the client sees the
      // connection drop, which a loaded machine may show before kill() returns.
      const started = performance.now();
      await srv.kill();
      await rejectsCode(dev.read(Buffer.alloc(512), 0), 'EIO', /unreachable for 0\.5 s \(outage timeout\)/);
      assert.ok(performance.now() - started >= 450, 'the read waited out the outage timeout first');
      assert.equal(await dev.isGone(), true);
    } finally {
      await dev.close();
    }
  },
);

test('bad device specs are refused with the reason before anything connects', async () => {
  await assert.rejects(openBlockDevice('nbd+unix:///disk'), /needs the socket/);
  await assert.rejects(
    openBlockDevice('nbds://example.invalid/?tls-psk-file=/nonexistent.psk'),
    /cannot read the PSK file \/nonexistent\.psk/,
  );
  await assert.rejects(openBlockDevice('nbd://example.invalid/?outage-timeout=soon'), /expected a number of seconds/);
});
