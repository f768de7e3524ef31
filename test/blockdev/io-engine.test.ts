// The I/O engines (src/blockdev/io-engine.ts) on real files, pipes and a
// FUSE file that fails: the contract both keep (whole transfers, partial
// ones continued, a short count only at the end of the file, errno-coded
// errors), what io_uring adds (many requests in flight, more than its ring
// holds), and what must hold of a whole process (it exits when the ring is
// idle, stays while a request is in flight, picks its engine as documented),
// tested in child processes.

import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import {
  closeSync,
  existsSync,
  mkdirSync,
  openSync,
  readFileSync,
  readdirSync,
  readlinkSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import { constants } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import { FileBlockDevice } from '../../src/blockdev/file.ts';
import {
  ioEngine,
  ioEngineStatus,
  ThreadPoolEngine,
  UringEngine,
  type IoEngine,
} from '../../src/blockdev/io-engine.ts';
import { FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, isUnsupported, loadNative } from '../../src/blockdev/native.ts';
import { waitForFile } from '../helpers/daemon.ts';
import { pattern, sparseFile, tempDir } from './helpers.ts';

const HERE = dirname(fileURLToPath(import.meta.url));
const ROOT = join(HERE, '..', '..');
const CHILD = join(HERE, 'io-engine-child.ts');
const KiB = 1024;

const tmp = tempDir('ubcache-io-engine-');
after(() => {
  tmp.remove();
});

const processEngine = ioEngine();
const uring = processEngine instanceof UringEngine ? processEngine : undefined;
/** The process's engine, and the thread pool beside it when that is io_uring: every contract test runs on both. */
const engines: IoEngine[] = uring === undefined ? [processEngine] : [processEngine, new ThreadPoolEngine()];
const NOT_URING = `the process engine is ${processEngine.name} (${ioEngineStatus().reason})`;
/** Whole-process behaviour is tested in children with their own environment; once is enough. */
const SELECTION_ONCE =
  process.env['UBCACHE_IO_ENGINE'] !== undefined
    ? 'runs in child processes with their own environment: covered by the run without UBCACHE_IO_ENGINE'
    : undefined;

let fileNo = 0;
function newFile(size: number): string {
  return sparseFile(tmp.path(`f${fileNo++}.img`), size);
}

/** A FIFO opened at both ends: [read end, write end]. The write end is O_RDWR, so neither open blocks. */
function fifo(): [number, number] {
  const path = tmp.path(`p${fileNo++}`);
  execFileSync('mkfifo', [path]);
  const w = openSync(path, constants.O_RDWR);
  const r = openSync(path, constants.O_RDONLY);
  return [r, w];
}

function have(cmd: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${cmd}`]).status === 0;
}

test('many reads and writes at once, more than the ring holds, each lands where it belongs', async () => {
  const N = 600;
  const path = newFile(N * 4 * KiB);
  const fd = openSync(path, 'r+');
  try {
    // Every 4 KiB block once, in a scrambled order.
    const order = Array.from({ length: N }, (_, i) => (i * 389) % N);
    for (const engine of engines) {
      const seed = engine.name === 'io_uring' ? 1 : 2;
      const writes = order.map((b) => engine.write(fd, pattern(4 * KiB, seed * 100_000 + b), b * 4 * KiB));
      if (engine === uring) {
        // Issued in one turn: the ring is full and the rest wait their turn in JS.
        assert.equal(uring.counters()[0], uring.capacity, 'the ring holds as many as it can');
        assert.equal(uring.queued, N - uring.capacity, 'the rest are queued');
      }
      assert.deepEqual(new Set(await Promise.all(writes)), new Set([4 * KiB]));
      await engine.fdatasync(fd);
      const bufs = order.map(() => Buffer.alloc(4 * KiB));
      const reads = order.map((b, i) => engine.read(fd, bufs[i] ?? Buffer.alloc(0), b * 4 * KiB));
      assert.deepEqual(new Set(await Promise.all(reads)), new Set([4 * KiB]));
      order.forEach((b, i) => {
        assert.ok(bufs[i]?.equals(pattern(4 * KiB, seed * 100_000 + b)), `${engine.name}: block ${b}`);
      });
      if (engine === uring) {
        assert.equal(uring.counters()[0], 0, 'nothing left in the ring');
        assert.equal(uring.queued, 0);
      }
    }
    const onDisk = readFileSync(path);
    const last = engines[engines.length - 1]?.name === 'io_uring' ? 1 : 2;
    for (const b of [0, 1, N - 1]) {
      assert.ok(onDisk.subarray(b * 4 * KiB, (b + 1) * 4 * KiB).equals(pattern(4 * KiB, last * 100_000 + b)));
    }
  } finally {
    closeSync(fd);
  }
});

test('partial transfers continue until whole: a pipe hands a read over in pieces, and takes a write in pieces', async () => {
  for (const engine of engines) {
    const [r, w] = fifo();
    try {
      const before = uring?.counters()[1] ?? 0;
      // 3 bytes are there when the read starts: the kernel returns those (a
      // partial read), and the rest arrives only after that.
      writeSync(w, 'abc');
      const buf = Buffer.alloc(10);
      const reading = engine.read(r, buf, -1);
      // Queued behind the engine's own submission microtask, so the first read has happened by then.
      queueMicrotask(() => writeSync(w, '0123456'));
      assert.equal(await reading, 10);
      assert.equal(buf.toString(), 'abc0123456');
      if (engine === uring) assert.ok(uring.counters()[1] > before, 'the read was continued');

      // 256 KiB through a 64 KiB pipe: both sides move it a piece at a time.
      const mid = uring?.counters()[1] ?? 0;
      const data = pattern(256 * KiB, 9);
      const into = Buffer.alloc(256 * KiB);
      const [wrote, read] = await Promise.all([engine.write(w, data, -1), engine.read(r, into, -1)]);
      assert.equal(wrote, data.length);
      assert.equal(read, data.length);
      assert.ok(into.equals(data), `${engine.name}: the bytes came through in order`);
      if (engine === uring) assert.ok(uring.counters()[1] >= mid + 2, 'both were continued');
    } finally {
      closeSync(r);
      closeSync(w);
    }
  }
});

test('a read that meets the end of the file resolves short; at the end it resolves 0', async () => {
  const path = newFile(0);
  writeFileSync(path, pattern(6000, 3));
  const fd = openSync(path, 'r');
  try {
    for (const engine of engines) {
      const buf = Buffer.alloc(8192, 0xee);
      assert.equal(await engine.read(fd, buf, 0), 6000, engine.name);
      assert.ok(buf.subarray(0, 6000).equals(pattern(6000, 3)));
      assert.equal(await engine.read(fd, Buffer.alloc(512), 6000), 0, engine.name);
      assert.equal(await engine.read(fd, Buffer.alloc(0), 0), 0);
    }
  } finally {
    closeSync(fd);
  }
});

test('errors carry the errno name: EBADF on a closed fd', async () => {
  for (const engine of engines) {
    const fd = openSync(newFile(4096), 'r+');
    closeSync(fd);
    // Nothing opens a file between the close and these calls, so the number is not reused.
    const ops: [string, Promise<unknown>][] = [
      ['read', engine.read(fd, Buffer.alloc(512), 0)],
      ['write', engine.write(fd, Buffer.alloc(512), 0)],
      ['fdatasync', engine.fdatasync(fd)],
    ];
    if (engine.fallocate) ops.push(['fallocate', engine.fallocate(fd, 0, 0, 4096)]);
    // Every outcome is taken at once: a rejection that came while an earlier
    // one was being awaited was reported as unhandled (CI, 2026-12-07).
    const outcomes = ops.map(([syscall, op]) => [syscall, op.then(() => undefined, (err: unknown) => err)] as const);
    for (const [syscall, outcome] of outcomes) {
      const err = await outcome;
      assert.ok(err instanceof Error, `${engine.name} ${syscall} rejects`);
      const e = err as NodeJS.ErrnoException;
      assert.equal(e.code, 'EBADF', `${engine.name} ${syscall}`);
      assert.equal(e.errno, -9);
      assert.equal(e.syscall, syscall);
      assert.match(e.message, /EBADF/);
    }
  }
});

/** Why a FUSE file served by nbdkit cannot be set up here, or undefined. */
function fuseUnavailable(): string | undefined {
  if (process.getuid?.() !== 0) return 'FUSE mounts need root here';
  if (!existsSync('/dev/fuse')) return '/dev/fuse is missing';
  for (const cmd of ['nbdkit', 'nbdfuse', 'fusermount3']) {
    if (!have(cmd)) return `${cmd} is not installed (apt-get install nbdkit libnbd-bin fuse3)`;
  }
  return undefined;
}

/**
 * A FUSE file (nbdfuse) over an nbdkit export, for `use`; unmounted and
 * stopped afterwards (after `use` has closed what it opened: a busy mount
 * would not unmount).
 */
async function withFuseFile(nbdkitArgs: string[], use: (file: string) => Promise<void>): Promise<void> {
  const dir = tmp.path(`fuse${fileNo++}`);
  const mnt = join(dir, 'mnt');
  mkdirSync(mnt, { recursive: true });
  const sock = join(dir, 'nbd.sock');
  const pidFile = join(dir, 'nbdkit.pid');
  // nbdkit forks into the background once it listens; its output must not hold our pipes open.
  execFileSync('nbdkit', ['-U', sock, '-P', pidFile, ...nbdkitArgs], { stdio: 'ignore' });
  try {
    const fusePid = join(dir, 'nbdfuse.pid');
    const fuse = spawn('nbdfuse', ['-P', fusePid, join(mnt, 'disk'), `nbd+unix:///?socket=${sock}`], {
      stdio: 'ignore',
    });
    const fuseExit = new Promise<void>((resolve) => {
      fuse.once('exit', () => {
        resolve();
      });
    });
    try {
      // nbdfuse writes its pid file once it serves.
      await Promise.race([
        waitForFile(fusePid),
        fuseExit.then(() => {
          throw new Error('nbdfuse exited before it served');
        }),
      ]);
      await use(join(mnt, 'disk'));
    } finally {
      if (spawnSync('fusermount3', ['-u', mnt]).status !== 0) fuse.kill('SIGKILL');
      await fuseExit;
    }
  } finally {
    spawnSync('kill', [readFileSync(pidFile, 'utf8').trim()]);
  }
}

