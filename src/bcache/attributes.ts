// bcache's sysfs attributes that can be set (bcache.md §3.1-3.5): their
// names, how a value is parsed as the kernel's store functions parse it, and
// how it is applied and shown. `ubcache serve --set DEV.ATTR=VALUE` and the
// control socket's attribute tree (sysfs/) both use them.
//
// Parsing follows the kernel: integers are base 10 (kstrtoul: an optional
// '+', no unit suffixes; sequential_cutoff refuses "4M" as modern kernels
// do), a trailing newline is accepted, *_clamp attributes clamp silently,
// booleans take any number (nonzero = 1), choice lists take exactly one of
// their names. Where the kernel would truncate a too-large number into a
// narrower field we refuse it instead, saying the range.

import { CACHE_MODE_NAMES } from '../format/constants.ts';
import { log } from '../util/log.ts';
import { ADMISSION_POLICIES } from './admission.ts';
import type { CachedDev, CachedDevSettings } from './cached-dev.ts';
import type { RegisteredSet, SetSettings } from './registry.ts';
import { RAM_CACHE_MAX } from './ram-cache.ts';
import { hprint } from './stats.ts';

const UINT_MAX = 0xffffffff;
const INT_MAX = 0x7fffffff;

/** A value an attribute refuses; the message says what it accepts. */
export class AttributeError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'AttributeError';
  }
}

export interface Attribute<Target> {
  readonly name: string;
  /** Lives in the set's internal/ directory rather than at its top (sysfs placement). */
  readonly internal?: true;
  /** What a store accepts, for messages. */
  readonly accepts: string;
  /** Parse a stored value (throws AttributeError) and return a function applying it. */
  parse(text: string): (target: Target) => Promise<void>;
  show(target: Target): string;
}

function trimNewline(text: string): string {
  return text.endsWith('\n') ? text.slice(0, -1) : text;
}

/** kstrtoul(text, 10), as a number (refusing what does not fit 2^53). */
function parseUnsigned(name: string, text: string, accepts: string): number {
  const t = trimNewline(text);
  if (!/^\+?[0-9]+$/.test(t)) throw new AttributeError(`${name}: "${text}" is not ${accepts}`);
  const v = Number(t.startsWith('+') ? t.slice(1) : t);
  if (!Number.isSafeInteger(v)) throw new AttributeError(`${name}: ${t} is too large (${accepts})`);
  return v;
}

function unsigned<T>(
  name: string,
  min: number,
  max: number,
  clamp: boolean,
  get: (t: T) => number,
  set: (t: T, v: number) => void | Promise<void>,
  show?: (v: number) => string,
): Attribute<T> {
  const accepts = `a whole number from ${min} to ${max}`;
  return {
    name,
    accepts,
    parse(text) {
      let v = parseUnsigned(name, text, accepts);
      if (clamp) v = Math.min(max, Math.max(min, v));
      else if (v < min || v > max) throw new AttributeError(`${name}: ${v} is out of range (${accepts})`);
      return async (t) => {
        await set(t, v);
      };
    },
    show: (t) => (show ? show(get(t)) : String(get(t))),
  };
}

function bool<T>(name: string, get: (t: T) => boolean, set: (t: T, v: boolean) => void | Promise<void>): Attribute<T> {
  const accepts = '0 or 1 (any nonzero number is 1)';
  return {
    name,
    accepts,
    parse(text) {
      const v = parseUnsigned(name, text, accepts) !== 0;
      return async (t) => {
        await set(t, v);
      };
    },
    show: (t) => (get(t) ? '1' : '0'),
  };
}

/** bch_snprint_string_list: every option, the selected one in brackets. */
export function choiceList(options: readonly string[], selected: number): string {
  return options.map((o, i) => (i === selected ? `[${o}]` : o)).join(' ');
}

