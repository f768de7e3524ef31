// The NBD client's promise across a server crash, checked from seeds: every
// write, zero and trim it acknowledged is on the server's disk in the end,
// although the server lost its volatile cache in every crash.
//
// The server is ubcache's own, in process, over a CrashableBlockDevice (a disk
// with a volatile write cache). A crash destroys every connection at once, as
// kill -9 would, then cuts the disk's power (the writes since its last flush
// dropped, kept or torn, from the seed) and serves the surviving image from a
// new server on the same socket. Meanwhile workers write, zero, trim, write
// with FUA and flush, each in a region of its own, one request at a time, so
// that the last acknowledged operation on every byte is known: the model.
// The client's bounds on the unflushed log are tiny, so its own flushes, and
// writes held behind them, are in play when a crash comes. No request may
// fail, and after a final FLUSH the disk must equal the model byte for byte.
//
// UBCACHE_REPLAY_SEEDS=FROM-TO runs other seeds (a hunt); a failure names
// its seed.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { CrashableBlockDevice, type CrashPolicy } from '../../src/blockdev/crashable.ts';
import { NbdClient } from '../../src/nbd/client.ts';
import { NbdServer } from '../../src/nbd/server.ts';
import { Prng } from '../../src/util/prng.ts';
import { tempDir } from '../helpers/daemon.ts';
import { seedsFromEnv } from '../helpers/seeds.ts';

const KiB = 1024;
const SIZE = 2 * 1024 * KiB;
const WORKERS = 4;
const REGION = SIZE / WORKERS;
const OPS_PER_WORKER = 120;

/** A server that can crash: connections cut at once, the disk's power cut, a new server over what survived. */
class CrashingServer {
  disk: CrashableBlockDevice;
  private server: NbdServer;
  private readonly sockets = new Set<Socket>();
  private readonly listener: Server;
  private readonly old: Promise<void>[] = [];
  crashes = 0;

  private constructor(listener: Server) {
    this.listener = listener;
    this.disk = new CrashableBlockDevice(SIZE, { name: 'volatile disk' });
    this.server = this.serverOver(this.disk);
  }

  /** Called on every write the disk takes (replays included), to crash at any request, not only between a worker's. */
  onDiskWrite: (() => void) | undefined;

  private serverOver(disk: CrashableBlockDevice): NbdServer {
    const write = disk.write.bind(disk);
    disk.write = (buf, offset, options) => {
      this.onDiskWrite?.();
      return write(buf, offset, options);
    };
    return new NbdServer([{ name: 'disk', device: disk }], { ownsDevices: false, shutdownTimeoutMs: 1000 });
  }

  static async start(path: string): Promise<CrashingServer> {
    const ref: { self?: CrashingServer } = {};
    const listener = createServer((socket) => {
      const self = ref.self;
      if (!self) {
        socket.destroy();
        return;
      }
      self.sockets.add(socket);
      socket.once('close', () => {
        self.sockets.delete(socket);
      });
      self.server.serve(socket);
    });
    await new Promise<void>((resolve, reject) => {
      listener.once('error', reject);
      listener.listen(path, resolve);
    });
    ref.self = new CrashingServer(listener);
    return ref.self;
  }

  crash(seed: number, policy: CrashPolicy): void {
    this.crashes++;
    for (const s of this.sockets) s.destroy();
    this.sockets.clear();
    const before = this.server;
    this.disk = this.disk.powerCut(seed, { policy });
    this.server = this.serverOver(this.disk);
    // The old server's requests end against a dead disk, their replies with nowhere to go.
    this.old.push(before.close());
  }

  async stop(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((resolve) => {
      this.listener.close(() => {
        resolve();
      });
    });
    await this.server.close();
    await Promise.all(this.old);
  }
}

