// The request path on its own: a RequestPath over a real cache set and a
// host object written here (the RequestHost, RequestAttachment and RequestSet
// interfaces of request.ts), with no Registry, no CachedDev and no writeback
// worker. It shows what the request path depends on and nothing more, and
// lets a test set the device's mode and state directly.

import { randomBytes } from 'node:crypto';
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MemoryBlockDevice } from '../../src/blockdev/memory.ts';
import { BackingIo } from '../../src/bcache/backing.ts';
import { CacheSet } from '../../src/bcache/cache-set.ts';
import { RequestPath, type RequestAttachment, type RequestHost } from '../../src/bcache/request.ts';
import { CacheAccounting } from '../../src/bcache/stats.ts';
import {
  BDEV_STATE_CLEAN,
  BDEV_STATE_DIRTY,
  CACHE_MODE_WRITEBACK,
  CACHE_MODE_WRITETHROUGH,
} from '../../src/format/constants.ts';
import { realClock } from '../../src/util/clock.ts';
import { deferred, RefCount } from '../../src/util/lifecycle.ts';
import { assertNothingLeft, formatCache } from './helpers.ts';
import { MiB, pattern } from './request-helpers.ts';

const S = 512;

/** A host whose fields a test may change, as the device's own state changes. */
type Host = { -readonly [K in keyof RequestHost]: RequestHost[K] };
const DATA_OFFSET = 16;
const INODE = 3;

/** A cache set, a backing device, and a host for the request path made of plain objects. */
async function rig(mode: number) {
  const cacheDev = new MemoryBlockDevice(48 * MiB, { name: 'cache' });
  await formatCache(cacheDev, { bucketSize: 128, blockSize: 8 });
  const cs = await CacheSet.open(cacheDev, { journalDelayMs: 5 });
  // What an attach does to the set before the first request: a uuid slot
  // (whose number is the device's inode), written out.
  const slot = cs.uuids.get(INODE);
  slot.uuid = randomBytes(16);
  await cs.writeUuids();
  const backing = new MemoryBlockDevice(8 * MiB, { name: 'backing' });
  const calls = { noteRequest: 0, dirtied: 0, markDirty: 0, drained: 0 };
  const set = {
    stats: new CacheAccounting(),
    noteRequest() {
      calls.noteRequest++;
    },
  };
  const att: RequestAttachment & { detaching: boolean } = {
    cs,
    inode: INODE,
    set,
    ref: new RefCount(() => {
      calls.drained++;
    }),
    lossDecided: deferred<boolean>(),
    detaching: false,
    ended: false,
    writeback: {
      overlapping: () => undefined,
      dirtied() {
        calls.dirtied++;
      },
    },
  };
  const host: Host = {
    name: 'bcache9',
    backing,
    backingName: backing.name,
    backingIo: new BackingIo(backing),
    sectors: backing.size / S - DATA_OFFSET,
    dataOffset: DATA_OFFSET,
    cacheMode: mode,
    state: BDEV_STATE_CLEAN,
    settings: { sequentialCutoff: 0, readahead: 0, ioDisable: false, cacheAdmission: 'always' },
    stats: new CacheAccounting(),
    stopTimeoutMs: 5000,
    clock: realClock,
    attachment: att,
    needsMarkDirty: true,
    async markDirty() {
      calls.markDirty++;
      host.state = BDEV_STATE_DIRTY;
      host.needsMarkDirty = false;
      return Promise.resolve();
    },
  };
  const request = new RequestPath(host);
  const stop = async (): Promise<void> => {
    assert.equal(await request.close(5000), true, 'nothing left in flight');
    await request.stopWorkers();
    await cs.stop();
    await backing.close();
  };
  return { cs, backing, host, att, set, calls, request, stop };
}

async function read(request: RequestPath, sector: number, sectors: number): Promise<Buffer> {
  const buf = Buffer.alloc(sectors * S);
  await request.read(buf, sector * S);
  return buf;
}

