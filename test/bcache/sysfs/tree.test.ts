// The attribute tree: every attribute's read format byte for byte as bcache
// prints it, valid and invalid writes (the kernel's errno, nothing changed),
// and the effects of writes on the engine's behaviour.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { FaultyBlockDevice } from '../../../src/blockdev/faulty.ts';
import type { MemoryBlockDevice } from '../../../src/blockdev/memory.ts';
import { splitPath } from '../../../src/bcache/sysfs/tree.ts';
import { renderMetrics } from '../../../src/control/metrics.ts';
import { assertNothingLeft } from '../helpers.ts';
import { MiB, mem, pattern } from '../request-helpers.ts';
import { makeRig, refused, type Rig } from './helpers.ts';

const D = '/sys/block/bcache0/bcache';

async function attached(o: Parameters<typeof makeRig>[0] = {}): Promise<Rig> {
  const rig = await makeRig(o);
  await rig.registry.registerPath('cache');
  await rig.registry.registerPath('backing');
  return rig;
}

async function done(rig: Rig): Promise<void> {
  await rig.tree.stop();
  await rig.registry.stopAll();
  assertNothingLeft();
}

test('a backing device: every attribute reads as bcache prints it', async () => {
  const rig = await attached();
  const t = rig.tree;
  const set = [...rig.registry.sets.keys()][0] ?? '';
  const expected: Record<string, string> = {
    cache_mode: '[writethrough] writeback writearound none\n',
    sequential_cutoff: '4.0M\n',
    writeback_running: '1\n',
    writeback_delay: '0\n',
    writeback_percent: '10\n',
    writeback_rate: '512.0k\n',
    writeback_rate_update_seconds: '5\n',
    writeback_rate_minimum: '8\n',
    writeback_rate_p_term_inverse: '40\n',
    writeback_rate_i_term_inverse: '10000\n',
    writeback_metadata: '1\n',
    writeback_consider_fragment: '1\n',
    stop_when_cache_set_failed: '[auto] always\n',
    readahead_cache_policy: '[all] meta-only\n',
    io_error_limit: '64\n',
    io_disable: '0\n',
    io_errors: '0\n',
    label: '\n',
    running: '1\n',
    state: 'clean\n',
    dirty_data: '0.0k\n',
    stripe_size: '1.0T\n',
    partial_stripes_expensive: '0\n',
    backing_dev_name: 'backing\n',
    backing_dev_uuid: `${rig.registry.devices[0]?.uuid ?? ''}\n`,
    'stats_total/cache_hits': '0\n',
    'stats_total/cache_misses': '0\n',
    'stats_total/cache_bypass_hits': '0\n',
    'stats_total/cache_bypass_misses': '0\n',
    'stats_total/cache_hit_ratio': '0\n',
    'stats_total/cache_miss_collisions': '0\n',
    'stats_total/bypassed': '0.0k\n',
    'stats_day/bypassed': '0.0k\n',
    'cache/journal_delay_ms': '5\n',
  };
  for (const [name, value] of Object.entries(expected)) assert.equal(t.read(`${D}/${name}`), value, name);
  assert.match(
    t.read(`${D}/writeback_rate_debug`),
    /^rate:\t\t512\.0k\/sec\ndirty:\t\t0\.0k\ntarget:\t\t0\.0k\nproportional:\t0\.0k\nintegral:\t0\.0k\nchange:\t\t0\.0k\/sec\nnext io:\t-?\d+ms\n$/,
  );
  assert.deepEqual(
    t.list(D).filter((n) => ['attach', 'detach', 'stop', 'clear_stats', 'dev', 'cache'].includes(n)),
    ['attach', 'detach', 'stop', 'clear_stats', 'dev', 'cache'],
  );
  assert.equal(t.stat(`${D}/attach`).mode, 0o200);
  assert.equal(t.stat(`${D}/state`).mode, 0o444);
  assert.equal(t.stat(`${D}/cache_mode`).mode, 0o644);
  assert.equal(t.stat(`${D}/cache`).kind, 'link');
  assert.deepEqual(t.list(`/sys/fs/bcache/${set}/bdev0`), t.list(D), 'bdevN links to the device');
  assert.equal(t.read('block/bcache0/size'), `${(16 * 1024 * 1024) / 512 - 16}\n`, '/sys/ may be omitted');
  await done(rig);
});

