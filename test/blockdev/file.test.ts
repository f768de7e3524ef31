import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { readdirSync, readlinkSync, readFileSync, statSync, truncateSync, writeFileSync, mkdirSync } from 'node:fs';
import fc from 'fast-check';
import { FileBlockDevice, DeviceOpenError } from '../../src/blockdev/file.ts';
import { MemoryBlockDevice } from '../../src/blockdev/memory.ts';
import { loadNative } from '../../src/blockdev/native.ts';
import { openBlockDevice } from '../../src/blockdev/open.ts';
import type { BlockDevice } from '../../src/blockdev/types.ts';
import { pattern, sparseFile, tempDir } from './helpers.ts';

const tmp = tempDir();
after(() => {
  tmp.remove();
});

const native = loadNative();
let fileNo = 0;
function newFile(size: number): string {
  return sparseFile(tmp.path(`f${fileNo++}.img`), size);
}

/** Open fds of this process that point at `path`. */
function fdsOpenOn(path: string): number {
  let n = 0;
  for (const fd of readdirSync('/proc/self/fd')) {
    try {
      if (readlinkSync(`/proc/self/fd/${fd}`) === path) n++;
    } catch {
      // the fd readdir itself used is gone by now
    }
  }
  return n;
}

// ---- the model: a file device behaves like a memory device ---------------------

type Cmd =
  | { op: 'write'; offset: number; length: number; seed: number; fua: boolean }
  | { op: 'read'; offset: number; length: number }
  | { op: 'zero'; offset: number; length: number; noHole: boolean }
  | { op: 'discard'; offset: number; length: number }
  | { op: 'flush' }
  | { op: 'batch'; writes: { offset: number; length: number; seed: number }[] };

const SIZE = 300_000 + 17; // odd on purpose: not a multiple of any block size

const range = fc
  .record({ offset: fc.nat({ max: SIZE - 1 }), length: fc.integer({ min: 1, max: 70_000 }) })
  .map(({ offset, length }) => ({ offset, length: Math.min(length, SIZE - offset) }));

const cmd: fc.Arbitrary<Cmd> = fc.oneof(
  {
    weight: 4,
    arbitrary: fc
      .tuple(range, fc.nat(), fc.boolean())
      .map(([r, seed, fua]) => ({ op: 'write' as const, ...r, seed, fua })),
  },
  { weight: 3, arbitrary: range.map((r) => ({ op: 'read' as const, ...r })) },
  { weight: 2, arbitrary: fc.tuple(range, fc.boolean()).map(([r, noHole]) => ({ op: 'zero' as const, ...r, noHole })) },
  { weight: 2, arbitrary: range.map((r) => ({ op: 'discard' as const, ...r })) },
  { weight: 1, arbitrary: fc.constant({ op: 'flush' as const }) },
  {
    weight: 2,
    arbitrary: fc
      .array(fc.tuple(range, fc.nat()), { minLength: 2, maxLength: 8 })
      .map((ws) => ({ op: 'batch' as const, writes: ws.map(([r, seed]) => ({ ...r, seed })) })),
  },
);

/** Compare `got` with the model where the model knows the content (discarded bytes are unspecified). */
function assertKnownEqual(got: Buffer, want: Buffer, known: Uint8Array, offset: number, what: string): void {
  for (let i = 0; i < got.length; i++) {
    if (known[offset + i] === 1 && got[i] !== want[i]) {
      assert.fail(`${what}: byte ${offset + i} is ${got[i]}, model says ${want[i]}`);
    }
  }
}