test('a real EIO: reads of a FUSE file whose device fails', async (t) => {
  const why = fuseUnavailable();
  if (why !== undefined) {
    t.skip(why);
    return;
  }
  await withFuseFile(['--filter=error', 'memory', '1M', 'error=EIO', 'error-pread-rate=100%'], async (file) => {
    const fd = openSync(file, 'r');
    try {
      for (const engine of engines) {
        await assert.rejects(engine.read(fd, Buffer.alloc(4096), 64 * KiB), (err: unknown) => {
          const e = err as NodeJS.ErrnoException;
          assert.equal(e.code, 'EIO', `${engine.name}: ${String(err)}`);
          assert.equal(e.errno, -5);
          assert.equal(e.syscall, 'read');
          return true;
        });
      }
    } finally {
      closeSync(fd);
    }
    // And a FileBlockDevice over it says so, as EIO with advice.
    const dev = await FileBlockDevice.open(file, { readOnly: true });
    try {
      await assert.rejects(dev.read(Buffer.alloc(4096), 128 * KiB), {
        code: 'EIO',
        message: /read of 4096 bytes at offset 131072 failed \(EIO\)/,
      });
    } finally {
      await dev.close();
    }
  });
});

test('fdatasync and fallocate (punch a hole; an unsupported mode says so)', async (t) => {
  const path = newFile(64 * KiB);
  const fd = openSync(path, 'r+');
  t.after(() => {
    closeSync(fd);
  });
  for (const engine of engines) {
    await engine.write(fd, pattern(64 * KiB, 4), 0);
    await engine.fdatasync(fd);
    if (engine.fallocate === undefined) continue;
    await engine.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 8 * KiB, 16 * KiB);
    const got = Buffer.alloc(64 * KiB);
    await engine.read(fd, got, 0);
    assert.ok(got.equals(pattern(64 * KiB, 4).fill(0, 8 * KiB, 24 * KiB)), 'the hole reads as zeroes');
    // PUNCH_HOLE without KEEP_SIZE is refused by every file system.
    await assert.rejects(engine.fallocate(fd, FALLOC_FL_PUNCH_HOLE, 0, 4096), (err: unknown) => {
      assert.ok(isUnsupported(err), String(err));
      return true;
    });
  }
});

