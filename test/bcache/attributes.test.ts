// Settable attributes: kernel parsing (base 10, trailing newline, clamps,
// choice lists, "4M" refused), clear errors, and what applying does.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  AttributeError,
  choiceList,
  DEVICE_ATTRIBUTES,
  findAttribute,
  SET_ATTRIBUTES,
} from '../../src/bcache/attributes.ts';
import { assertNothingLeft } from './helpers.ts';
import { makePair, mem } from './request-helpers.ts';

const dev = (name: string) => findAttribute(DEVICE_ATTRIBUTES, name, 'bcache0');
const set = (name: string) => findAttribute(SET_ATTRIBUTES, name, 'the cache set');

test('values are parsed as the kernel parses them, and refused with what is accepted', () => {
  assert.throws(() => dev('sequential_cutoff').parse('4M'), /sequential_cutoff: "4M" is not a whole number from 0/);
  assert.throws(() => dev('cache_mode').parse('write-back'), /one of: writethrough, writeback, writearound, none/);
  assert.throws(() => dev('writeback_delay').parse('-1'), AttributeError);
  assert.throws(() => dev('writeback_delay').parse('4294967296'), /out of range/);
  assert.throws(() => set('journal_delay_ms').parse('70000'), /from 0 to 65535/);
  assert.throws(() => dev('label').parse('x'.repeat(33)), /longer than 32 bytes/);
  assert.throws(
    () => findAttribute(DEVICE_ATTRIBUTES, 'cache_size', 'bcache0'),
    (err: unknown) => {
      assert.ok(err instanceof AttributeError);
      assert.match(err.message, /bcache0 has no settable attribute "cache_size"; valid: cache_mode, sequential_cutoff/);
      return true;
    },
  );
  // Accepted forms: a trailing newline, a '+', clamps.
  dev('sequential_cutoff').parse('0\n');
  dev('writeback_delay').parse('+5');
  dev('writeback_percent').parse('99');
  dev('writeback_running').parse('7');
  assert.equal(
    choiceList(['writethrough', 'writeback', 'writearound', 'none'], 1),
    'writethrough [writeback] writearound none',
  );
});

test('applying settings changes the device and the set, and shows as sysfs does', async () => {
  const p = await makePair();
  const d = p.dev;
  await dev('cache_mode').parse('writeback\n')(d);
  assert.equal(d.cacheModeName, 'writeback');
  assert.equal(dev('cache_mode').show(d), 'writethrough [writeback] writearound none');
  await dev('writeback_percent').parse('99')(d);
  assert.equal(d.settings.writebackPercent, 40, 'clamped to cutoff_writeback');
  await dev('writeback_rate').parse('2048')(d);
  assert.equal(dev('writeback_rate').show(d), '1.0M', 'shown in bytes per second');
  await dev('sequential_cutoff').parse('0')(d);
  assert.equal(d.settings.sequentialCutoff, 0);
  assert.equal(dev('sequential_cutoff').show(d), '0.0k');
  await dev('writeback_running').parse('0')(d);
  assert.equal(d.settings.writebackRunning, false);
  await dev('label').parse('data disk\n')(d);
  assert.equal(dev('label').show(d), 'data disk');
  assert.equal(p.set.cs.uuids.get(0).label.subarray(0, 9).toString(), 'data disk');
  await set('journal_delay_ms').parse('10')(p.set);
  assert.equal(p.set.cs.journal.delayMs, 10);
  await set('io_error_halflife').parse('100')(p.set);
  assert.equal(set('io_error_halflife').show(p.set), '88');
  // ram_cache_size (ubcache's own): 32 MiB by default, a size with a suffix, 0 off with its memory freed.
  assert.equal(set('ram_cache_size').show(p.set), '32.0M');
  await set('ram_cache_size').parse('8M\n')(p.set);
  assert.equal(p.set.cs.ramCache.size, 8 * 1024 * 1024);
  await set('ram_cache_size').parse('0')(p.set);
  assert.equal(set('ram_cache_size').show(p.set), '0.0k');
  assert.equal(p.set.cs.ramCache.allocated, 0);
  assert.throws(
    () => set('ram_cache_size').parse('17G'),
    /ram_cache_size: 17G is too large \(a size in bytes from 0 to/,
  );
  assert.throws(() => set('ram_cache_size').parse('1T'), /is not a size in bytes/);
  await p.registry.stopAll();
  // The mode and the label are in the backing superblock.
  const r = await makePair({ backingDev: mem(p.backingDev).clone(), cacheDev: mem(p.cacheDev).clone(), format: false });
  assert.equal(r.dev.cacheModeName, 'writeback');
  assert.equal(dev('label').show(r.dev), 'data disk');
  await r.registry.stopAll();
  assertNothingLeft();
});
