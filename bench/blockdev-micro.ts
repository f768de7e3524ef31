// Micro-benchmark of the BlockDevice hot path: 4 KiB random reads and writes
// at queue depth 32 on a 256 MiB file (in the page cache), through
// FileBlockDevice, against raw callback fs.read/fs.write (the ceiling) and
// FileHandle (what we avoid). Not a test; prints IOPS and ratios.
//
//   node --import tsx bench/blockdev-micro.ts [--seconds N] [--rounds N] [--dir DIR]
//
// Runs alternate in order round by round and the best of the rounds is kept,
// since a busy machine only ever makes a run slower.

import * as fs from 'node:fs';
import { mkdtempSync, rmSync } from 'node:fs';
import { open as openHandle } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { FileBlockDevice } from '../src/blockdev/file.ts';
import { Prng } from '../src/util/prng.ts';

const args = process.argv.slice(2);
function option(name: string, fallback: string): string {
  const i = args.indexOf(name);
  return i >= 0 ? (args[i + 1] ?? fallback) : fallback;
}
const SECONDS = Number(option('--seconds', '2'));
const ROUNDS = Number(option('--rounds', '3'));
const DIR = option('--dir', tmpdir());
const FILE_SIZE = 256 * 1024 * 1024;
const BLOCK = 4096;
const QD = 32;
const BLOCKS = FILE_SIZE / BLOCK;

type Runner = (buf: Buffer, offset: number, done: (err: Error | null) => void) => void;

/** Run QD independent loops of `op` for SECONDS; resolve with ops per second. */
async function measureCallback(op: Runner): Promise<number> {
  let count = 0;
  let stop = false;
  const timer = setTimeout(() => (stop = true), SECONDS * 1000);
  const t0 = performance.now();
  await Promise.all(
    Array.from(
      { length: QD },
      (_, i) =>
        new Promise<void>((resolve, reject) => {
          const buf = Buffer.alloc(BLOCK, i);
          const rng = new Prng(i);
          const next = (err: Error | null): void => {
            if (err) {
              reject(err);
              return;
            }
            if (stop) {
              resolve();
              return;
            }
            count++;
            op(buf, rng.below(BLOCKS) * BLOCK, next);
          };
          op(buf, rng.below(BLOCKS) * BLOCK, next);
        }),
    ),
  );
  clearTimeout(timer);
  return count / ((performance.now() - t0) / 1000);
}

async function measurePromise(op: (buf: Buffer, offset: number) => Promise<unknown>): Promise<number> {
  let count = 0;
  let stop = false;
  const timer = setTimeout(() => (stop = true), SECONDS * 1000);
  const t0 = performance.now();
  await Promise.all(
    Array.from({ length: QD }, async (_, i) => {
      const buf = Buffer.alloc(BLOCK, i);
      const rng = new Prng(i);
      while (!stop) {
        await op(buf, rng.below(BLOCKS) * BLOCK);
        count++;
      }
    }),
  );
  clearTimeout(timer);
  return count / ((performance.now() - t0) / 1000);
}

/** The least a promise API can do: the floor FileBlockDevice is measured against. */
function promiseRead(fd: number, buf: Buffer, offset: number): Promise<void> {
  return new Promise((resolve, reject) => {
    fs.read(fd, buf, 0, BLOCK, offset, (err) => {
      if (err) reject(err);
      else resolve();
    });
  });
}

async function main(): Promise<void> {
  const dir = mkdtempSync(join(DIR, 'ubcache-bench-'));
  const path = join(dir, 'bench.img');
  try {
    // Fill the file so reads hit real (cached) data, not holes.
    const fd = fs.openSync(path, 'w+');
    const chunk = Buffer.alloc(1024 * 1024, 0x5a);
    for (let off = 0; off < FILE_SIZE; off += chunk.length) fs.writeSync(fd, chunk, 0, chunk.length, off);
    fs.fsyncSync(fd);

    const dev = await FileBlockDevice.open(path);
    const handle = await openHandle(path, 'r+');
    const rawRead: Runner = (buf, off, done) => {
      fs.read(fd, buf, 0, BLOCK, off, (err) => {
        done(err);
      });
    };
    const rawWrite: Runner = (buf, off, done) => {
      fs.write(fd, buf, 0, BLOCK, off, (err) => {
        done(err);
      });
    };
    const rows: [string, () => Promise<number>][] = [
      ['read  raw fs.read (callback)', () => measureCallback(rawRead)],
      ['read  fs.read in a bare promise', () => measurePromise((b, o) => promiseRead(fd, b, o))],
      ['read  FileBlockDevice', () => measurePromise((b, o) => dev.read(b, o))],
      ['read  FileHandle', () => measurePromise((b, o) => handle.read(b, 0, BLOCK, o))],
      ['write raw fs.write (callback)', () => measureCallback(rawWrite)],
      ['write FileBlockDevice', () => measurePromise((b, o) => dev.write(b, o))],
      ['write FileHandle', () => measurePromise((b, o) => handle.write(b, 0, BLOCK, o))],
    ];
    // Warm up (JIT, page cache), then the rounds.
    await measurePromise((b, o) => dev.read(b, o));
    const best = new Map<string, number>();
    for (let round = 0; round < ROUNDS; round++) {
      for (const [name, run] of round % 2 === 0 ? rows : rows.slice().reverse()) {
        best.set(name, Math.max(best.get(name) ?? 0, await run()));
      }
    }
    console.log(
      `4 KiB random I/O, QD${QD}, ${FILE_SIZE >> 20} MiB file (page cache), ${SECONDS} s per run, best of ${ROUNDS}; ` +
        `Node ${process.version}, UV_THREADPOOL_SIZE=${process.env['UV_THREADPOOL_SIZE'] ?? 'default (4)'}`,
    );
    for (const [name] of rows) {
      const iops = best.get(name) ?? 0;
      const raw =
        best.get(name.startsWith('read') ? 'read  raw fs.read (callback)' : 'write raw fs.write (callback)') ?? 1;
      console.log(
        `${name.padEnd(32)} ${Math.round(iops).toString().padStart(8)} IOPS  ${(iops / raw).toFixed(2)}x raw`,
      );
    }
    await handle.close();
    await dev.close();
    fs.closeSync(fd);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

await main();
