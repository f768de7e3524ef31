// Micro-benchmark of the engine alone: the bcache request path, btree,
// journal and allocator over memory devices, driven in-process at queue depth
// 32, with no NBD, no page cache and no other process in the way. It prints
// the event loop's CPU time per request (process.cpuUsage), which on a shared
// 2-core machine is a far steadier figure than IOPS through fio: what one
// 4 KiB writeback write, read hit and read miss cost the engine itself
// (docs/performance.md keeps the before/after table).
//
//   node --import tsx bench/engine-micro.ts [--ops N] [--rounds N] [--only write,hit,miss] [--profile DIR] [--heap-profile DIR]
//
// Not a test. The best round is kept: a busy machine only makes a round slower.
// --profile writes a V8 CPU profile of the measured phase of each round only
// (set-up excluded) to DIR/KIND-ROUND.cpuprofile; --heap-profile a sampling
// profile of what the measured phase allocates, garbage included (bytes per
// request by allocating function: what the scavenger has to clear), to
// DIR/KIND-ROUND.heapprofile.

import { writeFileSync } from 'node:fs';
import { Session } from 'node:inspector/promises';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import type { BlockDevice } from '../src/blockdev/types.ts';
import { LoopDevice } from './loop-device.ts';

import {
  encodeSuperblock,
  MemoryBlockDevice,
  newBackingSuperblock,
  newCacheSuperblock,
  Prng,
  Registry,
  SB_OFFSET,
} from './dist-engine.ts';

const args = process.argv.slice(2);
function option(name: string, fallback: string): string {
  const i = args.indexOf(name);
  return i >= 0 ? (args[i + 1] ?? fallback) : fallback;
}
const OPS = Number(option('--ops', '200000'));
const ROUNDS = Number(option('--rounds', '3'));
const ONLY = option('--only', 'write,hit,miss').split(',');
const PROFILE = option('--profile', '');
const HEAP_PROFILE = option('--heap-profile', '');
const QD = 32;
const MiB = 1024 * 1024;
const BLOCK = 4096;
/** The span the random requests fall in (as the cache suite of `npm run bench`: 256 MiB). */
const SPAN = 256 * MiB;

interface Setup {
  registry: InstanceType<typeof Registry>;
  device: BlockDevice;
}

async function setup(mode: 'writeback' | 'writethrough', cacheBytes: number): Promise<Setup> {
  const cache = new MemoryBlockDevice(cacheBytes, { name: 'cache' });
  const backing = new MemoryBlockDevice(SPAN + 8 * MiB, { name: 'backing' });
  // Touch every byte first: the memory device allocates its storage on first
  // write, which is not the engine's cost (a real device's page cache is warm).
  const zero = Buffer.alloc(MiB);
  for (const d of [cache, backing])
    for (let at = 0; at < d.size; at += MiB) d.writeSync(zero.subarray(0, Math.min(MiB, d.size - at)), at);
  // make-bcache -C -b 64k and -B (4 KiB blocks), in one set.
  const setUuid = randomBytes(16);
  const csb = newCacheSuperblock({
    uuid: randomBytes(16),
    setUuid,
    blockSize: 8,
    bucketSize: 128,
    nbuckets: Math.floor(cache.size / 512 / 128),
    discard: false,
    replacement: 0,
  });
  cache.writeSync(encodeSuperblock(csb), SB_OFFSET);
  const bsb = newBackingSuperblock({
    uuid: randomBytes(16),
    setUuid,
    blockSize: 8,
    bucketSize: 1024,
    dataOffset: 16,
    writeback: mode === 'writeback',
  });
  backing.writeSync(encodeSuperblock(bsb), SB_OFFSET);
  const registry = new Registry({ deviceSettings: () => ({ sequentialCutoff: 0 }) });
  await registry.register(new LoopDevice(cache));
  const b = await registry.register(new LoopDevice(backing));
  if (b.kind !== 'backing') throw new Error('engine-micro: backing device did not register as one');
  return { registry, device: b.dev.device };
}

