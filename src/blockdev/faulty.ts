// FaultyBlockDevice: any BlockDevice with failures injected on purpose, for
// tests and for users' failure drills. bcache's hardest bugs were in what
// happens when a device fails mid-flight (reference/bcache.md §1); this is how
// we prove ours: fail the Nth write, fail every I/O to the journal buckets,
// pull the device out from under a running cache set, or hold an I/O in flight
// so a test can make the failure hit exactly while a step is blocked in it.
//
// Rules are added and removed at run time; each matches by op kind and,
// optionally, by byte range (an I/O matches if it overlaps the range; flush has
// no range, so it only matches rules without one). An injected failure never
// reaches the inner device unless the rule says `after` (do the I/O, then fail:
// the write landed, the caller is told it did not).
//
// Spec strings, for the command line (device specs `faulty:RULES@DEVICE`, see open.ts):
//
//   RULES      := RULE [ ',' RULE ]...
//   RULE       := ACTION [ ':' QUALIFIER ]...
//   ACTION     := fail-nth=N         fail the Nth matching I/O (1 = the first), once
//               | fail-from=N        fail the Nth matching I/O and every one after it
//               | fail-range=RANGE   fail every matching I/O that overlaps RANGE
//               | fail               fail every matching I/O
//               | pull-after=N       N matching I/Os succeed, then the device is pulled:
//                                    that I/O and everything after it fails, as if unplugged
//               | latency=DURATION   delay every matching I/O
//               | hold               hold every matching I/O until the device is closed
//                                    (then it fails with ESHUTDOWN): an I/O that never
//                                    answers, for shutdown drills
//   QUALIFIER  := OP[/OP]...         which I/O: read, write, flush, discard, zero,
//                                    blockStatus (default: all of them)
//               | ERRNO              the error to inject: EIO (default), ENOSPC, EPERM,
//                                    EINVAL, ENOTSUP, ENOMEM, EOVERFLOW, ESHUTDOWN
//               | range=RANGE        only I/O overlapping RANGE
//               | after              perform the I/O, then report the error
//   RANGE      := NUMBER '+' NUMBER  offset + length, in bytes
//   NUMBER     := decimal or 0x-hex, optionally suffixed k, m, g, t (KiB, MiB, ...)
//                 or s (512-byte sectors)
//   DURATION   := NUMBER ( us | ms | s )
//
// Examples: `fail-nth=100:write`, `fail-range=4m+1m:write:EIO`, `pull-after=5000`,
// `latency=5ms:read`, `fail-from=10:flush:ENOSPC`, `fail-nth=1:write:after`.

import { realClock, type Clock } from '../util/clock.ts';
import { deferred, sleep, type Deferred } from '../util/lifecycle.ts';
import {
  IoError,
  type BlockDevice,
  type BlockDeviceCaps,
  type Extent,
  type IoErrorCode,
  type WriteOptions,
  type ZeroOptions,
} from './types.ts';

export type FaultOp = 'read' | 'write' | 'flush' | 'discard' | 'zero' | 'blockStatus';
export const FAULT_OPS: readonly FaultOp[] = ['read', 'write', 'flush', 'discard', 'zero', 'blockStatus'];

const IO_ERROR_CODES: readonly IoErrorCode[] = [
  'EIO',
  'EINVAL',
  'ENOSPC',
  'EPERM',
  'ENOTSUP',
  'ESHUTDOWN',
  'ENOMEM',
  'EOVERFLOW',
];

export interface ByteRange {
  offset: number;
  length: number;
}

/** Which I/O a rule applies to. */
export interface FaultMatch {
  /** Default: every kind. */
  ops?: readonly FaultOp[];
  /** Only I/O overlapping this byte range. */
  range?: ByteRange;
}

export interface FailOptions extends FaultMatch {
  /** Default EIO. */
  code?: IoErrorCode;
  /** Perform the I/O, then report the failure anyway. */
  after?: boolean;
}

export type FaultAction =
  /** Fail the matching I/O numbered `from` (1-based); with `once: false`, that one and all later. */
  | { kind: 'fail'; from: number; once: boolean; code: IoErrorCode; after: boolean }
  /** `count` matching I/Os pass; the next one pulls the device. */
  | { kind: 'pull-after'; count: number; code: IoErrorCode }
  | { kind: 'latency'; ms: number }
  | { kind: 'hold' };

/** A rule as data: what the spec parser produces and addRule() takes. */
export interface FaultRuleSpec {
  action: FaultAction;
  ops?: readonly FaultOp[];
  range?: ByteRange;
}

