// SIGTERM ends `ubcache serve` within a bound whatever is stuck below: the
// built daemon with a backing device whose reads in one range never answer
// (`--fault BACKING:hold:read:range=...`, held until the device is closed), a
// client's read hanging there, short bounds on the command line. The daemon
// drops the client past --shutdown-timeout, the device gives up on the read
// past its bound and closes the backing device (which ends the read), the
// cache set stops cleanly, and the process exits 0 by itself; what was
// acknowledged before reads back after a restart. A second signal still
// exits at once.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { tempDir, type Daemon, type Exit } from '../helpers/daemon.ts';
import { RawNbdClient } from '../helpers/nbd-raw-client.ts';
import { Client, makeImages, MiB, startServe } from './serve-helpers.ts';

/** The data offset of `ubcache make -B`: bcache0's byte X is the backing device's X + 8 KiB. */
const DATA_OFFSET = 8192;
/** bcache0's region whose backing reads hang. */
const STUCK_AT = 4 * MiB;

/** The exit, or undefined if the process still runs after `ms` (a deadline, not a sleep). */
async function exitWithin(d: Daemon, ms: number): Promise<Exit | undefined> {
  let timer: NodeJS.Timeout | undefined;
  const r = await Promise.race([
    d.exited,
    new Promise<undefined>((resolve) => {
      timer = setTimeout(() => {
        resolve(undefined);
      }, ms);
    }),
  ]);
  clearTimeout(timer);
  return r;
}

function holdArgs(backing: string): string[] {
  return ['--fault', `${backing}:hold:read:range=${STUCK_AT + DATA_OFFSET}+1m`];
}

test('SIGTERM with a read stuck in the backing device: the daemon drops the client, gives up on the read and exits 0 within its bounds', async () => {
  using tmp = tempDir();
  const { cache, backing } = makeImages(tmp.dir);
  const s = await startServe(tmp.dir, [
    ...holdArgs(backing),
    '--shutdown-timeout',
    '500ms',
    '--stop-timeout',
    '300ms',
    cache,
    backing,
  ]);
  const block = Buffer.alloc(4096, 'acknowledged;');
  const unflushed = Buffer.alloc(4096, 'not flushed;');
  try {
    const c = await Client.connect(s.socket);
    await c.write(0, block);
    await c.flush();
    await c.write(4096, unflushed);
    const { client } = await RawNbdClient.open({ path: s.socket }, { name: 'bcache0', structured: true });
    const stuck = client.readAt(STUCK_AT, 4096).then(
      (r) => `answered (error ${r.error})`,
      () => 'connection closed',
    );
    // Requests are dispatched in order: once this read is answered, the stuck one is in the engine.
    assert.equal((await client.readAt(0, 4096)).error, 0);
    c.close();

    const t0 = Date.now();
    s.daemon.proc.kill('SIGTERM');
    // 0.5 s for the client, 0.6 s for the device's wait, then its flush and
    // close, the set's stop: a couple of seconds; 20 s is "not hung".
    const exit = await exitWithin(s.daemon, 20_000);
    const took = Date.now() - t0;
    assert.ok(exit, `SIGTERM: still running after 20 s; stderr:\n${s.daemon.stderr}`);
    assert.deepEqual(exit, { code: 0, signal: null }, s.daemon.stderr);
    assert.ok(took < 10_000, `SIGTERM took ${took} ms`);
    assert.equal(await stuck, 'connection closed', 'the stuck read got no answer: its client was dropped');
    const err = s.daemon.stderr;
    assert.match(
      err,
      /1 client\(s\) did not finish within the shutdown timeout; dropping them \(1 request\(s\) still in flight/,
    );
    assert.match(err, /bcache0 did not stop within 300 ms \(requests stuck below\); stopping cache set .* under them/);
    assert.match(err, /bcache0: 1 request\(s\) still in flight after 600 ms; stopping without them/);
    assert.match(err, /bcache_device_free\(\) bcache0 stopped/);
    assert.match(err, /cache_set_free\(\) Cache set .* unregistered/);
    assert.doesNotMatch(err, /stop gave up|shutdown did not finish/);
    assert.match(err, /ubcache: stopped$/m);
  } finally {
    await s.daemon.kill();
  }

  // A restart without the fault: everything acknowledged is there.
  const again = await startServe(tmp.dir, [cache, backing]);
  try {
    const c = await Client.connect(again.socket);
    assert.ok((await c.read(0, 4096)).equals(block), 'the flushed write');
    assert.ok((await c.read(4096, 4096)).equals(unflushed), 'the acknowledged write (the stop was clean)');
    assert.equal((await c.read(STUCK_AT, 4096)).length, 4096, 'the range that hung reads now');
    c.close();
  } finally {
    await again.daemon.stop().finally(() => again.daemon.kill());
  }
});

test('a second signal during a stuck shutdown exits at once', async () => {
  using tmp = tempDir();
  const { cache, backing } = makeImages(tmp.dir);
  // The default bounds: without the second signal this stop would take 30 s and more.
  const s = await startServe(tmp.dir, [...holdArgs(backing), cache, backing]);
  try {
    const { client } = await RawNbdClient.open({ path: s.socket }, { name: 'bcache0' });
    const stuck = client.readAt(STUCK_AT, 4096).then(
      () => 'answered',
      () => 'connection closed',
    );
    assert.equal((await client.readAt(0, 512)).error, 0);
    s.daemon.proc.kill('SIGTERM');
    await s.daemon.waitForLine(/SIGTERM: shutting down/);
    s.daemon.proc.kill('SIGINT');
    const exit = await exitWithin(s.daemon, 10_000);
    assert.deepEqual(exit, { code: 130, signal: null }, s.daemon.stderr);
    assert.match(s.daemon.stderr, /SIGINT again: exiting at once; requests in flight are abandoned/);
    assert.equal(await stuck, 'connection closed');
  } finally {
    await s.daemon.kill();
  }
});
