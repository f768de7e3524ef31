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
    return {
      averageFrequencySec: this.averageFrequencyIn('sec'),
      averageDurationMs: this.averageDurationIn('ms'),
      maxDurationMs: Math.floor(this.maxDurationNs / NS_PER.ms),
      lastSec: this.lastIn('sec', nowNs),
    };
  }

  /**
   * sysfs_print_time_stats(stats, NAME, FREQ, DUR): the four files
   * NAME_average_frequency_FREQ, NAME_average_duration_DUR,
   * NAME_max_duration_DUR and NAME_last_FREQ (-1 before the first run), in
   * the kernel's order, values without their newline.
   */
  files(name: string, freq: TimeUnit, dur: TimeUnit, nowNs: number): Array<[string, string]> {
    return [
      [`${name}_average_frequency_${freq}`, String(this.averageFrequencyIn(freq))],
      [`${name}_average_duration_${dur}`, String(this.averageDurationIn(dur))],
      [`${name}_max_duration_${dur}`, String(Math.floor(this.maxDurationNs / NS_PER[dur]))],
      [`${name}_last_${freq}`, String(this.lastIn(freq, nowNs))],
    ];
  }

  private averageFrequencyIn(unit: TimeUnit): number {
    return Math.floor(Math.floor(this.averageFrequency / 2 ** EWMA_FACTOR) / NS_PER[unit]);
  }

  private averageDurationIn(unit: TimeUnit): number {
    return Math.floor(Math.floor(this.averageDuration / 2 ** EWMA_FACTOR) / NS_PER[unit]);
  }

  private lastIn(unit: TimeUnit, nowNs: number): number {
    return this.lastNs === 0 ? -1 : Math.floor((nowNs - this.lastNs) / NS_PER[unit]);
  }
}

/** The units of sysfs_print_time_stats (NSEC_PER_sec, _ms, _us). */
export type TimeUnit = 'sec' | 'ms' | 'us';
const NS_PER: Record<TimeUnit, number> = { sec: 1e9, ms: 1e6, us: 1e3 };

/** Monotonic nanoseconds (the kernel's local_clock()). */
export function monotonicNs(): number {
  return Number(process.hrtime.bigint());
}
