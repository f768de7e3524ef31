// Logging: plain lines on stderr, one event per line, so that journald, a
// terminal and `grep` all read them. bcache's kernel messages are reproduced
// verbatim where the engine has an equivalent (`bcache: register_bdev()
// registered backing device ...`), so existing runbooks keep working.

export type LogLevel = 'debug' | 'info' | 'warn' | 'error';

export type LogSink = (level: LogLevel, line: string) => void;

const order: Record<LogLevel, number> = { debug: 0, info: 1, warn: 2, error: 3 };

function envLevel(): LogLevel {
  const v = process.env['UBCACHE_LOG'];
  if (v === 'debug' || v === 'info' || v === 'warn' || v === 'error') return v;
  return 'info';
}

const stderrSink: LogSink = (level, line) => {
  const prefix = level === 'warn' ? 'warning: ' : level === 'error' ? 'error: ' : '';
  process.stderr.write(`ubcache: ${prefix}${line}\n`);
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
