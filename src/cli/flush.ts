// `ubcache flush`: write every dirty extent of a cache back to its backing
// devices, offline (nothing is served), and leave each backing superblock
// CLEAN, as the kernel's writeback does when it finds nothing dirty: the
// backing device alone then holds all of its data. For a dead machine's
// cache (the kernel's images) as for ubcache's own.
//
// This is not a second writeback: the devices are registered in a Registry
// exactly as `serve` does (journal replay, btree check, attach), with
// writeback held off until every device has been checked; then each device's
// own writeback worker runs unthrottled (writeback_percent=0,
// writeback_delay=0) until it reports the device idle and its superblock
// CLEAN, and the registry stops everything in its orderly order (the cache
// set's journal and superblock written, the files closed).
//
// --dry-run brings the set up over a copy-on-write view of the devices
// (bring-up writes stay in memory, nothing reaches a device) and reports
// the dirty data of each backing device, and of every device the cache
// holds dirty data for.

import {
  BDEV_STATE_CLEAN,
  BDEV_STATE_DIRTY,
  BDEV_STATE_NAMES,
  BDEV_STATE_NONE,
  SB_OFFSET,
  SB_SIZE,
} from '../format/constants.ts';
import { bdevState, decodeSuperblock, isBacking } from '../format/superblock.ts';
import { isFlashOnly, isFreeSlot, isInvalidatedSlot } from '../format/uuid.ts';
import { formatUuid } from '../format/uuid-text.ts';
import { openBlockDevice } from '../blockdev/open.ts';
import type { BlockDevice, BlockDeviceCaps, Extent, WriteOptions, ZeroOptions } from '../blockdev/types.ts';
import { IoError } from '../blockdev/types.ts';
import type { CachedDev } from '../bcache/cached-dev.ts';
import { Registry, type RegisteredSet } from '../bcache/registry.ts';
import { errorMessage, sleep } from '../util/lifecycle.ts';
import { log, setLogSink } from '../util/log.ts';
import { CliError, parseCommandArgs, type Subcommand } from './common.ts';
import { processOutput, type Output } from './output.ts';
import { Progress } from './progress.ts';

const HELP = `Usage: ubcache flush [options] CACHE BACKING...

Write every dirty extent of the cache device CACHE back to each BACKING
device, without serving anything, and leave each BACKING's superblock clean
(as bcache's writeback does once nothing is dirty), so that the backing
device alone holds all of its data. Works on images the Linux kernel left
behind (a dead machine's SSD) as on ubcache's own. The devices may be given
in any order; each is a file, a block device or an NBD URI.

Options:
  -n, --dry-run   write nothing: report how much data is dirty for each
                  BACKING, and for every device the cache holds dirty data for
  -v, --verbose   show the engine's log (registration, journal replay)
  -h, --help      show this help

Exit status: 0 when every BACKING is clean (or, with --dry-run, when the
report is complete), 1 on an error, 130/143 when interrupted (SIGINT/SIGTERM:
writeback stops in order; what is left stays dirty in the cache).

Examples:
  ubcache flush --dry-run cache.img disk.img
  ubcache flush cache.img disk.img
  ubcache flush /dev/nvme0n1p2 /dev/sda /dev/sdb
`;

const usageHint = "Run 'ubcache flush --help' for the options.";

export interface FlushPlan {
  devices: string[];
  dryRun: boolean;
  verbose: boolean;
}

/** Turn the arguments into a plan, or 'help'. Throws CliError on anything wrong. */
export function parseFlushArgs(args: string[]): FlushPlan | 'help' {
  const parsed = parseCommandArgs(
    args,
    {
      'dry-run': { type: 'boolean', short: 'n' },
      verbose: { type: 'boolean', short: 'v' },
      help: { type: 'boolean', short: 'h' },
    },
    usageHint,
  );
  const v = parsed.values;
  if (v.help === true) return 'help';
  const devices = parsed.positionals;
  const dryRun = v['dry-run'] === true;
  if (devices.length === 0) {
    throw new CliError('no CACHE and no BACKING device given', {
      hint: 'Name the cache device and its backing devices, e.g. ubcache flush cache.img disk.img',
    });
  }
  if (devices.length === 1 && !dryRun) {
    throw new CliError(`only one device given (${devices[0] ?? ''}): flush needs the cache and its backing devices`, {
      hint: 'Name the backing devices too; ubcache flush --dry-run CACHE lists the devices the cache holds dirty data for.',
    });
  }
  const seen = new Set<string>();
  for (const d of devices) {
    if (seen.has(d)) throw new CliError(`${d} is given twice`);
    seen.add(d);
  }
  return { devices, dryRun, verbose: v.verbose === true };
}

