// Capture log lines (debug included) and wait for a particular one: the way
// in-process tests synchronise with an event the server only reports in its log.

import { setLogLevel, setLogSink } from '../../src/util/log.ts';

export interface LogWatch {
  readonly lines: string[];
  /** Resolves at the first line (already seen or still to come) that matches. */
  waitFor(pattern: RegExp): Promise<string>;
  restore(): void;
}

export function watchLog(): LogWatch {
  const lines: string[] = [];
  let waiters: { pattern: RegExp; resolve: (line: string) => void }[] = [];
  const restoreSink = setLogSink((level, line) => {
    const text = level === 'info' || level === 'debug' ? line : `${level}: ${line}`;
    lines.push(text);
    const hit = waiters.filter((w) => w.pattern.test(text));
    waiters = waiters.filter((w) => !hit.includes(w));
    for (const w of hit) w.resolve(text);
  });
  setLogLevel('debug');
  return {
    lines,
    waitFor(pattern) {
      const seen = lines.find((l) => pattern.test(l));
      if (seen !== undefined) return Promise.resolve(seen);
      return new Promise((resolve) => waiters.push({ pattern, resolve }));
    },
    restore() {
      setLogLevel('info');
      restoreSink();
    },
  };
}
