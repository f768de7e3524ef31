// `npm run demo` on a machine with nothing but Node and the built tree: run
// with a PATH that holds only node, npm and sh (symlinks in a temp dir), so
// libnbd's nbdinfo and nbdcopy, and every other tool from apt, cannot be
// found (sh too, which npm runs scripts with), and check the key lines of what it shows: dirty data in the cache
// only, misses then hits with their figures and the hit ratio, the restart
// with the data still there, writeback, and the disk's export holding it all.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, realpathSync, symlinkSync } from 'node:fs';
import { join } from 'node:path';
import { ROOT, tempDir } from '../helpers/daemon.ts';

/** The real path of `cmd` on the current PATH, if any. */
function which(cmd: string): string | undefined {
  const r = spawnSync('/bin/sh', ['-c', `command -v ${cmd}`], { encoding: 'utf8' });
  const path = r.stdout.trim();
  return r.status === 0 && path.startsWith('/') ? realpathSync(path) : undefined;
}

test('npm run demo with only node and npm on PATH (no libnbd tools)', { timeout: 180_000 }, async () => {
  assert.ok(existsSync(join(ROOT, 'dist', 'cli', 'main.js')), 'dist/ is built (npm test builds it)');
  using t = tempDir('ubcache-demo-path-');
  symlinkSync(process.execPath, join(t.dir, 'node'));
  const npm = which('npm');
  if (npm !== undefined) symlinkSync(npm, join(t.dir, 'npm'));
  // npm runs scripts with sh from PATH.
  symlinkSync(realpathSync('/bin/sh'), join(t.dir, 'sh'));
  const env: NodeJS.ProcessEnv = { HOME: process.env['HOME'] ?? t.dir, PATH: t.dir, LANG: 'C' };
  const hidden = spawnSync('/bin/sh', ['-c', 'command -v nbdinfo || command -v nbdcopy || command -v qemu-img'], {
    env,
    encoding: 'utf8',
  });
  assert.notEqual(hidden.status, 0, `no libnbd tool on the demo's PATH: ${hidden.stdout}`);

  const [cmd, args] = npm !== undefined ? ['npm', ['run', 'demo']] : ['node', ['scripts/demo.mjs']];
  const started = Date.now();
  const r = await new Promise<{ status: number | null; out: string }>((resolve, reject) => {
    const child = spawn(join(t.dir, cmd), args, { cwd: ROOT, env, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (out += d));
    child.on('error', reject);
    child.on('close', (status) => {
      resolve({ status, out });
    });
  });
  const seconds = (Date.now() - started) / 1000;
  const out = r.out;
  assert.equal(r.status, 0, out);
  assert.doesNotMatch(out, /nbdinfo is missing|command not found|not found/i, out);
  // Dirty data, in the cache only.
  assert.match(out, /bcache0 state: dirty, dirty_data: 16\.0M/, out);
  assert.match(out, /the slow disk does not hold it: it is dirty data, in the cache only/, out);
  // Misses, then hits, with figures (fills land after the reply: a last few may still be misses).
  const cold =
    /first pass +\(misses, from the slow disk\): (\d+) IOPS, mean latency ([\d.]+) ms, p99 [\d.]+ ms; hits (\d+), misses (\d+)/.exec(
      out,
    );
  const warm =
    /second pass \(hits, from the cache\): +(\d+) IOPS, mean latency ([\d.]+) ms, p99 [\d.]+ ms; hits (\d+), misses (\d+)/.exec(
      out,
    );
  assert.ok(cold && warm, out);
  assert.equal(Number(cold[3]), 0, 'first pass: no hit');
  assert.equal(Number(cold[4]), 2048, 'first pass: every read a miss');
  assert.ok(Number(warm[3]) >= 2000, `second pass: hits ${warm[3]}`);
  assert.ok(Number(warm[2]) < Number(cold[2]), 'hits are faster than misses');
  assert.match(out, /every read returned the disk's data/);
  assert.match(out, /hit ratio \(sysfs stats_total\/cache_hit_ratio\): (49|50)%/, out);
  assert.match(out, /bcache0 +yes +dirty +writeback +16\.0M/, out);
  // The restart: the superblock says dirty, the data is served from the cache.
  assert.match(out, /dev\.data\.cache_state\t2 \[dirty\]/, out);
  assert.match(out, /journal replay done/, out);
  assert.match(out, /reads back the 16\.0 MiB written before the restart, identical, .*\(hits 16, misses 0\)/, out);
  // Writeback, and the disk alone holds everything.
  assert.match(out, /written back to the slow disk in [\d.]+ s/, out);
  assert.match(out, /marked clean/, out);
  assert.match(out, /the disk holds the 16\.0 MiB written through the cache, and its own 8\.0 MiB, unchanged/, out);
  assert.match(out, /dev\.data\.cache_state\t1 \[clean\]/, out);
  const done = /demo done in ([\d.]+) s/.exec(out);
  assert.ok(done, out);
  // Under 30 s on an ordinary machine; a loaded CI runner gets slack.
  assert.ok(seconds < 120, `the demo took ${seconds} s`);
});
