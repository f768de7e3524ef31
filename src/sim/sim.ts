// The deterministic simulator (docs/simulation.md): the whole engine (two
// cache sets, three bcache devices in writeback, writethrough and writearound
// mode, writeback with its rate controller, GC, the journal, clean restarts
// and power cuts, detach and attach at run time, injected I/O errors and the
// retire and device stops they lead to) on simulated devices and simulated
// time, driven by random client operations (reads, writes, FLUSHes, discards,
// write-zeroes), all from one seed. The same seed gives the same run, and
// the run's trace (every device operation, client operation, log line and
// their simulated times) hashes to the same digest, on any machine.
//
// After every step it checks:
// - durability: every read returns what the model (model.ts) allows, so
//   flushed data reads back and nothing reads as garbage, across power cuts;
// - liveness: every client operation, GC request, detach, attach, retire and
//   stop completes within a bound of simulated time;
// - lifecycle: after a stop (clean, or after a power cut) no worker of the
//   engine is alive, no timer of it is pending, and its devices see no more
//   I/O however long time runs on; a clean stop leaves nothing unflushed.

import { createHash, type Hash } from 'node:crypto';
import { CrashableBlockDevice } from '../blockdev/crashable.ts';
import type { BlockDevice } from '../blockdev/types.ts';
import { BACKING_OFFLINE_MS, type CachedDevSettings } from '../bcache/cached-dev.ts';
import { Registry, type RegisteredSet } from '../bcache/registry.ts';
import {
  BDEV_STATE_NONE,
  CACHE_MODE_NAMES,
  CACHE_MODE_WRITEAROUND,
  CACHE_MODE_WRITEBACK,
  CACHE_MODE_WRITETHROUGH,
  SB_OFFSET,
} from '../format/constants.ts';
import { encodeSuperblock, newBackingSuperblock, newCacheSuperblock } from '../format/superblock.ts';
import { SimClock } from '../util/clock.ts';
import { deferred, errorMessage, Worker } from '../util/lifecycle.ts';
import { setLogSink } from '../util/log.ts';
import { Prng } from '../util/prng.ts';
import { SimDevice, type LatencyProfile, type SimDeviceEnv } from './device.ts';
import { ClientModel, encodeWrite } from './model.ts';

const SECTOR = 512;
const MiB = 1024 * 1024;
/** A client block (bytes): the soak's reads and writes. */
const BLOCK = 4096;

/**
 * What the clients do. `mixed` (the default, what CI runs): random batches of
 * reads, writes and flushes over three devices, with control actions,
 * restarts and power cuts among them. `fill`: issue 7's soak, scaled to the
 * simulator: one device over a cache of 64 KiB buckets barely larger than the
 * region used; each round picks a cache mode, reads the whole region, then
 * writes it over in 4 KiB writes eight at a time with a FLUSH every 64
 * writes, some FUA writes and write-zeroes, and ends with a power cut
 * (kill -9) or a clean stop (SIGTERM). `ops` counts rounds there. `soak`:
 * the rounds of test/crash/soak.test.ts as the daemon ran them, the workload
 * that found the nearly-full-cache hang: every 4 KiB block read once and
 * then written over, in order or shuffled, eight requests in flight (the
 * next starts as one ends, so read-miss fills pile up behind the replies),
 * each charged the event loop's time to run it (`cpu()`), over a cache
 * device as fast as a local SSD and btree nodes small enough that the
 * scaled-down tree splits as a real one does over a longer run. `ops`
 * counts rounds there too.
 */
export type Workload = 'mixed' | 'fill' | 'soak';

interface Geometry {
  /** Cache sets, one cache device each. */
  sets: number;
  cacheBytes: number;
  bucketSize: number;
  backingBytes: number;
  modes: number[];
}

export interface SimOptions {
  seed: number;
  workload?: Workload;
  /** Steps to run (each a batch of client operations or a control action). */
  ops?: number;
  /** Power cuts among the steps (default true). */
  powerCuts?: boolean;
  /** Cache sets (default: two for the mixed workload, one for fill); 1 replays runs of the simulator before it had two. */
  sets?: number;
  /** Fault episodes among the steps (default true). */
  faults?: boolean;
  /** Keep the trace's lines (for debugging a seed): they are returned in the result. */
  keepTrace?: boolean;
  /**
   * Expensive checks: every cache set's btree verified (Btree.verify: order,
   * overlaps, node ranges, counters, every key's fields) after every step.
   */
  expensiveChecks?: boolean;
}

export interface SimStats {
  reads: number;
  writes: number;
  fuaWrites: number;
  flushes: number;
  discards: number;
  zeroes: number;
  gcs: number;
  detaches: number;
  attaches: number;
  faultEpisodes: number;
  retires: number;
  deviceStops: number;
  /** Client operations that failed where failing is allowed (see Run.errorsAllowed). */
  failedOps: number;
  powerCuts: number;
  restarts: number;
  settingChanges: number;
  idle: number;
}

export interface SimResult {
  seed: number;
  ops: number;
  /** sha256 of the trace, first 16 hex digits. */
  digest: string;
  ok: boolean;
  /** "ok", or the first violation. */
  verdict: string;
  /** Simulated time the run took (ms). */
  simMs: number;
  events: number;
  stats: SimStats;
  trace?: string[];
}

/** A step's client operations, a GC or a stop that has not completed by then is a liveness failure. */
export const LIVENESS_MS = 120_000;
/** Bound on a whole stop (clean or after a power cut) of the engine. */
export const STOP_BOUND_MS = 180_000;

const MODES = [CACHE_MODE_WRITEBACK, CACHE_MODE_WRITETHROUGH, CACHE_MODE_WRITEAROUND] as const;

const GEOMETRY: Record<Workload, Geometry> = {
  // 1024 buckets of 16 KiB: a 16 MiB cache before 3 x 8 MiB of backing devices, so that it
  // fills, GC runs and writeback must keep up.
  // Two sets: device 0 (writeback) on the first, device 2 on the second, device 1 on either (from the seed).
  mixed: { sets: 2, cacheBytes: 16 * MiB, bucketSize: 32, backingBytes: 8 * MiB, modes: [...MODES] },
  // 576 buckets of 64 KiB (the allocator needs more than 512) before a 28 MiB region.
  fill: { sets: 1, cacheBytes: 36 * MiB, bucketSize: 128, backingBytes: 32 * MiB, modes: [CACHE_MODE_WRITEBACK] },
  soak: { sets: 1, cacheBytes: 36 * MiB, bucketSize: 128, backingBytes: 32 * MiB, modes: [CACHE_MODE_WRITEBACK] },
};

