// ubcache show-super against Debian's bcache-super-show (bcache-tools 1.0.8):
// the same stdout, byte for byte, and the same exit status, for devices made
// by make-bcache with varied options, written by the kernel, relabelled,
// corrupted, foreign, truncated or missing.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { captureOutput } from '../../src/cli/output.ts';
import { showSuper } from '../../src/cli/show-super.ts';
import { SB_FIELD, superblockCsum } from '../../src/format/superblock.ts';
import { KERNEL_FIXTURE_DIR, loadKernelFixture } from '../helpers/fixtures.ts';
import { hasTool, ImageDir, runTool, sha256 } from '../helpers/images.ts';

const haveTools = hasTool('bcache-super-show') && hasTool('make-bcache');
const skip = haveTools ? false : 'bcache-tools (make-bcache, bcache-super-show) is not installed';

function ours(args: string[]): { status: number; stdout: string; stderr: string } {
  const out = captureOutput();
  const status = showSuper(args, out);
  return { status, stdout: out.out, stderr: out.err };
}

/** Ours and bcache-super-show agree on stdout, status and the first stderr line; returns our result. */
function same(args: string[], what: string): { status: number; stdout: string; stderr: string } {
  const theirs = runTool('bcache-super-show', args);
  const mine = ours(args);
  assert.equal(mine.stdout, theirs.stdout, `${what}: stdout`);
  assert.equal(mine.status, theirs.status, `${what}: exit status`);
  assert.equal(mine.stderr.split('\n')[0], theirs.stderr.split('\n')[0], `${what}: stderr`);
  return mine;
}

/** An 8 KiB image: zeroes, then the superblock block. */
function sbImage(d: ImageDir, name: string, block: Buffer): string {
  return d.file(name, Buffer.concat([Buffer.alloc(4096), block]));
}

function withCsum(b: Buffer): Buffer {
  b.writeBigUInt64LE(superblockCsum(b, b.readUInt16LE(SB_FIELD.keys)), 0);
  return b;
}

const vector = (name: string): Buffer => readFileSync(join(KERNEL_FIXTURE_DIR, '..', 'make-bcache', `${name}.sb`));

test('devices made by make-bcache with varied options', { skip }, () => {
  const d = new ImageDir();
  try {
    const cases: Array<[string, number, string[]]> = [
      ['cache-default', 64 << 20, ['-C']],
      ['cache-64k', 64 << 20, ['-b', '64k', '-C']],
      ['cache-options', 96 << 20, ['-b', '128k', '-w', '512', '--discard', '--cache_replacement_policy=fifo', '-C']],
      ['cache-random', 96 << 20, ['-b', '128k', '--cache_replacement_policy=random', '-C']],
      ['backing', 16 << 20, ['-B']],
      ['backing-offset-wb', 16 << 20, ['-o', '4096', '--writeback', '-w', '2k', '-B']],
    ];
    for (const [name, size, args] of cases) {
      const img = d.zeroed(`${name}.img`, size);
      const r = runTool('make-bcache', [...args, img]);
      assert.equal(r.status, 0, r.stderr);
      const mine = same([img], name);
      assert.equal(mine.status, 0);
      same(['-f', img], `${name} -f`);
    }
    for (const name of ['cache-default', 'cache-options', 'backing-default', 'backing-offset']) {
      same([sbImage(d, `${name}.vec`, vector(name))], `vector ${name}`);
    }
  } finally {
    d.remove();
  }
});

test('superblocks the kernel rewrote (registered caches, dirty backing devices)', { skip }, () => {
  const d = new ImageDir();
  try {
    for (const name of ['fresh', 'wb-stopped', 'wb-crash'] as const) {
      const { cache, bdev } = loadKernelFixture(name);
      const r = same([d.file(`${name}-cache.img`, cache.subarray(0, 16384))], `${name} cache`);
      assert.match(r.stdout, /sb\.version\t\t3 \[cache device\]/);
      assert.match(r.stdout, /dev\.cache\.ordered\tyes/);
      if (bdev) {
        const b = same([d.file(`${name}-bdev.img`, bdev.subarray(0, 16384))], `${name} bdev`);
        assert.match(b.stdout, /dev\.data\.cache_state\t2 \[dirty\]/);
      }
    }
  } finally {
    d.remove();
  }
});

test("labels are printed with bcache-super-show's escapes, quirks included", { skip }, () => {
  const d = new ImageDir();
  try {
    const labels = ['my cache', 'a/b:c', 'ok.name-with_chars', 'caf\u00e9 \u2713', 'x'.repeat(32), '\t\x01\x7f'];
    labels.forEach((label, i) => {
      const b = Buffer.from(vector(i % 2 ? 'backing-default' : 'cache-default'));
      b.fill(0, SB_FIELD.label, SB_FIELD.label + 32);
      Buffer.from(label, 'utf8').copy(b, SB_FIELD.label, 0, 32);
      const r = same([sbImage(d, `label${i}.img`, withCsum(b))], `label ${JSON.stringify(label)}`);
      assert.match(r.stdout, /^dev\.label\t\t\S+$/m);
    });
  } finally {
    d.remove();
  }
});