async function runSeed(seed: number, path: string): Promise<void> {
  const rng = new Prng(seed);
  const srv = await CrashingServer.start(path);
  const client = await NbdClient.connect(`nbd+unix:///disk?socket=${path}`, {
    connections: 1 + rng.below(3),
    autoFlushBytes: (16 + rng.below(64)) * KiB,
    maxUnflushedBytes: 256 * KiB,
    autoFlushEntries: 4 + rng.below(16),
    maxUnflushedEntries: 48,
    outageTimeoutMs: 20_000,
  });
  const model = Buffer.alloc(SIZE);
  const failures: string[] = [];
  let acked = 0;
  // Crash after this many acknowledgements (in all), again and again; and after
  // this many writes reach the disk, which counts the replays too, so a crash
  // can come in the middle of one.
  let nextCrash = 20 + rng.below(120);
  const policies: CrashPolicy[] = ['drop', 'random', 'keep'];
  let diskWrites = 0;
  let nextDiskCrash = 30 + rng.below(200);
  srv.onDiskWrite = () => {
    if (++diskWrites < nextDiskCrash || srv.crashes >= 6) return;
    nextDiskCrash = diskWrites + 1 + rng.below(200);
    // After this write is taken: the server crashes with it in its volatile cache, unacknowledged.
    setImmediate(() => {
      srv.crash(seed * 1000 + srv.crashes, policies[rng.below(3)] ?? 'drop');
    });
  };
  const worker = async (w: number): Promise<void> => {
    const wr = new Prng(seed * 31 + w);
    for (let k = 0; k < OPS_PER_WORKER; k++) {
      const length = (1 + wr.below(16)) * 512;
      const at = w * REGION + wr.below((REGION - length) / 512 + 1) * 512;
      const op = wr.below(10);
      try {
        if (op < 5) {
          const data = Buffer.alloc(length, (seed + w * 7 + k) & 0xff || 1);
          data.writeUInt32LE(k, 0);
          const fua = op === 4;
          await client.write(data, at, { fua });
          data.copy(model, at);
        } else if (op === 5 || op === 6) {
          await client.writeZeroes(at, length, { noHole: op === 6 });
          model.fill(0, at, at + length);
        } else if (op === 7) {
          await client.trim(at, length);
          model.fill(0, at, at + length);
        } else {
          await client.flush();
        }
      } catch (err) {
        failures.push(`worker ${w} op ${k}: ${String(err)}`);
        return;
      }
      acked++;
      if (acked >= nextCrash && srv.crashes < 6) {
        srv.crash(seed * 1000 + srv.crashes, policies[rng.below(3)] ?? 'drop');
        nextCrash = acked + 20 + rng.below(120);
      }
    }
  };
  try {
    await Promise.all(Array.from({ length: WORKERS }, (_, w) => worker(w)));
    assert.deepEqual(failures, [], `seed ${seed}: no request failed`);
    await client.flush();
    assert.ok(srv.crashes >= 1, `seed ${seed}: the server crashed (${srv.crashes})`);
    // A crash during a reconnect's replay is part of the same outage.
    assert.ok(
      client.reconnects >= 1 && client.reconnects <= srv.crashes,
      `seed ${seed}: ${client.reconnects} reconnects for ${srv.crashes} crashes`,
    );
    const disk = Buffer.alloc(SIZE);
    srv.disk.readDurable(disk, 0);
    for (let at = 0; at < SIZE; at += 512) {
      if (!disk.subarray(at, at + 512).equals(model.subarray(at, at + 512))) {
        assert.fail(`seed ${seed}: the disk's sector at ${at} is not the last acknowledged content`);
      }
    }
  } finally {
    await client.close();
    await srv.stop();
  }
}

test('acknowledged writes, zeroes and trims survive server crashes that lose its volatile cache (seeded)', async () => {
  using tmp = tempDir('ubcache-replay-');
  for (const seed of seedsFromEnv('UBCACHE_REPLAY_SEEDS', 1, 12)) await runSeed(seed, join(tmp.dir, `s${seed}.sock`));
});
