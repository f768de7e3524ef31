// Failure drills with the built `ubcache serve` (issue 6): one cache in
// front of two backing devices in different states, a real NBD client doing
// I/O on each throughout. When the cache set fails (internal/io_disable
// through the control socket, the drill an operator would run), the clean
// writethrough device keeps serving from its backing device and its client
// notices nothing, while the dirty writeback device stops, its client is
// disconnected, and the daemon serves on; stopping the last device makes it
// exit 0 by itself (--exit-when-idle). A restart finds the flushed data where it belongs and the
// dirty device refuses another cache. A backing device pulled with
// `--fault BACKING:pull-after=N` stops only its own bcache device.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { Daemon, run, sparseFile, tempDir, ubcache, UBCACHE } from '../helpers/daemon.ts';
import { Client, MiB, startServe } from './serve-helpers.ts';

async function ctl(control: string, ...args: string[]): Promise<string> {
  return run(UBCACHE, ['ctl', '--control', control, ...args]);
}

/** Distinct, checkable 4 KiB blocks. */
function block(tag: number, i: number): Buffer {
  return Buffer.alloc(4096, `${tag}:${i};`);
}

/** One cache image and two backing images formatted together. */
function makeTrio(dir: string): { cache: string; clean: string; dirty: string } {
  const cache = sparseFile(join(dir, 'cache.img'), 64 * MiB);
  const clean = sparseFile(join(dir, 'clean.img'), 32 * MiB);
  const dirty = sparseFile(join(dir, 'dirty.img'), 32 * MiB);
  const r = ubcache(['make', '-b', '64k', '-C', cache, '-B', clean, '-B', dirty]);
  if (r.status !== 0) throw new Error(`ubcache make failed:\n${r.stderr}`);
  return { cache, clean, dirty };
}

/**
 * A client writing and reading back blocks [first, first+blocks) until
 * stopped; every failure is kept; `turns` counts completed write+read pairs.
 */
function ioLoop(c: Client, tag: number, first: number, blocks: number) {
  const failures: string[] = [];
  const state = { stopping: false, turns: 0, last: new Map<number, Buffer>() };
  const progress: Array<{ at: number; resolve: () => void }> = [];
  const done = (async () => {
    for (let n = 0; !state.stopping; n++) {
      const i = first + (n % blocks);
      try {
        await c.write(i * 4096, block(tag, n));
        state.last.set(i, block(tag, n));
        const back = await c.read(i * 4096, 4096);
        if (!back.equals(block(tag, n))) failures.push(`block ${i} read back wrong`);
      } catch (err) {
        failures.push(String(err));
        // A disconnected client would fail at once forever: stop there.
        if (/closed|disconnect|EPIPE|ECONNRESET/i.test(String(err))) break;
      }
      state.turns++;
      for (const p of progress.filter((x) => state.turns >= x.at)) {
        progress.splice(progress.indexOf(p), 1);
        p.resolve();
      }
    }
    for (const p of progress.splice(0)) p.resolve();
  })();
  return {
    failures,
    state,
    /** Resolves once `more` further turns have completed (or the loop ended). */
    advance: (more: number): Promise<void> =>
      new Promise<void>((resolve) => progress.push({ at: state.turns + more, resolve })),
    stop: async (): Promise<void> => {
      state.stopping = true;
      await done;
    },
  };
}