// ---------------------------------------------------------------------------
// --dry-run: a copy-on-write view of a device

const COW_CHUNK = 4096;

/**
 * A device whose writes stay in memory (in 4 KiB chunks) and whose reads see
 * them over the device below, which is opened read-only and never written:
 * the engine's bring-up (journal replay, a new journal entry, prios) runs as
 * usual and leaves no trace.
 */
export class CopyOnWriteDevice implements BlockDevice {
  readonly name: string;
  readonly size: number;
  readonly logicalBlockSize: number;
  readonly readOnly = false;
  readonly caps: BlockDeviceCaps;
  private readonly base: BlockDevice;
  private readonly chunks = new Map<number, Buffer>();
  /** Writes one at a time: a chunk's first write reads it from below. */
  private writing: Promise<void> = Promise.resolve();

  constructor(base: BlockDevice) {
    this.base = base;
    this.name = base.name;
    this.size = base.size;
    this.logicalBlockSize = base.logicalBlockSize;
    this.caps = { ...base.caps, discard: false, fastZero: false, blockStatus: false };
  }

  /** Bytes held in memory. */
  get bytesWritten(): number {
    return this.chunks.size * COW_CHUNK;
  }

  private check(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new IoError('EINVAL', `${this.name}: range ${offset}+${length} is outside the device (${this.size} bytes)`);
    }
  }

  async read(buf: Buffer, offset: number): Promise<void> {
    this.check(offset, buf.length);
    await this.base.read(buf, offset);
    if (this.chunks.size === 0) return;
    const end = offset + buf.length;
    for (let index = Math.floor(offset / COW_CHUNK); index * COW_CHUNK < end; index++) {
      const chunk = this.chunks.get(index);
      if (!chunk) continue;
      const from = Math.max(offset, index * COW_CHUNK);
      const to = Math.min(end, (index + 1) * COW_CHUNK);
      chunk.copy(buf, from - offset, from - index * COW_CHUNK, to - index * COW_CHUNK);
    }
  }

  async write(buf: Buffer, offset: number, _options?: WriteOptions): Promise<void> {
    this.check(offset, buf.length);
    const data = Buffer.from(buf);
    const done = this.writing.then(() => this.apply(data, offset));
    this.writing = done.catch(() => undefined);
    await done;
  }

  private async apply(buf: Buffer, offset: number): Promise<void> {
    const end = offset + buf.length;
    for (let index = Math.floor(offset / COW_CHUNK); index * COW_CHUNK < end; index++) {
      const at = index * COW_CHUNK;
      let chunk = this.chunks.get(index);
      if (!chunk) {
        chunk = Buffer.alloc(Math.min(COW_CHUNK, this.size - at));
        if (offset > at || end < at + chunk.length) await this.base.read(chunk, at);
        this.chunks.set(index, chunk);
      }
      const from = Math.max(offset, at);
      const to = Math.min(end, at + chunk.length);
      buf.copy(chunk, from - at, from - offset, to - offset);
    }
  }

  async flush(): Promise<void> {
    await this.writing;
  }

  /** Accepted and ignored: reads of a discarded range may return anything. */
  async discard(offset: number, length: number): Promise<void> {
    await Promise.resolve();
    this.check(offset, length);
  }

  async writeZeroes(offset: number, length: number, options?: ZeroOptions): Promise<void> {
    if (options?.fastOnly === true) throw new IoError('ENOTSUP', `${this.name}: no fast zeroing in a dry run`);
    for (let done = 0; done < length;) {
      const n = Math.min(1 << 20, length - done);
      await this.write(Buffer.alloc(n), offset + done);
      done += n;
    }
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    await Promise.resolve();
    this.check(offset, length);
    return length === 0 ? [] : [{ length, hole: false, zero: false }];
  }

  async close(): Promise<void> {
    await this.writing;
    this.chunks.clear();
    await this.base.close();
  }
}