async function runModel(cmds: Cmd[], nativeOps: typeof native): Promise<void> {
  const path = newFile(SIZE);
  const dev = await FileBlockDevice.open(path, { native: nativeOps });
  const ref = new MemoryBlockDevice(SIZE);
  const known = new Uint8Array(SIZE).fill(1);
  try {
    for (const c of cmds) {
      switch (c.op) {
        case 'write': {
          const data = pattern(c.length, c.seed);
          await dev.write(data, c.offset, { fua: c.fua });
          await ref.write(data, c.offset);
          known.fill(1, c.offset, c.offset + c.length);
          break;
        }
        case 'read': {
          const got = Buffer.alloc(c.length);
          const want = Buffer.alloc(c.length);
          await dev.read(got, c.offset);
          await ref.read(want, c.offset);
          assertKnownEqual(got, want, known, c.offset, `read ${c.offset}+${c.length}`);
          break;
        }
        case 'zero':
          await dev.writeZeroes(c.offset, c.length, { noHole: c.noHole });
          await ref.writeZeroes(c.offset, c.length);
          known.fill(1, c.offset, c.offset + c.length);
          break;
        case 'discard':
          await dev.discard(c.offset, c.length);
          await ref.discard(c.offset, c.length);
          known.fill(0, c.offset, c.offset + c.length);
          break;
        case 'flush':
          await dev.flush();
          break;
        case 'batch': {
          // Concurrent writes; overlapping ones would have no defined order, so keep them disjoint.
          const kept: { offset: number; length: number; seed: number }[] = [];
          for (const w of c.writes) {
            if (kept.every((k) => w.offset + w.length <= k.offset || k.offset + k.length <= w.offset)) kept.push(w);
          }
          await Promise.all(kept.map((w) => dev.write(pattern(w.length, w.seed), w.offset)));
          for (const w of kept) {
            await ref.write(pattern(w.length, w.seed), w.offset);
            known.fill(1, w.offset, w.offset + w.length);
          }
          break;
        }
      }
    }
    const got = Buffer.alloc(SIZE);
    const want = Buffer.alloc(SIZE);
    await dev.read(got, 0);
    await ref.read(want, 0);
    assertKnownEqual(got, want, known, 0, 'final contents');
    await dev.close();
    // And what close() left on disk is the same.
    assertKnownEqual(readFileSync(path), want, known, 0, 'file after close');
  } finally {
    await dev.close().catch(() => undefined);
  }
}

test('model: a file device reads back like a memory device (with the native addon)', async (t) => {
  if (native === null) {
    t.skip('the native addon is not built');
    return;
  }
  await fc.assert(
    fc.asyncProperty(fc.array(cmd, { maxLength: 25 }), (cmds) => runModel(cmds, native)),
    { numRuns: 40 },
  );
});

test('model: a file device reads back like a memory device (portable fallbacks, no addon)', async () => {
  await fc.assert(
    fc.asyncProperty(fc.array(cmd, { maxLength: 25 }), (cmds) => runModel(cmds, null)),
    { numRuns: 25 },
  );
});

// ---- holes and block status ----------------------------------------------------

const MiB = 1024 * 1024;

test('discard and write-zeroes free blocks, SEEK_DATA block status sees the holes', async (t) => {
  if (native === null) {
    t.skip('the native addon is not built');
    return;
  }
  const path = newFile(4 * MiB);
  const dev = await FileBlockDevice.open(path);
  t.after(() => dev.close());
  assert.equal(dev.caps.discard, true, 'this filesystem (ext4/tmpfs/xfs) can punch holes');
  assert.equal(dev.caps.fastZero, true);
  assert.equal(dev.caps.blockStatus, true);

  assert.deepEqual(await dev.blockStatus(0, 4 * MiB), [{ length: 4 * MiB, hole: true, zero: true }]);
  await dev.write(pattern(4 * MiB, 7), 0);
  await dev.flush();
  const full = statSync(path).blocks;
  assert.ok(full * 512 >= 4 * MiB, `a fully written file is allocated (${full} blocks)`);
  assert.deepEqual(await dev.blockStatus(0, 4 * MiB), [{ length: 4 * MiB, hole: false, zero: false }]);

  await dev.discard(MiB, MiB);
  await dev.flush();
  const afterDiscard = statSync(path).blocks;
  assert.ok(full - afterDiscard >= (MiB / 512) * 0.99, `discard freed 1 MiB (${full} -> ${afterDiscard} blocks)`);
  assert.deepEqual(await dev.blockStatus(0, 4 * MiB), [
    { length: MiB, hole: false, zero: false },
    { length: MiB, hole: true, zero: true },
    { length: 2 * MiB, hole: false, zero: false },
  ]);
  // A query that starts inside a hole and ends inside data is clipped exactly.
  assert.deepEqual(await dev.blockStatus(MiB + 100, MiB), [
    { length: MiB - 100, hole: true, zero: true },
    { length: 100, hole: false, zero: false },
  ]);
  const back = Buffer.alloc(MiB);
  await dev.read(back, MiB);
  assert.ok(back.equals(Buffer.alloc(MiB)), 'a discarded range reads as zeroes');

  // write-zeroes without noHole punches too ...
  await dev.writeZeroes(2 * MiB, MiB);
  await dev.flush();
  const afterPunch = statSync(path).blocks;
  assert.ok(afterDiscard - afterPunch >= (MiB / 512) * 0.99, 'write-zeroes may punch');
  // ... with noHole it zeroes but keeps the blocks.
  await dev.writeZeroes(3 * MiB, MiB, { noHole: true, fua: true });
  const afterZero = statSync(path).blocks;
  assert.ok(afterPunch - afterZero < 16, `noHole kept the range allocated (${afterPunch} -> ${afterZero})`);
  await dev.read(back, 3 * MiB);
  assert.ok(back.equals(Buffer.alloc(MiB)), 'a zeroed range reads as zeroes');
  const head = Buffer.alloc(MiB);
  await dev.read(head, 0);
  assert.ok(head.equals(pattern(4 * MiB, 7).subarray(0, MiB)), 'data outside the ranges is untouched');
  // fastOnly is allowed: there is a fast way here.
  await dev.writeZeroes(0, 4096, { fastOnly: true });
});

