// ubcache's NBD server against clients that send damaged traffic, from seeds.
// Each fuzz connection starts as a correct client would (flags, options, a GO,
// then requests of every kind, some with payloads) and is then damaged:
// bytes flipped, runs of junk inserted, pieces cut out, the stream cut short;
// it is sent in pieces of random sizes and the client's side is closed. The
// server must:
//   - never throw (an uncaught exception fails the runner) and end every such
//     connection within a bound;
//   - keep serving a bystander client connected before, during and after,
//     with its data intact.
//
// UBCACHE_SERVER_FUZZ_SEEDS=FROM-TO runs other seeds; a failure names its seed.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { connect } from 'node:net';
import { MemoryBlockDevice } from '../../src/blockdev/memory.ts';
import {
  encodeClientFlags,
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOptionRequest,
  encodeRequestHeader,
} from '../../src/nbd/codec.ts';
import { BASE_ALLOCATION, ClientFlag, Cmd, CmdFlag, Info, Opt } from '../../src/nbd/protocol.ts';
import { Prng } from '../../src/util/prng.ts';
import { startServer } from '../helpers/nbd-fixture.ts';
import { seedsFromEnv } from '../helpers/seeds.ts';

const SIZE = 1024 * 1024;
/** A fuzz connection must be over within this (the server's handshake limit is 1 s). */
const CONNECTION_BOUND_MS = 20_000;

/** What a correct client sends: the handshake and a run of requests. */
function correctStream(rng: Prng): Buffer {
  const parts: Buffer[] = [encodeClientFlags(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)];
  if (rng.bool()) parts.push(encodeOptionRequest(Opt.STRUCTURED_REPLY));
  if (rng.bool()) {
    parts.push(
      encodeOptionRequest(
        Opt.SET_META_CONTEXT,
        encodeMetaContextRequest({ exportName: 'disk', queries: [BASE_ALLOCATION] }),
      ),
    );
  }
  if (rng.below(4) === 0) parts.push(encodeOptionRequest(Opt.LIST));
  parts.push(encodeOptionRequest(Opt.GO, encodeInfoRequest({ name: 'disk', requests: [Info.BLOCK_SIZE] })));
  const types = [Cmd.READ, Cmd.WRITE, Cmd.FLUSH, Cmd.TRIM, Cmd.WRITE_ZEROES, Cmd.BLOCK_STATUS, Cmd.CACHE];
  for (let k = rng.below(40); k > 0; k--) {
    const type = types[rng.below(types.length)] ?? Cmd.READ;
    const length = rng.below(8) === 0 ? rng.below(1 << 20) : 512 * (1 + rng.below(16));
    const offset = rng.below(8) === 0 ? rng.below(4 * SIZE) : 512 * rng.below(SIZE / 512);
    const flags = rng.below(6) === 0 ? rng.below(1 << 16) : rng.bool() ? CmdFlag.FUA : 0;
    parts.push(encodeRequestHeader({ type, flags, cookie: BigInt(k), offset, length }));
    if (type === Cmd.WRITE) parts.push(Buffer.alloc(Math.min(length, 64 * 1024), k & 0xff));
  }
  if (rng.bool()) parts.push(encodeRequestHeader({ type: Cmd.DISC, cookie: 0n, offset: 0, length: 0 }));
  return Buffer.concat(parts);
}

/** The stream damaged: bytes flipped, junk inserted, pieces cut out, the end cut off. */
function damage(stream: Buffer, rng: Prng): Buffer {
  let out = Buffer.from(stream);
  for (let k = rng.below(6); k > 0; k--) {
    const at = rng.below(out.length);
    const what = rng.below(4);
    if (what === 0) out[at] = rng.below(256);
    else if (what === 1) {
      const junk = Buffer.alloc(1 + rng.below(64));
      for (let i = 0; i < junk.length; i++) junk[i] = rng.below(256);
      out = Buffer.concat([out.subarray(0, at), junk, out.subarray(at)]);
    } else if (what === 2) out = Buffer.concat([out.subarray(0, at), out.subarray(at + 1 + rng.below(64))]);
    else out = out.subarray(0, at);
  }
  return out;
}

/** Send `bytes` in pieces, close our side, and wait for the server to close the connection. */
function sendAndWaitClose(path: string, bytes: Buffer, rng: Prng, seed: number): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    const socket = connect(path);
    const watchdog = setTimeout(() => {
      socket.destroy();
      reject(new Error(`seed ${seed}: the server did not end the connection within ${CONNECTION_BOUND_MS} ms`));
    }, CONNECTION_BOUND_MS);
    socket.on('error', () => {
      // The server hanging up on a broken client, mid-write: expected.
    });
    socket.on('close', () => {
      clearTimeout(watchdog);
      resolve();
    });
    socket.resume();
    socket.once('connect', () => {
      let at = 0;
      while (at < bytes.length) {
        const n = 1 + rng.below(4096);
        socket.write(bytes.subarray(at, at + n));
        at += n;
      }
      socket.end();
    });
  });
}

test('fuzz: damaged client traffic from seeds; every such connection ends, a bystander is served throughout', async () => {
  const fuzzed = new MemoryBlockDevice(SIZE);
  const own = new MemoryBlockDevice(SIZE);
  const f = await startServer(
    [
      { name: 'disk', device: fuzzed },
      { name: 'mine', device: own },
    ],
    { handshakeTimeoutMs: 1000, shutdownTimeoutMs: 2000 },
  );
  try {
    const { client: bystander } = await f.open({ name: 'mine', structured: true });
    const seeds = seedsFromEnv('UBCACHE_SERVER_FUZZ_SEEDS', 1, 40);
    for (const seed of seeds) {
      const rng = new Prng(seed);
      const block = seed % (SIZE / 4096);
      const mine = Buffer.alloc(4096, seed & 0xff);
      // The bystander writes while the damaged connections run, so the server interleaves them.
      const written = bystander.writeAt(block * 4096, mine);
      await Promise.all(
        Array.from({ length: 1 + rng.below(4) }, () =>
          sendAndWaitClose(f.socketPath, damage(correctStream(rng), rng), rng, seed),
        ),
      );
      assert.equal((await written).error, 0, `seed ${seed}: the bystander's write`);
      const back = await bystander.readAt(block * 4096, 4096);
      assert.equal(back.error, 0, `seed ${seed}: the bystander's read`);
      assert.ok(back.data?.equals(mine), `seed ${seed}: the bystander reads what it wrote`);
    }
  } finally {
    await f.cleanup();
  }
});