/** A rule installed on a device. */
export class FaultRule {
  readonly spec: FaultRuleSpec;
  /** Matching I/Os seen so far. */
  matched = 0;
  /** Failures this rule injected. */
  injected = 0;
  private readonly owner: FaultyBlockDevice;

  constructor(owner: FaultyBlockDevice, spec: FaultRuleSpec) {
    this.owner = owner;
    this.spec = spec;
  }

  matches(op: FaultOp, offset: number, length: number): boolean {
    const { ops, range } = this.spec;
    if (ops !== undefined && !ops.includes(op)) return false;
    if (range === undefined) return true;
    if (op === 'flush' || length === 0) return false;
    return offset < range.offset + range.length && offset + length > range.offset;
  }

  remove(): void {
    this.owner.removeRule(this);
  }

  toString(): string {
    return describeRule(this.spec);
  }
}

/** A hold rule: matching I/O waits (before reaching the device) until release(). */
export class FaultHold extends FaultRule {
  private gate = deferred();
  private heldNow = 0;
  private waiters: { count: number; d: Deferred<void> }[] = [];

  /** I/Os currently blocked by this hold. */
  get held(): number {
    return this.heldNow;
  }

  /** Resolves once at least `count` I/Os are blocked here at the same time. */
  waitForHeld(count = 1): Promise<void> {
    if (this.heldNow >= count) return Promise.resolve();
    const d = deferred();
    this.waiters.push({ count, d });
    return d.promise;
  }

  /** @internal Block one I/O until release(). */
  async block(): Promise<void> {
    this.heldNow++;
    const ready = this.waiters.filter((w) => w.count <= this.heldNow);
    this.waiters = this.waiters.filter((w) => w.count > this.heldNow);
    for (const w of ready) w.d.resolve();
    try {
      await this.gate.promise;
    } finally {
      this.heldNow--;
    }
  }

  /** Let every held I/O go on and stop holding new ones (the rule is removed). */
  release(): void {
    this.remove();
    this.gate.resolve();
  }
}

export interface FaultCounters {
  /** Operations submitted, by kind. */
  ops: Record<FaultOp, number>;
  /** Failures injected (rules and pull), by kind. */
  injected: Record<FaultOp, number>;
}

function zeroCounts(): Record<FaultOp, number> {
  return { read: 0, write: 0, flush: 0, discard: 0, zero: 0, blockStatus: 0 };
}

export class FaultyBlockDevice implements BlockDevice {
  readonly name: string;
  readonly inner: BlockDevice;
  private rules: FaultRule[] = [];
  private pulledCode: IoErrorCode | undefined;
  private readonly counts = zeroCounts();
  private readonly injectedCounts = zeroCounts();
  private readonly stopping = new AbortController();
  private inflight = 0;
  private drained: Deferred<void> | undefined;
  private closed: Promise<void> | undefined;

  /** Whose time a delay rule waits (default: real time). */
  private readonly clock: Clock;

  constructor(inner: BlockDevice, options: { name?: string; rules?: readonly FaultRuleSpec[]; clock?: Clock } = {}) {
    this.inner = inner;
    this.clock = options.clock ?? realClock;
    this.name = options.name ?? `faulty:${inner.name}`;
    for (const r of options.rules ?? []) this.addRule(r);
  }

  get size(): number {
    return this.inner.size;
  }
  get logicalBlockSize(): number {
    return this.inner.logicalBlockSize;
  }
  get readOnly(): boolean {
    return this.inner.readOnly;
  }
  get caps(): BlockDeviceCaps {
    return this.inner.caps;
  }

  isGone(): Promise<boolean> {
    return this.inner.isGone?.() ?? Promise.resolve(false);
  }

  // ---- rules -------------------------------------------------------------

  addRule(spec: FaultRuleSpec): FaultRule {
    return this.install(spec.action.kind === 'hold' ? new FaultHold(this, spec) : new FaultRule(this, spec));
  }

  private install<R extends FaultRule>(rule: R): R {
    this.rules.push(rule);
    return rule;
  }

  removeRule(rule: FaultRule): void {
    this.rules = this.rules.filter((r) => r !== rule);
  }

  /** Remove every rule (holds are released) and restore a pulled device. */
  clearRules(): void {
    for (const r of this.rules) {
      if (r instanceof FaultHold) r.release();
    }
    this.rules = [];
    this.restore();
  }

  get activeRules(): readonly FaultRule[] {
    return this.rules;
  }