/** A size in bytes with an optional k, M or G suffix (powers of 1024), as d_strtoi_h reads it; shown with hprint. */
function humanSize<T>(
  name: string,
  max: number,
  get: (t: T) => number,
  set: (t: T, v: number) => void | Promise<void>,
): Attribute<T> {
  const accepts = `a size in bytes from 0 to ${max}, with an optional k, M or G suffix`;
  return {
    name,
    accepts,
    parse(text) {
      const m = /^\+?([0-9]+)([kKmMgG]?)$/.exec(trimNewline(text));
      if (!m) throw new AttributeError(`${name}: "${text}" is not ${accepts}`);
      const shift = { '': 0, k: 10, m: 20, g: 30 }[(m[2] ?? '').toLowerCase()] ?? 0;
      const v = Number(m[1]) * 2 ** shift;
      if (!Number.isSafeInteger(v) || v > max) throw new AttributeError(`${name}: ${text} is too large (${accepts})`);
      return async (t) => {
        await set(t, v);
      };
    },
    show: (t) => hprint(get(t)),
  };
}

function choice<T>(
  name: string,
  options: readonly string[],
  get: (t: T) => number,
  set: (t: T, index: number) => void | Promise<void>,
): Attribute<T> {
  const accepts = `one of: ${options.join(', ')}`;
  return {
    name,
    accepts,
    parse(text) {
      const i = options.indexOf(trimNewline(text));
      if (i < 0) throw new AttributeError(`${name}: "${text}" is not ${accepts}`);
      return async (t) => {
        await set(t, i);
      };
    },
    show: (t) => choiceList(options, get(t)),
  };
}

function setting<K extends keyof CachedDevSettings>(dev: CachedDev, key: K, value: CachedDevSettings[K]): void {
  dev.settings[key] = value;
  dev.attachment?.writeback.wake();
}

/** writeback_rate as sysfs shows it: bytes per second, 0 while writeback_running is 0. */
export function writebackRateShow(dev: CachedDev): string {
  return hprint(dev.settings.writebackRunning ? dev.settings.writebackRate * 512 : 0);
}

function withShow<T>(a: Attribute<T>, show: (t: T) => string): Attribute<T> {
  return { ...a, show };
}

type FpTerm = 'writebackRateFpTermLow' | 'writebackRateFpTermMid' | 'writebackRateFpTermHigh';

/**
 * The fragmentation weights keep low < mid < high: each store is clamped
 * between its neighbours' current values (low to [1, mid-1], mid to
 * [low+1, high-1], high to [mid+1, UINT_MAX]), as the kernel clamps them.
 */
function fpTerm(name: string, key: FpTerm): Attribute<CachedDev> {
  const accepts = 'a whole number, kept between the neighbouring fp_term weights';
  const bounds = (d: CachedDev): [number, number] => {
    const s = d.settings;
    if (key === 'writebackRateFpTermLow') return [1, s.writebackRateFpTermMid - 1];
    if (key === 'writebackRateFpTermMid') return [s.writebackRateFpTermLow + 1, s.writebackRateFpTermHigh - 1];
    return [s.writebackRateFpTermMid + 1, UINT_MAX];
  };
  return {
    name,
    accepts,
    parse(text) {
      const v = parseUnsigned(name, text, accepts);
      return (d) => {
        const [min, max] = bounds(d);
        setting(d, key, Math.min(max, Math.max(min, v)));
        return Promise.resolve();
      };
    },
    show: (d) => String(d.settings[key]),
  };
}

const STOP_WHEN = ['auto', 'always'] as const;
const READAHEAD = ['all', 'meta-only'] as const;

