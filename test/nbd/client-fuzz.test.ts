// The NBD client against a server whose every reply is chosen from a seed:
// correct (simple, or structured in chunks out of order), an error the
// protocol allows, or a violation (garbage, a cookie never sent, a second
// reply, a chunk outside the request, an oversized chunk, a hang-up in the
// middle of a reply). Replies of one batch of requests go out in a random
// order. Whatever the server does, the client must:
//   - settle every request, and once: a read's buffer is not touched after
//     its promise settled;
//   - fail a request only with an IoError (EIO, ESHUTDOWN, ENOMEM), never
//     with anything else;
//   - never report success for a read with wrong data (every byte the server
//     sends in a correct reply is a function of its offset);
//   - keep serving: with the violations rare, many requests succeed (each
//     violation fails what was in flight on its connection, by design), and
//     the client gives up for good only when a replay of acknowledged writes
//     is refused (it cannot restore them) or the outage timeout passes.
// No unhandled rejection and no uncaught exception may escape (the runner
// fails on them).
//
// UBCACHE_FUZZ_SEEDS=FROM-TO runs other seeds; a failure names its seed.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { IoError } from '../../src/blockdev/types.ts';
import { NbdClient } from '../../src/nbd/client.ts';
import { Cmd, NbdErr, ReplyType } from '../../src/nbd/protocol.ts';
import { Prng } from '../../src/util/prng.ts';
import { tempDir } from '../helpers/daemon.ts';
import { seedsFromEnv } from '../helpers/seeds.ts';
import { chunk, dataChunk, simple, startFakeServer, type FakeConnection } from '../helpers/fake-nbd-server.ts';

const SIZE = 4 * 1024 * 1024;
const REQUESTS = 240;

const unhandled: unknown[] = [];
process.on('unhandledRejection', (reason) => {
  unhandled.push(reason);
});

/** What a correct server holds at every byte. */
function expected(offset: number, length: number): Buffer {
  const b = Buffer.alloc(length);
  for (let i = 0; i < length; i++) b[i] = ((offset + i) * 31 + 7) & 0xff;
  return b;
}

interface Req {
  type: number;
  cookie: bigint;
  offset: number;
  length: number;
}

/** A correct reply to `req`: simple, or (reads) structured in 1-4 data chunks sent in a random order. */
function correct(req: Req, rng: Prng): Buffer {
  if (req.type !== Cmd.READ)
    return rng.bool() ? simple(req.cookie) : chunk(req.cookie, ReplyType.NONE, Buffer.alloc(0), true);
  const data = expected(req.offset, req.length);
  if (rng.bool() || req.length < 1024) return simple(req.cookie, 0, data);
  const cuts = [0, req.length];
  for (let k = rng.below(4); k > 0; k--) cuts.push(512 * rng.below(req.length / 512));
  const edges = [...new Set(cuts)].sort((a, b) => a - b);
  const pieces: Buffer[] = [];
  for (let i = 0; i + 1 < edges.length; i++) {
    const from = edges[i] as number;
    const to = edges[i + 1] as number;
    pieces.push(dataChunk(req.cookie, req.offset + from, data.subarray(from, to), false));
  }
  for (let i = pieces.length - 1; i > 0; i--) {
    const j = rng.below(i + 1);
    [pieces[i], pieces[j]] = [pieces[j] as Buffer, pieces[i] as Buffer];
  }
  return Buffer.concat([...pieces, chunk(req.cookie, ReplyType.NONE, Buffer.alloc(0), true)]);
}

/** Answer `req` on `conn`, correctly or not, from `rng`. */
function reply(req: Req, conn: FakeConnection, rng: Prng): void {
  const roll = rng.below(1000);
  if (roll < 950) conn.send(correct(req, rng));
  // An error the protocol allows; rarer for writes, where a replayed one refused ends the client for good.
  else if (roll < 970 && (req.type === Cmd.READ || roll < 955)) conn.send(simple(req.cookie, NbdErr.EIO));
  else if (roll < 975) conn.send(Buffer.from('GARBAGE!GARBAGE!GARBAGE!GARBAGE!'));
  else if (roll < 980) conn.send(simple(req.cookie ^ 0xdead00000000n));
  else if (roll < 985) conn.send(correct(req, rng), correct(req, rng));
  else if (roll < 990 && req.type === Cmd.READ) {
    conn.send(dataChunk(req.cookie, req.offset + req.length, Buffer.alloc(512), true));
  } else if (roll < 995 && req.type === Cmd.READ) {
    conn.send(dataChunk(req.cookie, req.offset, Buffer.alloc(req.length + 512), true));
  } else if (roll >= 995) {
    const whole = correct(req, rng);
    conn.send(whole.subarray(0, rng.below(whole.length)));
    conn.socket.end();
  } else conn.send(correct(req, rng));
}

