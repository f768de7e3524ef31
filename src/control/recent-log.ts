// The last warnings and errors the daemon logged, for the dashboard: a small
// ring buffer fed by a tap on the log, so that what went wrong (a device
// failing, a client refused) is on the page without reading the journal.

import { tapLog, type LogLevel } from '../util/log.ts';

export interface LogEntry {
  /** ms since the epoch. */
  time: number;
  level: LogLevel;
  line: string;
  /** Counts every entry ever kept, so a reader can tell new ones from those it has shown. */
  seq: number;
}

/** How many lines are kept: a screenful; older ones are in the journal. */
export const RECENT_LOG_LINES = 50;

export class RecentLog {
  private readonly entries: LogEntry[] = [];
  private readonly capacity: number;
  private seq = 0;
  private untap: (() => void) | undefined;

  constructor(capacity = RECENT_LOG_LINES) {
    this.capacity = capacity;
  }

  /** Start keeping the warnings and errors logged from now on. */
  start(): void {
    this.untap ??= tapLog((level, line) => {
      if (level === 'warn' || level === 'error') this.add(level, line);
    });
  }

  stop(): void {
    this.untap?.();
    this.untap = undefined;
  }

  add(level: LogLevel, line: string, time: number = Date.now()): void {
    this.entries.push({ time, level, line, seq: ++this.seq });
    if (this.entries.length > this.capacity) this.entries.shift();
  }

  /** Oldest first. */
  list(): LogEntry[] {
    return this.entries.slice();
  }
}