// ---------------------------------------------------------------------------

/** 16777216 -> "16.0 MiB". */
export function formatBytes(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let v = bytes;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return u === 0 ? `${v} B` : `${v.toFixed(1)} ${units[u] ?? '?'}`;
}

const sectorsText = (sectors: number): string => `${formatBytes(sectors * 512)} (${sectors} sectors)`;

interface Given {
  spec: string;
  kind: 'cache' | 'backing';
  set?: RegisteredSet;
  dev?: CachedDev;
}

/** What the superblock of a device says, read on its own, after everything was closed. */
async function backingStateOnDisk(spec: string): Promise<number> {
  const dev = await openBlockDevice(spec, { readOnly: true });
  try {
    const block = Buffer.alloc(SB_SIZE);
    await dev.read(block, SB_OFFSET);
    const sb = decodeSuperblock(block);
    if (!isBacking(sb)) throw new Error('not a backing device any more');
    return bdevState(sb);
  } finally {
    await dev.close();
  }
}

/** Dirty data the sets hold for devices not given, by set and uuid slot. */
function orphanDirty(
  registry: Registry,
  given: Given[],
): Array<{ set: string; uuid: string; label: string; sectors: number }> {
  const out: Array<{ set: string; uuid: string; label: string; sectors: number }> = [];
  for (const set of registry.sets.values()) {
    const cs = set.cs;
    cs.uuids.entries.forEach((e, slot) => {
      // Flash-only volumes' data is theirs, never written back (and never orphaned).
      if (isFreeSlot(e) || isFlashOnly(e)) return;
      const mine = given.some((g) => g.dev?.attachment?.cs === cs && g.dev.attachment.inode === slot);
      if (mine) return;
      const sectors = cs.dirtySectors(slot);
      if (sectors === 0) return;
      const label = e.label.subarray(0, Math.max(0, e.label.indexOf(0) < 0 ? 32 : e.label.indexOf(0))).toString();
      out.push({
        set: set.uuid,
        uuid: isInvalidatedSlot(e) ? `(detached slot ${slot})` : formatUuid(e.uuid),
        label,
        sectors,
      });
    });
  }
  return out;
}