test('a cache set, its internal/ and cache0/: formats', async () => {
  const rig = await attached();
  const t = rig.tree;
  const S = `/sys/fs/bcache/${[...rig.registry.sets.keys()][0] ?? ''}`;
  const expected: Record<string, string> = {
    journal_delay_ms: '5\n',
    congested_read_threshold_us: '0\n',
    congested_write_threshold_us: '0\n',
    io_error_limit: '8\n',
    io_error_halflife: '0\n',
    errors: '[unregister] panic\n',
    synchronous: '1\n',
    bucket_size: '64.0k\n',
    block_size: '4.0k\n',
    tree_depth: '0\n',
    dirty_data: '0.0k\n',
    'stats_total/cache_hits': '0\n',
    'internal/idle_max_writeback_rate': '1\n',
    'internal/cutoff_writeback': '40\n',
    'internal/cutoff_writeback_sync': '70\n',
    'internal/writeback_keys_done': '0\n',
    'internal/io_disable': '0\n',
    'internal/copy_gc_enabled': '0\n', // off by default, as Linux 6.1 shows it
    'cache0/io_errors': '0\n',
    'cache0/bucket_size': '64.0k\n',
    'cache0/block_size': '4.0k\n',
    'cache0/nbuckets': `${(48 * 1024 * 1024) / 512 / 128}\n`,
    'cache0/discard': '0\n',
    'cache0/cache_replacement_policy': '[lru] fifo random\n',
  };
  for (const [name, value] of Object.entries(expected)) assert.equal(t.read(`${S}/${name}`), value, name);
  // copy_gc_enabled switches the engine's moving GC.
  const set0 = [...rig.registry.sets.values()][0];
  assert.ok(set0);
  await t.write(`${S}/internal/copy_gc_enabled`, '0\n');
  assert.equal(t.read(`${S}/internal/copy_gc_enabled`), '0\n');
  assert.equal(set0.cs.copyGcEnabled, false);
  await t.write(`${S}/internal/copy_gc_enabled`, '1\n');
  assert.equal(set0.cs.copyGcEnabled, true);
  for (const name of ['cache_available_percent', 'root_usage_percent']) {
    const v = Number(t.read(`${S}/${name}`).trimEnd());
    assert.ok(Number.isInteger(v) && v >= 0 && v <= 100, `${name} is a percentage`);
  }
  // btree_gc_*: -1 (never) until a pass ran, then the time since it (s) and its durations (ms).
  const set = [...rig.registry.sets.values()][0];
  assert.ok(set);
  const gcRunsBefore = set.cs.gc.stats.runs;
  if (gcRunsBefore === 0) assert.equal(t.read(`${S}/internal/btree_gc_last_sec`), '-1\n');
  await set.cs.runGc();
  assert.equal(t.read(`${S}/internal/btree_gc_last_sec`), '0\n');
  for (const name of [
    'btree_gc_average_duration_ms',
    'btree_gc_max_duration_ms',
    'btree_gc_average_frequency_sec',
    'btree_gc_max_pause_ms',
  ]) {
    assert.match(t.read(`${S}/internal/${name}`), /^\d+\n$/, name);
  }
  assert.match(t.read(`${S}/btree_cache_size`), /^\d+\.\d[kM]\n$/);
  assert.match(t.read(`${S}/average_key_size`), /^\d+\.\d[kM?]\n$/);
  assert.match(t.read(`${S}/cache0/written`), /^\d+\.\d[kM]\n$/);
  assert.deepEqual(t.list(`${S}/cache0/set`), t.list(S), 'cache0/set links back');
  assert.deepEqual(t.list('/sys/fs/bcache').slice(0, 3), ['register', 'register_quiet', 'pendings_cleanup']);
  const json = t.json(S) as Record<string, unknown>;
  assert.equal(json['journal_delay_ms'], '5');
  assert.equal(json['unregister'], null, 'write-only files are null in the JSON view');
  assert.deepEqual(json['bdev0'], { $link: '/sys/block/bcache0/bcache' });
  await done(rig);
});

