// Real failures from the kernel, not injected ones: a full filesystem (a tiny
// tmpfs) under a file device, and under a loop device, where the failure only
// shows at fdatasync. Needs root (mount, losetup); skips, saying why, without.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdirSync, statSync } from 'node:fs';
import { FileBlockDevice } from '../../src/blockdev/file.ts';
import { loadNative } from '../../src/blockdev/native.ts';
import { IoError } from '../../src/blockdev/types.ts';
import { attachLoop, detachLoop, loopUnavailable, pattern, sh, sparseFile, tempDir } from './helpers.ts';

const MiB = 1024 * 1024;

/** A tmpfs of `size` bytes mounted on a fresh directory, unmounted and removed when the test ends. */
function tinyFilesystem(t: { after(fn: () => void): void }, size: number): string {
  const tmp = tempDir('ubcache-tinyfs-');
  const dir = tmp.path('mnt');
  mkdirSync(dir);
  sh('mount', ['-t', 'tmpfs', '-o', `size=${size}`, 'tmpfs', dir]);
  t.after(() => {
    spawnSync('umount', ['-l', dir]);
    tmp.remove();
  });
  return dir;
}

function unavailable(): string | undefined {
  return loopUnavailable() ?? (spawnSync('mount', ['--version']).status === 0 ? undefined : 'mount is missing');
}

test('a full filesystem under a file device: ENOSPC with advice, after the part that fitted', async (t) => {
  const why = unavailable();
  if (why !== undefined) {
    t.skip(why);
    return;
  }
  const dir = tinyFilesystem(t, 2 * MiB);
  const dev = await FileBlockDevice.open(sparseFile(`${dir}/f.img`, 8 * MiB));
  t.after(() => dev.close().catch(() => undefined));
  // The first pwrite transfers what fits (a partial write), the continuation hits ENOSPC.
  await assert.rejects(dev.write(pattern(4 * MiB, 1), 0), (err: unknown) => {
    assert.ok(err instanceof IoError);
    assert.equal(err.code, 'ENOSPC');
    assert.match(err.message, /write of 4194304 bytes at offset 0 failed \(ENOSPC\): .*out of space/);
    return true;
  });
  const head = Buffer.alloc(MiB);
  await dev.read(head, 0);
  assert.ok(head.equals(pattern(4 * MiB, 1).subarray(0, MiB)), 'what fitted was written');
});

test('gathered inline writes on a full filesystem: each write gets its own result', async (t) => {
  const why = unavailable();
  if (why !== undefined) {
    t.skip(why);
    return;
  }
  const dir = tinyFilesystem(t, 256 * 1024);
  const dev = await FileBlockDevice.open(sparseFile(`${dir}/f.img`, 8 * MiB), { inlineWriteSlowMs: 10_000 });
  t.after(() => dev.close().catch(() => undefined));
  // Eight 64 KiB writes back to back, issued in one turn: one pwritev for all
  // of them, which ends short at 256 KiB; each is then written by itself.
  const syscalls = dev.inlineWriteStats.syscalls;
  const results = await Promise.allSettled(
    Array.from({ length: 8 }, (_, i) => dev.write(pattern(64 * 1024, i), i * 64 * 1024)),
  );
  const ok = results.map((r) => r.status === 'fulfilled');
  const firstFailed = ok.indexOf(false);
  assert.ok(firstFailed > 0 && firstFailed < 8, `some fitted, some did not: ${ok.join(',')}`);
  assert.ok(
    ok.slice(firstFailed).every((v) => !v),
    `the ones past the space all failed: ${ok.join(',')}`,
  );
  for (const r of results.slice(firstFailed)) {
    assert.ok(r.status === 'rejected' && r.reason instanceof IoError && r.reason.code === 'ENOSPC', r.status);
  }
  assert.ok(dev.inlineWriteStats.syscalls - syscalls > 1, 'the run was retried write by write');
  for (let i = 0; i < firstFailed; i++) {
    const got = Buffer.alloc(64 * 1024);
    await dev.read(got, i * 64 * 1024);
    assert.ok(got.equals(pattern(64 * 1024, i)), `write ${i} is on the file`);
  }
});

