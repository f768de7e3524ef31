// FileBlockDevice over real block devices: loop devices on temp files. Needs
// root and util-linux (losetup, addpart); skips, saying why, without them.

import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, statSync } from 'node:fs';
import { basename } from 'node:path';
import { FileBlockDevice, DeviceOpenError } from '../../src/blockdev/file.ts';
import { loadNative } from '../../src/blockdev/native.ts';
import { splitDevT } from '../../src/blockdev/sysfs.ts';
import { attachLoop, detachLoop, loopUnavailable, pattern, sh, sparseFile, tempDir } from './helpers.ts';

const tmp = tempDir();
after(() => {
  tmp.remove();
});

const MiB = 1024 * 1024;
const unavailable = loopUnavailable();
const native = loadNative();
let fileNo = 0;

/** A loop device over a fresh sparse file, detached when the test ends (pass or fail). */
function loop(t: { after(fn: () => void): void }, size: number, extra: string[] = []): { dev: string; file: string } {
  const file = sparseFile(tmp.path(`loop${fileNo++}.img`), size);
  const dev = attachLoop(file, extra);
  t.after(() => {
    detachLoop(dev);
  });
  return { dev, file };
}

function sysQueue(dev: string, attr: string): string {
  return readFileSync(`/sys/block/${basename(dev)}/queue/${attr}`, 'utf8').trim();
}

test('a loop device: size, logical block size and caps come from sysfs; data goes through', async (t) => {
  if (unavailable !== undefined) {
    t.skip(unavailable);
    return;
  }
  const { dev: path, file } = loop(t, 64 * MiB);
  const dev = await FileBlockDevice.open(path);
  t.after(() => dev.close());
  assert.equal(dev.kind, 'block');
  assert.equal(dev.size, 64 * MiB);
  assert.equal(dev.logicalBlockSize, 512);
  assert.equal(dev.caps.rotational, sysQueue(path, 'rotational') === '1');
  assert.equal(dev.caps.blockStatus, false, 'block devices report everything as data');
  assert.deepEqual(await dev.blockStatus(512, 8192), [{ length: 8192, hole: false, zero: false }]);
  if (native !== null) {
    assert.equal(dev.caps.discard, Number(sysQueue(path, 'discard_max_bytes')) > 0);
    assert.equal(dev.caps.fastZero, Number(sysQueue(path, 'write_zeroes_max_bytes')) > 0);
  }

  // Unaligned I/O works through the block device's page cache; flush reaches the backing file.
  const data = pattern(3 * MiB + 123, 1);
  await dev.write(data, 1000);
  await dev.flush();
  const back = Buffer.alloc(data.length);
  await dev.read(back, 1000);
  assert.ok(back.equals(data));
  assert.ok(
    readFileSync(file)
      .subarray(1000, 1000 + data.length)
      .equals(data),
    'flushed data is in the backing file',
  );
  await assert.rejects(dev.read(Buffer.alloc(512), 64 * MiB - 256), { code: 'EINVAL' });
  await assert.rejects(dev.write(Buffer.alloc(512), 64 * MiB), { code: 'ENOSPC' });
});

test('a loop device: discard trims (the backing file loses its blocks) and write-zeroes zeroes', async (t) => {
  if (unavailable !== undefined) {
    t.skip(unavailable);
    return;
  }
  if (native === null) {
    t.skip('the native addon is not built');
    return;
  }
  const { dev: path, file } = loop(t, 16 * MiB);
  const dev = await FileBlockDevice.open(path);
  t.after(() => dev.close());
  assert.equal(dev.caps.discard, true, 'a loop device over an ext4/tmpfs file can discard');
  assert.equal(dev.caps.fastZero, true);
  await dev.write(pattern(8 * MiB, 2), 0);
  await dev.flush();
  const full = statSync(file).blocks;
  assert.ok(full * 512 >= 8 * MiB);

  await dev.discard(MiB, 2 * MiB);
  await dev.flush();
  const trimmed = statSync(file).blocks;
  assert.ok(full - trimmed >= (2 * MiB) / 512 - 16, `BLKDISCARD punched the backing file (${full} -> ${trimmed})`);

  // Unaligned ends are written, the whole blocks in between zeroed by the kernel.
  await dev.writeZeroes(4 * MiB + 100, MiB + 300);
  await dev.writeZeroes(6 * MiB + 7, 4000, { noHole: true, fua: true });
  await dev.writeZeroes(7 * MiB, 64 * 1024, { fastOnly: true });
  const got = Buffer.alloc(8 * MiB);
  await dev.read(got, 0);
  const want = pattern(8 * MiB, 2);
  want.fill(0, 4 * MiB + 100, 5 * MiB + 400);
  want.fill(0, 6 * MiB + 7, 6 * MiB + 4007);
  want.fill(0, 7 * MiB, 7 * MiB + 64 * 1024);
  // The discarded range is unspecified; compare everything else.
  assert.ok(got.subarray(0, MiB).equals(want.subarray(0, MiB)));
  assert.ok(got.subarray(3 * MiB).equals(want.subarray(3 * MiB)));
});

