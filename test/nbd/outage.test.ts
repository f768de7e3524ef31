// Outages of a remote export, with real servers: nbdkit is killed (SIGKILL,
// nothing closed cleanly) and started again on the same socket while I/O goes
// on through the NBD block device; an outage longer than the timeout makes
// the device gone and bcache runs its backing-offline path, as for a pulled
// disk, with a bystander device serving throughout.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { NbdBlockDevice } from '../../src/blockdev/nbd.ts';
import { MemoryBlockDevice } from '../../src/blockdev/memory.ts';
import { IoError } from '../../src/blockdev/types.ts';
import { Registry } from '../../src/bcache/registry.ts';
import { SysfsTree } from '../../src/bcache/sysfs/tree.ts';
import { readFileRange, sparseFile, tempDir } from '../helpers/daemon.ts';
import { watchLog } from '../helpers/log-watch.ts';
import { startNbdkit, tools, type ChildServer } from '../helpers/nbd-servers.ts';
import { assertNothingLeft, formatCache } from '../bcache/helpers.ts';
import { formatBacking, pattern } from '../bcache/request-helpers.ts';

const KiB = 1024;
const MiB = 1024 * 1024;
const skip = !tools.nbdkit && 'nbdkit is not installed';

/** Start nbdkit again on the socket a killed one left behind (nbdkit refuses an existing socket path). */
async function restartNbdkit(dir: string, args: string[]): Promise<ChildServer> {
  rmSync(join(dir, 'nbdkit.sock'), { force: true });
  rmSync(join(dir, 'nbdkit.pid'), { force: true });
  return startNbdkit(dir, args);
}

test(
  'nbdkit killed and restarted under load: no request fails, every block reads back, the file holds it all',
  { skip },
  async () => {
    using tmp = tempDir();
    const file = sparseFile(join(tmp.dir, 'disk.img'), 32 * MiB);
    // The delay filter keeps requests in flight at any moment, so the kill always lands on some.
    const args = ['-t', '32', '--filter=delay', 'file', file, 'wdelay=3ms', 'rdelay=1ms'];
    let srv: ChildServer = await startNbdkit(tmp.dir, args);
    const dev = await NbdBlockDevice.open(srv.uri(), { connections: 2 });
    const workers = 16;
    const region = 2 * MiB;
    const block = 16 * KiB;
    // Each worker owns a region, so the expected content of every block is known without locking.
    const model = new Map<number, Buffer>();
    const errors: unknown[] = [];
    let ops = 0;
    let stopAt = Number.POSITIVE_INFINITY;
    let onOps: (() => void) | undefined;
    const worker = async (w: number): Promise<void> => {
      let i = 0;
      while (ops < stopAt) {
        const at = w * region + ((i * 7919 + w * 31) % (region / block)) * block;
        i++;
        try {
          if (i % 5 === 0 && model.has(at)) {
            const back = Buffer.alloc(block);
            await dev.read(back, at);
            assert.ok(back.equals(model.get(at) ?? Buffer.alloc(0)), `block at ${at} reads back`);
          } else if (i % 17 === 0) {
            await dev.flush();
          } else {
            const data = randomBytes(block);
            await dev.write(data, at);
            model.set(at, data);
          }
        } catch (err) {
          errors.push(err);
          return;
        }
        ops++;
        onOps?.();
      }
    };
    const until = (n: number): Promise<void> =>
      new Promise<void>((resolve) => {
        onOps = () => {
          if (ops >= n) {
            onOps = undefined;
            resolve();
          }
        };
      });
    const running = Promise.all(Array.from({ length: workers }, (_, w) => worker(w)));
    try {
      await until(300);
      await srv.kill();
      const killedAt = ops;
      srv = await restartNbdkit(tmp.dir, args);
      // Enough work after the restart to be sure the client came back and went on.
      await until(killedAt + 600);
      stopAt = ops;
      await running;
      assert.deepEqual(errors, [], 'no request failed');
      const stats = dev.stats();
      assert.ok(stats.reconnects >= 1, `reconnects ${stats.reconnects}`);
      assert.ok(stats.outageMs > 0, `outage ${stats.outageMs} ms`);
      assert.equal(stats.online, true);
      await dev.flush();
      for (const [at, data] of model) {
        assert.ok(readFileRange(file, at, block).equals(data), `the file holds the last write at ${at}`);
      }
    } finally {
      stopAt = 0;
      await running.catch(() => undefined);
      await dev.close();
      await srv.stop();
    }
  },
);

