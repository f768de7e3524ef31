// /metrics in the Prometheus text exposition format (version 0.0.4): the I/O engine, the
// cache counters of every bcache device and cache set, the size of every
// flash-only volume and the data it holds, dirty data, the
// writeback rate and its controller, cache availability, and the NBD request
// counts and latency histograms per export and command. The values come from
// stats.ts's snapshot, which /api/stats (the dashboard) serves as JSON.

import type { Registry } from '../bcache/registry.ts';
import type { Export } from '../nbd/exports.ts';
import { collectStats, type CounterStats, type StatsSnapshot } from './stats.ts';

type Labels = Record<string, string>;

function labelText(labels: Labels): string {
  const parts = Object.entries(labels).map(
    ([k, v]) => `${k}="${v.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\n/g, '\\n')}"`,
  );
  return parts.length === 0 ? '' : `{${parts.join(',')}}`;
}

class Family {
  private readonly lines: string[] = [];
  readonly name: string;
  private readonly help: string;
  private readonly type: 'counter' | 'gauge' | 'histogram';

  constructor(name: string, type: Family['type'], help: string) {
    this.name = name;
    this.type = type;
    this.help = help;
  }

  add(labels: Labels, value: number, suffix = ''): void {
    this.lines.push(`${this.name}${suffix}${labelText(labels)} ${Number.isFinite(value) ? value : 0}`);
  }

  text(): string {
    return `# HELP ${this.name} ${this.help}\n# TYPE ${this.name} ${this.type}\n${this.lines.map((l) => `${l}\n`).join('')}`;
  }
}

export function renderMetrics(registry: Registry, exports: readonly Export[]): string {
  return formatMetrics(collectStats(registry, exports));
}

