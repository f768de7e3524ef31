#!/usr/bin/env node
// The ubcache demo (`npm run demo`, after `npm ci`): a cache in front of a
// slow disk, with nothing installed but Node and the built tree (dist/).
//
//   1. `ubcache make` formats a 64 MiB cache image and a 128 MiB backing
//      image together, in writeback mode.
//   2. The slow disk: `ubcache export --delay 5ms` serves the backing image
//      with 5 ms added to every read and write; 8 MiB of data is put on it
//      directly (as if the disk had it before the cache came).
//   3. `ubcache serve` puts the cache in front of that export (the backing
//      device is an NBD URI) and serves bcache0, writeback held off.
//   4. 16 MiB is written through bcache0: dirty data, in the cache only.
//   5. Random 4 KiB reads of the disk's 8 MiB: misses the first time (from
//      the slow disk), hits the second (from the cache), with IOPS,
//      latencies and the hit ratio bcache's sysfs reports.
//   6. serve is stopped (SIGTERM) and started again: the dirty data is still
//      there, served from the cache.
//   7. writeback is turned on (`ubcache ctl write`) and copies the dirty data
//      to the disk; the superblock goes clean.
//   8. serve is stopped and the disk's export is read directly: it holds
//      everything.
//
// Every NBD client here is ubcache's own (dist/blockdev/nbd.js); the
// commands run are the built `ubcache` (dist/cli/main.js). nbdinfo, nbdcopy
// and friends are not needed.

import { spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const main = join(root, 'dist', 'cli', 'main.js');
if (!existsSync(main)) {
  console.error("demo: dist/ is missing; run 'npm ci' (or 'npm run build') first");
  process.exit(1);
}
const dist = (path) => import(pathToFileURL(join(root, 'dist', path)).href);
const { NbdBlockDevice } = await dist('blockdev/nbd.js');
const { controlRequest } = await dist('control/client.js');
const { setLogLevel } = await dist('util/log.js');
// The client's own notes (reconnects and the like) would only clutter the demo; warnings still show.
setLogLevel('warn');

const MiB = 1024 * 1024;
const DELAY = '5ms';
const WRITTEN = 16 * MiB; // written through bcache0, at 0
const ON_DISK_AT = 32 * MiB; // already on the disk, read through bcache0
const ON_DISK = 8 * MiB;
const READ_SIZE = 4096;
const QUEUE_DEPTH = 8;
const DATA_OFFSET = 8192; // the backing image's data offset (ubcache make's default, bcache's 16 sectors)

const tty = process.stdout.isTTY === true;
const bold = (s) => (tty ? `\x1b[1m${s}\x1b[0m` : s);
const started = Date.now();
let stepNo = 0;
const step = (title) => console.log(`\n${bold(`== ${++stepNo}. ${title}`)}`);
const say = (line) => console.log(`   ${line}`);
const ms = (n) => `${n.toFixed(2)} ms`;
const mib = (bytes) => `${(bytes / MiB).toFixed(1)} MiB`;

const work = mkdtempSync(join(tmpdir(), 'ubcache-demo-'));
const cache = join(work, 'cache.img');
const backing = join(work, 'backing.img');
const slowSock = join(work, 'disk.sock');
const serveSock = join(work, 'serve.sock');
const control = join(work, 'control.sock');
const diskUri = `nbd+unix:///disk?socket=${slowSock}`;
const bcacheUri = `nbd+unix:///bcache0?socket=${serveSock}`;
const daemons = new Set();

function cleanup() {
  for (const d of daemons) d.proc.kill('SIGKILL');
  rmSync(work, { recursive: true, force: true });
}
process.on('exit', cleanup);
for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => {
    cleanup();
    process.exit(130);
  });
}

function fail(message, detail = '') {
  console.error(`\ndemo: ${message}`);
  if (detail) console.error(detail.replace(/^/gm, '   '));
  process.exit(1);
}