test(
  'cache set failure drill: the clean device serves on, the dirty one stops, the daemon exits when the last device stops; a restart finds the data',
  // A bound on a hang, not on speed: it takes 30-40 s alone and over 60 s with CI-like load on two cores.
  { timeout: 240_000 },
  async () => {
    using tmp = tempDir('ubcache-drill-');
    const { cache, clean, dirty } = makeTrio(tmp.dir);
    const control = join(tmp.dir, 'control.sock');
    const s = await startServe(tmp.dir, [
      '--exit-when-idle',
      '--control',
      control,
      '--set',
      'bcache1.cache_mode=writeback',
      '--set',
      'bcache1.writeback_running=0',
      '--set',
      'bcache0.sequential_cutoff=0',
      '--set',
      'bcache1.sequential_cutoff=0',
      cache,
      clean,
      dirty,
    ]);
    const flushedDirty = new Map<number, Buffer>();
    let cleanData: Map<number, Buffer> | undefined;
    try {
      const setUuid = (await ctl(control, 'ls', '/sys/fs/bcache')).split('\n').find((l) => /^[0-9a-f-]{36}$/.test(l));
      assert.ok(setUuid);
      assert.equal(await ctl(control, 'cat', 'block/bcache0/bcache/backing_dev_name'), 'clean.img\n');
      const c0 = await Client.connect(s.socket, 'bcache0');
      const c1 = await Client.connect(s.socket, 'bcache1');
      // Dirty data on bcache1, flushed: it lives only on the cache device.
      for (let i = 0; i < 16; i++) {
        await c1.write(i * 4096, block(7, i));
        flushedDirty.set(i, block(7, i));
      }
      await c1.flush();
      assert.equal(await ctl(control, 'cat', 'block/bcache1/bcache/state'), 'dirty\n');
      assert.equal(await ctl(control, 'cat', 'block/bcache0/bcache/state'), 'clean\n');

      const io0 = ioLoop(c0, 1, 0, 32);
      const io1 = ioLoop(c1, 2, 64, 32);
      await Promise.all([io0.advance(20), io1.advance(20)]);

      await ctl(control, 'write', `/sys/fs/bcache/${setUuid}/internal/io_disable`, '1');
      await s.daemon.waitForLine(/bch_cache_set_error\(\) error on .*io_disable/);
      await s.daemon.waitForLine(/bcache0 is "auto" and cache is clean, keep it alive/);
      await s.daemon.waitForLine(/bcache1 is "auto" and cache is dirty, stop it/);
      await s.daemon.waitForLine(/Cache set .* unregistered/);
      await s.daemon.waitForLine(/export bcache1 removed/);
      // The dirty device's client: errors, then a clean disconnect.
      await c1.raw.closed;
      await io1.stop();
      assert.ok(io1.failures.length > 0, 'the dirty device failed requests');
      await assert.rejects(Client.connect(s.socket, 'bcache1'), 'bcache1 is no longer exported');

      // The clean device keeps serving through and after the failure.
      await io0.advance(50);
      await io0.stop();
      assert.deepEqual(io0.failures, [], 'the clean device failed no request');
      assert.equal(await ctl(control, 'cat', 'block/bcache0/bcache/state'), 'no cache\n');
      await c0.flush();
      for (const [i, data] of io0.state.last) assert.ok((await c0.read(i * 4096, 4096)).equals(data));
      cleanData = io0.state.last;
      const metrics = await ctl(control, 'cat', '/sys/block/bcache0/bcache/io_errors');
      assert.equal(metrics, '0\n', 'no backing errors');

      // The last device stopped: the daemon exits 0 on its own.
      c0.close();
      await ctl(control, 'write', 'block/bcache0/bcache/stop', '1');
      assert.deepEqual(await s.daemon.exited, { code: 0, signal: null });
    } catch (err) {
      console.error(s.daemon.stderr);
      throw err;
    } finally {
      await s.daemon.kill();
    }

    // Restart over the same images: the dirty device re-attaches to its cache
    // and its flushed dirty data is there; the clean one runs uncached.
    const r = await startServe(tmp.dir, ['--set', 'bcache1.writeback_running=0', cache, clean, dirty]);
    try {
      const c0 = await Client.connect(r.socket, 'bcache0');
      const c1 = await Client.connect(r.socket, 'bcache1');
      assert.ok(cleanData);
      for (const [i, data] of cleanData) assert.ok((await c0.read(i * 4096, 4096)).equals(data), `clean block ${i}`);
      for (const [i, data] of flushedDirty) assert.ok((await c1.read(i * 4096, 4096)).equals(data), `dirty block ${i}`);
      c0.close();
      c1.close();
    } finally {
      await r.daemon.stop();
    }

    // A different cache: the dirty backing device refuses it and says why.
    const other = sparseFile(join(tmp.dir, 'other-cache.img'), 40 * MiB);
    assert.equal(ubcache(['make', '-b', '64k', '-C', other]).status, 0);
    // Alone with it, serve will not run the dirty device uncached and says why.
    const refused = new Daemon(['serve', '--exit-when-idle', '--socket', join(tmp.dir, 'refused.sock'), other, dirty]);
    assert.equal((await refused.exited).code, 1);
    assert.match(refused.stderr, /dirty\.img: its cache set .* is not registered and its superblock says dirty/);
    // Next to a device that runs: attaching it to the other cache is refused with the reason.
    const control2 = join(tmp.dir, 'control2.sock');
    const o = await startServe(tmp.dir, ['--control', control2, other, clean, dirty]);
    try {
      const otherUuid = (await ctl(control2, 'ls', '/sys/fs/bcache'))
        .split('\n')
        .find((l) => /^[0-9a-f-]{36}$/.test(l));
      assert.ok(otherUuid);
      let name: string | undefined;
      for (const n of (await ctl(control2, 'ls', '/sys/block')).split('\n').filter((x) => x !== '')) {
        if ((await ctl(control2, 'cat', `block/${n}/bcache/backing_dev_name`)) === 'dirty.img\n') name = n;
      }
      assert.ok(name, 'the dirty device is registered');
      await assert.rejects(
        ctl(control2, 'write', `block/${name}/bcache/attach`, otherUuid),
        /superblock says dirty.*register that cache device/s,
      );
      assert.equal(await ctl(control2, 'cat', `block/${name}/bcache/running`), '0\n');
      assert.equal(await ctl(control2, 'cat', `block/${name}/bcache/state`), 'dirty\n');
    } finally {
      await o.daemon.stop();
    }
  },
);

