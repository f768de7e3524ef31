// ubcache make against Debian's make-bcache: the same superblocks and output
// for the same options, what bcache-super-show says about the result, the
// zeroing, and every refusal (with nothing written).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, constants, linkSync, openSync, readFileSync, readSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { CliError } from '../../src/cli/common.ts';
import { make } from '../../src/cli/make.ts';
import { findSignatures, bcacheSignature } from '../../src/cli/make-signatures.ts';
import { captureOutput } from '../../src/cli/output.ts';
import { decodeSuperblock, SB_FIELD, superblockCsum } from '../../src/format/superblock.ts';
import { formatUuid } from '../../src/format/uuid-text.ts';
import { hasTool, ImageDir, runTool, sha256 } from '../helpers/images.ts';

const MiB = 1024 * 1024;
const haveTools = hasTool('bcache-super-show') && hasTool('make-bcache');
const skip = haveTools ? false : 'bcache-tools (make-bcache, bcache-super-show) is not installed';
const SET = '3b3b3b3b-4c4c-4d5d-8e6e-7f7f7f7f7f7f';

interface Result {
  status: number;
  stdout: string;
  stderr: string;
  message: string;
  hint: string;
}

function ours(args: string[]): Result {
  const out = captureOutput();
  try {
    const status = make(args, out);
    return { status, stdout: out.out, stderr: out.err, message: '', hint: '' };
  } catch (err) {
    if (!(err instanceof CliError)) throw err;
    return { status: err.status, stdout: out.out, stderr: out.err, message: err.message, hint: err.hint ?? '' };
  }
}

/** The first `bytes` of a file (without reading a large image whole). */
function head(path: string, bytes: number): Buffer {
  const fd = openSync(path, 'r');
  try {
    const b = Buffer.alloc(bytes);
    const n = readSync(fd, b, 0, bytes, 0);
    return b.subarray(0, n);
  } finally {
    closeSync(fd);
  }
}

function sb(path: string): Buffer {
  return head(path, 8192).subarray(4096);
}

/** Our superblock with the other one's device UUID (random in both) and the checksum redone. */
function withUuidOf(mine: Buffer, theirs: Buffer): Buffer {
  const b = Buffer.from(mine);
  theirs.copy(b, SB_FIELD.uuid, SB_FIELD.uuid, SB_FIELD.uuid + 16);
  b.writeBigUInt64LE(superblockCsum(b, b.readUInt16LE(SB_FIELD.keys)), 0);
  return b;
}