/** A snapshot in the Prometheus text format. */
export function formatMetrics(snap: StatsSnapshot): string {
  const f = (name: string, type: Family['type'], help: string): Family => new Family(`ubcache_${name}`, type, help);
  const hits = f(
    'cache_hits_total',
    'counter',
    'Read requests served entirely from the cache (stats_total/cache_hits).',
  );
  const misses = f(
    'cache_misses_total',
    'counter',
    'Read requests not entirely in the cache (stats_total/cache_misses).',
  );
  const bypassHits = f('cache_bypass_hits_total', 'counter', 'Bypassed read requests found in the cache.');
  const bypassMisses = f('cache_bypass_misses_total', 'counter', 'Bypassed read requests not in the cache.');
  const collisions = f('cache_miss_collisions_total', 'counter', 'Miss fills dropped because a write raced them.');
  const readaheads = f(
    'cache_readaheads_total',
    'counter',
    'Read misses rounded up by readahead (cache_readaheads of kernels before 5.13).',
  );
  const bypassed = f('bypassed_bytes_total', 'counter', 'Bytes of requests that skipped the cache.');
  const dirty = f('dirty_bytes', 'gauge', 'Dirty data of the device in the cache (dirty_data).');
  const rate = f('writeback_rate_bytes_per_second', 'gauge', 'Current writeback rate (writeback_rate).');
  const wbTarget = f(
    'writeback_target_bytes',
    'gauge',
    'Dirty data the writeback rate controller aims at (writeback_rate_debug target).',
  );
  const wbProportional = f(
    'writeback_rate_proportional_bytes_per_second',
    'gauge',
    "The controller's proportional term (writeback_rate_debug proportional); 0 while writeback does not run.",
  );
  const wbIntegral = f(
    'writeback_rate_integral_bytes_per_second',
    'gauge',
    "The controller's integral term, scaled (writeback_rate_debug integral); 0 while writeback does not run.",
  );
  const volumeSize = f('flash_volume_size_bytes', 'gauge', 'Size of a flash-only volume (its size attribute).');
  const volumeData = f(
    'flash_volume_data_bytes',
    'gauge',
    "Data a flash-only volume holds in the cache, all dirty (part of the set's dirty_data).",
  );
  const running = f('device_running', 'gauge', '1 if the bcache device runs (is exported).');
  const available = f('cache_available_percent', 'gauge', 'Share of cache buckets not holding dirty data or metadata.');
  const ioDisabled = f('cache_set_io_disabled', 'gauge', '1 once the cache set disabled I/O after a fatal error.');
  const cacheRead = f('cache_read_bytes_total', 'counter', 'Bytes read from the cache device.');
  const cacheWritten = f('cache_written_bytes_total', 'counter', 'Data bytes written to the cache device.');
  const cacheIoErrors = f(
    'cache_io_errors_total',
    'counter',
    'I/O errors of the cache device while its I/O was enabled (fatal metadata errors included).',
  );
  const cacheIoErrorsDecayed = f(
    'cache_io_errors',
    'gauge',
    'The decayed cache device error count that io_error_limit is compared with (cache0/io_errors).',
  );
  const backingIoErrors = f(
    'backing_io_errors_total',
    'counter',
    'I/O errors of the backing device (io_errors); io_disable at io_error_limit.',
  );
  const deviceIoDisabled = f('device_io_disabled', 'gauge', '1 once the backing device disabled I/O (io_disable).');
  const backingReconnects = f(
    'backing_reconnects_total',
    'counter',
    'Outages of a remote backing device survived by reconnecting (NBD).',
  );
  const backingOutage = f(
    'backing_outage_seconds_total',
    'counter',
    'Time a remote backing device spent unreachable (reconnecting, or failed past its outage timeout).',
  );
  const backingOnline = f(
    'backing_connected',
    'gauge',
    '1 while a remote backing device is connected and serving, 0 during an outage or once it failed.',
  );
  const setsFailed = f(
    'cache_sets_failed_total',
    'counter',
    'Cache sets retired after a fatal error since start (a retired set leaves the other set metrics).',
  );
  setsFailed.add({}, snap.setsFailed);
  const gcRuns = f('gc_runs_total', 'counter', 'Garbage collection passes over the btree.');
  const gcSeconds = f(
    'gc_duration_seconds_total',
    'counter',
    'Time spent in GC passes, start to end (requests run between slices).',
  );
  const gcLast = f('gc_last_duration_seconds', 'gauge', 'Duration of the last GC pass.');
  const gcPause = f(
    'gc_pause_seconds_max',
    'gauge',
    'The longest stretch a GC pass held the event loop (one slice of its walk), over all passes.',
  );
  const ramHits = f('ram_cache_hits_total', 'counter', 'Cache hits served from the copies of hot blocks in memory.');
  const ramMisses = f(
    'ram_cache_misses_total',
    'counter',
    'Cache hits the copies in memory did not hold, read from the cache device.',
  );
  const ramBytes = f('ram_cache_bytes', 'gauge', 'Memory allocated for copies of hot blocks (ram_cache_size at most).');
  const wbDone = f('writeback_keys_done_total', 'counter', 'Dirty extents written back.');
  const wbFailed = f('writeback_keys_failed_total', 'counter', 'Writebacks that collided with a write or failed.');

  const counters = (labels: Labels, c: CounterStats): void => {
    hits.add(labels, c.hits);
    misses.add(labels, c.misses);
    bypassHits.add(labels, c.bypassHits);
    bypassMisses.add(labels, c.bypassMisses);
    collisions.add(labels, c.missCollisions);
    readaheads.add(labels, c.readaheads);
    bypassed.add(labels, c.bypassedBytes);
  };
  for (const d of snap.devices) {
    const labels = { device: d.name };
    counters(labels, d.counters);
    dirty.add(labels, d.dirtyBytes);
    rate.add(labels, d.writeback.rate);
    wbTarget.add(labels, d.writeback.target);
    wbProportional.add(labels, d.writeback.proportional);
    wbIntegral.add(labels, d.writeback.integral);
    running.add(labels, d.running ? 1 : 0);
    backingIoErrors.add(labels, d.ioErrors);
    deviceIoDisabled.add(labels, d.ioDisabled ? 1 : 0);
    if (d.remote) {
      backingReconnects.add(labels, d.remote.reconnects);
      backingOutage.add(labels, d.remote.outageSeconds);
      backingOnline.add(labels, d.remote.connected ? 1 : 0);
    }
  }
  for (const v of snap.volumes) {
    const labels = { device: v.name, set: v.set };
    volumeSize.add(labels, v.sizeBytes);
    volumeData.add(labels, v.dataBytes);
  }
  for (const s of snap.sets) {
    const labels = { set: s.uuid };
    counters(labels, s.counters);
    available.add(labels, s.availablePercent);
    ioDisabled.add(labels, s.ioDisabled ? 1 : 0);
    cacheRead.add(labels, s.cacheReadBytes);
    cacheWritten.add(labels, s.cacheWrittenBytes);
    cacheIoErrors.add(labels, s.ioErrorsTotal);
    cacheIoErrorsDecayed.add(labels, s.ioErrors);
    gcRuns.add(labels, s.gc.runs);
    gcSeconds.add(labels, s.gc.seconds);
    gcLast.add(labels, s.gc.lastSeconds);
    gcPause.add(labels, s.gc.maxPauseSeconds);
    wbDone.add(labels, s.writebackKeys.done);
    wbFailed.add(labels, s.writebackKeys.failed);
    ramHits.add(labels, s.ramCache.hits);
    ramMisses.add(labels, s.ramCache.misses);
    ramBytes.add(labels, s.ramCache.bytes);
  }

  const requests = f('nbd_requests_total', 'counter', 'NBD requests served, by export and command.');
  const errors = f('nbd_request_errors_total', 'counter', 'NBD requests answered with an error.');
  const bytes = f('nbd_request_bytes_total', 'counter', 'Bytes named by NBD requests (length field).');
  const latency = f('nbd_request_duration_seconds', 'histogram', 'Time from dispatch to reply of NBD requests.');
  for (const e of snap.exports) {
    for (const c of e.commands) {
      const labels = { export: e.name, command: c.command };
      requests.add(labels, c.requests);
      errors.add(labels, c.errors);
      bytes.add(labels, c.bytes);
      let cumulative = 0;
      snap.latencyBucketsSeconds.forEach((le, i) => {
        cumulative += c.buckets[i] ?? 0;
        latency.add({ ...labels, le: String(le) }, cumulative, '_bucket');
      });
      latency.add({ ...labels, le: '+Inf' }, c.requests, '_bucket');
      latency.add(labels, c.seconds, '_sum');
      latency.add(labels, c.requests, '_count');
    }
  }
  const engine = f(
    'io_engine',
    'gauge',
    'The I/O engine of the file devices: 1 for the one in use (io_uring or threadpool).',
  );
  if (snap.engine !== null) {
    for (const name of ['io_uring', 'threadpool'] as const) engine.add({ engine: name }, name === snap.engine ? 1 : 0);
  }
  return [
    engine,
    hits,
    misses,
    bypassHits,
    bypassMisses,
    collisions,
    readaheads,
    bypassed,
    dirty,
    rate,
    wbTarget,
    wbProportional,
    wbIntegral,
    running,
    volumeSize,
    volumeData,
    available,
    ioDisabled,
    cacheRead,
    cacheWritten,
    cacheIoErrors,
    cacheIoErrorsDecayed,
    setsFailed,
    backingIoErrors,
    deviceIoDisabled,
    backingReconnects,
    backingOutage,
    backingOnline,
    gcRuns,
    gcSeconds,
    gcLast,
    gcPause,
    wbDone,
    wbFailed,
    ramHits,
    ramMisses,
    ramBytes,
    requests,
    errors,
    bytes,
    latency,
  ]
    .map((x) => x.text())
    .join('');
}