test(
  'acknowledged but unflushed writes are written again after a reconnect (the server lost its volatile cache)',
  { skip },
  async () => {
    using tmp = tempDir();
    // A memory export loses everything when killed: the harshest volatile cache.
    let srv: ChildServer = await startNbdkit(tmp.dir, ['memory', '8M']);
    const dev = await NbdBlockDevice.open(srv.uri(), { connections: 1 });
    try {
      const flushed = randomBytes(64 * KiB);
      await dev.write(flushed, 0);
      await dev.flush();
      const unflushed = randomBytes(64 * KiB);
      await dev.write(unflushed, MiB);
      await dev.writeZeroes(2 * MiB, 64 * KiB);
      await srv.kill();
      srv = await restartNbdkit(tmp.dir, ['memory', '8M']);
      const back = Buffer.alloc(64 * KiB);
      await dev.read(back, MiB);
      assert.ok(back.equals(unflushed), 'the unflushed write was written again');
      // What a FLUSH covered is the server's to keep: a memory server lost it, and the client does not hide that.
      await dev.read(back, 0);
      assert.ok(
        back.every((b) => b === 0),
        'flushed data is not replayed',
      );
      assert.equal(dev.stats().reconnects, 1);
    } finally {
      await dev.close();
      await srv.stop();
    }
  },
);

test(
  'an outage past the timeout: hits served from the cache meanwhile, then EIO, the device gone, bcache0 offline and stopped; a bystander serves',
  { skip },
  async () => {
    const watch = watchLog();
    using tmp = tempDir();
    const file = sparseFile(join(tmp.dir, 'backing.img'), 8 * MiB);
    const srv = await startNbdkit(tmp.dir, ['file', file]);
    const setUuid = Buffer.alloc(16, 9);
    const registry = new Registry({
      setOptions: { journalDelayMs: 2, stopTimeoutMs: 10_000 },
      deviceSettings: () => ({ writebackRunning: false, sequentialCutoff: 0 }),
      deviceOptions: { backingOfflineMs: 150, backingProbeMs: 10 },
    });
    try {
      const backing = await NbdBlockDevice.open(`${srv.uri()}&outage-timeout=800ms`);
      await formatBacking(backing, { setUuid, uuid: Buffer.alloc(16, 10) });
      const cache = new MemoryBlockDevice(40 * MiB, { name: 'cache' });
      await formatCache(cache, { bucketSize: 128, blockSize: 8, setUuid });
      const otherCache = new MemoryBlockDevice(40 * MiB, { name: 'other-cache' });
      await formatCache(otherCache, { bucketSize: 128, blockSize: 8, setUuid: Buffer.alloc(16, 11) });
      const otherBacking = new MemoryBlockDevice(4 * MiB, { name: 'other-backing' });
      await formatBacking(otherBacking, { setUuid: Buffer.alloc(16, 11), uuid: Buffer.alloc(16, 12) });
      await registry.register(cache);
      const b = await registry.register(backing);
      await registry.register(otherCache);
      const ob = await registry.register(otherBacking);
      assert.ok(b.kind === 'backing' && b.dev.attached && b.dev.running);
      assert.ok(ob.kind === 'backing' && ob.dev.running);
      const dev = b.dev;
      await dev.setCacheMode(1);
      // The outage timeout and counters in the device's sysfs directory; the timeout can be changed live.
      const tree = new SysfsTree(registry);
      const attr = (name: string): string => tree.read(`/sys/block/bcache0/bcache/${name}`);
      assert.equal(attr('backing_outage_timeout_ms'), '800\n', 'from the URI');
      await tree.write('/sys/block/bcache0/bcache/backing_outage_timeout_ms', '600');
      assert.equal(attr('backing_outage_timeout_ms'), '600\n');
      await assert.rejects(tree.write('/sys/block/bcache0/bcache/backing_outage_timeout_ms', '0'), /above 0/);
      assert.equal(attr('backing_reconnects'), '0\n');
      assert.equal(attr('backing_outage_ms'), '0\n');
      assert.ok(!tree.list('/sys/block/bcache1/bcache').includes('backing_outage_timeout_ms'), 'local: none');
      const dirty = pattern(40, 0, 64);
      await dev.device.write(dirty, 0);
      await dev.device.flush();

      await srv.kill();
      // During the outage: a dirty hit is served from the cache, and a write lands in it.
      const hit = Buffer.alloc(dirty.length);
      await dev.device.read(hit, 0);
      assert.ok(hit.equals(dirty), 'a hit while the server is down');
      await dev.device.write(pattern(41, 128, 8), 128 * 512);
      // A miss waits for the server, then fails with the outage's EIO.
      await assert.rejects(dev.device.read(Buffer.alloc(4096), 4 * MiB), (err: unknown) => {
        assert.ok(err instanceof IoError && err.code === 'EIO', String(err));
        assert.match(err.message, /unreachable for 0\.6 s \(outage timeout\)/);
        return true;
      });
      assert.equal(await backing.isGone(), true);
      assert.ok(Number(attr('backing_outage_ms')) >= 500, `outage ${attr('backing_outage_ms')} ms`);
      await watch.waitFor(/device offline for \d+ seconds/);
      await watch.waitFor(/disable I\/O request due to backing device offline/);
      await dev.stop();
      assert.equal(dev.stopped, true);
      assert.ok(dev.ioErrors > 0, 'the failed miss was counted');
      const mine = Buffer.alloc(4096);
      await ob.dev.device.write(pattern(42, 0, 8), 0);
      await ob.dev.device.read(mine, 0);
      assert.ok(mine.equals(pattern(42, 0, 8)), 'the bystander serves');
    } finally {
      await registry.stopAll();
      await srv.stop();
      watch.restore();
    }
    assertNothingLeft();
  },
);