/** Whether the client was still serving at the end (it gives up for good when a replay is refused). */
async function runSeed(seed: number, dir: string): Promise<boolean> {
  const rng = new Prng(seed);
  // Every connection replies from a generator of its own, in batches: the requests of one read of the
  // socket are answered after it, in a random order.
  const pending = new Map<FakeConnection, Req[]>();
  let connNo = 0;
  const rngs = new Map<FakeConnection, Prng>();
  const srv = await startFakeServer(dir, {
    size: SIZE,
    onRequest: (req, conn) => {
      let batch = pending.get(conn);
      if (!batch) {
        batch = [];
        pending.set(conn, batch);
        if (!rngs.has(conn)) rngs.set(conn, new Prng(seed * 1000 + ++connNo));
        setImmediate(() => {
          const list = pending.get(conn) ?? [];
          pending.delete(conn);
          const r = rngs.get(conn) ?? rng;
          while (list.length > 0) {
            const [req] = list.splice(r.below(list.length), 1);
            if (req) reply(req, conn, r);
          }
        });
      }
      batch.push(req);
    },
  });
  const client = await NbdClient.connect(srv.uri, {
    connections: 1 + rng.below(3),
    outageTimeoutMs: 5_000,
    requestTimeoutMs: 5_000,
  });
  const reads: Array<{ buf: Buffer; at: Buffer | undefined; ok: boolean; offset: number }> = [];
  const failures: string[] = [];
  let ok = 0;
  let gaveUp: IoError | undefined;
  try {
    for (let sent = 0; sent < REQUESTS;) {
      const batch: Promise<void>[] = [];
      for (let k = 1 + rng.below(32); k > 0 && sent < REQUESTS; k--, sent++) {
        const blocks = 1 + (rng.bool() ? rng.below(8) : rng.below(96));
        const length = blocks * 512;
        const offset = 512 * rng.below((SIZE - length) / 512 + 1);
        const kind = rng.below(10);
        const settle = (p: Promise<void>, onOk: () => void): Promise<void> =>
          p.then(
            () => {
              ok++;
              onOk();
            },
            (err: unknown) => {
              if (!(err instanceof IoError) || !['EIO', 'ESHUTDOWN', 'ENOMEM'].includes(err.code)) {
                failures.push(`seed ${seed}: a request failed with ${String(err)}`);
              }
            },
          );
        if (kind < 6) {
          const r = { buf: Buffer.alloc(length), at: undefined as Buffer | undefined, ok: false, offset };
          reads.push(r);
          batch.push(
            settle(
              client.read(r.buf, offset).finally(() => {
                r.at = Buffer.from(r.buf);
              }),
              () => {
                r.ok = true;
              },
            ),
          );
        } else if (kind < 9) {
          batch.push(settle(client.write(expected(offset, length), offset), () => undefined));
        } else batch.push(settle(client.flush(), () => undefined));
      }
      await Promise.all(batch);
    }
    gaveUp = client.failed;
  } finally {
    await client.close();
    await srv.close();
  }
  assert.deepEqual(failures, []);
  for (const r of reads) {
    assert.ok(r.at?.equals(r.buf), `seed ${seed}: a read's buffer was written after the read settled`);
    if (r.ok)
      assert.ok(r.buf.equals(expected(r.offset, r.buf.length)), `seed ${seed}: a read succeeded with wrong data`);
  }
  if (gaveUp) {
    // Allowed only for a replay the server refused (acknowledged data it cannot take back) or an outage
    // past its timeout, and said so.
    assert.match(
      gaveUp.message,
      /cannot reconnect: acknowledged writes could not be written again: .* failed on the server|outage timeout/,
      `seed ${seed}`,
    );
    return false;
  }
  // A violation fails every request in flight on its connection (up to 32 here), so a good share fail.
  assert.ok(ok > REQUESTS / 4, `seed ${seed}: only ${ok} of ${REQUESTS} requests succeeded`);
  return true;
}

test('fuzz: a server choosing every reply from a seed, correct or hostile: each request settles once, no wrong data', async () => {
  using tmp = tempDir('ubcache-fuzz-');
  const seeds = seedsFromEnv('UBCACHE_FUZZ_SEEDS', 1, 10);
  let serving = 0;
  for (const seed of seeds) {
    const dir = join(tmp.dir, `s${seed}`);
    mkdirSync(dir);
    if (await runSeed(seed, dir)) serving++;
  }
  assert.ok(serving >= seeds.length / 2, `the client kept serving in only ${serving} of ${seeds.length} seeds`);
  assert.deepEqual(unhandled, [], 'no unhandled rejections');
});