  /** Fail the `n`th matching I/O (1 = the next one); with `persist`, that one and every later one. */
  failNth(n: number, options: FailOptions & { persist?: boolean } = {}): FaultRule {
    if (!Number.isSafeInteger(n) || n < 1) throw new RangeError(`failNth: n must be a whole number >= 1, got ${n}`);
    return this.addRule({
      action: {
        kind: 'fail',
        from: n,
        once: options.persist !== true,
        code: options.code ?? 'EIO',
        after: options.after ?? false,
      },
      ...matchOf(options),
    });
  }

  /** Fail every matching I/O. */
  failAlways(options: FailOptions = {}): FaultRule {
    return this.failNth(1, { ...options, persist: true });
  }

  /** Fail every matching I/O that overlaps [offset, offset+length), e.g. the journal buckets. */
  failRange(offset: number, length: number, options: Omit<FailOptions, 'range'> = {}): FaultRule {
    return this.failAlways({ ...options, range: { offset, length } });
  }

  /** Let `n` matching I/Os through, then pull the device (see pull()). */
  pullAfter(n: number, options: FaultMatch & { code?: IoErrorCode } = {}): FaultRule {
    if (!Number.isSafeInteger(n) || n < 0) throw new RangeError(`pullAfter: n must be a whole number >= 0, got ${n}`);
    return this.addRule({ action: { kind: 'pull-after', count: n, code: options.code ?? 'EIO' }, ...matchOf(options) });
  }

  /** Delay every matching I/O by `ms` milliseconds. */
  addLatency(ms: number, options: FaultMatch = {}): FaultRule {
    if (!(ms >= 0)) throw new RangeError(`addLatency: ms must be >= 0, got ${ms}`);
    return this.addRule({ action: { kind: 'latency', ms }, ...matchOf(options) });
  }

  /** Block matching I/O before it reaches the device until the returned hold is released. */
  hold(options: FaultMatch = {}): FaultHold {
    return this.install(new FaultHold(this, { action: { kind: 'hold' }, ...matchOf(options) }));
  }

  /**
   * The device is gone: every I/O from now on fails with `code`, including
   * I/Os held or delayed here when it happens. restore() plugs it back in.
   */
  pull(code: IoErrorCode = 'EIO'): void {
    this.pulledCode = code;
  }

  restore(): void {
    this.pulledCode = undefined;
  }

  get pulled(): boolean {
    return this.pulledCode !== undefined;
  }

  /** A snapshot of the operation and injected-failure counters. */
  counters(): FaultCounters {
    return { ops: { ...this.counts }, injected: { ...this.injectedCounts } };
  }

  // ---- the I/O path ------------------------------------------------------

  private isClosed(): boolean {
    return this.closed !== undefined;
  }

  private injected(op: FaultOp, offset: number, length: number, code: IoErrorCode, why: string): IoError {
    this.injectedCounts[op]++;
    const where = op === 'flush' ? '' : ` at ${offset}+${length}`;
    return new IoError(code, `${this.name}: injected ${code} on ${op}${where} (${why})`);
  }

  private async run<T>(op: FaultOp, offset: number, length: number, io: () => Promise<T>): Promise<T> {
    this.counts[op]++;
    if (this.isClosed()) throw new IoError('ESHUTDOWN', `${this.name}: device is closed`);
    this.inflight++;
    try {
      let failure: { code: IoErrorCode; after: boolean; rule: FaultRule } | undefined;
      let delay = 0;
      const holds: Promise<void>[] = [];
      if (this.pulledCode === undefined) {
        for (const rule of this.rules.slice()) {
          if (!rule.matches(op, offset, length)) continue;
          rule.matched++;
          const a = rule.spec.action;
          switch (a.kind) {
            case 'fail':
              if (failure === undefined && (a.once ? rule.matched === a.from : rule.matched >= a.from)) {
                rule.injected++;
                failure = { code: a.code, after: a.after, rule };
              }
              break;
            case 'pull-after':
              if (rule.matched > a.count) {
                rule.injected++;
                this.pull(a.code);
              }
              break;
            case 'latency':
              delay += a.ms;
              break;
            case 'hold':
              if (rule instanceof FaultHold) holds.push(rule.block());
              break;
          }
        }
      }
      if (holds.length > 0) await Promise.all(holds);
      if (delay > 0) await sleep(delay, this.stopping.signal, this.clock);
      if (this.isClosed() && (holds.length > 0 || delay > 0)) {
        throw new IoError('ESHUTDOWN', `${this.name}: device was closed while this ${op} was held or delayed`);
      }
      const pulled = this.pulledCode;
      if (pulled !== undefined) throw this.injected(op, offset, length, pulled, 'device pulled');
      if (failure !== undefined && !failure.after) {
        throw this.injected(op, offset, length, failure.code, `rule ${String(failure.rule)}`);
      }
      const result = await io();
      if (failure !== undefined) {
        throw this.injected(op, offset, length, failure.code, `rule ${String(failure.rule)}, after the I/O was done`);
      }
      return result;
    } finally {
      this.inflight--;
      if (this.inflight === 0) this.drained?.resolve();
    }
  }

