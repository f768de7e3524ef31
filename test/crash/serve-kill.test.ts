// kill -9 of `ubcache serve` while a client writes with periodic flushes,
// several rounds, in writeback mode (with writeback running in some rounds)
// and in writethrough. After each restart every write covered by a completed
// flush reads back exactly, and every block holds exactly one of the writes
// made to it (or what it held at the last flush): nothing torn, nothing from
// nowhere.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Daemon, tempDir } from '../helpers/daemon.ts';
import { Prng } from '../../src/util/prng.ts';
import { Client, makeImages } from '../e2e/serve-helpers.ts';
import { join } from 'node:path';

const BLOCK = 4096;
const BLOCKS = 2048;
const ROUNDS = 6;

/** A block's content: its (round, seq, block) in the header, a fill derived from them. */
function content(value: number, block: number): Buffer {
  const buf = Buffer.alloc(BLOCK, (value * 7 + block) & 0xff);
  buf.writeUInt32LE(value, 0);
  buf.writeUInt32LE(block, 4);
  buf.writeUInt32LE(0xbcac4e, 8);
  return buf;
}

/** The value a block holds: 0 for never written, -1 for anything that is not one whole write. */
function decode(buf: Buffer, block: number): number {
  if (buf.every((b) => b === 0)) return 0;
  const value = buf.readUInt32LE(0);
  return buf.equals(content(value, block)) ? value : -1;
}

async function start(
  dir: string,
  cache: string,
  backing: string,
  round: number,
): Promise<{ d: Daemon; socket: string }> {
  const socket = join(dir, `s${round}.sock`);
  const mode = round % 3 === 2 ? 'writethrough' : 'writeback';
  const running = round % 3 === 1 ? '1' : '0';
  const d = new Daemon([
    'serve',
    '--socket',
    socket,
    '--set',
    `bcache0.cache_mode=${mode}`,
    '--set',
    `bcache0.writeback_running=${running}`,
    '--set',
    'bcache0.writeback_rate=20000',
    '--set',
    'bcache0.writeback_delay=0',
    '--set',
    'bcache0.sequential_cutoff=0',
    '--set',
    'set.journal_delay_ms=20',
    cache,
    backing,
  ]);
  await d.waitForLine(/listening on unix:/);
  return { d, socket };
}

test('kill -9 while writing: flushed writes survive exactly, nothing is torn', { timeout: 300_000 }, async () => {
  using tmp = tempDir('ubcache-kill-');
  const { cache, backing } = makeImages(tmp.dir, { cacheMiB: 64, backingMiB: 32 });
  const rng = new Prng(20240611);
  /** What each block must hold at least (the last flush covered it). */
  const stable = new Int32Array(BLOCKS);
  let value = 1;
  for (let round = 0; round < ROUNDS; round++) {
    const { d, socket } = await start(tmp.dir, cache, backing, round);
    const candidates = new Map<number, Set<number>>();
    try {
      const c = await Client.connect(socket);
      // Flushed batches: afterwards everything written so far is stable.
      for (let batch = 0; batch < 4; batch++) {
        const writes: Promise<void>[] = [];
        // Concurrent writes to one block may land in any order: one write per block per batch.
        const used = new Set<number>();
        for (let i = 0; i < 64; i++) {
          const block = rng.below(BLOCKS);
          if (used.has(block)) continue;
          used.add(block);
          const v = value++;
          stable[block] = v;
          writes.push(c.write(block * BLOCK, content(v, block)));
        }
        await Promise.all(writes);
        await c.flush();
      }
      // The last batch: the daemon dies with these in flight, some acknowledged, none flushed.
      const inFlight: Promise<void>[] = [];
      for (let i = 0; i < 256; i++) {
        const block = rng.below(BLOCKS);
        const v = value++;
        let set = candidates.get(block);
        if (!set) candidates.set(block, (set = new Set()));
        set.add(v);
        inFlight.push(c.write(block * BLOCK, content(v, block)).catch(() => undefined));
        if (i === 128) await inFlight[64];
      }
      d.proc.kill('SIGKILL');
      await d.exited;
      await Promise.all(inFlight);
      c.raw.destroy();
    } finally {
      await d.kill();
    }
    // Restart and check every block.
    const { d: d2, socket: s2 } = await start(tmp.dir, cache, backing, round + 100);
    try {
      const c = await Client.connect(s2);
      for (let at = 0; at < BLOCKS; at += 256) {
        const buf = await c.read(at * BLOCK, 256 * BLOCK);
        for (let i = 0; i < 256; i++) {
          const block = at + i;
          const got = decode(buf.subarray(i * BLOCK, (i + 1) * BLOCK), block);
          const ok = got === stable[block] || (candidates.get(block)?.has(got) ?? false);
          assert.ok(
            ok,
            `round ${round}: block ${block} reads ${got}; flushed ${stable[block]}, ` +
              `unflushed ${[...(candidates.get(block) ?? [])].join(',')}`,
          );
          stable[block] = got;
        }
      }
      c.close();
    } finally {
      await d2.stop().finally(() => d2.kill());
    }
  }
  assert.ok(value > ROUNDS * 400);
});