/** The soak workload's journal delay: the kernel's default (journal_delay_ms). */
const SOAK_JOURNAL_DELAY_MS = 100;
/**
 * The soak workload's btree nodes, from the seed: 8 or 16 KiB (two or four
 * 4 KiB blocks) in its 64 KiB buckets, so that its 7168 keys a pass split
 * leaves as the real soak's tree did over dozens of rounds. A cache of 8 KiB
 * buckets and 4 KiB blocks has two-block nodes too; they found the replay
 * hang of docs/simulation.md.
 */
const SOAK_NODE_SECTORS = [16, 32] as const;

class Violation extends Error {}

interface Engine {
  registry: Registry;
  /** Every device, caches first. */
  devices: SimDevice[];
  /** Each set's cache device and registered set, by set index. */
  caches: SimDevice[];
  sets: RegisteredSet[];
  /** Each backing device, by model index. */
  backingDevs: SimDevice[];
  /** The bcache device of each backing device, by model index. */
  bdevs: BlockDevice[];
  generation: number;
}

/** One run: all its state, so that nothing is shared between runs in one process. */
class Run implements SimDeviceEnv {
  readonly clock = new SimClock(0);
  private readonly hash: Hash = createHash('sha256');
  private readonly keep: string[] | undefined;
  events = 0;
  private readonly violations: string[] = [];
  readonly rng: Prng;
  readonly seed: number;
  readonly model: ClientModel;
  private caches: CrashableBlockDevice[];
  private backings: CrashableBlockDevice[];
  /** The set (index) each backing device belongs to. */
  readonly setOf: number[];
  private engine: Engine | undefined;
  private writeId = 0;
  private generation = 0;
  private readonly workload: Workload;
  /** SimOptions.expensiveChecks. */
  expensiveChecks = false;
  /**
   * Workers alive when this run began: left by an earlier seed in this
   * process whose run failed and was abandoned (their clock is that run's,
   * which nothing moves any more). Not this run's to account for.
   */
  private readonly abandonedWorkers = new Set(Worker.live());
  /** Latencies of the backing devices, and of the caches unless cacheLatency says otherwise. */
  private readonly latency: LatencyProfile;
  private readonly cacheLatency: LatencyProfile;
  /** Simulated event-loop time each client operation takes before it is submitted (ms; the soak workload). */
  private readonly cpuMs: number;
  /** When the simulated event loop is next free (cpu()). */
  private cpuFree = 0;
  /** Btree node size (sectors) when smaller than a bucket (the soak workload). */
  private readonly nodeSectors: number | undefined;
  private readonly settings: Array<Partial<CachedDevSettings>>;
  readonly stats: SimStats = {
    reads: 0,
    writes: 0,
    fuaWrites: 0,
    flushes: 0,
    discards: 0,
    zeroes: 0,
    gcs: 0,
    detaches: 0,
    attaches: 0,
    faultEpisodes: 0,
    retires: 0,
    deviceStops: 0,
    failedOps: 0,
    powerCuts: 0,
    restarts: 0,
    settingChanges: 0,
    idle: 0,
  };

  /**
   * Each backing device detached from the cache set at run time (and not
   * attached again since). Every detach and attach completes within its step,
   * so at any power cut or restart this says exactly what bring-up must find.
   */
  private readonly detached = new Set<number>();

  /**
   * The devices whose clients may see an I/O error (during a fault episode):
   * there a failed operation is traced and modelled (a failed write may or
   * may not have landed), elsewhere it is a violation.
   */
  private readonly errorsAllowed = new Set<number>();

  /** Each backing device's cache mode (the fill workload changes it every round). */
  readonly modes: number[];
  private readonly geometry: Geometry;

  constructor(seed: number, keepTrace: boolean, workload: Workload = 'mixed', sets?: number) {
    this.seed = seed;
    this.workload = workload;
    this.rng = new Prng(seed);
    this.keep = keepTrace ? [] : undefined;
    this.geometry = { ...GEOMETRY[workload], ...(sets === undefined ? {} : { sets }) };
    this.modes = [...this.geometry.modes];
    this.model = new ClientModel(this.modes.length);
    this.caches = Array.from(
      { length: this.geometry.sets },
      (_, k) => new CrashableBlockDevice(this.geometry.cacheBytes, { name: k === 0 ? 'cache' : `cache${k}` }),
    );
    this.backings = this.modes.map(
      (_, i) => new CrashableBlockDevice(this.geometry.backingBytes, { name: `backing${i}` }),
    );
    const r = this.rng;
    this.latency = {
      baseMs: r.below(3),
      jitterMs: 1 + r.below(20),
      flushMs: 1 + r.below(10),
      stallMs: 100 + r.below(2000),
      stallEvery: r.bool() ? 0 : 50 + r.below(500),
    };
    this.settings = this.modes.map(() => ({
      sequentialCutoff: r.bool() ? 0 : (64 << r.below(4)) * 1024,
      readahead: r.below(4) === 0 ? 16 * 1024 : 0,
      writebackDelay: 1 + r.below(10),
      writebackPercent: r.below(4) === 0 ? 0 : 10,
      writebackRateUpdateSeconds: 1 + r.below(5),
      writebackRunning: true,
    }));
    // The soak's passes are sequential: with a cutoff they would go around the cache, which
    // issue 7's did not (its read pass filled the cache with miss fills).
    if (workload !== 'mixed') for (const st of this.settings) st.sequentialCutoff = 0;
    if (workload === 'soak') {
      // A local SSD in front of the seeded (slower) backing device; a request costs 20-100 us of the loop.
      this.cacheLatency = { baseMs: 0, jitterMs: 1 + r.below(2), flushMs: 1, stallMs: 0, stallEvery: 0 };
      this.cpuMs = (2 + r.below(9)) / 100;
      this.nodeSectors = SOAK_NODE_SECTORS[r.below(SOAK_NODE_SECTORS.length)];
    } else {
      this.cacheLatency = this.latency;
      this.cpuMs = 0;
      this.nodeSectors = undefined;
    }
    const last = this.geometry.sets - 1;
    // (No draw with one set: a one-set run is the run of the simulator before it had two.)
    this.setOf = this.modes.map((_, i) => (i === 2 ? last : i === 1 && last > 0 ? r.below(last + 1) : 0));
    this.trace(
      `seed ${seed} latency ${JSON.stringify(this.latency)}` +
        (workload === 'soak'
          ? ` cache latency ${JSON.stringify(this.cacheLatency)} cpu ${this.cpuMs} ms node ${this.nodeSectors} sectors`
          : '') +
        ` settings ${JSON.stringify(this.settings)} sets ${this.setOf.join(' ')}`,
    );
  }