  read(buf: Buffer, offset: number): Promise<void> {
    return this.run('read', offset, buf.length, () => this.inner.read(buf, offset));
  }

  write(buf: Buffer, offset: number, options?: WriteOptions): Promise<void> {
    return this.run('write', offset, buf.length, () => this.inner.write(buf, offset, options));
  }

  flush(): Promise<void> {
    return this.run('flush', 0, 0, () => this.inner.flush());
  }

  discard(offset: number, length: number): Promise<void> {
    return this.run('discard', offset, length, () => this.inner.discard(offset, length));
  }

  writeZeroes(offset: number, length: number, options?: ZeroOptions): Promise<void> {
    return this.run('zero', offset, length, () => this.inner.writeZeroes(offset, length, options));
  }

  blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.run('blockStatus', offset, length, () => this.inner.blockStatus(offset, length));
  }

  /**
   * Refuse new I/O, fail what is held or delayed here with ESHUTDOWN (so a
   * forgotten hold cannot hang teardown), wait for the rest, close the inner device.
   */
  close(): Promise<void> {
    this.closed ??= (async () => {
      // A plain reason: a default DOMException would keep the stack of whoever
      // closed the device (its frames' receivers, a whole cache set) alive as
      // long as this wrapper lives.
      this.stopping.abort('device closed');
      for (const r of this.rules) {
        if (r instanceof FaultHold) r.release();
      }
      if (this.inflight > 0) {
        this.drained = deferred();
        await this.drained.promise;
      }
      await this.inner.close();
    })();
    return this.closed;
  }
}

function matchOf(m: FaultMatch): FaultMatch {
  const out: FaultMatch = {};
  if (m.ops !== undefined) out.ops = m.ops;
  if (m.range !== undefined) out.range = m.range;
  return out;
}

// ---- spec strings ------------------------------------------------------------

const SUFFIX: Record<string, number> = { '': 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4, s: 512 };

const GRAMMAR =
  'rules are ACTION[:QUALIFIER]... separated by commas; actions: fail-nth=N, fail-from=N, fail-range=OFFSET+LENGTH, ' +
  'fail, pull-after=N, latency=DURATION, hold; qualifiers: ops (read/write/flush/discard/zero/blockStatus), an errno ' +
  '(EIO, ENOSPC, ...), range=OFFSET+LENGTH, after';

function specError(spec: string, problem: string): Error {
  return new Error(`fault spec "${spec}": ${problem} (${GRAMMAR})`);
}

function parseNumber(spec: string, text: string, what: string): number {
  const m = /^(0x[0-9a-f]+|\d+)([kmgts]?)$/i.exec(text);
  const unit = SUFFIX[(m?.[2] ?? '').toLowerCase()];
  if (!m?.[1] || unit === undefined) {
    throw specError(spec, `${what} "${text}" is not a number (like 4096, 0x1000, 64k, 8s)`);
  }
  const n = Number(m[1]) * unit;
  if (!Number.isSafeInteger(n)) throw specError(spec, `${what} "${text}" is too large`);
  return n;
}

function parseRange(spec: string, text: string): ByteRange {
  const parts = text.split('+');
  if (parts.length !== 2 || parts[0] === undefined || parts[1] === undefined) {
    throw specError(spec, `range "${text}" must be OFFSET+LENGTH`);
  }
  const range = { offset: parseNumber(spec, parts[0], 'offset'), length: parseNumber(spec, parts[1], 'length') };
  if (range.length === 0) throw specError(spec, `range "${text}" is empty`);
  return range;
}

function parseDuration(spec: string, text: string): number {
  const m = /^(\d+(?:\.\d+)?)(us|ms|s)$/.exec(text);
  if (!m?.[1] || !m[2]) throw specError(spec, `duration "${text}" must be a number with us, ms or s (like 5ms)`);
  const scale = m[2] === 'us' ? 0.001 : m[2] === 'ms' ? 1 : 1000;
  return Number(m[1]) * scale;
}

function parseCount(spec: string, text: string, min: number): number {
  const n = parseNumber(spec, text, 'count');
  if (n < min) throw specError(spec, `count ${text} must be at least ${min}`);
  return n;
}