const hideUuids = (s: string): string =>
  s.replace(/[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/g, 'UUID');
const hideUnique = (s: string): string => hideUuids(s).replace(/^sb\.csum.*$/m, 'sb.csum');

test('the same superblocks, output and bcache-super-show report as make-bcache, for the same options', { skip }, () => {
  const d = new ImageDir();
  try {
    const cases: Array<{ args: string[]; sizes: number[] }> = [
      { args: ['-C', '@0'], sizes: [300 * MiB] },
      { args: ['-b', '64k', '-C', '@0'], sizes: [64 * MiB] },
      {
        args: ['-b', '128k', '-w', '512', '--discard', '--cache_replacement_policy=fifo', '-C', '@0'],
        sizes: [96 * MiB],
      },
      { args: ['--cache-replacement-policy', 'random', '-b', '64k', '-C', '@0'], sizes: [64 * MiB] },
      { args: ['-B', '@0'], sizes: [16 * MiB] },
      { args: ['-o', '2048', '--writeback', '-B', '@0'], sizes: [16 * MiB] },
      { args: ['-w', '2k', '--data_offset', '4096', '-B', '@0'], sizes: [16 * MiB] },
      { args: ['-b', '64k', '--writeback', '-B', '@1', '@2', '-C', '@0'], sizes: [64 * MiB, 16 * MiB, 8 * MiB] },
    ];
    cases.forEach(({ args, sizes }, i) => {
      const theirs = sizes.map((s, j) => d.zeroed(`t${i}-${j}.img`, s));
      const mine = sizes.map((s, j) => d.zeroed(`m${i}-${j}.img`, s));
      const fill = (paths: string[]): string[] =>
        args.map((a) => (a.startsWith('@') ? (paths[Number(a.slice(1))] ?? a) : a));
      const t = runTool('make-bcache', ['--cset-uuid', SET, ...fill(theirs)]);
      assert.equal(t.status, 0, t.stderr);
      const m = ours(['--cset-uuid', SET, ...fill(mine)]);
      assert.equal(m.status, 0, m.message);
      assert.equal(hideUuids(m.stdout), hideUuids(t.stdout), `${args.join(' ')}: output`);
      sizes.forEach((_, j) => {
        const [tp, mp] = [theirs[j] ?? '', mine[j] ?? ''];
        assert.deepEqual(withUuidOf(sb(mp), sb(tp)), sb(tp), `${args.join(' ')}: device ${j} superblock`);
        assert.deepEqual(head(mp, 4096), Buffer.alloc(4096));
        const ts = runTool('bcache-super-show', [tp]);
        const ms = runTool('bcache-super-show', [mp]);
        assert.equal(ms.status, 0, ms.stderr);
        assert.equal(hideUnique(ms.stdout), hideUnique(ts.stdout));
        assert.match(ms.stdout, new RegExp(`cset\\.uuid\\t\\t${SET}`), 'every device of the command is in the set');
      });
    });
  } finally {
    d.remove();
  }
});

test('devices made in one command share a fresh set UUID', () => {
  const d = new ImageDir();
  try {
    const paths = [d.zeroed('c.img', 64 * MiB), d.zeroed('b.img', 16 * MiB)];
    assert.equal(ours(['-b', '64k', '-C', paths[0] ?? '', '-B', paths[1] ?? '']).status, 0);
    const [c, b] = paths.map((p) => decodeSuperblock(sb(p)));
    assert.ok(c && b);
    assert.ok(c.setUuid.equals(b.setUuid));
    assert.ok(!c.uuid.equals(b.uuid));
    const again = d.zeroed('c2.img', 64 * MiB);
    assert.equal(ours(['-b', '64k', '-C', again]).status, 0);
    assert.ok(!decodeSuperblock(sb(again)).setUuid.equals(c.setUuid), 'another command, another set');
  } finally {
    d.remove();
  }
});

test('make zeroes the first 4 KiB, the rest of the superblock block and the journal buckets, and nothing else', () => {
  const d = new ImageDir();
  try {
    const path = d.file('dirty.img', Buffer.alloc(64 * MiB, 0xff));
    assert.equal(ours(['-b', '64k', '-C', path]).status, 0);
    const img = readFileSync(path);
    const s = decodeSuperblock(img.subarray(4096, 8192));
    const bucket = s.bucketSize * 512;
    const journalEnd = (s.firstBucket + 8) * bucket; // 1024 buckets: 8 journal buckets
    assert.ok(img.subarray(0, 4096).every((x) => x === 0));
    assert.ok(
      img.subarray(4096 + 2258, 8192).every((x) => x === 0),
      'no stale bytes in the superblock block',
    );
    assert.ok(
      img.subarray(8192, s.firstBucket * bucket).every((x) => x === 0xff),
      'the rest of bucket 0 is left alone',
    );
    assert.ok(
      img.subarray(s.firstBucket * bucket, journalEnd).every((x) => x === 0),
      'the journal buckets are zero',
    );
    assert.ok(
      img.subarray(journalEnd).every((x) => x === 0xff),
      'the data buckets are left alone',
    );
  } finally {
    d.remove();
  }
});

function refused(args: string[], message: RegExp, hint: RegExp, paths: string[]): void {
  const before = paths.map(sha256);
  const r = ours(args);
  assert.equal(r.status, 1, `${args.join(' ')} should be refused`);
  assert.equal(r.stdout, '', 'nothing reported as made');
  assert.match(r.message, message);
  assert.match(r.hint, hint);
  assert.deepEqual(paths.map(sha256), before, `${args.join(' ')}: nothing written`);
}

test('an existing bcache superblock is kept unless --wipe-bcache is given', { skip }, () => {
  const d = new ImageDir();
  try {
    const img = d.zeroed('old.img', 64 * MiB);
    assert.equal(runTool('make-bcache', ['-b', '64k', '-C', img]).status, 0);
    refused(['-b', '64k', '-C', img], /already a bcache cache device \(UUID .*, set .*\)/, /--wipe-bcache/, [img]);
    // Damaged is still bcache: its magic is there.
    const fd = openSync(img, 'r+');
    writeSync(fd, Buffer.from('x'), 0, 1, 4096 + SB_FIELD.label);
    closeSync(fd);
    refused(['-b', '64k', '-C', img], /already a bcache/, /--wipe-bcache/, [img]);
    const old = sb(img);
    const r = ours(['--wipe-bcache', '-b', '64k', '-C', img]);
    assert.equal(r.status, 0, r.message);
    const fresh = decodeSuperblock(sb(img));
    assert.ok(!fresh.uuid.equals(old.subarray(SB_FIELD.uuid, SB_FIELD.uuid + 16)));
    const bdev = d.zeroed('oldb.img', 16 * MiB);
    assert.equal(runTool('make-bcache', ['-B', bdev]).status, 0);
    refused(['-B', bdev], /already a bcache backing device/, /--wipe-bcache/, [bdev]);
    assert.equal(ours(['--wipe-bcache', '-B', bdev]).status, 0);
  } finally {
    d.remove();
  }
});

test('any other signature is refused, --wipe-bcache or not, and the other devices stay untouched', () => {
  const d = new ImageDir();
  try {
    const good = d.zeroed('good.img', 64 * MiB);
    const ext4 = d.zeroed('ext4.img', 16 * MiB);
    assert.equal(runTool('mkfs.ext4', ['-q', '-F', ext4]).status, 0);
    refused(
      ['--wipe-bcache', '-b', '64k', '-C', good, '-B', ext4],
      /ext4.img already holds an ext4 file system \(magic 0xEF53 at byte 1080\)/,
      /wipefs -a .*ext4.img/,
      [good, ext4],
    );
    const swap = d.zeroed('swap.img', 16 * MiB);
    assert.equal(runTool('mkswap', [swap]).status, 0);
    refused(['-B', swap], /swap space \("SWAPSPACE2" at byte 4086\)/, /wipefs -a/, [swap]);
    if (hasTool('mkfs.minix') && hasTool('blkid')) {
      // A format our own probe does not know: blkid -p finds it.
      const minix = d.zeroed('minix.img', 16 * MiB);
      assert.equal(runTool('mkfs.minix', [minix]).status, 0);
      refused(['-B', minix], /minix/, /wipefs -a/, [minix]);
    }
    const gpt = Buffer.alloc(16 * MiB);
    gpt.write('EFI PART', 512, 'latin1');
    gpt[510] = 0x55;
    gpt[511] = 0xaa;
    refused(['-B', d.file('gpt.img', gpt)], /a GPT partition table \("EFI PART" at byte 512\) \(and dos/, /wipefs/, [
      d.path('gpt.img'),
    ]);
    const fs9 = Buffer.alloc(16 * MiB);
    Buffer.from(readFileSync(join(import.meta.dirname, '..', 'fixtures', 'make-bcache', 'backing-default.sb'))).copy(
      fs9,
      4096,
    );
    fs9.writeBigUInt64LE(9n, 4096 + SB_FIELD.version);
    refused(['--wipe-bcache', '-B', d.file('fs9.img', fs9)], /bcache's magic but version 9 \(bcachefs\?\)/, /wipefs/, [
      d.path('fs9.img'),
    ]);
  } finally {
    d.remove();
  }
});

test('our own probe knows the common signatures', () => {
  const at = (size: number, pos: number, text: string): Buffer => {
    const b = Buffer.alloc(size);
    b.write(text, pos, 'latin1');
    return b;
  };
  const types = (b: Buffer): string[] => findSignatures(b).map((s) => s.type);
  assert.deepEqual(types(at(8192, 0, 'XFSB')), ['xfs']);
  assert.deepEqual(types(at(128 * 1024, 0x10040, '_BHRfS_M')), ['btrfs']);
  assert.deepEqual(types(at(16384, 16384 - 10, 'SWAP-SPACE')), ['swap']);
  assert.deepEqual(types(at(8192, 0, 'LUKS\xba\xbe')), ['crypto_LUKS']);
  const lvm = at(8192, 512, 'LABELONE');
  lvm.write('LVM2 001', 512 + 24, 'latin1');
  assert.deepEqual(types(lvm), ['LVM2_member']);
  const md = Buffer.alloc(8192);
  md.writeUInt32LE(0xa92b4efc, 4096);
  assert.deepEqual(types(md), ['linux_raid_member']);
  const f2fs = Buffer.alloc(8192);
  f2fs.writeUInt32LE(0xf2f52010, 1024);
  assert.deepEqual(types(f2fs), ['f2fs']);
  assert.deepEqual(types(at(8192, 0, 'hsqs')), ['squashfs']);
  assert.deepEqual(types(at(40000, 32769, 'CD001')), ['iso9660']);
  const ext = Buffer.alloc(4096);
  ext.writeUInt16LE(0xef53, 1080);
  assert.deepEqual(types(ext), ['ext2']);
  ext.writeUInt32LE(4, 1024 + 92);
  assert.deepEqual(types(ext), ['ext3']);
  ext.writeUInt32LE(0x40, 1024 + 96);
  assert.deepEqual(types(ext), ['ext4']);
  assert.deepEqual(types(Buffer.alloc(128 * 1024)), []);
  assert.equal(bcacheSignature(Buffer.alloc(100)), undefined);
});

test('bad options are refused before anything is written, saying why and what to do', () => {
  const d = new ImageDir();
  try {
    // Small images: every case is refused before their size matters.
    const img = d.zeroed('c.img', 4 * MiB);
    const b = d.zeroed('b.img', 2 * MiB);
    const cases: Array<[string[], RegExp, RegExp]> = [
      [[img], /say whether it is a cache or a backing device/, /-C \(cache\) or -B/],
      [['-C'], /no device given/, /Usage/],
      [['-b', '3k', '-C', img], /must be a power of two/, /512k/],
      [['-b', '100', '-C', img], /smaller than a 512-byte sector/, /in bytes/],
      [['-b', 'lots', '-C', img], /not a size/, /-b 4k/],
      [['-b', '64m', '-C', img], /too large.*at most 16m/, /16m or less/],
      [
        ['-w', '8k', '-b', '64k', '-C', img],
        /larger than a page \(4k\); the Linux kernel refuses such a cache/,
        /-w 4k/,
      ],
      [['-b', '2k', '-w', '512', '-C', img], /smaller than a page \(4k\)/, /-b 4k or larger/],
      [
        ['-b', '4k', '-w', '8k', '-B', b],
        /bucket size \(4 KiB\) is smaller than the block size \(8 KiB\)/,
        /at least as large/,
      ],
      [['-o', '8', '-B', b], /at least 16 sectors/, /8 KiB/],
      [['-o', 'x', '-B', b], /not a number of sectors/, /-o 2048/],
      [['-o', '17', '-B', b], /not a multiple of the block size \(8 sectors\)/, /misaligned/],
      [['--cset-uuid', 'nope', '-C', img], /not a UUID/, /8-4-4-4-12/],
      [['--cset-uuid', '00000000-0000-0000-0000-000000000000', '-C', img], /all-zero UUID/, /uuidgen/],
      [['--cache_replacement_policy=bogus', '-C', img], /unknown policy/, /lru, fifo, random/],
      [['--frobnicate', '-C', img], /frobnicate/, /Usage/],
      [['-b', '64k', '-C', img, b], /two caches of one set/, /own command/],
      [['-b', '64k', '-C', img, '-B', img], /are the same device/, /once/],
      [['-B', d.path('missing.img')], /cannot open .*missing.img: No such file or directory/, /truncate -s/],
      [['-B', d.dir], /neither a regular file nor a block device|Is a directory/, /./],
    ];
    for (const [args, message, hint] of cases) refused(args, message, hint, [img, b]);
    linkSync(img, d.path('link.img'));
    refused(['-b', '64k', '-C', img, '-B', d.path('link.img')], /are the same device/, /once/, [img]);
  } finally {
    d.remove();
  }
});

test('devices the kernel would refuse, or that hold no data, are refused with the minimum size', () => {
  const d = new ImageDir();
  try {
    const c512 = d.zeroed('c512.img', 512 * 4096);
    refused(
      ['-b', '4k', '-C', c512],
      /holds 512 buckets of 4 KiB; the Linux kernel needs at least 513/,
      /at least 2\.0 MiB/,
      [c512],
    );
    const c513 = d.zeroed('c513.img', 513 * 4096);
    assert.equal(ours(['-b', '4k', '-C', c513]).status, 0);
    assert.equal(decodeSuperblock(sb(c513)).nbuckets, 513);
    refused(
      ['-C', d.zeroed('c64.img', 64 * MiB)],
      /holds 128 buckets of 512 KiB/,
      /at least 256\.5 MiB.*smaller bucket \(-b\)/,
      [d.path('c64.img')],
    );
    const tiny = d.zeroed('tiny.img', 8192);
    refused(['-B', tiny], /no room for data after the 16-sector data offset/, /larger than 8 KiB/, [tiny]);
    refused(
      ['-o', '4096', '-B', d.zeroed('b2.img', 2 * MiB)],
      /no room for data after the 4096-sector/,
      /larger than 2 MiB/,
      [d.path('b2.img')],
    );
  } finally {
    d.remove();
  }
});

function losetup(args: string[]): string | undefined {
  const r = runTool('losetup', args);
  return r.status === 0 ? r.stdout.trim() : undefined;
}

const loopSkip =
  process.getuid?.() !== 0
    ? 'loop devices need root'
    : !hasTool('losetup')
      ? 'losetup is not installed'
      : haveTools
        ? false
        : skip;

test('block devices: a loop device, its logical block size, and exclusive use', { skip: loopSkip }, () => {
  const d = new ImageDir();
  const loops: string[] = [];
  const attach = (file: string, extra: string[] = []): string => {
    const dev = losetup(['-f', '--show', ...extra, file]);
    assert.ok(dev, 'losetup attached a loop device');
    loops.push(dev);
    return dev;
  };
  try {
    const ours512 = attach(d.zeroed('a.img', 64 * MiB));
    const theirs512 = attach(d.zeroed('b.img', 64 * MiB));
    assert.equal(ours(['--cset-uuid', SET, '-b', '64k', '-C', ours512]).status, 0);
    assert.equal(runTool('make-bcache', ['--cset-uuid', SET, '-b', '64k', '-C', theirs512]).status, 0);
    assert.deepEqual(withUuidOf(sb(d.path('a.img')), sb(d.path('b.img'))), sb(d.path('b.img')));
    assert.equal(decodeSuperblock(sb(d.path('a.img'))).blockSize, 1, "a 512-byte loop device's block: 1 sector");
    assert.equal(runTool('bcache-super-show', [ours512]).status, 0);

    const big = attach(d.zeroed('c.img', 64 * MiB), ['--sector-size', '4096']);
    assert.equal(ours(['-b', '64k', '-B', big]).status, 0);
    assert.equal(decodeSuperblock(sb(d.path('c.img'))).blockSize, 8, 'a 4 KiB-sector device: 8 sectors');
    refused(
      ['--wipe-bcache', '-w', '512', '-b', '64k', '-B', big],
      /smaller than .*logical block size \(4096\)/,
      /-w 4k/,
      [d.path('c.img')],
    );

    const busy = attach(d.zeroed('d.img', 64 * MiB));
    const fd = openSync(busy, constants.O_RDONLY | constants.O_EXCL);
    try {
      refused(['-b', '64k', '-C', busy], /cannot open .* exclusively: Device or resource busy/, /in use/, [
        d.path('d.img'),
      ]);
    } finally {
      closeSync(fd);
    }
  } finally {
    for (const l of loops) losetup(['-d', l]);
    d.remove();
  }
});

test('the ubcache command: help, and errors printed with their advice and status 1', () => {
  const main = join(import.meta.dirname, '..', '..', 'src', 'cli', 'main.ts');
  const help = runTool(process.execPath, ['--import', 'tsx', main, 'make', '--help']);
  assert.equal(help.status, 0);
  assert.match(help.stdout, /--wipe-bcache/);
  const d = new ImageDir();
  try {
    const bad = runTool(process.execPath, ['--import', 'tsx', main, 'make', '-b', '3k', '-C', d.zeroed('x.img', MiB)]);
    assert.equal(bad.status, 1);
    assert.equal(
      bad.stderr,
      'ubcache make: -b 3k: the bucket size must be a power of two\nFor example 512, 4k, 64k, 512k or 1m.\n',
    );
    assert.equal(formatUuid(Buffer.alloc(16)), '00000000-0000-0000-0000-000000000000');
  } finally {
    d.remove();
  }
});