test('odd field values print as bcache-super-show prints them', { skip }, () => {
  const d = new ImageDir();
  try {
    const edit = (name: string, base: string, f: (b: Buffer) => void, keepCsum = false): string => {
      const b = Buffer.from(vector(base));
      f(b);
      return sbImage(d, name, keepCsum ? b : withCsum(b));
    };
    const cases: Array<[string, string, (b: Buffer) => void]> = [
      ['replacement 5', 'cache-default', (b) => b.writeBigUInt64LE(5n << 2n, SB_FIELD.flags)],
      ['all cache flags', 'cache-default', (b) => b.writeBigUInt64LE(0xffffffffffffffffn, SB_FIELD.flags)],
      ['cache mode 7, state 3', 'backing-default', (b) => b.writeBigUInt64LE((3n << 61n) | 7n, SB_FIELD.flags)],
      ['writearound, clean', 'backing-default', (b) => b.writeBigUInt64LE((1n << 61n) | 2n, SB_FIELD.flags)],
      ['first_bucket past nbuckets', 'cache-default', (b) => b.writeUInt16LE(60000, SB_FIELD.firstBucket)],
      ['huge nbuckets', 'cache-default', (b) => b.writeBigUInt64LE(0xfffffffffffffn, SB_FIELD.nbuckets)],
      ['big sizes', 'cache-default', (b) => b.writeUInt16LE(0xffff, SB_FIELD.bucketSize)],
      ['version 3', 'cache-default', (b) => b.writeBigUInt64LE(3n, SB_FIELD.version)],
      ['pos 5', 'cache-default', (b) => b.writeUInt16LE(5, SB_FIELD.nrThisDev)],
      ['version 4 with an offset', 'backing-offset', (b) => b.writeBigUInt64LE(123456789n, SB_FIELD.dataOffset)],
      [
        'journal buckets',
        'cache-default',
        (b) => {
          b.writeUInt16LE(3, SB_FIELD.keys);
          for (let i = 0; i < 3; i++) b.writeBigUInt64LE(BigInt(1 + i), SB_FIELD.d + 8 * i);
        },
      ],
    ];
    for (const [name, base, f] of cases) assert.equal(same([edit(`${name}.img`, base, f)], name).status, 0);

    // Versions bcache-super-show does not know: it prints the version line and exits 0.
    for (const v of [2n, 5n, 6n, 7n, 1n << 40n]) {
      const r = same(
        [edit(`v${v}.img`, 'cache-default', (b) => b.writeBigUInt64LE(v, SB_FIELD.version))],
        `version ${v}`,
      );
      assert.equal(r.status, 0);
      assert.match(r.stdout, /\[unknown\]\n$/);
    }
    // A version 4 backing superblock with journal fields: "experimental", exit 3.
    const exp1 = same([edit('exp1.img', 'backing-offset', (b) => b.writeUInt16LE(1, SB_FIELD.keys))], 'keys == 1');
    assert.equal(exp1.status, 3);
    const exp2 = same([edit('exp2.img', 'backing-offset', (b) => b.writeBigUInt64LE(7n, SB_FIELD.d))], 'd[0] set');
    assert.equal(exp2.status, 3);
    assert.match(exp2.stderr, /Possible experimental format detected, bailing/);
  } finally {
    d.remove();
  }
});

