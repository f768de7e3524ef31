// Which registered device a DEV on the command line names. bcache-tools
// takes /dev paths and reads their superblocks; ctl takes, in this order:
// bcacheN (or /dev/bcacheN), a backing device's or a cache set's uuid, the
// device's path or URI as it was registered (relative paths are taken from
// ctl's own directory; symlinks are followed), and last the uuid in the
// superblock found at that path (a file registered under another name).

import { realpathSync } from 'node:fs';
import { resolve } from 'node:path';
import { CliError } from '../common.ts';
import type { BackingDevice, CacheSetEntry, Registered } from './tree-json.ts';

export type Target = { kind: 'backing'; dev: BackingDevice } | { kind: 'cache'; set: CacheSetEntry };

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

/** A spec with a scheme (nbd://, nbd+unix://, faulty:...) is kept as it is; a path is made absolute. */
export function absoluteSpec(spec: string): string {
  return /^[a-z][a-z0-9+.-]*:/i.test(spec) ? spec : resolve(spec);
}

function real(path: string): string {
  try {
    return realpathSync(path);
  } catch {
    return path;
  }
}

export function isUuid(text: string): boolean {
  return UUID.test(text);
}

/** The registered device or cache set `spec` names; a CliError saying so if none. */
export async function findDevice(reg: Registered, spec: string): Promise<Target> {
  const name = spec.replace(/^\/dev\//, '');
  const byName = reg.devices.find((d) => d.name === name);
  if (/^bcache\d+$/.test(name) && byName) return { kind: 'backing', dev: byName };
  if (isUuid(spec)) {
    const uuid = spec.toLowerCase();
    const dev = reg.devices.find((d) => d.uuid === uuid);
    if (dev) return { kind: 'backing', dev };
    const set = reg.sets.find((s) => s.uuid === uuid);
    if (set) return { kind: 'cache', set };
    throw notRegistered(spec);
  }
  const abs = absoluteSpec(spec);
  const same = (p: string): boolean => p === abs || p === spec || real(p) === real(abs);
  const dev = reg.devices.find((d) => same(d.path));
  if (dev) return { kind: 'backing', dev };
  const set = reg.sets.find((s) => same(s.cachePath));
  if (set) return { kind: 'cache', set };
  // Loaded only now: reading a device pulls in the device and NBD code.
  const sb = await (await import('./superblock.ts')).superblockIdentity(abs);
  if (sb?.kind === 'data') {
    const d = reg.devices.find((x) => x.uuid === sb.uuid);
    if (d) return { kind: 'backing', dev: d };
  } else if (sb?.kind === 'cache') {
    const s = reg.sets.find((x) => x.uuid === sb.setUuid);
    if (s) return { kind: 'cache', set: s };
  }
  throw notRegistered(spec);
}

function notRegistered(spec: string): CliError {
  return new CliError(`${spec}: no such device is registered with this ubcache serve`, {
    hint: "'ubcache ctl show' lists the registered devices; 'ubcache ctl register DEV' registers one.",
  });
}

/** findDevice() for a verb that takes backing devices only (attach, detach, set-cachemode). */
export async function findBacking(reg: Registered, spec: string, verb: string): Promise<BackingDevice> {
  const t = await findDevice(reg, spec);
  if (t.kind !== 'backing') {
    throw new CliError(`${verb}: ${spec} is a cache device; only a backing device is supported`, {
      hint: `Name the backing device (bcacheN, its path or its uuid); 'ubcache ctl show' lists them.`,
    });
  }
  return t.dev;
}
