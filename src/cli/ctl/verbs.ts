// bcache-tools' device verbs, each the sysfs write `bcache` does:
//
//   register DEV...          echo DEV > /sys/fs/bcache/register
//   unregister DEV           a backing device: echo 1 > bcache/stop;
//                            a cache device: echo 1 > /sys/fs/bcache/SET/unregister
//   attach CSET|CACHEDEV DEV echo SET > bcache/attach
//   detach DEV               echo 1 > bcache/detach
//   set-cachemode DEV MODE   echo MODE > bcache/cache_mode
//   stop DEV                 a backing device: echo 1 > bcache/stop;
//                            a cache device: echo 1 > /sys/fs/bcache/SET/stop
//
// As with the kernel's files, detach, stop and unregister return once the
// operation has started (detach writes dirty data back first: `ubcache ctl
// wait-clean` waits for that). The daemon refuses what the kernel refuses,
// with its errno; the message is printed and the exit status is 1.

import { CliError } from '../common.ts';
import type { Control } from './connection.ts';
import { absoluteSpec, findBacking, findDevice, isUuid } from './devices.ts';
import { registered, type BackingDevice } from './tree-json.ts';

const dir = (d: BackingDevice): string => `/sys/block/${d.name}/bcache`;

export async function register(ctl: Control, specs: string[]): Promise<void> {
  for (const spec of specs) {
    // The daemon opens the path from its own directory: send it absolute.
    await ctl.write('/sys/fs/bcache/register', absoluteSpec(spec), `register ${spec}`);
  }
}

export async function unregister(ctl: Control, spec: string, verb: 'unregister' | 'stop'): Promise<void> {
  const t = await findDevice(registered(await ctl.json()), spec);
  if (t.kind === 'backing') await ctl.write(`${dir(t.dev)}/stop`, '1', `${verb} ${spec}`);
  else await ctl.write(`/sys/fs/bcache/${t.set.uuid}/${verb}`, '1', `${verb} ${spec}`);
}

export async function attach(ctl: Control, to: string, spec: string): Promise<void> {
  const reg = registered(await ctl.json());
  const dev = await findBacking(reg, spec, 'attach');
  let set: string;
  if (isUuid(to)) {
    set = to.toLowerCase();
  } else {
    const t = await findDevice(reg, to);
    if (t.kind !== 'cache')
      throw new CliError(`attach: ${to} is not a cache device; give a cache device or a set uuid`);
    set = t.set.uuid;
  }
  if (dev.attachedTo !== undefined) {
    throw new CliError(`attach: ${spec} (${dev.name}) is attached to cache set ${dev.attachedTo} already`, {
      hint: `Detach it first: ubcache ctl detach ${spec}`,
    });
  }
  await ctl.write(`${dir(dev)}/attach`, set, `attach ${spec} to ${set}`);
}

/** Returns a note when there was nothing to do. */
export async function detach(ctl: Control, spec: string): Promise<string | undefined> {
  const dev = await findBacking(registered(await ctl.json()), spec, 'detach');
  if (dev.attachedTo === undefined) return `${spec} (${dev.name}) is not attached to a cache set; nothing to do`;
  await ctl.write(`${dir(dev)}/detach`, '1', `detach ${spec}`);
  return undefined;
}

export async function setCacheMode(ctl: Control, spec: string, mode: string): Promise<void> {
  const dev = await findBacking(registered(await ctl.json()), spec, 'set-cachemode');
  await ctl.write(`${dir(dev)}/cache_mode`, mode, `set-cachemode ${spec}`);
}
