// Cache accounting with bcache's names (stats.c, sysfs §3.6): per bcache
// device and per cache set, counted as the kernel counts them.
//
// - Hits and misses are per *read request*: a request all of whose sectors
//   were in the cache is a hit, anything else (a partial hit included) a miss.
//   A bypassed read (sequential, detaching, ...) is still looked up and
//   counts as a bypass hit or a bypass miss instead. Writes count in neither.
// - cache_miss_collisions: a miss fill dropped because a write (or discard)
//   overlapped it before it reached the index.
// - bypassed: sectors of requests (reads and writes) that skipped the cache.
//
// Every mark goes to `total` and to a collector of increments since the last
// collect(): issue 5's decaying five_minute/hour/day views fold collectors
// every 300 s / 22 as the kernel does (scale_accounting), with no change here.

export interface CacheCounters {
  cacheHits: number;
  cacheMisses: number;
  cacheBypassHits: number;
  cacheBypassMisses: number;
  cacheMissCollisions: number;
  /** Misses rounded up by readahead (cache_readaheads of kernels before 5.13; /metrics only). */
  cacheReadaheads: number;
  /** Sectors (reads and writes) that skipped the cache. */
  sectorsBypassed: number;
}

export function zeroCounters(): CacheCounters {
  return {
    cacheHits: 0,
    cacheMisses: 0,
    cacheBypassHits: 0,
    cacheBypassMisses: 0,
    cacheMissCollisions: 0,
    cacheReadaheads: 0,
    sectorsBypassed: 0,
  };
}

/** cache_hit_ratio: hits * 100 / (hits + misses), integer, 0 with no reads. */
export function hitRatio(c: Pick<CacheCounters, 'cacheHits' | 'cacheMisses'>): number {
  const n = c.cacheHits + c.cacheMisses;
  return n === 0 ? 0 : Math.floor((c.cacheHits * 100) / n);
}

export class CacheAccounting {
  readonly total: CacheCounters = zeroCounters();
  private pending: CacheCounters = zeroCounters();

  /** bch_mark_cache_accounting(): one read request. */
  markRead(hit: boolean, bypass: boolean): void {
    if (bypass) {
      if (hit) {
        this.total.cacheBypassHits++;
        this.pending.cacheBypassHits++;
      } else {
        this.total.cacheBypassMisses++;
        this.pending.cacheBypassMisses++;
      }
    } else if (hit) {
      this.total.cacheHits++;
      this.pending.cacheHits++;
    } else {
      this.total.cacheMisses++;
      this.pending.cacheMisses++;
    }
  }

  /** bch_mark_cache_miss_collision() */
  markCollision(): void {
    this.total.cacheMissCollisions++;
    this.pending.cacheMissCollisions++;
  }

  /** bch_mark_cache_readahead() (kernels before 5.13) */
  markReadahead(): void {
    this.total.cacheReadaheads++;
    this.pending.cacheReadaheads++;
  }

  /** bch_mark_sectors_bypassed() */
  markBypassed(sectors: number): void {
    this.total.sectorsBypassed += sectors;
    this.pending.sectorsBypassed += sectors;
  }

  /** The increments since the last collect() (for the decaying views). */
  collect(): CacheCounters {
    const c = this.pending;
    this.pending = zeroCounters();
    return c;
  }

  /** clear_stats: only the total is reset, as in the kernel. */
  clear(): void {
    Object.assign(this.total, zeroCounters());
  }
}

/**
 * The stats_* directory files of one accounting set, as sysfs shows them
 * (values without the trailing newline).
 */
export function statsFiles(c: CacheCounters): Record<string, string> {
  return {
    cache_hits: String(c.cacheHits),
    cache_misses: String(c.cacheMisses),
    cache_bypass_hits: String(c.cacheBypassHits),
    cache_bypass_misses: String(c.cacheBypassMisses),
    cache_hit_ratio: String(hitRatio(c)),
    cache_miss_collisions: String(c.cacheMissCollisions),
    bypassed: hprint(c.sectorsBypassed * 512),
  };
}

/**
 * bch_hprint(): a size in bytes as sysfs prints it: divided by 1024 at least
 * once and while the quotient is 1000 or more, one decimal from the last
 * remainder (truncated), and the unit. 0 -> "0.0k", 512 -> "0.5k",
 * 4 MiB -> "4.0M", 1024000 -> "0.9M".
 */
export function hprint(value: number): string {
  const units = '?kMGTPEZY';
  const neg = value < 0;
  let q = BigInt(Math.trunc(Math.abs(value)));
  let u = 0;
  let t: bigint;
  do {
    u++;
    t = q & 1023n;
    q >>= 10n;
  } while (q >= 1000n);
  return `${neg ? '-' : ''}${q}.${(t * 10n) / 1024n}${units[u] ?? '?'}`;
}