/** Run `ubcache ARGS...` to completion; its output, or the demo stops with it. */
function ubcache(args) {
  const r = spawnSync(process.execPath, [main, ...args], { encoding: 'utf8' });
  if (r.status !== 0) fail(`ubcache ${args.join(' ')} failed (status ${r.status})`, `${r.stdout}${r.stderr}`);
  return r.stdout;
}

/** Start a long-running `ubcache ARGS...` and wait for a line of its log matching `ready`. */
function startDaemon(name, args, ready = /listening on/) {
  const proc = spawn(process.execPath, [main, ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
  const d = { name, proc, log: '', exited: undefined };
  daemons.add(d);
  d.exited = new Promise((resolve) => proc.on('exit', (code, signal) => resolve(code ?? signal)));
  return new Promise((resolve) => {
    proc.stderr.setEncoding('utf8');
    proc.stderr.on('data', (text) => {
      const before = d.log;
      d.log += text;
      if (!ready.test(before) && ready.test(d.log)) resolve(d);
    });
    void d.exited.then((status) => {
      if (!ready.test(d.log)) fail(`${name} exited (${status}) before it was ready`, d.log);
    });
  });
}

/** SIGTERM, and the daemon must exit by itself with status 0. */
async function stopDaemon(d) {
  d.proc.kill('SIGTERM');
  const status = await d.exited;
  daemons.delete(d);
  if (status !== 0) fail(`${d.name} exited with ${status}`, d.log);
}

/** Log lines of a daemon matching `re`, indented. */
function logLines(d, re) {
  for (const line of d.log.split('\n')) if (re.test(line)) say(`| ${line}`);
}

async function sysfs(path) {
  const r = await controlRequest(control, 'GET', `/sys/block/bcache0/bcache/${path}`);
  if (r.status !== 200) fail(`reading ${path} over the control socket: HTTP ${r.status} ${r.body}`);
  return r.body.trim();
}

/** Run `count` jobs with `depth` in flight; returns each job's latency (ms) and the elapsed seconds. */
async function timed(count, depth, job) {
  const latencies = new Array(count);
  let next = 0;
  const t0 = process.hrtime.bigint();
  const worker = async () => {
    while (next < count) {
      const i = next++;
      const t = process.hrtime.bigint();
      await job(i);
      latencies[i] = Number(process.hrtime.bigint() - t) / 1e6;
    }
  };
  await Promise.all(Array.from({ length: depth }, worker));
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  return { latencies, seconds };
}

function summary({ latencies, seconds }) {
  const sorted = [...latencies].sort((a, b) => a - b);
  const mean = sorted.reduce((s, x) => s + x, 0) / sorted.length;
  const p99 = sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * 0.99))];
  const iops = Math.round(sorted.length / seconds);
  return { iops, mean, p99, text: `${iops} IOPS, mean latency ${ms(mean)}, p99 ${ms(p99)}` };
}

/** A random permutation of 0..n-1 (the same order for both passes). */
function shuffled(n) {
  const a = Array.from({ length: n }, (_, i) => i);
  for (let i = n - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [a[i], a[j]] = [a[j], a[i]];
  }
  return a;
}

// ---------------------------------------------------------------------------

step('ubcache make: a 64 MiB cache image and a 128 MiB backing image, in writeback mode');
writeFileSync(cache, '');
writeFileSync(backing, '');
truncateSync(cache, 64 * MiB);
truncateSync(backing, 128 * MiB);
say(`$ ubcache make -b 64k --writeback -C cache.img -B backing.img`);
{
  const made = ubcache(['make', '-b', '64k', '--writeback', '-C', cache, '-B', backing]);
  const field = (name) => [...made.matchAll(new RegExp(`^${name}:\\s+(\\S+)`, 'gm'))].map((m) => m[1]);
  const [cacheUuid, backingUuid] = field('UUID');
  say(`cache.img:   uuid ${cacheUuid}, ${field('nbuckets')[0]} buckets of ${Number(field('bucket_size')[0]) / 2} KiB`);
  say(`backing.img: uuid ${backingUuid}, data from sector ${field('data_offset')[0]}`);
  say(`both in cache set ${field('Set UUID')[0]}`);
}