test('a loop device with 4096-byte sectors reports them; partial-block zeroing still works', async (t) => {
  if (unavailable !== undefined) {
    t.skip(unavailable);
    return;
  }
  const { dev: path } = loop(t, 8 * MiB, ['--sector-size', '4096']);
  const dev = await FileBlockDevice.open(path);
  t.after(() => dev.close());
  assert.equal(dev.logicalBlockSize, 4096);
  await dev.write(pattern(64 * 1024, 3), 0);
  await dev.writeZeroes(1000, 10_000);
  const got = Buffer.alloc(64 * 1024);
  await dev.read(got, 0);
  const want = pattern(64 * 1024, 3).fill(0, 1000, 11_000);
  assert.ok(got.equals(want));
  await dev.discard(100, 3000); // inside one logical block: nothing whole to trim, not an error
});

test('a partition takes its size from itself and its queue limits from the whole disk', async (t) => {
  if (unavailable !== undefined) {
    t.skip(unavailable);
    return;
  }
  const { dev: disk } = loop(t, 16 * MiB, ['--sector-size', '4096', '--partscan']);
  // addpart (BLKPG) works without any partition-table parser in the kernel. Units: 512-byte sectors.
  sh('addpart', [disk, '1', '2048', '8192']);
  const part = `${disk}p1`;
  const dev = await FileBlockDevice.open(part);
  t.after(() => dev.close());
  const { major, minor } = splitDevT(BigInt(statSync(part).rdev));
  assert.ok(readFileSync(`/sys/dev/block/${major}:${minor}/partition`, 'utf8').trim() === '1');
  assert.equal(dev.size, 8192 * 512);
  assert.equal(dev.logicalBlockSize, 4096, "the parent's queue/logical_block_size");
  await dev.write(pattern(4096, 4), 0);
  await dev.flush();
  const whole = await FileBlockDevice.open(disk, { readOnly: true });
  const seen = Buffer.alloc(4096);
  await whole.read(seen, 2048 * 512);
  await whole.close();
  assert.ok(seen.equals(pattern(4096, 4)), 'partition offset 0 is disk offset 1 MiB');
});

test('exclusive open: a second exclusive opener gets EBUSY with advice; release lets it in', async (t) => {
  if (unavailable !== undefined) {
    t.skip(unavailable);
    return;
  }
  const { dev: path } = loop(t, 4 * MiB);
  const first = await FileBlockDevice.open(path, { exclusive: true });
  await assert.rejects(FileBlockDevice.open(path, { exclusive: true }), (err: unknown) => {
    assert.ok(err instanceof DeviceOpenError);
    assert.equal(err.code, 'EBUSY');
    assert.match(err.message, /is in use .*stop that user first/);
    return true;
  });
  // A shared opener is not blocked by an exclusive one (as with the kernel's O_EXCL).
  const shared = await FileBlockDevice.open(path, { readOnly: true });
  await shared.close();
  await first.close();
  const again = await FileBlockDevice.open(path, { exclusive: true });
  await again.close();
});

test('a read-only block device, and one without the addon, behave as advertised', async (t) => {
  if (unavailable !== undefined) {
    t.skip(unavailable);
    return;
  }
  const { dev: path } = loop(t, 4 * MiB);
  const ro = await FileBlockDevice.open(path, { readOnly: true });
  assert.deepEqual([ro.caps.discard, ro.caps.fastZero], [false, false]);
  await assert.rejects(ro.write(Buffer.alloc(512), 0), { code: 'EPERM' });
  await ro.close();
  const plain = await FileBlockDevice.open(path, { native: null });
  assert.deepEqual([plain.caps.discard, plain.caps.fastZero], [false, false]);
  await plain.write(pattern(8192, 5), 0);
  await plain.discard(0, 8192); // accepted, does nothing
  await assert.rejects(plain.writeZeroes(0, 4096, { fastOnly: true }), { code: 'ENOTSUP' });
  await plain.writeZeroes(4096, 4096);
  const got = Buffer.alloc(8192);
  await plain.read(got, 0);
  assert.ok(got.equals(Buffer.concat([pattern(8192, 5).subarray(0, 4096), Buffer.alloc(4096)])));
  await plain.close();
});

test('an unbound loop device is refused: it has size 0', async (t) => {
  if (unavailable !== undefined) {
    t.skip(unavailable);
    return;
  }
  // Bind and unbind one, so the node surely exists and is (for the moment) free.
  const { dev: path } = loop(t, MiB);
  detachLoop(path);
  await assert.rejects(FileBlockDevice.open(path), { code: 'ENXIO', message: /size 0 .*unbound loop device/ });
});
