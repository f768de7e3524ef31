// `ubcache ctl`'s bcache-tools verbs, stats views and wait-clean through the
// built CLI against a real `ubcache serve`: show's rows follow the devices
// as they are registered, attached, detached and stopped; each verb's
// errors (unknown device, cache device where a backing one is needed, bad
// mode, already attached, daemon not running) exit 1 with the reason;
// stats --watch redraws until ^C and ends when the daemon goes away;
// wait-clean times out (124) while writeback is off and exits 0 once it has
// written everything back.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { sparseFile, tempDir, ubcache, UBCACHE, ROOT } from '../helpers/daemon.ts';
import { Client, makeImages, MiB, startServe } from './serve-helpers.ts';

interface Result {
  status: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** A running `ubcache ctl`, its output collected; `until` resolves once stdout matches. */
function startCtl(control: string, args: string[], cwd = ROOT) {
  const child = spawn(UBCACHE, ['ctl', '--control', control, ...args], { cwd, stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  const waiters: Array<{ re: RegExp; resolve: () => void }> = [];
  child.stdout.setEncoding('utf8').on('data', (t: string) => {
    stdout += t;
    for (const w of waiters.filter((x) => x.re.test(stdout))) {
      waiters.splice(waiters.indexOf(w), 1);
      w.resolve();
    }
  });
  child.stderr.setEncoding('utf8').on('data', (t: string) => (stderr += t));
  const done = new Promise<Result>((resolve, reject) => {
    child.on('error', reject);
    child.on('close', (status, signal) => {
      resolve({ status, signal, stdout, stderr });
    });
  });
  return {
    child,
    done,
    until: (re: RegExp): Promise<void> =>
      re.test(stdout)
        ? Promise.resolve()
        : Promise.race([
            new Promise<void>((resolve) => waiters.push({ re, resolve })),
            done.then((r) => {
              throw new Error(
                `ctl ${args.join(' ')} exited (${r.status}) before printing ${re}:\n${r.stdout}\n${r.stderr}`,
              );
            }),
          ]),
  };
}

function ctl(control: string, args: string[], cwd = ROOT): Promise<Result> {
  return startCtl(control, args, cwd).done;
}

/** ctl must succeed; its stdout. */
async function ok(control: string, ...args: string[]): Promise<string> {
  const r = await ctl(control, args);
  assert.equal(r.status, 0, `ctl ${args.join(' ')}: ${r.stderr}`);
  return r.stdout;
}

/** ctl must fail with `status` and a message matching `message`. */
async function fails(control: string, args: string[], message: RegExp, status = 1): Promise<void> {
  const r = await ctl(control, args);
  assert.equal(r.status, status, `ctl ${args.join(' ')} should exit ${status}:\n${r.stdout}\n${r.stderr}`);
  assert.match(r.stderr, message);
}

/** show's rows as cells (columns are two or more spaces apart), header first. */
function rows(show: string): string[][] {
  return show
    .trimEnd()
    .split('\n')
    .map((l) => l.split(/ {2,}/));
}

test('show, register, attach, set-cachemode, detach, stop and unregister; their errors', async () => {
  using tmp = tempDir();
  const { cache, backing } = makeImages(tmp.dir);
  const second = sparseFile(join(tmp.dir, 'second.img'), 32 * MiB);
  assert.equal(ubcache(['make', '-B', second]).status, 0);
  const control = join(tmp.dir, 'control.sock');

  // No daemon: every verb says so; show -d reads a device itself and needs none.
  await fails(control, ['show'], /cannot reach the control socket .*control\.sock.*\nIs ubcache serve running/);
  await fails(control, ['set-cachemode', 'bcache0', 'writeback'], /Is ubcache serve running/);
  const detail = await ok(control, 'show', '-d', second);
  assert.match(
    detail,
    /^sb\.magic\t\tok\nsb\.first_sector\t\t8\nsb\.csum\t\t\t[0-9A-F]+\nsb\.version\t\t1 \[backing device\]\n/,
  );
  assert.match(detail, /dev\.data\.cache_state\t0 \[detached\]\n\ncset\.uuid\t\t[0-9a-f-]{36}\n$/);
  await fails(control, ['show', '-d', join(tmp.dir, 'none.img')], /cannot open .*none\.img/);

  const s = await startServe(tmp.dir, ['--control', control, cache, backing]);
  try {
    assert.deepEqual(rows(await ok(control, 'show')), [
      ['Name', 'Type', 'State', 'Bname', 'AttachToDev'],
      [backing, '1 (data)', 'clean(running)', 'bcache0', cache],
      [cache, '3 (cache)', 'active', 'N/A', 'N/A'],
    ]);
    const setUuid = (await ok(control, 'ls')).split('\n').find((l) => /^[0-9a-f-]{36}$/.test(l)) ?? '';
    const more = rows(await ok(control, 'show', '-m'));
    assert.deepEqual(more[0], ['Name', 'Uuid', 'Cset_Uuid', 'Type', 'State', 'Bname', 'AttachToDev', 'AttachToCset']);
    const row = more[1];
    assert.ok(row);
    assert.deepEqual([row[2], row[7]], [setUuid, setUuid], 'Cset_Uuid and AttachToCset');
    assert.match(await ok(control, 'show', '-d', 'bcache0'), /dev\.data\.cache_state\t1 \[clean\]/);

    // register takes a path relative to ctl's directory, not the daemon's.
    assert.equal((await ctl(control, ['register', 'second.img'], tmp.dir)).status, 0);
    await s.daemon.waitForLine(/export bcache1 added/);
    assert.deepEqual(rows(await ok(control, 'show'))[2], [second, '1 (data)', 'no cache(running)', 'bcache1', 'Alone']);
    await fails(control, ['register', second], /register .*second\.img: .*device already registered \(EBUSY\)/);
    await fails(control, ['register', join(tmp.dir, 'none.img')], /failed to open device/);

    // attach by the cache device's path; errors: already attached, not a cache, unknown.
    await fails(control, ['attach', backing, second], /attach: .*backing\.img is not a cache device/);
    await ok(control, 'attach', cache, second);
    assert.deepEqual(rows(await ok(control, 'show'))[2], [second, '1 (data)', 'clean(running)', 'bcache1', cache]);
    await fails(
      control,
      ['attach', setUuid, 'bcache1'],
      /attach: bcache1 \(bcache1\) is attached to cache set .* already\nDetach it first/,
    );
    await fails(control, ['attach', setUuid, join(tmp.dir, 'nope.img')], /nope\.img: no such device is registered/);

    // set-cachemode by uuid of the backing device; bad mode; a cache device.
    const secondUuid = rows(await ok(control, 'show', '-m'))[2]?.[1] ?? '';
    await ok(control, 'set-cachemode', secondUuid, 'writeback');
    assert.equal(
      await ok(control, 'cat', 'block/bcache1/bcache/cache_mode'),
      'writethrough [writeback] writearound none\n',
    );
    await fails(
      control,
      ['set-cachemode', 'bcache1', 'fast'],
      /set-cachemode bcache1: cache_mode: "fast" is not one of: writethrough, writeback, writearound, none \(EINVAL\)/,
    );
    await fails(control, ['set-cachemode', cache, 'writeback'], /cache\.img is a cache device; only a backing device/);
    await fails(control, ['set-cachemode', 'bcache1'], /usage: ubcache ctl set-cachemode DEV/);
    await fails(control, ['frobnicate'], /unknown command 'frobnicate'/);
    await fails(control, ['show', '--bogus'], /show: Unknown option '--bogus'/);

    // detach, then detach again (nothing to do), then stop by path.
    await ok(control, 'detach', '/dev/bcache1');
    await s.daemon.waitForLine(/Caching disabled for .*second\.img/);
    assert.deepEqual(rows(await ok(control, 'show'))[2], [second, '1 (data)', 'no cache(running)', 'bcache1', 'Alone']);
    const again = await ctl(control, ['detach', 'bcache1']);
    assert.equal(again.status, 0);
    assert.match(again.stderr, /bcache1 \(bcache1\) is not attached to a cache set; nothing to do/);
    await fails(control, ['detach', cache], /detach: .*cache\.img is a cache device/);
    await ok(control, 'stop', second);
    await s.daemon.waitForLine(/export bcache1 removed/);
    assert.equal(rows(await ok(control, 'show')).length, 3);
    await fails(control, ['stop', 'bcache1'], /bcache1: no such device is registered/);

    // unregister the cache device: its set goes, bcache0 is detached and keeps running.
    await ok(control, 'unregister', cache);
    await s.daemon.waitForLine(/Cache set .* unregistered/);
    assert.deepEqual(rows(await ok(control, 'show')), [
      ['Name', 'Type', 'State', 'Bname', 'AttachToDev'],
      [backing, '1 (data)', 'no cache(running)', 'bcache0', 'Alone'],
    ]);
    await fails(control, ['unregister', cache], /cache\.img: no such device is registered/);
  } finally {
    await s.daemon.stop().finally(() => s.daemon.kill());
  }
});

test('stats by period, --json and --watch; wait-clean: timeout, then clean', async () => {
  using tmp = tempDir();
  const { cache, backing } = makeImages(tmp.dir, { args: ['--writeback'] });
  const control = join(tmp.dir, 'control.sock');
  const s = await startServe(tmp.dir, [
    '--control',
    control,
    // Writeback held off; no sequential bypass, so that all 4 MiB written is dirty data.
    '--set',
    'bcache0.writeback_running=0',
    '--set',
    'bcache0.sequential_cutoff=0',
    cache,
    backing,
  ]);
  try {
    // 4 MiB of dirty data, read back: hits.
    const c = await Client.connect(s.socket, 'bcache0');
    const data = Buffer.alloc(MiB, 0x5a);
    for (let i = 0; i < 4; i++) await c.write(i * MiB, data);
    for (let i = 0; i < 4; i++) assert.ok((await c.read(i * MiB, MiB)).equals(data));
    c.close();

    const json = JSON.parse(await ok(control, 'stats', '--total', '--json')) as {
      devices: Record<string, Record<string, Record<string, unknown>>>;
      sets: Record<string, Record<string, Record<string, unknown>>>;
    };
    assert.deepEqual(Object.keys(json.devices), ['bcache0']);
    assert.deepEqual(Object.keys(json.devices['bcache0'] ?? {}), ['total']);
    const total = json.devices['bcache0']?.['total'];
    assert.equal(typeof total?.['cache_hits'], 'number');
    assert.ok(Number(total?.['cache_hits']) > 0, 'the reads hit');
    assert.equal(total?.['cache_misses'], 0);
    assert.equal(Object.keys(json.sets).length, 1);
    const hour = rows(await ok(control, 'stats', '--hour'));
    assert.deepEqual(hour[0]?.slice(0, 3), ['OBJECT', 'PERIOD', 'HITS']);
    assert.deepEqual(
      hour.slice(1).map((r) => r[1]),
      ['hour', 'hour'],
    );
    assert.equal(rows(await ok(control, 'stats')).length, 1 + 2 * 4, 'all four periods of bcache0 and its set');
    await fails(control, ['stats', '--day', '--total'], /choose one of --total, --day, --hour, --five-minute/);
    await fails(control, ['stats', '--watch', 'soon'], /--watch soon: give a number of seconds/);

    // --watch redraws until ^C.
    const watch = startCtl(control, ['stats', '--watch', '0.1', '--five-minute']);
    await watch.until(/(Every 0\.1s: ubcache ctl stats[^]*){2}/);
    watch.child.kill('SIGINT');
    const watched = await watch.done;
    assert.equal(watched.status, 0, watched.stderr);
    assert.match(watched.stdout, /bcache0 +five_minute +\d+/);

    // Writeback off: wait-clean times out, says how much is dirty and why.
    await fails(
      control,
      ['wait-clean', '-d', backing, '--timeout', '0.3'],
      /timed out after 0\.3 s, not clean: bcache0 4\.0M dirty \(state dirty\)\nwriteback_running is 0 on bcache0/,
      124,
    );
    await fails(control, ['wait-clean', '-d', 'bcache7'], /bcache7: no such device is registered/);
    await fails(control, ['wait-clean', '--timeout', '0'], /--timeout 0: give a number of seconds/);

    // Writeback on: wait-clean, started before, exits 0 once everything is on the backing device.
    const wait = startCtl(control, ['wait-clean', '-d', 'bcache0']);
    for (const [name, v] of [
      ['writeback_percent', '0'],
      ['writeback_delay', '0'],
      ['writeback_running', '1'],
    ] as const) {
      await ok(control, 'write', `block/bcache0/bcache/${name}`, v);
    }
    const waited = await wait.done;
    assert.equal(waited.status, 0, waited.stderr);
    assert.equal(waited.stdout, 'bcache0: clean\n');
    assert.match(waited.stderr, /waiting for 4\.0M of dirty data on bcache0 to be written back/);
    assert.equal(await ok(control, 'cat', 'block/bcache0/bcache/state'), 'clean\n');
    assert.equal((await ctl(control, ['wait-clean', '--timeout', '0.1'])).stdout, 'bcache0: clean\n');

    // The live view ends, failing, when the daemon goes away.
    const orphan = startCtl(control, ['stats', '--watch', '0.1', '--json']);
    await orphan.until(/\{"devices"/);
    await s.daemon.stop();
    const ended = await orphan.done;
    assert.equal(ended.status, 1);
    assert.match(ended.stderr, /the daemon has gone away: cannot reach the control socket/);
    await fails(control, ['wait-clean'], /cannot reach the control socket/);
  } finally {
    await s.daemon.kill();
  }
});
