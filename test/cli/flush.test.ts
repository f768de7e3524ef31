// `ubcache flush`: dirty data written through the built `ubcache serve` (in
// writeback mode, writeback held off), then written back offline by the
// command: the backing image alone holds exactly the data and its superblock
// says clean; --dry-run reports the dirty data per device and writes
// nothing; mistakes (a missing file, the wrong cache, no cache) are refused
// with a clear message before anything is written back.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { BDEV_STATE_CLEAN, BDEV_STATE_DIRTY, SB_OFFSET, SB_SIZE } from '../../src/format/constants.ts';
import { bdevState, decodeSuperblock } from '../../src/format/superblock.ts';
import { CopyOnWriteDevice, formatBytes, parseFlushArgs } from '../../src/cli/flush.ts';
import { MemoryBlockDevice } from '../../src/blockdev/memory.ts';
import { CliError } from '../../src/cli/common.ts';
import { readFileRange, ROOT, startExport, tempDir, ubcache } from '../helpers/daemon.ts';
import { flushCli } from './flush-helpers.ts';
import { Client, makeImages, MiB, startServe } from '../e2e/serve-helpers.ts';

const DATA_OFFSET = 8192;

function stateOf(path: string): number {
  return bdevState(decodeSuperblock(readFileRange(path, SB_OFFSET, SB_SIZE)));
}

/** What was written through bcache0: offset and data. */
const WRITES: Array<[number, number]> = [
  [0, 1 * MiB],
  [5 * MiB + 64 * 1024, 64 * 1024],
  [20 * MiB, 4096],
  [33 * MiB, 3 * MiB],
];
const DIRTY_SECTORS = WRITES.reduce((s, [, len]) => s + len / 512, 0);

/** Images with WRITES dirty in the cache (serve in writeback mode, writeback off); returns the expected content. */
async function dirtyImages(dir: string, backingMiB = 64): Promise<{ cache: string; backing: string; want: Buffer }> {
  const { cache, backing } = makeImages(dir, { backingMiB, args: ['--writeback'] });
  const want = Buffer.alloc(backingMiB * MiB - DATA_OFFSET);
  const s = await startServe(dir, [
    '--set',
    'bcache0.writeback_running=0',
    '--set',
    'bcache0.sequential_cutoff=0',
    cache,
    backing,
  ]);
  try {
    const c = await Client.connect(s.socket);
    try {
      for (const [offset, length] of WRITES) {
        const data = randomBytes(length);
        data.copy(want, offset);
        for (let at = 0; at < length; at += 256 * 1024) {
          await c.write(offset + at, data.subarray(at, Math.min(length, at + 256 * 1024)));
        }
      }
      await c.flush();
    } finally {
      c.close();
    }
    await s.daemon.stop();
  } finally {
    await s.daemon.kill();
  }
  return { cache, backing, want };
}

test('flush writes the dirty data back: the backing image alone holds it, its superblock clean', async () => {
  using t = tempDir('ubcache-flush-');
  const { cache, backing, want } = await dirtyImages(t.dir);
  assert.equal(stateOf(backing), BDEV_STATE_DIRTY, 'serve left the backing superblock dirty');
  const before = readFileSync(backing);
  assert.ok(!before.subarray(DATA_OFFSET).equals(want), 'the data is not on the backing image yet');

  // --dry-run: the exact figures, and not a byte changed on either image.
  const cacheBefore = readFileSync(cache);
  const dry = flushCli(['--dry-run', cache, backing]);
  assert.equal(dry.status, 0, dry.stderr);
  assert.match(dry.stdout, new RegExp(`${backing}: .*\\(${DIRTY_SECTORS} sectors\\) dirty, superblock dirty`));
  assert.match(dry.stdout, new RegExp(`total: ${formatBytes(DIRTY_SECTORS * 512)} \\(${DIRTY_SECTORS} sectors\\)`));
  assert.match(dry.stdout, /dry run: nothing was written/);
  assert.ok(readFileSync(backing).equals(before), '--dry-run left the backing image alone');
  assert.ok(readFileSync(cache).equals(cacheBefore), '--dry-run left the cache image alone');
  // With the cache alone, it lists the devices it holds dirty data for.
  const alone = flushCli(['-n', cache]);
  assert.equal(alone.status, 0, alone.stderr);
  assert.match(
    alone.stdout,
    new RegExp(`device [0-9a-f-]{36} in set [0-9a-f-]{36}: .*\\(${DIRTY_SECTORS} sectors\\) dirty, not given`),
  );

  // The flush itself: a summary, and the backing image alone is the device.
  const r = flushCli([backing, cache]); // any order
  assert.equal(r.status, 0, `${r.stdout}\n${r.stderr}`);
  assert.match(r.stdout, new RegExp(`writing back ${formatBytes(DIRTY_SECTORS * 512)} \\(${DIRTY_SECTORS} sectors\\)`));
  assert.match(
    r.stdout,
    new RegExp(`${backing}: ${formatBytes(DIRTY_SECTORS * 512)} written back, superblock dirty -> clean`),
  );
  assert.match(r.stdout, /done: .* written back in [\d.]+ s/);
  assert.equal(stateOf(backing), BDEV_STATE_CLEAN);
  const after = readFileSync(backing);
  assert.ok(after.subarray(DATA_OFFSET).equals(want), 'the backing image holds exactly what was written');
  const shown = ubcache(['show-super', backing]);
  assert.equal(shown.status, 0, shown.stderr);
  assert.match(shown.stdout, /dev\.data\.cache_state\s+1 \[clean\]/);

  // Nothing left: a dry run says 0, a second flush has nothing to do and changes nothing.
  const again = flushCli(['--dry-run', cache, backing]);
  assert.equal(again.status, 0, again.stderr);
  assert.match(again.stdout, /: 0 B \(0 sectors\) dirty, superblock clean/);
  const second = flushCli([cache, backing]);
  assert.equal(second.status, 0, second.stderr);
  assert.match(second.stdout, /superblock clean -> clean/);
  assert.ok(readFileSync(backing).subarray(DATA_OFFSET).equals(want));
});