test('without the addon: discard is an accepted no-op, zeroes are written, everything is data', async () => {
  const path = newFile(3 * MiB);
  const dev = await FileBlockDevice.open(path, { native: null });
  assert.deepEqual(dev.caps, { discard: false, fastZero: false, blockStatus: false, rotational: dev.caps.rotational });
  await dev.write(pattern(3 * MiB, 1), 0);
  await dev.discard(0, MiB);
  const kept = Buffer.alloc(MiB);
  await dev.read(kept, 0);
  assert.ok(
    kept.equals(pattern(3 * MiB, 1).subarray(0, MiB)),
    'a no-op discard leaves the data (unspecified is allowed)',
  );
  await assert.rejects(dev.writeZeroes(0, 4096, { fastOnly: true }), { code: 'ENOTSUP' });
  // More than one 1 MiB chunk of the shared zero buffer, not aligned to it.
  await dev.writeZeroes(1000, 2 * MiB + 5000);
  const all = Buffer.alloc(3 * MiB);
  await dev.read(all, 0);
  const want = pattern(3 * MiB, 1);
  want.fill(0, 1000, 1000 + 2 * MiB + 5000);
  assert.ok(all.equals(want));
  await dev.flush();
  assert.ok(statSync(path).blocks * 512 >= 3 * MiB, 'written zeroes stay allocated');
  assert.deepEqual(await dev.blockStatus(10, 3 * MiB - 10), [{ length: 3 * MiB - 10, hole: false, zero: false }]);
  await dev.close();
});

test('UBCACHE_NO_NATIVE=1 disables the addon at run time', () => {
  const r = spawnSync(
    process.execPath,
    [
      '--import',
      'tsx',
      '--input-type=module',
      '-e',
      "import { loadNative } from './src/blockdev/native.ts'; console.log(loadNative() === null ? 'none' : 'loaded');",
    ],
    { env: { ...process.env, UBCACHE_NO_NATIVE: '1' }, encoding: 'utf8' },
  );
  assert.equal(r.status, 0, r.stderr);
  assert.equal(r.stdout.trim(), 'none');
});

// ---- errors --------------------------------------------------------------------

test('range errors: EINVAL reading past the end, ENOSPC writing past it, EINVAL for bad offsets', async () => {
  const dev = await FileBlockDevice.open(newFile(8192));
  await assert.rejects(dev.read(Buffer.alloc(512), 8192 - 511), { code: 'EINVAL', message: /past the end/ });
  await assert.rejects(dev.write(Buffer.alloc(512), 8192 - 511), { code: 'ENOSPC', message: /past the end/ });
  await assert.rejects(dev.read(Buffer.alloc(1), -1), { code: 'EINVAL' });
  await assert.rejects(dev.write(Buffer.alloc(1), 0.5), { code: 'EINVAL' });
  await assert.rejects(dev.discard(0, 8193), { code: 'ENOSPC' });
  await assert.rejects(dev.writeZeroes(8000, 193), { code: 'ENOSPC' });
  await assert.rejects(dev.blockStatus(0, 8193), { code: 'EINVAL' });
  // The last byte and empty transfers are fine.
  await dev.write(Buffer.from([9]), 8191);
  const one = Buffer.alloc(1);
  await dev.read(one, 8191);
  assert.equal(one[0], 9);
  await dev.read(Buffer.alloc(0), 8192);
  await dev.close();
});