  trace(event: string): void {
    this.events++;
    const line = `${this.clock.now()} ${event}`;
    this.hash.update(line);
    this.hash.update('\n');
    this.keep?.push(line);
  }

  violation(message: string): void {
    this.trace(`VIOLATION ${message}`);
    this.violations.push(message);
  }

  /** Throw the first violation seen, if any (device callbacks cannot throw into the driver). */
  private check(): void {
    const v = this.violations[0];
    if (v !== undefined) throw new Violation(v);
  }

  digest(): string {
    return this.hash.copy().digest('hex').slice(0, 16);
  }

  get traceLines(): string[] | undefined {
    return this.keep;
  }

  /** Run until `p` settles; past `bound` of simulated time it is a liveness violation named `what`. */
  private async within<T>(p: Promise<T>, bound: number, what: string): Promise<T> {
    // A rejection is handled by the caller's await below; this keeps it from being "unhandled" meanwhile.
    p.catch(() => undefined);
    if (!(await this.clock.runUntil(p, bound))) {
      throw new Violation(`liveness: ${what} did not complete within ${bound} ms of simulated time`);
    }
    return p;
  }

  private uuid(): Buffer {
    const b = Buffer.alloc(16);
    for (let i = 0; i < 16; i += 4) b.writeUInt32LE(this.rng.next(), i);
    return b;
  }

  /** make-bcache -C and -B, with uuids from the seed. */
  async format(): Promise<void> {
    const setUuids: Buffer[] = [];
    const bucketSize = this.geometry.bucketSize;
    for (const cache of this.caches) {
      const setUuid = this.uuid();
      setUuids.push(setUuid);
      const csb = newCacheSuperblock({
        uuid: this.uuid(),
        setUuid,
        blockSize: 8,
        bucketSize,
        nbuckets: Math.floor(cache.size / SECTOR / bucketSize),
        discard: false,
        replacement: this.rng.below(3),
      });
      await cache.write(encodeSuperblock(csb), SB_OFFSET);
      await cache.flush();
    }
    for (const [i, dev] of this.backings.entries()) {
      const setUuid = setUuids[this.setOf[i] ?? 0];
      if (!setUuid) throw new Error(`sim: no set for device ${i}`);
      const sb = newBackingSuperblock({
        uuid: this.uuid(),
        setUuid,
        blockSize: 8,
        bucketSize: 1024,
        dataOffset: 16,
        writeback: this.modes[i] === CACHE_MODE_WRITEBACK,
      });
      await dev.write(encodeSuperblock(sb), SB_OFFSET);
      await dev.flush();
    }
  }

  /** Register the cache and the backing devices (in an order from the seed) on simulated devices. */
  async bringUp(): Promise<void> {
    const gen = ++this.generation;
    const clock = this.clock;
    const devSeed = (i: number): number => (this.seed * 1009 + gen * 31 + i) % 2 ** 31;
    const caches = this.caches.map((c, k) => new SimDevice(c, this, devSeed(k === 0 ? 0 : 100 + k), this.cacheLatency));
    const backings = this.backings.map((b, i) => new SimDevice(b, this, devSeed(i + 1), this.latency));
    const registry = new Registry({
      clock,
      // Unix seconds written to superblocks: simulated too.
      now: () => 1_700_000_000 + Math.floor(clock.now() / 1000),
      setOptions: {
        // A different seed each bring-up: node seqs must not repeat on one cache (CacheSetOptions.seed).
        seed: (this.seed * 7919 + gen) % 2 ** 31,
        now: () => 1_700_000_000 + Math.floor(clock.now() / 1000),
        journalDelayMs: this.workload === 'soak' ? SOAK_JOURNAL_DELAY_MS : 1 + this.rng.below(50),
        ...(this.nodeSectors === undefined ? {} : { btreeNodeSectors: this.nodeSectors }),
        gcSliceMs: 0,
        gcYield: () => clock.sleep(0).then(() => undefined),
      },
      deviceSettings: (name) => this.settings[Number(name.replace('bcache', ''))],
    });
    const order = [...caches, ...backings];
    for (let i = order.length - 1; i > 0; i--) {
      const j = this.rng.below(i + 1);
      const a = order[i];
      const b = order[j];
      if (a && b) [order[i], order[j]] = [b, a];
    }
    this.trace(`bring-up ${gen}: ${order.map((d) => d.name).join(' ')}`);
    for (const d of order) await this.within(registry.register(d), LIVENESS_MS, `register ${d.name}`);
    const sets = caches.map((c) => {
      const set = [...registry.sets.values()].find((rs) => rs.cs.dev === c);
      if (!set) throw new Violation(`bring-up: ${c.name}'s cache set is not registered`);
      return set;
    });
    const bdevs: BlockDevice[] = [];
    for (const [i, b] of backings.entries()) {
      const cd = registry.devices.find((d) => d.backing === b);
      if (!cd) throw new Violation(`bring-up: ${b.name} is not registered`);
      if (!cd.running) throw new Violation(`bring-up: ${cd.name} (${b.name}) is not running`);
      // A completed detach is durable (superblock NONE, slot invalidated), and so is a completed attach.
      if (this.detached.has(i)) {
        if (cd.attachment !== undefined)
          throw new Violation(`bring-up: ${cd.name} (${b.name}) was detached but is attached again`);
        this.trace(`${b.name} is ${cd.name}, detached`);
      } else {
        if (cd.attachment === undefined) throw new Violation(`bring-up: ${cd.name} (${b.name}) is not attached`);
        if (cd.attachment.set !== sets[this.setOf[i] ?? 0])
          throw new Violation(`bring-up: ${cd.name} (${b.name}) is attached to the wrong cache set`);
        const mode = this.modes[i] ?? CACHE_MODE_WRITETHROUGH;
        await this.within(cd.setCacheMode(mode), LIVENESS_MS, `${cd.name}: cache mode`);
        this.trace(`${b.name} is ${cd.name}, ${CACHE_MODE_NAMES[mode] ?? mode}`);
      }
      bdevs.push(cd.device);
    }
    this.engine = {
      registry,
      devices: [...caches, ...backings],
      caches,
      sets,
      backingDevs: backings,
      bdevs,
      generation: gen,
    };
    await this.probe();
  }