test('corrupt, foreign, truncated and missing devices: the same errors and statuses, nothing written', { skip }, () => {
  const d = new ImageDir();
  try {
    const flipped = Buffer.from(vector('cache-default'));
    flipped[SB_FIELD.label + 3] = 0x41;
    const corrupt = sbImage(d, 'flipped.img', flipped);
    const before = sha256(corrupt);
    const bad = same([corrupt], 'flipped byte');
    assert.equal(bad.status, 2);
    assert.match(bad.stdout, /\[expected [0-9A-F]+\]\n$/);
    assert.match(bad.stderr, /^Corrupt superblock \(bad csum\)\nubcache show-super: .*-f shows it anyway/);
    const forced = same(['-f', corrupt], 'flipped byte, -f');
    assert.equal(forced.status, 0);
    assert.equal(sha256(corrupt), before, 'show-super never writes');

    const magic = Buffer.from(vector('backing-default'));
    magic.writeUInt8(magic.readUInt8(SB_FIELD.magic + 15) ^ 1, SB_FIELD.magic + 15);
    assert.equal(same([sbImage(d, 'magic.img', magic)], 'wrong magic').status, 2);
    const sector = withCsum(Buffer.from(vector('cache-default')));
    sector.writeBigUInt64LE(16n, SB_FIELD.offset);
    assert.equal(same([sbImage(d, 'sector.img', sector)], 'wrong sector').status, 2);

    const ext4 = d.zeroed('ext4.img', 8 << 20);
    assert.equal(runTool('mkfs.ext4', ['-q', '-F', ext4]).status, 0);
    const ext4Hash = sha256(ext4);
    assert.equal(same([ext4], 'ext4').status, 2);
    assert.equal(sha256(ext4), ext4Hash);
    assert.equal(same([d.zeroed('zero.img', 1 << 20)], 'zero-filled').status, 2);

    const full = Buffer.concat([Buffer.alloc(4096), vector('cache-default')]);
    assert.equal(same([d.file('short.img', full.subarray(0, 4096 + 2255))], 'truncated').status, 2);
    assert.equal(same([d.file('just.img', full.subarray(0, 4096 + 2256))], 'just long enough').status, 0);
    assert.equal(same([d.file('empty.img', Buffer.alloc(0))], 'empty').status, 2);
    const missing = same([d.path('missing.img')], 'missing');
    assert.match(missing.stdout, /^Can't open dev .*: No such file or directory\n$/);
    assert.equal(same([d.dir], 'a directory').status, 2);
  } finally {
    d.remove();
  }
});

test('usage: bad arguments exit 1, --help 0', () => {
  assert.equal(ours([]).status, 1);
  assert.match(ours([]).stderr, /^Usage: ubcache show-super/);
  assert.equal(ours(['a', 'b']).status, 1);
  const unknown = ours(['-x', 'a']);
  assert.equal(unknown.status, 1);
  assert.match(unknown.stderr, /-x/);
  const help = ours(['--help']);
  assert.equal(help.status, 0);
  assert.match(help.stdout, /--json/);
});

test('--json prints the same facts for scripts, errors included', () => {
  const d = new ImageDir();
  try {
    const c = ours(['--json', sbImage(d, 'c.img', vector('cache-options'))]);
    assert.equal(c.status, 0);
    const cj = JSON.parse(c.stdout) as Record<'sb' | 'dev' | 'cset', Record<string, unknown>>;
    assert.equal(cj.sb['kind'], 'cache device');
    assert.equal(cj.sb['csum_ok'], true);
    assert.deepEqual(cj.dev['cache'], {
      first_sector: 256,
      cache_sectors: 196352,
      total_sectors: 196608,
      nbuckets: 768,
      first_bucket: 1,
      ordered: false,
      discard: true,
      pos: 0,
      replacement: 2,
      replacement_name: 'random',
    });
    assert.equal(cj.dev['sectors_per_block'], 1);
    assert.equal(cj.cset['uuid'], '0f0f0f0f-1e1e-4d2d-8c3c-4b4b4b4b4b4b');

    const b = JSON.parse(ours(['--json', sbImage(d, 'b.img', vector('backing-offset'))]).stdout) as Record<
      'dev',
      Record<string, unknown>
    >;
    assert.deepEqual(b.dev['data'], {
      first_sector: 2048,
      cache_mode: 1,
      cache_mode_name: 'writeback',
      cache_state: 0,
      cache_state_name: 'detached',
    });
    assert.equal(b.dev['label'], '');

    const zero = ours(['--json', d.zeroed('z.img', 8192)]);
    assert.equal(zero.status, 2);
    assert.equal((JSON.parse(zero.stdout) as Record<string, unknown>)['error'], 'Invalid superblock (bad magic)');
    const gone = ours(['--json', d.path('nope.img')]);
    assert.equal(gone.status, 2);
    assert.match((JSON.parse(gone.stdout) as Record<string, string>)['error'] ?? '', /Can't open dev/);
    const short = ours(['--json', d.file('s.img', Buffer.alloc(5000))]);
    assert.equal(short.status, 2);
    assert.equal((JSON.parse(short.stdout) as Record<string, string>)['error'], "Couldn't read");
  } finally {
    d.remove();
  }
});

test('the ubcache command runs show-super: exit status and output through main()', () => {
  const d = new ImageDir();
  try {
    const img = sbImage(d, 'v.img', vector('backing-default'));
    const root = join(KERNEL_FIXTURE_DIR, '..', '..', '..');
    const r = runTool(process.execPath, ['--import', 'tsx', join(root, 'src', 'cli', 'main.ts'), 'show-super', img]);
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout, ours([img]).stdout);
    const bad = runTool(process.execPath, [
      '--import',
      'tsx',
      join(root, 'src', 'cli', 'main.ts'),
      'show-super',
      d.zeroed('z.img', 8192),
    ]);
    assert.equal(bad.status, 2);
  } finally {
    d.remove();
  }
});
