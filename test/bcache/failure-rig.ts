// A rig for the failure scenarios (issue 6): a cache set and a backing
// device on fault-injecting memory devices, served by an in-process NBD
// server to a real NBD client, next to a second, independent set and device
// that must keep serving whatever happens to the first. After a scenario,
// checkRetired() proves DESIGN rule 5 (bounded, no worker of the set, no
// timer, collectable) and restart() registers copies of the devices' bytes
// in a fresh registry, as a daemon restart would.

import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { FaultyBlockDevice } from '../../src/blockdev/faulty.ts';
import { MemoryBlockDevice } from '../../src/blockdev/memory.ts';
import type { CachedDev, CachedDevSettings } from '../../src/bcache/cached-dev.ts';
import type { CacheSet } from '../../src/bcache/cache-set.ts';
import { Registry, type RegisteredSet } from '../../src/bcache/registry.ts';
import { NbdServer } from '../../src/nbd/server.ts';
import type { Clock } from '../../src/util/clock.ts';
import { Worker, type WorkerScope } from '../../src/util/lifecycle.ts';
import { RawNbdClient } from '../helpers/nbd-raw-client.ts';
import { formatCache } from './helpers.ts';
import { formatBacking, MiB } from './request-helpers.ts';

export interface RigOptions {
  settings?: Partial<CachedDevSettings>;
  /** Backing offline timeout (ms); the kernel's 5 s by default. */
  backingOfflineMs?: number;
  backingProbeMs?: number;
  cacheBytes?: number;
  backingBytes?: number;
  /**
   * The engine's clock (default: real time). With a SimClock the engine's
   * timers wait until the test advances it, while the NBD client and server
   * still talk over a real socket: the test decides when a rate update or a
   * stop bound comes, and waiting for one costs no real time.
   */
  clock?: Clock;
}

export interface Rig {
  registry: Registry;
  /** The failing set (throws after forgetSet()). */
  readonly set: RegisteredSet;
  /** Drop the rig's own reference to the set; returns a WeakRef to its CacheSet. */
  forgetSet(): WeakRef<CacheSet>;
  dev: CachedDev;
  cache: FaultyBlockDevice;
  backing: FaultyBlockDevice;
  cacheMem: MemoryBlockDevice;
  backingMem: MemoryBlockDevice;
  /** The bystander: another set and device in the same registry. */
  other: CachedDev;
  server: NbdServer;
  client: RawNbdClient;
  otherClient: RawNbdClient;
  /** The set's worker scope (for "no worker of the set runs afterwards"). */
  scope: WorkerScope;
  close(): Promise<void>;
}