/** The settable attributes of a backing device (/sys/block/bcacheN/bcache/). */
export const DEVICE_ATTRIBUTES: ReadonlyArray<Attribute<CachedDev>> = [
  choice(
    'cache_mode',
    CACHE_MODE_NAMES,
    (d) => d.cacheMode,
    (d, i) => d.setCacheMode(i),
  ),
  unsigned(
    'sequential_cutoff',
    0,
    UINT_MAX,
    false,
    (d) => d.settings.sequentialCutoff,
    (d, v) => {
      setting(d, 'sequentialCutoff', v);
    },
    (v) => hprint(v),
  ),
  // bcache's readahead (Linux before 5.13): d_strtoi_h, shown with hprint.
  humanSize(
    'readahead',
    INT_MAX,
    (d) => d.settings.readahead,
    (d, v) => {
      setting(d, 'readahead', v);
    },
  ),
  bool(
    'writeback_running',
    (d) => d.settings.writebackRunning,
    (d, v) => {
      setting(d, 'writebackRunning', v);
    },
  ),
  unsigned(
    'writeback_delay',
    0,
    UINT_MAX,
    false,
    (d) => d.settings.writebackDelay,
    (d, v) => {
      setting(d, 'writebackDelay', v);
    },
  ),
  unsigned(
    'writeback_percent',
    0,
    40,
    true,
    (d) => d.settings.writebackPercent,
    (d, v) => {
      setting(d, 'writebackPercent', v);
    },
  ),
  withShow(
    unsigned(
      'writeback_rate',
      1,
      INT_MAX,
      true,
      (d) => d.settings.writebackRate,
      (d, v) => {
        // The controller's next update starts from here (its `change` is relative to it).
        setting(d, 'writebackRate', v);
      },
    ),
    // Bytes per second, 0 while writeback_running is 0; stored in sectors per second.
    writebackRateShow,
  ),
  unsigned(
    'writeback_rate_update_seconds',
    1,
    60,
    true,
    (d) => d.settings.writebackRateUpdateSeconds,
    (d, v) => {
      setting(d, 'writebackRateUpdateSeconds', v);
    },
  ),
  unsigned(
    'writeback_rate_minimum',
    1,
    UINT_MAX,
    true,
    (d) => d.settings.writebackRateMinimum,
    (d, v) => {
      setting(d, 'writebackRateMinimum', v);
    },
  ),
  unsigned(
    'writeback_rate_p_term_inverse',
    1,
    UINT_MAX,
    true,
    (d) => d.settings.writebackRatePTermInverse,
    (d, v) => {
      setting(d, 'writebackRatePTermInverse', v);
    },
  ),
  unsigned(
    'writeback_rate_i_term_inverse',
    1,
    UINT_MAX,
    true,
    (d) => d.settings.writebackRateITermInverse,
    (d, v) => {
      setting(d, 'writebackRateITermInverse', v);
    },
  ),
  fpTerm('writeback_rate_fp_term_low', 'writebackRateFpTermLow'),
  fpTerm('writeback_rate_fp_term_mid', 'writebackRateFpTermMid'),
  fpTerm('writeback_rate_fp_term_high', 'writebackRateFpTermHigh'),
  bool(
    'writeback_metadata',
    (d) => d.settings.writebackMetadata,
    (d, v) => {
      setting(d, 'writebackMetadata', v);
    },
  ),
  bool(
    'writeback_consider_fragment',
    (d) => d.settings.writebackConsiderFragment,
    (d, v) => {
      setting(d, 'writebackConsiderFragment', v);
    },
  ),
  choice(
    'stop_when_cache_set_failed',
    STOP_WHEN,
    (d) => STOP_WHEN.indexOf(d.settings.stopWhenCacheSetFailed),
    (d, i) => {
      setting(d, 'stopWhenCacheSetFailed', STOP_WHEN[i] ?? 'auto');
    },
  ),
  choice(
    'readahead_cache_policy',
    READAHEAD,
    (d) => READAHEAD.indexOf(d.settings.readaheadCachePolicy),
    (d, i) => {
      setting(d, 'readaheadCachePolicy', READAHEAD[i] ?? 'all');
    },
  ),
  unsigned(
    'io_error_limit',
    0,
    INT_MAX,
    true,
    (d) => d.settings.ioErrorLimit,
    (d, v) => {
      setting(d, 'ioErrorLimit', v);
    },
  ),
  bool(
    'io_disable',
    (d) => d.settings.ioDisable,
    (d, v) => {
      setting(d, 'ioDisable', v);
    },
  ),
  // ubcache's own (admission.ts): which read misses enter the cache; `always` is bcache's behaviour.
  choice(
    'cache_admission',
    ADMISSION_POLICIES,
    (d) => ADMISSION_POLICIES.indexOf(d.settings.cacheAdmission),
    (d, i) => {
      setting(d, 'cacheAdmission', ADMISSION_POLICIES[i] ?? 'always');
    },
  ),
  {
    name: 'label',
    accepts: 'at most 32 bytes',
    parse(text) {
      const label = Buffer.from(trimNewline(text));
      if (label.length > 32) throw new AttributeError(`label: "${text}" is longer than 32 bytes`);
      return async (d) => {
        const padded = Buffer.alloc(32);
        label.copy(padded);
        await d.updateSuperblock((sb) => {
          sb.label = padded;
        });
        const att = d.attachment;
        if (att) {
          att.cs.uuids.get(att.inode).label = Buffer.from(padded);
          await att.cs.writeUuids();
        }
      };
    },
    show: (d) => {
      const end = d.sb.label.indexOf(0);
      return d.sb.label.subarray(0, end < 0 ? 32 : end).toString();
    },
  },
];