test('flush refuses mistakes with a clear message, before writing anything back', async () => {
  using t = tempDir('ubcache-flush-err-');
  const { cache, backing } = await dirtyImages(t.dir);
  mkdirSync(join(t.dir, 'other'));
  const other = makeImages(join(t.dir, 'other'), { backingMiB: 16 });
  const before = readFileSync(backing);
  const missing = flushCli([cache, join(t.dir, 'nope.img')]);
  assert.equal(missing.status, 1);
  assert.match(missing.stderr, /^ubcache flush: cannot open .*nope\.img: /m);

  const wrongSet = flushCli([other.cache, backing]);
  assert.equal(wrongSet.status, 1);
  assert.match(
    wrongSet.stderr,
    /backing\.img belongs to cache set [0-9a-f-]{36} \(its superblock says dirty\), which is not the set of .*cache\.img \(cache set [0-9a-f-]{36}\)/,
  );
  assert.match(wrongSet.stderr, /Give the cache device of that set/);

  const noCache = flushCli([backing, other.backing]);
  assert.equal(noCache.status, 1);
  assert.match(noCache.stderr, /no cache device among /);

  const one = flushCli([cache]);
  assert.equal(one.status, 1);
  assert.match(one.stderr, /only one device given .*: flush needs the cache and its backing devices/);
  assert.ok(readFileSync(backing).equals(before), 'nothing was written back');
  assert.equal(stateOf(backing), BDEV_STATE_DIRTY);

  const none = flushCli([]);
  assert.equal(none.status, 1);
  assert.match(none.stderr, /no CACHE and no BACKING device given/);
});

test('SIGINT stops a flush in order: exit 130, what is left stays dirty, a second flush finishes it', async () => {
  using t = tempDir('ubcache-flush-int-');
  const { cache, backing, want } = await dirtyImages(t.dir);
  // The backing device behind an export that takes 2 s per write: the flush is still copying when told to stop.
  const slow = await startExport(t.dir, ['--name', 'disk', '--delay', '2s', backing]);
  try {
    const child = spawn(
      process.execPath,
      ['--import', 'tsx', join(ROOT, 'src', 'cli', 'main.ts'), 'flush', cache, slow.uri('disk')],
      {
        cwd: ROOT,
        stdio: ['ignore', 'pipe', 'pipe'],
      },
    );
    let out = '';
    let err = '';
    let told = false;
    child.stdout.setEncoding('utf8').on('data', (d: string) => {
      out += d;
      if (!told && /writing back/.test(out)) {
        told = true;
        setTimeout(() => {
          child.kill('SIGINT');
        }, 500);
      }
    });
    child.stderr.setEncoding('utf8').on('data', (d: string) => (err += d));
    const status = await new Promise<number | null>((resolve) => {
      child.on('exit', (code) => {
        resolve(code);
      });
    });
    assert.equal(status, 130, `${out}\n${err}`);
    assert.match(err, /SIGINT: stopping writeback/);
    assert.match(err, /interrupted: .* written back, .* still dirty in the cache/);
    assert.doesNotMatch(out, /^done:/m);
  } finally {
    await slow.daemon.stop();
  }
  assert.equal(stateOf(backing), BDEV_STATE_DIRTY, 'not clean: the flush did not finish');
  const dry = flushCli(['-n', cache, backing]);
  assert.equal(dry.status, 0, dry.stderr);
  assert.match(dry.stdout, /\(\d+ sectors\) dirty, superblock dirty/);
  const r = flushCli([cache, backing]);
  assert.equal(r.status, 0, `${r.stdout}\n${r.stderr}`);
  assert.equal(stateOf(backing), BDEV_STATE_CLEAN);
  assert.ok(
    readFileSync(backing).subarray(DATA_OFFSET).equals(want),
    'the backing image holds exactly what was written',
  );
});

test('flush arguments', () => {
  assert.deepEqual(parseFlushArgs(['-n', 'c', 'b']), { devices: ['c', 'b'], dryRun: true, verbose: false });
  assert.equal(parseFlushArgs(['--help']), 'help');
  assert.throws(
    () => parseFlushArgs(['c', 'c']),
    (e: unknown) => e instanceof CliError && /given twice/.test(e.message),
  );
  assert.throws(
    () => parseFlushArgs(['--bogus', 'c', 'b']),
    (e: unknown) => e instanceof CliError,
  );
  assert.equal(formatBytes(16 * MiB), '16.0 MiB');
  assert.equal(formatBytes(512), '512 B');
});

test('the dry run view: writes stay in memory, reads see them over the device below', async () => {
  const base = new MemoryBlockDevice(64 * 1024);
  const orig = randomBytes(64 * 1024);
  await base.write(orig, 0);
  const cow = new CopyOnWriteDevice(base);
  const patch = randomBytes(5000);
  await cow.write(patch, 3000); // unaligned, across chunks
  await cow.writeZeroes(40_000, 1000);
  const want = Buffer.from(orig);
  patch.copy(want, 3000);
  want.fill(0, 40_000, 41_000);
  const got = Buffer.alloc(64 * 1024);
  await cow.read(got, 0);
  assert.ok(got.equals(want), 'the view');
  const below = Buffer.alloc(64 * 1024);
  await base.read(below, 0);
  assert.ok(below.equals(orig), 'the device below is untouched');
  await assert.rejects(cow.write(Buffer.alloc(512), 64 * 1024), /outside the device/);
  await cow.close();
});