export async function flush(args: string[], out: Output = processOutput): Promise<number> {
  const plan = parseFlushArgs(args);
  if (plan === 'help') {
    out.stdout.write(HELP);
    return 0;
  }
  const restoreLog = plan.verbose
    ? () => undefined
    : setLogSink((level, line) => {
        if (level === 'warn' || level === 'error') out.stderr.write(`ubcache flush: ${level}: ${line}\n`);
      });
  const interrupted: { signal?: NodeJS.Signals } = {};
  const wake = new Set<() => void>();
  const onSignal = (signal: NodeJS.Signals): void => {
    if (interrupted.signal) {
      out.stderr.write(`ubcache flush: ${signal} again: exiting at once (written-back data is safe)\n`);
      process.exit(signal === 'SIGINT' ? 130 : 143);
    }
    interrupted.signal = signal;
    out.stderr.write(`ubcache flush: ${signal}: stopping writeback (send it again to exit at once)\n`);
    for (const w of wake) w();
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  const registry = new Registry({
    // Held off until every device is checked: nothing is written back for a command that then fails.
    deviceSettings: () => ({ writebackRunning: false, writebackDelay: 0, writebackPercent: 0 }),
    open: (path) => openBlockDevice(path, { exclusive: true }),
  });
  try {
    return await flushWith(plan, registry, out, interrupted, wake);
  } finally {
    try {
      await registry.stopAll();
    } finally {
      process.off('SIGINT', onSignal);
      process.off('SIGTERM', onSignal);
      restoreLog();
    }
  }
}

async function flushWith(
  plan: FlushPlan,
  registry: Registry,
  out: Output,
  interrupted: { signal?: NodeJS.Signals },
  wake: Set<() => void>,
): Promise<number> {
  const say = (line: string): void => {
    out.stdout.write(`${line}\n`);
  };
  // Open everything first: a missing file costs nothing.
  const opened: BlockDevice[] = [];
  try {
    for (const spec of plan.devices) {
      try {
        const dev = await openBlockDevice(spec, { exclusive: true, readOnly: plan.dryRun });
        opened.push(plan.dryRun ? new CopyOnWriteDevice(dev) : dev);
      } catch (err) {
        throw new CliError(`cannot open ${spec}: ${errorMessage(err)}`);
      }
    }
  } catch (err) {
    for (const d of opened) await d.close().catch(() => undefined);
    throw err;
  }
  // Caches first, so that each backing device attaches as it registers.
  const order = await Promise.all(
    opened.map(async (dev, i) => {
      const block = Buffer.alloc(SB_SIZE);
      try {
        await dev.read(block, SB_OFFSET);
        return { i, backing: isBacking(decodeSuperblock(block)) };
      } catch {
        return { i, backing: true }; // the registry says what is wrong with it
      }
    }),
  );
  order.sort((a, b) => Number(a.backing) - Number(b.backing) || a.i - b.i);
  const given: Given[] = [];
  for (const [k, { i }] of order.entries()) {
    const spec = plan.devices[i] ?? '';
    const dev = opened[i];
    if (!dev) continue;
    try {
      const r = await registry.register(dev);
      given.push(r.kind === 'cache' ? { spec, kind: 'cache', set: r.set } : { spec, kind: 'backing', dev: r.dev });
    } catch (err) {
      // The registry closed this one; the ones not registered yet are still ours.
      for (const rest of order.slice(k + 1)) await opened[rest.i]?.close().catch(() => undefined);
      throw new CliError(`cannot register ${spec}: ${errorMessage(err)}`);
    }
  }
  const caches = given.filter((g) => g.kind === 'cache');
  const backings = given.filter((g) => g.kind === 'backing');
  if (caches.length === 0) {
    throw new CliError(`no cache device among ${plan.devices.join(', ')}`, {
      hint: 'Name the cache device (made by ubcache make -C or make-bcache -C) as well as the backing devices.',
    });
  }
  const setList = caches.map((c) => `${c.spec} (cache set ${c.set?.uuid ?? '?'})`).join(', ');
  // Every backing device must belong to a set given, unless it has no cache at all.
  for (const b of backings) {
    const dev = b.dev;
    if (!dev || dev.attached || dev.state === BDEV_STATE_NONE) continue;
    if (caches.some((c) => c.set?.uuid === dev.setUuid)) {
      throw new CliError(`${b.spec} could not be attached to its cache set ${dev.setUuid} (see the error above)`);
    }
    throw new CliError(
      `${b.spec} belongs to cache set ${dev.setUuid} (its superblock says ${dev.stateName}), ` +
        `which is not the set of ${setList}`,
      { hint: 'Give the cache device of that set; ubcache show-super shows the set uuid of each device.' },
    );
  }

  const orphans = orphanDirty(registry, given);
  const row = (b: Given): { dev: CachedDev; dirty: number; state: string } | undefined => {
    const dev = b.dev;
    return dev ? { dev, dirty: dev.dirtySectors, state: dev.stateName } : undefined;
  };

  if (plan.dryRun) {
    let total = 0;
    for (const c of caches) say(`cache ${c.spec}: cache set ${c.set?.uuid ?? '?'}`);
    for (const b of backings) {
      const r = row(b);
      if (!r) continue;
      total += r.dirty;
      if (!r.dev.attached) {
        say(`${b.spec}: no cache (superblock: ${r.state}); nothing to write back`);
        continue;
      }
      say(
        `${b.spec}: ${sectorsText(r.dirty)} dirty, superblock ${r.state}` +
          (r.dirty === 0 && r.dev.state === BDEV_STATE_DIRTY ? ' (only the superblock would change)' : ''),
      );
    }
    for (const o of orphans) {
      say(
        `device ${o.uuid}${o.label ? ` (label ${o.label})` : ''} in set ${o.set}: ${sectorsText(o.sectors)} dirty, not given`,
      );
    }
    const notGiven = orphans.reduce((s, o) => s + o.sectors, 0);
    say(
      `total: ${sectorsText(total)} dirty to write back` +
        (notGiven > 0 ? `, and ${sectorsText(notGiven)} for devices not given` : '') +
        ' (dry run: nothing was written)',
    );
    return 0;
  }

  for (const o of orphans) {
    log.warn(
      `the cache also holds ${formatBytes(o.sectors * 512)} of dirty data for device ${o.uuid}` +
        `${o.label ? ` (label ${o.label})` : ''}, which was not given: it stays in the cache`,
    );
  }
  const work = backings.flatMap((b) => {
    const r = row(b);
    if (!r) return [];
    if (!r.dev.attached) {
      say(`${b.spec}: no cache (superblock: ${r.state}); nothing to write back`);
      return [];
    }
    return [{ spec: b.spec, dev: r.dev, dirty: r.dirty, wasState: r.dev.state }];
  });
  const total = work.reduce((s, w) => s + w.dirty, 0);
  say(`writing back ${sectorsText(total)} to ${work.length} backing device(s)`);
  const started = Date.now();
  const progress = new Progress(`writeback ${formatBytes(total * 512)}`, total, { stream: out.stderr });
  const left = (): number => work.reduce((s, w) => s + w.dev.dirtySectors, 0);
  for (const w of work) {
    w.dev.settings.writebackRunning = true;
    w.dev.attachment?.writeback.wake();
  }
  const failures: string[] = [];
  // One waiter per device for the interruption, one idle wait at a time; a poll for the progress bar.
  const stop = new Promise<void>((resolve) => wake.add(resolve));
  await Promise.all(
    work.map(async (w) => {
      let idle: Promise<void> | undefined;
      for (;;) {
        if (interrupted.signal) return;
        const att = w.dev.attachment;
        if (!att || att.cs.ioDisabled || att.cs.stopped) {
          failures.push(`${w.spec}: the cache set failed during writeback`);
          return;
        }
        if (w.dev.state === BDEV_STATE_CLEAN && w.dev.dirtySectors === 0) return;
        if (!att.writeback.running) {
          failures.push(`${w.spec}: the writeback worker stopped`);
          return;
        }
        const current = (idle ??= att.writeback.whenIdle().then(() => {
          idle = undefined;
        }));
        const poll = new AbortController();
        await Promise.race([current, stop, sleep(200, poll.signal)]);
        poll.abort();
        progress.update(total - left());
      }
    }),
  );
  progress.update(total - left());
  if (!interrupted.signal && failures.length === 0) progress.finish();
  const seconds = (Date.now() - started) / 1000;
  for (const w of work) w.dev.settings.writebackRunning = false;
  await registry.stopAll();

  if (interrupted.signal) {
    const remaining = work.reduce((s, w) => s + w.dev.dirtySectors, 0);
    out.stderr.write(
      `ubcache flush: interrupted: ${formatBytes((total - remaining) * 512)} written back, ` +
        `${formatBytes(remaining * 512)} still dirty in the cache\n`,
    );
    return interrupted.signal === 'SIGINT' ? 130 : 143;
  }
  // The superblocks as a later reader sees them, everything closed.
  let bad = failures.length;
  for (const f of failures) out.stderr.write(`ubcache flush: ${f}\n`);
  for (const w of work) {
    let state: number;
    try {
      state = await backingStateOnDisk(w.spec);
    } catch (err) {
      out.stderr.write(`ubcache flush: ${w.spec}: cannot read its superblock back: ${errorMessage(err)}\n`);
      bad++;
      continue;
    }
    const name = BDEV_STATE_NAMES[state] ?? String(state);
    say(
      `${w.spec}: ${formatBytes(w.dirty * 512)} written back, superblock ${BDEV_STATE_NAMES[w.wasState] ?? '?'} -> ${name}`,
    );
    if (state !== BDEV_STATE_CLEAN) bad++;
  }
  const rate = seconds > 0 ? ` (${formatBytes((total * 512) / seconds)}/s)` : '';
  say(
    bad === 0
      ? `done: ${formatBytes(total * 512)} written back in ${seconds.toFixed(1)} s${rate}; ` +
          `every backing device is clean and holds all of its data`
      : `failed: ${bad} backing device(s) not clean`,
  );
  return bad === 0 ? 0 : 1;
}

export const run: Subcommand = (args) => flush(args);
