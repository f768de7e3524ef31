// ctl's reading of the attribute tree's JSON: bch_hprint's text back to
// bytes (wait-clean's progress), which registered device a DEV names, and
// flash-only volumes told from backing devices (status lists them).

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { hprint } from '../../src/bcache/stats.ts';
import { findDevice } from '../../src/cli/ctl/devices.ts';
import { status } from '../../src/cli/ctl/status.ts';
import { parseHprint, registered, type Json, type JsonObject } from '../../src/cli/ctl/tree-json.ts';

test('parseHprint reads what hprint prints, to within its rounding', () => {
  for (const bytes of [0, 512, 4096, 1.5 * 2 ** 20, 3 * 2 ** 30 + 12345, 7 * 2 ** 40]) {
    const back = parseHprint(hprint(bytes));
    assert.ok(Math.abs(back - bytes) <= bytes / 100 + 1, `${bytes} -> ${hprint(bytes)} -> ${back}`);
  }
  assert.equal(parseHprint('0.0k'), 0);
  assert.equal(parseHprint('0.5k'), 512);
  assert.ok(Number.isNaN(parseHprint('4M')));
  assert.ok(Number.isNaN(parseHprint('')));
});

const SET = '6e0f4c3a-3a4d-4c89-9d25-5a8a7e8e5f11';
const DEV = '0b7e4a52-1f3e-4d7e-8b0e-6b2f9c1d2e3f';
const tree: Json = {
  fs: {
    bcache: {
      register: null,
      [SET]: {
        cache0: { dev_path: '/srv/cache.img' },
        bdev0: { $link: '/sys/block/bcache0/bcache' },
        volume1: { $link: '/sys/block/bcache2/bcache' },
      },
    },
  },
  block: {
    bcache0: {
      bcache: {
        backing_dev_path: '/srv/disk.img',
        backing_dev_name: 'disk.img',
        backing_dev_uuid: DEV,
        running: '1',
        state: 'clean',
        cache: { $link: `/sys/fs/bcache/${SET}` },
      },
      size: '1000',
    },
    bcache1: {
      bcache: {
        backing_dev_path: 'nbd+unix:///d?socket=/run/s',
        backing_dev_uuid: 'x',
        running: '0',
        state: 'no cache',
      },
    },
    // A flash-only volume: the kernel's three files, nothing that says "backing".
    bcache2: { bcache: { unregister: null, label: 'scratch', size: '16.0M' }, size: '32768' },
  },
};

test('registered(): devices with their paths and attachment, sets with their cache device', () => {
  const reg = registered(tree);
  assert.deepEqual(
    reg.devices.map((d) => [d.name, d.path, d.running, d.state, d.attachedTo]),
    [
      ['bcache0', '/srv/disk.img', true, 'clean', SET],
      ['bcache1', 'nbd+unix:///d?socket=/run/s', false, 'no cache', undefined],
    ],
  );
  assert.deepEqual(
    reg.sets.map((s) => [s.uuid, s.cachePath]),
    [[SET, '/srv/cache.img']],
  );
  assert.deepEqual(
    reg.volumes.map((v) => [v.name, v.set, v.slot]),
    [['bcache2', SET, 1]],
    'the volume, by its set link, and not among the backing devices',
  );
});

test('status: a table of flash-only volumes when there are some', () => {
  const out = status(tree);
  assert.match(out, /^VOLUME\s+SET\s+SLOT\s+SIZE\s+LABEL$/m);
  assert.match(out, new RegExp(`^bcache2\\s+${SET}\\s+1\\s+16\\.0M\\s+scratch$`, 'm'));
  assert.doesNotMatch(out, /^bcache2\s+(yes|no)/m, 'not in the backing devices table');
  // Gone from block/ (its set link left behind): no table, nothing else changes.
  const none = structuredClone<JsonObject>(tree);
  delete (none['block'] as JsonObject)['bcache2'];
  assert.deepEqual(registered(none).volumes, []);
  assert.doesNotMatch(status(none), /VOLUME/);
});

test('findDevice(): by bcacheN, /dev/bcacheN, uuid, path or URI; an unknown one is refused', async () => {
  const reg = registered(tree);
  const name = async (spec: string): Promise<string> => {
    const t = await findDevice(reg, spec);
    return t.kind === 'backing' ? t.dev.name : `set ${t.set.uuid}`;
  };
  assert.equal(await name('bcache0'), 'bcache0');
  assert.equal(await name('/dev/bcache1'), 'bcache1');
  assert.equal(await name(DEV.toUpperCase()), 'bcache0');
  assert.equal(await name(SET), `set ${SET}`);
  assert.equal(await name('/srv/disk.img'), 'bcache0');
  assert.equal(await name('/srv/../srv/cache.img'), `set ${SET}`);
  assert.equal(await name('nbd+unix:///d?socket=/run/s'), 'bcache1');
  await assert.rejects(findDevice(reg, 'bcache9'), /bcache9: no such device is registered/);
  await assert.rejects(findDevice(reg, '/srv/other.img'), /other\.img: no such device is registered/);
});