test('bad writes return the kernel errno with a message and change nothing', async () => {
  const rig = await attached();
  const t = rig.tree;
  await refused(t, `${D}/cache_mode`, 'write-back', 'EINVAL', /one of: writethrough, writeback, writearound, none/);
  await refused(t, `${D}/sequential_cutoff`, '4M', 'EINVAL', /not a whole number/);
  await refused(t, `${D}/writeback_delay`, '-1', 'EINVAL');
  await refused(t, `${D}/label`, 'x'.repeat(33), 'EINVAL', /longer than 32 bytes/);
  await refused(t, `${D}/running`, '1', 'EBUSY', /running already/);
  await refused(t, `${D}/running`, 'yes', 'EINVAL');
  await refused(t, `${D}/attach`, 'abc', 'EINVAL', /not a cache set uuid/);
  await refused(t, `${D}/attach`, '00000000-0000-0000-0000-000000000001', 'ENOENT', /cache set not found/);
  await refused(t, `${D}/attach`, rig.setText, 'EINVAL', /already attached/);
  await refused(t, `${D}/state`, 'clean', 'EACCES', /read-only/);
  await refused(t, D, '1', 'EISDIR');
  await refused(t, `${D}/nope`, '1', 'ENOENT', /no such file or directory; list \/sys\/block\/bcache0\/bcache/);
  await refused(t, `${D}/../bcache/state`, '1', 'EINVAL', /"\." and "\.\."/);
  await refused(t, `${D}/writeback_delay`, '1'.repeat(5000), 'EINVAL', /at most 4096 bytes/);
  await refused(t, '/sys/fs/bcache/register', 'missing.img', 'EINVAL', /failed to open device/);
  await refused(t, '/sys/fs/bcache/register', 'backing', 'EBUSY', /device already registered/);
  await t.write('/sys/fs/bcache/register_quiet', 'backing\n');
  assert.throws(() => t.read('/sys/fs/bcache/register'), { code: 'EACCES' });
  assert.throws(() => t.read(`${D}/state/x`), { code: 'ENOTDIR' });
  assert.equal(t.read(`${D}/cache_mode`), '[writethrough] writeback writearound none\n');
  assert.equal(t.read(`${D}/sequential_cutoff`), '4.0M\n');
  assert.equal(t.read(`${D}/writeback_delay`), '0\n');
  assert.equal(t.read(`${D}/label`), '\n');
  assert.equal(rig.registry.devices.length, 1);
  // Clamps are silent, a trailing newline is accepted.
  await t.write(`${D}/writeback_percent`, '99\n');
  assert.equal(t.read(`${D}/writeback_percent`), '40\n');
  await t.write(`${D}/label`, 'data\n');
  assert.equal(t.read(`${D}/label`), 'data\n');
  await t.write(`${D}/writeback_rate`, '2048');
  assert.equal(t.read(`${D}/writeback_rate`), '1.0M\n');
  assert.deepEqual(splitPath('sys/fs//bcache/'), ['fs', 'bcache']);
  await done(rig);
  await refused(t, `${D}/cache_mode`, 'writeback', 'ENOENT');
});