  /**
   * Debugging a seed: SIM_PROBE=DEV:SECTOR traces what the index says of that
   * sector of that device after every bring-up and step (a hit with its
   * bucket, gen and dirtiness, or a miss). Off, it changes nothing.
   */
  async probe(): Promise<void> {
    const spec = process.env['SIM_PROBE'];
    const e = this.engine;
    if (spec === undefined || !e) return;
    const [dev, sector] = spec.split(':').map(Number);
    const cd = e.registry.devices.find((d) => d.backing === e.backingDevs[dev ?? 0]);
    const att = cd?.attachment;
    if (!cd || !att || sector === undefined) return;
    const s = sector + cd.dataOffset;
    const segs = await this.within(att.cs.lookup(att.inode, s, s + 1), LIVENESS_MS, 'probe');
    const h = segs[0]?.hit;
    const b = h ? att.cs.buckets : undefined;
    this.trace(
      `probe ${spec}: ${h ? `hit bucket ${h.bucket} gen ${h.gen} (now ${b?.gen[h.bucket]}) ${h.dirty ? 'dirty' : 'clean'} at ${h.sector}` : 'miss'}`,
    );
  }

  /**
   * Stop the engine (`how`: a clean stop, or the teardown after a power cut)
   * and check the lifecycle rules: bounded, then nothing of it alive, pending
   * or touching its devices however long time runs on.
   */
  async stop(how: string): Promise<void> {
    const e = this.engine;
    if (!e) return;
    this.engine = undefined;
    this.trace(`stop (${how})`);
    await this.within(e.registry.stopAll(), STOP_BOUND_MS, `stop (${how})`);
    const live = [...Worker.live()].filter((w) => !this.abandonedWorkers.has(w)).map((w) => w.name);
    if (live.length > 0) throw new Violation(`lifecycle: worker(s) alive after stop (${how}): ${live.join(', ')}`);
    for (const d of e.devices) d.fence(`the engine stopped (${how})`);
    // What is still in flight below a stopped engine was issued by something that outlived the stop.
    const inflight = e.devices.flatMap((d) => [...d.inflight].map(([id, what]) => `${d.name} #${id} ${what}`));
    if (inflight.length > 0)
      throw new Violation(`lifecycle: I/O in flight after stop (${how}): ${inflight.join(', ')}`);
    // Time runs on: a timer or worker left behind would now fire or touch a device.
    const pending = this.clock.pending;
    await this.clock.advance(10 * 60_000);
    this.check();
    if (pending > 0) throw new Violation(`lifecycle: ${pending} timer(s) pending after stop (${how})`);
  }

  /** A clean stop, then a restart on the same devices: a clean stop leaves nothing unflushed. */
  async restart(): Promise<void> {
    this.stats.restarts++;
    await this.stop('clean');
    for (const d of [...this.caches, ...this.backings]) {
      if (d.volatileWrites > 0) {
        throw new Violation(`lifecycle: a clean stop left ${d.volatileWrites} unflushed write(s) on ${d.name}`);
      }
    }
    // Fresh devices over the same images (the old ones are closed).
    const fresh = (d: CrashableBlockDevice): CrashableBlockDevice => d.powerCut(0, { policy: 'drop' });
    this.caches = this.caches.map(fresh);
    this.backings = this.backings.map(fresh);
    await this.bringUp();
  }

  /** Cut the power to every device at once; the engine's teardown runs on dead devices; then bring up again. */
  async powerCut(): Promise<void> {
    this.stats.powerCuts++;
    const cutSeed = this.rng.next();
    this.trace(`power cut ${cutSeed}`);
    this.model.powerCut();
    const all = [...this.caches, ...this.backings];
    const fresh = all.map((d, i) => d.powerCut((cutSeed + i) >>> 0));
    this.caches = fresh.slice(0, this.caches.length);
    this.backings = fresh.slice(this.caches.length);
    await this.stop('power cut');
    await this.bringUp();
  }

  private live(): Engine {
    if (!this.engine) throw new Error('sim: no engine');
    return this.engine;
  }

  /** One batch of concurrent client operations, each checked against the model. */
  async clientBatch(): Promise<void> {
    const e = this.live();
    const n = 1 + this.rng.below(6);
    const ops: Array<Promise<void>> = [];
    const devSectors = (e.bdevs[0]?.size ?? 0) / SECTOR;
    for (let k = 0; k < n; k++) {
      const dev = this.rng.below(e.bdevs.length);
      const bdev = e.bdevs[dev];
      if (!bdev) continue;
      const r = this.rng.below(100);
      // Mostly 4 KiB-aligned (the cache's block), sometimes not (those bypass the cache).
      const aligned = this.rng.below(10) !== 0;
      const count = aligned ? 8 * (1 + this.rng.below(this.rng.below(4) === 0 ? 64 : 8)) : 1 + this.rng.below(16);
      // A hot region a quarter of the device draws most operations, so that data is read back and overwritten.
      const span = this.rng.below(4) === 0 ? devSectors : devSectors / 4;
      let first = this.rng.below(span - count);
      if (aligned) first -= first % 8;
      if (r < 45) {
        if (this.model.writeInFlight(dev, first, count)) continue;
        // One in nine a discard or a write-zeroes (both reach the backing device and invalidate the cache).
        const k = this.rng.below(18);
        if (k === 0) ops.push(this.discard(dev, bdev, first, count));
        else if (k === 1) ops.push(this.zero(dev, bdev, first, count, this.rng.below(4) === 0));
        else ops.push(this.write(dev, bdev, first, count, this.rng.below(10) === 0));
      } else if (r < 92) {
        ops.push(this.read(dev, bdev, first, count));
      } else {
        ops.push(this.flush(dev, bdev));
      }
    }
    await this.within(Promise.all(ops), LIVENESS_MS, `a batch of ${ops.length} client operation(s)`);
    this.check();
  }

  private async write(dev: number, bdev: BlockDevice, first: number, count: number, fua: boolean): Promise<void> {
    const id = ++this.writeId;
    if (fua) this.stats.fuaWrites++;
    else this.stats.writes++;
    const rec = this.model.beginWrite(dev, first, count, id);
    this.trace(`client write ${id}: dev ${dev} ${first}+${count}${fua ? ' fua' : ''}`);
    try {
      await bdev.write(encodeWrite(dev, id, first, count), first * SECTOR, { fua });
    } catch (err) {
      if (this.clientError(dev, err)) this.model.failWrite(rec);
      else this.violation(`client write ${id} to device ${dev} failed: ${errorMessage(err)}`);
      return;
    }
    this.model.endWrite(rec, fua);
    this.trace(`client write ${id} done`);
  }