function parseOps(text: string): FaultOp[] | undefined {
  const ops: FaultOp[] = [];
  for (const name of text.split('/')) {
    const op = FAULT_OPS.find((o) => o.toLowerCase() === name.toLowerCase());
    if (op === undefined) return undefined;
    ops.push(op);
  }
  return ops;
}

/** Parse a fault spec string (grammar in this file's header) into rule descriptions. Throws with the grammar on error. */
export function parseFaultSpec(spec: string): FaultRuleSpec[] {
  if (spec.trim() === '') throw specError(spec, 'no rules given');
  return spec.split(',').map((text) => {
    const [head = '', ...quals] = text.trim().split(':');
    const eq = head.indexOf('=');
    const name = eq < 0 ? head : head.slice(0, eq);
    const arg = eq < 0 ? undefined : head.slice(eq + 1);
    const needArg = (): string => {
      if (arg === undefined || arg === '') throw specError(spec, `${name} needs a value (${name}=...)`);
      return arg;
    };
    let ops: FaultOp[] | undefined;
    let range: ByteRange | undefined;
    let code: IoErrorCode | undefined;
    let after = false;
    for (const q of quals) {
      const errno = IO_ERROR_CODES.find((c) => c === q.toUpperCase());
      const qops = parseOps(q);
      if (q === 'after') after = true;
      else if (q.startsWith('range=')) range = parseRange(spec, q.slice('range='.length));
      else if (errno !== undefined) code = errno;
      else if (qops !== undefined) ops = qops;
      else throw specError(spec, `unknown qualifier "${q}" in rule "${text}"`);
    }
    let action: FaultAction;
    switch (name) {
      case 'fail-nth':
        action = { kind: 'fail', from: parseCount(spec, needArg(), 1), once: true, code: code ?? 'EIO', after };
        break;
      case 'fail-from':
        action = { kind: 'fail', from: parseCount(spec, needArg(), 1), once: false, code: code ?? 'EIO', after };
        break;
      case 'fail-range':
        if (range !== undefined) throw specError(spec, `fail-range already has a range; drop the range= qualifier`);
        range = parseRange(spec, needArg());
        action = { kind: 'fail', from: 1, once: false, code: code ?? 'EIO', after };
        break;
      case 'fail':
        if (arg !== undefined) throw specError(spec, `"fail" takes no value; did you mean fail-nth=${arg}?`);
        action = { kind: 'fail', from: 1, once: false, code: code ?? 'EIO', after };
        break;
      case 'pull-after':
        action = { kind: 'pull-after', count: parseCount(spec, needArg(), 0), code: code ?? 'EIO' };
        break;
      case 'latency':
        action = { kind: 'latency', ms: parseDuration(spec, needArg()) };
        break;
      case 'hold':
        if (arg !== undefined) throw specError(spec, `"hold" takes no value`);
        action = { kind: 'hold' };
        break;
      default:
        throw specError(spec, `unknown action "${name}"`);
    }
    if ((action.kind === 'latency' || action.kind === 'pull-after' || action.kind === 'hold') && after) {
      throw specError(spec, `"after" only applies to fail rules`);
    }
    if ((action.kind === 'latency' || action.kind === 'hold') && code !== undefined)
      throw specError(spec, `${action.kind} injects no error; drop ${code}`);
    const rule: FaultRuleSpec = { action };
    if (ops !== undefined) rule.ops = ops;
    if (range !== undefined) rule.range = range;
    return rule;
  });
}

/** The spec-string form of a rule (hold rules, which have none, print as "hold"). */
export function describeRule(r: FaultRuleSpec): string {
  const a = r.action;
  let head: string;
  switch (a.kind) {
    case 'fail':
      head = a.from === 1 && !a.once ? 'fail' : `${a.once ? 'fail-nth' : 'fail-from'}=${a.from}`;
      break;
    case 'pull-after':
      head = `pull-after=${a.count}`;
      break;
    case 'latency':
      head = `latency=${a.ms}ms`;
      break;
    case 'hold':
      head = 'hold';
      break;
  }
  const parts = [head];
  if (r.ops !== undefined) parts.push(r.ops.join('/'));
  if ((a.kind === 'fail' || a.kind === 'pull-after') && a.code !== 'EIO') parts.push(a.code);
  if (r.range !== undefined) parts.push(`range=${r.range.offset}+${r.range.length}`);
  if (a.kind === 'fail' && a.after) parts.push('after');
  return parts.join(':');
}
