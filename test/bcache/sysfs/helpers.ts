// A registry over memory devices that can also register by "path" (a name
// in a table), and the attribute tree over it.

import { randomBytes } from 'node:crypto';
import assert from 'node:assert/strict';
import { MemoryBlockDevice } from '../../../src/blockdev/memory.ts';
import type { BlockDevice } from '../../../src/blockdev/types.ts';
import { Registry } from '../../../src/bcache/registry.ts';
import { SysfsTree } from '../../../src/bcache/sysfs/tree.ts';
import { SysfsError } from '../../../src/bcache/sysfs/node.ts';
import type { CachedDevSettings } from '../../../src/bcache/cached-dev.ts';
import { formatCache } from '../helpers.ts';
import { formatBacking, MiB } from '../request-helpers.ts';

export interface Rig {
  registry: Registry;
  tree: SysfsTree;
  devices: Map<string, BlockDevice>;
  setUuid: Buffer;
  setText: string;
}

/** Memory devices by name: "cache", "backing" (formatted for one set), more via addBacking. */
export async function makeRig(
  o: { settings?: Partial<CachedDevSettings>; journalDelayMs?: number } = {},
): Promise<Rig> {
  const setUuid = randomBytes(16);
  const devices = new Map<string, BlockDevice>();
  const cache = new MemoryBlockDevice(48 * MiB, { name: 'cache' });
  const backing = new MemoryBlockDevice(16 * MiB, { name: 'backing' });
  await formatCache(cache, { bucketSize: 128, blockSize: 8, setUuid });
  await formatBacking(backing, { setUuid });
  devices.set('cache', cache);
  devices.set('backing', backing);
  const open = new Set<string>();
  const registry = new Registry({
    setOptions: { journalDelayMs: o.journalDelayMs ?? 5 },
    deviceSettings: () => ({ writebackDelay: 0, ...o.settings }),
    open: (path) => {
      const d = devices.get(path);
      if (!d) return Promise.reject(Object.assign(new Error(`${path}: no such file`), { code: 'ENOENT' }));
      if (open.has(path)) return Promise.reject(Object.assign(new Error(`${path} is locked`), { code: 'EBUSY' }));
      open.add(path);
      // Closing releases the "lock", as the real exclusive open does.
      const close = d.close.bind(d);
      return Promise.resolve(
        Object.assign(Object.create(d) as BlockDevice, {
          close: async () => {
            open.delete(path);
            await close();
          },
        }),
      );
    },
  });
  const tree = new SysfsTree(registry);
  const setText = [...setUuid].map((b) => b.toString(16).padStart(2, '0')).join('');
  const rig = { registry, tree, devices, setUuid, setText };
  return rig;
}

/** Write and expect the kernel's errno; the message must say something. */
export async function refused(
  tree: SysfsTree,
  path: string,
  value: string,
  code: string,
  pattern?: RegExp,
): Promise<void> {
  await assert.rejects(tree.write(path, value), (err: unknown) => {
    assert.ok(err instanceof SysfsError, `a SysfsError, got ${String(err)}`);
    assert.equal(err.code, code, err.message);
    if (pattern) assert.match(err.message, pattern);
    return true;
  });
}
