// Runtime operations through the tree and the registry's watchers: attach by
// set uuid, two-phase detach (dirty data written back first, then "no
// cache" and passthrough), stop, unregister and stop of a set; watchers hear
// of every start and stop, also a stop() called directly on the objects.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { CachedDev } from '../../../src/bcache/cached-dev.ts';
import type { RegisteredSet } from '../../../src/bcache/registry.ts';
import { assertNothingLeft } from '../helpers.ts';
import { pattern } from '../request-helpers.ts';
import { makeRig, type Rig } from './helpers.ts';

const D = '/sys/block/bcache0/bcache';

function recorder(rig: Rig): string[] {
  const events: string[] = [];
  rig.registry.watch({
    deviceRunning: (d: CachedDev) => events.push(`running ${d.name}`),
    deviceStopped: (d: CachedDev) => events.push(`stopped ${d.name}`),
    setRegistered: (s: RegisteredSet) => events.push(`set ${s.uuid.slice(0, 4)}`),
    setGone: (s: RegisteredSet) => events.push(`gone ${s.uuid.slice(0, 4)}`),
  });
  return events;
}

test('detach writes dirty data back, then "no cache"; attach by uuid caches again', async () => {
  const rig = await makeRig({ settings: { writebackRunning: false } });
  const events = recorder(rig);
  const t = rig.tree;
  await t.write('/sys/fs/bcache/register', 'backing\n');
  assert.deepEqual(t.list('/sys/block'), ['bcache0']);
  // A backing device never attached (state NONE) runs at once, uncached.
  assert.equal(t.read(`${D}/running`), '1\n');
  assert.equal(t.read(`${D}/state`), 'no cache\n');
  await t.write('/sys/fs/bcache/register', 'cache');
  const dev = rig.registry.devices[0];
  const set = [...rig.registry.sets.values()][0];
  assert.ok(dev && set);
  const id = set.uuid.slice(0, 4);
  assert.deepEqual(events, ['running bcache0', 'set ' + id]);
  assert.equal(t.read(`${D}/state`), 'clean\n', 'attached when its set came');
  await t.write(`${D}/cache_mode`, 'writeback');
  await dev.device.write(pattern(7, 0, 128), 0);
  assert.equal(t.read(`${D}/state`), 'dirty\n');

  // Writeback is off, but a detach writes back at full speed anyway.
  await t.write(`${D}/detach`, '1');
  await dev.detach();
  assert.equal(t.read(`${D}/state`), 'no cache\n');
  assert.equal(t.read(`${D}/running`), '1\n', 'keeps serving');
  assert.ok(!t.list(`/sys/fs/bcache/${set.uuid}`).some((n) => n.startsWith('bdev')));
  const back = Buffer.alloc(128 * 512);
  await dev.device.read(back, 0);
  assert.deepEqual(back, pattern(7, 0, 128), 'the data is on the backing device');

  // Attach again by the set's uuid (hex without dashes is accepted as the kernel does).
  await t.write(`${D}/attach`, `${rig.setText}\n`);
  assert.equal(t.read(`${D}/state`), 'clean\n');
  assert.ok(t.list(`/sys/fs/bcache/${set.uuid}`).includes('bdev1'), 'a fresh uuid slot');
  await rig.tree.stop();
  await rig.registry.stopAll();
  assert.deepEqual(events, ['running bcache0', 'set ' + id, 'stopped bcache0', 'gone ' + id]);
  assert.ok(rig.registry.empty);
  assertNothingLeft();
});

test('stop a device, unregister a set, stop a set; watchers hear direct stops too', async () => {
  const rig = await makeRig();
  const events = recorder(rig);
  const t = rig.tree;
  await t.write('/sys/fs/bcache/register', 'cache');
  await t.write('/sys/fs/bcache/register', 'backing');
  const set = [...rig.registry.sets.values()][0];
  const dev = rig.registry.devices[0];
  assert.ok(set && dev);
  const id = set.uuid.slice(0, 4);

  // unregister: the device is detached and keeps running, the set goes.
  const gone = new Promise<void>((resolve) =>
    rig.registry.watch({
      setGone: () => {
        resolve();
      },
    }),
  );
  await t.write(`/sys/fs/bcache/${set.uuid}/unregister`, '1');
  await gone;
  assert.equal(t.read(`${D}/state`), 'no cache\n');
  assert.deepEqual(t.list('/sys/fs/bcache'), ['register', 'register_quiet', 'pendings_cleanup']);

  // stop: the device goes, and with it the last object: the registry is empty.
  const stopped = new Promise<void>((resolve) =>
    rig.registry.watch({
      deviceStopped: () => {
        resolve();
      },
    }),
  );
  await t.write(`${D}/stop`, '1');
  await stopped;
  assert.deepEqual(t.list('/sys/block'), []);
  assert.ok(rig.registry.empty);
  assert.deepEqual(events, [`set ${id}`, 'running bcache0', `gone ${id}`, 'stopped bcache0']);
  await rig.tree.stop();
  assertNothingLeft();
});

test('a set stopped by its own stop() (the failure path) is forgotten; stop via the tree stops its devices', async () => {
  const rig = await makeRig();
  const events = recorder(rig);
  await rig.registry.registerPath('cache');
  await rig.registry.registerPath('backing');
  const set = [...rig.registry.sets.values()][0];
  const dev = rig.registry.devices[0];
  assert.ok(set && dev);
  await dev.stop();
  assert.deepEqual(events.slice(-1), ['stopped bcache0']);
  await set.cs.stop();
  assert.deepEqual(events.slice(-1), [`gone ${set.uuid.slice(0, 4)}`]);
  assert.ok(rig.registry.empty);
  await rig.tree.stop();
  assertNothingLeft();
});
