// The admission benchmark (issue 13 part 5), the engine alone in-process:
// one cache set with two backing devices over memory devices, a hot set
// read with a Zipf distribution on bcache0 while bcache1 is read once, in
// random order, over cold data four times the size of the cache. Run once
// with cache_admission = always (bcache) and once with second-hit, same
// seeds; prints per policy the hot set's hit ratio during the scan, how much
// of the cold data second-hit admitted, and the CPU time of a read hit (the
// policy's cost on the hit path).
//
//   node --import tsx bench/admission-engine.ts [--cache-mib 32] [--hot-mib 8] [--cold-factor 4]
//                                               [--warm 40000] [--hits 50000]
//
// Not a test. Prints one line per policy for bench/admission.ts to read:
//   admission POLICY hot-hit% H cold-admitted% C|- hit-cpu-us U hit-share% P scan-s S

import { randomBytes } from 'node:crypto';
import type { MemoryBlockDevice as MemoryDeviceClass } from '../src/blockdev/memory.ts';
import { LoopDevice } from './loop-device.ts';
import type { CachedDev } from '../src/bcache/cached-dev.ts';

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
function option(name: string, fallback: number): number {
  const i = args.indexOf(name);
  return i >= 0 ? Number(args[i + 1] ?? fallback) : fallback;
}
const MiB = 1024 * 1024;
const BLOCK = 4096;
const CACHE = option('--cache-mib', 32) * MiB;
const HOT = option('--hot-mib', 8) * MiB;
const COLD = option('--cold-factor', 4) * CACHE;
const WARM_OPS = option('--warm', 40000);
const HIT_OPS = option('--hits', 50000);
const ZIPF_S = option('--zipf', 1.1);
/** Lanes of each kind: hot readers on bcache0, scanners on bcache1 (QD of each). */
const LANES = 16;
const HOT_LANES = option('--hot-lanes', LANES);
const SCAN_LANES = option('--scan-lanes', LANES);

function memory(bytes: number, name: string): MemoryDeviceClass {
  const d = new MemoryBlockDevice(bytes, { name });
  // Allocate the storage up front (not the engine's cost).
  const zero = Buffer.alloc(MiB);
  for (let at = 0; at < d.size; at += MiB) d.writeSync(zero.subarray(0, Math.min(MiB, d.size - at)), at);
  return d;
}

/** Ranks 0..n-1 drawn with P(rank k) proportional to 1 / (k+1)^s. */
function zipfSampler(n: number, s: number, rng: InstanceType<typeof Prng>): () => number {
  const cdf = new Float64Array(n);
  let sum = 0;
  for (let k = 0; k < n; k++) cdf[k] = sum += 1 / (k + 1) ** s;
  return () => {
    const u = rng.float() * sum;
    let lo = 0;
    let hi = n - 1;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if ((cdf[mid] ?? 0) < u) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  };
}

function shuffled(n: number, rng: InstanceType<typeof Prng>): Uint32Array {
  const a = new Uint32Array(n);
  for (let i = 0; i < n; i++) a[i] = i;
  for (let i = n - 1; i > 0; i--) {
    const j = rng.below(i + 1);
    const t = a[i] ?? 0;
    a[i] = a[j] ?? 0;
    a[j] = t;
  }
  return a;
}