step(`the slow disk: ubcache export --delay ${DELAY} backing.img (every read and write ${DELAY} slower)`);
const slow = await startDaemon('ubcache export', [
  'export',
  '--socket',
  slowSock,
  '--name',
  'disk',
  '--delay',
  DELAY,
  backing,
]);
logLines(slow, /listening on/);
const onDisk = randomBytes(ON_DISK);
{
  const disk = await NbdBlockDevice.open(diskUri);
  await timed(ON_DISK / (256 * 1024), QUEUE_DEPTH, (i) =>
    disk.write(onDisk.subarray(i * 256 * 1024, (i + 1) * 256 * 1024), DATA_OFFSET + ON_DISK_AT + i * 256 * 1024),
  );
  await disk.flush();
  await disk.close();
}
say(`the disk already holds ${mib(ON_DISK)} of data at ${mib(ON_DISK_AT)} (written to its export directly)`);

step('ubcache serve: the cache in front of the slow disk (an NBD URI), writeback held off');
const serveArgs = [
  'serve',
  '--socket',
  serveSock,
  '--control',
  control,
  '--set',
  'bcache0.sequential_cutoff=0',
  '--set',
  'bcache0.writeback_running=0',
  cache,
  diskUri,
];
say(
  `$ ubcache serve --socket serve.sock --set bcache0.writeback_running=0 cache.img '${diskUri.replace(work + '/', '')}'`,
);
let serve = await startDaemon('ubcache serve', serveArgs);
logLines(serve, /register_bdev|listening on|I\/O engine/);

step(`write ${mib(WRITTEN)} through bcache0 (ubcache's own NBD client, 256 KiB writes, ${QUEUE_DEPTH} in flight)`);
const written = randomBytes(WRITTEN);
let dev = await NbdBlockDevice.open(bcacheUri);
say(`bcache0: ${mib(dev.size)}, block size ${dev.logicalBlockSize}`);
{
  const chunk = 256 * 1024;
  const w = await timed(WRITTEN / chunk, QUEUE_DEPTH, (i) =>
    dev.write(written.subarray(i * chunk, (i + 1) * chunk), i * chunk),
  );
  await dev.flush();
  say(`wrote ${mib(WRITTEN)} in ${w.seconds.toFixed(2)} s (${(WRITTEN / MiB / w.seconds).toFixed(0)} MiB/s)`);
}
say(`bcache0 state: ${await sysfs('state')}, dirty_data: ${await sysfs('dirty_data')}`);
{
  const disk = await NbdBlockDevice.open(diskUri);
  const raw = Buffer.alloc(WRITTEN);
  await disk.read(raw, DATA_OFFSET);
  await disk.close();
  if (raw.equals(written)) fail('the disk already holds what was written: writeback was supposed to be off');
  say('the slow disk does not hold it: it is dirty data, in the cache only');
}

step(`random ${READ_SIZE / 1024} KiB reads of the disk's ${mib(ON_DISK)}, twice (${QUEUE_DEPTH} in flight)`);
const order = shuffled(ON_DISK / READ_SIZE);
const readPass = async () => {
  let bad = 0;
  const r = await timed(order.length, QUEUE_DEPTH, async (i) => {
    const at = (order[i] ?? 0) * READ_SIZE;
    const buf = Buffer.alloc(READ_SIZE);
    await dev.read(buf, ON_DISK_AT + at);
    if (!buf.equals(onDisk.subarray(at, at + READ_SIZE))) bad++;
  });
  if (bad > 0) fail(`${bad} reads returned the wrong data`);
  return r;
};
const counters = async () => ({
  hits: Number(await sysfs('stats_total/cache_hits')),
  misses: Number(await sysfs('stats_total/cache_misses')),
});
const c0 = await counters();
const cold = summary(await readPass());
const c1 = await counters();
const warm = summary(await readPass());
const c2 = await counters();
say(
  `first pass  (misses, from the slow disk): ${cold.text}; hits ${c1.hits - c0.hits}, misses ${c1.misses - c0.misses}`,
);
say(
  `second pass (hits, from the cache):       ${warm.text}; hits ${c2.hits - c1.hits}, misses ${c2.misses - c1.misses}`,
);
say(
  `the cache: ${(cold.mean / warm.mean).toFixed(1)}x lower latency, ${(warm.iops / cold.iops).toFixed(1)}x the IOPS; ` +
    `every read returned the disk's data`,
);
say(`hit ratio (sysfs stats_total/cache_hit_ratio): ${await sysfs('stats_total/cache_hit_ratio')}%`);
say(`$ ubcache ctl status`);
for (const line of ubcache(['ctl', '--control', control, 'status']).trimEnd().split('\n')) say(line);

