// `ubcache ctl wait-clean [-d DEV] [--timeout SECONDS]`: wait until the
// dirty data of a bcache device (-d: bcacheN, its backing device, or a cache
// device or set uuid for every device attached to it; default: every
// registered device) has been written back: dirty_data 0 and state no
// longer dirty (the superblock marked clean). A progress bar on stderr
// follows dirty data down to zero.
//
// Exit status: 0 clean; 124 (timeout(1)'s) the timeout came first; 1 it
// cannot become clean here (a device went away, dirty data whose cache set
// is not registered, the daemon went away) or bad usage. The polling is a
// timer: the daemon has no "tell me when clean" endpoint, and a quarter of a
// second is nothing next to writeback.

import { setTimeout as delay } from 'node:timers/promises';
import { hprint } from '../../bcache/stats.ts';
import { CliError } from '../common.ts';
import type { TextStream } from '../output.ts';
import { Progress } from '../progress.ts';
import { DaemonUnreachable, type Control } from './connection.ts';
import { findDevice } from './devices.ts';
import { parseHprint, registered, selected, value, type Registered } from './tree-json.ts';

export const TIMEOUT_STATUS = 124;
const POLL_MS = 250;

export interface WaitCleanOptions {
  device?: string;
  timeoutSeconds?: number;
}

interface Measure {
  dirtyBytes: number;
  clean: boolean;
  /** "bcache0 12.0M dirty (state dirty)", for the timeout message. */
  detail: string;
}

function measure(reg: Registered, names: string[]): Measure {
  let dirtyBytes = 0;
  let clean = true;
  const details: string[] = [];
  for (const name of names) {
    const dev = reg.devices.find((d) => d.name === name);
    if (!dev) throw new CliError(`${name} went away (stopped or unregistered) before it was clean`);
    const dirtyText = value(dev.dir, 'dirty_data') ?? '0.0k';
    const dirty = parseHprint(dirtyText);
    if (!(dirty >= 0)) throw new CliError(`${name}: cannot read its dirty_data ("${dirtyText}")`);
    if (dev.state === 'dirty' && dev.attachedTo === undefined) {
      throw new CliError(`${name} has dirty data but is attached to no cache set: nothing can write it back`, {
        hint: 'Register its cache device (ubcache ctl register CACHEDEV); ubcache flush writes it back offline.',
      });
    }
    dirtyBytes += dirty;
    if (dirty > 0 || dev.state === 'dirty') {
      clean = false;
      details.push(`${name} ${dirtyText} dirty (state ${dev.state})`);
    }
  }
  return { dirtyBytes, clean, detail: details.join(', ') };
}

/** Why writeback may not be getting anywhere, for the timeout message. */
function stalls(reg: Registered, names: string[]): string | undefined {
  const notes: string[] = [];
  for (const d of reg.devices.filter((x) => names.includes(x.name))) {
    if (value(d.dir, 'writeback_running') === '0') {
      notes.push(
        `writeback_running is 0 on ${d.name}: nothing writes its dirty data back (ubcache ctl write block/${d.name}/bcache/writeback_running 1)`,
      );
    } else if (
      selected(value(d.dir, 'cache_mode') ?? '') === 'writeback' &&
      value(d.dir, 'writeback_percent') !== '0'
    ) {
      notes.push(
        `${d.name} writes back slowly while its dirty data is under writeback_percent and requests keep coming; set-cachemode ${d.name} writethrough (or writeback_percent 0) drains it at full speed`,
      );
    }
  }
  return notes.length > 0 ? notes.join('\n') : undefined;
}

async function snapshot(ctl: Control): Promise<Registered> {
  try {
    return registered(await ctl.json());
  } catch (err) {
    if (err instanceof DaemonUnreachable) throw new CliError(`the daemon has gone away while waiting: ${err.message}`);
    throw err;
  }
}

export async function waitClean(ctl: Control, o: WaitCleanOptions, out: TextStream, err: TextStream): Promise<void> {
  const started = Date.now();
  let reg = registered(await ctl.json());
  let names: string[];
  if (o.device === undefined) {
    names = reg.devices.map((d) => d.name);
  } else {
    const t = await findDevice(reg, o.device);
    names =
      t.kind === 'backing' ? [t.dev.name] : reg.devices.filter((d) => d.attachedTo === t.set.uuid).map((d) => d.name);
  }
  if (names.length === 0) {
    out.write(
      `nothing to wait for: no bcache device ${o.device === undefined ? 'is registered' : `uses ${o.device}`}\n`,
    );
    return;
  }
  let m = measure(reg, names);
  const initial = Math.max(m.dirtyBytes, 1);
  let progress: Progress | undefined;
  if (!m.clean) {
    err.write(`waiting for ${hprint(m.dirtyBytes)} of dirty data on ${names.join(', ')} to be written back\n`);
    progress = new Progress('writeback', initial, { stream: err });
  }
  while (!m.clean) {
    const elapsedMs = Date.now() - started;
    const timeoutMs = o.timeoutSeconds === undefined ? Infinity : o.timeoutSeconds * 1000;
    if (elapsedMs >= timeoutMs) {
      if (err.isTTY === true) err.write('\n');
      const why = stalls(reg, names);
      throw new CliError(
        `timed out after ${o.timeoutSeconds ?? 0} s, not clean: ${m.detail}`,
        why === undefined ? { status: TIMEOUT_STATUS } : { status: TIMEOUT_STATUS, hint: why },
      );
    }
    await delay(Math.min(POLL_MS, timeoutMs - elapsedMs));
    reg = await snapshot(ctl);
    m = measure(reg, names);
    progress?.update(Math.max(0, initial - m.dirtyBytes));
  }
  progress?.finish();
  out.write(`${names.join(', ')}: clean\n`);
}