test('readNow copies data in the page cache here and now, and declines what read() would refuse', async (t) => {
  if (!loadNative()?.preadNowait) {
    t.skip('the native addon (preadv2 RWF_NOWAIT) is not built');
    return;
  }
  const dev = await FileBlockDevice.open(newFile(64 * 1024));
  const data = pattern(16 * 1024, 5);
  await dev.write(data, 4096);
  const buf = Buffer.alloc(data.length);
  assert.equal(dev.readNow(buf, 4096), true, 'just written: in the page cache');
  assert.deepEqual(buf, data);
  assert.equal(dev.readNow(Buffer.alloc(512), 64 * 1024 - 511), false, 'past the end');
  assert.equal(dev.readNow(Buffer.alloc(512), -1), false, 'a bad offset');
  assert.equal(dev.readNow(Buffer.alloc(0), 0), false, 'nothing to read');
  await assert.rejects(dev.read(Buffer.alloc(512), 64 * 1024 - 511), { code: 'EINVAL' });
  await dev.close();
  assert.equal(dev.readNow(Buffer.alloc(512), 4096), false, 'closed');
});

test('a read-only device refuses every kind of write with EPERM and flushes as a no-op', async () => {
  const path = newFile(8192);
  const dev = await FileBlockDevice.open(path, { readOnly: true });
  assert.equal(dev.readOnly, true);
  assert.equal(dev.caps.discard, false);
  await assert.rejects(dev.write(Buffer.alloc(512), 0), { code: 'EPERM', message: /read-only/ });
  await assert.rejects(dev.write(Buffer.alloc(512), 0, { fua: true }), { code: 'EPERM' });
  await assert.rejects(dev.discard(0, 512), { code: 'EPERM' });
  await assert.rejects(dev.writeZeroes(0, 512), { code: 'EPERM' });
  await dev.read(Buffer.alloc(512), 0);
  await dev.flush();
  await dev.close();
});

test('after close every operation fails with ESHUTDOWN; close is idempotent and releases the fd', async () => {
  const path = newFile(8192);
  const dev = await FileBlockDevice.open(path);
  assert.equal(fdsOpenOn(path), 1);
  const c1 = dev.close();
  const c2 = dev.close();
  assert.equal(c1, c2, 'the same promise');
  await c1;
  await dev.close();
  assert.equal(fdsOpenOn(path), 0, 'the fd is closed');
  for (const op of [
    () => dev.read(Buffer.alloc(1), 0),
    () => dev.write(Buffer.alloc(1), 0),
    () => dev.flush(),
    () => dev.discard(0, 512),
    () => dev.writeZeroes(0, 512),
    () => dev.blockStatus(0, 512),
  ]) {
    await assert.rejects(op(), { code: 'ESHUTDOWN', message: /closed/ });
  }
});

test('close waits for every in-flight operation before closing the fd', async () => {
  const path = newFile(4 * MiB);
  const dev = await FileBlockDevice.open(path);
  const events: string[] = [];
  const ops: Promise<void>[] = [];
  for (let i = 0; i < 64; i++) {
    const data = pattern(64 * 1024, i);
    ops.push(dev.write(data, i * 64 * 1024, { fua: i % 8 === 0 }).then(() => void events.push(`w${i}`)));
  }
  ops.push(dev.writeZeroes(0, 4096, { noHole: true }).then(() => void events.push('zero')));
  ops.push(dev.flush().then(() => void events.push('flush')));
  ops.push(dev.blockStatus(0, 4 * MiB).then(() => void events.push('status')));
  const closing = dev.close().then(() => void events.push('close'));
  // Operations submitted after close() are refused even though the fd is still open.
  await assert.rejects(dev.read(Buffer.alloc(1), 0), { code: 'ESHUTDOWN' });
  await Promise.all([...ops, closing]);
  assert.equal(events.length, 68);
  assert.equal(events[events.length - 1], 'close', `close finished last: ${events.join(' ')}`);
  const onDisk = readFileSync(path);
  for (let i = 1; i < 64; i++) {
    assert.ok(onDisk.subarray(i * 65536, (i + 1) * 65536).equals(pattern(65536, i)), `write ${i} landed`);
  }
});

test('concurrent flushes share fdatasyncs, and one that arrives mid-sync waits for the next', async () => {
  const dev = await FileBlockDevice.open(newFile(MiB));
  await dev.write(pattern(4096, 3), 0);
  const first = dev.flush();
  assert.equal(dev.syncCount, 1);
  // These arrive while the first fdatasync runs, so it may not cover their writes: they share a second one.
  const later = [dev.flush(), dev.flush(), dev.flush(), dev.flush()];
  assert.equal(dev.syncCount, 1, 'no second fdatasync while the first runs');
  await first;
  assert.equal(dev.syncCount, 2, 'the second one started as soon as the first ended');
  await Promise.all(later);
  assert.equal(dev.syncCount, 2, 'five flushes, two fdatasyncs');
  await dev.close();
});

