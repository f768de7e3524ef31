// One snapshot of everything the daemon reports about itself: the cache
// counters of every bcache device and cache set, the flash-only volumes
// (their size and the data they hold), dirty data and the
// writeback rate controller, cache availability, GC, errors, and the NBD
// request counts and latency histograms per export and command. /metrics
// renders it in Prometheus' text format and /api/stats (the dashboard's
// source) as JSON: both read the engine here, once, in the units they report
// (bytes and seconds, not sectors and nanoseconds).

import type { CachedDev } from '../bcache/cached-dev.ts';
import type { FlashDev } from '../bcache/flash-dev.ts';
import type { Registry, RegisteredSet } from '../bcache/registry.ts';
import { hitRatio, type CacheCounters } from '../bcache/stats.ts';
import { ioEngineStatus, type IoEngineName } from '../blockdev/io-engine.ts';
import type { Export } from '../nbd/exports.ts';
import { LATENCY_BUCKETS_S } from '../nbd/metrics.ts';
import { commandName } from '../nbd/protocol.ts';

/** A stats_total directory (a device's or a set's). */
export interface CounterStats {
  hits: number;
  misses: number;
  bypassHits: number;
  bypassMisses: number;
  missCollisions: number;
  readaheads: number;
  bypassedBytes: number;
  /** cache_hit_ratio: whole percent of reads that hit, 0 with no reads. */
  hitRatio: number;
}

/** The writeback rate controller of one backing device (writeback_rate_debug), bytes and bytes/s. */
export interface WritebackStats {
  /** Attached with writeback_running 1: the terms below are live (0 otherwise, as sysfs shows them). */
  active: boolean;
  rate: number;
  target: number;
  proportional: number;
  integral: number;
  change: number;
}

export interface DeviceStats {
  name: string;
  backing: string;
  /** bcache's state file: clean, dirty, inconsistent or no cache. */
  state: string;
  running: boolean;
  cacheMode: string;
  /** The cache set attached to, if any. */
  set: string | null;
  counters: CounterStats;
  dirtyBytes: number;
  writeback: WritebackStats;
  /** Backing device I/O errors (io_errors). */
  ioErrors: number;
  ioDisabled: boolean;
  /** A remote backing device's connection (NBD), when it is one. */
  remote: { connected: boolean; reconnects: number; outageSeconds: number } | null;
}

/** A flash-only volume (bcache's thin volume on the cache device alone). */
export interface VolumeStats {
  /** bcacheN */
  name: string;
  /** The cache set it lives in, and its uuid slot there (volumeN in the set's directory). */
  set: string;
  slot: number;
  uuid: string;
  /** The label, up to its first NUL. */
  label: string;
  sizeBytes: number;
  /** Data the volume holds in the cache; all of it is dirty (it has no backing device). */
  dataBytes: number;
}

export interface SetStats {
  uuid: string;
  counters: CounterStats;
  availablePercent: number;
  ioDisabled: boolean;
  cacheReadBytes: number;
  cacheWrittenBytes: number;
  /** Cache device errors while its I/O was enabled, never decayed. */
  ioErrorsTotal: number;
  /** The decayed count io_error_limit is compared with (cache0/io_errors). */
  ioErrors: number;
  gc: { runs: number; seconds: number; lastSeconds: number; maxPauseSeconds: number };
  writebackKeys: { done: number; failed: number };
  /** The copies of hot blocks in memory (ram_cache_size): reads served and not, bytes allocated. */
  ramCache: { hits: number; misses: number; bytes: number };
}

export interface CommandStats {
  /** The NBD command, lower case (read, write, flush, ...). */
  command: string;
  requests: number;
  errors: number;
  bytes: number;
  /** Sum of the latencies. */
  seconds: number;
  /** Requests per latency bucket (not cumulative); bounds in StatsSnapshot.latencyBucketsSeconds, the last +Inf. */
  buckets: number[];
}

export interface ExportStats {
  name: string;
  commands: CommandStats[];
}

export interface StatsSnapshot {
  /** When it was taken, ms since the epoch. */
  time: number;
  /** The I/O engine of the file devices; null when a forced engine is unavailable. */
  engine: IoEngineName | null;
  /** Cache sets retired after a fatal error since start. */
  setsFailed: number;
  latencyBucketsSeconds: readonly number[];
  devices: DeviceStats[];
  volumes: VolumeStats[];
  sets: SetStats[];
  exports: ExportStats[];
}