function setSetting<K extends keyof SetSettings>(set: RegisteredSet, key: K, value: SetSettings[K]): void {
  set.settings[key] = value;
}

const ERRORS = ['unregister', 'panic'] as const;

/** The settable attributes of a cache set (/sys/fs/bcache/<set-uuid>/). */
export const SET_ATTRIBUTES: ReadonlyArray<Attribute<RegisteredSet>> = [
  unsigned(
    'journal_delay_ms',
    0,
    65535,
    false,
    (s) => s.cs.journal.delayMs,
    (s, v) => {
      s.cs.journal.delayMs = v;
    },
  ),
  unsigned(
    'congested_read_threshold_us',
    0,
    UINT_MAX,
    false,
    (s) => s.settings.congestedReadThresholdUs,
    (s, v) => {
      setSetting(s, 'congestedReadThresholdUs', v);
    },
  ),
  unsigned(
    'congested_write_threshold_us',
    0,
    UINT_MAX,
    false,
    (s) => s.settings.congestedWriteThresholdUs,
    (s, v) => {
      setSetting(s, 'congestedWriteThresholdUs', v);
    },
  ),
  unsigned(
    'io_error_limit',
    0,
    UINT_MAX,
    false,
    (s) => s.settings.ioErrorLimit,
    (s, v) => {
      setSetting(s, 'ioErrorLimit', v);
    },
  ),
  unsigned(
    'io_error_halflife',
    0,
    UINT_MAX,
    false,
    (s) => s.settings.ioErrorHalflife,
    (s, v) => {
      // Stored as error_decay = v / 88, shown as error_decay * 88.
      setSetting(s, 'ioErrorHalflife', Math.floor(v / 88) * 88);
    },
  ),
  {
    ...bool<RegisteredSet>(
      'idle_max_writeback_rate',
      (s) => s.settings.idleMaxWritebackRate,
      (s, v) => {
        setSetting(s, 'idleMaxWritebackRate', v);
      },
    ),
    internal: true,
  },
  {
    // internal/copy_gc_enabled: moving GC after each GC pass (movinggc.ts), off by default, as Linux 6.1 shows it.
    ...bool<RegisteredSet>(
      'copy_gc_enabled',
      (s) => s.cs.copyGcEnabled,
      (s, v) => {
        s.cs.copyGcEnabled = v;
      },
    ),
    internal: true,
  },
  {
    ...unsigned<RegisteredSet>(
      'gc_after_writeback',
      0,
      1,
      true,
      (s) => s.settings.gcAfterWriteback,
      (s, v) => {
        // As the kernel's store, a write also drops a pass already due.
        setSetting(s, 'gcAfterWriteback', v);
        s.gcAfterWritebackDue = false;
      },
    ),
    internal: true,
  },
  // ubcache's own (ram-cache.ts): memory for copies of the hottest cache
  // blocks, so that their hits make no system call. 0 turns it off; a store
  // drops what it held.
  humanSize(
    'ram_cache_size',
    RAM_CACHE_MAX,
    (s) => s.cs.ramCache.size,
    (s, v) => {
      s.cs.ramCache.resize(v);
    },
  ),
  choice(
    'errors',
    ERRORS,
    (s) => ERRORS.indexOf(s.settings.errors),
    (s, i) => {
      if (ERRORS[i] === 'panic') log.warn(`set ${s.uuid}: errors=panic makes a fatal cache error stop the daemon`);
      setSetting(s, 'errors', ERRORS[i] ?? 'unregister');
    },
  ),
];

/** Find an attribute by name, or throw naming the valid ones. */
export function findAttribute<T>(list: ReadonlyArray<Attribute<T>>, name: string, what: string): Attribute<T> {
  const a = list.find((x) => x.name === name);
  if (!a) {
    throw new AttributeError(
      `${what} has no settable attribute "${name}"; valid: ${list.map((x) => x.name).join(', ')}`,
    );
  }
  return a;
}