  private async read(dev: number, bdev: BlockDevice, first: number, count: number): Promise<void> {
    this.stats.reads++;
    const t0 = this.model.beginRead();
    this.trace(`client read: dev ${dev} ${first}+${count}`);
    const buf = Buffer.alloc(count * SECTOR);
    try {
      await bdev.read(buf, first * SECTOR);
    } catch (err) {
      if (!this.clientError(dev, err))
        this.violation(`client read of device ${dev} ${first}+${count} failed: ${errorMessage(err)}`);
      return;
    }
    const wrong = this.model.checkRead(dev, first, count, t0, buf);
    this.trace(`client read done: dev ${dev} ${first}+${count}`);
    if (wrong !== undefined) this.violation(`durability: ${wrong}`);
  }

  private async flush(dev: number, bdev: BlockDevice): Promise<void> {
    this.stats.flushes++;
    const f0 = this.model.beginFlush();
    this.trace(`client flush: dev ${dev}`);
    try {
      await bdev.flush();
    } catch (err) {
      if (!this.clientError(dev, err)) this.violation(`client flush of device ${dev} failed: ${errorMessage(err)}`);
      return;
    }
    this.model.endFlush(dev, f0);
    this.trace(`client flush done: dev ${dev}`);
  }

  /**
   * Write zeroes: to the model a write of "0", what a never-written sector
   * reads as. With FUA it is durable once it completes, as a FUA write is.
   */
  private async zero(dev: number, bdev: BlockDevice, first: number, count: number, fua = false): Promise<void> {
    this.stats.zeroes++;
    const rec = this.model.beginWrite(dev, first, count, 0);
    this.trace(`client zero: dev ${dev} ${first}+${count}${fua ? ' fua' : ''}`);
    try {
      await bdev.writeZeroes(first * SECTOR, count * SECTOR, { fua });
    } catch (err) {
      if (this.clientError(dev, err)) this.model.failWrite(rec);
      else this.violation(`client write-zeroes on device ${dev} failed: ${errorMessage(err)}`);
      return;
    }
    this.model.endWrite(rec, fua);
    this.trace(`client zero done: dev ${dev} ${first}+${count}`);
  }

  /**
   * A discard. bcache passes it to the backing device and drops the cache's
   * keys over the range (clean ones before, dirty ones once the discard is
   * durable), so the range then reads as what the backing device returns for
   * a discarded range. The simulated backing device (CrashableBlockDevice)
   * zeroes it, volatile until a FLUSH as a write is: to the model a discard
   * is a write of "0" without FUA. (A backing device that ignored discards
   * would read back the old data instead; none here does.)
   */
  private async discard(dev: number, bdev: BlockDevice, first: number, count: number): Promise<void> {
    this.stats.discards++;
    const rec = this.model.beginWrite(dev, first, count, 0);
    this.trace(`client discard: dev ${dev} ${first}+${count}`);
    try {
      await bdev.discard(first * SECTOR, count * SECTOR);
    } catch (err) {
      if (this.clientError(dev, err)) this.model.failWrite(rec);
      else this.violation(`client discard on device ${dev} failed: ${errorMessage(err)}`);
      return;
    }
    this.model.endWrite(rec, false);
    this.trace(`client discard done: dev ${dev} ${first}+${count}`);
  }

  /** A client operation on `dev` failed: true if that is allowed now (it is traced and counted), false if a violation. */
  private clientError(dev: number, err: unknown): boolean {
    if (!this.errorsAllowed.has(dev)) return false;
    this.stats.failedOps++;
    this.trace(`client op on dev ${dev} failed: ${errorMessage(err)}`);
    return true;
  }

  /** One round of the fill workload (see Workload). */
  async fillRound(round: number): Promise<void> {
    const mode = MODES[this.rng.below(MODES.length)] ?? CACHE_MODE_WRITEBACK;
    this.modes[0] = mode;
    const e = this.live();
    const cd = e.registry.devices.find((d) => d.backing === e.backingDevs[0]);
    if (!cd) throw new Error('sim: no device');
    this.trace(`round ${round}: ${CACHE_MODE_NAMES[mode] ?? mode}`);
    await this.within(cd.setCacheMode(mode), LIVENESS_MS, 'cache mode');
    const bdev = e.bdevs[0];
    if (!bdev) throw new Error('sim: no device');
    const region = Math.min(bdev.size / SECTOR, (28 * MiB) / SECTOR);
    // The read pass: every block, 64 KiB reads eight at a time.
    for (let s = 0; s < region; s += 8 * 128) {
      const batch: Array<Promise<void>> = [];
      for (let k = 0; k < 8 && s + k * 128 < region; k++) batch.push(this.read(0, bdev, s + k * 128, 128));
      await this.within(Promise.all(batch), LIVENESS_MS, `read pass at sector ${s}`);
      this.check();
    }
    const cs = cd.attachment?.cs;
    this.trace(`read pass done: cache_available_percent ${cs?.cacheAvailablePercent} dirty ${cd.dirtySectors}`);
    // The write pass: 4 KiB writes eight at a time, a FLUSH every 64.
    let n = 0;
    for (let s = 0; s < region; s += 8 * 8) {
      const batch: Array<Promise<void>> = [];
      for (let k = 0; k < 8 && s + k * 8 < region; k++) {
        const first = s + k * 8;
        const r = this.rng.below(100);
        if (r < 3) batch.push(this.zero(0, bdev, first, 8));
        else batch.push(this.write(0, bdev, first, 8, r < 8));
        if (++n % 64 === 0) batch.push(this.flush(0, bdev));
      }
      await this.within(Promise.all(batch), LIVENESS_MS, `write pass at sector ${s}`);
      this.check();
    }
    this.trace(`write pass done: cache_available_percent ${cs?.cacheAvailablePercent} dirty ${cd.dirtySectors}`);
    if (this.expensiveChecks) await this.verifyTrees();
    if (this.rng.bool()) await this.powerCut();
    else await this.restart();
  }

  /** Expensive checks (SimOptions.expensiveChecks): every live set's btree is whole. */
  async verifyTrees(): Promise<void> {
    const e = this.engine;
    if (!e) return;
    for (const [k, set] of e.sets.entries()) {
      if (set.cs.stopped) continue;
      const problems = await this.within(set.cs.btree.verify(), LIVENESS_MS, `btree verify of set ${k}`);
      if (problems.length > 0) throw new Violation(`btree: set ${k}: ${problems.slice(0, 3).join('; ')}`);
    }
  }