function counterStats(c: CacheCounters): CounterStats {
  return {
    hits: c.cacheHits,
    misses: c.cacheMisses,
    bypassHits: c.cacheBypassHits,
    bypassMisses: c.cacheBypassMisses,
    missCollisions: c.cacheMissCollisions,
    readaheads: c.cacheReadaheads,
    bypassedBytes: c.sectorsBypassed * 512,
    hitRatio: hitRatio(c),
  };
}

function writebackStats(d: CachedDev): WritebackStats {
  const active = d.attachment !== undefined && d.settings.writebackRunning;
  const st = d.writebackRateState;
  const live = (sectors: number): number => (active ? sectors * 512 : 0);
  return {
    active,
    rate: live(d.settings.writebackRate),
    target: st.target * 512,
    proportional: live(st.proportional),
    integral: live(st.integralScaled),
    change: live(st.change),
  };
}

function deviceStats(d: CachedDev): DeviceStats {
  const remote = d.backing.stats?.();
  return {
    name: d.name,
    backing: d.backingName,
    state: d.stateName,
    running: d.running,
    cacheMode: d.cacheModeName,
    set: d.attachment?.cs.uuid ?? null,
    counters: counterStats(d.stats.total),
    dirtyBytes: d.dirtySectors * 512,
    writeback: writebackStats(d),
    ioErrors: d.ioErrors,
    ioDisabled: d.settings.ioDisable,
    remote: remote
      ? { connected: remote.online, reconnects: remote.reconnects, outageSeconds: remote.outageMs / 1000 }
      : null,
  };
}

function volumeStats(v: FlashDev): VolumeStats {
  const nul = v.label.indexOf(0);
  return {
    name: v.name,
    set: v.cs.uuid,
    slot: v.inode,
    uuid: v.uuid,
    label: v.label.subarray(0, nul < 0 ? v.label.length : nul).toString(),
    sizeBytes: v.sectors * 512,
    dataBytes: v.dirtySectors * 512,
  };
}

function setStats(s: RegisteredSet): SetStats {
  const gc = s.cs.gc.stats;
  return {
    uuid: s.uuid,
    counters: counterStats(s.stats.total),
    availablePercent: s.cs.cacheAvailablePercent,
    ioDisabled: s.cs.ioDisabled,
    cacheReadBytes: s.cs.io.stats.sectorsRead * 512,
    cacheWrittenBytes: s.cs.io.stats.sectorsWritten * 512,
    ioErrorsTotal: s.cs.io.errorsTotal,
    ioErrors: s.cs.io.ioErrors,
    gc: {
      runs: gc.runs,
      seconds: gc.time.totalNs / 1e9,
      lastSeconds: gc.time.lastDurationNs / 1e9,
      maxPauseSeconds: gc.maxPauseMs / 1000,
    },
    writebackKeys: { ...s.writebackKeys },
    ramCache: { hits: s.cs.ramCache.stats.hits, misses: s.cs.ramCache.stats.misses, bytes: s.cs.ramCache.allocated },
  };
}

function exportStats(e: Export): ExportStats {
  return {
    name: e.name,
    commands: [...e.metrics.commands].map(([type, c]) => ({
      command: commandName(type).toLowerCase(),
      requests: c.requests,
      errors: c.errors,
      bytes: c.bytes,
      seconds: c.seconds,
      buckets: [...c.buckets],
    })),
  };
}

function engineName(): IoEngineName | null {
  try {
    return ioEngineStatus().name;
  } catch {
    // A forced engine that is unavailable: serve refused to start, so no one asks.
    return null;
  }
}

export function collectStats(registry: Registry, exports: readonly Export[], now: number = Date.now()): StatsSnapshot {
  return {
    time: now,
    engine: engineName(),
    setsFailed: registry.setsFailed,
    latencyBucketsSeconds: LATENCY_BUCKETS_S,
    devices: registry.devices.map(deviceStats),
    volumes: registry.volumes.filter((v) => v.running).map(volumeStats),
    sets: [...registry.sets.values()].map(setStats),
    exports: exports.map(exportStats),
  };
}