test('writes change behaviour: cache_mode, sequential_cutoff, writeback_running, clear_stats', async () => {
  const rig = await attached();
  const t = rig.tree;
  const dev = rig.registry.devices[0];
  assert.ok(dev);
  const backing = mem(rig.devices.get('backing') ?? assert.fail());
  const onBacking = (sector: number, n: number): Buffer => {
    const b = Buffer.alloc(n * 512);
    backing.readSync(b, (16 + sector) * 512);
    return b;
  };

  // writeback_running 0 then writeback: writes stay dirty in the cache only.
  await t.write(`${D}/writeback_running`, '0');
  await t.write(`${D}/cache_mode`, 'writeback');
  await dev.device.write(pattern(1, 0, 64), 0);
  assert.equal(t.read(`${D}/dirty_data`), '32.0k\n');
  assert.equal(t.read(`${D}/state`), 'dirty\n');
  assert.notDeepEqual(onBacking(0, 64), pattern(1, 0, 64), 'not written back while writeback_running is 0');
  // writeback_running 1 cleans it.
  await t.write(`${D}/writeback_running`, '1');
  while (t.read(`${D}/state`) !== 'clean\n') await dev.attachment?.writeback.whenIdle();
  assert.equal(t.read(`${D}/dirty_data`), '0.0k\n');
  assert.deepEqual(onBacking(0, 64), pattern(1, 0, 64));

  // writearound: a write goes to the backing device only; reading it is a miss.
  await t.write(`${D}/cache_mode`, 'writearound');
  await dev.device.write(pattern(2, 1000, 8), 1000 * 512);
  assert.deepEqual(onBacking(1000, 8), pattern(2, 1000, 8));
  await t.write(`${D}/clear_stats`, '1');
  await dev.device.read(Buffer.alloc(4096), 1000 * 512);
  await dev.request.settle();
  assert.equal(t.read(`${D}/stats_total/cache_misses`), '1\n');
  await dev.device.read(Buffer.alloc(4096), 1000 * 512);
  assert.equal(t.read(`${D}/stats_total/cache_hits`), '1\n', 'the miss was filled');
  assert.equal(t.read(`${D}/stats_total/cache_hit_ratio`), '50\n');

  // A small sequential_cutoff makes a sequential stream bypass; 0 stops bypass.
  await t.write(`${D}/sequential_cutoff`, '8192');
  for (let i = 0; i < 8; i++) await dev.device.read(Buffer.alloc(4096), (4000 + i * 8) * 512);
  assert.notEqual(t.read(`${D}/stats_total/cache_bypass_misses`), '0\n', 'the stream bypassed');
  assert.notEqual(t.read(`${D}/stats_total/bypassed`), '0.0k\n');
  await t.write(`${D}/clear_stats`, '1');
  await t.write(`${D}/sequential_cutoff`, '0');
  for (let i = 0; i < 8; i++) await dev.device.read(Buffer.alloc(4096), (6000 + i * 8) * 512);
  assert.equal(t.read(`${D}/stats_total/cache_bypass_misses`), '0\n');
  assert.equal(t.read(`${D}/stats_total/cache_misses`), '8\n');
  // clear_stats zeroes the device's total.
  await t.write(`${D}/clear_stats`, '1');
  for (const f of ['cache_hits', 'cache_misses', 'cache_bypass_hits', 'cache_bypass_misses', 'cache_hit_ratio']) {
    assert.equal(t.read(`${D}/stats_total/${f}`), '0\n', f);
  }
  assert.equal(t.read(`${D}/stats_total/bypassed`), '0.0k\n');
  await dev.request.settle();
  await done(rig);
});

test('stats_five_minute/hour/day decay as bcache scales them', async () => {
  const rig = await attached();
  const t = rig.tree;
  const dev = rig.registry.devices[0];
  assert.ok(dev);
  for (let i = 0; i < 64; i++) dev.stats.markRead(true, false);
  for (let i = 0; i < 64; i++) dev.stats.markRead(false, false);
  assert.equal(t.read(`${D}/stats_five_minute/cache_hits`), '0\n', 'folded in only on the tick');
  t.tick();
  // five_minute is scaled on every tick: 64 * 31/32 = 62; hour and day not yet.
  assert.equal(t.read(`${D}/stats_five_minute/cache_hits`), '62\n');
  assert.equal(t.read(`${D}/stats_hour/cache_hits`), '64\n');
  assert.equal(t.read(`${D}/stats_day/cache_misses`), '64\n');
  assert.equal(t.read(`${D}/stats_five_minute/cache_hit_ratio`), '50\n');
  for (let i = 1; i < 12; i++) t.tick();
  assert.equal(t.read(`${D}/stats_hour/cache_hits`), '62\n', 'hour scales every 12th tick');
  assert.equal(t.read(`${D}/stats_day/cache_hits`), '64\n');
  let expected = 64 * 65536;
  for (let i = 0; i < 12; i++) expected = Math.floor((expected * 31) / 32);
  assert.equal(t.read(`${D}/stats_five_minute/cache_hits`), `${Math.floor(expected / 65536)}\n`);
  assert.equal(t.read(`${D}/stats_total/cache_hits`), '64\n', 'the total never decays');
  const S = `/sys/fs/bcache/${[...rig.registry.sets.keys()][0] ?? ''}`;
  rig.registry.sets.values().next().value?.stats.markRead(true, false);
  t.tick();
  assert.equal(t.read(`${S}/stats_five_minute/cache_hits`), '0\n', 'less than one after scaling shows 0');
  assert.equal(t.read(`${S}/stats_hour/cache_hits`), '1\n');
  await t.write(`${S}/clear_stats`, '1');
  assert.equal(t.read(`${S}/stats_total/cache_hits`), '0\n');
  await done(rig);
});