test('a FileBlockDevice uses the process engine unless given one', async () => {
  const path = newFile(64 * KiB);
  const a = await FileBlockDevice.open(path);
  const b = await FileBlockDevice.open(path, { engine: new ThreadPoolEngine() });
  try {
    assert.equal(a.ioEngine, ioEngineStatus().name);
    assert.equal(b.ioEngine, 'threadpool');
    await a.write(pattern(8 * KiB, 5), 0, { fua: true });
    const got = Buffer.alloc(8 * KiB);
    await b.read(got, 0);
    assert.ok(got.equals(pattern(8 * KiB, 5)));
  } finally {
    await Promise.all([a.close(), b.close()]);
  }
});

test('worker threads get a ring each, closed when the worker ends', async (t) => {
  if (uring === undefined) {
    t.skip(NOT_URING);
    return;
  }
  const rings = (): number =>
    readdirSync('/proc/self/fd').filter((fd) => {
      try {
        return readlinkSync(`/proc/self/fd/${fd}`) === 'anon_inode:[io_uring]';
      } catch {
        return false; // the fd readdir itself used
      }
    }).length;
  const before = rings();
  const path = newFile(4096);
  const url = new URL('../../src/blockdev/io-engine.ts', import.meta.url).href;
  // A worker does not inherit the test's TypeScript loader: it registers tsx's itself.
  const tsx = import.meta.resolve('tsx/esm/api');
  // The worker does one write through its own engine, reports, and has nothing left to do.
  const worker = new Worker(
    `const { parentPort, workerData } = require('node:worker_threads');
     const fs = require('node:fs');
     (async () => {
       (await import(workerData.tsx)).register();
       const { ioEngine } = await import(workerData.url);
       const engine = ioEngine();
       const fd = fs.openSync(workerData.path, 'r+');
       const n = await engine.write(fd, Buffer.from('from a worker'), 0);
       fs.closeSync(fd);
       parentPort.postMessage({ engine: engine.name, n });
     })();`,
    { eval: true, workerData: { url, path, tsx } },
  );
  const exited = new Promise<number>((resolve) => worker.once('exit', resolve));
  const msg = await new Promise<unknown>((resolve, reject) => {
    worker.once('message', resolve);
    worker.once('error', reject);
  });
  assert.deepEqual(msg, { engine: 'io_uring', n: 13 });
  assert.equal(rings(), before + 1, 'the worker has its own ring');
  // Nothing keeps an idle worker alive: it ends by itself, and its ring goes with it.
  assert.equal(await exited, 0);
  assert.equal(rings(), before, 'closed by the environment cleanup hook');
  assert.equal(readFileSync(path, 'utf8').slice(0, 13), 'from a worker');
});

