// Ceph RBD as bcache's backing device, end to end: a single-node cluster (the
// fixture in test/fixtures/ceph), RBD images served by qemu-nbd on unix
// sockets, `ubcache make -B` and `ubcache serve` reaching them with the
// native NBD client. ext4 on the cached device across a serve restart,
// written back, and the RBD image read alone with `rbd export`; the OSD
// killed and restarted under fio's verified writes (writeback and
// writethrough at once); qemu-nbd killed and restarted under them. One
// cluster serves the whole file and is torn down by PID at the end, also
// when a test fails.

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Daemon, have, run, UBCACHE, ubcache } from '../helpers/daemon.ts';
import { missingFuseLoop } from '../helpers/fuse-loop.ts';
import { CEPH_CLUSTER, CephCluster, missingCeph, rbdUri } from '../fixtures/ceph/cluster.ts';
import { Client, ext4Round, MiB, startServe, type ServeDaemon } from './serve-helpers.ts';

/** The backing device's data starts after its 8 KiB superblock area (make's default data offset). */
const DATA_OFFSET = 8192;

const skip = missingCeph() ?? ((!have('fio') && 'fio is not installed') || undefined);

let cluster: CephCluster | undefined;
let dir = '';

before(async () => {
  if (skip !== undefined) return;
  dir = mkdtempSync(join(tmpdir(), 'ubcache-ceph-'));
  // A backstop for a test process that ends without running `after` (its cluster must not outlive it).
  process.once('exit', () => {
    if (cluster) spawnSync(CEPH_CLUSTER, ['stop', dir]);
  });
  cluster = await CephCluster.start(dir);
  const rss = await cluster.rssMiB();
  process.stderr.write(
    `# ceph: ${cluster.started}; RSS ${Object.entries(rss)
      .map(([k, v]) => `${k} ${v.toFixed(0)} MiB`)
      .join(', ')}\n`,
  );
});

after(async () => {
  if (cluster) {
    const rss = await cluster.rssMiB().catch(() => ({}));
    process.stderr.write(
      `# ceph at the end: ${Object.entries(rss)
        .map(([k, v]) => `${k} ${v.toFixed(0)} MiB`)
        .join(', ')}\n`,
    );
    await cluster.stop();
    cluster = undefined;
  }
  if (dir !== '') rmSync(dir, { recursive: true, force: true });
});

function theCluster(): CephCluster {
  if (!cluster) throw new Error('the Ceph cluster did not start');
  return cluster;
}

const sha = (b: Buffer): string => createHash('sha256').update(b).digest('hex');

async function ctl(s: ServeDaemon, ...args: string[]): Promise<string> {
  return run(UBCACHE, ['ctl', '--control', `${s.socket}.control`, ...args]);
}

/** Resolves once `daemon` has logged more than `n` lines matching `pattern`. */
function moreLines(daemon: Daemon, pattern: RegExp, n: number): Promise<void> {
  const count = (): number => daemon.lines.filter((l) => pattern.test(l)).length;
  return new Promise((resolve, reject) => {
    const check = (): void => {
      if (count() > n) {
        done();
        resolve();
      }
    };
    const gone = (): void => {
      done();
      reject(new Error(`ubcache exited before logging ${pattern}:\n${daemon.stderr}`));
    };
    const done = (): void => {
      daemon.proc.stderr?.off('data', check);
      daemon.proc.off('exit', gone);
    };
    // The Daemon's own listener, added first, has already split the chunk into lines.
    daemon.proc.stderr?.on('data', check);
    daemon.proc.once('exit', gone);
    check();
  });
}

/** With no more writes coming: wait until bcache0 has written everything back (sysfs state clean). */
async function waitClean(s: ServeDaemon): Promise<void> {
  const cleaned = /bcache0: written back, .* marked clean/;
  for (;;) {
    const seen = s.daemon.lines.filter((l) => cleaned.test(l)).length;
    if ((await ctl(s, 'cat', 'block/bcache0/bcache/state')).trim() === 'clean') return;
    await moreLines(s.daemon, cleaned, seen);
  }
}

