// Request counters and latency histograms per export and command, for
// /metrics. Cheap on the hot path: one performance.now() at dispatch, and at
// completion a few additions and a scan of 16 bucket bounds.

/** Upper bounds of the latency buckets, in seconds (Prometheus `le`). */
export const LATENCY_BUCKETS_S: readonly number[] = [
  0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10,
];

export class CommandMetrics {
  requests = 0;
  errors = 0;
  bytes = 0;
  /** Sum of latencies, seconds. */
  seconds = 0;
  /** Non-cumulative counts per bucket; the last one is +Inf. */
  readonly buckets = new Float64Array(LATENCY_BUCKETS_S.length + 1);

  observe(seconds: number, bytes: number, ok: boolean): void {
    this.requests++;
    if (!ok) this.errors++;
    this.bytes += bytes;
    this.seconds += seconds;
    let i = 0;
    while (i < LATENCY_BUCKETS_S.length && seconds > (LATENCY_BUCKETS_S[i] ?? Infinity)) i++;
    this.buckets[i] = (this.buckets[i] ?? 0) + 1;
  }
}

export class ExportMetrics {
  /** By NBD command type. */
  readonly commands = new Map<number, CommandMetrics>();

  observe(type: number, seconds: number, bytes: number, ok: boolean): void {
    let c = this.commands.get(type);
    if (!c) {
      c = new CommandMetrics();
      this.commands.set(type, c);
    }
    c.observe(seconds, bytes, ok);
  }
}