  /** One round of the soak workload (see Workload). */
  async soakRound(round: number): Promise<void> {
    const mode = MODES[this.rng.below(MODES.length)] ?? CACHE_MODE_WRITEBACK;
    this.modes[0] = mode;
    const e = this.live();
    const cd = e.registry.devices.find((d) => d.backing === e.backingDevs[0]);
    const bdev = e.bdevs[0];
    if (!cd || !bdev) throw new Error('sim: no device');
    this.trace(`round ${round}: ${CACHE_MODE_NAMES[mode] ?? mode}`);
    await this.within(cd.setCacheMode(mode), LIVENESS_MS, 'cache mode');
    const blocks = Math.floor(Math.min(bdev.size, 28 * MiB) / BLOCK);
    const readOrder = this.blockOrder(blocks);
    await this.pipelined(blocks, 8, 'read pass', (i) => this.read(0, bdev, (readOrder[i] ?? 0) * 8, 8));
    const cs = cd.attachment?.cs;
    this.trace(`read pass done: cache_available_percent ${cs?.cacheAvailablePercent} dirty ${cd.dirtySectors}`);
    const writeOrder = this.blockOrder(blocks);
    await this.pipelined(blocks, 8, 'write pass', async (i) => {
      const first = (writeOrder[i] ?? 0) * 8;
      const r = this.rng.below(100);
      if (r < 3) await this.zero(0, bdev, first, 8);
      else await this.write(0, bdev, first, 8, r < 8);
      if ((i + 1) % 64 === 0) await this.flush(0, bdev);
    });
    this.trace(`write pass done: cache_available_percent ${cs?.cacheAvailablePercent} dirty ${cd.dirtySectors}`);
    if (this.expensiveChecks) await this.verifyTrees();
    if (this.rng.bool()) await this.powerCut();
    else await this.restart();
  }

  /** 0 .. n-1 in order, or shuffled (from the seed). */
  private blockOrder(n: number): number[] {
    const order = Array.from({ length: n }, (_, i) => i);
    if (this.rng.bool()) return order;
    for (let i = n - 1; i > 0; i--) {
      const j = this.rng.below(i + 1);
      const a = order[i] ?? 0;
      order[i] = order[j] ?? 0;
      order[j] = a;
    }
    return order;
  }

  /**
   * `n` client operations with `depth` in flight: the next starts as one
   * ends, each after its turn on the event loop (cpu()). Liveness: an
   * operation completes within LIVENESS_MS of simulated time of the last.
   */
  private async pipelined(n: number, depth: number, what: string, op: (i: number) => Promise<void>): Promise<void> {
    let next = 0;
    let progress = deferred();
    const lane = async (): Promise<void> => {
      while (next < n) {
        const i = next++;
        await this.cpu();
        await op(i);
        progress.resolve();
        this.check();
      }
    };
    const all = Promise.all(Array.from({ length: depth }, lane)).then(() => undefined);
    let finished = false;
    all.then(
      () => (finished = true),
      () => (finished = true),
    );
    while (!finished) {
      await this.within(Promise.race([progress.promise, all]), LIVENESS_MS, `${what} at operation ${next} of ${n}`);
      progress = deferred();
    }
    await all;
  }

  /**
   * A client operation's turn on the simulated event loop: one loop, so
   * operations take turns, each `cpuMs` (the engine's own work below the
   * request is not charged). No time at all outside the soak workload.
   */
  private async cpu(): Promise<void> {
    if (this.cpuMs === 0) return;
    const now = this.clock.now();
    this.cpuFree = Math.max(now, this.cpuFree) + this.cpuMs;
    await this.clock.sleep(this.cpuFree - now);
  }

  /** A FLUSH on every device at once. */
  async flushAll(): Promise<void> {
    const e = this.live();
    this.trace('flush all');
    await this.within(Promise.all(e.bdevs.map((b, dev) => this.flush(dev, b))), LIVENESS_MS, 'a FLUSH of every device');
    this.check();
  }

  /** Settings a user changes at run time, and a GC asked for by hand. */
  async control(): Promise<void> {
    const e = this.live();
    const r = this.rng.below(4);
    if (r === 0) {
      this.stats.gcs++;
      this.trace('gc');
      for (const set of e.registry.sets.values()) await this.within(set.cs.runGc(), LIVENESS_MS, 'a GC pass');
      return;
    }
    this.stats.settingChanges++;
    const dev = e.registry.devices[this.rng.below(e.registry.devices.length)];
    if (!dev) return;
    if (r === 1) {
      dev.settings.writebackRunning = !dev.settings.writebackRunning;
      this.trace(`${dev.name} writeback_running ${dev.settings.writebackRunning ? 1 : 0}`);
    } else if (r === 2) {
      dev.settings.writebackPercent = [0, 1, 10, 40][this.rng.below(4)] ?? 10;
      this.trace(`${dev.name} writeback_percent ${dev.settings.writebackPercent}`);
    } else {
      dev.settings.sequentialCutoff = this.rng.bool() ? 0 : 128 * 1024;
      this.trace(`${dev.name} sequential_cutoff ${dev.settings.sequentialCutoff}`);
    }
    dev.attachment?.writeback.wake();
  }

  /**
   * Detach an attached device, or attach a detached one again, while a batch
   * of client operations runs. A detach must end within the liveness bound
   * with all its dirty data written back: the device then serves from the
   * backing device alone, so reading back everything written to it checks
   * that nothing dirty was left behind. Its uuid slot must be invalidated
   * (never handed out again: the dead inode's keys may still be in the
   * index). An attach takes a fresh slot; the device starts cold.
   */
  async detachOrAttach(): Promise<void> {
    const e = this.live();
    // Device 0 (writeback) half the time: its detaches are the ones with dirty data to write back.
    const dev = this.rng.bool() ? 0 : this.rng.below(e.bdevs.length);
    const cd = e.registry.devices.find((d) => d.backing === e.backingDevs[dev]);
    if (!cd) throw new Error(`sim: no bcache device for device ${dev}`);
    const att = cd.attachment;
    if (att) {
      this.stats.detaches++;
      const { cs, inode } = att;
      this.trace(`detach ${cd.name} (dirty ${cd.dirtySectors})`);
      const detached = cd.detach();
      detached.catch(() => undefined);
      await this.clientBatch();
      await this.within(detached, LIVENESS_MS, `detach of ${cd.name}`);
      this.detached.add(dev);
      this.trace(`detach ${cd.name} done`);
      if (cd.attachment !== undefined) throw new Violation(`detach: ${cd.name} is still attached after its detach`);
      if (cd.state !== BDEV_STATE_NONE)
        throw new Violation(`detach: ${cd.name}'s superblock says ${cd.stateName} after its detach, not "no cache"`);
      if (cs.uuids.get(inode).uuid.equals(cd.sb.uuid))
        throw new Violation(`detach: ${cd.name}'s uuid slot ${inode} still names it after its detach`);
      await this.verifyDevice(dev);
    } else {
      this.stats.attaches++;
      await this.attach(dev, true);
    }
    this.check();
  }

