// Logging: plain lines on stderr, one event per line, so that journald, a
// terminal and `grep` all read them. bcache's kernel messages are reproduced
// verbatim where the engine has an equivalent (`bcache: register_bdev()
// registered backing device ...`), so existing runbooks keep working.
//
// Under systemd, stderr goes to the journal, which takes a `<N>` prefix on a
// line as its syslog priority (sd-daemon(3)): error <3>, warning <4>, info
// <6>, debug <7>. The prefix is added only when stderr is the journal's
// stream: JOURNAL_STREAM names its device and inode, and they must be
// stderr's own (systemd.exec(5)), so that a terminal or a pipe into another
// program never sees it.

import { fstatSync } from 'node:fs';

export type LogLevel = 'debug' | 'info' | 'warn' | 'error';

export type LogSink = (level: LogLevel, line: string) => void;

const order: Record<LogLevel, number> = { debug: 0, info: 1, warn: 2, error: 3 };

function envLevel(): LogLevel {
  const v = process.env['UBCACHE_LOG'];
  if (v === 'debug' || v === 'info' || v === 'warn' || v === 'error') return v;
  return 'info';
}

/** sd-daemon(3)'s priority prefixes (syslog levels). */
const JOURNAL_PRIORITY: Record<LogLevel, string> = { error: '<3>', warn: '<4>', info: '<6>', debug: '<7>' };

/**
 * Is stderr the journal's stream? JOURNAL_STREAM is "DEVICE:INODE" of the
 * stream systemd connected; a child whose stderr was redirected inherits the
 * variable but not the stream, hence the comparison.
 */
export function stderrIsJournal(
  env: NodeJS.ProcessEnv = process.env,
  stat: () => { dev: bigint; ino: bigint } = () => fstatSync(2, { bigint: true }),
): boolean {
  const stream = env['JOURNAL_STREAM'];
  if (stream === undefined || stream === '') return false;
  try {
    const s = stat();
    return stream === `${s.dev}:${s.ino}`;
  } catch {
    return false;
  }
}

let journal: boolean | undefined;

/** The journal's priority prefix for a line of this level, or "" when stderr is not the journal (main's errors use it too). */
export function journalPrefix(level: LogLevel): string {
  journal ??= stderrIsJournal();
  return journal ? JOURNAL_PRIORITY[level] : '';
}

const stderrSink: LogSink = (level, line) => {
  const word = level === 'warn' ? 'warning: ' : level === 'error' ? 'error: ' : '';
  process.stderr.write(`${journalPrefix(level)}ubcache: ${word}${line}\n`);
};

let sink: LogSink = stderrSink;
let threshold: LogLevel = envLevel();
/** Listeners that see every line written, after the sink (the dashboard's recent errors). */
const taps = new Set<LogSink>();

function emit(level: LogLevel, line: string): void {
  sink(level, line);
  for (const tap of taps) tap(level, line);
}

export const log = {
  debug(line: string): void {
    if (order[threshold] <= order.debug) emit('debug', line);
  },
  info(line: string): void {
    if (order[threshold] <= order.info) emit('info', line);
  },
  warn(line: string): void {
    if (order[threshold] <= order.warn) emit('warn', line);
  },
  error(line: string): void {
    emit('error', line);
  },
};

/** Replace the sink (tests capture lines this way). Returns a function that restores the previous one. */
export function setLogSink(next: LogSink): () => void {
  const prev = sink;
  sink = next;
  return () => {
    sink = prev;
  };
}

/** See every line written from now on, besides the sink. Returns a function that stops it. */
export function tapLog(listener: LogSink): () => void {
  taps.add(listener);
  return () => {
    taps.delete(listener);
  };
}

export function setLogLevel(level: LogLevel): void {
  threshold = level;
}

/** Capture log lines for the duration of a test. */
export function captureLog(): { lines: string[]; restore: () => void } {
  const lines: string[] = [];
  const restore = setLogSink((level, line) => {
    lines.push(level === 'info' ? line : `${level}: ${line}`);
  });
  return { lines, restore };
}