test('a read that meets the end of a file that shrank underneath is EIO, never zeroes', async () => {
  const path = newFile(8192);
  const dev = await FileBlockDevice.open(path);
  writeFileSync(path, pattern(4096, 2)); // truncates to 4096
  const buf = Buffer.alloc(8192, 0xee);
  await assert.rejects(dev.read(buf, 0), { code: 'EIO', message: /end of the file, 4096 bytes short/ });
  await dev.close();
  truncateSync(path, 8192);
});

test('open refuses what is not a regular file or block device, with a reason', async () => {
  await assert.rejects(FileBlockDevice.open(tmp.path('missing')), (err: unknown) => {
    assert.ok(err instanceof DeviceOpenError);
    assert.equal(err.code, 'ENOENT');
    assert.match(err.message, /does not exist/);
    return true;
  });
  const dir = tmp.path('adir');
  mkdirSync(dir);
  await assert.rejects(FileBlockDevice.open(dir), { code: 'EINVAL', message: /is a directory; ubcache needs/ });
  await assert.rejects(FileBlockDevice.open('/dev/null'), { code: 'EINVAL', message: /character device/ });
  const fifo = tmp.path('fifo');
  execFileSync('mkfifo', [fifo]);
  // Opening a FIFO for reading would block forever; it must be refused before open().
  await assert.rejects(FileBlockDevice.open(fifo, { readOnly: true }), { code: 'EINVAL', message: /FIFO/ });
});

test('open: size, identity and caps of a regular file; openBlockDevice takes a path or file:PATH', async () => {
  const path = newFile(123_456);
  const a = await openBlockDevice(path);
  const b = await openBlockDevice(`file:${path}`, { readOnly: true });
  for (const d of [a, b] as BlockDevice[]) {
    assert.ok(d instanceof FileBlockDevice);
    assert.equal(d.size, 123_456);
    assert.equal(d.logicalBlockSize, 512);
    assert.equal(d.name, path);
  }
  assert.equal(b.readOnly, true);
  await a.write(pattern(1000, 5), 100);
  await a.flush();
  const seen = Buffer.alloc(1000);
  await b.read(seen, 100);
  assert.ok(seen.equals(pattern(1000, 5)));
  await Promise.all([a.close(), b.close()]);
  await assert.rejects(openBlockDevice('file:'), /names no path/);
});

test('reads take the page-cache fast path and fall back to the thread pool on EAGAIN, a short copy or an error', async (t) => {
  const path = newFile(64 * 1024);
  writeFileSync(path, pattern(64 * 1024, 7));
  const real = loadNative();
  if (real?.preadNowait == null) {
    t.skip('needs the native addon (the fallbacks alone are covered by the no-addon tests)');
    return;
  }
  const answers: number[] = [];
  const calls: number[] = [];
  const fake = {
    ...real,
    preadNowait: (fd: number, buf: Uint8Array, position: number): number => {
      calls.push(position);
      const a = answers.shift();
      if (a === undefined) return real.preadNowait?.(fd, buf, position) ?? -1;
      if (a > 0) return real.preadNowait?.(fd, buf.subarray(0, a), position) ?? -1;
      return a;
    },
  };
  const dev = await FileBlockDevice.open(path, { native: fake });
  try {
    const want = pattern(64 * 1024, 7);
    const got = Buffer.alloc(8192);
    await dev.read(got, 4096); // fast path
    assert.ok(got.equals(want.subarray(4096, 12288)));
    answers.push(-11); // EAGAIN: not cached, take the pool
    got.fill(0);
    await dev.read(got, 8192);
    assert.ok(got.equals(want.subarray(8192, 16384)));
    answers.push(1000); // a short copy: the pool reads the rest
    got.fill(0);
    await dev.read(got, 0);
    assert.ok(got.equals(want.subarray(0, 8192)));
    answers.push(-95); // EOPNOTSUPP: the fast path is given up for good
    got.fill(0);
    await dev.read(got, 16384);
    assert.ok(got.equals(want.subarray(16384, 24576)));
    const before = calls.length;
    await dev.read(got, 0);
    assert.equal(calls.length, before, 'no more fast-path attempts after an unsupported error');
  } finally {
    await dev.close();
  }
});