/** Memory devices under fault injection, formatted, registered, exported, with a client connected to each export. */
export async function makeRig(o: RigOptions = {}): Promise<Rig> {
  // stderr's pipe is opened at the first log line: open it before the baseline.
  if (!process.stderr.writable) throw new Error('stderr is closed');
  baseline = resources();
  const cacheMem = new MemoryBlockDevice(o.cacheBytes ?? 40 * MiB, { name: 'cache' });
  const backingMem = new MemoryBlockDevice(o.backingBytes ?? 8 * MiB, { name: 'backing' });
  await formatCache(cacheMem, { bucketSize: 128, blockSize: 8, setUuid: Buffer.alloc(16, 1) });
  await formatBacking(backingMem, { setUuid: Buffer.alloc(16, 1), uuid: Buffer.alloc(16, 2) });
  const otherCache = new MemoryBlockDevice(40 * MiB, { name: 'other-cache' });
  const otherBacking = new MemoryBlockDevice(4 * MiB, { name: 'other-backing' });
  await formatCache(otherCache, { bucketSize: 128, blockSize: 8, setUuid: Buffer.alloc(16, 3) });
  await formatBacking(otherBacking, { setUuid: Buffer.alloc(16, 3), uuid: Buffer.alloc(16, 4) });
  const cache = new FaultyBlockDevice(cacheMem, { name: 'cache' });
  const backing = new FaultyBlockDevice(backingMem, { name: 'backing' });
  const registry = new Registry({
    ...(o.clock ? { clock: o.clock } : {}),
    setOptions: { journalDelayMs: 2, stopTimeoutMs: 10_000 },
    deviceSettings: (name) =>
      name === 'bcache0' ? { writebackDelay: 0, writebackRate: 1 << 20, sequentialCutoff: 0, ...o.settings } : {},
    deviceOptions: {
      ...(o.backingOfflineMs !== undefined ? { backingOfflineMs: o.backingOfflineMs } : {}),
      ...(o.backingProbeMs !== undefined ? { backingProbeMs: o.backingProbeMs } : {}),
    },
  });
  const c = await registry.register(cache);
  const b = await registry.register(backing);
  await registry.register(otherCache);
  const ob = await registry.register(otherBacking);
  if (c.kind !== 'cache' || b.kind !== 'backing' || ob.kind !== 'backing') throw new Error('makeRig: wrong kinds');
  const dir = mkdtempSync(join(tmpdir(), 'ubcache-failure-'));
  const path = join(dir, 'nbd.sock');
  const server = new NbdServer(
    [b.dev, ob.dev].map((d) => ({ name: d.name, device: d.device, blockSize: { min: 512 } })),
    { ownsDevices: false },
  );
  await server.listen({ path });
  const client = (await RawNbdClient.open({ path }, { name: b.dev.name })).client;
  const otherClient = (await RawNbdClient.open({ path }, { name: ob.dev.name })).client;
  let set: RegisteredSet | undefined = c.set;
  return {
    registry,
    get set(): RegisteredSet {
      if (!set) throw new Error('the rig forgot its set');
      return set;
    },
    forgetSet() {
      if (!set) throw new Error('the rig forgot its set already');
      const ref = new WeakRef(set.cs);
      set = undefined;
      return ref;
    },
    dev: b.dev,
    cache,
    backing,
    cacheMem,
    backingMem,
    other: ob.dev,
    server,
    client,
    otherClient,
    scope: c.set.cs.workers,
    async close() {
      for (const cl of [client, otherClient]) cl.destroy();
      await Promise.all([client.closed, otherClient.closed]);
      await server.close();
      await registry.stopAll();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** A promise's result within `ms`, or a failure naming what hung (the bound of "retire finishes"). */
export async function within<T>(ms: number, what: string, p: Promise<T>): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      p,
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => {
          reject(new Error(`${what} did not finish within ${ms} ms`));
        }, ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/** Wait for the set's retire to have begun and finished, within a bound. */
export async function retired(rig: Rig, ms = 10_000): Promise<void> {
  // The failure starts the retire from an I/O completion; wait for it to be under way.
  const start = Date.now();
  while (!rig.set.retired) {
    if (Date.now() - start > ms) throw new Error('the cache set was never retired');
    await new Promise<void>((resolve) => setImmediate(resolve));
  }
  await within(ms, 'the retire', rig.set.retired);
}

/** DESIGN rule 5 after a retire: nothing of the set runs, it is unregistered, and it can be collected. */
export async function checkRetired(rig: Rig): Promise<void> {
  const cs = rig.set.cs;
  assert.equal(cs.ioDisabled, true, 'I/O of the set is disabled');
  assert.deepEqual(
    rig.scope.live().map((w) => w.name),
    [],
    'no worker of the set runs',
  );
  assert.ok(!rig.registry.sets.has(rig.set.uuid), 'the set is unregistered');
  await assert.rejects(rig.cacheMem.read(Buffer.alloc(512), 0), /closed/i, 'the cache device is closed');
  for (const w of Worker.live()) {
    assert.ok(!rig.scope.owns(w), `worker ${w.name} of the set is alive`);
  }
}

export async function collected(ref: WeakRef<object>): Promise<boolean> {
  const gc = (globalThis as { gc?: () => void }).gc;
  if (!gc) throw new Error('run the tests with --expose-gc');
  for (let i = 0; i < 30 && ref.deref(); i++) {
    await new Promise<void>((resolve) => setImmediate(resolve));
    gc();
  }
  return ref.deref() === undefined;
}

function resources(): string[] {
  return process
    .getActiveResourcesInfo()
    .filter((r) => r === 'Timeout' || r === 'Immediate' || r === 'PipeWrap' || r === 'FSReqCallback')
    .sort();
}

/** What was active before the rig (the test runner's own pipes). */
let baseline: string[] = [];

/** After close() nothing of the rig remains: no worker, timer, socket or file request. */
export async function assertQuiet(): Promise<void> {
  // Closed sockets let go of their handles on the next turn of the loop.
  await new Promise<void>((resolve) => setImmediate(resolve));
  assert.deepEqual(
    [...Worker.live()].map((w) => w.name),
    [],
    'no worker alive',
  );
  assert.deepEqual(resources(), baseline, 'no timer, socket or file request left');
}

/** A fresh registry over copies of the devices' current bytes: the daemon restarted. */
export async function restart(
  images: MemoryBlockDevice[],
): Promise<{ registry: Registry; devices: CachedDev[]; close(): Promise<void> }> {
  const registry = new Registry({
    setOptions: { journalDelayMs: 2 },
    deviceSettings: () => ({ writebackRunning: false }),
  });
  for (const m of images) await registry.register(m.clone());
  return {
    registry,
    devices: registry.devices,
    close: () => registry.stopAll(),
  };
}