test('io_errors count cache and backing errors in the tree and in /metrics; internal/io_disable 1 retires the set as a drill', async () => {
  const rig = await makeRig({ settings: { sequentialCutoff: 0 } });
  const cache = new FaultyBlockDevice(rig.devices.get('cache') as MemoryBlockDevice, { name: 'cache' });
  const backing = new FaultyBlockDevice(rig.devices.get('backing') as MemoryBlockDevice, { name: 'backing' });
  rig.devices.set('cache', cache);
  rig.devices.set('backing', backing);
  await rig.registry.registerPath('cache');
  await rig.registry.registerPath('backing');
  const t = rig.tree;
  const uuid = [...rig.registry.sets.keys()][0] ?? '';
  const S = `/sys/fs/bcache/${uuid}`;
  const dev = rig.registry.devices[0];
  assert.ok(dev);
  const data = pattern(1, 0, 16);
  await dev.device.write(data, 0);
  // The writethrough copy reaches the cache when its insert settles.
  await dev.request.settle();
  const buf = Buffer.alloc(data.length);
  // A clean cached read fails on the cache device: recovered from the backing device, counted.
  cache.failNth(1, { ops: ['read'] });
  await dev.device.read(buf, 0);
  assert.ok(buf.equals(data), 'the read was recovered');
  assert.equal(t.read(`${S}/cache0/io_errors`), '1\n');
  // A read from the backing device fails (a miss): the client sees it, io_errors counts it.
  backing.failNth(1, { ops: ['read'] });
  await assert.rejects(dev.device.read(Buffer.alloc(4096), 4 * MiB));
  assert.equal(t.read(`${D}/io_errors`), '1\n');
  const metrics = renderMetrics(rig.registry, []);
  assert.match(metrics, new RegExp(`^ubcache_cache_io_errors_total\\{set="${uuid}"\\} 1$`, 'm'));
  assert.match(metrics, new RegExp(`^ubcache_cache_io_errors\\{set="${uuid}"\\} 1$`, 'm'));
  assert.match(metrics, /^ubcache_backing_io_errors_total\{device="bcache0"\} 1$/m);
  assert.match(metrics, /^ubcache_device_io_disabled\{device="bcache0"\} 0$/m);
  assert.match(metrics, /^ubcache_cache_sets_failed_total 0$/m);
  // 0 on a healthy set changes nothing; 1 runs the error path.
  await t.write(`${S}/internal/io_disable`, '0');
  assert.equal(t.read(`${S}/internal/io_disable`), '0\n');
  await refused(t, `${S}/internal/io_disable`, 'x', 'EINVAL');
  const set = rig.registry.sets.get(uuid);
  assert.ok(set);
  await t.write(`${S}/internal/io_disable`, '1\n');
  assert.equal(t.read(`${S}/internal/io_disable`), '1\n');
  await refused(t, `${S}/internal/io_disable`, '0', 'EBUSY', /retiring/);
  assert.ok(set.retired, 'the retire began');
  await set.retired;
  assert.equal(rig.registry.sets.size, 0, 'the set is gone');
  assert.ok(dev.running && !dev.attached, 'the clean writethrough device serves on uncached');
  await dev.device.read(buf, 0);
  assert.ok(buf.equals(data), 'from the backing device');
  assert.match(renderMetrics(rig.registry, []), /^ubcache_cache_sets_failed_total 1$/m);
  await done(rig);
});