/** Run `ops` requests at QD32 with `issue`; the CPU microseconds per request. */
async function drive(
  ops: number,
  issue: (i: number) => Promise<void>,
  profileAs: string,
): Promise<{ cpuUs: number; wallUs: number }> {
  let session: Session | undefined;
  if (PROFILE !== '' || HEAP_PROFILE !== '') {
    session = new Session();
    session.connect();
  }
  if (session && PROFILE !== '') {
    await session.post('Profiler.enable');
    await session.post('Profiler.start');
  }
  if (session && HEAP_PROFILE !== '') {
    await session.post('HeapProfiler.enable');
    await session.post('HeapProfiler.startSampling', {
      samplingInterval: 4096,
      includeObjectsCollectedByMajorGC: true,
      includeObjectsCollectedByMinorGC: true,
    });
  }
  let next = 0;
  const t0 = performance.now();
  const c0 = process.cpuUsage();
  const lane = async (): Promise<void> => {
    while (next < ops) await issue(next++);
  };

  await Promise.all(Array.from({ length: QD }, lane));
  const c = process.cpuUsage(c0);
  const wall = performance.now() - t0;
  if (session && PROFILE !== '') {
    const { profile } = await session.post('Profiler.stop');
    writeFileSync(join(PROFILE, `${profileAs}.cpuprofile`), JSON.stringify(profile));
  }
  if (session && HEAP_PROFILE !== '') {
    const { profile } = await session.post('HeapProfiler.stopSampling');
    writeFileSync(join(HEAP_PROFILE, `${profileAs}.heapprofile`), JSON.stringify(profile));
  }
  session?.disconnect();
  return { cpuUs: (c.user + c.system) / ops, wallUs: (wall * 1000) / ops };
}

async function round(kind: string, n: number): Promise<{ cpuUs: number; wallUs: number }> {
  const rng = new Prng(42);
  const blocks = SPAN / BLOCK;
  const buf = Buffer.alloc(BLOCK, 0x5a);
  // Writes: a cache big enough that every write of the run stays below the writeback cutoff.
  const cacheBytes = kind === 'write' ? Math.max(4 * SPAN, Math.ceil((OPS * BLOCK * 3) / MiB) * MiB) : 2 * SPAN;
  const s = await setup(kind === 'write' ? 'writeback' : 'writethrough', cacheBytes);
  try {
    if (kind === 'write') {
      return await drive(OPS, () => s.device.write(buf, rng.below(blocks) * BLOCK), `${kind}-${n}`);
    }
    if (kind === 'hit') {
      // Fill a 64 MiB working set, then read it at random.
      const ws = (64 * MiB) / BLOCK;
      const r = Buffer.alloc(BLOCK);
      for (let b = 0; b < ws; b++) await s.device.read(r, b * BLOCK);
      await new Promise((resolve) => setTimeout(resolve, 200));
      const bufs = Array.from({ length: QD }, () => Buffer.alloc(BLOCK));
      return await drive(OPS, (i) => s.device.read(bufs[i % QD] ?? r, rng.below(ws) * BLOCK), `${kind}-${n}`);
    }
    // Misses: every read a new block of the span (each then filled into the cache).
    const lanes = Array.from({ length: QD }, () => Buffer.alloc(BLOCK));
    const order = Array.from({ length: Math.min(OPS, blocks) }, (_, i) => i);
    for (let i = order.length - 1; i > 0; i--) {
      const j = rng.below(i + 1);
      [order[i], order[j]] = [order[j] as number, order[i] as number];
    }
    return await drive(
      order.length,
      (i) => s.device.read(lanes[i % QD] ?? buf, (order[i] as number) * BLOCK),
      `${kind}-${n}`,
    );
  } finally {
    await s.registry.stopAll();
  }
}

for (const kind of ONLY) {
  let best: { cpuUs: number; wallUs: number } | undefined;
  for (let r = 0; r < ROUNDS; r++) {
    const res = await round(kind, r);
    if (!best || res.cpuUs < best.cpuUs) best = res;
  }
  if (best) {
    console.log(
      `${kind.padEnd(6)} ${best.cpuUs.toFixed(2).padStart(7)} µs CPU per request, ${best.wallUs.toFixed(2).padStart(7)} µs wall`,
    );
  }
}