step('restart: serve stopped with SIGTERM, the dirty data stays in the cache');
await dev.close();
await stopDaemon(serve);
logLines(serve, /SIGTERM|stopped/);
say(`$ ubcache show-super '${diskUri.replace(work + '/', '')}' (the disk's superblock, read through its export)`);
for (const line of ubcache(['show-super', diskUri]).split('\n')) {
  if (/cache_mode|cache_state/.test(line)) say(line);
}
serve = await startDaemon('ubcache serve', serveArgs);
logLines(serve, /replay|listening on/);
dev = await NbdBlockDevice.open(bcacheUri);
{
  const before = await counters();
  const back = Buffer.alloc(WRITTEN);
  const chunk = 1 * MiB;
  const r = await timed(WRITTEN / chunk, QUEUE_DEPTH, (i) =>
    dev.read(back.subarray(i * chunk, (i + 1) * chunk), i * chunk),
  );
  const after = await counters();
  if (!back.equals(written)) fail('after the restart, bcache0 does not read back what was written');
  say(
    `bcache0 reads back the ${mib(WRITTEN)} written before the restart, identical, in ${r.seconds.toFixed(2)} s ` +
      `(hits ${after.hits - before.hits}, misses ${after.misses - before.misses}): served from the cache`,
  );
  say(`bcache0 state: ${await sysfs('state')}, dirty_data: ${await sysfs('dirty_data')}`);
}

step('writeback: ubcache ctl write /sys/block/bcache0/bcache/writeback_running 1');
await dev.close();
ubcache(['ctl', '--control', control, 'write', '/sys/block/bcache0/bcache/writeback_percent', '0']);
ubcache(['ctl', '--control', control, 'write', '/sys/block/bcache0/bcache/writeback_delay', '0']);
const wbStart = Date.now();
ubcache(['ctl', '--control', control, 'write', '/sys/block/bcache0/bcache/writeback_running', '1']);
{
  let last = '';
  for (;;) {
    const state = await sysfs('state');
    const dirty = await sysfs('dirty_data');
    if (dirty !== last) {
      say(`dirty_data ${dirty}, state ${state}`);
      last = dirty;
    }
    // The state says clean a moment before the superblock saying so is written (then logged).
    if (state === 'clean' && /marked clean/.test(serve.log)) break;
    if (Date.now() - wbStart > 60_000) fail('writeback did not finish within 60 s', serve.log);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  say(`written back to the slow disk in ${((Date.now() - wbStart) / 1000).toFixed(1)} s`);
}
logLines(serve, /marked clean/);
await stopDaemon(serve);

step("check: read the slow disk's export directly, without the cache");
{
  const disk = await NbdBlockDevice.open(diskUri);
  const raw = Buffer.alloc(WRITTEN);
  await disk.read(raw, DATA_OFFSET);
  const rest = Buffer.alloc(ON_DISK);
  await disk.read(rest, DATA_OFFSET + ON_DISK_AT);
  await disk.close();
  if (!raw.equals(written)) fail('the disk does not hold what was written through the cache');
  if (!rest.equals(onDisk)) fail("the disk's own data changed");
  say(`the disk holds the ${mib(WRITTEN)} written through the cache, and its own ${mib(ON_DISK)}, unchanged`);
}
for (const line of ubcache(['show-super', diskUri]).split('\n')) {
  if (/cache_state/.test(line)) say(line);
}
await stopDaemon(slow);

console.log(`\n${bold(`demo done in ${((Date.now() - started) / 1000).toFixed(1)} s`)}`);