// ---- whole processes ---------------------------------------------------------

interface ChildResult {
  code: number | null;
  lines: unknown[];
  stderr: string;
}

/** Run the child script; it must exit by itself within `limitMs` (else it is killed and the test fails). */
function child(
  args: string[],
  env: NodeJS.ProcessEnv = {},
  onLine?: (line: unknown) => void,
  limitMs = 60_000,
): Promise<ChildResult> {
  const proc = spawn(process.execPath, ['--import', 'tsx', CHILD, ...args], {
    cwd: ROOT,
    env: { ...process.env, UBCACHE_IO_ENGINE: undefined, ...env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const lines: unknown[] = [];
  let partial = '';
  let stderr = '';
  proc.stdout.setEncoding('utf8');
  proc.stdout.on('data', (text: string) => {
    const parts = (partial + text).split('\n');
    partial = parts.pop() ?? '';
    for (const p of parts) {
      const line = JSON.parse(p) as unknown;
      lines.push(line);
      onLine?.(line);
    }
  });
  proc.stderr.setEncoding('utf8');
  proc.stderr.on('data', (text: string) => (stderr += text));
  return new Promise((resolve, reject) => {
    const limit = setTimeout(() => {
      proc.kill('SIGKILL');
      reject(new Error(`the child did not exit within ${limitMs} ms; it printed ${JSON.stringify(lines)} ${stderr}`));
    }, limitMs);
    proc.once('exit', (code) => {
      clearTimeout(limit);
      resolve({ code, lines, stderr });
    });
  });
}

test('an idle engine does not keep the process alive', async (t) => {
  if (SELECTION_ONCE !== undefined) {
    t.skip(SELECTION_ONCE);
    return;
  }
  const path = newFile(4096);
  const r = await child(['idle', path]);
  assert.equal(r.code, 0, r.stderr);
  const want = loadNative()?.uring != null ? 'io_uring' : 'threadpool';
  assert.deepEqual(r.lines, [{ engine: want, wrote: 42, read: 42, same: true }]);
});

test('a request in flight keeps the process alive until it completes', async (t) => {
  if (SELECTION_ONCE !== undefined) {
    t.skip(SELECTION_ONCE);
    return;
  }
  const path = tmp.path(`wait${fileNo++}`);
  execFileSync('mkfifo', [path]);
  // Held open for writing first, so the child's open for reading does not block.
  const w = openSync(path, constants.O_RDWR);
  try {
    const r = await child(['pending', path], {}, (line) => {
      // Only once the child reports its read pending, give it the data.
      if ((line as { waiting?: boolean }).waiting === true) writeSync(w, 'hello');
    });
    assert.equal(r.code, 0, r.stderr);
    assert.deepEqual(r.lines.slice(1), [{ read: 5, text: 'hello' }], 'the read completed before the process ended');
  } finally {
    closeSync(w);
  }
});

test('engine selection: forced, refused, and the thread pool when io_uring is unavailable', async (t) => {
  if (SELECTION_ONCE !== undefined) {
    t.skip(SELECTION_ONCE);
    return;
  }
  const status = async (env: NodeJS.ProcessEnv): Promise<unknown> => {
    const r = await child(['status'], env);
    assert.equal(r.code, 0, r.stderr);
    return r.lines[0];
  };
  assert.deepEqual(await status({ UBCACHE_IO_ENGINE: 'threadpool' }), {
    name: 'threadpool',
    reason: 'UBCACHE_IO_ENGINE=threadpool',
  });
  assert.match(
    String(((await status({ UBCACHE_IO_ENGINE: 'uring' })) as { error?: string }).error),
    /UBCACHE_IO_ENGINE=uring is not an engine; use io_uring or threadpool/,
  );
  assert.deepEqual(await status({ UBCACHE_NO_NATIVE: '1' }), {
    name: 'threadpool',
    reason: 'the native addon is disabled (UBCACHE_NO_NATIVE)',
  });
  assert.deepEqual(await status({ UBCACHE_NO_NATIVE: '1', UBCACHE_IO_ENGINE: 'io_uring' }), {
    error:
      'UBCACHE_IO_ENGINE=io_uring, but the native addon is disabled (UBCACHE_NO_NATIVE); ' +
      'unset UBCACHE_IO_ENGINE to use the thread pool',
    code: 'ENOTSUP',
  });
  if (loadNative()?.uring == null) {
    t.diagnostic('the addon was built without io_uring: the default cases below are skipped');
    return;
  }
  assert.deepEqual(await status({}), { name: 'io_uring', reason: 'the kernel and the addon support it' });
  assert.deepEqual(await status({ UBCACHE_IO_ENGINE: 'io_uring' }), {
    name: 'io_uring',
    reason: 'UBCACHE_IO_ENGINE=io_uring',
  });
});

/** A program that runs its arguments under a seccomp filter failing io_uring_setup with EPERM (as Docker's default profile does). */
const NO_URING_C = `
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(int argc, char **argv) {
  (void)argc;
  /* io_uring_setup has the same number (425) on every architecture, so no arch check is needed. */
  struct sock_filter f[] = {
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_io_uring_setup, 0, 1),
    BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
    BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
  };
  struct sock_fprog prog = {sizeof f / sizeof f[0], f};
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog) != 0) return 126;
  execvp(argv[1], argv + 1);
  return 127;
}
`;

test('io_uring refused by a seccomp filter (EPERM): the thread pool, saying why; forced, a clear error', (t) => {
  if (SELECTION_ONCE !== undefined) {
    t.skip(SELECTION_ONCE);
    return;
  }
  if (loadNative()?.uring == null) {
    t.skip('the addon was built without io_uring');
    return;
  }
  if (!have('cc')) {
    t.skip('no C compiler to build the seccomp wrapper');
    return;
  }
  const src = tmp.path('no-uring.c');
  const bin = tmp.path('no-uring');
  writeFileSync(src, NO_URING_C);
  execFileSync('cc', ['-O', '-o', bin, src]);
  const run = (env: NodeJS.ProcessEnv): unknown => {
    const r = spawnSync(bin, [process.execPath, '--import', 'tsx', CHILD, 'status'], {
      cwd: ROOT,
      env: { ...process.env, UBCACHE_IO_ENGINE: undefined, ...env },
      encoding: 'utf8',
    });
    assert.equal(r.status, 0, r.stderr);
    return JSON.parse(r.stdout.trim()) as unknown;
  };
  const fallback = run({}) as { name: string; reason: string };
  assert.equal(fallback.name, 'threadpool');
  assert.match(fallback.reason, /^io_uring is unavailable \(EPERM: .*\(io_uring_queue_init\)\): a seccomp filter/);
  const forced = run({ UBCACHE_IO_ENGINE: 'io_uring' }) as { error: string; code: string };
  assert.equal(forced.code, 'ENOTSUP');
  assert.match(forced.error, /^UBCACHE_IO_ENGINE=io_uring, but io_uring is unavailable \(EPERM/);
});