  /** Attach device `dev` (detached) to the cache set again, in its cache mode; `busy`: while a client batch runs. */
  private async attach(dev: number, busy: boolean): Promise<void> {
    const e = this.live();
    const cd = e.registry.devices.find((d) => d.backing === e.backingDevs[dev]);
    const set = e.sets[this.setOf[dev] ?? 0];
    if (!cd || !set) throw new Error(`sim: no bcache device ${dev} or no cache set`);
    this.trace(`attach ${cd.name}`);
    const attached = e.registry.attach(cd, set.uuid);
    attached.catch(() => undefined);
    if (busy) await this.clientBatch();
    await this.within(attached, LIVENESS_MS, `attach of ${cd.name}`);
    this.detached.delete(dev);
    const mode = this.modes[dev] ?? CACHE_MODE_WRITETHROUGH;
    await this.within(cd.setCacheMode(mode), LIVENESS_MS, `${cd.name}: cache mode`);
    this.trace(`attach ${cd.name} done: slot ${cd.attachment?.inode}, ${CACHE_MODE_NAMES[mode] ?? mode}`);
  }

  /**
   * A fault episode: from now on, operations on the cache device or on one
   * backing device fail (EIO) with a probability from the seed (sometimes
   * reads only, sometimes everything: the device pulled), while batches of
   * client operations and idle time run. Then a power cut, and the devices
   * come back without faults (a transient fault, or the disk replaced by an
   * image of itself).
   *
   * What clients may see (docs/failure-handling.md): a cache failure never
   * shows on a device that cannot hold dirty data (here: writethrough and
   * writearound): clean hits that fail are read again from the backing
   * device, and when the errors retire the set such a device is kept serving
   * without the cache, its requests caught by the failure redone there. A
   * writeback device may fail requests (a dirty hit unreadable, a write
   * whose cache write failed; when the set retires with dirty data, the
   * device stops and everything fails). A backing failure fails that
   * device's requests only, and past io_error_limit errors, or failing for
   * the offline time, stops it; the set and the other devices serve on.
   * Every failed write may or may not have landed (model.ts). Lifecycle:
   * a retire ends within its bound, leaves no worker of the set alive, no
   * I/O in flight on the cache device and none after (it is fenced); a
   * device stopped by the failure likewise for its backing device.
   */
  async faultEpisode(): Promise<void> {
    const e = this.live();
    this.stats.faultEpisodes++;
    const rate = [0.02, 0.1, 0.3, 1][this.rng.below(4)] ?? 1;
    const kinds = this.rng.bool() ? ['read'] : ['read', 'write', 'flush', 'discard', 'zero'];
    const onCache = this.rng.bool();
    // The failing cache's set, or the failing backing device (-1: none) and its set.
    const target = onCache ? -1 : this.rng.below(e.bdevs.length);
    const k = !onCache ? (this.setOf[target] ?? 0) : e.caches.length > 1 ? this.rng.below(e.caches.length) : 0;
    const set = e.sets[k];
    const faulty = onCache ? e.caches[k] : e.backingDevs[target];
    if (!set || !faulty) throw new Error('sim: no device to fail');
    const devs = e.bdevs.map((_, i) => e.registry.devices.find((d) => d.backing === e.backingDevs[i]));
    for (const [i, cd] of devs.entries()) {
      // A writeback device of the failing set may fail on a cache failure; a backing failure fails only its own device.
      const onSet = cd?.attachment !== undefined && cd.attachment.set === set;
      if (onCache ? onSet && this.modes[i] === CACHE_MODE_WRITEBACK : target === i) this.errorsAllowed.add(i);
    }
    this.trace(`fault episode: ${faulty.name} ${rate} ${kinds.join('/')}`);
    faulty.injectFaults(rate, kinds);
    const steps = 3 + this.rng.below(6);
    for (let k = 0; k < steps; k++) {
      if (this.rng.below(3) === 0) await this.idle();
      else await this.clientBatch();
    }
    // A pulled backing device: past the offline time (and a probe period) its device must have stopped.
    const pulled = !onCache && rate >= 1 && kinds.length > 1;
    if (pulled) {
      const offlineWait = BACKING_OFFLINE_MS + 2000;
      await this.clock.advance(offlineWait);
      // The first failed I/O may have come late, from background work during
      // that wait (seed 2361: writeback, 3.4 s before the check): the device
      // is owed the whole wait from then.
      const first = faulty.firstInjectedAt;
      const owed = first === undefined ? 0 : first + offlineWait - this.clock.now();
      if (owed > 0) await this.clock.advance(owed);
    }
    // The failure's consequences, each bounded, each leaving nothing behind.
    if (set.retired) {
      this.stats.retires++;
      this.trace(`cache set retiring`);
      await this.within(set.retired, STOP_BOUND_MS, 'the retire of the failed cache set');
      const live = set.cs.workers.live().map((w) => w.name);
      if (live.length > 0) throw new Violation(`lifecycle: worker(s) of the retired set alive: ${live.join(', ')}`);
      const cache = e.caches[k];
      const inflight = cache ? [...cache.inflight.values()] : [];
      if (inflight.length > 0)
        throw new Violation(`lifecycle: cache I/O in flight after the retire: ${inflight.join(', ')}`);
      cache?.fence('the cache set retired');
      if (e.registry.sets.has(set.uuid)) throw new Violation('lifecycle: the retired set is still registered');
    } else if (onCache && faulty.injected > 0 && rate >= 1 && kinds.length > 1) {
      // Every cache I/O failing and yet the set alive: metadata writes fail at once, so only an idle set is.
      this.trace('cache pulled; the set did not notice (no I/O reached it)');
    }
    const since = faulty.firstInjectedAt;
    // The other sets serve on, whatever failed.
    for (const other of e.sets) {
      if (other !== set && (other.retired !== undefined || other.cs.ioDisabled))
        throw new Violation(`failure: cache set ${other.uuid} failed with another set's or a backing device's fault`);
    }
    const pulledCd = devs[target];
    if (pulled && since !== undefined && pulledCd && !pulledCd.stopped) {
      throw new Violation(
        `failure: ${pulledCd.name}'s backing device failed every I/O for ${this.clock.now() - since} ms ` +
          `(offline time ${BACKING_OFFLINE_MS} ms) and it still runs`,
      );
    }
    const kept: number[] = [];
    for (const [i, cd] of devs.entries()) {
      if (!cd) continue;
      if (cd.stopped) {
        this.stats.deviceStops++;
        this.trace(`${cd.name} stopped by the failure`);
        if (!this.errorsAllowed.has(i))
          throw new Violation(`failure: ${cd.name} (device ${i}) stopped, but it could not lose data to this fault`);
        await this.within(cd.stop(), STOP_BOUND_MS, `the stop of ${cd.name}`);
        const b = e.backingDevs[i];
        const inflight = b ? [...b.inflight.values()] : [];
        if (inflight.length > 0)
          throw new Violation(
            `lifecycle: I/O in flight on ${cd.name}'s backing device after its stop: ${inflight.join(', ')}`,
          );
        b?.fence(`${cd.name} stopped`);
      } else if (set.retired && this.setOf[i] === k) {
        // Kept without its cache: the superblock says so, and bring-up will find it detached.
        if (cd.attachment !== undefined)
          throw new Violation(`failure: ${cd.name} is still attached to the retired set`);
        if (!this.detached.has(i)) kept.push(i);
        this.detached.add(i);
      }
    }
    this.check();
    this.trace(`fault episode over: ${faulty.injected} injected error(s)`);
    this.errorsAllowed.clear();
    await this.powerCut();
    // The devices the failure left uncached are attached again (a user would), so that they are cached in later steps.
    for (const dev of kept) await this.attach(dev, false);
    this.check();
  }