test(
  'a backing device pulled (--fault BACKING:pull-after=N) stops only its own bcache device',
  { timeout: 240_000 },
  async () => {
    using tmp = tempDir('ubcache-drill-');
    const { cache, clean, dirty } = makeTrio(tmp.dir);
    const control = join(tmp.dir, 'control.sock');
    // The second backing device fails everything after its first 40 I/Os
    // (registration takes a few; the client's writethrough writes the rest).
    const s = await startServe(tmp.dir, [
      '--control',
      control,
      '--fault',
      `${dirty}:pull-after=40`,
      cache,
      clean,
      dirty,
    ]);
    try {
      const c0 = await Client.connect(s.socket, 'bcache0');
      const c1 = await Client.connect(s.socket, 'bcache1');
      const io0 = ioLoop(c0, 3, 0, 32);
      const io1 = ioLoop(c1, 4, 0, 32);
      await s.daemon.waitForLine(/too many IO errors on backing device .*dirty\.img/);
      await s.daemon.waitForLine(/export bcache1 removed/);
      await c1.raw.closed;
      await io1.stop();
      assert.ok(io1.failures.length > 0, "the pulled device's client got errors");
      await io0.advance(50);
      await io0.stop();
      assert.deepEqual(io0.failures, [], 'bcache0 failed no request');
      assert.equal(await ctl(control, 'cat', 'block/bcache0/bcache/state'), 'clean\n', 'bcache0 still cached');
      const sets = (await ctl(control, 'ls', '/sys/fs/bcache')).split('\n').filter((l) => /^[0-9a-f-]{36}$/.test(l));
      assert.equal(sets.length, 1, 'the cache set is untouched');
      const metrics = await ctl(control, 'cat', '/sys/block/bcache0/bcache/io_errors');
      assert.equal(metrics, '0\n');
      c0.close();
    } finally {
      await s.daemon.stop();
    }
  },
);