/** The RBD image as a file, read from the cluster by `rbd export` (no NBD, no cache). */
async function rbdExport(name: string, out: string): Promise<Buffer> {
  await run('rbd', ['-c', join(theCluster().dir, 'ceph.conf'), 'export', '--no-progress', `rbd/${name}`, out]);
  return readFileSync(out);
}

test(
  'ext4 on RBD: make -B over qemu-nbd, serve writeback across a restart, written back; the RBD image alone is the filesystem',
  { skip: skip ?? missingFuseLoop(), timeout: 180_000 },
  async () => {
    const c = theCluster();
    const work = join(dir, 'ext4');
    mkdirSync(work);
    await c.image('ext4', '160M');
    const rbd = rbdUri(await c.nbd('ext4'));
    const cache = join(work, 'cache.img');
    writeFileSync(cache, '');
    await run('truncate', ['-s', '128M', cache]);
    const made = ubcache(['make', '-b', '64k', '--writeback', '-C', cache, '-B', rbd]);
    assert.equal(made.status, 0, made.stderr);

    const files = new Map<string, Buffer>();
    const addFiles = async (mnt: string, prefix: string, n: number): Promise<void> => {
      for (let i = 0; i < n; i++) {
        const data = randomBytes(i % 3 === 0 ? 2 * MiB + i : 4096 * (i + 1) + 17);
        const name = `${prefix}-${i}.bin`;
        writeFileSync(join(mnt, name), data);
        files.set(name, data);
      }
      await run('sync', []);
    };
    const verify = (mnt: string): void => {
      for (const [name, data] of files) assert.equal(sha(readFileSync(join(mnt, name))), sha(data), `${name} differs`);
    };
    const common = ['--set', 'bcache0.sequential_cutoff=0', '--set', 'set.journal_delay_ms=10'];
    const round = async (
      n: number,
      args: string[],
      body: (mnt: string, loop: string) => Promise<void>,
    ): Promise<void> => {
      const rdir = join(work, `r${n}`);
      mkdirSync(rdir);
      const s = await startServe(rdir, [...common, ...args, cache, rbd]);
      await ext4Round(rdir, s, 'rbd', body);
    };

    // Round 1: writeback held off; the filesystem stays dirty in the cache across the restart.
    await round(1, ['--set', 'bcache0.writeback_running=0'], async (mnt, loop) => {
      await run('mkfs.ext4', ['-q', '-F', '-L', 'rbd', loop]);
      await run('mount', [loop, mnt]);
      await addFiles(mnt, 'a', 6);
    });
    // Round 2: the restarted daemon serves the dirty data from the cache; more work on top.
    await round(2, ['--set', 'bcache0.writeback_running=0'], async (mnt, loop) => {
      await run('mount', [loop, mnt]);
      verify(mnt);
      await run('rm', [join(mnt, 'a-1.bin')]);
      files.delete('a-1.bin');
      await addFiles(mnt, 'b', 4);
      verify(mnt);
    });
    const before = await rbdExport('ext4', join(work, 'before.img'));
    assert.notEqual(before.readUInt16LE(DATA_OFFSET + 1024 + 0x38), 0xef53, 'nothing reached RBD before writeback');

    // Round 3: writeback at full rate until bcache0 is clean; then RBD alone holds the filesystem.
    const r3 = join(work, 'r3');
    mkdirSync(r3);
    const s = await startServe(r3, [
      ...common,
      '--set',
      'bcache0.writeback_percent=0',
      '--set',
      'bcache0.writeback_delay=0',
      cache,
      rbd,
    ]);
    try {
      await waitClean(s);
    } finally {
      await s.daemon.stop().finally(() => s.daemon.kill());
    }
    await c.nbdKill('ext4');
    const image = await rbdExport('ext4', join(work, 'rbd.img'));
    const alone = join(work, 'alone.img');
    writeFileSync(alone, image.subarray(DATA_OFFSET));
    assert.match(await run('fsck.ext4', ['-f', '-n', alone]), /rbd: \d+\/\d+ files/);
    const listing = await run('debugfs', ['-R', 'ls -l /', alone]);
    for (const [name, data] of files) {
      assert.ok(listing.includes(name), `${name} is in the RBD image`);
      const dump = join(work, `dump-${name}`);
      await run('debugfs', ['-R', `dump /${name} ${dump}`, alone]);
      assert.equal(sha(readFileSync(dump)), sha(data), `${name} in the RBD image differs`);
    }
    assert.ok(!listing.includes('a-1.bin'), 'the deleted file is gone from the RBD image');
  },
);