test('request path without a registry: writethrough writes both devices, misses fill, hits come from the cache', async () => {
  const r = await rig(CACHE_MODE_WRITETHROUGH);
  await r.request.write(pattern(1, 0, 8), 0, false);
  const raw = Buffer.alloc(8 * S);
  r.backing.readSync(raw, DATA_OFFSET * S);
  assert.deepEqual(raw, pattern(1, 0, 8), 'on the backing device, at the data offset');
  await r.request.flush();
  await r.request.settle();
  // The backing copy goes away: what reads back now can only be the cache's.
  r.backing.writeSync(Buffer.alloc(8 * S), DATA_OFFSET * S);
  assert.deepEqual(await read(r.request, 0, 8), pattern(1, 0, 8), 'a hit');
  assert.equal(r.host.stats.total.cacheHits, 1);
  assert.equal(r.set.stats.total.cacheHits, 1, 'the set counts it too');
  // A miss is read from the backing device and filled in after the reply.
  r.backing.writeSync(pattern(2, 64, 8), (DATA_OFFSET + 64) * S);
  assert.deepEqual(await read(r.request, 64, 8), pattern(2, 64, 8));
  assert.equal(r.host.stats.total.cacheMisses, 1);
  await r.request.settle();
  const keys = await r.cs.btree.keysIn(INODE, 0, 1 << 30);
  assert.deepEqual(
    keys.map((k) => [k.offset - k.size, k.offset, k.dirty]),
    [
      [DATA_OFFSET, DATA_OFFSET + 8, false],
      [DATA_OFFSET + 64, DATA_OFFSET + 72, false],
    ],
    'clean keys in key space (data offset included), under the host inode',
  );
  assert.ok(r.calls.noteRequest >= 4, 'every cached request tells the set');
  assert.equal(r.calls.markDirty, 0, 'writethrough never marks the superblock dirty');
  await r.stop();
  assertNothingLeft();
});

test('request path without a registry: writeback marks the host dirty first (R7), then keeps the data in the cache only', async () => {
  const r = await rig(CACHE_MODE_WRITEBACK);
  await r.request.write(pattern(3, 8, 8), 8 * S, false);
  await r.request.write(pattern(4, 16, 8), 16 * S, true);
  assert.equal(r.calls.markDirty, 1, 'once, before the first writeback write');
  assert.equal(r.calls.dirtied, 2, 'the writeback side hears of each');
  assert.equal(r.cs.dirtySectors(INODE), 16);
  const raw = Buffer.alloc(16 * S);
  r.backing.readSync(raw, (DATA_OFFSET + 8) * S);
  assert.deepEqual(raw, Buffer.alloc(16 * S), 'the backing device untouched');
  assert.deepEqual(await read(r.request, 8, 16), Buffer.concat([pattern(3, 8, 8), pattern(4, 16, 8)]));
  await r.stop();
  assertNothingLeft();
});

test('request path without a registry: no attachment, or a detaching one, means the backing device alone', async () => {
  const r = await rig(CACHE_MODE_WRITEBACK);
  r.att.detaching = true;
  await r.request.write(pattern(5, 0, 8), 0, false);
  assert.equal(r.calls.markDirty, 0, 'a detaching attachment bypasses the cache');
  assert.equal(r.host.stats.total.sectorsBypassed, 8);
  r.host.attachment = undefined;
  await r.request.write(pattern(6, 8, 8), 8 * S, false);
  assert.deepEqual(await read(r.request, 0, 16), Buffer.concat([pattern(5, 0, 8), pattern(6, 8, 8)]));
  assert.equal(r.cs.dirtySectors(INODE), 0);
  assert.deepEqual(await r.cs.btree.keysIn(INODE, 0, 1 << 30), [], 'nothing in the index');
  await r.stop();
  assertNothingLeft();
});