async function runPolicy(policy: 'always' | 'second-hit'): Promise<string> {
  const setUuid = randomBytes(16);
  const cache = memory(CACHE, 'cache');
  const hotDev = memory(HOT + 8 * MiB, 'hot');
  const coldDev = memory(COLD + 8 * MiB, 'cold');
  // make-bcache -C -b 32k (a 32 MiB cache has the 513 buckets bcache needs), and -B for each (4 KiB blocks), in one set.
  cache.writeSync(
    encodeSuperblock(
      newCacheSuperblock({
        uuid: randomBytes(16),
        setUuid,
        blockSize: 8,
        bucketSize: 64,
        nbuckets: Math.floor(CACHE / 512 / 64),
        discard: false,
        replacement: 0,
      }),
    ),
    SB_OFFSET,
  );
  for (const d of [hotDev, coldDev]) {
    const sb = newBackingSuperblock({
      uuid: randomBytes(16),
      setUuid,
      blockSize: 8,
      bucketSize: 1024,
      dataOffset: 16,
      writeback: false,
    });
    d.writeSync(encodeSuperblock(sb), SB_OFFSET);
  }
  // bcache's defaults otherwise (sequential_cutoff 4M: these reads are random anyway).
  const registry = new Registry({ deviceSettings: () => ({ cacheAdmission: policy }) });
  await registry.register(new LoopDevice(cache));
  const hb = await registry.register(new LoopDevice(hotDev));
  const cb = await registry.register(new LoopDevice(coldDev));
  if (hb.kind !== 'backing' || cb.kind !== 'backing') throw new Error('admission: backing devices did not register');
  const hot: CachedDev = hb.dev;
  const cold: CachedDev = cb.dev;
  try {
    const rng = new Prng(1);
    const hotBlocks = HOT / BLOCK;
    const placement = shuffled(hotBlocks, new Prng(2));
    const zipf = zipfSampler(hotBlocks, ZIPF_S, rng);
    const hotAt = (): number => (placement[zipf()] ?? 0) * BLOCK;
    const lanes = Array.from({ length: 2 * LANES }, () => Buffer.alloc(BLOCK));

    // Warm-up: the hot set alone, until it is in the cache whatever the policy.
    let n = 0;
    await Promise.all(
      Array.from({ length: LANES }, async (_, l) => {
        while (n++ < WARM_OPS) await hot.device.read(lanes[l] ?? Buffer.alloc(BLOCK), hotAt());
      }),
    );
    await hot.request.settle();

    // The scan: every cold block once, in random order, while the hot set keeps being read.
    const hot0 = { ...hot.stats.total };
    const order = shuffled(COLD / BLOCK, new Prng(3));
    let next = 0;
    let scanning = true;
    const t0 = performance.now();
    await Promise.all([
      ...Array.from({ length: SCAN_LANES }, async (_, l) => {
        const buf = lanes[LANES + l] ?? Buffer.alloc(BLOCK);
        while (next < order.length) await cold.device.read(buf, (order[next++] ?? 0) * BLOCK);
      }),
      ...Array.from({ length: HOT_LANES }, async (_, l) => {
        const buf = lanes[l] ?? Buffer.alloc(BLOCK);
        while (scanning) {
          await hot.device.read(buf, hotAt());
          if (next >= order.length) scanning = false;
        }
      }),
    ]);
    const scanSeconds = (performance.now() - t0) / 1000;
    await cold.request.settle();
    const h = hot.stats.total;
    const hits = h.cacheHits - hot0.cacheHits;
    const misses = h.cacheMisses - hot0.cacheMisses;
    const hotHit = (100 * hits) / Math.max(1, hits + misses);
    // Under second-hit, the share of the scan's misses admitted (always fills every miss it can: not counted).
    const coldAdmitted =
      policy === 'always' ? '-' : ((100 * cold.request.admissionStats.admitted) / (COLD / BLOCK)).toFixed(1);

    // The hit path: the 256 hottest blocks, in the cache under either policy, at QD16.
    const top = Array.from({ length: 256 }, (_, i) => (placement[i] ?? 0) * BLOCK);
    const before = h.cacheHits;
    let k = 0;
    const c0 = process.cpuUsage();
    await Promise.all(
      Array.from({ length: LANES }, async (_, l) => {
        while (k < HIT_OPS) await hot.device.read(lanes[l] ?? Buffer.alloc(BLOCK), top[k++ % top.length] ?? 0);
      }),
    );
    const c = process.cpuUsage(c0);
    const hitShare = (100 * (hot.stats.total.cacheHits - before)) / HIT_OPS;
    const hitCpuUs = (c.user + c.system) / HIT_OPS;
    return (
      `admission ${policy} hot-hit% ${hotHit.toFixed(1)} cold-admitted% ${coldAdmitted} ` +
      `hit-cpu-us ${hitCpuUs.toFixed(2)} hit-share% ${hitShare.toFixed(0)} scan-s ${scanSeconds.toFixed(1)}`
    );
  } finally {
    await registry.stopAll();
  }
}

for (const policy of ['always', 'second-hit'] as const) console.log(await runPolicy(policy));