/** fio in the background, reporting its progress (terse status lines once a second). */
class Fio {
  readonly done: Promise<{ code: number | null; out: string; err: string }>;
  private out = '';
  private waiters: { kib: number; resolve: () => void }[] = [];

  constructor(args: string[]) {
    const child = spawn('fio', [...args, '--output-format=terse', '--status-interval=1'], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let err = '';
    child.stdout.setEncoding('utf8').on('data', (t: string) => {
      this.out += t;
      const kib = this.writtenKiB();
      this.waiters = this.waiters.filter((w) => (kib >= w.kib ? (w.resolve(), false) : true));
    });
    child.stderr.setEncoding('utf8').on('data', (t: string) => (err += t));
    this.done = new Promise((resolve) => {
      child.on('close', (code) => {
        for (const w of this.waiters) w.resolve();
        this.waiters = [];
        resolve({ code, out: this.out, err });
      });
    });
  }

  /** Terse lines: field 5 is the error, field 47 the KiB written so far. */
  private lines(): string[][] {
    return this.out
      .split('\n')
      .map((l) => l.split(';'))
      .filter((f) => f.length > 100);
  }

  writtenKiB(): number {
    return Math.max(0, ...this.lines().map((f) => Number(f[46])));
  }

  /** Resolves once fio has written `kib` KiB (or has exited). */
  written(kib: number): Promise<void> {
    if (this.writtenKiB() >= kib) return Promise.resolve();
    return new Promise((resolve) => this.waiters.push({ kib, resolve }));
  }

  /** The job's error field in its final line (0: none). */
  async error(): Promise<string> {
    const r = await this.done;
    const last = this.lines().at(-1);
    assert.equal(r.code, 0, `fio failed:\n${r.err}\n${r.out}`);
    assert.ok(last, `fio printed no result:\n${r.out}`);
    return last[4] ?? '?';
  }
}

/**
 * fio's verified 4k random writes over the first `size` MiB of `uri`, QD16,
 * its writes paced at 500 a second (its verifying reads are not): however fast the machine, the writes go on
 * for `size` / 2 seconds at least, so an outage started once fio reports
 * its first MiB falls in the middle of them.
 */
function fioVerify(uri: string, size: number): Fio {
  return new Fio([
    '--name=ceph-outage',
    '--ioengine=nbd',
    `--uri=${uri}`,
    '--rw=randwrite',
    '--bs=4k',
    `--size=${size}M`,
    '--iodepth=16',
    '--rate_iops=,500',
    '--verify=crc32c',
    '--do_verify=1',
    '--verify_fatal=1',
    '--verify_state_save=0',
  ]);
}

/**
 * A cached RBD image: the image, its qemu-nbd, its cache made with it, and
 * serve in `mode` in front (writeback unthrottled, so the outage meets it too).
 */
async function cachedImage(name: string, mode: 'writeback' | 'writethrough'): Promise<{ s: ServeDaemon; rbd: string }> {
  const c = theCluster();
  const work = join(dir, name);
  mkdirSync(work);
  await c.image(name, '32M');
  const rbd = rbdUri(await c.nbd(name));
  const cache = join(work, 'cache.img');
  writeFileSync(cache, '');
  await run('truncate', ['-s', '64M', cache]);
  const made = ubcache(['make', '-b', '64k', '-C', cache, '-B', rbd]);
  assert.equal(made.status, 0, made.stderr);
  const s = await startServe(work, [
    '--set',
    `bcache0.cache_mode=${mode}`,
    '--set',
    'bcache0.sequential_cutoff=0',
    '--set',
    'bcache0.writeback_percent=0',
    '--set',
    'bcache0.writeback_delay=0',
    cache,
    rbd,
  ]);
  return { s, rbd };
}

/** What serve's bcache0 holds in its first `bytes` is what the RBD image holds past the data offset (`rbd export`). */
async function sameAsRbd(s: ServeDaemon, name: string, bytes: number): Promise<void> {
  await waitClean(s);
  const client = await Client.connect(s.socket);
  const chunks: Buffer[] = [];
  try {
    for (let off = 0; off < bytes; off += MiB) chunks.push(await client.read(off, Math.min(MiB, bytes - off)));
  } finally {
    client.close();
  }
  const image = await rbdExport(name, join(dir, name, 'rbd.img'));
  const want = Buffer.concat(chunks);
  assert.ok(
    want.some((b) => b !== 0),
    'fio wrote something',
  );
  assert.ok(image.subarray(DATA_OFFSET, DATA_OFFSET + bytes).equals(want), `${name}: RBD holds what serve serves`);
}

test(
  'the OSD killed and restarted under fio verify through serve, writeback and writethrough at once: no error, nothing lost',
  { skip, timeout: 180_000 },
  async (t) => {
    const c = theCluster();
    const wb = await cachedImage('osd-wb', 'writeback');
    try {
      const wt = await cachedImage('osd-wt', 'writethrough');
      try {
        const jobs = [fioVerify(wb.s.uri(), 8), fioVerify(wt.s.uri(), 8)];
        await Promise.all(jobs.map((j) => j.written(1024)));
        for (const j of jobs) assert.ok(j.writtenKiB() < 8 * 1024, 'the outage starts in the middle of the writes');
        const t0 = Date.now();
        await c.osdKill();
        await c.osdStart();
        t.diagnostic(
          `OSD down and back in ${Date.now() - t0} ms; written then: ${jobs.map((j) => j.writtenKiB()).join(', ')} KiB`,
        );
        for (const j of jobs) assert.equal(await j.error(), '0', 'fio reported no error');
        for (const s of [wb.s, wt.s]) {
          assert.ok(!s.daemon.lines.some((l) => /io_errors|I\/O error/i.test(l)), 'no I/O error was counted');
        }
        await sameAsRbd(wb.s, 'osd-wb', 8 * MiB);
        await sameAsRbd(wt.s, 'osd-wt', 8 * MiB);
      } finally {
        await wt.s.daemon.stop().finally(() => wt.s.daemon.kill());
      }
    } finally {
      await wb.s.daemon.stop().finally(() => wb.s.daemon.kill());
    }
  },
);

test(
  'qemu-nbd killed and restarted under fio verify through serve (writethrough): ubcache reconnects, no error, nothing lost',
  { skip, timeout: 120_000 },
  async (t) => {
    const c = theCluster();
    const { s } = await cachedImage('nbd-wt', 'writethrough');
    try {
      const job = fioVerify(s.uri(), 8);
      await job.written(1024);
      assert.ok(job.writtenKiB() < 8 * 1024, 'the outage starts in the middle of the writes');
      await c.nbdKill('nbd-wt');
      await c.nbd('nbd-wt');
      assert.equal(await job.error(), '0', 'fio reported no error');
      t.diagnostic(await s.daemon.waitForLine(/reconnected after \d+ ms/));
      assert.equal((await ctl(s, 'cat', 'block/bcache0/bcache/backing_reconnects')).trim() !== '0', true);
      assert.ok(!s.daemon.lines.some((l) => /io_errors|I\/O error/i.test(l)), 'no I/O error was counted');
      await sameAsRbd(s, 'nbd-wt', 8 * MiB);
    } finally {
      await s.daemon.stop().finally(() => s.daemon.kill());
    }
  },
);