  /** Let time pass with no client: writeback, rate updates and journal deadlines run. */
  async idle(): Promise<void> {
    this.stats.idle++;
    const ms = this.rng.below(10_000);
    this.trace(`idle ${ms}`);
    await this.clock.advance(ms);
    this.check();
  }

  /** Read back everything ever written to `dev`, with nothing in flight: each sector as the model says. */
  async verifyDevice(dev: number): Promise<void> {
    const bdev = this.live().bdevs[dev];
    if (!bdev) throw new Error(`sim: no device ${dev}`);
    const sectors = this.model.written(dev);
    let i = 0;
    while (i < sectors.length) {
      const first = sectors[i] ?? 0;
      let count = 1;
      while (count < 256 && sectors[i + count] === first + count) count++;
      await this.within(this.read(dev, bdev, first, count), LIVENESS_MS, `verifying device ${dev}`);
      i += count;
    }
    this.check();
  }

  /** Read back everything ever written, on every device. */
  async verifyAll(): Promise<void> {
    for (let dev = 0; dev < this.live().bdevs.length; dev++) await this.verifyDevice(dev);
  }

  /** Everything the engine does after all steps: a final read-back, a clean stop, nothing left. */
  async finish(): Promise<void> {
    await this.verifyAll();
    await this.stop('clean, at the end');
    for (const d of [...this.caches, ...this.backings]) {
      if (d.volatileWrites > 0) {
        throw new Violation(`lifecycle: a clean stop left ${d.volatileWrites} unflushed write(s) on ${d.name}`);
      }
    }
  }

  /** Stop whatever is left without checks (after a violation), so the next run in this process starts clean. */
  async abandon(): Promise<void> {
    const e = this.engine;
    this.engine = undefined;
    if (!e) return;
    const stopped = e.registry.stopAll();
    stopped.catch(() => undefined);
    await this.clock.runUntil(stopped, STOP_BOUND_MS);
    await this.clock.advance(10 * 60_000);
  }
}

/** Run one seed. Never throws for a violation: the verdict says it. */
export async function runSim(options: SimOptions): Promise<SimResult> {
  const workload = options.workload ?? 'mixed';
  const ops = options.ops ?? (workload === 'mixed' ? 300 : 4);
  const run = new Run(options.seed, options.keepTrace === true, workload, options.sets);
  run.expensiveChecks = options.expensiveChecks === true;
  // The engine's log lines are part of the trace (and of the digest), not of the output.
  const restore = setLogSink((level, line) => {
    run.trace(`log ${level}: ${line}`);
  });
  // A promise of the engine that rejects with no one waiting for it would end
  // a real daemon (Node's default); here it fails the seed instead of the
  // whole soak. Within one process the microtask order, and so this, is
  // deterministic.
  const unhandled = (reason: unknown): void => {
    run.violation(
      `lifecycle: a promise rejected with no one waiting for it (it would end the daemon): ${errorMessage(reason)}`,
    );
  };
  process.on('unhandledRejection', unhandled);
  let verdict = 'ok';
  try {
    await run.format();
    await run.bringUp();
    for (let round = 0; workload === 'fill' && round < ops; round++) await run.fillRound(round);
    for (let round = 0; workload === 'soak' && round < ops; round++) await run.soakRound(round);
    for (let step = 0; workload === 'mixed' && step < ops; step++) {
      const r = run.rng.below(1000);
      if (r < 800) await run.clientBatch();
      else if (r < 880) await run.idle();
      else if (r < 940) await run.control();
      else if (r < 955 && options.powerCuts !== false) await run.powerCut();
      else if (r < 965) await run.restart();
      else if (r < 980) await run.detachOrAttach();
      else if (r < 990 && options.faults !== false) await run.faultEpisode();
      else await run.flushAll();
      await run.probe();
      if (run.expensiveChecks) await run.verifyTrees();
    }
    await run.finish();
  } catch (err) {
    verdict =
      err instanceof Violation
        ? err.message
        : `crash: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}`;
    run.trace(`verdict ${verdict}`);
    await run.abandon().catch(() => undefined);
  } finally {
    restore();
    process.off('unhandledRejection', unhandled);
  }
  const result: SimResult = {
    seed: options.seed,
    ops,
    digest: run.digest(),
    ok: verdict === 'ok',
    verdict,
    simMs: run.clock.now(),
    events: run.events,
    stats: run.stats,
  };
  const trace = run.traceLines;
  if (trace) result.trace = trace;
  return result;
}
