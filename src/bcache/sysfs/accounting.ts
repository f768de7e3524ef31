// The decaying stats_five_minute/, stats_hour/ and stats_day/ views
// (stats.c). Every 300 s / 22 (about 13.6 s) the increments collected since
// the last tick are added, scaled by 2^16 to keep fractions, to each view;
// then a view is multiplied by 31/32 on every tick (five_minute), every 12th
// (hour) or every 288th (day), which gives half-lives of about five minutes,
// an hour and a day. A view shows its values shifted back down by 16 bits.
//
// stats_total/ is CacheAccounting's own total, counted as requests happen
// (the kernel folds it in on the tick too; we show it at once, which only
// makes it more current).

import type { CacheAccounting, CacheCounters } from '../stats.ts';
import { hprint, zeroCounters } from '../stats.ts';

export const ACCOUNTING_INTERVAL_MS = (300 * 1000) / 22;
const FIELDS = [
  'cacheHits',
  'cacheMisses',
  'cacheBypassHits',
  'cacheBypassMisses',
  'cacheMissCollisions',
  'sectorsBypassed',
] as const satisfies ReadonlyArray<keyof CacheCounters>;

class DecayingView {
  private readonly rescaleAt: number;
  private rescale = 0;
  /** Values << 16. */
  readonly scaled: CacheCounters = zeroCounters();

  constructor(rescaleAt: number) {
    this.rescaleAt = rescaleAt;
  }

  tick(added: CacheCounters): void {
    for (const f of FIELDS) this.scaled[f] += added[f] * 65536;
    if (++this.rescale === this.rescaleAt) {
      this.rescale = 0;
      // ewma_add(x, 0, 32, 0): x * 31 / 32, truncated.
      for (const f of FIELDS) this.scaled[f] = Math.floor((this.scaled[f] * 31) / 32);
    }
  }

  /** The stats_* files as the kernel shows them (without newlines). */
  files(): Record<string, string> {
    const v = (f: keyof CacheCounters): number => Math.floor(this.scaled[f] / 65536);
    const hits = this.scaled.cacheHits;
    const misses = this.scaled.cacheMisses;
    return {
      cache_hits: String(v('cacheHits')),
      cache_misses: String(v('cacheMisses')),
      cache_bypass_hits: String(v('cacheBypassHits')),
      cache_bypass_misses: String(v('cacheBypassMisses')),
      // From the scaled values, as DIV_SAFE(var(hits) * 100, var(hits) + var(misses)) is.
      cache_hit_ratio: String(hits + misses === 0 ? 0 : Math.floor((hits * 100) / (hits + misses))),
      cache_miss_collisions: String(v('cacheMissCollisions')),
      bypassed: hprint(v('sectorsBypassed') * 512),
    };
  }
}

/** The three decaying views of one CacheAccounting. */
export class DecayingStats {
  readonly fiveMinute = new DecayingView(1);
  readonly hour = new DecayingView(12);
  readonly day = new DecayingView(288);

  tick(added: CacheCounters): void {
    this.fiveMinute.tick(added);
    this.hour.tick(added);
    this.day.tick(added);
  }
}

/** Decaying views by accounting object; an object that goes away takes its views with it. */
export class AccountingViews {
  private readonly views = new WeakMap<CacheAccounting, DecayingStats>();

  of(acc: CacheAccounting): DecayingStats {
    let v = this.views.get(acc);
    if (!v) {
      v = new DecayingStats();
      this.views.set(acc, v);
    }
    return v;
  }

  /** scale_accounting(): fold each accounting's increments since the last tick into its views. */
  tick(accountings: Iterable<CacheAccounting>): void {
    for (const acc of accountings) this.of(acc).tick(acc.collect());
  }
}
