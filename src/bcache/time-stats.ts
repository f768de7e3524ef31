// bch_time_stats (util.c): how long an activity takes and how often it
// runs, as the kernel keeps them for GC and btree splits and prints them in
// the set's internal/ directory (btree_gc_average_duration_ms,
// btree_gc_average_frequency_sec, btree_gc_max_duration_ms, btree_gc_last_sec).
//
// The averages are the kernel's ewma_add(avg, value, 8, 8): a weight of 1/8
// for each new value, kept with 8 fractional bits, so the printed numbers
// round the way the kernel's do.

const EWMA_WEIGHT = 8;
const EWMA_FACTOR = 8;

function ewmaAdd(avg: number, value: number): number {
  return Math.floor((avg * (EWMA_WEIGHT - 1) + value * 2 ** EWMA_FACTOR) / EWMA_WEIGHT);
}

export class TimeStats {
  /** Averages in nanoseconds << 8, as the kernel stores them. */
  private averageDuration = 0;
  private averageFrequency = 0;
  private maxDurationNs = 0;
  /** Monotonic time (ns) of the last completion; 0: never. */
  private lastNs = 0;
  count = 0;
  /** The newest duration and the sum of all (ns), for /metrics. */
  lastDurationNs = 0;
  totalNs = 0;

  /** One run of the activity, from `startNs` to `endNs` (monotonic ns). */
  update(startNs: number, endNs: number): void {
    if (endNs <= startNs) return;
    const duration = endNs - startNs;
    this.maxDurationNs = Math.max(this.maxDurationNs, duration);
    if (this.lastNs !== 0) {
      this.averageDuration = ewmaAdd(this.averageDuration, duration);
      if (endNs > this.lastNs) this.averageFrequency = ewmaAdd(this.averageFrequency, endNs - this.lastNs);
    } else {
      this.averageDuration = duration * 2 ** EWMA_FACTOR;
    }
    this.lastNs = endNs;
    this.lastDurationNs = duration;
    this.totalNs += duration;
    this.count++;
  }

  /** The four sysfs values, in the kernel's units: frequency and last in seconds, durations in ms. */
  view(nowNs: number): {
    averageFrequencySec: number;
    averageDurationMs: number;
    maxDurationMs: number;
    lastSec: number;
  } {
    const scale = 2 ** EWMA_FACTOR;
    return {
      averageFrequencySec: Math.floor(Math.floor(this.averageFrequency / scale) / 1e9),
      averageDurationMs: Math.floor(Math.floor(this.averageDuration / scale) / 1e6),
      maxDurationMs: Math.floor(this.maxDurationNs / 1e6),
      lastSec: this.lastNs === 0 ? -1 : Math.floor((nowNs - this.lastNs) / 1e9),
    };
  }
}

/** Monotonic nanoseconds (the kernel's local_clock()). */
export function monotonicNs(): number {
  return Number(process.hrtime.bigint());
}