test('tmpfs has no FALLOC_FL_ZERO_RANGE: noHole zeroing punches and reallocates instead', async (t) => {
  const why = unavailable();
  if (why !== undefined) {
    t.skip(why);
    return;
  }
  if (loadNative() === null) {
    t.skip('the native addon is not built');
    return;
  }
  const dir = tinyFilesystem(t, 16 * MiB);
  const path = sparseFile(`${dir}/z.img`, 4 * MiB);
  const dev = await FileBlockDevice.open(path);
  t.after(() => dev.close());
  assert.equal(dev.caps.fastZero, true, 'tmpfs can punch holes');
  await dev.write(pattern(4 * MiB, 2), 0);
  const before = statSync(path).blocks;
  await dev.writeZeroes(MiB, 2 * MiB, { noHole: true, fastOnly: true });
  await dev.writeZeroes(3 * MiB, 4096, { noHole: true }); // the second time it knows ZERO_RANGE fails
  assert.equal(statSync(path).blocks, before, 'the range stayed allocated');
  const got = Buffer.alloc(4 * MiB);
  await dev.read(got, 0);
  const want = pattern(4 * MiB, 2)
    .fill(0, MiB, 3 * MiB)
    .fill(0, 3 * MiB, 3 * MiB + 4096);
  assert.ok(got.equals(want));
  // tmpfs reports allocated-but-unwritten pages as holes: they read as zeroes, which is what matters.
  assert.ok((await dev.blockStatus(MiB, 2 * MiB)).every((e) => e.zero));
});

test('a flush that fails stays failed: later flushes and close report it too', async (t) => {
  const why = unavailable();
  if (why !== undefined) {
    t.skip(why);
    return;
  }
  // A loop device over a sparse file bigger than its filesystem: writes land in
  // the page cache and only fail when fdatasync pushes them to the full tmpfs.
  const dir = tinyFilesystem(t, MiB);
  const loop = attachLoop(sparseFile(`${dir}/l.img`, 16 * MiB));
  t.after(() => {
    detachLoop(loop);
  });
  const dev = await FileBlockDevice.open(loop);
  await dev.write(pattern(4 * MiB, 3), 0);
  // Two flushes: the second arrives while the first runs, so it waits for the next fdatasync, which never comes.
  const [first, second] = await Promise.allSettled([dev.flush(), dev.flush()]);
  assert.equal(first.status, 'rejected');
  assert.equal(second.status, 'rejected');
  const err: unknown = first.reason;
  assert.ok(err instanceof IoError, 'the fdatasync that could not write back failed');
  assert.ok(['EIO', 'ENOSPC'].includes(err.code), err.code);
  assert.match(err.message, /flush \(fdatasync\)/);
  assert.match(String(second.reason), /an earlier flush failed/);
  assert.equal(dev.syncCount, 1, 'the queued flush did not retry fdatasync');
  // Linux may have dropped the pages it could not write; a new fdatasync could "succeed". Ours may not.
  await assert.rejects(dev.flush(), { code: 'EIO', message: /an earlier flush failed/ });
  await assert.rejects(dev.write(pattern(512, 4), 0, { fua: true }), { code: 'EIO', message: /earlier flush failed/ });
  await dev.read(Buffer.alloc(512), 0); // reads still work
  await assert.rejects(dev.close(), { code: 'EIO', message: /earlier flush failed/ });
  await assert.rejects(dev.read(Buffer.alloc(512), 0), { code: 'ESHUTDOWN' }, 'closed all the same');
});

test('close reports a final fdatasync that fails, and still closes', async (t) => {
  const why = unavailable();
  if (why !== undefined) {
    t.skip(why);
    return;
  }
  const dir = tinyFilesystem(t, MiB);
  const loop = attachLoop(sparseFile(`${dir}/c.img`, 16 * MiB));
  t.after(() => {
    detachLoop(loop);
  });
  const dev = await FileBlockDevice.open(loop);
  await dev.write(pattern(4 * MiB, 5), 0);
  await assert.rejects(dev.close(), { message: /final flush \(fdatasync\) on close/ });
  await assert.rejects(dev.flush(), { code: 'ESHUTDOWN' });
});