test('a slow inline write sends writes to the thread pool, and data lands either way', async () => {
  const path = newFile(MiB);
  // Every inline write counts as slow: the first backs off, the next ones take the pool.
  const dev = await FileBlockDevice.open(path, { inlineWriteSlowMs: 0 });
  try {
    for (let i = 0; i < 8; i++) await dev.write(pattern(4096, i), i * 4096);
    assert.equal(dev.inlineWriteBackoffs, 1, 'one slow inline write, then a back-off');
    const onDisk = readFileSync(path);
    for (let i = 0; i < 8; i++) assert.ok(onDisk.subarray(i * 4096, (i + 1) * 4096).equals(pattern(4096, i)));
  } finally {
    await dev.close();
  }
  const never = await FileBlockDevice.open(path, { inlineWriteSlowMs: -1 });
  try {
    await never.write(pattern(4096, 9), 0);
    assert.equal(never.inlineWriteBackoffs, 0);
    assert.ok(readFileSync(path).subarray(0, 4096).equals(pattern(4096, 9)));
  } finally {
    await never.close();
  }
});

test('inline writes issued together go out as one pwritev per run of neighbours, in order', async () => {
  const path = newFile(MiB);
  const dev = await FileBlockDevice.open(path, { inlineWriteSlowMs: 10_000 });
  try {
    const before = { ...dev.inlineWriteStats };
    const writes: Promise<void>[] = [];
    // 16 back to back (as the allocator places a client's writes in a bucket), then three apart.
    for (let i = 0; i < 16; i++) writes.push(dev.write(pattern(4096, i), 65536 + i * 4096));
    for (const [n, at] of [16, 17, 18].entries()) writes.push(dev.write(pattern(4096, at), 262144 * (n + 1) + 512));
    // Two writes to one place in one turn: the later one is what stays.
    writes.push(dev.write(pattern(512, 100), 0), dev.write(pattern(512, 101), 0));
    await Promise.all(writes);
    assert.equal(dev.inlineWriteStats.writes - before.writes, 21);
    // One run of 16, three apart, and the two at 0 (the second overlaps the first, so no run).
    assert.equal(dev.inlineWriteStats.syscalls - before.syscalls, 1 + 3 + 2);
    const onDisk = readFileSync(path);
    for (let i = 0; i < 16; i++) {
      assert.ok(onDisk.subarray(65536 + i * 4096, 65536 + (i + 1) * 4096).equals(pattern(4096, i)), `write ${i}`);
    }
    for (const [n, at] of [16, 17, 18].entries()) {
      const off = 262144 * (n + 1) + 512;
      assert.ok(onDisk.subarray(off, off + 4096).equals(pattern(4096, at)));
    }
    assert.ok(onDisk.subarray(0, 512).equals(pattern(512, 101)));
  } finally {
    await dev.close();
  }
});

test('a gathered write is on the file before any later operation on the device: read, readNow, flush', async () => {
  const path = newFile(MiB);
  const dev = await FileBlockDevice.open(path, { inlineWriteSlowMs: 10_000 });
  try {
    // Not awaited: the reads are issued while the writes still wait for their turn's end.
    const w1 = dev.write(pattern(4096, 1), 0);
    const got = Buffer.alloc(4096);
    await dev.read(got, 0);
    assert.ok(got.equals(pattern(4096, 1)), 'read() after write() sees it');
    const w2 = dev.write(pattern(4096, 2), 4096);
    if (loadNative()?.preadNowait) {
      assert.equal(dev.readNow(got, 4096), true);
      assert.ok(got.equals(pattern(4096, 2)), 'readNow() after write() sees it');
    }
    const w3 = dev.write(pattern(4096, 3), 8192);
    const syncs = dev.syncCount;
    const f = dev.flush();
    assert.ok(readFileSync(path).subarray(8192, 12288).equals(pattern(4096, 3)), 'written before the flush starts');
    await Promise.all([w1, w2, w3, f]);
    assert.equal(dev.syncCount, syncs + 1);
  } finally {
    await dev.close();
  }
});

test('close() waits for gathered writes, and they land', async () => {
  const path = newFile(MiB);
  const dev = await FileBlockDevice.open(path, { inlineWriteSlowMs: 10_000 });
  const w = dev.write(pattern(8192, 7), 4096);
  await dev.close();
  await w;
  assert.ok(readFileSync(path).subarray(4096, 12288).equals(pattern(8192, 7)));
});
